import ArgumentParser
import Foundation
import VBDControl

struct VolumeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Move volumes between servers (RADOS families).",
        subcommands: [Move.self])

    struct Move: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "move", abstract: "Move a RADOS family (a volume with its snapshots and shares) to another server.",
            discussion: """
                Runs in the server of --store DIR, which must own the family: it stops serving the family's exports \
                (NBD clients get the answers to their requests in flight, then the connection closes), commits the \
                family, releases its lock with nobody fenced, and asks the server of HOST to take it over; that server \
                replays the journal and serves the exports under the same names. The other families of both servers \
                keep serving. Prints where NBD clients reconnect. If HOST does not take the family, it is served \
                here again and the command fails. One move at a time per server.
                """)
        @Argument(help: ArgumentHelp("The family (its --namespace), or a volume, snapshot or share in it.", valueName: "family-or-volume"))
        var target: String
        @Option(name: .customLong("to"), help: ArgumentHelp("The target server's --store directory (it listens on HOST/control.sock); it must run `serve --rados` on the same pool.", valueName: "host"))
        var toHost: String
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions

        func run() throws {
            guard case let .moved(m) = try perform(.moveFamily(family: target, toHost: absolutePath(toHost)), store: store, output: output) else { return }
            if output.json { JSON.print(m); return }
            print("moved the family \(m.family) (\(m.exports.joined(separator: ", "))) to \(m.toHost) in \(String(format: "%.2f", m.seconds)) s; " +
                  "\(m.connectionsClosed) NBD connection(s) closed here")
            print("NBD clients connect to: \(m.nbdAddresses.joined(separator: ", "))")
        }
    }
}
