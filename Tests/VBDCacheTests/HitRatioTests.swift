import Testing
import VBDCache

/// S3-FIFO beside plain LRU (same byte budget, same per-entry overhead) and Belady's optimal bound, on
/// a Zipf workload, Zipf plus a full sequential scan, and the trace recorded from real NBD clients.
/// Prints the tables that docs/CACHE.md quotes. Asserts only robust properties: no policy beats the
/// optimal bound; S3-FIFO is clearly ahead of LRU when a scan runs; the last-chance tier adds hits.
@Suite struct HitRatioTests {
    struct Row {
        var workload: String
        var capacityBlocks: Int
        var lru: TraceReplay.Result
        var s3fifo: TraceReplay.Result
        var optimal: (hits: Int, readHits: Int)
        var twoTier: TraceReplay.Result?

        var line: String {
            func percent(_ value: Double) -> String {
                let text = String(Int((value * 1000).rounded()))
                let padded = text.count == 1 ? "0" + text : text
                return String(padded.dropLast()) + "." + String(padded.suffix(1)) + "%"
            }
            let reads = Double(s3fifo.reads)
            var columns = [workload, "\(capacityBlocks)", percent(lru.hitRatio), percent(s3fifo.hitRatio),
                           percent(Double(optimal.readHits) / reads)]
            if let twoTier {
                columns += [percent(twoTier.lastChanceHitRatio), percent(twoTier.combinedHitRatio),
                            String(Double(Int(twoTier.compressionRatio * 100)) / 100)]
            } else {
                columns += ["-", "-", "-"]
            }
            return "| " + columns.joined(separator: " | ") + " |"
        }
    }

    static let header = """
        | workload | cache (4 KiB blocks) | LRU | S3-FIFO | Belady MIN | last-chance hits | S3-FIFO + last chance | LZ4 ratio |
        |---|---|---|---|---|---|---|---|
        """

    static func compare(
        _ workload: String, _ requests: [CacheRequest], capacityBlocks: Int, storedBytes: ((UInt64) -> Int)? = nil
    ) -> Row {
        let charge = 4096 + BlockCache.mainEntryOverheadBytes
        let capacity = capacityBlocks * charge
        var lru = LRUPolicy<Void>(capacityBytes: capacity)
        var s3fifo = S3FIFOPolicy<Void>(capacityBytes: capacity)
        let lruResult = TraceReplay.run(requests, policy: &lru, charge: charge)
        let s3fifoResult = TraceReplay.run(requests, policy: &s3fifo, charge: charge)
        let optimal = OptimalCache.hits(requests, capacityEntries: capacityBlocks)
        var twoTier: TraceReplay.Result?
        if let storedBytes {
            var main = S3FIFOPolicy<Void>(capacityBytes: capacity)
            var lastChance = FIFOPolicy<Void>(capacityBytes: BlockCache.Configuration(capacityBytes: capacity).lastChanceCapacityBytes)
            twoTier = TraceReplay.runTwoTier(
                requests, main: &main, blockBytes: 4096, mainOverhead: BlockCache.mainEntryOverheadBytes,
                lastChance: &lastChance, lastChanceOverhead: BlockCache.lastChanceEntryOverheadBytes,
                storedBytes: storedBytes)
        }
        return Row(workload: workload, capacityBlocks: capacityBlocks, lru: lruResult, s3fifo: s3fifoResult,
                   optimal: optimal, twoTier: twoTier)
    }

    /// Every policy is a demand-fetching cache of `capacityBlocks` equal blocks: it cannot beat MIN.
    static func checkOptimalBound(_ row: Row) {
        for (name, result) in [("LRU", row.lru), ("S3-FIFO", row.s3fifo)] {
            #expect(result.hits + result.writeHits <= row.optimal.hits, "\(name) beat Belady's MIN on \(row.workload)")
        }
    }

    static func printTable(_ title: String, _ rows: [Row]) {
        print(([title, header] + rows.map(\.line)).joined(separator: "\n"))
    }

    @Test func zipf() {
        let requests = CacheWorkloads.zipf(itemCount: 20_000, count: 120_000, exponent: 0.9, seed: 1)
        let rows = [1000, 2000].map { Self.compare("Zipf 0.9, 20k blocks", requests, capacityBlocks: $0) }
        Self.printTable("Hit ratio: Zipf", rows)
        for row in rows {
            Self.checkOptimalBound(row)
            #expect(row.s3fifo.hitRatio >= row.lru.hitRatio - 0.005, "S3-FIFO must not lose to LRU on Zipf")
        }
    }

    @Test func zipfWithFullScan() {
        let requests = CacheWorkloads.zipfWithScan(
            itemCount: 20_000, count: 120_000, exponent: 0.9, scanLength: 40_000, seed: 2)
        let rows = [1000, 2000].map { Self.compare("Zipf 0.9 + 40k-block scan", requests, capacityBlocks: $0) }
        Self.printTable("Hit ratio: Zipf plus a full sequential scan", rows)
        for row in rows {
            Self.checkOptimalBound(row)
            #expect(row.s3fifo.hitRatio >= row.lru.hitRatio + 0.03, "S3-FIFO must resist the scan clearly better than LRU")
        }
    }

    @Test func realNBDClientTrace() throws {
        let trace = try loadCommittedTrace()
        let requests = trace.requests()
        #expect(requests.count > 20_000)
        let rows = [256, 1024, 2048].map {
            Self.compare("NBD clients (qemu-img, fio, nbdcopy)", requests, capacityBlocks: $0,
                         storedBytes: trace.storedBytes(forKey:))
        }
        Self.printTable("Hit ratio: trace recorded from real NBD clients (\(requests.count) block requests)", rows)
        // S3-FIFO is not uniformly ahead on this trace (LRU wins at 1024 blocks; see docs/CACHE.md), so
        // the assertions are: never materially behind at any size, and not behind on average.
        let meanS3FIFO = rows.map(\.s3fifo.hitRatio).reduce(0, +) / Double(rows.count)
        let meanLRU = rows.map(\.lru.hitRatio).reduce(0, +) / Double(rows.count)
        #expect(meanS3FIFO >= meanLRU, "S3-FIFO must not lose to LRU on average over the cache sizes")
        for row in rows {
            Self.checkOptimalBound(row)
            #expect(row.s3fifo.hitRatio >= row.lru.hitRatio - 0.03, "S3-FIFO must not fall far behind LRU")
            let twoTier = try #require(row.twoTier)
            #expect(twoTier.lastChanceHits > 0)
            #expect(twoTier.combinedHitRatio > row.s3fifo.hitRatio, "the last-chance tier must add hits")
            #expect(twoTier.compressionRatio > 1.2, "real filesystem blocks compress")
        }
    }
}
