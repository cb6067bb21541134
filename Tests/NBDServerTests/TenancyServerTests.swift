import Foundation
import NBDProtocol
@testable import NBDServer
import NIOCore
import Testing
import VBDAccounting
import VBDCore

extension RealServerTests {
    @Suite("Accounting, scheduling and leases through the real server", .serialized)
    struct TenancyServerTests {
        /// NBD_OPT_GO for `export`: the reply type of the first reply (ACK/INFO on success).
        func optionGoReplyType(_ socketPath: String, export: String) -> UInt32? {
            guard let client = try? RawClient(socketPath: socketPath) else { return nil }
            guard client.greet() != nil else { return nil }
            client.sendOption(NBDOptionCode.go, payload: NBDClientEncoder.exportQueryPayload(name: export))
            return client.receiveOptionReply()?.type
        }

        func request(_ client: RawClient, _ command: NBDCommand, handle: UInt64, offset: UInt64 = 0,
                     length: UInt32 = 4096) -> UInt32? {
            let payload = command == .write ? [UInt8](repeating: 0x5A, count: Int(length)) : []
            client.sendRequest(command.rawValue, handle: handle, offset: offset, length: length, payload: payload)
            guard let reply = client.receiveSimpleReply(), reply.handle == handle else { return nil }
            if command == .read && reply.error == 0 { _ = client.receive(Int(length)) }
            return reply.error
        }

        @Test func leasesGateTheHandshakeAndWritesAndEndingOneClosesTheConnectionAfterInFlightRequests() async throws {
            let audit = MemoryAuditStorage()
            let service = try TenancyService(
                configuration: .init(resolver: DomainResolver.hypervisor(bindings: ["vol": "alice"]), leasesEnforced: true),
                auditStorage: audit)
            // Writes take 300 ms so that one is surely in flight when the lease is revoked.
            let device = TimedDevice(MemoryBlockDevice(name: "vol", size: 16 << 20), perRequest: .zero,
                                     bytesPerSecond: 4096 / 0.3, channels: 4)
            let fixture = try await TenancyServer(
                devices: [device], tenancy: .init(service: service, leaseCheckInterval: .milliseconds(50)))
            defer { Task { await fixture.stop() } }

            // No lease: the export is refused at the handshake, by policy.
            #expect(optionGoReplyType(fixture.socketPath, export: "vol") == NBDOptionReplyType.errPolicy)

            // A read lease admits the connection and reads; writes get EPERM.
            try service.grantLease(volume: "vol", domain: "alice", mode: .read, duration: .seconds(60), actor: "test")
            #expect(optionGoReplyType(fixture.socketPath, export: "vol") == NBDOptionReplyType.info)  // INFO replies precede the ACK
            let client = try RawClient(socketPath: fixture.socketPath)
            #expect(client.enterTransmission(export: "vol") != nil)
            #expect(request(client, .read, handle: 1) == 0)
            #expect(request(client, .write, handle: 2, length: 512) == NBDError.notPermitted.rawValue)

            // Upgraded to a write lease: writes go through; another domain cannot get one meanwhile.
            try service.grantLease(volume: "vol", domain: "alice", mode: .write, duration: .seconds(60), actor: "test")
            #expect(request(client, .write, handle: 3, length: 512) == 0)
            #expect(throws: LeaseError.conflict(volume: "vol", holder: "alice", mode: .write)) {
                try service.grantLease(volume: "vol", domain: "bob", mode: .write, duration: .seconds(60), actor: "test")
            }

            // Revoke while a write is in flight: the write completes and is answered, then the server closes.
            let payload = [UInt8](repeating: 0x77, count: 4096)
            let startedBefore = device.started.withLock { $0 }
            client.sendRequest(NBDCommand.write.rawValue, handle: 4, offset: 8192, length: 4096, payload: payload)
            // Wait until the device call has begun (bounded), so the write is surely in flight.
            let waitStart = ContinuousClock.now
            while device.started.withLock({ $0 }) == startedBefore && ContinuousClock.now - waitStart < .seconds(10) {
                try await Task.sleep(for: .milliseconds(5))
            }
            try #require(device.started.withLock { $0 } > startedBefore, "the write never reached the device")
            try service.revokeLease(volume: "vol", domain: "alice", actor: "operator")
            let reply = client.receiveSimpleReply()
            #expect(reply?.handle == 4 && reply?.error == 0, "in-flight write answered before close")
            #expect(client.waitForClose())
            #expect(try device.inner.readArray(offset: 8192, count: 4096) == payload)
            // New connections are refused; the volume can now be leased to another domain.
            #expect(optionGoReplyType(fixture.socketPath, export: "vol") == NBDOptionReplyType.errPolicy)
            try service.bind(export: "vol", to: "bob", actor: "operator")
            try service.grantLease(volume: "vol", domain: "bob", mode: .write, duration: .milliseconds(500), actor: "operator")
            let second = try RawClient(socketPath: fixture.socketPath)
            #expect(second.enterTransmission(export: "vol") != nil)
            #expect(request(second, .read, handle: 5) == 0)
            // Expiry closes it without anyone acting (the server's lease timer).
            let started = ContinuousClock.now
            #expect(second.waitForClose())
            #expect(ContinuousClock.now - started < .seconds(3))

            // The audit log tells the story, intact, and forensics reconstructs the holders.
            let records = try service.auditRecords()
            #expect(records.map(\.operation) == ["lease.grant", "lease.grant", "lease.revoke", "binding.set",
                                                 "lease.grant", "lease.expire"])
            #expect(try service.verifyAudit()?.isIntact == true)
            let holdings = LeaseHistory.holdings(of: "vol", in: records)
            #expect(holdings.map(\.domain) == ["alice", "alice", "bob"])
            #expect(holdings.map(\.end) == [.released, .revoked, .expired])
            // The refused write and the accepted requests were all charged to their domains.
            let ledger = service.snapshot().ledger
            #expect(ledger.usage(of: "alice").operations[.write] == 3)
            #expect(ledger.usage(of: "alice").failedOperations == 1)
            #expect(ledger.usage(of: "alice").bytesWritten == 512 + 4096)
            #expect(ledger.usage(of: "bob").operations[.read] == 1)
        }

        /// Issue 13: a unix-socket client is who the kernel says it is (SO_PEERCRED), mapped by the
        /// server's configuration; the export it opens never makes it anyone. Each row serves one
        /// store-less device "vol" (bound or not) and opens it as the test runner's own uid/gid.
        @Test func aUnixClientIsItsMappedUidOrGidAndNeverTheExportsBinding() async throws {
            let uid = getuid(), gid = getgid()
            struct Row {
                var peers: [UnixPeer: PeerDomain]
                var binding: DomainID?
                var enforced: Bool
                /// The domain the read is charged to; nil: refused at NBD_OPT_GO by policy.
                var charged: DomainID?
            }
            let rows: [Row] = [
                Row(peers: [.uid(uid): .domain("runner")], binding: nil, enforced: true, charged: "runner"),
                Row(peers: [.gid(gid): .domain("staff")], binding: nil, enforced: true, charged: "staff"),
                Row(peers: [.uid(uid): .domain("runner"), .gid(gid): .domain("staff")], binding: nil, enforced: true,
                    charged: "runner"),
                Row(peers: [.uid(uid): .domain("runner")], binding: "runner", enforced: true, charged: "runner"),
                // Not mapped: nothing with leases enforced (even holding the bound domain's lease)...
                Row(peers: [.uid(uid &+ 1): .domain("other")], binding: nil, enforced: true, charged: nil),
                Row(peers: [:], binding: "alice", enforced: true, charged: nil),
                // ...and without enforcement anonymous on unbound exports, refused on bound ones.
                Row(peers: [:], binding: nil, enforced: false, charged: .anonymous),
                Row(peers: [:], binding: "alice", enforced: false, charged: nil),
                // Mapped, but to another domain than the export's binding.
                Row(peers: [.uid(uid): .domain("runner")], binding: "alice", enforced: false, charged: nil),
                Row(peers: [.uid(uid): .domain("runner")], binding: "alice", enforced: true, charged: nil),
            ]
            for row in rows {
                let service = try TenancyService(configuration: .init(
                    resolver: DomainResolver(bindings: row.binding.map { ["vol": ExportBinding(domain: $0)] } ?? [:],
                                             unixPeerDomains: row.peers),
                    leasesEnforced: row.enforced))
                for domain in ["runner", "staff", "other", "alice"] as [DomainID] where domain != "staff" || row.charged == "staff" {
                    // Leases for every candidate, so only identity decides (two write leases would conflict).
                    try service.grantLease(volume: "vol", domain: domain, mode: .read, duration: .seconds(600), actor: "test")
                }
                let fixture = try await TenancyServer(devices: [MemoryBlockDevice(name: "vol", size: 1 << 20)],
                                                      tenancy: .init(service: service))
                let goReply = optionGoReplyType(fixture.socketPath, export: "vol")
                if let charged = row.charged {
                    #expect(goReply == NBDOptionReplyType.info, "\(row.peers) bound to \(row.binding?.name ?? "none")")
                    let client = try RawClient(socketPath: fixture.socketPath)
                    #expect(client.enterTransmission(export: "vol") != nil)
                    #expect(request(client, .read, handle: 1) == 0)
                    // The reply is sent after the charge is recorded.
                    let ledger = service.snapshot().ledger
                    #expect(ledger.usage(of: charged).operations[.read] == 1, "\(row.peers): charged to \(ledger.domains.keys)")
                    #expect(ledger.total.operationCount == 1)
                } else {
                    #expect(goReply == NBDOptionReplyType.errPolicy,
                            "\(row.peers) bound to \(row.binding?.name ?? "none"), enforced \(row.enforced): not refused")
                    // NBD_OPT_EXPORT_NAME has no error reply: the server closes instead.
                    #expect(try RawClient(socketPath: fixture.socketPath).enterTransmission(export: "vol") == nil)
                    #expect(service.snapshot().ledger.total.operationCount == 0)
                }
                await fixture.stop()
            }
        }

        /// Under scheduling a large WRITE reaches the device as 64 KiB pieces, each scheduled on
        /// its own; the client still sees one request: one reply, all bytes in place, one charge,
        /// and with FUA one flush after the last piece. Without scheduling it stays one call.
        @Test func largeWritesAreScheduledInPiecesAndAnsweredOnce() async throws {
            for scheduling in [true, false] {
                let service = try TenancyService(configuration: .init(resolver: DomainResolver.hypervisor(bindings: ["vol": "bulk"])))
                let device = CallRecordingDevice(MemoryBlockDevice(name: "vol", size: 4 << 20))
                let fixture = try await TenancyServer(devices: [device], tenancy: .init(service: service, scheduling: scheduling))
                let client = try RawClient(socketPath: fixture.socketPath)
                #expect(client.enterTransmission(export: "vol") != nil)
                let length = (1 << 20) + 100   // 16 full pieces and a short one
                let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
                client.sendRequest(NBDCommand.write.rawValue, flags: .fua, handle: 7, offset: 4096,
                                   length: UInt32(length), payload: payload)
                let reply = client.receiveSimpleReply()
                #expect(reply?.handle == 7 && reply?.error == 0)
                #expect(try device.inner.readArray(offset: 4096, count: length) == payload)
                let calls = device.calls.withLock { $0 }
                if scheduling {
                    // [4096, 4096 + 1 MiB + 100) meets 17 of the device's 64 KiB windows; pieces end on
                    // them, and each piece is written in steps ending on its 16 KiB boundaries: 4 steps
                    // in the first (from 4096), 4 in each of the 15 full pieces, 1 in the short last one.
                    #expect(calls.writes.count == 65, "\(calls.writes)")
                    #expect(calls.writes.allSatisfy { !$0.fua && $0.length <= NBDOperationJob.stepBytes })
                    #expect(calls.writes.map(\.length).reduce(0, +) == length)
                    #expect(calls.writes.map(\.offset).sorted().dropFirst().allSatisfy { $0 % UInt64(NBDOperationJob.stepBytes) == 0 })
                    #expect(calls.writes.map(\.offset).min() == 4096)
                    #expect(calls.flushes == 1, "FUA: one flush after the pieces")
                } else {
                    #expect(calls.writes.count == 1 && calls.writes[0].fua && calls.flushes == 0)
                }
                let usage = service.snapshot().ledger.usage(of: "bulk")
                #expect(usage.operations[.write] == 1 && usage.bytesWritten == UInt64(length))
                #expect(abs(usage.ioUnits - IOCost.units(kind: .write, bytes: UInt64(length))) < 1e-9)
                // A small write is never split.
                #expect(request(client, .write, handle: 8, length: 65536) == 0)
                #expect(device.calls.withLock { $0.writes.count } == (scheduling ? 66 : 2))
                await fixture.stop()
            }
        }

        /// A domain's queue is bounded: past its capacity requests get ENOMEM at once, the queued
        /// ones are served at the domain's limit, and the connection stays usable.
        @Test func aFullDomainQueueRefusesTheExcessAndTheLimitPacesTheRest() async throws {
            let service = try TenancyService(configuration: .init(
                resolver: DomainResolver.hypervisor(bindings: ["vol": "greedy"]),
                policies: ["greedy": SchedulingPolicy(limit: 10, burstUnits: 0, limitBurstUnits: 0, queueCapacity: 4)]))
            let fixture = try await TenancyServer(devices: [MemoryBlockDevice(name: "vol", size: 1 << 20)],
                                                  tenancy: .init(service: service))
            defer { Task { await fixture.stop() } }
            let client = try RawClient(socketPath: fixture.socketPath)
            #expect(client.enterTransmission(export: "vol") != nil)
            let started = ContinuousClock.now
            for handle in 1...10 as ClosedRange<UInt64> {
                client.sendRequest(NBDCommand.read.rawValue, handle: handle, offset: 0, length: 512)
            }
            var errors: [UInt32] = []
            for _ in 1...10 {
                guard let reply = client.receiveSimpleReply() else { Issue.record("no reply"); return }
                if reply.error == 0 { _ = client.receive(512) }
                errors.append(reply.error)
            }
            let elapsed = ContinuousClock.now - started
            // One dispatched at once, four queued, five refused (arrival order may interleave with dispatch,
            // so at least five are refused and at most five served).
            #expect(errors.filter { $0 == NBDError.noMemory.rawValue }.count >= 5, "\(errors)")
            let served = errors.filter { $0 == 0 }.count
            #expect(served >= 1 && served <= 5, "\(errors)")
            // At 10 units/s (1.0078 units per 512-byte read), the served ones after the first take >= 0.1 s each.
            #expect(elapsed >= .milliseconds(Int64(95 * (served - 1))), "served \(served) in \(elapsed)")
            #expect(request(client, .read, handle: 99, length: 512) == 0, "the connection still works")
            #expect(service.snapshot().ledger.usage(of: "greedy").failedOperations >= 5)
        }

        /// Past its overdraft limit a domain with no reservation is not served; a top-up lets its
        /// waiting request through without the client doing anything.
        @Test func anOverdrawnDomainWaitsUntilTopUp() async throws {
            let service = try TenancyService(configuration: .init(
                resolver: DomainResolver.hypervisor(bindings: ["vol": "spender"]),
                credits: CreditBook(defaultAccount: .init(balance: 1.5, overdraftLimit: 0))))
            let fixture = try await TenancyServer(devices: [MemoryBlockDevice(name: "vol", size: 1 << 20)],
                                                  tenancy: .init(service: service, leaseCheckInterval: .milliseconds(50)))
            defer { Task { await fixture.stop() } }
            let client = try RawClient(socketPath: fixture.socketPath, receiveTimeout: .seconds(1))
            #expect(client.enterTransmission(export: "vol") != nil)
            // Each 512-byte read costs ~1.008 units at >= 1 credit: two reads take the balance below 0.
            #expect(request(client, .read, handle: 1, length: 512) == 0)
            #expect(request(client, .read, handle: 2, length: 512) == 0)
            #expect(service.isOverdrawn("spender"))
            client.sendRequest(NBDCommand.read.rawValue, handle: 3, offset: 0, length: 512)
            #expect(client.receiveSimpleReply() == nil, "an overdrawn domain without reservation was served")
            try service.topUp("spender", amount: 100, actor: "operator")
            var reply: (error: UInt32, handle: UInt64)?
            for _ in 0..<5 where reply == nil { reply = client.receiveSimpleReply() }
            #expect(reply?.handle == 3 && reply?.error == 0, "served after the top-up")
        }

        @Test(.enabled(if: Tool.fioHasNBDEngine))
        func everyRequestFioMakesIsChargedToItsDomain() async throws {
            let state = MemoryStateStorage()
            let service = try TenancyService(
                configuration: .init(resolver: DomainResolver.hypervisor(bindings: ["a": "alice", "b": "bob"]),
                                     credits: CreditBook(defaultAccount: .init(balance: 1e9))),
                stateStorage: state)
            let devices: [any BlockDevice] = [MemoryBlockDevice(name: "a", size: 16 << 20),
                                              MemoryBlockDevice(name: "b", size: 16 << 20)]
            let fixture = try await TenancyServer(devices: devices, tenancy: .init(service: service))
            defer { Task { await fixture.stop() } }
            async let writer = runTool("fio", [
                "--name=w", "--ioengine=nbd", "--uri=\(fixture.uri("a"))", "--rw=randwrite", "--bs=4k", "--size=8M",
                "--iodepth=16", "--number_ios=1500", "--randrepeat=1", "--output-format=json"])
            async let reader = runTool("fio", [
                "--name=r", "--ioengine=nbd", "--uri=\(fixture.uri("b"))", "--rw=randread", "--bs=64k", "--size=8M",
                "--iodepth=4", "--number_ios=300", "--randrepeat=1", "--output-format=json"])
            let (w, r) = try await (writer, reader)
            #expect(w.status == 0 && r.status == 0, "\(w)\n\(r)")
            let writes = try FioResult(w.stdout), reads = try FioResult(r.stdout)
            let snapshot = service.snapshot()
            let alice = snapshot.ledger.usage(of: "alice"), bob = snapshot.ledger.usage(of: "bob")
            #expect(alice.operations[.write] == UInt64(writes.writeIOs))
            #expect(alice.bytesWritten == UInt64(writes.writeIOs) * 4096)
            #expect(alice.operations[.read, default: 0] == 0)
            #expect(bob.operations[.read] == UInt64(reads.readIOs))
            #expect(bob.bytesRead == UInt64(reads.readIOs) * 65536)
            #expect(alice.deviceTime > .zero && bob.deviceTime > .zero)
            // Charges: the book's total is the sum of per-domain charges recorded in the ledger.
            let charged = snapshot.ledger.total.creditsCharged
            #expect(abs(snapshot.credits.totalCharged - charged) <= 1e-9 * charged)
            #expect(abs(snapshot.credits.account("alice").balance - (1e9 - alice.creditsCharged)) < 1e-3)
            // And persisted on stop.
            await fixture.server.stop()
            let reloaded = try TenancyService(configuration: .init(), stateStorage: state)
            #expect(reloaded.snapshot().ledger.usage(of: "alice") == alice)
        }
    }
}

/// The few fields of fio's JSON output the tests use.
struct FioResult {
    var readIOs = 0, writeIOs = 0
    var readLatencyPercentiles: [String: Double] = [:]   // "50.000000" -> microseconds
    var readIOPS = 0.0, writeIOPS = 0.0

    init(_ json: String) throws {
        // fio may print warnings before the JSON object.
        guard let start = json.firstIndex(of: "{") else { throw ToolError.missing("fio JSON") }
        let object = try JSONSerialization.jsonObject(with: Data(json[start...].utf8)) as? [String: Any]
        for job in object?["jobs"] as? [[String: Any]] ?? [] {
            let read = job["read"] as? [String: Any] ?? [:], write = job["write"] as? [String: Any] ?? [:]
            readIOs += read["total_ios"] as? Int ?? 0
            writeIOs += write["total_ios"] as? Int ?? 0
            readIOPS += read["iops"] as? Double ?? 0
            writeIOPS += write["iops"] as? Double ?? 0
            if let clat = read["clat_ns"] as? [String: Any], let percentiles = clat["percentile"] as? [String: Any] {
                for (key, value) in percentiles { readLatencyPercentiles[key] = ((value as? Double) ?? Double(value as? Int ?? 0)) / 1000 }
            }
        }
    }
}
