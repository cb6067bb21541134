import ArgumentParser
import Foundation
import VBDControl
import VBDCore
import VBDRados
import VBDStore

struct ImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import", abstract: "Create a volume from a disk image file.",
        discussion: """
            Raw images are read directly; qcow2, vmdk, vdi and other formats go through qemu-img (when installed). \
            Holes and all-zero blocks are skipped, so the volume stays sparse. The volume gets the image's virtual size.
            """)
    @Argument(help: "Image file.") var file: String
    @Argument(help: "Name of the new volume.") var name: String
    @Option(help: "Source format (raw, qcow2, ...); detected with qemu-img when omitted.") var format: String?
    @Option(help: "Block size of the new volume (default 4K).") var blockSize: String = "4K"
    @Option(help: "Sharing group of the new volume (default: a group of its own; name one to deduplicate with the other volumes in it).") var group: String?
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func validate() throws {
        _ = try parseBlockSize(blockSize)
    }

    func run() throws {
        let block = try parseBlockSize(blockSize)
        let request = ControlRequest.importImage(path: absolutePath(file), name: name, blockSize: Int(block), group: group, format: format)
        guard case let .transfer(t) = try perform(request, store: store, output: output) else { return }
        if output.json { JSON.print(t); return }
        print("imported \(t.path) (\(t.format), \(Human.size(t.size))) into \(t.name): \(Human.size(t.dataBytes)) of data in \(String(format: "%.1f", t.seconds)) s")
    }
}

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export", abstract: "Write a volume or snapshot to a raw image file (sparse).",
        discussion: "Export a snapshot (VOLUME@SNAP) of a volume in use, so the file is one point in time.")
    @Argument(help: "VOLUME or VOLUME@SNAPSHOT.") var name: String
    @Argument(help: "Output file (raw).") var file: String
    @Flag(help: "Overwrite the file if it exists.") var force = false
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        let request = ControlRequest.exportImage(name: name, path: absolutePath(file), overwrite: force)
        guard case let .transfer(t) = try perform(request, store: store, output: output) else { return }
        if output.json { JSON.print(t); return }
        print("exported \(t.name) (\(Human.size(t.size))) to \(t.path): \(Human.size(t.dataBytes)) of data in \(String(format: "%.1f", t.seconds)) s")
    }
}

struct StatsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats", abstract: "Show space, sharing, dedup and compression figures (and cache figures of a running server).",
        discussion: """
            Per image: ALLOCATED = bytes of blocks holding data; UNIQUE = of those, contents nothing else holds; \
            SHARED = storage another volume, snapshot or block also holds; OWN ON DISK = what deleting it would free; \
            FAIR SHARE = its part of the stored bytes, each block split among its holders (they add up to the store's).
            """)
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard case let .stats(s) = try perform(.stats, store: store, output: output) else { return }
        if output.json { JSON.print(s); return }
        var summary = Table("STORE", s.storePath + (s.live ? " (served)" : ""))
        summary.add("stored", "\(Human.size(s.storedBytes)) in \(s.uniqueChunks) unique blocks (\(Human.size(s.chunkRawBytes)) uncompressed)")
        summary.add("data file", "\(Human.size(s.dataFileBytes)), \(Human.size(s.dataFileBytesOnDisk)) on disk; metadata \(Human.size(s.metadataBytesOnDisk))")
        summary.add("logical data", "\(Human.size(s.logicalAllocatedBytes)) over all volumes and snapshots")
        summary.add("dedup", Human.ratio(s.dedupRatio))
        summary.add("compression", Human.ratio(s.compressionRatio))
        summary.add("data reduction", Human.ratio(s.dataReductionRatio))
        summary.add("index memory", Human.size(UInt64(s.indexMemoryBytes)))
        if let c = s.cache {
            summary.add("cache", "\(Human.size(c.bytesHeld)) in \(c.entries) blocks of \(c.capacityBytes.map { Human.size(UInt64($0)) } ?? "?"), hit ratio \(c.hitRatio.map { String(format: "%.1f%%", $0 * 100) } ?? "-") (\(c.hits) hits, \(c.lastChanceHits) last-chance hits, \(c.misses) misses), saved by sharing \(Human.size(c.bytesSavedBySharing))")
            summary.add("last-chance", "\(Human.size(c.lastChanceBytesHeld)) in \(c.lastChanceEntries) blocks, compression \(Human.ratio(c.lastChanceCompressionRatio))")
        }
        print(summary.render())
        print("")
        var header = ["NAME", "KIND", "SIZE", "ALLOCATED", "UNIQUE", "SHARED", "OWN ON DISK", "FAIR SHARE"]
        if s.live { header.append("CACHE HITS/MISSES") }
        var table = Table(header)
        for i in s.images {
            var row = [i.name, i.kind, Human.size(i.size), Human.size(i.allocatedBytes), Human.size(i.uniqueBytes), Human.size(i.sharedBytes),
                       Human.size(i.exclusiveStoredBytes), Human.size(i.fairStoredBytes)]
            if s.live { row.append(i.cache.map { "\($0.hits + $0.lastChanceHits)/\($0.misses)" } ?? "-") }
            table.rows.append(row)
        }
        print(s.images.isEmpty ? "no volumes" : table.render())
    }
}

struct GCCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc", abstract: "Make pending frees durable, compact the journal into a checkpoint and give space back.",
        discussion: "The store frees unreferenced blocks as soon as their last reference goes; gc finishes that work now.")
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard case let .gc(g) = try perform(.gc, store: store, output: output) else { return }
        if output.json { JSON.print(g); return }
        var table = Table("", "BEFORE", "AFTER")
        table.add("stored bytes", Human.size(g.storedBytesBefore), Human.size(g.storedBytesAfter))
        table.add("data file size", Human.size(g.dataFileBytesBefore), Human.size(g.dataFileBytesAfter))
        table.add("data file on disk", Human.size(g.dataFileBytesOnDiskBefore), Human.size(g.dataFileBytesOnDiskAfter))
        table.add("metadata on disk", Human.size(g.metadataBytesOnDiskBefore), Human.size(g.metadataBytesOnDiskAfter))
        print(table.render())
        if let references = g.unclaimedChunkReferencesReleased {
            // A store of a sharing domain: the leak sweep's work (docs/RADOS.md).
            print("unclaimed chunk references released: \(references) (\(g.unclaimedChunkObjectsRemoved ?? 0) objects, "
                  + "\(Human.size(g.unclaimedChunkBytesRemoved ?? 0)) removed)")
        }
    }
}

struct FsckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fsck", abstract: "Check every map, reference count and (unless --no-data) every stored block.",
        discussion: """
            Exit status 2 when problems are found. On a served store, I/O pauses while fsck runs. \
            Without a server fsck opens the store read-only and changes nothing. A store that refuses to open because \
            its journal has a corrupt frame followed by valid ones opens with --repair, which first prints exactly \
            which frames it drops (the corrupt one and every one after it), then drops them.
            """)
    @Flag(name: .customLong("no-data"), help: "Skip rehashing the stored blocks (metadata checks only).") var skipData = false
    @Flag(help: "Drop a corrupt journal frame and the valid frames after it, saying which, so the store opens.") var repair = false
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        var options = Store.Options()
        if repair {
            options.repairJournal = { damage in
                FileHandle.standardError.write(Data("vbdtool: repair: \(damage.repairDescription)\n".utf8))
                return true
            }
        }
        guard case let .fsck(f) = try perform(.fsck(verifyData: !skipData), store: store, output: output, options: options) else { return }
        if output.json {
            JSON.print(f)
        } else {
            print("\(f.images) images, \(f.mapNodes) map nodes, \(f.mappedBlocks) mapped blocks, \(f.chunks) stored blocks" +
                  (f.dataVerified ? ", \(Human.size(f.chunkBytesVerified)) verified" : " (data not verified)"))
            if f.clean { print("clean") } else {
                print("\(f.problems.count) problem(s):")
                for p in f.problems { print("  \(p)") }
            }
        }
        if !f.clean { throw ExitCode(2) }
    }
}

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show whether a server is serving the store, and where NBD clients connect.",
        discussion: "Exit status 0 when a server answers on the store's control socket, 1 when none runs.")
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard case let .pong(s) = try perform(.ping, store: store, output: output) else { return }
        if output.json { JSON.print(s); return }
        print("serving \(s.storePath) (pid \(s.pid)); NBD: \(s.nbdAddresses.joined(separator: ", "))")
        if let families = s.families { print("families: \(families.isEmpty ? "none" : families.joined(separator: ", "))") }
    }
}

/// Releases the shared chunk references of a family deleted as a whole (docs/RADOS.md, "What a
/// crash leaves"): nothing else ever judges them, since only the owner of a family's namespace
/// may, and a deleted family has none.
struct SweepDeletedFamilyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sweep-deleted-family",
        abstract: "Release every shared chunk reference of a RADOS family whose store was deleted (--rados POOL --namespace NS).",
        discussion: """
            Takes the namespace's lock (refused while a server owns it), refuses while any file of a store is left in \
            the namespace, then releases every reference the family holds on the chunk objects of the pool (namespace \
            vbd-chunks); objects whose last reference goes are removed.
            """)
    @OptionGroup var store: StoreOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        guard let location = store.rados.location else { throw ValidationError("sweep-deleted-family needs --rados POOL --namespace NS") }
        do {
            try store.rados.requireOneNamespace()
            let released: UnclaimedChunkRelease
            do {
                let (directory, _) = try RadosStore.openDirectory(location, ownership: .acquire, readOnly: false)
                defer { directory.unlock() }
                let chunks = try directory.pool.connection.openPool(location.pool, namespace: RadosChunkStorage.chunkNamespace)
                defer { chunks.close() }
                released = try RadosChunkStorage.releaseDeletedFamily(directory, chunks: chunks)
            } catch let error as ControlFailure {
                throw error
            } catch let error as RadosError {
                throw ControlFailure(code: "io", message: "\(location) (\(location.configurationFile)): \(error)")
            } catch let error as RadosChunkError {
                throw ControlFailure(code: "refused", message: "\(location): \(error)")
            } catch {
                throw ControlFailure(error)
            }
            if output.json {
                JSON.print(["references": UInt64(released.references), "objectsRemoved": UInt64(released.objectsRemoved),
                            "bytesRemoved": released.bytesRemoved])
            } else {
                print("released \(released.references) chunk references of \(location) (\(released.objectsRemoved) objects, "
                      + "\(Human.size(released.bytesRemoved)) removed)")
            }
        } catch let error as ControlFailure {
            fail(error, json: output.json)
        }
    }
}
