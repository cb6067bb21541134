import Testing
import VBDSimulation

@Suite struct SimulationTests {
    /// A few hundred seeds in CI; `vbd-sim --seeds 1000` (make sim) runs more.
    @Test(arguments: 0..<12)
    func seedsRecoverAndCheckClean(batch: Int) throws {
        for seed in UInt64(batch * 20 + 1)...UInt64(batch * 20 + 20) {
            do {
                _ = try Simulation(seed: seed).run(steps: 150)
            } catch {
                Issue.record("\(error)")
                return
            }
        }
    }

    /// Bit rot: a byte of the data file flipped at rest after half the steps. The run fails if a
    /// read ever returns the flipped bytes as data, or reads notice what fsck does not; here, on
    /// top, fsck must have caught some flips (the others struck unused space).
    @Test func flippedBytesAtRestAreCaughtNeverReturned() throws {
        var flips = 0, foundByFsck = 0, foundByReads = 0
        for seed in UInt64(1)...8 {
            let simulation = Simulation(seed: seed)
            simulation.flipPercent = 50
            let summary = try simulation.run(steps: 120)
            flips += summary.flips
            foundByFsck += summary.flipsFoundByFsck
            foundByReads += summary.flipsFoundByReads
        }
        #expect(flips > 0)
        #expect(foundByFsck > 0, "\(flips) flips, none caught by fsck")
        #expect(foundByReads > 0, "\(flips) flips, none caught by a read")
    }

    /// Failing seeds found during development, replayed forever.
    @Test(arguments: [UInt64]([14, 52, 58, 142, 205]))
    func regressionSeeds(seed: UInt64) throws {
        _ = try Simulation(seed: seed).run(steps: 300)
    }
}
