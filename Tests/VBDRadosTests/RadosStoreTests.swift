import Foundation
import Synchronization
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

/// The existing store, unchanged, on a ``RadosDirectory``: its superblock, metadata pages, journal
/// and (as a first cut) its data file are RADOS objects.
@Suite(.serialized) struct RadosStoreTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    func options() -> Store.Options { .onMicroCluster }

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

    /// `RadosStore.open`, as vbdtool opens a store: a missing store is named by its location, a
    /// second owner is refused with the owner's name, and after the owner closes the store the next
    /// one opens it without fencing anybody.
    @Test func radosStoreOpenNamesTheOwnerAndHandsOverCleanly() throws {
        let location = RadosStoreLocation(configurationFile: cluster.configurationFile, pool: "vbd",
                                          namespace: "open-" + UUID().uuidString.prefix(8).lowercased())
        #expect(throws: StoreError.notInitialized(path: location.description)) {
            _ = try RadosStore.open(location, options: options(), create: false)
        }
        let (a, fencedByA) = try RadosStore.open(location, options: options(), create: true)
        #expect(fencedByA == [])
        try a.createVolume(name: "vm0", size: 1 << 20)
        do {
            _ = try RadosStore.open(location, options: options(), create: false)
            Issue.record("a second owner was let in")
        } catch let StoreError.locked(message) {
            #expect(message.contains("is owned by client."), "\(message)")
        }
        try a.close()
        let (b, fencedByB) = try RadosStore.open(location, options: options(), create: false)
        #expect(fencedByB == [])
        #expect(b.list().map(\.name) == ["vm0"])
        try b.close()
    }

    /// Host A hangs with the store open. Host B takes the store over once A's lock expired, replays
    /// A's journal and has every write A flushed; A, when it wakes up, can no longer commit.
    @Test func takeoverFromAHungHostKeepsFlushedWritesAndFencesIt() throws {
        let hostA = try cluster.connect(timeoutSeconds: 10), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "handover")
        let lostReason = Mutex<String?>(nil)
        let directoryA = RadosDirectory(pool: poolA, stripeBytes: 1 << 20, lockDurationSeconds: 2,
                                        onLockLost: { reason in lostReason.withLock { $0 = reason } })
        let storeA = try Store(directory: directoryA, options: options(), create: true)
        try storeA.createVolume(name: "vm0", size: 1 << 20)
        let deviceA = try storeA.device(named: "vm0")
        let blocks = (0..<16).map { pattern(seed: 2000 + UInt64($0)) }
        for (i, bytes) in blocks.enumerated() {
            try bytes.withUnsafeBytes { try deviceA.write(offset: UInt64(i) * 4096, data: $0, fua: false) }
        }
        try deviceA.flush()
        directoryA.lockKeeper!.stop()  // A hangs: its lock will expire

        let directoryB = RadosDirectory(pool: try hostB.openPool("vbd", namespace: poolA.namespace), stripeBytes: 1 << 20,
                                        lockDurationSeconds: 2)
        let fenced = try directoryB.takeOver(waitingUpTo: 15)
        // A's data client and the client that renewed its lock.
        #expect(fenced.count == 2)
        let storeB = try Store(directory: directoryB, options: options(), create: false)
        let deviceB = try storeB.device(named: "vm0")
        for (i, bytes) in blocks.enumerated() {
            var out = [UInt8](repeating: 0, count: 4096)
            try out.withUnsafeMutableBytes { try deviceB.read(offset: UInt64(i) * 4096, into: $0) }
            #expect(out == bytes, "block \(i)")
        }

        // A wakes up and tries to commit a write: refused.
        let late = pattern(seed: 9)
        _ = try? late.withUnsafeBytes { try deviceA.write(offset: 0, data: $0, fua: false) }
        #expect(throws: (any Error).self) { try deviceA.flush() }
        #expect(lostReason.withLock { $0 } != nil)
        _ = try? storeA.close()

        // B goes on; its view never saw A's late write.
        var first = [UInt8](repeating: 0, count: 4096)
        try first.withUnsafeMutableBytes { try deviceB.read(offset: 0, into: $0) }
        #expect(first == blocks[0])
        try late.withUnsafeBytes { try deviceB.write(offset: 4096 * 20, data: $0, fua: false) }
        try deviceB.flush()
        #expect(storeB.fsck().isClean)
        try storeB.close()
    }
}
