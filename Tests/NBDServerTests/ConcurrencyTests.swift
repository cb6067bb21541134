import Foundation
import NBDProtocol
import NBDServer
import Synchronization
import Testing
import VBDAccounting
import VBDCore
import VBDStore

/// A store volume whose writes wait, before they reach the store, until the test lets them go:
/// the test learns when each write arrives (`waitForArrivals`) and how many ran at once, so it
/// can hold requests in flight for as long as it needs without a clock.
final class WriteHoldingDevice: BlockDevice, @unchecked Sendable {
    // @unchecked: mutable state is guarded by `condition`.
    let inner: VolumeDevice
    /// A read at this offset lets every held and future write go (a request the client controls).
    /// The block there must hold data: a structured read of a hole is answered from the extents
    /// without a read call.
    let releasingReadOffset: UInt64?
    private let condition = NSCondition()
    private var permits = 0
    private var released = false
    private var arrived = 0
    private var active = 0
    private var activeMax = 0
    private var arrivalWaiters: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []

    init(_ inner: VolumeDevice, releasingReadOffset: UInt64? = nil) {
        self.inner = inner
        self.releasingReadOffset = releasingReadOffset
    }

    var name: String { inner.name }
    var deviceDescription: String { inner.deviceDescription }
    var size: UInt64 { inner.size }
    var blockSize: Int { inner.blockSize }
    var isReadOnly: Bool { inner.isReadOnly }

    private func locked<T>(_ body: () -> T) -> T {
        condition.lock()
        defer { condition.unlock() }
        return body()
    }

    /// The most writes that were inside the device at once.
    var mostWritesAtOnce: Int { locked { activeMax } }
    var writesArrived: Int { locked { arrived } }

    /// Lets `count` held writes (present or future) go on.
    func release(_ count: Int) {
        locked { permits += count }
        condition.broadcast()
    }

    /// Lets every write go on from now on.
    func releaseAll() {
        locked { released = true }
        condition.broadcast()
    }

    /// Returns once `count` writes have arrived in the device.
    func waitForArrivals(_ count: Int) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = locked { () -> Bool in
                if arrived >= count { return true }
                arrivalWaiters.append((count, continuation))
                return false
            }
            if now { continuation.resume() }
        }
    }

    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        let ready = locked { () -> [CheckedContinuation<Void, Never>] in
            arrived += 1
            active += 1
            activeMax = max(activeMax, active)
            let ready = arrivalWaiters.filter { $0.count <= arrived }.map(\.continuation)
            arrivalWaiters.removeAll { $0.count <= arrived }
            return ready
        }
        for continuation in ready { continuation.resume() }
        condition.lock()
        while !released && permits == 0 { condition.wait() }
        if !released { permits -= 1 }
        condition.unlock()
        defer { locked { active -= 1 } }
        try inner.write(offset: offset, data: data, fua: fua)
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        if offset == releasingReadOffset { releaseAll() }
        try inner.read(offset: offset, into: buffer)
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError) {
        try inner.trim(offset: offset, length: length, fua: fua)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {
        try inner.writeZeroes(offset: offset, length: length, mayTrim: mayTrim, fastOnly: fastOnly, fua: fua)
    }

    func flush() throws(BlockDeviceError) { try inner.flush() }

    func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError) { try inner.prefetch(offset: offset, length: length) }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] {
        try inner.extents(offset: offset, length: length, maxExtents: maxExtents)
    }
}

/// The store's exports, with one volume served through a ``WriteHoldingDevice``.
final class HoldingExports: ExportProvider, Sendable {
    let store: Store
    let held: WriteHoldingDevice

    init(store: Store, held: WriteHoldingDevice) {
        self.store = store
        self.held = held
    }

    func exportList() -> [ExportSummary] { store.exportList() }

    func openExport(named name: String) throws(BlockDeviceError) -> any BlockDevice {
        name == held.name ? held : try store.openExport(named: name)
    }
}

extension RealServerTests {
    @Suite("in-flight requests, ordering and backpressure", .serialized)
    struct ConcurrencyTests {
        /// Runs `body` with the standard store plus a volume `slow` (16 MiB) served through a
        /// ``WriteHoldingDevice``.
        func withHeldWrites(limits: NBDServer.ServerLimits = .init(), releasingReadOffset: UInt64? = nil,
                            _ body: (ServerFixture, WriteHoldingDevice) async throws -> Void) async throws {
            try await withServer(limits: limits, exports: { store in
                try store.createVolume(name: "slow", size: 16 << 20)
                if let releasingReadOffset {
                    try store.device(named: "slow").writeArray([UInt8](repeating: 0x52, count: 4096), offset: releasingReadOffset)
                }
                return HoldingExports(store: store, held: WriteHoldingDevice(try store.device(named: "slow"),
                                                                             releasingReadOffset: releasingReadOffset))
            }) { fixture in
                let held = try #require((fixture.server.configuration.exports as? HoldingExports)?.held)
                // Whatever the test did, nothing stays held: the server's stop waits for its requests.
                defer { held.releaseAll() }
                try await body(fixture, held)
            }
        }

        @Test(.enabled(if: Tool.hasNBDPython))
        func readsOvertakeSlowWritesOnTheSameConnection() async throws {
            try await withHeldWrites(releasingReadOffset: 2 << 20) { fixture, held in
                let result = try await runTool("nbdsh", ["-c", #"""
    import os, nbd
    h = nbd.NBD()
    h.connect_uri(os.environ["URI"])
    writes = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"w" * 4096)), i * 4096) for i in range(3)]
    read = h.aio_pread(nbd.Buffer(4096), 1 << 20)
    # The device holds the writes until it reads the block at 2 MiB: if the read waited behind
    # them, it would never complete (and the run would time out).
    while not h.aio_command_completed(read):
        h.poll(-1)
    assert not any(h.aio_command_completed(w) for w in writes), "a write completed while held"
    assert h.pread(4096, 2 << 20) == b"R" * 4096
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert h.pread(4096, 0) == b"w" * 4096
    """#], environment: ["URI": fixture.uri("slow")], timeout: .seconds(60))
                #expect(result.status == 0, "\(result)")
                #expect(held.writesArrived == 3)
                #expect(try fixture.read("slow", offset: 2 * 4096, count: 4096) == [UInt8](repeating: 0x77, count: 4096))
            }
        }

        @Test func inFlightLimitStopsReadingTheSocketAndResumes() async throws {
            var limits = NBDServer.ServerLimits()
            limits.inFlightRequestsMax = 2
            try await withHeldWrites(limits: limits) { fixture, held in
                let client = try RawClient(socketPath: fixture.socketPath)
                #expect(client.enterTransmission(export: "slow") != nil)
                for handle in 0..<8 {
                    client.sendRequest(NBDCommand.write.rawValue, handle: UInt64(handle), offset: UInt64(handle) * 4096,
                                       length: 4096, payload: [UInt8](repeating: UInt8(handle), count: 4096))
                }
                // Two writes reach the device and are held there. Each one let go makes room for
                // exactly one more: four pool threads were free, but the rest waited unread.
                await awaitEvent("2 writes arriving") { await held.waitForArrivals(2) }
                for next in 3...8 {
                    held.release(1)
                    await awaitEvent("write \(next) arriving") { await held.waitForArrivals(next) }
                }
                held.release(2)
                var handles: Set<UInt64> = []
                for _ in 0..<8 {
                    let reply = try #require(client.receiveSimpleReply())
                    #expect(reply.error == 0)
                    handles.insert(reply.handle)
                }
                #expect(handles == Set(0..<8))
                #expect(held.mostWritesAtOnce == 2)
                #expect(try fixture.read("slow", offset: 7 * 4096, count: 4096) == [UInt8](repeating: 7, count: 4096))
            }
        }

        /// `closeConnections(servingAnyOf:)` (a RADOS family moving to another server): the
        /// connection to a withdrawn export answers the write it has in flight, then closes; a
        /// connection to another export goes on as if nothing happened.
        @Test func withdrawingExportsFinishesTheirRequestsAndLeavesOtherConnections() async throws {
            try await withHeldWrites { fixture, held in
                let moving = try RawClient(socketPath: fixture.socketPath)
                #expect(moving.enterTransmission(export: "slow") != nil)
                let staying = try RawClient(socketPath: fixture.socketPath)
                #expect(staying.enterTransmission(export: "small") != nil)
                moving.sendRequest(NBDCommand.write.rawValue, handle: 1, offset: 0, length: 4096,
                                   payload: [UInt8](repeating: 7, count: 4096))
                await awaitEvent("the write arriving") { await held.waitForArrivals(1) }
                let withdrawing = Task { await fixture.server.closeConnections(servingAnyOf: ["slow", "slow@snap"]) }
                await awaitEvent("the withdrawal reaching the connection") {
                    await fixture.events.waitForLine(containing: "export slow withdrawn")
                }
                held.release(1)
                #expect(await withdrawing.value == 1)
                // The write in flight was completed and answered before the connection closed.
                let reply = moving.receiveSimpleReply()
                #expect(reply?.handle == 1 && reply?.error == 0)
                #expect(moving.waitForClose())
                #expect(try fixture.read("slow", offset: 0, count: 4) == [7, 7, 7, 7])
                // The other connection still writes and reads.
                staying.sendRequest(NBDCommand.write.rawValue, handle: 2, offset: 4096, length: 4096,
                                    payload: [UInt8](repeating: 3, count: 4096))
                let written = staying.receiveSimpleReply()
                #expect(written?.handle == 2 && written?.error == 0)
                #expect(try fixture.read("small", offset: 4096, count: 4) == [3, 3, 3, 3])
                #expect(fixture.server.connectionCount == 1)
            }
        }

        @Test func stopFinishesRequestsInFlightBeforeClosing() async throws {
            try await withHeldWrites { fixture, held in
                let client = try RawClient(socketPath: fixture.socketPath)
                #expect(client.enterTransmission(export: "slow") != nil)
                client.sendRequest(NBDCommand.write.rawValue, handle: 1, offset: 0, length: 4096,
                                   payload: [UInt8](repeating: 9, count: 4096))
                await awaitEvent("the write arriving") { await held.waitForArrivals(1) }
                let stopping = Task { await fixture.server.stop() }
                await awaitEvent("stop() beginning") { await fixture.events.waitForLine(containing: "NBD server stopping") }
                held.release(1)
                await stopping.value
                // The write that was in flight when stop() began was completed and answered.
                let reply = client.receiveSimpleReply()
                #expect(reply?.handle == 1 && reply?.error == 0)
                #expect(client.waitForClose())
                #expect(try fixture.read("slow", offset: 0, count: 4) == [9, 9, 9, 9])
            }
        }

        /// stop() at any moment of start(), swept from at once to after start() returned (with
        /// tenancy, so its timer thread too): stop() waits for the setup in flight, so nothing is
        /// torn down under a bind, and afterwards nothing listens on the socket. The moments are
        /// counts of scheduler yields, not times; every outcome is checked whichever step stop()
        /// lands on, and the last round stops a server whose start() has returned.
        @Test func stopDuringStartLeavesNothingListening() async throws {
            let temporary = try TemporaryStore()
            defer { temporary.close() }
            let service = try TenancyService(configuration: .init(resolver: DomainResolver(bindings: ["vol": "d"])))
            let yieldCounts: [Int?] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, nil]   // nil: after start() returned
            for (round, yields) in yieldCounts.enumerated() {
                let socketPath = temporary.directory.appendingPathComponent("s\(round)").path
                let server = NBDServer(configuration: .init(exports: temporary.store, unixSocketPath: socketPath,
                                                            tenancy: .init(service: service)))
                let starting = Task { try await server.start() }
                if let yields {
                    for _ in 0..<yields { await Task.yield() }
                } else {
                    try await starting.value
                    #expect(!server.localAddresses.isEmpty, "started, so listening")
                }
                await server.stop()
                // start() finished, or failed with alreadyStarted because stop() came first.
                do {
                    try await starting.value
                } catch {
                    #expect("\(error)" == "\(NBDServer.ServerError.alreadyStarted)", "round \(round)")
                }
                #expect(server.localAddresses.isEmpty)
                #expect(throws: (any Error).self, "round \(round): something still listens") { _ = try RawClient(socketPath: socketPath) }
            }
        }

        @Test func runServesUntilItsTaskIsCancelled() async throws {
            let temporary = try TemporaryStore()
            defer { temporary.close() }
            let socketPath = temporary.directory.appendingPathComponent("s").path
            let events = ServerLog()
            let server = NBDServer(configuration: .init(exports: temporary.store, unixSocketPath: socketPath,
                                                        logger: events.logger(label: "vbd.nbd.run-test")))
            let running = Task { try await server.run() }
            await awaitEvent("the server listening") { await events.waitForLine(containing: "NBD server listening") }
            let client = try RawClient(socketPath: socketPath)
            #expect(client.enterTransmission(export: "vol")?.size == 1 << 20)
            running.cancel()
            try await running.value
            #expect(client.waitForClose())
            #expect(server.localAddresses.isEmpty)
        }
    }
}
