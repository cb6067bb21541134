import VBDCore
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// The child process of the SIGKILL test: writes numbered blocks to a real store and prints
/// `flushed N` after each flush returns, so the parent knows which writes must survive a kill.
public enum CrashWriter {
    public static let volume = "crash"
    public static let blocks = 256

    /// The one content sequence number `i` writes: a header with `i` and a body derived from it,
    /// so a torn or mixed block is recognisable.
    public static func content(_ i: UInt64, size: Int = 4096) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: size)
        var g = SimulationRandom(seed: i &* 0x9E37_79B9_7F4A_7C15)
        withUnsafeBytes(of: i.littleEndian) { out.replaceSubrange(0..<8, with: $0) }
        var k = 8
        while k < size {
            let v = g.next()
            let run = min(Int(v & 15) + 1, size - k)
            for j in 0..<run { out[k + j] = UInt8(truncatingIfNeeded: v >> 8) }
            k += run
        }
        return out
    }

    /// The sequence number a block holds, or nil if it is not exactly one of `content(i)`.
    public static func sequence(in bytes: [UInt8]) -> UInt64? {
        guard bytes.count >= 8 else { return nil }
        let i = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        return content(i, size: bytes.count) == bytes ? i : nil
    }

    /// Runs until killed. With `announceWrites` it also prints `wrote N` once write N returns (not
    /// yet flushed), so a power-cut test can cut between flushes and tell how many were in flight.
    public static func run(storePath: String, firstSequence: UInt64, announceWrites: Bool = false) throws -> Never {
        let store: Store
        do { store = try Store.open(path: storePath) } catch StoreError.notInitialized {
            store = try Store.initialize(path: storePath)
        }
        if (try? store.info(volume)) == nil {
            try store.createVolume(name: volume, size: UInt64(blocks * 4096))
        }
        let device = try store.device(named: volume)
        var i = firstSequence
        while true {
            // Mostly single blocks, sometimes a 4-block run: multi-block requests must recover whole-or-not per block.
            let run = i % 5 == 0 ? 4 : 1
            var data: [UInt8] = []
            for k in 0..<run { data += content(i + UInt64(k)) }
            let block = Int(i % UInt64(blocks))
            if block + run <= blocks {
                try data.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try device.write(offset: UInt64(block * 4096), data: b, fua: false) }
                i += UInt64(run)
            } else {
                try data[0..<4096].withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try device.write(offset: UInt64(block * 4096), data: b, fua: false) }
                i += 1
            }
            if announceWrites {
                print("wrote \(i - 1)")
                fflush(nil)
            }
            if i % 7 < UInt64(run) {
                try store.flush()
                print("flushed \(i - 1)")
                fflush(nil)
            }
        }
    }
}
