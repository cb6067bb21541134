/// Plain least-recently-used eviction over byte-charged entries: the baseline S3-FIFO is measured
/// against (docs/CACHE.md). A hit moves the entry to the head; eviction takes the tail.
public struct LRUPolicy<Value>: CachePolicy {
    public let capacityBytes: Int
    public private(set) var bytesHeld = 0
    private var slab = LinkedSlab<(value: Value, charge: Int)>()
    private var index: [UInt64: Int32] = [:]
    private var recency = LinkedSlab<(value: Value, charge: Int)>.List()

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
        guard let result = body(&slab[slot].value) else { return nil }
        slab.unlink(slot, from: &recency)
        slab.pushHead(slot, onto: &recency)
        return result
    }

    @discardableResult
    public mutating func insert(_ key: UInt64, value: Value, charge: Int, evicted: (UInt64, Value) -> Void) -> Bool {
        precondition(charge > 0, "an entry must be charged at least one byte")
        remove(key)
        guard charge <= capacityBytes else { return false }
        while bytesHeld + charge > capacityBytes {
            let slot = recency.tail
            let key = slab.key(slot)
            slab.unlink(slot, from: &recency)
            index[key] = nil
            let entry = slab.release(slot)
            bytesHeld -= entry.charge
            evicted(key, entry.value)
        }
        let slot = slab.allocate(key: key, payload: (value, charge))
        slab.pushHead(slot, onto: &recency)
        index[key] = slot
        bytesHeld += charge
        return true
    }

    @discardableResult
    public mutating func remove(_ key: UInt64) -> Value? {
        guard let slot = index.removeValue(forKey: key) else { return nil }
        slab.unlink(slot, from: &recency)
        let entry = slab.release(slot)
        bytesHeld -= entry.charge
        return entry.value
    }
}
extension LRUPolicy: Sendable where Value: Sendable {}
