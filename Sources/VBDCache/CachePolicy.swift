/// An eviction policy over 64-bit keys whose entries are charged in bytes.
///
/// A pure value: no locks, no I/O, no clock. ``BlockCache`` wraps one per shard behind a mutex;
/// tests and trace replays drive it directly. Every conforming type keeps `bytesHeld <= capacityBytes`
/// after every call.
public protocol CachePolicy<Value> {
    associatedtype Value

    /// The byte budget: the sum of the charges of the entries held never exceeds it.
    var capacityBytes: Int { get }
    /// The sum of the charges of the entries held now.
    var bytesHeld: Int { get }
    /// Entries held now.
    var count: Int { get }

    /// Looks `key` up and hands its value to `body`. A non-nil result counts as an access (it feeds
    /// the policy's recency or frequency); a nil result from `body` means "not usable", is not
    /// counted, and is returned as nil.
    mutating func lookup<Result>(_ key: UInt64, _ body: (inout Value) -> Result?) -> Result?

    /// Hands the value held for `key` to `body` without counting an access.
    func peek<Result>(_ key: UInt64, _ body: (Value) -> Result) -> Result?

    /// True if `key` is held. Not an access.
    func contains(_ key: UInt64) -> Bool

    /// Inserts `key` charged `charge` bytes, evicting entries as needed and handing each evicted
    /// entry to `evicted`. An entry already held is replaced (not reported as evicted); where it goes
    /// is the policy's choice.
    /// - Returns: false, inserting nothing, when `charge` exceeds ``capacityBytes``.
    @discardableResult
    mutating func insert(_ key: UInt64, value: Value, charge: Int, evicted: (UInt64, Value) -> Void) -> Bool

    /// Removes `key`; returns its value if it was held. Not an eviction.
    @discardableResult
    mutating func remove(_ key: UInt64) -> Value?
}

extension CachePolicy {
    /// Records an access to `key`; true on a hit.
    public mutating func touch(_ key: UInt64) -> Bool {
        lookup(key) { _ in () } != nil
    }

    @discardableResult
    public mutating func insert(_ key: UInt64, value: Value, charge: Int) -> Bool {
        insert(key, value: value, charge: charge, evicted: { _, _ in })
    }
}
