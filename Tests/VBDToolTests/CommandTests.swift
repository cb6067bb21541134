import Foundation
import Testing
import VBDControl

/// Every command, run as the built binary against a temporary store, output parsed from --json.
@Suite struct CommandTests {
    @Test func initCreateListInfoWithJSON() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let created = try Tool.run(["create", "vm0", "--size", "20G", "--json"], store: store)
        #expect(created.succeeded, "\(created.stderr)")
        let image = try created.json(ImageSummary.self)
        #expect(image.name == "vm0" && image.size == 20 << 30 && image.blockSize == 4096 && image.kind == "volume" && !image.readOnly)

        let small = try Tool.run(["create", "tiny", "--size", "1536", "--block-size", "512", "--group", "tenant-a", "--json"], store: store)
        #expect(small.succeeded, "\(small.stderr)")
        #expect(try small.json(ImageSummary.self).group == "tenant-a")

        let list = try Tool.run(["list", "--json"], store: store).json([ImageSummary].self)
        #expect(list.map(\.name) == ["tiny", "vm0"])
        #expect(list.first { $0.name == "tiny" }?.blockSize == 512)

        let info = try Tool.run(["info", "vm0", "--json"], store: store).json(ImageSummary.self)
        #expect(info == image)

        let human = try Tool.run(["list"], store: store)
        #expect(human.stdout.contains("NAME") && human.stdout.contains("vm0") && human.stdout.contains("20 GiB"))
    }

    @Test func storeComesFromOptionThenEnvironmentThenDefault() throws {
        let dir = try TemporaryDirectory()
        // Default: ./vbd-data relative to the working directory.
        #expect(try Tool.run(["init"], directory: dir.path).succeeded)
        #expect(FileManager.default.fileExists(atPath: dir.path + "/vbd-data/superblock"))
        #expect(try Tool.run(["create", "a", "--size", "1M"], directory: dir.path).succeeded)
        // VBD_STORE.
        let other = try dir.initializedStore("other")
        #expect(try Tool.run(["create", "b", "--size", "1M"], environment: ["VBD_STORE": other], directory: dir.path).succeeded)
        let viaEnv = try Tool.run(["list", "--json"], environment: ["VBD_STORE": other], directory: dir.path).json([ImageSummary].self)
        #expect(viaEnv.map(\.name) == ["b"])
        // --store wins over VBD_STORE.
        let viaOption = try Tool.run(["list", "--json", "--store", dir.path + "/vbd-data"], environment: ["VBD_STORE": other])
            .json([ImageSummary].self)
        #expect(viaOption.map(\.name) == ["a"])
    }

    @Test func snapshotShareResizeDiffRemove() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let image = dir.path + "/disk.raw"
        try writeBytes(patternBytes(count: 64 << 10, seed: 1), at: 0, to: image)
        try writeBytes([0], at: (4 << 20) - 1, to: image)
        #expect(try Tool.run(["import", image, "base"], store: store).succeeded)

        let snap = try Tool.run(["snapshot", "base@s1", "--json"], store: store).json(ImageSummary.self)
        #expect(snap.name == "base@s1" && snap.readOnly && snap.kind == "snapshot")
        let share = try Tool.run(["share", "base@s1", "clone", "--json"], store: store).json(ImageSummary.self)
        #expect(share.name == "clone" && share.origin == "base@s1" && !share.readOnly)

        let grown = try Tool.run(["resize", "clone", "--size", "8M", "--json"], store: store).json(ImageSummary.self)
        #expect(grown.size == 8 << 20)

        #expect(try Tool.run(["rm", "clone", "--json"], store: store).succeeded)
        let names = try Tool.run(["list", "--json"], store: store).json([ImageSummary].self).map(\.name)
        #expect(names == ["base", "base@s1"])
    }

    @Test func diffListsExactlyTheChangedRanges() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let image = dir.path + "/disk.raw"
        try writeBytes(patternBytes(count: 1 << 20, seed: 3), at: 0, to: image)
        // One named group: two volumes deduplicate only when an operator puts them in one.
        #expect(try Tool.run(["import", image, "vm", "--group", "disks"], store: store).succeeded)
        #expect(try Tool.run(["snapshot", "vm@a"], store: store).succeeded)
        // Blocks 2, 3 and 100 changed in a second image of the same disk.
        let patched = dir.path + "/patched.raw"
        var bytes = try fileBytes(image)
        for i in 2 * 4096..<4 * 4096 { bytes[i] ^= 0xFF }
        for i in 100 * 4096..<101 * 4096 { bytes[i] ^= 0x55 }
        try Data(bytes).write(to: URL(fileURLWithPath: patched))
        #expect(try Tool.run(["import", patched, "vm2", "--group", "disks"], store: store).succeeded)
        #expect(try Tool.run(["snapshot", "vm2@b"], store: store).succeeded)
        let diff = try Tool.run(["diff", "vm@a", "vm2@b", "--json"], store: store).json(DiffReport.self)
        // Different volumes imported separately share no map nodes; dedup makes the unchanged
        // blocks the same chunks, so exactly the patched blocks differ.
        #expect(diff.ranges == [ByteRange(offset: 2 * 4096, length: 2 * 4096), ByteRange(offset: 100 * 4096, length: 4096)])
        #expect(diff.changedBytes == 3 * 4096)
        let human = try Tool.run(["diff", "vm@a", "vm2@b"], store: store)
        #expect(human.stdout.contains("2 changed range(s)"))
    }

    @Test func statsShowSharesUseNoNewSpace() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let image = dir.path + "/disk.raw"
        try writeBytes(patternBytes(count: 2 << 20, seed: 4), at: 0, to: image)
        #expect(try Tool.run(["import", image, "golden"], store: store).succeeded)
        let before = try Tool.run(["stats", "--json"], store: store).json(StoreStatistics.self)
        #expect(before.images.first?.uniqueBytes == 2 << 20)
        #expect(before.images.first?.exclusiveStoredBytes == before.storedBytes)
        #expect(before.uniqueChunks == 512)
        #expect(try Tool.run(["snapshot", "golden@v1"], store: store).succeeded)
        #expect(try Tool.run(["share", "golden@v1", "vm1"], store: store).succeeded)
        #expect(try Tool.run(["share", "golden@v1", "vm2"], store: store).succeeded)
        let after = try Tool.run(["stats", "--json"], store: store).json(StoreStatistics.self)
        #expect(after.storedBytes == before.storedBytes)
        #expect(after.uniqueChunks == before.uniqueChunks)
        for name in ["vm1", "vm2"] {
            let share = try #require(after.images.first { $0.name == name })
            #expect(share.uniqueBytes == 0 && share.sharedBytes == 2 << 20 && share.allocatedBytes == 2 << 20)
        }
        #expect(after.logicalAllocatedBytes == 4 * (2 << 20))
        #expect(after.dedupRatio == 4)
        #expect(after.images.allSatisfy { $0.exclusiveStoredBytes == 0 }, "every block is held by four images")
        #expect(!after.live && after.cache == nil)
        let human = try Tool.run(["stats"], store: store)
        #expect(human.stdout.contains("dedup") && human.stdout.contains("4.00x"))
    }

    @Test func gcReclaimsDeletedData() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let image = dir.path + "/disk.raw"
        try writeBytes(patternBytes(count: 4 << 20, seed: 5), at: 0, to: image)
        #expect(try Tool.run(["import", image, "doomed"], store: store).succeeded)
        let full = try Tool.run(["stats", "--json"], store: store).json(StoreStatistics.self)
        #expect(full.storedBytes >= 4 << 20)
        #expect(try Tool.run(["rm", "doomed"], store: store).succeeded)
        let gc = try Tool.run(["gc", "--json"], store: store)
        #expect(gc.succeeded, "\(gc.stderr)")
        let report = try gc.json(GCReport.self)
        #expect(report.storedBytesAfter == 0)
        #expect(report.dataFileBytesOnDiskAfter < 64 << 10, "holes punched: \(report)")
        #expect(try Tool.run(["gc"], store: store).stdout.contains("data file on disk"))
    }

    @Test func fsckReportsACleanStoreAndExitsTwoOnCorruption() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let image = dir.path + "/disk.raw"
        try writeBytes(patternBytes(count: 256 << 10, seed: 6), at: 0, to: image)
        #expect(try Tool.run(["import", image, "vm"], store: store).succeeded)
        let clean = try Tool.run(["fsck", "--json"], store: store)
        #expect(clean.status == 0)
        let summary = try clean.json(FsckSummary.self)
        #expect(summary.clean && summary.dataVerified && summary.chunks == 64 && summary.mappedBlocks == 64)
        #expect(try Tool.run(["fsck", "--no-data", "--json"], store: store).json(FsckSummary.self).dataVerified == false)

        // Flip bytes in the data file: fsck must find it and exit 2.
        let data = store + "/data"
        var bytes = try fileBytes(data)
        for i in 0..<64 { bytes[i] ^= 0xA5 }
        try Data(bytes).write(to: URL(fileURLWithPath: data))
        let broken = try Tool.run(["fsck"], store: store)
        #expect(broken.status == 2)
        #expect(broken.stdout.contains("problem"))
    }
}

@Suite struct HelpTests {
    static let subcommands = ["init", "create", "list", "info", "snapshot", "share", "rm", "resize", "diff", "import",
                              "export", "serve", "status", "stats", "gc", "fsck"]

    @Test func rootHelpListsEveryCommand() throws {
        let help = try Tool.run(["--help"])
        #expect(help.succeeded)
        for command in Self.subcommands {
            #expect(help.stdout.contains("\n  \(command) "), "\(command) missing from --help")
        }
    }

    @Test(arguments: subcommands)
    func everyCommandHasHelpNamingTheStoreOption(command: String) throws {
        let help = try Tool.run([command, "--help"])
        #expect(help.succeeded)
        #expect(help.stdout.contains("--store <path>"))
        if !["serve", "init"].contains(command) { #expect(help.stdout.contains("--json")) }
    }

    @Test func unknownCommandsAndOptionsAreUsageErrors() throws {
        #expect(try Tool.run(["frobnicate"]).status == 64)
        #expect(try Tool.run(["list", "--colour"]).status == 64)
        #expect(try Tool.run(["create", "v"]).status == 64, "--size is required")
        let listen = try Tool.run(["serve", "--listen", "nohost"])
        #expect(listen.status == 64 && listen.stderr.contains("HOST:PORT"))
    }
}
