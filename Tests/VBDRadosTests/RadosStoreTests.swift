import Foundation
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

/// The existing store, unchanged, on a ``RadosDirectory``: its superblock, metadata pages, journal
/// and (as a first cut) its data file are RADOS objects.
@Suite(.serialized) struct RadosStoreTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    func options() -> Store.Options {
        var options = Store.Options()
        options.spaceReserveBytes = 256 << 10
        return options
    }

    @Test func volumeSnapshotReopenOnAnotherHost() throws {
        let hostA = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "store")
        let blocks = (0..<32).map { pattern(seed: 1000 + UInt64($0)) }
        do {
            let store = try Store(directory: RadosDirectory(pool: poolA, stripeBytes: 1 << 20), options: options(), create: true)
            try store.createVolume(name: "vm0", size: 1 << 20)
            let device = try store.device(named: "vm0")
            for (i, bytes) in blocks.enumerated() {
                try bytes.withUnsafeBytes { try device.write(offset: UInt64(i) * 4096, data: $0, fua: false) }
            }
            // Block 3 again under another offset: the store deduplicates it.
            try blocks[3].withUnsafeBytes { try device.write(offset: 40 * 4096, data: $0, fua: false) }
            try device.flush()
            _ = try store.snapshot(volume: "vm0", name: "1")
            let changed = pattern(seed: 1)
            try changed.withUnsafeBytes { try device.write(offset: 0, data: $0, fua: false) }
            try store.close()
        }

        // Host B opens the family after A closed it.
        let hostB = try cluster.connect()
        let store = try Store(directory: RadosDirectory(pool: try hostB.openPool("vbd", namespace: poolA.namespace), stripeBytes: 1 << 20),
                              options: options(), create: false)
        func read(_ name: String, block: Int) throws -> [UInt8] {
            var out = [UInt8](repeating: 0xEE, count: 4096)
            let device = try store.device(named: name)
            try out.withUnsafeMutableBytes { try device.read(offset: UInt64(block) * 4096, into: $0) }
            return out
        }
        #expect(try read("vm0", block: 0) == pattern(seed: 1))
        #expect(try read("vm0@1", block: 0) == blocks[0])
        for i in 1..<32 { #expect(try read("vm0", block: i) == blocks[i]) }
        #expect(try read("vm0", block: 40) == blocks[3])
        #expect(try read("vm0@1", block: 41) == [UInt8](repeating: 0, count: 4096))
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// While host A has the store open, host B cannot open it.
    @Test func secondHostIsRefusedWhileTheFirstOwnsTheStore() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "owned")
        let store = try Store(directory: RadosDirectory(pool: poolA), options: options(), create: true)
        #expect(throws: StoreError.self) {
            _ = try Store(directory: RadosDirectory(pool: try hostB.openPool("vbd", namespace: poolA.namespace)), options: options(), create: false)
        }
        try store.close()
    }
}
