import Dispatch
import Synchronization
import VBDCore

/// The front doors requests come in through.
public enum FrontDoor: String, CaseIterable, Sendable, Hashable {
    case nbd
    case vhostUserBlk = "vhost-user-blk"
}

/// Where requests wait for one of the device's slots: the mClock scheduler (NBDServer's
/// `NBDIOScheduler`, which needs an event loop for its timers, so it lives with the NBD server and
/// is attached here when the server starts).
public protocol DeviceSlotScheduler: AnyObject, Sendable {
    /// Queues a request of `domain` costing `cost` I/O units, split into `pieces` device calls
    /// scheduled one by one; `start` runs each piece once it has a slot and must call `finished`
    /// exactly once when that piece's device call is done. Throws when the domain's queue is full.
    func submit(domain: DomainID, cost: Double, pieces: Int,
                start: @escaping @Sendable (_ piece: Int, _ finished: @escaping @Sendable () -> Void) -> Void) throws(SchedulerError)
}

/// The request layer every front door stacks on, between the door (framing, replies, rings) and
/// the `BlockDevice`: admission of a connection, the lease check before each request, the device
/// slot from the scheduler, the charge (pricing) after it, and per-door counters. NBD and
/// vhost-user-blk requests are admitted, refused, scheduled and charged by this code, so a door
/// cannot bypass the tenancy rules.
public final class RequestPipeline: Sendable {
    public let tenancy: TenancyService
    private let scheduler = Mutex<(any DeviceSlotScheduler)?>(nil)
    private let counters = Mutex<[FrontDoor: DoorCounters]>([:])

    public init(tenancy: TenancyService) {
        self.tenancy = tenancy
    }

    /// The scheduler requests queue in from now on (nil: none, requests run in arrival order).
    public func attachScheduler(_ scheduler: (any DeviceSlotScheduler)?) {
        self.scheduler.withLock { $0 = scheduler }
    }

    /// Whether requests are scheduled (a scheduler is attached).
    public var schedules: Bool { scheduler.withLock { $0 != nil } }

    /// Admits a connection of `door` that proved `identity` to `device` (domain from the export's
    /// binding and the identity maps; a lease when leases are enforced).
    public func admit(device: any BlockDevice, identity: PeerIdentity, door: FrontDoor) -> Result<RequestSession, TenancyRefusal> {
        let result = tenancy.openSession(device: device, identity: identity)
        counters.withLock { counters in
            switch result {
            case .success: counters[door, default: DoorCounters()].connectionsAdmitted += 1
            case .failure: counters[door, default: DoorCounters()].connectionsRefused += 1
            }
        }
        return result.map { RequestSession(pipeline: self, tenancy: $0, door: door) }
    }

    /// What went through each door so far.
    public var doorCounters: [FrontDoor: DoorCounters] { counters.withLock { $0 } }

    /// The per-door counters as metrics (`vbd_door_*{door="nbd"|"vhost-user-blk"}`), for the
    /// metrics endpoint beside the per-domain ones.
    public var metrics: [TenancyMetric] {
        var metrics: [TenancyMetric] = []
        for (door, c) in doorCounters.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            func counter(_ name: String, _ value: UInt64, _ help: String, _ extra: [String: String] = [:]) {
                metrics.append(TenancyMetric(name: name, labels: ["door": door.rawValue].merging(extra) { a, _ in a },
                                             value: Double(value), kind: .counter, help: help))
            }
            counter("vbd_door_connections_total", c.connectionsAdmitted, "Connections a front door admitted or refused.", ["outcome": "admitted"])
            counter("vbd_door_connections_total", c.connectionsRefused, "Connections a front door admitted or refused.", ["outcome": "refused"])
            counter("vbd_door_requests_total", c.requests, "Requests completed through a front door (refused ones included).")
            counter("vbd_door_requests_refused_by_lease_total", c.refusedByLease, "Requests the lease did not allow.")
            counter("vbd_door_requests_failed_total", c.failed, "Requests that failed (refusals, full queues, device errors).")
            counter("vbd_door_bytes_total", c.bytes, "Bytes read, written, discarded or zeroed through a front door.")
        }
        return metrics
    }

    fileprivate func count(_ door: FrontDoor, _ update: (inout DoorCounters) -> Void) {
        counters.withLock { update(&$0[door, default: DoorCounters()]) }
    }

    fileprivate var currentScheduler: (any DeviceSlotScheduler)? { scheduler.withLock { $0 } }
}

/// Counters of one door (they only grow).
public struct DoorCounters: Sendable, Equatable {
    public var connectionsAdmitted: UInt64 = 0
    public var connectionsRefused: UInt64 = 0
    /// Requests completed (charged), refused ones included.
    public var requests: UInt64 = 0
    /// Requests the lease did not allow.
    public var refusedByLease: UInt64 = 0
    /// Requests that failed (refusals, full queues, device errors).
    public var failed: UInt64 = 0
    public var bytes: UInt64 = 0
    public init() {}
}

/// One admitted connection's view of the pipeline: each request asks ``permits(_:)``, then
/// (scheduled) waits for a slot, then reports ``completed(_:bytes:deviceTime:failed:sources:)``.
public struct RequestSession: Sendable {
    public let pipeline: RequestPipeline
    public let tenancy: TenancySession
    public let door: FrontDoor
    public var domain: DomainID { tenancy.domain }

    /// Whether the connection's lease allows a request of `kind` now (always, without enforced
    /// leases). A refused request is charged as failed and counted here: the door only replies.
    public func permits(_ kind: IOKind) -> Bool {
        let service = pipeline.tenancy
        guard service.leasesEnforced, !service.permits(tenancy, kind) else { return true }
        service.charge(tenancy, kind, bytes: 0, deviceTime: .zero, failed: true)
        pipeline.count(door) { $0.requests += 1; $0.refusedByLease += 1; $0.failed += 1 }
        return false
    }

    /// Queues a request in the scheduler; `start` runs each piece when it has a device slot and
    /// calls `finished` when the piece's device call is done. Returns false when nothing is
    /// scheduled (the door runs the request at once). Throws when the domain's queue is full.
    public func schedule(_ kind: IOKind, bytes: UInt64, pieces: Int = 1,
                         start: @escaping @Sendable (_ piece: Int, _ finished: @escaping @Sendable () -> Void) -> Void) throws(SchedulerError) -> Bool {
        guard let scheduler = pipeline.currentScheduler else { return false }
        try scheduler.submit(domain: domain, cost: IOCost.units(kind: kind, bytes: bytes), pieces: pieces, start: start)
        return true
    }

    /// ``schedule(_:bytes:pieces:start:)`` for a door whose requests run on their own threads
    /// (vhost-user-blk queues): blocks the calling thread until the request has a device slot and
    /// returns the call that frees it (a no-op when nothing is scheduled).
    public func waitForSlot(_ kind: IOKind, bytes: UInt64) throws(SchedulerError) -> @Sendable () -> Void {
        let granted = Granted()
        let start: @Sendable (Int, @escaping @Sendable () -> Void) -> Void = { _, finished in granted.grant(finished) }
        guard try schedule(kind, bytes: bytes, pieces: 1, start: start) else { return {} }
        return granted.wait()
    }

    /// Charges and counts one completed request (device time from its slot's grant).
    public func completed(_ kind: IOKind, bytes: UInt64, deviceTime: Duration, failed: Bool,
                          sources: ReadSources = ReadSources()) {
        pipeline.tenancy.charge(tenancy, kind, bytes: bytes, deviceTime: deviceTime, failed: failed, sources: sources)
        pipeline.count(door) { counters in
            counters.requests += 1
            counters.bytes += bytes
            if failed { counters.failed += 1 }
        }
    }
}

/// A slot handed from the scheduler's dispatching thread to the thread waiting for it.
private final class Granted: Sendable {
    private let state = Mutex<(@Sendable () -> Void)?>(nil)
    private let signal = DispatchSemaphore(value: 0)

    func grant(_ release: @escaping @Sendable () -> Void) {
        state.withLock { $0 = release }
        signal.signal()
    }

    func wait() -> @Sendable () -> Void {
        signal.wait()
        return state.withLock { $0 }!
    }
}
