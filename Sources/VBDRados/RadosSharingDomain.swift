import CRados
#if canImport(Glibc)
import Glibc
#endif

/// A sharing domain: the families (stores) of a pool that may share chunk objects
/// (docs/RADOS.md, "Chunks as shared objects inside the store"). They must hash alike, so they are
/// all created with the domain's secret instead of one of their own (the store derives every
/// sharing group's hash seed from its secret).
///
/// The secret lives in the pool, in the object `domain.<name>` of the namespace given (the chunk
/// namespace): the first caller creates it from the system's CSPRNG in one create-exclusive write,
/// every later caller (on any host) reads that one. A tenant who could read it could engineer
/// hash collisions (verify-before-share still keeps their contents apart, at a cost), so only
/// vbd's cephx user should be able to read that namespace.
public enum RadosSharingDomain {
    static let format = "vbd-sharing-domain-secret 1"

    static func object(_ domain: String) -> String { "domain." + domain }

    /// Writes the object if it does not exist yet; false when it did.
    private static func create(pool: RadosPool, name: String, text: [UInt8]) throws(RadosError) -> Bool {
        do {
            try pool.operate(name) { op in
                op.createExclusive()
                text.withUnsafeBytes { bytes in op.writeFull(bytes) }
            }
            return true
        } catch {
            if error.code == EEXIST { return false }
            throw error
        }
    }

    /// The domain's secret, created on first use.
    public static func secret(pool: RadosPool, domain: String) throws -> UInt64 {
        guard RadosChunkObjects.isValidIdentifier(domain) else { throw RadosChunkError.invalidIdentifier(domain) }
        let name = object(domain)
        var random = SystemRandomNumberGenerator()
        let candidate = random.next() as UInt64 | 1
        let text = Array("\(format)\n\(String(candidate, radix: 16))\n".utf8)
        if try create(pool: pool, name: name, text: text) { return candidate }
        // Another host created it first (or long ago): theirs is the domain's.
        let stored = try pool.readAll(name)
        let lines = String(decoding: stored, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        guard lines.count >= 2, lines[0] == format, let secret = UInt64(lines[1], radix: 16), secret != 0 else {
            throw RadosChunkError.corrupt(object: pool.describe(name),
                                          detail: "not a sharing domain's secret (\(stored.count) bytes); it is never replaced, since the domain's chunks are named with it")
        }
        return secret
    }
}
