import Foundation
import NBDProtocol
import NBDServer
import NIOCore
import Testing

/// Returns once the server has `count` connections open: checked at once and again each time
/// the server logs a connection as closed (it logs after forgetting it), never by polling.
func waitForConnections(_ fixture: ServerFixture, toReach count: Int) async -> Bool {
    await awaitEvent("\(count) connections left") {
        await fixture.events.waitForLine(containing: "connection closed", until: { fixture.server.connectionCount == count })
    }
    return fixture.server.connectionCount == count
}

/// A well-behaved client through the raw socket: proves the server still serves after an attack.
func assertServerStillServes(_ fixture: ServerFixture) throws {
    let client = try RawClient(socketPath: fixture.socketPath)
    let export = try #require(client.enterTransmission(export: "vol"))
    #expect(export.size == ServerFixture.volumeSize)
    client.sendRequest(NBDCommand.read.rawValue, handle: 99, offset: 0, length: 4096)
    let reply = try #require(client.receiveSimpleReply())
    #expect(reply.error == 0 && reply.handle == 99)
    #expect(client.receive(4096) == [UInt8](repeating: 0xA5, count: 4096))
    client.sendRequest(NBDCommand.disconnect.rawValue, handle: 100, offset: 0, length: 0)
    #expect(client.waitForClose())
}

extension RealServerTests {
    @Suite("hostile and vanishing clients", .serialized)
    struct HostileClientTests {
        @Test func garbageInsteadOfAnOptionClosesOnlyThatConnection() async throws {
            try await withServer { fixture in
                let bystander = try RawClient(socketPath: fixture.socketPath)
                #expect(bystander.enterTransmission(export: "vol") != nil)

                let hostile = try RawClient(socketPath: fixture.socketPath)
                hostile.greet()
                hostile.send(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
                #expect(hostile.waitForClose())

                let http = try RawClient(socketPath: fixture.socketPath)
                #expect(http.receive(NBDWireSize.greeting) != nil)
                http.send([0xFF, 0xFF, 0xFF, 0xFF])  // unknown client flags
                #expect(http.waitForClose())

                // The bystander's connection is untouched.
                bystander.sendRequest(NBDCommand.read.rawValue, handle: 1, offset: 0, length: 512)
                #expect(bystander.receiveSimpleReply()?.error == 0)
                #expect(bystander.receive(512) == [UInt8](repeating: 0xA5, count: 512))
                try assertServerStillServes(fixture)
            }
        }

        @Test func garbageRequestMagicClosesTheConnection() async throws {
            try await withServer { fixture in
                let hostile = try RawClient(socketPath: fixture.socketPath)
                #expect(hostile.enterTransmission(export: "vol") != nil)
                hostile.send([UInt8](repeating: 0x41, count: 28))
                #expect(hostile.waitForClose())
                try assertServerStillServes(fixture)
            }
        }

        @Test func truncatedHeadersAndVanishingClientsLeaveNoConnectionBehind() async throws {
            try await withServer { fixture in
                for cut in [3, 10, 17] {
                    let client = try RawClient(socketPath: fixture.socketPath)
                    client.greet()
                    var option = ByteBuffer()
                    NBDClientEncoder.writeOption(NBDOptionCode.go, payload: NBDClientEncoder.exportQueryPayload(name: "vol"),
                                                 into: &option)
                    client.send(Array(option.readableBytesView.prefix(cut)))
                    client.shutdownBoth()
                }
                // A client that vanishes with a half-sent WRITE and with many reads whose replies it never reads.
                do {
                    let client = try RawClient(socketPath: fixture.socketPath)
                    #expect(client.enterTransmission(export: "vol") != nil)
                    client.sendRequest(NBDCommand.write.rawValue, handle: 1, offset: 0, length: 65536,
                                       payload: [UInt8](repeating: 1, count: 1000))
                    client.shutdownBoth()
                }
                do {
                    let client = try RawClient(socketPath: fixture.socketPath)
                    #expect(client.enterTransmission(export: "vol") != nil)
                    for handle in 0..<64 {
                        client.sendRequest(NBDCommand.read.rawValue, handle: UInt64(handle), offset: 0, length: 1 << 20)
                    }
                    client.shutdownBoth()
                }
                #expect(await waitForConnections(fixture, toReach: 0))
                // The half-sent write was never applied.
                let first = try fixture.read("vol", offset: 0, count: 4)
                #expect(first == [0xA5, 0xA5, 0xA5, 0xA5])
                try assertServerStillServes(fixture)
            }
        }

        // The three memory bounds below are measured on `vbdtool serve` in a process of its own.

        @Test func aFourGiBOptionIsRefusedWithoutBuffering() async throws {
            try await withServeProcess { served in
                let before = try served.residentBytes()
                let hostile = try RawClient(socketPath: served.socketPath)
                hostile.greet()
                hostile.sendOption(NBDOptionCode.go, announcedLength: UInt32.max)
                hostile.send([UInt8](repeating: 0, count: 1 << 20))
                #expect(hostile.waitForClose())
                let grown = try served.residentBytes() - before
                #expect(grown < 16 << 20, "server memory grew by \(grown >> 20) MiB")
                try served.assertStillServes()
            }
        }

        @Test func aFourGiBWriteThatStallsDoesNotGrowMemory() async throws {
            try await withServeProcess { served in
                let before = try served.residentBytes()
                let hostile = try RawClient(socketPath: served.socketPath)
                #expect(hostile.enterTransmission(export: "vol") != nil)
                hostile.sendRequest(NBDCommand.write.rawValue, handle: 7, offset: 0, length: UInt32.max)
                // Part of the payload, then stall. send() returns once the server has read all but
                // what the socket buffers hold, so the server has seen nearly 48 MiB by then.
                hostile.send([UInt8](repeating: 0xEE, count: 48 << 20))
                // The server skipped what it got instead of buffering towards 4 GiB.
                let grown = try served.residentBytes() - before
                #expect(grown < 24 << 20, "server memory grew by \(grown >> 20) MiB")
                // Nothing of the refused payload reached the volume; the stalled connection is still open.
                try served.assertStillServes()
                hostile.shutdownBoth()
            }
        }

        @Test func aClientThatNeverReadsItsRepliesCannotGrowServerMemory() async throws {
            try await withServeProcess { served in
                let before = try served.residentBytes()
                let client = try RawClient(socketPath: served.socketPath)
                #expect(client.enterTransmission(export: "vol") != nil)
                // 64 reads of 32 MiB: 2 GiB of replies if the server built them all. The client reads none.
                for handle in 0..<64 {
                    client.sendRequest(NBDCommand.read.rawValue, handle: UInt64(handle), offset: 0, length: 32 << 20)
                }
                // Another client's read is answered after every read the server took from the
                // flooding connection has run (same pool, queued before it).
                try served.assertStillServes()
                let grown = try served.residentBytes() - before
                // The in-flight byte budget (64 MiB per connection) plus slack for the allocator.
                #expect(grown < 128 << 20, "server memory grew by \(grown >> 20) MiB")
                client.shutdownBoth()
            }
        }

        @Test func anOversizedWriteIsSkippedAndTheConnectionContinues() async throws {
            var limits = NBDServer.ServerLimits()
            limits.requestBytesMax = 1 << 20
            limits.inFlightBytesMax = 2 << 20
            try await withServer(limits: limits) { fixture in
                let client = try RawClient(socketPath: fixture.socketPath)
                #expect(client.enterTransmission(export: "vol") != nil)
                client.sendRequest(NBDCommand.write.rawValue, handle: 1, offset: 0, length: 3 << 20,
                                   payload: [UInt8](repeating: 0xEE, count: 3 << 20))
                client.sendRequest(NBDCommand.read.rawValue, handle: 2, offset: 0, length: 16)
                client.sendRequest(0x77, handle: 3, offset: 0, length: 16)  // unknown command
                let first = try #require(client.receiveSimpleReply())
                #expect(first.handle == 1 && first.error == NBDError.invalid.rawValue)
                var replies: [UInt64: UInt32] = [:]
                for _ in 0..<2 {
                    let reply = try #require(client.receiveSimpleReply())
                    replies[reply.handle] = reply.error
                    if reply.handle == 2 { #expect(client.receive(16) == [UInt8](repeating: 0xA5, count: 16)) }
                }
                #expect(replies == [2: 0, 3: NBDError.invalid.rawValue])
            }
        }

        @Test func optionFloodIsCutOffAtTheLimit() async throws {
            try await withServer { fixture in
                let client = try RawClient(socketPath: fixture.socketPath)
                client.greet()
                var answered = 0
                for _ in 0..<40 {
                    client.sendOption(999)
                    guard let reply = client.receiveOptionReply() else { break }
                    #expect(reply.type == NBDOptionReplyType.errUnsupported)
                    answered += 1
                }
                #expect(answered == 32)
                #expect(client.waitForClose())
            }
        }

        @Test func aClientThatNeverFinishesTheHandshakeIsDisconnected() async throws {
            var limits = NBDServer.ServerLimits()
            limits.handshakeTimeout = .milliseconds(300)
            try await withServer(limits: limits) { fixture in
                // A client that completed its handshake is not subject to the timeout: it connected
                // before the idle one, so once the idle one is cut off, it is older than the timeout.
                let busy = try RawClient(socketPath: fixture.socketPath)
                #expect(busy.enterTransmission(export: "vol") != nil)
                let idle = try RawClient(socketPath: fixture.socketPath)
                idle.greet()
                #expect(idle.waitForClose())
                busy.sendRequest(NBDCommand.read.rawValue, handle: 1, offset: 0, length: 512)
                #expect(busy.receiveSimpleReply()?.error == 0)
                #expect(busy.receive(512) == [UInt8](repeating: 0xA5, count: 512))
            }
        }

        @Test func connectionsBeyondTheLimitAreRefused() async throws {
            var limits = NBDServer.ServerLimits()
            limits.connectionsMax = 2
            try await withServer(limits: limits) { fixture in
                let first = try RawClient(socketPath: fixture.socketPath)
                let second = try RawClient(socketPath: fixture.socketPath)
                #expect(first.greet() != nil && second.greet() != nil)
                let third = try RawClient(socketPath: fixture.socketPath)
                #expect(third.receive(NBDWireSize.greeting) == nil)
                first.shutdownBoth()
                #expect(await waitForConnections(fixture, toReach: 1))
                let fourth = try RawClient(socketPath: fixture.socketPath)
                #expect(fourth.greet() == NBDHandshakeStateMachine.handshakeFlags.rawValue)
            }
        }

        @Test(.enabled(if: Tool.exists("openssl")))
        func plainOptionsAreAnsweredTLSRequiredInRequiredMode() async throws {
            // The certificate is never used: plain clients are refused before any TLS happens.
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-tlsreq-\(UUID().uuidString.prefix(8))")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let cert = directory.appendingPathComponent("c.pem").path, key = directory.appendingPathComponent("k.pem").path
            let made = try await runTool("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                                                     "-subj", "/CN=localhost", "-keyout", key, "-out", cert])
            try #require(made.status == 0)
            try await withServer(tls: .required(certificatePath: cert, keyPath: key)) { fixture in
                let client = try RawClient(socketPath: fixture.socketPath)
                client.greet()
                client.sendOption(NBDOptionCode.list)
                #expect(client.receiveOptionReply()?.type == NBDOptionReplyType.errTLSRequired)
                client.sendOption(NBDOptionCode.go, payload: NBDClientEncoder.exportQueryPayload(name: "vol"))
                #expect(client.receiveOptionReply()?.type == NBDOptionReplyType.errTLSRequired)
                client.sendOption(NBDOptionCode.exportName, payload: Array("vol".utf8))
                #expect(client.waitForClose())
            }
        }
    }
}
