import VBDCache
import VBDCore

// MARK: - Records: one code path for live changes and for replay

extension Store {
    /// Applies a record to the in-memory state. Called with `mutex` held, live and at replay.
    func apply(_ record: JournalRecord) throws {
        switch record {
        case let .chunk(number, hash, location, shape):
            guard number > 0, number <= ChunkTable.chunkNumberMax, !chunks.contains(number), shape != 0 else {
                throw StoreError.corrupted("journal installs chunk \(number) twice")
            }
            // A fresh chunk has no holder until the map record that follows it in the same frame.
            chunks.install(ChunkEntry(hash: hash, location: location, shape: shape, refcount: 0), at: number)
            index.insert(UInt32(number), hash: hash, hashOf: { self.chunks[UInt64($0)].hash })
        case let .map(imageID, block, chunk):
            guard let image = images[imageID], block < image.record.blockCount else {
                throw StoreError.corrupted("journal maps block \(block) of unknown image \(imageID)")
            }
            if chunk != 0 {
                guard chunk >= zeroAllocatedChunk || chunks.contains(chunk) else {
                    throw StoreError.corrupted("journal names unknown chunk \(chunk)")
                }
                retainChunk(chunk)
            }
            image.root.update(block, to: chunk, self)
        case let .mapBatch(imageID, mappings):
            guard let image = images[imageID] else {
                throw StoreError.corrupted("journal maps blocks of unknown image \(imageID)")
            }
            for m in mappings {
                guard m.block < image.record.blockCount,
                      m.chunk == 0 || m.chunk >= zeroAllocatedChunk || chunks.contains(m.chunk) else {
                    throw StoreError.corrupted("journal maps block \(m.block) of image \(imageID) to unknown chunk \(m.chunk)")
                }
            }
            for m in mappings where m.chunk != 0 { retainChunk(m.chunk) }
            for m in mappings { image.root.update(m.block, to: m.chunk, self) }
        case let .clear(imageID, start, count):
            guard let image = images[imageID] else { throw StoreError.corrupted("journal clears unknown image \(imageID)") }
            image.root.clear(start: start, count: count, self)
        case let .createImage(r):
            guard images[r.id] == nil else { throw StoreError.corrupted("image \(r.id) created twice") }
            images[r.id] = Image(record: r, root: MapRoot(blocks: r.blockCount))
            nextImageID = max(nextImageID, r.id + 1)
        case let .cloneImage(sourceID, r):
            guard let source = images[sourceID], images[r.id] == nil else {
                throw StoreError.corrupted("clone of unknown image \(sourceID)")
            }
            images[r.id] = Image(record: r, root: source.root.retained())
            nextImageID = max(nextImageID, r.id + 1)
        case let .deleteImage(id):
            guard let image = images.removeValue(forKey: id) else { throw StoreError.corrupted("delete of unknown image \(id)") }
            image.root.release(self)
            // Shares of a deleted snapshot keep their data; only the origin link goes.
            for other in images.values where other.record.originID == id { other.record.originID = 0 }
        case let .resize(id, size):
            guard let image = images[id] else { throw StoreError.corrupted("resize of unknown image \(id)") }
            image.record.size = size
            image.root.grow(toBlocks: image.record.blockCount)
        case let .renameGroup(group, name):
            // A number has one name: a reused number drops the name of its empty old group.
            for (other, number) in groups where number == group && other != name { groups[other] = nil }
            groups[name] = group
        case .sealed:
            break  // read by recovery (`replayJournal`); it changes nothing
        }
    }

    /// Applies a live change and queues its record for the next flush. `mutex` held.
    func commit(_ record: JournalRecord) throws {
        try apply(record)
        record.encode(into: &pending)
        pendingRecordCount += 1
    }

    var pendingBytes: Int { pending.bytes.count }

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
            mutex.lock()
            defer { mutex.unlock() }
            try checkOpen()
            let (records, result) = try plan()
            guard !records.isEmpty else { return result() }
            var step = "fdatasync of the data file"
            do throws(StorageError) {
                // Writes queued since the flush above name chunks that are not synced yet.
                if !pending.bytes.isEmpty { try dataFile.sync() }
                try appendFrameLocked(records, step: &step)
            } catch {
                let e: StorageError = error
                if step != "journal write" {
                    if failure == nil { failure = "\(step) failed (\(e))" }
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
    /// With `mutex` held: writes the queued records and then `records` as one frame at the end
    /// of the current journal and syncs it; the queue is empty afterwards. `step` names the step
    /// that was running when an error is thrown ("journal write" changed nothing durable).
    func appendFrameLocked(_ records: [JournalRecord], step: inout String) throws(StorageError) {
        mutex.assertOwned("appendFrameLocked")
        var batch = BinaryWriter(capacity: pending.bytes.count + 256)
        batch.raw(pending.bytes)
        for r in records { r.encode(into: &batch) }
        let frame = JournalFrame.encode(generation: generation, sequence: journalSequence, payload: batch.bytes)
        step = "journal write"
        try writeUsingSpaceReserve(frame, to: journalFile, at: journalEnd)
        step = "fdatasync of journal-\(generation)"
        try journalFile.sync()
        journalEnd += UInt64(frame.count)
        journalSequence += 1
        pending = BinaryWriter()
        pendingRecordCount = 0
    }
}

// MARK: - Flush

extension Store {
    /// Makes every write completed before this call durable (NBD FLUSH; FUA).
    public func flush() throws {
        try flushMutex.withLock {
            try flushLocked()
            if spaceReserveInUse.load(ordering: .relaxed) { refillSpaceReserve() }
        }
        try checkpointIfJournalLarge()
    }

    /// With `flushMutex` held.
    func flushLocked() throws {
        let (batch, frees, seq, gen, poison) = mutex.withLock { () -> ([UInt8], [(sector: UInt64, count: Int)], UInt64, UInt64, String?) in
            let b = pending.bytes
            pending = BinaryWriter()
            pendingRecordCount = 0
            return (b, space.takeDeferred(), journalSequence, generation, poisoned)
        }
        if let poison {
            restorePending(batch, frees)
            throw StoreError.io("store is read-only: \(poison)")
        }
        var step = "fdatasync of the data file"
        do throws(StorageError) {
            // 1. The chunks the records name are durable before the records.
            try dataFile.sync()
            if !batch.isEmpty {
                // 2. One frame: replay applies it whole or not at all.
                let frame = JournalFrame.encode(generation: gen, sequence: seq, payload: batch)
                let at = mutex.withLock { journalEnd }
                step = "journal write"
                try writeUsingSpaceReserve(frame, to: journalFile, at: at)
                step = "fdatasync of journal-\(gen)"
                try journalFile.sync()
                mutex.withLock {
                    journalEnd = at + UInt64(frame.count)
                    journalSequence = seq + 1
                }
            }
        } catch {
            let e: StorageError = error
            // Nothing of this batch counts as written: a torn frame fails its checksum and the
            // next attempt overwrites it at the same offset. Put the batch back in front of what
            // came since, so the journal never has a gap.
            restorePending(batch, frees)
            // A failed sync may have dropped dirty pages that a retried sync would then call
            // durable: no later flush may succeed. A failed write changed nothing durable.
            if step != "journal write" {
                mutex.withLock { if failure == nil { failure = "\(step) failed (\(e))" } }
                throw StoreError.io("flush failed: \(step): \(e); the store refuses writes until it is reopened")
            }
            throw e == .noSpace ? StoreError.noSpace : StoreError.io("flush failed: \(step): \(e)")
        }
        // 3. The frees in this batch are durable: the space may be reused and given back.
        try releaseFrees(frees)
    }

    /// Puts an unwritten batch back in front of the records queued since. Takes `mutex`.
    func restorePending(_ batch: [UInt8], _ frees: [(sector: UInt64, count: Int)]) {
        mutex.withLock {
            var restored = BinaryWriter(capacity: batch.count + pending.bytes.count)
            restored.raw(batch)
            restored.raw(pending.bytes)
            pending = restored
            space.restoreDeferred(frees)
        }
    }

    func releaseFrees(_ frees: [(sector: UInt64, count: Int)]) throws {
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
        let big = mutex.withLock { journalEnd >= options.checkpointJournalBytes }
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
    /// on, so the freed space goes to metadata. Callers hold `flushMutex` (or are in init).
    func releaseSpaceReserve() -> Bool {
        guard let reserveFile, (try? reserveFile.size()) ?? 0 > 0 else { return false }
        reserveRefusals.store(0, ordering: .relaxed)
        spaceReserveInUse.store(true, ordering: .relaxed)
        do { try reserveFile.truncate(to: 0) } catch { return false }
        return true
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
    /// the reserve in use (writes of new data keep getting ENOSPC). `flushMutex` held or init.
    func refillSpaceReserve() {
        let want = options.spaceReserveBytes
        guard want > 0 else { return }
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

// MARK: - Checkpoint and superblock

extension Store {
    static let superblockSlotBytes = 4096
    static let superblockMagic: UInt64 = 0x3150_5553_4442_5600   // "\0VBDSUP1"
    static let checkpointMagic: UInt32 = 0x4B43_4256             // "VBCK"
    static let formatVersion: UInt32 = 1

    /// Writes the whole metadata as a new generation and switches the superblock to it.
    /// The journal starts empty afterwards.
    public func checkpoint() throws {
        try flushMutex.withLock {
            // Most of the data file's dirty pages are synced before the lock is taken: the sync
            // under it (writeCheckpointLocked) then waits only for what was written in between,
            // not for seconds of write-back while every request waits for the lock.
            if !options.readOnly { do { try dataFile.sync() } catch {
                mutex.withLock { if failure == nil { failure = "fdatasync of the data file failed (\(error))" } }
                throw StoreError.io("checkpoint failed: fdatasync of the data file: \(error); the store refuses writes until it is reopened")
            } }
            mutex.lock()
            defer { mutex.unlock() }
            if let poisoned { throw StoreError.io("store is read-only: \(poisoned)") }
            try writeCheckpointLocked()
            if spaceReserveInUse.load(ordering: .relaxed) { refillSpaceReserve() }
        }
    }

    /// With `mutex` (and `flushMutex`) held, or during init.
    ///
    /// The previous generation's files stay until the next checkpoint is durable: the older
    /// superblock slot names them, and recovery falls back to them if the newest checkpoint is
    /// damaged. A failure before the superblock write leaves the current generation in use and
    /// the store writable (the new files are removed); a failed data sync or superblock write
    /// poisons the store.
    func writeCheckpointLocked() throws {
        if options.readOnly { throw StoreError.io("the store was opened read-only") }
        let frees = space.takeDeferred()
        // Normally the next number, whose slot is the previous generation's. After a fallback the
        // slot of the generation recovery started from must survive until this checkpoint is
        // durable, so the number skips to the other slot's parity.
        var newGeneration = generation + 1
        if let root = fallbackRoot, newGeneration % 2 == root % 2 { newGeneration += 1 }
        // The generation the other slot names once this one is durable: its files, and every
        // journal chained after it, stay.
        let keepFrom = fallbackRoot ?? generation
        let bytes = encodeCheckpoint(generation: newGeneration)
        var step = "fdatasync of the data file"
        var superblockTouched = false
        do throws(StorageError) {
            // Chunks named by the checkpoint (including unflushed writes it captures) first.
            try dataFile.sync()
            // Then the unflushed records and a seal go to this generation's journal, so that this
            // checkpoint plus its journal equals the next checkpoint: recovery's way back if the
            // next one is damaged (see `JournalRecord.sealed`).
            try appendFrameLocked([.sealed(nextGeneration: newGeneration)], step: &step)
            step = "writing checkpoint-\(newGeneration)"
            let file = try directory.openFile("checkpoint-\(newGeneration)", create: true)
            defer { file.close() }
            try file.truncate(to: 0)
            try writeUsingSpaceReserve(bytes, to: file, at: 0)
            try file.sync()
            step = "creating journal-\(newGeneration)"
            let journal = try directory.openFile("journal-\(newGeneration)", create: true)
            do {
                try journal.truncate(to: 0)
                try journal.sync()
                // The superblock must never name a file whose directory entry a crash could drop.
                step = "fsync of the store directory"
                try directory.syncDirectory()
                step = "superblock write"
                superblockTouched = true
                try writeSuperblock(generation: newGeneration, checkpointBytes: UInt64(bytes.count),
                                    checkpointChecksum: metadataChecksum(bytes))
            } catch {
                journal.close()
                throw error
            }
            journalFile.close()
            journalFile = journal
        } catch {
            let e: StorageError = error
            space.restoreDeferred(frees)
            if superblockTouched || step.hasPrefix("fdatasync") {
                // (A failed journal sync lands here too: the seal frame's pages may be gone.)
                // Which slot a crash would find is unknown (or dirty data pages may be gone):
                // only a reopen can tell what is durable.
                failure = "checkpoint failed at \(step) (\(e))"
            } else if !closed {
                try? directory.removeFile("checkpoint-\(newGeneration)")
                try? directory.removeFile("journal-\(newGeneration)")
            }
            // A poisoned store is not merely full: callers that carry on after ENOSPC must not.
            if failure == nil && e == .noSpace { throw StoreError.noSpace }
            throw StoreError.io("checkpoint failed at \(step): \(e)")
        }
        generation = newGeneration
        journalSequence = 0
        journalEnd = 0
        pending = BinaryWriter()
        pendingRecordCount = 0
        fallbackRoot = nil
        // The new generation is durable; generations before the one the other slot names are
        // named by no slot and no chain now.
        removeGenerationFiles { $0 < keepFrom }
        let punches = space.release(frees, punchRunBytesMin: options.holePunchRunBytesMin,
                                    unpunchedFreeBytesMax: options.unpunchedFreeBytesMax)
        for p in punches { try? dataFile.punchHole(offset: p.offset, length: p.length) }
    }

    func writeSuperblock(generation: UInt64, checkpointBytes: UInt64, checkpointChecksum: UInt64) throws(StorageError) {
        var w = BinaryWriter(capacity: Store.superblockSlotBytes)
        w.u64(Store.superblockMagic); w.u32(Store.formatVersion); w.u64(generation); w.u64(secret)
        w.u64(checkpointBytes); w.u64(checkpointChecksum)
        w.u64(metadataChecksum(w.bytes))
        w.raw([UInt8](repeating: 0, count: Store.superblockSlotBytes - w.bytes.count))
        let slot = UInt64(generation % 2) * UInt64(Store.superblockSlotBytes)
        try Store.write(w.bytes, to: superblockFile, at: slot)
        try superblockFile.sync()
    }

    struct SuperblockSlot { var generation: UInt64; var secret: UInt64; var checkpointBytes: UInt64; var checkpointChecksum: UInt64 }

    /// The valid slots, newest first, and the numbers of slots that were written but fail
    /// their checks (a slot of zeroes was never written).
    func readSuperblockSlots() throws -> (valid: [SuperblockSlot], damaged: [Int]) {
        let bytes = try superblockFile.readAll()
        var slots: [SuperblockSlot] = []
        var damaged: [Int] = []
        for k in 0..<2 {
            let at = k * Store.superblockSlotBytes
            // magic 8 | version 4 | generation 8 | secret 8 | checkpoint length 8 | checksum 8 | slot checksum 8
            guard bytes.count >= at + 52 else { continue }
            var r = BinaryReader(Array(bytes[at..<at + 52]))
            guard let magic = try? r.u64(), magic == Store.superblockMagic,
                  let version = try? r.u32(), version == Store.formatVersion,
                  let gen = try? r.u64(), let sec = try? r.u64(), let n = try? r.u64(), let sum = try? r.u64(),
                  let check = try? r.u64(), check == metadataChecksum(Array(bytes[at..<at + 44]))
            else {
                if bytes[at..<at + 52].contains(where: { $0 != 0 }) { damaged.append(k) }
                continue
            }
            slots.append(SuperblockSlot(generation: gen, secret: sec, checkpointBytes: n, checkpointChecksum: sum))
        }
        return (slots.sorted { $0.generation > $1.generation }, damaged)
    }

    // MARK: Checkpoint encoding

    func encodeCheckpoint(generation: UInt64) -> [UInt8] {
        var w = BinaryWriter(capacity: 4096 + chunks.liveCount * 40)
        w.u32(Store.checkpointMagic); w.u32(Store.formatVersion); w.u64(generation); w.u64(secret)
        w.varint(nextImageID)
        w.varint(UInt64(groups.count))
        for (name, group) in groups.sorted(by: { $0.key < $1.key }) { w.string(name); w.u16(group.rawValue) }
        // Chunk table: live entries only; reference counts are recomputed from the maps.
        w.varint(UInt64(chunks.liveCount))
        if chunks.end > 1 {
            for n in 1..<chunks.end {
                let e = chunks[n]
                guard e.isInstalled else { continue }
                w.varint(n); w.u64(e.hash.high); w.u64(e.hash.low); w.u64(e.location); w.u32(e.shape)
            }
        }
        // Images and their trees. A node reached a second time is written as a back-reference,
        // so shared subtrees stay shared (and O(1) snapshots stay O(1) in space) after reload.
        var ids: [ObjectIdentifier: UInt64] = [:]
        w.varint(UInt64(images.count))
        for image in images.values.sorted(by: { $0.record.id < $1.record.id }) {
            image.record.encode(into: &w)
            w.u8(UInt8(image.root.levels))
            Store.encodeNode(image.root.node, leaf: image.root.levels == 1, ids: &ids, into: &w)
        }
        w.u64(metadataChecksum(w.bytes))
        return w.bytes
    }

    /// Node encoding: 0 = empty, 1 = back-reference (id), 2 = new node (slots), ids in visit order.
    static func encodeNode(_ node: MapNode?, leaf: Bool, ids: inout [ObjectIdentifier: UInt64], into w: inout BinaryWriter) {
        guard let node else { w.u8(0); return }
        if let id = ids[ObjectIdentifier(node)] { w.u8(1); w.varint(id); return }
        ids[ObjectIdentifier(node)] = UInt64(ids.count)
        w.u8(2)
        w.varint(UInt64(node.populated))
        if leaf {
            for i in 0..<MapNode.fanout where node.entries[i] != 0 { w.u16(UInt16(i)); w.varint(node.entries[i]) }
        } else {
            for i in 0..<MapNode.fanout {
                if let c = node.children[i] {
                    w.u16(UInt16(i))
                    encodeNode(c, leaf: c.isLeaf, ids: &ids, into: &w)
                }
            }
        }
    }

    func decodeCheckpoint(_ bytes: [UInt8], expectedGeneration: UInt64) throws {
        guard bytes.count >= 32 else { throw StoreError.corrupted("checkpoint-\(expectedGeneration) is truncated") }
        let body = Array(bytes[..<(bytes.count - 8)])
        var t = BinaryReader(bytes, position: bytes.count - 8)
        guard let sum = try? t.u64(), sum == metadataChecksum(body) else {
            throw StoreError.corrupted("checkpoint-\(expectedGeneration) fails its checksum")
        }
        var r = BinaryReader(body)
        do {
            guard try r.u32() == Store.checkpointMagic, try r.u32() == Store.formatVersion,
                  try r.u64() == expectedGeneration else {
                throw StoreError.corrupted("checkpoint-\(expectedGeneration) has a wrong header")
            }
            secret = try r.u64()
            nextImageID = try r.varint()
            groups = [:]
            for _ in 0..<(try r.varint()) {
                let name = try r.string()
                groups[name] = SharingGroupID(try r.u16())
            }
            let live = try r.varint()
            for _ in 0..<live {
                let n = try r.varint()
                let h = try r.u64(), l = try r.u64(), loc = try r.u64(), shape = try r.u32()
                guard n > 0 && n <= ChunkTable.chunkNumberMax else { throw BinaryReader.Malformed(position: r.position) }
                chunks.install(ChunkEntry(hash: ContentHash(high: h, low: l), location: loc, shape: shape, refcount: 0), at: n)
                index.insert(UInt32(n), hash: ContentHash(high: h, low: l), hashOf: { self.chunks[UInt64($0)].hash })
            }
            var nodes: [MapNode] = []
            for _ in 0..<(try r.varint()) {
                let record = try ImageRecord.decode(&r)
                let levels = Int(try r.u8())
                guard levels >= 1 && levels <= 6 else { throw BinaryReader.Malformed(position: r.position) }
                let node = try decodeNode(&r, level: levels, nodes: &nodes)
                images[record.id] = Image(record: record, root: MapRoot(node: node, levels: levels))
            }
        } catch let e as StoreError {
            throw e
        } catch {
            throw StoreError.corrupted("checkpoint-\(expectedGeneration) is malformed")
        }
    }

    /// Decodes a node; reference counts are rebuilt by counting references (MapTree invariants 1-2).
    func decodeNode(_ r: inout BinaryReader, level: Int, nodes: inout [MapNode]) throws -> MapNode? {
        switch try r.u8() {
        case 0: return nil
        case 1:
            let id = Int(try r.varint())
            guard id < nodes.count, nodes[id].isLeaf == (level == 1) else { throw BinaryReader.Malformed(position: r.position) }
            nodes[id].retainSaturating()
            return nodes[id]
        case 2:
            let node = MapNode(leaf: level == 1)
            node.refcount = 1
            nodes.append(node)
            let count = try r.varint()
            guard count >= 1 && count <= UInt64(MapNode.fanout) else { throw BinaryReader.Malformed(position: r.position) }
            for _ in 0..<count {
                let i = Int(try r.u16())
                guard i < MapNode.fanout else { throw BinaryReader.Malformed(position: r.position) }
                if level == 1 {
                    let c = try r.varint()
                    guard c != 0, node.entries[i] == 0, c >= zeroAllocatedChunk || chunks.contains(c) else {
                        throw BinaryReader.Malformed(position: r.position)
                    }
                    node.entries[i] = c
                    if c < zeroAllocatedChunk {
                        var e = chunks[c]; e.retainSaturating(); chunks[c] = e
                    }
                } else {
                    guard node.children[i] == nil, let child = try decodeNode(&r, level: level - 1, nodes: &nodes) else {
                        throw BinaryReader.Malformed(position: r.position)
                    }
                    node.children[i] = child
                }
            }
            node.populated = Int(count)
            return node
        default:
            throw BinaryReader.Malformed(position: r.position)
        }
    }

    // MARK: Recovery

    func recover() throws {
        let (slots, damagedSlots) = try readSuperblockSlots()
        guard !slots.isEmpty else { throw StoreError.corrupted("no valid superblock in \(directory.path)") }
        // The newest slot whose checkpoint is intact; the older slot's checkpoint is kept until
        // a newer one is durable, so one damaged file or slot costs at most a generation.
        var chosen: (slot: SuperblockSlot, bytes: [UInt8])?
        var damage: [String] = damagedSlots.map { "superblock slot \($0) fails its checksum" }
        for slot in slots {
            do {
                chosen = (slot, try checkpointBytes(named: slot))
                break
            } catch let e as StoreError where e.code == "corrupted" {
                damage.append(e.description)
            }
        }
        guard let (slot, bytes) = chosen else {
            throw StoreError.corrupted("no usable checkpoint: " + damage.joined(separator: "; "))
        }
        generation = slot.generation
        secret = slot.secret
        try decodeCheckpoint(bytes, expectedGeneration: slot.generation)
        guard secret == slot.secret else { throw StoreError.corrupted("checkpoint and superblock disagree on the store secret") }
        // Every chunk in the checkpoint is held by some map (a free one is never written).
        if chunks.end > 1 {
            for n in 1..<chunks.end where chunks.contains(n) && chunks[n].refcount == 0 {
                throw StoreError.corrupted("checkpoint lists chunk \(n) that no map holds")
            }
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
        // Fell back from a damaged newest generation: a journal sealed for the next generation
        // continues in that generation's journal, so replaying the chain loses nothing. The last
        // journal of the chain becomes the current one, and the damaged generation is skipped.
        var chain = [generation]
        if !damage.isEmpty {
            while let next = replayed.sealedFor, next > generation, directory.fileExists("journal-\(next)") {
                let nextFile = try directory.openFile("journal-\(next)", create: false)
                do {
                    replayed = try replayJournal(nextFile, name: "journal-\(next)", generation: next)
                } catch {
                    nextFile.close()
                    throw error
                }
                journalFile.close()
                journalFile = nextFile
                generation = next
                chain.append(next)
            }
        }
        journalSequence = UInt64(replayed.frames)
        journalEnd = UInt64(replayed.validBytes)
        if replayed.fileBytes > replayed.validBytes && !options.readOnly {
            // A torn or unfinished frame from the crash (or, after an explicit repair, what the
            // operator agreed to drop): cut it so new frames follow valid ones.
            try journalFile.truncate(to: UInt64(replayed.validBytes))
            try journalFile.sync()
        }
        if !damage.isEmpty {
            // A damaged slot's generation is unknown; a damaged checkpoint was newer than this one.
            if chain.count > 1 {
                fallbackRoot = slot.generation
                recoveryWarnings.append("opened checkpoint-\(slot.generation) although \(damage.joined(separator: "; ")): " +
                                        "replayed " + chain.map { "journal-\($0)" }.joined(separator: ", ") +
                                        ", so nothing flushed was lost; the next checkpoint replaces the damaged generation")
            } else {
                recoveryWarnings.append("opened checkpoint-\(slot.generation) although \(damage.joined(separator: "; ")): " +
                                        "if that was the newest generation, changes made after checkpoint-\(slot.generation) " +
                                        "was superseded are lost, and blocks whose space was reused since read as errors (run fsck)")
            }
        }
        // A chunk record always shares its frame with the map record that holds it; drop any
        // that ended up unheld anyway rather than leak it.
        if chunks.end > 1 {
            for n in 1..<chunks.end where chunks.contains(n) && chunks[n].refcount == 0 {
                let e = chunks[n]
                index.remove(UInt32(n), hash: e.hash, hashOf: { self.chunks[UInt64($0)].hash })
                chunks.releaseNumber(n)
            }
        }
        chunks.rebuildFreeList()
        try rebuildSpace()
        guard !options.readOnly else { return }
        // Files outside the generations the slots and the chain name are leftovers of an
        // interrupted checkpoint. (Everything from the older valid slot on may be a way back.)
        let lowest = slots.map(\.generation).min() ?? generation
        let highest = max(generation, slots.map(\.generation).max() ?? generation)
        removeGenerationFiles { $0 < lowest || $0 > highest }
    }

    /// Removes the checkpoint and journal files of the generations `doomed` selects.
    func removeGenerationFiles(_ doomed: (UInt64) -> Bool) {
        for name in (try? directory.fileNames()) ?? [] {
            for prefix in ["checkpoint-", "journal-"] where name.hasPrefix(prefix) {
                if let g = UInt64(name.dropFirst(prefix.count)), doomed(g) { try? directory.removeFile(name) }
            }
        }
    }

    /// Replays the valid frames of one generation's journal. A bad frame with valid frames after
    /// it is corruption (or, with the operator's consent, a repair). `sealedFor`: the generation
    /// named by a seal that is the journal's last record.
    func replayJournal(_ file: any StorageFile, name: String, generation: UInt64) throws
        -> (frames: Int, validBytes: Int, fileBytes: Int, sealedFor: UInt64?) {
        let journalBytes = try file.readAll()
        let (payloads, valid) = JournalFrame.decodeValidPrefix(journalBytes, generation: generation)
        if valid < journalBytes.count,
           let found = JournalDamage(journal: name, bytes: journalBytes, validBytes: valid,
                                     validFrames: payloads.count, generation: generation) {
            // Valid frames after a bad one were acknowledged flushes: not a torn tail.
            guard let repair = options.repairJournal, !options.readOnly, repair(found) else {
                throw StoreError.corrupted(found.description)
            }
        }
        var last: JournalRecord?
        for (k, payload) in payloads.enumerated() {
            var r = BinaryReader(payload)
            while r.remaining > 0 {
                let record: JournalRecord
                do { record = try JournalRecord.decode(&r) } catch {
                    throw StoreError.corrupted("\(name) frame \(k) has a malformed record")
                }
                try apply(record)
                last = record
            }
        }
        var sealedFor: UInt64?
        if case .sealed(let next) = last { sealedFor = next }
        return (payloads.count, valid, journalBytes.count, sealedFor)
    }

    /// The checkpoint a superblock slot names, checked against the slot's length and checksum.
    func checkpointBytes(named slot: SuperblockSlot) throws -> [UInt8] {
        let name = "checkpoint-\(slot.generation)"
        let file: any StorageFile
        do { file = try directory.openFile(name, create: false) } catch .notFound {
            throw StoreError.corrupted("\(name) named by the superblock is missing")
        } catch {
            throw StoreError(error)
        }
        defer { file.close() }
        let bytes: [UInt8]
        // An I/O error says nothing about the contents: fail the open rather than fall back.
        do { bytes = try file.readAll() } catch { throw StoreError.io("\(name) cannot be read: \(error)") }
        guard UInt64(bytes.count) >= slot.checkpointBytes,
              metadataChecksum(Array(bytes[..<Int(slot.checkpointBytes)])) == slot.checkpointChecksum else {
            throw StoreError.corrupted("\(name) does not match the superblock")
        }
        return Array(bytes[..<Int(slot.checkpointBytes)])
    }

    /// The allocator follows from the chunk table: everything else in the data file is free.
    func rebuildSpace() throws {
        space = SpaceAllocator()
        if chunks.end > 1 {
            for n in 1..<chunks.end where chunks.contains(n) {
                let e = chunks[n]
                space.markUsed(e.sector, count: e.sectorCount)
            }
        }
        // Give back what the crash left allocated but unreferenced past the last live chunk.
        let used = space.endSector * UInt64(Limits.sectorBytes)
        if try dataFile.size() > used && !options.readOnly {
            try dataFile.truncate(to: used)
        }
    }
}

extension SpaceAllocator {
    func pageIsFree(_ offset: UInt64, length: UInt64) -> Bool {
        var s = offset / UInt64(Limits.sectorBytes)
        let end = (offset + length) / UInt64(Limits.sectorBytes)
        while s < end {
            let w = Int(s >> 6)
            if w < bitmap.count && bitmap[w] & (1 << (s & 63)) != 0 { return false }
            s += 1
        }
        return true
    }
}
