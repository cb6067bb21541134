import Foundation
import Testing
import VBDSimulation
import VBDStore

/// A real process writing and flushing is killed with SIGKILL at random moments; after each kill
/// the store reopens, every write that returned (flushed or not) reads back intact, and fsck is clean.
/// The kill moments come from a seed, printed; VBD_KILL_SEED=N replays a run. And `vbdtool serve`
/// killed after writes it acknowledged over NBD, none flushed: every one of them reads back.
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

    static var toolPath: String {
        URL(fileURLWithPath: simulatorPath).deletingLastPathComponent().appendingPathComponent("vbdtool").path
    }

    /// Block `j` of the NBD test: the same formula as `nbdWriter`'s Python, nonzero, unique per block.
    static func nbdBlock(_ j: Int) -> [UInt8] {
        (0..<4096).map { k in UInt8(truncatingIfNeeded: j &* 131 &+ k &* 7 &+ (k >> 9) &+ 1) }
    }

    /// nbdsh's script: writes, none flushed, each acknowledged before the next (`h.pwrite` waits
    /// for the reply); says so, then stays connected (a disconnect could flush) until killed.
    static let nbdWriter = """
        import sys
        def block(j): return bytes(((j * 131 + k * 7 + (k >> 9) + 1) & 255) for k in range(4096))
        for i in range(48):
            j = 3 * i
            if i % 6 == 0: h.pwrite(block(j) + block(j + 1), j * 4096)
            else: h.pwrite(block(j), j * 4096)
        print("acknowledged", flush=True)
        sys.stdin.read()
        """

    /// The blocks `nbdWriter` writes.
    static var nbdWrittenBlocks: [Int] {
        var blocks: [Int] = []
        for i in 0..<48 {
            blocks.append(3 * i)
            if i % 6 == 0 { blocks.append(3 * i + 1) }
        }
        return blocks
    }

    /// `vbdtool serve` killed with SIGKILL after writes it acknowledged over NBD and before any
    /// flush (a guest that keeps running across a restart relies on them): reopened, the store
    /// holds every one of them, and fsck is clean.
    @Test func writesAcknowledgedOverNBDSurviveSIGKILLOfTheServer() throws {
        let nbdsh = try #require(["/usr/bin/nbdsh", "/usr/local/bin/nbdsh"].first { FileManager.default.isExecutableFile(atPath: $0) },
                                 "nbdsh (libnbd-bin) is needed")
        var template = Array("/tmp/vbdk-XXXXXX".utf8CString)   // short: unix socket paths are limited
        let made = try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) })
        let dir = String(cString: made)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = dir + "/store", socket = dir + "/nbd.sock"
        func tool(_ arguments: [String]) throws {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: KillTests.toolPath)
            p.arguments = arguments + ["--store", store]
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            p.waitUntilExit()
            try #require(p.terminationStatus == 0, "vbdtool \(arguments) failed")
        }
        try tool(["init"])
        try tool(["create", "vol", "--size", "8M"])

        let server = Process()
        server.executableURL = URL(fileURLWithPath: KillTests.toolPath)
        server.arguments = ["serve", "--store", store, "--unix", socket, "--cache-size", "16M"]
        let serverOutput = Pipe()
        server.standardError = serverOutput
        server.standardOutput = FileHandle.nullDevice
        try server.run()
        defer { if server.isRunning { kill(server.processIdentifier, SIGKILL); server.waitUntilExit() } }
        // Ready once it logs "serving"; an exit ends the output first.
        var log = ""
        while !log.contains("serving") {
            let data = serverOutput.fileHandleForReading.availableData
            if data.isEmpty { break }
            log += String(decoding: data, as: UTF8.self)
        }
        try #require(log.contains("serving"), "vbdtool serve did not start: \(log)")

        let client = Process()
        client.executableURL = URL(fileURLWithPath: nbdsh)
        client.arguments = ["-u", "nbd+unix:///vol?socket=\(socket)", "-c", KillTests.nbdWriter]
        // The system python3, which has libnbd's module (not one earlier on PATH).
        var environment = ProcessInfo.processInfo.environment
        environment["PATH"] = "/usr/bin:/usr/local/bin:/bin"
        client.environment = environment
        let clientOutput = Pipe(), clientInput = Pipe()
        client.standardOutput = clientOutput
        client.standardInput = clientInput
        try client.run()
        defer { if client.isRunning { kill(client.processIdentifier, SIGKILL); client.waitUntilExit() } }
        var said = ""
        while !said.contains("acknowledged") {
            let data = clientOutput.fileHandleForReading.availableData
            if data.isEmpty { break }
            said += String(decoding: data, as: UTF8.self)
        }
        try #require(said.contains("acknowledged"), "nbdsh did not finish its writes: \(said)")
        kill(server.processIdentifier, SIGKILL)
        server.waitUntilExit()
        #expect(server.terminationReason == .uncaughtSignal)
        kill(client.processIdentifier, SIGKILL)
        client.waitUntilExit()

        let reopened = try Store.open(path: store)
        let device = try reopened.device(named: "vol")
        var lost: [Int] = []
        for j in KillTests.nbdWrittenBlocks {
            var bytes = [UInt8](repeating: 0, count: 4096)
            try bytes.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) throws in try device.read(offset: UInt64(j * 4096), into: p) }
            if bytes != KillTests.nbdBlock(j) { lost.append(j) }
        }
        #expect(lost.isEmpty, "\(lost.count) of \(KillTests.nbdWrittenBlocks.count) acknowledged blocks lost: \(lost.prefix(8))")
        #expect(reopened.fsck().isClean)
        try reopened.close()
    }

    @Test func acknowledgedWritesSurviveSIGKILL() throws {
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
            child.arguments = ["--crash-writer", path, "--first-sequence", String(first), "--announce-writes"]
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
            // Whole lines only: the kill may cut the last one short.
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
            let flushed = lines.compactMap { line -> UInt64? in
                line.hasPrefix("flushed ") ? UInt64(line.dropFirst(8)) : nil
            }.max()
            #expect(flushed != nil, "seed \(seed) iteration \(iteration): killed before any flush was acknowledged")
            // Every write that returned must survive the kill, flushed or not (docs/INVARIANTS.md 1).
            let acknowledged = lines.compactMap { line -> UInt64? in
                line.hasPrefix("wrote ") ? UInt64(line.dropFirst(6)) : nil
            }.max()
            if let last = acknowledged {
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
                    #expect(required[b] == nil, "block \(b) lost acknowledged write \(required[b] ?? 0) (seed \(seed) iteration \(iteration))")
                    continue
                }
                guard let s = CrashWriter.sequence(in: bytes) else {
                    Issue.record("block \(b) holds garbage after kill \(iteration)")
                    continue
                }
                #expect(s % UInt64(CrashWriter.blocks) == UInt64(b), "block \(b) holds another block's write")
                if let r = required[b] { #expect(s >= r, "block \(b) holds \(s), older than acknowledged \(r) (seed \(seed) iteration \(iteration))") }
                // What survived is now the floor for later iterations.
                required[b] = max(required[b] ?? 0, s)
            }
            let report = store.fsck()
            #expect(report.isClean, "seed \(seed): fsck after kill \(iteration): \(report.problems.prefix(3))")
            try store.close()
        }
    }
}
