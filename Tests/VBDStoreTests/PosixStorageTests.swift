import Foundation
import Testing
import VBDCore
@testable import VBDStore

@Suite struct PosixStorageTests {
    /// A gathered write equals one write of the concatenation, also with more parts than one
    /// `pwritev` takes and with empty parts among them.
    @Test func gatheredWriteEqualsOneWriteOfTheConcatenation() throws {
        let dir = TemporaryStoreDirectory()
        let directory = try PosixDirectory(path: dir.path, create: true)
        let file = try directory.openFile("data", create: true)
        defer { file.close() }
        var rng = SplitMix64(seed: 9)
        let sizes = (0..<(PosixFile.gatherMax * 2 + 17)).map { _ in Int(rng.next() % 700) }
        var expected: [UInt8] = []
        var storage: [[UInt8]] = []
        for size in sizes {
            let part = (0..<size).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            storage.append(part)
            expected += part
        }
        let start: UInt64 = 4096 + 3
        let allocations = storage.map { part -> UnsafeMutableRawBufferPointer in
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: max(part.count, 1), alignment: 1)
            copy.copyBytes(from: part)
            return copy
        }
        defer { for allocation in allocations { allocation.deallocate() } }
        let parts = zip(allocations, storage).map { UnsafeRawBufferPointer(rebasing: $0[0..<$1.count]) }
        try file.write(gathering: parts, at: start)
        var read = [UInt8](repeating: 0, count: expected.count)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: expected.count, alignment: 1)
        defer { buffer.deallocate() }
        try file.readExactly(into: buffer, at: start)
        read = Array(buffer)
        #expect(read == expected)
        #expect(try file.size() == start + UInt64(expected.count))
    }
}
