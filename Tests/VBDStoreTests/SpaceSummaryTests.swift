import Foundation
import Testing
import VBDCore
@testable import VBDStore

/// The free-space summary (format 4): an open reads no page of the sector map, the summary and the
/// allocator agree with a recount of the map after any sequence of operations, crashes and
/// reopens, a store of format 3 gets its summary on first open, and fsck catches a wrong one.
@Suite struct SpaceSummaryTests {
    /// A store whose few chunks are spread over `leaves` sector-map pages (16 MiB of data file each).
    private func spreadStore(_ path: String, leaves: Int) throws {
        let store = try Store.initialize(path: path)
        try store.createVolume(name: "v", size: UInt64(leaves + 1) * 4096)
        let dev = try store.device(named: "v")
        let sectorsPerLeaf = SpaceAllocator.wordsPerLeaf * 64
        for i in 0..<leaves {
            try dev.write(block(seed: UInt64(i) + 1), at: UInt64(i) * 4096)
            store.testingHoldDataSectors(sectorsPerLeaf)
        }
        try dev.flush()
        try store.close()
    }

    /// Metadata pages one open reads (the superblock is not a page of `meta`).
    private func pagesReadByOpen(_ path: String) throws -> Int {
        let store = try Store.open(path: path)
        defer { try? store.close() }
        return store.metadataPageReads.all
    }

    @Test func openReadsTheSameFewPagesWhateverTheDataFileSize() throws {
        let small = TemporaryStoreDirectory(), large = TemporaryStoreDirectory()
        try spreadStore(small.path, leaves: 2)
        try spreadStore(large.path, leaves: 150)
        let smallReads = try pagesReadByOpen(small.path)
        let largeReads = try pagesReadByOpen(large.path)
        // The large store's sector map has 150 leaves (and an interior page); an open that read
        // them would show it here.
        #expect(largeReads <= smallReads + 2, "open read \(largeReads) pages, \(smallReads) for the small store")
        #expect(largeReads <= 8, "open read \(largeReads) pages")
        let store = try Store.open(path: large.path)
        let dev = try store.device(named: "v")
        for i in [0, 75, 149] { #expect(try dev.read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(i) + 1)) }
        #expect(try store.spaceSummaryProblems() == [])
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// Random writes (unique and duplicate), overwrites, trims, snapshots, deletes, flushes,
    /// commits, gc, crashes and clean reopens; after each step the summary and the allocator match
    /// a recount of the sector map, and after each reopen fsck is clean.
    @Test func summaryMatchesTheSectorMapThroughRandomOperationsCrashesAndReopens() throws {
        let dir = TemporaryStoreDirectory()
        var options = Store.Options()
        options.checkpointJournalBytes = 256 << 10   // commits happen on their own too
        var store = try Store.initialize(path: dir.path, options: options)
        var g = SplitMix64(seed: 15)
        let blocks: UInt64 = 256
        var volumes = ["v0"]
        try store.createVolume(name: "v0", size: blocks * 4096)
        var snapshots = 0
        var reopens = 0
        for step in 0..<600 {
            let volume = volumes[Int(g.next() % UInt64(volumes.count))]
            let dev = try store.device(named: volume)
            switch g.next() % 100 {
            case 0..<55:
                let first = g.next() % blocks
                let count = min(blocks - first, g.next() % 8 + 1)
                var bytes: [UInt8] = []
                for k in 0..<count { bytes += block(seed: g.next() % 3 == 0 ? (first + k) % 16 : g.next(), size: 4096) }
                try dev.write(bytes, at: first * 4096)
            case 55..<65:
                let first = g.next() % blocks
                try dev.trim(offset: first * 4096, length: min(blocks - first, g.next() % 32 + 1) * 4096, fua: false)
            case 65..<72:
                try dev.flush()
            case 72..<77:
                try store.checkpoint()
            case 77..<80:
                snapshots += 1
                _ = try store.snapshot(volume: volume, name: "s\(snapshots)")
            case 80..<84:
                if volumes.count < 3 {
                    let name = "v\(step)"
                    try store.createVolume(name: name, size: blocks * 4096)
                    volumes.append(name)
                } else {
                    let gone = volumes.remove(at: Int(g.next() % UInt64(volumes.count)))
                    try store.delete(gone, force: true)
                }
            case 84..<86:
                try store.gc()
            case 86..<93:
                store.abandonWithoutFlush()
                store = try Store.open(path: dir.path, options: options)
                reopens += 1
                #expect(store.fsck(verifyData: false).problems == [], "after a crash at step \(step)")
            default:
                try store.close()
                store = try Store.open(path: dir.path, options: options)
                reopens += 1
                #expect(store.fsck(verifyData: false).problems == [], "after a reopen at step \(step)")
            }
            let problems = try store.spaceSummaryProblems()
            #expect(problems == [], "step \(step)")
            if !problems.isEmpty { break }
        }
        #expect(reopens > 20)
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// Overwrites in rounds with a flush after each: from the second round on, the writes reuse
    /// the space the previous round freed, in the sector-map leaf the allocator keeps from one
    /// allocation to the next while each write installs its chunk in that leaf. Every write
    /// succeeds (installing a chunk over a live one's sectors fails), every block reads back, and
    /// the summary and fsck agree with the map.
    @Test func overwritesReusingFreedSpaceNeverTakeSectorsOfChunksInstalledSince() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        let blocks: UInt64 = 512
        try store.createVolume(name: "v", size: blocks * 4096)
        let dev = try store.device(named: "v")
        var g = SplitMix64(seed: 14)
        var content = [UInt64](repeating: 0, count: Int(blocks))
        var endAfterFill: UInt64 = 0
        for round in 0..<8 {
            var order = Array(0..<blocks)
            for i in order.indices.reversed() { order.swapAt(i, Int(g.next() % UInt64(i + 1))) }
            for b in order where round == 0 || g.next() % 2 == 0 {
                // Sizes vary (part of each block repeats), so freed holes come in many sizes.
                let seed = g.next()
                content[Int(b)] = seed
                try dev.write(compressible(seed: seed, repeated: Int(seed % 3000)), at: b * 4096)
            }
            try dev.flush()
            #expect(try store.spaceSummaryProblems() == [], "round \(round)")
            if round == 0 { endAfterFill = store.space.endSector }
        }
        // The later rounds wrote 3.5 times the volume: most of it went into freed space.
        print("end of the data file: \(endAfterFill) sectors after the fill, \(store.space.endSector) after the overwrites")
        #expect(store.space.endSector < endAfterFill * 2, "\(store.space.endSector) sectors against \(endAfterFill) after the fill")
        for b in 0..<blocks {
            let seed = content[Int(b)]
            #expect(try dev.read(4096, at: b * 4096) == compressible(seed: seed, repeated: Int(seed % 3000)), "block \(b)")
        }
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// A 4 KiB block of random bytes whose last `repeated` bytes are zero (it compresses to about
    /// the rest).
    private func compressible(seed: UInt64, repeated: Int) -> [UInt8] {
        var bytes = block(seed: seed)
        for i in (4096 - repeated)..<4096 { bytes[i] = 0 }
        return bytes
    }

    /// Rewrites both superblock slots as format 3 wrote them: no summary, version 3.
    private func downgradeSuperblockToFormat3(_ path: String) throws {
        let url = URL(fileURLWithPath: path + "/superblock")
        var bytes = [UInt8](try Data(contentsOf: url))
        for k in 0..<2 {
            let at = k * Store.superblockSlotBytes
            guard bytes.count >= at + Store.superblockBytesUsed, bytes[at..<at + 8].contains(where: { $0 != 0 }) else { continue }
            var slot = Array(bytes[at..<at + Store.superblockBytesUsedFormat3 - 8])
            slot[8] = 3; slot[9] = 0; slot[10] = 0; slot[11] = 0
            let sum = metadataChecksum(slot)
            for i in 0..<8 { slot.append(UInt8(truncatingIfNeeded: sum >> (8 * UInt64(i)))) }
            slot += [UInt8](repeating: 0, count: Store.superblockSlotBytes - slot.count)
            bytes.replaceSubrange(at..<at + Store.superblockSlotBytes, with: slot)
        }
        try Data(bytes).write(to: url)
    }

    private func superblockVersions(_ path: String) throws -> [UInt32] {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path + "/superblock")))
        return (0..<2).compactMap { k in
            let at = k * Store.superblockSlotBytes + 8
            guard bytes.count >= at + 4 else { return nil }
            return UInt32(bytes[at]) | UInt32(bytes[at + 1]) << 8 | UInt32(bytes[at + 2]) << 16 | UInt32(bytes[at + 3]) << 24
        }
    }

    @Test func aFormatThreeStoreGetsItsSummaryOnFirstOpenAndKeepsItAfterTheNextCommit() throws {
        let dir = TemporaryStoreDirectory()
        try spreadStore(dir.path, leaves: 20)
        let expected = try { () throws -> (UInt64, UInt64) in
            let s = try Store.open(path: dir.path)
            defer { try? s.close() }
            return s.spaceSummaryFigures
        }()
        try downgradeSuperblockToFormat3(dir.path)
        #expect(try superblockVersions(dir.path) == [3, 3])
        do {
            let store = try Store.open(path: dir.path)
            #expect(store.recoveryWarnings.contains { $0.contains("built it from the sector map") }, "\(store.recoveryWarnings)")
            #expect(store.metadataPageReads.all >= 20, "the sector map was read once")
            #expect(store.spaceSummaryFigures == expected)
            #expect(try store.spaceSummaryProblems() == [])
            #expect(store.fsck().isClean)
            try store.close()
        }
        #expect(try superblockVersions(dir.path).contains(4))
        let store = try Store.open(path: dir.path)
        #expect(store.recoveryWarnings.isEmpty, "\(store.recoveryWarnings)")
        #expect(store.metadataPageReads.all < 10)
        #expect(store.spaceSummaryFigures == expected)
        #expect(try store.device(named: "v").read(4096, at: 19 * 4096) == block(seed: 20))
        try store.close()
    }

    /// A summary that does not match the sector map (written with a valid checksum, as a bug
    /// would) is reported by fsck.
    @Test func fsckReportsASummaryThatDoesNotMatchTheSectorMap() throws {
        let dir = TemporaryStoreDirectory()
        try spreadStore(dir.path, leaves: 3)
        let url = URL(fileURLWithPath: dir.path + "/superblock")
        var bytes = [UInt8](try Data(contentsOf: url))
        for k in 0..<2 {
            let at = k * Store.superblockSlotBytes
            guard bytes[at..<at + 8].contains(where: { $0 != 0 }) else { continue }
            bytes[at + 155] &+= 1   // one sector more than the map holds
            let sum = metadataChecksum(Array(bytes[at..<at + Store.superblockBytesUsed - 8]))
            for i in 0..<8 { bytes[at + Store.superblockBytesUsed - 8 + i] = UInt8(truncatingIfNeeded: sum >> (8 * UInt64(i))) }
        }
        try Data(bytes).write(to: url)
        let store = try Store.open(path: dir.path, options: { var o = Store.Options(); o.readOnly = true; return o }())
        let report = store.fsck()
        #expect(report.problems.contains { $0.contains("free-space summary") }, "\(report.problems)")
        try store.close()
    }
}
