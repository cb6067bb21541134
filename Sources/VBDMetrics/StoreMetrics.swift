import Prometheus
import Synchronization
import VBDCache
import VBDCore
import VBDStore

// MARK: - Notes on the design
//
// Metrics are pulled: nothing on the I/O path updates Prometheus objects. On each scrape the
// exporter reads the cache's and the store's own counters and mirrors them into a registry:
// monotonic figures become Prometheus counters advanced by the difference since the previous
// scrape, levels become gauges. Per-volume series come and go with the volumes (a deleted
// volume's series are unregistered). `Store.usage()` walks every map, so it is refreshed at most
// every `usageRefreshInterval`.

/// Mirrors store, cache and any extra sources into a Prometheus registry.
public final class StoreMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    let store: Store
    let cache: BlockCache?
    let usageRefreshInterval: Duration
    private let state = Mutex(State())
    private let extraSources = Mutex<[@Sendable (MetricsSink) -> Void]>([])

    struct State {
        var counters: [String: (Counter, Double)] = [:]
        var gauges: [String: Gauge] = [:]
        var lastUsage: StoreUsage?
        var lastUsageAt: ContinuousClock.Instant?
    }

    public init(store: Store, cache: BlockCache?, usageRefreshInterval: Duration = .seconds(10)) {
        self.store = store
        self.cache = cache
        self.usageRefreshInterval = usageRefreshInterval
    }

    /// Adds figures from another part of the server (accounting, NBD connections).
    public func addSource(_ source: @escaping @Sendable (MetricsSink) -> Void) {
        extraSources.withLock { $0.append(source) }
    }

    /// The Prometheus text exposition of everything, refreshed now.
    public func render() -> String {
        refresh()
        return registry.emitToString()
    }

    func refresh() {
        let sink = MetricsSink()
        if let cache {
            let s = cache.statistics
            sink.counter("vbd_cache_hits_total", ["tier": "main"], s.hits, help: "Reads served from the universal cache")
            sink.counter("vbd_cache_hits_total", ["tier": "last_chance"], s.lastChanceHits, help: "Reads served from the universal cache")
            sink.counter("vbd_cache_misses_total", [:], s.misses, help: "Reads that missed both cache tiers")
            sink.counter("vbd_cache_evictions_total", ["tier": "main"], s.evictions, help: "Blocks evicted")
            sink.counter("vbd_cache_evictions_total", ["tier": "last_chance"], s.lastChanceEvictions, help: "Blocks evicted")
            sink.gauge("vbd_cache_bytes", ["tier": "main"], Double(s.bytesHeld), help: "Bytes held (last chance: compressed)")
            sink.gauge("vbd_cache_bytes", ["tier": "last_chance"], Double(s.lastChanceBytesHeld), help: "Bytes held (last chance: compressed)")
            sink.gauge("vbd_cache_entries", ["tier": "main"], Double(s.entries), help: "Blocks held")
            sink.gauge("vbd_cache_entries", ["tier": "last_chance"], Double(s.lastChanceEntries), help: "Blocks held")
            sink.gauge("vbd_cache_bytes_saved_by_sharing", [:], Double(s.bytesSavedBySharing), help: "Bytes not held twice because volumes share blocks")
            for image in store.list() {
                guard let v = cache.statistics(for: CacheOwner(volume: image.id, group: groupID(image))) else { continue }
                sink.counter("vbd_volume_cache_hits_total", ["volume": image.name, "tier": "main"], v.hits, help: "Per-volume cache hits")
                sink.counter("vbd_volume_cache_hits_total", ["volume": image.name, "tier": "last_chance"], v.lastChanceHits, help: "Per-volume cache hits")
                sink.counter("vbd_volume_cache_misses_total", ["volume": image.name], v.misses, help: "Per-volume cache misses")
            }
        }
        let usage = currentUsage()
        sink.gauge("vbd_store_unique_chunks", [:], Double(usage.uniqueChunks), help: "Distinct stored blocks")
        sink.gauge("vbd_store_stored_bytes", [:], Double(usage.storedBytes), help: "Bytes of chunk data on disk")
        sink.gauge("vbd_store_logical_allocated_bytes", [:], Double(usage.logicalAllocatedBytes), help: "Allocated bytes summed over images")
        sink.gauge("vbd_store_compression_ratio", [:], usage.compressionRatio, help: "Raw chunk bytes per stored byte")
        sink.gauge("vbd_store_dedup_ratio", [:], usage.dedupRatio, help: "Logical allocated bytes per unique raw byte")
        sink.gauge("vbd_store_index_memory_bytes", [:], Double(usage.indexMemoryBytes), help: "RAM of the chunk index")
        for image in usage.images {
            sink.gauge("vbd_image_allocated_bytes", ["image": image.name], Double(image.allocatedBytes), help: "Allocated bytes of a volume or snapshot")
            sink.gauge("vbd_image_unique_bytes", ["image": image.name], Double(image.uniqueBytes), help: "Allocated bytes held by no other image")
            sink.gauge("vbd_image_shared_bytes", ["image": image.name], Double(image.sharedBytes), help: "Allocated bytes shared with other images")
            sink.gauge("vbd_image_fair_stored_bytes", ["image": image.name], image.fairStoredBytes, help: "Share of stored bytes, split among holders")
        }
        for source in extraSources.withLock({ $0 }) { source(sink) }
        apply(sink)
    }

    private func groupID(_ image: ImageInfo) -> SharingGroupID {
        // The cache keys owners by sharing group; ImageInfo carries the group name, so ask the store.
        store.sharingGroup(named: image.group) ?? 0
    }

    /// The store's space figures, refreshed at most every `usageRefreshInterval` (a full map walk).
    public func usage() -> StoreUsage { currentUsage() }

    private func currentUsage() -> StoreUsage {
        let now = ContinuousClock.now
        if let (u, at) = state.withLock({ s in s.lastUsage.map { ($0, s.lastUsageAt!) } }), now - at < usageRefreshInterval {
            return u
        }
        // A metadata page that cannot be read keeps the last figures (fsck names the page).
        guard let u = try? store.usage() else { return state.withLock { $0.lastUsage } ?? StoreUsage() }
        state.withLock { $0.lastUsage = u; $0.lastUsageAt = now }
        return u
    }

    private func apply(_ sink: MetricsSink) {
        state.withLock { state in
            var seenGauges = Set<String>()
            for g in sink.gauges {
                let key = g.key
                seenGauges.insert(key)
                let gauge = state.gauges[key] ?? registry.makeGauge(descriptor: g.descriptor, labels: g.labels.sorted { $0.0 < $1.0 })
                state.gauges[key] = gauge
                gauge.set(g.value)
            }
            for (key, gauge) in state.gauges where !seenGauges.contains(key) {
                registry.unregisterGauge(gauge)
                state.gauges[key] = nil
            }
            var seenCounters = Set<String>()
            for c in sink.counters {
                let key = c.key
                seenCounters.insert(key)
                var (counter, last) = state.counters[key] ?? (registry.makeCounter(descriptor: c.descriptor, labels: c.labels.sorted { $0.0 < $1.0 }), 0)
                if c.value >= last {
                    counter.increment(by: c.value - last)
                } else {
                    // The source restarted (a volume re-created under the same name): start over.
                    registry.unregisterCounter(counter)
                    counter = registry.makeCounter(descriptor: c.descriptor, labels: c.labels.sorted { $0.0 < $1.0 })
                    counter.increment(by: c.value)
                }
                last = c.value
                state.counters[key] = (counter, last)
            }
            for (key, (counter, _)) in state.counters where !seenCounters.contains(key) {
                registry.unregisterCounter(counter)
                state.counters[key] = nil
            }
        }
    }
}

/// Collects one scrape's figures.
public final class MetricsSink: @unchecked Sendable {
    struct Sample {
        var name: String
        var labels: [String: String]
        var value: Double
        var help: String
        var descriptor: MetricNameDescriptor { MetricNameDescriptor(metricName: name, unitName: "", helpText: help) }
        var key: String { name + "{" + labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",") + "}" }
    }
    var gauges: [Sample] = []
    var counters: [Sample] = []

    /// A level (bytes held, entries, ratios).
    public func gauge(_ name: String, _ labels: [String: String], _ value: Double, help: String) {
        gauges.append(Sample(name: name, labels: labels, value: value, help: help))
    }

    /// A monotonic total as the source counts it.
    public func counter(_ name: String, _ labels: [String: String], _ value: UInt64, help: String) {
        counters.append(Sample(name: name, labels: labels, value: Double(value), help: help))
    }

    /// A counter kept as a fraction (seconds, credits, I/O units).
    public func counter(_ name: String, _ labels: [String: String], _ value: Double, help: String) {
        counters.append(Sample(name: name, labels: labels, value: value, help: help))
    }
}
