import Testing
import VBDCore
import VBDCache
import VBDSimulation
@testable import VBDStore

private func newPager(seed: UInt64, budget: Int = 1 << 30) throws -> (SimulatedDisk, any StorageFile, MetadataPager) {
    let disk = SimulatedDisk(seed: seed)
    let directory = disk.directory()
    let file = try directory.openFile("meta", create: true)
    try directory.syncDirectory()
    return (disk, file, MetadataPager.create(file: file, budgetBytes: budget, firstGeneration: 1))
}

private func commit(_ pager: MetadataPager, _ file: any StorageFile) throws -> CommitBatch {
    let batch = try pager.beginCommit()
    try MetadataPager.writeCommit(batch, to: file)
    try file.sync()
    pager.finishCommit(batch)
    return batch
}

private func entry(_ k: UInt64) -> ChunkEntry {
    ChunkEntry(hash: ContentHash(high: k &* 31, low: k), sector: k * 8, group: SharingGroupID(UInt16(k % 3)),
               storedBytes: 1000 + Int(k % 3000), compressed: k % 2 == 0, rawBytes: 4096)
}

@Suite struct PagedChunkTableTests {
    @Test func recordsNumbersAndGenerationsSurviveACommitAndAReopen() throws {
        let (_, file, pager) = try newPager(seed: 1)
        var table = PagedChunkTable()
        var live: [UInt64: ChunkEntry] = [:]
        for k in 1...500 as ClosedRange<UInt64> {
            let n = try table.allocateNumber(pager: pager)!
            #expect(n == k)
            try table.install(entry(k), at: n, pager: pager)
            live[n] = entry(k)
        }
        // Free every third; their numbers come back (last freed first) with a new generation.
        for k in stride(from: 3 as UInt64, through: 500, by: 3) {
            try table.releaseNumber(k, pager: pager)
            live[k] = nil
        }
        #expect(table.liveCount == UInt64(live.count))
        #expect(try table.record(3, pager: pager).generation == 1)
        let batch = try commit(pager, file)
        let reopened = MetadataPager(file: file, root: batch.root, committedGeneration: batch.generation, budgetBytes: 1 << 20)
        for n in 1...500 as ClosedRange<UInt64> {
            let r = try table.record(n, pager: reopened)
            if let e = live[n] {
                #expect(r.entry.hash == e.hash && r.entry.location == e.location && r.entry.shape == e.shape)
            } else {
                #expect(!r.entry.isInstalled)
                #expect(r.generation == 1)
            }
        }
        #expect(try table.allocateNumber(pager: reopened) == 498)
        #expect(try table.allocateNumber(pager: reopened) == 495)
    }

    @Test func numbersReplayInstalledOutOfStackOrderAreNeverHandedOutTwice() throws {
        let (_, _, pager) = try newPager(seed: 2)
        var table = PagedChunkTable()
        for k in 1...10 as ClosedRange<UInt64> { try table.install(entry(k), at: table.allocateNumber(pager: pager)!, pager: pager) }
        try table.releaseNumber(4, pager: pager)
        try table.releaseNumber(7, pager: pager)
        // Replay installs at 4 (below the top of the stack, 7) and past the end at 13.
        try table.install(entry(44), at: 4, pager: pager)
        try table.install(entry(130), at: 13, pager: pager)
        var handedOut: Set<UInt64> = []
        for _ in 0..<6 { handedOut.insert(try table.allocateNumber(pager: pager)!) }
        #expect(!handedOut.contains(4))
        #expect(!handedOut.contains(13))
        #expect(handedOut.isSuperset(of: [7, 11, 12]))
        #expect(throws: StoreError.self) { try table.install(entry(1), at: 4, pager: pager) }
    }

    @Test func theDedupIndexFindsEveryChunkAsItGrowsBySplitsAndShrinks() throws {
        let (_, file, pager) = try newPager(seed: 3, budget: 256 << 10)
        var index = PagedDedupIndex()
        var hashes: [UInt64: ContentHash] = [:]
        var g = SplitMix64(seed: 3)
        for n in 1...20_000 as ClosedRange<UInt64> {
            let h = ContentHash(high: g.next(), low: g.next())
            hashes[n] = h
            try index.insert(n, hash: h, pager: pager)
            if n % 1000 == 0 { pager.trim() }
        }
        #expect(index.count == 20_000)
        #expect(index.bucketCount >= 20_000 / UInt64(DedupBucketPage.capacity))
        for (n, h) in hashes {
            #expect(try index.firstMatch(h, pager: pager, hashOf: { hashes[$0]! }, { $0 == n }) == n)
        }
        let batch = try commit(pager, file)
        let reopened = MetadataPager(file: file, root: batch.root, committedGeneration: batch.generation, budgetBytes: 256 << 10)
        for n in stride(from: 1 as UInt64, through: 20_000, by: 2) {
            try index.remove(n, hash: hashes[n]!, pager: reopened)
            hashes[n] = nil
        }
        for n in 1...20_000 as ClosedRange<UInt64> {
            let h = ContentHash(high: n &* 0x51, low: n)
            let found = try index.firstMatch(hashes[n] ?? h, pager: reopened, hashOf: { hashes[$0] ?? .zero }, { _ in true })
            #expect(found == (hashes[n] == nil ? nil : n))
        }
        #expect(throws: StoreError.self) { try index.remove(1, hash: ContentHash(high: 1, low: 1), pager: reopened) }
    }

    @Test func manyChunksUnderOneHashChainOverflowPagesAndAreAllFound() throws {
        let (_, _, pager) = try newPager(seed: 4)
        var index = PagedDedupIndex()
        let colliding = ContentHash(high: 0, low: 42)
        for n in 1...700 as ClosedRange<UInt64> { try index.insert(n, hash: colliding, pager: pager) }
        var seen: [UInt64] = []
        _ = try index.firstMatch(colliding, pager: pager, hashOf: { _ in colliding }) { seen.append($0); return false }
        #expect(Set(seen) == Set(1...700))
        for n in 1...700 as ClosedRange<UInt64> where n % 2 == 0 { try index.remove(n, hash: colliding, pager: pager) }
        seen = []
        _ = try index.firstMatch(colliding, pager: pager, hashOf: { _ in colliding }) { seen.append($0); return false }
        #expect(Set(seen) == Set(stride(from: 1, through: 700, by: 2)))
    }
}

@Suite struct DedupBucketPageTests {
    /// The first index whose fingerprint is not below `fingerprint`, by a plain scan.
    private func linearLowerBound(_ entries: [DedupBucketPage.Entry], _ fingerprint: UInt64) -> Int {
        entries.firstIndex { $0.fingerprint >= fingerprint } ?? entries.count
    }

    /// Inserts and removes against a model in four fingerprint distributions (uniform, one value,
    /// a narrow cluster, the extremes), checking the order and every lookup after each step.
    @Test(arguments: ["uniform", "one value", "cluster", "extremes"])
    func lookupsAgreeWithAScanWhateverTheFingerprints(distribution: String) {
        var rng = SplitMix64(seed: 77)
        func fingerprint() -> UInt64 {
            switch distribution {
            case "one value": return 0x8000_0000_0000_0000
            case "cluster": return 0x1234_0000_0000_0000 &+ rng.next() % 64
            case "extremes": return [0, 1, UInt64.max, UInt64.max - 1][Int(rng.next() % 4)]
            default: return rng.next()
            }
        }
        let page = DedupBucketPage()
        var model: [DedupBucketPage.Entry] = []
        var nextChunk: UInt64 = 1
        for step in 0..<3000 {
            if !page.isFull && (model.isEmpty || rng.next() % 3 != 0) {
                let e = DedupBucketPage.Entry(fingerprint: fingerprint(), chunk: nextChunk)
                nextChunk += 1
                page.insert(e)
                model.append(e)
            } else {
                let victim = model.remove(at: Int(rng.next() % UInt64(model.count)))
                #expect(page.remove(victim), "step \(step)")
                #expect(!page.remove(victim), "removed twice at step \(step)")
            }
            #expect(zip(page.entries, page.entries.dropFirst()).allSatisfy { $0.fingerprint <= $1.fingerprint })
            #expect(Set(page.entries.map(\.chunk)) == Set(model.map(\.chunk)))
            for probe in [fingerprint(), rng.next(), 0, UInt64.max] + model.prefix(3).map(\.fingerprint) {
                #expect(page.lowerBound(probe) == linearLowerBound(page.entries, probe), "step \(step), fingerprint \(probe)")
            }
            if let e = model.last {
                #expect(page.firstChunk(withFingerprint: e.fingerprint) { $0 == e.chunk } == e.chunk)
            }
        }
    }

    /// A page written in insertion order (as stores before the sorted buckets wrote them) is
    /// sorted when read, and written back sorted.
    @Test func aPageInAnyOrderIsSortedWhenRead() throws {
        var rng = SplitMix64(seed: 5)
        let n = DedupBucketPage.capacity
        var payload = [UInt8](repeating: 0, count: MetadataPageFile.payloadBytes)
        var written: [DedupBucketPage.Entry] = []
        payload.withUnsafeMutableBytes { b in
            b.storeBytes(of: UInt16(n).littleEndian, toByteOffset: 0, as: UInt16.self)
            b.storeBytes(of: UInt64(99).littleEndian, toByteOffset: 8, as: UInt64.self)
            for k in 0..<n {
                let e = DedupBucketPage.Entry(fingerprint: rng.next(), chunk: UInt64(k + 1))
                written.append(e)
                b.storeBytes(of: e.fingerprint.littleEndian, toByteOffset: 16 + k * 16, as: UInt64.self)
                b.storeBytes(of: e.chunk.littleEndian, toByteOffset: 24 + k * 16, as: UInt64.self)
            }
        }
        let page = try payload.withUnsafeBytes { try DedupBucketPage(decoding: $0) }
        #expect(page.overflow == PageNumber(99))
        #expect(page.entries == written.sorted { $0.fingerprint < $1.fingerprint })
        for e in written { #expect(page.firstChunk(withFingerprint: e.fingerprint) { $0 == e.chunk } == e.chunk) }
        var again = [UInt8](repeating: 0, count: MetadataPageFile.payloadBytes)
        again.withUnsafeMutableBytes { page.encode(into: $0) }
        let reread = try again.withUnsafeBytes { try DedupBucketPage(decoding: $0) }
        #expect(reread.entries == page.entries)
    }
}
