import ArgumentParser
import Foundation
import VBDControl
import VBDCore
import VBDRados
import VBDStore

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "init", abstract: "Create an empty store.")
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions
    @Option(name: .customLong("share-chunks-as"), help: ArgumentHelp("With --rados: keep the store's chunks as objects shared by every store of this sharing domain in the pool (namespace vbd-chunks), so that stores of other namespaces and hosts deduplicate with it; fixed for the store's life.", valueName: "domain"))
    var shareChunksAs: String?

    func validate() throws {
        if shareChunksAs != nil && store.rados.location == nil { throw ValidationError("--share-chunks-as needs --rados POOL") }
        if store.rados.namespaces.count > 1 { throw ValidationError("--namespace: init creates one store; give it once") }
    }

    func run() throws {
        if let location = store.rados.location {
            do {
                let created = try openRadosStore(location, options: Store.Options(), create: true, sharingDomain: shareChunksAs).store
                try created.close()
            } catch {
                fail(ControlFailure(error), json: output.json)
            }
            if output.json { JSON.print(["store": location.description]) } else {
                print("initialised an empty store at \(location)" + (shareChunksAs.map { ", its chunks shared in domain \($0)" } ?? ""))
            }
            return
        }
        let path = store.path
        do {
            let created = try Store.initialize(path: path)
            try created.close()
        } catch {
            fail(ControlFailure(error), json: output.json)
        }
        if output.json { JSON.print(["store": path]) } else { print("initialised an empty store at \(path)") }
    }
}

struct CreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "Create an empty volume.")
    @Argument(help: "Volume name (letters, digits, '-', '_', '.', ':').") var name: String
    @Option(help: "Size, e.g. 20G, 512M, 1T or plain bytes.") var size: String
    @Option(help: "Block size, a power of two from 512 to 1M (default 4K).") var blockSize: String = "4K"
    @Option(help: "Sharing group: blocks are deduplicated (and cached) only within one group. Default: a group of the volume's own (its snapshots and shares inherit it); name a group to deduplicate with the other volumes in it.") var group: String?
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        _ = try parseSize(size, option: "--size")
        _ = try parseBlockSize(blockSize)
    }

    func run() throws {
        let bytes = try parseSize(size, option: "--size")
        let block = try parseBlockSize(blockSize)
        let result = try perform(.create(name: name, size: bytes, blockSize: Int(block), group: group), store: store, output: output)
        printImage(result, output: output, verb: "created")
    }
}

func printImage(_ result: ControlResult, output: OutputOptions, verb: String?) {
    guard case let .image(image) = result else { return }
    if output.json { JSON.print(image); return }
    print((verb.map { $0 + " " } ?? "") + Human.describe(image))
}

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List volumes and snapshots.")
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard case let .images(images) = try perform(.list, store: store, output: output) else { return }
        if output.json { JSON.print(images); return }
        if images.isEmpty { print("no volumes (create one with `vbdtool create NAME --size 20G`)"); return }
        var table = Table("NAME", "KIND", "SIZE", "BLOCK", "GROUP", "CREATED", "ORIGIN")
        for i in images {
            table.add(i.name, i.kind, Human.size(i.size), Human.size(UInt64(i.blockSize)), i.group, Human.date(i.createdAt), i.origin ?? "-")
        }
        print(table.render())
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show one volume or snapshot.")
    @Argument(help: "VOLUME or VOLUME@SNAPSHOT.") var name: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard case let .image(i) = try perform(.info(name: name), store: store, output: output) else { return }
        if output.json { JSON.print(i); return }
        var table = Table("FIELD", "VALUE")
        table.add("name", i.name)
        table.add("kind", i.readOnly ? "snapshot (read-only)" : "volume")
        table.add("size", "\(Human.size(i.size)) (\(i.size) bytes)")
        table.add("block size", Human.size(UInt64(i.blockSize)))
        table.add("group", i.group)
        table.add("created", Human.date(i.createdAt))
        table.add("origin", i.origin ?? "-")
        print(table.render())
    }
}

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Take a read-only snapshot of a volume (O(1), crash-consistent).",
        discussion: "Holds exactly the writes completed before the command; works while the volume is being served and written.")
    @Argument(help: "VOLUME@NAME.") var target: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        printImage(try perform(.snapshot(target: target), store: store, output: output), output: output, verb: "created")
    }
}

struct ShareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "share", abstract: "Create a writable volume that starts as a snapshot's contents (O(1)).",
        discussion: "The new volume can be opened over NBD at once, also while a server runs.")
    @Argument(help: "VOLUME@SNAPSHOT to start from.") var snapshot: String
    @Argument(help: "Name of the new volume.") var newVolume: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        printImage(try perform(.share(snapshot: snapshot, newName: newVolume), store: store, output: output), output: output, verb: "created")
    }
}

struct RemoveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rm", abstract: "Delete a volume or a snapshot.",
        discussion: """
            A volume with snapshots, or a snapshot with shares, is refused unless --force. With --force a volume \
            goes with its snapshots; shares made from a deleted snapshot keep all their data.
            """)
    @Argument(help: "VOLUME or VOLUME@SNAPSHOT.") var name: String
    @Flag(help: "Delete even when snapshots or shares depend on it.") var force = false
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        _ = try perform(.remove(name: name, force: force), store: store, output: output)
        if output.json { JSON.print(["deleted": name]) } else { print("deleted \(name)") }
    }
}

struct ResizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "resize", abstract: "Grow a volume (shrinking is refused: it would drop data).")
    @Argument(help: "Volume name.") var name: String
    @Option(help: "New size, e.g. 40G.") var size: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        _ = try parseSize(size, option: "--size")
    }

    func run() throws {
        let bytes = try parseSize(size, option: "--size")
        printImage(try perform(.resize(name: name, size: bytes), store: store, output: output), output: output, verb: "resized")
    }
}

struct DiffCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff", abstract: "List the byte ranges that differ between two snapshots (or volumes).",
        discussion: "Computed from the maps: shared parts are skipped without reading data.")
    @Argument(help: "VOLUME@SNAPSHOT (older).") var from: String
    @Argument(help: "VOLUME@SNAPSHOT or VOLUME (newer).") var to: String
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard case let .ranges(report) = try perform(.diff(from: from, to: to), store: store, output: output) else { return }
        if output.json { JSON.print(report); return }
        var table = Table("OFFSET", "LENGTH", "END")
        for r in report.ranges { table.add("\(r.offset)", "\(r.length)", "\(r.offset + r.length)") }
        if !report.ranges.isEmpty { print(table.render()) }
        print("\(report.ranges.count) changed range(s), \(Human.size(report.changedBytes)) between \(from) and \(to)")
    }
}
