import Foundation
import VBDAccounting

// MARK: - Notes on the design
//
// The control protocol lets `vbdtool` run a command inside a running `vbdtool serve`, so that the
// CLI and the server never open one store as two writers (the store's flock forbids it anyway).
//
//   client                                server (one thread per connection, at most
//     | connect DIR/control.sock (0600)     |  ControlLimits.connectionsMax at once)
//     | frame(ControlEnvelope)  ----------> |
//     | <----------  frame(.progress(..))*  |  long work only, throttled
//     | <----------  frame(.success | .failure)
//     | close                               |
//
// A frame is a 4-byte big-endian length followed by that many bytes of JSON (Codable). One
// request per connection keeps both sides trivial and makes a crashed client harmless. Requests
// are at most ControlLimits.requestBytesMax, replies at most ControlLimits.replyBytesMax; a peer
// announcing more is cut off before anything is allocated. Failures carry the store's stable
// `StoreError.code`, its message, and for `has-dependents` the names that block the delete.
//
// The same `ControlService.execute` runs a request in the server and, when no server answers, in
// the CLI process against a store it opens itself: one code path, whichever side runs it.

/// The protocol version a client sends; a server refuses versions it does not know.
public let controlProtocolVersion = 1

/// One operator command, as sent over the control socket.
public enum ControlRequest: Codable, Sendable, Equatable {
    /// Asks a server who it is (and proves that one is running).
    case ping
    /// `group` nil: a sharing group of the volume's own.
    case create(name: String, size: UInt64, blockSize: Int, group: String?)
    case list
    case info(name: String)
    /// `target` is `VOLUME@NAME`.
    case snapshot(target: String)
    case share(snapshot: String, newName: String)
    case remove(name: String, force: Bool)
    case resize(name: String, size: UInt64)
    case diff(from: String, to: String)
    /// `path` is absolute: the server may run in another directory. `format` nil = detect.
    case importImage(path: String, name: String, blockSize: Int, group: String?, format: String?)
    case exportImage(name: String, path: String, overwrite: Bool)
    case stats
    case gc
    case fsck(verifyData: Bool)
    /// Hypervisor clean-page interface of the last-chance tier (Xen tmem / cleancache style):
    /// guest `domain` discards a clean page of `volume` at `offset`; a later get returns it only
    /// while the volume still maps that offset to the same contents.
    /// Tells the server which tenant (a `DomainID` name) hypervisor domain `domain` runs for; put and
    /// get then serve the domain only volumes that tenant holds a lease on. Invalidating the whole
    /// domain detaches it.
    case cleanPageAttach(domain: UInt64, tenant: String)
    case cleanPagePut(domain: UInt64, volume: String, offset: UInt64, page: Data)
    case cleanPageGet(domain: UInt64, volume: String, offset: UInt64, length: Int)
    /// Forgets one page (`volume` and `offset`), a volume's pages (`offset` nil), or a domain's (both nil).
    case cleanPageInvalidate(domain: UInt64, volume: String?, offset: UInt64?)
    /// Accounting, leases, policies, credit and the audit log (docs/ACCOUNTING.md).
    case tenancy(TenancyRequest)
    /// Who held `volume` between two times (nanoseconds since 1970) and what changed, from the
    /// audit log and the snapshot diff.
    case forensics(volume: String, fromNanoseconds: Int64, toNanoseconds: Int64)
    /// `vbdtool volume move`: the server stops serving the RADOS family `family` (a family's name,
    /// or a volume, snapshot or share in it), commits it, releases its lock and has the server
    /// whose control socket is `toHost`/control.sock take it over (docs/RADOS.md, "Moving a
    /// volume between hosts"). Only a server runs it.
    case moveFamily(family: String, toHost: String)
    /// Sent by a server moving a family here: take the family (namespace `namespace` of `pool`)
    /// over, replay its journal and serve its exports. Only a server serving RADOS families runs it.
    case adoptFamily(pool: String, namespace: String)

    /// Whether the request only reads the store: run without a server, it opens the store
    /// read-only (a shared lock, no checkpoint, no recovery that writes) and leaves every file as it was.
    public var onlyReadsStore: Bool {
        switch self {
        case .list, .info, .diff, .stats, .fsck, .exportImage: return true
        default: return false
        }
    }

    /// Whether only a running server can do it (no store is opened for it without one).
    public var needsServer: Bool {
        switch self {
        case .ping, .moveFamily, .adoptFamily: return true
        default: return false
        }
    }

    /// Whether the request reads or writes a file named by path (so a client must send an absolute one).
    public var involvesFile: Bool {
        switch self {
        case .importImage, .exportImage: return true
        default: return false
        }
    }
}

/// What travels in a request frame.
public struct ControlEnvelope: Codable, Sendable, Equatable {
    public var version: Int
    public var request: ControlRequest
    /// The RADOS family (namespace) the request is for, when the client named one (`--namespace`):
    /// a server serving several families needs it for requests that name no existing image
    /// (create, import, stats, gc, fsck). Absent in older clients' requests.
    public var family: String?
    public init(version: Int = controlProtocolVersion, request: ControlRequest, family: String? = nil) {
        self.version = version
        self.request = request
        self.family = family
    }
}

/// What travels in a reply frame: progress (zero or more), then exactly one success or failure.
public enum ControlReply: Codable, Sendable, Equatable {
    case progress(ProgressReport)
    case success(ControlResult)
    case failure(ControlFailure)
}

/// How far a long operation has come.
public struct ProgressReport: Codable, Sendable, Equatable {
    /// What is being done: `import`, `export`, `fsck`, `gc`.
    public var phase: String
    public var done: UInt64
    /// Zero when unknown.
    public var total: UInt64
    /// What `done` and `total` count: `bytes`, `chunks`, `percent` or `steps`.
    public var unit: String
    public init(phase: String, done: UInt64, total: UInt64, unit: String) {
        self.phase = phase
        self.done = done
        self.total = total
        self.unit = unit
    }
}

/// Called with progress reports; may be called from any thread.
public typealias ProgressSink = @Sendable (ProgressReport) -> Void

/// A failed command: a stable code (`StoreError.code` where the store said no), a message for
/// people, and for `has-dependents` the names that block it.
public struct ControlFailure: Error, Codable, Sendable, Equatable, CustomStringConvertible {
    public var code: String
    public var message: String
    public var dependents: [String]?
    public init(code: String, message: String, dependents: [String]? = nil) {
        self.code = code
        self.message = message
        self.dependents = dependents
    }
    public var description: String { message }
}

/// The result of a successful command.
public enum ControlResult: Codable, Sendable, Equatable {
    case pong(ServerStatus)
    case done
    case image(ImageSummary)
    case images([ImageSummary])
    case ranges(DiffReport)
    case stats(StoreStatistics)
    case gc(GCReport)
    case fsck(FsckSummary)
    case transfer(TransferReport)
    /// A clean-page get: the page, or nil on a miss.
    case page(Data?)
    case tenancy(TenancyResponse)
    case forensics(ForensicsReport)
    case moved(MoveReport)
    case adopted(AdoptionReport)
}

/// What `vbdtool volume move` did.
public struct MoveReport: Codable, Sendable, Equatable {
    /// The family (RADOS namespace) moved, and the exports (volumes, snapshots, shares) it holds.
    public var family: String
    public var exports: [String]
    /// The target's host directory, and where its NBD clients connect now.
    public var toHost: String
    public var nbdAddresses: [String]
    /// NBD connections of the family's exports that the source closed (after answering their
    /// requests in flight).
    public var connectionsClosed: Int
    /// From the family's exports being withdrawn here to the target serving them.
    public var seconds: Double
    public init(family: String, exports: [String], toHost: String, nbdAddresses: [String], connectionsClosed: Int, seconds: Double) {
        self.family = family
        self.exports = exports
        self.toHost = toHost
        self.nbdAddresses = nbdAddresses
        self.connectionsClosed = connectionsClosed
        self.seconds = seconds
    }
}

/// The answer of a server that took a family over (`adoptFamily`).
public struct AdoptionReport: Codable, Sendable, Equatable {
    public var family: String
    public var exports: [String]
    public var nbdAddresses: [String]
    /// Owners blocklisted because they held the lock without handing it over (empty after a move).
    public var fenced: [String]
    public init(family: String, exports: [String], nbdAddresses: [String], fenced: [String]) {
        self.family = family
        self.exports = exports
        self.nbdAddresses = nbdAddresses
        self.fenced = fenced
    }
}

/// Who answered on the control socket.
public struct ServerStatus: Codable, Sendable, Equatable {
    public var pid: Int32
    public var storePath: String
    /// Where NBD clients connect, e.g. `127.0.0.1:10809`, `unix:/run/vbd.sock`.
    public var nbdAddresses: [String]
    /// The RADOS families (namespaces) served, for a `serve --rados` server; nil otherwise.
    public var families: [String]?
    public init(pid: Int32, storePath: String, nbdAddresses: [String], families: [String]? = nil) {
        self.pid = pid
        self.storePath = storePath
        self.nbdAddresses = nbdAddresses
        self.families = families
    }
}

/// A volume or snapshot, as `list`, `info`, `create`, `snapshot` and `share` print it.
public struct ImageSummary: Codable, Sendable, Equatable {
    /// `VOLUME` or `VOLUME@SNAPSHOT`: also the NBD export name.
    public var name: String
    /// `volume` or `snapshot`.
    public var kind: String
    public var size: UInt64
    public var blockSize: Int
    /// Seconds since 1970 (UTC).
    public var createdAt: UInt64
    /// For a share: the snapshot it was made from, while that exists.
    public var origin: String?
    public var group: String
    public var readOnly: Bool
}

/// Changed byte ranges between two images (`diff`).
public struct DiffReport: Codable, Sendable, Equatable {
    public var from: String
    public var to: String
    public var ranges: [ByteRange]
    /// Sum of the range lengths.
    public var changedBytes: UInt64
}

public struct ByteRange: Codable, Sendable, Equatable {
    public var offset: UInt64
    public var length: UInt64
    public init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }
}

/// Store-wide and per-image space figures (`stats`), from `Store.usage()`.
public struct StoreStatistics: Codable, Sendable, Equatable {
    public var storePath: String
    /// True when a running server answered (cache figures are present only then).
    public var live: Bool
    /// Distinct stored blocks (after dedup).
    public var uniqueChunks: Int
    /// Bytes the chunks take in the data file (LZ4-compressed, rounded to 512-byte sectors).
    public var storedBytes: UInt64
    /// Uncompressed bytes of the chunks.
    public var chunkRawBytes: UInt64
    /// Data bytes summed over every volume and snapshot: what they would take without any sharing
    /// (a block a volume shares with its snapshot counts twice).
    public var logicalAllocatedBytes: UInt64
    /// The data file's size, and what it occupies on disk (`du`: holes excluded).
    public var dataFileBytes: UInt64
    public var dataFileBytesOnDisk: UInt64
    /// Superblock, checkpoint and journal bytes on disk.
    public var metadataBytesOnDisk: UInt64
    /// RAM of the chunk index structures.
    public var indexMemoryBytes: Int
    /// logicalAllocatedBytes / chunkRawBytes (dedup, snapshots and shares together); nil when empty.
    public var dedupRatio: Double?
    /// chunkRawBytes / storedBytes; nil when empty.
    public var compressionRatio: Double?
    /// logicalAllocatedBytes / storedBytes: both together; nil when empty.
    public var dataReductionRatio: Double?
    public var images: [ImageStatistics]
    /// The universal cache, when a server runs with one.
    public var cache: CacheFigures?
}

/// Space one volume or snapshot uses (`stats`).
public struct ImageStatistics: Codable, Sendable, Equatable {
    public var name: String
    /// `volume` or `snapshot`.
    public var kind: String
    /// Logical size.
    public var size: UInt64
    /// Bytes of blocks that hold data (neither holes nor zeroes).
    public var allocatedBytes: UInt64
    /// Allocated bytes whose contents nothing else holds.
    public var uniqueBytes: UInt64
    /// Allocated bytes whose storage another image (or another block) also holds.
    public var sharedBytes: UInt64
    /// Bytes on disk of the chunks only this image holds: what deleting it would free.
    public var exclusiveStoredBytes: UInt64
    /// This image's fair share of the bytes on disk (each chunk split among its holders); the
    /// shares of all images add up to `storedBytes`.
    public var fairStoredBytes: UInt64
    /// allocatedBytes / fairStoredBytes: how much less than its data this image costs; nil when empty.
    public var dataReductionRatio: Double?
    /// This image's cache counters, when a server with a cache runs.
    public var cache: CacheFigures?
}

/// Counters of the universal cache and its last-chance tier.
public struct CacheFigures: Codable, Sendable, Equatable {
    public var capacityBytes: Int?
    public var lastChanceCapacityBytes: Int?
    public var hits: UInt64
    public var lastChanceHits: UInt64
    public var misses: UInt64
    public var hitRatio: Double?
    public var bytesHeld: UInt64
    public var entries: UInt64
    public var lastChanceBytesHeld: UInt64
    public var lastChanceEntries: UInt64
    public var lastChanceCompressionRatio: Double?
    public var bytesSavedBySharing: UInt64
}

/// What `gc` reclaimed.
public struct GCReport: Codable, Sendable, Equatable {
    public var storedBytesBefore: UInt64
    public var storedBytesAfter: UInt64
    /// The data file's size (gc truncates free space at its end).
    public var dataFileBytesBefore: UInt64
    public var dataFileBytesAfter: UInt64
    /// What the data file occupies on disk (`du`).
    public var dataFileBytesOnDiskBefore: UInt64
    public var dataFileBytesOnDiskAfter: UInt64
    public var metadataBytesOnDiskBefore: UInt64
    public var metadataBytesOnDiskAfter: UInt64
    /// A store whose chunks are shared RADOS objects: what the leak sweep released that no record
    /// of the store claimed (references, and the objects that went with their last one). Nil for
    /// a store whose chunks are in its data file.
    public var unclaimedChunkReferencesReleased: Int? = nil
    public var unclaimedChunkObjectsRemoved: Int? = nil
    public var unclaimedChunkBytesRemoved: UInt64? = nil
}

/// What `fsck` found.
public struct FsckSummary: Codable, Sendable, Equatable {
    public var clean: Bool
    public var dataVerified: Bool
    public var images: Int
    public var mapNodes: Int
    public var mappedBlocks: UInt64
    public var chunks: Int
    public var chunkBytesVerified: UInt64
    public var problems: [String]
}

/// What `import` or `export` moved.
public struct TransferReport: Codable, Sendable, Equatable {
    public var name: String
    public var path: String
    /// The source format (`raw`, `qcow2`, ...) for import; `raw` for export.
    public var format: String
    public var size: UInt64
    /// Bytes actually read from or written to the volume (holes and zero blocks skipped).
    public var dataBytes: UInt64
    public var seconds: Double
}

/// `vbdtool audit forensics`: holders of a volume over an interval and what changed in it.
public struct ForensicsReport: Codable, Sendable, Equatable {
    public struct Holding: Codable, Sendable, Equatable {
        public var domain: String
        public var mode: String
        public var fromNanoseconds: Int64
        /// When the holding ended (nil: still held, until `expiresNanoseconds`).
        public var untilNanoseconds: Int64?
        public var end: String?
        public var expiresNanoseconds: Int64
    }
    public var volume: String
    /// The snapshots bounding the interval (nil: none recorded).
    public var fromSnapshot: String?
    public var toSnapshot: String?
    public var changedRanges: [ByteRange]
    public var holders: [Holding]
}
