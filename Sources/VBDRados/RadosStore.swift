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
    public static func open(_ location: RadosStoreLocation, options: Store.Options, create: Bool,
                            ownership: RadosOwnership = .acquire, lockDurationSeconds: Int = 30,
                            logger: Logger = Logger(label: "vbd.rados"),
                            onLockLost: @escaping @Sendable (String) -> Void = { _ in },
                            whileWaiting: ([RadosLockHolder]) -> Void = { _ in })
        throws -> (store: Store, fenced: [String]) {
        let (directory, fenced) = try openDirectory(location, ownership: ownership, readOnly: options.readOnly,
                                                    lockDurationSeconds: lockDurationSeconds, logger: logger, onLockLost: onLockLost,
                                                    whileWaiting: whileWaiting)
        do {
            return (try Store(directory: directory, options: options, create: create), fenced)
        } catch StoreError.notInitialized {
            throw StoreError.notInitialized(path: location.description)
        }
    }
}
