import VBDCore

// MARK: - Notes on the design
//
// A domain (``DomainID``) is a tenant: who a request is charged to and who may hold leases. It comes
// only from something the client proved when it connected (``PeerIdentity``):
// - a TLS client certificate the server verified against its CA (`serve --tls-ca`), whose subject
//   is matched structurally (``CertificateSubject``: attribute type and value per relative name,
//   never a joined string, so an attribute value that contains ",CN=..." stays one value);
// - the uid/gid the kernel reports for a unix-socket peer (SO_PEERCRED), mapped by the server's
//   configuration (``UnixPeer``).
// An export binding only narrows: a bound export can be opened only by its domain. It never tells
// the server who a client is. The one exception is explicit: a unix peer the operator maps to
// ``PeerDomain/boundDomain`` (a hypervisor running many tenants' guests as one user) acts for the
// domain each export is bound to, and may open only bound exports.

/// The tenant a request is charged to: the identity the server knows an authenticated client by.
///
/// Plain strings keep it printable in the ledger, the audit log and `vbdtool stats` without a
/// lookup table.
public struct DomainID: Hashable, Comparable, Sendable, Codable, CustomStringConvertible, ExpressibleByStringLiteral {
    public var name: String

    public init(_ name: String) { self.name = name }
    public init(stringLiteral value: String) { self.name = value }

    /// Clients that proved nothing are charged here (only when leases are not enforced, and only
    /// on exports bound to no domain).
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

/// A process at the other end of a unix socket, as the server's configuration names it.
public enum UnixPeer: Hashable, Sendable, CustomStringConvertible {
    case uid(UInt32)
    case gid(UInt32)

    public var description: String {
        switch self {
        case .uid(let uid): return "uid:\(uid)"
        case .gid(let gid): return "gid:\(gid)"
        }
    }

    /// Parses `uid:N` or `gid:N`.
    public init?(_ text: String) {
        let parts = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, let number = UInt32(parts[1]) else { return nil }
        switch parts[0] {
        case "uid": self = .uid(number)
        case "gid": self = .gid(number)
        default: return nil
        }
    }
}

/// What a mapped unix peer acts as.
public enum PeerDomain: Hashable, Sendable, CustomStringConvertible {
    /// Always this domain.
    case domain(DomainID)
    /// The domain of whichever export it opens (bound exports only): a trusted multiplexer such as
    /// a hypervisor running every tenant's guests under one user.
    case boundDomain

    /// The token that names ``boundDomain`` in `serve --peer-domain uid:N=@bound`.
    public static let boundDomainToken = "@bound"

    public init(_ text: String) {
        self = text == Self.boundDomainToken ? .boundDomain : .domain(DomainID(text))
    }

    public var description: String {
        switch self {
        case .domain(let domain): return domain.name
        case .boundDomain: return Self.boundDomainToken
        }
    }
}

/// What a client proved about itself when it connected.
public struct PeerIdentity: Sendable, CustomStringConvertible {
    /// Subject of the TLS client certificate the server verified against its CA (nil: no
    /// certificate, or a server that does not verify client certificates).
    public var certificateSubject: CertificateSubject?
    /// SO_PEERCRED of a unix-socket connection (nil over TCP).
    public var unixCredentials: UnixPeerCredentials?

    public init(certificateSubject: CertificateSubject? = nil, unixCredentials: UnixPeerCredentials? = nil) {
        self.certificateSubject = certificateSubject
        self.unixCredentials = unixCredentials
    }

    public static let unauthenticated = PeerIdentity()

    public var description: String {
        var parts: [String] = []
        if let certificateSubject { parts.append("certificate \(certificateSubject)") }
        if let unixCredentials { parts.append("uid \(unixCredentials.uid) gid \(unixCredentials.gid)") }
        return parts.isEmpty ? "an unauthenticated client" : parts.joined(separator: ", ")
    }
}

/// An export bound to a domain: only that domain may open it. `imageID` is the store's internal id
/// of the image when it was bound, so a binding never applies to a later image of the same name.
public struct ExportBinding: Sendable, Equatable, Codable {
    public var domain: DomainID
    public var imageID: UInt64?

    public init(domain: DomainID, imageID: UInt64? = nil) {
        self.domain = domain
        self.imageID = imageID
    }

    /// Whether the binding still names the image a client opened (ids unknown on either side match).
    public func applies(to imageID: UInt64?) -> Bool {
        guard let bound = self.imageID, let imageID else { return true }
        return bound == imageID
    }

    // Accepts the earlier form, a bare domain name, from state files written before image ids.
    public init(from decoder: any Decoder) throws {
        if let name = try? decoder.singleValueContainer().decode(String.self) {
            self.init(domain: DomainID(name))
            return
        }
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(domain: try container.decode(DomainID.self, forKey: .domain),
                  imageID: try container.decodeIfPresent(UInt64.self, forKey: .imageID))
    }
}

extension ExportBinding: ExpressibleByStringLiteral {
    public init(stringLiteral value: String) { self.init(domain: DomainID(value)) }
}

/// Whether a connection may open an export, and as which domain.
public enum DomainAdmission: Equatable, Sendable {
    case admitted(DomainID)
    case refused(String)
}

/// Decides which domain an authenticated connection belongs to, and whether it may open an export.
public struct DomainResolver: Sendable, Equatable {
    /// Export (volume or snapshot) name -> the only domain that may open it. A volume's binding
    /// covers its snapshots (`VOLUME@NAME`) unless they have their own.
    public var bindings: [String: ExportBinding]
    /// Verified certificate subject -> domain; a verified subject not listed is a domain named by
    /// its RFC 4514 text.
    public var certificateDomains: [CertificateSubject: DomainID]
    /// Unix-socket peers -> domain; a uid entry wins over a gid entry.
    public var unixPeerDomains: [UnixPeer: PeerDomain]

    public init(bindings: [String: ExportBinding] = [:], certificateDomains: [CertificateSubject: DomainID] = [:],
                unixPeerDomains: [UnixPeer: PeerDomain] = [:]) {
        self.bindings = bindings
        self.certificateDomains = certificateDomains
        self.unixPeerDomains = unixPeerDomains
    }

    /// Who `identity` is, or nil when it proved nothing this configuration recognises. A
    /// certificate wins over unix credentials: it names a tenant, a uid names a local user.
    public func authenticate(_ identity: PeerIdentity) -> PeerDomain? {
        // A certificate with an empty subject names nobody (it may identify its holder only by
        // an alternative name, which this server does not map): it proves no domain.
        if let subject = identity.certificateSubject, !subject.names.isEmpty {
            return .domain(certificateDomains[subject] ?? DomainID(subject.description))
        }
        if let credentials = identity.unixCredentials {
            return unixPeerDomains[.uid(credentials.uid)] ?? unixPeerDomains[.gid(credentials.gid)]
        }
        return nil
    }

    /// The binding that governs `export` (its own, else its volume's), if it still names that image.
    public func binding(of export: String, imageID: UInt64?) -> ExportBinding? {
        if let own = bindings[export] { return own.applies(to: imageID) ? own : nil }
        guard let at = export.firstIndex(of: "@") else { return nil }
        // A snapshot has its own image id; its volume's binding is checked by name (rm drops it).
        return bindings[String(export[..<at])]
    }

    /// Whether a client with `identity` may open `export` (the image `imageID`), and as which
    /// domain. `authenticationRequired` (leases enforced) refuses clients that proved nothing.
    public func admission(export: String, imageID: UInt64?, identity: PeerIdentity,
                          authenticationRequired: Bool) -> DomainAdmission {
        let binding = binding(of: export, imageID: imageID)
        switch authenticate(identity) {
        case .domain(let domain)?:
            if let binding, binding.domain != domain {
                return .refused("\(export) is bound to another domain; \(domain) may not open it")
            }
            return .admitted(domain)
        case .boundDomain?:
            guard let binding else {
                return .refused("\(identity.description) acts only for the domain an export is bound to, and \(export) is bound to none")
            }
            return .admitted(binding.domain)
        case nil:
            if authenticationRequired {
                return .refused("\(identity.description) proved no identity: present a client certificate the server's CA signed, or connect over the unix socket as a mapped uid/gid")
            }
            if binding != nil {
                return .refused("\(export) is bound to a domain, and \(identity.description) proved no identity")
            }
            return .admitted(.anonymous)
        }
    }
}
