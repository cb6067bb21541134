import VBDCore

/// What `fsck` found. Clean when `problems` is empty.
public struct FsckReport: Sendable {
    public var images = 0
    public var mapNodes = 0
    public var mappedBlocks: UInt64 = 0
    public var chunks = 0
    public var chunkBytesVerified: UInt64 = 0
    public var problems: [String] = []
    public var isClean: Bool { problems.isEmpty }
}

extension Store {
    /// Recounts every reference, walks every map and every metadata page, rehashes every stored
    /// block and checks the sector map. Holds the store lock throughout: a consistent view, at the
    /// price of stalling I/O. `progress` is called with (done, total) chunks while rehashing.
    public func fsck(verifyData: Bool = true, progress: ((Int, Int) -> Void)? = nil) -> FsckReport {
        mutex.lock()
        defer { mutex.unlock() }
        var report = FsckReport()
        do {
            try fsckLocked(&report, verifyData: verifyData, progress: progress)
        } catch {
            if report.problems.count < 1000 { report.problems.append("metadata cannot be read: \(error)") }
        }
        pager.trim()
        return report
    }

    private func fsckLocked(_ report: inout FsckReport, verifyData: Bool, progress: ((Int, Int) -> Void)?) throws {
        var problems: [String] = []
        func problem(_ s: String) { if problems.count < 1000 { problems.append(s) } }
        defer { report.problems += problems }
        // Holders of every metadata page: map roots and parent slots for map nodes, the owning
        // structure for every other page. Compared with the page table's counts at the end.
        var pageHolders: [PageNumber: UInt32] = [:]
        func hold(_ page: PageNumber) { pageHolders[page, default: 0].addSaturating(1) }

        // 1. Maps: count references to nodes and chunks.
        var chunkRefs: [UInt64: UInt32] = [:]
        var visited: Set<PageNumber> = []
        for image in images.values.sorted(by: { $0.record.id < $1.record.id }) {
            report.images += 1
            let name = fullNameLocked(image.record)
            if image.root.levels < MapGeometry.levels(forBlocks: image.record.blockCount) {
                problem("\(name): tree of \(image.root.levels) levels is too short for \(image.record.blockCount) blocks")
            }
            if image.root.page != .none { hold(image.root.page) }
            do {
                try image.root.forEachNode(pager: pager) { page, level, slots in
                    guard visited.insert(page).inserted else { return false }
                    var populated = 0
                    for c in slots where c != 0 {
                        populated += 1
                        if level == 1 {
                            report.mappedBlocks += 1
                            if c >= zeroAllocatedChunk { continue }
                            if try !chunks.contains(c, pager: pager) { problem("\(name): maps a block to missing chunk \(c)"); continue }
                            chunkRefs[c, default: 0].addSaturating(1)
                        } else {
                            hold(PageNumber(c))
                        }
                    }
                    if populated == 0 { problem("\(name): empty node \(page) kept in the tree") }
                    return true
                }
            } catch {
                problem("\(name): its map cannot be read: \(error)")
            }
            if image.record.kind == .snapshot && images[image.record.volumeID] == nil {
                problem("\(name): snapshot of a volume that no longer exists")
            }
        }
        report.mapNodes = visited.count
        // The other structures own their pages once each.
        try chunks.records.forEachPage(pager: pager) { hold($0) }
        try chunks.freeNumbers.forEachPage(pager: pager) { hold($0) }
        try index.buckets.forEachPage(pager: pager) { hold($0) }
        for bucket in 0..<index.bucketCount {
            var page = PageNumber(try index.buckets.get(bucket, pager: pager))
            while page != .none {
                hold(page)
                page = try pager.read(page, as: DedupBucketPage.self).overflow
            }
        }
        try sectorMap.forEachPage(pager: pager) { hold($0) }
        try imageTable.forEachPage(pager: pager) { hold($0) }
        // Every page the table counts is held exactly that often; every other page is free.
        var p: UInt64 = 0
        while p < pager.root.pageCount {
            let page = PageNumber(p)
            let e = try pager.entry(page)
            let held = pageHolders[page] ?? 0
            if e.isStructural {
                if held > 0 { problem("\(page): a page-table page is also used as data") }
            } else if e.refcount != held && !(e.refcount == PageTableEntry.structural - 1 && held >= e.refcount) {
                problem("\(page): reference count \(e.refcount) but \(held) holders" + (held == 0 ? " (a leaked page)" : ""))
            }
            p += 1
        }

        // 2. Chunks: refcounts, index membership, sectors.
        var indexMembers: [UInt64: UInt64] = [:]
        try index.forEach(pager: pager) { chunk, fingerprint in
            if indexMembers.updateValue(fingerprint, forKey: chunk) != nil { problem("dedup index lists chunk \(chunk) twice") }
        }
        // Sectors of the chunks seen so far, 1 bit per sector, to find chunks that overlap.
        var sectors: [UInt64] = []
        var live: [(UInt64, ChunkEntry)] = []
        var liveSectors: UInt64 = 0
        try chunks.records.forEachLeaf(pager: pager) { first, leaf in
            for (k, r) in leaf.elements.enumerated() where r.entry.isInstalled {
                let n = first + UInt64(k)
                let e = r.entry
                guard n > 0 && n < chunks.end else { problem("chunk \(n) is installed outside the table's range"); continue }
                live.append((n, e))
                // References of writes between dedup and mapping are real: the map gets them next.
                var counted = chunkRefs[n] ?? 0
                counted.addSaturating(writeReferences[n] ?? 0)
                if e.refcount != counted { problem("chunk \(n): refcount \(e.refcount) but \(counted) references") }
                if indexMembers[n] != PagedDedupIndex.fingerprint(e.hash) { problem("chunk \(n): missing from the dedup index") }
                if e.storedBytes == 0 || e.storedBytes > e.rawBytes + 64 { problem("chunk \(n): implausible stored length \(e.storedBytes)") }
                // Elsewhere than the data file a place is the storage's: no sector to check.
                guard chunksInDataFile else { continue }
                let chunkEnd = e.sector + UInt64(e.sectorCount)
                if sectors.count < Int((chunkEnd + 63) >> 6) { sectors.append(contentsOf: repeatElement(0, count: Int((chunkEnd + 63) >> 6) - sectors.count)) }
                var overlapReported = false
                for s in e.sector..<chunkEnd {
                    let w = Int(s >> 6), bit = UInt64(1) << (s & 63)
                    if sectors[w] & bit != 0 && !overlapReported {
                        problem("chunk \(n): sector \(s) also used by another chunk")
                        overlapReported = true
                    }
                    sectors[w] |= bit
                }
                liveSectors += UInt64(e.sectorCount)
                if !space.isUsedRange(e.sector, count: e.sectorCount) { problem("chunk \(n): its sectors are marked free") }
                var s = e.sector
                while s < e.sector + UInt64(e.sectorCount) {
                    if try sectorMap.get(s >> 6, pager: pager) & (1 << (s & 63)) == 0 {
                        problem("chunk \(n): sector \(s) is free in the sector map")
                        break
                    }
                    s += 1
                }
            }
        }
        let mapped = try countSectorMap()
        if mapped.usedSectors != liveSectors { problem("the sector map holds \(mapped.usedSectors) sectors, the chunks \(liveSectors)") }
        self.problems(ofSpaceSummaryAgainst: mapped).forEach(problem)
        for (m, _) in indexMembers where try !chunks.contains(m, pager: pager) { problem("dedup index lists free chunk \(m)") }
        if index.count != UInt64(live.count) { problem("dedup index has \(index.count) members for \(live.count) chunks") }
        if chunks.liveCount != UInt64(live.count) { problem("the chunk table counts \(chunks.liveCount) chunks, holds \(live.count)") }
        report.chunks = live.count
        // 3. Data: every chunk rehashed.
        if verifyData {
            let cache = options.cache
            for (k, (n, e)) in live.enumerated() {
                let key = try cacheKey(n)
                let ok: String? = withUnsafeTemporaryAllocation(byteCount: e.rawBytes, alignment: 16) { tmp in
                    cache?.remove(key)   // read from disk, not from memory
                    do throws(LoadedChunkFailure) { try loadChunk(n, e, cacheKey: key, into: tmp, volume: 0, lockHeld: true) } catch { return error.detail }
                    return nil
                }
                if let ok {
                    problem(chunksInDataFile ? "chunk \(n) at byte \(e.sector * UInt64(Limits.sectorBytes)) of the data file: \(ok)"
                                             : "chunk \(n) (place \(e.sector) of the chunk storage): \(ok)")
                }
                report.chunkBytesVerified += UInt64(e.storedBytes)
                if k % 4096 == 0 { progress?(k, live.count); pager.trim() }
            }
            progress?(live.count, live.count)
        }
    }
}

extension Store {
    /// The free-space summary and the allocator against `counted` (the sector map recounted): the
    /// summary must equal the count, and the allocator must hold exactly the map's sectors plus
    /// its overlay. With `mutex` held.
    func problems(ofSpaceSummaryAgainst counted: SpaceSummary) -> [String] {
        mutex.assertOwned("problems(ofSpaceSummaryAgainst:)")
        var found: [String] = []
        if spaceSummary.usedSectors != counted.usedSectors {
            found.append("free-space summary: \(spaceSummary.usedSectors) sectors in use, the sector map holds \(counted.usedSectors)")
        }
        if spaceSummary.endSector != counted.endSector {
            found.append("free-space summary: ends at sector \(spaceSummary.endSector), the sector map at \(counted.endSector)")
        }
        if space.usedSectors != counted.usedSectors + space.overlaySectors {
            found.append("space allocator: \(space.usedSectors) sectors in use, but the sector map holds \(counted.usedSectors) " +
                         "and the allocator's own \(space.overlaySectors)")
        }
        if space.endSector < counted.endSector {
            found.append("space allocator: ends at sector \(space.endSector), the sector map uses sectors up to \(counted.endSector)")
        }
        return found
    }

    /// `problems(ofSpaceSummaryAgainst:)` after a full recount, for tests and the simulator.
    public func spaceSummaryProblems() throws -> [String] {
        try mutex.withLock { () throws -> [String] in
            defer { pager.trim() }
            return problems(ofSpaceSummaryAgainst: try countSectorMap())
        }
    }
}

extension UInt32 {
    /// Counting references as the store does: saturating at `.max` (see `ChunkEntry.retainSaturating`).
    fileprivate mutating func addSaturating(_ n: UInt32) {
        let (sum, overflow) = addingReportingOverflow(n)
        self = overflow ? .max : sum
    }
}
