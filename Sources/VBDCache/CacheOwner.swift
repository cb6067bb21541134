/// Who a cache operation is on behalf of: a volume and the sharing group it belongs to.
///
/// The group is an isolation boundary. The store gives every group its own chunk keys, so two groups
/// never share a key; the cache still records the group of each entry and refuses a read from another
/// group (counted as ``CacheStatistics/isolationRefusals``), so a store bug cannot turn into a leak.
public struct CacheOwner: Hashable, Sendable, CustomStringConvertible {
    /// The volume the block was read or written through.
    public var volume: UInt64
    /// The sharing group of that volume.
    public var group: SharingGroupID

    public init(volume: UInt64, group: SharingGroupID) {
        self.volume = volume
        self.group = group
    }

    public var description: String { "volume \(volume) (\(group))" }
}
