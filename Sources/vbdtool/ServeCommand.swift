import ArgumentParser
import Dispatch
import Foundation
import Logging
import NBDServer
import Synchronization
import VBDAccounting
import VBDCache
import VBDControl
import VBDCore
import VBDMetrics
import VBDRados
import VBDStore
import VhostUser

#if canImport(Glibc)
import Glibc
#endif

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve", abstract: "Serve every volume (read-write) and snapshot (read-only) over NBD.",
        discussion: """
            Export names are VOLUME and VOLUME@SNAPSHOT; new volumes, snapshots and shares are served at once. \
            While serving, the other vbdtool commands run inside this process through DIR/control.sock. \
            SIGINT or SIGTERM stops cleanly: NBD clients are let finish, the store is flushed, checkpointed and closed.
            With --rados the server owns the store under a RADOS lock with an expiry, and SIGTERM hands it over: \
            after the clean stop the lock is free for `serve --take-over` on another host, which fences nobody. \
            A server whose lock is lost (taken over, blocklisted, or not renewed in time) refuses every write \
            from then on, closes its NBD connections and exits with status 1.
            With --rados and --namespace given several times, one server serves several families (one store and one \
            lock each; an export name must be unique among them), and `vbdtool volume move` hands one family to \
            another server while the others keep serving.
            """)
    @Option(help: ArgumentHelp("TCP address to listen on (default 127.0.0.1:10809 unless --unix is given).", valueName: "host:port"))
    var listen: String?
    @Option(help: ArgumentHelp("Unix socket path to listen on for NBD.", valueName: "path"))
    var unix: String?
    @Option(help: ArgumentHelp("TLS certificate (PEM); enables STARTTLS.", valueName: "file")) var tlsCert: String?
    @Option(help: ArgumentHelp("TLS private key (PEM).", valueName: "file")) var tlsKey: String?
    @Option(help: ArgumentHelp("CA (PEM) whose client certificates are required.", valueName: "file")) var tlsCa: String?
    @Flag(help: "Refuse clients that do not use TLS.") var tlsRequired = false
    @Option(help: "Universal cache size, e.g. 1G (default: an eighth of RAM, 64M..32G).") var cacheSize: String?
    @Option(help: "Last-chance (compressed) cache tier size (default: a quarter of --cache-size; 0 turns it off).") var lastChanceSize: String?
    @Option(help: "Cap the store's data file, e.g. 500G: writes needing more fail with ENOSPC (default: the disk's space).")
    var maxDataSize: String?
    // Hidden: for tests. A small value makes every NBD FLUSH fold the journal into a new
    // checkpoint, so the concurrency checker exercises checkpoints racing with I/O.
    @Option(help: ArgumentHelp("Checkpoint whenever a flush finds the journal at least this big (default 256M).", visibility: .hidden))
    var checkpointJournalBytes: String?
    @Option(help: "Memory for metadata pages (maps, chunk table, dedup index), e.g. 512M (default 256M, at least 1M); pages are read from the store on demand.")
    var metadataCache: String?
    @Option(help: "Start the disk write of new chunks once this many bytes of them are written one after another in the data file, e.g. 4M (the default), so that a flush's sync finds little left; 0 leaves it all to the syncs.")
    var dataWriteBack: String?
    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics (cache tiers, per-volume cache counters, space and sharing).", valueName: "host:port"))
    var metrics: String?
    @Flag(help: "Schedule I/O per domain (mClock: reservation, limit, weight; see docs/ACCOUNTING.md).") var schedule = false
    @Option(help: "With --schedule: requests on the device at once (default: the number of cores, at least 2).")
    var deviceSlots: Int?
    @Option(help: "With --schedule: device slots only reservation-phase requests may use (default 1; at most --device-slots - 1).")
    var reservedSlots: Int = 1
    @Flag(help: "Serve a volume only to an authenticated domain holding a lease on it (`vbdtool lease grant`); clients that prove no identity get nothing.")
    var enforceLeases = false
    @Option(help: ArgumentHelp("Unix-socket clients with this uid or gid are this domain (repeatable; a uid entry wins). DOMAIN @bound: the peer (e.g. the hypervisor's user) acts for the domain each export is bound to, and may open only bound exports.",
                               valueName: "uid:N=DOMAIN|gid:N=DOMAIN"))
    var peerDomain: [String] = []
    @Option(help: ArgumentHelp("Clients whose verified certificate subject is exactly SUBJECT (RFC 4514, e.g. 'CN=tenant-b,O=tenants') are DOMAIN (repeatable; needs --tls-ca). Unlisted verified subjects are domains named by their RFC 4514 text.",
                               valueName: "DOMAIN=SUBJECT"))
    var certificateDomain: [String] = []
    @Option(help: "Log level: trace, debug, info, notice, warning, error.") var logLevel: String = "info"
    @Option(help: ArgumentHelp("Seconds a client may take to finish sending a request it has begun (header or WRITE payload); then its connection closes.", valueName: "seconds"))
    var messageTimeout: Int = 30
    @Option(help: ArgumentHelp("Close connections with nothing in flight for this many seconds (default: never; QEMU does not reconnect by default).", valueName: "seconds"))
    var idleTimeout: Int?
    @Option(help: ArgumentHelp("Connections one peer (IP address, or uid on the unix socket) may hold at once.", valueName: "n"))
    var connectionsPerPeer: Int = Limits.nbdConnectionsPerPeerMax
    @Option(help: ArgumentHelp("On SIGINT/SIGTERM, seconds to let requests in flight finish (all connections together) before closing them.", valueName: "seconds"))
    var shutdownGrace: Int = 10
    @Option(name: .customLong("vhost-user-blk"),
            help: ArgumentHelp("Also serve EXPORT (VOLUME, or VOLUME@SNAPSHOT read-only) as a vhost-user-blk device on the unix socket SOCKET, for QEMU's vhost-user-blk-pci (repeatable; see docs/VHOST-USER.md).",
                               valueName: "SOCKET=EXPORT"))
    var vhostUserBlk: [String] = []
    @Option(help: ArgumentHelp("Queues each vhost-user-blk device offers (QEMU's num-queues may use up to this many).", valueName: "n"))
    var vhostUserQueues: Int = 4
    @Flag(help: "With --rados: wait (up to --take-over-wait) for the server that owns the store to hand it over (SIGTERM stops it cleanly) or for its lock to expire, then fence it if it did not hand over, replay the journal and serve.")
    var takeOver = false
    @Option(help: ArgumentHelp("With --take-over: seconds to wait for the owner to hand over.", valueName: "seconds"))
    var takeOverWait: Int = 60
    @Flag(help: "With --take-over: declare the owner dead now: blocklist it in the cluster and break its lock, without waiting. Only when that host is known to be down or stuck.")
    var force = false
    // Hidden: for tests. How long the RADOS lock lasts without a renewal (renewed every third of it).
    @Option(help: ArgumentHelp("With --rados: seconds the store's lock lasts unless renewed (default 30).", visibility: .hidden))
    var lockDuration: Int = 30
    // Hidden: for tests. A `volume move` waits this long after its checks, before it withdraws
    // the family, so that a test can start a second move while the first runs.
    @Option(help: ArgumentHelp("With --rados: seconds a move waits before it withdraws the family.", visibility: .hidden))
    var moveDelay: Double = 0
    @OptionGroup var store: StoreOptions

    /// --vhost-user-blk SOCKET=EXPORT, split at the last '=' (export names never hold one).
    static func parseVhostUserBlk(_ entries: [String]) throws -> [(socket: String, export: String)] {
        var result: [(socket: String, export: String)] = []
        for entry in entries {
            guard let equals = entry.lastIndex(of: "="), equals != entry.startIndex, entry.index(after: equals) != entry.endIndex else {
                throw ValidationError("--vhost-user-blk: expected SOCKET=EXPORT (e.g. /run/vbd/vm1.sock=vm1), got '\(entry)'")
            }
            let socket = absolutePath(String(entry[..<equals]))
            guard socket.utf8.count < 108 else {
                throw ValidationError("--vhost-user-blk: the socket path '\(socket)' is longer than the 107 bytes a Unix socket address holds")
            }
            guard !result.contains(where: { $0.socket == socket }) else {
                throw ValidationError("--vhost-user-blk: the socket '\(socket)' is given twice")
            }
            result.append((socket, String(entry[entry.index(after: equals)...])))
        }
        return result
    }

    func validate() throws {
        if (takeOver || force) && store.rados.pool == nil { throw ValidationError("--take-over and --force need --rados POOL") }
        if force && !takeOver { throw ValidationError("--force goes with --take-over") }
        guard (0...600).contains(moveDelay) else { throw ValidationError("--move-delay: expected 0...600 seconds, got \(moveDelay)") }
        guard (0...3600).contains(takeOverWait) else { throw ValidationError("--take-over-wait: expected 0...3600 seconds, got \(takeOverWait)") }
        guard (2...600).contains(lockDuration) else { throw ValidationError("--lock-duration: expected 2...600 seconds, got \(lockDuration)") }
        if (tlsCert == nil) != (tlsKey == nil) { throw ValidationError("--tls-cert and --tls-key go together") }
        if tlsRequired && tlsCert == nil { throw ValidationError("--tls-required needs --tls-cert and --tls-key") }
        if let listen { _ = try Self.parseListen(listen) }
        if let metrics { _ = try Self.parseListen(metrics) }
        _ = try identityResolver()
        if !certificateDomain.isEmpty && tlsCa == nil {
            throw ValidationError("--certificate-domain needs --tls-ca: a client certificate is an identity only once the server verified it")
        }
        if let unix, absolutePath(unix).utf8.count >= 108 {
            throw ValidationError("--unix: the socket path '\(absolutePath(unix))' is longer than the 107 bytes a Unix socket address holds")
        }
        for (option, path) in [("--tls-cert", tlsCert), ("--tls-key", tlsKey), ("--tls-ca", tlsCa)] {
            if let path, access(path, R_OK) != 0 {
                throw ValidationError("\(option): cannot read '\(path)': \(String(cString: strerror(errno)))")
            }
        }
        // Every size is checked here, before anything starts: a cache of 0 bytes, or one larger
        // than an Int, would otherwise trap while the server sets up (SIGILL).
        let memory = ProcessInfo.processInfo.physicalMemory
        if let cacheSize {
            let bytes = try parseSize(cacheSize, option: "--cache-size")
            guard bytes >= Self.cacheBytesMin, bytes <= memory else {
                throw ValidationError("--cache-size: expected 1M up to this machine's memory (\(memory >> 20)M), got '\(cacheSize)'")
            }
        }
        if let lastChanceSize {
            let bytes = try parseSize(lastChanceSize, option: "--last-chance-size")
            guard bytes <= memory else {
                throw ValidationError("--last-chance-size: expected 0 (off) up to this machine's memory (\(memory >> 20)M), got '\(lastChanceSize)'")
            }
        }
        if let maxDataSize {
            let bytes = try parseSize(maxDataSize, option: "--max-data-size")
            guard bytes >= Self.cacheBytesMin else {
                throw ValidationError("--max-data-size: expected at least 1M (omit it for no cap), got '\(maxDataSize)'")
            }
        }
        if let checkpointJournalBytes { _ = try parseSize(checkpointJournalBytes, option: "--checkpoint-journal-bytes") }
        if let metadataCache {
            let bytes = try parseSize(metadataCache, option: "--metadata-cache")
            guard bytes >= 1 << 20, bytes <= UInt64(Int.max) else {
                throw ValidationError("--metadata-cache: expected at least 1M, got '\(metadataCache)'")
            }
        }
        if let dataWriteBack { _ = try parseSize(dataWriteBack, option: "--data-write-back") }
        if let deviceSlots, !(1...1024).contains(deviceSlots) { throw ValidationError("--device-slots: expected 1...1024, got \(deviceSlots)") }
        if reservedSlots < 0 || reservedSlots >= (deviceSlots ?? TenancyService.defaultDeviceParallelism) {
            throw ValidationError("--reserved-slots must be at least 0 and below the device slots (\(deviceSlots ?? TenancyService.defaultDeviceParallelism))")
        }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level: unknown level '\(logLevel)'") }
        guard (1...86_400).contains(messageTimeout) else { throw ValidationError("--message-timeout: expected 1...86400 seconds, got \(messageTimeout)") }
        if let idleTimeout, !(1...31_536_000).contains(idleTimeout) {
            throw ValidationError("--idle-timeout: expected 1...31536000 seconds, got \(idleTimeout)")
        }
        _ = try Self.parseVhostUserBlk(vhostUserBlk)
        guard (1...64).contains(vhostUserQueues) else { throw ValidationError("--vhost-user-queues: expected 1...64, got \(vhostUserQueues)") }
        guard (0...600).contains(shutdownGrace) else { throw ValidationError("--shutdown-grace: expected 0...600 seconds, got \(shutdownGrace)") }
        guard (1...Limits.nbdConnectionsMax).contains(connectionsPerPeer) else {
            throw ValidationError("--connections-per-peer: expected 1...\(Limits.nbdConnectionsMax), got \(connectionsPerPeer)")
        }
    }

    /// The identity maps of --peer-domain and --certificate-domain (bindings come from the store's
    /// tenancy state).
    func identityResolver() throws -> DomainResolver {
        var resolver = DomainResolver()
        for entry in peerDomain {
            guard let equals = entry.firstIndex(of: "="), let peer = UnixPeer(String(entry[..<equals])),
                  !entry[entry.index(after: equals)...].isEmpty else {
                throw ValidationError("--peer-domain: expected uid:N=DOMAIN or gid:N=DOMAIN (DOMAIN may be \(PeerDomain.boundDomainToken)), got '\(entry)'")
            }
            guard resolver.unixPeerDomains[peer] == nil else { throw ValidationError("--peer-domain: \(peer) is given twice") }
            resolver.unixPeerDomains[peer] = PeerDomain(String(entry[entry.index(after: equals)...]))
        }
        for entry in certificateDomain {
            guard let equals = entry.firstIndex(of: "="), equals != entry.startIndex else {
                throw ValidationError("--certificate-domain: expected DOMAIN=SUBJECT (e.g. bee=CN=tenant-b,O=tenants), got '\(entry)'")
            }
            let subject: CertificateSubject
            do { subject = try CertificateSubject(rfc4514: String(entry[entry.index(after: equals)...])) } catch {
                throw ValidationError("--certificate-domain '\(entry)': \(error)")
            }
            guard resolver.certificateDomains[subject] == nil else {
                throw ValidationError("--certificate-domain: the subject \(subject) is given twice")
            }
            resolver.certificateDomains[subject] = DomainID(String(entry[..<equals]))
        }
        return resolver
    }

    /// The NBD server's limits as the options set them.
    var serverLimits: NBDServer.ServerLimits {
        var limits = NBDServer.ServerLimits()
        limits.messageTimeout = .seconds(messageTimeout)
        limits.idleTimeout = idleTimeout.map { .seconds($0) }
        limits.connectionsPerPeerMax = connectionsPerPeer
        limits.shutdownGracePeriod = .seconds(shutdownGrace)
        return limits
    }

    /// The smallest cache (and data cap) accepted: one block of the largest size.
    static let cacheBytesMin = UInt64(Limits.blockBytesMax)

    static func parseListen(_ text: String) throws -> (host: String, port: Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            throw ValidationError("--listen: expected HOST:PORT (e.g. 127.0.0.1:10809, [::1]:10809), got '\(text)'")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw ValidationError("--listen: missing host in '\(text)'") }
        return (host, port)
    }

    func run() async throws {
        // Before anything can announce "serving": a SIGTERM sent the moment a supervisor sees that
        // line must stop the server cleanly, not kill it with the default action.
        let stopEvents = StopWaiter(signals: [SIGINT, SIGTERM])
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "vbd.serve")
        let storePath = store.path
        let cacheBytes = try cacheSize.map { Int(try parseSize($0, option: "--cache-size")) }
        let lastChanceBytes = try lastChanceSize.map { Int(try parseSize($0, option: "--last-chance-size")) }
        let cache = BlockCache(configuration: .init(capacityBytes: cacheBytes, lastChanceCapacityBytes: lastChanceBytes))
        var options = Store.Options()
        options.cache = cache
        if let maxDataSize { options.dataBytesMax = try parseSize(maxDataSize, option: "--max-data-size") }
        if let checkpointJournalBytes {
            options.checkpointJournalBytes = try parseSize(checkpointJournalBytes, option: "--checkpoint-journal-bytes")
        }
        if let metadataCache { options.metadataCacheBytes = Int(try parseSize(metadataCache, option: "--metadata-cache")) }
        if let dataWriteBack { options.dataWriteBackBytes = try parseSize(dataWriteBack, option: "--data-write-back") }
        // A local store, or the RADOS families (one store and one lock each).
        var localStore: Store?
        var radosFamilies: [(name: String, location: RadosStoreLocation, store: Store)] = []
        var servedStore = storePath
        // A family's lost lock stops only that family while others are served (set once they are).
        let servedFamilies = Mutex<ServedFamilies?>(nil)
        let opening = ServedFamilies.Opening(
            base: self.store.rados.location ?? RadosStoreLocation(configurationFile: "", pool: "", namespace: ""),
            options: options, lockDurationSeconds: lockDuration,
            onLockLost: { family, reason in
                if servedFamilies.withLock({ $0 })?.lockLost(family, reason: reason) != true {
                    stopEvents.post(.lockLost(reason))
                }
            })
        if self.store.rados.location != nil {
            let locations = self.store.rados.locations
            servedStore = locations.map(\.description).joined(separator: ", ")
            do {
                try ensureHostDirectory(storePath)
                let ownership: RadosOwnership = takeOver ? .takeOver(waitingUpTo: Double(takeOverWait), force: force) : .acquire
                for location in locations {
                    if takeOver {
                        logger.notice("taking the store over", metadata: ["store": "\(location)", "force": "\(force)", "wait": "\(takeOverWait) s"])
                    }
                    let result = try ServedFamilies.open(location.namespace, opening: opening,
                                                         ownership: ownership, logger: logger, whileWaiting: { holders in
                        logger.notice("waiting for the owner to hand the store over", metadata: [
                            "store": "\(location)", "owner": "\(holders.map { "\($0.client) at \($0.address)" }.joined(separator: ", "))"])
                    })
                    radosFamilies.append((location.namespace, location, result.store))
                    try ServedFamilies.checkNamesUnique(location.namespace, result.store, against: radosFamilies.map { ($0.name, $0.store) })
                    logger.notice("owning the store", metadata: ["store": "\(location)", "lock": "\(RadosDirectory.lockObject)",
                                                                "lock-duration": "\(lockDuration) s"])
                }
            } catch {
                for family in radosFamilies { try? family.store.close() }
                fail(ControlFailure(error), json: false)
            }
        } else {
            do { localStore = try Store.open(path: storePath, options: options) } catch { fail(ControlFailure(error), json: false) }
            for warning in localStore!.recoveryWarnings { logger.warning("\(warning)") }
        }
        // Closes what was opened when the server cannot start.
        let closeStores = {
            try? localStore?.close()
            for family in radosFamilies { try? family.store.close() }
        }

        var tcp: (host: String, port: Int)?
        if let listen { tcp = try Self.parseListen(listen) } else if unix == nil { tcp = ("127.0.0.1", 10809) }
        let tls: NBDServer.TLSMode
        if let tlsCert, let tlsKey {
            tls = tlsRequired ? .required(certificatePath: tlsCert, keyPath: tlsKey, caPath: tlsCa)
                              : .optional(certificatePath: tlsCert, keyPath: tlsKey, caPath: tlsCa)
        } else {
            tls = .off
        }
        // Accounting, leases and the audit log: charged per domain on every request, audited for
        // every control operation, persisted in the store directory.
        let tenancy: TenancyService
        do {
            tenancy = try ControlService.openTenancy(storePath: storePath, leasesEnforced: enforceLeases,
                                                     resolver: try identityResolver())
        } catch {
            closeStores()
            fail(ControlFailure(code: "tenancy", message: "\(error)"), json: false)
        }
        // vhost-user-blk doors and metrics are set up once: their exports' families stay here.
        let vhostDoors = try Self.parseVhostUserBlk(vhostUserBlk)
        var families: ServedFamilies?
        if localStore == nil {
            let served = radosFamilies.map { ServedFamilies.family($0.store, at: $0.location, cache: cache, tenancy: tenancy) }
            families = ServedFamilies(families: served, opening: opening, hostPath: storePath, cache: cache, tenancy: tenancy,
                                      pinnedExports: Set(vhostDoors.map(\.export)),
                                      pinnedFamily: metrics == nil ? nil : radosFamilies.first?.name,
                                      moveDelaySeconds: moveDelay, logger: logger)
            servedFamilies.withLock { $0 = families }
        }
        let exports: any ExportProvider = families ?? localStore!
        let nbd = NBDServer(configuration: .init(exports: exports, tcp: tcp, unixSocketPath: unix.map(absolutePath), tls: tls,
                                                 logger: Logger(label: "vbd.nbd"), limits: serverLimits,
                                                 tenancy: .init(service: tenancy, scheduling: schedule, deviceSlots: deviceSlots,
                                                                reservedSlots: reservedSlots)))
        do { try await nbd.start() } catch {
            closeStores()
            fail(ControlFailure(code: "io", message: "cannot start the NBD server: \(error)"), json: false)
        }
        var addresses: [String] = []
        if let tcp { addresses.append("\(tcp.host):\(nbd.tcpPort ?? tcp.port)") }
        if let unix { addresses.append("unix:\(absolutePath(unix))") }
        let status = ServerStatus(pid: getpid(), storePath: servedStore, nbdAddresses: addresses)
        let handler: any ControlRequestHandler
        if let families {
            families.attach(nbd: nbd, status: status)
            handler = families
        } else {
            let store = localStore!
            let cleanPageInterface = ControlService.cleanPageInterface(cache: cache, store: store, tenancy: tenancy)
            handler = ControlService(store: store, storePath: storePath, cache: cache, status: status,
                                     cleanPages: cleanPageInterface.cleanPages,
                                     hypervisorDomains: cleanPageInterface.hypervisorDomains,
                                     tenancy: tenancy)
        }
        let control = ControlServer(socketPath: ControlClient.socketPath(forStore: storePath), service: handler,
                                    logger: Logger(label: "vbd.control"))
        do { try control.start() } catch {
            await nbd.stop()
            closeStores()
            fail(error, json: false)
        }
        // vhost-user-blk doors: each export must exist now (a typo fails at once); the device is
        // opened anew for every front-end connection, as an NBD connection opens its export.
        var vhostServers: [VhostUserBlkServer] = []
        for (socketPath, export) in vhostDoors {
            let failure: ControlFailure?
            do {
                _ = try exports.openExport(named: export)
                let server = VhostUserBlkServer(socketPath: socketPath, exportName: export, queueCountMax: vhostUserQueues,
                                                // The NBD clients' request layer: one admission, lease check,
                                                // scheduler (--schedule) and ledger for both doors.
                                                pipeline: nbd.requestPipeline,
                                                logger: Logger(label: "vbd.vhost-user-blk")) { () throws(BlockDeviceError) in
                    try exports.openExport(named: export)
                }
                try server.start()
                vhostServers.append(server)
                failure = nil
            } catch {
                failure = ControlFailure(code: "io", message: "--vhost-user-blk \(socketPath)=\(export): \(error)")
            }
            if let failure {
                for server in vhostServers { server.stop() }
                control.stop()
                await nbd.stop()
                closeStores()
                fail(failure, json: false)
            }
            logger.notice("vhost-user-blk", metadata: ["socket": "\(socketPath)", "export": "\(export)"])
        }
        var metricsServer: MetricsHTTPServer?
        if let metrics {
            let (host, port) = try Self.parseListen(metrics)
            // A server of families reports the first one's store (which therefore stays here).
            let storeMetrics = StoreMetrics(store: localStore ?? radosFamilies[0].store, cache: cache)
            storeMetrics.addSource { sink in
                // Per-domain accounting, credit and storage charge (issue 6).
                let stats = tenancy.statistics(storage: tenancy.storageShares(usage: storeMetrics.usage()))
                // And per front door (NBD, vhost-user-blk), from the request layer both share.
                for metric in stats.metrics + (nbd.requestPipeline?.metrics ?? []) {
                    switch metric.kind {
                    case .counter: sink.counter(metric.name, metric.labels, metric.value, help: metric.help)
                    case .gauge: sink.gauge(metric.name, metric.labels, metric.value, help: metric.help)
                    }
                }
            }
            let server = MetricsHTTPServer(metrics: storeMetrics, host: host, port: port)
            do { try await server.start() } catch {
                for server in vhostServers { server.stop() }
                control.stop()
                await nbd.stop()
                closeStores()
                fail(ControlFailure(code: "io", message: "cannot serve metrics on \(metrics): \(error)"), json: false)
            }
            metricsServer = server
            logger.notice("metrics", metadata: ["url": "http://\(host):\(server.port ?? port)/metrics"])
        }
        logger.notice("serving", metadata: ["store": "\(servedStore)", "nbd": "\(addresses.joined(separator: ", "))",
                                            "volumes": "\(exports.exportList().count)"])

        let stopReason = await stopEvents.first()
        switch stopReason {
        case .signal(let number):
            logger.notice("shutting down", metadata: ["signal": "\(number)"])
        case .lockLost(let reason):
            // Another server owns the store now (or may, once the lock expired): nothing may be
            // committed from here on. The store already refuses every change; stop serving.
            logger.critical("lost the ownership of the store: refusing every write, closing NBD connections and exiting",
                            metadata: ["store": "\(servedStore)", "reason": "\(reason)"])
        }
        // The guests' queues stop first: nothing writes once the store starts closing.
        for server in vhostServers { server.stop() }
        await nbd.stop()
        await metricsServer?.stop()
        control.stop()
        do { try tenancy.persist() } catch { logger.error("saving accounting state failed: \(error)") }
        if case .lockLost = stopReason {
            // Nothing is committed; the lock, no longer ours, is not released. (The other
            // families' stores are closed too, and their locks released.)
            _ = try? localStore?.close()
            _ = families?.closeAll()
            logger.error("stopped without committing: this server no longer owns the store", metadata: ["store": "\(servedStore)"])
            throw ExitCode(1)
        }
        if let families {
            // Flushes, checkpoints and releases each family's lock: the handover.
            let failures = families.closeAll()
            if !failures.isEmpty {
                logger.error("closing the store failed: \(failures.joined(separator: "; "))")
                throw ExitCode(1)
            }
        } else {
            do {
                try localStore!.close()   // flushes and checkpoints
            } catch {
                logger.error("closing the store failed: \(error)")
                throw ExitCode(1)
            }
        }
        logger.notice("stopped cleanly")
    }
}

/// Why the server stops.
enum StopReason: Sendable {
    case signal(Int32)
    /// The store's RADOS lock was lost (taken over, broken, blocklisted or expired).
    case lockLost(String)
}

/// Turns SIGINT/SIGTERM, and a lost store lock, into an async event (DispatchSource: no work in a
/// signal handler). The signals are caught from `init` on; an event that arrives before `first()`
/// is waited for is kept. Unchecked Sendable: `sources` is only written in `init`, and the stream
/// and its continuation are thread-safe.
final class StopWaiter: @unchecked Sendable {
    private let sources: [any DispatchSourceSignal]
    private let stream: AsyncStream<StopReason>
    private let continuation: AsyncStream<StopReason>.Continuation

    init(signals: [Int32]) {
        let queue = DispatchQueue(label: "vbd.signals")
        let (stream, continuation) = AsyncStream.makeStream(of: StopReason.self)
        var sources: [any DispatchSourceSignal] = []
        for number in signals {
            signal(number, SIG_IGN)   // the default action would kill us before the source sees it
            let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
            source.setEventHandler { continuation.yield(.signal(number)) }
            source.resume()
            sources.append(source)
        }
        self.sources = sources
        self.stream = stream
        self.continuation = continuation
    }

    /// Reports an event other than a signal (from any thread).
    func post(_ reason: StopReason) {
        continuation.yield(reason)
    }

    /// The first event; stops catching signals.
    func first() async -> StopReason {
        var first = StopReason.signal(0)
        for await reason in stream {
            first = reason
            break
        }
        for source in sources { source.cancel() }
        return first
    }
}
