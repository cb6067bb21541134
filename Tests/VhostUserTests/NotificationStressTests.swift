import CVBDSys
import Foundation
import Logging
import Synchronization
import Testing
import VBDCore
@testable import VhostUser

#if canImport(Glibc)
import Glibc
#endif

/// The door under a guest driver that notifies exactly as Linux's does (drivers/virtio/virtio_ring.c,
/// split ring, as virtio_blk uses it), many requests at once, with random small delays on both
/// sides: a lost kick or a lost interrupt leaves the driver waiting with requests in flight, which
/// its watchdog reports (ring indexes, event indexes, what each side last did) instead of hanging.
/// One configuration at a time (each runs its queues' threads; the machine has few cores).
@Suite(.serialized) struct NotificationStressTests {
    struct Configuration: CustomStringConvertible {
        var eventIndex: Bool
        var queueSize: UInt16
        var depth: Int
        var queues: Int
        var requestsPerQueue: Int
        /// The front end sends a new memory table (every queue stops, waiting for its requests, and
        /// starts again) or a new call fd every few milliseconds while requests run.
        var restarts = false
        /// The guest submits on one thread and takes interrupts on another (two vCPUs), the
        /// queue's state under one lock as virtio_blk's queue lock, the kick's notify outside it.
        var twoThreads = false
        var description: String {
            "\(eventIndex ? "EVENT_IDX" : "no EVENT_IDX"), \(queues) queue(s) of \(queueSize), depth \(depth), \(requestsPerQueue) requests each"
                + (restarts ? ", restarted meanwhile" : "") + (twoThreads ? ", submitting and interrupted on two threads" : "")
        }
    }

    /// About 780,000 requests in all: some 10-17 s in a debug build on two cores.
    static let configurations: [Configuration] = [
        .init(eventIndex: true, queueSize: 128, depth: 32, queues: 2, requestsPerQueue: 60_000),
        .init(eventIndex: true, queueSize: 256, depth: 128, queues: 1, requestsPerQueue: 60_000),
        .init(eventIndex: true, queueSize: 128, depth: 1, queues: 2, requestsPerQueue: 30_000),
        .init(eventIndex: true, queueSize: 128, depth: 2, queues: 1, requestsPerQueue: 40_000),
        .init(eventIndex: true, queueSize: 256, depth: 7, queues: 3, requestsPerQueue: 30_000),
        .init(eventIndex: true, queueSize: 128, depth: 16, queues: 4, requestsPerQueue: 20_000),
        .init(eventIndex: true, queueSize: 128, depth: 32, queues: 2, requestsPerQueue: 20_000, restarts: true),
        .init(eventIndex: false, queueSize: 128, depth: 32, queues: 2, requestsPerQueue: 40_000),
        .init(eventIndex: false, queueSize: 128, depth: 1, queues: 1, requestsPerQueue: 20_000),
        .init(eventIndex: false, queueSize: 256, depth: 128, queues: 1, requestsPerQueue: 40_000),
        .init(eventIndex: false, queueSize: 128, depth: 7, queues: 2, requestsPerQueue: 20_000, restarts: true),
        .init(eventIndex: true, queueSize: 128, depth: 32, queues: 2, requestsPerQueue: 30_000, twoThreads: true),
        .init(eventIndex: true, queueSize: 128, depth: 3, queues: 1, requestsPerQueue: 30_000, twoThreads: true),
        .init(eventIndex: false, queueSize: 128, depth: 7, queues: 1, requestsPerQueue: 20_000, twoThreads: true),
    ]

    @Test(arguments: configurations)
    func everyRequestCompletesAndIsAnnounced(_ configuration: Configuration) throws {
        let outcome = try NotificationStress(configuration).run()
        let failures = outcome.failures
        #expect(failures.isEmpty, "\(configuration):\n\(failures.joined(separator: "\n"))")
        #expect(outcome.completed == configuration.queues * configuration.requestsPerQueue, "\(configuration): \(outcome.completed) completed")
    }
}

/// A cheap random number source shared by threads (a counter through SplitMix64).
final class SharedRandom: Sendable {
    private let state: Atomic<UInt64>
    init(seed: UInt64) { state = Atomic(seed) }
    func next() -> UInt64 {
        var z = state.wrappingAdd(0x9e37_79b9_7f4a_7c15, ordering: .relaxed).newValue
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
    func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

/// Sleeps a few microseconds, yields, or spins a little, now and then (1 time in `oneIn`).
func jitter(_ random: SharedRandom, oneIn: Int) {
    let r = random.next()
    guard r % UInt64(oneIn) == 0 else { return }
    switch (r >> 16) % 4 {
    case 0: usleep(UInt32((r >> 20) % 20 + 1))
    case 1: sched_yield()
    default:
        var x = r
        for _ in 0..<Int((r >> 24) % 2000) { x = x &* 6364136223846793005 &+ 1 }
        withExtendedLifetime(x) {}
    }
}

/// An in-memory device whose calls now and then take a few microseconds more.
final class JitteryMemoryDevice: BlockDevice, @unchecked Sendable {
    // @unchecked: the bytes are behind `lock`.
    let name = "stress"
    let deviceDescription = "in-memory device with random small delays"
    let size: UInt64 = 1 << 20
    let blockSize = 512
    let isReadOnly = false
    private let bytes: UnsafeMutableRawPointer
    private let lock = Mutex(())
    private let random: SharedRandom

    init(random: SharedRandom) {
        self.random = random
        bytes = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0, count: Int(size))
    }
    deinit { bytes.deallocate() }

    private func check(_ offset: UInt64, _ length: Int) throws(BlockDeviceError) {
        guard offset <= size, UInt64(length) <= size - offset else { throw .outOfRange(offset: offset, length: UInt64(length), size: size) }
    }
    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        try check(offset, buffer.count)
        jitter(random, oneIn: 4)
        lock.withLock { _ in buffer.copyMemory(from: UnsafeRawBufferPointer(start: bytes + Int(offset), count: buffer.count)) }
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        try check(offset, data.count)
        jitter(random, oneIn: 4)
        lock.withLock { _ in (bytes + Int(offset)).copyMemory(from: data.baseAddress!, byteCount: data.count) }
    }
    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError) {}
    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {}
    func flush() throws(BlockDeviceError) { jitter(random, oneIn: 2) }
    func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError) {}
    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] { [] }
}

/// One run: a session of the door with `queues` rings in a memfd, and per ring a thread playing
/// Linux's driver.
final class NotificationStress: @unchecked Sendable {
    static let queueStride = 2 << 20
    static let guestPhysicalBase: UInt64 = 0x100_0000
    static let userBase: UInt64 = 0x7f34_0000_0000
    /// How long requests may be in flight with nothing completing before the driver reports a stall.
    static let stallSeconds = 5.0

    let configuration: NotificationStressTests.Configuration
    let memfd: Int32
    let base: UnsafeMutableRawPointer
    let bytes: Int
    let random: SharedRandom
    let session: VhostUserBlkSession

    init(_ configuration: NotificationStressTests.Configuration) throws {
        self.configuration = configuration
        bytes = Self.queueStride * configuration.queues
        let fd = vbd_memfd_create("stress-guest")
        try #require(fd >= 0 && ftruncate(fd, off_t(bytes)) == 0 && vbd_seal_size(fd) == 0)
        memfd = fd
        base = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)!
        let random = SharedRandom(seed: UInt64(truncatingIfNeeded: Date().timeIntervalSince1970.bitPattern))
        self.random = random
        let handler = VirtioBlkRequestHandler(device: JitteryMemoryDevice(random: random))
        session = VhostUserBlkSession(handler: handler, queueCountMax: configuration.queues, logger: Logger(label: "stress"))
    }

    deinit {
        munmap(base, bytes)
        close(memfd)
    }

    struct Outcome { var completed: Int; var failures: [String] }

    @discardableResult
    private func send(_ request: VhostUserRequest, _ payload: [UInt8] = [], fds: [Int32] = []) throws -> [UInt8]? {
        let header = VhostUserHeader(request: request.rawValue, flags: .version1, size: UInt32(payload.count))
        return try session.handle(header: header, payload: payload, fileDescriptors: fds.map { dup($0) })?.bytes.dropFirst(12).map { $0 }
    }

    func run() throws -> Outcome {
        let features = try #require(try send(.getFeatures)).reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        var acked = features
        if !configuration.eventIndex { acked &= ~VirtioFeature.eventIndex }
        try send(.setFeatures, vhostUserU64(acked))
        try send(.setProtocolFeatures, vhostUserU64(VhostUserProtocolFeature.multiQueue | VhostUserProtocolFeature.replyAck))
        var table = ByteWriter()
        table.u32(1); table.u32(0)
        table.u64(Self.guestPhysicalBase); table.u64(UInt64(bytes)); table.u64(Self.userBase); table.u64(0)
        try send(.setMemTable, table.bytes, fds: [memfd])
        let drivers = (0..<configuration.queues).map {
            LinuxSplitRingDriver(queue: $0, memory: base + $0 * Self.queueStride,
                                 guestPhysical: Self.guestPhysicalBase + UInt64($0 * Self.queueStride),
                                 size: configuration.queueSize, eventIndex: configuration.eventIndex,
                                 depth: configuration.depth, requests: configuration.requestsPerQueue, random: random)
        }
        for driver in drivers {
            let q = UInt32(driver.queue)
            let user = Self.userBase + UInt64(driver.queue * Self.queueStride)
            try send(.setVringNum, vhostUserVringState(index: q, num: UInt32(configuration.queueSize)))
            try send(.setVringBase, vhostUserVringState(index: q, num: 0))
            var address = ByteWriter()
            address.u32(q); address.u32(0)
            address.u64(user + UInt64(LinuxSplitRingDriver.descriptorOffset)); address.u64(user + UInt64(LinuxSplitRingDriver.usedOffset))
            address.u64(user + UInt64(LinuxSplitRingDriver.availableOffset)); address.u64(0)
            try send(.setVringAddr, address.bytes)
            try send(.setVringKick, vhostUserU64(UInt64(q)), fds: [driver.kick])
            try send(.setVringCall, vhostUserU64(UInt64(q)), fds: [driver.call])
            try send(.setVringEnable, vhostUserVringState(index: q, num: 1))
        }
        let done = DispatchGroup()
        // The session's messages and the drivers' look at its queues (for a stall report) take turns.
        let frontEnd = Mutex(())
        let twoThreads = configuration.twoThreads
        for driver in drivers {
            done.enter()
            let thread = Thread { [session] in
                let deviceState = { frontEnd.withLock { _ in session.queueDiagnostics[driver.queue] } }
                if twoThreads { driver.runOnTwoThreads(deviceState: deviceState) } else { driver.run(deviceState: deviceState) }
                done.leave()
            }
            thread.start()
        }
        var restarts = 0
        // Each driver gives up after `stallSeconds` without progress.
        while done.wait(timeout: .now() + .milliseconds(2 + random.below(20))) == .timedOut {
            guard configuration.restarts else { continue }
            try frontEnd.withLock { _ in
                if random.below(2) == 0 {
                    try send(.setMemTable, table.bytes, fds: [memfd])
                } else {
                    let driver = drivers[random.below(drivers.count)]
                    try send(.setVringCall, vhostUserU64(UInt64(driver.queue)), fds: [driver.call])
                }
            }
            restarts += 1
        }
        // Stopping waits for the requests in flight; a device stuck for good would hang here, so
        // it is bounded too (the queue threads are then left behind, the failure already reported).
        let closed = DispatchSemaphore(value: 0)
        Thread { [session] in session.close(); closed.signal() }.start()
        var failures = drivers.compactMap(\.failure)
        if closed.wait(timeout: .now() + .seconds(20)) == .timedOut {
            failures.append("the session did not stop within 20 s: \(session.queueDiagnostics)")
        }
        // What the run exercised (the driver's side), one line per configuration.
        print("notification stress, \(configuration): " + drivers.map(\.summary).joined(separator: "; ")
              + (configuration.restarts ? "; \(restarts) memory tables or call fds sent" : ""))
        return Outcome(completed: drivers.reduce(0) { $0 + $1.completed }, failures: failures)
    }
}

/// Linux's split-ring driver for one queue (struct vring_virtqueue and the functions virtio_blk
/// calls), transcribed: `add` (virtqueue_add_split), `kickPrepare` (virtqueue_kick_prepare_split),
/// `interrupt` (vring_interrupt), `disableCallbacks`, `getBuffer`, `enableCallbacksPrepare` +
/// `poll`, `enableCallbacksDelayed`; and virtblk_done's loop around them. One thread plays both
/// the submitting task and the interrupt handler, as they would under the queue's spinlock.
final class LinuxSplitRingDriver: @unchecked Sendable {
    static let descriptorOffset = 0, availableOffset = 0x1000, usedOffset = 0x2000
    static let indirectOffset = 0x4000, headerOffset = 0x8000, statusOffset = 0x9000, dataOffset = 0x10000
    static let dataBytesMax = 4096
    static let noInterrupt: UInt16 = 1   // VRING_AVAIL_F_NO_INTERRUPT
    static let noNotify: UInt16 = 1      // VRING_USED_F_NO_NOTIFY

    let queue: Int
    let memory: UnsafeMutableRawPointer
    let guestPhysical: UInt64
    let size: UInt16
    let eventIndex: Bool
    let depth: Int
    let requests: Int
    let random: SharedRandom
    let kick = vbd_eventfd(0, 0)
    let call = vbd_eventfd(0, 0)

    // struct vring_virtqueue's split-ring state.
    private var availableIndexShadow: UInt16 = 0
    private var availableFlagsShadow: UInt16 = 0
    private var added: UInt16 = 0   // num_added
    private var lastUsedIndex: UInt16 = 0
    private var eventTriggered = false

    private var free: [UInt16]
    private var inFlight: [Bool]
    /// What the device must report written for each head in flight: a read's data and the status byte.
    private var expectedWritten: [UInt32]
    private(set) var completed = 0
    private var submitted = 0
    private(set) var failure: String?
    // What the driver did, for the stall report.
    private var kicksSent = 0, kicksSkipped = 0, interrupts = 0, spuriousInterrupts = 0, rechecksFound = 0
    private var lastAction = "nothing yet"

    init(queue: Int, memory: UnsafeMutableRawPointer, guestPhysical: UInt64, size: UInt16, eventIndex: Bool, depth: Int, requests: Int,
         random: SharedRandom) {
        precondition(depth <= Int(size))
        self.queue = queue
        self.memory = memory
        self.guestPhysical = guestPhysical
        self.size = size
        self.eventIndex = eventIndex
        self.depth = depth
        self.requests = requests
        self.random = random
        free = (0..<size).reversed()
        inFlight = Array(repeating: false, count: Int(size))
        expectedWritten = Array(repeating: 0, count: Int(size))
    }

    deinit { close(kick); close(call) }

    // The rings' fields.
    private var availableFlags: UnsafeMutableRawPointer { memory + Self.availableOffset }
    private var availableIndexField: UnsafeMutableRawPointer { memory + Self.availableOffset + 2 }
    private func availableRing(_ slot: UInt16) -> UnsafeMutableRawPointer { memory + Self.availableOffset + 4 + 2 * Int(slot % size) }
    private var usedEventField: UnsafeMutableRawPointer { memory + Self.availableOffset + 4 + 2 * Int(size) }
    private var usedFlags: UnsafeMutableRawPointer { memory + Self.usedOffset }
    private var usedIndexField: UnsafeMutableRawPointer { memory + Self.usedOffset + 2 }
    private func usedRing(_ slot: UInt16) -> UnsafeMutableRawPointer { memory + Self.usedOffset + 4 + 8 * Int(slot % size) }
    private var availableEventField: UnsafeMutableRawPointer { memory + Self.usedOffset + 4 + 8 * Int(size) }

    private func descriptor(_ at: UnsafeMutableRawPointer, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        at.storeBytes(of: address.littleEndian, as: UInt64.self)
        (at + 8).storeBytes(of: length.littleEndian, as: UInt32.self)
        (at + 12).storeBytes(of: flags.littleEndian, as: UInt16.self)
        (at + 14).storeBytes(of: next.littleEndian, as: UInt16.self)
    }

    /// virtqueue_add_split for one virtio-blk request in an indirect table: header, data, status.
    private func add() {
        let head = free.removeLast()
        inFlight[Int(head)] = true
        let h = Int(head)
        let kind = random.below(10)
        let type: UInt32 = kind < 5 ? 0 : kind < 9 ? 1 : 4   // read, write, flush
        let length = 512 * (random.below(Self.dataBytesMax / 512) + 1)
        let sector = UInt64(random.below((1 << 20) / 512 - Self.dataBytesMax / 512))
        expectedWritten[h] = type == 0 ? UInt32(length) + 1 : 1
        let header = memory + Self.headerOffset + 16 * h
        header.storeBytes(of: type.littleEndian, as: UInt32.self)
        (header + 4).storeBytes(of: UInt32(0), as: UInt32.self)
        (header + 8).storeBytes(of: (type == 4 ? 0 : sector).littleEndian, as: UInt64.self)
        (memory + Self.statusOffset + h).storeBytes(of: UInt8(0xee), as: UInt8.self)
        let tableOffset = Self.indirectOffset + 48 * h
        let table = memory + tableOffset
        descriptor(table, address: guestPhysical + UInt64(Self.headerOffset + 16 * h), length: 16, flags: 1, next: 1)
        var entries: UInt32 = 2
        if type != 4 {
            descriptor(table + 16, address: guestPhysical + UInt64(Self.dataOffset + Self.dataBytesMax * h), length: UInt32(length),
                       flags: type == 0 ? 1 | 2 : 1, next: 2)
            entries = 3
        }
        descriptor(table + 16 * Int(entries - 1), address: guestPhysical + UInt64(Self.statusOffset + h), length: 1, flags: 2, next: 0)
        descriptor(memory + Self.descriptorOffset + 16 * h, address: guestPhysical + UInt64(tableOffset), length: 16 * entries, flags: 4, next: 0)
        // avail->ring[], virtio_wmb, then avail->idx.
        availableRing(availableIndexShadow).storeBytes(of: head.littleEndian, as: UInt16.self)
        availableIndexShadow &+= 1
        vbd_store_release_u16(availableIndexField, availableIndexShadow.littleEndian)
        added &+= 1
        submitted += 1
        lastAction = "added head \(head) (avail idx \(availableIndexShadow))"
    }

    /// vring_need_event (the driver's own copy, so a bug in the device's cannot hide in both).
    static func needEvent(_ eventIndex: UInt16, new: UInt16, old: UInt16) -> Bool { new &- eventIndex &- 1 < new &- old }

    /// virtqueue_kick_prepare_split: whether the device asked to be told about what was added.
    private func kickPrepare() -> Bool {
        vbd_fence_seq_cst()   // virtio_mb: avail->idx before reading the device's wishes
        let old = availableIndexShadow &- added, new = availableIndexShadow
        added = 0
        if eventIndex {
            let availableEvent = UInt16(littleEndian: vbd_load_acquire_u16(availableEventField))
            return Self.needEvent(availableEvent, new: new, old: old)
        }
        return UInt16(littleEndian: vbd_load_acquire_u16(usedFlags)) & Self.noNotify == 0
    }

    private var deviceUsedIndex: UInt16 { UInt16(littleEndian: vbd_load_acquire_u16(usedIndexField)) }
    private var moreUsed: Bool { lastUsedIndex != deviceUsedIndex }

    /// vring_interrupt: nothing new used, no callback (IRQ_NONE); else virtblk_done.
    private func interrupt() throws(DriverError) {
        guard moreUsed else { spuriousInterrupts += 1; lastAction = "interrupt with nothing used"; return }
        interrupts += 1
        if eventIndex { eventTriggered = true }
        try virtblkDone()
    }

    /// virtblk_done: callbacks off, take every used buffer, callbacks on, again while more came.
    private func virtblkDone() throws(DriverError) {
        var rounds = 0
        repeat {
            if rounds > 0 { rechecksFound += 1 }
            rounds += 1
            disableCallbacks()
            jitter(random, oneIn: 16)
            while let head = try getBuffer() { complete(head) }
            jitter(random, oneIn: 16)
        } while !(random.below(4) == 0 ? enableCallbacksDelayed() : !poll(enableCallbacksPrepare()))
        lastAction = "virtblk_done: callbacks enabled at used \(lastUsedIndex), used_event \(usedEventNow)"
    }

    private var usedEventNow: UInt16 { UInt16(littleEndian: vbd_load_acquire_u16(usedEventField)) }

    /// virtqueue_disable_cb_split.
    private func disableCallbacks() {
        guard availableFlagsShadow & Self.noInterrupt == 0 else { return }
        availableFlagsShadow |= Self.noInterrupt
        // The device signalled already and will not again: nothing to write.
        if eventTriggered { return }
        if eventIndex {
            vbd_store_release_u16(usedEventField, 0)   // Linux's "hack": an event index far away
        } else {
            vbd_store_release_u16(availableFlags, availableFlagsShadow.littleEndian)
        }
    }

    /// virtqueue_get_buf_ctx_split.
    private func getBuffer() throws(DriverError) -> UInt16? {
        guard moreUsed else { return nil }
        // virtio_rmb: the element after the index (the acquire load above orders it).
        let element = usedRing(lastUsedIndex)
        let id = UInt32(littleEndian: element.load(as: UInt32.self))
        let length = UInt32(littleEndian: (element + 4).load(as: UInt32.self))
        guard id < UInt32(size), inFlight[Int(id)] else {
            throw DriverError(description: "used entry \(lastUsedIndex) returned head \(id), which is not in flight")
        }
        let status = (memory + Self.statusOffset + Int(id)).load(as: UInt8.self)
        guard status == 0, length == expectedWritten[Int(id)] else {
            throw DriverError(description: "head \(id) completed with status \(status), \(length) bytes written (\(expectedWritten[Int(id)]) expected)")
        }
        lastUsedIndex &+= 1
        if availableFlagsShadow & Self.noInterrupt == 0 {
            vbd_store_release_u16(usedEventField, lastUsedIndex.littleEndian)
            vbd_fence_seq_cst()   // virtio_store_mb
        }
        return UInt16(id)
    }

    private func complete(_ head: UInt16) {
        inFlight[Int(head)] = false
        free.append(head)
        completed += 1
    }

    /// virtqueue_enable_cb_prepare_split: callbacks on, interrupt wanted at the next used entry.
    private func enableCallbacksPrepare() -> UInt16 {
        eventTriggered = false
        if availableFlagsShadow & Self.noInterrupt != 0 {
            availableFlagsShadow &= ~Self.noInterrupt
            if !eventIndex { vbd_store_release_u16(availableFlags, availableFlagsShadow.littleEndian) }
        }
        vbd_store_release_u16(usedEventField, lastUsedIndex.littleEndian)
        return lastUsedIndex
    }

    /// virtqueue_poll_split: whether entries were used since `last` (the re-check after enabling).
    private func poll(_ last: UInt16) -> Bool {
        vbd_fence_seq_cst()   // virtio_mb
        return last != deviceUsedIndex
    }

    /// virtqueue_enable_cb_delayed_split: an interrupt only after 3/4 of what is outstanding.
    private func enableCallbacksDelayed() -> Bool {
        eventTriggered = false
        if availableFlagsShadow & Self.noInterrupt != 0 {
            availableFlagsShadow &= ~Self.noInterrupt
            if !eventIndex { vbd_store_release_u16(availableFlags, availableFlagsShadow.littleEndian) }
        }
        let buffers = UInt16(truncatingIfNeeded: Int(availableIndexShadow &- lastUsedIndex) * 3 / 4)
        vbd_store_release_u16(usedEventField, (lastUsedIndex &+ buffers).littleEndian)
        vbd_fence_seq_cst()   // virtio_store_mb
        return deviceUsedIndex &- lastUsedIndex <= buffers
    }

    struct DriverError: Error { var description: String }

    /// Submits (in batches, kicking as blk-mq does at the batch's last request) and completes on
    /// interrupts until every request completed, or reports a stall.
    func run(deviceState: () -> String) {
        var watch = ProgressWatch()
        do throws(DriverError) {
            while completed < requests {
                var batch = random.below(4) + 1
                while submitted < requests && free.count > Int(size) - depth {
                    add()
                    batch -= 1
                    jitter(random, oneIn: 32)
                    if batch == 0 || free.count == Int(size) - depth || submitted == requests {
                        if kickPrepareAndRecord() { notify() }
                        batch = random.below(4) + 1
                    }
                }
                // Asleep until the interrupt (the call eventfd), woken now and then to watch progress.
                var p = pollfd(fd: call, events: Int16(POLLIN), revents: 0)
                if Glibc.poll(&p, 1, 50) == 1 {
                    var count: UInt64 = 0
                    _ = read(call, &count, 8)
                    try interrupt()
                }
                if watch.stalled(completed: completed) {
                    failure = stallReport(deviceState())
                    return
                }
            }
        } catch {
            failure = "queue \(queue): \(error.description)"
        }
    }

    /// kickPrepare, counting what it decided.
    private func kickPrepareAndRecord() -> Bool {
        if kickPrepare() {
            kicksSent += 1
            lastAction = "kicked at avail idx \(availableIndexShadow)"
            return true
        }
        kicksSkipped += 1
        lastAction = "no kick at avail idx \(availableIndexShadow) (avail_event \(availableEventNow))"
        return false
    }

    /// virtqueue_notify: after the queue's lock, a vCPU exit later.
    private func notify() {
        jitter(random, oneIn: 8)
        var one: UInt64 = 1
        _ = write(kick, &one, 8)
    }

    /// As ``run(deviceState:)``, but a second thread submits (taking a free slot, adding and
    /// deciding the kick under `queueLock`, notifying outside it; kicking what it added before it
    /// waits for a slot, as blk-mq's commit_rqs does) while this one takes the interrupts.
    func runOnTwoThreads(deviceState: () -> String) {
        let queueLock = NSLock()
        // Signalled up to the depth rather than created with it: libdispatch traps when a semaphore
        // goes away holding less than its initial value.
        let freeSlots = DispatchSemaphore(value: 0)
        for _ in 0..<depth { freeSlots.signal() }
        let stopSubmitting = Atomic<Bool>(false)
        let submitterDone = DispatchSemaphore(value: 0)
        Thread { [self] in
            defer { submitterDone.signal() }
            var batch = random.below(4) + 1
            while !stopSubmitting.load(ordering: .relaxed) {
                if freeSlots.wait(timeout: .now()) == .timedOut {
                    queueLock.lock()
                    let kickNow = added > 0 && kickPrepareAndRecord()
                    queueLock.unlock()
                    if kickNow { notify() }
                    while freeSlots.wait(timeout: .now() + .milliseconds(50)) == .timedOut {
                        if stopSubmitting.load(ordering: .relaxed) { return }
                    }
                }
                queueLock.lock()
                guard submitted < requests else { queueLock.unlock(); return }
                add()
                batch -= 1
                let last = batch == 0 || submitted == requests
                let kickNow = last && kickPrepareAndRecord()
                if last { batch = random.below(4) + 1 }
                queueLock.unlock()
                if kickNow { notify() }
                jitter(random, oneIn: 32)
            }
        }.start()
        defer {
            stopSubmitting.store(true, ordering: .relaxed)
            submitterDone.wait()
        }
        var watch = ProgressWatch()
        while true {
            var p = pollfd(fd: call, events: Int16(POLLIN), revents: 0)
            let interrupted = Glibc.poll(&p, 1, 50) == 1
            if interrupted {
                var count: UInt64 = 0
                _ = read(call, &count, 8)
            }
            queueLock.lock()
            defer { queueLock.unlock() }
            let before = completed
            if interrupted {
                do throws(DriverError) { try interrupt() } catch {
                    failure = "queue \(queue): \(error.description)"
                    return
                }
            }
            for _ in before..<completed { freeSlots.signal() }
            if completed == requests { return }
            if watch.stalled(completed: completed) {
                failure = stallReport(deviceState())
                return
            }
        }
    }

    var summary: String {
        "q\(queue) \(completed) completed, \(kicksSent) kicks, \(kicksSkipped) skipped, \(interrupts) interrupts (+\(spuriousInterrupts) with nothing used), \(rechecksFound) re-checks found more"
    }

    private var availableEventNow: UInt16 { UInt16(littleEndian: vbd_load_acquire_u16(availableEventField)) }

    /// What both sides show after `stallSeconds` without a completion, and which notification that means was lost.
    private func stallReport(_ device: String) -> String {
        let used = deviceUsedIndex
        let availableEvent = availableEventNow, usedEvent = usedEventNow
        let flags = UInt16(littleEndian: vbd_load_acquire_u16(availableFlags))
        // Whether the driver asked for an interrupt for the entries the device used beyond its own.
        let interruptWanted = eventIndex ? Self.needEvent(usedEvent, new: used, old: lastUsedIndex) : flags & Self.noInterrupt == 0
        let untaken = "if the device's `taken` is behind avail idx \(availableIndexShadow), a kick was lost (avail_event \(availableEvent)) or its queue thread is stuck; if not, requests are stuck in the device"
        let diagnosis: String
        if used != lastUsedIndex && interruptWanted {
            diagnosis = "LOST INTERRUPT: the device used \(used &- lastUsedIndex) entries past the driver's \(lastUsedIndex), but no call came (used_event \(usedEvent), avail flags \(flags))"
        } else if used != lastUsedIndex {
            diagnosis = "the device used \(used &- lastUsedIndex) entries, short of the interrupt the driver asked for (used_event \(usedEvent)); \(untaken)"
        } else {
            diagnosis = "nothing used: \(untaken)"
        }
        return """
            queue \(queue): no completion for \(NotificationStress.stallSeconds) s with \(Int(size) - free.count) requests in flight: \(diagnosis)
              driver: avail idx \(availableIndexShadow), last used \(lastUsedIndex), used idx \(used), avail_event \(availableEvent), used_event \(usedEvent), \
            avail flags shadow \(availableFlagsShadow), event triggered \(eventTriggered); \(submitted) submitted, \(completed) completed, \
            \(kicksSent) kicks sent, \(kicksSkipped) skipped, \(interrupts) interrupts, \(spuriousInterrupts) with nothing used, \
            \(rechecksFound) re-checks found more; last: \(lastAction)
              device: \(device)
            """
    }
}

/// A queue's progress as the driver sees it: stalled once its completed count has not moved for
/// `NotificationStress.stallSeconds`.
private struct ProgressWatch {
    private var lastCompleted = 0
    private var lastProgress = ContinuousClock.now

    mutating func stalled(completed: Int) -> Bool {
        if completed != lastCompleted {
            lastCompleted = completed
            lastProgress = .now
            return false
        }
        return ContinuousClock.now - lastProgress > .seconds(NotificationStress.stallSeconds)
    }
}
