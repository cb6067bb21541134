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
import Glibc
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
    let elapsed: Duration = clock.measure(body)
    return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
}

let measuredPerBlock = residentBytesPerBlock(blocks: 100_000)   // first, on a fresh heap
let warm = BlockCache(configuration: .init(capacityBytes: 128 << 20))
for key in 0..<UInt64(residentBlocks) { block(key).withUnsafeBytes { warm.insert(key, bytes: $0, owner: .init(volume: 1, group: 1)) } }
let keys = (0..<2).map { thread in
    CacheWorkloads.zipf(itemCount: residentBlocks, count: readsPerThread, exponent: 0.9, seed: UInt64(thread + 1))
        .map { $0.key % UInt64(residentBlocks) }
}

/// CPU time of the calling thread: on a shared machine wall-clock rates swing with other people's
/// builds, while operations per CPU-second show what one operation costs (lock waits excluded).
func threadCPUSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

final class CPUTotal: @unchecked Sendable {    // written by each thread once, under the lock
    private var lock = pthread_mutex_t()
    private(set) var seconds = 0.0
    init() { pthread_mutex_init(&lock, nil) }
    func add(_ value: Double) { pthread_mutex_lock(&lock); seconds += value; pthread_mutex_unlock(&lock) }
}

/// Returns (operations per wall-clock second, operations per CPU-second over all threads).
func hitRun(threads: Int) -> (Double, Double) {
    let cpu = CPUTotal()
    let time = seconds {
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            let start = threadCPUSeconds()
            var buffer = [UInt8](repeating: 0, count: 4096)
            var hits = 0
            buffer.withUnsafeMutableBytes { out in
                for key in keys[thread] where warm.read(key, into: out, owner: .init(volume: UInt64(thread), group: 1)) { hits += 1 }
            }
            precondition(hits == readsPerThread, "every read must hit")
            cpu.add(threadCPUSeconds() - start)
        }
    }
    return (Double(threads * readsPerThread) / time, Double(threads * readsPerThread) / cpu.seconds)
}

func insertRun(lastChanceBytes: Int, count: Int) -> (Double, Double) {
    let cache = BlockCache(configuration: .init(capacityBytes: 16 << 20, lastChanceCapacityBytes: lastChanceBytes))
    let data = block(7)
    let owner = CacheOwner(volume: 1, group: 1)
    data.withUnsafeBytes { bytes in for key in 0..<UInt64(8192) { cache.insert(key, bytes: bytes, owner: owner) } }
    let cpuStart = threadCPUSeconds()
    let time = seconds {
        data.withUnsafeBytes { bytes in for key in 0..<UInt64(count) { cache.insert((1 << 32) + key, bytes: bytes, owner: owner) } }
    }
    let cpu = threadCPUSeconds() - cpuStart
    precondition(cache.statistics.evictions >= UInt64(count))
    return (Double(count) / time, Double(count) / cpu)
}

/// Resident memory of this process (/proc/self/statm), in bytes.
func residentBytes() -> Int {
    guard let file = fopen("/proc/self/statm", "r") else { return 0 }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 256)
    guard fgets(&line, Int32(line.count), file) != nil else { return 0 }
    let fields = String(cString: line).split(separator: " ")
    return fields.count > 1 ? (Int(fields[1]) ?? 0) * Int(sysconf(Int32(_SC_PAGESIZE))) : 0
}

/// Resident bytes per cached 4 KiB block, measured around filling a fresh cache: checks the per-entry
/// overhead the byte budget charges (BlockCache.mainEntryOverheadBytes).
func residentBytesPerBlock(blocks: Int) -> Double {
    let data = block(3)
    let before = residentBytes()
    let cache = BlockCache(configuration: .init(capacityBytes: 1 << 30, lastChanceCapacityBytes: 0, shardCount: 16))
    data.withUnsafeBytes { bytes in for key in 0..<UInt64(blocks) { cache.insert(key, bytes: bytes, owner: .init(volume: 1, group: 1)) } }
    let after = residentBytes()
    precondition(cache.statistics.entries == UInt64(blocks))
    return Double(after - before) / Double(blocks)
}

_ = hitRun(threads: 1)   // warm up
let one = hitRun(threads: 1), two = hitRun(threads: 2)
let withLastChance = insertRun(lastChanceBytes: 8 << 20, count: readsPerThread / 4)
let withoutLastChance = insertRun(lastChanceBytes: 0, count: readsPerThread / 4)
func millions(_ rate: Double) -> String { String(Double(Int(rate / 10_000)) / 100) + " M" }
func row(_ name: String, _ rates: (Double, Double)) -> String {
    "| \(name) | \(millions(rates.0)) | \(millions(rates.1)) | \(Int(1e9 / rates.1)) ns |"
}
print("| case | operations per second (wall) | per CPU-second | CPU per operation |")
print("|---|---|---|---|")
print(row("hit, 4 KiB, Zipf 0.9 over 8192 resident blocks, 1 thread", one))
print(row("hit, same, 2 threads (total)", two))
print(row("insert + evict, 4 KiB, LZ4 into last-chance tier", withLastChance))
print(row("insert + evict, 4 KiB, no last-chance tier", withoutLastChance))
print("")
print("resident memory per cached 4 KiB block (100,000 blocks): \(Int(measuredPerBlock)) B; "
      + "charged: \(4096 + BlockCache.mainEntryOverheadBytes) B")
var load = [0.0, 0.0, 0.0]
if getloadavg(&load, 3) == 3 { print("load average during the run: \(load[0])") }
SWIFT
cd "$work"
if ! swift build -c release --product measure-cache >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    exit 1
fi
"$work/.build/release/measure-cache" "$reads"
