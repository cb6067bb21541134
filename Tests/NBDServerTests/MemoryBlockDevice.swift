import Foundation
import Synchronization
import VBDCore

/// An in-memory, sparse ``BlockDevice`` for server tests.
///
/// - Unwritten blocks are holes (`.hole | .zero`); blocks zeroed with `mayTrim` become holes again;
///   blocks zeroed without it stay allocated and report `.zero`.
/// - Blocks can be marked shared (as if deduplicated with another volume): they report `.shared`
///   until overwritten, which un-shares them as copy-on-write would.
/// - Writes land in `blocks`; FLUSH and FUA copy them into `durableBlocks`, so tests can check what
///   a flush made durable, across connections.
/// - Faults: `corruptBlocks` fail reads with `.corrupted` (EIO); `isFull` fails writes into holes
///   with `.noSpace`; WRITE_ZEROES with `fastOnly` and without `mayTrim` is `.notSupported` because
///   allocated zero blocks must be written (the slow path).
final class MemoryBlockDevice: BlockDevice, @unchecked Sendable {
    // @unchecked: all mutable state is inside `state`, a Mutex.
    struct State {
        var blocks: [UInt64: [UInt8]] = [:]
        var durableBlocks: [UInt64: [UInt8]] = [:]
        var sharedBlocks: Set<UInt64> = []
        var corruptBlocks: Set<UInt64> = []
        var isFull = false
        var flushCount = 0
        var prefetchCount = 0
        var writeDelay: Duration = .zero
        var activeWrites = 0
        var maxActiveWrites = 0
    }

    let name: String
    let deviceDescription: String
    let size: UInt64
    let blockSize: Int
    let isReadOnly: Bool
    let state: Mutex<State>

    init(name: String, size: UInt64, blockSize: Int = 4096, isReadOnly: Bool = false,
         description: String? = nil, state: State = State()) {
        self.name = name
        self.deviceDescription = description ?? "test volume \(name)"
        self.size = size
        self.blockSize = blockSize
        self.isReadOnly = isReadOnly
        self.state = Mutex(state)
    }

    /// A read-only copy of the current contents, as a snapshot export `NAME@SNAP`.
    func snapshot(named snapshotName: String) -> MemoryBlockDevice {
        let copy = state.withLock { current -> State in
            var copy = State()
            copy.blocks = current.blocks
            copy.durableBlocks = current.blocks
            copy.sharedBlocks = Set(current.blocks.keys)
            return copy
        }
        state.withLock { $0.sharedBlocks.formUnion($0.blocks.keys) }
        return MemoryBlockDevice(name: "\(name)@\(snapshotName)", size: size, blockSize: blockSize, isReadOnly: true,
                                 description: "snapshot \(snapshotName) of \(name)", state: copy)
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64) throws(BlockDeviceError) {
        guard offset <= size, length <= size - offset else {
            throw .outOfRange(offset: offset, length: length, size: size)
        }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        try checkRange(offset, UInt64(buffer.count))
        let blockSize = UInt64(self.blockSize)
        try state.withLock { state throws(BlockDeviceError) in
            var position = offset
            var written = 0
            while written < buffer.count {
                let block = position / blockSize
                let within = Int(position % blockSize)
                let count = min(Int(blockSize) - within, buffer.count - written)
                if state.corruptBlocks.contains(block) {
                    throw .corrupted(volume: name, offset: block * blockSize, detail: "test-injected corruption")
                }
                let target = UnsafeMutableRawBufferPointer(rebasing: buffer[written..<(written + count)])
                if let data = state.blocks[block] {
                    data.withUnsafeBytes { target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[within..<(within + count)])) }
                } else {
                    target.initializeMemory(as: UInt8.self, repeating: 0)
                }
                written += count
                position += UInt64(count)
            }
        }
    }

    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        guard !isReadOnly else { throw .readOnly(name: name) }
        try checkRange(offset, UInt64(data.count))
        let delay = state.withLock { state in
            state.activeWrites += 1
            state.maxActiveWrites = max(state.maxActiveWrites, state.activeWrites)
            return state.writeDelay
        }
        defer { state.withLock { $0.activeWrites -= 1 } }
        if delay > .zero {
            // Simulates a slow disk; blocking the calling pool thread is the point.
            let until = ContinuousClock.now + delay
            while ContinuousClock.now < until { usleepShort() }
        }
        let blockSize = UInt64(self.blockSize)
        try state.withLock { state throws(BlockDeviceError) in
            var position = offset
            var consumed = 0
            while consumed < data.count {
                let block = position / blockSize
                let within = Int(position % blockSize)
                let count = min(Int(blockSize) - within, data.count - consumed)
                if state.blocks[block] == nil && state.isFull { throw .noSpace }
                var bytes = state.blocks[block] ?? [UInt8](repeating: 0, count: Int(blockSize))
                bytes.withUnsafeMutableBytes { target in
                    UnsafeMutableRawBufferPointer(rebasing: target[within..<(within + count)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[consumed..<(consumed + count)]))
                }
                state.blocks[block] = bytes
                state.sharedBlocks.remove(block)
                if fua { state.durableBlocks[block] = bytes }
                consumed += count
                position += UInt64(count)
            }
        }
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError) {
        try writeZeroes(offset: offset, length: length, mayTrim: true, fastOnly: false, fua: fua)
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {
        guard !isReadOnly else { throw .readOnly(name: name) }
        try checkRange(offset, length)
        if fastOnly && !mayTrim { throw .notSupported("zeroing without trimming writes every block") }
        let blockSize = UInt64(self.blockSize)
        state.withLock { state in
            var position = offset
            let end = offset + length
            while position < end {
                let block = position / blockSize
                let within = position % blockSize
                let count = min(blockSize - within, end - position)
                if count == blockSize && mayTrim {
                    state.blocks[block] = nil
                } else if count == blockSize {
                    state.blocks[block] = [UInt8](repeating: 0, count: Int(blockSize))
                } else if var bytes = state.blocks[block] {
                    for index in Int(within)..<Int(within + count) { bytes[index] = 0 }
                    state.blocks[block] = bytes
                }
                state.sharedBlocks.remove(block)
                if fua { state.durableBlocks[block] = state.blocks[block] }
                position += count
            }
        }
    }

    func flush() throws(BlockDeviceError) {
        state.withLock { state in
            state.durableBlocks = state.blocks
            state.flushCount += 1
        }
    }

    func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError) {
        try checkRange(offset, length)
        state.withLock { $0.prefetchCount += 1 }
    }

    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] {
        try checkRange(offset, length)
        let blockSize = UInt64(self.blockSize)
        return state.withLock { state in
            var extents: [Extent] = []
            var position = offset
            let end = offset + length
            while position < end {
                let block = position / blockSize
                let count = min(blockSize - position % blockSize, end - position)
                var flags: ExtentFlags
                if let bytes = state.blocks[block] {
                    flags = bytes.allSatisfy { $0 == 0 } ? [.zero] : []
                } else {
                    flags = [.hole, .zero]
                }
                if state.sharedBlocks.contains(block) { flags.insert(.shared) }
                if let last = extents.last, last.flags == flags {
                    extents[extents.count - 1].length += count
                } else {
                    if extents.count == maxExtents { break }
                    extents.append(Extent(length: count, flags: flags))
                }
                position += count
            }
            return extents
        }
    }

    /// Contents a crash would keep: the blocks the last FLUSH or FUA made durable.
    func durableBytes(offset: UInt64, count: Int) -> [UInt8] {
        let blockSize = UInt64(self.blockSize)
        return state.withLock { state in
            (0..<count).map { index in
                let position = offset + UInt64(index)
                return state.durableBlocks[position / blockSize]?[Int(position % blockSize)] ?? 0
            }
        }
    }
}

private func usleepShort() {
    var request = timespec(tv_sec: 0, tv_nsec: 1_000_000)
    nanosleep(&request, nil)
}

/// Serves a fixed set of ``MemoryBlockDevice``s by name.
final class MemoryExportProvider: ExportProvider, @unchecked Sendable {
    // @unchecked: `devices` is only read after setup, under the lock.
    private let devices: Mutex<[String: MemoryBlockDevice]>

    init(_ devices: [MemoryBlockDevice]) {
        self.devices = Mutex(Dictionary(uniqueKeysWithValues: devices.map { ($0.name, $0) }))
    }

    func add(_ device: MemoryBlockDevice) {
        devices.withLock { $0[device.name] = device }
    }

    func device(_ name: String) -> MemoryBlockDevice {
        devices.withLock { $0[name]! }
    }

    func exportList() -> [ExportSummary] {
        devices.withLock { $0.values.sorted { $0.name < $1.name }.map {
            ExportSummary(name: $0.name, description: $0.deviceDescription)
        } }
    }

    func openExport(named name: String) throws(BlockDeviceError) -> any BlockDevice {
        guard let device = devices.withLock({ $0[name] }) else { throw .gone("no export named \(name)") }
        return device
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

    func writeArray(_ bytes: [UInt8], offset: UInt64) throws(BlockDeviceError) {
        var failure: BlockDeviceError?
        bytes.withUnsafeBytes { buffer in
            do throws(BlockDeviceError) { try self.write(offset: offset, data: buffer, fua: false) } catch { failure = error }
        }
        if let failure { throw failure }
    }
}
