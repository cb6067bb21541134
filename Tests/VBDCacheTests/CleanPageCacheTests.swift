import Synchronization
import Testing
import VBDCache

/// A tiny content-indexed store standing in for VBDStore: volumes map block offsets to chunk keys,
/// equal contents within a group share a key, and domains hold volumes by lease.
final class FakeStore: BlockMappingOracle {
    private struct State {
        var maps: [UInt64: [UInt64: UInt64]] = [:]            // volume -> offset -> key
        var groups: [UInt64: SharingGroupID] = [:]                     // volume -> sharing group
        var contents: [UInt64: [UInt8]] = [:]                  // key -> bytes
        var keysByContent: [SharingGroupID: [[UInt8]: UInt64]] = [:]   // group -> bytes -> key
        var leases: Set<[UInt64]> = []                         // [domain, volume]
        var nextKey: UInt64 = 1000
    }

    private let state = Mutex(State())

    func createVolume(_ volume: UInt64, group: SharingGroupID) { state.withLock { $0.groups[volume] = group } }

    func grant(domain: UInt64, volume: UInt64) { _ = state.withLock { $0.leases.insert([domain, volume]) } }

    /// Writes one block; returns its chunk key (a new key for new content, the existing one for a dup).
    @discardableResult
    func write(volume: UInt64, offset: UInt64, bytes: [UInt8]) -> UInt64 {
        state.withLock { state in
            let group = state.groups[volume]!
            let key: UInt64
            if let existing = state.keysByContent[group]?[bytes] {
                key = existing
            } else {
                key = state.nextKey
                state.nextKey += 1
                state.keysByContent[group, default: [:]][bytes] = key
                state.contents[key] = bytes
            }
            state.maps[volume, default: [:]][offset] = key
            return key
        }
    }

    func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64) -> MappedChunk? {
        state.withLock { state in
            guard state.leases.contains([domain.number, volume]), let key = state.maps[volume]?[offset] else { return nil }
            return MappedChunk(key: key, owner: CacheOwner(volume: volume, group: state.groups[volume]!))
        }
    }

    func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64, verifying page: UnsafeRawBufferPointer) -> MappedChunk? {
        guard let mapped = mappedChunk(domain: domain, volume: volume, offset: offset) else { return nil }
        let matches = state.withLock { $0.contents[mapped.key]!.elementsEqual(page) }
        return matches ? mapped : nil
    }
}

extension CleanPageCache {
    func put(domain: HypervisorDomain, volume: UInt64, offset: UInt64, bytes: [UInt8]) {
        bytes.withUnsafeBytes { put(domain: domain, volume: volume, offset: offset, page: $0) }
    }

    func get(domain: HypervisorDomain, volume: UInt64, offset: UInt64) -> [UInt8]? {
        var page = [UInt8](repeating: 0, count: 4096)
        let hit = page.withUnsafeMutableBytes { get(domain: domain, volume: volume, offset: offset, into: $0) }
        return hit ? page : nil
    }
}

@Suite struct CleanPageCacheTests {
    let store = FakeStore()
    let cache = BlockCache(configuration: .init(capacityBytes: 1 << 20, lastChanceCapacityBytes: 1 << 20, shardCount: 2))

    /// Domain 1 holds volume 10, domain 2 holds volume 20, both in group 7; domain 3 holds volume 30
    /// in group 8. Each volume has pages at offsets 0 and 4096.
    init() {
        for (domain, volume, group) in [(1, 10, 7), (2, 20, 7), (3, 30, 8)] as [(UInt64, UInt64, SharingGroupID)] {
            store.createVolume(volume, group: group)
            store.grant(domain: domain, volume: volume)
            store.write(volume: volume, offset: 0, bytes: blockBytes(for: volume))
            store.write(volume: volume, offset: 4096, bytes: blockBytes(for: volume + 1))
        }
    }

    func makeCleanPages(recordsMax: Int = 1024, shardCount: Int = 4) -> CleanPageCache {
        CleanPageCache(cache: cache, oracle: store, recordsMax: recordsMax, shardCount: shardCount)
    }

    @Test func putThenGetReturnsThePage() {
        let pages = makeCleanPages()
        pages.put(domain: 1, volume: 10, offset: 0, bytes: blockBytes(for: 10))
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == blockBytes(for: 10))
        #expect(pages.get(domain: 1, volume: 10, offset: 4096) == nil, "never put")
        #expect(pages.statistics.hits == 1 && pages.statistics.misses == 1)
        #expect(cache.statistics.lastChanceEntries == 1)
    }

    @Test func getAfterWriteToTheVolumeIsAStaleMiss() {
        let pages = makeCleanPages()
        pages.put(domain: 1, volume: 10, offset: 0, bytes: blockBytes(for: 10))
        store.write(volume: 10, offset: 0, bytes: blockBytes(for: 555))     // the guest wrote after discarding
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == nil)
        #expect(pages.statistics.staleMisses == 1)
        #expect(pages.statistics.records == 0, "a stale record is dropped")
        store.write(volume: 10, offset: 0, bytes: blockBytes(for: 10))      // written back: same content, same key
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == nil, "the stale record is gone for good")
    }

    @Test func putOfBytesThatAreNotTheMappedContentRecordsNothing() {
        let pages = makeCleanPages()
        pages.put(domain: 1, volume: 10, offset: 0, bytes: blockBytes(for: 999))
        #expect(pages.statistics.putsRefused == 1 && pages.statistics.records == 0)
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == nil)
        #expect(cache.statistics.lastChanceEntries == 0, "refused pages are not stored")
    }

    @Test func domainCannotGetOrPlantAnotherDomainsPages() {
        let pages = makeCleanPages()
        pages.put(domain: 1, volume: 10, offset: 0, bytes: blockBytes(for: 10))
        #expect(pages.get(domain: 2, volume: 10, offset: 0) == nil, "domain 2 holds no lease on volume 10")
        #expect(pages.get(domain: 3, volume: 10, offset: 0) == nil, "another tenant")
        // Domain 3 knows volume 10's content and tries to confirm it through put + get: refused.
        pages.put(domain: 3, volume: 10, offset: 4096, bytes: blockBytes(for: 11))
        #expect(pages.statistics.putsRefused == 1)
        #expect(pages.get(domain: 3, volume: 10, offset: 4096) == nil)
        // Even a domain that shares a lease sees only its own puts.
        store.grant(domain: 2, volume: 10)
        #expect(pages.get(domain: 2, volume: 10, offset: 0) == nil)
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == blockBytes(for: 10))
    }

    @Test func pageInvalidationIsPerPagePerVolumeAndPerDomain() {
        let pages = makeCleanPages()
        store.grant(domain: 1, volume: 20)
        for (domain, volume) in [(1, 10), (1, 20), (2, 20)] as [(UInt64, UInt64)] {
            pages.put(domain: HypervisorDomain(domain), volume: volume, offset: 0, bytes: blockBytes(for: volume))
            pages.put(domain: HypervisorDomain(domain), volume: volume, offset: 4096, bytes: blockBytes(for: volume + 1))
        }
        #expect(pages.statistics.records == 6)
        pages.invalidate(domain: 1, volume: 10, offset: 0)
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == nil)
        #expect(pages.get(domain: 1, volume: 10, offset: 4096) != nil)
        pages.invalidate(domain: 1, volume: 20)
        #expect(pages.get(domain: 1, volume: 20, offset: 0) == nil && pages.get(domain: 1, volume: 20, offset: 4096) == nil)
        #expect(pages.get(domain: 2, volume: 20, offset: 0) != nil, "another domain's records on the same volume stay")
        pages.invalidate(domain: 1)
        #expect(pages.get(domain: 1, volume: 10, offset: 4096) == nil)
        #expect(pages.get(domain: 2, volume: 20, offset: 4096) != nil)
        #expect(pages.statistics.records == 2)
    }

    @Test func identicalPagesFromManyVolumesAreStoredOnce() {
        let pages = makeCleanPages()
        let image = blockBytes(for: 4242)
        for clone in 100..<110 as Range<UInt64> {          // ten clones of one image in group 7
            store.createVolume(clone, group: 7)
            store.grant(domain: clone, volume: clone)
            store.write(volume: clone, offset: 0, bytes: image)
            pages.put(domain: HypervisorDomain(clone), volume: clone, offset: 0, bytes: image)
        }
        #expect(cache.statistics.lastChanceEntries == 1)
        for clone in 100..<110 as Range<UInt64> { #expect(pages.get(domain: HypervisorDomain(clone), volume: clone, offset: 0) == image) }
    }

    @Test func pageWhoseContentLeftTheCacheMisses() {
        let pages = makeCleanPages()
        pages.put(domain: 1, volume: 10, offset: 0, bytes: blockBytes(for: 10))
        cache.remove(store.mappedChunk(domain: 1, volume: 10, offset: 0)!.key)
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == nil)
        #expect(pages.statistics.records == 0)
    }

    @Test func recordsAreBounded() {
        let pages = makeCleanPages(recordsMax: 16, shardCount: 1)
        for offset in stride(from: 0 as UInt64, to: 100 * 4096, by: 4096) {
            store.write(volume: 10, offset: offset, bytes: blockBytes(for: 7000 + offset))
            pages.put(domain: 1, volume: 10, offset: offset, bytes: blockBytes(for: 7000 + offset))
        }
        #expect(pages.statistics.records == 16)
        #expect(pages.get(domain: 1, volume: 10, offset: 99 * 4096) != nil, "the newest records are kept")
        #expect(pages.get(domain: 1, volume: 10, offset: 0) == nil, "the oldest were dropped")
    }
}

/// An oracle that confirms a put and then, before the page is admitted, sees the chunk freed (the
/// store's free removes the key from the cache, which was still empty): the race of issue 12.
final class ChunkFreedDuringPut: BlockMappingOracle {
    let cache: BlockCache
    let key: UInt64 = 77
    private let freed = Mutex(false)
    init(cache: BlockCache) { self.cache = cache }

    func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64) -> MappedChunk? {
        freed.withLock { $0 } ? nil : MappedChunk(key: key, owner: CacheOwner(volume: volume, group: 0))
    }

    func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64, verifying page: UnsafeRawBufferPointer) -> MappedChunk? {
        let answer = mappedChunk(domain: domain, volume: volume, offset: offset)
        freed.withLock { $0 = true }
        cache.remove(key)
        return answer
    }
}

@Suite struct CleanPageStaleKeyTests {
    @Test func aPagePutWhileItsChunkIsFreedDoesNotOutliveTheKey() {
        let cache = BlockCache(configuration: .init(capacityBytes: 1 << 20, lastChanceCapacityBytes: 1 << 20, shardCount: 1))
        let oracle = ChunkFreedDuringPut(cache: cache)
        let pages = CleanPageCache(cache: cache, oracle: oracle)
        pages.put(domain: 1, volume: 10, offset: 0, bytes: [UInt8](repeating: 5, count: 4096))
        #expect(!cache.contains(oracle.key), "a page of a freed chunk stays cached under its key")
    }
}
