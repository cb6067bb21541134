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
        let chunk = store.mutex.withLock { store.images[v.imageID]!.root.lookup(0) }
        store.mutex.withLock { var e = store.chunks[chunk]; e.refcount = .max - 1; store.chunks[chunk] = e }
        // Two more holders through dedup: the second would overflow.
        try v.write(shared, at: 4096)
        try v.write(shared, at: 8192)
        #expect(store.mutex.withLock { store.chunks[chunk].refcount } == .max)
        // Dropping holders leaves it saturated: the chunk is never freed under a live block.
        try v.write(block(seed: 2), at: 0)
        #expect(store.mutex.withLock { store.chunks.contains(chunk) && store.chunks[chunk].refcount == .max })
        let readBack = try v.read(4096, at: 8192) == shared
        #expect(readBack)
    }

    @Test func mapNodeReferenceCountSaturates() throws {
        let (store, v) = try makeStore()
        try v.write(block(seed: 1), at: 0)
        store.mutex.withLock { store.images[v.imageID]!.root.node!.refcount = .max }
        _ = try store.snapshot(volume: "v", name: "s")   // retains the root node once more
        #expect(store.mutex.withLock { store.images[v.imageID]!.root.node!.refcount } == .max)
        try store.delete("v@s")
        let readBack = try v.read(4096, at: 0) == block(seed: 1)
        #expect(readBack)
    }
}
