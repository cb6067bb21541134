import CLZ4
import Synchronization

/// LZ4 block compression, the only place that calls liblz4.
public enum BlockCompression {
    /// Worst-case compressed size for `count` input bytes.
    @inlinable
    public static func bound(_ count: Int) -> Int { Int(LZ4_compressBound(Int32(count))) }

    /// LZ4's acceleration factor for stored blocks: 4 takes about 40 % off 2's compression time
    /// (Benchmarks/README.md, "Issue 14, eighth round"). Decompression does not depend on it.
    public static let acceleration: Int32 = 4
    /// A block that the fast pass shrinks by less than this fraction of its size (an eighth: not
    /// one 512-byte sector of a 4 KiB block) may be compressed again at acceleration 1: blocks of
    /// short runs that acceleration 4 skips past are then still stored compressed.
    public static let secondPassBelowSavedFraction = 8
    /// Whether second passes pay is measured, not assumed: where blocks do not compress at all
    /// they save nothing and cost as much as the first. A second pass runs while at least a
    /// quarter of the recent ones made the block worth storing compressed, and otherwise every
    /// 16th time, to notice when the data changes. Each store keeps its own record (one store's
    /// data does not decide for another's); the counts are halved every 1024 passes.
    public final class SecondPassRecord: Sendable {
        /// Low 32 bits: passes tried; high 32 bits: passes that paid.
        private let counts = Atomic<UInt64>(0)
        private let skipped = Atomic<UInt64>(0)

        public init() {}

        public var tried: Int { Int(counts.load(ordering: .relaxed) & 0xFFFF_FFFF) }
        public var paid: Int { Int(counts.load(ordering: .relaxed) >> 32) }

        @usableFromInline
        package func shouldTry() -> Bool {
            let c = counts.load(ordering: .relaxed)
            let tried = c & 0xFFFF_FFFF, paid = c >> 32
            if tried < 16 || paid * 4 >= tried { return true }
            return skipped.wrappingAdd(1, ordering: .relaxed).newValue % 16 == 0
        }

        @usableFromInline
        package func record(paid: Bool) {
            var c = counts.load(ordering: .relaxed)
            while true {
                var tried = (c & 0xFFFF_FFFF) + 1, won = (c >> 32) + (paid ? 1 : 0)
                if tried >= 1024 { tried /= 2; won /= 2 }
                let (exchanged, original) = counts.compareExchange(expected: c, desired: won << 32 | tried, ordering: .relaxed)
                if exchanged { return }
                c = original
            }
        }
    }

    /// Compresses `source` into `destination`. Returns the compressed length, or nil when the result
    /// would not fit in `destination` (the caller then stores the block raw). With `secondPasses`,
    /// a block the fast pass hardly shrinks may get a second, thorough pass (see above).
    @inlinable
    public static func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer,
                                secondPasses: SecondPassRecord? = nil) -> Int? {
        guard source.count > 0 else { return 0 }
        let fast = compress(source, into: destination, acceleration: acceleration)
        let worthStoring = source.count - source.count / secondPassBelowSavedFraction
        if let fast, fast <= worthStoring { return fast }
        guard let secondPasses, secondPasses.shouldTry() else { return fast }
        let thorough = compress(source, into: destination, acceleration: 1)
        secondPasses.record(paid: thorough.map { $0 <= worthStoring } ?? false)
        if let thorough, thorough <= fast ?? Int.max { return thorough }
        // Rare: the thorough pass did no better; the destination holds its output, so redo the fast one.
        return compress(source, into: destination, acceleration: acceleration)
    }

    @inlinable
    static func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer, acceleration: Int32) -> Int? {
        let n = vbd_lz4_compress(
            source.baseAddress!.assumingMemoryBound(to: CChar.self),
            destination.baseAddress!.assumingMemoryBound(to: CChar.self),
            Int32(source.count), Int32(destination.count), acceleration)
        return n > 0 ? Int(n) : nil
    }

    /// Decompresses exactly `destination.count` bytes. Returns false if the input is malformed or the
    /// output length differs: corrupted compressed data never yields a short or overlong block.
    @inlinable
    public static func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Bool {
        guard source.count > 0, destination.count > 0 else { return source.count == destination.count }
        let n = LZ4_decompress_safe(
            source.baseAddress!.assumingMemoryBound(to: CChar.self),
            destination.baseAddress!.assumingMemoryBound(to: CChar.self),
            Int32(source.count), Int32(destination.count))
        return Int(n) == destination.count
    }
}

/// True when every byte is zero. Word-at-a-time; zero blocks are never stored.
@inlinable
public func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
    var i = 0
    let n = bytes.count
    guard let base = bytes.baseAddress else { return true }
    while i + 32 <= n {
        let a = base.loadUnaligned(fromByteOffset: i, as: UInt64.self)
        let b = base.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)
        let c = base.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)
        let d = base.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)
        if (a | b | c | d) != 0 { return false }
        i += 32
    }
    while i < n {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    return true
}
