// MARK: - Notes on the design
//
// The map tree of MapTree.swift (a fixed-fanout radix tree, nodes shared between snapshots and
// shares and copied on write, after Rodeh and dm-thin), with its nodes in metadata pages: a node
// is a page, a child pointer is a page number, and a node's reference count is its page's count
// in the pager's page table. Because a page keeps its number when a commit rewrites it, sharing a
// subtree is still one retain of its top page, and a commit writes only the nodes that changed.
//
// The invariants are MapTree.swift's (fsck checks them by recounting):
//  1. A node's page count equals the number of parent slots and image roots that point at it.
//  2. A chunk's count equals the number of slots, in distinct leaves, holding it: a leaf shared
//     by several trees holds its chunks once (lazy reference counting).
//  3. `populated` equals the number of non-empty slots; a node with none is never kept.
//  4. A node is only changed when its count is 1; writing through a shared node first copies it
//     ("shadows" it), the copy's children gaining one reference each.
// Nodes are read before they are changed, and made writable only when a slot really changes, so
// an update that changes nothing dirties no page.
//
// On disk a slot is 48 bits: a chunk number (leaf; all ones = `zeroAllocatedChunk`) or a page
// number (interior). 512 slots take 3072 bytes, then a u16 count of populated slots.

/// A map node in a page: 512 slots (chunk numbers in a leaf, child page numbers above).
class MapNodePage {
    static let fanout = MapGeometry.fanout
    static let slotBytes = 6
    static let allOnes48: UInt64 = (1 << 48) - 1

    var slots: [UInt64]
    var populated: Int

    required init() {
        slots = Array(repeating: 0, count: MapNodePage.fanout)
        populated = 0
    }

    init(slots: [UInt64], populated: Int) {
        self.slots = slots
        self.populated = populated
    }

    fileprivate static func decodeSlots(_ payload: UnsafeRawBufferPointer, leaf: Bool) throws(PageDecodingError) -> ([UInt64], Int) {
        var slots = [UInt64](repeating: 0, count: fanout)
        var count = 0
        for i in 0..<fanout {
            let at = i * slotBytes
            let low = UInt64(UInt32(littleEndian: payload.loadUnaligned(fromByteOffset: at, as: UInt32.self)))
            let high = UInt64(UInt16(littleEndian: payload.loadUnaligned(fromByteOffset: at + 4, as: UInt16.self)))
            var v = low | high << 32
            if leaf && v == allOnes48 { v = zeroAllocatedChunk }
            if v != 0 { count += 1 }
            slots[i] = v
        }
        let populated = Int(UInt16(littleEndian: payload.loadUnaligned(fromByteOffset: fanout * slotBytes, as: UInt16.self)))
        guard populated == count, count > 0 else {
            throw PageDecodingError("map node says \(populated) populated slots but holds \(count)")
        }
        return (slots, count)
    }

    fileprivate func encodeSlots(into payload: UnsafeMutableRawBufferPointer) {
        for (i, s) in slots.enumerated() {
            let v = s == zeroAllocatedChunk ? MapNodePage.allOnes48 : s
            precondition(v <= MapNodePage.allOnes48, "map slot \(v) does not fit 48 bits")
            let at = i * MapNodePage.slotBytes
            payload.storeBytes(of: UInt32(truncatingIfNeeded: v).littleEndian, toByteOffset: at, as: UInt32.self)
            payload.storeBytes(of: UInt16(truncatingIfNeeded: v >> 32).littleEndian, toByteOffset: at + 4, as: UInt16.self)
        }
        payload.storeBytes(of: UInt16(populated).littleEndian, toByteOffset: MapNodePage.fanout * MapNodePage.slotBytes, as: UInt16.self)
    }

    var residentBytes: Int { 64 + slots.count * 8 }
}

final class MapLeafPage: MapNodePage, MetadataPageObject {
    static let kind = PageKind.mapLeaf
    required init() { super.init() }
    override init(slots: [UInt64], populated: Int) { super.init(slots: slots, populated: populated) }
    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        let (s, p) = try MapNodePage.decodeSlots(payload, leaf: true)
        super.init(slots: s, populated: p)
    }
    func encode(into payload: UnsafeMutableRawBufferPointer) { encodeSlots(into: payload) }
    func copy() -> MapLeafPage { MapLeafPage(slots: slots, populated: populated) }
}

final class MapInteriorPage: MapNodePage, MetadataPageObject {
    static let kind = PageKind.mapInterior
    required init() { super.init() }
    override init(slots: [UInt64], populated: Int) { super.init(slots: slots, populated: populated) }
    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        let (s, p) = try MapNodePage.decodeSlots(payload, leaf: false)
        super.init(slots: s, populated: p)
    }
    func encode(into payload: UnsafeMutableRawBufferPointer) { encodeSlots(into: payload) }
    func copy() -> MapInteriorPage { MapInteriorPage(slots: slots, populated: populated) }
}

/// The root of one image's map, in pages.
struct MapRoot: Equatable {
    var page: PageNumber
    /// Tree height; 1 means the root is a leaf.
    var levels: Int

    init(blocks: UInt64) {
        page = .none
        levels = MapGeometry.levels(forBlocks: blocks)
    }

    init(page: PageNumber, levels: Int) {
        self.page = page
        self.levels = levels
    }

    private static func slot(_ block: UInt64, level: Int) -> Int { MapGeometry.slot(block, level: level) }
    private static func span(level: Int) -> UInt64 { MapGeometry.span(level: level) }

    // MARK: Reads

    func lookup(_ block: UInt64, pager: MetadataPager) throws -> UInt64 {
        var page = self.page
        var level = levels
        while page != .none {
            if level == 1 { return try pager.read(page, as: MapLeafPage.self).slots[Self.slot(block, level: 1)] }
            page = PageNumber(try pager.read(page, as: MapInteriorPage.self).slots[Self.slot(block, level: level)])
            level -= 1
        }
        return 0
    }

    // MARK: Sharing

    /// Another root pointing at the same tree: a snapshot or a share. O(1).
    func retained(pager: MetadataPager) throws -> MapRoot {
        if page != .none { try pager.retain(page) }
        return self
    }

    /// Drops this root's reference; nodes and chunks no one else holds are released.
    mutating func release(pager: MetadataPager, _ refs: ChunkReferenceCounter) throws {
        if page != .none { try Self.releaseNode(page, level: levels, pager: pager, refs) }
        page = .none
    }

    static func releaseNode(_ page: PageNumber, level: Int, pager: MetadataPager, _ refs: ChunkReferenceCounter) throws {
        // A shared node only loses a reference: its contents need not be read.
        if try pager.refcount(page) > 1 {
            try pager.release(page)
            return
        }
        let slots = level == 1 ? try pager.read(page, as: MapLeafPage.self).slots : try pager.read(page, as: MapInteriorPage.self).slots
        guard try pager.release(page) else { return }
        if level == 1 {
            for c in slots where c != 0 { try refs.releaseChunk(c) }
        } else {
            for c in slots where c != 0 { try releaseNode(PageNumber(c), level: level - 1, pager: pager, refs) }
        }
    }

    /// A private copy of a shared node; its children gain one reference each (invariant 4).
    static func shadow(_ page: PageNumber, level: Int, pager: MetadataPager, _ refs: ChunkReferenceCounter) throws -> PageNumber {
        let copy: PageNumber
        if level == 1 {
            let node = try pager.read(page, as: MapLeafPage.self)
            for c in node.slots where c != 0 { try refs.retainChunk(c) }
            copy = try pager.allocate(node.copy())
        } else {
            let node = try pager.read(page, as: MapInteriorPage.self)
            for c in node.slots where c != 0 { try pager.retain(PageNumber(c)) }
            copy = try pager.allocate(node.copy())
        }
        try pager.release(page)
        return copy
    }

    static func newNode(level: Int, pager: MetadataPager) throws -> PageNumber {
        level == 1 ? try pager.allocate(MapLeafPage()) : try pager.allocate(MapInteriorPage())
    }

    // MARK: Writes

    /// Maps `block` to `chunk`. The caller has already counted one reference to `chunk` for this
    /// slot; the chunk previously there loses one.
    mutating func update(_ block: UInt64, to chunk: UInt64, pager: MetadataPager, _ refs: ChunkReferenceCounter) throws {
        try update([BlockMapping(block: block, chunk: chunk)], pager: pager, refs)
    }

    /// `update` for each mapping in order. A run of consecutive mappings whose blocks share a leaf
    /// (a sequential write's blocks) is applied with one descent and at most one page made
    /// writable, instead of one of each per block.
    mutating func update(_ mappings: [BlockMapping], pager: MetadataPager, _ refs: ChunkReferenceCounter) throws {
        var start = mappings.startIndex
        while start < mappings.endIndex {
            let leaf = mappings[start].block >> UInt64(MapGeometry.fanoutShift)
            var end = start + 1
            while end < mappings.endIndex && mappings[end].block >> UInt64(MapGeometry.fanoutShift) == leaf { end += 1 }
            try updateRun(mappings[start..<end], pager: pager, refs)
            start = end
        }
    }

    /// Applies mappings whose blocks are all in one leaf.
    private mutating func updateRun(_ run: ArraySlice<BlockMapping>, pager: MetadataPager, _ refs: ChunkReferenceCounter) throws {
        let unmapsOnly = !run.contains { $0.chunk != 0 }
        if unmapsOnly && page == .none { return }
        if page == .none { page = try Self.newNode(level: levels, pager: pager) }
        if try pager.refcount(page) > 1 {
            // Unmapping what is not mapped needs no private copy.
            if unmapsOnly, try !run.contains(where: { try lookup($0.block, pager: pager) != 0 }) { return }
            page = try Self.shadow(page, level: levels, pager: pager, refs)
        }
        if try Self.updateRun(page, level: levels, run, pager: pager, refs) {
            try Self.releaseNode(page, level: levels, pager: pager, refs)
            page = .none
        }
    }

    /// Returns true when the node at `page` became empty (the caller drops it). `run`'s blocks
    /// are all in one leaf, so they take the same slot at every level above it.
    private static func updateRun(_ page: PageNumber, level: Int, _ run: ArraySlice<BlockMapping>,
                                  pager: MetadataPager, _ refs: ChunkReferenceCounter) throws -> Bool {
        if level == 1 {
            let current = try pager.read(page, as: MapLeafPage.self)
            var leaf: MapLeafPage?   // made writable at the first slot that really changes
            for m in run {
                let i = slot(m.block, level: 1)
                let old = (leaf ?? current).slots[i]
                if old == m.chunk {
                    if m.chunk != 0 { try refs.releaseChunk(m.chunk) }   // the caller's extra reference
                    continue
                }
                let changing = try leaf ?? pager.writable(page, as: MapLeafPage.self)
                leaf = changing
                changing.slots[i] = m.chunk
                if old != 0 { try refs.releaseChunk(old) } else { changing.populated += 1 }
                if m.chunk == 0 { changing.populated -= 1 }
            }
            return leaf.map { $0.populated == 0 } ?? false
        }
        let i = slot(run[run.startIndex].block, level: level)
        var child = PageNumber(try pager.read(page, as: MapInteriorPage.self).slots[i])
        let unmapsOnly = !run.contains { $0.chunk != 0 }
        if child == .none {
            if unmapsOnly { return false }
            child = try newNode(level: level - 1, pager: pager)
            let node = try pager.writable(page, as: MapInteriorPage.self)
            node.slots[i] = child.rawValue
            node.populated += 1
        } else if try pager.refcount(child) > 1 {
            if unmapsOnly, try !run.contains(where: { try MapRoot(page: child, levels: level - 1).lookup($0.block, pager: pager) != 0 }) {
                return false
            }
            child = try shadow(child, level: level - 1, pager: pager, refs)
            try pager.writable(page, as: MapInteriorPage.self).slots[i] = child.rawValue
        }
        if try updateRun(child, level: level - 1, run, pager: pager, refs) {
            try releaseNode(child, level: level - 1, pager: pager, refs)
            let node = try pager.writable(page, as: MapInteriorPage.self)
            node.slots[i] = 0
            node.populated -= 1
            return node.populated == 0
        }
        return false
    }

    /// Unmaps `[start, start+count)`. Whole subtrees inside the range are dropped without visiting
    /// their leaves, so trimming a 1 TiB volume costs its populated top nodes, not its blocks.
    mutating func clear(start: UInt64, count: UInt64, pager: MetadataPager, _ refs: ChunkReferenceCounter) throws {
        guard count > 0, page != .none else { return }
        let end = start &+ count
        let capacity = Self.span(level: levels + 1)
        if start == 0 && (levels >= 7 || end >= capacity) {
            try release(pager: pager, refs)
            return
        }
        if try pager.refcount(page) > 1 { page = try Self.shadow(page, level: levels, pager: pager, refs) }
        if try Self.clear(page, level: levels, base: 0, start: start, end: end, pager: pager, refs) {
            try Self.releaseNode(page, level: levels, pager: pager, refs)
            page = .none
        }
    }

    private static func clear(_ page: PageNumber, level: Int, base: UInt64, start: UInt64, end: UInt64,
                              pager: MetadataPager, _ refs: ChunkReferenceCounter) throws -> Bool {
        let span = span(level: level)
        let first = Int((max(start, base) - base) / span)
        let last = Int(min((min(end, base + span * UInt64(MapNodePage.fanout)) - base - 1) / span, UInt64(MapNodePage.fanout - 1)))
        if level == 1 {
            let slots = try pager.read(page, as: MapLeafPage.self).slots
            guard first <= last, slots[first...last].contains(where: { $0 != 0 }) else {
                return try pager.read(page, as: MapLeafPage.self).populated == 0
            }
            let leaf = try pager.writable(page, as: MapLeafPage.self)
            for i in first...last where leaf.slots[i] != 0 {
                try refs.releaseChunk(leaf.slots[i])
                leaf.slots[i] = 0
                leaf.populated -= 1
            }
            return leaf.populated == 0
        }
        guard first <= last else { return try pager.read(page, as: MapInteriorPage.self).populated == 0 }
        let children = try pager.read(page, as: MapInteriorPage.self).slots
        for i in first...last where children[i] != 0 {
            var child = PageNumber(children[i])
            let childBase = base + UInt64(i) * span
            if start <= childBase && childBase + span <= end {
                try releaseNode(child, level: level - 1, pager: pager, refs)
                let node = try pager.writable(page, as: MapInteriorPage.self)
                node.slots[i] = 0
                node.populated -= 1
                continue
            }
            if try pager.refcount(child) > 1 {
                child = try shadow(child, level: level - 1, pager: pager, refs)
                try pager.writable(page, as: MapInteriorPage.self).slots[i] = child.rawValue
            }
            if try clear(child, level: level - 1, base: childBase, start: start, end: end, pager: pager, refs) {
                try releaseNode(child, level: level - 1, pager: pager, refs)
                let node = try pager.writable(page, as: MapInteriorPage.self)
                node.slots[i] = 0
                node.populated -= 1
            }
        }
        return try pager.read(page, as: MapInteriorPage.self).populated == 0
    }

    /// Makes the tree tall enough for `blocks` (volume resize). The old tree becomes child 0.
    mutating func grow(toBlocks blocks: UInt64, pager: MetadataPager) throws {
        let target = MapGeometry.levels(forBlocks: blocks)
        while levels < target {
            if page != .none {
                let parent = MapInteriorPage()
                parent.slots[0] = page.rawValue   // the root's reference moves to the new parent
                parent.populated = 1
                page = try pager.allocate(parent)
            }
            levels += 1
        }
    }

    // MARK: Walks

    /// Calls `body(firstBlock, blockCount, chunk, shared)` for consecutive runs in
    /// `[start, start+count)`, merging runs of unmapped blocks; returns early when `body` says stop.
    /// `shared` is true when a node on the path is shared or `chunkShared(block, chunk)` says the
    /// chunk has other holders.
    func walk(start: UInt64, count: UInt64, pager: MetadataPager, chunkShared: (_ block: UInt64, _ chunk: UInt64) -> Bool,
              _ body: (UInt64, UInt64, UInt64, Bool) -> Bool) throws {
        guard count > 0 else { return }
        var stopped = false
        try Self.walk(page, level: levels, base: 0, start: start, end: start &+ count, pathShared: false,
                      pager: pager, chunkShared: chunkShared, stopped: &stopped, body)
    }

    private static func walk(_ page: PageNumber, level: Int, base: UInt64, start: UInt64, end: UInt64,
                             pathShared: Bool, pager: MetadataPager, chunkShared: (UInt64, UInt64) -> Bool,
                             stopped: inout Bool, _ body: (UInt64, UInt64, UInt64, Bool) -> Bool) throws {
        let span = span(level: level)
        let nodeEnd = base &+ span &* UInt64(MapNodePage.fanout)
        let lo = max(start, base), hi = level >= 7 ? end : min(end, nodeEnd)
        guard lo < hi, !stopped else { return }
        guard page != .none else {
            if !body(lo, hi - lo, 0, false) { stopped = true }
            return
        }
        let shared = try pathShared || pager.refcount(page) > 1
        let slots = level == 1 ? try pager.read(page, as: MapLeafPage.self).slots : try pager.read(page, as: MapInteriorPage.self).slots
        let first = Int((lo - base) / span), last = Int((hi - 1 - base) / span)
        for i in first...last {
            if stopped { return }
            let childBase = base + UInt64(i) * span
            let a = max(lo, childBase), b = min(hi, childBase + span)
            if level == 1 {
                let c = slots[i]
                if !body(a, 1, c, c != 0 && (shared || chunkShared(a, c))) { stopped = true }
            } else {
                try walk(PageNumber(slots[i]), level: level - 1, base: childBase, start: a, end: b,
                         pathShared: shared, pager: pager, chunkShared: chunkShared, stopped: &stopped, body)
            }
        }
    }

    /// Block ranges whose mapping differs between two trees. Subtrees both trees share (the same
    /// page) are skipped without being read, so the cost follows what changed, not the volume size.
    static func diff(_ a: MapRoot, _ b: MapRoot, blocks: UInt64, pager: MetadataPager) throws -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        let levels = max(a.levels, b.levels)
        // A shorter tree is child 0 of empty ancestors: a node is (page, its own level).
        try diffNodes(NodeRef(page: a.page, level: a.levels), NodeRef(page: b.page, level: b.levels),
                      level: levels, base: 0, end: blocks, pager: pager, into: &out)
        return out
    }

    private struct NodeRef: Equatable {
        var page: PageNumber
        var level: Int
        static let empty = NodeRef(page: .none, level: 0)

        /// Slot values of this node seen at tree level `level` (a lifted node's only child is itself).
        func slots(at level: Int, pager: MetadataPager) throws -> [UInt64]? {
            if page == .none { return nil }
            if self.level < level { return nil }
            return level == 1 ? try pager.read(page, as: MapLeafPage.self).slots : try pager.read(page, as: MapInteriorPage.self).slots
        }

        func child(_ i: Int, at level: Int, slots: [UInt64]?) -> NodeRef {
            if page == .none { return .empty }
            if self.level < level { return i == 0 ? self : .empty }
            let c = slots![i]
            return c == 0 ? .empty : NodeRef(page: PageNumber(c), level: level - 1)
        }
    }

    private static func append(_ r: Range<UInt64>, to out: inout [Range<UInt64>]) {
        if let last = out.last, last.upperBound == r.lowerBound {
            out[out.count - 1] = last.lowerBound..<r.upperBound
        } else {
            out.append(r)
        }
    }

    private static func diffNodes(_ a: NodeRef, _ b: NodeRef, level: Int, base: UInt64, end: UInt64,
                                  pager: MetadataPager, into out: inout [Range<UInt64>]) throws {
        if a == b || base >= end { return }
        if a.page == .none || b.page == .none {
            try collectMapped(a.page == .none ? b : a, level: level, base: base, end: end, pager: pager, into: &out)
            return
        }
        let span = span(level: level)
        let aSlots = try a.slots(at: level, pager: pager), bSlots = try b.slots(at: level, pager: pager)
        for i in 0..<MapNodePage.fanout {
            let childBase = base + UInt64(i) * span
            if childBase >= end { break }
            if level == 1 {
                if aSlots![i] != bSlots![i] { append(childBase..<childBase + 1, to: &out) }
            } else {
                try diffNodes(a.child(i, at: level, slots: aSlots), b.child(i, at: level, slots: bSlots),
                              level: level - 1, base: childBase, end: end, pager: pager, into: &out)
            }
        }
    }

    private static func collectMapped(_ n: NodeRef, level: Int, base: UInt64, end: UInt64,
                                      pager: MetadataPager, into out: inout [Range<UInt64>]) throws {
        guard n.page != .none, base < end else { return }
        let span = span(level: level)
        let slots = try n.slots(at: level, pager: pager)
        for i in 0..<MapNodePage.fanout {
            let childBase = base + UInt64(i) * span
            if childBase >= end { break }
            if level == 1 {
                if slots![i] != 0 { append(childBase..<childBase + 1, to: &out) }
            } else {
                try collectMapped(n.child(i, at: level, slots: slots), level: level - 1, base: childBase, end: end,
                                  pager: pager, into: &out)
            }
        }
    }

    /// Every page of the tree once (shared subtrees included once per call), for fsck.
    func forEachNode(pager: MetadataPager, _ body: (PageNumber, Int, [UInt64]) throws -> Bool) throws {
        func visit(_ page: PageNumber, level: Int) throws {
            guard page != .none else { return }
            let slots = level == 1 ? try pager.read(page, as: MapLeafPage.self).slots : try pager.read(page, as: MapInteriorPage.self).slots
            guard try body(page, level, slots), level > 1 else { return }
            for c in slots where c != 0 { try visit(PageNumber(c), level: level - 1) }
        }
        try visit(page, level: levels)
    }
}
