import Testing
import VBDCache
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Phase F of a write probes the dedup index again only for contents another write claimed while
/// it was in flight (`Store.newContentInFlight`). Two writes of one new content that overlap must
/// still end as one chunk, whichever publishes first.
@Suite struct DedupRaceTests {
    struct Fixture {
        let store: Store
        let hook = RunAtUnlock()
        let v: VolumeDevice

        init(cache: Bool) throws {
            var options = Store.Options()
            options.interleaving = hook
            options.secretForNewStore = 11
            if cache { options.cache = BlockCache(configuration: .init(capacityBytes: 1 << 20, shardCount: 1)) }
            store = try Store(directory: SimulatedDisk(seed: 3).directory(), options: options, create: true)
            _ = try store.createVolume(name: "v", size: 1 << 20)
            v = try store.device(named: "v")
        }
    }

    /// The second write begins after the first one's phase B (the first lock hold after the
    /// volume check) and publishes before the first one's phase F: the first must find it then.
    @Test(arguments: [false, true])
    func aWriteOvertakenBySameContentUsesTheOtherChunk(cache: Bool) throws {
        let f = try Fixture(cache: cache)
        let content = block(seed: 21)
        // Unlocks of a whole-block write: the volume check, phase B, ...
        f.hook.arm(after: 2) { try! f.v.write(content, at: 4096) }
        try f.v.write(content, at: 0)
        #expect(f.store.uniqueChunkCount == 1, "the same content stored twice")
        #expect(try f.v.read(4096, at: 0) == content)
        #expect(try f.v.read(4096, at: 4096) == content)
        #expect(f.store.fsck().isClean)
        #expect(f.store.newContentInFlightCount == 0)
    }

    /// One request holding the same new content twice stores it once.
    @Test func oneRequestWithARepeatedBlockStoresItOnce() throws {
        let f = try Fixture(cache: false)
        let a = block(seed: 5), b = block(seed: 6)
        try f.v.write(a + b + a + a, at: 0)
        #expect(f.store.uniqueChunkCount == 2)
        #expect(try f.v.read(4 * 4096, at: 0) == a + b + a + a)
        #expect(f.store.fsck().isClean)
        #expect(f.store.newContentInFlightCount == 0)
    }

    /// A write that fails after phase B (the volume is deleted before phase F) leaves no claim,
    /// so a later write of the content is not told to re-check for ever.
    @Test func aFailedWriteDropsItsClaims() throws {
        let f = try Fixture(cache: false)
        let content = block(seed: 8)
        f.hook.arm(after: 2) { try! f.store.delete("v", force: true) }
        #expect(throws: BlockDeviceError.self) { try f.v.write(content, at: 0) }
        #expect(f.store.newContentInFlightCount == 0)
        #expect(f.store.uniqueChunkCount == 0)
    }
}
