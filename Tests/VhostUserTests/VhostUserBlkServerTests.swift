import CVBDSys
import Foundation
import Logging
import Synchronization
import Testing
import VBDAccounting
import VBDCore
import VBDStore
@testable import VhostUser

#if canImport(Glibc)
import Glibc
#endif

/// The test plays QEMU: it connects to a real ``VhostUserBlkServer`` on a unix socket, negotiates,
/// passes a memfd as guest memory and eventfds with SCM_RIGHTS, drives a virtqueue in that memory
/// and waits for the back end's call eventfd (bounded by a poll timeout, never a sleep).
final class FrontEnd {
    let fd: Int32
    var connection: VhostUserConnection

    init(path: String) throws {
        var lastError: Int32 = 0
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8)); raw[path.utf8.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if connected != 0 { lastError = errno }
        try #require(connected == 0, "connect: \(String(cString: strerror(lastError)))")
        // Every reply is awaited at most 60 s: a back end that never answers fails the test, not hangs it.
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        self.fd = fd
        self.connection = VhostUserConnection(fd: fd)
    }

    deinit { close(fd) }

    func send(_ request: VhostUserRequest, _ payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false) throws {
        let header = VhostUserHeader(request: request.rawValue, flags: needReply ? [.version1, .needReply] : .version1, size: UInt32(payload.count))
        let bytes = header.encoded() + payload
        let sent = bytes.withUnsafeBytes { raw in fds.withUnsafeBufferPointer { vbd_send_with_fds(fd, raw.baseAddress, raw.count, $0.baseAddress, Int32($0.count)) } }
        try #require(sent == bytes.count)
    }

    /// Reads one reply (bounded: the socket has a receive timeout) and returns its payload.
    func reply(to request: VhostUserRequest) throws -> [UInt8] {
        var header = [UInt8](repeating: 0, count: 12)
        try #require(recv(fd, &header, 12, Int32(MSG_WAITALL)) == 12)
        let size = Int(UInt32(header[8]) | UInt32(header[9]) << 8 | UInt32(header[10]) << 16 | UInt32(header[11]) << 24)
        #expect(header[0] == UInt8(request.rawValue) && header[4] == 5)
        var payload = [UInt8](repeating: 0, count: size)
        if size > 0 { try #require(recv(fd, &payload, size, Int32(MSG_WAITALL)) == size) }
        return payload
    }

    func u64(_ bytes: [UInt8]) -> UInt64 { bytes.reversed().reduce(0) { $0 << 8 | UInt64($1) } }

    /// Reads one reply that may carry file descriptors (GET_INFLIGHT_FD's).
    func replyWithDescriptors(to request: VhostUserRequest) throws -> ([UInt8], [Int32]) {
        var header = [UInt8](repeating: 0, count: 12)
        var fds = [Int32](repeating: -1, count: 8)
        var fdCount: Int32 = 0, truncated: Int32 = 0
        let received = header.withUnsafeMutableBytes { raw in
            fds.withUnsafeMutableBufferPointer { vbd_recv_with_fds(fd, raw.baseAddress, 12, $0.baseAddress, 8, &fdCount, &truncated) }
        }
        try #require(received == 12)
        #expect(header[0] == UInt8(request.rawValue) && header[4] == 5)
        let size = Int(header[8]) | Int(header[9]) << 8
        var payload = [UInt8](repeating: 0, count: size)
        if size > 0 { try #require(recv(fd, &payload, size, Int32(MSG_WAITALL)) == size) }
        return (payload, Array(fds[0..<Int(fdCount)]))
    }

    /// The start-up QEMU's vhost-user-blk does: features, memory, one ring, enable.
    /// With `inflight` (an INFLIGHT_SHMFD area: fd and size) it is passed with SET_INFLIGHT_FD
    /// before the memory table, as QEMU does when it starts the device.
    func setUp(guest: GuestRing, kick: Int32, call: Int32, inflight: (fd: Int32, bytes: UInt64)? = nil,
               base: UInt32 = 0) throws {
        try send(.getFeatures)
        let features = u64(try reply(to: .getFeatures))
        #expect(features & VirtioFeature.vhostUserProtocolFeatures != 0 && features & VirtioBlk.Feature.flush != 0)
        try send(.getProtocolFeatures)
        let protocolFeatures = u64(try reply(to: .getProtocolFeatures))
        #expect(protocolFeatures & VhostUserProtocolFeature.config != 0)
        try send(.setProtocolFeatures, vhostUserU64(protocolFeatures))
        try send(.getQueueNum)
        #expect(u64(try reply(to: .getQueueNum)) >= 1)
        var config = ByteWriter()
        config.u32(0); config.u32(60); config.u32(0); config.append([UInt8](repeating: 0, count: 60))
        try send(.getConfig, config.bytes)
        let configReply = try reply(to: .getConfig)
        #expect(configReply.count == 72 && u64(Array(configReply[12..<20])) == 2048)
        try send(.setOwner)
        try send(.setFeatures, vhostUserU64(features & ~VirtioFeature.eventIndex))
        if let inflight {
            let description = VhostUserInflight(mmapSize: inflight.bytes, mmapOffset: 0, queueCount: 1, queueSize: UInt16(guest.queueSize))
            try send(.setInflightFD, description.encoded(), fds: [inflight.fd], needReply: true)
            #expect(u64(try reply(to: .setInflightFD)) == 0)
        }
        var table = ByteWriter()
        table.u32(1); table.u32(0)
        let r = guest.region
        table.u64(r.guestPhysicalAddress); table.u64(r.size); table.u64(r.userAddress); table.u64(r.mmapOffset)
        try send(.setMemTable, table.bytes, fds: [guest.memfd], needReply: true)
        #expect(u64(try reply(to: .setMemTable)) == 0)
        try send(.setVringNum, vhostUserVringState(index: 0, num: guest.queueSize))
        try send(.setVringBase, vhostUserVringState(index: 0, num: base))
        var address = ByteWriter()
        address.u32(0); address.u32(0)
        address.u64(guest.addresses.descriptorTable); address.u64(guest.addresses.usedRing); address.u64(guest.addresses.availableRing); address.u64(0)
        try send(.setVringAddr, address.bytes)
        try send(.setVringKick, vhostUserU64(0), fds: [kick])
        try send(.setVringCall, vhostUserU64(0), fds: [call])
        try send(.setVringEnable, vhostUserVringState(index: 0, num: 1), needReply: true)
        #expect(u64(try reply(to: .setVringEnable)) == 0)
    }
}

func eventfd() -> Int32 { vbd_eventfd(0, 0) }

/// Waits (at most 60 s each) for call eventfd signals until the used index reaches `used`, without kicking.
func waitForUsed(call: Int32, guest: GuestRing, used: UInt16) throws {
    while guest.usedIndex != used {
        var p = pollfd(fd: call, events: Int16(POLLIN), revents: 0)
        try #require(poll(&p, 1, 60_000) == 1, "no call eventfd signal within 60 s")
        var count: UInt64 = 0
        _ = read(call, &count, 8)
    }
}

/// Kicks, then waits (at most 60 s) until the call eventfd fires and the used index reaches `used`.
func kickAndWait(kick: Int32, call: Int32, guest: GuestRing, used: UInt16) throws {
    var one: UInt64 = 1
    _ = write(kick, &one, 8)
    while guest.usedIndex != used {
        var p = pollfd(fd: call, events: Int16(POLLIN), revents: 0)
        try #require(poll(&p, 1, 60_000) == 1, "no call eventfd signal within 60 s")
        var count: UInt64 = 0
        _ = read(call, &count, 8)
    }
}

@Suite struct VhostUserBlkServerTests {
    func server(_ scratch: ScratchStore, export: String = "vol", tenancy: TenancyService? = nil) throws -> VhostUserBlkServer {
        let path = scratch.directory.appendingPathComponent("\(export.replacingOccurrences(of: "@", with: "-")).sock").path
        let store = scratch.store
        let server = VhostUserBlkServer(socketPath: path, exportName: export, queueCountMax: 2, pipeline: tenancy.map { RequestPipeline(tenancy: $0) },
                                        logger: Logger(label: "test")) { () throws(BlockDeviceError) in
            try store.openExport(named: export)
        }
        try server.start()
        return server
    }

    @Test func servesAGuestOverTheSocketAndAcceptsItAgainAfterADisconnect() throws {
        let scratch = try ScratchStore()
        let server = try server(scratch)
        defer { server.stop() }
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        do {
            let front = try FrontEnd(path: server.socketPath)
            try front.setUp(guest: guest, kick: kick, call: call)
            let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 ^ 0x3c) }
            let write = guest.blockRequest(type: 1, sector: 8, data: pattern, firstDescriptor: 0)
            try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
            #expect(guest.bytes(at: write.status, count: 1) == [0])
            let read = guest.blockRequest(type: 0, sector: 8, readLength: 4096, firstDescriptor: 3)
            try kickAndWait(kick: kick, call: call, guest: guest, used: 2)
            #expect(guest.bytes(at: read.data, count: 4096) == pattern)
            // Stopping the ring reports where to resume.
            try front.send(.getVringBase, vhostUserVringState(index: 0, num: 0))
            #expect(try front.reply(to: .getVringBase) == vhostUserVringState(index: 0, num: 2))
        }
        // QEMU restarts: a new connection resumes the same ring at the base it was told.
        let front = try FrontEnd(path: server.socketPath)
        try front.setUp(guest: guest, kick: kick, call: call)
        let flush = guest.blockRequest(type: 4, sector: 0, firstDescriptor: 6)
        // setUp sent base 0 but the used index is 2: the back end resumes from the used ring.
        try kickAndWait(kick: kick, call: call, guest: guest, used: 3)
        #expect(guest.bytes(at: flush.status, count: 1) == [0])
        #expect(server.connectionsAccepted == 2)
    }

    @Test func aBadMessageClosesOnlyThatConnection() throws {
        let scratch = try ScratchStore()
        let server = try server(scratch)
        defer { server.stop() }
        let bad = try FrontEnd(path: server.socketPath)
        // SET_MEM_TABLE claiming one region but passing no fd: the back end hangs up.
        var table = ByteWriter()
        table.u32(1); table.u32(0); table.u64(0); table.u64(4096); table.u64(0); table.u64(0)
        try bad.send(.setMemTable, table.bytes)
        var byte: UInt8 = 0
        #expect(recv(bad.fd, &byte, 1, 0) == 0)   // end of stream, not the 60 s timeout (-1)
        // The socket serves the next front end.
        let good = try FrontEnd(path: server.socketPath)
        try good.send(.getQueueNum)
        #expect(good.u64(try good.reply(to: .getQueueNum)) == 2)
    }

    @Test func aSnapshotIsServedReadOnly() throws {
        let scratch = try ScratchStore()
        try scratch.store.snapshot(volume: "vol", name: "s")
        let server = try server(scratch, export: "vol@s")
        defer { server.stop() }
        let front = try FrontEnd(path: server.socketPath)
        try front.send(.getFeatures)
        #expect(front.u64(try front.reply(to: .getFeatures)) & VirtioBlk.Feature.readOnly != 0)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        let write = guest.blockRequest(type: 1, sector: 0, data: [UInt8](repeating: 9, count: 512))
        try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
        #expect(guest.bytes(at: write.status, count: 1) == [1])
    }

    /// Tenancy with leases enforced and this process's uid mapped to `tenant` (as
    /// `--peer-domain uid:N=DOMAIN` does).
    private func tenancyEnforcingLeases(thisUIDAs tenant: DomainID) throws -> TenancyService {
        try TenancyService(configuration: .init(resolver: DomainResolver(unixPeerDomains: [.uid(getuid()): .domain(tenant)]),
                                                leasesEnforced: true))
    }

    /// The door admits, lease-checks and charges through the same TenancyService calls as NBD:
    /// this process's uid is mapped to a domain (as `--peer-domain uid:N=DOMAIN` does).
    @Test func leasesAndChargesApplyToTheDoor() throws {
        let scratch = try ScratchStore()
        let tenant: DomainID = "tenant-a"
        let tenancy = try tenancyEnforcingLeases(thisUIDAs: tenant)
        let server = try server(scratch, tenancy: tenancy)
        defer { server.stop() }
        // Without a lease the front end is refused: the connection closes before any reply.
        let refused = try FrontEnd(path: server.socketPath)
        var byte: UInt8 = 0
        #expect(recv(refused.fd, &byte, 1, 0) == 0)

        try tenancy.grantLease(volume: "vol", domain: tenant, mode: .read, duration: .seconds(3600), actor: "test")
        let front = try FrontEnd(path: server.socketPath)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        let write = guest.blockRequest(type: 1, sector: 0, data: [UInt8](repeating: 7, count: 4096), firstDescriptor: 0)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
        #expect(guest.bytes(at: write.status, count: 1) == [1])   // a read lease does not allow writes
        let read = guest.blockRequest(type: 0, sector: 0, readLength: 8192, firstDescriptor: 3)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 2)
        #expect(guest.bytes(at: read.status, count: 1) == [0])
        let usage = tenancy.snapshot().ledger.usage(of: tenant)
        #expect(usage.operations[.read] == 1 && usage.operations[.write] == 1)
        #expect(usage.failedOperations == 1 && usage.bytesRead == 8192 && usage.bytesWritten == 0)
    }

    /// A lease that ends closes the connection it admitted, as an NBD connection closes: the
    /// front end sees the end of the stream, and a reconnect without a new lease is refused.
    @Test func aRevokedLeaseClosesTheConnection() throws {
        let scratch = try ScratchStore()
        let tenant: DomainID = "tenant-a"
        let tenancy = try tenancyEnforcingLeases(thisUIDAs: tenant)
        let server = try server(scratch, tenancy: tenancy)
        defer { server.stop() }
        try tenancy.grantLease(volume: "vol", domain: tenant, mode: .write, duration: .seconds(3600), actor: "test")
        let front = try FrontEnd(path: server.socketPath)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        let write = guest.blockRequest(type: 1, sector: 0, data: [UInt8](repeating: 7, count: 4096), firstDescriptor: 0)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
        #expect(guest.bytes(at: write.status, count: 1) == [0])

        try tenancy.revokeLease(volume: "vol", domain: tenant, actor: "test")
        // The end of the stream, not the 60 s receive timeout FrontEnd sets (-1, EAGAIN).
        var byte: UInt8 = 0
        #expect(recv(front.fd, &byte, 1, 0) == 0)
        let again = try FrontEnd(path: server.socketPath)
        #expect(recv(again.fd, &byte, 1, 0) == 0)
    }

    /// INFLIGHT_SHMFD: the area this back end hands out records the heads it takes; a back end
    /// that starts on an area a previous one left with heads in flight (it died after taking them)
    /// serves exactly those again, before anything new and without a kick, and answers them.
    @Test func requestsLeftInFlightAreServedByTheNextBackEnd() throws {
        let scratch = try ScratchStore()
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        let patternA = [UInt8](repeating: 0xa1, count: 4096), patternB = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        var area: (fd: Int32, bytes: UInt64, base: UnsafeMutableRawPointer)
        do {
            let server = try server(scratch)
            defer { server.stop() }
            let front = try FrontEnd(path: server.socketPath)
            try front.send(.getProtocolFeatures)
            #expect(front.u64(try front.reply(to: .getProtocolFeatures)) & VhostUserProtocolFeature.inflightSharedMemory != 0)
            try front.send(.getInflightFD, VhostUserInflight(mmapSize: 0, mmapOffset: 0, queueCount: 1, queueSize: UInt16(guest.queueSize)).encoded())
            let (payload, fds) = try front.replyWithDescriptors(to: .getInflightFD)
            try #require(payload.count == VhostUserInflight.byteCount && fds.count == 1)
            let bytes = front.u64(Array(payload[0..<8]))
            #expect(bytes == UInt64(InflightLayout.queueRegionBytes(queueSize: UInt16(guest.queueSize))))
            let mapped = try #require(mmap(nil, Int(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0))
            area = (fds[0], bytes, mapped)
            try front.setUp(guest: guest, kick: kick, call: call, inflight: (area.fd, area.bytes))
            let write = guest.blockRequest(type: 1, sector: 0, data: patternA, firstDescriptor: 0)
            try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
            #expect(guest.bytes(at: write.status, count: 1) == [0])
            let region = InflightQueueRegion(base: area.base, queueSize: UInt16(guest.queueSize))
            #expect(region.version == 1 && region.usedIndex == 1 && !region.isInflight(0) && region.counter(0) == 1)
            // The ring stops; two more requests arrive, and the area is left as a back end that
            // took both and died leaves it.
            try front.send(.getVringBase, vhostUserVringState(index: 0, num: 0))
            #expect(try front.reply(to: .getVringBase) == vhostUserVringState(index: 0, num: 1))
        }
        defer { munmap(area.base, Int(area.bytes)); close(area.fd) }
        // The previous back end took both and answered the second (the read) first: out of
        // order, so the used index alone (2) no longer says which one is still unanswered.
        let writeB = guest.blockRequest(type: 1, sector: 8, data: patternB, firstDescriptor: 3)
        let readA = guest.blockRequest(type: 0, sector: 0, readLength: 4096, firstDescriptor: 6)
        guest.write(patternA, at: readA.data)
        guest.write([0], at: readA.status)
        let element = guest.base + GuestRing.usedOffset + 4 + 8 * 1
        element.storeBytes(of: UInt32(6), as: UInt32.self)
        (element + 4).storeBytes(of: UInt32(4097), as: UInt32.self)
        vbd_store_release_u16(guest.base + GuestRing.usedOffset + 2, 2)
        for (head, counter, inflight) in [(UInt16(3), UInt64(2), UInt8(1)), (6, 3, 0)] {
            let entry = area.base + 16 + 16 * Int(head)
            (entry + 8).storeBytes(of: counter, as: UInt64.self)
            entry.storeBytes(of: inflight, as: UInt8.self)
        }
        (area.base + 12).storeBytes(of: UInt16(6), as: UInt16.self)   // last_batch_head
        (area.base + 14).storeBytes(of: UInt16(2), as: UInt16.self)   // used_idx

        // The next back end: QEMU passes the area back and sets the base to the used index.
        let server = try server(scratch)
        defer { server.stop() }
        let front = try FrontEnd(path: server.socketPath)
        try front.setUp(guest: guest, kick: kick, call: call, inflight: (area.fd, area.bytes), base: 2)
        try waitForUsed(call: call, guest: guest, used: 3)
        #expect(guest.usedElement(2).id == 3)   // the write left in flight, not the answered read again
        #expect(guest.bytes(at: writeB.status, count: 1) == [0])
        let readB = guest.blockRequest(type: 0, sector: 8, readLength: 4096, firstDescriptor: 9)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 4)
        #expect(guest.usedElement(3).id == 9 && guest.bytes(at: readB.data, count: 4096) == patternB)
        let region = InflightQueueRegion(base: area.base, queueSize: UInt16(guest.queueSize))
        #expect((0..<UInt16(guest.queueSize)).allSatisfy { !region.isInflight($0) } && region.usedIndex == 4)
        #expect(region.counter(9) == 3)   // after the highest counter still in flight (head 3: 2)
    }

    /// An inflight area the back end could lose under its mapping (not sealed against shrinking)
    /// or too small for its queues is refused: the connection closes, the server serves the next one.
    @Test func anInflightAreaThatCanShrinkOrIsTooSmallIsRefused() throws {
        let scratch = try ScratchStore()
        let server = try server(scratch)
        defer { server.stop() }
        let needed = InflightLayout.queueRegionBytes(queueSize: 16)
        for (sealed, size) in [(false, needed), (true, needed - 64)] {
            let fd = vbd_memfd_create("inflight")
            defer { close(fd) }
            try #require(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
            if sealed { try #require(vbd_seal_size(fd) == 0) }
            let front = try FrontEnd(path: server.socketPath)
            try front.send(.setInflightFD, VhostUserInflight(mmapSize: UInt64(size), mmapOffset: 0, queueCount: 1, queueSize: 16).encoded(),
                           fds: [fd], needReply: true)
            var byte: UInt8 = 0
            #expect(recv(front.fd, &byte, 1, 0) == 0)
        }
        #expect(server.connectionsAccepted == 2)
    }

    /// A guest that publishes a looping chain stops only its queue: the err eventfd fires, the
    /// connection stays, and the queue serves again once the front end sets it up anew.
    @Test func aBrokenRingStopsOnlyThatQueue() throws {
        let scratch = try ScratchStore()
        let server = try server(scratch)
        defer { server.stop() }
        let front = try FrontEnd(path: server.socketPath)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd(), err = eventfd()
        defer { close(kick); close(call); close(err) }
        try front.setUp(guest: guest, kick: kick, call: call)
        // Acknowledged before the kick: the back end holds the err fd when the queue fails.
        try front.send(.setVringErr, vhostUserU64(0), fds: [err], needReply: true)
        #expect(front.u64(try front.reply(to: .setVringErr)) == 0)
        let buffer = guest.allocate(16)
        guest.setDescriptor(0, address: guest.guestPhysical(buffer), length: 16, flags: 1, next: 1)
        guest.setDescriptor(1, address: guest.guestPhysical(buffer), length: 16, flags: 1, next: 0)
        guest.publish(0)
        var one: UInt64 = 1
        _ = write(kick, &one, 8)
        var p = pollfd(fd: err, events: Int16(POLLIN), revents: 0)
        #expect(poll(&p, 1, 60_000) == 1, "no err eventfd signal within 60 s")
        #expect(guest.usedIndex == 0)
        // The connection still answers; the front end resets the ring (as after a device reset).
        try front.send(.getVringBase, vhostUserVringState(index: 0, num: 0))
        #expect(try front.reply(to: .getVringBase) == vhostUserVringState(index: 0, num: 1))
        guest.availableIndex = 0
        let flush = guest.blockRequest(type: 4, sector: 0, firstDescriptor: 2)
        try front.send(.setVringBase, vhostUserVringState(index: 0, num: 0))
        try front.send(.setVringKick, vhostUserU64(0), fds: [kick])
        try front.send(.setVringCall, vhostUserU64(0), fds: [call])
        try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
        #expect(guest.bytes(at: flush.status, count: 1) == [0])
    }

    /// QEMU sends a new memory table while rings run (guest memory layout changes): the queue
    /// stops, the new regions are mapped, and it goes on from where it was.
    @Test func aNewMemoryTableUnderARunningQueue() throws {
        let scratch = try ScratchStore()
        let server = try server(scratch)
        defer { server.stop() }
        let front = try FrontEnd(path: server.socketPath)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        let first = guest.blockRequest(type: 1, sector: 0, data: [UInt8](repeating: 0x42, count: 4096), firstDescriptor: 0)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
        #expect(guest.bytes(at: first.status, count: 1) == [0])
        // The same memory, now described as two regions (split at 512 KiB), passed as two fds.
        let half = UInt64(GuestRing.bytes / 2)
        var table = ByteWriter()
        table.u32(2); table.u32(0)
        table.u64(GuestRing.guestPhysicalBase); table.u64(half); table.u64(GuestRing.userBase); table.u64(0)
        table.u64(GuestRing.guestPhysicalBase + half); table.u64(half); table.u64(GuestRing.userBase + half); table.u64(half)
        try front.send(.setMemTable, table.bytes, fds: [guest.memfd, guest.memfd], needReply: true)
        #expect(front.u64(try front.reply(to: .setMemTable)) == 0)
        // A read whose buffer lies in the second region.
        let read = guest.blockRequest(type: 0, sector: 0, readLength: 4096, firstDescriptor: 3, publish: false)
        try #require(UInt64(read.data) < half, "the test's buffers are in the first half")
        let high = Int(half) + 4096
        guest.setDescriptor(4, address: guest.guestPhysical(high), length: 4096, flags: 1 | 2, next: 5)
        guest.publish(3)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 2)
        #expect(guest.bytes(at: read.status, count: 1) == [0])
        #expect(guest.bytes(at: high, count: 4096) == [UInt8](repeating: 0x42, count: 4096))
    }

    /// Requests of one queue run at once: four reads published together all reach the device
    /// before any of them returns (served one at a time, each would wait out its 20 s and the test
    /// would fail).
    @Test func requestsOfOneQueueRunConcurrently() throws {
        let scratch = try ScratchStore()
        let path = scratch.directory.appendingPathComponent("gated.sock").path
        let gated = ConcurrentReadsDevice(try scratch.store.openExport(named: "vol"), expected: 4)
        let server = VhostUserBlkServer(socketPath: path, exportName: "vol", queueCountMax: 1, logger: Logger(label: "test")) { gated }
        try server.start()
        defer { server.stop() }
        let front = try FrontEnd(path: path)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        let reads = (0..<4).map { guest.blockRequest(type: 0, sector: UInt64($0) * 8, readLength: 4096, firstDescriptor: 3 * $0) }
        try kickAndWait(kick: kick, call: call, guest: guest, used: 4)
        #expect(reads.allSatisfy { guest.bytes(at: $0.status, count: 1) == [0] })
        #expect(gated.allArrived)
    }
}

extension VhostUserBlkServerTests {
    /// The threads serving a guest run at the process's nice value (its main thread's), not at the
    /// nice value of the thread that happened to start them (a GCD thread runs at its QoS's, nice
    /// 0, whatever the process's): a read alone on the ring (served on the queue's thread) and a
    /// flush (served on an I/O thread) both see the main thread's value.
    @Test func servingThreadsRunAtTheProcessNiceValue() throws {
        let main = try #require(ServingPriority.processNice())
        let target = min(19, main + 5)   // raising a nice value needs no privilege
        try #require(setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(getpid()), target) == 0)
        // Lowering it again needs CAP_SYS_NICE (root has it); without, the main thread stays nicer.
        defer { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(getpid()), main) }
        try #require(ServingPriority.currentNice() != target, "the test runs on the main thread: nothing would tell")
        let scratch = try ScratchStore()
        let path = scratch.directory.appendingPathComponent("nice.sock").path
        let device = NiceRecordingDevice(try scratch.store.openExport(named: "vol"))
        let server = VhostUserBlkServer(socketPath: path, exportName: "vol", queueCountMax: 1, logger: Logger(label: "test")) { device }
        try server.start()
        defer { server.stop() }
        let front = try FrontEnd(path: path)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        guest.blockRequest(type: 0, sector: 0, readLength: 4096, firstDescriptor: 0)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 1)
        guest.blockRequest(type: 4, sector: 0, firstDescriptor: 3)
        try kickAndWait(kick: kick, call: call, guest: guest, used: 2)
        #expect(device.seen == ["read": target, "flush": target])
    }
}

/// The store's device, recording the nice value of the thread each read and flush ran on.
final class NiceRecordingDevice: ForwardingBlockDevice, @unchecked Sendable {
    let inner: any BlockDevice
    private let recorded = Mutex([String: Int32]())
    var seen: [String: Int32] { recorded.withLock { $0 } }

    init(_ inner: any BlockDevice) { self.inner = inner }

    private func record(_ what: String) {
        let nice = ServingPriority.currentNice() ?? Int32.min
        recorded.withLock { $0[what] = nice }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        record("read")
        try inner.read(offset: offset, into: buffer)
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        try inner.write(offset: offset, data: data, fua: fua)
    }
    func flush() throws(BlockDeviceError) {
        record("flush")
        try inner.flush()
    }
}


/// The store's device, with reads held until `expected` of them are in progress at once (at most
/// 20 s): shows that a queue's requests run concurrently.
final class ConcurrentReadsDevice: ForwardingBlockDevice, @unchecked Sendable {
    let inner: any BlockDevice
    let expected: Int
    private let arrived = Mutex(0)
    private let allIn = DispatchSemaphore(value: 0)
    private let timedOut = Mutex(false)
    /// Every read found the others in progress (none waited out its 20 s).
    var allArrived: Bool { !timedOut.withLock { $0 } && arrived.withLock { $0 } >= expected }

    init(_ inner: any BlockDevice, expected: Int) {
        self.inner = inner
        self.expected = expected
    }


    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        let count = arrived.withLock { n -> Int in n += 1; return n }
        if count == expected {
            for _ in 0..<expected { allIn.signal() }
        }
        if allIn.wait(timeout: .now() + .seconds(20)) == .timedOut { timedOut.withLock { $0 = true } }
        try inner.read(offset: offset, into: buffer)
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        try inner.write(offset: offset, data: data, fua: fua)
    }
}

/// A test device that passes every call it does not define to `inner`.
protocol ForwardingBlockDevice: BlockDevice {
    var inner: any BlockDevice { get }
}

extension ForwardingBlockDevice {
    var name: String { inner.name }
    var deviceDescription: String { inner.deviceDescription }
    var size: UInt64 { inner.size }
    var blockSize: Int { inner.blockSize }
    var isReadOnly: Bool { inner.isReadOnly }
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
