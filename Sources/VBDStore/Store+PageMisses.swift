import VBDCore

// Metadata pages read without the store lock.
//
// A metadata page that is not cached is read from `meta` by whoever needs it, and the block I/O
// paths need pages while holding the store lock. At 32 M chunks with a 256 MiB metadata cache
// most dedup buckets and map leaves are not cached, and a read from a disk busy writing back the
// data file took up to 388 ms with the lock held (1.3 ms of it on the CPU): every other request
// of every volume waited. So before its locked step, an operation runs a probe under the lock
// that walks the same pages read-only with `MetadataPager.missesThrow` set, the pages it missed
// are read after the lock is released, and they join the cache under the lock again. The probe
// repeats (a page read can lead to deeper pages) a bounded number of rounds; what it did not
// foresee, or what was evicted meanwhile, is still read under the lock, as before.

extension Store {
    /// Probe rounds per operation: a map path, a chunk record and a dedup bucket chain are each a
    /// few pages deep.
    static let pageProbeRoundsMax = 4

    /// Runs `probe` under the store lock with misses noted instead of read, reads the missed
    /// pages without the lock, adds them to the cache, and repeats until the probe misses
    /// nothing or after `pageProbeRoundsMax` rounds. `probe` must only read metadata; it is told
    /// to carry on past a `PageMiss` (each item in its own `try?`) so that one round finds the
    /// misses of all its items. Skipped (without taking the lock) once a probe found everything
    /// cached and the cache never evicted a page, until a page is read in place or evicted: then
    /// the working set is cached, and the probe would only cost CPU and a lock hold.
    func loadPagesOutsideLock(_ probe: () -> Void) {
        guard pageProbeWanted.load(ordering: .relaxed) else { return }
        var loaded: [(PageMiss, any MetadataPageObject)] = []
        for round in 0...Self.pageProbeRoundsMax {
            let misses: [PageMiss] = mutex.withLock {
                for (miss, object) in loaded { pager.adopt(miss, object) }
                guard round < Self.pageProbeRoundsMax else { return [] }
                pager.missesThrow = true
                probe()
                pager.missesThrow = false
                let misses = pager.takeMisses()
                if misses.isEmpty && pager.evictions == 0 { pageProbeWanted.store(false, ordering: .relaxed) }
                return misses
            }
            guard !misses.isEmpty else { return }
            loaded = []
            for miss in misses {
                // A page that cannot be read is left to the locked step, which reports it.
                if let object = try? miss.read(from: pager.file) { loaded.append((miss, object)) }
            }
        }
    }

    /// The pages a read of blocks `first...last` of `image` needs: its map path and chunk records.
    func probeRead(_ image: Image, blocks: ClosedRange<UInt64>) {
        for b in blocks {
            guard let c = try? image.root.lookup(b, pager: pager), c != 0, c < zeroAllocatedChunk else { continue }
            _ = try? chunks.entry(c, pager: pager)
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
