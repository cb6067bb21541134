import CVBDSys
import Synchronization
import VBDCache
import VBDCore

/// Errors of the store's operator-facing API (CLI, control socket). Block I/O reports
/// ``BlockDeviceError`` instead, which maps to NBD error numbers.
public enum StoreError: Error, Equatable, Sendable, CustomStringConvertible {
    case notInitialized(path: String)
    case alreadyInitialized(path: String)
    case locked(String)
    case notFound(String)
    case alreadyExists(String)
    case invalidName(String, reason: String)
    case invalidArgument(String)
    /// Deleting `name` would orphan `dependents`; `hint` says how to proceed.
    case hasDependents(name: String, dependents: [String], hint: String)
    case readOnly(String)
    case noSpace
    case corrupted(String)
    case io(String)
    case notSupported(String)

    public var description: String {
        switch self {
        case .notInitialized(let p): return "no store at \(p): run `vbdtool init --store \(p)` first"
        case .alreadyInitialized(let p): return "a store already exists at \(p)"
        case .locked(let s): return s
        case .notFound(let n): return "no volume or snapshot named '\(n)'"
        case .alreadyExists(let n): return "the name '\(n)' is already taken"
        case let .invalidName(n, reason): return "invalid name '\(n)': \(reason)"
        case .invalidArgument(let s): return s
        case let .hasDependents(name, deps, hint):
            return "'\(name)' is still needed by \(deps.joined(separator: ", ")); \(hint)"
        case .readOnly(let n): return "'\(n)' is a read-only snapshot"
        case .noSpace: return "no space left on the device holding the store"
        case .corrupted(let s): return "store corruption: \(s)"
        case .io(let s): return "I/O error: \(s)"
        case .notSupported(let s): return "not supported: \(s)"
        }
    }

    /// A stable machine-readable code for `--json` output and the control protocol.
    public var code: String {
        switch self {
        case .notInitialized: return "not-initialized"
        case .alreadyInitialized: return "already-initialized"
        case .locked: return "locked"
        case .notFound: return "not-found"
        case .alreadyExists: return "already-exists"
        case .invalidName: return "invalid-name"
        case .invalidArgument: return "invalid-argument"
        case .hasDependents: return "has-dependents"
        case .readOnly: return "read-only"
        case .noSpace: return "no-space"
        case .corrupted: return "corrupted"
        case .io: return "io"
        case .notSupported: return "not-supported"
        }
    }

    init(_ e: StorageError) {
        switch e {
        case .noSpace: self = .noSpace
        case .locked(let s): self = .locked(s)
        case .notFound(let s): self = .io("missing file \(s)")
        case .io(let s): self = .io(s)
        case .crashed: self = .io("simulated crash")
        }
    }
}

/// A pthread mutex: the store's locks (`mutex`, `flushMutex`, the stripe locks; see Store.swift).
///
/// With an ``InterleavingScheduler`` (the simulator's), every lock and unlock is also a point where
/// the scheduler may switch threads, and it decides who gets a contended lock, so a seed replays
/// one interleaving exactly. In debug builds the mutex records its owner so that functions that
/// need it held can assert so (`assertOwned`).
final class StoreMutex: @unchecked Sendable {
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let scheduler: (any InterleavingScheduler)?
    #if DEBUG
    /// pthread_self() of the thread that holds the lock, 0 when free. Written only by the holder.
    private let owner = Atomic<UInt>(0)
    #endif

    /// `VBD_LOCK_TRACE_MS=N` in the environment: every hold of a traced mutex (the store's
    /// `mutex`) longer than N ms is printed to stderr with the place that took it (how the commit
    /// stalls of issue 15 were found; docs/TESTING.md).
    /// (Read with getenv, not Foundation: the store links into the static guest tools.)
    static let traceThresholdNanos: UInt64? = getenv("VBD_LOCK_TRACE_MS")
        .flatMap { Double(String(cString: $0)) }.map { UInt64($0 * 1_000_000) }

    /// Nanoseconds of `clock`.
    static func nanos(_ clock: clockid_t) -> UInt64 {
        var t = timespec()
        clock_gettime(clock, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }

    /// One line of a trace to file descriptor 2.
    static func writeToStandardError(_ line: String) {
        var line = line
        line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }

    /// The wall clock as seconds since 1970 with three decimals, so that a trace line can be set
    /// beside a client's own latency log.
    static func wallClockSeconds() -> String {
        fixedPointText(nanos(CLOCK_REALTIME) / 1_000_000, decimals: 3)
    }

    /// The process's resident memory now and what malloc holds, for the commit trace: what the
    /// program uses (`in use`, heap and mapped) and what malloc keeps free in its heap for reuse.
    static func memoryFigures() -> String {
        var rss = "?"
        let fd = open("/proc/self/statm", O_RDONLY)
        if fd >= 0 {
            var buffer = [UInt8](repeating: 0, count: 128)
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            close(fd)
            // statm: total size, then resident, in pages.
            if n > 0, let fields = String(decoding: buffer[..<n], as: UTF8.self).split(separator: " ").dropFirst().first,
               let pages = Int(fields) {
                rss = String((pages * Int(sysconf(Int32(_SC_PAGESIZE)))) >> 20)
            }
        }
        var inUse = 0, freeInHeap = 0
        vbd_malloc_figures(&inUse, &freeInHeap)
        return "RSS \(rss) MiB, malloc in use \(inUse >> 20) MiB (free in its heap \(freeInHeap >> 20) MiB)"
    }

    /// Milliseconds with two decimals (no Foundation formatting here).
    static func milliseconds(_ nanos: UInt64) -> String {
        fixedPointText(nanos / 10_000, decimals: 2)
    }
    /// Where and when the holder took the lock, when tracing. Written only by the holder.
    private var tracedSite: (file: StaticString, line: UInt, since: UInt64, cpuSince: UInt64) = ("", 0, 0, 0)

    /// CPU time of the calling thread: a hold's wall time minus this is time the holder waited
    /// (for the CPU, the disk or a page fault).
    private static var threadCPUNanos: UInt64 { nanos(CLOCK_THREAD_CPUTIME_ID) }

    private let traced: Bool

    init(scheduler: (any InterleavingScheduler)? = nil, traced: Bool = false) {
        self.scheduler = scheduler
        self.traced = traced && Self.traceThresholdNanos != nil
        pthread_mutex_init(m, nil)
    }

    /// Steps of the current hold marked with `traceStep`, when tracing. Written only by the holder.
    private var tracedSteps: [(name: StaticString, at: UInt64)] = []

    @inline(__always) private func traceAcquired(_ file: StaticString, _ line: UInt) {
        if traced {
            tracedSite = (file, line, Self.nanos(CLOCK_MONOTONIC), Self.threadCPUNanos)
            tracedSteps.removeAll(keepingCapacity: true)
        }
    }

    /// Marks the end of a step of a long hold; a traced hold over the threshold prints each step's share.
    @inline(__always) func traceStep(_ name: StaticString) {
        if traced { tracedSteps.append((name, Self.nanos(CLOCK_MONOTONIC))) }
    }

    @inline(__always) private func traceReleasing() {
        guard traced, let threshold = Self.traceThresholdNanos else { return }
        let held = Self.nanos(CLOCK_MONOTONIC) - tracedSite.since
        if held > threshold {
            var since = tracedSite.since
            var steps = ""
            for step in tracedSteps {
                steps += " \(step.name) \(Self.milliseconds(step.at - since))"
                since = step.at
            }
            let cpu = Self.threadCPUNanos - tracedSite.cpuSince
            Self.writeToStandardError("vbd lock trace: held \(Self.milliseconds(held)) ms (\(Self.milliseconds(cpu)) ms on the CPU), released at \(Self.wallClockSeconds()), taken at \(tracedSite.file):\(tracedSite.line)\(steps)\n")
        }
    }
    deinit { pthread_mutex_destroy(m); m.deallocate() }

    @inline(__always) func lock(file: StaticString = #fileID, line: UInt = #line) {
        scheduler?.acquire(ObjectIdentifier(self))
        if pthread_mutex_trylock(m) != 0 {
            waiting.add(1, ordering: .relaxed)
            pthread_mutex_lock(m)
            waiting.subtract(1, ordering: .relaxed)
        }
        didAcquire()
        traceAcquired(file, line)
    }

    /// Threads blocked in `lock`, or spinning in `tryLock(spinningFor:)`, right now.
    private let waiting = Atomic<Int>(0)
    var waitingCount: Int { waiting.load(ordering: .relaxed) }

    /// Without the lock: lets the threads that were waiting for it when it was let go take it
    /// first, waiting until none is left or `limit` has passed. For a holder that takes it again
    /// at once, in steps (a commit's freeze): pthread mutexes do not hand over, and a waiter the
    /// unlock woke would find the lock taken again and sleep on. Not under a scheduler.
    func yieldToWaiters(for limit: Duration) {
        guard scheduler == nil, waiting.load(ordering: .relaxed) > 0 else { return }
        let deadline = ContinuousClock.now + limit
        while waiting.load(ordering: .relaxed) > 0 && ContinuousClock.now < deadline { sched_yield() }
    }

    @inline(__always) func unlock() {
        traceReleasing()
        #if DEBUG
        precondition(isOwnedByCurrentThread, "unlock of a StoreMutex this thread does not hold")
        owner.store(0, ordering: .relaxed)
        #endif
        pthread_mutex_unlock(m)
        scheduler?.release(ObjectIdentifier(self))
    }

    /// Takes the lock only if it is free right now.
    @inline(__always) func tryLock(file: StaticString = #fileID, line: UInt = #line) -> Bool {
        if let decided = scheduler?.tryAcquire(ObjectIdentifier(self)) {
            guard decided else { return false }
            pthread_mutex_lock(m)   // free: the scheduler runs one thread at a time
            didAcquire()
            traceAcquired(file, line)
            return true
        }
        guard pthread_mutex_trylock(m) == 0 else { return false }
        didAcquire()
        traceAcquired(file, line)
        return true
    }

    /// Takes the lock if it becomes free within `wait`, retrying without sleeping; false otherwise.
    /// Under a scheduler one attempt decides (waiting in real time would make runs unrepeatable).
    func tryLock(spinningFor wait: Duration, file: StaticString = #fileID, line: UInt = #line) -> Bool {
        if tryLock(file: file, line: line) { return true }
        if scheduler != nil { return false }
        waiting.add(1, ordering: .relaxed)
        defer { waiting.subtract(1, ordering: .relaxed) }
        let deadline = ContinuousClock.now + wait
        while ContinuousClock.now < deadline {
            sched_yield()
            if tryLock(file: file, line: line) { return true }
        }
        return false
    }

    @inline(__always) func withLock<T, E: Error>(file: StaticString = #fileID, line: UInt = #line,
                                                _ body: () throws(E) -> T) throws(E) -> T {
        lock(file: file, line: line); defer { unlock() }
        return try body()
    }

    @inline(__always) private func didAcquire() {
        #if DEBUG
        owner.store(Self.currentThread, ordering: .relaxed)
        #endif
    }

    /// Traps in debug builds unless the calling thread holds the lock (no cost in release builds).
    @inline(__always) func assertOwned(_ what: @autoclosure () -> String = "", file: StaticString = #fileID, line: UInt = #line) {
        #if DEBUG
        precondition(isOwnedByCurrentThread, "StoreMutex must be held here \(what())", file: file, line: line)
        #endif
    }

    #if DEBUG
    var isOwnedByCurrentThread: Bool { owner.load(ordering: .relaxed) == Self.currentThread }

    private static var currentThread: UInt { UInt(bitPattern: Int(bitPattern: pthread_self())) }
    #endif
}

#if canImport(Glibc)
import Glibc
#endif

/// Read-through cache the store consults before the disk. Keys are (generation << 32 | chunk
/// number): one key is one content (verified before sharing), the store removes a key when it
/// frees the chunk, and a reused number has a new generation, so a new key.
public protocol ChunkCache: AnyObject, Sendable {
    /// Copies the cached block into `buffer` and says which tier had it. With `countingMisses`
    /// false a miss is not counted (a probe; the caller then reads the ordinary way).
    func lookup(_ key: UInt64, into buffer: UnsafeMutableRawBufferPointer, volume: UInt64, group: SharingGroupID,
                countingMisses: Bool) -> CacheLookup
    func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, volume: UInt64, group: SharingGroupID)
    func remove(_ key: UInt64)
    /// Taken under the store lock while `key` names the bytes to insert later.
    func removalToken(for key: UInt64) -> UInt64
    /// Inserts unless `key` may have been removed since `token` (then it does nothing).
    func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, volume: UInt64, group: SharingGroupID, ifUnremovedSince token: UInt64)
    /// Whether the cached block of `key` (inserted by `group`, verified on entry) equals `bytes`,
    /// compared where it lies; nil when the answer needs the chunk loaded (not held, another tier).
    func equals(_ key: UInt64, bytes: UnsafeRawBufferPointer, group: SharingGroupID) -> Bool?
}

extension ChunkCache {
    /// A cache that cannot compare in place: dedup verification loads the chunk.
    public func equals(_ key: UInt64, bytes: UnsafeRawBufferPointer, group: SharingGroupID) -> Bool? { nil }
}
