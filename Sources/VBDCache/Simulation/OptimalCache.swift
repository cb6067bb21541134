/// Belady's MIN (1966): on a miss with a full cache, evict the block whose next use is furthest in the
/// future. For equal-size blocks it gives the most hits any demand-fetching cache can get on a known
/// request sequence, so it bounds every policy from above (a test asserts that it does).
public enum OptimalCache {
    /// Hits of MIN holding `capacityEntries` equal-size blocks: `hits` over all requests (the bound) and
    /// `readHits` over reads only (what the tables report). Writes load their block like a read miss.
    public static func hits(_ requests: [CacheRequest], capacityEntries: Int) -> (hits: Int, readHits: Int) {
        precondition(capacityEntries > 0)
        let never = Int.max
        var nextUse = [Int](repeating: never, count: requests.count)
        var seen: [UInt64: Int] = [:]
        for position in stride(from: requests.count - 1, through: 0, by: -1) {
            nextUse[position] = seen[requests[position].key] ?? never
            seen[requests[position].key] = position
        }
        seen = [:]
        var held: [UInt64: Int] = [:]       // key -> its next use
        var heap = MaxHeap()                // (next use, key); stale pairs are skipped when popped
        var hits = 0, readHits = 0
        for (position, request) in requests.enumerated() {
            if held[request.key] != nil {
                hits += 1
                if !request.isWrite { readHits += 1 }
            } else if held.count == capacityEntries {
                while true {
                    let (use, key) = heap.pop()!
                    if held[key] == use {
                        held[key] = nil
                        break
                    }
                }
            }
            held[request.key] = nextUse[position]
            heap.push((nextUse[position], request.key))
            if heap.count > 4 * capacityEntries + 64 { heap.compact(keeping: held) }
        }
        return (hits, readHits)
    }

    private struct MaxHeap {
        private var items: [(Int, UInt64)] = []
        var count: Int { items.count }

        mutating func push(_ item: (Int, UInt64)) {
            items.append(item)
            var child = items.count - 1
            while child > 0 {
                let parent = (child - 1) / 2
                guard items[parent].0 < items[child].0 else { break }
                items.swapAt(parent, child)
                child = parent
            }
        }

        mutating func pop() -> (Int, UInt64)? {
            guard !items.isEmpty else { return nil }
            items.swapAt(0, items.count - 1)
            let top = items.removeLast()
            var parent = 0
            while true {
                let left = 2 * parent + 1, right = left + 1
                var largest = parent
                if left < items.count, items[left].0 > items[largest].0 { largest = left }
                if right < items.count, items[right].0 > items[largest].0 { largest = right }
                if largest == parent { break }
                items.swapAt(parent, largest)
                parent = largest
            }
            return top
        }

        /// Rebuilds from the live pairs only, bounding memory by the capacity.
        mutating func compact(keeping held: [UInt64: Int]) {
            let live = held.map { ($0.value, $0.key) }
            items = []
            for item in live { push(item) }
        }
    }
}
