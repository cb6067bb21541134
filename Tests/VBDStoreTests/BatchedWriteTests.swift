import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore
import VBDCache

/// A write request's map changes are applied leaf by leaf (`MapRoot.update` of a batch), and the
/// chunk table's last writable leaf is reused within a pager generation (`PagedArray`). These
/// tests give one request everything a batch must get right at once and check the result by
/// reads, fsck (which recounts every chunk and page reference) and reopening.
@Suite struct BatchedWriteTests {
    static let blockBytes = 4096
    /// Blocks of the request: the last leaf of map slots 0..<512 and part of the next.
    static let requestBlocks = 600

    /// What block `k` of the big request holds; nil for a zero block.
    static func requestContent(_ k: Int) -> [UInt8]? {
        if (10..<20).contains(k) { return block(seed: 5000 + UInt64(k)) }   // over chunks `w` shares
        switch k % 7 {
        case 0: return nil                                  // unmaps
        case 1: return block(seed: UInt64(k))               // what the block already holds
        case 2: return block(seed: 9999)                    // one new content, many times in the request
        default: return block(seed: 2000 + UInt64(k))       // new
        }
    }

    /// Reads every volume and compares it with what it should hold; fsck must be clean.
    func check(_ store: Store, expected: [String: [[UInt8]?]], _ comment: Comment) throws {
        for (name, blocks) in expected {
            let v = try store.device(named: name)
            let all = try v.read(blocks.count * Self.blockBytes, at: 0)
            for (k, want) in blocks.enumerated() {
                let got = Array(all[k * Self.blockBytes..<(k + 1) * Self.blockBytes])
                #expect(got == (want ?? [UInt8](repeating: 0, count: Self.blockBytes)), "\(name) block \(k): \(comment)")
            }
        }
        let report = store.fsck()
        #expect(report.isClean, "\(comment): \(report.problems.prefix(5))")
    }

    func bytes(_ blocks: [[UInt8]?]) -> [UInt8] {
        blocks.flatMap { $0 ?? [UInt8](repeating: 0, count: Self.blockBytes) }
    }

    /// One request over many blocks of two leaves: unmaps, unchanged blocks, one content many
    /// times, new contents, and overwrites of chunks a snapshot and another volume hold too.
    /// Then a checkpoint and a second request over the same blocks (the chunk-table leaves it
    /// changes were written by the checkpoint). Checked live, after replaying the journal, and
    /// after a clean close.
    @Test(arguments: [false, true])
    func oneRequestAcrossLeavesOverSharedChunks(withCache: Bool) throws {
        let disk = SimulatedDisk(seed: 11)
        var options = Store.Options()
        options.secretForNewStore = 7
        options.spaceReserveBytes = 256 << 10
        if withCache { options.cache = BlockCache(configuration: .init(capacityBytes: 1 << 20, shardCount: 1)) }
        var store = try Store(directory: disk.directory(), options: options, create: true)
        let size = UInt64(1024 * Self.blockBytes)
        _ = try store.createVolume(name: "v", size: size)
        _ = try store.createVolume(name: "w", size: size)
        let v = try store.device(named: "v")
        var first: [[UInt8]?] = (0..<Self.requestBlocks).map { block(seed: UInt64($0)) }
        try v.write(bytes(first), at: 0)
        // `w` holds the chunks of v's blocks 10..<20 (deduplicated), and so does the snapshot.
        let shared = Array(first[10..<20])
        try store.device(named: "w").write(bytes(shared), at: 0)
        _ = try store.snapshot(volume: "v", name: "s")
        try store.checkpoint()

        let second = (0..<Self.requestBlocks).map(Self.requestContent)
        try v.write(bytes(second), at: 0)
        var expected: [String: [[UInt8]?]] = ["v": second, "v@s": first, "w": shared]
        try check(store, expected: expected, "after the first request")

        // A checkpoint, then a request over the same blocks: the chunk records it releases were
        // made clean by the checkpoint and must be changed (and written) again.
        try store.checkpoint()
        first = (0..<Self.requestBlocks).map { $0 % 5 == 0 ? nil : block(seed: 7000 + UInt64($0 % 50)) }
        try v.write(bytes(first), at: 0)
        expected["v"] = first
        try check(store, expected: expected, "after the second request")

        // The journal since the checkpoint replayed (the batch applied again by recovery).
        try v.flush()
        store.abandonWithoutFlush()
        store = try Store(directory: disk.directory(), options: options, create: false)
        try check(store, expected: expected, "after replaying the journal")
        try store.close()
        store = try Store(directory: disk.directory(), options: options, create: false)
        try check(store, expected: expected, "after a clean close")
        try store.close()
    }
}
