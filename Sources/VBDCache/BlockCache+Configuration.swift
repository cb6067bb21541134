#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension BlockCache {
    /// Sizes of the two tiers and how they are split into shards.
    public struct Configuration: Sendable, Equatable {
        /// Main tier budget: block bytes plus ``BlockCache/mainEntryOverheadBytes`` per entry.
        public var capacityBytes: Int
        /// Last-chance tier budget: stored (compressed) bytes plus
        /// ``BlockCache/lastChanceEntryOverheadBytes`` per entry. Zero turns the tier off.
        public var lastChanceCapacityBytes: Int
        /// Independent shards, each with its own lock and `1/shardCount` of each budget.
        public var shardCount: Int
        /// Owners (volumes) with their own counters, per shard; past it only the totals count.
        public var ownersTrackedPerShardMax: Int

        /// - Parameters:
        ///   - capacityBytes: default ``defaultCapacityBytes(physicalMemoryBytes:)``.
        ///   - lastChanceCapacityBytes: default a quarter of `capacityBytes`; at the ~1.6:1 LZ4 ratio
        ///     measured on the recorded trace it holds ~1.5x as many blocks per byte as main.
        ///   - shardCount: default ``defaultShardCount(capacityBytes:)``.
        public init(
            capacityBytes: Int? = nil, lastChanceCapacityBytes: Int? = nil, shardCount: Int? = nil,
            ownersTrackedPerShardMax: Int = 1024
        ) {
            let capacity = capacityBytes ?? Self.defaultCapacityBytes()
            self.capacityBytes = capacity
            self.lastChanceCapacityBytes = lastChanceCapacityBytes ?? capacity / 4
            self.shardCount = shardCount ?? Self.defaultShardCount(capacityBytes: capacity)
            self.ownersTrackedPerShardMax = ownersTrackedPerShardMax
        }

        /// An eighth of physical memory, between 64 MiB and 32 GiB: enough to hold the hot blocks of many
        /// guests while leaving the rest to guests and the host page cache.
        public static func defaultCapacityBytes(physicalMemoryBytes: UInt64 = physicalMemoryBytes()) -> Int {
            let eighth = physicalMemoryBytes / 8
            return Int(min(max(eighth, 64 << 20), 32 << 30))
        }

        /// One shard per 8 MiB of capacity, a power of two between 1 and 64. Many more shards than
        /// threads keep lock collisions rare (measured: 4 shards made 2 threads slower than 1);
        /// 8 MiB per shard still holds 8 blocks of the 1 MiB maximum.
        public static func defaultShardCount(capacityBytes: Int) -> Int {
            var count = 1
            while count < 64, capacityBytes / (count * 2) >= 8 << 20 { count *= 2 }
            return count
        }

        /// Physical memory of this machine (0 if the system will not say).
        public static func physicalMemoryBytes() -> UInt64 {
            let pages = sysconf(Int32(_SC_PHYS_PAGES)), pageSize = sysconf(Int32(_SC_PAGESIZE))
            guard pages > 0, pageSize > 0 else { return 0 }
            return UInt64(pages) * UInt64(pageSize)
        }

        func validate() {
            precondition(shardCount >= 1 && shardCount <= 4096, "shardCount must be in 1...4096")
            precondition(capacityBytes / shardCount > 0, "capacityBytes must give every shard at least one byte")
            precondition(lastChanceCapacityBytes >= 0, "lastChanceCapacityBytes must not be negative")
            precondition(ownersTrackedPerShardMax >= 0)
        }
    }
}
