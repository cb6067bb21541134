import Dispatch
import Foundation
import NBDServer
import Synchronization
import Testing
import VBDAccounting
import VBDCore

/// `NBDServer.waitForDeviceSlot`: how a door outside SwiftNIO (vhost-user-blk) queues its requests
/// in the same mClock scheduler as the NBD clients.
@Suite struct DeviceSlotTests {
    func server(scheduling: Bool, store: TemporaryStore) async throws -> NBDServer {
        let service = try TenancyService(configuration: .init())
        let server = NBDServer(configuration: .init(
            exports: store.store, unixSocketPath: store.directory.appendingPathComponent("nbd.sock").path,
            tenancy: .init(service: service, scheduling: scheduling, deviceSlots: 1, reservedSlots: 0)))
        try await server.start()
        return server
    }

    @Test func aSecondRequestWaitsForTheOnlySlot() async throws {
        let store = try TemporaryStore()
        defer { store.close() }
        let server = try await server(scheduling: true, store: store)
        let first = try #require(try server.waitForDeviceSlot(domain: "a", cost: 1))
        // A second request (another domain, as another door's would be) gets the slot only once
        // the first frees it.
        let second = DispatchSemaphore(value: 0)
        let secondRelease = Mutex<(@Sendable () -> Void)?>(nil)
        Thread {
            let release = try? server.waitForDeviceSlot(domain: "b", cost: 1)
            secondRelease.withLock { $0 = release ?? nil }
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
        #expect(try server.waitForDeviceSlot(domain: "a", cost: 1) == nil)
        await server.stop()
    }
}
