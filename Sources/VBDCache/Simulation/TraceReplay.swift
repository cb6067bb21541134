/// Replays request sequences through the pure policies, for hit-ratio tables and tests. Mirrors what
/// ``BlockCache`` does per request (a test checks that both agree exactly).
public enum TraceReplay {
    public struct Result: Equatable, Sendable {
        public var reads = 0
        /// Reads served by the main tier.
        public var hits = 0
        /// Reads that missed main and were served by the last-chance tier (two-tier replays only).
        public var lastChanceHits = 0
        /// Writes whose block was already held (dedup); with `hits`, what the optimal bound bounds.
        public var writeHits = 0
        /// Block bytes admitted to the last-chance tier, uncompressed and as stored.
        public var lastChanceAdmittedBytes = 0
        public var lastChanceStoredBytes = 0

        public var hitRatio: Double { reads == 0 ? 0 : Double(hits) / Double(reads) }
        public var lastChanceHitRatio: Double { reads == 0 ? 0 : Double(lastChanceHits) / Double(reads) }
        public var combinedHitRatio: Double { reads == 0 ? 0 : Double(hits + lastChanceHits) / Double(reads) }
        public var compressionRatio: Double {
            lastChanceStoredBytes == 0 ? 0 : Double(lastChanceAdmittedBytes) / Double(lastChanceStoredBytes)
        }
    }

    /// One tier: a read hit counts an access; a miss inserts. A write inserts unless the block is held.
    /// Every block is charged `charge` bytes.
    public static func run<Policy: CachePolicy>(
        _ requests: [CacheRequest], policy: inout Policy, charge: Int
    ) -> Result where Policy.Value == Void {
        var result = Result()
        for request in requests {
            if request.isWrite {
                if policy.contains(request.key) { result.writeHits += 1 } else { policy.insert(request.key, value: (), charge: charge) }
                continue
            }
            result.reads += 1
            if policy.touch(request.key) {
                result.hits += 1
            } else {
                policy.insert(request.key, value: (), charge: charge)
            }
        }
        return result
    }

    /// Main tier plus last-chance tier, as ``BlockCache`` runs them: blocks evicted from main are
    /// admitted to the last-chance FIFO charged `storedBytes(key) + lastChanceOverhead`; a read that
    /// misses main but hits there is promoted back to main.
    public static func runTwoTier<Main: CachePolicy>(
        _ requests: [CacheRequest], main: inout Main, blockBytes: Int, mainOverhead: Int,
        lastChance: inout FIFOPolicy<Void>, lastChanceOverhead: Int, storedBytes: (UInt64) -> Int
    ) -> Result where Main.Value == Void {
        var result = Result()
        func insertIntoMain(_ key: UInt64) {
            var evicted: [UInt64] = []
            main.insert(key, value: (), charge: blockBytes + mainOverhead) { key, _ in evicted.append(key) }
            for key in evicted where !main.contains(key) {
                let stored = storedBytes(key)
                lastChance.remove(key)
                if lastChance.insert(key, value: (), charge: stored + lastChanceOverhead) {
                    result.lastChanceAdmittedBytes += blockBytes
                    result.lastChanceStoredBytes += stored
                }
            }
        }
        for request in requests {
            if request.isWrite {
                if main.contains(request.key) {
                    result.writeHits += 1
                } else {
                    lastChance.remove(request.key)
                    insertIntoMain(request.key)
                }
                continue
            }
            result.reads += 1
            if main.touch(request.key) {
                result.hits += 1
            } else if lastChance.remove(request.key) != nil {
                result.lastChanceHits += 1
                insertIntoMain(request.key)
            } else {
                insertIntoMain(request.key)
            }
        }
        return result
    }
}
