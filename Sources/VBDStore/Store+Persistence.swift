import VBDCache
#if canImport(Glibc)
import Glibc
#endif
import VBDCore

// MARK: - Records: one code path for live changes and for replay

extension Store {
    /// Applies a record to the in-memory state. Called with `mutex` held, live and at replay.
    func apply(_ record: JournalRecord) throws {
        switch record {
        case let .chunk(number, hash, location, shape):
            guard number > 0, number <= PagedChunkTable.chunkNumberMax, try !chunks.contains(number, pager: pager), shape != 0 else {
                throw StoreError.corrupted("journal installs chunk \(number) twice")
            }
            // A fresh chunk has no holder until the map record that follows it in the same frame.
            let entry = ChunkEntry(hash: hash, location: location, shape: shape, refcount: 0)
            try chunks.install(entry, at: number, pager: pager)
            try index.insert(number, hash: hash, pager: pager)
            if chunksInDataFile { try setSectors(entry.sector, count: entry.sectorCount, inUse: true) }
        case let .map(imageID, block, chunk):
            guard let image = images[imageID], block < image.record.blockCount else {
                throw StoreError.corrupted("journal maps block \(block) of unknown image \(imageID)")
            }
            if chunk != 0 {
                guard try chunk >= zeroAllocatedChunk || chunks.contains(chunk, pager: pager) else {
                    throw StoreError.corrupted("journal names unknown chunk \(chunk)")
                }
                try retainChunk(chunk)
            }
            try image.root.update(block, to: chunk, pager: pager, self)
        case let .mapBatch(imageID, mappings):
            guard let image = images[imageID] else {
                throw StoreError.corrupted("journal maps blocks of unknown image \(imageID)")
            }
            for m in mappings {
                guard m.block < image.record.blockCount,
                      try m.chunk == 0 || m.chunk >= zeroAllocatedChunk || chunks.contains(m.chunk, pager: pager) else {
                    throw StoreError.corrupted("journal maps block \(m.block) of image \(imageID) to unknown chunk \(m.chunk)")
                }
            }
            for m in mappings where m.chunk != 0 { try retainChunk(m.chunk) }
            try image.root.update(mappings, pager: pager, self)
        case let .clear(imageID, start, count):
            guard let image = images[imageID] else { throw StoreError.corrupted("journal clears unknown image \(imageID)") }
            try image.root.clear(start: start, count: count, pager: pager, self)
        case let .createImage(r):
            guard images[r.id] == nil else { throw StoreError.corrupted("image \(r.id) created twice") }
            images[r.id] = Image(record: r, root: MapRoot(blocks: r.blockCount))
            nextImageID = max(nextImageID, r.id + 1)
        case let .cloneImage(sourceID, r):
            guard let source = images[sourceID], images[r.id] == nil else {
                throw StoreError.corrupted("clone of unknown image \(sourceID)")
            }
            images[r.id] = Image(record: r, root: try source.root.retained(pager: pager))
            nextImageID = max(nextImageID, r.id + 1)
        case let .deleteImage(id):
            guard let image = images.removeValue(forKey: id) else { throw StoreError.corrupted("delete of unknown image \(id)") }
            try image.root.release(pager: pager, self)
            // Shares of a deleted snapshot keep their data; only the origin link goes.
            for other in images.values where other.record.originID == id { other.record.originID = 0 }
        case let .resize(id, size):
            guard let image = images[id] else { throw StoreError.corrupted("resize of unknown image \(id)") }
            image.record.size = size
            try image.root.grow(toBlocks: image.record.blockCount, pager: pager)
        case let .renameGroup(group, name):
            // A number has one name: a reused number drops the name of its empty old group.
            for (other, number) in groups where number == group && other != name { groups[other] = nil }
            groups[name] = group
        case .sealed, .marker:
            break  // read by recovery (`replayJournal`); they change nothing
        }
    }

    /// Applies a live change and queues its record for the journal. `mutex` held. A change that
    /// fails part way (a metadata page that cannot be read) may leave memory changed where the
    /// journal never will be: only a reopen is safe then, as after a failed sync.
    func commit(_ record: JournalRecord) throws {
        do { try apply(record) } catch {
            if failure == nil { failure = "a change could not be applied whole (\(error))" }
            throw error
        }
        let before = pending.bytes.count
        record.encode(into: &pending)
        pendingRecordCount += 1
        recordBytesQueued += UInt64(pending.bytes.count - before)
    }

    /// With `mutex` held: journal bytes no flush covers yet, queued or written (a large amount
    /// triggers an implicit flush, which bounds memory and what a power cut may lose).
    var unflushedJournalBytesLocked: Int { pending.bytes.count + Int(journalEnd - journalCoveredEnd) }

    var unflushedJournalBytes: Int { mutex.withLock { unflushedJournalBytesLocked } }

    /// Runs a control operation (create, snapshot, share, delete, resize): `plan` validates it
    /// under `mutex` and returns its records, which are made durable in a frame of their own
    /// (after the writes queued before them) and only then applied. A failure leaves memory,
    /// the journal and what clients see unchanged, so nothing that failed can take effect later.
    ///
    /// The frame is written and synced under `mutex`: writes queued in between must not land
    /// after the records in the journal, or replay would apply them in another order than the
    /// live store did (a snapshot would miss them, a write would follow its image's delete).
    /// Control operations are rare; the stall is one journal write and sync, after a flush that
    /// leaves little to sync.
    func commitDurably<T>(_ plan: () throws -> (records: [JournalRecord], result: () -> T)) throws -> T {
        let result: T = try flushMutex.withLock {
            try flushLocked()
            journalMutex.lock()
            defer { journalMutex.unlock() }
            mutex.lock()
            defer { mutex.unlock() }
            try checkOpen()
            let (records, result) = try plan()
            guard !records.isEmpty else { return result() }
            var step = "fdatasync of the data file"
            do throws(StorageError) {
                // Writes queued or journaled since the flush above name chunks not synced yet.
                if !pending.bytes.isEmpty || journalEnd > journalCoveredEnd { try chunkStorage.sync() }
                try appendFrameLocked(records, step: &step, marked: true)
            } catch {
                let e: StorageError = error
                if step != "journal write" {
                    // Both locks are held already: poisoned inside this hold of `journalMutex`,
                    // as `poisonAfterFailedSync` does for the paths that hold neither.
                    if failure == nil { failure = "\(step) failed (\(e))" }
                    if step == "fdatasync of the data file" { distrustUncoveredFramesLocked() }
                    throw StoreError.io("\(step) failed: \(e); the store refuses writes until it is reopened")
                }
                throw e == .noSpace ? StoreError.noSpace : StoreError.io("\(step) failed: \(e)")
            }
            do {
                for r in records { try apply(r) }
            } catch {
                // The records are durable but memory could not follow: only a reopen is safe.
                failure = "applying a durable control record failed: \(error)"
                throw error
            }
            return result()
        }
        // The frees of a delete become releasable with the next frame; make it now, so the space
        // comes back when the command returns (and a full disk recovers at once). The operation
        // itself is durable already: a failure here is the next flush's to report.
        _ = try? flush()
        return result
    }
    /// With `mutex` and `journalMutex` held (or in init): writes the queued records and then
    /// `records` as one frame at the end of the current journal, and syncs it unless `sync` is
    /// false; the queue is empty afterwards. `marked`: every chunk the records name is durable
    /// already, so the frame ends with a marker that covers it. `step` names the step that was
    /// running when an error is thrown ("journal write" changed nothing durable).
    func appendFrameLocked(_ records: [JournalRecord], step: inout String, sync: Bool = true, marked: Bool) throws(StorageError) {
        mutex.assertOwned("appendFrameLocked")
        var batch = BinaryWriter(capacity: pending.bytes.count + 256)
        batch.raw(pending.bytes)
        for r in records { r.encode(into: &batch) }
        if marked { markerRecord(durableBelow: journalSequence + 1).encode(into: &batch) }
        let frame = JournalFrame.encode(generation: generation, sequence: journalSequence, payload: batch.bytes)
        step = "journal write"
        try writeUsingSpaceReserve(frame, to: journalFile, at: journalEnd)
        if sync {
            step = "fdatasync of journal-\(generation)"
            try journalFile.sync()
        }
        journalEnd += UInt64(frame.count)
        journalSequence += 1
        if marked && sync {
            journalCoveredEnd = journalEnd
        }
        pending = BinaryWriter()
        pendingRecordCount = 0
        recordBytesJournaled = recordBytesQueued
    }

    /// A marker written now: frames below `durableBelow` name durable data, and the frames after
    /// it are written in this epoch.
    /// A marker in this store's epoch, or in `epoch` when given ("" is no epoch: a reopen trusts
    /// only covered frames).
    func markerRecord(durableBelow: UInt64, voided: Range<UInt64> = 0..<0, epoch: String? = nil) -> JournalRecord {
        .marker(JournalMarker(durableBelow: durableBelow, voided: voided, epoch: epoch ?? unsyncedWritesEpoch ?? ""))
    }

    /// Frame 0 of a new journal: a marker that covers nothing and names the epoch.
    func firstMarkerFrame(generation: UInt64) -> [UInt8] {
        JournalFrame.encode(generation: generation, sequence: 0, payload: encoded(markerRecord(durableBelow: 0)))
    }

    func encoded(_ record: JournalRecord) -> [UInt8] {
        var w = BinaryWriter()
        record.encode(into: &w)
        return w.bytes
    }
}

// MARK: - Journaling writes before they are acknowledged

extension Store {
    /// Called by a writer after its records are queued and before its write is acknowledged:
    /// puts every record queued so far into the journal file (not synced), unless a writer that
    /// got `journalMutex` first already did. Concurrent writers thus share one frame. Where
    /// unsynced writes die with the process (RADOS) it does nothing: records wait for a flush.
    func journalQueuedRecords() throws(BlockDeviceError) {
        guard journalsWrites else { return }
        let ticket = mutex.withLock { recordBytesQueued }
        journalMutex.lock()
        defer { journalMutex.unlock() }
        // Checked before anything is written (after a failed sync the journal may hold less than
        // `journalEnd` says, so a frame would follow a gap) and also when another thread's frame
        // carried these records: the sync that poisoned the store may have dropped that frame or
        // the data it names, so the write must not be acknowledged. A failed sync poisons inside
        // a hold of `journalMutex` (`poisonAfterFailedSync`, `commitDurably`), so it cannot come
        // between this check and the end of this hold: the frame is written before the poison
        // and the write is answered as if before it, or neither happens.
        if let poison = mutex.withLock({ poisoned }) { throw .io("store is read-only after an earlier failure: \(poison)") }
        guard recordBytesJournaled < ticket else { return }
        do throws(StorageError) { _ = try writeQueuedRecordsLocked(takingFrees: false) } catch {
            throw error == .noSpace ? .noSpace : .io("journal write: \(error)")
        }
    }

    /// With `journalMutex` held and `mutex` not: writes the records queued so far as one frame at
    /// the end of the current journal, without a sync. Returns the sequence number the next frame
    /// gets (every record queued before the call is in a frame below it) and, with `takingFrees`,
    /// the frees those records deferred, taken in the same hold of `mutex` so that none of a
    /// later record is among them. A failed write puts the records and frees back.
    func writeQueuedRecordsLocked(takingFrees: Bool) throws(StorageError) -> (nextSequence: UInt64, frees: DeferredFrees) {
        journalMutex.assertOwned("writeQueuedRecordsLocked")
        let (payload, queued, file, gen, seq, at, frees) = mutex.withLock {
            let payload = pending.bytes
            pending = BinaryWriter()
            pendingRecordCount = 0
            return (payload, recordBytesQueued, journalFile, generation, journalSequence, journalEnd,
                    takingFrees ? takeDeferredFreesLocked() : DeferredFrees())
        }
        guard !payload.isEmpty else {
            recordBytesJournaled = queued
            return (seq, frees)
        }
        let frame = JournalFrame.encode(generation: gen, sequence: seq, payload: payload)
        do {
            try writeUsingSpaceReserve(frame, to: file, at: at)
        } catch {
            restorePending(payload, frees)
            throw error
        }
        mutex.withLock {
            journalSequence = seq + 1
            journalEnd = at + UInt64(frame.count)
        }
        recordBytesJournaled = queued
        return (seq + 1, frees)
    }

    /// With `journalMutex` held and `mutex` not: a frame of `carried` records (taken from the
    /// queue before the data file's sync) and a marker after them, not synced. The marker covers
    /// the frame itself when it carries records, else the frames below `durableBelow`. Returns
    /// the marker's coverage and the journal's end after it, or nil for the end when writers
    /// journaled frames since `durableBelow` was taken: the marker does not cover those.
    func writeMarkerLocked(carrying carried: [UInt8], durableBelow: UInt64, epoch: String? = nil) throws(StorageError) -> (durableBelow: UInt64, end: UInt64?) {
        journalMutex.assertOwned("writeMarkerLocked")
        let (file, gen, seq, at) = mutex.withLock { (journalFile, generation, journalSequence, journalEnd) }
        var payload = BinaryWriter(capacity: carried.count + 64)
        payload.raw(carried)
        let covered = carried.isEmpty ? durableBelow : seq + 1
        markerRecord(durableBelow: covered, epoch: epoch).encode(into: &payload)
        let frame = JournalFrame.encode(generation: gen, sequence: seq, payload: payload.bytes)
        try writeUsingSpaceReserve(frame, to: file, at: at)
        let end = at + UInt64(frame.count)
        mutex.withLock {
            journalSequence = seq + 1
            journalEnd = end
        }
        // Where writes wait for the flush (RADOS), no frame can come between.
        let coversAll = !carried.isEmpty || !journalsWrites || seq == durableBelow
        return (covered, coversAll ? end : nil)
    }
}

// MARK: - Flush

extension Store {
    /// Makes every write completed before this call durable (NBD FLUSH; FUA).
    public func flush() throws {
        flushMutex.lock()
        try flushAndUnlock()
    }

    /// `flush()`, unless another thread is flushing or committing (which then covers the need).
    func flushUnlessOneIsUnderWay() throws {
        guard flushMutex.tryLock() else { return }
        try flushAndUnlock()
    }

    /// With `flushMutex` taken by the caller: the flush, the lock's release, then a commit if due.
    private func flushAndUnlock() throws {
        do {
            defer { flushMutex.unlock() }
            try flushLocked()
            if spaceReserveInUse.load(ordering: .relaxed) { refillSpaceReserve() }
        }
        try checkpointIfJournalLarge()
    }

    /// With `flushMutex` held: (1) every record queued so far goes to the journal (or, where
    /// writes are not journaled at once, is taken for this flush's frame), with the frees it
    /// deferred; (2) the data file is synced; (3) a marker covering those records is written and
    /// the journal synced; (4) the frees are released.
    func flushLocked() throws {
        var carried: [UInt8] = []
        var frees = DeferredFrees()
        var coveredBelow: UInt64 = 0
        var poison: String?
        var nothingNew = false
        // The journal's end once the queue is written: the marker covers the frames before it.
        var queuedEnd: UInt64 = 0
        do throws(StorageError) {
            try journalMutex.withLock { () throws(StorageError) in
                if journalsWrites {
                    (coveredBelow, frees) = try writeQueuedRecordsLocked(takingFrees: true)
                }
                mutex.withLock {
                    poison = poisoned
                    if !journalsWrites {
                        carried = pending.bytes
                        pending = BinaryWriter()
                        pendingRecordCount = 0
                        frees = takeDeferredFreesLocked()
                    }
                    nothingNew = carried.isEmpty && frees.isEmpty && journalEnd <= journalCoveredEnd
                    queuedEnd = journalEnd
                }
            }
        } catch {
            throw error == .noSpace ? StoreError.noSpace : StoreError.io("flush failed: journal write: \(error)")
        }
        if let poison {
            restorePending(carried, frees)
            throw StoreError.io("store is read-only: \(poison)")
        }
        let gen = mutex.withLock { generation }
        var step = "fdatasync of the data file"
        do throws(StorageError) {
            // 2. The chunks the records name are durable before any marker says so.
            try chunkStorage.sync()
            if !nothingNew {
                // 3. Replay applies a covered frame whole; an uncovered one only within its epoch.
                step = "journal write"
                let marker = try journalMutex.withLock { () throws(StorageError) in
                    try writeMarkerLocked(carrying: carried, durableBelow: coveredBelow)
                }
                carried = []
                step = "fdatasync of journal-\(gen)"
                try journalFile.sync()
                mutex.withLock {
                    // Frames journaled between the queue's write and the marker stay uncovered:
                    // the next flush (or control operation) must sync the data and cover them.
                    journalCoveredEnd = max(journalCoveredEnd, marker.end ?? queuedEnd)
                }
            }
        } catch {
            let e: StorageError = error
            // Nothing of this batch counts as durable: a torn frame fails its checksum and the
            // next attempt writes after the valid ones. Carried records go back in front of what
            // came since, so the journal never has a gap; the frees wait for the next flush.
            restorePending(carried, frees)
            // A failed sync may have dropped dirty pages that a retried sync would then call
            // durable: no later flush may succeed. A failed write changed nothing durable.
            if step != "journal write" {
                poisonAfterFailedSync("\(step) failed (\(e))", dataMayBeLost: step == "fdatasync of the data file")
                throw StoreError.io("flush failed: \(step): \(e); the store refuses writes until it is reopened")
            }
            throw e == .noSpace ? StoreError.noSpace : StoreError.io("flush failed: \(step): \(e)")
        }
        // 4. The frees in this batch are durable: the space may be reused and given back.
        try releaseFrees(frees)
    }

    /// After a failed sync, holding neither `journalMutex` nor `mutex` (`flushMutex` may be
    /// held): poisons the store inside one hold of both, so that every frame is written either
    /// before the poison or not at all, and no writer acknowledges after it
    /// (`journalQueuedRecords` checks inside its hold). `dataMayBeLost`: it was the data file's
    /// sync, so the same hold also writes the marker of `distrustUncoveredFramesLocked`.
    func poisonAfterFailedSync(_ reason: String, dataMayBeLost: Bool) {
        journalMutex.withLock {
            mutex.withLock {
                if failure == nil { failure = reason }
                if dataMayBeLost { distrustUncoveredFramesLocked() }
            }
        }
    }

    /// With `journalMutex` and `mutex` held, after a failed fdatasync of `data` and with the store
    /// poisoned: a synced marker in no epoch, so that a reopen in this boot trusts only the
    /// frames an earlier marker covered, as after a power cut. The failed sync may have dropped
    /// the data the uncovered frames name, and a retried sync would report success (Linux
    /// reports a writeback error once). Best effort: if the journal cannot take it either, the
    /// reopen trusts the frames as before. Its I/O runs under `mutex`: the store is poisoned,
    /// and a caller may hold `mutex` already (`commitDurably`).
    func distrustUncoveredFramesLocked() {
        journalMutex.assertOwned("distrustUncoveredFramesLocked")
        mutex.assertOwned("distrustUncoveredFramesLocked")
        guard journalsWrites else { return }
        // durableBelow 0: recovery takes the largest coverage of all markers.
        let frame = JournalFrame.encode(generation: generation, sequence: journalSequence,
                                        payload: encoded(markerRecord(durableBelow: 0, epoch: "")))
        do throws(StorageError) {
            try writeUsingSpaceReserve(frame, to: journalFile, at: journalEnd)
            journalSequence += 1
            journalEnd += UInt64(frame.count)
            try journalFile.sync()
        } catch {}
    }

    /// Puts an unwritten batch back in front of the records queued since. Takes `mutex`.
    func restorePending(_ batch: [UInt8], _ frees: DeferredFrees) {
        mutex.withLock {
            var restored = BinaryWriter(capacity: batch.count + pending.bytes.count)
            restored.raw(batch)
            restored.raw(pending.bytes)
            pending = restored
            restoreDeferredFreesLocked(frees)
        }
    }

    /// With `mutex` held: the frees deferred so far (the records that made them are queued or
    /// journaled), for the flush or commit that makes those records durable.
    func takeDeferredFreesLocked() -> DeferredFrees {
        mutex.assertOwned("takeDeferredFreesLocked")
        var taken = DeferredFrees(sectors: space.takeDeferred())
        if !chunkFreesDeferred.isEmpty { swap(&taken.chunks, &chunkFreesDeferred) }
        return taken
    }

    /// With `mutex` held: puts frees whose records did not become durable back in front.
    func restoreDeferredFreesLocked(_ frees: DeferredFrees) {
        mutex.assertOwned("restoreDeferredFreesLocked")
        space.restoreDeferred(frees.sectors)
        if !frees.chunks.isEmpty { chunkFreesDeferred.insert(contentsOf: frees.chunks, at: 0) }
    }

    /// Without `mutex`: gives freed chunks back to a storage that keeps its own places, once
    /// the records freeing them are durable. What cannot be released now waits for the next
    /// flush (a release is idempotent); what a crash leaves is the leak sweep's (docs/RADOS.md).
    func releaseStoredChunks(_ freed: [StoredChunkPlace]) {
        guard !freed.isEmpty else { return }
        do throws(StorageError) { try chunkStorage.release(freed) } catch {
            mutex.withLock { chunkFreesDeferred.append(contentsOf: freed) }
        }
    }

    func releaseFrees(_ frees: DeferredFrees) throws {
        releaseStoredChunks(frees.chunks)
        let frees = frees.sectors
        guard !frees.isEmpty else { return }
        // The pages to punch stay reserved until punched: a writer taking them in between would
        // have its acknowledged chunk erased by the punch (see SpaceAllocator.swift).
        let punches = mutex.withLock {
            space.releaseReservingPunches(frees, punchRunBytesMin: options.holePunchRunBytesMin,
                                          unpunchedFreeBytesMax: options.unpunchedFreeBytesMax)
        }
        punchReserved(punches)
    }

    /// Punches pages reserved by the space allocator, outside `mutex`, then frees them.
    func punchReserved(_ punches: [(offset: UInt64, length: UInt64)]) {
        guard !punches.isEmpty else { return }
        for p in punches {
            do { try dataFile.punchHole(offset: p.offset, length: p.length) } catch { /* space stays used; harmless */ }
        }
        mutex.withLock { space.finishPunches(punches) }
    }

    func checkpointIfJournalLarge() throws {
        let big = mutex.withLock { journalEnd >= options.checkpointJournalBytes
            || pager.needsCommit || pager.dirtyFrames >= options.commitDirtyPagesMax }
        if big { try checkpoint() }
    }
}

// MARK: - Space reserve

extension Store {
    static let spaceReserveFile = "reserve"

    /// Writes `bytes` at `offset`; on ENOSPC gives the space reserve back to the file system and
    /// tries once more, so a full disk still takes journal frames and checkpoints.
    func writeUsingSpaceReserve(_ bytes: [UInt8], to file: any StorageFile, at offset: UInt64) throws(StorageError) {
        do {
            try Store.write(bytes, to: file, at: offset)
        } catch .noSpace {
            guard releaseSpaceReserve() else { throw .noSpace }
            try Store.write(bytes, to: file, at: offset)
        }
    }

    /// `file.write` of an array, keeping the error's type (`withUnsafeBytes` does not).
    static func write(_ bytes: [UInt8], count: Int? = nil, to file: any StorageFile, at offset: UInt64) throws(StorageError) {
        var failure: StorageError?
        bytes.withUnsafeBytes { b in
            do throws(StorageError) { try file.write(UnsafeRawBufferPointer(rebasing: b[..<(count ?? b.count)]), at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Empties the reserve file; false if it held nothing. New block data is refused from now
    /// on, so the freed space goes to metadata. Takes `spaceReserveMutex` (a leaf): callers
    /// hold `journalMutex` (a writer's frame), `flushMutex` or `mutex`, or are in init, and a
    /// refill may run meanwhile under `flushMutex` alone.
    func releaseSpaceReserve() -> Bool {
        spaceReserveMutex.withLock {
            guard let reserveFile, (try? reserveFile.size()) ?? 0 > 0 else { return false }
            reserveRefusals.store(0, ordering: .relaxed)
            spaceReserveInUse.store(true, ordering: .relaxed)
            do { try reserveFile.truncate(to: 0) } catch { return false }
            return true
        }
    }

    /// With `mutex` held: whether new block data must be refused because the reserve is out.
    /// Space may have come back without a flush (another file deleted, a transient error), so
    /// the first refusal and every 64th after it try to refill the reserve right here; that is
    /// I/O under the store lock, but only while the disk is (or was just) full.
    func spaceReserveRefusesNewDataLocked() -> Bool {
        guard spaceReserveInUse.load(ordering: .relaxed) else { return false }
        let refusal = reserveRefusals.add(1, ordering: .relaxed).oldValue
        guard refusal % 64 == 0, flushMutex.tryLock() else { return true }
        defer { flushMutex.unlock() }
        refillSpaceReserve()
        return spaceReserveInUse.load(ordering: .relaxed)
    }

    /// Fills the reserve file up to `spaceReserveBytes`; on ENOSPC empties it again and leaves
    /// the reserve in use (writes of new data keep getting ENOSPC). `flushMutex` held (one refill
    /// at a time) or init; takes `spaceReserveMutex`, so a journal append that gives the reserve
    /// back meanwhile waits and then finds the file it must empty, never a half-filled one that
    /// this refill then calls whole.
    func refillSpaceReserve() {
        let want = options.spaceReserveBytes
        guard want > 0 else { return }
        spaceReserveMutex.lock()
        defer { spaceReserveMutex.unlock() }
        do {
            if reserveFile == nil { reserveFile = try directory.openFile(Store.spaceReserveFile, create: true) }
            guard let file = reserveFile else { return }
            let have = try file.size()
            if have < want {
                // Written, not just extended: a sparse file would reserve nothing.
                let zeros = [UInt8](repeating: 0, count: Int(min(want - have, 1 << 20)))
                var at = have
                while at < want {
                    let n = Int(min(UInt64(zeros.count), want - at))
                    try Store.write(zeros, count: n, to: file, at: at)
                    at += UInt64(n)
                }
                try file.sync()
            }
            spaceReserveInUse.store(false, ordering: .relaxed)
        } catch {
            try? reserveFile?.truncate(to: 0)
            spaceReserveInUse.store(true, ordering: .relaxed)
        }
    }
}

// MARK: - Commits (checkpoints) and the superblock

/// A commit between its preparation (store lock held) and its completion.
struct PreparedCommit {
    var generation: UInt64
    var batch: CommitBatch
    var superblock: [UInt8]
    /// The generation the other superblock slot names once this one is durable.
    var keepFrom: UInt64
    var frees: DeferredFrees
    /// The journal that got the seal frame, written but not yet synced: `writePreparedCommit`
    /// syncs the data file, writes `sealMarker` after the seal frame (at `sealMarkerOffset`) and
    /// syncs the journal, before any page.
    var sealedJournal: any StorageFile
    var sealMarker: [UInt8]
    var sealMarkerOffset: UInt64
    /// What goes at `sealMarkerOffset` instead when the data file's sync fails: a marker in no
    /// epoch (`distrustUncoveredFramesLocked`).
    var sealDistrustMarker: [UInt8]
}

extension Store {
    static let superblockSlotBytes = 4096
    static let superblockMagic: UInt64 = 0x3250_5553_4442_5600   // "\0VBDSUP2"
    /// Format 1 kept all metadata in checkpoint files; such a store is refused with a message.
    static let superblockMagicFormat1: UInt64 = 0x3150_5553_4442_5600
    static let imageTableMagic: UInt32 = 0x5449_4256                // "VBIT"
    /// 3: journals hold markers (docs/FORMAT.md). A version-2 store is read: its journals have
    /// no marker, and each of their frames was synced after its data (see `replayJournal`).
    /// 4: the superblock holds the free-space summary (`SpaceSummary`); a store of an older
    /// version gets it from one pass over its sector map at open, and its next commit writes 4.
    static let formatVersion: UInt32 = 4
    static let formatVersionsRead: ClosedRange<UInt32> = 2...4

    /// Commits the metadata pages changed since the last commit and switches the superblock to
    /// them; the journal starts empty afterwards. The pages are written without the store lock:
    /// reads and writes go on meanwhile (only flushes wait), so the stall a commit causes is the
    /// bookkeeping of its changed pages, not their I/O.
    public func checkpoint() throws {
        try flushMutex.withLock {
            let tracing = StoreMutex.traceThresholdNanos != nil
            let tracedStart = tracing ? StoreMutex.wallClockSeconds() : ""
            // When tracing, the wall-clock end of each phase, so that a reader's slow I/O can be set
            // beside the phase it overlapped (Benchmarks/metadata-scale.sh).
            var phases = ""
            func phaseEnded(_ name: StaticString) { if tracing { phases += " \(name) \(StoreMutex.wallClockSeconds())" } }
            // Most of the data file's dirty pages are synced before the lock is taken: the sync
            // under it then waits only for what was written in between.
            if !options.readOnly { do { try chunkStorage.sync() } catch {
                poisonAfterFailedSync("fdatasync of the data file failed (\(error))", dataMayBeLost: true)
                throw StoreError.io("checkpoint failed: fdatasync of the data file: \(error); the store refuses writes until it is reopened")
            } }
            // `meta` grows before the lock is taken (only commits write it, and they hold
            // `flushMutex`): the commit then finds room for all of its pages.
            if !options.readOnly {
                let pages = mutex.withLock { pager.root.pageCount }
                do throws(StorageError) { try growMeta(toCover: pages + pages / 8) } catch {
                    throw error == .noSpace ? StoreError.noSpace : StoreError.io("checkpoint failed growing meta: \(error)")
                }
            }
            // The next journal is created, synced and its directory entry made durable before the
            // lock is taken too: I/O under the lock is only the seal frame's write.
            let newGeneration = mutex.withLock { nextCommitGeneration }
            let journal = try createJournal(generation: newGeneration)
            let prepared: PreparedCommit
            do {
                // The seal frame and the switch of journals are appends: `journalMutex` first.
                // The changed pages are frozen in steps of the store lock, with `commitGate`
                // held throughout: readers run between the steps, changes wait for the last.
                prepared = try journalMutex.withLock {
                    try commitGate.withLock { () throws -> PreparedCommit in
                        let started = try mutex.withLock { () throws -> StartedCommit in
                            if let poisoned { throw StoreError.io("store is read-only: \(poisoned)") }
                            return try startCommitLocked(generation: newGeneration)
                        }
                        let stepPages = max(1, options.commitFreezeStepPages)
                        while true {
                            let prepared = try mutex.withLock { () throws -> PreparedCommit? in
                                guard let batch = try continueFreezeLocked(started, stepsMax: stepPages) else { return nil }
                                return finishPreparingCommitLocked(started, batch: batch, journal: journal)
                            }
                            if let prepared { return prepared }
                            mutex.yieldToWaiters(for: .microseconds(200))
                        }
                    }
                }
            } catch {
                journal.close()
                if !closed { try? directory.removeFile("journal-\(newGeneration)") }
                throw error
            }
            do {
                phaseEnded("prepared")
                try writePreparedCommit(prepared, ended: phaseEnded)
            } catch let failed as FailedCommit {
                mutex.withLock {
                    if failed.wroteNothingDurable {
                        // Nothing names what was written: take the versions back, and let the next
                        // commit keep clear of the superblock slot that still names the last one.
                        pager.abandonCommit(prepared.batch, revert: true)
                        fallbackRoot = fallbackRoot ?? prepared.keepFrom
                        restoreDeferredFreesLocked(prepared.frees)
                    } else {
                        pager.abandonCommit(prepared.batch)
                    }
                }
                // A failed data sync distrusted the sealed journal's frames already
                // (`writePreparedCommit`); the chain to the current journal goes through its seal.
                if !failed.wroteNothingDurable {
                    poisonAfterFailedSync("checkpoint failed at \(failed.step) (\(failed.error))", dataMayBeLost: false)
                }
                if failed.wroteNothingDurable {
                    if failed.error == .noSpace { throw StoreError.noSpace }
                    throw StoreError.io("checkpoint failed at \(failed.step): \(failed.error)")
                }
                throw StoreError.io("checkpoint failed at \(failed.step): \(failed.error); the store refuses writes until it is reopened")
            }
            let punches = mutex.withLock {
                let punches = completeCommitLocked(prepared)
                if spaceReserveInUse.load(ordering: .relaxed) { refillSpaceReserve() }
                return punches
            }
            phaseEnded("completed")
            finishCommitUnlocked(prepared, punches: punches)
            if tracing {
                let figures = mutex.withLock {
                    "pages \(prepared.batch.pages.count), frees \(prepared.frees.count), punches \(punches.count), " +
                    "cache \(pager.residentBytes >> 10) KiB in \(pager.cachedPageCount) pages, bitmap \(space.bitmapBytes >> 20) MiB"
                }
                var usage = rusage()
                getrusage(RUSAGE_SELF.rawValue, &usage)
                StoreMutex.writeToStandardError("vbd commit trace: generation \(prepared.generation): \(figures), \(StoreMutex.memoryFigures()), process peak RSS \(usage.ru_maxrss >> 10) MiB, " +
                                                "from \(tracedStart) to \(StoreMutex.wallClockSeconds()), phases ended:\(phases) finished\n")
            }
        }
    }

    /// After `completeCommitLocked`, without `mutex` (but with `flushMutex`, which every journal
    /// creation holds): the work whose cost grows with the commit or the store, done so that the
    /// store lock is held only in bounded steps.
    func finishCommitUnlocked(_ prepared: PreparedCommit, punches: [(offset: UInt64, length: UInt64)]) {
        punchReserved(punches)
        releaseStoredChunks(prepared.frees.chunks)
        // Generations before the one the other slot names are named by no slot and no chain now.
        removeGenerationFiles { $0 < prepared.keepFrom }
        // The commit made its pages clean: the cache may now be far over budget.
        while !mutex.withLock({ pager.trim() }) {}
    }

    /// The whole commit with `mutex` held throughout (a new store's first commit; nothing else
    /// runs yet, so `journalMutex` is not taken).
    func commitHoldingLock() throws {
        let newGeneration = nextCommitGeneration
        let prepared = try prepareCommitLocked(journal: try createJournal(generation: newGeneration), generation: newGeneration)
        do { try writePreparedCommit(prepared) } catch {
            pager.abandonCommit(prepared.batch)
            failure = "checkpoint failed at \(error.step) (\(error.error))"
            throw StoreError.io("checkpoint failed at \(error.step): \(error.error)")
        }
        let punches = completeCommitLocked(prepared)
        for p in punches { try? dataFile.punchHole(offset: p.offset, length: p.length) }
        space.finishPunches(punches)
        if !prepared.frees.chunks.isEmpty { try? chunkStorage.release(prepared.frees.chunks) }
        removeGenerationFiles { $0 < prepared.keepFrom }
        pager.trim()
    }

    /// Why `writePreparedCommit` failed, and whether anything it did can matter after a crash.
    struct FailedCommit: Error {
        var step: String
        var error: StorageError
        /// A page write failed before anything was synced: only unnamed slots were touched.
        var wroteNothingDurable: Bool
    }

    /// The generation the next commit writes. Normally the next number, whose superblock slot is
    /// the previous generation's. After a fallback, or a crash in the middle of a commit, the slot
    /// of the generation recovery started from is the only way back until this commit is durable:
    /// skip to the other parity. Changes only with a commit (`flushMutex`).
    var nextCommitGeneration: UInt64 {
        var newGeneration = generation + 1
        if let root = fallbackRoot, newGeneration % 2 == root % 2 { newGeneration += 1 }
        return newGeneration
    }

    /// A new, synced `journal-G` whose directory entry is durable (the superblock must never name
    /// a file a crash could drop), holding one frame: a marker naming the epoch its frames will be
    /// written in (`firstMarkerFrame`).
    func createJournal(generation: UInt64) throws -> any StorageFile {
        var step = "creating journal-\(generation)"
        do throws(StorageError) {
            let journal = try directory.openFile("journal-\(generation)", create: true)
            do {
                try journal.truncate(to: 0)
                try Store.write(firstMarkerFrame(generation: generation), to: journal, at: 0)
                try journal.sync()
                step = "fsync of the store directory"
                try directory.syncDirectory()
            } catch {
                journal.close()
                throw error
            }
            return journal
        } catch {
            if !closed { try? directory.removeFile("journal-\(generation)") }
            if error == .noSpace { throw StoreError.noSpace }
            throw StoreError.io("checkpoint failed at \(step): \(error)")
        }
    }

    /// What the first step of a commit took, for the steps that follow it.
    struct StartedCommit {
        var generation: UInt64
        var keepFrom: UInt64
        var frees: DeferredFrees
    }

    /// The whole preparation of a commit in one hold of `mutex` (a new store's first commit).
    func prepareCommitLocked(journal: any StorageFile, generation newGeneration: UInt64) throws -> PreparedCommit {
        let started = try startCommitLocked(generation: newGeneration)
        guard let batch = try continueFreezeLocked(started, stepsMax: .max) else {
            preconditionFailure("a freeze without a bound on its step ends in one")
        }
        return finishPreparingCommitLocked(started, batch: batch, journal: journal)
    }

    /// With `mutex` (and `flushMutex`, `journalMutex`) held: stores the image table, takes the
    /// deferred frees, appends the seal frame (a write; `writePreparedCommit` syncs it) and
    /// starts the freeze of the changed pages (`MetadataPager.startCommit`, no work per page). A
    /// failure leaves the store as it was and writable.
    func startCommitLocked(generation newGeneration: UInt64) throws -> StartedCommit {
        mutex.assertOwned("startCommitLocked")
        if options.readOnly { throw StoreError.io("the store was opened read-only") }
        precondition(newGeneration == nextCommitGeneration, "the commit's generation changed under flushMutex")
        let keepFrom = fallbackRoot ?? generation
        try storeImageTableLocked()
        mutex.traceStep("image-table")
        var step = "growing meta"
        let frees = takeDeferredFreesLocked()
        do throws(StorageError) {
            // Every slot the commit may write exists (written as zeroes, not a hole), so running out of
            // space cannot happen halfway through the commit's pages.
            try growMeta(toCover: pager.root.pageCount)
            mutex.traceStep("grow-meta")
            // The unflushed records and a seal go to this generation's journal, so that this
            // commit plus its journal equals the next commit: recovery's way back if the next
            // one is damaged or never completes (see `JournalRecord.sealed`). The chunks they
            // name and the frame itself are synced after the lock is released, before any page.
            try appendFrameLocked([.sealed(nextGeneration: newGeneration)], step: &step, sync: false, marked: false)
            mutex.traceStep("seal-frame")
        } catch {
            let e: StorageError = error
            restoreDeferredFreesLocked(frees)
            if e == .noSpace { throw StoreError.noSpace }
            throw StoreError.io("checkpoint failed at \(step): \(e)")
        }
        pager.startCommit(generation: newGeneration)
        return StartedCommit(generation: newGeneration, keepFrom: keepFrom, frees: frees)
    }

    /// With `mutex` held: one step of the freeze (`MetadataPager.continueFreeze`); the batch once
    /// it is whole. A failure undoes the freeze and puts the frees back.
    func continueFreezeLocked(_ started: StartedCommit, stepsMax: Int) throws -> CommitBatch? {
        mutex.assertOwned("continueFreezeLocked")
        do {
            let batch = try pager.continueFreeze(stepsMax: stepsMax)
            mutex.traceStep("freeze-step")
            return batch
        } catch {
            restoreDeferredFreesLocked(started.frees)
            throw StoreError.io("checkpoint failed freezing the changed pages: \(error)")
        }
    }

    /// With `mutex` held, once the freeze is whole: switches to `journal` and encodes the
    /// superblock that will name the batch's root.
    func finishPreparingCommitLocked(_ started: StartedCommit, batch: CommitBatch, journal: any StorageFile) -> PreparedCommit {
        mutex.assertOwned("finishPreparingCommitLocked")
        // The seal frame is not covered yet: its chunks are synced after the lock is released,
        // and only then may a marker say so (`writePreparedCommit`).
        let sealMarker = JournalFrame.encode(generation: generation, sequence: journalSequence,
                                             payload: encoded(markerRecord(durableBelow: journalSequence)))
        let sealDistrustMarker = JournalFrame.encode(generation: generation, sequence: journalSequence,
                                                     payload: encoded(markerRecord(durableBelow: 0, epoch: "")))
        let sealMarkerOffset = journalEnd
        let sealed = journalFile
        journalFile = journal
        generation = started.generation
        let first = UInt64(firstMarkerFrame(generation: started.generation).count)
        journalSequence = 1
        journalEnd = first
        journalCoveredEnd = first
        return PreparedCommit(generation: started.generation, batch: batch,
                              superblock: encodeSuperblock(generation: started.generation, pageTable: batch.root),
                              keepFrom: started.keepFrom, frees: started.frees, sealedJournal: sealed,
                              sealMarker: sealMarker, sealMarkerOffset: sealMarkerOffset,
                              sealDistrustMarker: sealDistrustMarker)
    }

    /// Extends `meta` with zeroes (not a hole) to hold both slots of `pages` pages, by at least an
    /// eighth of its size so that a growing store does not extend it at every commit.
    func growMeta(toCover pages: UInt64) throws(StorageError) {
        let needed = pages * 2 * UInt64(MetadataPageFile.pageBytes)
        let have = try metaFile.size()
        guard have < needed else { return }
        let target = max(needed, have + have / 8)
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        var at = have
        while at < target {
            let n = Int(min(UInt64(zeros.count), target - at))
            try writeUsingSpaceReserve(n == zeros.count ? zeros : Array(zeros[0..<n]), to: metaFile, at: at)
            at += UInt64(n)
        }
    }

    /// Without `mutex`: the commit's pages, then the superblock that names them.
    /// `ended` is told the name of each step as it ends (the commit trace).
    func writePreparedCommit(_ prepared: PreparedCommit, ended: (StaticString) -> Void = { _ in }) throws(FailedCommit) {
        defer { prepared.sealedJournal.close() }
        // The chunks the sealed records name, then the seal frame: both before any page.
        do { try chunkStorage.sync() } catch {
            // The failed sync may have dropped the data of the sealed journal's uncovered frames
            // (the seal's too): a marker in no epoch where the seal's marker would have gone, so
            // that a reopen in this boot replays only covered frames, stops before the seal and
            // never reaches the current journal. No lock: nothing else appends to a sealed journal.
            if journalsWrites {
                if (try? writeUsingSpaceReserve(prepared.sealDistrustMarker, to: prepared.sealedJournal,
                                                at: prepared.sealMarkerOffset)) != nil {
                    try? prepared.sealedJournal.sync()
                }
            }
            throw FailedCommit(step: "fdatasync of the data file", error: error, wroteNothingDurable: false)
        }
        ended("data-synced")
        // Without the marker a recovery after a power cut would not apply the seal, and would lose
        // the next journal's flushed frames: a failure here poisons, like a failed sync.
        do {
            try writeUsingSpaceReserve(prepared.sealMarker, to: prepared.sealedJournal, at: prepared.sealMarkerOffset)
        } catch {
            throw FailedCommit(step: "writing the sealed journal's marker", error: error, wroteNothingDurable: false)
        }
        do { try prepared.sealedJournal.sync() } catch {
            throw FailedCommit(step: "fdatasync of the sealed journal", error: error, wroteNothingDurable: false)
        }
        ended("seal-synced")
        do { try MetadataPager.writeCommit(prepared.batch, to: metaFile) } catch {
            throw FailedCommit(step: "writing metadata pages", error: error, wroteNothingDurable: true)
        }
        ended("pages-written")
        // A failed sync may have dropped written pages that a retried sync would call durable,
        // and a failed superblock write leaves unknown which slot a crash finds: only a reopen
        // can tell.
        do { try metaFile.sync() } catch {
            throw FailedCommit(step: "fdatasync of meta", error: error, wroteNothingDurable: false)
        }
        ended("meta-synced")
        let slot = UInt64(prepared.generation % 2) * UInt64(Store.superblockSlotBytes)
        do {
            try Store.write(prepared.superblock, to: superblockFile, at: slot)
            try superblockFile.sync()
        } catch {
            throw FailedCommit(step: "superblock write", error: error, wroteNothingDurable: false)
        }
        ended("superblock-synced")
    }

    /// With `mutex` held, once the superblock is durable. Returns the freed runs to punch, which
    /// stay reserved until `punchReserved` has punched them (outside the lock).
    func completeCommitLocked(_ prepared: PreparedCommit) -> [(offset: UInt64, length: UInt64)] {
        pager.finishCommit(prepared.batch)
        mutex.traceStep("finish-commit")
        fallbackRoot = nil
        defer { mutex.traceStep("release-frees") }
        return space.releaseReservingPunches(prepared.frees.sectors, punchRunBytesMin: options.holePunchRunBytesMin,
                                             unpunchedFreeBytesMax: options.unpunchedFreeBytesMax)
    }

    /// With `mutex` held: the image table (images, their map roots, the group names) into its
    /// paged array, rewriting only the words that changed since the last commit.
    func storeImageTableLocked() throws {
        var w = BinaryWriter(capacity: 64 + images.count * 64)
        w.u32(Store.imageTableMagic)
        w.varint(nextImageID)
        w.varint(UInt64(groups.count))
        for (name, group) in groups.sorted(by: { $0.key < $1.key }) { w.string(name); w.u16(group.rawValue) }
        w.varint(UInt64(images.count))
        for image in images.values.sorted(by: { $0.record.id < $1.record.id }) {
            image.record.encode(into: &w)
            w.u8(UInt8(image.root.levels))
            w.u64(image.root.page.rawValue)
        }
        let bytes = w.bytes
        guard bytes != committedImageTable else { return }
        let words = (bytes.count + 7) / 8
        for k in 0..<words {
            let lo = k * 8, hi = min(lo + 8, bytes.count)
            let oldHi = min(hi, committedImageTable.count)
            if lo < oldHi && hi == oldHi && bytes[lo..<hi] == committedImageTable[lo..<hi] { continue }
            var word: UInt64 = 0
            for (j, b) in bytes[lo..<hi].enumerated() { word |= UInt64(b) << UInt64(8 * j) }
            try imageTable.set(UInt64(k), word, pager: pager)
        }
        committedImageTable = bytes
    }

    /// Reads the image table `bytes` long from its paged array and installs it.
    func loadImageTable(bytes count: UInt64, checksum: UInt64) throws {
        guard count < 1 << 32 else { throw StoreError.corrupted("the image table claims \(count) bytes") }
        var bytes = [UInt8](repeating: 0, count: Int(count))
        var k: UInt64 = 0
        while k * 8 < count {
            let word = try imageTable.get(k, pager: pager)
            for j in 0..<8 where Int(k) * 8 + j < bytes.count { bytes[Int(k) * 8 + j] = UInt8(truncatingIfNeeded: word >> UInt64(8 * j)) }
            k += 1
        }
        guard metadataChecksum(bytes) == checksum else { throw StoreError.corrupted("the image table fails its checksum") }
        var r = BinaryReader(bytes)
        do {
            guard try r.u32() == Store.imageTableMagic else { throw BinaryReader.Malformed(position: 0) }
            nextImageID = try r.varint()
            groups = [:]
            for _ in 0..<(try r.varint()) {
                let name = try r.string()
                groups[name] = SharingGroupID(try r.u16())
            }
            images = [:]
            for _ in 0..<(try r.varint()) {
                let record = try ImageRecord.decode(&r)
                let levels = Int(try r.u8())
                let page = PageNumber(try r.u64())
                guard levels >= 1 && levels <= 7, levels >= MapGeometry.levels(forBlocks: record.blockCount) else {
                    throw BinaryReader.Malformed(position: r.position)
                }
                images[record.id] = Image(record: record, root: MapRoot(page: page, levels: levels))
            }
        } catch {
            throw StoreError.corrupted("the image table is malformed")
        }
        committedImageTable = bytes
    }

    // Superblock slot, format 2 (all little-endian):
    //   u64 magic | u32 version | u64 generation | u64 secret
    //   page table: u64 root page | u64 root version | u8 levels | u64 page count
    //   chunk records: u64 root | u8 levels; free numbers: u64 root | u8 levels; u64 free count;
    //   u64 end; u64 live count
    //   dedup buckets: u64 root | u8 levels; u8 level; u64 split; u64 count
    //   sector map: u64 root | u8 levels
    //   image table: u64 root | u8 levels | u64 bytes | u64 checksum
    //   (format 4) free-space summary: u64 sectors in the sector map | u64 its end sector
    //   u64 XXH3-64 of everything before it
    func encodeSuperblock(generation: UInt64, pageTable root: PageTableRoot) -> [UInt8] {
        var w = BinaryWriter(capacity: Store.superblockSlotBytes)
        w.u64(Store.superblockMagic); w.u32(Store.formatVersion); w.u64(generation); w.u64(secret)
        w.u64(root.page.rawValue); w.u64(root.version.packed); w.u8(UInt8(root.levels)); w.u64(root.pageCount)
        w.u64(chunks.records.root.rawValue); w.u8(UInt8(chunks.records.levels))
        w.u64(chunks.freeNumbers.root.rawValue); w.u8(UInt8(chunks.freeNumbers.levels))
        w.u64(chunks.freeCount); w.u64(chunks.end); w.u64(chunks.liveCount)
        w.u64(index.buckets.root.rawValue); w.u8(UInt8(index.buckets.levels)); w.u8(UInt8(index.level))
        w.u64(index.split); w.u64(index.count)
        w.u64(sectorMap.root.rawValue); w.u8(UInt8(sectorMap.levels))
        w.u64(imageTable.root.rawValue); w.u8(UInt8(imageTable.levels))
        w.u64(UInt64(committedImageTable.count)); w.u64(metadataChecksum(committedImageTable))
        w.u64(spaceSummary.usedSectors); w.u64(spaceSummary.endSector)
        w.u64(metadataChecksum(w.bytes))
        w.raw([UInt8](repeating: 0, count: Store.superblockSlotBytes - w.bytes.count))
        return w.bytes
    }

    struct SuperblockSlot {
        var generation: UInt64
        var secret: UInt64
        var pageTable: PageTableRoot
        var chunks: PagedChunkTable
        var index: PagedDedupIndex
        var sectorMap: PagedArray<UInt64>
        var imageTable: PagedArray<UInt64>
        var imageTableBytes: UInt64
        var imageTableChecksum: UInt64
        /// Nil in a slot of format 2 or 3, which has none.
        var spaceSummary: SpaceSummary?
    }

    /// Bytes of a format-2/3 slot, and of a format-4 slot (the free-space summary added).
    static let superblockBytesUsedFormat3 = 8 + 4 + 8 + 8 + (8 + 8 + 1 + 8) + (9 + 9 + 8 + 8 + 8) + (9 + 1 + 8 + 8) + 9 + (9 + 8 + 8) + 8
    static let superblockBytesUsed = superblockBytesUsedFormat3 + 16

    /// The valid slots, newest first, the numbers of slots that were written but fail their
    /// checks (a slot of zeroes was never written), and whether a format-1 slot was seen.
    func readSuperblockSlots() throws -> (valid: [SuperblockSlot], damaged: [Int], format1: Bool) {
        let bytes = try superblockFile.readAll()
        var slots: [SuperblockSlot] = []
        var damaged: [Int] = []
        var format1 = false
        for k in 0..<2 {
            let at = k * Store.superblockSlotBytes
            // The version (bytes 8..<12) says how long the slot is.
            var n = Store.superblockBytesUsedFormat3
            if bytes.count >= at + 12 {
                let version = UInt32(bytes[at + 8]) | UInt32(bytes[at + 9]) << 8 | UInt32(bytes[at + 10]) << 16 | UInt32(bytes[at + 11]) << 24
                if version >= 4 { n = Store.superblockBytesUsed }
            }
            guard bytes.count >= at + n else {
                if bytes.count > at && bytes[at...].contains(where: { $0 != 0 }) { damaged.append(k) }
                continue
            }
            var r = BinaryReader(Array(bytes[at..<at + n]))
            func level(_ v: UInt8) throws(BinaryReader.Malformed) -> Int {
                guard v >= 1 && v <= 8 else { throw BinaryReader.Malformed(position: 0) }
                return Int(v)
            }
            do {
                let magic = try r.u64()
                if magic == Store.superblockMagicFormat1 { format1 = true; continue }
                let version = try r.u32()
                guard magic == Store.superblockMagic, Store.formatVersionsRead.contains(version) else { throw BinaryReader.Malformed(position: 0) }
                let gen = try r.u64(), sec = try r.u64()
                let pt = PageTableRoot(page: PageNumber(try r.u64()), version: PageVersion(packed: try r.u64()),
                                       levels: try level(try r.u8()), pageCount: try r.u64())
                var c = PagedChunkTable()
                c.records = PagedArray(root: PageNumber(try r.u64()), levels: try level(try r.u8()))
                c.freeNumbers = PagedArray(root: PageNumber(try r.u64()), levels: try level(try r.u8()))
                c.freeCount = try r.u64(); c.end = try r.u64(); c.liveCount = try r.u64()
                var d = PagedDedupIndex()
                d.buckets = PagedArray(root: PageNumber(try r.u64()), levels: try level(try r.u8()))
                d.level = Int(try r.u8()); d.split = try r.u64(); d.count = try r.u64()
                let sm = PagedArray<UInt64>(root: PageNumber(try r.u64()), levels: try level(try r.u8()))
                let it = PagedArray<UInt64>(root: PageNumber(try r.u64()), levels: try level(try r.u8()))
                let itBytes = try r.u64(), itSum = try r.u64()
                let summary = version >= 4 ? SpaceSummary(usedSectors: try r.u64(), endSector: try r.u64()) : nil
                let check = try r.u64()
                guard check == metadataChecksum(Array(bytes[at..<at + n - 8])), d.level < 64,
                      d.split < UInt64(1) << UInt64(d.level) || (d.level == 0 && d.split == 0), c.end >= 1 else {
                    throw BinaryReader.Malformed(position: 0)
                }
                slots.append(SuperblockSlot(generation: gen, secret: sec, pageTable: pt, chunks: c, index: d, sectorMap: sm,
                                            imageTable: it, imageTableBytes: itBytes, imageTableChecksum: itSum,
                                            spaceSummary: summary))
            } catch {
                if bytes[at..<at + n].contains(where: { $0 != 0 }) { damaged.append(k) }
            }
        }
        return (slots.sorted { $0.generation > $1.generation }, damaged, format1)
    }

    // MARK: Recovery

    func recover() throws {
        let (slots, damagedSlots, format1) = try readSuperblockSlots()
        if slots.isEmpty && format1 {
            throw StoreError.notSupported("the store at \(directory.path) has on-disk format 1 (metadata in checkpoint files); " +
                                          "this vbdtool reads format 2 (metadata pages, docs/FORMAT.md): copy its volumes out with " +
                                          "the vbdtool that wrote it and import them into a new store")
        }
        guard !slots.isEmpty else { throw StoreError.corrupted("no valid superblock in \(directory.path)") }
        guard directory.fileExists("meta") else { throw StoreError.corrupted("meta, which the superblock names, is missing") }
        metaFile = try directory.openFile("meta", create: false)
        // The newest slot whose image table reads back intact (which checks the page-table path
        // to it); the older slot's pages stay untouched until a newer commit is durable.
        var chosen: SuperblockSlot?
        var damage: [String] = damagedSlots.map { "superblock slot \($0) fails its checksum" }
        for slot in slots {
            pager = MetadataPager(file: metaFile, root: slot.pageTable, committedGeneration: slot.generation,
                                  budgetBytes: options.metadataCacheBytes)
            chunks = slot.chunks
            index = slot.index
            sectorMap = slot.sectorMap
            imageTable = slot.imageTable
            secret = slot.secret
            do {
                try loadImageTable(bytes: slot.imageTableBytes, checksum: slot.imageTableChecksum)
                chosen = slot
                break
            } catch let e as StoreError where e.code == "corrupted" {
                damage.append("generation \(slot.generation): \(e.description)")
            }
        }
        guard let slot = chosen else {
            throw StoreError.corrupted("no usable commit: " + damage.joined(separator: "; "))
        }
        generation = slot.generation
        if let summary = slot.spaceSummary {
            spaceSummary = summary
        } else {
            // A store of format 2 or 3 has no summary: one pass over the sector map, before the
            // replay updates it; the next commit writes it (format 4).
            let readsBefore = pager.reads
            spaceSummary = try countSectorMap()
            recoveryWarnings.append("the superblock (format 3 or older) has no free-space summary: built it from the sector map " +
                                    "(\(pager.reads - readsBefore) metadata pages read); the next commit stores it (format 4)")
        }
        // Replay the journal's valid prefix.
        let journalName = "journal-\(generation)"
        if options.readOnly {
            do { journalFile = try directory.openFile(journalName, create: false) } catch {
                throw StoreError.corrupted("\(journalName) named by the superblock is missing")
            }
        } else {
            journalFile = try directory.openFile(journalName, create: true)
        }
        replaying = true
        defer { replaying = false }
        var replayed = try replayJournal(journalFile, name: journalName, generation: generation)
        // A journal sealed for a later generation continues in that generation's journal (a commit
        // that did not complete, or one whose superblock slot is damaged): replaying the chain loses
        // nothing. The last journal of the chain becomes the current one.
        var chain = [generation]
        // The journals before the last one, kept open until the whole chain has replayed: those
        // with frames trusted only within this epoch get a marker covering them too.
        var earlier: [(file: any StorageFile, generation: UInt64, replayed: ReplayedJournal)] = []
        defer { for e in earlier { e.file.close() } }
        while let next = replayed.sealedFor, next > generation, directory.fileExists("journal-\(next)") {
            let nextFile = try directory.openFile("journal-\(next)", create: false)
            let nextReplayed: ReplayedJournal
            do {
                nextReplayed = try replayJournal(nextFile, name: "journal-\(next)", generation: next)
            } catch {
                nextFile.close()
                throw error
            }
            earlier.append((journalFile, generation, replayed))
            replayed = nextReplayed
            journalFile = nextFile
            generation = next
            chain.append(next)
        }
        journalSequence = UInt64(replayed.frames)
        journalEnd = UInt64(replayed.validBytes)
        if !options.readOnly {
            try markRecoveredJournals(earlier: earlier, current: replayed)
        }
        // The slot recovery started from is the only complete way back until the next commit is
        // durable; that commit must take the other slot.
        if chain.count > 1 { fallbackRoot = slot.generation }
        if !damage.isEmpty {
            recoveryWarnings.append("opened the commit of generation \(slot.generation) although \(damage.joined(separator: "; ")): " +
                                    "replayed " + chain.map { "journal-\($0)" }.joined(separator: ", ") +
                                    (chain.count > 1 ? ", so nothing flushed was lost" :
                                        "; if that was not the newest generation, changes made after it are lost (run fsck)"))
        }
        try attachSpace()
        guard !options.readOnly else { return }
        // Files outside the generations the slots and the chain name are leftovers of an
        // interrupted commit. (Everything from the older valid slot on may be a way back.)
        let lowest = slots.map(\.generation).min() ?? generation
        let highest = max(generation, slots.map(\.generation).max() ?? generation)
        removeGenerationFiles { $0 < lowest || $0 > highest }
    }

    /// Removes the checkpoint and journal files of the generations `doomed` selects.
    func removeGenerationFiles(_ doomed: (UInt64) -> Bool) {
        for name in (try? directory.fileNames()) ?? [] {
            for prefix in ["journal-"] where name.hasPrefix(prefix) {
                if let g = UInt64(name.dropFirst(prefix.count)), doomed(g) { try? directory.removeFile(name) }
            }
        }
    }

    /// What replaying one journal found.
    struct ReplayedJournal {
        /// Valid frames (the next frame's sequence number) and the bytes they take.
        var frames: Int
        var validBytes: Int
        var fileBytes: Int
        /// The generation named by a seal that was replayed.
        var sealedFor: UInt64?
        /// Record frames from this sequence on were not replayed: written but not covered by a
        /// marker, and not in the current epoch (a power cut). A new marker voids them.
        var droppedFrom: UInt64?
        /// Record frames no marker covers were replayed because they were written in this epoch:
        /// their data must be synced before a marker may cover them.
        var replayedUncovered = false
        /// The last marker names the current epoch: frames appended now need no new marker.
        var markedInThisEpoch = false
    }

    /// Replays the valid frames of one generation's journal that may be trusted: all of them when
    /// its last marker names the current epoch (the process died, the machine did not) or it has
    /// no marker (format 2 synced each frame after its data), else those its markers cover. A bad
    /// frame with valid frames after it that prove it was synced is corruption (or, with the
    /// operator's consent, a repair); see ``JournalDamage``.
    func replayJournal(_ file: any StorageFile, name: String, generation: UInt64) throws -> ReplayedJournal {
        let journalBytes = try file.readAll()
        let (payloads, valid) = JournalFrame.decodeValidPrefix(journalBytes, generation: generation)
        // Two passes, so that only the markers are held: the first finds what may be trusted,
        // the second decodes each frame again and applies it.
        func records(of k: Int) throws -> [JournalRecord] {
            var r = BinaryReader(payloads[k])
            var records: [JournalRecord] = []
            while r.remaining > 0 {
                do { records.append(try JournalRecord.decode(&r)) } catch {
                    throw StoreError.corrupted("\(name) frame \(k) has a malformed record")
                }
            }
            return records
        }
        var lastMarker: JournalMarker?
        var covered: UInt64 = 0
        var voided: [Range<UInt64>] = []
        var holdsRecords: [Bool] = []
        holdsRecords.reserveCapacity(payloads.count)
        for k in payloads.indices {
            var others = false
            for record in try records(of: k) {
                guard case .marker(let m) = record else { others = true; continue }
                lastMarker = m
                covered = max(covered, m.durableBelow)
                if !m.voided.isEmpty { voided.append(m.voided) }
            }
            holdsRecords.append(others)
        }
        let formatTwo = lastMarker == nil
        let sameEpoch = lastMarker.map { !$0.epoch.isEmpty && $0.epoch == unsyncedWritesEpoch } ?? false
        if valid < journalBytes.count,
           let found = JournalDamage(journal: name, bytes: journalBytes, validBytes: valid,
                                     validFrames: payloads.count, generation: generation, sameEpoch: sameEpoch || formatTwo) {
            guard let repair = options.repairJournal, !options.readOnly, repair(found) else {
                throw StoreError.corrupted(found.description)
            }
        }
        let trustedBelow = sameEpoch || formatTwo ? UInt64(payloads.count) : covered
        var result = ReplayedJournal(frames: payloads.count, validBytes: valid, fileBytes: journalBytes.count,
                                     markedInThisEpoch: sameEpoch)
        for k in payloads.indices where holdsRecords[k] {
            let sequence = UInt64(k)
            guard !voided.contains(where: { $0.contains(sequence) }) else { continue }
            guard sequence < trustedBelow else {
                if result.droppedFrom == nil { result.droppedFrom = sequence }
                continue
            }
            if sequence >= covered && !formatTwo { result.replayedUncovered = true }
            for record in try records(of: k) {
                try apply(record)
                if case .sealed(let next) = record { result.sealedFor = next }
            }
        }
        return result
    }

    /// After replaying the journals of a writable open: the current one gets a marker for the
    /// frames that follow (they are written in this epoch), covering what was replayed (after
    /// syncing the data a killed process left unsynced) and voiding what was dropped; then its
    /// torn tail is cut and it is synced. Earlier journals of the chain whose frames were
    /// trusted only within this epoch get a covering marker too, or a power cut would stop the
    /// chain at an uncovered seal and lose what later journals flushed. Before this, nothing may
    /// be journaled.
    func markRecoveredJournals(earlier: [(file: any StorageFile, generation: UInt64, replayed: ReplayedJournal)],
                               current replayed: ReplayedJournal) throws {
        if replayed.replayedUncovered || earlier.contains(where: \.replayed.replayedUncovered) {
            // The killed process acknowledged these writes; from here they survive a power cut too.
            do { try chunkStorage.sync() } catch {
                throw StoreError.io("recovery: fdatasync of the data file failed (\(error)): the writes the killed process " +
                                    "acknowledged cannot be made durable; the store was not changed")
            }
        }
        // A journal trusted within this epoch may hold markers the killed process wrote but did
        // not sync (a flush or commit in progress): synced now, so that what they cover (and a
        // seal that chains to the next journal) survives a power cut from here on.
        for e in earlier where e.replayed.replayedUncovered || e.replayed.markedInThisEpoch {
            if e.replayed.replayedUncovered {
                let sequence = UInt64(e.replayed.frames)
                let frame = JournalFrame.encode(generation: e.generation, sequence: sequence,
                                                payload: encoded(markerRecord(durableBelow: sequence)))
                let end = UInt64(e.replayed.validBytes + frame.count)
                try writeUsingSpaceReserve(frame, to: e.file, at: UInt64(e.replayed.validBytes))
                if try e.file.size() > end { try e.file.truncate(to: end) }
            }
            try e.file.sync()
        }
        // Nothing to cover, drop or cut, and new frames would follow a marker of this epoch: an
        // open after a clean close or a flush writes nothing (it only syncs).
        if !replayed.replayedUncovered && replayed.droppedFrom == nil && replayed.markedInThisEpoch
            && replayed.fileBytes == replayed.validBytes {
            try journalFile.sync()
            journalCoveredEnd = journalEnd
            return
        }
        let sequence = journalSequence
        let voided = replayed.droppedFrom.map { $0..<sequence } ?? 0..<0
        let frame = JournalFrame.encode(generation: generation, sequence: sequence,
                                        payload: encoded(markerRecord(durableBelow: sequence, voided: voided)))
        try writeUsingSpaceReserve(frame, to: journalFile, at: journalEnd)
        journalSequence += 1
        journalEnd += UInt64(frame.count)
        // A torn or unfinished frame from the crash (or, after an explicit repair, what the
        // operator agreed to drop) lies past the marker: cut it.
        if try journalFile.size() > journalEnd { try journalFile.truncate(to: journalEnd) }
        try journalFile.sync()
        journalCoveredEnd = journalEnd
        if let dropped = replayed.droppedFrom {
            recoveryWarnings.append("journal-\(generation): frames \(dropped)..<\(sequence) were written but not flushed before " +
                                    "the machine went down (a new boot): dropped, as the crash contract allows")
        }
    }

    /// The allocator of the sector map as the free-space summary describes it (no pass over the
    /// map); what the file holds past the summary's end the crash left unreferenced, and goes.
    func attachSpace() throws {
        space = SpaceAllocator(endSector: spaceSummary.endSector, usedSectors: spaceSummary.usedSectors) { [unowned self] leaf in
            try? self.sectorMap.leafElements(leaf, pager: self.pager)
        }
        let end = spaceSummary.endSector * UInt64(Limits.sectorBytes)
        if !options.readOnly, try dataFile.size() > end {
            try dataFile.truncate(to: end)
        }
    }

    /// The summary recounted from the sector map's pages (all of them): for a store of format 3,
    /// and for fsck.
    func countSectorMap() throws -> SpaceSummary {
        var summary = SpaceSummary()
        try sectorMap.forEachLeaf(pager: pager) { first, leaf in
            for (k, w) in leaf.elements.enumerated() where w != 0 {
                summary.usedSectors += UInt64(w.nonzeroBitCount)
                summary.endSector = (first + UInt64(k)) * 64 + UInt64(64 - w.leadingZeroBitCount)
            }
        }
        return summary
    }
}
