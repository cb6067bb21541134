import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Chunk reference counts as a dictionary: what the store's chunk table would hold.
private final class CountingReferences: ChunkReferenceCounter {
    var counts: [UInt64: Int] = [:]
    func retainChunk(_ chunk: UInt64) {
        guard chunk != 0, chunk < zeroAllocatedChunk else { return }
        counts[chunk, default: 0] += 1
    }
    func releaseChunk(_ chunk: UInt64) {
        guard chunk < zeroAllocatedChunk else { return }
        let n = counts[chunk, default: 0]
        precondition(n > 0, "chunk \(chunk) released more often than retained")
        counts[chunk] = n == 1 ? nil : n - 1
    }
}

/// One image of the model: its tree and what every block should read.
private struct ModelImage {
    var root: MapRoot
    var blocks: UInt64
    var expected: [UInt64: UInt64] = [:]
}

/// Recounts page references and chunk references from the roots (MapTree invariants 1-3).
private func checkInvariants(_ images: [Int: ModelImage], pager: MetadataPager, refs: CountingReferences) throws {
    var pageHolders: [PageNumber: Int] = [:]
    var chunkHolders: [UInt64: Int] = [:]
    var visited: Set<PageNumber> = []
    var emptyNodes: [PageNumber] = []
    for image in images.values where image.root.page != .none {
        pageHolders[image.root.page, default: 0] += 1
        try image.root.forEachNode(pager: pager) { page, level, slots in
            guard visited.insert(page).inserted else { return false }
            if !slots.contains(where: { $0 != 0 }) { emptyNodes.append(page) }
            for s in slots where s != 0 {
                if level == 1 {
                    if s < zeroAllocatedChunk { chunkHolders[s, default: 0] += 1 }
                } else {
                    pageHolders[PageNumber(s), default: 0] += 1
                }
            }
            return true
        }
    }
    #expect(emptyNodes.isEmpty, "empty nodes are kept: \(emptyNodes)")
    for (page, n) in pageHolders {
        let counted = try pager.refcount(page)
        #expect(counted == UInt32(n), "\(page) counted \(counted), held \(n) times")
    }
    #expect(chunkHolders == refs.counts.mapValues { $0 })
}

@Suite struct PagedMapTreeTests {
    /// Random writes, trims, snapshots, shares, deletes and grows against a dictionary model, with
    /// commits, a small cache (pages are evicted and read back) and reopens from the committed root.
    @Test(arguments: [1, 2, 3, 4, 5, 6] as [UInt64])
    func randomOperationsMatchAModelAndKeepTheReferenceCountsExact(seed: UInt64) throws {
        let disk = SimulatedDisk(seed: seed)
        let directory = disk.directory()
        var file = try directory.openFile("meta", create: true)
        try directory.syncDirectory()
        let budget = 48 << 10
        var pager = MetadataPager.create(file: file, budgetBytes: budget, firstGeneration: 1)
        let refs = CountingReferences()
        var g = SplitMix64(seed: seed)
        func below(_ n: Int) -> Int { Int(g.next() % UInt64(n)) }
        var images: [Int: ModelImage] = [0: ModelImage(root: MapRoot(blocks: 5000), blocks: 5000)]
        var nextID = 1
        var committed: (root: PageTableRoot, generation: UInt64)?
        var committedImages = images

        for step in 0..<1500 {
            let ids = images.keys.sorted()
            switch below(100) {
            case 0..<30:   // a batch, as a write request's record applies it: several blocks in one
                           // leaf, some twice, some unmapped, some to the chunk they hold, runs across leaves
                guard let id = ids.randomElement(using: &g) else { break }
                var image = images[id]!
                var block = UInt64(below(Int(image.blocks)))
                var batch: [BlockMapping] = []
                for _ in 0..<(1 + below(40)) {
                    switch below(10) {
                    case 0: block = UInt64(below(Int(image.blocks)))
                    case 1: block = batch.randomElement(using: &g)?.block ?? block
                    default: block = min(block + 1, image.blocks - 1)
                    }
                    let chunk: UInt64 = switch below(10) {
                    case 0: 0
                    case 1: zeroAllocatedChunk
                    case 2: image.expected[block] ?? 0
                    default: UInt64(1 + below(300))
                    }
                    batch.append(BlockMapping(block: block, chunk: chunk))
                    image.expected[block] = chunk == 0 ? nil : chunk
                }
                for m in batch { refs.retainChunk(m.chunk) }   // the record retains all, then maps
                try image.root.update(batch, pager: pager, refs)
                images[id] = image
            case 30..<60:  // write one block (a cluster of blocks so leaves are shared and split)
                guard let id = ids.randomElement(using: &g) else { break }
                var image = images[id]!
                let block = UInt64(below(Int(image.blocks)))
                let chunk: UInt64 = below(10) == 0 ? 0 : (below(20) == 0 ? zeroAllocatedChunk : UInt64(1 + below(300)))
                refs.retainChunk(chunk)
                try image.root.update(block, to: chunk, pager: pager, refs)
                image.expected[block] = chunk == 0 ? nil : chunk
                images[id] = image
            case 60..<68:  // trim a range
                guard let id = ids.randomElement(using: &g) else { break }
                var image = images[id]!
                let start = UInt64(below(Int(image.blocks)))
                let count = UInt64(1 + below(below(4) == 0 ? 3000 : 40))
                try image.root.clear(start: start, count: count, pager: pager, refs)
                for b in image.expected.keys where b >= start && b < start + count { image.expected[b] = nil }
                images[id] = image
            case 68..<76:  // snapshot or share: O(1), one retain
                guard let id = ids.randomElement(using: &g), images.count < 12 else { break }
                var copy = images[id]!
                copy.root = try images[id]!.root.retained(pager: pager)
                images[nextID] = copy
                nextID += 1
            case 76..<80:  // delete
                guard images.count > 1, let id = ids.randomElement(using: &g) else { break }
                var image = images.removeValue(forKey: id)!
                try image.root.release(pager: pager, refs)
            case 80..<82:  // grow
                guard let id = ids.randomElement(using: &g), images[id]!.blocks < 1 << 40 else { break }
                var image = images[id]!
                image.blocks = image.blocks * 600
                try image.root.grow(toBlocks: image.blocks, pager: pager)
                images[id] = image
            case 82..<90:  // commit
                let batch = try pager.beginCommit()
                try MetadataPager.writeCommit(batch, to: file)
                try file.sync()
                pager.finishCommit(batch)
                committed = (batch.root, batch.generation)
                committedImages = images
            case 90..<92:  // reopen from the last commit: the model goes back with it
                guard let c = committed else { break }
                file = try directory.openFile("meta", create: false)
                pager = MetadataPager(file: file, root: c.root, committedGeneration: c.generation, budgetBytes: budget)
                images = committedImages
                // Chunk counts go back too: recount them from the committed trees.
                refs.counts = [:]
                var seen: Set<PageNumber> = []
                for image in images.values {
                    try image.root.forEachNode(pager: pager) { page, level, slots in
                        guard seen.insert(page).inserted else { return false }
                        if level == 1 { for s in slots where s != 0 { refs.retainChunk(s) } }
                        return true
                    }
                }
            default:       // reads, and diffs between two images
                guard let a = ids.randomElement(using: &g), let b = ids.randomElement(using: &g) else { break }
                let ia = images[a]!, ib = images[b]!
                for _ in 0..<20 {
                    let block = UInt64(below(Int(ia.blocks)))
                    #expect(try ia.root.lookup(block, pager: pager) == ia.expected[block] ?? 0, "seed \(seed) step \(step)")
                }
                let blocks = min(ia.blocks, ib.blocks)
                let ranges = try MapRoot.diff(ia.root, ib.root, blocks: blocks, pager: pager)
                var differing: Set<UInt64> = []
                for r in ranges { for x in r { differing.insert(x) } }
                var expectedDiff: Set<UInt64> = []
                for k in Set(ia.expected.keys).union(ib.expected.keys) where k < blocks && ia.expected[k] != ib.expected[k] {
                    expectedDiff.insert(k)
                }
                #expect(differing == expectedDiff, "seed \(seed) step \(step): diff")
            }
            pager.trim()
            if step % 250 == 249 { try checkInvariants(images, pager: pager, refs: refs) }
        }
        // Every written block, in every image.
        for image in images.values {
            for (block, chunk) in image.expected { #expect(try image.root.lookup(block, pager: pager) == chunk) }
        }
        try checkInvariants(images, pager: pager, refs: refs)
        // Deleting everything frees every map page and every chunk reference.
        for (id, var image) in images {
            try image.root.release(pager: pager, refs)
            images[id] = nil
        }
        #expect(refs.counts.isEmpty)
        for p in 2..<pager.root.pageCount {
            let e = try pager.entry(PageNumber(p))
            #expect(e.isFree || e.isStructural, "\(PageNumber(p)) still held (\(e.refcount))")
        }
    }

    @Test func aWriteToASnapshotsVolumeCopiesOnlyThePathAndASnapshotIsOnePageTableEntry() throws {
        let disk = SimulatedDisk(seed: 9)
        let directory = disk.directory()
        let file = try directory.openFile("meta", create: true)
        try directory.syncDirectory()
        let pager = MetadataPager.create(file: file, budgetBytes: 1 << 30, firstGeneration: 1)
        let refs = CountingReferences()
        // 3 levels: 512 * 512 * 4 blocks.
        var volume = MapRoot(blocks: 512 * 512 * 4)
        #expect(volume.levels == 3)
        for b in stride(from: 0 as UInt64, to: 512 * 512 * 4, by: 997) {
            refs.retainChunk(b + 1)
            try volume.update(b, to: b + 1, pager: pager, refs)
        }
        var batch = try pager.beginCommit()
        try MetadataPager.writeCommit(batch, to: file)
        pager.finishCommit(batch)
        // A snapshot changes one count: the commit writes the one page-table page that holds it.
        let snapshot = try volume.retained(pager: pager)
        batch = try pager.beginCommit()
        try MetadataPager.writeCommit(batch, to: file)
        pager.finishCommit(batch)
        #expect(batch.pages.allSatisfy { $0.kind == .pageTable || $0.kind == .pageDirectory })
        #expect(batch.pages.count <= 2)
        // One write through the shared tree copies the three nodes on its path.
        refs.retainChunk(99_999_999)
        try volume.update(5, to: 99_999_999, pager: pager, refs)
        batch = try pager.beginCommit()
        let mapPages = batch.pages.filter { $0.kind == .mapLeaf || $0.kind == .mapInterior }
        #expect(mapPages.count == 3)
        try MetadataPager.writeCommit(batch, to: file)
        pager.finishCommit(batch)
        #expect(try snapshot.lookup(5, pager: pager) == 0)
        #expect(try volume.lookup(5, pager: pager) == 99_999_999)
        #expect(try snapshot.lookup(997, pager: pager) == 998)
        #expect(try MapRoot.diff(snapshot, volume, blocks: 512 * 512 * 4, pager: pager) == [5..<6])
    }
}
