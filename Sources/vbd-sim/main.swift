import ArgumentParser
import VBDSimulation

#if canImport(Glibc)
import Glibc
#endif

/// Runs the deterministic crash simulation: `vbd-sim --seeds 1000`, or replays one seed.
@main
struct VBDSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vbd-sim",
        abstract: "Deterministic crash-and-recovery simulation of the vbd store.",
        discussion: "Each seed drives a random workload against a simulated disk that drops, keeps or tears unsynced writes on power loss, and checks every recovery against a model. A failing seed prints itself; rerun it with --seed.")

    @Option(help: "Replay exactly this seed.")
    var seed: UInt64?

    @Option(help: "How many seeds to run (starting at --first-seed).")
    var seeds: Int = 100

    @Option(help: "First seed of the range.")
    var firstSeed: UInt64 = 1

    @Flag(help: "Print every operation (with --seed).")
    var trace = false

    @Option(help: "Percent of steps with an injected fault (EIO, ENOSPC, a failed fsync that drops pages).")
    var faultPercent: Int = 3

    @Option(help: "Percent of steps after which a byte of the data file is flipped at rest, every image read and fsck run.")
    var flipPercent: Int = 3

    @Option(help: "Operations per seed.")
    var steps: Int = 300

    @Flag(help: "Concurrent requests on several volumes, interleaved at every lock and I/O point by the seed, every read checked.")
    var concurrent = false

    @Option(help: "Requests per client thread (with --concurrent).")
    var operations: Int = 40

    @Option(help: ArgumentHelp("Child of the SIGKILL test: write numbered blocks to the store at this path until killed.", visibility: .hidden))
    var crashWriter: String?

    @Option(help: ArgumentHelp("First sequence number for --crash-writer.", visibility: .hidden))
    var firstSequence: UInt64 = 0

    @Flag(help: ArgumentHelp("With --crash-writer: print `wrote N` after each write returns.", visibility: .hidden))
    var announceWrites = false

    @Option(help: ArgumentHelp("Guest side of the power-cut test: check the store at this path after a cut.", visibility: .hidden))
    var powerCutVerify: String?

    @Option(help: ArgumentHelp("With --power-cut-verify: the raw file or device holding the floors.", visibility: .hidden))
    var floors: String?

    @Option(help: ArgumentHelp("With --power-cut-verify: the first sequence number the cut writer wrote.", visibility: .hidden))
    var previousFirst: UInt64 = 0

    @Option(help: ArgumentHelp("With --power-cut-verify: the last sequence number a flush acknowledged before the cut (0: none).", visibility: .hidden))
    var previousFlushed: UInt64 = 0

    mutating func run() throws {
        if let crashWriter { try CrashWriter.run(storePath: crashWriter, firstSequence: firstSequence, announceWrites: announceWrites) }
        if let powerCutVerify {
            guard let floors else { throw ValidationError("--power-cut-verify needs --floors") }
            let passed = try PowerCutCheck.run(storePath: powerCutVerify, floorsPath: floors,
                                               previousFirst: previousFirst, previousFlushed: previousFlushed)
            if !passed { throw ExitCode(1) }
            return
        }
        let list: [UInt64] = seed.map { [$0] } ?? (0..<seeds).map { firstSeed + UInt64($0) }
        if concurrent { return try runConcurrent(list) }
        var failures = 0
        var crashes = 0, kills = 0
        var faults = 0
        var flips = 0, flipsFoundByFsck = 0, flipsFoundByReads = 0
        for s in list {
            do {
                let simulation = Simulation(seed: s)
                simulation.trace = trace
                simulation.faultPercent = faultPercent
                simulation.flipPercent = flipPercent
                let summary = try simulation.run(steps: steps)
                crashes += summary.crashes
                kills += summary.kills
                faults += summary.faults
                flips += summary.flips
                flipsFoundByFsck += summary.flipsFoundByFsck
                flipsFoundByReads += summary.flipsFoundByReads
                if seed != nil { print("seed \(s): ok, \(summary)") }
            } catch {
                failures += 1
                print(error is SimulationFailure ? "FAIL \(error)" : "FAIL seed \(s): \(error)\n  replay: vbd-sim --seed \(s)")
            }
            fflush(nil)
        }
        print("vbd-sim: \(list.count - failures) passed, \(failures) failed (\(crashes) crashes recovered, \(kills) of them kills of the process, \(faults) injected faults, "
              + "\(flips) bytes flipped at rest: \(flipsFoundByFsck) caught by fsck, \(flipsFoundByReads) also by a read, "
              + "the rest in unused space; \(steps) steps per seed)")
        if failures > 0 { throw ExitCode(1) }
    }

    func runConcurrent(_ list: [UInt64]) throws {
        var failures = 0
        var total = ConcurrencySummary(seed: 0)
        let started = ContinuousClock.now
        for s in list {
            do {
                let simulation = ConcurrentSimulation(seed: s)
                simulation.trace = trace
                let summary = try simulation.run(operationsPerThread: operations)
                total.readsChecked += summary.readsChecked
                total.blocksChecked += summary.blocksChecked
                total.writes += summary.writes
                total.schedulingPoints += summary.schedulingPoints
                total.threadSwitches += summary.threadSwitches
                if seed != nil { print("seed \(s): ok, \(summary)") }
            } catch {
                failures += 1
                print("FAIL \(error)")
            }
            fflush(nil)
        }
        let elapsed = ContinuousClock.now - started
        print("vbd-sim --concurrent: \(list.count - failures) passed, \(failures) failed in \(elapsed); "
              + "\(total.writes) writes, \(total.readsChecked) reads / \(total.blocksChecked) blocks checked, "
              + "\(total.schedulingPoints) scheduling points, \(total.threadSwitches) switches")
        if failures > 0 { throw ExitCode(1) }
    }
}
