import VBDCore
import Foundation
import VBDCache

/// Deterministic block contents for a key: compressible (a repeated byte with the key in front) or
/// incompressible (SplitMix64 words). Word-sized writes keep debug builds fast.
func blockBytes(for key: UInt64, count: Int = 4096, compressible: Bool = true) -> [UInt8] {
    var bytes = [UInt8](repeating: compressible ? UInt8(truncatingIfNeeded: key &* 31 &+ 7) : 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        if compressible {
            raw.storeBytes(of: key.littleEndian, toByteOffset: 0, as: UInt64.self)
        } else {
            var generator = SplitMix64(seed: key)
            for offset in stride(from: 0, to: count - 7, by: 8) {
                raw.storeBytes(of: generator.next(), toByteOffset: offset, as: UInt64.self)
            }
        }
    }
    return bytes
}

extension BlockCache {
    func insert(_ key: UInt64, _ bytes: [UInt8], owner: CacheOwner) {
        bytes.withUnsafeBytes { insert(key, bytes: $0, owner: owner) }
    }

    /// Reads `count` bytes for `key`; nil on a miss.
    func read(_ key: UInt64, count: Int = 4096, owner: CacheOwner) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: count)
        let hit = buffer.withUnsafeMutableBytes { read(key, into: $0, owner: owner) }
        return hit ? buffer : nil
    }
}

func loadCommittedTrace() throws -> CacheTrace {
    let url = try #require(Bundle.module.url(forResource: "nbd-clients", withExtension: "vbdtrace", subdirectory: "Traces"))
    return try CacheTrace(bytes: [UInt8](Data(contentsOf: url)))
}

import Testing
