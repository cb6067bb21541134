import Dispatch
import Foundation
import NBDProtocol
@testable import NBDServer
import Synchronization
import Testing
import VBDAccounting
import VBDCore
import VhostUser

extension RealServerTests {
    /// Both front doors stack on one ``RequestPipeline``: an NBD request (through the real server
    /// and a client on its socket) and a virtio-blk request (through the vhost-user-blk door's
    /// request handler) are admitted, refused by the lease, scheduled and charged by the same layer.
    @Suite("One request layer under the NBD and the vhost-user-blk doors", .serialized)
    struct RequestPipelineTests {
        func nbdRequest(_ client: RawClient, _ command: NBDCommand, handle: UInt64, offset: UInt64 = 0, length: UInt32 = 4096) -> UInt32? {
            let payload = command == .write ? [UInt8](repeating: 0x5A, count: Int(length)) : []
            client.sendRequest(command.rawValue, handle: handle, offset: offset, length: length, payload: payload)
            guard let reply = client.receiveSimpleReply(), reply.handle == handle else { return nil }
            if command == .read && reply.error == 0 { _ = client.receive(Int(length)) }
            return reply.error
        }

        /// A virtio-blk request of `type` on `sector` moving 4 KiB, served by `handler` as a queue
        /// thread serves a chain from the ring; returns the status byte.
        func virtioRequest(_ handler: VirtioBlkRequestHandler, type: UInt32, sector: UInt64) -> UInt8 {
            let header = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
            let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            let status = UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 1)
            defer { header.deallocate(); data.deallocate(); status.deallocate() }
            header.storeBytes(of: type.littleEndian, toByteOffset: 0, as: UInt32.self)
            header.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
            header.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
            data.initializeMemory(as: UInt8.self, repeating: 0x5A)
            status[0] = 0xFF
            var chain = DescriptorChain(head: 0)
            if type == VirtioBlk.RequestType.read.rawValue {
                chain.readable = [header]
                chain.writable = [data, status]
            } else {
                chain.readable = [header, data]
                chain.writable = [status]
            }
            _ = handler.handle(chain)
            return status[0]
        }

        func us() -> PeerIdentity {
            var credentials = UnixPeerCredentials()
            credentials.pid = getpid()
            credentials.uid = getuid()
            credentials.gid = getgid()
            return PeerIdentity(unixCredentials: credentials)
        }

        @Test func aLeaseRefusesAndTheLedgerChargesRequestsOfBothDoorsAlike() async throws {
            let service = try TenancyService(configuration: .init(resolver: DomainResolver.hypervisor(bindings: ["vol": "alice"]),
                                                                  leasesEnforced: true))
            let pipeline = RequestPipeline(tenancy: service)
            let device = MemoryBlockDevice(name: "vol", size: 16 << 20)
            try service.grantLease(volume: "vol", domain: "alice", mode: .read, duration: .seconds(60), actor: "test")
            let fixture = try await TenancyServer(devices: [device], tenancy: .init(service: service, pipeline: pipeline))
            defer { Task { await fixture.stop() } }

            // NBD: a read lease admits the connection and its read; the write gets EPERM.
            let client = try RawClient(socketPath: fixture.socketPath)
            #expect(client.enterTransmission(export: "vol") != nil)
            #expect(nbdRequest(client, .read, handle: 1) == 0)
            #expect(nbdRequest(client, .write, handle: 2) == NBDError.notPermitted.rawValue)

            // vhost-user-blk: a front end of the same process, admitted by the same layer.
            let session = try pipeline.admit(device: device, identity: us(), door: .vhostUserBlk).get()
            #expect(session.domain == "alice")
            let handler = VirtioBlkRequestHandler(device: device, session: session)
            #expect(virtioRequest(handler, type: VirtioBlk.RequestType.read.rawValue, sector: 8) == VirtioBlk.Status.ok.rawValue)
            #expect(virtioRequest(handler, type: VirtioBlk.RequestType.write.rawValue, sector: 8) == VirtioBlk.Status.ioError.rawValue)
            // Refused: nothing reached the device.
            #expect(try device.readArray(offset: 4096, count: 4096) == [UInt8](repeating: 0, count: 4096))

            // One layer counted both doors the same way...
            let counters = pipeline.doorCounters
            for door in FrontDoor.allCases {
                let c = try #require(counters[door], "\(door) went through the pipeline")
                #expect(c.connectionsAdmitted == 1, "\(door)")
                #expect(c.requests == 2, "\(door)")
                #expect(c.refusedByLease == 1, "\(door)")
                #expect(c.failed == 1, "\(door)")
                #expect(c.bytes == 4096, "\(door)")
            }
            // ...and charged both to the domain's ledger alike.
            let usage = service.snapshot().ledger.usage(of: "alice")
            #expect(usage.operations[.read] == 2)
            #expect(usage.operations[.write] == 2)
            #expect(usage.failedOperations == 2)
            #expect(usage.bytesRead == 8192)
            #expect(usage.bytesWritten == 0)

            // A write lease: both doors' writes go through now.
            try service.grantLease(volume: "vol", domain: "alice", mode: .write, duration: .seconds(60), actor: "test")
            #expect(nbdRequest(client, .write, handle: 3, offset: 0) == 0)
            #expect(virtioRequest(handler, type: VirtioBlk.RequestType.write.rawValue, sector: 16) == VirtioBlk.Status.ok.rawValue)
            #expect(service.snapshot().ledger.usage(of: "alice").bytesWritten == 8192)
            #expect(pipeline.doorCounters[.nbd]?.requests == 3 && pipeline.doorCounters[.vhostUserBlk]?.requests == 3)
            // The metrics endpoint's view of the same counters.
            let metrics = pipeline.metrics
            for door in FrontDoor.allCases {
                #expect(metrics.first { $0.name == "vbd_door_requests_total" && $0.labels["door"] == door.rawValue }?.value == 3)
                #expect(metrics.first { $0.name == "vbd_door_requests_refused_by_lease_total" && $0.labels["door"] == door.rawValue }?.value == 1)
                #expect(metrics.first { $0.name == "vbd_door_connections_total" && $0.labels == ["door": door.rawValue, "outcome": "admitted"] }?.value == 1)
            }
        }

        /// With scheduling (one device slot), a virtio-blk request that arrives while an NBD
        /// request is on the device waits for that slot: the two doors queue in the one scheduler
        /// the pipeline holds, so the device never sees both at once (it would, were the virtio-blk
        /// door to bypass the layer: each call holds the device for a second).
        @Test func aVirtioRequestWaitsForTheSlotAnNBDRequestHolds() async throws {
            let service = try TenancyService(configuration: .init(resolver: DomainResolver.hypervisor(bindings: ["vol": "alice"])))
            let pipeline = RequestPipeline(tenancy: service)
            let device = PeakConcurrencyDevice(MemoryBlockDevice(name: "vol", size: 16 << 20), hold: .seconds(1))
            let fixture = try await TenancyServer(devices: [device],
                                                  tenancy: .init(service: service, pipeline: pipeline, deviceSlots: 1, reservedSlots: 0))
            defer { Task { await fixture.stop() } }
            #expect(pipeline.schedules)
            let client = try RawClient(socketPath: fixture.socketPath)
            #expect(client.enterTransmission(export: "vol") != nil)
            client.sendRequest(NBDCommand.read.rawValue, handle: 1, offset: 0, length: 4096, payload: [])
            try #require(device.firstCallStarted.wait(timeout: .now() + .seconds(60)) == .success, "the NBD read never reached the device")

            let session = try pipeline.admit(device: device, identity: us(), door: .vhostUserBlk).get()
            let handler = VirtioBlkRequestHandler(device: device, session: session)
            let virtioDone = DispatchSemaphore(value: 0)
            let virtioStatus = Mutex<UInt8?>(nil)
            Thread {
                let status = virtioRequest(handler, type: VirtioBlk.RequestType.read.rawValue, sector: 0)
                virtioStatus.withLock { $0 = status }
                virtioDone.signal()
            }.start()
            let reply = client.receiveSimpleReply()
            #expect(reply?.handle == 1 && reply?.error == 0)
            _ = client.receive(4096)
            #expect(virtioDone.wait(timeout: .now() + .seconds(60)) == .success)
            #expect(virtioStatus.withLock { $0 } == VirtioBlk.Status.ok.rawValue)
            #expect(device.calls == 2)
            #expect(device.peak == 1, "the virtio-blk request reached the device while the NBD request held the only slot")
            #expect(pipeline.doorCounters[.vhostUserBlk]?.requests == 1)
            #expect(pipeline.doorCounters[.nbd]?.requests == 1)
        }
    }
}

/// A device whose reads and writes each take `hold`, counting how many run at once at most.
final class PeakConcurrencyDevice: BlockDevice, @unchecked Sendable {
    let inner: MemoryBlockDevice
    let hold: Duration
    /// Signalled when the first call reaches the device.
    let firstCallStarted = DispatchSemaphore(value: 0)
    private let counts = Mutex((running: 0, peak: 0, calls: 0))
    var peak: Int { counts.withLock { $0.peak } }
    var calls: Int { counts.withLock { $0.calls } }

    init(_ inner: MemoryBlockDevice, hold: Duration) {
        self.inner = inner
        self.hold = hold
    }

    var name: String { inner.name }
    var deviceDescription: String { inner.deviceDescription }
    var size: UInt64 { inner.size }
    var blockSize: Int { inner.blockSize }
    var isReadOnly: Bool { inner.isReadOnly }

    private func occupy() {
        let first = counts.withLock { c -> Bool in
            c.running += 1
            c.calls += 1
            c.peak = max(c.peak, c.running)
            return c.calls == 1
        }
        if first { firstCallStarted.signal() }
        // Device latency, modelled as in TimedDevice: the request is on the device meanwhile.
        Thread.sleep(forTimeInterval: Double(hold.components.seconds) + Double(hold.components.attoseconds) * 1e-18)
        counts.withLock { $0.running -= 1 }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        occupy()
        try inner.read(offset: offset, into: buffer)
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        occupy()
        try inner.write(offset: offset, data: data, fua: fua)
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
