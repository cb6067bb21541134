import Foundation
import Logging
import NBDServer
import Synchronization
import VBDAccounting
import VBDCore

/// A device with a fixed cost per request, to make device time visible and requests overlap:
/// every call holds one of `channels` device channels for `perRequest + bytes / bytesPerSecond`.
/// Models a device with internal parallelism (an SSD's channels), so contention is real.
final class TimedDevice: BlockDevice, @unchecked Sendable {
    // @unchecked: `inner` is Sendable-safe (its own lock); `channels` is a semaphore.
    let inner: MemoryBlockDevice
    let perRequest: Duration
    let bytesPerSecond: Double
    private let channels: DispatchSemaphore
    /// Device calls started so far, so a test can wait until a request is surely in flight.
    let started = Mutex(0)

    init(_ inner: MemoryBlockDevice, perRequest: Duration, bytesPerSecond: Double, channels: Int) {
        self.inner = inner
        self.perRequest = perRequest
        self.bytesPerSecond = bytesPerSecond
        self.channels = DispatchSemaphore(value: channels)
    }

    var name: String { inner.name }
    var deviceDescription: String { inner.deviceDescription }
    var size: UInt64 { inner.size }
    var blockSize: Int { inner.blockSize }
    var isReadOnly: Bool { inner.isReadOnly }

    private func occupy(bytes: Int) {
        started.withLock { $0 += 1 }
        channels.wait()
        defer { channels.signal() }
        let seconds = Double(perRequest.components.attoseconds) * 1e-18 + Double(perRequest.components.seconds)
            + Double(bytes) / bytesPerSecond
        // Sleep, never spin: a real device does not use host CPU while busy, and on a 2-core machine
        // spinning threads would preempt the clients and the event loops and swamp the latencies
        // being measured. nanosleep adds ~50 µs of slack per request, the same in every run.
        let deadline = ContinuousClock.now + .nanoseconds(Int64(seconds * 1e9))
        while case let remaining = deadline - ContinuousClock.now, remaining > .zero {
            var request = timespec(tv_sec: Int(remaining.components.seconds),
                                   tv_nsec: Int(remaining.components.attoseconds / 1_000_000_000))
            nanosleep(&request, nil)
        }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        occupy(bytes: buffer.count)
        try inner.read(offset: offset, into: buffer)
    }

    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        occupy(bytes: data.count)
        try inner.write(offset: offset, data: data, fua: fua)
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError) {
        occupy(bytes: 0)
        try inner.trim(offset: offset, length: length, fua: fua)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {
        occupy(bytes: 0)
        try inner.writeZeroes(offset: offset, length: length, mayTrim: mayTrim, fastOnly: fastOnly, fua: fua)
    }

    func flush() throws(BlockDeviceError) {
        occupy(bytes: 0)
        try inner.flush()
    }

    func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError) { try inner.prefetch(offset: offset, length: length) }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] {
        try inner.extents(offset: offset, length: length, maxExtents: maxExtents)
    }
}

/// Serves fixed devices by name (any BlockDevice, unlike MemoryExportProvider).
/// Records the write and flush calls that reach a device (to see how the server split them).
final class CallRecordingDevice: BlockDevice, @unchecked Sendable {
    // @unchecked: `inner` has its own lock; `calls` is a Mutex.
    struct Calls {
        var writes: [(offset: UInt64, length: Int, fua: Bool)] = []
        var flushes = 0
    }

    let inner: MemoryBlockDevice
    let calls = Mutex(Calls())

    init(_ inner: MemoryBlockDevice) { self.inner = inner }

    var name: String { inner.name }
    var deviceDescription: String { inner.deviceDescription }
    var size: UInt64 { inner.size }
    var blockSize: Int { inner.blockSize }
    var isReadOnly: Bool { inner.isReadOnly }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        try inner.read(offset: offset, into: buffer)
    }

    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        calls.withLock { $0.writes.append((offset, data.count, fua)) }
        try inner.write(offset: offset, data: data, fua: fua)
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError) {
        try inner.trim(offset: offset, length: length, fua: fua)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {
        try inner.writeZeroes(offset: offset, length: length, mayTrim: mayTrim, fastOnly: fastOnly, fua: fua)
    }

    func flush() throws(BlockDeviceError) {
        calls.withLock { $0.flushes += 1 }
        try inner.flush()
    }

    func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError) { try inner.prefetch(offset: offset, length: length) }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] {
        try inner.extents(offset: offset, length: length, maxExtents: maxExtents)
    }
}

final class FixedExportProvider: ExportProvider, Sendable {
    private let devices: [String: any BlockDevice]

    init(_ devices: [any BlockDevice]) {
        self.devices = Dictionary(uniqueKeysWithValues: devices.map { ($0.name, $0) })
    }

    func exportList() -> [ExportSummary] {
        devices.values.map { ExportSummary(name: $0.name, description: $0.deviceDescription) }.sorted { $0.name < $1.name }
    }

    func openExport(named name: String) throws(BlockDeviceError) -> any BlockDevice {
        guard let device = devices[name] else { throw .invalid("no export \(name)") }
        return device
    }
}

/// A server on a unix socket with a tenancy configuration.
final class TenancyServer: @unchecked Sendable {
    // @unchecked: set once in init, read afterwards.
    let directory: URL
    let socketPath: String
    let server: NBDServer
    let service: TenancyService?

    convenience init(devices: [any BlockDevice], tenancy: NBDServer.Tenancy?, tls: NBDServer.TLSMode = .off,
                     ioThreadsPerPool: Int = 4) async throws {
        try await self.init(exports: FixedExportProvider(devices), tenancy: tenancy, tls: tls,
                            ioThreadsPerPool: ioThreadsPerPool)
    }

    /// Serves `exports` (a `Store`, or fixed devices).
    init(exports: any ExportProvider, tenancy: NBDServer.Tenancy?, tls: NBDServer.TLSMode = .off,
         ioThreadsPerPool: Int = 4) async throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-acct-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        socketPath = directory.appendingPathComponent("nbd.sock").path
        var logger = Logger(label: "vbd.nbd.tenancy-test")
        logger.logLevel = ProcessInfo.processInfo.environment["VBD_NBD_TEST_LOG"] == nil ? .warning : .trace
        service = tenancy?.service
        server = NBDServer(configuration: .init(
            exports: exports, unixSocketPath: socketPath, tls: tls, logger: logger,
            ioThreadsPerPool: ioThreadsPerPool, eventLoopThreads: 2, tenancy: tenancy))
        try await server.start()
    }

    func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(socketPath)" }

    func stop() async {
        await server.stop()
        try? FileManager.default.removeItem(at: directory)
    }
}

extension DomainResolver {
    /// Bindings with the test runner as the hypervisor: its uid is trusted (``PeerDomain/boundDomain``)
    /// to act for the domain each export is bound to, so one process can play several tenants over
    /// the unix socket. Without that entry its connections would prove no identity.
    static func hypervisor(bindings: [String: ExportBinding]) -> DomainResolver {
        DomainResolver(bindings: bindings, unixPeerDomains: [.uid(getuid()): .boundDomain])
    }
}
