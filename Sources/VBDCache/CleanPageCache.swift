import Synchronization

/// The hypervisor clean-page interface of the last-chance tier (Xen tmem ephemeral pools, Linux
/// cleancache): a guest discarding a clean page puts it here, and a later get can return it without
/// disk access.
///
/// ### Coherence by content
/// A page is stored by content (its chunk key, in the ``BlockCache``'s tiers, deduplicated with
/// everything else), and `(domain, volume, offset)` only records which key was put. `put` asks the
/// ``BlockMappingOracle`` to confirm that the page *is* the content the volume maps there now and records
/// nothing otherwise; `get` asks again and hits only if the volume still maps the recorded key. So a
/// write to the volume after a put (new content, new key) makes the get miss: stale data is never
/// returned, and the hypervisor need not invalidate on writes (it may, to free index slots early).
///
/// ### Isolation
/// Records are kept per domain: domain A's get never sees domain B's puts, and the oracle refuses
/// both calls for volumes the domain does not hold (its tenant has no lease on them), so a domain can
/// neither read another tenant's pages nor confirm a guess of their content with put + get.
/// Invalidation needs no such check: it only drops the caller's own records. Content is read from the cache with the group the
/// oracle names, so it cannot come from another tenant.
///
/// ### Memory
/// Page contents live in the last-chance tier and count against its budget. The index holds at most
/// `recordsMax` records (oldest dropped first), ~150 bytes each; a record whose content left the
/// cache is dropped at the next get.
public final class CleanPageCache: Sendable {
    public let cache: BlockCache
    private let oracle: any BlockMappingOracle
    private let shards: [IndexBox]
    private let counters: Mutex<CleanPageStatistics>

    private final class IndexBox: Sendable {
        let index: Mutex<CleanPageIndex>
        init(_ index: CleanPageIndex) { self.index = Mutex(index) }
    }

    /// - Parameters:
    ///   - cache: the host's universal cache; pages go to its last-chance tier.
    ///   - oracle: the store's view of volume maps.
    ///   - recordsMax: most page records kept (index memory bound).
    ///   - shardCount: index shards (by domain), each with its own lock.
    public init(cache: BlockCache, oracle: some BlockMappingOracle, recordsMax: Int = 1 << 20, shardCount: Int = 16) {
        precondition(recordsMax >= shardCount && shardCount >= 1, "need at least one record per shard")
        self.cache = cache
        self.oracle = oracle
        shards = (0..<shardCount).map { _ in IndexBox(CleanPageIndex(recordsMax: recordsMax / shardCount)) }
        counters = Mutex(CleanPageStatistics())
    }

    /// Offers a clean page the guest of `domain` is discarding: the content of `volume` at byte `offset`.
    /// Kept only if the oracle confirms the page is what the volume maps there now.
    public func put(domain: HypervisorDomain, volume: UInt64, offset: UInt64, page: UnsafeRawBufferPointer) {
        let address = CleanPageIndex.Address(domain: domain, volume: volume, offset: offset)
        guard let mapped = oracle.mappedChunk(domain: domain, volume: volume, offset: offset, verifying: page) else {
            // Not the mapped content (or not this domain's volume): whatever was recorded is stale.
            index(for: domain) { $0.remove(address) }
            counters.withLock { $0.putsRefused += 1 }
            return
        }
        cache.retainCleanPage(mapped.key, page: page, owner: mapped.owner)
        // The chunk may have been freed between the oracle's answer and the admission; its free
        // removed the key before we admitted it. Ask again: if the volume still maps the key it
        // is live (its eventual free removes the page); if not, remove the page ourselves, so no
        // page outlives its key (a key is never reused, but the generation part wraps).
        guard oracle.mappedChunk(domain: domain, volume: volume, offset: offset) == mapped else {
            cache.remove(mapped.key)
            index(for: domain) { $0.remove(address) }
            counters.withLock { $0.putsRefused += 1 }
            return
        }
        index(for: domain) { $0.record(address, key: mapped.key) }
        counters.withLock { $0.puts += 1 }
    }

    /// Copies the page put for `(domain, volume, offset)` into `page` if the volume still maps the same
    /// content there and the cache still holds it.
    public func get(domain: HypervisorDomain, volume: UInt64, offset: UInt64, into page: UnsafeMutableRawBufferPointer) -> Bool {
        let address = CleanPageIndex.Address(domain: domain, volume: volume, offset: offset)
        guard let recorded = index(for: domain, { $0.key(at: address) }) else {
            counters.withLock { $0.misses += 1 }
            return false
        }
        guard let mapped = oracle.mappedChunk(domain: domain, volume: volume, offset: offset),
              mapped.key == recorded
        else {
            index(for: domain) { $0.remove(address) }
            counters.withLock { $0.staleMisses += 1 }
            return false
        }
        guard cache.readCleanPage(recorded, into: page, group: mapped.owner.group) else {
            index(for: domain) { $0.remove(address) }
            counters.withLock { $0.misses += 1 }
            return false
        }
        counters.withLock { $0.hits += 1 }
        return true
    }

    /// Forgets one page of one volume of `domain`.
    public func invalidate(domain: HypervisorDomain, volume: UInt64, offset: UInt64) {
        index(for: domain) { $0.remove(CleanPageIndex.Address(domain: domain, volume: volume, offset: offset)) }
    }

    /// Forgets every page of `volume` put by `domain`.
    public func invalidate(domain: HypervisorDomain, volume: UInt64) {
        index(for: domain) { $0.remove(domain: domain, volume: volume) }
    }

    /// Forgets every page `domain` put (the domain was destroyed or migrated).
    public func invalidate(domain: HypervisorDomain) {
        index(for: domain) { $0.remove(domain: domain) }
    }

    /// Interface counters; page bytes are in the cache's last-chance statistics.
    public var statistics: CleanPageStatistics {
        var snapshot = counters.withLock { $0 }
        snapshot.records = UInt64(shards.reduce(0) { $0 + $1.index.withLock { $0.count } })
        return snapshot
    }

    private func index<Result>(for domain: HypervisorDomain, _ body: (inout CleanPageIndex) -> Result) -> Result {
        shards[Int(BlockCache.mix(domain.number) % UInt64(shards.count))].index.withLock { body(&$0) }
    }
}

/// Counters of the clean-page interface.
public struct CleanPageStatistics: Equatable, Sendable {
    /// Pages accepted (the oracle confirmed their content).
    public var puts: UInt64 = 0
    /// Pages refused: not the content the volume maps there, or not the domain's volume.
    public var putsRefused: UInt64 = 0
    /// Gets answered with the page.
    public var hits: UInt64 = 0
    /// Gets with no record, or whose content had left the cache.
    public var misses: UInt64 = 0
    /// Gets refused because the volume now maps other content there (written since the put).
    public var staleMisses: UInt64 = 0
    /// Records held now.
    public var records: UInt64 = 0

    public init() {}
}

/// Which chunk key each `(domain, volume, offset)` put recorded, grouped so that per-volume and
/// per-domain invalidation drop a whole subtree. A pure value.
///
/// Bounded: a FIFO ring of `recordsMax` insertion serials; recording into a full ring drops the oldest
/// record. Invalidations leave their ring slots behind (skipped when reached, as in ``GhostQueue``),
/// so every operation is O(1) apart from the subtree drops.
struct CleanPageIndex: Sendable {
    struct Address: Hashable, Sendable {
        var domain: HypervisorDomain
        var volume: UInt64
        var offset: UInt64
    }

    private struct Record: Sendable {
        var key: UInt64
        var serial: UInt64
    }

    let recordsMax: Int
    private var domains: [HypervisorDomain: [UInt64: [UInt64: Record]]] = [:]
    private var ring: [(address: Address, serial: UInt64)] = []
    private var ringHead = 0
    private var ringCount = 0
    private var nextSerial: UInt64 = 0
    private(set) var count = 0

    init(recordsMax: Int) {
        precondition(recordsMax > 0)
        self.recordsMax = recordsMax
    }

    func key(at address: Address) -> UInt64? {
        domains[address.domain]?[address.volume]?[address.offset]?.key
    }

    mutating func record(_ address: Address, key: UInt64) {
        remove(address)
        if ringCount == recordsMax { dropOldest() }
        let serial = nextSerial
        nextSerial += 1
        if ring.count < recordsMax {
            ring.append((address, serial))
        } else {
            ring[(ringHead + ringCount) % recordsMax] = (address, serial)
        }
        ringCount += 1
        domains[address.domain, default: [:]][address.volume, default: [:]][address.offset] =
            Record(key: key, serial: serial)
        count += 1
    }

    mutating func remove(_ address: Address) {
        guard domains[address.domain]?[address.volume]?[address.offset] != nil else { return }
        domains[address.domain]![address.volume]![address.offset] = nil
        count -= 1
        if domains[address.domain]![address.volume]!.isEmpty {
            domains[address.domain]![address.volume] = nil
            if domains[address.domain]!.isEmpty { domains[address.domain] = nil }
        }
    }

    mutating func remove(domain: HypervisorDomain, volume: UInt64) {
        guard let pages = domains[domain]?.removeValue(forKey: volume) else { return }
        count -= pages.count
        if domains[domain]!.isEmpty { domains[domain] = nil }
    }

    mutating func remove(domain: HypervisorDomain) {
        guard let volumes = domains.removeValue(forKey: domain) else { return }
        count -= volumes.values.reduce(0) { $0 + $1.count }
    }

    private mutating func dropOldest() {
        let (address, serial) = ring[ringHead]
        if domains[address.domain]?[address.volume]?[address.offset]?.serial == serial { remove(address) }
        ringHead = (ringHead + 1) % recordsMax
        ringCount -= 1
    }
}
