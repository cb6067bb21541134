import NBDProtocol
import NIOCore
import NIOEmbedded
import NIOPosix
import Testing
import VBDCore

@testable import NBDServer

/// Stands between the socket and the NBD handler and, once armed, makes the next flush fail the
/// way NIO's `flushNow` does when the peer has reset the connection: it first reads what the peer
/// sent before the reset and fires it up the pipeline (re-entrantly, inside the handler's write),
/// then fails the pending writes, reports the error and closes.
// @unchecked: touched only on the channel's event loop (the test reaches it through `submit`).
final class ResetDuringFlushHandler: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Bytes delivered inside the failing flush; the flush fails only while this is set.
    var bytesBeforeReset: ByteBuffer?
    private var swallowed: [EventLoopPromise<Void>?] = []
    private(set) var resetDelivered = false

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard bytesBeforeReset != nil else {
            context.write(data, promise: promise)
            return
        }
        swallowed.append(promise)
    }

    func flush(context: ChannelHandlerContext) {
        guard let bytes = bytesBeforeReset.take() else {
            context.flush()
            return
        }
        resetDelivered = true
        context.fireChannelRead(wrapInboundOut(bytes))
        let error = IOError(errnoCode: ECONNRESET, reason: "write(2)")
        for promise in swallowed { promise?.fail(error) }
        swallowed = []
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }
}

@Suite struct ReentrantResetTests {
    /// The interleaving behind the remote crash: a client sends GO and one more option and resets;
    /// writing the GO reply fails, NIO delivers the extra option from inside that write, before
    /// the handler has finished switching to transmission. The option must meet the transmission
    /// parser (and end the connection), never the finished handshake machine (which trapped).
    @Test(arguments: [NBDOptionCode.list, NBDOptionCode.go, NBDOptionCode.structuredReply, NBDOptionCode.abort])
    func anOptionDeliveredInsideTheFailingGoReplyEndsOnlyThatConnection(extraOption: UInt32) async throws {
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let environment = NBDConnectionHandler.Environment(
            exports: FixedExportProvider([MemoryBlockDevice(name: "vol", size: 1 << 20)]),
            limits: .init(), tlsPolicy: .disabled, sslContext: nil,
            readPool: pool, writePool: pool, observer: nil)
        let reset = ResetDuringFlushHandler()
        let channel = NIOAsyncTestingChannel()
        try await channel.pipeline.addHandler(reset)
        try await channel.pipeline.addHandler(NBDConnectionHandler(environment: environment, logger: .init(label: "test")))
        try await channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1))
        _ = try await channel.waitForOutboundWrite(as: ByteBuffer.self)  // the greeting

        var extra = ByteBuffer()
        if extraOption == NBDOptionCode.go {
            NBDClientEncoder.writeOption(NBDOptionCode.go, payload: Self.goPayload("vol"), into: &extra)
        } else {
            NBDClientEncoder.writeOption(extraOption, into: &extra)
        }
        try await channel.eventLoop.submit { reset.bytesBeforeReset = extra }.get()
        var input = ByteBuffer()
        NBDClientEncoder.writeClientFlags([.fixedNewstyle, .noZeroes], into: &input)
        NBDClientEncoder.writeOption(NBDOptionCode.go, payload: Self.goPayload("vol"), into: &input)
        try await channel.writeInbound(input)

        // The export lookup runs on the pool; its completion writes the GO reply, which fails.
        try await withTimeout(seconds: 10) { try await channel.closeFuture.get() }
        #expect(try await channel.eventLoop.submit { reset.resetDelivered }.get())
        #expect(!channel.isActive)
        try await pool.shutdownGracefully()
    }

    static func goPayload(_ name: String) -> [UInt8] {
        var payload = ByteBuffer()
        payload.writeInteger(UInt32(name.utf8.count))
        payload.writeString(name)
        payload.writeInteger(UInt16(0))
        return Array(payload.readableBytesView)
    }
}

/// Runs `body`, failing the test if it takes longer than `seconds` (a hang is a failure, not a
/// stuck suite).
func withTimeout(seconds: Int, _ body: @escaping @Sendable () async throws -> Void) async throws {
    try await withThrowingTaskGroup(of: Bool.self) { group in
        group.addTask { try await body(); return true }
        group.addTask { try await Task.sleep(for: .seconds(seconds)); return false }
        let finished = try await group.next()!
        group.cancelAll()
        #expect(finished, "did not finish within \(seconds) s")
    }
}
