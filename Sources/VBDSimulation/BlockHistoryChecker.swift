import VBDCore

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Notes on the design
//
// Every block written by a concurrent run names itself: a header (magic, volume, block, version)
// followed by bytes generated from that header, so a block read back says which write made it,
// and anything else (another volume's or offset's block, a torn mix, garbage) is recognisable.
//
// The checker keeps, per (volume, block), every write and zeroing with the logical times it
// began and was acknowledged. A read that began at `rs` and ended at `re` may return, for each
// block, the content of any write that began before `re`, unless that write was overtaken: some
// other write began after it was acknowledged and was itself acknowledged before `rs`. This is
// the per-block register condition of linearizability (real-time order); zero is an initial
// "write" acknowledged at time -1, and TRIM / WRITE_ZEROES are writes of zero.

/// What a block read back holds.
enum BlockContent: Equatable, CustomStringConvertible {
    case zero
    case written(volume: Int, block: UInt64, version: UInt64)
    case garbage

    var description: String {
        switch self {
        case .zero: return "zeroes"
        case let .written(volume, block, version): return "v\(volume) block \(block) version \(version)"
        case .garbage: return "bytes no write produced"
        }
    }
}

enum SelfNamingBlock {
    static let magic: UInt32 = 0x4342_4456   // "VDBC"

    /// The content of `version` of `block` of `volume`, `count` bytes.
    static func fill(_ out: UnsafeMutableRawBufferPointer, volume: Int, block: UInt64, version: UInt64) {
        precondition(out.count >= 24)
        out.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
        out.storeBytes(of: UInt32(volume).littleEndian, toByteOffset: 4, as: UInt32.self)
        out.storeBytes(of: block.littleEndian, toByteOffset: 8, as: UInt64.self)
        out.storeBytes(of: version.littleEndian, toByteOffset: 16, as: UInt64.self)
        var g = SplitMix64(seed: UInt64(volume) &* 0x9E37_79B9_7F4A_7C15 ^ block &* 0xBF58_476D_1CE4_E5B9 ^ version)
        // Half the words repeat: LZ4 finds some matches, so some chunks are stored compressed.
        let repeated = g.next()
        var at = 24
        while at < out.count {
            let word = (at / 8) % 2 == 0 ? g.next() : repeated
            withUnsafeBytes(of: word.littleEndian) { w in
                let n = min(8, out.count - at)
                UnsafeMutableRawBufferPointer(rebasing: out[at..<at + n]).copyMemory(from: UnsafeRawBufferPointer(rebasing: w[0..<n]))
            }
            at += 8
        }
    }

    static func decode(_ bytes: UnsafeRawBufferPointer) -> BlockContent {
        if bytes.allSatisfy({ $0 == 0 }) { return .zero }
        guard bytes.count >= 24, UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic else {
            return .garbage
        }
        let volume = Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        let block = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let version = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        let same = withUnsafeTemporaryAllocation(byteCount: bytes.count, alignment: 16) { expected in
            fill(expected, volume: volume, block: block, version: version)
            return memcmp(expected.baseAddress!, bytes.baseAddress!, bytes.count) == 0
        }
        return same ? .written(volume: volume, block: block, version: version) : .garbage
    }
}

/// Histories of writes per block and the check of every read against them. Called by the
/// threads of a scheduled run, one at a time (the scheduler's hand-off orders the accesses).
final class BlockHistoryChecker: @unchecked Sendable {
    struct Write {
        /// 0 for zeroes (initial content, TRIM, WRITE_ZEROES).
        var version: UInt64
        var began: Int
        var acknowledged: Int?
    }

    struct Key: Hashable { var volume: Int; var block: UInt64 }

    private var clock = 0
    private var nextVersion: UInt64 = 1
    private var histories: [Key: [Write]] = [:]
    private(set) var anomalies: [String] = []
    private(set) var readsChecked = 0
    private(set) var blocksChecked = 0
    private(set) var writes = 0

    func now() -> Int { clock += 1; return clock }

    func newVersion() -> UInt64 { defer { nextVersion += 1 }; return nextVersion }

    private func history(_ key: Key) -> [Write] {
        histories[key] ?? [Write(version: 0, began: -2, acknowledged: -1)]
    }

    /// Records the start of a write of `version` (0: zeroes) to `blocks`; returns the handle to
    /// acknowledge it with.
    func begin(volume: Int, blocks: Range<UInt64>, version: UInt64) -> (volume: Int, blocks: Range<UInt64>, index: [Int]) {
        writes += 1
        let t = now()
        var index: [Int] = []
        for b in blocks {
            let key = Key(volume: volume, block: b)
            var h = history(key)
            h.append(Write(version: version, began: t, acknowledged: nil))
            index.append(h.count - 1)
            histories[key] = h
        }
        return (volume, blocks, index)
    }

    func acknowledge(_ handle: (volume: Int, blocks: Range<UInt64>, index: [Int])) {
        let t = now()
        for (k, b) in handle.blocks.enumerated() {
            histories[Key(volume: handle.volume, block: b)]![handle.index[k]].acknowledged = t
        }
    }

    /// Checks the blocks a read of `volume` starting at `firstBlock` returned; `began` is the
    /// logical time taken before the read was issued.
    func checkRead(volume: Int, firstBlock: UInt64, blockSize: Int, bytes: UnsafeRawBufferPointer, began: Int, path: String) {
        check(volume: volume, firstBlock: firstBlock, blockSize: blockSize, bytes: bytes, began: began, ended: now(), path: path)
    }

    /// What each snapshot block read so far returned: a snapshot never changes.
    private var snapshotBlocks: [String: [UInt64: BlockContent]] = [:]

    /// Checks a read of a snapshot of `volume` taken during [`taken`, `done`]: each block must be
    /// what the volume could hold at one moment of that interval, and the same at every read.
    func checkSnapshotRead(_ snapshot: String, volume: Int, firstBlock: UInt64, blockSize: Int, bytes: UnsafeRawBufferPointer,
                           taken: Int, done: Int) {
        check(volume: volume, firstBlock: firstBlock, blockSize: blockSize, bytes: bytes, began: taken, ended: done,
              path: "snapshot \(snapshot)")
        for k in 0..<(bytes.count / blockSize) {
            let block = firstBlock + UInt64(k)
            let got = SelfNamingBlock.decode(UnsafeRawBufferPointer(rebasing: bytes[k * blockSize..<(k + 1) * blockSize]))
            if let earlier = snapshotBlocks[snapshot]?[block], earlier != got {
                anomalies.append("snapshot \(snapshot) block \(block) read \(got), earlier \(earlier)")
            }
            snapshotBlocks[snapshot, default: [:]][block] = got
        }
    }

    private func check(volume: Int, firstBlock: UInt64, blockSize: Int, bytes: UnsafeRawBufferPointer, began: Int, ended: Int,
                       path: String) {
        readsChecked += 1
        for k in 0..<(bytes.count / blockSize) {
            blocksChecked += 1
            let block = firstBlock + UInt64(k)
            let got = SelfNamingBlock.decode(UnsafeRawBufferPointer(rebasing: bytes[k * blockSize..<(k + 1) * blockSize]))
            let h = history(Key(volume: volume, block: block))
            let candidates = h.filter { $0.began < ended }
            let allowed = candidates.filter { w in
                guard let ack = w.acknowledged else { return true }
                return !h.contains { later in later.began > ack && (later.acknowledged ?? .max) < began }
            }
            let fits: Bool
            switch got {
            case .zero: fits = allowed.contains { $0.version == 0 }
            case let .written(v, b, version): fits = v == volume && b == block && allowed.contains { $0.version == version }
            case .garbage: fits = false
            }
            if !fits {
                let story = h.map { w in "version \(w.version) [\(w.began), \(w.acknowledged.map(String.init) ?? "pending")]" }
                anomalies.append("\(path) read of v\(volume) block \(block) during [\(began), \(ended)] returned \(got); "
                                 + "allowed versions \(allowed.map(\.version)); history: \(story.joined(separator: ", "))")
            }
        }
    }

    func note(_ anomaly: String) { anomalies.append(anomaly) }
}
