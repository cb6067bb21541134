// swift-tools-version:6.1
import PackageDescription

// Micro benchmarks for vbd. A separate package so that the product's
// `swift build` never resolves or builds ordo-one/benchmark.
//
//   cd Benchmarks && swift package --allow-writing-to-package-directory benchmark
//
// The first run builds everything in release (about 5 minutes on 2 cores).
let package = Package(
    name: "vbd-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        // Only the MallocInterposer trait: the default traits pull swift-runtime-interposer, which is
        // not available on this Linux toolchain.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(name: "vbd", path: ".."),
    ],
    targets: [
        .executableTarget(
            name: "StoreBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "VBDStore", package: "vbd"),
            ],
            path: "StoreBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        .executableTarget(
            name: "CacheBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "VBDStore", package: "vbd"),
            ],
            path: "CacheBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
