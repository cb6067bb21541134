import VBDCore
import Testing
@testable import VBDStore

@Suite struct SpaceAllocatorTests {
    /// Random allocations and frees against a model: no sector is ever handed out twice, freed
    /// space is reused once enough has come free, and the counters match the bitmap.
    @Test func allocationsNeverOverlapAndHolesAreReused() {
        var space = SpaceAllocator()
        var g = SplitMix64(seed: 42)
        var live: [(UInt64, Int)] = []
        var owner = [UInt64: Int]()   // sector -> allocation id
        var reusedHole = false
        for step in 0..<20_000 {
            if live.isEmpty || g.next() % 3 != 0 {
                let count = Int(g.next() % 9) + 1
                let s = space.allocate(count)
                if s + UInt64(count) < space.endSector - UInt64(count) { reusedHole = true }
                for k in s..<s + UInt64(count) {
                    #expect(owner[k] == nil, "sector \(k) handed out twice")
                    owner[k] = step
                }
                live.append((s, count))
            } else {
                let i = Int(g.next() % UInt64(live.count))
                let (s, count) = live.remove(at: i)
                _ = space.release([(s, count)])
                for k in s..<s + UInt64(count) { owner[k] = nil }
            }
        }
        #expect(space.usedSectors == UInt64(owner.count))
        #expect(reusedHole)
        // The file does not grow without bound: holes keep being reused.
        #expect(space.endSector < UInt64(owner.count) * 3)
    }

    /// Frees punch only runs of whole pages at least the minimum long; scattered pages stay
    /// allocated for reuse until `reserveFreePagesForPunching` (gc) takes every free page.
    @Test func onlyLongRunsArePunchedUntilGCTakesEveryFreePage() {
        var space = SpaceAllocator()
        // 512 pages of 8 sectors each, in order.
        let pages = (0..<512).map { _ in space.allocate(8) }
        #expect(pages == (0..<512).map { UInt64($0) * 8 })
        // Every other page of the first 256 (scattered), and the last 256 whole (a run of 1 MiB).
        let scattered = stride(from: 0, to: 256, by: 2).map { (sector: pages[$0], count: 8) }
        let run = (256..<512).map { (sector: pages[$0], count: 8) }
        #expect(space.release(scattered, punchRunBytesMin: 1 << 20).isEmpty, "scattered pages stay allocated")
        let punched = space.release(run, punchRunBytesMin: 1 << 20)
        #expect(punched.count == 1 && punched[0].offset == 256 * 4096 && punched[0].length == 1 << 20)
        // With the minimum at one page every freed page is punched, merged into runs.
        var every = SpaceAllocator()
        for _ in 0..<4 { _ = every.allocate(8) }
        #expect(every.release([(0, 8), (16, 8)], punchRunBytesMin: 4096).map(\.offset) == [0, 8192])
        // gc: every free page, reserved (marked in use) until the punch is done.
        let used = space.usedSectors
        let all = space.reserveFreePagesForPunching()
        #expect(all.reduce(0) { $0 + $1.length } == 384 * 4096, "128 scattered pages and the 256-page run")
        #expect(all.first?.offset == 0 && all.first?.length == 4096)
        #expect(space.usedSectors == used, "reservation does not count as use")
        let s = space.allocate(8)
        #expect(s >= 512 * 8, "no allocation takes a page being punched")
        space.finishPunches(all)
        #expect(space.usedSectors == used + 8)
    }
}
