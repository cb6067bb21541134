import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Item 4 of issue 12: reference counts saturate instead of trapping (a trap would recur at every
/// open, since replay and checkpoint loading count the same references again).
@Suite struct ReferenceCountTests {
    func makeStore() throws -> (Store, VolumeDevice) {
        let store = try Store(directory: SimulatedDisk(seed: 3).directory(), options: Store.Options(), create: true)
        _ = try store.createVolume(name: "v", size: 1 << 20)
        return (store, try store.device(named: "v"))
    }

    @Test func chunkReferenceCountSaturates() throws {
        let (store, v) = try makeStore()
        let shared = block(seed: 1)
        try v.write(shared, at: 0)
        let chunk = try store.mutex.withLock { try store.images[v.imageID]!.root.lookup(0, pager: store.pager) }
        try store.mutex.withLock { try store.chunks.update(chunk, pager: store.pager) { $0.refcount = .max - 1 } }
        // Two more holders through dedup: the second would overflow.
        try v.write(shared, at: 4096)
        try v.write(shared, at: 8192)
        #expect(try store.mutex.withLock { try store.chunks.entry(chunk, pager: store.pager).refcount } == .max)
        // Dropping holders leaves it saturated: the chunk is never freed under a live block.
        try v.write(block(seed: 2), at: 0)
        #expect(try store.mutex.withLock {
            try store.chunks.contains(chunk, pager: store.pager) && store.chunks.entry(chunk, pager: store.pager).refcount == .max
        })
        let readBack = try v.read(4096, at: 8192) == shared
        #expect(readBack)
    }

    @Test func mapNodeReferenceCountSaturates() throws {
        let (store, v) = try makeStore()
        try v.write(block(seed: 1), at: 0)
        // A page's count saturates one below the page table's "structural" mark.
        let saturated = PageTableEntry.structural - 1
        try store.mutex.withLock { try store.pager.overrideRefcount(store.images[v.imageID]!.root.page, saturated - 1) }
        _ = try store.snapshot(volume: "v", name: "s")   // retains the root node once more
        _ = try store.snapshot(volume: "v", name: "t")   // and once more: it stays saturated
        #expect(try store.mutex.withLock { try store.pager.refcount(store.images[v.imageID]!.root.page) } == saturated)
        try store.delete("v@t")
        try store.delete("v@s")
        let readBack = try v.read(4096, at: 0) == block(seed: 1)
        #expect(readBack)
    }
}
