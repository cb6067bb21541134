// swift-tools-version:6.1
import PackageDescription

// Dependency direction (no cycles):
//   VBDCore  <-  VBDCache, VBDStore  <-  VBDSimulation
//   CRados + VBDStore  <-  VBDRados (the Ceph RADOS backend, docs/RADOS.md)
//   VhostUser (VBDCore + CVBDSys + VBDAccounting), VBDRados  <-  vbdtool
//   NBDProtocol (NIOCore + VBDCore)  <-  NBDServer (NIOPosix, NIOSSL)  <-  VBDControl  <-  vbdtool
// Release builds leave out the run-time exclusivity checks of the targets on the I/O path; the
// compile-time checks stay, and debug builds (the tests, the checkers) keep both. Under the store
// lock those checks (swift_beginAccess on every class property access) took 11-13 % of the
// server's CPU on 1 MiB writes (Benchmarks/README.md, "Issue 14, third round").
let ioPathSettings: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "vbd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vbdtool", targets: ["vbdtool"]),
        .executable(name: "vbd-sim", targets: ["vbd-sim"]),
        .library(name: "VBDStore", targets: ["VBDStore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
    ],
    targets: [
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CXXHash", pkgConfig: "libxxhash", providers: [.apt(["libxxhash-dev"])]),
        .systemLibrary(name: "CRados", providers: [.apt(["librados-dev"])]),
        .target(name: "CVBDSys"),
        .target(
            name: "VBDCore",
            dependencies: ["CLZ4", "CXXHash"],
            swiftSettings: ioPathSettings
        ),
        .target(
            name: "VBDCache",
            dependencies: ["VBDCore", .product(name: "Atomics", package: "swift-atomics")],
            swiftSettings: ioPathSettings
        ),
        .target(
            name: "VBDStore",
            dependencies: ["VBDCore", "VBDCache", "CVBDSys"],
            swiftSettings: ioPathSettings
        ),
        .target(
            name: "VBDRados",
            dependencies: ["CRados", "VBDCore", "VBDStore", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "VBDSimulation",
            dependencies: ["VBDCore", "VBDStore", "VBDCache"]
        ),
        .target(
            name: "VBDAccounting",
            dependencies: ["VBDCore", .product(name: "Crypto", package: "swift-crypto")]
        ),
        .target(
            name: "NBDProtocol",
            dependencies: ["VBDCore", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: ioPathSettings
        ),
        .target(
            name: "NBDServer",
            dependencies: [
                "VBDCore", "NBDProtocol", "VBDAccounting", "CVBDSys",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: ioPathSettings
        ),
        .target(
            name: "VhostUser",
            dependencies: ["VBDCore", "CVBDSys", "VBDAccounting", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "VBDMetrics",
            dependencies: [
                "VBDCore", "VBDStore", "VBDCache",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "VBDControl",
            dependencies: [
                "VBDCore", "VBDStore", "VBDCache", "NBDServer", "VBDAccounting",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "vbdtool",
            dependencies: [
                "CVBDSys", "VBDCore", "VBDStore", "VBDCache", "NBDServer", "VBDControl", "VBDMetrics", "VBDAccounting", "VhostUser", "VBDRados",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "vbd-rados-bench",
            dependencies: ["VBDRados", "VBDCore"]
        ),
        .executableTarget(
            name: "vbd-sim",
            dependencies: [
                "VBDSimulation",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "VBDCoreTests", dependencies: ["VBDCore"]),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser", "VBDCore", "CVBDSys", "VBDStore", "VBDAccounting"]),
        .testTarget(name: "VBDToolTests", dependencies: ["VBDControl", "VBDStore", "VBDCore"]),
        .testTarget(name: "VBDCacheTests", dependencies: ["VBDCache", "VBDCore"], resources: [.copy("Traces")]),
        .testTarget(name: "VBDStoreTests", dependencies: ["VBDStore", "VBDCore", "VBDSimulation"]),
        .testTarget(name: "VBDRadosTests", dependencies: ["VBDRados", "VBDStore", "VBDCore", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "VBDAccountingTests", dependencies: ["VBDAccounting", "VBDCore", "VBDStore"]),
        .testTarget(name: "VBDMetricsTests", dependencies: ["VBDMetrics", "VBDStore", "VBDCache"]),
        .testTarget(name: "VBDSimulationTests", dependencies: ["VBDSimulation", "VBDStore"]),
        .testTarget(
            name: "NBDProtocolTests",
            dependencies: ["NBDProtocol", "VBDCore", .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "NIOEmbedded", package: "swift-nio")]
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: ["NBDServer", "NBDProtocol", "VBDCore", "VBDStore", "VBDCache", "VhostUser", .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "NIOPosix", package: "swift-nio"),
                           .product(name: "NIOEmbedded", package: "swift-nio")]
        ),
    ]
)
