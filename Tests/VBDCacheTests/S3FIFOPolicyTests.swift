import VBDCore
import Testing
import VBDCache

@Suite struct S3FIFOPolicyTests {
    @Test(arguments: [1 as UInt64, 2, 3, 4])
    func matchesDictionaryModel(seed: UInt64) {
        var policy = S3FIFOPolicy<UInt64>(capacityBytes: 64 * 1024, ghostEntriesMax: 32)
        checkAgainstDictionaryModel(&policy, seed: seed) { $0.checkInvariants() }
    }

    @Test func entryLargerThanCapacityIsNotInserted() {
        var policy = S3FIFOPolicy<Int>(capacityBytes: 1000)
        let smallFits = policy.insert(1, value: 1, charge: 400)
        let tooLargeFits = policy.insert(2, value: 2, charge: 1001)
        #expect(smallFits)
        #expect(!tooLargeFits)
        #expect(!policy.contains(2))
        #expect(policy.contains(1))
        #expect(policy.bytesHeld == 400)
    }

    @Test func sequentialScanLeavesHotSetInPlace() {
        let capacity = 100 * 4096
        var s3fifo = S3FIFOPolicy<Void>(capacityBytes: capacity)
        var lru = LRUPolicy<Void>(capacityBytes: capacity)
        let hot = (0..<50).map { UInt64($0) }
        for _ in 0..<3 {
            for key in hot {
                if !s3fifo.touch(key) { s3fifo.insert(key, value: (), charge: 4096) }
                if !lru.touch(key) { lru.insert(key, value: (), charge: 4096) }
            }
        }
        for key in 1000..<2000 as Range<UInt64> {       // a scan of 10x the capacity, each block read once
            if !s3fifo.touch(key) { s3fifo.insert(key, value: (), charge: 4096) }
            if !lru.touch(key) { lru.insert(key, value: (), charge: 4096) }
        }
        #expect(hot.allSatisfy { s3fifo.contains($0) }, "S3-FIFO lost hot blocks to a scan")
        #expect(hot.allSatisfy { !lru.contains($0) }, "LRU is expected to lose the hot set (baseline sanity)")
        #expect(s3fifo.checkInvariants() == nil)
    }

    /// Ten 100-byte entries fit; the eleventh insert pushes the oldest unread one (key 7) out of S.
    func policyWithKey7InGhost() -> S3FIFOPolicy<Void> {
        var policy = S3FIFOPolicy<Void>(capacityBytes: 10 * 100)
        policy.insert(7, value: (), charge: 100)
        for key in 100..<110 as Range<UInt64> { policy.insert(key, value: (), charge: 100) }
        return policy
    }

    @Test func keyReturningFromGhostGoesStraightToMain() {
        var policy = policyWithKey7InGhost()
        #expect(!policy.contains(7) && policy.ghostContains(7))
        let mainBefore = policy.mainBytes
        policy.insert(7, value: (), charge: 100)
        #expect(policy.mainBytes == mainBefore + 100, "a ghost hit must be inserted into main")
        #expect(!policy.ghostContains(7))
        #expect(policy.checkInvariants() == nil)
    }

    @Test func removeForgetsGhostKeyToo() {
        var policy = policyWithKey7InGhost()
        #expect(policy.ghostContains(7))
        policy.remove(7)          // the store freed chunk 7: its key may now name new content
        #expect(!policy.ghostContains(7))
        let mainBefore = policy.mainBytes
        policy.insert(7, value: (), charge: 100)
        #expect(policy.mainBytes == mainBefore, "a reused key must start in S, not inherit the ghost hit")
    }

    @Test func ghostMemoryIsBounded() {
        var policy = S3FIFOPolicy<Void>(capacityBytes: 100 * 100, ghostEntriesMax: 20)
        for key in 0..<10_000 as Range<UInt64> { policy.insert(key, value: (), charge: 100) }
        #expect(policy.ghostCount <= 20)
        #expect(policy.checkInvariants() == nil)
    }
}

@Suite struct BaselinePolicyTests {
    @Test(arguments: [5 as UInt64, 6])
    func lruMatchesDictionaryModel(seed: UInt64) {
        var policy = LRUPolicy<UInt64>(capacityBytes: 64 * 1024)
        checkAgainstDictionaryModel(&policy, seed: seed)
    }

    @Test(arguments: [7 as UInt64, 8])
    func fifoMatchesDictionaryModel(seed: UInt64) {
        var policy = FIFOPolicy<UInt64>(capacityBytes: 64 * 1024)
        checkAgainstDictionaryModel(&policy, seed: seed)
    }

    @Test func lruEvictsLeastRecentlyUsed() {
        var lru = LRUPolicy<Int>(capacityBytes: 300)
        lru.insert(1, value: 1, charge: 100)
        lru.insert(2, value: 2, charge: 100)
        lru.insert(3, value: 3, charge: 100)
        let touched = lru.touch(1)
        #expect(touched)
        var evicted: [UInt64] = []
        lru.insert(4, value: 4, charge: 100) { key, _ in evicted.append(key) }
        #expect(evicted == [2])
        #expect(lru.bytesHeld == 300)
    }

    @Test func fifoIgnoresAccessesAndEvictsOldest() {
        var fifo = FIFOPolicy<Int>(capacityBytes: 300)
        fifo.insert(1, value: 1, charge: 100)
        fifo.insert(2, value: 2, charge: 100)
        fifo.insert(3, value: 3, charge: 100)
        let touched = fifo.touch(1)
        #expect(touched)
        var evicted: [UInt64] = []
        fifo.insert(4, value: 4, charge: 150) { key, _ in evicted.append(key) }
        #expect(evicted == [1, 2])
        #expect(fifo.bytesHeld == 250)
        let removed = fifo.remove(3)
        #expect(removed == 3)
        #expect(fifo.bytesHeld == 150)
    }
}

/// Random inserts, lookups and removes against a dictionary model: the policy never returns a value
/// other than the last one inserted for the key, never holds a removed key, holds every key right
/// after inserting it, reports each eviction exactly once with its value, and never exceeds its byte
/// budget. `invariants` (if given) runs every 100 steps and at the end.
func checkAgainstDictionaryModel<Policy: CachePolicy>(
    _ policy: inout Policy, seed: UInt64, invariants: ((Policy) -> String?)? = nil
) where Policy.Value == UInt64 {
    var generator = SplitMix64(seed: seed)
    let capacity = policy.capacityBytes
    var model: [UInt64: UInt64] = [:]       // key -> last value inserted, while possibly held
    var charges: [UInt64: Int] = [:]
    var nextValue: UInt64 = 0
    for step in 0..<4000 {
        let key = generator.next() % 300
        switch generator.next() % 10 {
        case 0..<4:
            nextValue += 1
            let charge = Int(generator.next() % UInt64(capacity / 8)) + 1
            var evicted: [(UInt64, UInt64)] = []
            let inserted = policy.insert(key, value: nextValue, charge: charge) { evicted.append(($0, $1)) }
            #expect(inserted)
            for (evictedKey, value) in evicted {
                #expect(model[evictedKey] == value, "evicted \(evictedKey) with a value never inserted")
                #expect(evictedKey != key)
                #expect(!policy.contains(evictedKey))
                model[evictedKey] = nil
            }
            model[key] = nextValue
            charges[key] = charge
            #expect(policy.contains(key))
        case 4..<8:
            let value = policy.lookup(key) { $0 }
            if let value { #expect(model[key] == value) } else { #expect(!policy.contains(key)) }
            #expect(policy.peek(key) { $0 } == value)
        default:
            let removed = policy.remove(key)
            #expect(removed == model[key])
            model[key] = nil
            #expect(!policy.contains(key))
        }
        #expect(policy.bytesHeld <= capacity)
        #expect(policy.count == model.count, "step \(step): held keys drift from the model")
        #expect(policy.bytesHeld == model.keys.reduce(0) { $0 + charges[$1]! })
        if step % 100 == 0, let invariants { #expect(invariants(policy) == nil) }
    }
    if let invariants { #expect(invariants(policy) == nil) }
}
