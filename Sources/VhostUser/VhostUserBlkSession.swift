import CVBDSys
import Foundation
import Logging
import Synchronization
import VBDCore

#if canImport(Glibc)
import Glibc
#endif

/// Feature bits outside virtio-blk's own (virtio 1.2 section 6; vhost-user.rst).
public enum VirtioFeature {
    public static let indirectDescriptors: UInt64 = 1 << 28
    public static let eventIndex: UInt64 = 1 << 29
    /// VHOST_USER_F_PROTOCOL_FEATURES: the vhost-user protocol feature negotiation exists.
    public static let vhostUserProtocolFeatures: UInt64 = 1 << 30
    public static let version1: UInt64 = 1 << 32
}

public enum VhostUserProtocolFeature {
    public static let multiQueue: UInt64 = 1 << 0
    public static let replyAck: UInt64 = 1 << 3
    public static let config: UInt64 = 1 << 9
    /// GET/SET_INFLIGHT_FD: requests in flight survive a restart of this back end.
    public static let inflightSharedMemory: UInt64 = 1 << 12
}

/// A reply to send: its bytes, and the file descriptors that go with it (SCM_RIGHTS; the session
/// keeps owning them).
public struct VhostUserReply: Equatable, Sendable {
    public var bytes: [UInt8]
    public var fileDescriptors: [Int32] = []
}

/// One front end's (QEMU's) connection to a vhost-user-blk export: the protocol state (features,
/// memory table, per-queue ring setup and eventfds) and a worker thread per running queue.
///
/// `handle` runs on the connection's thread; each worker owns its queue while it runs, so anything
/// that changes a running queue (a new memory table, new ring addresses, a new kick fd) first stops
/// its worker, and restarts it when the queue is ready again. Only the call fd may change under a
/// running worker (QEMU swaps it when the guest masks interrupts), so it sits behind a mutex.
public final class VhostUserBlkSession: @unchecked Sendable {
    public let handler: VirtioBlkRequestHandler
    public let queueCountMax: Int
    private let logger: Logger
    private var ackedFeatures: UInt64 = 0
    private var ackedProtocolFeatures: UInt64 = 0
    private var memory: MappedGuestMemory?
    private var memoryFileDescriptors: [Int32] = []
    /// The inflight tracking area (INFLIGHT_SHMFD), once the front end asked for or passed one.
    private var inflight: InflightMemory?
    private var queues: [QueueState]

    public var offeredFeatures: UInt64 {
        VirtioFeature.version1 | VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
            | VirtioFeature.vhostUserProtocolFeatures | handler.features
    }
    public static let offeredProtocolFeatures = VhostUserProtocolFeature.multiQueue | VhostUserProtocolFeature.replyAck
        | VhostUserProtocolFeature.config | VhostUserProtocolFeature.inflightSharedMemory

    public init(handler: VirtioBlkRequestHandler, queueCountMax: Int, logger: Logger) {
        precondition((1...64).contains(queueCountMax))
        self.handler = handler
        self.queueCountMax = queueCountMax
        self.logger = logger
        self.queues = (0..<queueCountMax).map { QueueState(index: $0) }
    }

    /// Handles one request; returns the reply to send, if any. Takes ownership of `fileDescriptors`
    /// (kept or closed). A thrown error means the connection must close.
    public func handle(header: VhostUserHeader, payload: [UInt8], fileDescriptors: [Int32]) throws(VhostUserProtocolError) -> VhostUserReply? {
        var fds = fileDescriptors
        defer { for fd in fds { Glibc.close(fd) } }   // whatever was not taken over
        let message = try VhostUserMessage.decode(header: header, payload: payload, fileDescriptorCount: fds.count)
        logger.trace("vhost-user request", metadata: ["message": "\(message)"])
        let request = VhostUserRequest(rawValue: header.request)!
        func reply(_ payload: [UInt8]) -> VhostUserReply { VhostUserReply(bytes: vhostUserReply(to: header.request, payload: payload)) }
        func queue(_ index: UInt32) throws(VhostUserProtocolError) -> QueueState {
            guard Int(index) < queues.count else {
                throw .invalid(request: request, detail: "queue \(index), but at most \(queues.count) queues")
            }
            return queues[Int(index)]
        }
        var natural: VhostUserReply?
        switch message {
        case .getFeatures:
            natural = reply(vhostUserU64(offeredFeatures))
        case .setFeatures(let features):
            guard features & ~offeredFeatures == 0 else {
                throw .invalid(request: request, detail: "features 0x\(String(features, radix: 16)) include some not offered (0x\(String(offeredFeatures, radix: 16)))")
            }
            let wasNegotiated = ackedFeatures & VirtioFeature.vhostUserProtocolFeatures != 0
            ackedFeatures = features
            // Without protocol features rings are enabled from the start (vhost-user.rst, "Ring states").
            if features & VirtioFeature.vhostUserProtocolFeatures == 0 && !wasNegotiated {
                for q in queues { q.enabled = true }
            }
        case .getProtocolFeatures:
            natural = reply(vhostUserU64(Self.offeredProtocolFeatures))
        case .setProtocolFeatures(let features):
            guard features & ~Self.offeredProtocolFeatures == 0 else {
                throw .invalid(request: request, detail: "protocol features 0x\(String(features, radix: 16)) include some not offered")
            }
            ackedProtocolFeatures = features
        case .setOwner:
            break
        case .resetOwner:
            stopAll()
            for q in queues { q.reset() }
        case .getQueueNum:
            natural = reply(vhostUserU64(UInt64(queueCountMax)))
        case .getMaxMemSlots:
            natural = reply(vhostUserU64(UInt64(VhostUserLimits.memoryRegionsMax)))
        case .setMemTable(let regions):
            let running = queues.filter { $0.worker != nil }
            for q in running { q.stopWorker() }
            let mapped = try MappedGuestMemory(regions: regions, fileDescriptors: fds)
            memory = mapped
            for fd in memoryFileDescriptors { Glibc.close(fd) }
            memoryFileDescriptors = fds   // kept open while mapped (and closed with the next table)
            fds = []
            for q in running { try startIfReady(q) }
        case let .setVringNum(index, num):
            let q = try queue(index)
            guard num > 0, num <= VhostUserLimits.queueSizeMax, num & (num - 1) == 0 else {
                throw .invalid(request: request, detail: "queue size \(num) is not a power of two in 1...32768")
            }
            let wasRunning = q.stopWorker()
            q.size = num
            if wasRunning { try startIfReady(q) }
        case .setVringAddr(let address):
            let q = try queue(address.index)
            let wasRunning = q.stopWorker()
            q.addresses = SplitVirtqueue.Addresses(descriptorTable: address.descriptorTable, availableRing: address.availableRing,
                                                   usedRing: address.usedRing)
            if wasRunning { try startIfReady(q) }
        case let .setVringBase(index, num):
            let q = try queue(index)
            guard num <= UInt32(UInt16.max) else { throw .invalid(request: request, detail: "base \(num) does not fit a 16-bit ring index") }
            let wasRunning = q.stopWorker()
            q.base = UInt16(num)
            if wasRunning { try startIfReady(q) }
        case .getVringBase(let index):
            // Stops the ring (vhost-user.rst): the worker ends, the kick and call fds are dropped,
            // and the front end learns where to resume.
            let q = try queue(index)
            q.stopWorker()
            q.closeKickAndCall()
            natural = reply(vhostUserVringState(index: index, num: UInt32(q.base)))
        case let .setVringKick(index, hasDescriptor):
            let q = try queue(index)
            guard hasDescriptor else { throw .invalid(request: request, detail: "polling mode (no kick fd) is not supported") }
            q.stopWorker()
            if q.kickFD >= 0 { Glibc.close(q.kickFD) }
            q.kickFD = fds.removeFirst()
            // Non-blocking: another queue given the same fd (or the front end) may drain the
            // counter between our poll and our read, which must then not block the queue thread.
            _ = vbd_set_nonblocking(q.kickFD)
            try startIfReady(q)
        case let .setVringCall(index, hasDescriptor):
            let q = try queue(index)
            q.replaceCall(hasDescriptor ? Self.nonblocking(fds.removeFirst()) : -1)
        case let .setVringErr(index, hasDescriptor):
            let q = try queue(index)
            q.replaceErr(hasDescriptor ? Self.nonblocking(fds.removeFirst()) : -1)
        case let .setVringEnable(index, enabled):
            let q = try queue(index)
            q.enabled = enabled
            if enabled { try startIfReady(q) } else { q.stopWorker() }
        case .getConfig(let access):
            var config = handler.config(queueCount: UInt16(queueCountMax)).encoded()
            config += Array(repeating: 0, count: VhostUserLimits.configBytesMax - config.count)
            var w = ByteWriter()
            w.u32(access.offset); w.u32(access.size); w.u32(access.flags)
            w.append(Array(config[Int(access.offset)..<Int(access.offset + access.size)]))
            natural = reply(w.bytes)
        case .getInflightFD(let description):
            // A new, zeroed area for the queues the front end names; it keeps the fd and passes
            // it back with SET_INFLIGHT_FD, to this back end or to the next one after a restart.
            let area = try InflightMemory.create(queueCount: description.queueCount, queueSize: description.queueSize)
            try replaceInflight(with: area)
            var answer = reply(VhostUserInflight(mmapSize: UInt64(area.mappedBytes), mmapOffset: 0,
                                                 queueCount: area.queueCount, queueSize: area.queueSize).encoded())
            answer.fileDescriptors = [area.fileDescriptor]
            natural = answer
        case .setInflightFD(let description):
            let area = try InflightMemory(fileDescriptor: fds[0], mmapSize: description.mmapSize,
                                          mmapOffset: description.mmapOffset, queueCount: description.queueCount,
                                          queueSize: description.queueSize)
            fds.removeFirst()   // the area owns it now (on a throw the defer above closes it)
            try replaceInflight(with: area)
        case .setConfig(let access):
            // Nothing in this device's config space is writable (no VIRTIO_BLK_F_CONFIG_WCE).
            logger.info("vhost-user: SET_CONFIG refused (read-only config space)", metadata: ["offset": "\(access.offset)", "size": "\(access.size)"])
            if header.flags.contains(.needReply) && ackedProtocolFeatures & VhostUserProtocolFeature.replyAck != 0 {
                return reply(vhostUserU64(1))
            }
            return nil
        }
        if let natural { return natural }
        if header.flags.contains(.needReply) && ackedProtocolFeatures & VhostUserProtocolFeature.replyAck != 0 {
            return reply(vhostUserU64(0))
        }
        return nil
    }

    /// Requests completed per queue so far (running queues count once they stop).
    public var completedPerQueue: [UInt64] { queues.map(\.counters.completed) }
    /// Each queue's requests, call signals and kicks so far (running queues count once they stop).
    public var countersPerQueue: [QueueCounters] { queues.map(\.counters) }

    /// Each running queue's state in one line (ring indexes, requests running, what its thread is
    /// doing), for a test or a watcher that finds a queue silent; read without stopping the queue,
    /// but not while ``handle(header:payload:fileDescriptors:)`` runs (it may replace the workers).
    public var queueDiagnostics: [String] { queues.map { q in q.worker.map { "queue \(q.index): \($0.diagnostics)" } ?? "queue \(q.index): not running" } }

    /// Ends the session: workers stop, memory is unmapped, every fd closes. Returns what each
    /// queue counted.
    @discardableResult
    public func close() -> [QueueCounters] {
        stopAll()
        let completed = countersPerQueue
        for q in queues { q.reset() }
        memory = nil
        inflight = nil
        for fd in memoryFileDescriptors { Glibc.close(fd) }
        memoryFileDescriptors = []
        return completed
    }

    /// Running queues stop (their requests complete into the old area), then restart tracked by the new one.
    private func replaceInflight(with area: InflightMemory) throws(VhostUserProtocolError) {
        let running = queues.filter { $0.worker != nil }
        for q in running { q.stopWorker() }
        inflight = area
        for q in running { try startIfReady(q) }
    }

    private func stopAll() { for q in queues { q.stopWorker() } }

    /// Starts the queue's worker once it has a size, ring addresses, a kick fd, memory and is enabled.
    private func startIfReady(_ q: QueueState) throws(VhostUserProtocolError) {
        guard q.worker == nil, q.enabled, q.size > 0, let addresses = q.addresses, q.kickFD >= 0, let memory else { return }
        let ring: SplitVirtqueue
        do {
            ring = try SplitVirtqueue(size: q.size, addresses: addresses, memory: memory.table, lastAvailableIndex: q.base,
                                      eventIndex: ackedFeatures & VirtioFeature.eventIndex != 0,
                                      indirectDescriptors: ackedFeatures & VirtioFeature.indirectDescriptors != 0,
                                      inflight: inflight?.region(queue: q.index))
        } catch {
            throw .invalid(request: .setVringAddr, detail: "queue \(q.index): \(error)")
        }
        if ring.resubmitting > 0 {
            logger.notice("vhost-user-blk: queue \(q.index): serving again \(ring.resubmitting) requests a previous back end left in flight")
        }
        q.startWorker(ring: ring, memory: memory, inflight: inflight, handler: handler, logger: logger)
    }
}

/// One queue's setup as the front end gave it, and its worker while it runs.
extension VhostUserBlkSession {
    /// `fd` with O_NONBLOCK added (call and err fds: see ``QueueSignals/signal(_:)``).
    static func nonblocking(_ fd: Int32) -> Int32 {
        _ = vbd_set_nonblocking(fd)
        return fd
    }
}

final class QueueState: @unchecked Sendable {
    let index: Int
    var size: UInt32 = 0
    var addresses: SplitVirtqueue.Addresses?
    /// The next available index to process: set by SET_VRING_BASE, updated when a worker stops.
    var base: UInt16 = 0
    var kickFD: Int32 = -1
    var enabled = false
    /// What this queue's workers counted during the session (for the disconnect log line).
    private(set) var counters = QueueCounters()
    private(set) var worker: QueueWorker?
    let signals = QueueSignals()

    init(index: Int) { self.index = index }

    func startWorker(ring: SplitVirtqueue, memory: MappedGuestMemory, inflight: InflightMemory?, handler: VirtioBlkRequestHandler, logger: Logger) {
        worker = QueueWorker(index: index, ring: ring, memory: memory, inflight: inflight, kickFD: kickFD, signals: signals,
                             handler: handler, logger: logger)
    }

    /// Stops the worker, if one runs; returns whether one did. The ring position is kept in `base`.
    @discardableResult
    func stopWorker() -> Bool {
        guard let worker else { return false }
        let stopped = worker.stop()
        base = stopped.base
        counters.add(stopped.counters)
        self.worker = nil
        return true
    }

    func closeKickAndCall() {
        if kickFD >= 0 { close(kickFD) }
        kickFD = -1
        replaceCall(-1)
    }

    func replaceCall(_ fd: Int32) { signals.replace(.call, with: fd) }
    func replaceErr(_ fd: Int32) { signals.replace(.err, with: fd) }

    func reset() {
        stopWorker()
        closeKickAndCall()
        replaceErr(-1)
        size = 0
        addresses = nil
        base = 0
        enabled = false
    }
}

/// What a queue's worker did: requests completed, call eventfd signals (interrupts asked of the
/// front end), the guest's kicks (the kick eventfd's counter summed over its reads) and the
/// queue thread's wake-ups by a kick (reads of that counter).
public struct QueueCounters: Sendable, Equatable {
    public var completed: UInt64 = 0
    public var calls: UInt64 = 0
    public var kicks: UInt64 = 0
    public var kickWakeups: UInt64 = 0
    public init(completed: UInt64 = 0, calls: UInt64 = 0, kicks: UInt64 = 0, kickWakeups: UInt64 = 0) {
        self.completed = completed
        self.calls = calls
        self.kicks = kicks
        self.kickWakeups = kickWakeups
    }
    mutating func add(_ other: QueueCounters) {
        completed += other.completed
        calls += other.calls
        kicks += other.kicks
        kickWakeups += other.kickWakeups
    }
}

/// The call and err eventfds: the connection thread replaces them while the worker signals them.
final class QueueSignals: Sendable {
    enum Kind { case call, err }
    private let fds = Mutex([Int32](repeating: -1, count: 2))

    private func slot(_ kind: Kind) -> Int { kind == .call ? 0 : 1 }

    func replace(_ kind: Kind, with fd: Int32) {
        fds.withLock { fds in
            if fds[slot(kind)] >= 0 { close(fds[slot(kind)]) }
            fds[slot(kind)] = fd
        }
    }

    /// Signals the eventfd (under the lock, so it cannot be closed and its number reused meanwhile).
    /// The fd is non-blocking: when its counter is full (or it is a pipe nobody reads) the signal is
    /// dropped, as the front end has a notification pending anyway, rather than blocking the queue.
    func signal(_ kind: Kind) {
        fds.withLock { fds in
            let fd = fds[slot(kind)]
            guard fd >= 0 else { return }
            var one: UInt64 = 1
            _ = write(fd, &one, 8)
        }
    }
}

/// A thread serving one queue: waits for the guest's kick and takes every available chain. A
/// request runs on an I/O thread, up to ``inFlightMax`` at once, so the guest's queue depth reaches
/// the store (requests block on the disk and on hashing and compression); except a small read or
/// write that is alone (none in flight, none behind it), which runs on the queue's own thread: at
/// queue depth 1 every request would otherwise cost a hop to an I/O thread and back (two thread
/// switches, the largest cost in the server's profile), and nothing waits behind it meanwhile.
/// An I/O thread that completes a request takes the next available chain itself, keeping its
/// slot, rather than leaving it to the queue thread to hand over: at queue depth the queue thread
/// then sleeps (on its kick or on a slot) while the I/O threads keep the ring drained, one thread
/// switch fewer per request.
/// Requests complete in any order (the split ring allows it; VIRTIO_F_IN_ORDER is not offered),
/// each returned to the used ring under one lock, signalling the call eventfd when the guest wants
/// an interrupt. The queue's thread and the I/O threads run at the process's nice value
/// (``ServingPriority``).
final class QueueWorker: @unchecked Sendable {
    /// Requests of one queue served at once: bounds the threads one queue can occupy.
    static let inFlightMax = 16
    /// Where requests run (GCD grows it on demand; `slots` bounds each queue's share).
    private static let io = DispatchQueue(label: "vhost-user-blk.io", attributes: .concurrent)

    private let ring: SplitVirtqueue
    /// Every access to the ring: the worker takes chains while I/O threads complete others.
    private let ringLock = Mutex(())
    private let memory: MappedGuestMemory   // kept mapped while the worker may touch it
    private let inflight: InflightMemory?   // likewise
    private let kickFD: Int32
    private let stopFD: Int32
    private let stopRequested = Atomic<Bool>(false)
    private let signals: QueueSignals
    private let handler: VirtioBlkRequestHandler
    private let logger: Logger
    private let index: Int
    private let finished = DispatchSemaphore(value: 0)
    private let slots = DispatchSemaphore(value: QueueWorker.inFlightMax)
    private let inFlight = DispatchGroup()
    /// Requests started and not yet completed (what `inFlight` counts, readable).
    private let running = Atomic<Int>(0)
    /// Requests completed and call signals decided (under `ringLock`).
    private var completed: UInt64 = 0
    private var calls: UInt64 = 0
    /// The guest's kicks and the reads that took them (the queue thread's alone).
    private var kicks: UInt64 = 0
    private var kickWakeups: UInt64 = 0
    /// The guest broke the ring: nothing more is taken from it until the front end sets it up again.
    private let broken = Atomic<Bool>(false)
    /// What the queue thread does now (a ``Phase`` raw value), for ``diagnostics``.
    private let phase = Atomic<Int>(Phase.draining.rawValue)
    enum Phase: Int { case draining, waitingForSlot, servingAlone, sleepingOnKick, stopped }

    init(index: Int, ring: SplitVirtqueue, memory: MappedGuestMemory, inflight: InflightMemory?, kickFD: Int32, signals: QueueSignals,
         handler: VirtioBlkRequestHandler, logger: Logger) {
        self.index = index
        self.ring = ring
        self.memory = memory
        self.inflight = inflight
        self.kickFD = kickFD
        self.stopFD = vbd_eventfd(0, 0)
        self.signals = signals
        self.handler = handler
        self.logger = logger
        precondition(stopFD >= 0, "eventfd: \(String(cString: strerror(errno)))")
        let thread = Thread { [self] in
            Thread.current.name = "vhost-blk q\(index)"   // as ps and perf show it (15 bytes kept)
            ServingPriority.adoptProcessNice()
            self.run()
            self.finished.signal()
        }
        thread.name = "vhost-user-blk queue \(index)"
        thread.start()
    }

    /// Stops taking requests, waits for those in flight to complete, and returns the next
    /// available index to process and what the worker counted.
    func stop() -> (base: UInt16, counters: QueueCounters) {
        stopRequested.store(true, ordering: .releasing)
        var one: UInt64 = 1
        _ = write(stopFD, &one, 8)
        finished.wait()
        inFlight.wait()
        close(stopFD)
        return ringLock.withLock { _ in (ring.lastAvailableIndex, QueueCounters(completed: completed, calls: calls, kicks: kicks, kickWakeups: kickWakeups)) }
    }

    /// The ring's indexes, requests running and the queue thread's phase; the ring's part only when
    /// its lock is free (a thread stuck holding it shows as "ring busy").
    var diagnostics: String {
        let ringState = ringLock.withLockIfAvailable { _ in
            "taken \(ring.lastAvailableIndex), used \(ring.usedIndex), last notification decided at used \(ring.lastNotificationUsedIndex.map { "\($0)" } ?? "-"), completed \(completed), calls \(calls)"
        } ?? "ring busy"
        let phaseName = Phase(rawValue: phase.load(ordering: .relaxed)).map { "\($0)" } ?? "?"
        return "\(ringState), running \(running.load(ordering: .relaxed)), queue thread \(phaseName)"
    }

    private func run() {
        defer { phase.store(Phase.stopped.rawValue, ordering: .relaxed) }
        while !stopRequested.load(ordering: .acquiring) {
            if !broken.load(ordering: .acquiring) {
                do {
                    try drain()
                } catch {
                    fail(error)
                }
                if !broken.load(ordering: .acquiring) && !ringLock.withLock({ _ in ring.armKickAndCheckEmpty() }) { continue }
            }
            var fds = [pollfd(fd: kickFD, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
            phase.store(Phase.sleepingOnKick.rawValue, ordering: .relaxed)
            let ready = poll(&fds, 2, -1)
            phase.store(Phase.draining.rawValue, ordering: .relaxed)
            if ready < 0 { if errno == EINTR { continue }; break }
            if fds[1].revents != 0 { break }
            if fds[0].revents & Int16(POLLIN) != 0 {
                var count: UInt64 = 0
                let n = read(kickFD, &count, 8)
                // 0: end of file, not an eventfd (a file or a closed socket would poll ready
                // forever); EAGAIN: someone else drained it first, wait again.
                if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { break }
                if n == 8 { kicks &+= count; kickWakeups += 1 }
            } else if fds[0].revents != 0 {
                break   // the kick fd was closed or broke: nothing more will wake this queue
            }
        }
    }

    /// A broken ring is the guest's fault: report it on the err fd (once) and serve no more from
    /// this queue until the front end sets it up again.
    private func fail(_ error: VirtqueueError) {
        guard !broken.exchange(true, ordering: .acquiringAndReleasing) else { return }
        logger.error("vhost-user-blk: queue \(index): \(error); the queue stops until it is set up again")
        signals.signal(.err)
    }

    /// The next available chain (under `ringLock`), or nil when there is none or the queue stops.
    private func takeNext() throws(VirtqueueError) -> (head: UInt16, chain: DescriptorChain)? {
        guard !stopRequested.load(ordering: .acquiring), !broken.load(ordering: .acquiring),
              let head = try ring.nextAvailable() else { return nil }
        return (head, try ring.chain(head: head))
    }

    /// Takes every available chain (waiting for a free slot when `inFlightMax` run) and starts it:
    /// on an I/O thread, or here when it is alone and quick (see the type's comment).
    private func drain() throws(VirtqueueError) {
        while !stopRequested.load(ordering: .acquiring) && !broken.load(ordering: .acquiring) {
            phase.store(Phase.waitingForSlot.rawValue, ordering: .relaxed)
            slots.wait()
            phase.store(Phase.draining.rawValue, ordering: .relaxed)
            let next: (head: UInt16, chain: DescriptorChain, last: Bool)?
            do {
                next = try ringLock.withLock { _ throws(VirtqueueError) -> (UInt16, DescriptorChain, Bool)? in
                    guard let (head, chain) = try takeNext() else { return nil }
                    return (head, chain, !ring.hasAvailable)
                }
            } catch {
                slots.signal()
                throw error
            }
            guard let (head, chain, last) = next else { slots.signal(); return }
            inFlight.enter()
            let alone = running.wrappingAdd(1, ordering: .relaxed).oldValue == 0 && last
            if alone && handler.isQuick(chain) {
                phase.store(Phase.servingAlone.rawValue, ordering: .relaxed)
                serve(head: head, chain: chain, takingNext: false)
                phase.store(Phase.draining.rawValue, ordering: .relaxed)
            } else {
                Self.io.async { [self] in
                    ServingPriority.adoptProcessNiceOnBorrowedThread()
                    serve(head: head, chain: chain, takingNext: true)
                }
            }
        }
    }

    /// Serves the request and completes it; with `takingNext` (on an I/O thread) then takes the
    /// next available chain under the same lock and serves it too, until the ring is empty.
    private func serve(head: UInt16, chain: DescriptorChain, takingNext: Bool) {
        var request = (head: head, chain: chain)
        while true {
            let written = handler.handle(request.chain)
            if written == nil { logger.warning("vhost-user-blk: queue \(index): a request without a status byte") }
            let (notify, next) = ringLock.withLock { _ -> (Bool, Result<(head: UInt16, chain: DescriptorChain)?, VirtqueueError>) in
                ring.complete(head: request.head, writtenBytes: written ?? 0)
                completed += 1
                let notify = ring.shouldNotify()
                if notify { calls += 1 }
                guard takingNext else { return (notify, .success(nil)) }
                do throws(VirtqueueError) { return (notify, .success(try takeNext())) } catch { return (notify, .failure(error)) }
            }
            if notify { signals.signal(.call) }
            guard case .success(let taken?) = next else {
                if case .failure(let error) = next { fail(error) }
                break
            }
            request = taken
        }
        running.wrappingSubtract(1, ordering: .relaxed)
        slots.signal()
        inFlight.leave()
    }
}
