import VBDCore

// MARK: - Notes on the design
//
// The metadata of a format-2 store (map nodes, the chunk table, the dedup index, the data file's
// free-space bitmap) lives in the file `meta` as numbered 4 KiB pages, read on demand through a
// cache with a byte budget and committed incrementally. The pager is the layer that owns that file.
//
// Two slots per page. Page n occupies bytes [2n * 4096, (2n + 2) * 4096): two slots. A commit
// writes each page it changed into the slot that does not hold the page's committed version, so
// the committed version survives a crash at any point, and a page keeps its number when it is
// rewritten: a parent that points at a child by number never changes because the child did. The
// cost of a commit is therefore the pages that changed (plus the page-table pages that record
// their new versions), never the size of the store. This is the superblock's two-slot scheme
// (LMDB's two meta pages) applied to every page; it costs twice the file space of the metadata.
//
// The page table records, for every page, which slot holds its committed version and which
// commit (generation) wrote it, its reference count and its kind. A read goes to exactly that
// slot and checks the slot's checksum, page number, generation and kind against the table, so a
// torn write, a lost write, a misdirected write or rot is reported as damage and never read as an
// older version. A slot written by a commit that did not complete is simply not what the table
// points at. The page table's own pages are pages too; the directory pages above them hold
// (page, version) pointers, up to a root pointer in the superblock: a Merkle-style chain of
// versions from the superblock to every page.
//
// Reference counts. Map nodes are shared between the trees of snapshots and shares, so every
// page has a reference count in its page-table entry; a page whose count drops to 0 is free, but
// only after the commit that freed it is durable (`pendingFree`), because until then the
// committed state still points at it. Page-table and directory pages are `structural`: never
// counted, never freed.
//
// Commits. `startCommit` and then `continueFreeze` (store lock held, in steps the store may let
// go of the lock between: readers run meanwhile, changes wait) give every dirty page its new
// version, freeze the page objects (an object being written is never modified: a writer asking
// for it gets a copy) and return the batch; `writeCommit` encodes and writes the batch without
// the lock; the caller syncs `meta` and writes the superblock; `finishCommit` (lock held) thaws the objects and makes
// the pages freed before the commit reusable. Readers and writers of other pages run while a
// commit writes.
//
// Bounded memory. Clean pages are evicted (CLOCK) once the cache passes its budget, but only at
// `trim`, which the store calls between operations: an operation holds page objects in local
// variables, and evicting one under it would let a later load of the same page create a second,
// divergent object. Dirty and frozen pages stay until they are written.
//
// Locking: every method needs the store's `mutex`, except `writeCommit`, which touches only the
// frozen objects of its batch and the file.

/// A metadata page's number in `meta`. 0 is never a page: it means "none".
struct PageNumber: Hashable, Comparable, CustomStringConvertible {
    var rawValue: UInt64
    init(_ rawValue: UInt64) { self.rawValue = rawValue }
    static let none = PageNumber(0)
    static func < (a: PageNumber, b: PageNumber) -> Bool { a.rawValue < b.rawValue }
    var description: String { "meta page \(rawValue)" }

    // Every metadata access looks a page number up in the cache; the default SipHash was 16 % of
    // a 1 MiB write's samples (Benchmarks/README.md, issue 14 round 3). Page numbers come from the
    // store itself, never from a client, so a multiplicative mix is enough (no flooding to fear).
    func hash(into hasher: inout Hasher) { hasher.combine(rawValue) }
    func _rawHashValue(seed: Int) -> Int {
        var x = rawValue &+ UInt64(UInt(bitPattern: seed))
        x = (x ^ (x >> 31)) &* 0x9E37_79B9_7F4A_7C15
        return Int(truncatingIfNeeded: x ^ (x >> 29))
    }
}

enum PageKind: UInt16, CustomStringConvertible {
    /// Page-table entries (version, reference count, kind) of `PageTable.fanout` pages.
    case pageTable = 1
    /// Pointers to page-table pages or lower directory pages.
    case pageDirectory = 2
    case mapLeaf = 3
    case mapInterior = 4
    case arrayLeaf = 5
    case arrayInterior = 6
    case dedupBucket = 7
    case blob = 8
    case chunkRecords = 9

    /// The page table's own pages (its entries and directories), as opposed to content pages.
    var isStructural: Bool { self == .pageTable || self == .pageDirectory }

    var description: String {
        switch self {
        case .pageTable: return "page table"
        case .pageDirectory: return "page directory"
        case .mapLeaf: return "map leaf"
        case .mapInterior: return "map interior node"
        case .arrayLeaf: return "array leaf"
        case .arrayInterior: return "array interior node"
        case .dedupBucket: return "dedup bucket"
        case .blob: return "blob"
        case .chunkRecords: return "chunk-table page"
        }
    }
}

/// Which slot holds a page's committed version, and the commit that wrote it.
/// Packed as `generation << 1 | slot`; 0 = never written.
struct PageVersion: Equatable, CustomStringConvertible {
    var packed: UInt64
    init(packed: UInt64) { self.packed = packed }
    init(slot: Int, generation: UInt64) {
        precondition(slot == 0 || slot == 1 && generation < (1 << 62))
        packed = generation << 1 | UInt64(slot)
    }
    static let unwritten = PageVersion(packed: 0)
    var slot: Int { Int(packed & 1) }
    var generation: UInt64 { packed >> 1 }
    var isWritten: Bool { packed != 0 }
    /// The version a commit of `generation` writes: the other slot.
    func next(generation: UInt64) -> PageVersion {
        PageVersion(slot: isWritten ? 1 - slot : 0, generation: generation)
    }
    var description: String { isWritten ? "slot \(slot) of generation \(generation)" : "never written" }
}

/// A content page a probe needed and the cache did not hold (`MetadataPager.missesThrow`).
struct PageMiss: Error, @unchecked Sendable {
    var page: PageNumber
    var version: PageVersion
    var kind: PageKind
    /// Decodes the page's payload into its object type.
    var decode: (UnsafeRawBufferPointer) throws(PageDecodingError) -> any MetadataPageObject

    /// Reads and decodes the page; touches no pager state.
    func read(from file: any StorageFile) throws -> any MetadataPageObject {
        try MetadataPager.readPage(page, version: version, kind: kind, from: file, decode: decode)
    }
}

/// A decoded metadata page held by the cache.
protocol MetadataPageObject: AnyObject {
    static var kind: PageKind { get }
    /// Decodes a payload of `MetadataPageFile.payloadBytes`; throws on anything malformed.
    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError)
    /// Encodes into a zeroed payload of `MetadataPageFile.payloadBytes`.
    func encode(into payload: UnsafeMutableRawBufferPointer)
    /// An independent copy (for a writer while the original is being written by a commit).
    func copy() -> Self
    /// Memory this object holds, for the cache budget.
    var residentBytes: Int { get }
}

struct PageDecodingError: Error, CustomStringConvertible {
    var reason: String
    init(_ reason: String) { self.reason = reason }
    var description: String { reason }
}

// MARK: - The file: slots and their headers

/// Page slots in `meta`: header, checksum and placement. Pure functions plus thin file I/O.
enum MetadataPageFile {
    static let pageBytes = 4096
    static let headerBytes = 32
    static let payloadBytes = pageBytes - headerBytes
    static let formatVersion: UInt16 = 2

    static func slotOffset(_ page: PageNumber, slot: Int) -> UInt64 {
        (page.rawValue &* 2 &+ UInt64(slot)) &* UInt64(pageBytes)
    }

    // Header: u64 checksum (XXH3-64 of bytes 8..<4096) | u64 page | u64 generation | u16 kind |
    // u16 format version | u32 zero.

    /// Fills the header of a slot image whose payload (bytes 32...) is already in place.
    static func seal(_ slot: UnsafeMutableRawBufferPointer, page: PageNumber, generation: UInt64, kind: PageKind) {
        precondition(slot.count == pageBytes)
        slot.storeBytes(of: page.rawValue.littleEndian, toByteOffset: 8, as: UInt64.self)
        slot.storeBytes(of: generation.littleEndian, toByteOffset: 16, as: UInt64.self)
        slot.storeBytes(of: kind.rawValue.littleEndian, toByteOffset: 24, as: UInt16.self)
        slot.storeBytes(of: formatVersion.littleEndian, toByteOffset: 26, as: UInt16.self)
        slot.storeBytes(of: UInt32(0), toByteOffset: 28, as: UInt32.self)
        let sum = metadataChecksum(UnsafeRawBufferPointer(rebasing: slot[8...]))
        slot.storeBytes(of: sum.littleEndian, toByteOffset: 0, as: UInt64.self)
    }

    /// Why a slot image is not the expected version of `page`, or nil when it is.
    static func check(_ slot: UnsafeRawBufferPointer, page: PageNumber, version: PageVersion, kind: PageKind) -> String? {
        precondition(slot.count == pageBytes)
        let sum = UInt64(littleEndian: slot.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        guard sum == metadataChecksum(UnsafeRawBufferPointer(rebasing: slot[8...])) else {
            return slot.allSatisfy({ $0 == 0 }) ? "its slot \(version.slot) was never written" : "its slot \(version.slot) fails its checksum"
        }
        let number = UInt64(littleEndian: slot.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let generation = UInt64(littleEndian: slot.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        let kindRaw = UInt16(littleEndian: slot.loadUnaligned(fromByteOffset: 24, as: UInt16.self))
        let format = UInt16(littleEndian: slot.loadUnaligned(fromByteOffset: 26, as: UInt16.self))
        if number != page.rawValue { return "its slot \(version.slot) holds page \(number) (a misdirected write)" }
        if format != formatVersion { return "its slot \(version.slot) has format \(format)" }
        if generation != version.generation {
            return "its slot \(version.slot) holds generation \(generation), not \(version.generation) (a lost or stale write)"
        }
        if kindRaw != kind.rawValue {
            let found = PageKind(rawValue: kindRaw).map { "\($0)" } ?? "kind \(kindRaw)"
            return "its slot \(version.slot) holds a \(found), not a \(kind)"
        }
        return nil
    }
}

// MARK: - Page table

/// One page's record: committed version, reference count, kind.
struct PageTableEntry: Equatable {
    var version: PageVersion
    var refcount: UInt32
    var kind: UInt16

    static let free = PageTableEntry(version: .unwritten, refcount: 0, kind: 0)
    /// Page-table and directory pages: owned by the table itself, never counted or freed.
    static let structural: UInt32 = .max
    var isStructural: Bool { refcount == PageTableEntry.structural }
    var isFree: Bool { refcount == 0 }
}

/// `PageTable.fanout` entries of 16 bytes: u64 version | u32 refcount | u16 kind | u16 zero.
final class PageTablePage: MetadataPageObject {
    static let kind = PageKind.pageTable
    var entries: [PageTableEntry]

    init() { entries = Array(repeating: .free, count: PageTable.fanout) }
    private init(entries: [PageTableEntry]) { self.entries = entries }

    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        entries = []
        entries.reserveCapacity(PageTable.fanout)
        for i in 0..<PageTable.fanout {
            let at = i * 16
            let version = PageVersion(packed: UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: at, as: UInt64.self)))
            let refcount = UInt32(littleEndian: payload.loadUnaligned(fromByteOffset: at + 8, as: UInt32.self))
            let kind = UInt16(littleEndian: payload.loadUnaligned(fromByteOffset: at + 12, as: UInt16.self))
            if refcount != 0 && kind != 0 && PageKind(rawValue: kind) == nil {
                throw PageDecodingError("page-table entry \(i) has unknown kind \(kind)")
            }
            if refcount != 0 && !version.isWritten && refcount != PageTableEntry.structural {
                throw PageDecodingError("page-table entry \(i) is in use but was never written")
            }
            entries.append(PageTableEntry(version: version, refcount: refcount, kind: kind))
        }
    }

    func encode(into payload: UnsafeMutableRawBufferPointer) {
        for (i, e) in entries.enumerated() {
            let at = i * 16
            payload.storeBytes(of: e.version.packed.littleEndian, toByteOffset: at, as: UInt64.self)
            payload.storeBytes(of: e.refcount.littleEndian, toByteOffset: at + 8, as: UInt32.self)
            payload.storeBytes(of: e.kind.littleEndian, toByteOffset: at + 12, as: UInt16.self)
        }
    }

    func copy() -> PageTablePage { PageTablePage(entries: entries) }
    var residentBytes: Int { 64 + entries.count * MemoryLayout<PageTableEntry>.stride }
}

/// `PageTable.fanout` pointers of 16 bytes: u64 page | u64 version (0/0 = none).
final class PageDirectoryPage: MetadataPageObject {
    static let kind = PageKind.pageDirectory
    var children: [(page: PageNumber, version: PageVersion)]

    init() { children = Array(repeating: (.none, .unwritten), count: PageTable.fanout) }
    private init(children: [(page: PageNumber, version: PageVersion)]) { self.children = children }

    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        children = []
        children.reserveCapacity(PageTable.fanout)
        for i in 0..<PageTable.fanout {
            let page = PageNumber(UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: i * 16, as: UInt64.self)))
            let version = PageVersion(packed: UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: i * 16 + 8, as: UInt64.self)))
            if (page == .none) != !version.isWritten { throw PageDecodingError("directory pointer \(i) is half written") }
            children.append((page, version))
        }
    }

    func encode(into payload: UnsafeMutableRawBufferPointer) {
        for (i, c) in children.enumerated() {
            payload.storeBytes(of: c.page.rawValue.littleEndian, toByteOffset: i * 16, as: UInt64.self)
            payload.storeBytes(of: c.version.packed.littleEndian, toByteOffset: i * 16 + 8, as: UInt64.self)
        }
    }

    func copy() -> PageDirectoryPage { PageDirectoryPage(children: children) }
    var residentBytes: Int { 64 + children.count * 16 }
}

/// Where the page table starts: stored in the superblock.
struct PageTableRoot: Equatable {
    /// The top page (a page-table page when `levels` is 1, else a directory page).
    var page: PageNumber
    var version: PageVersion
    /// 1 = the root is a page-table page; each level above multiplies the pages covered by `fanout`.
    var levels: Int
    /// Pages in the file (allocated or free); numbers at or above it were never handed out.
    var pageCount: UInt64
}

enum PageTable {
    /// Entries per page-table page and pointers per directory page.
    static let fanout = MetadataPageFile.payloadBytes / 16   // 254

    /// Pages a table of `levels` levels covers.
    static func capacity(levels: Int) -> UInt64 {
        var c = UInt64(fanout)
        for _ in 1..<max(levels, 1) {
            let (m, o) = c.multipliedReportingOverflow(by: UInt64(fanout))
            if o { return .max }
            c = m
        }
        return c
    }
}

// MARK: - The pager

/// One page of a commit: what `writeCommit` writes where.
struct CommitPage {
    var page: PageNumber
    var kind: PageKind
    var version: PageVersion
    var object: any MetadataPageObject
    /// The cached frame, so that finishing the commit looks nothing up (MetadataPager only).
    fileprivate var frame: MetadataPager.Frame?
    /// The version the page had before: a commit whose pages could not be written puts it back.
    var previousVersion: PageVersion
}

/// What `continueFreeze` (or `beginCommit`) hands to `writeCommit` and `finishCommit`.
struct CommitBatch {
    var generation: UInt64
    /// In no particular order (`writeCommit` sorts them, outside the store lock).
    var pages: [CommitPage]
    /// The root the superblock must name once the pages are durable.
    var root: PageTableRoot
    /// What the root was before: a commit whose pages could not be written puts it back.
    var previousRootVersion: PageVersion
}

final class MetadataPager {
    /// One cached page.
    final class Frame {
        var object: any MetadataPageObject
        var kind: PageKind
        /// Changed since its version was last assigned (by a commit, or new).
        var dirty: Bool
        /// Being written by the commit in progress: immutable until `finishCommit`.
        var frozen = false
        /// CLOCK's second chance.
        var referenced = true
        /// What `residentBytes` counts for this frame: its object's size when it was last
        /// measured (inserted, copied, or taken by a commit). Objects change size in place (a
        /// dedup bucket grows), so a drop subtracts what was added, never a fresh measure.
        var chargedBytes = 0
        init(object: any MetadataPageObject, kind: PageKind, dirty: Bool) {
            self.object = object
            self.kind = kind
            self.dirty = dirty
        }
    }

    let file: any StorageFile
    /// Byte budget of the cache; dirty and frozen pages may exceed it until they are committed.
    var budgetBytes: Int
    /// The page table's root as of the changes made so far (the superblock has the committed one).
    private(set) var root: PageTableRoot
    /// The generation the next commit writes.
    private(set) var nextGeneration: UInt64

    private var frames: [PageNumber: Frame] = [:]
    private var clock: [PageNumber] = []
    private var clockHand = 0
    private(set) var residentBytes = 0
    /// Pages whose count reached 0 since the last commit began: free once the next commit is durable.
    private var pendingFree: [PageNumber] = []
    /// Pages freed before the commit in progress: free once it is durable.
    private var freeingWithCommit: [PageNumber] = []
    /// Pages freed while the commit in progress was writing their objects: dropped when it ends.
    private var freedWhileFrozen: [PageNumber] = []
    /// Free pages that may be handed out, reused before the file grows.
    private var reusable: [PageNumber] = []
    private var reusableSet: Set<PageNumber> = []
    /// The next page-table page to scan for pages that were free when the store was opened; the
    /// scan visits each page-table page once, a few per allocation, so an open reads nothing.
    private var openScanCursor: UInt64 = 0
    private var openScanEnd: UInt64
    private(set) var commitInProgress = false

    /// Loads from disk and evictions, for metrics and benchmarks.
    private(set) var reads = 0
    /// Of `reads`, the pages read by a probe's caller without the store lock (`adopt`).
    private(set) var readsOutsideLock = 0
    private(set) var evictions = 0

    /// The pager of an existing `meta` whose committed root (from the superblock) was written by
    /// `committedGeneration`. Reads nothing.
    init(file: any StorageFile, root: PageTableRoot, committedGeneration: UInt64, budgetBytes: Int) {
        self.file = file
        self.root = root
        self.budgetBytes = budgetBytes
        nextGeneration = committedGeneration + 1
        openScanEnd = (root.pageCount + UInt64(PageTable.fanout) - 1) / UInt64(PageTable.fanout)
    }

    /// A new, empty page file: page 1 is the page table's first page; page 0 means "none".
    static func create(file: any StorageFile, budgetBytes: Int, firstGeneration: UInt64) -> MetadataPager {
        let pager = MetadataPager(file: file,
                                  root: PageTableRoot(page: PageNumber(1), version: .unwritten, levels: 1, pageCount: 2),
                                  committedGeneration: firstGeneration - 1, budgetBytes: budgetBytes)
        pager.openScanEnd = 0
        let table = PageTablePage()
        table.entries[0] = PageTableEntry(version: .unwritten, refcount: PageTableEntry.structural, kind: 0)
        table.entries[1] = PageTableEntry(version: .unwritten, refcount: PageTableEntry.structural, kind: PageKind.pageTable.rawValue)
        pager.insertFrame(PageNumber(1), Frame(object: table, kind: .pageTable, dirty: true))
        return pager
    }

    // MARK: Cache

    private func insertFrame(_ page: PageNumber, _ frame: Frame) {
        precondition(frames[page] == nil, "\(page) cached twice")
        frames[page] = frame
        clock.append(page)
        recharge(frame)
        if frame.dirty { noteDirtied(page, frame) }
        // Evicting here is safe: only clean pages go, and nothing changes a page it did not get
        // from `writable` (which makes it dirty). Amortized: after a trim that could not reach the
        // budget (dirty pages), the next waits for 1/16 of the budget more.
        if residentBytes > max(budgetBytes, trimFloor) { trim(protecting: page) }
    }

    private func dropFrame(_ page: PageNumber) {
        if let frame = frames.removeValue(forKey: page) {
            residentBytes -= frame.chargedBytes
            if frame.dirty { dirtyFrames -= 1 }
            frame.dirty = false   // gone: the freeze skips its `dirtiedPages` entry
        }
    }

    /// What a cached page costs beyond its object: the frame, its dictionary slot and ring entry.
    static let frameOverheadBytes = 96

    /// Measures `frame`'s object again and moves `residentBytes` by the difference.
    private func recharge(_ frame: Frame) {
        let bytes = frame.object.residentBytes + Self.frameOverheadBytes
        residentBytes += bytes - frame.chargedBytes
        frame.chargedBytes = bytes
    }

    /// Pages changed since the last commit began.
    private(set) var dirtyFrames = 0
    /// Every page that became dirty since the last commit began, so that a commit visits only
    /// those (never the whole cache) under the store lock. May hold pages since dropped or
    /// cleaned, and a page more than once: the freeze checks each against its frame.
    private var dirtiedPages: [(page: PageNumber, frame: Frame)] = []
    private var trimFloor = 0
    /// Frames `trim` has visited since it last evicted one (across calls).
    private var fruitlessScans = 0

    private func noteDirtied(_ page: PageNumber, _ frame: Frame) {
        dirtyFrames += 1
        dirtiedPages.append((page, frame))
    }

    /// True once changed pages take half the budget: the store should commit (bounded memory).
    var needsCommit: Bool { dirtyFrames * (MetadataPageFile.pageBytes + 512) > budgetBytes / 2 }

    /// Reads `version` of `page` from its slot, checks it, decodes it.
    private func load<T: MetadataPageObject>(_ page: PageNumber, version: PageVersion, as: T.Type) throws -> T {
        reads += 1
        onPageReadOrEvicted?()
        return try Self.readPage(page, version: version, kind: T.kind, from: file) { b throws(PageDecodingError) in try T(decoding: b) } as! T
    }

    /// One page read from `file`, checked and decoded: no pager state, so it runs without the
    /// store lock (`PageMiss`).
    static func readPage(_ page: PageNumber, version: PageVersion, kind: PageKind, from file: any StorageFile,
                         decode: (UnsafeRawBufferPointer) throws(PageDecodingError) -> any MetadataPageObject) throws -> any MetadataPageObject {
        guard version.isWritten else {
            throw StoreError.corrupted("\(page) (\(kind)) is in use but was never written")
        }
        var slot = [UInt8](repeating: 0, count: MetadataPageFile.pageBytes)
        var failure: StorageError?
        slot.withUnsafeMutableBytes { b in
            do throws(StorageError) {
                try file.readExactly(into: b, at: MetadataPageFile.slotOffset(page, slot: version.slot))
            } catch { failure = error }
        }
        if let failure {
            if case .io(let m) = failure, m.hasPrefix("short read") {
                throw StoreError.corrupted("\(page) (\(kind), \(version)) is past the end of meta")
            }
            throw StoreError(failure)
        }
        return try slot.withUnsafeBytes { b throws -> any MetadataPageObject in
            if let problem = MetadataPageFile.check(b, page: page, version: version, kind: kind) {
                throw StoreError.corrupted("\(page) (\(kind), \(version)): \(problem)")
            }
            do {
                return try decode(UnsafeRawBufferPointer(rebasing: b[MetadataPageFile.headerBytes...]))
            } catch {
                throw StoreError.corrupted("\(page) (\(kind), \(version)) is malformed: \(error)")
            }
        }
    }

    // MARK: Pages read without the store lock

    /// While true, a content page that is not cached is not read: it is noted in `misses` and
    /// `PageMiss` is thrown, so that a probe under the store lock learns which pages an operation
    /// needs, and the store reads them after letting go of the lock (Store+PageMisses.swift).
    /// Page-table pages are still read in place: few, and mostly cached.
    var missesThrow = false
    /// Called when a page is read in place or evicted: the store probes again (`Store.pageProbeWanted`).
    var onPageReadOrEvicted: (() -> Void)?
    private(set) var misses: [PageMiss] = []

    /// Takes the misses noted so far (each page once).
    func takeMisses() -> [PageMiss] {
        defer { misses = [] }
        var seen = Set<PageNumber>()
        return misses.filter { seen.insert($0.page).inserted }
    }

    /// A page read outside the lock joins the cache, unless it is cached meanwhile or the page
    /// table no longer names that version (a commit wrote a newer one, or the page was freed):
    /// a (page, version) pair names one content for good, so an equal version is these bytes.
    func adopt(_ miss: PageMiss, _ object: any MetadataPageObject) {
        guard frames[miss.page] == nil,
              let e = try? entry(miss.page), !e.isFree, !e.isStructural,
              e.kind == miss.kind.rawValue, e.version == miss.version else { return }
        reads += 1
        readsOutsideLock += 1
        insertFrame(miss.page, Frame(object: object, kind: miss.kind, dirty: false))
    }

    /// The cached object of `page`, or the one loaded at `version` (known by the caller), with the
    /// frame that holds it (one lookup for a writer as for a reader).
    private func frame<T: MetadataPageObject>(_ page: PageNumber, version: () throws -> PageVersion,
                                              as type: T.Type) throws -> (frame: Frame, object: T) {
        if let frame = frames[page] {
            frame.referenced = true
            guard let object = frame.object as? T else {
                throw StoreError.corrupted("\(page) is a \(frame.kind), not a \(T.kind)")
            }
            return (frame, object)
        }
        let version = try version()
        if missesThrow && !T.kind.isStructural {
            misses.append(PageMiss(page: page, version: version, kind: T.kind) { b throws(PageDecodingError) in try T(decoding: b) })
            throw misses.last!
        }
        let object = try load(page, version: version, as: type)
        let frame = Frame(object: object, kind: T.kind, dirty: false)
        insertFrame(page, frame)
        return (frame, object)
    }

    /// Marks `page`, cached in `frame`, dirty, swapping in a copy if a commit is writing the object.
    private func makeWritable<T: MetadataPageObject>(_ page: PageNumber, _ frame: Frame, as: T.Type) -> T {
        if frame.frozen {
            frame.object = (frame.object as! T).copy()
            frame.frozen = false
            recharge(frame)
        }
        if !frame.dirty { noteDirtied(page, frame) }
        frame.dirty = true
        return frame.object as! T
    }

    /// A content page, for reading. The object must not be changed (use `writable`).
    func read<T: MetadataPageObject>(_ page: PageNumber, as type: T.Type) throws -> T {
        try contentFrame(page, as: type).object
    }

    /// A content page, for changing: marked dirty (a copy if a commit is writing the cached object).
    func writable<T: MetadataPageObject>(_ page: PageNumber, as type: T.Type) throws -> T {
        assertNotFreezing("a change")
        return makeWritable(page, try contentFrame(page, as: type).frame, as: type)
    }

    private func contentFrame<T: MetadataPageObject>(_ page: PageNumber, as type: T.Type) throws -> (frame: Frame, object: T) {
        try frame(page, version: {
            let e = try entry(page)
            guard !e.isFree, !e.isStructural, e.kind == T.kind.rawValue else {
                throw StoreError.corrupted("\(page) is referenced as a \(T.kind) but the page table has it " +
                                           (e.isFree ? "free" : "as kind \(e.kind)"))
            }
            return e.version
        }, as: type)
    }

    /// Frames one `trim` visits at most: it runs under the store lock, and after a large commit
    /// turns many dirty pages clean the cache may be far over budget. What one call leaves, the
    /// next inserts (or the caller's loop, `trimmed` false) take.
    static let trimScanMax = 8192

    /// Evicts clean pages (CLOCK) until the cache is within its budget or only dirty, frozen and
    /// page-table pages are left, visiting at most `trimScanMax` frames. Call only between operations (see
    /// the notes above). Returns false when it stopped at that bound with work left.
    @discardableResult
    func trim(protecting protected: PageNumber? = nil) -> Bool {
        guard residentBytes > budgetBytes else { fruitlessScans = 0; return true }
        var scanned = 0
        // Two whole turns without an eviction (the first may only clear reference bits) mean
        // only dirty, frozen or protected pages are left.
        while residentBytes > budgetBytes && scanned < Self.trimScanMax && fruitlessScans < 2 * clock.count && !clock.isEmpty {
            if clockHand >= clock.count { clockHand = 0 }
            let page = clock[clockHand]
            scanned += 1
            guard let frame = frames[page] else {
                clock.swapAt(clockHand, clock.count - 1); clock.removeLast()
                continue
            }
            // Page-table pages stay once read: a commit looks up the entry of every page it
            // writes, and reading them back under the store lock cost a 32 M-chunk commit 713 ms.
            // They are 1/254 of the pages they describe. (The page table's root is one of them.)
            if frame.dirty || frame.frozen || frame.kind.isStructural || page == protected {
                clockHand += 1
                fruitlessScans += 1
            } else if frame.referenced {
                frame.referenced = false
                clockHand += 1
                fruitlessScans += 1
            } else {
                dropFrame(page)
                evictions += 1
                onPageReadOrEvicted?()
                fruitlessScans = 0
                clock.swapAt(clockHand, clock.count - 1); clock.removeLast()
            }
        }
        let withinBudget = residentBytes <= budgetBytes
        let stuck = !withinBudget && (fruitlessScans >= 2 * clock.count || clock.isEmpty)
        let stoppedAtBound = !withinBudget && !stuck
        if stuck { fruitlessScans = 0 }
        trimFloor = stuck ? residentBytes + budgetBytes / 16 : 0
        // Pages dropped elsewhere (freed) leave stale ring entries; compact when they dominate.
        if clock.count > 2 * frames.count + 64 {
            clock = clock.filter { frames[$0] != nil }
            clockHand = 0
        }
        return !stoppedAtBound
    }

    var cachedPageCount: Int { frames.count }

    /// What the cached page-table pages (never evicted) are counted at.
    var pageTableBytes: Int {
        frames.values.reduce(0) { $0 + ($1.kind.isStructural ? $1.chargedBytes : 0) }
    }

    /// Every cached frame measured now (tests compare it with `residentBytes`, which dirty pages
    /// that grew since they were charged may trail until the next commit takes them).
    var measuredResidentBytes: Int {
        frames.values.reduce(0) { $0 + $1.object.residentBytes + Self.frameOverheadBytes }
    }

    // MARK: Page table

    /// The page-table page holding `page`'s entry and the entry's index. Structural pages are read
    /// with the versions their parents' pointers hold, so the table never needs itself.
    private func tableLocation(_ page: PageNumber, writable: Bool) throws -> (PageTablePage, Int) {
        guard page.rawValue < root.pageCount else {
            throw StoreError.corrupted("\(page) is past the end of the page table (\(root.pageCount) pages)")
        }
        return try descend(to: page, writable: writable)
    }

    /// Walks from the root to the page-table page holding `page`'s entry. `writable` marks the
    /// path dirty; `makeMissing` (given only with `writable`) makes a child the path lacks, at the
    /// level given (1 = a page-table page), instead of failing.
    private func descend(to page: PageNumber, writable: Bool,
                         makeMissing: ((_ level: Int) throws -> PageNumber)? = nil) throws -> (PageTablePage, Int) {
        var current = root.page
        var version = root.version
        var level = root.levels
        var index = page.rawValue
        while level > 1 {
            let v = version
            let cached = try frame(current, version: { v }, as: PageDirectoryPage.self)
            let directory = writable ? makeWritable(current, cached.frame, as: PageDirectoryPage.self) : cached.object
            let span = PageTable.capacity(levels: level - 1)
            let slot = Int(index / span)
            index %= span
            if directory.children[slot].page == .none {
                guard let makeMissing else { throw StoreError.corrupted("the page table has no page for \(page)") }
                // An unwritten pointer lives only until the commit that writes the child.
                directory.children[slot] = (try makeMissing(level - 1), .unwritten)
            }
            current = directory.children[slot].page
            version = directory.children[slot].version
            level -= 1
        }
        let v = version
        let cached = try frame(current, version: { v }, as: PageTablePage.self)
        let table = writable ? makeWritable(current, cached.frame, as: PageTablePage.self) : cached.object
        return (table, Int(index))
    }

    func entry(_ page: PageNumber) throws -> PageTableEntry {
        let (table, i) = try tableLocation(page, writable: false)
        return table.entries[i]
    }

    private func updateEntry(_ page: PageNumber, _ body: (inout PageTableEntry) throws -> Void) throws {
        let (table, i) = try tableLocation(page, writable: true)
        try body(&table.entries[i])
    }

    func refcount(_ page: PageNumber) throws -> UInt32 { try entry(page).refcount }

    /// Sets a page's count directly: only tests of saturation use it.
    func overrideRefcount(_ page: PageNumber, _ count: UInt32) throws {
        assertNotFreezing("a count override")
        try updateEntry(page) { $0.refcount = count }
    }

    // MARK: Allocation and reference counts

    /// A new page holding `object`, with reference count 1, dirty.
    func allocate<T: MetadataPageObject>(_ object: T) throws -> PageNumber {
        assertNotFreezing("an allocation")
        let page = try takeFreePage()
        precondition(frames[page] == nil, "free \(page) is still cached")
        try updateEntry(page) { e in
            precondition(e.isFree, "\(page) handed out while in use")
            e = PageTableEntry(version: e.version, refcount: 1, kind: T.kind.rawValue)
        }
        insertFrame(page, Frame(object: object, kind: T.kind, dirty: true))
        return page
    }

    func retain(_ page: PageNumber) throws {
        assertNotFreezing("a retain")
        try updateEntry(page) { e in
            guard !e.isFree, !e.isStructural else {
                throw StoreError.corrupted("retain of \(e.isFree ? "free" : "structural") \(page)")
            }
            // Saturates one below `structural`: a page that reaches it is never freed (a leak,
            // never a use after free).
            if e.refcount < PageTableEntry.structural - 1 { e.refcount += 1 }
        }
    }

    /// Drops one reference; true when it was the last. The page is then free once the next
    /// commit is durable, and its cached object is gone.
    @discardableResult
    func release(_ page: PageNumber) throws -> Bool {
        assertNotFreezing("a release")
        var freed = false
        try updateEntry(page) { e in
            guard !e.isFree, !e.isStructural else {
                throw StoreError.corrupted("release of \(e.isFree ? "free" : "structural") \(page)")
            }
            if e.refcount == PageTableEntry.structural - 1 { return }
            e.refcount -= 1
            if e.refcount == 0 { freed = true; e.kind = 0 }
        }
        if freed {
            pendingFree.append(page)
            // A frozen object is still being written; `finishCommit` drops it.
            if let frame = frames[page] {
                if frame.frozen { freedWhileFrozen.append(page) } else { dropFrame(page) }
            }
        }
        return freed
    }

    private func takeFreePage() throws -> PageNumber {
        if reusable.isEmpty { try scanForPagesFreeAtOpen() }
        if let page = reusable.popLast() {
            reusableSet.remove(page)
            return page
        }
        return try extend()
    }

    /// Visits a few more page-table pages for pages that were free when the store was opened.
    private func scanForPagesFreeAtOpen() throws {
        var scanned = 0
        while reusable.isEmpty && openScanCursor < openScanEnd && scanned < 16 {
            let first = openScanCursor * UInt64(PageTable.fanout)
            let (table, _) = try tableLocation(PageNumber(first), writable: false)
            var freedSinceOpen: Set<PageNumber>?
            for (i, e) in table.entries.enumerated().reversed() where e.isFree {
                let page = PageNumber(first + UInt64(i))
                // Pages freed since the open are already on their way through `pendingFree`.
                if freedSinceOpen == nil { freedSinceOpen = Set(pendingFree).union(freeingWithCommit) }
                if page.rawValue < root.pageCount && !reusableSet.contains(page) && !freedSinceOpen!.contains(page) {
                    reusable.append(page)
                    reusableSet.insert(page)
                }
            }
            openScanCursor += 1
            scanned += 1
        }
    }

    /// A page past the current end; grows the page table as needed (its new pages take numbers
    /// from the end too, and are structural).
    private func extend() throws -> PageNumber {
        while true {
            let page = PageNumber(root.pageCount)
            root.pageCount += 1
            try growTable(toCover: page)
            if try !entry(page).isStructural { return page }
        }
    }

    private func newStructuralPage(_ object: any MetadataPageObject, kind: PageKind) throws -> PageNumber {
        let page = PageNumber(root.pageCount)
        root.pageCount += 1
        insertFrame(page, Frame(object: object, kind: kind, dirty: true))
        return page
    }

    /// Makes the table tall and wide enough to hold `page`'s entry, and marks every page it creates
    /// on the way structural.
    private func growTable(toCover page: PageNumber) throws {
        var created: [(PageNumber, PageKind)] = []
        while page.rawValue >= PageTable.capacity(levels: root.levels) {
            let top = PageDirectoryPage()
            top.children[0] = (root.page, root.version)
            let topPage = try newStructuralPage(top, kind: .pageDirectory)
            root = PageTableRoot(page: topPage, version: .unwritten, levels: root.levels + 1, pageCount: root.pageCount)
            created.append((topPage, .pageDirectory))
        }
        _ = try descend(to: page, writable: true) { level in
            let kind: PageKind = level == 1 ? .pageTable : .pageDirectory
            let child = try self.newStructuralPage(level == 1 ? PageTablePage() : PageDirectoryPage(), kind: kind)
            created.append((child, kind))
            return child
        }
        for (p, kind) in created {
            // Each new structural page needs its own entry (which may need more table).
            try growTable(toCover: p)
            try updateEntry(p) { $0 = PageTableEntry(version: .unwritten, refcount: PageTableEntry.structural, kind: kind.rawValue) }
        }
    }

    // MARK: Commits

    /// A commit's freeze, taken in steps (`continueFreeze`) so that the store can let go of its
    /// lock between them and readers are not held for the whole of it. Nothing may change a page
    /// until the batch is whole: the store makes changes wait (`freezing`), and the mutators
    /// (`writable`, `allocate`, `retain`, `release`) refuse to run meanwhile.
    private struct Freeze {
        var generation: UInt64
        var previousRootVersion: PageVersion
        /// The pages dirtied since the last commit began, in the order they became dirty.
        var listed: [(page: PageNumber, frame: Frame)]
        /// The next entry of `listed` to take.
        var nextListed = 0
        var pages: [CommitPage]
        /// Page-table pages made writable so far, by their first page: one lookup per page
        /// instead of a walk from the root.
        var tables: [UInt64: PageTablePage] = [:]
        /// The structural pages' walk, bottom-up from the root: the dirty directories being
        /// visited (deepest last), each with the next child to look at.
        var walk: [(page: PageNumber, level: Int, nextChild: Int)] = []
        var walkStarted = false
    }
    private var freeze: Freeze?

    /// True from `startCommit` until `continueFreeze` returns the batch.
    var freezing: Bool { freeze != nil }

    private func assertNotFreezing(_ what: StaticString) {
        precondition(freeze == nil, "\(what) of a metadata page while a commit freezes its pages")
    }

    /// With the store lock held: the whole freeze in one hold (a new store's first commit, tests).
    func beginCommit(generation: UInt64? = nil) throws -> CommitBatch {
        startCommit(generation: generation)
        while true {
            if let batch = try continueFreeze(stepsMax: .max) { return batch }
        }
    }

    /// With the store lock held: starts a commit of every page changed since the last one began.
    /// Takes no time per page; `continueFreeze` does that work. Until it returns the batch, no
    /// page may change (readers may run between its steps).
    func startCommit(generation: UInt64? = nil) {
        precondition(!commitInProgress, "one commit at a time")
        let generation = max(generation ?? nextGeneration, nextGeneration)
        var pages: [CommitPage] = []
        pages.reserveCapacity(dirtyFrames + 16)
        freeze = Freeze(generation: generation, previousRootVersion: root.version, listed: dirtiedPages, pages: pages)
        // What the freeze itself dirties (page-table pages) is found by the structural walk.
        dirtiedPages = []
        commitInProgress = true
        // Leaves `PagedArray` kept writable belong to the old generation from here on.
        nextGeneration = generation + 1
    }

    /// With the store lock held: gives up to about `stepsMax` changed pages their new version
    /// (the slot that does not hold the committed one) and freezes their objects (an object being
    /// written is never modified: `writable` hands out copies until `finishCommit`). Returns the
    /// batch to write once every changed page is in it, nil while there is more to do. On a
    /// failure (a damaged page table) the commit is undone and every change stays listed.
    func continueFreeze(stepsMax: Int) throws -> CommitBatch? {
        guard var f = freeze else { preconditionFailure("continueFreeze without startCommit") }
        freeze = nil
        do {
            let done = try freezeSteps(&f, stepsMax: stepsMax)
            guard done else { freeze = f; return nil }
        } catch {
            abandonFreeze(f)
            throw error
        }
        dirtyFrames = 0
        dirtiedPages = []
        freeingWithCommit = pendingFree
        pendingFree = []
        return CommitBatch(generation: f.generation, pages: f.pages, root: root, previousRootVersion: f.previousRootVersion)
    }

    /// Freezes `frame`, listed in the batch as `page` at `version`.
    private func take(_ page: PageNumber, _ frame: Frame, version: PageVersion, previous: PageVersion, into f: inout Freeze) {
        f.pages.append(CommitPage(page: page, kind: frame.kind, version: version, object: frame.object,
                                  frame: frame, previousVersion: previous))
        frame.dirty = false
        dirtyFrames -= 1
        frame.frozen = true
        recharge(frame)   // its final size: changes since it was charged are in it now
    }

    /// Content pages first: their new versions go into page-table entries, which dirties
    /// page-table pages; then the structural pages, bottom-up from the root. A frame is listed
    /// once per turn from clean to dirty, and one taken (or dropped) is no longer dirty, so each
    /// is taken once. True when the batch is whole.
    private func freezeSteps(_ f: inout Freeze, stepsMax: Int) throws -> Bool {
        var steps = 0
        let fanout = UInt64(PageTable.fanout)
        while f.nextListed < f.listed.count {
            if steps >= stepsMax { return false }
            let (page, frame) = f.listed[f.nextListed]
            guard frame.dirty && !frame.kind.isStructural else { f.nextListed += 1; continue }
            steps += 1
            let first = page.rawValue / fanout * fanout
            let entries: PageTablePage
            if let known = f.tables[first] {
                entries = known
            } else {
                // On a failure this entry is still the next one: `abandonFreeze` lists it again.
                entries = try tableLocation(page, writable: true).0
                f.tables[first] = entries
            }
            f.nextListed += 1
            let i = Int(page.rawValue - first)
            let previous = entries.entries[i].version
            let version = previous.next(generation: f.generation)
            entries.entries[i].version = version
            take(page, frame, version: version, previous: previous, into: &f)
        }
        if !f.walkStarted {
            f.walkStarted = true
            f.tables = [:]
            guard let frame = frames[root.page], frame.dirty else { return true }
            if root.levels == 1 {
                let next = root.version.next(generation: f.generation)
                take(root.page, frame, version: next, previous: root.version, into: &f)
                root.version = next
                return true
            }
            f.walk = [(root.page, root.levels, 0)]
        }
        // A directory is taken after its dirty children, whose new versions it records.
        while let (page, level, nextChild) = f.walk.last {
            if steps >= stepsMax { return false }
            steps += 1
            let directory = frames[page]!.object as! PageDirectoryPage
            if nextChild < directory.children.count {
                f.walk[f.walk.count - 1].nextChild += 1
                let child = directory.children[nextChild]
                guard child.page != .none, let childFrame = frames[child.page], childFrame.dirty else { continue }
                if level - 1 > 1 {
                    f.walk.append((child.page, level - 1, 0))
                } else {
                    let next = child.version.next(generation: f.generation)
                    take(child.page, childFrame, version: next, previous: child.version, into: &f)
                    directory.children[nextChild].version = next
                }
                continue
            }
            f.walk.removeLast()
            // Its pointer: the parent's slot it was reached by, or the root.
            let parent = f.walk.last.map { (frames[$0.page]!.object as! PageDirectoryPage, $0.nextChild - 1) }
            let previous = parent.map { $0.0.children[$0.1].version } ?? root.version
            let next = previous.next(generation: f.generation)
            take(page, frames[page]!, version: next, previous: previous, into: &f)
            if let (directory, slot) = parent { directory.children[slot].version = next } else { root.version = next }
        }
        return true
    }

    /// Undoes a freeze that failed part of the way: the pages it took get their versions back
    /// and are dirty again, and the ones it had not reached yet stay listed.
    private func abandonFreeze(_ f: Freeze) {
        abandonCommit(CommitBatch(generation: f.generation, pages: f.pages, root: root,
                                  previousRootVersion: f.previousRootVersion), revert: true)
        for entry in f.listed[f.nextListed...] where entry.frame.dirty { dirtiedPages.append(entry) }
    }

    /// Without the store lock: encodes and writes the batch's pages into their slots. The caller
    /// then syncs `meta` and writes the superblock naming `batch.root`.
    static func writeCommit(_ batch: CommitBatch, to file: any StorageFile) throws(StorageError) {
        let bytes = MetadataPageFile.pageBytes
        // Runs of consecutive slots go out in one write of up to 1 MiB.
        let runPagesMax = 256
        var batch = batch
        batch.pages.sort { $0.page < $1.page }
        var buffer = [UInt8](repeating: 0, count: bytes * runPagesMax)
        var inFlight: [(offset: UInt64, length: UInt64)] = []
        var inFlightBytes: UInt64 = 0
        var k = 0
        while k < batch.pages.count {
            var n = 0
            let start = MetadataPageFile.slotOffset(batch.pages[k].page, slot: batch.pages[k].version.slot)
            while k + n < batch.pages.count && n < runPagesMax {
                let p = batch.pages[k + n]
                guard MetadataPageFile.slotOffset(p.page, slot: p.version.slot) == start + UInt64(n * bytes) else { break }
                buffer.withUnsafeMutableBytes { all in
                    let slot = UnsafeMutableRawBufferPointer(rebasing: all[n * bytes..<(n + 1) * bytes])
                    slot.initializeMemory(as: UInt8.self, repeating: 0)
                    p.object.encode(into: UnsafeMutableRawBufferPointer(rebasing: slot[MetadataPageFile.headerBytes...]))
                    MetadataPageFile.seal(slot, page: p.page, generation: p.version.generation, kind: p.kind)
                }
                n += 1
            }
            var failure: StorageError?
            buffer.withUnsafeBytes { b in
                do throws(StorageError) { try file.write(UnsafeRawBufferPointer(rebasing: b[..<(n * bytes)]), at: start) } catch { failure = error }
            }
            if let failure { throw failure }
            k += n
            // At most `writeBackRunsMax` runs and `writeBackBytesMax` bytes of the commit in the
            // device's queue at once: the sync that follows finds little left, and a read of
            // another page waits behind a slice.
            let length = UInt64(n * bytes)
            file.writeBack(offset: start, length: length, waiting: false)
            inFlight.append((start, length))
            inFlightBytes += length
            while inFlightBytes > writeBackBytesMax || inFlight.count > writeBackRunsMax, let (offset, length) = inFlight.first {
                file.writeBack(offset: offset, length: length, waiting: true)
                inFlight.removeFirst()
                inFlightBytes -= length
            }
        }
    }

    /// What a commit's page writes may have in the device's queue at once (`writeCommit`): a
    /// commit's pages are mostly runs of one page, and the block layer queues 256 requests.
    static let writeBackBytesMax: UInt64 = 4 << 20
    static let writeBackRunsMax = 32

    /// With the store lock held, once the superblock naming `batch.root` is durable: the batch's
    /// objects may change again, and the pages freed before the commit may be reused.
    func finishCommit(_ batch: CommitBatch) {
        precondition(commitInProgress)
        for p in batch.pages {
            // A writer that changed the page meanwhile got a copy and unfroze the frame itself.
            guard let frame = p.frame, frame.object === p.object else { continue }
            frame.frozen = false
        }
        for page in freedWhileFrozen { dropFrame(page) }
        freedWhileFrozen = []
        for page in freeingWithCommit {
            if !reusableSet.contains(page) {
                reusable.append(page)
                reusableSet.insert(page)
            }
        }
        freeingWithCommit = []
        commitInProgress = false
    }

    /// With the store lock held, after a commit whose pages could not all be written (nothing was
    /// synced and no superblock names them): every page and pointer gets its previous version back
    /// and is changed again, so the next commit writes it; the pages it would have freed wait for
    /// that commit. After a failed sync the caller poisons the store instead (`revert` false).
    func abandonCommit(_ batch: CommitBatch, revert: Bool = false) {
        for p in batch.pages { frames[p.page]?.frozen = false }
        for page in freedWhileFrozen { dropFrame(page) }
        freedWhileFrozen = []
        pendingFree.append(contentsOf: freeingWithCommit)
        freeingWithCommit = []
        commitInProgress = false
        guard revert else { return }
        root.version = batch.previousRootVersion
        for p in batch.pages where !p.kind.isStructural {
            // The page-table page holding the entry is in the batch too: it is dirty again below.
            try? updateEntry(p.page) { $0.version = p.previousVersion }
        }
        var previousVersions: [PageNumber: PageVersion] = [:]
        for p in batch.pages { previousVersions[p.page] = p.previousVersion }
        func restore(_ page: PageNumber, level: Int) {
            guard level > 1, let directory = frames[page]?.object as? PageDirectoryPage else { return }
            for i in 0..<directory.children.count where directory.children[i].page != .none {
                let child = directory.children[i].page
                if let old = previousVersions[child] { directory.children[i].version = old }
                restore(child, level: level - 1)
            }
        }
        restore(root.page, level: root.levels)
        for p in batch.pages {
            guard let frame = frames[p.page] else { continue }
            if !frame.dirty { noteDirtied(p.page, frame) }
            frame.dirty = true
        }
    }
}

/// Opaque bytes in one page (the image table and other small records): u32 length, then bytes.
final class BlobPage: MetadataPageObject {
    static let kind = PageKind.blob
    static let capacity = MetadataPageFile.payloadBytes - 4
    var bytes: [UInt8]

    init(bytes: [UInt8]) {
        precondition(bytes.count <= BlobPage.capacity)
        self.bytes = bytes
    }

    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        let n = Int(UInt32(littleEndian: payload.loadUnaligned(fromByteOffset: 0, as: UInt32.self)))
        guard n <= BlobPage.capacity else { throw PageDecodingError("blob length \(n) exceeds a page") }
        bytes = Array(payload[4..<4 + n])
    }

    func encode(into payload: UnsafeMutableRawBufferPointer) {
        payload.storeBytes(of: UInt32(bytes.count).littleEndian, toByteOffset: 0, as: UInt32.self)
        payload.baseAddress!.advanced(by: 4).copyMemory(from: bytes, byteCount: bytes.count)
    }

    func copy() -> BlobPage { BlobPage(bytes: bytes) }
    var residentBytes: Int { 64 + bytes.count }
}
