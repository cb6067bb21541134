import Testing
import VBDControl

@Suite struct ByteSizeTests {
    @Test(arguments: [
        ("20G", UInt64(20) << 30), ("512M", UInt64(512) << 20), ("4K", 4096), ("1T", UInt64(1) << 40),
        ("1048576", 1_048_576), ("4k", 4096), ("4KiB", 4096), ("4KB", 4096), ("2P", UInt64(2) << 50), ("0", 0),
    ])
    func acceptsOperatorSizes(text: String, bytes: UInt64) throws {
        #expect(try ByteSize.parse(text) == bytes)
    }

    @Test(arguments: ["", "G", "20X", "1.5G", "-1", "20 G B", "0x10", "99999999999999999999", "16384P", "4KK"])
    func refusesBadSyntaxWithAHelpfulMessage(text: String) {
        #expect(throws: ByteSize.ParseError.self) { try ByteSize.parse(text) }
        do { _ = try ByteSize.parse(text) } catch {
            #expect(error.description.contains("e.g. 20G"))
        }
    }

    @Test func formatsForTables() {
        #expect(ByteSize.format(512) == "512 B")
        #expect(ByteSize.format(4096) == "4 KiB")
        #expect(ByteSize.format(1536) == "1.5 KiB")
        #expect(ByteSize.format(20 << 30) == "20 GiB")
    }
}
