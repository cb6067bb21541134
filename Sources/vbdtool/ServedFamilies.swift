import Dispatch
import Foundation
import Logging
import NBDServer
import Synchronization
import VBDAccounting
import VBDCache
import VBDControl
import VBDCore
import VBDRados
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// The RADOS families (stores, one namespace and one lock each) one `vbdtool serve --rados`
/// serves, and their handover between servers (`vbdtool volume move`, docs/RADOS.md "Moving a
/// volume between hosts").
///
/// It is the NBD server's export provider (the union of the families' exports: an export name
/// is unique on a server, a family whose names collide with another's is refused) and the
/// control socket's handler (each request runs in the family it concerns).
///
/// ### Locks
/// `state` guards the list of families, the running move and the status. `naming` is held by
/// every request that brings a new export name (create, share, import, a family taken over),
/// from the check that no other family has that name to the name's creation, so two families
/// never get one name. Neither is held across a wait for NBD connections or another server.
final class ServedFamilies: ExportProvider, ControlRequestHandler, Sendable {
    struct Family: Sendable {
        let name: String
        let location: RadosStoreLocation
        let store: Store
        let cleanPages: CleanPageCache
        let hypervisorDomains: HypervisorDomainTable
    }

    /// How a family is opened (`serve`'s options), for the families given at start and the ones
    /// taken over later.
    struct Opening: Sendable {
        /// Configuration file, user and pool of every family; the namespace is the family's.
        var base: RadosStoreLocation
        var options: Store.Options
        var lockDurationSeconds: Int
        /// A move's target waits at most this long for the source's lock (it was released
        /// before the target is asked, so this only covers a slow cluster).
        var adoptionWaitSeconds: Double = 30
        var onLockLost: @Sendable (_ family: String, _ reason: String) -> Void
    }

    private struct State {
        var families: [Family] = []
        /// The family (or volume) a move runs for: one move at a time per server.
        var moving: String?
        var status: ServerStatus?
        var nbd: NBDServer?
    }

    private let state = Mutex(State())
    private let naming = Mutex(())
    let opening: Opening
    let hostPath: String
    let cache: BlockCache
    let tenancy: TenancyService
    /// Exports served through vhost-user-blk doors and the family `--metrics` reports: set up
    /// once at start, so their families are not moved.
    let pinnedExports: Set<String>
    let pinnedFamily: String?
    /// Tests: seconds a move waits after its checks, before it withdraws the family.
    let moveDelaySeconds: Double
    let logger: Logger

    init(families: [Family], opening: Opening, hostPath: String, cache: BlockCache, tenancy: TenancyService,
         pinnedExports: Set<String> = [], pinnedFamily: String? = nil, moveDelaySeconds: Double = 0, logger: Logger) {
        state.withLock { $0.families = families }
        self.opening = opening
        self.hostPath = hostPath
        self.cache = cache
        self.tenancy = tenancy
        self.pinnedExports = pinnedExports
        self.pinnedFamily = pinnedFamily
        self.moveDelaySeconds = moveDelaySeconds
        self.logger = logger
    }

    /// Opens the family `namespace` (taking its lock as `ownership` says) and logs what the open
    /// did beside it: a previous owner it fenced, the journal replay's warnings. Errors name the family.
    static func open(_ namespace: String, opening: Opening, ownership: RadosOwnership, logger: Logger,
                     whileWaiting: ([RadosLockHolder]) -> Void = { _ in })
        throws(ControlFailure) -> (store: Store, location: RadosStoreLocation, fenced: [String]) {
        var location = opening.base
        location.namespace = namespace
        let onLockLost = opening.onLockLost
        let result = try openRadosStore(location, options: opening.options, create: false, ownership: ownership,
                                        lockDurationSeconds: opening.lockDurationSeconds, logger: logger,
                                        onLockLost: { reason in onLockLost(namespace, reason) }, whileWaiting: whileWaiting)
        if !result.fenced.isEmpty {
            logger.warning("fenced the previous owner (blocklisted in the cluster): it did not hand the family over",
                           metadata: ["store": "\(location)", "blocklisted": "\(result.fenced.joined(separator: ", "))"])
        }
        for warning in result.store.recoveryWarnings { logger.warning("\(warning)", metadata: ["store": "\(location)"]) }
        return (result.store, location, result.fenced)
    }

    /// A family served with this server's cache and tenancy (its clean-page interface).
    static func family(_ store: Store, at location: RadosStoreLocation, cache: BlockCache, tenancy: TenancyService) -> Family {
        let interface = ControlService.cleanPageInterface(cache: cache, store: store, tenancy: tenancy)
        return Family(name: location.namespace, location: location, store: store, cleanPages: interface.cleanPages,
                      hypervisorDomains: interface.hypervisorDomains)
    }

    /// Refuses a family (`name`, `store`) whose export names collide with one of `others`.
    static func checkNamesUnique(_ name: String, _ store: Store, against others: [(name: String, store: Store)]) throws(ControlFailure) {
        let family = (name: name, store: store)
        let names = Set(family.store.list().map(\.name))
        for other in others where other.name != family.name {
            let shared = names.intersection(other.store.list().map(\.name)).sorted()
            if !shared.isEmpty {
                throw ControlFailure(code: "already-exists",
                                     message: "the families \(other.name) and \(family.name) both hold \(shared.joined(separator: ", ")): " +
                                              "export names must be unique on a server, so one server cannot serve both")
            }
        }
    }

    func attach(nbd: NBDServer, status: ServerStatus) {
        state.withLock {
            $0.nbd = nbd
            $0.status = status
        }
    }

    var families: [Family] { state.withLock { $0.families } }
    var familyNames: [String] { families.map(\.name) }

    // MARK: Exports

    func exportList() -> [ExportSummary] {
        families.flatMap { $0.store.exportList() }
    }

    func openExport(named name: String) throws(BlockDeviceError) -> any BlockDevice {
        let served = families
        if name.isEmpty {
            guard served.count == 1 else { throw .gone("this server serves several families: name the export") }
            return try served[0].store.openExport(named: name)
        }
        for family in served {
            if let device = try? family.store.device(named: name) { return device }
        }
        throw .gone("no export named '\(name)'")
    }

    // MARK: Control requests

    func execute(_ envelope: ControlEnvelope, actor: String, progress: @escaping ProgressSink) throws(ControlFailure) -> ControlResult {
        let request = envelope.request
        switch request {
        case .ping:
            guard var status = state.withLock({ $0.status }) else {
                throw ControlFailure(code: "internal", message: "the server is still starting")
            }
            status.families = familyNames
            return .pong(status)
        case let .moveFamily(target, toHost):
            return try move(target, toHost: toHost)
        case let .adoptFamily(pool, namespace):
            return try adopt(pool: pool, namespace: namespace)
        case .list where envelope.family == nil:
            var images: [ImageSummary] = []
            for family in families {
                guard case let .images(some) = try service(family).execute(request, actor: actor, progress: progress) else { continue }
                images += some
            }
            return .images(images)
        case .tenancy where envelope.family == nil && Self.imageNamed(by: request) == nil:
            // Leases, domains and the audit log are the host's, shared by every family.
            guard let first = families.first else { throw ControlFailure(code: "not-found", message: "this server serves no family now") }
            return try service(first).execute(request, actor: actor, progress: progress)
        case .cleanPageAttach, .cleanPageInvalidate(_, nil, nil):
            // A hypervisor domain is attached to (or detached from) every family's clean pages.
            var result = ControlResult.done
            for family in families { result = try service(family).execute(request, actor: actor, progress: progress) }
            return result
        case let .create(name, _, _, _), let .share(_, name), let .importImage(_, name, _, _, _):
            let family = try route(envelope)
            return try naming.withLock { _ throws(ControlFailure) -> ControlResult in
                if let other = families.first(where: { $0.name != family.name && (try? $0.store.info(name)) != nil }) {
                    throw ControlFailure(code: "already-exists",
                                         message: "'\(name)' exists in the family \(other.name) served here: export names must be unique on a server")
                }
                return try service(family).execute(request, actor: actor, progress: progress)
            }
        default:
            return try service(try route(envelope)).execute(request, actor: actor, progress: progress)
        }
    }

    private func service(_ family: Family) -> ControlService {
        ControlService(store: family.store, storePath: hostPath, cache: cache, status: state.withLock { $0.status },
                       cleanPages: family.cleanPages, hypervisorDomains: family.hypervisorDomains, tenancy: tenancy)
    }

    /// The image a request is about, if it names an existing one.
    static func imageNamed(by request: ControlRequest) -> String? {
        switch request {
        case let .info(name), let .remove(name, _), let .resize(name, _), let .diff(name, _), let .exportImage(name, _, _),
             let .cleanPagePut(_, name, _, _), let .cleanPageGet(_, name, _, _), let .forensics(name, _, _):
            return name
        case let .snapshot(target), let .share(target, _):
            return target.split(separator: "@", maxSplits: 1).first.map(String.init)
        case let .cleanPageInvalidate(_, volume, _):
            return volume
        case let .tenancy(.leaseGrant(volume, _, _, _)), let .tenancy(.leaseRenew(volume, _, _)), let .tenancy(.bind(volume, _)):
            return volume
        default:
            return nil
        }
    }

    /// The family a request runs in: the one the client named, else the one holding the image the
    /// request names, else the only one.
    private func route(_ envelope: ControlEnvelope) throws(ControlFailure) -> Family {
        let served = families
        let names = served.map(\.name).joined(separator: ", ")
        if let wanted = envelope.family {
            guard let family = served.first(where: { $0.name == wanted }) else {
                throw ControlFailure(code: "not-found", message: "this server does not serve the family \(wanted) (it serves: \(names.isEmpty ? "none" : names))")
            }
            return family
        }
        let image = Self.imageNamed(by: envelope.request)
        if let image, let family = served.first(where: { (try? $0.store.info(image)) != nil }) { return family }
        if served.count == 1 { return served[0] }
        if served.isEmpty { throw ControlFailure(code: "not-found", message: "this server serves no family now") }
        if let image { throw ControlFailure(code: "not-found", message: "no family served here holds '\(image)' (families: \(names))") }
        throw ControlFailure(code: "invalid-argument", message: "this server serves several families (\(names)): name one with --namespace")
    }

    // MARK: Moving a family

    /// `vbdtool volume move TARGET --to HOST`, run in the server that owns TARGET's family.
    func move(_ target: String, toHost: String) throws(ControlFailure) -> ControlResult {
        let running = state.withLock { state -> String? in
            if let moving = state.moving { return moving }
            state.moving = target
            return nil
        }
        if let running {
            throw ControlFailure(code: "busy", message: "a move (of \(running)) is already running on this server: wait until it ends")
        }
        defer { state.withLock { $0.moving = nil } }
        let served = families
        guard let family = served.first(where: { $0.name == target }) ?? served.first(where: { (try? $0.store.info(target)) != nil }) else {
            let names = served.map(\.name).joined(separator: ", ")
            throw ControlFailure(code: "not-owned", message: "this server does not own \(target): it is neither a family served here " +
                                 "nor an export of one (families: \(names.isEmpty ? "none" : names))")
        }
        let exports = family.store.list().map(\.name)
        let pinned = pinnedExports.intersection(exports)
        if !pinned.isEmpty {
            throw ControlFailure(code: "busy", message: "the family \(family.name) holds \(pinned.sorted().joined(separator: ", ")), " +
                                 "served here through --vhost-user-blk: it stays")
        }
        if family.name == pinnedFamily {
            throw ControlFailure(code: "busy", message: "the family \(family.name) is the one --metrics reports: it stays")
        }
        // The target must be a live server of families before anything changes here.
        let answer: ControlResult?
        do { answer = try ControlClient.sendIfServed(.ping, storePath: toHost, progress: { _ in }) } catch {
            throw ControlFailure(code: "no-server", message: "the target \(toHost) does not answer: \(error.message)")
        }
        guard case let .pong(targetStatus)? = answer else {
            throw ControlFailure(code: "no-server", message: "no server runs at \(toHost) (nothing answers on \(ControlClient.socketPath(forStore: toHost)))")
        }
        guard targetStatus.pid != getpid() else {
            throw ControlFailure(code: "invalid-argument", message: "\(toHost) is this server: the family \(family.name) is already here")
        }
        guard targetStatus.families != nil else {
            throw ControlFailure(code: "not-supported", message: "the server at \(toHost) serves a local store, not RADOS families")
        }
        logger.notice("moving the family", metadata: ["family": "\(family.name)", "to": "\(toHost)", "exports": "\(exports.joined(separator: ", "))"])
        if moveDelaySeconds > 0 { Thread.sleep(forTimeInterval: moveDelaySeconds) }

        let started = ContinuousClock.now
        // No new connection opens its exports from here on; the open ones answer what they
        // were sent, then close. The commit below includes every write they acknowledged.
        let (withdrawn, nbd) = state.withLock { state -> (Bool, NBDServer?) in
            guard let index = state.families.firstIndex(where: { $0.name == family.name }) else { return (false, nil) }
            state.families.remove(at: index)
            return (true, state.nbd)
        }
        guard withdrawn else {
            throw ControlFailure(code: "not-owned", message: "this server lost the family \(family.name) while the move began (see its log)")
        }
        var closed = 0
        if let nbd {
            let names = Set(exports)
            closed = Self.waitFor { await nbd.closeConnections(servingAnyOf: names) }
        }
        do {
            try family.store.close()   // flush, checkpoint, unlock with the holder record erased
        } catch {
            logger.error("committing the family failed: it is no longer served here", metadata: ["family": "\(family.name)", "error": "\(error)"])
            throw ControlFailure(code: "io", message: "committing the family \(family.name) failed (\(error)); it is no longer served here " +
                                 "and its lock was not handed over: take it over with `serve --take-over`")
        }
        logger.notice("released the family", metadata: ["family": "\(family.name)", "connections-closed": "\(closed)"])
        let handed: ControlResult?
        var refusal: ControlFailure?
        do {
            handed = try ControlClient.sendIfServed(.adoptFamily(pool: family.location.pool, namespace: family.name),
                                                    storePath: toHost, progress: { _ in })
        } catch {
            handed = nil
            refusal = error
        }
        guard case let .adopted(report)? = handed else {
            // The target did not take it: serve it here again, so its clients find it where it was.
            let reason = refusal?.message ?? "the server at \(toHost) is gone"
            logger.warning("the target did not take the family over: taking it back", metadata: ["family": "\(family.name)", "reason": "\(reason)"])
            do {
                _ = try adopt(pool: family.location.pool, namespace: family.name)
            } catch {
                throw ControlFailure(code: "io", message: "the move of \(family.name) to \(toHost) failed (\(reason)) and taking it back failed too: \(error.message)")
            }
            throw ControlFailure(code: refusal?.code ?? "no-server",
                                 message: "the move of \(family.name) to \(toHost) failed (\(reason)): it is served here again")
        }
        let seconds = (ContinuousClock.now - started).inSeconds
        logger.notice("moved the family", metadata: ["family": "\(family.name)", "to": "\(toHost)", "seconds": "\(String(format: "%.3f", seconds))"])
        return .moved(MoveReport(family: family.name, exports: exports, toHost: toHost, nbdAddresses: report.nbdAddresses,
                                 connectionsClosed: closed, seconds: seconds))
    }

    /// Takes the family `namespace` over (its owner released it for a move, or lost it), replays
    /// its journal and serves its exports.
    func adopt(pool: String, namespace: String) throws(ControlFailure) -> ControlResult {
        guard pool == opening.base.pool else {
            throw ControlFailure(code: "invalid-argument", message: "this server serves families of the pool \(opening.base.pool), not \(pool)")
        }
        let started = ContinuousClock.now
        let (family, fenced, addresses) = try naming.withLock { _ throws(ControlFailure) -> (Family, [String], [String]) in
            if familyNames.contains(namespace) {
                throw ControlFailure(code: "already-exists", message: "this server already serves the family \(namespace)")
            }
            let opened = try Self.open(namespace, opening: opening,
                                       ownership: .takeOver(waitingUpTo: opening.adoptionWaitSeconds, force: false), logger: logger)
            let family = Self.family(opened.store, at: opened.location, cache: cache, tenancy: tenancy)
            let fenced = opened.fenced
            do throws(ControlFailure) {
                try Self.checkNamesUnique(namespace, family.store, against: families.map { ($0.name, $0.store) })
            } catch {
                try? family.store.close()   // hands the lock back
                throw error
            }
            let addresses = state.withLock { state -> [String] in
                state.families.append(family)
                return state.status?.nbdAddresses ?? []
            }
            return (family, fenced, addresses)
        }
        let exports = family.store.list().map { $0.name }
        logger.notice("took the family over", metadata: ["family": "\(namespace)", "exports": "\(exports.joined(separator: ", "))",
                                                         "seconds": "\(String(format: "%.3f", (ContinuousClock.now - started).inSeconds))"])
        return .adopted(AdoptionReport(family: namespace, exports: exports, nbdAddresses: addresses, fenced: fenced))
    }

    /// Runs async work from a control thread (a plain thread: blocking it is fine).
    private static func waitFor<T: Sendable>(_ work: @escaping @Sendable () async -> T) -> T {
        let done = DispatchSemaphore(value: 0)
        let result = Mutex<T?>(nil)
        Task {
            let value = await work()
            result.withLock { $0 = value }
            done.signal()
        }
        done.wait()
        return result.withLock { $0! }
    }

    // MARK: A lost lock

    /// The lock of the family `name` was lost (taken over, broken, blocklisted, expired): its store
    /// already refuses every change. When other families are served, only this one stops: its
    /// connections are closed and its store closed without committing, and true is returned.
    /// False when it is the only family (or not served, as at start): the server stops, as a
    /// server of one store does.
    func lockLost(_ name: String, reason: String) -> Bool {
        let (family, nbd) = state.withLock { state -> (Family?, NBDServer?) in
            guard state.families.count > 1, let index = state.families.firstIndex(where: { $0.name == name }) else { return (nil, nil) }
            return (state.families.remove(at: index), state.nbd)
        }
        guard let family else { return false }
        logger.critical("lost the ownership of the family: refusing its writes, closing its NBD connections; the other families keep serving",
                        metadata: ["family": "\(name)", "reason": "\(reason)"])
        let exports = Set(family.store.list().map { $0.name })
        let logger = self.logger
        Task {
            await nbd?.closeConnections(servingAnyOf: exports)
            _ = try? family.store.close()   // commits nothing: the store refuses every change
            logger.error("stopped serving the family without committing: this server no longer owns it", metadata: ["family": "\(name)"])
        }
        return true
    }

    // MARK: Stopping

    /// Commits and closes every family (releasing their locks: the handover of `serve`'s SIGTERM).
    /// Returns the failures.
    func closeAll() -> [String] {
        let all = state.withLock { state -> [Family] in
            defer { state.families = [] }
            return state.families
        }
        var failures: [String] = []
        for family in all {
            do { try family.store.close() } catch { failures.append("\(family.name): \(error)") }
        }
        return failures
    }
}
