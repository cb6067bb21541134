import VBDCore

// Metadata pages read without the store lock.
//
// A metadata page that is not cached is read from `meta` by whoever needs it, and the block I/O
// paths need pages while holding the store lock. At 32 M chunks with a 256 MiB metadata cache
// most dedup buckets and map leaves are not cached, and a read from a disk busy writing back the
// data file took up to 388 ms with the lock held (1.3 ms of it on the CPU): every other request
// of every volume waited. So a read's locked step runs with `MetadataPager.missesThrow` set and is
// abandoned at its first uncached page; the pages it missed are read after the lock is released,
// they join the cache under the lock again, and the step runs again. A write's locked steps change
// state as they go and cannot be abandoned, so a probe walks the same pages read-only first, in
// the same hold. Either repeats (a page read can lead to deeper pages) a bounded number of rounds;
// what a probe did not foresee, or what was evicted meanwhile, is still read under the lock.

/// What one locked round of `Store.withLockAfterLoadingPages` or `withLockReadingPagesOutside` came to.
enum PageLoadingOutcome<T> {
    case done(T)
    /// Pages to read without the lock before the next round.
    case missed([PageMiss])
}

extension Store {
    /// Takes `mutex` for a change of metadata. While a commit freezes its pages in steps
    /// (`pager.freezing`, see `checkpoint`) nothing may change them: the change lets go of the
    /// lock and waits for `commitGate`, which the commit holds until the freeze is whole. The
    /// caller must hold none of `flushMutex`, `journalMutex` and `commitGate`, or know that no
    /// freeze can be under way (one holding them excludes the commit).
    func lockForChange(file: StaticString = #fileID, line: UInt = #line) {
        while true {
            mutex.lock(file: file, line: line)
            if !pager.freezing { return }
            mutex.unlock()
            commitGate.lock()
            commitGate.unlock()
        }
    }

    /// `body` under `mutex`, taken by `lockForChange`.
    func withLockForChange<T, E: Error>(file: StaticString = #fileID, line: UInt = #line,
                                        _ body: () throws(E) -> T) throws(E) -> T {
        lockForChange(file: file, line: line)
        defer { mutex.unlock() }
        return try body()
    }

    /// Probe rounds per operation: a map path, a chunk record and a dedup bucket chain are each a
    /// few pages deep.
    static let pageProbeRoundsMax = 4
    /// Probes in a row that must find every page cached, with no page ever evicted, before the
    /// write paths stop probing. One clean probe is not enough: while the cache still fills
    /// after an open, a probe that happens to touch only loaded pages would turn probing off,
    /// and the next operation to need a page not yet loaded would read it from the disk under
    /// the lock (a 68 ms hold at 2 M chunks with the page cache cold).
    static let pageProbeCleanRunMin = 1024

    /// Runs `step` under the store lock once the pages it needs are cached. Before it, in the same
    /// hold, `probe` walks those pages read-only with `MetadataPager.missesThrow` set; when it
    /// misses pages, the lock is let go, they are read, and the next round adopts them under the
    /// lock and probes again, for at most `pageProbeRoundsMax` rounds. What the probe did not
    /// foresee, or what was evicted meanwhile, is still read in place by `step`. `probe` must only
    /// read metadata and carry on past a `PageMiss` (each item in its own `try?`) so that one
    /// round finds the misses of all its items. The probe is skipped (see `pageProbeWanted`)
    /// after `pageProbeCleanRunMin` clean probes with nothing ever evicted, until a page is read
    /// in place or evicted: then the working set is cached, and the probe would only cost CPU.
    /// `probingAlways`: for steps that touch pages outside the block I/O paths' working set.
    func withLockAfterLoadingPages<T, E: Error>(file: StaticString = #fileID, line: UInt = #line,
                                                probingAlways: Bool = false, probe: () -> Void,
                                                _ step: () throws(E) -> T) throws(E) -> T {
        var loaded: [(PageMiss, any MetadataPageObject)] = []
        for round in 0...Self.pageProbeRoundsMax {
            let outcome = try withLockForChange(file: file, line: line) { () throws(E) -> PageLoadingOutcome<T> in
                for (miss, object) in loaded { pager.adopt(miss, object) }
                if round < Self.pageProbeRoundsMax, probingAlways || pageProbeWanted.load(ordering: .relaxed) {
                    pager.missesThrow = true
                    probe()
                    pager.missesThrow = false
                    let misses = pager.takeMisses()
                    if !misses.isEmpty || pager.evictions != 0 {
                        pageProbeCleanRun = 0
                    } else {
                        pageProbeCleanRun += 1
                        if pageProbeCleanRun >= Self.pageProbeCleanRunMin { pageProbeWanted.store(false, ordering: .relaxed) }
                    }
                    if !misses.isEmpty { return .missed(misses) }
                }
                // Everything the probe foresaw is cached: the step runs in the same hold, and
                // reads in place only what the probe did not foresee.
                return .done(try step())
            }
            switch outcome {
            case .done(let result): return result
            case .missed(let misses): loaded = Self.readOutsideLock(misses, from: pager.file)
            }
        }
        preconditionFailure("the last round runs the step")
    }

    /// Runs the read-only `step` under the store lock with misses noted instead of read: when it
    /// needs a page that is not cached, it is abandoned, `probe` (as for
    /// `withLockAfterLoadingPages`) notes every page missing at that depth, the lock is let go,
    /// the missed pages are read, and `step` runs again with them adopted, so a read does not wait
    /// for the disk while holding the lock and probes only when it misses. After `pageProbeRoundsMax` rounds it runs once more
    /// reading in place what it still misses. `step` must change nothing before its last page lookup.
    func withLockReadingPagesOutside<T>(file: StaticString = #fileID, line: UInt = #line, probe: () -> Void,
                                        _ step: () throws(BlockDeviceError) -> T) throws(BlockDeviceError) -> T {
        var loaded: [(PageMiss, any MetadataPageObject)] = []
        for _ in 0..<Self.pageProbeRoundsMax {
            let outcome = try mutex.withLock(file: file, line: line) { () throws(BlockDeviceError) -> PageLoadingOutcome<T> in
                for (miss, object) in loaded { pager.adopt(miss, object) }
                pager.missesThrow = true
                defer { pager.missesThrow = false }
                do throws(BlockDeviceError) {
                    let result = try step()
                    let misses = pager.takeMisses()
                    return misses.isEmpty ? .done(result) : .missed(misses)
                } catch {
                    guard !pager.takeMisses().isEmpty else { throw error }
                    // The step stopped at its first miss; the probe carries on past each one, so
                    // a read of many blocks learns all the pages of this level in one round.
                    probe()
                    return .missed(pager.takeMisses())
                }
            }
            switch outcome {
            case .done(let result): return result
            case .missed(let misses): loaded = Self.readOutsideLock(misses, from: pager.file)
            }
        }
        return try mutex.withLock(file: file, line: line) { () throws(BlockDeviceError) -> T in
            for (miss, object) in loaded { pager.adopt(miss, object) }
            return try step()
        }
    }

    /// Reads missed pages; a page that cannot be read is left to the locked step, which reports it.
    private static func readOutsideLock(_ misses: [PageMiss], from file: any StorageFile) -> [(PageMiss, any MetadataPageObject)] {
        var loaded: [(PageMiss, any MetadataPageObject)] = []
        for miss in misses {
            if let object = try? miss.read(from: file) { loaded.append((miss, object)) }
        }
        return loaded
    }

    /// The pages a read of blocks `first...last` of `image` needs: its map path and chunk records.
    func probeRead(_ image: Image, blocks: ClosedRange<UInt64>) {
        for b in blocks {
            guard let c = try? image.root.lookup(b, pager: pager), c != 0, c < zeroAllocatedChunk else { continue }
            _ = try? chunks.entry(c, pager: pager)
        }
    }

    /// The sector-map leaves that cover data-file pages `firstPage ..< firstPage + pageCount`:
    /// what gc's punch scan of that slice reads (at 32 M chunks, cold, 120 ms per slice under the lock).
    func probeSectorMap(fromPage firstPage: UInt64, pageCount: UInt64) {
        let sectorsPerLeaf = UInt64(SpaceAllocator.wordsPerLeaf) * 64
        let (last, overflow) = firstPage.addingReportingOverflow(pageCount)
        let firstSector = firstPage * 8, endSector = min(space.endSector, overflow ? .max : last * 8)
        guard firstSector < endSector else { return }
        for leaf in (firstSector / sectorsPerLeaf)...((endSector - 1) / sectorsPerLeaf) {
            _ = try? sectorMap.leafElements(leaf, pager: pager)
        }
    }

    /// The pages phase F of a write needs, read-only: each block's map path, the record of the
    /// chunk it maps now and of the chunk it will map, and the dedup buckets of new contents.
    func probeWrite(_ image: Image, blocks: [(block: UInt64, chunk: UInt64, newHash: ContentHash?)]) {
        for b in blocks {
            if let old = try? image.root.lookup(b.block, pager: pager), old != 0, old < zeroAllocatedChunk,
               let entry = try? chunks.entry(old, pager: pager), entry.refcount == 1 {
                // Its last reference goes: it leaves the dedup index.
                _ = try? index.firstMatch(entry.hash, pager: pager, hashOf: { _ in entry.hash }) { $0 == old }
            }
            if b.chunk != 0 && b.chunk < zeroAllocatedChunk { _ = try? chunks.entry(b.chunk, pager: pager) }
            if let hash = b.newHash {
                _ = try? index.firstMatch(hash, pager: pager, hashOf: { _ in hash }) { _ in true }
            }
        }
    }

    /// The pages phase B's dedup lookups need: each content's bucket chain and its candidates' records.
    func probeDedup<Hashes: Sequence<ContentHash>>(_ hashes: Hashes) {
        for hash in hashes {
            _ = try? index.firstMatch(hash, pager: pager, hashOf: { try chunks.entry($0, pager: pager).hash }) { _ in false }
        }
    }
}
