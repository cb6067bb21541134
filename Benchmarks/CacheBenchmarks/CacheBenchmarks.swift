// PLACEHOLDER written by the benchmark-infrastructure engineer only so that the Benchmarks package
// builds. The cache engineer owns this directory and replaces this file with the real
// CacheBenchmarks (hit, miss, eviction under a Zipf workload; STYLE.md section 9).

import Benchmark

let benchmarks: @Sendable () -> Void = {
}
