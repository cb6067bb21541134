import CXXHash

/// The 128-bit content address of a block: XXH3-128 of its bytes, seeded with a per-store secret.
///
/// A hash match is only a *candidate* for sharing: the store compares bytes before it merges two
/// blocks (docs/INVARIANTS.md 2), so a collision can never merge different contents.
public struct ContentHash: Hashable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    @inlinable
    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    public static let zero = ContentHash(high: 0, low: 0)

    public var description: String {
        let h = String(high, radix: 16), l = String(low, radix: 16)
        return String(repeating: "0", count: 16 - h.count) + h + String(repeating: "0", count: 16 - l.count) + l
    }
}

/// How block contents are hashed. Production uses full XXH3-128; tests inject a deliberately weak
/// hash (a few bits) so that collisions happen constantly and verify-before-share is exercised.
public enum HashFunction: Sendable, Equatable {
    /// Seeded XXH3-128 through libxxhash's run-time dispatch (AVX2/AVX-512 where present).
    case xxh3
    /// XXH3-128 truncated to `bits` bits (1...64). For collision tests only.
    case weak(bits: Int)

    @inlinable
    public func hash(_ bytes: UnsafeRawBufferPointer, seed: UInt64) -> ContentHash {
        let full = XXH3_128bits_withSeed_dispatch(bytes.baseAddress, bytes.count, seed)
        switch self {
        case .xxh3:
            return ContentHash(high: full.high64, low: full.low64)
        case .weak(let bits):
            precondition(bits >= 1 && bits <= 64)
            let mask: UInt64 = bits == 64 ? ~0 : (UInt64(1) << UInt64(bits)) - 1
            return ContentHash(high: 0, low: full.low64 & mask)
        }
    }
}

/// A 64-bit checksum for metadata records (journal, checkpoints, superblocks).
@inlinable
public func metadataChecksum(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    XXH3_64bits_dispatch(bytes.baseAddress, bytes.count)
}

@inlinable
public func metadataChecksum(_ bytes: [UInt8]) -> UInt64 {
    bytes.withUnsafeBytes { metadataChecksum($0) }
}
