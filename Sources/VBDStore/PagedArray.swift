// MARK: - Notes on the design
//
// A `PagedArray` is an array of fixed-size elements indexed by UInt64, stored as a radix tree
// of metadata pages: leaves hold `Leaf.capacity` elements, interior pages hold page numbers.
// An absent leaf reads as all `zero` elements, so a sparse array costs only the leaves written.
// Its pages are private (reference count 1) and change in place through the pager; a commit
// writes the leaves that changed and the interior pages above them. The chunk table, the data
// file's free-space bitmap and the dedup index's bucket directory are paged arrays.

/// What a `PagedArray` stores: a fixed number of bytes per element.
protocol PagedArrayElement {
    static var byteCount: Int { get }
    /// The page kind of leaves of this element type (so one array's page is never read as another's).
    static var leafKind: PageKind { get }
    static var zero: Self { get }
    init(loading bytes: UnsafeRawBufferPointer)
    func store(into bytes: UnsafeMutableRawBufferPointer)
}

final class ArrayLeafPage<Element: PagedArrayElement>: MetadataPageObject {
    static var kind: PageKind { Element.leafKind }
    static var capacity: Int { MetadataPageFile.payloadBytes / Element.byteCount }
    var elements: [Element]

    init() { elements = Array(repeating: .zero, count: Self.capacity) }
    private init(elements: [Element]) { self.elements = elements }

    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        let n = Self.capacity, size = Element.byteCount
        elements = []
        elements.reserveCapacity(n)
        for i in 0..<n {
            elements.append(Element(loading: UnsafeRawBufferPointer(rebasing: payload[i * size..<(i + 1) * size])))
        }
    }

    func encode(into payload: UnsafeMutableRawBufferPointer) {
        let size = Element.byteCount
        for (i, e) in elements.enumerated() {
            e.store(into: UnsafeMutableRawBufferPointer(rebasing: payload[i * size..<(i + 1) * size]))
        }
    }

    func copy() -> ArrayLeafPage<Element> { ArrayLeafPage(elements: elements) }
    var residentBytes: Int { 64 + elements.count * MemoryLayout<Element>.stride }
}

/// Child page numbers of a paged array's interior node (0 = no child).
final class ArrayInteriorPage: MetadataPageObject {
    static let kind = PageKind.arrayInterior
    static let fanout = MetadataPageFile.payloadBytes / 8   // 508
    var children: [PageNumber]

    init() { children = Array(repeating: .none, count: ArrayInteriorPage.fanout) }
    private init(children: [PageNumber]) { self.children = children }

    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        children = (0..<ArrayInteriorPage.fanout).map {
            PageNumber(UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self)))
        }
    }

    func encode(into payload: UnsafeMutableRawBufferPointer) {
        for (i, c) in children.enumerated() {
            payload.storeBytes(of: c.rawValue.littleEndian, toByteOffset: i * 8, as: UInt64.self)
        }
    }

    func copy() -> ArrayInteriorPage { ArrayInteriorPage(children: children) }
    var residentBytes: Int { 64 + children.count * 8 }
}

/// Where a paged array starts (kept in the superblock or another page).
struct PagedArray<Element: PagedArrayElement>: Equatable {
    var root: PageNumber = .none
    /// 1 = the root is a leaf.
    var levels: Int = 1
    /// The leaf `writableLeaf` handed out last. A write changes the records of consecutive chunk
    /// numbers (and sector-map words) many times per request, so most calls hit it and skip the
    /// descent. Not part of the array's value (`==` ignores it).
    private var lastWritable: WritableLeaf?

    /// A leaf made writable in the pager's generation `generation`. It is still the object to
    /// change while the pager is in that generation: a dirty page is neither evicted nor frozen
    /// until a commit begins, which starts the next generation (and generations only grow).
    private struct WritableLeaf {
        let pager: MetadataPager
        let generation: UInt64
        let first: UInt64
        let leaf: Leaf

        func holds(_ index: UInt64, in pager: MetadataPager) -> Leaf? {
            guard pager === self.pager, pager.nextGeneration == generation,
                  index >= first, index - first < UInt64(Leaf.capacity) else { return nil }
            return leaf
        }
    }

    init() {}
    init(root: PageNumber, levels: Int) {
        self.root = root
        self.levels = levels
    }

    static func == (a: PagedArray, b: PagedArray) -> Bool { a.root == b.root && a.levels == b.levels }

    typealias Leaf = ArrayLeafPage<Element>

    /// Elements the tree can hold at `levels`.
    static func capacity(levels: Int) -> UInt64 {
        var c = UInt64(Leaf.capacity)
        for _ in 1..<max(levels, 1) {
            let (m, o) = c.multipliedReportingOverflow(by: UInt64(ArrayInteriorPage.fanout))
            if o { return .max }
            c = m
        }
        return c
    }

    func get(_ index: UInt64, pager: MetadataPager) throws -> Element {
        if let leaf = lastWritable?.holds(index, in: pager) { return leaf.elements[Int(index % UInt64(Leaf.capacity))] }
        guard index < Self.capacity(levels: levels) else { return .zero }
        var page = root
        var level = levels
        var i = index
        while page != .none {
            if level == 1 { return try pager.read(page, as: Leaf.self).elements[Int(i)] }
            let span = Self.capacity(levels: level - 1)
            page = try pager.read(page, as: ArrayInteriorPage.self).children[Int(i / span)]
            i %= span
            level -= 1
        }
        return .zero
    }

    /// The elements of leaf `k` (indices `k * Leaf.capacity ..<`), as they are now; empty when
    /// the leaf is absent (all zero). For scans that go a leaf at a time (the space allocator).
    func leafElements(_ k: UInt64, pager: MetadataPager) throws -> [Element] {
        let (index, overflow) = k.multipliedReportingOverflow(by: UInt64(Leaf.capacity))
        guard !overflow else { return [] }
        if let leaf = lastWritable?.holds(index, in: pager) { return leaf.elements }
        guard index < Self.capacity(levels: levels) else { return [] }
        var page = root
        var level = levels
        var i = index
        while page != .none {
            if level == 1 { return try pager.read(page, as: Leaf.self).elements }
            let span = Self.capacity(levels: level - 1)
            page = try pager.read(page, as: ArrayInteriorPage.self).children[Int(i / span)]
            i %= span
            level -= 1
        }
        return []
    }

    /// The leaf holding `index`, for changing it in place (created if absent), and the position in it.
    mutating func writableLeaf(_ index: UInt64, pager: MetadataPager) throws -> (Leaf, Int) {
        if let leaf = lastWritable?.holds(index, in: pager) { return (leaf, Int(index % UInt64(Leaf.capacity))) }
        while index >= Self.capacity(levels: levels) {
            if root != .none {
                let top = ArrayInteriorPage()
                top.children[0] = root
                root = try pager.allocate(top)
            }
            levels += 1
        }
        if root == .none {
            root = levels == 1 ? try pager.allocate(Leaf()) : try pager.allocate(ArrayInteriorPage())
        }
        var page = root
        var level = levels
        var i = index
        while level > 1 {
            let span = Self.capacity(levels: level - 1)
            let node = try pager.writable(page, as: ArrayInteriorPage.self)
            let slot = Int(i / span)
            if node.children[slot] == .none {
                node.children[slot] = level == 2 ? try pager.allocate(Leaf()) : try pager.allocate(ArrayInteriorPage())
            }
            page = node.children[slot]
            i %= span
            level -= 1
        }
        let leaf = try pager.writable(page, as: Leaf.self)
        lastWritable = WritableLeaf(pager: pager, generation: pager.nextGeneration, first: index - i, leaf: leaf)
        return (leaf, Int(i))
    }

    mutating func set(_ index: UInt64, _ value: Element, pager: MetadataPager) throws {
        let (leaf, i) = try writableLeaf(index, pager: pager)
        leaf.elements[i] = value
    }

    /// Calls `body` with each present leaf's first index and the leaf, in index order, for fsck and
    /// for bulk scans; absent leaves (all zero) are skipped.
    func forEachLeaf(pager: MetadataPager, _ body: (UInt64, Leaf) throws -> Void) throws {
        try forEachLeaf(in: 0..<UInt64.max, pager: pager, body)
    }

    /// `forEachLeaf` for the leaves holding indices in `range` only (whole leaves: a leaf that
    /// starts before the range is visited if it reaches into it).
    func forEachLeaf(in range: Range<UInt64>, pager: MetadataPager, _ body: (UInt64, Leaf) throws -> Void) throws {
        func visit(_ page: PageNumber, level: Int, base: UInt64) throws {
            guard page != .none else { return }
            if level == 1 { try body(base, try pager.read(page, as: Leaf.self)); return }
            let span = Self.capacity(levels: level - 1)
            let node = try pager.read(page, as: ArrayInteriorPage.self)
            for (k, child) in node.children.enumerated() where child != .none {
                let childBase = base + UInt64(k) * span
                guard childBase < range.upperBound else { break }
                let (childEnd, overflow) = childBase.addingReportingOverflow(span)
                if !overflow && childEnd <= range.lowerBound { continue }
                try visit(child, level: level - 1, base: childBase)
            }
        }
        try visit(root, level: levels, base: 0)
    }

    /// Every page of the tree, for fsck's reference count.
    func forEachPage(pager: MetadataPager, _ body: (PageNumber) throws -> Void) throws {
        func visit(_ page: PageNumber, level: Int) throws {
            guard page != .none else { return }
            try body(page)
            if level == 1 { return }
            for child in try pager.read(page, as: ArrayInteriorPage.self).children where child != .none {
                try visit(child, level: level - 1)
            }
        }
        try visit(root, level: levels)
    }
}

// MARK: - Element types

extension UInt64: PagedArrayElement {
    static var byteCount: Int { 8 }
    static var leafKind: PageKind { .arrayLeaf }
    init(loading bytes: UnsafeRawBufferPointer) { self = UInt64(littleEndian: bytes.loadUnaligned(as: UInt64.self)) }
    func store(into bytes: UnsafeMutableRawBufferPointer) { bytes.storeBytes(of: littleEndian, as: UInt64.self) }
}
