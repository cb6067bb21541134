import ArgumentParser
import Foundation
import Logging
import VBDControl
import VBDCore
import VBDRados
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// The operator's CLI. Every command but `init` and `serve` first asks the store's running
/// server (over DIR/control.sock) to do the work, so the CLI and the server never open one store
/// as two writers; with no server running it opens the store itself.
///
/// Exit status: 0 success; 1 the command failed (message on stderr; with --json a JSON object
/// with `code` and `message`); 2 `fsck` found problems; 64 bad usage (unknown option, bad size).
struct VBDTool: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vbdtool",
        abstract: "Manage and serve vbd volumes: a content-indexed, deduplicating, copy-on-write block store.",
        discussion: """
            A snapshot is written VOLUME@NAME everywhere (CLI and NBD export names).
            The store is chosen by --store PATH, else $VBD_STORE, else ./vbd-data.
            While `vbdtool serve` runs, the other commands run inside it through DIR/control.sock.
            """,
        subcommands: [
            InitCommand.self, CreateCommand.self, ListCommand.self, InfoCommand.self, SnapshotCommand.self,
            ShareCommand.self, RemoveCommand.self, ResizeCommand.self, DiffCommand.self, ImportCommand.self,
            ExportCommand.self, ServeCommand.self, StatusCommand.self, StatsCommand.self, GCCommand.self, FsckCommand.self,
            LeaseCommand.self, AuditCommand.self, DomainCommand.self, VolumeCommand.self, SweepDeletedFamilyCommand.self,
        ]
    )
}

/// `--store PATH` (or $VBD_STORE, or ./vbd-data), and `--rados POOL ...` for a store in Ceph.
struct StoreOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Store directory (default: $VBD_STORE, else ./vbd-data). With --rados: this host's directory for the control socket and the accounting state (created if missing).", valueName: "path"))
    var store: String?
    @OptionGroup var rados: RadosOptions

    static let environmentVariable = "VBD_STORE"
    static let defaultPath = "./vbd-data"

    /// The absolute store path: the server may run in another directory than the CLI.
    var path: String {
        let chosen = store ?? ProcessInfo.processInfo.environment[Self.environmentVariable].flatMap { $0.isEmpty ? nil : $0 } ?? Self.defaultPath
        return absolutePath(chosen)
    }
}

/// `--json`.
struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print machine-readable JSON instead of a table.")
    var json = false
}

/// `--rados POOL [--ceph-conf FILE] [--ceph-user NAME] [--namespace NS]`: the store lives in a
/// namespace of a Ceph RADOS pool (docs/RADOS.md) instead of the files under --store.
struct RadosOptions: ParsableArguments {
    @Option(name: .customLong("rados"), help: ArgumentHelp("Keep the store in this Ceph RADOS pool (one store per --namespace) instead of local files.", valueName: "pool"))
    var pool: String?
    @Option(name: .customLong("ceph-conf"), help: ArgumentHelp("With --rados: the ceph.conf naming the monitors and the keyring (default: $CEPH_CONF, else /etc/ceph/ceph.conf).", valueName: "file"))
    var configurationFile: String?
    @Option(name: .customLong("ceph-user"), help: ArgumentHelp("With --rados: the cephx user, without 'client.' (default admin).", valueName: "name"))
    var user: String?
    @Option(name: .customLong("namespace"), help: ArgumentHelp("With --rados: the pool namespace that holds the store (default '\(RadosOptions.defaultNamespace)'); `serve` takes it once per family it serves.", valueName: "ns"))
    var namespaces: [String] = []

    /// The one namespace a command other than `serve` works on (nil: the default).
    var namespace: String? { namespaces.first }

    static let defaultNamespace = "default"

    func validate() throws {
        if pool == nil {
            for (option, value) in [("--ceph-conf", configurationFile), ("--ceph-user", user), ("--namespace", namespace)] where value != nil {
                throw ValidationError("\(option) needs --rados POOL")
            }
            return
        }
        if pool!.isEmpty { throw ValidationError("--rados: the pool name is empty") }
        if namespaces.contains(where: \.isEmpty) { throw ValidationError("--namespace: the name is empty") }
        if Set(namespaces).count != namespaces.count { throw ValidationError("--namespace: a family is given twice") }
        if let configurationFile, access(configurationFile, R_OK) != 0 {
            throw ValidationError("--ceph-conf: cannot read '\(configurationFile)': \(String(cString: strerror(errno)))")
        }
    }

    /// The store's place in the cluster; nil for a store in local files.
    var location: RadosStoreLocation? {
        guard let pool else { return nil }
        let environment = ProcessInfo.processInfo.environment["CEPH_CONF"].flatMap { $0.isEmpty ? nil : $0 }
        return RadosStoreLocation(configurationFile: absolutePath(configurationFile ?? environment ?? "/etc/ceph/ceph.conf"),
                                  user: user ?? "admin", pool: pool, namespace: namespace ?? Self.defaultNamespace)
    }

    /// Every family `serve` serves (one per --namespace, else the default one).
    var locations: [RadosStoreLocation] {
        guard let base = location else { return [] }
        return (namespaces.isEmpty ? [Self.defaultNamespace] : namespaces).map { namespace in
            var location = base
            location.namespace = namespace
            return location
        }
    }

    /// Refuses several --namespace for the commands that work on one store.
    func requireOneNamespace() throws(ControlFailure) {
        if namespaces.count > 1 {
            throw ControlFailure(code: "invalid-argument", message: "--namespace is given \(namespaces.count) times: only `serve` serves several families")
        }
    }
}

/// Opens the RADOS store at `location` (for `init`, `serve`, and the commands that find no server);
/// errors become failures that name the store and say what to do.
func openRadosStore(_ location: RadosStoreLocation, options: Store.Options, create: Bool, sharingDomain: String? = nil,
                    ownership: RadosOwnership = .acquire, lockDurationSeconds: Int = 30,
                    logger: Logger = Logger(label: "vbd.rados"),
                    onLockLost: @escaping @Sendable (String) -> Void = { _ in },
                    whileWaiting: ([RadosLockHolder]) -> Void = { _ in }) throws(ControlFailure) -> (store: Store, fenced: [String]) {
    do {
        return try RadosStore.open(location, options: options, create: create, sharingDomain: sharingDomain, ownership: ownership,
                                   lockDurationSeconds: lockDurationSeconds, logger: logger, onLockLost: onLockLost,
                                   whileWaiting: whileWaiting)
    } catch StoreError.notInitialized {
        throw ControlFailure(code: "not-initialized",
                             message: "no store at \(location): run `vbdtool init --rados \(location.pool) --namespace \(location.namespace)` first")
    } catch StoreError.alreadyInitialized {
        throw ControlFailure(code: "already-initialized", message: "a store already exists at \(location)")
    } catch let error as RadosError {
        throw ControlFailure(code: "io", message: "\(location) (\(location.configurationFile)): \(error)")
    } catch {
        throw ControlFailure(error)
    }
}

/// Creates the host's directory of a RADOS store (control socket, accounting state) if missing.
func ensureHostDirectory(_ path: String) throws(ControlFailure) {
    do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) } catch {
        throw ControlFailure(code: "io", message: "cannot create the directory \(path) for the control socket and accounting state: \(error.localizedDescription)")
    }
}

func absolutePath(_ path: String) -> String {
    var absolute = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    // Tidy "./" and trailing "/" so that socket paths stay short and messages readable.
    while absolute.contains("/./") { absolute = absolute.replacingOccurrences(of: "/./", with: "/") }
    if absolute.hasSuffix("/.") { absolute.removeLast(2) }
    while absolute.count > 1 && absolute.hasSuffix("/") { absolute.removeLast() }
    return absolute
}

/// Parses a size option, turning bad syntax into a usage error (exit 64) that says what is accepted.
func parseSize(_ text: String, option: String) throws -> UInt64 {
    do { return try ByteSize.parse(text) } catch {
        throw ValidationError("\(option): \(error.description)")
    }
}

/// Parses `--block-size`: a size that is a power of two within the store's limits.
func parseBlockSize(_ text: String) throws -> Int {
    let bytes = try parseSize(text, option: "--block-size")
    guard bytes.nonzeroBitCount == 1, bytes >= UInt64(Limits.blockBytesMin), bytes <= UInt64(Limits.blockBytesMax) else {
        throw ValidationError("--block-size: must be a power of two from 512 to 1M, got '\(text)'")
    }
    return Int(bytes)
}

/// Runs one request (in the server if one runs, else locally) and returns its result; on failure
/// prints the error and exits 1.
func perform(_ request: ControlRequest, store: StoreOptions, output: OutputOptions,
             options: Store.Options = Store.Options()) throws -> ControlResult {
    let renderer = ProgressRenderer(enabled: !output.json && isatty(STDOUT_FILENO) == 1 && isatty(STDERR_FILENO) == 1)
    do {
        try store.rados.requireOneNamespace()
        if store.rados.location != nil { try ensureHostDirectory(store.path) }
        let opener: ((Store.Options) throws -> Store)? = store.rados.location.map { location in
            { options in try openRadosStore(location, options: options, create: false).store }
        }
        // A server of several families needs to know which one a request is for.
        let family = store.rados.pool == nil ? nil : store.rados.namespace
        let result = try ControlClient.run(request, family: family, storePath: store.path, options: options, openStore: opener) { renderer.update($0) }
        renderer.finish()
        return result
    } catch {
        renderer.finish()
        fail(error, json: output.json)
    }
}

/// Prints `error` on stderr and exits 1.
func fail(_ error: ControlFailure, json: Bool) -> Never {
    if json {
        if let data = try? JSON.encoder.encode(["error": error]) {
            FileHandle.standardError.write(data + Data("\n".utf8))
        }
    } else {
        FileHandle.standardError.write(Data("vbdtool: error: \(error.message)\n".utf8))
    }
    Foundation.exit(1)
}

enum JSON {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return e
    }()

    static func print<T: Encodable>(_ value: T) {
        guard let data = try? encoder.encode(value) else { return }
        Swift.print(String(decoding: data, as: UTF8.self))
    }
}
