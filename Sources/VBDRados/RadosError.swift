import CRados
#if canImport(Glibc)
import Glibc
#endif

/// A failed librados call: the operation, the object it concerned and the errno librados returned.
public struct RadosError: Error, Equatable, CustomStringConvertible {
    /// What was attempted, e.g. "write_full vbd/ns/object".
    public var operation: String
    /// The positive errno (librados returns it negated).
    public var code: Int32

    /// EBLOCKLISTED: what an OSD answers a client that was fenced (Ceph defines it as ESHUTDOWN).
    public static let blocklisted = ESHUTDOWN

    public init(_ operation: String, code: Int32) {
        self.operation = operation
        self.code = code < 0 ? -code : code
    }

    public var description: String {
        if isExtentMismatch { return "rados \(operation): compared bytes differ at offset \(code - Self.maxErrno)" }
        let fenced = code == Self.blocklisted ? ", EBLOCKLISTED: this client was fenced" : ""
        return "rados \(operation): \(String(cString: strerror(code))) (errno \(code)\(fenced))"
    }
}
