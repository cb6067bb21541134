import Foundation
import Logging
import Testing
import VBDCore
@testable import VhostUser

#if canImport(Glibc)
import Glibc
#endif

/// The rule that decides which completions check the guest's `used_event` (``CallCoalescing``),
/// alone, over a real split ring, and in the real door.
@Suite struct CallCoalescingTests {
    static let window: UInt64 = 100_000   // 100 us, in the nanoseconds `now` counts
    func rule(_ window: UInt64 = Self.window) -> CallCoalescing { CallCoalescing(window: .nanoseconds(Int64(window))) }

    @Test func aLoneCompletionAlwaysChecks() {
        var rule = rule()
        var checks: [Bool] = []
        for quick in [true, false] {
            rule.taken(quick: quick)
            checks.append(rule.completed(quick: quick, now: 1_000))
        }
        // A slow request (flush, large transfer) in flight does not hold a completion back.
        rule.taken(quick: false)
        rule.taken(quick: true)
        checks.append(rule.completed(quick: true, now: 2_000))
        checks.append(rule.completed(quick: false, now: 3_000))
        #expect(checks == [true, true, true, true])
    }

    @Test func aBurstIsCheckedOnceByItsLastCompletion() {
        var rule = rule()
        for _ in 0..<8 { rule.taken(quick: true) }
        let checks = (0..<8).map { rule.completed(quick: true, now: 5_000 + UInt64($0) * 1_000) }
        #expect(checks == Array(repeating: false, count: 7) + [true])
        #expect(rule.unchecked == 0 && rule.quickInFlight == 0)
    }

    /// With requests always in flight (each completion's thread takes the next one), the oldest
    /// completion not checked yet is checked by the first completion at least `window` after it.
    @Test func anUncheckedCompletionWaitsAtMostTheWindowAndOneGap() {
        var rule = rule()
        for _ in 0..<4 { rule.taken(quick: true) }
        var completedAt: [UInt64] = [], checkedAt: [UInt64] = []
        var now: UInt64 = 0
        for _ in 0..<40 {
            now += 30_000
            completedAt.append(now)
            if rule.completed(quick: true, now: now) { checkedAt.append(now) }
            rule.taken(quick: true)
        }
        // Completions at 30, 60, 90, 120 us skip; the one at 150 finds the oldest 120 us old and
        // checks; then every fifth. No completion waits longer than the window plus one gap.
        #expect(Array(checkedAt.prefix(3)) == [150_000, 300_000, 450_000])
        for t in completedAt where t <= checkedAt.last! {
            let wait = checkedAt.first { $0 >= t }! - t
            #expect(wait <= Self.window + 30_000)
        }
    }

    @Test func aZeroWindowChecksEveryCompletion() {
        var rule = rule(0)
        for _ in 0..<4 { rule.taken(quick: true) }
        let checks = (0..<4).map { _ in rule.completed(quick: true, now: 0) }
        #expect(checks == [true, true, true, true])
    }

    /// A guest driver with EVENT_IDX, as Linux's: after an interrupt it reaps every used entry and
    /// asks for an interrupt at the next one (`used_event` = what it reaped), then looks again.
    /// Requests are taken and completed by the device in random order over a real split ring, with
    /// the rule deciding which completions check; the clock moves by random steps. Never may the
    /// guest wait for an interrupt it asked for while nothing is left in flight to raise it, and at
    /// the end it has reaped every completion.
    @Test(arguments: [0, 1, 2, 3, 4, 5, 6, 7])
    func noCompletionIsLeftWithoutItsInterrupt(seed: UInt64) throws {
        var random = SeededRandom(seed: seed)
        let guest = GuestRing(queueSize: 16)
        let ring = try SplitVirtqueue(size: 16, addresses: guest.addresses, memory: guest.table, lastAvailableIndex: 0,
                                      eventIndex: true, indirectDescriptors: false)
        var rule = rule()
        var freeHeads = Array(UInt16(0)..<16)
        var inFlight: [(head: UInt16, quick: Bool)] = []
        var reaped: UInt16 = 0          // the guest's last_used_idx
        var interruptPending = false
        var now: UInt64 = 0
        var submitted = 0, interrupts = 0, completions = 0
        guest.usedEvent = 0

        func guestHandlesInterrupt() {
            repeat {
                while reaped != guest.usedIndex {
                    freeHeads.append(UInt16(guest.usedElement(reaped).id))
                    reaped &+= 1
                }
                guest.usedEvent = reaped   // virtqueue_enable_cb: the next completion, please
            } while reaped != guest.usedIndex   // ... and look again (more arrived meanwhile)
        }

        for _ in 0..<20_000 {
            now += random.next(below: Self.window / 2)
            switch random.next(below: 4) {
            case 0 where submitted < 3_000 && !freeHeads.isEmpty:
                guest.publish(freeHeads.removeFirst())
                submitted += 1
            case 1 where inFlight.count < 16:
                if let head = try ring.nextAvailable() {
                    let quick = random.next(below: 5) != 0
                    rule.taken(quick: quick)
                    inFlight.append((head, quick))
                }
            case 2 where !inFlight.isEmpty:
                let request = inFlight.remove(at: Int(random.next(below: UInt64(inFlight.count))))
                ring.complete(head: request.head, writtenBytes: 1)
                completions += 1
                if rule.completed(quick: request.quick, now: now) && ring.shouldNotify() {
                    interruptPending = true
                    interrupts += 1
                }
            case 3 where interruptPending:
                interruptPending = false
                guestHandlesInterrupt()
            default:
                break
            }
            // The guest waits for an interrupt at `reaped`: something in flight must still raise it.
            if !interruptPending && guest.usedIndex != reaped {
                try #require(!inFlight.isEmpty, "seed \(seed): completions \(reaped)..<\(guest.usedIndex) wait for an interrupt nothing will raise")
            }
        }
        // Drain: the device takes and completes everything left, the guest handles what it gets.
        while true {
            if let head = try ring.nextAvailable() { rule.taken(quick: true); inFlight.append((head, true)) }
            if let request = inFlight.popLast() {
                now += 1_000
                ring.complete(head: request.head, writtenBytes: 1)
                completions += 1
                if rule.completed(quick: request.quick, now: now) && ring.shouldNotify() { interruptPending = true; interrupts += 1 }
            } else if interruptPending {
                interruptPending = false
                guestHandlesInterrupt()
            } else {
                break
            }
        }
        #expect(reaped == guest.usedIndex && inFlight.isEmpty && completions == submitted)
        #expect(interrupts < completions)
    }
}

/// xorshift64*: the model test's schedules, the same on every run.
struct SeededRandom {
    private var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9e37_79b9_7f4a_7c15 | 1 }
    mutating func next(below bound: UInt64) -> UInt64 {
        state ^= state >> 12; state ^= state << 25; state ^= state >> 27
        return (state &* 0x2545_f491_4f6c_dd1d) % bound
    }
}

/// The door itself: requests served by the real ``VhostUserBlkServer`` over a shared ring, the
/// call eventfd's counter read to count its signals (an eventfd adds up the writes it gets).
extension CallCoalescingTests {
    /// A door on the store's volume; with `heldUntil`, reads wait until that many run at once.
    func server(_ scratch: ScratchStore, heldUntil expected: Int? = nil, window: Duration) throws -> (VhostUserBlkServer, String) {
        let path = scratch.directory.appendingPathComponent("coalescing.sock").path
        let volume = try scratch.store.openExport(named: "vol")
        let device: any BlockDevice = expected.map { ConcurrentReadsDevice(volume, expected: $0) } ?? volume
        let server = VhostUserBlkServer(socketPath: path, exportName: "vol", queueCountMax: 1, callCoalescingWindow: window,
                                        logger: Logger(label: "test")) { device }
        try server.start()
        return (server, path)
    }

    /// Waits (each signal at most `timeout` ms) until the used index reaches `used`; returns the
    /// call signals counted, including any that arrive within 50 ms after.
    func signalsUntilUsed(call: Int32, guest: GuestRing, used: UInt16, timeout: Int32) throws -> UInt64 {
        var signals: UInt64 = 0
        func take(_ wait: Int32) -> Bool {
            var p = pollfd(fd: call, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, wait) == 1 else { return false }
            var count: UInt64 = 0
            if read(call, &count, 8) == 8 { signals += count }
            return true
        }
        while guest.usedIndex != used {
            try #require(take(timeout), "no call eventfd signal within \(timeout) ms (used index \(guest.usedIndex) of \(used))")
        }
        while take(50) {}
        return signals
    }

    /// Four reads held by the device until all four run, then released together: one call for
    /// the burst (without coalescing, one per completion: four).
    @Test func aBurstOfCompletionsCostsOneCall() throws {
        let scratch = try ScratchStore()
        let (server, path) = try server(scratch, heldUntil: 4, window: .seconds(30))
        defer { server.stop() }
        let front = try FrontEnd(path: path)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        let reads = (0..<4).map { guest.blockRequest(type: 0, sector: UInt64($0) * 8, readLength: 4096, firstDescriptor: 3 * $0) }
        var one: UInt64 = 1
        _ = write(kick, &one, 8)
        let signals = try signalsUntilUsed(call: call, guest: guest, used: 4, timeout: 60_000)
        #expect(reads.allSatisfy { guest.bytes(at: $0.status, count: 1) == [0] })
        #expect(signals == 1)
    }

    /// A request alone in flight signals when it completes, whatever the window: four reads one
    /// after the other, four calls, each within 5 s though the window is 30 s.
    @Test func aLoneCompletionSignalsAtOnce() throws {
        let scratch = try ScratchStore()
        let (server, path) = try server(scratch, window: .seconds(30))
        defer { server.stop() }
        let front = try FrontEnd(path: path)
        let guest = GuestRing(shared: true)
        let kick = eventfd(), call = eventfd()
        defer { close(kick); close(call) }
        try front.setUp(guest: guest, kick: kick, call: call)
        var signals: UInt64 = 0
        for i in 0..<4 {
            guest.blockRequest(type: i == 3 ? 4 : 0, sector: UInt64(i) * 8, readLength: i == 3 ? 0 : 4096, firstDescriptor: 3 * i)
            var one: UInt64 = 1
            _ = write(kick, &one, 8)
            signals += try signalsUntilUsed(call: call, guest: guest, used: UInt16(i + 1), timeout: 5_000)
        }
        #expect(signals == 4)
    }
}
