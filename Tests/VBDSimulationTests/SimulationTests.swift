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

    /// Failing seeds found during development, replayed forever.
    @Test(arguments: [UInt64]([14, 52, 58, 142, 205]))
    func regressionSeeds(seed: UInt64) throws {
        _ = try Simulation(seed: seed).run(steps: 300)
    }
}
