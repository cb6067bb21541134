import VBDCore

/// Who one front-door connection (NBD, vhost-user-blk) is charged to and which image it serves,
/// and the tenancy checks behind every door: admission when the export opens, the lease before
/// each request, the charge after it. Doors reach them through ``RequestPipeline``.
public struct TenancySession: Sendable, Equatable {
    public var domain: DomainID
    public var volume: String
    /// The store's id of the image opened (nil for devices that are not store images).
    public var imageID: UInt64?

    public init(domain: DomainID, volume: String, imageID: UInt64?) {
        self.domain = domain
        self.volume = volume
        self.imageID = imageID
    }
}

extension TenancyService {
    /// Admits a connection that proved `identity` to `device`: decides its domain (binding,
    /// identity maps), then, when leases are enforced, requires a lease. Returns the session, or
    /// why the connection may not open the device.
    public func openSession(device: any BlockDevice, identity: PeerIdentity) -> Result<TenancySession, TenancyRefusal> {
        let imageID = (device as? any StoreImageDevice)?.imageID
        switch admission(export: device.name, imageID: imageID, identity: identity) {
        case .refused(let reason):
            return .failure(TenancyRefusal(reason: reason))
        case .admitted(let domain):
            guard admits(volume: device.name, imageID: imageID, domain: domain, write: false) else {
                return .failure(TenancyRefusal(reason: "\(domain) holds no lease on \(device.name)"))
            }
            return .success(TenancySession(domain: domain, volume: device.name, imageID: imageID))
        }
    }

    /// Whether the session's lease allows a request of `kind` now (always, without enforced leases).
    public func permits(_ session: TenancySession, _ kind: IOKind) -> Bool {
        admits(volume: session.volume, imageID: session.imageID, domain: session.domain, write: kind.modifies)
    }

    /// Charges and counts one completed request of the session.
    public func charge(_ session: TenancySession, _ kind: IOKind, bytes: UInt64, deviceTime: Duration, failed: Bool,
                       sources: ReadSources = ReadSources()) {
        requestCompleted(domain: session.domain, kind: kind, bytes: bytes, deviceTime: deviceTime, failed: failed,
                         cacheHits: sources.cacheHits, lastChanceHits: sources.lastChanceHits)
    }
}

public struct TenancyRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    public var reason: String
    public var description: String { reason }
}
