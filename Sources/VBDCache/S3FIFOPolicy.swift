// MARK: - Notes on the design
//
// S3-FIFO (Yang, Zhang, Qiu, Yue, Rashmi: "FIFO queues are all you need for cache eviction",
// SOSP 2023), adapted to entries charged in bytes.
//
// Three FIFO queues:
//
//     insert (not in ghost) --> [ small S, ~10% of bytes ] --tail, freq >= 1--> [ main M, ~90% ]
//                                         |                                        ^    |
//                                    tail, freq 0                 insert, key in G |    | tail: freq > 0 ?
//                                         v                                        |    |  reinsert at head
//                                  [ ghost G: keys only ] -------------------------+    |  with freq - 1
//                                                                                       v  : evict
//
// Why this policy for a block cache shared by many volumes:
// - Scan resistance. A sequential read inserts blocks that are never touched again; they enter S,
//   leave S with frequency 0 and only their keys go to G. The hot set lives in M and is untouched, so
//   a full-device scan (a backup, `nbdcopy`, `qemu-img convert`) cannot flush it. Plain LRU puts every
//   scanned block at the head and pushes the whole hot set out.
// - Quick demotion. Most blocks are read once (boot images: each block read once per VM, but 100 VMs
//   share it); S lets a one-hit block go after ~10% of the cache has passed, while a block read twice
//   anywhere in that window is kept. The ghost catches blocks that come back just after leaving S.
// - Cheap hits. A hit only bumps a 2-bit counter in the entry: no list surgery, so the critical section
//   under a shard lock is a hash lookup, a counter store and the caller's copy. LRU moves the entry to
//   the head on every hit, touching two neighbours' cache lines.
// - ARC was the alternative: equally scan resistant, but its hits move entries between lists (lock
//   work on the hit path) and it adapts its split from ghost hits in ways that are harder to bound in
//   bytes. W-TinyLFU needs a count-min sketch with periodic aging; S3-FIFO's paper shows it as good or
//   better on block traces (the MSR and Alibaba block traces) with less state.
//
// Byte adaptation (the paper counts objects):
// - "S is full" means smallBytes >= smallTargetBytes (10% of capacity); eviction runs before an insert
//   while bytesHeld + charge > capacityBytes, as in the paper's Algorithm 1.
// - A block moves S -> M when it was read at least once after insertion (freq >= 1); it enters M with
//   freq 0, so it must earn its reinsertion in M too.
// - G remembers keys (and their charges) of up to ``mainTargetBytes`` bytes of evicted blocks, and at
//   most ``ghostEntriesMax`` keys, so its memory is bounded independently of block sizes.
//
// Invariants (checked by `checkInvariants()` in tests):
// 1. bytesHeld == smallBytes + mainBytes <= capacityBytes after every public call.
// 2. Every key in `index` is on exactly one of S and M, and its queue tag says which.
// 3. A key is never both held and in G.
// 4. 0 <= frequency <= 3.
// 5. ghost.bytes <= mainTargetBytes and ghost entries <= ghostEntriesMax.

/// The S3-FIFO eviction policy over byte-charged entries. A pure value; see the notes above.
public struct S3FIFOPolicy<Value>: CachePolicy {
    enum Queue: UInt8 { case small, main }

    struct Entry {
        var value: Value
        var charge: Int
        var frequency: UInt8
        var queue: Queue
    }

    /// Frequency saturates here (a 2-bit counter): three reinsertions at most before a block that
    /// stopped being read leaves M.
    static var frequencyMax: UInt8 { 3 }

    public let capacityBytes: Int
    /// S's share: when S holds at least this many bytes, eviction takes from S.
    public let smallTargetBytes: Int
    public var mainTargetBytes: Int { capacityBytes - smallTargetBytes }
    public let ghostEntriesMax: Int

    private var slab = LinkedSlab<Entry>()
    private var index: [UInt64: Int32] = [:]
    private var small = LinkedSlab<Entry>.List()
    private var main = LinkedSlab<Entry>.List()
    public private(set) var smallBytes = 0
    public private(set) var mainBytes = 0
    private var ghost: GhostQueue

    /// - Parameters:
    ///   - capacityBytes: the byte budget.
    ///   - smallQueueFraction: S's share of the budget; the paper's 10% is the default.
    ///   - ghostEntriesMax: most keys G remembers; default one per 4 KiB of capacity.
    public init(capacityBytes: Int, smallQueueFraction: Double = 0.1, ghostEntriesMax: Int? = nil) {
        precondition(capacityBytes > 0, "cache capacity must be positive")
        precondition(smallQueueFraction > 0 && smallQueueFraction < 1)
        self.capacityBytes = capacityBytes
        self.smallTargetBytes = max(1, Int(Double(capacityBytes) * smallQueueFraction))
        self.ghostEntriesMax = max(16, ghostEntriesMax ?? capacityBytes / 4096)
        self.ghost = GhostQueue(entriesMax: self.ghostEntriesMax, bytesMax: capacityBytes - smallTargetBytes)
    }

    public var bytesHeld: Int { smallBytes + mainBytes }
    public var count: Int { index.count }
    /// Keys remembered in the ghost queue.
    public var ghostCount: Int { ghost.count }

    public func contains(_ key: UInt64) -> Bool { index[key] != nil }

    /// True if `key` is remembered in the ghost queue (evicted from S recently, unread).
    public func ghostContains(_ key: UInt64) -> Bool { ghost.contains(key) }

    public func peek<Result>(_ key: UInt64, _ body: (Value) -> Result) -> Result? {
        guard let slot = index[key] else { return nil }
        return body(slab[slot].value)
    }

    public mutating func lookup<Result>(_ key: UInt64, _ body: (inout Value) -> Result?) -> Result? {
        guard let slot = index[key] else { return nil }
        guard let result = body(&slab[slot].value) else { return nil }
        let frequency = slab[slot].frequency
        if frequency < Self.frequencyMax { slab[slot].frequency = frequency + 1 }
        return result
    }

    @discardableResult
    public mutating func insert(_ key: UInt64, value: Value, charge: Int, evicted: (UInt64, Value) -> Void) -> Bool {
        precondition(charge > 0, "an entry must be charged at least one byte")
        var queue = Queue.small
        var frequency: UInt8 = 0
        if let slot = index.removeValue(forKey: key) {
            // A replacement keeps the entry's queue and credit (same key, same content for the block
            // cache); unlinking first means eviction below can never pick it.
            unlink(slot)
            let old = slab.release(slot)
            queue = old.queue
            frequency = old.frequency
        } else if ghost.remove(key) {
            queue = .main    // it came back soon after leaving S: the paper's ghost hit
        }
        guard charge <= capacityBytes else { return false }
        while bytesHeld + charge > capacityBytes { evictOne(evicted) }
        let entry = Entry(value: value, charge: charge, frequency: frequency, queue: queue)
        let slot = slab.allocate(key: key, payload: entry)
        index[key] = slot
        link(slot, queue: queue)
        return true
    }

    @discardableResult
    public mutating func remove(_ key: UInt64) -> Value? {
        _ = ghost.remove(key)
        guard let slot = index.removeValue(forKey: key) else { return nil }
        unlink(slot)
        return slab.release(slot).value
    }

    // MARK: Eviction

    private mutating func evictOne(_ evicted: (UInt64, Value) -> Void) {
        precondition(bytesHeld > 0, "eviction from an empty cache")
        if smallBytes >= smallTargetBytes || main.count == 0 {
            evictFromSmall(evicted)
        } else {
            evictFromMain(evicted)
        }
    }

    /// Takes S's tail: a block read since insertion is promoted to M, otherwise it leaves and its key
    /// goes to G. Stops after one block left the cache or S is empty.
    private mutating func evictFromSmall(_ evicted: (UInt64, Value) -> Void) {
        while small.tail != LinkedSlab<Entry>.none {
            let slot = small.tail
            if slab[slot].frequency >= 1 {
                unlink(slot)
                slab[slot].frequency = 0
                link(slot, queue: .main)
                if mainBytes > mainTargetBytes {
                    evictFromMain(evicted)
                    return
                }
            } else {
                let key = slab.key(slot)
                let charge = slab[slot].charge
                unlink(slot)
                index[key] = nil
                let entry = slab.release(slot)
                ghost.add(key, charge: charge)
                evicted(key, entry.value)
                return
            }
        }
    }

    /// Takes M's tail: a block read since it was last considered goes back to the head with one
    /// credit spent; the first one with no credit leaves. Ends within 4 passes over M.
    private mutating func evictFromMain(_ evicted: (UInt64, Value) -> Void) {
        while main.tail != LinkedSlab<Entry>.none {
            let slot = main.tail
            let frequency = slab[slot].frequency
            if frequency > 0 {
                slab.unlink(slot, from: &main)
                slab[slot].frequency = frequency - 1
                slab.pushHead(slot, onto: &main)
            } else {
                let key = slab.key(slot)
                unlink(slot)
                index[key] = nil
                evicted(key, slab.release(slot).value)
                return
            }
        }
    }

    // MARK: Queue bookkeeping

    private mutating func link(_ slot: Int32, queue: Queue) {
        slab[slot].queue = queue
        let charge = slab[slot].charge
        switch queue {
        case .small:
            slab.pushHead(slot, onto: &small)
            smallBytes += charge
        case .main:
            slab.pushHead(slot, onto: &main)
            mainBytes += charge
        }
    }

    private mutating func unlink(_ slot: Int32) {
        let charge = slab[slot].charge
        switch slab[slot].queue {
        case .small:
            slab.unlink(slot, from: &small)
            smallBytes -= charge
        case .main:
            slab.unlink(slot, from: &main)
            mainBytes -= charge
        }
    }

    // MARK: Checking

    /// Verifies invariants 1-5 from the design notes with a full walk; for tests (O(n)).
    public func checkInvariants() -> String? {
        if bytesHeld > capacityBytes { return "bytesHeld \(bytesHeld) > capacity \(capacityBytes)" }
        var seen = Set<UInt64>()
        for (list, queue, bytes) in [(small, Queue.small, smallBytes), (main, Queue.main, mainBytes)] {
            var slot = list.head, walked = 0, charged = 0
            while slot != LinkedSlab<Entry>.none {
                let key = slab.key(slot)
                let entry = slab[slot]
                if entry.queue != queue { return "key \(key) on \(queue) tagged \(entry.queue)" }
                if entry.frequency > Self.frequencyMax { return "frequency \(entry.frequency) for key \(key)" }
                if index[key] != slot { return "index disagrees for key \(key)" }
                if !seen.insert(key).inserted { return "key \(key) linked twice" }
                if ghost.contains(key) { return "key \(key) both held and in ghost" }
                charged += entry.charge
                walked += 1
                slot = slab.nodes[Int(slot)].next
            }
            if walked != list.count { return "\(queue) count \(list.count) but walked \(walked)" }
            if charged != bytes { return "\(queue) bytes \(bytes) but charges sum to \(charged)" }
        }
        if seen.count != index.count { return "index has \(index.count) keys, queues \(seen.count)" }
        return ghost.checkInvariants()
    }
}

/// The ghost FIFO: keys (with their charges) of blocks that recently left S unread.
///
/// A ring of fixed size plus a dictionary. Removing a key from the middle (a ghost hit or a
/// `remove`) only drops the dictionary entry; its ring slot is skipped when it reaches the head
/// (the serial number no longer matches). So every operation is O(1) and memory is fixed by
/// `entriesMax`.
struct GhostQueue {
    private struct Slot {
        var key: UInt64
        var serial: UInt64
        var charge: Int
    }

    let entriesMax: Int
    let bytesMax: Int
    private var ring: [Slot] = []
    private var head = 0              // index of the oldest ring slot
    private var ringCount = 0
    private var live: [UInt64: (serial: UInt64, charge: Int)] = [:]
    private var nextSerial: UInt64 = 0
    private(set) var bytes = 0

    init(entriesMax: Int, bytesMax: Int) {
        precondition(entriesMax > 0 && bytesMax > 0)
        self.entriesMax = entriesMax
        self.bytesMax = bytesMax
    }

    var count: Int { live.count }

    func contains(_ key: UInt64) -> Bool { live[key] != nil }

    mutating func add(_ key: UInt64, charge: Int) {
        _ = remove(key)
        guard charge <= bytesMax else { return }
        while ringCount == entriesMax || bytes + charge > bytesMax { popOldest() }
        let slot = Slot(key: key, serial: nextSerial, charge: charge)
        if ring.count < entriesMax {
            ring.append(slot)       // the ring grows to entriesMax once, then wraps
        } else {
            ring[(head + ringCount) % entriesMax] = slot
        }
        ringCount += 1
        live[key] = (nextSerial, charge)
        nextSerial += 1
        bytes += charge
    }

    /// Forgets `key`; true if it was remembered.
    mutating func remove(_ key: UInt64) -> Bool {
        guard let entry = live.removeValue(forKey: key) else { return false }
        bytes -= entry.charge
        return true
    }

    private mutating func popOldest() {
        precondition(ringCount > 0)
        let slot = ring[head]
        if let entry = live[slot.key], entry.serial == slot.serial {
            live[slot.key] = nil
            bytes -= entry.charge
        }
        head = (head + 1) % entriesMax
        ringCount -= 1
    }

    func checkInvariants() -> String? {
        if bytes > bytesMax { return "ghost bytes \(bytes) > \(bytesMax)" }
        if live.count > entriesMax { return "ghost has \(live.count) keys > \(entriesMax)" }
        if live.values.reduce(0, { $0 + $1.charge }) != bytes { return "ghost byte count drifted" }
        return nil
    }
}

extension S3FIFOPolicy: Sendable where Value: Sendable {}
extension S3FIFOPolicy.Entry: Sendable where Value: Sendable {}
extension GhostQueue: Sendable {}
