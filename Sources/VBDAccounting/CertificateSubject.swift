/// An X.509 subject as structure: relative distinguished names, each a set of (attribute type,
/// value) pairs, compared exactly. The NBD server builds one from the certificate swift-certificates
/// parsed; an operator writes one in RFC 4514 text (`CN=tenant-b,O=tenants`), parsed here.
///
/// Two subjects are equal only when every attribute's type and text are equal, in the same place:
/// `O=tenants\,CN=tenant-b` (one organisation whose name contains a comma) never equals
/// `CN=tenant-b,O=tenants`. The ASN.1 string type (UTF8String, PrintableString...) is not compared:
/// the text is what a certificate authority vouches for.
public struct CertificateSubject: Hashable, Sendable, CustomStringConvertible {
    public struct Attribute: Hashable, Sendable {
        /// The attribute type as a dotted object identifier, e.g. "2.5.4.3" for CN.
        public var type: String
        public var value: String

        public init(type: String, value: String) {
            self.type = type
            self.value = value
        }
    }

    /// In RFC 4514 order (most specific first: the reverse of the certificate's DER order); the
    /// attributes of one multi-valued name sorted, since a set has no order.
    public private(set) var names: [[Attribute]]

    /// `certificateOrder`: as the certificate's DER lists them (least specific first).
    public init(certificateOrder names: [[Attribute]]) {
        self.names = names.reversed().map(Self.normalised)
    }

    public init(rfc4514Order names: [[Attribute]]) {
        self.names = names.map(Self.normalised)
    }

    private static func normalised(_ name: [Attribute]) -> [Attribute] {
        name.sorted { ($0.type, $0.value) < ($1.type, $1.value) }
    }

    /// Short names of the common attribute types (RFC 4514 section 3, plus emailAddress).
    static let shortNames: [(name: String, oid: String)] = [
        ("CN", "2.5.4.3"), ("C", "2.5.4.6"), ("L", "2.5.4.7"), ("ST", "2.5.4.8"), ("STREET", "2.5.4.9"),
        ("O", "2.5.4.10"), ("OU", "2.5.4.11"), ("DC", "0.9.2342.19200300.100.1.25"),
        ("UID", "0.9.2342.19200300.100.1.1"), ("emailAddress", "1.2.840.113549.1.9.1"),
    ]

    /// RFC 4514 text: short names where known, special characters escaped.
    public var description: String {
        names.map { name in
            name.map { attribute in
                let key = Self.shortNames.first { $0.oid == attribute.type }?.name ?? attribute.type
                return "\(key)=\(Self.escaped(attribute.value))"
            }.joined(separator: "+")
        }.joined(separator: ",")
    }

    static func escaped(_ value: String) -> String {
        var result = ""
        let characters = Array(value)
        for (index, character) in characters.enumerated() {
            let leading = index == 0 && (character == " " || character == "#")
            let trailing = index == characters.count - 1 && character == " "
            if leading || trailing || ",+\"\\<>;=".contains(character) { result.append("\\") }
            result.append(character)
        }
        return result
    }

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case empty
        case missingEquals(String)
        case unknownAttributeType(String)
        case emptyValue(String)
        case badEscape(String)
        case hexValueUnsupported(String)

        public var description: String {
            switch self {
            case .empty: return "a certificate subject needs at least one attribute, e.g. CN=tenant-a,O=tenants"
            case .missingEquals(let part): return "'\(part)' is not TYPE=VALUE"
            case .unknownAttributeType(let type):
                return "unknown attribute type '\(type)' (use CN, O, OU, C, ST, L, STREET, DC, UID, emailAddress or a dotted OID)"
            case .emptyValue(let type): return "\(type) has an empty value"
            case .badEscape(let text): return "bad escape in '\(text)' (escape , + \" \\ < > ; = with a backslash)"
            case .hexValueUnsupported(let type): return "\(type): #-hex values are not supported"
            }
        }
    }

    /// Parses RFC 4514 text: `,` separates names, `+` the attributes of one name, `\` escapes a
    /// special character (or gives two hex digits of a UTF-8 byte).
    public init(rfc4514 text: String) throws(ParseError) {
        var names: [[Attribute]] = []
        var attributes: [Attribute] = []
        var key = "", value: [UInt8] = [], inValue = false
        let bytes = Array(text.utf8)
        var index = 0
        func finishAttribute() throws(ParseError) {
            let type = key.trimmingSpaces
            guard inValue else { throw .missingEquals(type) }
            guard let oid = Self.oid(for: type) else { throw .unknownAttributeType(type) }
            let text = String(decoding: value, as: UTF8.self)
            guard !text.isEmpty else { throw .emptyValue(type) }
            attributes.append(Attribute(type: oid, value: text))
            key = ""; value = []; inValue = false
        }
        while index < bytes.count {
            let byte = bytes[index]
            if !inValue {
                if byte == UInt8(ascii: "=") {
                    inValue = true
                    if index + 1 < bytes.count, bytes[index + 1] == UInt8(ascii: "#") {
                        throw .hexValueUnsupported(key)
                    }
                } else if byte == UInt8(ascii: ",") || byte == UInt8(ascii: "+") {
                    throw .missingEquals(key)
                } else {
                    key.unicodeScalars.append(UnicodeScalar(byte))
                }
                index += 1
                continue
            }
            switch byte {
            case UInt8(ascii: "\\"):
                guard index + 1 < bytes.count else { throw .badEscape(text) }
                let next = bytes[index + 1]
                if ",+\"\\<>;= #".utf8.contains(next) {
                    value.append(next)
                    index += 2
                } else if index + 2 < bytes.count, let high = Self.hexDigit(next), let low = Self.hexDigit(bytes[index + 2]) {
                    value.append(high << 4 | low)
                    index += 3
                } else {
                    throw .badEscape(text)
                }
            case UInt8(ascii: ","):
                try finishAttribute()
                names.append(attributes)
                attributes = []
                index += 1
            case UInt8(ascii: "+"):
                try finishAttribute()
                index += 1
            case UInt8(ascii: "\""), UInt8(ascii: "<"), UInt8(ascii: ">"), UInt8(ascii: ";"):
                throw .badEscape(text)
            default:
                value.append(byte)
                index += 1
            }
        }
        if key.isEmpty && !inValue && attributes.isEmpty && names.isEmpty { throw .empty }
        try finishAttribute()
        names.append(attributes)
        self.init(rfc4514Order: names)
    }

    static func oid(for type: String) -> String? {
        if let known = shortNames.first(where: { $0.name.lowercased() == type.lowercased() }) { return known.oid }
        let arcs = type.split(separator: ".", omittingEmptySubsequences: false)
        guard arcs.count >= 2, arcs.allSatisfy({ !$0.isEmpty && $0.allSatisfy(\.isNumber) }) else { return nil }
        return type
    }

    private static func hexDigit(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

extension String {
    fileprivate var trimmingSpaces: String {
        var text = Substring(self)
        while text.first == " " { text.removeFirst() }
        while text.last == " " { text.removeLast() }
        return String(text)
    }
}
