/// Storage charged to each domain, from the store's per-image fair shares.
///
/// The store splits every chunk's stored bytes evenly among the blocks that hold it
/// (`ImageUsage.fairStoredBytes`), so shares over all images add up to the bytes on disk. This
/// folds images into their owning domains; unowned images are charged to `unownedDomain` so the
/// total still adds up, and nothing stored escapes the bill.
public struct StorageShare: Equatable, Sendable, Codable {
    /// Sum of the fair shares of the domain's images.
    public var fairStoredBytes: Double = 0
    /// Stored bytes no other image holds.
    public var exclusiveStoredBytes: UInt64 = 0
    public var images: [String] = []

    public init() {}
}

/// One image's figures, as `Store.usage()` reports them (kept as a plain input so this module
/// does not depend on the store).
public struct ImageShareInput: Equatable, Sendable {
    public var name: String
    public var fairStoredBytes: Double
    public var exclusiveStoredBytes: UInt64

    public init(name: String, fairStoredBytes: Double, exclusiveStoredBytes: UInt64) {
        self.name = name
        self.fairStoredBytes = fairStoredBytes
        self.exclusiveStoredBytes = exclusiveStoredBytes
    }
}

public enum StorageShares {
    public static func perDomain(images: [ImageShareInput], owner: (String) -> DomainID?,
                                 unownedDomain: DomainID = .anonymous) -> [DomainID: StorageShare] {
        var result: [DomainID: StorageShare] = [:]
        for image in images {
            let domain = owner(image.name) ?? unownedDomain
            result[domain, default: StorageShare()].fairStoredBytes += image.fairStoredBytes
            result[domain, default: StorageShare()].exclusiveStoredBytes += image.exclusiveStoredBytes
            result[domain, default: StorageShare()].images.append(image.name)
        }
        return result
    }
}
