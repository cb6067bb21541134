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

@Suite struct SecondPassRecordTests {
    /// Second passes that never pay are tried about one time in 16 once 16 were tried; once they
    /// pay again (a quarter of the recent ones), every block gets one.
    @Test func secondPassesFollowWhatTheyPaid() {
        let record = BlockCompression.SecondPassRecord()
        var tried = 0
        for _ in 0..<1000 where record.shouldTry() {
            tried += 1
            record.record(paid: false)
        }
        #expect(tried >= 16 && tried <= 16 + 1000 / 16 + 1, "tried \(tried) of 1000")
        #expect(record.paid == 0)
        // Probes that pay bring the rate back: within 1000 blocks every block gets one again.
        var triedLast200 = 0
        for n in 0..<1000 where record.shouldTry() {
            if n >= 800 { triedLast200 += 1 }
            record.record(paid: true)
        }
        #expect(triedLast200 == 200, "tried \(triedLast200) of the last 200 once they paid")
        #expect(record.tried < 1024, "the counts are halved")
    }

    /// Blocks of short runs (1 to 8 equal bytes) are stored compressed: acceleration 4 alone
    /// leaves them within an eighth of their size, the second pass (with a store's fresh record) does not.
    @Test func blocksOfShortRunsCompressByMoreThanAnEighth() {
        var g = SplitMix64(seed: 42)
        var block = [UInt8](repeating: 0, count: 4096)
        var i = 0
        while i < block.count {
            let v = g.next()
            let run = Int(v & 7) + 1
            for k in 0..<run where i + k < block.count { block[i + k] = UInt8(truncatingIfNeeded: v >> 8) }
            i += run
            if i < block.count { block[i] = UInt8(truncatingIfNeeded: v >> 16); i += 1 }
        }
        var out = [UInt8](repeating: 0, count: BlockCompression.bound(4096))
        let record = BlockCompression.SecondPassRecord()
        let n = block.withUnsafeBytes { source in
            out.withUnsafeMutableBytes { BlockCompression.compress(source, into: $0, secondPasses: record) }
        }
        #expect(n != nil && n! <= 4096 - 512, "compressed to \(n.map(String.init) ?? "nothing")")
        #expect(record.tried == 1 && record.paid == 1)
        let single = block.withUnsafeBytes { source in out.withUnsafeMutableBytes { BlockCompression.compress(source, into: $0) } }
        #expect(single.map { $0 > 4096 - 512 } ?? true, "acceleration 4 alone already compresses this block: the test shows nothing")
    }
}
