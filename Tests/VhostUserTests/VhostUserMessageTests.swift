import Testing
@testable import VhostUser

@Suite struct VhostUserMessageTests {
    func header(_ request: VhostUserRequest, size: Int, flags: VhostUserFlags = .version1) -> VhostUserHeader {
        VhostUserHeader(request: request.rawValue, flags: flags, size: UInt32(size))
    }

    @Test func headerRoundTripsAndIsChecked() throws {
        let h = VhostUserHeader(request: 5, flags: [.version1, .needReply], size: 40)
        #expect(try VhostUserHeader.decode(h.encoded()) == h)
        #expect(h.encoded() == [5, 0, 0, 0, 9, 0, 0, 0, 40, 0, 0, 0])
        #expect(throws: VhostUserProtocolError.badVersion(2)) { try VhostUserHeader.decode([1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]) }
        #expect(throws: VhostUserProtocolError.unknownFlags(0x11)) { try VhostUserHeader.decode([1, 0, 0, 0, 0x11, 0, 0, 0, 0, 0, 0, 0]) }
        #expect(throws: VhostUserProtocolError.unexpectedReply(request: 1)) { try VhostUserHeader.decode([1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]) }
        #expect(throws: VhostUserProtocolError.payloadTooLarge(request: 1, size: 0x1_0000, max: VhostUserLimits.payloadBytesMax)) {
            try VhostUserHeader.decode([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0])
        }
        #expect(throws: VhostUserProtocolError.truncated(what: "header", expected: 12, got: 3)) { try VhostUserHeader.decode([1, 0, 0]) }
    }

    @Test func featuresAndVringStates() throws {
        #expect(try VhostUserMessage.decode(header: header(.getFeatures, size: 0), payload: [], fileDescriptorCount: 0) == .getFeatures)
        #expect(try VhostUserMessage.decode(header: header(.setFeatures, size: 8), payload: vhostUserU64(0x1_7000_0000), fileDescriptorCount: 0)
                == .setFeatures(0x1_7000_0000))
        #expect(throws: VhostUserProtocolError.badPayloadSize(request: .setFeatures, size: 4, expected: "8")) {
            try VhostUserMessage.decode(header: header(.setFeatures, size: 4), payload: [0, 0, 0, 0], fileDescriptorCount: 0)
        }
        #expect(throws: VhostUserProtocolError.unexpectedFileDescriptors(request: .setFeatures, count: 1)) {
            try VhostUserMessage.decode(header: header(.setFeatures, size: 8), payload: vhostUserU64(0), fileDescriptorCount: 1)
        }
        #expect(try VhostUserMessage.decode(header: header(.setVringNum, size: 8), payload: vhostUserVringState(index: 1, num: 128), fileDescriptorCount: 0)
                == .setVringNum(index: 1, num: 128))
        #expect(try VhostUserMessage.decode(header: header(.getVringBase, size: 8), payload: vhostUserVringState(index: 2, num: 0), fileDescriptorCount: 0)
                == .getVringBase(index: 2))
        #expect(try VhostUserMessage.decode(header: header(.setVringEnable, size: 8), payload: vhostUserVringState(index: 0, num: 1), fileDescriptorCount: 0)
                == .setVringEnable(index: 0, enabled: true))
        #expect(throws: VhostUserProtocolError.invalid(request: .setVringEnable, detail: "enable value 2, expected 0 or 1")) {
            try VhostUserMessage.decode(header: header(.setVringEnable, size: 8), payload: vhostUserVringState(index: 0, num: 2), fileDescriptorCount: 0)
        }
        #expect(throws: VhostUserProtocolError.unknownRequest(99)) {
            try VhostUserMessage.decode(header: VhostUserHeader(request: 99, flags: .version1, size: 0), payload: [], fileDescriptorCount: 0)
        }
        // A request we know but do not serve (dirty logging) is refused, not ignored.
        #expect(throws: VhostUserProtocolError.unknownRequest(6)) {
            try VhostUserMessage.decode(header: header(.setLogBase, size: 0), payload: [], fileDescriptorCount: 0)
        }
    }

    @Test func vringAddressAndFiles() throws {
        var w = ByteWriter()
        w.u32(1); w.u32(0); w.u64(0x1000); w.u64(0x3000); w.u64(0x2000); w.u64(0)
        #expect(try VhostUserMessage.decode(header: header(.setVringAddr, size: 40), payload: w.bytes, fileDescriptorCount: 0)
                == .setVringAddr(.init(index: 1, flags: 0, descriptorTable: 0x1000, usedRing: 0x3000, availableRing: 0x2000, log: 0)))
        #expect(try VhostUserMessage.decode(header: header(.setVringKick, size: 8), payload: vhostUserU64(3), fileDescriptorCount: 1)
                == .setVringKick(index: 3, hasDescriptor: true))
        #expect(try VhostUserMessage.decode(header: header(.setVringCall, size: 8), payload: vhostUserU64(0x100), fileDescriptorCount: 0)
                == .setVringCall(index: 0, hasDescriptor: false))
        #expect(throws: VhostUserProtocolError.missingFileDescriptor(request: .setVringKick, expected: 1, got: 0)) {
            try VhostUserMessage.decode(header: header(.setVringKick, size: 8), payload: vhostUserU64(0), fileDescriptorCount: 0)
        }
        #expect(throws: VhostUserProtocolError.unexpectedFileDescriptors(request: .setVringErr, count: 1)) {
            try VhostUserMessage.decode(header: header(.setVringErr, size: 8), payload: vhostUserU64(0x100), fileDescriptorCount: 1)
        }
        #expect(throws: VhostUserProtocolError.self) {
            try VhostUserMessage.decode(header: header(.setVringCall, size: 8), payload: vhostUserU64(0x200), fileDescriptorCount: 0)
        }
    }

    @Test func memTableIsCheckedRegionByRegion() throws {
        func table(_ regions: [VhostUserMemoryRegion], count: UInt32? = nil) -> [UInt8] {
            var w = ByteWriter()
            w.u32(count ?? UInt32(regions.count)); w.u32(0)
            for r in regions { w.u64(r.guestPhysicalAddress); w.u64(r.size); w.u64(r.userAddress); w.u64(r.mmapOffset) }
            return w.bytes
        }
        let low = VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 0x8000_0000, userAddress: 0x7f00_0000_0000, mmapOffset: 0)
        let high = VhostUserMemoryRegion(guestPhysicalAddress: 0x1_0000_0000, size: 0x4000_0000, userAddress: 0x7f00_8000_0000, mmapOffset: 0x8000_0000)
        let payload = table([low, high])
        #expect(try VhostUserMessage.decode(header: header(.setMemTable, size: payload.count), payload: payload, fileDescriptorCount: 2)
                == .setMemTable([low, high]))
        #expect(throws: VhostUserProtocolError.missingFileDescriptor(request: .setMemTable, expected: 2, got: 1)) {
            try VhostUserMessage.decode(header: header(.setMemTable, size: payload.count), payload: payload, fileDescriptorCount: 1)
        }
        // The count says 3 but two regions follow.
        let short = table([low, high], count: 3)
        #expect(throws: VhostUserProtocolError.badPayloadSize(request: .setMemTable, size: short.count, expected: "\(8 + 3 * 32)")) {
            try VhostUserMessage.decode(header: header(.setMemTable, size: short.count), payload: short, fileDescriptorCount: 3)
        }
        let none = table([])
        #expect(throws: VhostUserProtocolError.invalid(request: .setMemTable, detail: "0 regions (1...8)")) {
            try VhostUserMessage.decode(header: header(.setMemTable, size: none.count), payload: none, fileDescriptorCount: 0)
        }
        let wrapping = table([VhostUserMemoryRegion(guestPhysicalAddress: UInt64.max - 0xfff, size: 0x2000, userAddress: 0, mmapOffset: 0)])
        #expect(throws: VhostUserProtocolError.self) {
            try VhostUserMessage.decode(header: header(.setMemTable, size: wrapping.count), payload: wrapping, fileDescriptorCount: 1)
        }
        // An mmap offset above Int.max (it trapped the bounds check's subtraction).
        let farOffset = table([VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 4096, userAddress: 0, mmapOffset: 1 << 63)])
        #expect(throws: VhostUserProtocolError.self) {
            try VhostUserMessage.decode(header: header(.setMemTable, size: farOffset.count), payload: farOffset, fileDescriptorCount: 1)
        }
        let empty = table([VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 0, userAddress: 0, mmapOffset: 0)])
        #expect(throws: VhostUserProtocolError.invalid(request: .setMemTable, detail: "a region of size 0")) {
            try VhostUserMessage.decode(header: header(.setMemTable, size: empty.count), payload: empty, fileDescriptorCount: 1)
        }
    }

    @Test func configWindowStaysInsideTheConfigSpace() throws {
        var w = ByteWriter()
        w.u32(0); w.u32(60); w.u32(0); w.append([UInt8](repeating: 0, count: 60))
        #expect(try VhostUserMessage.decode(header: header(.getConfig, size: w.bytes.count), payload: w.bytes, fileDescriptorCount: 0)
                == .getConfig(.init(offset: 0, size: 60, flags: 0, bytes: [UInt8](repeating: 0, count: 60))))
        var outside = ByteWriter()
        outside.u32(250); outside.u32(10); outside.u32(0); outside.append([UInt8](repeating: 0, count: 10))
        #expect(throws: VhostUserProtocolError.self) {
            try VhostUserMessage.decode(header: header(.getConfig, size: outside.bytes.count), payload: outside.bytes, fileDescriptorCount: 0)
        }
        var lying = ByteWriter()
        lying.u32(0); lying.u32(8); lying.u32(0); lying.append([1, 2, 3])   // says 8 bytes, carries 3
        #expect(throws: VhostUserProtocolError.badPayloadSize(request: .getConfig, size: 15, expected: "12 + 8")) {
            try VhostUserMessage.decode(header: header(.getConfig, size: lying.bytes.count), payload: lying.bytes, fileDescriptorCount: 0)
        }
    }

    /// Random payloads for every request: decoding never traps, it returns or throws.
    @Test func randomPayloadsNeverTrap() {
        var seed: UInt64 = 0x9e37_79b9_7f4a_7c15
        func next() -> UInt64 { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; return seed }
        var decoded = 0
        for _ in 0..<20_000 {
            let request = VhostUserRequest.allCases[Int(next() % UInt64(VhostUserRequest.allCases.count))]
            let size = Int(next() % 300)
            let payload = (0..<size).map { _ in UInt8(truncatingIfNeeded: next() % 4 == 0 ? next() : 0) }
            let fds = Int(next() % 3)
            if (try? VhostUserMessage.decode(header: header(request, size: size), payload: payload, fileDescriptorCount: fds)) != nil { decoded += 1 }
        }
        #expect(decoded > 0)
    }
}

@Suite struct GuestMemoryTests {
    let a = UnsafeMutableRawPointer(bitPattern: 0x1000_0000)!
    let b = UnsafeMutableRawPointer(bitPattern: 0x2000_0000)!
    var table: GuestMemoryTable {
        GuestMemoryTable(regions: [.init(guestPhysicalAddress: 0, userAddress: 0x7f00_0000_0000, size: 0x1_0000, base: a),
                                   .init(guestPhysicalAddress: 0x1_0000, userAddress: 0x7f00_1000_0000, size: 0x1_0000, base: b)])
    }

    @Test func translatesInsideOneRegion() {
        #expect(table.pointer(guestPhysical: 0x10, length: 16) == a + 0x10)
        #expect(table.pointer(guestPhysical: 0xfff0, length: 16) == a + 0xfff0)
        #expect(table.pointer(guestPhysical: 0x1_0000, length: 1) == b)
        #expect(table.pointer(userAddress: 0x7f00_1000_0008, length: 8) == b + 8)
    }

    @Test func refusesRangesOutsideOrAcrossRegions() {
        #expect(table.pointer(guestPhysical: 0xfff1, length: 16) == nil)      // spans into the next region
        #expect(table.pointer(guestPhysical: 0x2_0000, length: 1) == nil)     // past the end
        #expect(table.pointer(guestPhysical: 0x1_ffff, length: 2) == nil)
        #expect(table.pointer(guestPhysical: UInt64.max, length: 2) == nil)   // address + length wraps
        #expect(table.pointer(guestPhysical: 0x10, length: UInt64.max) == nil)
        #expect(table.pointer(userAddress: 0x7f00_0000_0000 - 1, length: 2) == nil)
        #expect(table.pointer(guestPhysical: 0x1_0000 + 0x1_0000, length: 0) == nil)
    }

    @Test func buffersSplitAtRegionBoundaries() throws {
        let split = try #require(table.buffers(guestPhysical: 0xfff0, length: 32))
        #expect(split.map(\.count) == [16, 16])
        #expect(split[0].baseAddress == a + 0xfff0 && split[1].baseAddress == b)
        #expect(table.buffers(guestPhysical: 0x1_fff0, length: 32) == nil)
        #expect(table.buffers(guestPhysical: UInt64.max - 4, length: 16) == nil)
    }
}
