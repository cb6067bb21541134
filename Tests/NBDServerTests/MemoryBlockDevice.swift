import Foundation
import Synchronization
import VBDCore

/// A plain in-memory ``BlockDevice``: the backing of the tenancy tests' delaying and recording
/// wrappers (``TimedDevice``, ``CallRecordingDevice``) and of the handler tests that run on an
/// embedded channel. Real clients are served the real store (``ServerFixture``); this device has
/// no durability, sharing or faults to imitate it with.
final class MemoryBlockDevice: BlockDevice, @unchecked Sendable {
    // @unchecked: all mutable state is inside `blocks`, a Mutex.
    let name: String
    let deviceDescription: String
    let size: UInt64
    let blockSize: Int
    let isReadOnly = false
    private let blocks = Mutex<[UInt64: [UInt8]]>([:])

    init(name: String, size: UInt64, blockSize: Int = 4096) {
        self.name = name
        self.deviceDescription = "in-memory test volume \(name)"
        self.size = size
        self.blockSize = blockSize
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64) throws(BlockDeviceError) {
        guard offset <= size, length <= size - offset else {
            throw .outOfRange(offset: offset, length: length, size: size)
        }
    }

    /// Calls `body` for each block piece of `[offset, offset+count)`: (block, offset within it, bytes, position in the request).
    private func pieces(_ offset: UInt64, _ count: Int, _ body: (UInt64, Int, Int, Int) -> Void) {
        let blockSize = UInt64(self.blockSize)
        var done = 0
        while done < count {
            let position = offset + UInt64(done)
            let within = Int(position % blockSize)
            let length = min(Int(blockSize) - within, count - done)
            body(position / blockSize, within, length, done)
            done += length
        }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        try checkRange(offset, UInt64(buffer.count))
        blocks.withLock { blocks in
            pieces(offset, buffer.count) { block, within, length, at in
                let target = UnsafeMutableRawBufferPointer(rebasing: buffer[at..<(at + length)])
                if let data = blocks[block] {
                    data.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[within..<(within + length)])) }
                } else {
                    target.initializeMemory(as: UInt8.self, repeating: 0)
                }
            }
        }
    }

    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        try checkRange(offset, UInt64(data.count))
        let blockSize = self.blockSize
        blocks.withLock { blocks in
            pieces(offset, data.count) { block, within, length, at in
                var bytes = blocks[block] ?? [UInt8](repeating: 0, count: blockSize)
                bytes.withUnsafeMutableBytes { target in
                    UnsafeMutableRawBufferPointer(rebasing: target[within..<(within + length)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[at..<(at + length)]))
                }
                blocks[block] = bytes
            }
        }
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError) {
        try writeZeroes(offset: offset, length: length, mayTrim: true, fastOnly: false, fua: fua)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {
        try checkRange(offset, length)
        let blockSize = self.blockSize
        blocks.withLock { blocks in
            pieces(offset, Int(length)) { block, within, count, _ in
                if count == blockSize {
                    blocks[block] = nil
                } else if var bytes = blocks[block] {
                    for index in within..<(within + count) { bytes[index] = 0 }
                    blocks[block] = bytes
                }
            }
        }
    }

    func flush() throws(BlockDeviceError) {}

    func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError) {
        try checkRange(offset, length)
    }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] {
        try checkRange(offset, length)
        var extents: [Extent] = []
        blocks.withLock { blocks in
            pieces(offset, Int(length)) { block, _, count, _ in
                let flags: ExtentFlags = blocks[block] == nil ? [.hole, .zero] : []
                if let last = extents.last, last.flags == flags {
                    extents[extents.count - 1].length += UInt64(count)
                } else if extents.count < maxExtents {
                    extents.append(Extent(length: UInt64(count), flags: flags))
                }
            }
        }
        return extents
    }
}

extension BlockDevice {
    /// Reads into a fresh array. (Closures with typed throws passed to `withUnsafe…Bytes` crash the
    /// 6.3 compiler in IRGen, so errors are carried out of the closure by hand.)
    func readArray(offset: UInt64, count: Int) throws(BlockDeviceError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var failure: BlockDeviceError?
        bytes.withUnsafeMutableBytes { buffer in
            do throws(BlockDeviceError) { try self.read(offset: offset, into: buffer) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }

    func writeArray(_ bytes: [UInt8], offset: UInt64, fua: Bool = false) throws(BlockDeviceError) {
        var failure: BlockDeviceError?
        bytes.withUnsafeBytes { buffer in
            do throws(BlockDeviceError) { try self.write(offset: offset, data: buffer, fua: fua) } catch { failure = error }
        }
        if let failure { throw failure }
    }
}
