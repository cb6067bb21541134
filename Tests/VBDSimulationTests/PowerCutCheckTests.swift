import Foundation
import Testing
import VBDSimulation
import VBDStore

/// The guest-side check of the power-cut test (IntegrationTests/test-power-cut.sh runs it in QEMU):
/// here on a real store in a temporary directory, to show it passes what survived and fails a lost
/// flushed write, a torn block and a misplaced one.
@Suite struct PowerCutCheckTests {
    func withStore(_ body: (Store, VolumeDevice, String) throws -> Void) throws {
        let path = NSTemporaryDirectory() + "vbd-power-cut-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store.initialize(path: path)
        try store.createVolume(name: CrashWriter.volume, size: UInt64(CrashWriter.blocks * 4096))
        let device = try store.device(named: CrashWriter.volume)
        try body(store, device, path)
        try store.close()
    }

    func write(_ device: VolumeDevice, block: Int, bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in
            try device.write(offset: UInt64(block * 4096), data: b, fua: false)
        }
    }

    @Test func passesWhatSurvivedAndRaisesTheFloors() throws {
        try withStore { store, device, _ in
            let first: UInt64 = 10_000_000
            for s in first..<first + 10 { try write(device, block: Int(s % 256), bytes: CrashWriter.content(s)) }
            try store.flush()
            var floors = [UInt64](repeating: 0, count: CrashWriter.blocks)
            PowerCutCheck.raise(&floors, first: first, lastFlushed: first + 6)
            #expect(floors.filter { $0 != 0 }.count == 7)
            let outcome = try PowerCutCheck.check(store: store, floors: &floors)
            #expect(outcome.passed, "\(outcome.problems)")
            #expect(outcome.blocksWithData == 10)
            #expect(outcome.unflushedSurvivors == 3)
            // The three unflushed writes that survived are now required too.
            #expect(floors.filter { $0 != 0 }.count == 10)
        }
    }

    @Test func failsALostFlushedWriteATornBlockAndAMisplacedOne() throws {
        try withStore { store, device, _ in
            let first: UInt64 = 20_000_000
            let base = Int(first % 256)
            try write(device, block: base, bytes: CrashWriter.content(first))
            var torn = CrashWriter.content(first + 1)
            torn.replaceSubrange(2048..<4096, with: CrashWriter.content(first + 257)[2048..<4096])
            try write(device, block: base + 1, bytes: torn)
            try write(device, block: base + 2, bytes: CrashWriter.content(first + 3))
            try store.flush()
            var floors = [UInt64](repeating: 0, count: CrashWriter.blocks)
            // Block base holds `first`, but a later flushed write to it (first + 256) is required.
            PowerCutCheck.raise(&floors, first: first + 256, lastFlushed: first + 256)
            // Block base + 3 was acknowledged and reads as zeroes.
            PowerCutCheck.raise(&floors, first: first + 3, lastFlushed: first + 3)
            let outcome = try PowerCutCheck.check(store: store, floors: &floors)
            #expect(!outcome.passed)
            #expect(outcome.problems.contains { $0.contains("block \(base) holds write \(first), older than flushed write \(first + 256)") })
            #expect(outcome.problems.contains { $0.contains("block \(base + 1) holds bytes no write wrote") })
            #expect(outcome.problems.contains { $0.contains("block \(base + 2) holds write \(first + 3), which went to block \(base + 3)") })
            #expect(outcome.problems.contains { $0.contains("block \(base + 3) reads as zeroes, lost flushed write \(first + 3)") })
        }
    }

    @Test func floorsSurviveTheirFile() throws {
        let path = NSTemporaryDirectory() + "vbd-floors-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 1 << 20)))
        #expect(try PowerCutCheck.readFloors(path: path) == [UInt64](repeating: 0, count: CrashWriter.blocks))
        var floors = [UInt64](repeating: 0, count: CrashWriter.blocks)
        PowerCutCheck.raise(&floors, first: 30_000_000, lastFlushed: 30_000_300)
        try PowerCutCheck.writeFloors(floors, path: path)
        #expect(try PowerCutCheck.readFloors(path: path) == floors)
        #expect(floors[Int(30_000_300 % 256)] == 30_000_300)
    }
}
