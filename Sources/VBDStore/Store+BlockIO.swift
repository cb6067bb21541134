import VBDCache
import VBDCore

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Notes on the design
//
// Reads copy the chunk entries they need under the lock, then load each chunk outside it:
// cache, else data file -> LZ4 decompress -> rehash -> compare with the entry's hash
// (docs/INVARIANTS.md 3). A mismatch is re-checked under the lock: if the block was remapped meanwhile the
// read retries, otherwise it is corruption and fails with the volume and byte offset.
//
// Stale readers: a chunk may be freed, and its number, sectors and cache slot reused, while a
// reader that copied it out is still loading it. The reader holds (number, generation) and the
// entry's hash: the cache is keyed by both, so it finds the old bytes or nothing, never the next
// chunk's; a hit is rehashed against the entry anyway; and bytes read from the data file count
// only if the number still has the same generation afterwards (then its sectors were never
// released during the read), else the read retries. See docs/ARCHITECTURE.md, "Stale readers".
//
// Writes run in phases so that hashing, compression and data-file writes stay outside the lock:
//   A  (no lock) zero test and hash of every block
//   B  (lock)    dedup: candidates with the same hash and sharing group are compared byte for byte
//                (docs/INVARIANTS.md 2); a match is retained at once
//   C  (no lock) compress the rest
//   D  (lock)    reserve chunk numbers and sectors
//   E  (no lock) write the chunk bytes
//   F  (lock)    re-check dedup (a concurrent writer may have stored the same bytes), then
//                journal the chunks and the map updates
// The re-check of F is needed only for a content another write had in flight at the same time:
// phase B claims each new content's hash (`newContentInFlight`) and phase F probes the index
// again only for a hash that two writes claimed at once; either write that saw the other's claim
// looks again, and a write that begins after the other published finds its chunk in phase B.
// Partial blocks are read-modify-written under a stripe lock per block, so two concurrent
// partial writes to one block do not lose each other's bytes.

struct LoadedChunkFailure: Error {
    let detail: String
}

extension Store {
    struct ImageView {
        var id: UInt64
        var name: String
        var size: UInt64
        var blockShift: UInt8
        var group: SharingGroupID
        var readOnly: Bool
        var blockSize: Int { 1 << Int(blockShift) }
    }

    /// With `mutex` held.
    func viewLocked(_ id: UInt64) throws(BlockDeviceError) -> (ImageView, Image) {
        mutex.assertOwned("viewLocked")
        guard !closed, let image = images[id] else { throw .gone("the volume or snapshot was deleted or the store closed") }
        let r = image.record
        return (ImageView(id: id, name: fullNameLocked(r), size: r.size, blockShift: r.blockShift, group: r.group,
                          readOnly: r.kind == .snapshot), image)
    }

    func checkRange(_ v: ImageView, offset: UInt64, length: UInt64) throws(BlockDeviceError) {
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > v.size { throw .outOfRange(offset: offset, length: length, size: v.size) }
    }

    // MARK: Loading one chunk

    /// Fills `destination` (exactly the chunk's raw length) with the chunk's verified bytes.
    /// `cacheKey` is ``cacheKey(_:)`` of `chunk` when `entry` was copied out.
    /// `lockHeld`: the caller holds `mutex` (dedup verification, fsck, a read's last attempt).
    /// Otherwise `cacheToken` is the cache's removal token taken under `mutex` with `entry`, and the
    /// caller must check that the generation is unchanged before trusting bytes from the disk
    /// (a `.miss`; see "Stale readers" above).
    /// Returns which source served it (for per-domain cache accounting).
    @discardableResult
    func loadChunk(_ chunk: UInt64, _ entry: ChunkEntry, cacheKey: UInt64, into destination: UnsafeMutableRawBufferPointer,
                   volume: UInt64, lockHeld: Bool = false, cacheToken: UInt64? = nil) throws(LoadedChunkFailure) -> CacheLookup {
        precondition(destination.count == entry.rawBytes)
        if lockHeld { mutex.assertOwned("to load a chunk with lockHeld") }
        if let cache = options.cache {
            let found = cache.lookup(cacheKey, into: destination, volume: volume, group: entry.group, countingMisses: true)
            if found != .miss {
                // The key cannot name other bytes (generations), so a main-tier hit is the chunk's
                // own bytes, verified when they entered the cache. Bytes back from the compressed
                // tier went through LZ4 once more: those are rehashed, and a mismatch drops the
                // entry and reads the disk.
                if !Self.staleReadDefenses || Self.isTrustedHit(found)
                    || contentHash(UnsafeRawBufferPointer(destination), group: entry.group) == entry.hash { return found }
                cache.remove(cacheKey)
            }
        }
        let stored = entry.storedBytes
        var failure: LoadedChunkFailure?
        withUnsafeTemporaryAllocation(byteCount: max(stored, 1), alignment: 16) { raw in
            let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<stored])
            do {
                try chunkStorage.readStored(entry.storedPlace(number: chunk), into: slice)
            } catch {
                failure = LoadedChunkFailure(detail: chunksInDataFile ? "data file read failed: \(error)" : "chunk storage read failed: \(error)")
                return
            }
            if entry.isCompressed {
                if !BlockCompression.decompress(UnsafeRawBufferPointer(slice), into: destination) {
                    failure = LoadedChunkFailure(detail: "compressed bytes do not decompress to \(entry.rawBytes) bytes")
                    return
                }
            } else {
                guard stored == destination.count else {
                    failure = LoadedChunkFailure(detail: "stored length \(stored) differs from block length")
                    return
                }
                destination.copyMemory(from: UnsafeRawBufferPointer(slice))
            }
        }
        if let failure { throw failure }
        let actual = contentHash(UnsafeRawBufferPointer(destination), group: entry.group)
        guard actual == entry.hash else {
            throw LoadedChunkFailure(detail: "content hash \(actual) does not match chunk \(chunk)'s \(entry.hash)")
        }
        guard let cache = options.cache else { return .miss }
        // Cache only while the number still names these bytes: a concurrent overwrite may have
        // freed the chunk (removing it from the cache) since the caller looked it up, and its
        // number may already name other contents. Under the lock that cannot happen; outside it
        // the token makes the cache skip the insert if the key's shard saw a removal since.
        if lockHeld {
            cache.insert(cacheKey, bytes: UnsafeRawBufferPointer(destination), volume: volume, group: entry.group)
        } else if let cacheToken {
            cache.insert(cacheKey, bytes: UnsafeRawBufferPointer(destination), volume: volume, group: entry.group,
                         ifUnremovedSince: cacheToken)
        }
        return .miss
    }

    /// A hit in the main tier under a generation key needs no rehash (docs/ARCHITECTURE.md,
    /// "Stale readers"); rehashing every hit cost about 10 % of a 1 MiB cached read.
    static func isTrustedHit(_ found: CacheLookup) -> Bool { found == .hit }

    // MARK: Read

    func read(image id: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        var sources = ReadSources()
        try read(image: id, offset: offset, into: buffer, sources: &sources)
    }

    /// Reads and adds to `sources` where each block came from (zero and unmapped blocks count nowhere).
    func read(image id: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
              sources: inout ReadSources) throws(BlockDeviceError) {
        var zeroRanges: [Range<Int>] = []
        try read(image: id, offset: offset, into: buffer, sources: &sources, zeroRanges: &zeroRanges)
    }

    /// Reads as above and appends to `zeroRanges` the byte ranges of `buffer` whose blocks hold no
    /// stored data (merged, ascending). A block found zero is zero at the moment its map was read;
    /// a block read again after a race is reported as data even if it became zero (its bytes are
    /// zeroes then, which a data reply states as well).
    func read(image id: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
              sources: inout ReadSources, zeroRanges: inout [Range<Int>]) throws(BlockDeviceError) {
        do {
            // Blocks whose chunk was freed while they loaded are read again, each on its own (a
            // block read later is still that block at one moment). A retried block counts again
            // in `sources`. The last attempt holds the lock across its loads, so a reader that
            // keeps losing the race still finishes, and it holds it for those few blocks only.
            var stale = try readOnce(image: id, offset: offset, into: buffer, sources: &sources, holdingLock: false,
                                     zeroRanges: &zeroRanges)
            var attempt = 1
            while !stale.isEmpty {
                attempt += 1
                var next: [Range<Int>] = []
                for range in stale {
                    var ignored: [Range<Int>] = []
                    let again = try readOnce(image: id, offset: offset + UInt64(range.lowerBound),
                                             into: UnsafeMutableRawBufferPointer(rebasing: buffer[range]), sources: &sources,
                                             holdingLock: attempt >= Self.readAttemptsUnlocked, zeroRanges: &ignored)
                    next += again.map { ($0.lowerBound + range.lowerBound)..<($0.upperBound + range.lowerBound) }
                }
                stale = next
            }
        } catch let e as BlockDeviceError {
            throw e
        } catch {
            throw .io("\(error)")
        }
    }

    /// Attempts a read makes without holding the store lock across its loads.
    static let readAttemptsUnlocked = 4

    /// Fills `destination`, the part of one block that a read covers (starting `start` bytes into
    /// the block), with `load`, which writes a whole block or returns nil having written nothing:
    /// straight into `destination` when that is the whole block, else into a temporary block whose
    /// covered part is then copied over. Returns what `load` returned.
    static func fillBlockSlice<E: Error>(_ destination: UnsafeMutableRawBufferPointer, at start: Int, blockSize: Int,
                                         _ load: (UnsafeMutableRawBufferPointer) throws(E) -> CacheLookup?) throws(E) -> CacheLookup? {
        if destination.count == blockSize { return try load(destination) }
        return try withUnsafeTemporaryAllocation(byteCount: blockSize, alignment: 16) { (block) throws(E) -> CacheLookup? in
            guard let found = try load(block) else { return nil }
            destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: block[start..<start + destination.count]))
            return found
        }
    }

    /// Largest read ``readIfCached(image:offset:into:)`` serves: copying more is no longer "at once".
    static let cachedReadBytesMax = 128 * 1024
    /// How long ``readIfCached(image:offset:into:)`` retries a busy store lock before giving up.
    /// Writers hold it for tens of microseconds (phases B, D, F of a 64 KiB piece); giving up
    /// sends the read through an I/O thread, which costs more than that under load (hostile.sh:
    /// 2-3% of a victim's reads fell back without the wait, and they made its p99).
    static let cachedReadLockWait: Duration = .microseconds(100)

    /// Serves a read from memory without waiting, or returns nil having changed nothing visible:
    /// when the store lock stays busy for ``cachedReadLockWait``, a block is not in either cache tier, or the request is out of
    /// range or larger than ``cachedReadBytesMax`` (the ordinary read then reports any error).
    /// Never touches the disk or sleeps (it may spin briefly for the lock), so an event loop may call it and skip the hop to an I/O
    /// thread for the common case of a cache hit. Zero and unwritten blocks need no cache.
    /// With `zeroBlocksAllowed` false, a range with an unallocated or zero block returns nil.
    func readIfCached(image id: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                      zeroBlocksAllowed: Bool = true) -> ReadSources? {
        var zeroRanges: [Range<Int>] = []
        return readIfCached(image: id, offset: offset, into: buffer, zeroBlocksAllowed: zeroBlocksAllowed,
                            zeroRanges: &zeroRanges)
    }

    /// As above, appending the byte ranges of `buffer` that are zero blocks to `zeroRanges`
    /// (merged, ascending); untouched when it returns nil.
    func readIfCached(image id: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                      zeroBlocksAllowed: Bool, zeroRanges: inout [Range<Int>]) -> ReadSources? {
        let length = UInt64(buffer.count)
        guard let cache = options.cache, length > 0, buffer.count <= Self.cachedReadBytesMax,
              mutex.tryLock(spinningFor: Self.cachedReadLockWait) else {
            return nil
        }
        var blockShift: UInt8 = 0
        var refs: [(key: UInt64, group: SharingGroupID, hash: ContentHash)] = []
        do {
            // A metadata page not in the cache is not read here (under the store lock, on an event
            // loop): the lookup throws and the ordinary read loads it without the lock.
            pager.missesThrow = true
            defer {
                pager.missesThrow = false
                _ = pager.takeMisses()
                mutex.unlock()
            }
            // The record directly, not viewLocked: no name string to build on the fast path.
            guard !closed, let image = images[id] else { return nil }
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard !overflow, end <= image.record.size else { return nil }
            blockShift = image.record.blockShift
            let first = offset >> UInt64(blockShift), last = (offset + length - 1) >> UInt64(blockShift)
            refs.reserveCapacity(Int(last - first + 1))
            for b in first...last {
                // A metadata page that cannot be read is left to the ordinary path to report.
                guard let c = try? image.root.lookup(b, pager: pager) else { return nil }
                guard c != 0 && c < zeroAllocatedChunk else {
                    if !zeroBlocksAllowed { return nil }
                    refs.append((0, 0, .zero))
                    continue
                }
                guard let entry = try? chunks.entry(c, pager: pager), let key = try? cacheKey(c) else { return nil }
                refs.append((key, entry.group, entry.hash))
            }
        }
        let bs = UInt64(1) << UInt64(blockShift)
        let first = offset >> UInt64(blockShift)
        var sources = ReadSources()
        var zeros: [Range<Int>] = []
        for (k, ref) in refs.enumerated() {
            let blockStart = (first + UInt64(k)) * bs
            let lo = max(offset, blockStart), hi = min(offset + length, blockStart + bs)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(lo - offset)..<Int(hi - offset)])
            if ref.key == 0 {
                dst.initializeMemory(as: UInt8.self, repeating: 0)
                Self.appendMerged(Int(lo - offset)..<Int(hi - offset), to: &zeros)
                continue
            }
            let found = Self.fillBlockSlice(dst, at: Int(lo - blockStart), blockSize: Int(bs)) { block in
                let found = cache.lookup(ref.key, into: block, volume: id, group: ref.group, countingMisses: false)
                // Verified like loadChunk's hits; a mismatch goes the ordinary way, which drops it.
                guard found != .miss else { return nil }
                guard !Self.staleReadDefenses || Self.isTrustedHit(found)
                    || contentHash(UnsafeRawBufferPointer(block), group: ref.group) == ref.hash else { return nil }
                return found
            }
            guard let found else { return nil }
            sources.count(found)
        }
        zeroRanges += zeros
        return sources
    }

    /// Appends `range` to ascending `ranges`, merged with the last one when they touch.
    static func appendMerged(_ range: Range<Int>, to ranges: inout [Range<Int>]) {
        if let last = ranges.last, last.upperBound == range.lowerBound {
            ranges[ranges.count - 1] = last.lowerBound..<range.upperBound
        } else {
            ranges.append(range)
        }
    }

    /// One attempt of a read. Returns the byte ranges of `buffer` (whole block slices) whose chunk
    /// was freed while they loaded, to be read again. `holdingLock`: keep `mutex` across the loads
    /// (the last attempt), so nothing can be freed under it and nothing is returned.
    private func readOnce(image id: UInt64, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                          sources: inout ReadSources, holdingLock: Bool, zeroRanges: inout [Range<Int>]) throws -> [Range<Int>] {
        let length = UInt64(buffer.count)
        guard length > 0 else {
            let v = try mutex.withLock { () throws(BlockDeviceError) in try viewLocked(id).0 }
            try checkRange(v, offset: offset, length: 0)
            return []
        }
        let cache = options.cache
        typealias Ref = (chunk: UInt64, entry: ChunkEntry, key: UInt64, token: UInt64)
        let copyRefs = { () throws(BlockDeviceError) -> (ImageView, [Ref]) in
            let (v, image) = try self.viewLocked(id)
            try self.checkRange(v, offset: offset, length: length)
            let first = offset >> UInt64(v.blockShift), last = (offset + length - 1) >> UInt64(v.blockShift)
            var refs: [Ref] = []
            refs.reserveCapacity(Int(last - first + 1))
            for b in first...last {
                let c = try self.metadata { try image.root.lookup(b, pager: self.pager) }
                if c != 0 && c < zeroAllocatedChunk {
                    let (key, entry) = try self.metadata { (try self.cacheKey(c), try self.chunks.entry(c, pager: self.pager)) }
                    refs.append((c, entry, key, holdingLock ? 0 : cache?.removalToken(for: key) ?? 0))
                } else {
                    refs.append((c, .free, 0, 0))
                }
            }
            return (v, refs)
        }
        if holdingLock { mutex.lock() }
        defer { if holdingLock { mutex.unlock() } }
        let (view, refs) = holdingLock ? try copyRefs() : try withLockReadingPagesOutside(probe: {
            guard let (v, image) = try? self.viewLocked(id), (try? self.checkRange(v, offset: offset, length: length)) != nil else { return }
            self.probeRead(image, blocks: (offset >> UInt64(v.blockShift))...((offset + length - 1) >> UInt64(v.blockShift)))
        }, copyRefs)
        let bs = UInt64(view.blockSize)
        let first = offset / bs
        var fromDisk: [(block: Int, bytes: Range<Int>)] = []
        var stale: [Range<Int>] = []
        for (k, ref) in refs.enumerated() {
            let block = first + UInt64(k)
            let blockStart = block * bs
            let lo = max(offset, blockStart), hi = min(offset + length, blockStart + bs)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(lo - offset)..<Int(hi - offset)])
            if ref.chunk == 0 || ref.chunk >= zeroAllocatedChunk {
                dst.initializeMemory(as: UInt8.self, repeating: 0)
                Self.appendMerged(Int(lo - offset)..<Int(hi - offset), to: &zeroRanges)
                continue
            }
            do {
                let source = try Self.fillBlockSlice(dst, at: Int(lo - blockStart), blockSize: Int(bs)) {
                    (block) throws(LoadedChunkFailure) -> CacheLookup? in
                    try loadChunk(ref.chunk, ref.entry, cacheKey: ref.key, into: block, volume: id,
                                  lockHeld: holdingLock, cacheToken: ref.token)
                }
                sources.count(source!)  // loadChunk fills the block or throws
                if source == .miss { fromDisk.append((k, Int(lo - offset)..<Int(hi - offset))) }
            } catch {
                // Remapped, or the number freed (new generation), since we looked? Then retry;
                // otherwise it is corruption.
                let check = { () -> Bool in
                    // A metadata page that cannot be read counts as changed: the last attempt,
                    // holding the lock, reports it.
                    guard let image = self.images[id],
                          let now = try? image.root.lookup(block, pager: self.pager), now == ref.chunk,
                          (try? self.chunks.contains(ref.chunk, pager: self.pager)) == true,
                          let key = try? self.cacheKey(ref.chunk), key == ref.key,
                          let entry = try? self.chunks.entry(ref.chunk, pager: self.pager) else { return false }
                    return entry.location == ref.entry.location
                }
                // Holding the lock throughout, nothing can have changed: it is corruption.
                let unchanged = holdingLock || mutex.withLock(check)
                if unchanged {
                    throw BlockDeviceError.corrupted(volume: view.name, offset: blockStart, detail: error.detail)
                }
                stale.append(Int(lo - offset)..<Int(hi - offset))
            }
        }
        // Bytes from the data file are the chunk's only if its number was not freed meanwhile
        // (freeing comes before its sectors can be reused); a hash match alone is not proof
        // with a weak hash. Cache hits need no check: their key names exactly these bytes.
        if Self.staleReadDefenses && !holdingLock && !fromDisk.isEmpty {
            mutex.withLock {
                for (k, bytes) in fromDisk {
                    let ref = refs[k]
                    if !((try? chunks.contains(ref.chunk, pager: pager)) == true && (try? cacheKey(ref.chunk)) == ref.key) {
                        stale.append(bytes)
                    }
                }
            }
        }
        return stale
    }

    // MARK: Write

    /// A block's new content, ready for phases B-F.
    private struct PendingBlock {
        var block: UInt64
        var bytes: UnsafeRawBufferPointer
        var isZero = false
        var hash = ContentHash.zero
        /// Chunk the block will map to (retained, or reserved for a new chunk).
        var chunk: UInt64 = 0
        var isNew = false
        /// What goes to the data file: `bytes`, or its LZ4 form in the request's scratch buffer.
        var stored = UnsafeRawBufferPointer(start: nil, count: 0)
        var isCompressed = false
        var sector: UInt64 = 0
        var sectorCount: Int { (stored.count + Limits.sectorBytes - 1) / Limits.sectorBytes }
        /// Phase B claimed `hash` in `newContentInFlight`; dropped in phase F or on failure.
        var claimed = false
    }

    func write(image id: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        let length = UInt64(data.count)
        let view = try mutex.withLock { () throws(BlockDeviceError) -> ImageView in
            let (v, _) = try viewLocked(id)
            if v.readOnly { throw .readOnly(name: v.name) }
            try checkRange(v, offset: offset, length: length)
            if let poisoned { throw .io("store is read-only after an earlier failure: \(poisoned)") }
            return v
        }
        guard length > 0 else { return }
        let bs = UInt64(view.blockSize)
        let first = offset / bs, last = (offset + length - 1) / bs
        let headPartial = offset % bs != 0 || (first == last && length < bs)
        let tailPartial = (offset + length) % bs != 0 && last != first

        // Partial edge blocks: read-modify-write into private buffers, under their stripe locks.
        var stripes: [Int] = []
        if headPartial { stripes.append(stripeIndex(id, first)) }
        if tailPartial { stripes.append(stripeIndex(id, last)) }
        stripes = Array(Set(stripes)).sorted()
        for s in stripes { stripeLocks[s].lock() }
        defer { for s in stripes.reversed() { stripeLocks[s].unlock() } }

        let edgeBytes = Int(bs) * ((headPartial ? 1 : 0) + (tailPartial ? 1 : 0))
        let edge = UnsafeMutableRawBufferPointer.allocate(byteCount: max(edgeBytes, 1), alignment: 16)
        defer { edge.deallocate() }
        var blocks: [PendingBlock] = []
        blocks.reserveCapacity(Int(last - first + 1))
        var edgeUsed = 0
        for b in first...last {
            let blockStart = b * bs
            let lo = max(offset, blockStart), hi = min(offset + length, blockStart + bs)
            if hi - lo == bs {
                blocks.append(PendingBlock(block: b, bytes: UnsafeRawBufferPointer(rebasing: data[Int(lo - offset)..<Int(hi - offset)])))
            } else {
                let buf = UnsafeMutableRawBufferPointer(rebasing: edge[edgeUsed..<edgeUsed + Int(bs)])
                edgeUsed += Int(bs)
                // The old block may end past the volume's end (last partial block): read what exists.
                let readable = min(bs, view.size - blockStart)
                try read(image: id, offset: blockStart, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<Int(readable)]))
                if readable < bs { UnsafeMutableRawBufferPointer(rebasing: buf[Int(readable)...]).initializeMemory(as: UInt8.self, repeating: 0) }
                UnsafeMutableRawBufferPointer(rebasing: buf[Int(lo - blockStart)..<Int(hi - blockStart)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[Int(lo - offset)..<Int(hi - offset)]))
                blocks.append(PendingBlock(block: b, bytes: UnsafeRawBufferPointer(buf)))
            }
        }
        try storeBlocks(&blocks, view: view)
        try journalQueuedRecords()
        try afterChange(fua: fua)
    }

    /// Largest write ``writeWithoutBlocking(image:offset:data:)`` takes: hashing, compressing and
    /// copying 16 KiB into the page cache costs about what a cached read of it does, so an event
    /// loop doing it keeps its other connections' latency (the I/O thread's step, NBDOperationJob).
    static let writeWithoutBlockingBytesMax = 16 * 1024

    /// Writes whole blocks at once on the calling thread, or returns false having changed nothing:
    /// when the store lock stays busy for ``cachedReadLockWait``, the journal is due for a flush,
    /// the write is not block-aligned (a read-modify-write may read the disk) or larger than
    /// ``writeWithoutBlockingBytesMax``, or the request is invalid (the ordinary write then reports
    /// the error). Saves an event loop the hop to an I/O thread and back, which cost more CPU than
    /// the write itself (Benchmarks/README.md). Four waits remain possible: the page-cache writes
    /// (of the data and of the journal frame) on the kernel's dirty-page throttling, which every
    /// writer of the file shares; `journalMutex`, held by another writer appending (its frame may
    /// carry this write's records too), a flush writing its marker or a commit writing its seal;
    /// a commit freezing its changed pages (`lockForChange`); and the read of a dedup candidate
    /// that is not in the cache (verified byte for byte under the lock, like any write). Never
    /// where chunks are not in the data file (RADOS objects): there storing a new chunk is a round
    /// trip to the cluster, and an event loop waiting for it serves its connection one write at a
    /// time (docs/RADOS.md, "Random writes").
    func writeWithoutBlocking(image id: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) throws(BlockDeviceError) -> Bool {
        let length = UInt64(data.count)
        guard chunksInDataFile, length > 0, data.count <= Self.writeWithoutBlockingBytesMax,
              mutex.tryLock(spinningFor: Self.cachedReadLockWait) else { return false }
        let view: ImageView
        do {
            defer { mutex.unlock() }
            guard !closed, poisoned == nil, unflushedJournalBytesLocked < options.pendingJournalBytesMax,
                  pager.dirtyFrames < options.commitDirtyPagesMax,
                  let (v, _) = try? viewLocked(id), !v.readOnly else { return false }
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard !overflow, end <= v.size, offset % UInt64(v.blockSize) == 0,
                  length % UInt64(v.blockSize) == 0 else { return false }
            view = v
        }
        let bs = view.blockSize
        var blocks: [PendingBlock] = []
        blocks.reserveCapacity(data.count / bs)
        for k in 0..<data.count / bs {
            blocks.append(PendingBlock(block: offset / UInt64(bs) + UInt64(k),
                                       bytes: UnsafeRawBufferPointer(rebasing: data[k * bs..<(k + 1) * bs])))
        }
        try storeBlocks(&blocks, view: view)
        try journalQueuedRecords()
        return true
    }

    static let stripeCount = 64

    func stripeIndex(_ image: UInt64, _ block: UInt64) -> Int {
        Int(truncatingIfNeeded: (image &* 0x9E37_79B9_7F4A_7C15 ^ block) &* 0xBF58_476D_1CE4_E5B9 >> 40) & (Store.stripeCount - 1)
    }

    /// Phases A-F for full blocks.
    private func storeBlocks(_ blocks: inout [PendingBlock], view: ImageView) throws(BlockDeviceError) {
        // A: zero test and hash.
        for i in blocks.indices {
            if isAllZero(blocks[i].bytes) {
                blocks[i].isZero = true
            } else {
                blocks[i].hash = contentHash(blocks[i].bytes, group: view.group)
            }
        }
        // Claims still held when a phase fails are dropped on the way out.
        defer {
            if blocks.contains(where: \.claimed) {
                mutex.withLock { for i in blocks.indices where blocks[i].claimed { dropNewContentClaimLocked(&blocks[i]) } }
            }
        }
        // B: dedup against stored chunks, byte-verified; what is new is claimed until phase F.
        try withLockAfterLoadingPages(probe: { probeDedup(blocks.lazy.filter { !$0.isZero }.map(\.hash)) }) { () throws(BlockDeviceError) in
            for i in blocks.indices where !blocks[i].isZero {
                if let c = try findDuplicateLocked(blocks[i].bytes, hash: blocks[i].hash, group: view.group, volume: view.id) {
                    do throws(BlockDeviceError) { try metadata { try retainChunk(c) } } catch {
                        releaseReservationsLocked(blocks, group: view.group)
                        throw error
                    }
                    noteWriteReferenceLocked(c, taken: true)
                    blocks[i].chunk = c
                } else {
                    claimNewContentLocked(&blocks[i])
                }
            }
        }
        // C: compress what is new, into one scratch buffer for the request. Stored compressed
        // only when that saves at least one sector.
        var scratchBytes = 0
        for b in blocks where !b.isZero && b.chunk == 0 { scratchBytes += BlockCompression.bound(b.bytes.count) }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: max(scratchBytes, 1), alignment: 16)
        defer { scratch.deallocate() }
        var used = 0
        var misses = 0
        for i in blocks.indices where !blocks[i].isZero && blocks[i].chunk == 0 {
            misses += 1
            let raw = blocks[i].bytes
            let out = UnsafeMutableRawBufferPointer(rebasing: scratch[used..<used + BlockCompression.bound(raw.count)])
            let sectors = { (b: Int) in (b + Limits.sectorBytes - 1) / Limits.sectorBytes }
            if let n = BlockCompression.compress(raw, into: out, secondPasses: compressionSecondPasses), sectors(n) < sectors(raw.count) {
                blocks[i].stored = UnsafeRawBufferPointer(rebasing: out[0..<n])
                blocks[i].isCompressed = true
                used += n
            } else {
                blocks[i].stored = raw
            }
        }
        // D: reserve numbers and sectors. A number off the free stack needs its record, a page
        // that at 32 M chunks is seldom cached: read before the hold, not under it.
        if misses > 0 {
            let reserved: Bool = try withLockAfterLoadingPages(probe: { chunks.probeAllocation(misses, pager: pager) }) { () throws(BlockDeviceError) -> Bool in
                var ok = true
                for i in blocks.indices where !blocks[i].isZero && blocks[i].chunk == 0 {
                    let sectors = blocks[i].sectorCount
                    if spaceReserveRefusesNewDataLocked() { ok = false; break }   // the disk is full
                    if chunksInDataFile && options.dataBytesMax > 0 &&
                        (space.usedSectors + UInt64(sectors)) * UInt64(Limits.sectorBytes) > options.dataBytesMax {
                        ok = false; break
                    }
                    let number: UInt64?
                    do throws(BlockDeviceError) { number = try metadata { try chunks.allocateNumber(pager: pager) } } catch {
                        releaseReservationsLocked(blocks, group: view.group)
                        throw error
                    }
                    guard let n = number else { ok = false; break }
                    blocks[i].chunk = n
                    blocks[i].isNew = true
                    // Elsewhere than the data file the storage picks the place in phase E.
                    if chunksInDataFile { blocks[i].sector = space.allocate(sectors) }
                }
                if !ok { releaseReservationsLocked(blocks, group: view.group) }
                return ok
            }
            if !reserved { throw .noSpace }
            // E: write the chunk bytes, one write per run of adjacent sectors (a sequential write
            // of many blocks usually lands in one run).
            do {
                try writeNewChunks(&blocks, group: view.group)
            } catch {
                withLockForChange { releaseReservationsLocked(blocks, group: view.group) }
                throw error == .noSpace ? .noSpace : .io("writing block data: \(error)")
            }
        }
        // F: publish. New chunks enter the cache afterwards, outside the lock (see loadChunk).
        var toCache: [(Int, UInt64, UInt64)] = []
        defer {
            if let cache = options.cache {
                for (i, key, token) in toCache {
                    cache.insert(key, bytes: blocks[i].bytes, volume: view.id, group: view.group, ifUnremovedSince: token)
                }
            }
        }
        try withLockAfterLoadingPages(probe: {
            guard let image = images[view.id] else { return }
            probeWrite(image, blocks: blocks.map { ($0.block, $0.chunk, $0.isNew ? $0.hash : nil) })
        }) { () throws(BlockDeviceError) in
            // From here to the end of this hold the phase-B references become map references.
            for b in blocks where !b.isZero && !b.isNew && b.chunk != 0 { noteWriteReferenceLocked(b.chunk, taken: false) }
            guard images[view.id] != nil else {
                releaseReservationsLocked(blocks, group: view.group, phaseBReferencesNoted: false)
                throw .gone("\(view.name) was deleted during the write")
            }
            do {
                var mappings: [BlockMapping] = []
                mappings.reserveCapacity(blocks.count)
                for i in blocks.indices {
                    var chunk = blocks[i].isZero ? 0 : blocks[i].chunk
                    if blocks[i].isNew {
                        // Only a content another write claimed meanwhile can have been stored since phase B.
                        let contended = dropNewContentClaimLocked(&blocks[i])
                        if contended, let c = try findDuplicateLocked(blocks[i].bytes, hash: blocks[i].hash, group: view.group, volume: view.id) {
                            // Someone stored the same bytes meanwhile: use theirs, drop ours.
                            try retainChunk(c)
                            try chunks.returnNumber(blocks[i].chunk, pager: pager)
                            giveBackPlaceLocked(blocks[i], group: view.group)
                            blocks[i].isNew = false
                            blocks[i].chunk = c
                            chunk = c
                        } else {
                            let entry = ChunkEntry(hash: blocks[i].hash, sector: blocks[i].sector, group: view.group,
                                                   storedBytes: blocks[i].stored.count, compressed: blocks[i].isCompressed,
                                                   rawBytes: blocks[i].bytes.count)
                            try commit(.chunk(number: chunk, hash: entry.hash, location: entry.location, shape: entry.shape))
                            try retainChunk(chunk)
                            blocks[i].isNew = false
                            if let cache = options.cache {
                                let key = try cacheKey(chunk)
                                toCache.append((i, key, cache.removalToken(for: key)))
                            }
                        }
                    }
                    mappings.append(BlockMapping(block: blocks[i].block, chunk: chunk))
                }
                // One record for the whole request; it retains on apply, so drop the references
                // phases B and F took only afterwards.
                try commit(.mapBatch(image: view.id, mappings: mappings))
                for m in mappings where m.chunk != 0 { try releaseChunk(m.chunk) }
            } catch {
                throw .io("\(error)")
            }
        }
    }

    /// Phase E: hands the new chunks to the chunk storage (ChunkStorage.swift) and takes back the
    /// places it stored them at.
    private func writeNewChunks(_ blocks: inout [PendingBlock], group: SharingGroupID) throws(StorageError) {
        let fresh = blocks.indices.filter { blocks[$0].isNew }
        var chunks = fresh.map { i in
            NewStoredChunk(place: StoredChunkPlace(number: blocks[i].chunk, place: blocks[i].sector, group: group,
                                                   hash: blocks[i].hash, storedBytes: blocks[i].stored.count,
                                                   isCompressed: blocks[i].isCompressed, rawBytes: blocks[i].bytes.count),
                           stored: blocks[i].stored)
        }
        try chunkStorage.writeNew(&chunks)
        for (i, c) in zip(fresh, chunks) { blocks[i].sector = c.place.place }
    }

    /// With `mutex` held: undo phase B/D for blocks not yet published. `phaseBReferencesNoted`:
    /// the dedup references are still counted in `writeReferences` (false once phase F began).
    private func releaseReservationsLocked(_ blocks: [PendingBlock], group: SharingGroupID, phaseBReferencesNoted: Bool = true) {
        mutex.assertOwned("releaseReservationsLocked")
        for b in blocks where !b.isZero && b.chunk != 0 {
            if b.isNew {
                // A number that cannot go back on the free stack (a metadata page failed) is
                // only skipped; its sectors were never named by a record.
                try? chunks.returnNumber(b.chunk, pager: pager)
                giveBackPlaceLocked(b, group: group)
            } else {
                if phaseBReferencesNoted { noteWriteReferenceLocked(b.chunk, taken: false) }
                // The count stays one too high if the page cannot be changed: a leak, never a free
                // of a chunk in use (fsck reports it).
                try? releaseChunk(b.chunk)
            }
        }
    }

    /// With `mutex` held: the place of a new chunk that no record names. The data file's sectors
    /// are free again at once; a chunk another storage stored in phase E (its place is set) is
    /// released with the next flush's frees, outside the lock.
    private func giveBackPlaceLocked(_ b: PendingBlock, group: SharingGroupID) {
        if chunksInDataFile {
            space.releaseNow(b.sector, count: b.sectorCount)
        } else if b.sector != 0 {
            chunkFreesDeferred.append(StoredChunkPlace(number: b.chunk, place: b.sector, group: group, hash: b.hash,
                                                       storedBytes: b.stored.count, isCompressed: b.isCompressed,
                                                       rawBytes: b.bytes.count))
        }
    }

    /// With `mutex` held: phase B found no stored chunk for the block's content; records that this
    /// write is about to store it, so a write of the same content overlapping it re-checks.
    private func claimNewContentLocked(_ block: inout PendingBlock) {
        mutex.assertOwned("claimNewContentLocked")
        newContentInFlight[block.hash, default: NewContentClaim()].claim()
        block.claimed = true
    }

    /// With `mutex` held: drops the block's claim (if it holds one). Returns whether another write
    /// claimed the same content while this claim was held (then its chunk may exist by now).
    @discardableResult
    private func dropNewContentClaimLocked(_ block: inout PendingBlock) -> Bool {
        mutex.assertOwned("dropNewContentClaimLocked")
        guard block.claimed else { return false }
        block.claimed = false
        guard let position = newContentInFlight.index(forKey: block.hash) else {
            preconditionFailure("a claimed content is missing from newContentInFlight")
        }
        let contended = newContentInFlight.values[position].overlapped
        if newContentInFlight.values[position].drop() { newContentInFlight.remove(at: position) }
        return contended
    }

    /// Contents claimed by writes in flight (tests check that none outlive their write).
    var newContentInFlightCount: Int { mutex.withLock { newContentInFlight.count } }

    /// Metadata access on a block I/O path: a page that cannot be read fails the request.
    func metadata<T>(_ body: () throws -> T) throws(BlockDeviceError) -> T {
        do { return try body() } catch let e as StoreError {
            throw .io("metadata: \(e.description)")
        } catch {
            throw .io("metadata: \(error)")
        }
    }

    /// With `mutex` held: a write in flight took (`taken`) or handed over a reference to `chunk`
    /// that no map holds yet.
    func noteWriteReferenceLocked(_ chunk: UInt64, taken: Bool) {
        mutex.assertOwned("noteWriteReferenceLocked")
        if taken {
            writeReferences[chunk, default: 0] += 1
        } else if let held = writeReferences[chunk] {
            if held <= 1 { writeReferences.removeValue(forKey: chunk) } else { writeReferences[chunk] = held - 1 }
        }
    }

    /// With `mutex` held: a stored chunk of the same sharing group and length whose bytes equal `bytes`.
    func findDuplicateLocked(_ bytes: UnsafeRawBufferPointer, hash: ContentHash, group: SharingGroupID, volume: UInt64) throws(BlockDeviceError) -> UInt64? {
        mutex.assertOwned("findDuplicateLocked")
        return try metadata {
            try index.firstMatch(hash, pager: pager, hashOf: { try self.chunks.entry($0, pager: self.pager).hash }) { c in
                let e = try chunks.entry(c, pager: pager)
                guard e.group == group, e.rawBytes == bytes.count else { return false }
                let key = try cacheKey(c)
                // A block the cache holds is compared where it lies (a main-tier entry is the chunk's
                // verified bytes, see isTrustedHit); otherwise it is loaded and verified, then compared.
                if let cache = options.cache, let same = cache.equals(key, bytes: bytes, group: group) {
                    return same
                }
                return withUnsafeTemporaryAllocation(byteCount: bytes.count, alignment: 16) { tmp in
                    do { try loadChunk(c, e, cacheKey: key, into: tmp, volume: volume, lockHeld: true) } catch { return false }
                    return memcmp(tmp.baseAddress!, bytes.baseAddress!, bytes.count) == 0
                }
            }
        }
    }

    /// After a change: FUA flushes; a large unflushed journal flushes implicitly (bounded memory).
    /// Enough changed metadata pages start a commit (bounded commit stalls), unless a flush or
    /// commit is already under way: then the writer goes on, and waits only once half as many
    /// again have changed (what the next commit does under the lock stays bounded too).
    func afterChange(fua: Bool) throws(BlockDeviceError) {
        let (big, dirty) = mutex.withLock { (unflushedJournalBytesLocked >= options.pendingJournalBytesMax, pager.dirtyFrames) }
        if fua || big || dirty >= options.commitDirtyPagesMax + options.commitDirtyPagesMax / 2 { try flushForDevice(); return }
        if dirty >= options.commitDirtyPagesMax {
            do { try flushUnlessOneIsUnderWay() } catch let e as StoreError {
                throw e == .noSpace ? .noSpace : .io(e.description)
            } catch {
                throw .io("\(error)")
            }
        }
    }

    /// `flush()` with its error mapped for a block device (NBD FLUSH, FUA, implicit flushes).
    func flushForDevice() throws(BlockDeviceError) {
        do { try flush() } catch let e as StoreError {
            throw e == .noSpace ? .noSpace : .io(e.description)
        } catch {
            throw .io("\(error)")
        }
    }

    // MARK: Trim and zero

    func zero(image id: UInt64, offset: UInt64, length: UInt64, punch: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError) {
        let view = try mutex.withLock { () throws(BlockDeviceError) -> ImageView in
            let (v, _) = try viewLocked(id)
            if v.readOnly { throw .readOnly(name: v.name) }
            try checkRange(v, offset: offset, length: length)
            if let poisoned { throw .io("store is read-only after an earlier failure: \(poisoned)") }
            return v
        }
        guard length > 0 else { return }
        let bs = UInt64(view.blockSize)
        let end = offset + length
        // Whole blocks inside the range change in the map only. The volume's last block may be
        // partial; a range reaching the volume's end covers it whole.
        let alignedStart = (offset + bs - 1) / bs * bs
        let alignedEnd = end == view.size ? (end + bs - 1) / bs * bs : end / bs * bs
        var partial: [(UInt64, UInt64)] = []   // byte ranges that need a read-modify-write
        if alignedStart < alignedEnd {
            if offset < alignedStart { partial.append((offset, alignedStart)) }
            if alignedEnd < end { partial.append((alignedEnd, end)) }
        } else {
            partial.append((offset, end))
        }
        if fastOnly && !partial.isEmpty {
            throw .notSupported("zeroing part of a block needs a read-modify-write, which is not fast")
        }
        if alignedStart < alignedEnd {
            // A range may span 4 GiB: change at most `blocksPerLockHold` blocks per hold of the
            // lock, so other tenants' requests get in between (each batch is atomic, the whole is
            // not; NBD promises no more).
            var batchStart = alignedStart / bs
            let endWhole = alignedEnd / bs
            while batchStart < endWhole {
                let batchEnd = min(endWhole, batchStart + Self.blocksPerLockHold)
                try withLockForChange { () throws(BlockDeviceError) in
                    guard images[id] != nil else { throw .gone("\(view.name) was deleted") }
                    do {
                        if punch {
                            try commit(.clear(image: id, start: batchStart, count: batchEnd - batchStart))
                        } else {
                            for b in batchStart..<batchEnd { try commit(.map(image: id, block: b, chunk: zeroAllocatedChunk)) }
                        }
                    } catch {
                        throw .io("\(error)")
                    }
                }
                batchStart = batchEnd
            }
        }
        for (lo, hi) in partial {
            let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(hi - lo), alignment: 16)
            defer { zeros.deallocate() }
            zeros.initializeMemory(as: UInt8.self, repeating: 0)
            try write(image: id, offset: lo, data: UnsafeRawBufferPointer(zeros), fua: false)
        }
        try journalQueuedRecords()
        try afterChange(fua: fua)
    }

    /// Most blocks TRIM, WRITE_ZEROES or BLOCK_STATUS handle per hold of the store lock: about
    /// the map work of a 4 MiB write, so a 4 GiB request cannot stall every other tenant.
    static let blocksPerLockHold: UInt64 = 1024

    // MARK: Extents and prefetch

    /// The extents of a range, walked `blocksPerLockHold` blocks per hold of the lock. Windows
    /// are separate snapshots of the map; the reply may describe less than asked (NBD allows it)
    /// when the volume shrank or went away after the first window.
    func extents(image id: UInt64, offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent] {
        let v = try mutex.withLock { () throws(BlockDeviceError) -> ImageView in
            let (v, _) = try viewLocked(id)
            try checkRange(v, offset: offset, length: length)
            return v
        }
        guard length > 0 else { return [] }
        let bs = UInt64(v.blockSize), shift = UInt64(v.blockShift)
        let first = offset >> shift, last = (offset + length - 1) >> shift
        var out: [Extent] = []
        var covered = offset
        var windowStart = first
        var full = false
        while windowStart <= last && !full {
            let windowCount = min(last - windowStart + 1, Self.blocksPerLockHold)
            let stillThere = try mutex.withLock { () throws(BlockDeviceError) -> Bool in
                guard let image = images[id], image.record.size >= offset + length else { return false }
                // Only sharing within the image's own lineage is reported (docs/ARCHITECTURE.md,
                // "What BLOCK_STATUS reveals"): never that another tenant holds the same bytes.
                let peers = lineagePeersLocked(of: image)
                try metadata { try image.root.walk(start: windowStart, count: windowCount, pager: pager, chunkShared: { block, c in
                    // A count that cannot be read reports the chunk as not shared (advisory only).
                    guard c < zeroAllocatedChunk, let e = try? self.chunks.entry(c, pager: self.pager), e.refcount > 1 else { return false }
                    guard let peers else { return true }
                    return peers.contains { (try? $0.root.lookup(block, pager: self.pager)) == c }
                }) { startBlock, count, chunk, shared in
                    let flags: ExtentFlags
                    if chunk == 0 { flags = [.hole, .zero] }
                    else if chunk >= zeroAllocatedChunk { flags = shared ? [.zero, .shared] : [.zero] }
                    else { flags = shared ? [.shared] : [] }
                    let runEnd = min((startBlock + count) * bs, offset + length)
                    let len = runEnd - covered
                    guard len > 0 else { return true }
                    if let lastExtent = out.last, lastExtent.flags == flags {
                        out[out.count - 1].length += len
                    } else {
                        if out.count == maxExtents { full = true; return false }
                        out.append(Extent(length: len, flags: flags))
                    }
                    covered = runEnd
                    return true
                } }
                return true
            }
            if !stillThere {
                if out.isEmpty { throw .gone("\(v.name) was deleted or shrank during the request") }
                break
            }
            windowStart += windowCount
        }
        return out
    }

    func prefetch(image id: UInt64, offset: UInt64, length: UInt64) throws(BlockDeviceError) {
        let view = try mutex.withLock { () throws(BlockDeviceError) -> ImageView in
            let (v, _) = try viewLocked(id)
            try checkRange(v, offset: offset, length: length)
            return v
        }
        guard length > 0 else { return }
        let bs = UInt64(view.blockSize)
        let first = offset / bs, last = (offset + length - 1) / bs
        let tmp = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(bs), alignment: 16)
        defer { tmp.deallocate() }
        // Loading a chunk inserts it into the cache; read in slices to bound memory.
        var b = first
        while b <= last {
            let n = min(bs, view.size - b * bs)
            try read(image: id, offset: b * bs, into: UnsafeMutableRawBufferPointer(rebasing: tmp[0..<Int(n)]))
            b += 1
        }
    }
}

extension ReadSources {
    /// Counts one block by where `loadChunk` or the cache found it (a miss was read from disk).
    mutating func count(_ source: CacheLookup) {
        switch source {
        case .hit: cacheHits += 1
        case .lastChanceHit: lastChanceHits += 1
        case .miss: diskReads += 1
        }
    }
}
