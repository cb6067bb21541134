/// Cache entries stored in one growable array and threaded onto doubly-linked lists by index.
///
/// Why not `class` nodes: one allocation per entry and ARC traffic on every relink. Indexes into a
/// contiguous array keep a relink to four integer stores and let the lists share one free list.
///
/// ### Invariants
/// 1. A node is on at most one list at a time; `list.count` equals the nodes reachable from `head`.
/// 2. A released slot holds no payload (its value is dropped at release) and is reused first.
/// 3. `nodes.count` never exceeds the largest number of entries live at once (bounded by the owner's
///    byte capacity divided by the smallest charge).
struct LinkedSlab<Payload> {
    static var none: Int32 { -1 }

    struct Node {
        var key: UInt64
        var previous: Int32
        var next: Int32
        var payload: Payload?
    }

    /// One FIFO/LRU list: `head` is the newest end, `tail` the oldest (the eviction end).
    struct List {
        var head: Int32 = LinkedSlab.none
        var tail: Int32 = LinkedSlab.none
        var count = 0
    }

    private(set) var nodes: [Node] = []
    private var freeSlots: [Int32] = []

    var liveCount: Int { nodes.count - freeSlots.count }

    mutating func allocate(key: UInt64, payload: Payload) -> Int32 {
        let node = Node(key: key, previous: Self.none, next: Self.none, payload: payload)
        if let slot = freeSlots.popLast() {
            nodes[Int(slot)] = node
            return slot
        }
        precondition(nodes.count < Int(Int32.max), "cache entry slab is full")
        nodes.append(node)
        return Int32(nodes.count - 1)
    }

    /// Drops the payload and makes the slot reusable. The node must not be on a list.
    @discardableResult
    mutating func release(_ slot: Int32) -> Payload {
        let index = Int(slot)
        precondition(nodes[index].previous == Self.none && nodes[index].next == Self.none, "releasing a linked node")
        let payload = nodes[index].payload.take()!
        freeSlots.append(slot)
        return payload
    }

    func key(_ slot: Int32) -> UInt64 { nodes[Int(slot)].key }

    subscript(slot: Int32) -> Payload {
        get { nodes[Int(slot)].payload! }
        _modify { yield &nodes[Int(slot)].payload! }
    }

    mutating func pushHead(_ slot: Int32, onto list: inout List) {
        let index = Int(slot)
        nodes[index].previous = Self.none
        nodes[index].next = list.head
        if list.head != Self.none { nodes[Int(list.head)].previous = slot } else { list.tail = slot }
        list.head = slot
        list.count += 1
    }

    mutating func unlink(_ slot: Int32, from list: inout List) {
        let index = Int(slot)
        let previous = nodes[index].previous, next = nodes[index].next
        if previous != Self.none { nodes[Int(previous)].next = next } else { list.head = next }
        if next != Self.none { nodes[Int(next)].previous = previous } else { list.tail = previous }
        nodes[index].previous = Self.none
        nodes[index].next = Self.none
        list.count -= 1
        precondition(list.count >= 0)
    }
}

extension LinkedSlab: Sendable where Payload: Sendable {}
extension LinkedSlab.Node: Sendable where Payload: Sendable {}
