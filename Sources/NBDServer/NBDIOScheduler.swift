import NBDProtocol
import NIOCore
import NIOPosix
import Synchronization
import VBDCore
import VBDAccounting

/// Puts an mClock scheduler between the connections and the I/O thread pools.
///
/// Requests of all connections wait in per-domain queues (bounded by each domain's
/// ``VBDAccounting/SchedulingPolicy/queueCapacity``); at most `deviceSlots` run on the device at
/// once, and whenever a slot frees the scheduler picks the next request in mClock order at the
/// real (monotone) time. Without the slot limit every request would go straight to the pools'
/// own FIFO queues and the order would be arrival order again.
///
/// `reservedSlots` of the slots are kept for reservation-phase requests: weight-phase requests
/// (service beyond reservations) occupy at most `deviceSlots - reservedSlots` at once. A device
/// request cannot be preempted, so without this a tenant whose reservation is due waits for a
/// slot behind, say, a 1 MiB write of a tenant served by weight; with it, it waits only for other
/// reservation-phase requests (docs/ACCOUNTING.md, "hostile workload"). The price is that
/// weight-only load uses one slot less.
///
/// ### Concurrency
/// `submit` and completions may come from any event loop or pool thread; state is behind one lock,
/// and jobs are started outside it.
final class NBDIOScheduler: Sendable {
    /// Starts a request's work, one piece at a time; `start` must call `finished` exactly once
    /// when that piece's device call is done.
    struct Job: Sendable {
        /// Device calls the request is split into, each scheduled on its own (see ``MClockScheduler``).
        var pieces = 1
        var start: @Sendable (_ phase: MClockScheduler<Job>.Phase, _ piece: Int,
                              _ finished: @escaping @Sendable () -> Void) -> Void
    }

    private struct State {
        var scheduler: MClockScheduler<Job>
        var running = 0
        var runningByWeight = 0
        /// Deadline of the earliest armed eligibility timer. A new, earlier deadline arms another
        /// timer: a single "armed" flag would let a reserved request wait for a later timer.
        var timerDeadline: Double?
    }

    private let state: Mutex<State>
    private let tenancy: TenancyService
    let deviceSlots: Int
    let reservedSlots: Int
    /// Where eligibility timers run (requests held back by a limit wake up here).
    private let timerLoop: any EventLoop
    private let origin = ContinuousClock.now

    init(tenancy: TenancyService, deviceSlots: Int, reservedSlots: Int, timerLoop: any EventLoop) {
        precondition(deviceSlots > 0 && reservedSlots >= 0 && reservedSlots < deviceSlots,
                     "at least one slot must remain for weight-phase service")
        self.tenancy = tenancy
        self.deviceSlots = deviceSlots
        self.reservedSlots = reservedSlots
        self.timerLoop = timerLoop
        self.state = Mutex(State(scheduler: MClockScheduler(defaultPolicy: tenancy.policy(for: .anonymous))))
    }

    /// Eligibility timers fire on this grid (seconds), so that the deadlines of requests released
    /// by their limit (a flood paced to thousands a second) share wake-ups: a held-back request
    /// starts at most this much after it becomes eligible, unless a completion dispatches it
    /// sooner. Starting later never breaks a limit; a reservation loses at most this much time.
    static let timerGrid = 0.002

    private var now: Double {
        (ContinuousClock.now - origin).inSeconds
    }

    /// Queues a request; throws when the domain's queue is full.
    func submit(_ job: Job, domain: DomainID, cost: Double) throws(SchedulerError) {
        let policy = tenancy.policy(for: domain)
        let overdrawn = tenancy.isOverdrawn(domain)
        let time = now
        try state.withLock { state throws(SchedulerError) in
            // Policies change through the control interface; pick changes up as requests arrive.
            if state.scheduler.policy(for: domain) != policy,
               state.scheduler.queuedCount(of: domain) <= policy.queueCapacity {
                state.scheduler.setPolicy(policy, for: domain)
            }
            if state.scheduler.isReservationOnly(domain) != overdrawn {
                state.scheduler.setReservationOnly(overdrawn, for: domain)
            }
            try state.scheduler.enqueue(job, domain: domain, cost: cost, pieces: job.pieces, now: time)
        }
        pump()
    }

    var queuedCount: Int { state.withLock { $0.scheduler.queuedCount } }

    /// Lifts the restriction of domains that are no longer overdrawn (after a top-up) and
    /// dispatches what became eligible. Called periodically: a restricted domain with no
    /// reservation has nothing eligible, so no completion or timer would otherwise wake it.
    func refresh() {
        let restricted = state.withLock { $0.scheduler.reservationOnlyDomains }
        let lifted = restricted.filter { !tenancy.isOverdrawn($0) }
        if !lifted.isEmpty {
            state.withLock { state in
                for domain in lifted { state.scheduler.setReservationOnly(false, for: domain) }
            }
        }
        pump()
    }

    private func pump() {
        let time = now
        let weightSlots = deviceSlots - reservedSlots
        let (jobs, wakeAt) = state.withLock { state -> ([(Job, MClockScheduler<Job>.Phase, Int)], Double?) in
            var jobs: [(Job, MClockScheduler<Job>.Phase, Int)] = []
            while state.running < deviceSlots,
                  let dispatch = state.scheduler.dequeue(now: time,
                                                         weightPhaseAllowed: state.runningByWeight < weightSlots) {
                state.running += 1
                if dispatch.phase == .weight { state.runningByWeight += 1 }
                jobs.append((dispatch.item, dispatch.phase, dispatch.piece))
            }
            var wakeAt: Double?
            if state.running < deviceSlots, state.scheduler.queuedCount > 0,
               let eligible = state.scheduler.nextEligibleTime(weightPhaseAllowed: state.runningByWeight < weightSlots) {
                let next = (eligible / Self.timerGrid).rounded(.up) * Self.timerGrid
                if next < (state.timerDeadline ?? .infinity) {
                    state.timerDeadline = next
                    wakeAt = next
                }
            }
            return (jobs, wakeAt)
        }
        for (job, phase, piece) in jobs {
            job.start(phase, piece) { [self] in
                state.withLock { state in
                    state.running -= 1
                    if phase == .weight { state.runningByWeight -= 1 }
                }
                pump()
            }
        }
        if let wakeAt {
            let delay = max(0, wakeAt - time)
            timerLoop.scheduleTask(in: .nanoseconds(Int64(delay * 1e9) + 1)) { [self] in
                state.withLock { state in
                    if state.timerDeadline == wakeAt { state.timerDeadline = nil }
                }
                pump()
            }
        }
    }
}

extension IOKind {
    /// The ledger's name for an NBD command; nil for DISC, which is not a request to charge.
    init?(_ command: NBDCommand) {
        switch command {
        case .read: self = .read
        case .write: self = .write
        case .flush: self = .flush
        case .trim: self = .trim
        case .cache: self = .cache
        case .writeZeroes: self = .writeZeroes
        case .blockStatus: self = .blockStatus
        case .disconnect: return nil
        }
    }
}

/// Hands scheduled work to an I/O thread pool so that work dispatched by a finishing job continues
/// on the thread that finished it.
///
/// When a piece of a large write completes on an I/O thread, the scheduler usually dispatches the
/// next piece from that same thread. Submitting it to the pool would wake a second thread (on a VM,
/// an inter-processor interrupt, often to the core a latency-sensitive client is on) while the
/// first goes back to sleep. Instead, the first job dispatched that way runs on the same thread as
/// soon as the current job returns; any further ones go to the pool, so parallel work stays parallel.
enum NBDWorkChain {
    /// Per thread: whether a chain is running on it, and the job it will run next.
    private final class Link: @unchecked Sendable {  // only ever touched by its own thread
        var running = false
        var next: NIOThreadPool.WorkItem?
    }

    private static let link = ThreadSpecificVariable<Link>()

    static func submit(to pool: NIOThreadPool, _ work: @escaping NIOThreadPool.WorkItem) {
        if let link = link.currentValue, link.running, link.next == nil {
            link.next = work
            return
        }
        pool.submit { state in run(work, state) }
    }

    private static func run(_ first: @escaping NIOThreadPool.WorkItem, _ state: NIOThreadPool.WorkItemState) {
        guard case .active = state else { return first(state) }
        let current: Link
        if let existing = link.currentValue {
            current = existing
        } else {
            current = Link()
            link.currentValue = current
        }
        current.running = true
        defer { current.running = false }
        var work: NIOThreadPool.WorkItem? = first
        while let job = work {
            job(.active)
            work = current.next
            current.next = nil
        }
    }
}

extension NBDIOScheduler: DeviceSlotScheduler {
    func submit(domain: DomainID, cost: Double, pieces: Int,
                start: @escaping @Sendable (_ piece: Int, _ finished: @escaping @Sendable () -> Void) -> Void) throws(SchedulerError) {
        try submit(Job(pieces: pieces) { _, piece, finished in start(piece, finished) }, domain: domain, cost: cost)
    }
}
