// MARK: - Notes on the design
//
// A volume's map (logical block -> stored chunk) is a fixed-fanout radix tree whose nodes are
// reference counted and copied on write, after Rodeh ("B-trees, shadowing, and clones", 2008) and
// Linux dm-thin. Why a radix tree and not a B-tree: block indexes are dense integers, so a radix
// tree needs no keys, no rebalancing and no splits, every lookup walks exactly `levels` nodes,
// and a 512-way fanout keeps a 1 TiB volume of 4 KiB blocks at 4 levels.
//
// Sharing. A snapshot or a share is a new root pointer to the same top node, whose reference
// count goes up by one: O(1) whatever the volume's size. Every image has its own root and the
// same depth, so a read 100 shares deep walks as many nodes as a read of the original: there is
// no backing chain.
//
// Invariants (fsck checks 1-3 by recounting):
//  1. A node's `refcount` equals the number of parent slots and image roots that point at it.
//  2. A chunk's reference count equals the number of slots, in distinct leaves, holding it:
//     a leaf shared by several trees holds its chunks once (lazy refcounting).
//  3. `populated` equals the number of non-empty slots; a node with none is never kept
//     (so an unwritten or fully trimmed range costs no memory).
//  4. A node is only modified when its refcount is 1. Writing through a shared node first
//     "shadows" it: a private copy whose children each gain one reference, while the shared
//     original loses one.
//
// Chunk number 0 means "no chunk": the block reads as zeroes.

/// Receives the chunk reference changes that tree operations cause.
protocol ChunkReferenceCounter: AnyObject {
    func retainChunk(_ chunk: UInt64)
    func releaseChunk(_ chunk: UInt64)
}

final class MapNode {
    static let fanoutShift = 9
    static let fanout = 1 << fanoutShift

    var refcount: UInt32 = 1
    /// Non-empty slots.
    var populated: Int = 0
    /// Leaf slots: chunk numbers (0 = zero block). Empty for interior nodes.
    var entries: ContiguousArray<UInt64>
    /// Interior slots. Empty for leaves.
    var children: ContiguousArray<MapNode?>

    var isLeaf: Bool { children.isEmpty }

    init(leaf: Bool) {
        if leaf {
            entries = ContiguousArray(repeating: 0, count: MapNode.fanout)
            children = []
        } else {
            entries = []
            children = ContiguousArray(repeating: nil, count: MapNode.fanout)
        }
    }

    private init(copying other: MapNode) {
        entries = other.entries
        children = other.children
        populated = other.populated
    }

    /// One more holder; saturates at `UInt32.max` (then never freed) instead of trapping, like
    /// `ChunkEntry.retainSaturating`.
    func retainSaturating() {
        if refcount < .max { refcount += 1 }
    }

    /// One holder fewer; true when it was the last. A saturated count never drops.
    @discardableResult
    func releaseSaturating() -> Bool {
        if refcount == .max { return false }
        refcount -= 1
        return refcount == 0
    }

    /// A private copy of a shared node; its children gain one reference each (invariant 4).
    func shadow(_ refs: ChunkReferenceCounter) -> MapNode {
        let copy = MapNode(copying: self)
        if isLeaf {
            for c in entries where c != 0 { refs.retainChunk(c) }
        } else {
            for case let child? in children { child.retainSaturating() }
        }
        releaseSaturating()
        return copy
    }
}

/// The root of one image's map.
struct MapRoot {
    var node: MapNode?
    /// Tree height; 1 means the root is a leaf.
    var levels: Int

    static func levels(forBlocks blocks: UInt64) -> Int {
        var levels = 1
        var covered = UInt64(MapNode.fanout)
        while covered < blocks {
            levels += 1
            covered = covered.multipliedReportingOverflow(by: UInt64(MapNode.fanout)).overflow ? .max : covered << MapNode.fanoutShift
        }
        return levels
    }

    init(blocks: UInt64) {
        node = nil
        levels = MapRoot.levels(forBlocks: blocks)
    }

    init(node: MapNode?, levels: Int) {
        self.node = node
        self.levels = levels
    }

    @inline(__always)
    static func slot(_ block: UInt64, level: Int) -> Int {
        Int((block >> UInt64(MapNode.fanoutShift * (level - 1))) & UInt64(MapNode.fanout - 1))
    }

    /// Blocks one child of a node at `level` covers.
    @inline(__always)
    static func span(level: Int) -> UInt64 { UInt64(1) << UInt64(MapNode.fanoutShift * (level - 1)) }

    // MARK: Reads

    func lookup(_ block: UInt64) -> UInt64 {
        var node = self.node
        var level = levels
        while let n = node {
            if level == 1 { return n.entries[MapRoot.slot(block, level: 1)] }
            node = n.children[MapRoot.slot(block, level: level)]
            level -= 1
        }
        return 0
    }

    /// The chunk at `block` and whether any node on its path is shared with another image.
    func lookupWithSharing(_ block: UInt64) -> (chunk: UInt64, sharedPath: Bool) {
        var node = self.node
        var level = levels
        var shared = false
        while let n = node {
            if n.refcount > 1 { shared = true }
            if level == 1 { return (n.entries[MapRoot.slot(block, level: 1)], shared) }
            node = n.children[MapRoot.slot(block, level: level)]
            level -= 1
        }
        return (0, shared)
    }

    // MARK: Sharing

    /// Another root pointing at the same tree: a snapshot or a share. O(1).
    func retained() -> MapRoot {
        node?.retainSaturating()
        return self
    }

    /// Drops this root's reference; nodes and chunks no one else holds are released.
    mutating func release(_ refs: ChunkReferenceCounter) {
        if let n = node { MapRoot.releaseNode(n, refs) }
        node = nil
    }

    static func releaseNode(_ n: MapNode, _ refs: ChunkReferenceCounter) {
        precondition(n.refcount > 0, "map node released more often than retained")
        guard n.releaseSaturating() else { return }
        if n.isLeaf {
            for c in n.entries where c != 0 { refs.releaseChunk(c) }
        } else {
            for case let child? in n.children { releaseNode(child, refs) }
        }
    }

    // MARK: Writes

    /// Maps `block` to `chunk`. The caller has already counted one reference to `chunk` for this
    /// slot; the chunk previously there loses one.
    mutating func update(_ block: UInt64, to chunk: UInt64, _ refs: ChunkReferenceCounter) {
        if chunk == 0 && node == nil { return }
        if node == nil { node = MapNode(leaf: levels == 1) }
        if node!.refcount > 1 { node = node!.shadow(refs) }
        let emptied = MapRoot.update(node!, level: levels, block: block, chunk: chunk, refs)
        if emptied { MapRoot.releaseNode(node!, refs); node = nil }
    }

    /// Returns true when `node` became empty (the caller drops it).
    private static func update(_ node: MapNode, level: Int, block: UInt64, chunk: UInt64,
                               _ refs: ChunkReferenceCounter) -> Bool {
        let i = slot(block, level: level)
        if level == 1 {
            let old = node.entries[i]
            if old == chunk {
                if chunk != 0 { refs.releaseChunk(chunk) }   // the caller's extra reference
                return false
            }
            node.entries[i] = chunk
            if old != 0 { refs.releaseChunk(old) } else { node.populated += 1 }
            if chunk == 0 { node.populated -= 1 }
            return node.populated == 0
        }
        var child = node.children[i]
        if child == nil {
            if chunk == 0 { return false }
            child = MapNode(leaf: level == 2)
            node.children[i] = child
            node.populated += 1
        } else if child!.refcount > 1 {
            child = child!.shadow(refs)
            node.children[i] = child
        }
        if update(child!, level: level - 1, block: block, chunk: chunk, refs) {
            releaseNode(child!, refs)
            node.children[i] = nil
            node.populated -= 1
        }
        return node.populated == 0
    }

    /// Unmaps `[start, start+count)`. Whole subtrees inside the range are dropped without visiting
    /// their leaves, so trimming a 1 TiB volume costs its populated top nodes, not its blocks.
    mutating func clear(start: UInt64, count: UInt64, _ refs: ChunkReferenceCounter) {
        guard count > 0, let root = node else { return }
        let end = start + count
        let capacity = MapRoot.span(level: levels + 1)
        if start == 0 && (levels >= 7 || end >= capacity) {
            release(refs)
            return
        }
        var n = root
        if n.refcount > 1 { n = n.shadow(refs); node = n }
        if MapRoot.clear(n, level: levels, base: 0, start: start, end: end, refs) {
            MapRoot.releaseNode(n, refs)
            node = nil
        }
    }

    private static func clear(_ node: MapNode, level: Int, base: UInt64, start: UInt64, end: UInt64,
                              _ refs: ChunkReferenceCounter) -> Bool {
        let span = span(level: level)
        let first = Int((max(start, base) - base) / span)
        let last = Int(min((min(end, base + span * UInt64(MapNode.fanout)) - base - 1) / span, UInt64(MapNode.fanout - 1)))
        if first > last { return node.populated == 0 }
        if level == 1 {
            for i in first...last where node.entries[i] != 0 {
                refs.releaseChunk(node.entries[i])
                node.entries[i] = 0
                node.populated -= 1
            }
            return node.populated == 0
        }
        for i in first...last {
            guard var child = node.children[i] else { continue }
            let childBase = base + UInt64(i) * span
            if start <= childBase && childBase + span <= end {
                releaseNode(child, refs)
                node.children[i] = nil
                node.populated -= 1
                continue
            }
            if child.refcount > 1 { child = child.shadow(refs); node.children[i] = child }
            if clear(child, level: level - 1, base: childBase, start: start, end: end, refs) {
                releaseNode(child, refs)
                node.children[i] = nil
                node.populated -= 1
            }
        }
        return node.populated == 0
    }

    /// Makes the tree tall enough for `blocks` (volume resize). The old tree becomes child 0.
    mutating func grow(toBlocks blocks: UInt64) {
        let target = MapRoot.levels(forBlocks: blocks)
        while levels < target {
            if let n = node {
                let parent = MapNode(leaf: false)
                parent.children[0] = n   // the reference moves from the root to the new parent
                parent.populated = 1
                node = parent
            }
            levels += 1
        }
    }

    // MARK: Walks

    /// Calls `body(firstBlock, blockCount, chunk, shared)` for consecutive runs in
    /// `[start, start+count)`, merging runs of unmapped blocks; returns early when `body` says stop.
    /// `shared` is true when a node on the path is shared or `chunkShared(block, chunk)` says the
    /// chunk has other holders.
    func walk(start: UInt64, count: UInt64, chunkShared: (_ block: UInt64, _ chunk: UInt64) -> Bool,
              _ body: (UInt64, UInt64, UInt64, Bool) -> Bool) {
        guard count > 0 else { return }
        var stopped = false
        MapRoot.walk(node, level: levels, base: 0, start: start, end: start + count, pathShared: false,
                     chunkShared: chunkShared, stopped: &stopped, body)
    }

    private static func walk(_ node: MapNode?, level: Int, base: UInt64, start: UInt64, end: UInt64,
                             pathShared: Bool, chunkShared: (UInt64, UInt64) -> Bool, stopped: inout Bool,
                             _ body: (UInt64, UInt64, UInt64, Bool) -> Bool) {
        let span = span(level: level)
        let nodeEnd = base &+ span &* UInt64(MapNode.fanout)
        let lo = max(start, base), hi = level >= 7 ? end : min(end, nodeEnd)
        guard lo < hi, !stopped else { return }
        guard let node else {
            if !body(lo, hi - lo, 0, false) { stopped = true }
            return
        }
        let shared = pathShared || node.refcount > 1
        let first = Int((lo - base) / span), last = Int((hi - 1 - base) / span)
        for i in first...last {
            if stopped { return }
            let childBase = base + UInt64(i) * span
            let a = max(lo, childBase), b = min(hi, childBase + span)
            if level == 1 {
                let c = node.entries[i]
                if !body(a, 1, c, c != 0 && (shared || chunkShared(a, c))) { stopped = true }
            } else {
                walk(node.children[i], level: level - 1, base: childBase, start: a, end: b,
                     pathShared: shared, chunkShared: chunkShared, stopped: &stopped, body)
            }
        }
    }

    /// Block ranges whose mapping differs between two trees. Subtrees both trees share (the same
    /// node) are skipped without being read, so the cost follows what changed, not the volume size.
    static func diff(_ a: MapRoot, _ b: MapRoot, blocks: UInt64) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        // Bring both to one height: a shorter tree is child 0 of empty ancestors.
        let levels = max(a.levels, b.levels)
        func lifted(_ r: MapRoot) -> MapNode? {
            guard r.levels < levels, let n = r.node else { return r.node }
            var top = n
            for _ in r.levels..<levels {
                let p = MapNode(leaf: false)   // transient: never stored, refcounts untouched
                p.children[0] = top
                p.populated = 1
                top = p
            }
            return top
        }
        diffNodes(lifted(a), lifted(b), level: levels, base: 0, end: blocks, into: &out)
        return out
    }

    private static func append(_ r: Range<UInt64>, to out: inout [Range<UInt64>]) {
        if let last = out.last, last.upperBound == r.lowerBound {
            out[out.count - 1] = last.lowerBound..<r.upperBound
        } else {
            out.append(r)
        }
    }

    private static func diffNodes(_ a: MapNode?, _ b: MapNode?, level: Int, base: UInt64, end: UInt64,
                                  into out: inout [Range<UInt64>]) {
        if a === b || base >= end { return }
        let span = span(level: level)
        for i in 0..<MapNode.fanout {
            let childBase = base + UInt64(i) * span
            if childBase >= end { break }
            if level == 1 {
                let x = a?.entries[i] ?? 0, y = b?.entries[i] ?? 0
                if x != y { append(childBase..<childBase + 1, to: &out) }
            } else {
                let x = a?.children[i], y = b?.children[i]
                if x === y { continue }
                if x == nil || y == nil {
                    // Only one side has data here: report its mapped blocks.
                    collectMapped(x ?? y!, level: level - 1, base: childBase, end: end, into: &out)
                } else {
                    diffNodes(x, y, level: level - 1, base: childBase, end: end, into: &out)
                }
            }
        }
    }

    private static func collectMapped(_ n: MapNode, level: Int, base: UInt64, end: UInt64,
                                      into out: inout [Range<UInt64>]) {
        let span = span(level: level)
        for i in 0..<MapNode.fanout {
            let childBase = base + UInt64(i) * span
            if childBase >= end { break }
            if level == 1 {
                if n.entries[i] != 0 { append(childBase..<childBase + 1, to: &out) }
            } else if let c = n.children[i] {
                collectMapped(c, level: level - 1, base: childBase, end: end, into: &out)
            }
        }
    }
}
