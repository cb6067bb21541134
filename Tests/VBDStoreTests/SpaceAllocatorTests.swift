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
        let all = space.reserveFreePagesForPunching().punches
        #expect(all.reduce(0) { $0 + $1.length } == 384 * 4096, "128 scattered pages and the 256-page run")
        #expect(all.first?.offset == 0 && all.first?.length == 4096)
        #expect(space.usedSectors == used, "reservation does not count as use")
        let s = space.allocate(8)
        #expect(s >= 512 * 8, "no allocation takes a page being punched")
        space.finishPunches(all)
        #expect(space.usedSectors == used + 8)
    }

    /// Long freed runs stay in the file for reuse as far as writes allocated while they were
    /// freed (an overwrite), up to the cap; frees with no writes around them (a delete) are
    /// punched. Punched pages do not count against the budget, and stop counting as punched
    /// once an allocation takes them.
    @Test func longRunsFreedByOverwritesStayForReuseUpToTheBudget() {
        let mib = 1 << 20, pageSectors = 8
        var space = SpaceAllocator()
        // 4 MiB written: 1024 pages of 8 sectors, in order.
        let pages = (0..<1024).map { _ in space.allocate(pageSectors) }
        _ = space.takeDeferred()   // a flush: the fill's allocations are history
        // An overwrite of the first 2 MiB: 2 MiB allocated while the old 2 MiB are freed.
        for k in 0..<512 {
            _ = space.allocate(pageSectors)
            space.deferFree(pages[k], count: pageSectors)
        }
        var frees = space.takeDeferred()
        #expect(space.recentlyAllocatedSectors == UInt64(512 * pageSectors))
        var punches = space.releaseReservingPunches(frees, punchRunBytesMin: UInt64(mib), unpunchedFreeBytesMax: 64 << 20)
        #expect(punches.isEmpty, "an overwrite's freed run stays for the writes that follow")
        #expect(space.unpunchedFreeSectors == UInt64(512 * pageSectors))
        // The cap bounds what stays: with 1 MiB allowed, 1 MiB of the 2 MiB run is punched.
        var capped = SpaceAllocator()
        let cappedPages = (0..<1024).map { _ in capped.allocate(pageSectors) }
        _ = capped.takeDeferred()
        for k in 0..<512 { _ = capped.allocate(pageSectors); capped.deferFree(cappedPages[k], count: pageSectors) }
        let cappedPunches = capped.releaseReservingPunches(capped.takeDeferred(), punchRunBytesMin: UInt64(mib),
                                                           unpunchedFreeBytesMax: UInt64(mib))
        #expect(cappedPunches.map(\.length) == [UInt64(2 * mib)], "one run, punched whole: it is all the excess's")
        // A delete: the last 2 MiB freed with nothing allocated meanwhile are punched.
        for k in 512..<1024 { space.deferFree(pages[k], count: pageSectors) }
        frees = space.takeDeferred()
        punches = space.releaseReservingPunches(frees, punchRunBytesMin: UInt64(mib), unpunchedFreeBytesMax: 64 << 20)
        #expect(punches.count == 1 && punches[0].offset == 512 * 4096 && punches[0].length == UInt64(2 * mib))
        let free = space.endSector - space.usedSectors
        space.finishPunches(punches)
        #expect(space.punchedFreeSectors == UInt64(512 * pageSectors))
        #expect(space.unpunchedFreeSectors == free - UInt64(512 * pageSectors))
        // Budget 0 is the old policy: every long run is punched at once.
        var eager = SpaceAllocator()
        let eagerPages = (0..<512).map { _ in eager.allocate(pageSectors) }
        for k in 0..<512 { _ = eager.allocate(pageSectors); eager.deferFree(eagerPages[k], count: pageSectors) }
        #expect(eager.releaseReservingPunches(eager.takeDeferred(), punchRunBytesMin: UInt64(mib)).count == 1)
    }

    /// An allocation that lands in a punched page gives it a file block again: it no longer
    /// counts as punched, and the free rest of the file is counted as unpunched.
    @Test func allocatingInAPunchedPageEndsItsPunchedState() {
        var space = SpaceAllocator()
        let pages = (0..<256).map { _ in space.allocate(8) }
        let punches = space.releaseReservingPunches(pages.map { (sector: $0, count: 8) }, punchRunBytesMin: 4096)
        #expect(punches.count == 1 && punches[0].length == 256 * 4096)
        space.finishPunches(punches)
        #expect(space.punchedFreeSectors == 256 * 8 && space.unpunchedFreeSectors == 0)
        // Scattered allocations of 2 sectors reuse the punched pages.
        var taken = Set<UInt64>()
        for _ in 0..<64 { taken.insert(space.allocate(2) >> 3) }
        #expect(space.endSector == 256 * 8, "the holes were reused")
        #expect(space.punchedFreeSectors == UInt64(256 - taken.count) * 8)
        #expect(space.unpunchedFreeSectors == UInt64(taken.count) * 8 - 64 * 2)
        // gc punches only what still has file blocks: the wholly free pages are all punched already.
        let punchedBefore = space.punchedFreeSectors
        let all = space.reserveFreePagesForPunching().punches
        #expect(all.isEmpty, "pages already punched are not punched again")
        #expect(space.punchedFreeSectors == punchedBefore)
    }

    /// gc walks the file in slices (one store-lock hold each): the slices together reserve exactly
    /// what one walk of the whole file does, and a page already punched is left alone.
    @Test func gcSlicesTogetherReserveWhatOneWalkDoes() {
        func scattered() -> SpaceAllocator {
            var space = SpaceAllocator()
            var rng = SplitMix64(seed: 7)
            let runs = (0..<3000).map { _ in (sector: space.allocate(Int(rng.next() % 24) + 1), count: 0) }
            var frees: [(sector: UInt64, count: Int)] = []
            var previous: UInt64 = 0
            for r in runs.dropFirst() { if rng.next() % 3 != 0 { frees.append((previous, Int(r.sector - previous))) }; previous = r.sector }
            // The first quarter of the frees is punched at release (a deleted volume).
            let punched = space.releaseReservingPunches(Array(frees.prefix(frees.count / 4)), punchRunBytesMin: 4096)
            space.finishPunches(punched)
            _ = space.release(Array(frees.dropFirst(frees.count / 4)), punchRunBytesMin: 1 << 30)
            return space
        }
        var whole = scattered()
        let once = whole.reserveFreePagesForPunching()
        #expect(once.nextPage == nil)
        var sliced = scattered()
        var pieces: [(offset: UInt64, length: UInt64)] = []
        var next: UInt64? = 0
        var holds = 0
        while let from = next {
            let slice = sliced.reserveFreePagesForPunching(fromPage: from, pageCount: 37)
            pieces += slice.punches
            next = slice.nextPage
            holds += 1
        }
        #expect(holds > 10)
        func pages(_ runs: [(offset: UInt64, length: UInt64)]) -> Set<UInt64> {
            Set(runs.flatMap { r in (r.offset / 4096..<(r.offset + r.length) / 4096).map { $0 } })
        }
        #expect(!once.punches.isEmpty)
        #expect(pages(pieces) == pages(once.punches))
        #expect(sliced.usedSectors == whole.usedSectors)
        // Nothing already punched is taken again.
        var fresh = scattered()
        let firstGC = fresh.reserveFreePagesForPunching().punches
        fresh.finishPunches(firstGC)
        #expect(fresh.reserveFreePagesForPunching().punches.isEmpty)
    }

    /// The allocator keeps the sector-map leaf it read last. A store-like driver installs the
    /// allocated chunks in a sector map of its own (through `sectorMapWordChanged`, as
    /// `Store.setSectors` does), frees chunks (map bits cleared, then `deferFree`), flushes
    /// (`takeDeferred` + `release`), and leaves some allocations uninstalled for a while; a
    /// model of every sector held (live chunks, installs pending, frees not yet released) checks
    /// that no allocation takes a held sector. A remembered leaf that missed a change would
    /// hand out the sectors of a chunk installed after it was read.
    @Test func theRememberedSectorMapLeafFollowsEveryChangeSoNoSectorIsHandedOutTwice() {
        final class SectorMap {
            var leaves: [UInt64: [UInt64]] = [:]
        }
        let map = SectorMap()
        let perLeaf = SpaceAllocator.wordsPerLeaf
        var space = SpaceAllocator(endSector: 0, usedSectors: 0) { k in map.leaves[k] ?? [] }
        func setSectors(_ sector: UInt64, _ count: Int, inUse: Bool) {
            var s = sector
            while s < sector + UInt64(count) {
                let w = s >> 6, k = w / UInt64(perLeaf), i = Int(w % UInt64(perLeaf))
                if map.leaves[k] == nil { map.leaves[k] = Array(repeating: 0, count: perLeaf) }
                let bit = UInt64(1) << (s & 63)
                precondition((map.leaves[k]![i] & bit != 0) != inUse, "the driver's map is out of step")
                map.leaves[k]![i] ^= bit
                space.sectorMapWordChanged(w, to: map.leaves[k]![i])
                s += 1
            }
        }
        var g = SplitMix64(seed: 1415)
        var held = Set<UInt64>()
        var installed: [(sector: UInt64, count: Int)] = []
        var pending: [(sector: UInt64, count: Int)] = []
        var freedByFlush: [(sector: UInt64, count: Int)] = []
        var reused = 0, handedOutTwice = 0
        for _ in 0..<60_000 {
            switch g.next() % 100 {
            case 0..<50:
                let count = Int(g.next() % 12) + 1
                let s = space.allocate(count)
                if s + UInt64(count) < space.endSector { reused += 1 }
                for k in s..<s + UInt64(count) where !held.insert(k).inserted { handedOutTwice += 1 }
                pending.append((s, count))
            case 50..<75:
                // Records applied, in a random order of the allocations in flight.
                while !pending.isEmpty && g.next() % 4 != 0 {
                    let c = pending.remove(at: Int(g.next() % UInt64(pending.count)))
                    setSectors(c.sector, c.count, inUse: true)
                    space.noteInstalled(c.sector, count: c.count)
                    installed.append(c)
                }
            case 75..<98:
                guard !installed.isEmpty else { continue }
                let c = installed.remove(at: Int(g.next() % UInt64(installed.count)))
                setSectors(c.sector, c.count, inUse: false)
                space.deferFree(c.sector, count: c.count)
            default:
                let frees = space.takeDeferred()
                _ = space.release(frees, punchRunBytesMin: 1 << 30)
                for f in frees { for k in f.sector..<f.sector + UInt64(f.count) { held.remove(k) } }
                freedByFlush += frees
            }
            if handedOutTwice > 0 { break }
        }
        #expect(handedOutTwice == 0, "an allocation took sectors still held")
        #expect(reused > 1000, "allocations reused freed space (\(reused))")
        #expect(map.leaves.count >= 2, "the sectors span several sector-map leaves")
        #expect(space.usedSectors == UInt64(held.count))
        #expect(!freedByFlush.isEmpty)
    }
}
