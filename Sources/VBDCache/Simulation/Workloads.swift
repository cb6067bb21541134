import VBDCore

/// One block request of a replayed workload: a read (served from the cache or loaded into it) or a
/// write (the written block is inserted as clean data; it can never be a read hit).
public struct CacheRequest: Hashable, Sendable {
    public var key: UInt64
    public var isWrite: Bool

    public init(key: UInt64, isWrite: Bool = false) {
        self.key = key
        self.isWrite = isWrite
    }
}

/// Zipf-distributed ranks 0..<itemCount: P(rank k) ∝ 1 / (k + 1)^exponent. Sampled by binary search
/// of the cumulative distribution (itemCount doubles of memory).
public struct ZipfDistribution: Sendable {
    public let itemCount: Int
    public let exponent: Double
    private let cumulative: [Double]

    public init(itemCount: Int, exponent: Double) {
        precondition(itemCount > 0 && itemCount <= 1 << 26, "Zipf item count out of range")
        precondition(exponent > 0)
        self.itemCount = itemCount
        self.exponent = exponent
        var sums = [Double](repeating: 0, count: itemCount)
        var total = 0.0
        for rank in 0..<itemCount {
            total += 1 / pow(Double(rank + 1), exponent)
            sums[rank] = total
        }
        cumulative = sums.map { $0 / total }
    }

    public func sample(using generator: inout some RandomNumberGenerator) -> Int {
        let u = Double.random(in: 0..<1, using: &generator)
        var low = 0, high = itemCount - 1
        while low < high {
            let middle = (low + high) / 2
            if cumulative[middle] <= u { low = middle + 1 } else { high = middle }
        }
        return low
    }
}

/// Synthetic workloads for hit-ratio comparisons (docs/CACHE.md).
public enum CacheWorkloads {
    /// `count` reads of Zipf-ranked keys. Keys are ranks scrambled by a multiplier so that hot keys are
    /// not numerically adjacent (they would otherwise share shards and look like a scan).
    public static func zipf(itemCount: Int, count: Int, exponent: Double, seed: UInt64) -> [CacheRequest] {
        let distribution = ZipfDistribution(itemCount: itemCount, exponent: exponent)
        var generator = SplitMix64(seed: seed)
        return (0..<count).map { _ in CacheRequest(key: scramble(distribution.sample(using: &generator))) }
    }

    /// Zipf reads with one full sequential scan in the middle: `count` Zipf reads; after the first
    /// third, `scanLength` reads of distinct never-seen-again keys are interleaved one for one with the
    /// Zipf reads (a backup or `nbdcopy` running beside the workload). Scan keys are disjoint from Zipf keys.
    public static func zipfWithScan(
        itemCount: Int, count: Int, exponent: Double, scanLength: Int, seed: UInt64
    ) -> [CacheRequest] {
        let hot = zipf(itemCount: itemCount, count: count, exponent: exponent, seed: seed)
        var requests: [CacheRequest] = []
        requests.reserveCapacity(count + scanLength)
        let scanStart = count / 3
        var scanned = 0
        for (position, request) in hot.enumerated() {
            requests.append(request)
            if position >= scanStart, scanned < scanLength {
                requests.append(CacheRequest(key: scanKeyBase + UInt64(scanned)))
                scanned += 1
            }
        }
        while scanned < scanLength {
            requests.append(CacheRequest(key: scanKeyBase + UInt64(scanned)))
            scanned += 1
        }
        return requests
    }

    static let scanKeyBase: UInt64 = 1 << 48

    /// The top 48 bits of rank times an odd constant: distinct for the ranks used here, and always
    /// below ``scanKeyBase`` (2^48), so Zipf keys and scan keys never meet.
    static func scramble(_ rank: Int) -> UInt64 { (UInt64(rank) &* 0x9E37_79B9_7F4A_7C15) >> 16 }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
