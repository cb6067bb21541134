import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Serves `GET /metrics` (Prometheus text format 0.0.4) over HTTP/1.1. Anything else is 404;
/// request bodies are not read (a scrape has none), so a client cannot make it buffer.
public final class MetricsHTTPServer: Sendable {
    let metrics: StoreMetrics
    let host: String
    let requestedPort: Int
    let group: MultiThreadedEventLoopGroup
    private let channel = Mutex<Channel?>(nil)

    public init(metrics: StoreMetrics, host: String, port: Int) {
        self.metrics = metrics
        self.host = host
        self.requestedPort = port
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    public var port: Int? { channel.withLock { $0?.localAddress?.port } }

    public func start() async throws {
        let metrics = self.metrics
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 16)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(metrics: metrics))
                }
            }
        let ch = try await bootstrap.bind(host: host, port: requestedPort).get()
        channel.withLock { $0 = ch }
    }

    public func stop() async {
        if let ch = channel.withLock({ $0 }) { try? await ch.close() }
        try? await group.shutdownGracefully()
    }
}

final class MetricsHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let metrics: StoreMetrics
    var head: HTTPRequestHead?

    init(metrics: StoreMetrics) { self.metrics = metrics }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            let ok = h.method == .GET && (h.uri == "/metrics" || h.uri.hasPrefix("/metrics?"))
            // Rendering walks the store; keep it off the event loop.
            let metrics = self.metrics
            let loop = context.eventLoop
            let ctx = NIOLoopBound(context, eventLoop: loop)
            let keepAlive = h.isKeepAlive
            let version = h.version
            Task.detached {
                let body = ok ? metrics.render() : "not found; try /metrics\n"
                loop.execute {
                    let context = ctx.value
                    var headers = HTTPHeaders()
                    headers.add(name: "Content-Type", value: ok ? "text/plain; version=0.0.4" : "text/plain")
                    headers.add(name: "Content-Length", value: String(body.utf8.count))
                    if !keepAlive { headers.add(name: "Connection", value: "close") }
                    let status: HTTPResponseStatus = ok ? .ok : .notFound
                    context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: version, status: status, headers: headers))), promise: nil)
                    var buffer = context.channel.allocator.buffer(capacity: body.utf8.count)
                    buffer.writeString(body)
                    context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(buffer))), promise: nil)
                    let done = context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)))
                    if !keepAlive { done.whenComplete { _ in ctx.value.close(promise: nil) } }
                }
            }
        }
    }
}
