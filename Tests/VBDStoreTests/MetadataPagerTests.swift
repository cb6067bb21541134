import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// The pager on a simulated disk: the test plays the store's part (the superblock is a variable).
private final class PagerHarness {
    let disk: SimulatedDisk
    var file: any StorageFile
    var pager: MetadataPager
    /// What a superblock would hold: the last durable root and its generation.
    var committedRoot: PageTableRoot?
    var committedGeneration: UInt64 = 0
    let budget: Int

    init(seed: UInt64, budget: Int = 64 << 20) throws {
        disk = SimulatedDisk(seed: seed)
        let directory = disk.directory()
        file = try directory.openFile("meta", create: true)
        try directory.syncDirectory()
        self.budget = budget
        pager = MetadataPager.create(file: file, budgetBytes: budget, firstGeneration: 1)
    }

    /// A complete commit: pages written and synced, then the "superblock" updated.
    @discardableResult
    func commit() throws -> CommitBatch {
        let batch = try pager.beginCommit()
        try MetadataPager.writeCommit(batch, to: file)
        try file.sync()
        committedRoot = batch.root
        committedGeneration = batch.generation
        pager.finishCommit(batch)
        return batch
    }

    /// Power cut, reboot, and a pager opened from the last committed root.
    func crashAndReopen() throws {
        disk.powerLoss()
        disk.reboot()
        try reopen()
    }

    func reopen() throws {
        file = try disk.directory().openFile("meta", create: false)
        pager = MetadataPager(file: file, root: committedRoot!, committedGeneration: committedGeneration, budgetBytes: budget)
    }
}

private func blob(_ seed: UInt64, _ n: Int = 100) -> [UInt8] {
    var g = SplitMix64(seed: seed)
    return (0..<n).map { _ in UInt8(truncatingIfNeeded: g.next()) }
}

@Suite struct MetadataPagerTests {
    @Test func pagesSurviveACommitAndAReopenAcrossATwoLevelPageTable() throws {
        let h = try PagerHarness(seed: 1)
        var pages: [PageNumber: UInt64] = [:]
        // More pages than one page-table page covers: the table grows a directory level.
        for k in 0..<700 as Range<UInt64> {
            pages[try h.pager.allocate(BlobPage(bytes: blob(k)))] = k
        }
        #expect(h.pager.root.levels == 2)
        try h.commit()
        try h.reopen()
        #expect(h.pager.cachedPageCount == 0)
        for (page, k) in pages {
            #expect(try h.pager.read(page, as: BlobPage.self).bytes == blob(k))
            #expect(try h.pager.refcount(page) == 1)
        }
        #expect(h.pager.reads >= 700)
    }

    @Test func aCommitRewritesOnlyWhatChanged() throws {
        let h = try PagerHarness(seed: 2)
        var pages: [PageNumber] = []
        for k in 0..<600 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k)))) }
        let first = try h.commit()
        #expect(first.pages.count > 600)
        // Change three pages: the commit writes them and the page-table pages that hold their
        // entries (and the directory above), nothing else.
        for p in [pages[0], pages[300], pages[599]] {
            try h.pager.writable(p, as: BlobPage.self).bytes = [1, 2, 3]
        }
        let second = try h.commit()
        let content = second.pages.filter { $0.kind == .blob }.map(\.page)
        #expect(Set(content) == Set([pages[0], pages[300], pages[599]]))
        #expect(second.pages.count <= 3 + 3 + 1)
        // An idle commit writes nothing.
        #expect(try h.commit().pages.isEmpty)
    }

    @Test func aCrashAnywhereInACommitLeavesTheLastCommittedStateReadable() throws {
        for seed in 0..<12 as Range<UInt64> {
            let h = try PagerHarness(seed: seed)
            var expected: [PageNumber: [UInt8]] = [:]
            for k in 0..<280 as Range<UInt64> {
                let bytes = blob(seed &* 1000 &+ k)
                expected[try h.pager.allocate(BlobPage(bytes: bytes))] = bytes
            }
            try h.commit()
            // Rewrite half, free some, add more: then cut the power before the "superblock" write.
            var g = SplitMix64(seed: seed)
            for (page, _) in expected where g.next() % 2 == 0 {
                try h.pager.writable(page, as: BlobPage.self).bytes = blob(g.next(), 3000)
            }
            for (page, _) in expected where g.next() % 5 == 0 { try h.pager.release(page) }
            for k in 0..<100 as Range<UInt64> { _ = try h.pager.allocate(BlobPage(bytes: blob(k + 77))) }
            let batch = try h.pager.beginCommit()
            try MetadataPager.writeCommit(batch, to: h.file)
            if seed % 2 == 0 { try h.file.sync() }   // durable pages, but no superblock
            try h.crashAndReopen()
            for (page, bytes) in expected {
                #expect(try h.pager.read(page, as: BlobPage.self).bytes == bytes, "seed \(seed) \(page)")
                #expect(try h.pager.refcount(page) == 1)
            }
        }
    }

    /// A commit frozen a few pages per step, with reads between the steps (pages evicted and read
    /// back from their slots), gives every page the version one hold would, and what it writes
    /// reads back after a reopen.
    @Test(arguments: [1, 3, 40])
    func aFreezeInStepsWithReadsBetweenThemCommitsWhatOneHoldWould(stepsMax: Int) throws {
        for seed in 0..<4 as Range<UInt64> {
            // A small cache: reads between the steps load clean pages from their slots.
            let oneHold = try PagerHarness(seed: seed, budget: 96 << 10)
            let inSteps = try PagerHarness(seed: seed, budget: 96 << 10)
            var expected: [PageNumber: [UInt8]] = [:]
            func change(_ h: PagerHarness, record: Bool) throws {
                var g = SplitMix64(seed: seed &* 31 &+ 7)
                var pages: [PageNumber] = []
                for k in 0..<600 as Range<UInt64> {
                    let bytes = blob(seed &* 1000 &+ k)
                    let page = try h.pager.allocate(BlobPage(bytes: bytes))
                    pages.append(page)
                    if record { expected[page] = bytes }
                }
                try h.commit()
                for page in pages where g.next() % 3 == 0 {
                    let bytes = blob(g.next(), 200)
                    try h.pager.writable(page, as: BlobPage.self).bytes = bytes
                    if record { expected[page] = bytes }
                }
                for page in pages where g.next() % 7 == 0 {
                    try h.pager.release(page)
                    if record { expected[page] = nil }
                }
                for k in 0..<300 as Range<UInt64> {
                    let bytes = blob(k &+ 5000)
                    let page = try h.pager.allocate(BlobPage(bytes: bytes))
                    if record { expected[page] = bytes }
                }
                h.pager.trim()
            }
            try change(oneHold, record: true)
            try change(inSteps, record: false)
            #expect(oneHold.pager.root.levels == 2)
            let whole = try oneHold.pager.beginCommit()
            inSteps.pager.startCommit()
            var g = SplitMix64(seed: seed)
            let live = Array(expected.keys)
            var steps = 0
            var stepped: CommitBatch?
            while stepped == nil {
                stepped = try inSteps.pager.continueFreeze(stepsMax: stepsMax)
                steps += 1
                #expect(inSteps.pager.freezing == (stepped == nil))
                for _ in 0..<3 {
                    let page = live[Int(g.next() % UInt64(live.count))]
                    #expect(try inSteps.pager.read(page, as: BlobPage.self).bytes == expected[page], "seed \(seed) \(page)")
                }
                inSteps.pager.trim()
            }
            let batch = try #require(stepped)
            #expect(steps > whole.pages.count / (stepsMax * 2), "\(steps) steps for \(whole.pages.count) pages")
            #expect(batch.root == whole.root)
            let versions = { (b: CommitBatch) in Dictionary(uniqueKeysWithValues: b.pages.map { ($0.page, $0.version) }) }
            #expect(versions(batch) == versions(whole))
            for h in [oneHold, inSteps] {
                let b = h === oneHold ? whole : batch
                try MetadataPager.writeCommit(b, to: h.file)
                try h.file.sync()
                h.committedRoot = b.root
                h.committedGeneration = b.generation
                h.pager.finishCommit(b)
                try h.crashAndReopen()
                for (page, bytes) in expected {
                    #expect(try h.pager.read(page, as: BlobPage.self).bytes == bytes, "seed \(seed) \(page)")
                }
            }
        }
    }

    /// Nothing may change a page while a commit freezes: a change would land in the commit or
    /// not depending on whether its page was reached yet.
    @Test func aChangeWhileACommitFreezesTraps() async {
        await #expect(processExitsWith: .failure) {
            let h = try PagerHarness(seed: 9)
            let page = try h.pager.allocate(BlobPage(bytes: blob(1)))
            _ = try h.pager.allocate(BlobPage(bytes: blob(2)))
            h.pager.startCommit()
            _ = try h.pager.continueFreeze(stepsMax: 1)
            _ = try h.pager.writable(page, as: BlobPage.self)
        }
    }

    @Test func rotInTheCommittedSlotIsReportedNeverReadAsTheOlderVersion() throws {
        let h = try PagerHarness(seed: 3)
        let page = try h.pager.allocate(BlobPage(bytes: blob(1)))
        try h.commit()
        try h.pager.writable(page, as: BlobPage.self).bytes = blob(2)
        try h.commit()
        let version = try h.pager.entry(page).version
        // The other slot (older version) may rot: nothing reads it.
        h.disk.flipByte(file: "meta", at: Int(MetadataPageFile.slotOffset(page, slot: 1 - version.slot)) + 100)
        try h.reopen()
        #expect(try h.pager.read(page, as: BlobPage.self).bytes == blob(2))
        // The committed slot rots: an error naming the page, not the older bytes.
        h.disk.flipByte(file: "meta", at: Int(MetadataPageFile.slotOffset(page, slot: version.slot)) + 100)
        try h.reopen()
        #expect(throws: StoreError.self) { _ = try h.pager.read(page, as: BlobPage.self) }
        do { _ = try h.pager.read(page, as: BlobPage.self) } catch let e as StoreError {
            #expect(e.description.contains("checksum"))
        }
    }

    @Test func aLostWriteIsReportedByItsGeneration() throws {
        let h = try PagerHarness(seed: 4)
        let page = try h.pager.allocate(BlobPage(bytes: blob(1)))
        try h.commit()
        try h.pager.writable(page, as: BlobPage.self).bytes = blob(2)
        try h.commit()
        try h.pager.writable(page, as: BlobPage.self).bytes = blob(3)
        try h.commit()
        // The disk "forgets" the last write of the page: its slot holds the generation-1 bytes.
        let version = try h.pager.entry(page).version
        var old = [UInt8](repeating: 0, count: MetadataPageFile.pageBytes)
        let otherSlot = MetadataPageFile.slotOffset(page, slot: 1 - version.slot)
        let mine = MetadataPageFile.slotOffset(page, slot: version.slot)
        // Slot holding generation 2 is the other one; copy generation 2's slot over generation 3's.
        try old.withUnsafeMutableBytes { b throws in try h.file.readExactly(into: b, at: otherSlot) }
        try old.withUnsafeBytes { b throws in try h.file.write(b, at: mine) }
        try h.reopen()
        do {
            _ = try h.pager.read(page, as: BlobPage.self)
            Issue.record("a stale slot was read")
        } catch let e as StoreError {
            #expect(e.description.contains("generation"))
        }
        // A page written into another page's slot (a misdirected write) is caught by its number.
        let other = try h.pager.allocate(BlobPage(bytes: blob(9)))
        try h.commit()
        let v = try h.pager.entry(other).version
        try old.withUnsafeBytes { b throws in try h.file.write(b, at: MetadataPageFile.slotOffset(other, slot: v.slot)) }
        try h.reopen()
        do {
            _ = try h.pager.read(other, as: BlobPage.self)
            Issue.record("a misdirected write was read")
        } catch let e as StoreError {
            #expect(e.description.contains("misdirected"))
        }
    }

    /// A commit starts the write-back of every run it writes and waits for the oldest once more
    /// than `writeBackRunsMax` runs or `writeBackBytesMax` bytes are in flight, so that the sync
    /// after it finds little left and a read waits behind a slice of the commit.
    @Test func aCommitPacesTheWriteBackOfItsPages() throws {
        let h = try PagerHarness(seed: 12)
        var pages: [PageNumber] = []
        for k in 0..<2000 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k)))) }
        try h.commit()
        // Every third page: runs of one page, as random changes make.
        for page in pages.enumerated().filter({ $0.offset % 3 == 0 }).map(\.element) {
            try h.pager.writable(page, as: BlobPage.self).bytes = blob(7)
        }
        let recorder = WriteBackRecorder(h.file)
        let batch = try h.pager.beginCommit()
        try MetadataPager.writeCommit(batch, to: recorder)
        #expect(recorder.started >= 600, "\(recorder.started) write-backs started")
        #expect(recorder.unstartedWrites == 0)
        #expect(recorder.mostInFlight.runs <= MetadataPager.writeBackRunsMax + 1)
        #expect(recorder.mostInFlight.bytes <= MetadataPager.writeBackBytesMax + (1 << 20))
        #expect(recorder.waited > 0)
    }

    @Test func aWriterDuringACommitGetsACopyAndTheCommitWritesTheFrozenBytes() throws {
        let h = try PagerHarness(seed: 5)
        let page = try h.pager.allocate(BlobPage(bytes: blob(1)))
        try h.commit()
        try h.pager.writable(page, as: BlobPage.self).bytes = blob(2)
        let batch = try h.pager.beginCommit()
        let frozen = batch.pages.first { $0.page == page }!.object as! BlobPage
        // A writer while the commit is in flight: a new object, the frozen one is untouched.
        let live = try h.pager.writable(page, as: BlobPage.self)
        #expect(live !== frozen)
        live.bytes = blob(3)
        #expect(frozen.bytes == blob(2))
        try MetadataPager.writeCommit(batch, to: h.file)
        try h.file.sync()
        h.committedRoot = batch.root
        h.committedGeneration = batch.generation
        h.pager.finishCommit(batch)
        #expect(try h.pager.read(page, as: BlobPage.self).bytes == blob(3))
        // Reopened at that commit: generation 2's bytes.
        let root = h.committedRoot!, generation = h.committedGeneration
        try h.reopen()
        #expect(try h.pager.read(page, as: BlobPage.self).bytes == blob(2))
        _ = (root, generation)
    }

    @Test func freedPagesAreReusedOnlyAfterTheCommitThatFreesThemIsDurable() throws {
        let h = try PagerHarness(seed: 6)
        let a = try h.pager.allocate(BlobPage(bytes: blob(1)))
        try h.commit()
        #expect(try h.pager.release(a))
        let b = try h.pager.allocate(BlobPage(bytes: blob(2)))
        #expect(b != a)
        let batch = try h.pager.beginCommit()
        // While the freeing commit is in flight, still not reusable.
        let c = try h.pager.allocate(BlobPage(bytes: blob(3)))
        #expect(c != a)
        try MetadataPager.writeCommit(batch, to: h.file)
        try h.file.sync()
        h.pager.finishCommit(batch)
        let d = try h.pager.allocate(BlobPage(bytes: blob(4)))
        #expect(d == a)
        #expect(try h.pager.read(d, as: BlobPage.self).bytes == blob(4))
    }

    @Test func pagesFreeWhenTheStoreWasOpenedAreFoundWithoutGrowingTheFile() throws {
        let h = try PagerHarness(seed: 7)
        var pages: [PageNumber] = []
        for k in 0..<400 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k)))) }
        try h.commit()
        for p in pages[100..<200] { try h.pager.release(p) }
        try h.commit()
        try h.reopen()
        let end = h.pager.root.pageCount
        var reused: Set<PageNumber> = []
        for k in 0..<100 as Range<UInt64> { reused.insert(try h.pager.allocate(BlobPage(bytes: blob(k + 1000)))) }
        #expect(h.pager.root.pageCount == end)
        #expect(reused == Set(pages[100..<200]))
    }

    @Test func theCacheStaysWithinItsBudgetAndReloadsEvictedPages() throws {
        let h = try PagerHarness(seed: 8, budget: 64 << 10)
        var pages: [PageNumber] = []
        for k in 0..<500 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k, 2000)))) }
        // Dirty pages stay until committed.
        h.pager.trim()
        #expect(h.pager.cachedPageCount >= 500)
        try h.commit()
        h.pager.trim()
        #expect(h.pager.residentBytes <= 64 << 10)
        let readsBefore = h.pager.reads
        for (k, p) in pages.enumerated() {
            #expect(try h.pager.read(p, as: BlobPage.self).bytes == blob(UInt64(k), 2000))
            h.pager.trim()
            #expect(h.pager.residentBytes <= 64 << 10)
        }
        #expect(h.pager.reads > readsBefore + 400)
        #expect(h.pager.evictions > 400)
    }

    /// Pages change size in place (a dedup bucket grows, a blob is rewritten): the cache's count
    /// follows what each page holds once a commit takes it, and an eviction takes off what was
    /// counted, so the count neither drifts below what the cache holds nor lets it pass its budget.
    @Test func theCacheCountsPagesThatGrewInPlace() throws {
        let budget = 256 << 10
        let h = try PagerHarness(seed: 11, budget: 64 << 20)
        var pages: [PageNumber] = []
        for k in 0..<400 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k, 8)))) }
        try h.commit()
        #expect(h.pager.residentBytes == h.pager.measuredResidentBytes)
        for (k, p) in pages.enumerated() { try h.pager.writable(p, as: BlobPage.self).bytes = blob(UInt64(k), 3000) }
        try h.commit()
        #expect(h.pager.residentBytes == h.pager.measuredResidentBytes)
        #expect(h.pager.residentBytes > 400 * 3000)
        h.pager.budgetBytes = budget
        while !h.pager.trim() {}
        #expect(h.pager.residentBytes == h.pager.measuredResidentBytes)
        #expect(h.pager.measuredResidentBytes <= budget)
        for (k, p) in pages.enumerated() {
            #expect(try h.pager.read(p, as: BlobPage.self).bytes == blob(UInt64(k), 3000))
        }
        h.pager.trim()
        #expect(h.pager.residentBytes == h.pager.measuredResidentBytes)
        #expect(h.pager.measuredResidentBytes <= budget + 4096 + MetadataPager.frameOverheadBytes)
    }

    /// Page-table pages are never evicted: a commit looks up the entry of each page it writes
    /// under the store lock, which must not wait for reads. Reading an evicted content page
    /// then reads that page alone.
    @Test func pageTablePagesStayCachedWhileContentPagesGo() throws {
        let h = try PagerHarness(seed: 12)
        var pages: [PageNumber] = []
        for k in 0..<2000 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k, 50)))) }
        try h.commit()
        try h.reopen()   // nothing cached
        for p in pages { _ = try h.pager.read(p, as: BlobPage.self) }
        h.pager.budgetBytes = 1
        while !h.pager.trim() {}
        let tablePages = h.pager.cachedPageCount
        #expect(tablePages >= 2000 / PageTable.fanout, "the page table's pages are still cached")
        #expect(tablePages < 2000 / PageTable.fanout + 4)
        let before = h.pager.reads
        for p in pages.prefix(50) {
            _ = try h.pager.read(p, as: BlobPage.self)
            h.pager.trim()
        }
        #expect(h.pager.reads == before + 50, "one read per content page, none for its page-table page")
    }

    /// A commit visits the pages that changed, each once, whatever else is cached: pages changed
    /// twice, freed after changing, or new since the last commit.
    @Test func aCommitTakesEachChangedPageOnceAmongManyCleanOnes() throws {
        let h = try PagerHarness(seed: 9)
        var pages: [PageNumber] = []
        for k in 0..<3000 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k)))) }
        try h.commit()
        for p in pages { _ = try h.pager.read(p, as: BlobPage.self) }   // all cached and clean
        try h.pager.writable(pages[10], as: BlobPage.self).bytes = [1]
        try h.pager.writable(pages[10], as: BlobPage.self).bytes = [2]
        try h.pager.writable(pages[2000], as: BlobPage.self).bytes = [3]
        try h.pager.writable(pages[2999], as: BlobPage.self).bytes = [4]
        try h.pager.release(pages[2999])
        let added = try h.pager.allocate(BlobPage(bytes: [5]))
        let batch = try h.commit()
        let content = batch.pages.filter { $0.kind == .blob }.map(\.page)
        #expect(content.sorted() == [pages[10], pages[2000], added].sorted())
        #expect(Set(batch.pages.map(\.page)).count == batch.pages.count, "no page twice")
        try h.reopen()
        #expect(try h.pager.read(pages[10], as: BlobPage.self).bytes == [2])
        #expect(try h.pager.read(added, as: BlobPage.self).bytes == [5])
    }

    /// A trim runs under the store lock: one call visits at most `trimScanMax` frames, and the
    /// calls that follow (the commit's loop, later inserts) bring the cache within budget. With
    /// only dirty pages left a trim gives up after two turns instead of spinning.
    @Test func aTrimIsBoundedAndRepeatedTrimsReachTheBudget() throws {
        let budget = 64 << 10
        let h = try PagerHarness(seed: 10, budget: 16 << 20)
        var pages: [PageNumber] = []
        for k in 0..<20_000 as Range<UInt64> { pages.append(try h.pager.allocate(BlobPage(bytes: blob(k, 60)))) }
        try h.commit()
        h.pager.budgetBytes = budget
        var calls = 0
        var evictionsAfterFirstCall = -1
        while !h.pager.trim() {
            calls += 1
            if calls == 1 { evictionsAfterFirstCall = h.pager.evictions }
            #expect(calls < 100)
            if calls >= 100 { break }
        }
        #expect(calls >= 2, "20,000 referenced frames take more than one bounded call")
        #expect(evictionsAfterFirstCall == 0, "the first call only cleared reference bits")
        // The page table's 79 pages stay (pageTablePagesStayCachedWhileContentPagesGo).
        #expect(h.pager.residentBytes <= budget + h.pager.pageTableBytes)
        // Only dirty pages: every one is changed, nothing can go; the trim reports it is done.
        for p in pages.prefix(6000) { _ = try h.pager.writable(p, as: BlobPage.self) }
        calls = 0
        while !h.pager.trim() { calls += 1; if calls >= 100 { break } }
        #expect(calls < 100)
        #expect(h.pager.cachedPageCount >= 6000)
    }

    @Test func sharedPagesAreFreedByTheirLastReference() throws {
        let h = try PagerHarness(seed: 9)
        let p = try h.pager.allocate(BlobPage(bytes: blob(1)))
        try h.pager.retain(p)
        try h.pager.retain(p)
        #expect(try h.pager.refcount(p) == 3)
        #expect(try !h.pager.release(p))
        #expect(try !h.pager.release(p))
        #expect(try h.pager.release(p))
        #expect(throws: StoreError.self) { try h.pager.release(p) }
        #expect(throws: StoreError.self) { try h.pager.retain(p) }
        #expect(throws: StoreError.self) { _ = try h.pager.read(p, as: BlobPage.self) }
        // Structural pages cannot be counted.
        #expect(throws: StoreError.self) { try h.pager.release(PageNumber(1)) }
        #expect(throws: StoreError.self) { try h.pager.retain(PageNumber(0)) }
    }

    @Test func aPageOfTheWrongKindOrPastTheEndIsAnError() throws {
        let h = try PagerHarness(seed: 10)
        let p = try h.pager.allocate(BlobPage(bytes: blob(1)))
        try h.commit()
        try h.reopen()
        #expect(throws: StoreError.self) { _ = try h.pager.read(p, as: PageTablePage.self) }
        #expect(throws: StoreError.self) { _ = try h.pager.read(PageNumber(1_000_000), as: BlobPage.self) }
    }
}

/// A file that passes everything through and records the write-backs `writeCommit` asks for.
private final class WriteBackRecorder: StorageFile {
    let file: any StorageFile
    private var inFlight: [(offset: UInt64, length: UInt64)] = []
    private(set) var started = 0
    private(set) var waited = 0
    private(set) var mostInFlight = (runs: 0, bytes: UInt64(0))
    /// Writes whose range no write-back has started (yet).
    private(set) var unstartedWrites = 0
    private var written: [(offset: UInt64, length: UInt64)] = []
    init(_ file: any StorageFile) { self.file = file }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        try file.read(into: buffer, at: offset)
    }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try file.write(bytes, at: offset)
        written.append((offset, UInt64(bytes.count)))
        unstartedWrites += 1
    }
    func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError) {
        try file.write(gathering: parts, at: offset)
    }
    func sync() throws(StorageError) { try file.sync() }
    func size() throws(StorageError) -> UInt64 { try file.size() }
    func truncate(to size: UInt64) throws(StorageError) { try file.truncate(to: size) }
    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) { try file.punchHole(offset: offset, length: length) }
    func writeBack(offset: UInt64, length: UInt64, waiting: Bool) {
        if waiting {
            inFlight.removeAll { $0.offset == offset && $0.length == length }
            waited += 1
            return
        }
        if let i = written.firstIndex(where: { $0.offset == offset && $0.length == length }) {
            written.remove(at: i)
            unstartedWrites -= 1
        }
        started += 1
        inFlight.append((offset, length))
        let bytes = inFlight.reduce(0) { $0 + $1.length }
        mostInFlight = (max(mostInFlight.runs, inFlight.count), max(mostInFlight.bytes, bytes))
    }
    func close() { file.close() }
}
