import Dispatch
import Foundation
import NBDServer
import Synchronization
import Testing
import VBDAccounting
import VBDCore

/// `RequestSession.waitForSlot`: how a door outside SwiftNIO (vhost-user-blk) queues its requests
/// in the mClock scheduler the NBD server attached to the request layer.
@Suite struct DeviceSlotTests {
    func server(scheduling: Bool, store: TemporaryStore) async throws -> NBDServer {
        let service = try TenancyService(configuration: .init())
        let server = NBDServer(configuration: .init(
            exports: store.store, unixSocketPath: store.directory.appendingPathComponent("nbd.sock").path,
            tenancy: .init(service: service, scheduling: scheduling, deviceSlots: 1, reservedSlots: 0)))
        try await server.start()
        return server
    }

    func session(_ server: NBDServer) throws -> RequestSession {
        let pipeline = try #require(server.requestPipeline)
        return try pipeline.admit(device: MemoryBlockDevice(name: "vol", size: 1 << 20), identity: .unauthenticated,
                                  door: .vhostUserBlk).get()
    }

    @Test func aSecondRequestWaitsForTheOnlySlot() async throws {
        let store = try TemporaryStore()
        defer { store.close() }
        let server = try await server(scheduling: true, store: store)
        let session = try session(server)
        let first = try session.waitForSlot(.read, bytes: 4096)
        // A second request gets the slot only once the first frees it.
        let second = DispatchSemaphore(value: 0)
        let secondRelease = Mutex<(@Sendable () -> Void)?>(nil)
        Thread {
            let release = try? session.waitForSlot(.read, bytes: 4096)
            secondRelease.withLock { $0 = release }
            second.signal()
        }.start()
        // Not granted while the slot is taken (were it granted, this wait would end at once).
        #expect(second.wait(timeout: .now() + .milliseconds(300)) == .timedOut)
        first()
        #expect(second.wait(timeout: .now() + .seconds(30)) == .success)
        let release = try #require(secondRelease.withLock { $0 })
        release()
        await server.stop()
    }

    @Test func withoutSchedulingNothingWaits() async throws {
        let store = try TemporaryStore()
        defer { store.close() }
        let server = try await server(scheduling: false, store: store)
        let session = try session(server)
        #expect(!session.pipeline.schedules)
        // Two slots at once: nothing is scheduled, so nothing waits.
        let first = try session.waitForSlot(.read, bytes: 4096)
        let second = try session.waitForSlot(.read, bytes: 4096)
        first(); second()
        await server.stop()
    }
}
