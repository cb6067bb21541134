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

    public init(_ operation: String, code: Int32) {
        self.operation = operation
        self.code = code < 0 ? -code : code
    }

    public var description: String {
        if code >= 4095 { return "rados \(operation): compared bytes differ at offset \(code - 4095)" }
        return "rados \(operation): \(String(cString: strerror(code))) (errno \(code))"
    }
}
