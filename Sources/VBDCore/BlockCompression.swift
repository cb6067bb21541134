import CLZ4

/// LZ4 block compression, the only place that calls liblz4.
public enum BlockCompression {
    /// Worst-case compressed size for `count` input bytes.
    @inlinable
    public static func bound(_ count: Int) -> Int { Int(LZ4_compressBound(Int32(count))) }

    /// LZ4's acceleration factor for stored blocks: 4 takes about 40 % off 2's compression time
    /// (Benchmarks/README.md, "Issue 14, eighth round"). Decompression does not depend on it.
    public static let acceleration: Int32 = 4
    /// A block that the fast pass shrinks by less than this fraction of its size (an eighth: not
    /// one 512-byte sector of a 4 KiB block) is compressed again at acceleration 1: blocks of
    /// short runs that acceleration 4 skips past are then still stored compressed. Blocks that do
    /// not compress at all (about 5 % of the data set's) pay for both passes.
    public static let secondPassBelowSavedFraction = 8

    /// Compresses `source` into `destination`. Returns the compressed length, or nil when the result
    /// would not fit in `destination` (the caller then stores the block raw).
    @inlinable
    public static func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Int? {
        guard source.count > 0 else { return 0 }
        let fast = compress(source, into: destination, acceleration: acceleration)
        if let fast, fast <= source.count - source.count / secondPassBelowSavedFraction { return fast }
        let thorough = compress(source, into: destination, acceleration: 1)
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
