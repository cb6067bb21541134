/// A FIFO with a fixed capacity: `append` fails instead of growing (docs/INVARIANTS.md 4).
///
/// An array plus a head index; the consumed prefix is dropped once it is half the storage, so
/// `removeFirst` is amortised O(1) and memory stays within twice the capacity.
struct BoundedQueue<Element> {
    private var storage: [Element] = []
    private var head = 0
    let capacity: Int

    init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    var count: Int { storage.count - head }
    var isEmpty: Bool { count == 0 }
    var isFull: Bool { count >= capacity }
    var first: Element? { isEmpty ? nil : storage[head] }

    /// Returns false (and keeps the element out) when full.
    mutating func append(_ element: Element) -> Bool {
        guard !isFull else { return false }
        storage.append(element)
        return true
    }

    mutating func removeFirst() -> Element? {
        guard !isEmpty else { return nil }
        let element = storage[head]
        head += 1
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        } else if head * 2 >= storage.count && head >= 64 {
            storage.removeFirst(head)
            head = 0
        }
        return element
    }

    /// Changes the first element in place (the queue must not be empty).
    mutating func updateFirst(_ body: (inout Element) -> Void) {
        precondition(!isEmpty)
        body(&storage[head])
    }
}
