import VBDCore

/// What `fsck` found. Clean when `problems` is empty.
public struct FsckReport: Sendable {
    public var images = 0
    public var mapNodes = 0
    public var mappedBlocks: UInt64 = 0
    public var chunks = 0
    public var chunkBytesVerified: UInt64 = 0
    public var problems: [String] = []
    public var isClean: Bool { problems.isEmpty }
}

extension Store {
    /// Recounts every reference, walks every map, rehashes every stored block and checks the
    /// space map. Holds the store lock throughout: a consistent view, at the price of stalling I/O.
    /// `progress` is called with (done, total) chunks while rehashing.
    public func fsck(verifyData: Bool = true, progress: ((Int, Int) -> Void)? = nil) -> FsckReport {
        mutex.lock()
        defer { mutex.unlock() }
        var report = FsckReport()
        func problem(_ s: String) { if report.problems.count < 1000 { report.problems.append(s) } }

        // 1. Maps: count references to nodes and chunks.
        var nodeRefs: [ObjectIdentifier: (MapNode, UInt32)] = [:]
        var chunkRefs: [UInt64: UInt32] = [:]
        func visit(_ node: MapNode, level: Int, image: String) {
            let id = ObjectIdentifier(node)
            if let (n, k) = nodeRefs[id] { nodeRefs[id] = (n, k == .max ? k : k + 1); return }
            nodeRefs[id] = (node, 1)
            var populated = 0
            if level == 1 {
                if !node.isLeaf { problem("\(image): interior node at leaf level") ; return }
                for c in node.entries where c != 0 {
                    populated += 1
                    report.mappedBlocks += 1
                    if c >= zeroAllocatedChunk { if c != zeroAllocatedChunk { problem("\(image): bad special chunk \(c)") }; continue }
                    if !chunks.contains(c) { problem("\(image): maps a block to missing chunk \(c)"); continue }
                    chunkRefs[c, default: 0].addSaturating(1)
                }
            } else {
                if node.isLeaf { problem("\(image): leaf at level \(level)"); return }
                for case let child? in node.children {
                    populated += 1
                    visit(child, level: level - 1, image: image)
                }
            }
            if populated != node.populated { problem("\(image): node says \(node.populated) slots used, has \(populated)") }
            if populated == 0 { problem("\(image): empty node kept in the tree") }
        }
        for image in images.values.sorted(by: { $0.record.id < $1.record.id }) {
            report.images += 1
            let name = fullNameLocked(image.record)
            if image.root.levels != MapRoot.levels(forBlocks: image.record.blockCount) &&
                image.root.levels < MapRoot.levels(forBlocks: image.record.blockCount) {
                problem("\(name): tree of \(image.root.levels) levels is too short for \(image.record.blockCount) blocks")
            }
            if let n = image.root.node { visit(n, level: image.root.levels, image: name) }
            if image.record.kind == .snapshot && images[image.record.volumeID] == nil {
                problem("\(name): snapshot of a volume that no longer exists")
            }
        }
        report.mapNodes = nodeRefs.count
        for (_, (node, count)) in nodeRefs where node.refcount != count {
            problem("map node has refcount \(node.refcount) but \(count) references")
        }
        // 2. Chunks: refcounts, index membership, space.
        var indexMembers = Set<UInt64>()
        index.forEach { indexMembers.insert(UInt64($0)) }
        var sectors = SpaceAllocator()
        var live: [UInt64] = []
        if chunks.end > 1 {
            for n in 1..<chunks.end where chunks.contains(n) {
                live.append(n)
                let e = chunks[n]
                // References of writes between dedup and mapping are real: the map gets them next.
                var counted = chunkRefs[n] ?? 0
                counted.addSaturating(writeReferences[n] ?? 0)
                if e.refcount != counted { problem("chunk \(n): refcount \(e.refcount) but \(counted) references") }
                if !indexMembers.contains(n) { problem("chunk \(n): missing from the dedup index") }
                if e.storedBytes == 0 || e.storedBytes > e.rawBytes + 64 { problem("chunk \(n): implausible stored length \(e.storedBytes)") }
                for s in e.sector..<(e.sector + UInt64(e.sectorCount)) where !sectors.isFreeSector(s) {
                    problem("chunk \(n): sector \(s) also used by another chunk")
                    break
                }
                sectors.markUsedUnchecked(e.sector, count: e.sectorCount)
                if !space.isUsedRange(e.sector, count: e.sectorCount) { problem("chunk \(n): its sectors are marked free") }
            }
        }
        for m in indexMembers where !chunks.contains(m) { problem("dedup index lists free chunk \(m)") }
        if index.count != live.count { problem("dedup index has \(index.count) members for \(live.count) chunks") }
        report.chunks = live.count
        // 3. Data: every chunk rehashed.
        if verifyData {
            let cache = options.cache
            for (k, n) in live.enumerated() {
                let e = chunks[n]
                let ok: String? = withUnsafeTemporaryAllocation(byteCount: e.rawBytes, alignment: 16) { tmp in
                    cache?.remove(cacheKey(n))   // read from disk, not from memory
                    do throws(LoadedChunkFailure) { try loadChunk(n, e, cacheKey: cacheKey(n), into: tmp, volume: 0, lockHeld: true) } catch { return error.detail }
                    return nil
                }
                if let ok { problem("chunk \(n) at byte \(e.sector * UInt64(Limits.sectorBytes)) of the data file: \(ok)") }
                report.chunkBytesVerified += UInt64(e.storedBytes)
                if k % 4096 == 0 { progress?(k, live.count) }
            }
            progress?(live.count, live.count)
        }
        return report
    }
}

extension SpaceAllocator {
    func isFreeSector(_ s: UInt64) -> Bool {
        let w = Int(s >> 6)
        return w >= bitmap.count || bitmap[w] & (1 << (s & 63)) == 0
    }

    func isUsedRange(_ sector: UInt64, count: Int) -> Bool {
        (sector..<sector + UInt64(count)).allSatisfy { !isFreeSector($0) }
    }

    mutating func markUsedUnchecked(_ sector: UInt64, count: Int) {
        for s in sector..<sector + UInt64(count) where isFreeSector(s) { markUsed(s, count: 1) }
    }
}

extension UInt32 {
    /// Counting references as the store does: saturating at `.max` (see `ChunkEntry.retainSaturating`).
    fileprivate mutating func addSaturating(_ n: UInt32) {
        let (sum, overflow) = addingReportingOverflow(n)
        self = overflow ? .max : sum
    }
}
