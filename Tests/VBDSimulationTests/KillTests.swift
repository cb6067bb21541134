import Foundation
import Testing
import VBDSimulation
import VBDStore

/// A real process writing and flushing is killed with SIGKILL at random moments; after each kill
/// the store reopens, every write acknowledged by a flush reads back intact, and fsck is clean.
/// The kill moments come from a seed, printed; VBD_KILL_SEED=N replays a run.
@Suite struct KillTests {
    static let iterations = 24
    /// A kill lands after the writer has acknowledged 1...this many flushes (counted from its
    /// output, so every kill has flushed writes to check, whatever the machine's speed).
    static let flushesBeforeKillMax = 150
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
        let seed = ProcessInfo.processInfo.environment["VBD_KILL_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64(UInt32.max))
        print("KillTests seed \(seed) (replay: VBD_KILL_SEED=\(seed))")
        var rng = SimulationRandom(seed: seed)
        // required[b]: the newest sequence a flush acknowledged for block b.
        var required = [UInt64?](repeating: nil, count: CrashWriter.blocks)
        for iteration in 0..<Self.iterations {
            let first = UInt64(iteration + 1) * 10_000_000
            let child = Process()
            child.executableURL = URL(fileURLWithPath: KillTests.simulatorPath)
            child.arguments = ["--crash-writer", path, "--first-sequence", String(first)]
            let out = Pipe()
            child.standardOutput = out
            child.standardError = FileHandle.nullDevice
            try child.run()
            // Kill once it has acknowledged a random number of flushes (it keeps writing while
            // the kill is on its way, so the moment within its write/flush cycle varies too).
            let flushesBeforeKill = 1 + rng.below(Self.flushesBeforeKillMax)
            var text = ""
            while text.components(separatedBy: "flushed ").count - 1 < flushesBeforeKill {
                let data = out.fileHandleForReading.availableData
                if data.isEmpty { break }   // the writer exited: reported below
                text += String(decoding: data, as: UTF8.self)
            }
            kill(child.processIdentifier, SIGKILL)
            text += String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            child.waitUntilExit()
            #expect(child.terminationReason == .uncaughtSignal,
                    "seed \(seed) iteration \(iteration): writer exited by itself (status \(child.terminationStatus))")
            let flushed = text.split(separator: "\n").compactMap { line -> UInt64? in
                line.hasPrefix("flushed ") ? UInt64(line.dropFirst(8)) : nil
            }.max()
            #expect(flushed != nil, "seed \(seed) iteration \(iteration): killed before any flush was acknowledged")
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
                    #expect(required[b] == nil, "block \(b) lost flushed write \(required[b] ?? 0) (seed \(seed) iteration \(iteration))")
                    continue
                }
                guard let s = CrashWriter.sequence(in: bytes) else {
                    Issue.record("block \(b) holds garbage after kill \(iteration)")
                    continue
                }
                #expect(s % UInt64(CrashWriter.blocks) == UInt64(b), "block \(b) holds another block's write")
                if let r = required[b] { #expect(s >= r, "block \(b) holds \(s), older than flushed \(r) (seed \(seed) iteration \(iteration))") }
                // What survived is now the floor for later iterations.
                required[b] = max(required[b] ?? 0, s)
            }
            let report = store.fsck()
            #expect(report.isClean, "seed \(seed): fsck after kill \(iteration): \(report.problems.prefix(3))")
            try store.close()
        }
    }
}
