#!/usr/bin/env bash
# Measures BlockCache throughput in a release build without the Benchmarks package: hit throughput with
# 1 and 2 threads, and insert+evict throughput with and without the last-chance tier. The same cases
# as Benchmarks/CacheBenchmarks. Builds a throwaway package in $TMPDIR that depends on this checkout
# (product VBDStore, which brings VBDCache) in release mode; ~2 minutes the first time.
# Usage: scripts/measure-cache.sh [reads-per-thread]    Prints a Markdown table.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
reads=${1:-2000000}
work=${TMPDIR:-/tmp}/vbd-cache-measure
mkdir -p "$work/Sources/measure-cache"
cat >"$work/Package.swift" <<SWIFT
// swift-tools-version:6.1
import PackageDescription
let package = Package(
    name: "measure-cache",
    platforms: [.macOS(.v15)],
    dependencies: [.package(path: "$repo")],
    targets: [.executableTarget(name: "measure-cache", dependencies: [.product(name: "VBDStore", package: "$(basename "$repo")")])]
)
SWIFT
cat >"$work/Sources/measure-cache/main.swift" <<'SWIFT'
import Dispatch
import VBDCache

let readsPerThread = Int(CommandLine.arguments.dropFirst().first ?? "") ?? 2_000_000
let residentBlocks = 8192

func block(_ key: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: key), count: 4096)
    bytes.withUnsafeMutableBytes { $0.storeBytes(of: key, toByteOffset: 0, as: UInt64.self) }
    return bytes
}

func seconds(_ body: () -> Void) -> Double {
    let clock = ContinuousClock()
    let elapsed = clock.measure(body)
    return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
}

let warm = BlockCache(configuration: .init(capacityBytes: 128 << 20))
for key in 0..<UInt64(residentBlocks) { block(key).withUnsafeBytes { warm.insert(key, bytes: $0, owner: .init(volume: 1, group: 1)) } }
let keys = (0..<2).map { thread in
    CacheWorkloads.zipf(itemCount: residentBlocks, count: readsPerThread, exponent: 0.9, seed: UInt64(thread + 1))
        .map { $0.key % UInt64(residentBlocks) }
}

func hitRun(threads: Int) -> Double {
    let time = seconds {
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            var buffer = [UInt8](repeating: 0, count: 4096)
            var hits = 0
            buffer.withUnsafeMutableBytes { out in
                for key in keys[thread] where warm.read(key, into: out, owner: .init(volume: UInt64(thread), group: 1)) { hits += 1 }
            }
            precondition(hits == readsPerThread, "every read must hit")
        }
    }
    return Double(threads * readsPerThread) / time
}

func insertRun(lastChanceBytes: Int, count: Int) -> Double {
    let cache = BlockCache(configuration: .init(capacityBytes: 16 << 20, lastChanceCapacityBytes: lastChanceBytes))
    let data = block(7)
    let owner = CacheOwner(volume: 1, group: 1)
    data.withUnsafeBytes { bytes in for key in 0..<UInt64(8192) { cache.insert(key, bytes: bytes, owner: owner) } }
    let time = seconds {
        data.withUnsafeBytes { bytes in for key in 0..<UInt64(count) { cache.insert((1 << 32) + key, bytes: bytes, owner: owner) } }
    }
    precondition(cache.statistics.evictions >= UInt64(count))
    return Double(count) / time
}

_ = hitRun(threads: 1)   // warm up
let one = hitRun(threads: 1), two = hitRun(threads: 2)
let withLastChance = insertRun(lastChanceBytes: 8 << 20, count: readsPerThread / 4)
let withoutLastChance = insertRun(lastChanceBytes: 0, count: readsPerThread / 4)
func millions(_ rate: Double) -> String { String(Double(Int(rate / 10_000)) / 100) + " M/s" }
print("| case | operations/s |")
print("|---|---|")
print("| hit, 4 KiB, Zipf 0.9 over 8192 resident blocks, 1 thread | \(millions(one)) |")
print("| hit, same, 2 threads (total) | \(millions(two)) |")
print("| insert + evict, 4 KiB, LZ4 into last-chance tier | \(millions(withLastChance)) |")
print("| insert + evict, 4 KiB, no last-chance tier | \(millions(withoutLastChance)) |")
SWIFT
cd "$work"
swift build -c release --product measure-cache 2>&1 | grep -E "error|warning: unre|Compiling measure|Build" || true
"$work/.build/release/measure-cache" "$reads"
