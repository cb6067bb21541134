import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Which on-disk format a directory holds, and what an open says about one it cannot read.
@Suite struct FormatTests {
    @Test func aFormatOneStoreIsRefusedWithAMessageNotOpened() throws {
        let disk = SimulatedDisk(seed: 1)
        let directory = disk.directory()
        // A format-1 superblock slot: its magic is all that is checked before refusing.
        var slot = [UInt8](repeating: 0, count: Store.superblockSlotBytes)
        withUnsafeBytes(of: Store.superblockMagicFormat1.littleEndian) { slot.replaceSubrange(0..<8, with: $0) }
        let superblock = try directory.openFile("superblock", create: true)
        try slot.withUnsafeBytes { b throws in try superblock.write(b, at: 0) }
        _ = try directory.openFile("data", create: true)
        _ = try directory.openFile("checkpoint-1", create: true)
        do {
            _ = try simulatedStore(disk)
            Issue.record("a format-1 store was opened")
        } catch let e as StoreError {
            #expect(e.code == "not-supported")
            #expect(e.description.contains("format 1"))
            #expect(e.description.contains("import"))
        }
        // Nothing was created or changed.
        #expect(!disk.fileNames.contains("meta"))
    }

    @Test func aMissingMetaFileIsReportedAsCorruption() throws {
        let disk = SimulatedDisk(seed: 2)
        do {
            let store = try simulatedStore(disk, create: true)
            try store.createVolume(name: "v", size: 1 << 20)
            try store.close()
        }
        try disk.directory().removeFile("meta")
        do {
            _ = try simulatedStore(disk)
            Issue.record("a store without meta was opened")
        } catch let e as StoreError {
            #expect(e.code == "corrupted")
            #expect(e.description.contains("meta"))
        }
    }
}
