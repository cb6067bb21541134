import Foundation
import Testing
import VBDCache
import VBDMetrics
import VBDStore

/// A minimal HTTP/1.0 GET over a real TCP socket (no HTTP client dependency).
func httpGet(port: Int, path: String) throws -> (status: Int, body: String) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw POSIXError(.EIO) }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard rc == 0 else { throw POSIXError(.ECONNREFUSED) }
    let request = "GET \(path) HTTP/1.0\r\nHost: localhost\r\n\r\n"
    _ = request.withCString { send(fd, $0, strlen($0), 0) }
    var data = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &buf, buf.count, 0)
        if n <= 0 { break }
        data += buf[0..<n]
    }
    let text = String(decoding: data, as: UTF8.self)
    let status = Int(text.split(separator: " ").dropFirst().first ?? "0") ?? 0
    let body = text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
    return (status, body)
}

func value(of series: String, in body: String) -> Double? {
    for line in body.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.split(separator: " ").last!)
    }
    return nil
}

@Suite struct MetricsTests {
    @Test func scrapeShowsStoreAndCacheFiguresAndFollowsReads() async throws {
        let path = NSTemporaryDirectory() + "vbd-metrics-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: path) }
        let cache = BlockCache(configuration: .init(capacityBytes: 8 << 20, lastChanceCapacityBytes: 2 << 20))
        var options = Store.Options()
        options.cache = cache
        let store = try Store.initialize(path: path, options: options)
        try store.createVolume(name: "vm", size: 1 << 20)
        let dev = try store.device(named: "vm")
        var data = [UInt8](repeating: 0, count: 16 * 4096)
        for i in 0..<data.count { data[i] = UInt8((i / 512) & 0xff) | 1 }
        try data.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try dev.write(offset: 0, data: b, fua: false) }
        let metrics = StoreMetrics(store: store, cache: cache, usageRefreshInterval: .zero)
        let server = MetricsHTTPServer(metrics: metrics, host: "127.0.0.1", port: 0)
        try await server.start()
        let port = try #require(server.port)
        let first = try httpGet(port: port, path: "/metrics")
        #expect(first.status == 200)
        #expect(value(of: "vbd_store_unique_chunks", in: first.body) == Double(store.uniqueChunkCount))
        #expect(value(of: "vbd_image_allocated_bytes{image=\"vm\"}", in: first.body) == Double(16 * 4096))
        let hitsBefore = value(of: "vbd_cache_hits_total{tier=\"main\"}", in: first.body) ?? 0
        var out = [UInt8](repeating: 0, count: 16 * 4096)
        try out.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in try dev.read(offset: 0, into: b) }
        let second = try httpGet(port: port, path: "/metrics")
        let hitsAfter = value(of: "vbd_cache_hits_total{tier=\"main\"}", in: second.body) ?? 0
        #expect(hitsAfter - hitsBefore == 16)
        #expect(second.body.contains("# TYPE vbd_cache_hits_total counter"))
        #expect(try httpGet(port: port, path: "/other").status == 404)
        // A deleted volume's series go away.
        try store.delete("vm")
        let third = try httpGet(port: port, path: "/metrics")
        #expect(!third.body.contains("image=\"vm\""))
        await server.stop()
        try store.close()
    }
}
