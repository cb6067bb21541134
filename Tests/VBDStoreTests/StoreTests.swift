import Foundation
import Testing
import VBDCore
@testable import VBDStore
import VBDCache

@Suite struct StoreTests {
    @Test func writeReadAndReopen() throws {
        let dir = TemporaryStoreDirectory()
        do {
            let store = try Store.initialize(path: dir.path)
            try store.createVolume(name: "vm0", size: 1 << 20)
            let dev = try store.device(named: "vm0")
            try dev.write(block(seed: 1), at: 0)
            try dev.write(block(seed: 2, size: 8192), at: 8192)
            try dev.write([1, 2, 3], at: 5000)           // partial block: read-modify-write
            #expect(try dev.read(4096, at: 0) == block(seed: 1))
            var expected = [UInt8](repeating: 0, count: 4096)
            expected[5000 - 4096] = 1; expected[5001 - 4096] = 2; expected[5002 - 4096] = 3
            #expect(try dev.read(4096, at: 4096) == expected)
            try store.close()
        }
        let store = try Store.open(path: dir.path)
        let dev = try store.device(named: "vm0")
        #expect(try dev.read(4096, at: 0) == block(seed: 1))
        #expect(try dev.read(8192, at: 8192) == block(seed: 2, size: 8192))
        #expect(try dev.read(3, at: 5000) == [1, 2, 3])
        #expect(store.fsck().isClean)
        try store.close()
    }

    @Test func flushedWritesSurviveACrashAndUnflushedOnesAreWholeOrAbsent() throws {
        let dir = TemporaryStoreDirectory()
        do {
            let store = try Store.initialize(path: dir.path)
            try store.createVolume(name: "v", size: 1 << 20)
            let dev = try store.device(named: "v")
            for i in 0..<64 { try dev.write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }
            try dev.flush()
            for i in 0..<64 { try dev.write(block(seed: UInt64(1000 + i)), at: UInt64(i) * 4096) }
            store.abandonWithoutFlush()
        }
        let store = try Store.open(path: dir.path)
        let dev = try store.device(named: "v")
        for i in 0..<64 {
            let got = try dev.read(4096, at: UInt64(i) * 4096)
            #expect(got == block(seed: UInt64(i)) || got == block(seed: UInt64(1000 + i)))
        }
        #expect(store.fsck().isClean)
        try store.close()
    }

    @Test func secondOpenerIsRefusedWithAClearError() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        #expect(throws: StoreError.self) { _ = try Store.open(path: dir.path) }
        do { _ = try Store.open(path: dir.path) } catch let e as StoreError {
            #expect(e.code == "locked")
            #expect(e.description.contains("in use by another process"))
        }
        try store.close()
        let again = try Store.open(path: dir.path)
        try again.close()
        #expect(throws: StoreError.notInitialized(path: dir.path + "-missing")) { _ = try Store.open(path: dir.path + "-missing") }
    }

    @Test func duplicateBlocksAreStoredOnceAndZeroBlocksNever() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        // Deduplication across volumes needs an operator's group (each volume has its own by default).
        try store.createVolume(name: "a", size: 1 << 22, group: "pool")
        try store.createVolume(name: "b", size: 1 << 22, group: "pool")
        let a = try store.device(named: "a"), b = try store.device(named: "b")
        for i in 0..<100 {
            try a.write(block(seed: UInt64(i % 10)), at: UInt64(i) * 4096)
            try b.write(block(seed: UInt64(i % 10)), at: UInt64(i) * 4096)
        }
        try a.write([UInt8](repeating: 0, count: 4096 * 10), at: 200 * 4096)
        #expect(store.uniqueChunkCount == 10)
        for i in 0..<100 { #expect(try b.read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(i % 10))) }
        #expect(try a.extents(offset: 200 * 4096, length: 40960, maxExtents: 10) == [Extent(length: 40960, flags: [.hole, .zero])])
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// docs/INVARIANTS.md 2: with an 8-bit hash nearly every pair of blocks collides; the byte
    /// comparison must still keep every distinct content apart.
    @Test func weakHashNeverMergesDifferentContents() throws {
        let dir = TemporaryStoreDirectory()
        var options = Store.Options()
        options.hashFunction = .weak(bits: 8)
        do {
            let store = try Store.initialize(path: dir.path, options: options)
            try store.createVolume(name: "v", size: 4096 * 3000)
            let dev = try store.device(named: "v")
            // 1500 distinct contents, each written twice.
            for i in 0..<3000 { try dev.write(block(seed: UInt64(i % 1500)), at: UInt64(i) * 4096) }
            #expect(store.uniqueChunkCount == 1500)
            for i in 0..<3000 { #expect(try dev.read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(i % 1500))) }
            // Overwrite half: frees and reuses under constant collisions.
            for i in 0..<1500 { try dev.write(block(seed: UInt64(5000 + i)), at: UInt64(i) * 4096) }
            #expect(store.fsck().isClean)
            try store.close()
        }
        let store = try Store.open(path: dir.path, options: options)
        let dev = try store.device(named: "v")
        for i in 0..<1500 { #expect(try dev.read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(5000 + i))) }
        for i in 1500..<3000 { #expect(try dev.read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(i % 1500))) }
        #expect(store.fsck().isClean)
        try store.close()
    }

    @Test func corruptionIsAnIOErrorNamingVolumeAndOffset() throws {
        let dir = TemporaryStoreDirectory()
        do {
            let store = try Store.initialize(path: dir.path)
            try store.createVolume(name: "disk", size: 1 << 20)
            let dev = try store.device(named: "disk")
            try dev.write([UInt8](repeating: 0xAB, count: 4096) + block(seed: 7), at: 0)
            try store.close()
        }
        // Flip one byte inside the first chunk's stored bytes (sector 0 of the data file;
        // sector padding past a chunk's end is not part of any block).
        let data = dir.path + "/data"
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: data)))
        bytes[3] ^= 0x40
        try Data(bytes).write(to: URL(fileURLWithPath: data))
        let store = try Store.open(path: dir.path)
        let dev = try store.device(named: "disk")
        var sawCorruption = false
        for offset in [UInt64(0), 4096] {
            do { _ = try dev.read(4096, at: offset) } catch let e as BlockDeviceError {
                guard case let .corrupted(volume, at, _) = e else { Issue.record("wrong error \(e)"); continue }
                #expect(volume == "disk")
                #expect(at == offset)
                #expect(e.errnoValue == 5)
                sawCorruption = true
            }
        }
        #expect(sawCorruption)
        let report = store.fsck()
        #expect(!report.isClean)
        #expect(report.problems.contains { $0.contains("chunk") })
        try store.close()
    }

    /// BLOCK_STATUS `x-vbd:sharing` must not tell a tenant that another volume of its sharing group
    /// holds the bytes it just wrote (a one-request guess check of another tenant's secret block);
    /// sharing within the volume's own snapshots and shares is still reported.
    @Test func sharingStatusReportsOnlyTheVolumesOwnLineage() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "a", size: 1 << 20, group: "pool")
        try store.createVolume(name: "b", size: 1 << 20, group: "pool")
        let a = try store.device(named: "a"), b = try store.device(named: "b")
        let secret = block(seed: 77)
        try a.write(secret, at: 0)
        try b.write(secret, at: 0)
        #expect(store.uniqueChunkCount == 1, "the operator's group deduplicates the two copies")
        #expect(try b.extents(offset: 0, length: 4096, maxExtents: 4) == [Extent(length: 4096, flags: [])],
                "b must not learn that a holds the same block")
        #expect(try a.extents(offset: 0, length: 4096, maxExtents: 4) == [Extent(length: 4096, flags: [])])

        // b's own snapshot shares the block: that is b's lineage, and it is reported, also after a
        // write gave b a private copy of the map leaf (the chunk count is then the only link).
        try store.snapshot(volume: "b", name: "s")
        try b.write(block(seed: 5), at: 4096)
        #expect(try b.extents(offset: 0, length: 8192, maxExtents: 4) ==
                [Extent(length: 4096, flags: [.shared]), Extent(length: 4096, flags: [])])
        try store.share(snapshot: "b@s", as: "b2")
        let b2 = try store.device(named: "b2")
        try b2.write(block(seed: 6), at: 8192)
        #expect(try b2.extents(offset: 0, length: 4096, maxExtents: 4) == [Extent(length: 4096, flags: [.shared])])
        #expect(try a.extents(offset: 0, length: 4096, maxExtents: 4) == [Extent(length: 4096, flags: [])],
                "a's lineage is a alone, whatever b's lineage holds")
        try store.close()
    }

    /// Without `--group` a volume gets a sharing group of its own (inherited by its snapshots and
    /// shares), so two tenants' volumes never deduplicate unless an operator names one group.
    @Test func volumesGetASharingGroupOfTheirOwnByDefault() throws {
        let dir = TemporaryStoreDirectory()
        var store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "a", size: 1 << 20)
        try store.createVolume(name: "b", size: 1 << 20)
        let groupA = try store.info("a").group, groupB = try store.info("b").group
        #expect(groupA != groupB)
        #expect(groupA.hasPrefix(Store.privateGroupPrefix))
        try store.device(named: "a").write(block(seed: 3), at: 0)
        try store.device(named: "b").write(block(seed: 3), at: 0)
        #expect(store.uniqueChunkCount == 2, "two tenants' volumes deduplicated by default")

        // The lineage shares the group: a share of a's snapshot deduplicates with a.
        try store.snapshot(volume: "a", name: "s")
        try store.share(snapshot: "a@s", as: "clone")
        #expect(try store.info("a@s").group == groupA && store.info("clone").group == groupA)
        try store.device(named: "clone").write(block(seed: 3), at: 4096)
        #expect(store.uniqueChunkCount == 2)
        // An operator may join a volume's group by its name, but not invent one of that form.
        try store.createVolume(name: "joined", size: 1 << 20, group: groupA)
        try store.device(named: "joined").write(block(seed: 3), at: 0)
        #expect(store.uniqueChunkCount == 2)
        #expect(throws: StoreError.self) { try store.createVolume(name: "x", size: 1 << 20, group: Store.privateGroupPrefix + "999") }

        try store.close()
        store = try Store.open(path: dir.path)
        #expect(try store.info("a").group == groupA && store.info("b").group == groupB && store.info("joined").group == groupA)
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// Once every 16-bit group number was handed out, a new group reuses the number of a group
    /// with no image and no chunk left, and the old name of that number goes (also after reopen).
    @Test func groupNumbersOfEmptyGroupsAreReusedWhenTheyRunOut() throws {
        let dir = TemporaryStoreDirectory()
        var store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "live", size: 1 << 20, group: "live-group")
        try store.device(named: "live").write(block(seed: 1), at: 0)
        try store.createVolume(name: "gone", size: 1 << 20, group: "gone-group")
        try store.device(named: "gone").write(block(seed: 2), at: 0)
        try store.delete("gone")
        let liveNumber = try #require(store.sharingGroup(named: "live-group"))
        let goneNumber = try #require(store.sharingGroup(named: "gone-group"))
        // Pretend every other number was handed out already: the last one is named.
        try store.createVolume(name: "last", size: 1 << 20, group: "last-group")
        store.mutex.withLock { store.groups["last-group"] = SharingGroupID(UInt16.max - 1) }
        store.mutex.withLock { store.images.values.first { $0.record.name == "last" }!.record.group = SharingGroupID(UInt16.max - 1) }
        try store.createVolume(name: "new", size: 1 << 20)
        let newNumber = try #require(store.sharingGroup(named: try store.info("new").group))
        #expect(newNumber == goneNumber, "the lowest number with no image and no chunk")
        #expect(newNumber != liveNumber)
        #expect(store.sharingGroup(named: "gone-group") == nil, "one number, two names")
        try store.device(named: "new").write(block(seed: 1), at: 0)
        #expect(store.uniqueChunkCount == 2, "the new group must not deduplicate with the live group")
        try store.close()
        store = try Store.open(path: dir.path)
        #expect(try store.sharingGroup(named: store.info("new").group) == newNumber)
        #expect(store.sharingGroup(named: "live-group") == liveNumber)
        try store.close()
    }

    /// An import's data goes into an incomplete volume: invisible in `list`, turned into the named
    /// volume in one step, and deleted by the next open when its writer died.
    @Test func incompleteVolumesArePublishedWholeOrDiscarded() throws {
        let dir = TemporaryStoreDirectory()
        var store = try Store.initialize(path: dir.path)
        let first = try store.createIncompleteVolume(size: 1 << 20, blockSize: 4096, group: nil)
        try store.device(named: first.name).write(block(seed: 8), at: 0)
        #expect(store.list().isEmpty, "an incomplete volume is listed")
        let published = try store.publishIncompleteVolume(first.name, as: "vm")
        #expect(store.list().map(\.name) == ["vm"] && published.group == first.group)
        #expect(throws: StoreError.notFound(first.name)) { try store.info(first.name) }
        #expect(try store.device(named: "vm").read(4096, at: 0) == block(seed: 8))

        // A second import dies before publishing: its volume is gone at the next open.
        let second = try store.createIncompleteVolume(size: 1 << 20, blockSize: 4096, group: nil)
        try store.device(named: second.name).write(block(seed: 9), at: 0)
        try store.flush()
        #expect(throws: StoreError.alreadyExists("vm")) { try store.publishIncompleteVolume(second.name, as: "vm") }
        try store.close()
        store = try Store.open(path: dir.path)
        #expect(throws: StoreError.notFound(second.name)) { try store.info(second.name) }
        #expect(store.recoveryWarnings.contains { $0.contains(second.name) })
        #expect(store.list().map(\.name) == ["vm"])
        #expect(try store.device(named: "vm").read(4096, at: 0) == block(seed: 8))
        #expect(store.uniqueChunkCount == 1, "the dead import's block was freed")
        #expect(store.fsck().isClean)
        try store.close()
    }

    @Test func snapshotsAndSharesAreIndependentAndShareStorage() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "base", size: 1 << 24)
        let base = try store.device(named: "base")
        for i in 0..<256 { try base.write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }
        try store.snapshot(volume: "base", name: "s1")
        try base.write(block(seed: 9999), at: 0)
        try store.share(snapshot: "base@s1", as: "clone")
        let clone = try store.device(named: "clone")
        let snap = try store.device(named: "base@s1")
        #expect(snap.isReadOnly)
        #expect(try clone.read(4096, at: 0) == block(seed: 0))
        #expect(try base.read(4096, at: 0) == block(seed: 9999))
        try clone.write(block(seed: 4242), at: 4096)
        #expect(try snap.read(4096, at: 4096) == block(seed: 1))
        #expect(try base.read(4096, at: 4096) == block(seed: 1))
        #expect(throws: BlockDeviceError.readOnly(name: "base@s1")) { try snap.write([1], at: 0) }
        #expect(store.uniqueChunkCount == 258)
        let ext = try clone.extents(offset: 0, length: 3 * 4096, maxExtents: 10)
        #expect(ext == [Extent(length: 4096, flags: [.shared]), Extent(length: 4096, flags: []), Extent(length: 4096, flags: [.shared])])
        // Deleting a snapshot that a share came from needs force, and says who depends on it.
        do { try store.delete("base@s1") ; Issue.record("delete should refuse") } catch let e as StoreError {
            guard case let .hasDependents(_, deps, _) = e else { Issue.record("\(e)"); return }
            #expect(deps == ["clone"])
        }
        try store.delete("base@s1", force: true)
        #expect(try clone.read(4096, at: 8192) == block(seed: 2))
        #expect(store.fsck().isClean)
        try store.close()
    }

    @Test func readsAtShareDepthOneHundredSeeTheRightData() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "d0", size: 1 << 30)
        try store.device(named: "d0").write(block(seed: 1), at: 12345 * 4096)
        for depth in 1...100 {
            try store.snapshot(volume: "d\(depth - 1)", name: "s")
            try store.share(snapshot: "d\(depth - 1)@s", as: "d\(depth)")
            try store.device(named: "d\(depth)").write(block(seed: UInt64(100 + depth)), at: UInt64(depth) * 4096)
        }
        let deep = try store.device(named: "d100")
        #expect(try deep.read(4096, at: 12345 * 4096) == block(seed: 1))
        for depth in 1...100 { #expect(try deep.read(4096, at: UInt64(depth) * 4096) == block(seed: UInt64(100 + depth))) }
        #expect(store.fsck().isClean)
        try store.close()
        let reopened = try Store.open(path: dir.path)
        #expect(try reopened.device(named: "d100").read(4096, at: 12345 * 4096) == block(seed: 1))
        #expect(reopened.fsck().isClean)
        try reopened.close()
    }

    @Test func deletingGivesDiskSpaceBack() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "keep", size: 1 << 26)
        try store.createVolume(name: "drop", size: 1 << 26)
        let keep = try store.device(named: "keep"), drop = try store.device(named: "drop")
        var g = SplitMix64(seed: 3)
        for i in 0..<1024 {
            var r = [UInt8](repeating: 0, count: 4096)
            for k in stride(from: 0, to: 4096, by: 8) { withUnsafeBytes(of: g.next()) { r.replaceSubrange(k..<k + 8, with: $0) } }
            try drop.write(r, at: UInt64(i) * 4096)   // 4 MiB of incompressible unique data
        }
        try keep.write(block(seed: 1), at: 0)
        try store.flush()
        try store.snapshot(volume: "drop", name: "snap")
        let before = dir.diskUsage
        try store.delete("drop", force: true)
        try store.checkpoint()
        let after = dir.diskUsage
        #expect(before - after >= 3 << 20, "du went from \(before) to \(after)")
        #expect(try keep.read(4096, at: 0) == block(seed: 1))
        #expect(store.fsck().isClean)
        try store.close()
    }

    @Test func diffListsOnlyChangedRanges() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "v", size: 1 << 40)   // 1 TiB: diff must not scan it
        let v = try store.device(named: "v")
        try v.write(block(seed: 1), at: 0)
        try v.write(block(seed: 2), at: 1 << 35)
        try store.snapshot(volume: "v", name: "a")
        try v.write(block(seed: 3), at: 4096)
        try v.write(block(seed: 4), at: 8192)
        try v.write(block(seed: 5), at: 1 << 39)
        try v.trim(offset: 1 << 35, length: 4096, fua: false)
        try store.snapshot(volume: "v", name: "b")
        let d = try store.diff(from: "v@a", to: "v@b")
        let expected: [[UInt64]] = [[4096, 12288], [1 << 35, (1 << 35) + 4096], [1 << 39, (1 << 39) + 4096]]
        #expect(d.map { [$0.lowerBound, $0.upperBound] } == expected)
        #expect(try store.diff(from: "v@a", to: "v@a") == [])
        try store.close()
    }

    @Test func trimZeroAndBlockStatus() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "v", size: 64 * 4096 + 1000)   // last block partial
        let v = try store.device(named: "v")
        for i in 0..<64 { try v.write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }
        try v.write(block(seed: 77, size: 1000), at: 64 * 4096)
        try v.trim(offset: 4096, length: 4096 * 2, fua: false)
        try v.writeZeroes(offset: 4096 * 10, length: 4096 * 2, mayTrim: false, fastOnly: false, fua: true)
        try v.writeZeroes(offset: 4096 * 20 + 100, length: 10, mayTrim: true, fastOnly: false, fua: false)
        #expect(throws: BlockDeviceError.self) { try v.writeZeroes(offset: 100, length: 10, mayTrim: true, fastOnly: true, fua: false) }
        #expect(try v.read(8192, at: 4096) == [UInt8](repeating: 0, count: 8192))
        #expect(try v.read(8192, at: 40960) == [UInt8](repeating: 0, count: 8192))
        var b20 = block(seed: 20); for k in 100..<110 { b20[k] = 0 }
        #expect(try v.read(4096, at: 20 * 4096) == b20)
        #expect(try v.read(1000, at: 64 * 4096) == block(seed: 77, size: 1000))
        let ext = try v.extents(offset: 0, length: 16 * 4096, maxExtents: 100)
        #expect(ext == [Extent(length: 4096, flags: []), Extent(length: 8192, flags: [.hole, .zero]),
                        Extent(length: 7 * 4096, flags: []), Extent(length: 8192, flags: [.zero]),
                        Extent(length: 4 * 4096, flags: [])])
        #expect(throws: BlockDeviceError.outOfRange(offset: 64 * 4096, length: 1001, size: 64 * 4096 + 1000)) {
            _ = try v.read(1001, at: 64 * 4096)
        }
        // Trimming the partial last block through the end of the volume frees it.
        try v.trim(offset: 64 * 4096, length: 1000, fua: false)
        #expect(try v.read(1000, at: 64 * 4096) == [UInt8](repeating: 0, count: 1000))
        #expect(store.fsck().isClean)
        try store.close()
    }

    @Test func metadataOperationsValidateAndReportClearly() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "v", size: 1 << 20)
        #expect(throws: StoreError.alreadyExists("v")) { try store.createVolume(name: "v", size: 1 << 20) }
        #expect(throws: StoreError.notFound("nope")) { try store.snapshot(volume: "nope", name: "s") }
        #expect(throws: StoreError.self) { try store.createVolume(name: "bad@name", size: 1) }
        #expect(throws: StoreError.self) { try store.createVolume(name: "x", size: 1 << 20, blockSize: 3000) }
        #expect(throws: StoreError.self) { try store.resize(volume: "v", size: 1 << 10) }
        try store.resize(volume: "v", size: 1 << 41)
        try store.device(named: "v").write(block(seed: 1), at: (1 << 41) - 4096)
        #expect(try store.device(named: "v").read(4096, at: (1 << 41) - 4096) == block(seed: 1))
        try store.snapshot(volume: "v", name: "s")
        do { try store.delete("v"); Issue.record("should refuse") } catch let e as StoreError {
            #expect(e.code == "has-dependents")
            #expect(e.description.contains("v@s"))
        }
        #expect(throws: StoreError.readOnly("v@s")) { try store.resize(volume: "v@s", size: 1 << 42) }
        try store.close()
        #expect(throws: StoreError.alreadyInitialized(path: dir.path)) { _ = try Store.initialize(path: dir.path) }
    }

    @Test func noSpaceIsReportedAndLosesNothing() throws {
        let dir = TemporaryStoreDirectory()
        var options = Store.Options()
        options.dataBytesMax = 64 * 4096
        let store = try Store.initialize(path: dir.path, options: options)
        try store.createVolume(name: "v", size: 1 << 24)
        let v = try store.device(named: "v")
        var g = SplitMix64(seed: 9)
        var written = 0
        var sawNoSpace = false
        for i in 0..<200 {
            var r = [UInt8](repeating: 0, count: 4096)
            for k in stride(from: 0, to: 4096, by: 8) { withUnsafeBytes(of: g.next()) { r.replaceSubrange(k..<k + 8, with: $0) } }
            do { try v.write(r, at: UInt64(i) * 4096); written += 1 } catch BlockDeviceError.noSpace { sawNoSpace = true; break }
        }
        #expect(sawNoSpace)
        #expect(written == 64)
        // Duplicates and zeroes still fit; old data intact.
        try v.write(try v.read(4096, at: 0), at: 4096 * 150)
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// The metadata in RAM stays within the cache's budget however many blocks are stored: the
    /// cache counts what each page holds (also pages that grew in place, as dedup buckets do),
    /// and only the pages changed since the last commit may exceed it until a commit takes them.
    @Test func metadataMemoryStaysWithinTheBudget() throws {
        let dir = TemporaryStoreDirectory()
        var options = Store.Options()
        options.metadataCacheBytes = 1 << 20
        options.commitDirtyPagesMax = 64
        let store = try Store.initialize(path: dir.path, options: options)
        try store.createVolume(name: "v", size: 1 << 32)
        let v = try store.device(named: "v")
        let count = 131_072
        var n = 0
        var largest = 0
        while n < count {
            var buf = [UInt8](repeating: 0, count: 4096 * 64)
            for k in 0..<64 { withUnsafeBytes(of: UInt64(n + k + 1)) { buf.replaceSubrange(k * 4096..<k * 4096 + 8, with: $0) } }
            try v.write(buf, at: UInt64(n) * 4096)
            n += 64
            // What its pages hold, measured now, not what the cache counted for them.
            largest = max(largest, store.metadataCacheMeasuredBytes)
        }
        // All of it: records of 36 bytes, dedup entries, map slots, and their pages' overhead.
        print("metadata: \(count) unique blocks, cache at most \(largest) bytes (budget 1 MiB)")
        #expect(store.uniqueChunkCount == count)
        // Changed pages (at most 1.5 x 64 before writers wait) and the ones a commit is writing.
        let changedPagesMax = 3 * 64 * (4096 + 512)
        #expect(largest <= (1 << 20) + changedPagesMax)
        for i in stride(from: 0, to: count, by: 997) {
            let check = try v.read(4096, at: UInt64(i) * 4096)
            #expect(check.withUnsafeBytes { $0.load(as: UInt64.self) } == UInt64(i + 1))
        }
        #expect(store.fsck().isClean)
        try store.close()
    }
}

@Suite struct PageMissTests {
    /// Writes and closes a store with volume "v" of `count` blocks, block i starting with i + 1,
    /// whose metadata is many times the 256 KiB cache of the options returned (for reopening it).
    static func storeOfNumberedBlocks(_ dir: TemporaryStoreDirectory, count: Int) throws -> Store.Options {
        let (store, options) = try smallCacheStore(dir, volumeBytes: UInt64(count) * 4096)
        let v = try store.device(named: "v")
        for n in stride(from: 0, to: count, by: 64) {
            var buf = [UInt8](repeating: 0, count: 4096 * 64)
            for k in 0..<64 { withUnsafeBytes(of: UInt64(n + k + 1)) { buf.replaceSubrange(k * 4096..<k * 4096 + 8, with: $0) } }
            try v.write(buf, at: UInt64(n) * 4096)
        }
        try store.close()
        return options
    }

    /// A store whose metadata is many times its cache: reads and writes of blocks whose pages are
    /// not cached read those pages after letting go of the store lock (a probe finds them first),
    /// not while holding it; the data is right either way.
    @Test func uncachedMetadataIsReadWithoutTheStoreLock() throws {
        let dir = TemporaryStoreDirectory()
        let count = 32_768
        let options = try Self.storeOfNumberedBlocks(dir, count: count)
        let store = try Store.open(path: dir.path, options: options)
        let v = try store.device(named: "v")
        var g = SplitMix64(seed: 3)
        let before = store.metadataPageReads
        for _ in 0..<400 {
            let i = Int(g.next() % UInt64(count))
            let got = try v.read(4096, at: UInt64(i) * 4096)
            #expect(got.withUnsafeBytes { $0.load(as: UInt64.self) } == UInt64(i + 1))
        }
        let afterReads = store.metadataPageReads
        print("reads: \(afterReads.all - before.all) pages, \(afterReads.outsideLock - before.outsideLock) outside")
        for _ in 0..<400 {
            let i = Int(g.next() % UInt64(count))
            try v.write(block(seed: UInt64(count + i)), at: UInt64(i) * 4096)
            #expect(try v.read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(count + i)))
        }
        let (all, outside) = Self.pagesRead(store, since: before)
        #expect(all > 400, "the pages were not cached")
        #expect(outside * 10 >= all * 8, "\(outside) of \(all) pages read without the lock")
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// New chunks take numbers freed earlier, off the free stack, and each needs its number's
    /// record, which in a large store is seldom cached: the write reads it before its hold of
    /// the lock (phase D's probe), not under it.
    @Test func freedChunkNumbersAreReusedWithoutReadingTheirRecordsUnderTheLock() throws {
        let dir = TemporaryStoreDirectory()
        let count = 32_768
        var options = try Self.storeOfNumberedBlocks(dir, count: count)
        do {
            let store = try Store.open(path: dir.path, options: options)
            let v = try store.device(named: "v")
            var g = SplitMix64(seed: 21)
            for _ in 0..<2000 { try v.trim(offset: g.next() % UInt64(count) * 4096, length: 4096, fua: false) }
            try store.close()
        }
        options.metadataCacheBytes = 256 << 20
        let store = try Store.open(path: dir.path, options: options)
        let v = try store.device(named: "v")
        let before = store.metadataPageReads
        var g = SplitMix64(seed: 22)
        for k in 0..<600 {
            let i = Int(g.next() % UInt64(count))
            try v.write(block(seed: UInt64(3 * count + k)), at: UInt64(i) * 4096)
        }
        let (all, outside) = Self.pagesRead(store, since: before)
        #expect(all > 300, "the pages were not cold")
        // Measured: 29 of 547 pages under the lock without the probe, 5 of 543 with it.
        #expect((all - outside) * 50 <= all, "\(all - outside) of \(all) pages read under the lock")
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// A store reopened with a cache that holds all its metadata starts cold: no page is ever
    /// evicted, so a few probes that find their pages cached must not stop the loading outside
    /// the lock while most pages are still on the disk. Reads and writes that alternate between
    /// blocks already touched and blocks not touched yet, and reads of 256 blocks, read their
    /// pages without the lock.
    @Test func readsNeverReadAPageUnderTheLockWhileTheCacheFills() throws {
        let dir = TemporaryStoreDirectory()
        let count = 32_768
        var options = try Self.storeOfNumberedBlocks(dir, count: count)
        options.metadataCacheBytes = 256 << 20
        let store = try Store.open(path: dir.path, options: options)
        let v = try store.device(named: "v")
        var g = SplitMix64(seed: 11)
        let before = store.metadataPageReads
        var rewritten = Set<Int>()
        for round in 0..<300 {
            let i = Int(g.next() % UInt64(count))
            for _ in 0..<2 {
                let got = try v.read(4096, at: UInt64(i) * 4096)
                if rewritten.contains(i) {
                    #expect(got == block(seed: UInt64(2 * count + i)))
                } else {
                    #expect(got.withUnsafeBytes { $0.load(as: UInt64.self) } == UInt64(i + 1))
                }
            }
            if round % 3 == 0 {
                try v.write(block(seed: UInt64(count + i)), at: UInt64(i) * 4096)
                try v.write(block(seed: UInt64(2 * count + i)), at: UInt64(i) * 4096)
                rewritten.insert(i)
            }
        }
        // Reads of many blocks: one round must learn the missing pages of all of them.
        for _ in 0..<24 {
            let first = Int(g.next() % UInt64(count / 256)) * 256
            let got = try v.read(256 * 4096, at: UInt64(first) * 4096)
            for k in 0..<256 where !rewritten.contains(first + k) {
                #expect(got.withUnsafeBytes { $0.load(fromByteOffset: k * 4096, as: UInt64.self) } == UInt64(first + k + 1))
            }
        }
        let (all, outside) = Self.pagesRead(store, since: before)
        #expect(all > 300, "the pages were not cold")
        #expect(outside * 100 >= all * 95, "\(all - outside) of \(all) pages read under the lock")
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// gc's scan for free pages to punch reads the sector map's leaves of each slice before it
    /// holds the store lock for that slice, not under it (at 32 M chunks, cold, a slice's leaves
    /// held the lock for 120 ms).
    @Test func gcReadsTheSectorMapWithoutTheStoreLock() throws {
        let dir = TemporaryStoreDirectory()
        let (store, options) = try Self.smallCacheStore(dir, volumeBytes: 64 << 20)
        let v = try store.device(named: "v")
        // Incompressible blocks, so the data file spans several sector-map leaves.
        var g = SplitMix64(seed: 17)
        for n in stride(from: 0, to: 16_384, by: 64) {
            var buf = [UInt8](repeating: 0, count: 64 * 4096)
            for k in stride(from: 0, to: buf.count, by: 8) { withUnsafeBytes(of: g.next()) { buf.replaceSubrange(k..<k + 8, with: $0) } }
            try v.write(buf, at: UInt64(n) * 4096)
        }
        try store.close()
        let reopened = try Store.open(path: dir.path, options: options)
        let w = try reopened.device(named: "v")
        // Frees all over the file, made durable before gc's own scan.
        for n in stride(from: 0, to: 16_384, by: 97) { try w.write(block(seed: UInt64(n)), at: UInt64(n) * 4096) }
        try w.flush()
        try reopened.close()
        // Reopened again, so every sector-map leaf is cold whatever the cache evicted before.
        let cold = try Store.open(path: dir.path, options: options)
        let before = cold.metadataPageReads
        try cold.gc()
        let (all, outside) = Self.pagesRead(cold, since: before)
        let underLock = all - outside
        #expect(all >= 2, "the sector map was cached")
        #expect(underLock <= 1, "\(underLock) pages read under the lock")
        let u = try cold.device(named: "v")
        for n in stride(from: 0, to: 16_384, by: 97) { #expect(try u.read(4096, at: UInt64(n) * 4096) == block(seed: UInt64(n))) }
        #expect(cold.fsck().isClean)
        try cold.close()
    }

    /// A leak sweep's claims (`chunkClaimsForSweep`, run by `gc` on a store whose chunks are RADOS
    /// objects) walk the chunk table in windows whose leaves are read before the lock is held,
    /// and claim exactly the installed chunks.
    @Test func aSweepsClaimsReadTheChunkTableWithoutTheStoreLock() throws {
        let dir = TemporaryStoreDirectory()
        let (store, options) = try Self.smallCacheStore(dir, volumeBytes: 64 << 20)
        let v = try store.device(named: "v")
        for n in stride(from: 0, to: 16_384, by: 64) {
            try v.write((0..<64).flatMap { block(seed: UInt64(n + $0)) }, at: UInt64(n) * 4096)
        }
        try store.close()
        let cold = try Store.open(path: dir.path, options: options)
        let before = cold.metadataPageReads
        let claims = try cold.chunkClaimsForSweep()
        let (all, outside) = Self.pagesRead(cold, since: before)
        #expect(all >= 60, "the chunk table's leaves were cached")
        #expect(outside * 100 >= all * 95, "\(all - outside) of \(all) pages read under the lock")
        let installed = try cold.installedChunkPlaces()
        #expect(claims.installed.count == 16_384)
        #expect(claims.installed == installed)
        #expect(claims.hashesInFlight.isEmpty)
        try cold.close()
    }

    /// Metadata pages `store` read since `before` (its `metadataPageReads` then), and how many of
    /// them without the store lock; printed for the test's log.
    static func pagesRead(_ store: Store, since before: (all: Int, outsideLock: Int)) -> (all: Int, outside: Int) {
        let after = store.metadataPageReads
        let all = after.all - before.all, outside = after.outsideLock - before.outsideLock
        print("metadata pages read: \(all), of them without the store lock: \(outside)")
        return (all, outside)
    }

    /// A new store whose metadata cache is 256 KiB, with an empty volume "v"; and its options.
    static func smallCacheStore(_ dir: TemporaryStoreDirectory, volumeBytes: UInt64) throws -> (Store, Store.Options) {
        var options = Store.Options()
        options.metadataCacheBytes = 256 << 10
        options.commitDirtyPagesMax = 64
        let store = try Store.initialize(path: dir.path, options: options)
        try store.createVolume(name: "v", size: volumeBytes)
        return (store, options)
    }

    /// The event-loop fast path reads no content page of the metadata (map leaves, chunk records):
    /// with them out of the cache it declines, and the ordinary read that follows loads them
    /// without the lock. Page-table pages are still read in place (a few, then kept cached).
    @Test func cachedReadFastPathReadsNoMetadataPage() throws {
        let dir = TemporaryStoreDirectory()
        let count = 16_384
        var options = try Self.storeOfNumberedBlocks(dir, count: count)
        options.cache = BlockCache(configuration: .init(capacityBytes: 64 << 20))
        let store = try Store.open(path: dir.path, options: options)
        let id = try store.info("v").id
        let v = try store.device(named: "v")
        var g = SplitMix64(seed: 5)
        var served = 0
        var fastPathPageReads = 0
        for _ in 0..<300 {
            let i = Int(g.next() % UInt64(count))
            var buffer = [UInt8](repeating: 0, count: 4096)
            let before = store.metadataPageReads.all
            let fast = buffer.withUnsafeMutableBytes { store.readIfCached(image: id, offset: UInt64(i) * 4096, into: $0) }
            fastPathPageReads += store.metadataPageReads.all - before
            if fast != nil {
                served += 1
                #expect(buffer.withUnsafeBytes { $0.load(as: UInt64.self) } == UInt64(i + 1))
            }
            #expect(try v.read(4096, at: UInt64(i) * 4096).withUnsafeBytes { $0.load(as: UInt64.self) } == UInt64(i + 1))
        }
        #expect(store.metadataPageReads.all > 100, "the pages were not cached")
        #expect(fastPathPageReads <= 4, "the fast path read \(fastPathPageReads) metadata pages")
        print("fast path served \(served) of 300, read \(fastPathPageReads) pages")
        try store.close()
    }
}

@Suite struct UsageTests {
    @Test func sharesUseAlmostNoNewSpaceAndFairSharesAddUp() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "img", size: 1 << 24)
        let img = try store.device(named: "img")
        for i in 0..<512 { try img.write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }
        try store.snapshot(volume: "img", name: "gold")
        try store.share(snapshot: "img@gold", as: "vm1")
        try store.share(snapshot: "img@gold", as: "vm2")
        try store.device(named: "vm1").write(block(seed: 100_000), at: 0)
        let u = try store.usage()
        let vm1 = u.images.first { $0.name == "vm1" }!, vm2 = u.images.first { $0.name == "vm2" }!
        #expect(vm1.allocatedBytes == 512 * 4096)
        #expect(vm1.uniqueBytes == 4096)
        #expect(vm2.uniqueBytes == 0)
        #expect(vm2.exclusiveStoredBytes == 0)
        #expect(vm1.exclusiveStoredBytes > 0 && vm1.exclusiveStoredBytes <= 4096)
        let fairTotal = u.images.reduce(0.0) { $0 + $1.fairStoredBytes }
        #expect(abs(fairTotal - Double(u.storedBytes)) < 1.0)
        #expect(u.uniqueChunks == 513)
        #expect(u.compressionRatio > 1.1)
        #expect(u.dedupRatio > 3.5)
        // Walked seven blocks (and records) per hold of the store lock, the figures are the same.
        var windowed = try store.usage(elementsPerHold: 7)
        windowed.indexMemoryBytes = u.indexMemoryBytes   // the cache may hold other pages by now
        #expect(windowed == u)
        // Counted 100 chunk numbers per pass (six passes), the figures are the same.
        var passes = try store.usage(elementsPerHold: 7, chunksPerPass: 100)
        passes.indexMemoryBytes = u.indexMemoryBytes
        #expect(passes == u)
        try store.close()
    }

    /// Commits start once `commitDirtyPagesMax` metadata pages changed, whatever the cache's
    /// budget: what a commit does under the store lock stays bounded. The data survives them.
    @Test func aCommitStartsOnceEnoughPagesChanged() throws {
        let dir = TemporaryStoreDirectory()
        var options = Store.Options()
        options.commitDirtyPagesMax = 16
        let store = try Store.initialize(path: dir.path, options: options)
        try store.createVolume(name: "v", size: 1 << 30)
        let dev = try store.device(named: "v")
        let first = store.mutex.withLock { store.generation }
        var rng = SplitMix64(seed: 3)
        var written: [UInt64: UInt64] = [:]
        for i in 0..<600 as Range<UInt64> {
            let at = (rng.next() % (1 << 18)) * 4096   // far apart: each write changes its own map pages
            try dev.write(block(seed: i), at: at)
            written[at] = i
            #expect(store.mutex.withLock { store.pager.dirtyFrames } <= 16 + 64, "changed pages stay near the bound")
        }
        let commits = store.mutex.withLock { store.generation } - first
        #expect(commits >= 5)
        try store.close()
        let again = try Store.open(path: dir.path)
        for (at, seed) in written { #expect(try again.device(named: "v").read(4096, at: at) == block(seed: seed)) }
        #expect(again.fsck().isClean)
        try again.close()
    }

    @Test func gcTrimsTheDataFile() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        try store.createVolume(name: "a", size: 1 << 24)
        try store.createVolume(name: "b", size: 1 << 24)
        for i in 0..<64 { try store.device(named: "a").write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }
        for i in 0..<256 { try store.device(named: "b").write(block(seed: UInt64(1000 + i)), at: UInt64(i) * 4096) }
        try store.delete("b")
        let (before, after) = try store.gc()
        #expect(after < before / 2)
        for i in 0..<64 { #expect(try store.device(named: "a").read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(i))) }
        #expect(store.fsck().isClean)
        try store.close()
        let again = try Store.open(path: dir.path)
        #expect(again.fsck().isClean)
        try again.close()
    }
}
