import Foundation
import Testing
import VBDControl
import VBDStore

/// import then export gives back the same bytes, with the holes where they were.
@Suite struct TransferTests {
    /// 8 MiB + 1000 bytes (not a block multiple): random data at 0, a hole from 1 MiB to 5 MiB,
    /// an unaligned 10000-byte island at 5 MiB + 123, explicit zero bytes from 6 MiB to 7 MiB
    /// (allocated in the file, but zero: must not be stored), and data in the last 3000 bytes.
    static func makeSparseImage(_ path: String) throws -> [UInt8] {
        let size = (8 << 20) + 1000
        try writeBytes(patternBytes(count: 1 << 20, seed: 11), at: 0, to: path)
        try writeBytes(patternBytes(count: 10_000, seed: 12), at: (5 << 20) + 123, to: path)
        try writeBytes([UInt8](repeating: 0, count: 1 << 20), at: 6 << 20, to: path)
        try writeBytes(patternBytes(count: 3000, seed: 13), at: UInt64(size - 3000), to: path)
        let bytes = try fileBytes(path)
        #expect(bytes.count == size)
        return bytes
    }

    @Test func rawRoundTripIsBitForBitAndSparse() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let source = dir.path + "/source.raw"
        let original = try Self.makeSparseImage(source)
        let imported = try Tool.run(["import", source, "vm", "--json"], store: store)
        #expect(imported.succeeded, "\(imported.stderr)")
        let report = try imported.json(TransferReport.self)
        #expect(report.format == "raw" && report.size == UInt64(original.count))
        // Only the blocks holding non-zero bytes were written: 256 + 4 (island over 4 blocks) + 1 (tail spans 2) ...
        #expect(report.dataBytes < 2 << 20, "zero blocks and holes are skipped: \(report.dataBytes)")

        let stats = try Tool.run(["stats", "--json"], store: store).json(StoreStatistics.self)
        let usage = try #require(stats.images.first { $0.name == "vm" })
        #expect(usage.allocatedBytes == report.dataBytes)
        #expect(usage.size == UInt64(original.count))

        let exported = dir.path + "/exported.raw"
        let export = try Tool.run(["export", "vm", exported, "--json"], store: store)
        #expect(export.succeeded, "\(export.stderr)")
        #expect(try fileBytes(exported) == original, "bit-for-bit")
        // Sparse: far fewer bytes allocated than the size, and the 1..5 MiB hole and the zero
        // region at 6..7 MiB are holes in the output.
        #expect(allocatedBytes(exported) < 2 << 20, "allocated \(allocatedBytes(exported))")
        #expect(nextData(exported, from: 1 << 20) == 5 << 20)
        #expect(nextData(exported, from: (5 << 20) + 16384) == (8 << 20) - 4096)
    }

    @Test func snapshotExportIsAPointInTime() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let v1 = dir.path + "/v1.raw"
        try writeBytes(patternBytes(count: 256 << 10, seed: 21), at: 0, to: v1)
        #expect(try Tool.run(["import", v1, "vm"], store: store).succeeded)
        #expect(try Tool.run(["snapshot", "vm@t0"], store: store).succeeded)
        // After the snapshot, overwrite the volume's first 64 KiB and one block at 200 KiB.
        let overwrite = patternBytes(count: 64 << 10, seed: 22), later = patternBytes(count: 4096, seed: 23)
        do {
            let opened = try Store.open(path: store)
            let volume = try opened.device(named: "vm")
            try overwrite.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try volume.write(offset: 0, data: b, fua: false) }
            try later.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try volume.write(offset: 200 << 10, data: b, fua: false) }
            try opened.close()
        }
        let original = try fileBytes(v1)
        #expect(try Tool.run(["export", "vm@t0", dir.path + "/t0.raw"], store: store).succeeded)
        #expect(try fileBytes(dir.path + "/t0.raw") == original, "the snapshot holds the volume as it was")
        #expect(try Tool.run(["export", "vm", dir.path + "/now.raw"], store: store).succeeded)
        var now = original
        now.replaceSubrange(0..<(64 << 10), with: overwrite)
        now.replaceSubrange((200 << 10)..<((200 << 10) + 4096), with: later)
        #expect(try fileBytes(dir.path + "/now.raw") == now, "the volume has the later writes")
    }

    @Test func qcow2ImportGoesThroughQemuImg() throws {
        // make test installs qemu-img: a missing one fails here instead of passing silently.
        let qemuImg = try #require(Subprocess.find("qemu-img"), "qemu-img (qemu-utils) is needed")
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let raw = dir.path + "/source.raw"
        let original = try Self.makeSparseImage(raw)
        let qcow2 = dir.path + "/source.qcow2"
        let converted = try Subprocess.run(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", raw, qcow2])
        #expect(converted.succeeded, "\(converted.stderr)")

        let imported = try Tool.run(["import", qcow2, "fromqcow", "--json"], store: store)
        #expect(imported.succeeded, "\(imported.stderr)")
        let report = try imported.json(TransferReport.self)
        // qcow2 sizes are whole 512-byte sectors: qemu-img rounds the virtual size up.
        let virtualSize = (original.count + 511) / 512 * 512
        #expect(report.format == "qcow2" && report.size == UInt64(virtualSize))
        #expect(report.dataBytes < 2 << 20, "qemu-img skipped the zeroes: \(report.dataBytes)")
        let exported = dir.path + "/back.raw"
        #expect(try Tool.run(["export", "fromqcow", exported], store: store).succeeded)
        #expect(try fileBytes(exported) == original + [UInt8](repeating: 0, count: virtualSize - original.count))
        #expect(allocatedBytes(exported) < 2 << 20)
    }

    @Test func progressOnlyOnATerminal() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let source = dir.path + "/p.raw"
        try writeBytes(patternBytes(count: 8 << 20, seed: 31), at: 0, to: source)
        let quiet = try Tool.run(["import", source, "quiet"], store: store)
        #expect(quiet.succeeded && !quiet.stderr.contains("%") && !quiet.stdout.contains("%"), "no progress into a pipe")
        let script = try #require(Subprocess.find("script"), "script(1) (bsdutils) is needed")
        // script(1) gives the command a pseudo-terminal, as an operator's shell would.
        let command = "\(Tool.path) import \(source) loud --store \(store)"
        let loud = try Subprocess.run(script, ["-qec", command, "/dev/null"])
        #expect(loud.succeeded, "\(loud.stdout)")
        #expect(loud.stdout.contains("import [") && loud.stdout.contains("100.0%"), "\(loud.stdout)")
        for (phase, command) in [("export", "export loud \(dir.path)/loud.raw"), ("fsck", "fsck"), ("gc", "gc")] {
            let shown = try Subprocess.run(script, ["-qec", "\(Tool.path) \(command) --store \(store)", "/dev/null"])
            #expect(shown.succeeded, "\(shown.stdout)")
            #expect(shown.stdout.contains("\(phase) [") && shown.stdout.contains("100.0%"), "\(phase): \(shown.stdout)")
            let piped = try Tool.run(command.split(separator: " ").map(String.init) + ["--force"].filter { _ in phase == "export" }, store: store)
            #expect(piped.succeeded && !piped.stderr.contains("%"), "\(phase) is quiet into a pipe")
        }
    }
}
