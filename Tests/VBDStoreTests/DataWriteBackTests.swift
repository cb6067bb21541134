import Foundation
import Synchronization
import Testing
import VBDCache
import VBDCore
import VBDSimulation
@testable import VBDStore

/// New chunks written one after another in the data file have their write-back started as they
/// are written (`Store.Options.dataWriteBackBytes`), so that a flush's or commit's sync finds
/// little of a streaming writer dirty; scattered writes are left to the syncs, which sort them.
@Suite struct DataWriteBackTests {
    /// Chunks in batches of 1-16, each batch where the last ended: every write is inside a run
    /// whose write-back started after it, except the last `writeBackBytes` or less, and the runs
    /// start about once per `writeBackBytes`. Batches at random places start nothing.
    @Test func aSequentialRunHasItsWriteBackStartedAndScatteredWritesDoNot() throws {
        let dir = TemporaryStoreDirectory()
        let directory = try PosixDirectory(path: dir.path, create: true)
        let step: UInt64 = 256 << 10
        for sequential in [true, false] {
            let recorder = SpanRecorder(try directory.openFile(sequential ? "sequential" : "scattered", create: true))
            defer { recorder.close() }
            let storage = DataFileChunkStorage(file: recorder, writeBackBytes: step)
            var g = SplitMix64(seed: 3)
            let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
            defer { bytes.deallocate() }
            bytes.initializeMemory(as: UInt8.self, repeating: 0x5a)
            var written: UInt64 = 0
            var sector: UInt64 = 8
            for batch in 0..<200 as Range<UInt64> {
                var chunks: [NewStoredChunk] = []
                // Scattered: each batch far from the last one's end.
                if !sequential { sector = (1 + g.next() % 100_000) * 64 }
                for k in 0..<(1 + g.next() % 16) {
                    let size = 100 + Int(g.next() % 3997)
                    let sectors = UInt64((size + Limits.sectorBytes - 1) / Limits.sectorBytes)
                    defer { sector += sectors }
                    written += sectors * UInt64(Limits.sectorBytes)
                    let place = StoredChunkPlace(number: batch * 16 + k, place: sector, group: SharingGroupID(0),
                                                 hash: ContentHash(high: batch, low: k), storedBytes: size,
                                                 isCompressed: false, rawBytes: size)
                    chunks.append(NewStoredChunk(place: place, stored: UnsafeRawBufferPointer(rebasing: bytes[0..<size])))
                }
                try storage.writeNew(&chunks)
            }
            if sequential {
                let uncovered = recorder.writes.filter { w in
                    !recorder.starts.contains { $0.after > w.index && $0.offset <= w.offset && w.offset + w.length <= $0.offset + $0.length }
                }
                #expect(uncovered.reduce(0) { $0 + $1.length } < step, "\(uncovered.count) writes never had their write-back started")
                #expect(recorder.starts.count >= Int(written / step) - 1 && recorder.starts.count <= Int(written / step) + 1,
                        "\(recorder.starts.count) write-backs started for \(written) bytes")
            } else {
                #expect(recorder.starts.isEmpty, "\(recorder.starts.count) write-backs started for scattered writes")
            }
        }
    }

    /// Through the store: writing 16 MiB in order into a new store (its chunks land one after
    /// another in the data file) starts the data file's write-back more than a dozen times at a
    /// 1 MiB step, and never with the step at 0; the blocks read back either way.
    @Test func aStoreStartsTheDataFilesWriteBackAsItWrites() throws {
        for step: UInt64 in [1 << 20, 0] {
            let dir = TemporaryStoreDirectory()
            let started = Mutex(0)
            let directory = HookedDirectory(try PosixDirectory(path: dir.path, create: true)) { file, operation in
                if file == "data" && operation == .writeBack { started.withLock { $0 += 1 } }
            }
            var options = Store.Options()
            options.dataWriteBackBytes = step
            let store = try Store(directory: directory, options: options, create: true)
            try store.createVolume(name: "v", size: 32 << 20)
            let v = try store.device(named: "v")
            func blocks(_ n: Int, _ g: inout SplitMix64) -> [UInt8] {
                var buf = [UInt8](repeating: 0, count: 64 * 4096)
                for k in stride(from: 0, to: buf.count, by: 8) { withUnsafeBytes(of: g.next()) { buf.replaceSubrange(k..<k + 8, with: $0) } }
                return buf
            }
            var g = SplitMix64(seed: 11)
            for n in stride(from: 0, to: 4096, by: 64) { try v.write(blocks(n, &g), at: UInt64(n) * 4096) }
            try v.flush()
            g = SplitMix64(seed: 11)
            for n in stride(from: 0, to: 4096, by: 64) { #expect(try v.read(64 * 4096, at: UInt64(n) * 4096) == blocks(n, &g)) }
            let count = started.withLock { $0 }
            if step == 0 { #expect(count == 0) } else { #expect(count >= 12, "\(count) write-backs started") }
            #expect(store.fsck().isClean)
            try store.close()
        }
    }
}

/// A data file that records its writes and the write-backs started, in order.
private final class SpanRecorder: StorageFile {
    let file: any StorageFile
    private(set) var writes: [(index: Int, offset: UInt64, length: UInt64)] = []
    private(set) var starts: [(after: Int, offset: UInt64, length: UInt64)] = []
    init(_ file: any StorageFile) { self.file = file }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        try file.read(into: buffer, at: offset)
    }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try file.write(bytes, at: offset)
        writes.append((writes.count, offset, UInt64(bytes.count)))
    }
    func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError) {
        try file.write(gathering: parts, at: offset)
        writes.append((writes.count, offset, parts.reduce(0) { $0 + UInt64($1.count) }))
    }
    func sync() throws(StorageError) { try file.sync() }
    func size() throws(StorageError) -> UInt64 { try file.size() }
    func truncate(to size: UInt64) throws(StorageError) { try file.truncate(to: size) }
    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) { try file.punchHole(offset: offset, length: length) }
    func writeBack(offset: UInt64, length: UInt64, waiting: Bool) {
        starts.append((writes.count, offset, length))
        file.writeBack(offset: offset, length: length, waiting: waiting)
    }
    func close() { file.close() }
}
