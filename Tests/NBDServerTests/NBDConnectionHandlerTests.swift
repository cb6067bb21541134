import NBDProtocol
import NIOCore
import NIOEmbedded
import NIOPosix
import Testing
import VBDCore

@testable import NBDServer

/// Handshake paths of the handler through an EmbeddedChannel: no socket, no thread pool needed
/// (these paths never reach the device).
@Suite struct NBDConnectionHandlerTests {
    func makeChannel(limits: NBDServer.ServerLimits = .init()) throws -> EmbeddedChannel {
        let provider = FixedExportProvider([MemoryBlockDevice(name: "vol", size: 1 << 20)])
        let environment = NBDConnectionHandler.Environment(
            exports: provider, limits: limits, tlsPolicy: .disabled, sslContext: nil,
            readPool: NIOThreadPool(numberOfThreads: 1), writePool: NIOThreadPool(numberOfThreads: 1), observer: nil)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(NBDConnectionHandler(environment: environment,
                                                                            logger: .init(label: "test")))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    func readAll(_ channel: EmbeddedChannel) throws -> [UInt8] {
        var bytes: [UInt8] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { bytes += buffer.readableBytesView }
        return bytes
    }

    @Test func greetingThenUnsupportedOptionGetsErrUnsupAndTheConnectionStays() throws {
        let channel = try makeChannel()
        #expect(try readAll(channel) == Array("NBDMAGICIHAVEOPT".utf8) + [0, 3])
        var input = ByteBuffer()
        NBDClientEncoder.writeClientFlags([.fixedNewstyle, .noZeroes], into: &input)
        NBDClientEncoder.writeOption(4242, payload: [1, 2, 3], into: &input)
        // Drip-feed the bytes one at a time.
        for byte in input.readableBytesView { try channel.writeInbound(ByteBuffer(bytes: [byte])) }
        var reply = ByteBuffer(bytes: try readAll(channel))
        #expect(reply.readInteger(as: UInt64.self) == NBDMagic.optionReply)
        #expect(reply.readInteger(as: UInt32.self) == 4242)
        #expect(reply.readInteger(as: UInt32.self) == NBDOptionReplyType.errUnsupported)
        #expect(channel.isActive)
        _ = try? channel.finish()
    }

    @Test func hugeOptionLengthClosesWithoutBuffering() throws {
        let channel = try makeChannel()
        _ = try readAll(channel)
        var input = ByteBuffer()
        NBDClientEncoder.writeClientFlags([.fixedNewstyle], into: &input)
        NBDClientEncoder.writeOption(NBDOptionCode.go, announcedLength: UInt32.max, into: &input)
        try channel.writeInbound(input)
        #expect(!channel.isActive)
    }

    @Test func abortIsAcknowledgedAndCloses() throws {
        let channel = try makeChannel()
        _ = try readAll(channel)
        var input = ByteBuffer()
        NBDClientEncoder.writeClientFlags([.fixedNewstyle], into: &input)
        NBDClientEncoder.writeOption(NBDOptionCode.abort, into: &input)
        try channel.writeInbound(input)
        var reply = ByteBuffer(bytes: try readAll(channel))
        reply.moveReaderIndex(forwardBy: 12)
        #expect(reply.readInteger(as: UInt32.self) == NBDOptionReplyType.ack)
        channel.embeddedEventLoop.run()
        #expect(!channel.isActive)
    }

    @Test func pipelinedOptionsAreAnsweredInTurnAndAStoppedPoolIsErrShutdown() throws {
        let channel = try makeChannel()
        _ = try readAll(channel)
        var input = ByteBuffer()
        NBDClientEncoder.writeClientFlags([.fixedNewstyle], into: &input)
        NBDClientEncoder.writeOption(NBDOptionCode.list, into: &input)
        NBDClientEncoder.writeOption(NBDOptionCode.structuredReply, into: &input)  // pipelined behind LIST
        try channel.writeInbound(input)
        // The I/O pool was never started, as after stop(): the lookup fails with ERR_SHUTDOWN, and
        // the pipelined option is handled only after it.
        var replies = ByteBuffer(bytes: try readAll(channel))
        var seen: [(UInt32, UInt32)] = []
        while replies.readableBytes >= 20 {
            replies.moveReaderIndex(forwardBy: 8)
            let option = replies.readInteger(as: UInt32.self)!, type = replies.readInteger(as: UInt32.self)!
            let length = replies.readInteger(as: UInt32.self)!
            replies.moveReaderIndex(forwardBy: Int(length))
            seen.append((option, type))
        }
        #expect(seen.map(\.0) == [NBDOptionCode.list, NBDOptionCode.structuredReply])
        #expect(seen.map(\.1) == [NBDOptionReplyType.errShutdown, NBDOptionReplyType.ack])
        #expect(channel.isActive)
        _ = try? channel.finish()
    }
}
