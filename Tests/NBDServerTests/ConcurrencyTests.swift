import Foundation
import NBDProtocol
import NBDServer
import Testing
import VBDAccounting
import VBDCore

extension RealServerTests {
    @Suite("in-flight requests, ordering and backpressure", .serialized)
    struct ConcurrencyTests {
        static func slowDevice() -> MemoryBlockDevice {
            var state = MemoryBlockDevice.State()
            state.writeDelay = .milliseconds(400)
            return MemoryBlockDevice(name: "slow", size: 16 << 20, state: state)
        }

        @Test(.enabled(if: Tool.hasNBDPython))
        func readsOvertakeSlowWritesOnTheSameConnection() async throws {
            try await withServer(extraDevices: [Self.slowDevice()]) { fixture in
                let result = try await runTool("nbdsh", ["-c", #"""
    import os, time, nbd
    h = nbd.NBD()
    h.connect_uri(os.environ["URI"])
    writes = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"w" * 4096)), i * 4096) for i in range(3)]
    read = h.aio_pread(nbd.Buffer(4096), 1 << 20)
    while not h.aio_command_completed(read):
        h.poll(-1)
    # Each write takes 400 ms in the device; the read, sent after them, is answered before any.
    assert not any(h.aio_command_completed(w) for w in writes), "a read waited behind writes"
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert h.pread(4096, 0) == b"w" * 4096
    """#], environment: ["URI": fixture.uri("slow")])
                #expect(result.status == 0, "\(result)")
            }
        }

        @Test func inFlightLimitStopsReadingTheSocketAndResumes() async throws {
            var limits = NBDServer.ServerLimits()
            limits.inFlightRequestsMax = 2
            try await withServer(limits: limits, extraDevices: [Self.slowDevice()]) { fixture in
                let client = try RawClient(socketPath: fixture.socketPath)
                #expect(client.enterTransmission(export: "slow") != nil)
                for handle in 0..<8 {
                    client.sendRequest(NBDCommand.write.rawValue, handle: UInt64(handle), offset: UInt64(handle) * 4096,
                                       length: 4096, payload: [UInt8](repeating: UInt8(handle), count: 4096))
                }
                var handles: Set<UInt64> = []
                for _ in 0..<8 {
                    let reply = try #require(client.receiveSimpleReply())
                    #expect(reply.error == 0)
                    handles.insert(reply.handle)
                }
                #expect(handles == Set(0..<8))
                let device = fixture.provider.device("slow")
                // Four pool threads were free, but never more than two requests ran: the rest waited unread.
                #expect(device.state.withLock { $0.maxActiveWrites } == 2)
                #expect(try device.readArray(offset: 7 * 4096, count: 4096) == [UInt8](repeating: 7, count: 4096))
            }
        }

        @Test func stopFinishesRequestsInFlightBeforeClosing() async throws {
            let fixture = try await ServerFixture.start(extraDevices: [Self.slowDevice()])
            let client = try RawClient(socketPath: fixture.socketPath)
            #expect(client.enterTransmission(export: "slow") != nil)
            client.sendRequest(NBDCommand.write.rawValue, handle: 1, offset: 0, length: 4096,
                               payload: [UInt8](repeating: 9, count: 4096))
            let device = fixture.provider.device("slow")
            let deadline = ContinuousClock.now + .seconds(10)
            while device.state.withLock({ $0.activeWrites }) == 0 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(device.state.withLock { $0.activeWrites } == 1, "the write never started")
            await fixture.stop()
            // The write that was in flight when stop() began was completed and answered.
            let reply = client.receiveSimpleReply()
            #expect(reply?.handle == 1 && reply?.error == 0)
            #expect(client.waitForClose())
            #expect(try fixture.provider.device("slow").readArray(offset: 0, count: 4) == [9, 9, 9, 9])
        }

        /// stop() at any moment of start(), here swept from at once to after the bind (with tenancy,
        /// so its timer thread too): stop() waits for the setup in flight, so nothing is torn down
        /// under a bind, and afterwards nothing listens on the socket.
        @Test func stopDuringStartLeavesNothingListening() async throws {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-stop-\(UUID().uuidString.prefix(8))")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let provider = MemoryExportProvider([MemoryBlockDevice(name: "vol", size: 1 << 20)])
            let service = try TenancyService(configuration: .init(resolver: DomainResolver(bindings: ["vol": "d"])))
            for (round, delay) in [0, 50, 200, 500, 1000, 2000, 3000, 5000, 8000, 12000, 20000].enumerated() {
                let socketPath = directory.appendingPathComponent("s\(round)").path
                let server = NBDServer(configuration: .init(exports: provider, unixSocketPath: socketPath,
                                                            tenancy: .init(service: service)))
                let starting = Task { try await server.start() }
                try await Task.sleep(for: .microseconds(delay))
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
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-run-\(UUID().uuidString.prefix(8))")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let socketPath = directory.appendingPathComponent("s").path
            let provider = MemoryExportProvider([MemoryBlockDevice(name: "vol", size: 1 << 20)])
            let server = NBDServer(configuration: .init(exports: provider, unixSocketPath: socketPath))
            let running = Task { try await server.run() }
            let deadline = ContinuousClock.now + .seconds(10)
            while server.localAddresses.isEmpty && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(10))
            }
            let client = try RawClient(socketPath: socketPath)
            #expect(client.enterTransmission(export: "vol")?.size == 1 << 20)
            running.cancel()
            try await running.value
            #expect(client.waitForClose())
            #expect(server.localAddresses.isEmpty)
        }
    }
}
