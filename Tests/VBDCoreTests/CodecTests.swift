import Testing
@testable import VBDCore

@Suite struct CodecTests {
    @Test func hashIsSeededAndStable() {
        let bytes = [UInt8](repeating: 7, count: 4096)
        let a = bytes.withUnsafeBytes { HashFunction.xxh3.hash($0, seed: 1) }
        let b = bytes.withUnsafeBytes { HashFunction.xxh3.hash($0, seed: 1) }
        let c = bytes.withUnsafeBytes { HashFunction.xxh3.hash($0, seed: 2) }
        #expect(a == b)
        #expect(a != c)
    }

    @Test func fixedPointTextPadsTheFraction() {
        #expect(fixedPointText(1234, decimals: 3) == "1.234")
        #expect(fixedPointText(1_796_637_157_005, decimals: 3) == "1796637157.005")
        #expect(fixedPointText(5, decimals: 2) == "0.05")
        #expect(fixedPointText(0, decimals: 2) == "0.00")
    }

    @Test func weakHashKeepsOnlyTheRequestedBits() {
        for i in 0..<100 {
            let bytes = [UInt8](repeating: UInt8(i), count: 512)
            let h = bytes.withUnsafeBytes { HashFunction.weak(bits: 8).hash($0, seed: 9) }
            #expect(h.high == 0 && h.low < 256)
        }
    }

    @Test func compressionRoundTripsAndRejectsGarbage() {
        var source = [UInt8](repeating: 0, count: 4096)
        for i in 0..<source.count { source[i] = UInt8((i / 64) & 0xff) }
        var compressed = [UInt8](repeating: 0, count: BlockCompression.bound(4096))
        let n = source.withUnsafeBytes { s in compressed.withUnsafeMutableBytes { BlockCompression.compress(s, into: $0) } }
        #expect(n != nil && n! < 4096)
        var out = [UInt8](repeating: 0, count: 4096)
        let ok = compressed[..<n!].withUnsafeBytes { c in out.withUnsafeMutableBytes { BlockCompression.decompress(c, into: $0) } }
        #expect(ok && out == source)
        // A wrong expected length is an error, never a short block.
        var short = [UInt8](repeating: 0, count: 4000)
        let bad = compressed[..<n!].withUnsafeBytes { c in short.withUnsafeMutableBytes { BlockCompression.decompress(c, into: $0) } }
        #expect(!bad)
    }

    @Test func zeroDetection() {
        var b = [UInt8](repeating: 0, count: 4099)
        #expect(b.withUnsafeBytes { isAllZero($0) })
        b[4098] = 1
        #expect(!b.withUnsafeBytes { isAllZero($0) })
        b[4098] = 0; b[5] = 1
        #expect(!b.withUnsafeBytes { isAllZero($0) })
    }

    @Test func errnoMapping() {
        #expect(BlockDeviceError.outOfRange(offset: 0, length: 1, size: 0).errnoValue == 22)
        #expect(BlockDeviceError.readOnly(name: "v@s").errnoValue == 1)
        #expect(BlockDeviceError.noSpace.errnoValue == 28)
        #expect(BlockDeviceError.corrupted(volume: "v", offset: 0, detail: "").errnoValue == 5)
        #expect(BlockDeviceError.io("x").errnoValue == 5)
        #expect(BlockDeviceError.gone("x").errnoValue == 5)
        #expect(BlockDeviceError.notSupported("x").errnoValue == 95)
        #expect(BlockDeviceError.invalid("x").errnoValue == 22)
    }
}
