import VBDCore
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Notes on the design
//
// Deterministic concurrency (FoundationDB, TigerBeetle, Coyote): the simulator runs real threads,
// but only the one holding the baton runs. At every scheduling point (a StoreMutex lock, try-lock
// or unlock, and every file operation through `HookedDirectory`) the running thread asks the
// scheduler who runs next, and a seeded generator decides. A thread waiting for a lock someone
// holds is not runnable. So one seed is one interleaving, replayed exactly, and a race found once
// is found again.
//
// Three strategies, picked by the seed:
//   random walk  every point picks uniformly among runnable threads (many short switches);
//   parking      a random walk in which, at a point, the running thread may be parked for the
//                next 1-64 decisions (a preempted thread: another thread's whole request runs
//                between two of its steps, which a uniform walk makes exponentially rare);
//   PCT          (Burckhardt et al., "A randomized scheduler with probabilistic guarantees of
//                finding bugs") threads have distinct random priorities, the highest runnable one
//                runs, and at a few random points the running thread drops to the lowest priority:
//                this keeps one thread parked across a long stretch of another's work, which is
//                what a stale-reader race needs.

/// Runs bodies on real threads, one at a time, interleaved at scheduling points by a seed.
public final class ControlledScheduler: InterleavingScheduler, @unchecked Sendable {
    // Everything below is guarded by `m`; `turn` is broadcast whenever the baton moves.
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let turn = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    private enum ThreadState: Equatable { case runnable, blocked(ObjectIdentifier), finished }

    private var rng: SplitMix64
    private enum Strategy: String { case randomWalk = "random-walk", parking, pct }
    private let kind: Strategy
    /// Parking: the decision number until which each thread sits out (when others can run).
    private var parkedUntil: [Int] = []
    private var states: [ThreadState] = []
    private var priorities: [Int] = []
    private var changePoints: Set<Int> = []
    private var lowestPriority = 0
    /// The thread holding the baton; -1 while the controller (an unmanaged thread) runs.
    private var running = -1
    private var lockOwners: [ObjectIdentifier: Int] = [:]
    private var managed: [UInt: Int] = [:]
    /// Scheduling points passed and times the baton moved, for the summary.
    public private(set) var decisions = 0
    public private(set) var switches = 0

    public init(seed: UInt64) {
        rng = SplitMix64(seed: seed ^ 0x5C4E_D01E)
        kind = [Strategy.randomWalk, .parking, .pct][Int(rng.next() % 3)]
        pthread_mutex_init(m, nil)
        pthread_cond_init(turn, nil)
    }

    deinit {
        pthread_cond_destroy(turn); turn.deallocate()
        pthread_mutex_destroy(m); m.deallocate()
    }

    public var strategy: String { kind.rawValue }

    /// Runs every body on its own thread, interleaved by the seed; returns when all have finished.
    public func run(_ bodies: [@Sendable () -> Void]) {
        pthread_mutex_lock(m)
        states = Array(repeating: .runnable, count: bodies.count)
        parkedUntil = Array(repeating: 0, count: bodies.count)
        priorities = Array(0..<bodies.count).shuffled(using: &rng).map { $0 + 1_000 }
        lowestPriority = 999
        // PCT depth 3: change points spread over the first few thousand scheduling points.
        changePoints = Set((0..<3).map { _ in Int(rng.next() % 4_000) })
        pthread_mutex_unlock(m)

        var threads: [pthread_t] = []
        for (index, body) in bodies.enumerated() {
            let start = ThreadStart { [self] in
                pthread_mutex_lock(m)
                managed[Self.currentThread] = index
                while running != index { pthread_cond_wait(turn, m) }
                pthread_mutex_unlock(m)
                body()
                pthread_mutex_lock(m)
                states[index] = .finished
                managed[Self.currentThread] = nil
                pickNextLocked()
                pthread_cond_broadcast(turn)
                pthread_mutex_unlock(m)
            }
            threads.append(Self.spawn(start))
        }
        pthread_mutex_lock(m)
        pickNextLocked()
        pthread_cond_broadcast(turn)
        while states.contains(where: { $0 != .finished }) { pthread_cond_wait(turn, m) }
        pthread_mutex_unlock(m)
        for t in threads { pthread_join(t, nil) }
    }

    // MARK: InterleavingScheduler

    public func acquire(_ lock: ObjectIdentifier) {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        guard let me = managed[Self.currentThread] else { return }
        switchLocked(me)
        while let owner = lockOwners[lock] {
            precondition(owner != me, "a managed thread took a StoreMutex it already holds")
            states[me] = .blocked(lock)
            switchLocked(me)
        }
        lockOwners[lock] = me
    }

    public func tryAcquire(_ lock: ObjectIdentifier) -> Bool? {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        guard let me = managed[Self.currentThread] else { return nil }
        switchLocked(me)
        guard lockOwners[lock] == nil else { return false }
        lockOwners[lock] = me
        return true
    }

    public func release(_ lock: ObjectIdentifier) {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        guard let me = managed[Self.currentThread] else { return }
        lockOwners[lock] = nil
        for i in states.indices where states[i] == .blocked(lock) { states[i] = .runnable }
        switchLocked(me)
    }

    public func yield() {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        guard let me = managed[Self.currentThread] else { return }
        switchLocked(me)
    }

    // MARK: Internals

    /// A scheduling point of thread `me` (which holds the baton): pass it on as the seed says and
    /// wait until it comes back.
    private func switchLocked(_ me: Int) {
        decisions += 1
        if kind == .pct && changePoints.contains(decisions) {
            priorities[me] = lowestPriority
            lowestPriority -= 1
        }
        if kind == .parking && rng.next() % 8 == 0 {
            parkedUntil[me] = decisions + 1 + Int(rng.next() % 64)
        }
        pickNextLocked()
        guard running != me else { return }
        switches += 1
        pthread_cond_broadcast(turn)
        while running != me { pthread_cond_wait(turn, m) }
    }

    private func pickNextLocked() {
        let runnable = states.indices.filter { states[$0] == .runnable }
        guard !runnable.isEmpty else {
            if states.allSatisfy({ $0 == .finished }) { running = -1; return }
            // Every live thread waits for a lock: a real deadlock, and this interleaving shows it.
            fatalError("deadlock: threads \(states) wait for locks held by \(lockOwners)")
        }
        switch kind {
        case .pct:
            running = runnable.max { priorities[$0] < priorities[$1] }!
        case .parking:
            let awake = runnable.filter { parkedUntil[$0] <= decisions }
            let choices = awake.isEmpty ? runnable : awake
            running = choices[Int(rng.next() % UInt64(choices.count))]
        case .randomWalk:
            running = runnable[Int(rng.next() % UInt64(runnable.count))]
        }
    }

    private static var currentThread: UInt { UInt(bitPattern: Int(bitPattern: pthread_self())) }

    private final class ThreadStart {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    private static func spawn(_ start: ThreadStart) -> pthread_t {
        var thread = pthread_t()
        let argument = Unmanaged.passRetained(start).toOpaque()
        let rc = pthread_create(&thread, nil, { argument in
            Unmanaged<ThreadStart>.fromOpaque(argument!).takeRetainedValue().body()
            return nil
        }, argument)
        precondition(rc == 0, "pthread_create failed: \(rc)")
        return thread
    }
}
