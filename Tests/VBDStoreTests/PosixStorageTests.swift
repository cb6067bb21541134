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

extension PosixStorageTests {
    /// A punch longer than `punchSliceBytes`, starting and ending off the slice boundaries, zeroes
    /// exactly its range and gives its blocks back, as one `fallocate` would.
    @Test func aLongPunchInSlicesZeroesExactlyItsRange() throws {
        let dir = TemporaryStoreDirectory()
        let directory = try PosixDirectory(path: dir.path, create: true)
        let file = try directory.openFile("data", create: true)
        defer { file.close() }
        let slice = PosixFile.punchSliceBytes
        let total = Int(3 * slice)
        let bytes = [UInt8](repeating: 0xA5, count: total)
        try file.write(gathering: bytes.withUnsafeBytes { [$0] }, at: 0)
        try file.sync()
        let start = slice / 2 + 4096, length = slice * 2 - 3 * 4096
        var before = stat(); stat(dir.path + "/data", &before)
        try file.punchHole(offset: start, length: length)
        var after = stat(); stat(dir.path + "/data", &after)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: total, alignment: 4096)
        defer { buffer.deallocate() }
        try file.readExactly(into: buffer, at: 0)
        let zeroed = Int(start)..<Int(start + length)
        #expect(buffer.indices.allSatisfy { zeroed.contains($0) ? buffer[$0] == 0 : buffer[$0] == 0xA5 })
        #expect(try file.size() == UInt64(total))
        // st_blocks counts 512-byte units; the file system may keep a block or two of slack.
        #expect(Int64(before.st_blocks - after.st_blocks) * 512 >= Int64(length) - 2 * 4096)
    }
}
