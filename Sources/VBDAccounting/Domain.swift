/// The tenant a request is charged to: the identity the server knows a client by.
///
/// A TLS client certificate subject when the client presented one, otherwise the domain an
/// export is bound to (see ``DomainResolver``). Plain strings keep it printable in the ledger,
/// the audit log and `vbdtool stats` without a lookup table.
public struct DomainID: Hashable, Comparable, Sendable, Codable, CustomStringConvertible, ExpressibleByStringLiteral {
    public var name: String

    public init(_ name: String) { self.name = name }
    public init(stringLiteral value: String) { self.name = value }

    /// Connections nobody bound to a domain are charged here, so every request is charged somewhere.
    public static let anonymous = DomainID("anonymous")

    public var description: String { name }
    public static func < (lhs: DomainID, rhs: DomainID) -> Bool { lhs.name < rhs.name }

    public init(from decoder: any Decoder) throws {
        name = try decoder.singleValueContainer().decode(String.self)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(name)
    }
}

/// Decides which domain a connection belongs to.
///
/// A verified TLS client certificate is the stronger identity, so it wins: a tenant holding a
/// certificate cannot borrow another domain's budget by opening that domain's export. Plain
/// connections fall back to the export-to-domain binding table, and to ``DomainID/anonymous``.
public struct DomainResolver: Sendable, Equatable {
    /// Export (volume or snapshot) name -> domain, for plain connections.
    public var bindings: [String: DomainID]
    /// Domain of plain connections to unbound exports.
    public var defaultDomain: DomainID
    /// Certificate subject -> domain; subjects not listed become domains of their own name.
    public var certificateDomains: [String: DomainID]

    public init(bindings: [String: DomainID] = [:], defaultDomain: DomainID = .anonymous,
                certificateDomains: [String: DomainID] = [:]) {
        self.bindings = bindings
        self.defaultDomain = defaultDomain
        self.certificateDomains = certificateDomains
    }

    public func domain(exportName: String, certificateSubject: String?) -> DomainID {
        if let subject = certificateSubject, !subject.isEmpty {
            return certificateDomains[subject] ?? DomainID(subject)
        }
        return bindings[exportName] ?? defaultDomain
    }
}
