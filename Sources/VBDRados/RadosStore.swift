import CRados
import Logging
import VBDStore
#if canImport(Glibc)
import Glibc
#endif

/// Where a store lives in a Ceph cluster: a namespace of a pool, reached with a ceph.conf and a
/// cephx user. One namespace holds one store (a volume family, docs/RADOS.md); one server at a
/// time owns it under the exclusive lock of ``RadosDirectory``.
public struct RadosStoreLocation: Sendable, Equatable, CustomStringConvertible {
    public var configurationFile: String
    public var user: String
    public var pool: String
    public var namespace: String

    public init(configurationFile: String, user: String = "admin", pool: String, namespace: String) {
        self.configurationFile = configurationFile
        self.user = user
        self.pool = pool
        self.namespace = namespace
    }

    /// `rados:POOL/NAMESPACE`, as messages and `vbdtool status` name the store.
    public var description: String { "rados:\(pool)/\(namespace)" }
}

/// How a writer gets the store's lock.
public enum RadosOwnership: Sendable, Equatable {
    /// Take the lock if it is free now. A previous holder that did not hand the store over (it
    /// crashed, or hangs, and its lock expired) is still fenced first: its late writes must not
    /// land after ours.
    case acquire
    /// Wait up to `waitingUpTo` seconds for the holder to hand the store over (release its lock)
    /// or for its lock to expire; with `force`, declare the holder dead now: blocklist it and
    /// break its lock.
    case takeOver(waitingUpTo: Double, force: Bool)
}

/// Opens (or creates) a ``Store`` on RADOS: one client connection of its own, so that being
/// fenced (a blocklist entry names a client instance) costs only this store.
public enum RadosStore {
    /// The store's directory, its lock taken as `ownership` says (a read-only store takes the
    /// shared lock, when the `Store` opens). Returns the fenced previous holders' addresses.
    /// `whileWaiting` is called once with the holders when the lock is found taken.
    public static func openDirectory(_ location: RadosStoreLocation, ownership: RadosOwnership, readOnly: Bool,
                                     lockDurationSeconds: Int = 30, operationTimeoutSeconds: Int = 30,
                                     logger: Logger = Logger(label: "vbd.rados"),
                                     onLockLost: @escaping @Sendable (String) -> Void = { _ in },
                                     whileWaiting: ([RadosLockHolder]) -> Void = { _ in })
        throws -> (directory: RadosDirectory, fenced: [String]) {
        var options = RadosConnection.Options(configurationFile: location.configurationFile)
        options.user = location.user
        options.operationTimeoutSeconds = operationTimeoutSeconds
        let connection = try RadosConnection(options)
        let pool: RadosPool
        do { pool = try connection.openPool(location.pool, namespace: location.namespace) } catch {
            connection.close()
            throw error
        }
        let directory = RadosDirectory(pool: pool, lockDurationSeconds: lockDurationSeconds, logger: logger, onLockLost: onLockLost)
        if readOnly { return (directory, []) }
        var wait = 0.0, force = false
        if case let .takeOver(seconds, forced) = ownership {
            wait = seconds
            force = forced
        }
        let fenced: [String]
        do {
            fenced = try directory.takeOver(waitingUpTo: wait, force: force, whileWaiting: whileWaiting)
        } catch {
            guard case .locked = error else { throw error }
            let holders = (try? RadosLock.holders(pool: pool, object: RadosDirectory.lockObject, lockName: RadosLock.ownerLockName)) ?? []
            let who = holders.map { "\($0.client) at \($0.address)" }.joined(separator: ", ")
            throw StoreError.locked("the store \(location) is owned by \(who.isEmpty ? "another server" : who), which keeps renewing its lock" +
                                    (wait > 0 ? " (waited \(wait) s for it to hand the store over)" : ""))
        }
        return (directory, fenced)
    }

    /// Opens the store at `location` (creates it with `create`). The `Store` owns the directory:
    /// closing the store releases the lock (unless it was lost), and the connection goes with the
    /// last reference to the store.
    ///
    /// `sharingDomain`: a store created with one hashes with the domain's secret, kept in the
    /// pool's chunk namespace (``RadosSharingDomain``), so that every family of the domain derives
    /// the same hash seeds, and records the domain in the object `sharing-domain` of its namespace.
    /// Every open of a store that records a domain checks that the store hashes with that domain's
    /// secret; an open that names a domain refuses a store of another domain or of none.
    ///
    /// The chunks of a store of a sharing domain are shared objects in the pool's chunk namespace
    /// (``RadosChunkStorage``, family = the store's namespace, its serials in the object
    /// `chunk-serials` of that namespace), reached through the store's own client so that
    /// fencing the owner fences its chunk writes and releases too; the metadata (superblock,
    /// `meta`, journals) stays in the store's namespace. A store of no domain keeps its chunks in
    /// its striped data file there, as before.
    public static func open(_ location: RadosStoreLocation, options: Store.Options, create: Bool,
                            sharingDomain: String? = nil,
                            ownership: RadosOwnership = .acquire, lockDurationSeconds: Int = 30,
                            logger: Logger = Logger(label: "vbd.rados"),
                            onLockLost: @escaping @Sendable (String) -> Void = { _ in },
                            whileWaiting: ([RadosLockHolder]) -> Void = { _ in })
        throws -> (store: Store, fenced: [String]) {
        let (directory, fenced) = try openDirectory(location, ownership: ownership, readOnly: options.readOnly,
                                                    lockDurationSeconds: lockDurationSeconds, logger: logger, onLockLost: onLockLost,
                                                    whileWaiting: whileWaiting)
        var options = options
        let recorded: String?
        do {
            recorded = try recordedSharingDomain(directory.pool)
            if create, let sharingDomain {
                let secret = try domainSecret(sharingDomain, beside: directory.pool)
                options.secretForNewStore = secret
                options.chunkStorage = try chunkStorage(domain: sharingDomain, secret: secret, family: directory)
            } else if !create, let sharingDomain, recorded != sharingDomain {
                throw StoreError.io("the store \(location) is not in sharing domain \(sharingDomain): "
                                    + (recorded.map { "it is in \($0)" } ?? "it was created in none"))
            } else if !create, let recorded {
                // Checked against the store's own secret below, once it is open.
                options.chunkStorage = try chunkStorage(domain: recorded, secret: try domainSecret(recorded, beside: directory.pool),
                                                        family: directory)
            }
        } catch {
            directory.unlock()
            throw error
        }
        let store: Store
        do {
            store = try Store(directory: directory, options: options, create: create)
        } catch StoreError.notInitialized {
            throw StoreError.notInitialized(path: location.description)
        }
        do {
            if create, let sharingDomain {
                // After the store: a create that failed (the store existed) must not change its record.
                try directory.pool.writeFull(sharingDomainObject, Array(sharingDomain.utf8))
            } else if create, recorded != nil {
                // Left by a store that was deleted from this namespace: not this store's domain.
                try directory.pool.remove(sharingDomainObject)
            } else if let recorded, !store.hashesWithSecret(try domainSecret(recorded, beside: directory.pool)) {
                throw StoreError.io("the store \(location) records sharing domain \(recorded) but does not hash with its secret: "
                                    + "its chunks would never be shared and its hashes not be comparable with the domain's")
            }
            // A previous owner that did not hand over (killed, hung) may have left references
            // no durable record claims: chunks of writes it never flushed, puts it never ran.
            // Released before the store serves anything, so no write of ours is in flight.
            if !fenced.isEmpty, !options.readOnly, let chunks = options.chunkStorage as? RadosChunkStorage {
                let released = try chunks.sweep(owner: directory, claimed: store.installedChunkPlaces())
                if !released.isEmpty {
                    logger.notice("released \(released.count) chunk references the previous owner left unclaimed",
                                  metadata: ["store": "\(location)"])
                }
            }
        } catch {
            try? store.close()
            throw error
        }
        return (store, fenced)
    }

    /// The object in a store's namespace that names the sharing domain it was created in.
    public static let sharingDomainObject = "sharing-domain"

    /// The sharing domain a store's namespace records; nil for a store created in none.
    public static func recordedSharingDomain(_ pool: RadosPool) throws -> String? {
        do {
            let bytes = try pool.readAll(sharingDomainObject)
            let name = String(decoding: bytes, as: UTF8.self)
            guard RadosChunkObjects.isValidIdentifier(name) else {
                throw RadosChunkError.corrupt(object: pool.describe(sharingDomainObject), detail: "not a sharing domain's name")
            }
            return name
        } catch let error as RadosError where error.code == ENOENT {
            return nil
        }
    }

    /// The chunk storage of the family whose directory `family` is, in `domain`: the chunk
    /// namespace through the family's own client, its serials in the family's namespace, and the
    /// directory as the owner `gc`'s leak sweep judges for (a read-only store's holds no lock, so
    /// its sweep is refused).
    static func chunkStorage(domain: String, secret: UInt64, family: RadosDirectory) throws -> RadosChunkStorage {
        let chunks = try family.pool.connection.openPool(family.pool.pool, namespace: RadosChunkStorage.chunkNamespace)
        return try RadosChunkStorage(pool: chunks, domain: domain, family: family.pool.namespace,
                                     seedForGroup: { Store.hashSeed(secret: secret, group: $0) },
                                     serials: try RadosChunkSerials(pool: family.pool), owner: family)
    }

    /// A domain's secret, kept in the chunk namespace of the pool that `storePool` is in.
    static func domainSecret(_ domain: String, beside storePool: RadosPool) throws -> UInt64 {
        let chunks = try storePool.connection.openPool(storePool.pool, namespace: RadosChunkStorage.chunkNamespace)
        defer { chunks.close() }
        return try RadosSharingDomain.secret(pool: chunks, domain: domain)
    }
}
