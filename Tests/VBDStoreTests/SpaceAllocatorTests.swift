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
}
