/// First-in first-out eviction over byte-charged entries: the last-chance tier's policy.
///
/// Why FIFO there: every block in the last-chance tier already lost its place in the main cache, and a
/// hit promotes it back out of this tier (tiers are exclusive), so recency inside the tier carries
/// little signal; FIFO needs no work on lookup and evicts in O(1). Lookups are not accesses.
public struct FIFOPolicy<Value>: CachePolicy {
    public let capacityBytes: Int
    public private(set) var bytesHeld = 0
    private var slab = LinkedSlab<(value: Value, charge: Int)>()
    private var index: [UInt64: Int32] = [:]
    private var queue = LinkedSlab<(value: Value, charge: Int)>.List()

    public init(capacityBytes: Int) {
        precondition(capacityBytes > 0, "cache capacity must be positive")
        self.capacityBytes = capacityBytes
    }

    public var count: Int { index.count }

    public func contains(_ key: UInt64) -> Bool { index[key] != nil }

    public func peek<Result>(_ key: UInt64, _ body: (Value) -> Result) -> Result? {
        guard let slot = index[key] else { return nil }
        return body(slab[slot].value)
    }

    public mutating func lookup<Result>(_ key: UInt64, _ body: (inout Value) -> Result?) -> Result? {
        guard let slot = index[key] else { return nil }
        return body(&slab[slot].value)
    }

    @discardableResult
    public mutating func insert(_ key: UInt64, value: Value, charge: Int, evicted: (UInt64, Value) -> Void) -> Bool {
        precondition(charge > 0, "an entry must be charged at least one byte")
        remove(key)
        guard charge <= capacityBytes else { return false }
        while bytesHeld + charge > capacityBytes {
            let slot = queue.tail
            let key = slab.key(slot)
            slab.unlink(slot, from: &queue)
            index[key] = nil
            let entry = slab.release(slot)
            bytesHeld -= entry.charge
            evicted(key, entry.value)
        }
        let slot = slab.allocate(key: key, payload: (value, charge))
        slab.pushHead(slot, onto: &queue)
        index[key] = slot
        bytesHeld += charge
        return true
    }

    @discardableResult
    public mutating func remove(_ key: UInt64) -> Value? {
        guard let slot = index.removeValue(forKey: key) else { return nil }
        slab.unlink(slot, from: &queue)
        let entry = slab.release(slot)
        bytesHeld -= entry.charge
        return entry.value
    }
}
extension FIFOPolicy: Sendable where Value: Sendable {}
