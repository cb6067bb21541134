import Foundation

/// When a queue's completion asks the guest whether it wants an interrupt, and when it leaves that
/// to a later completion of the same queue (notification coalescing).
///
/// Without it every completion checked the guest's `used_event` and signalled the call eventfd when
/// the guest asked; a guest that has caught up asks for the very next completion, so completions
/// spread out over time by the I/O threads cost the guest one interrupt each, where QEMU's own
/// virtio-blk (behind the NBD door) completes bursts and notifies once per burst.
///
/// The rule: a completion skips the check while another quick request of the queue (a small read or
/// write, ``VirtioBlkRequestHandler/isQuick(_:)``) is in flight and the oldest completion not
/// checked yet is younger than `window`; otherwise it checks, for every completion since the last
/// check at once (`vring_need_event` over the whole range).
/// - Never lost: a completion skips only while another request is in flight, and every request in
///   flight completes (a queue stops only after its requests in flight complete) and decides again;
///   the last completion with nothing else in flight always checks.
/// - Bounded: the oldest unchecked completion waits at most `window` plus what is left of the
///   quick request whose flight let the last completion skip.
/// - Queue depth 1: nothing else is in flight, every completion checks at once, as before.
///
/// Not thread-safe: the queue's worker keeps it under its ring lock, with the ring.
public struct CallCoalescing: Sendable {
    /// The window a door uses unless told otherwise: `VBD_VHOST_USER_CALL_WINDOW_US` from the
    /// environment (microseconds; 0 turns coalescing off), else 100 us.
    public static let defaultWindow: Duration = {
        if let text = ProcessInfo.processInfo.environment["VBD_VHOST_USER_CALL_WINDOW_US"], let us = Int64(text), us >= 0 {
            return .microseconds(us)
        }
        return .microseconds(100)
    }()

    /// How long the oldest completion not checked yet may wait for the check (nanoseconds); 0
    /// checks at every completion.
    let window: UInt64
    /// Quick requests taken from the ring and not completed yet.
    private(set) var quickInFlight = 0
    /// Completions published since the last check.
    private(set) var unchecked = 0
    /// When the oldest of them completed.
    private var oldestUnchecked: UInt64 = 0

    init(window: Duration) {
        let (seconds, attoseconds) = window.components
        self.window = seconds <= 0 && attoseconds <= 0 ? 0 : UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
    }

    /// A request was taken from the ring.
    mutating func taken(quick: Bool) {
        if quick { quickInFlight += 1 }
    }

    /// A request was completed (its used element published) at `now`; returns whether to check the
    /// guest's wishes now (`SplitVirtqueue.shouldNotify`) for it and every completion skipped before.
    mutating func completed(quick: Bool, now: UInt64) -> Bool {
        if quick { quickInFlight -= 1 }
        precondition(quickInFlight >= 0, "a quick completion that was never taken")
        if unchecked == 0 { oldestUnchecked = now }
        unchecked += 1
        if window > 0 && quickInFlight > 0 && now &- oldestUnchecked < window { return false }
        unchecked = 0
        return true
    }
}
