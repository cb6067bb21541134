import Foundation
import Testing
import VBDSimulation
import VBDStore

/// A real process writing and flushing is killed with SIGKILL at random moments; after each kill
/// the store reopens, every write acknowledged by a flush reads back intact, and fsck is clean.
@Suite struct KillTests {
    static var simulatorPath: String {
        let here = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [here, here.deletingLastPathComponent()] {
            let p = candidate.appendingPathComponent("vbd-sim").path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/debug/vbd-sim").path
    }

    @Test func flushedWritesSurviveSIGKILL() throws {
        let path = NSTemporaryDirectory() + "vbd-kill-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: path) }
        var rng = SimulationRandom(seed: UInt64(Date().timeIntervalSince1970))
        // required[b]: the newest sequence a flush acknowledged for block b.
        var required = [UInt64?](repeating: nil, count: CrashWriter.blocks)
        var kills = 0
        for iteration in 0..<24 {
            let first = UInt64(iteration + 1) * 10_000_000
            let child = Process()
            child.executableURL = URL(fileURLWithPath: KillTests.simulatorPath)
            child.arguments = ["--crash-writer", path, "--first-sequence", String(first)]
            let out = Pipe()
            child.standardOutput = out
            child.standardError = FileHandle.nullDevice
            try child.run()
            // Let it get going (opening the store, replaying), then kill at a random moment.
            Thread.sleep(forTimeInterval: 0.3 + Double(rng.below(700)) / 1000)
            kill(child.processIdentifier, SIGKILL)
            child.waitUntilExit()
            #expect(child.terminationReason == .uncaughtSignal, "writer exited by itself (status \(child.terminationStatus))")
            kills += 1
            let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let flushed = text.split(separator: "\n").compactMap { line -> UInt64? in
                line.hasPrefix("flushed ") ? UInt64(line.dropFirst(8)) : nil
            }.max()
            if let last = flushed {
                for s in first...last {
                    let b = Int(s % UInt64(CrashWriter.blocks))
                    required[b] = max(required[b] ?? 0, s)
                }
            }
            // Recover and check.
            let store = try Store.open(path: path)
            let device = try store.device(named: CrashWriter.volume)
            for b in 0..<CrashWriter.blocks {
                var bytes = [UInt8](repeating: 0, count: 4096)
                try bytes.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) throws in try device.read(offset: UInt64(b * 4096), into: p) }
                if bytes.allSatisfy({ $0 == 0 }) {
                    #expect(required[b] == nil, "block \(b) lost flushed write \(required[b] ?? 0) (iteration \(iteration))")
                    continue
                }
                guard let s = CrashWriter.sequence(in: bytes) else {
                    Issue.record("block \(b) holds garbage after kill \(iteration)")
                    continue
                }
                #expect(s % UInt64(CrashWriter.blocks) == UInt64(b), "block \(b) holds another block's write")
                if let r = required[b] { #expect(s >= r, "block \(b) holds \(s), older than flushed \(r)") }
                // What survived is now the floor for later iterations.
                required[b] = max(required[b] ?? 0, s)
            }
            let report = store.fsck()
            #expect(report.isClean, "fsck after kill \(iteration): \(report.problems.prefix(3))")
            try store.close()
        }
        #expect(kills >= 20)
    }
}
