import VBDCore

/// A volume (read-write) or snapshot (read-only) of a ``Store`` as a ``BlockDevice``.
/// Cheap to create; many may exist for one image (one per NBD connection).
public final class VolumeDevice: BlockDevice, @unchecked Sendable {
    public let store: Store
    public let imageID: UInt64
    public let name: String
    public let isReadOnly: Bool
    public let blockSize: Int
    private let createdSize: UInt64

    init(store: Store, info: ImageInfo) {
        self.store = store
        self.imageID = info.id
        self.name = info.name
        self.isReadOnly = info.isReadOnly
        self.blockSize = info.blockSize
        self.createdSize = info.size
    }

    public var deviceDescription: String {
        (try? store.info(name)).map { i in
            let kind = i.isReadOnly ? "snapshot (read-only)" : (i.origin.map { "share of \($0)" } ?? "volume")
            return "\(kind), \(i.size) bytes, \(i.blockSize)-byte blocks, group \(i.group)"
        } ?? "deleted"
    }

    /// The current size (a volume may have grown since this device was opened).
    public var size: UInt64 { (try? store.info(name))?.size ?? createdSize }

    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        try store.read(image: imageID, offset: offset, into: buffer)
    }

    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     sources: inout ReadSources) throws(BlockDeviceError) {
        try store.read(image: imageID, offset: offset, into: buffer, sources: &sources)
    }

    public func readIfCached(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                             zeroBlocksAllowed: Bool) -> ReadSources? {
        store.readIfCached(image: imageID, offset: offset, into: buffer, zeroBlocksAllowed: zeroBlocksAllowed)
    }

    public func readReportingZeroes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                                    sources: inout ReadSources) throws(BlockDeviceError) -> [Range<Int>]? {
        var zeroRanges: [Range<Int>] = []
        try store.read(image: imageID, offset: offset, into: buffer, sources: &sources, zeroRanges: &zeroRanges)
        return zeroRanges
    }

    public func readIfCachedReportingZeroes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
        -> (ReadSources, zeroRanges: [Range<Int>])? {
        var zeroRanges: [Range<Int>] = []
        guard let sources = store.readIfCached(image: imageID, offset: offset, into: buffer, zeroBlocksAllowed: true,
                                               zeroRanges: &zeroRanges) else { return nil }
        return (sources, zeroRanges)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        try store.write(image: imageID, offset: offset, data: data, fua: fua)
    }

    public func writeWithoutBlocking(offset: UInt64, data: UnsafeRawBufferPointer) throws(BlockDeviceError) -> Bool {
        try store.writeWithoutBlocking(image: imageID, offset: offset, data: data)
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError) {
        try store.zero(image: imageID, offset: offset, length: length, punch: true, fastOnly: false, fua: fua)
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {
        try store.zero(image: imageID, offset: offset, length: length, punch: mayTrim, fastOnly: fastOnly, fua: fua)
    }

    public func flush() throws(BlockDeviceError) {
        try store.flushForDevice()
    }

    public func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError) {
        try store.prefetch(image: imageID, offset: offset, length: length)
    }

    public func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] {
        try store.extents(image: imageID, offset: offset, length: length, maxExtents: maxExtents)
    }
}

extension Store: ExportProvider {
    public func exportList() -> [ExportSummary] {
        list().map { info in
            let kind = info.isReadOnly ? "snapshot (read-only)" : (info.origin.map { "share of \($0)" } ?? "volume")
            return ExportSummary(name: info.name, description: "\(kind), \(info.size) bytes")
        }
    }

    /// Opens `VOLUME` (read-write) or `VOLUME@SNAPSHOT` (read-only). The empty name opens the
    /// only volume when there is exactly one.
    public func openExport(named name: String) throws(BlockDeviceError) -> any BlockDevice {
        try device(named: name)
    }

    public func device(named name: String) throws(BlockDeviceError) -> VolumeDevice {
        let found: ImageInfo? = mutex.withLock {
            if name.isEmpty {
                let volumes = images.values.filter { $0.record.kind == .volume }
                return volumes.count == 1 ? infoLocked(volumes[0]) : nil
            }
            return imageLocked(named: name).map { infoLocked($0) }
        }
        guard let info = found else { throw .gone("no export named '\(name)'") }
        return VolumeDevice(store: self, info: info)
    }
}
