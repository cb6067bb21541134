import VBDCore
import VBDCache

// MARK: - Notes on the design
//
// The journal is the store's write-ahead log of metadata. Block data goes to the data file first;
// a journal record then says which chunk lives where and which block maps to it. Frames carry
// the checkpoint generation, a sequence number and a checksum, so recovery reads whole frames in
// order and stops at the first torn or stale one.
//
// Two promises, two kinds of frame (docs/INVARIANTS.md 1, "A kill of the process" and power cuts):
// - Where unsynced writes outlive the process (local files: `unsyncedWritesEpoch`), a write is
//   acknowledged only once its records are in the journal file as a frame, written after the
//   chunk bytes they name and not synced: a killed process leaves both in the page cache.
//   Writers in flight together share one frame (`journalQueuedRecords`).
// - A flush syncs the data file, then writes a marker ("every record frame below sequence S
//   names durable data") and syncs the journal. After a power cut only frames a marker covers
//   are replayed, so a replayed record never names data that is not durable, and each request's
//   records (one frame) apply whole or not at all.
// Each marker names the epoch it was written in; a new journal starts with one, and an open
// writes one before anything else unless the last one already names this epoch and covers all. Recovery trusts every valid frame when the last marker's epoch is the current one (the
// process died, the machine did not), and only covered frames otherwise; a recovery that drops
// uncovered frames writes a marker that voids them, since a frame in the middle of a journal
// cannot be cut out. A failed sync of the data file may have dropped the data of frames no
// marker covers: the store then writes a synced marker in no epoch (`distrustUncoveredFramesLocked`,
// or into the journal a commit sealed), so that even a reopen in the same boot replays only
// covered frames. Where unsynced writes die with the process (RADOS), records wait in memory
// and a flush writes them after the data sync in one frame whose marker covers the frame itself.
// A bad frame followed by valid frames is corruption (``JournalDamage``) when the valid frames
// prove the bad one was synced: within the epoch, any later frame; after a power cut, two later
// markers (a flush writes its marker only after the previous flush's sync returned).
//
// Frame: magic u32 | generation u64 | sequence u64 | payload length u32 | payload | xxh3-64 u64
// (checksum over everything from generation to the end of the payload).

enum JournalRecord: Equatable {
    /// A new chunk: number, hash, packed location and shape (see ``ChunkEntry``).
    case chunk(number: UInt64, hash: ContentHash, location: UInt64, shape: UInt32)
    /// Block `block` of image `image` now holds `chunk` (0 = unmapped, ``MapRoot`` zeroAllocated).
    case map(image: UInt64, block: UInt64, chunk: UInt64)
    /// Several blocks of `image` change at once (one write request). Every new chunk is retained
    /// before any old one is released, so a chunk that moves between blocks of the batch (a
    /// swap, or a block that dedups against another block's old contents) never drops to zero.
    case mapBatch(image: UInt64, mappings: [BlockMapping])
    /// Blocks `[start, start+count)` of `image` are unmapped.
    case clear(image: UInt64, start: UInt64, count: UInt64)
    case createImage(ImageRecord)
    /// A snapshot of `source` (or a share of snapshot `source`) described by the record.
    case cloneImage(source: UInt64, ImageRecord)
    case deleteImage(UInt64)
    case resize(image: UInt64, size: UInt64)
    case renameGroup(group: SharingGroupID, name: String)
    /// The last record of a generation's journal, written just before checkpoint `nextGeneration`
    /// captures the state: this journal replayed on its own checkpoint gives exactly that state,
    /// so if checkpoint `nextGeneration` is damaged, recovery replays this journal and then
    /// journal-`nextGeneration` and loses nothing.
    case sealed(nextGeneration: UInt64)
    /// Which record frames before it name durable data, and in which epoch it was written.
    case marker(JournalMarker)

    func encode(into w: inout BinaryWriter) {
        switch self {
        case let .chunk(number, hash, location, shape):
            w.u8(1); w.varint(number); w.u64(hash.high); w.u64(hash.low); w.u64(location); w.u32(shape)
        case let .map(image, block, chunk):
            w.u8(2); w.varint(image); w.varint(block); w.varint(chunk)
        case let .mapBatch(image, mappings):
            w.u8(9); w.varint(image); w.varint(UInt64(mappings.count))
            for m in mappings { w.varint(m.block); w.varint(m.chunk) }
        case let .clear(image, start, count):
            w.u8(3); w.varint(image); w.varint(start); w.varint(count)
        case let .createImage(r):
            w.u8(4); r.encode(into: &w)
        case let .cloneImage(source, r):
            w.u8(5); w.varint(source); r.encode(into: &w)
        case let .deleteImage(id):
            w.u8(6); w.varint(id)
        case let .resize(image, size):
            w.u8(7); w.varint(image); w.varint(size)
        case let .renameGroup(group, name):
            w.u8(8); w.u16(group.rawValue); w.string(name)
        case let .sealed(nextGeneration):
            w.u8(10); w.varint(nextGeneration)
        case let .marker(m):
            w.u8(11); w.varint(m.durableBelow); w.varint(m.voided.lowerBound); w.varint(m.voided.upperBound)
            w.string(m.epoch)
        }
    }

    static func decode(_ r: inout BinaryReader) throws(BinaryReader.Malformed) -> JournalRecord {
        switch try r.u8() {
        case 1:
            let n = try r.varint()
            let h = try r.u64(), l = try r.u64()
            return .chunk(number: n, hash: ContentHash(high: h, low: l), location: try r.u64(), shape: try r.u32())
        case 2: return .map(image: try r.varint(), block: try r.varint(), chunk: try r.varint())
        case 3: return .clear(image: try r.varint(), start: try r.varint(), count: try r.varint())
        case 4: return .createImage(try ImageRecord.decode(&r))
        case 5: return .cloneImage(source: try r.varint(), try ImageRecord.decode(&r))
        case 6: return .deleteImage(try r.varint())
        case 7: return .resize(image: try r.varint(), size: try r.varint())
        case 8: return .renameGroup(group: SharingGroupID(try r.u16()), name: try r.string())
        case 9:
            let image = try r.varint()
            let n = try r.varint()
            guard n <= UInt64(r.remaining) else { throw BinaryReader.Malformed(position: r.position) }
            var mappings: [BlockMapping] = []
            mappings.reserveCapacity(Int(n))
            for _ in 0..<n { mappings.append(BlockMapping(block: try r.varint(), chunk: try r.varint())) }
            return .mapBatch(image: image, mappings: mappings)
        case 10: return .sealed(nextGeneration: try r.varint())
        case 11:
            let below = try r.varint(), voidFrom = try r.varint(), voidTo = try r.varint()
            guard voidFrom <= voidTo else { throw BinaryReader.Malformed(position: r.position) }
            return .marker(JournalMarker(durableBelow: below, voided: voidFrom..<voidTo,
                                         epoch: try r.string(maxBytes: JournalMarker.epochBytesMax)))
        default: throw BinaryReader.Malformed(position: r.position)
        }
    }
}

/// A flush's (or an open's) statement about the frames before it (see the notes above).
struct JournalMarker: Equatable {
    /// Every record frame with a lower sequence number, unless voided, names only data that was
    /// synced before this marker was written.
    var durableBelow: UInt64
    /// Record frames a recovery after a power cut dropped: never replayed, though they stay in
    /// the file (a marker after them covers earlier frames, so they cannot be cut out).
    var voided: Range<UInt64>
    /// The directory's `unsyncedWritesEpoch` when the marker was written ("" = none): frames
    /// after it, up to the next marker, were written in that epoch.
    var epoch: String

    static let epochBytesMax = 128
}

struct BlockMapping: Equatable {
    var block: UInt64
    var chunk: UInt64
}

enum JournalFrame {
    static let magic: UInt32 = 0x4A44_4256   // "VBDJ"
    static let headerBytes = 24
    static let trailerBytes = 8
    /// A frame larger than this is corrupt (pending records are capped far below it).
    static let payloadBytesMax = 1 << 30

    /// Bytes a frame of `payloadBytes` takes in the file.
    static func bytes(payload payloadBytes: Int) -> Int { headerBytes + payloadBytes + trailerBytes }

    static func encode(generation: UInt64, sequence: UInt64, payload: [UInt8]) -> [UInt8] {
        var w = BinaryWriter(capacity: payload.count + headerBytes + trailerBytes)
        w.u32(magic); w.u64(generation); w.u64(sequence); w.u32(UInt32(payload.count))
        w.raw(payload)
        let sum = w.bytes.withUnsafeBytes { metadataChecksum(UnsafeRawBufferPointer(rebasing: $0[4...])) }
        w.u64(sum)
        return w.bytes
    }

    /// Decodes the valid frames at the start of `bytes`; returns their payloads and the byte
    /// length of the valid prefix. Stops at the first frame that is torn, stale or corrupt.
    static func decodeValidPrefix(_ bytes: [UInt8], generation: UInt64) -> (payloads: [[UInt8]], validBytes: Int) {
        var payloads: [[UInt8]] = []
        var at = 0
        var expectedSequence: UInt64 = 0
        while bytes.count - at >= headerBytes + trailerBytes {
            var r = BinaryReader(bytes, position: at)
            guard let m = try? r.u32(), m == magic,
                  let g = try? r.u64(), g == generation,
                  let s = try? r.u64(), s == expectedSequence,
                  let n = try? r.u32(), Int(n) <= payloadBytesMax,
                  bytes.count - at >= headerBytes + Int(n) + trailerBytes
            else { break }
            let end = at + headerBytes + Int(n)
            let sum = bytes.withUnsafeBytes { metadataChecksum(UnsafeRawBufferPointer(rebasing: $0[(at + 4)..<end])) }
            var t = BinaryReader(bytes, position: end)
            guard let stored = try? t.u64(), stored == sum else { break }
            payloads.append(Array(bytes[(at + headerBytes)..<end]))
            at = end + trailerBytes
            expectedSequence += 1
        }
        return (payloads, at)
    }

    /// Frames of `generation` with a sequence number above `sequenceAbove`-1 that start after
    /// byte `start` and pass their checksum: looked for at every offset, since the bad frame's
    /// length cannot be trusted.
    static func validFrames(in bytes: [UInt8], after start: Int, generation: UInt64,
                            sequenceAbove first: UInt64) -> [JournalDamage.Frame] {
        var found: [JournalDamage.Frame] = []
        var at = start + 1
        while bytes.count - at >= headerBytes + trailerBytes {
            var r = BinaryReader(bytes, position: at)
            guard let m = try? r.u32(), m == magic,
                  let g = try? r.u64(), g == generation,
                  let s = try? r.u64(), s >= first,
                  let n = try? r.u32(), Int(n) <= payloadBytesMax,
                  bytes.count - at >= headerBytes + Int(n) + trailerBytes
            else { at += 1; continue }
            let end = at + headerBytes + Int(n)
            let sum = bytes.withUnsafeBytes { metadataChecksum(UnsafeRawBufferPointer(rebasing: $0[(at + 4)..<end])) }
            var t = BinaryReader(bytes, position: end)
            guard let stored = try? t.u64(), stored == sum else { at += 1; continue }
            var records = 0
            var isMarker = false
            var p = BinaryReader(Array(bytes[(at + headerBytes)..<end]))
            while p.remaining > 0, let record = try? JournalRecord.decode(&p) {
                if case .marker = record { isMarker = true } else { records += 1 }
            }
            found.append(JournalDamage.Frame(sequence: s, offset: at, payloadBytes: Int(n), records: records, holdsMarker: isMarker))
            at = end + trailerBytes
        }
        return found
    }
}

/// A corrupt journal frame with valid frames after it: what opening refuses, and exactly what a
/// repair would drop.
public struct JournalDamage: Sendable, Equatable, CustomStringConvertible {
    public struct Frame: Sendable, Equatable {
        public var sequence: UInt64
        public var offset: Int
        public var payloadBytes: Int
        public var records: Int
        /// It holds a marker (docs/FORMAT.md): two of them after a bad frame prove it was synced.
        public var holdsMarker: Bool
    }
    public var journal: String
    /// Sequence number and byte offset of the first frame that fails its checks.
    public var badFrame: UInt64
    public var badOffset: Int
    /// Bytes from the bad frame to the end of the journal (all of them would be dropped).
    public var droppedBytes: Int
    /// The valid frames found after the bad one.
    public var followingFrames: [Frame]

    /// Nil when what follows the first bad frame does not prove it was synced (a torn tail,
    /// which is normal): within the epoch that wrote the journal (`sameEpoch`) any valid frame
    /// after it does, since only the last write of a killed process can be torn; after a power
    /// cut unsynced frames land in any order, and only two markers after it do.
    init?(journal: String, bytes: [UInt8], validBytes: Int, validFrames: Int, generation: UInt64, sameEpoch: Bool) {
        let following = JournalFrame.validFrames(in: bytes, after: validBytes, generation: generation,
                                                 sequenceAbove: UInt64(validFrames))
        guard !following.isEmpty, sameEpoch || following.filter(\.holdsMarker).count >= 2 else { return nil }
        self.journal = journal
        badFrame = UInt64(validFrames)
        badOffset = validBytes
        droppedBytes = bytes.count - validBytes
        followingFrames = following
    }

    var followingDescription: String {
        followingFrames.map { "frame \($0.sequence) at offset \($0.offset) (\($0.records) records)" }.joined(separator: ", ")
    }

    public var description: String {
        let records = followingFrames.reduce(0) { $0 + $1.records }
        return "\(journal) frame \(badFrame) at offset \(badOffset) is corrupt, but \(followingFrames.count) valid frame(s) " +
            "follow it: \(followingDescription); they hold acknowledged writes (\(records) records), so this is " +
            "not a torn tail. `vbdtool fsck --repair` drops frame \(badFrame) and everything after it (\(droppedBytes) bytes)"
    }

    /// What a repair drops, said before it drops it.
    public var repairDescription: String {
        "\(journal): dropping corrupt frame \(badFrame) at offset \(badOffset) and everything after it " +
            "(\(droppedBytes) bytes), including the valid \(followingDescription); the changes they recorded are lost"
    }
}

/// What is persisted about a volume or a snapshot (an "image": anything with a map).
public struct ImageRecord: Equatable, Sendable {
    public enum Kind: UInt8, Sendable { case volume = 1, snapshot = 2 }

    public var id: UInt64
    public var kind: Kind
    /// A volume's name, or a snapshot's name without the `VOLUME@` part.
    public var name: String
    /// For a snapshot: the volume it was taken of.
    public var volumeID: UInt64
    /// For a share: the snapshot it started from (0 for a volume created empty).
    public var originID: UInt64
    public var size: UInt64
    public var blockShift: UInt8
    /// Blocks are deduplicated only between images of one sharing group.
    public var group: SharingGroupID
    /// Seconds since 1970 when it was made.
    public var createdAt: UInt64

    public var blockSize: Int { 1 << Int(blockShift) }
    public var blockCount: UInt64 { (size + UInt64(blockSize) - 1) >> UInt64(blockShift) }

    func encode(into w: inout BinaryWriter) {
        w.varint(id); w.u8(kind.rawValue); w.string(name); w.varint(volumeID); w.varint(originID)
        w.varint(size); w.u8(blockShift); w.u16(group.rawValue); w.varint(createdAt)
    }

    static func decode(_ r: inout BinaryReader) throws(BinaryReader.Malformed) -> ImageRecord {
        let id = try r.varint()
        guard let kind = Kind(rawValue: try r.u8()) else { throw BinaryReader.Malformed(position: r.position) }
        let name = try r.string(maxBytes: Limits.nameBytesMax)
        let volumeID = try r.varint(), originID = try r.varint(), size = try r.varint()
        let shift = try r.u8()
        guard shift >= 9 && shift <= 20 && size <= Limits.volumeBytesMax else { throw BinaryReader.Malformed(position: r.position) }
        return ImageRecord(id: id, kind: kind, name: name, volumeID: volumeID, originID: originID, size: size,
                           blockShift: shift, group: SharingGroupID(try r.u16()), createdAt: try r.varint())
    }
}
