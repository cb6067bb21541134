import ArgumentParser
import Foundation
import VBDControl
import VBDCore
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
            LeaseCommand.self, AuditCommand.self, DomainCommand.self,
        ]
    )
}

/// `--store PATH` (or $VBD_STORE, or ./vbd-data).
struct StoreOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Store directory (default: $VBD_STORE, else ./vbd-data).", valueName: "path"))
    var store: String?

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
        let result = try ControlClient.run(request, storePath: store.path, options: options) { renderer.update($0) }
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
