import Synchronization

/// Passes progress on at most ``ControlLimits/progressFramesPerSecondMax`` times a second (and
/// always the final report), so reporting costs nothing next to the work.
struct ProgressThrottle {
    let phase: String
    let total: UInt64
    let unit: String
    let sink: ProgressSink
    private var lastSent: ContinuousClock.Instant?
    private var lastDone: UInt64 = 0
    private static let interval = Duration.seconds(1.0 / ControlLimits.progressFramesPerSecondMax)

    init(phase: String, total: UInt64, unit: String = "bytes", sink: @escaping ProgressSink) {
        self.phase = phase
        self.total = total
        self.unit = unit
        self.sink = sink
    }

    mutating func report(_ done: UInt64) {
        lastDone = done
        let now = ContinuousClock.now
        if let lastSent, now - lastSent < Self.interval { return }
        lastSent = now
        sink(ProgressReport(phase: phase, done: done, total: total, unit: unit))
    }

    mutating func finish() {
        sink(ProgressReport(phase: phase, done: total, total: total, unit: unit))
    }
}

/// A ``ProgressThrottle`` shared with a callback that runs on another thread.
final class ProgressThrottleBox: Sendable {
    private let throttle: Mutex<ProgressThrottle>
    init(_ throttle: ProgressThrottle) { self.throttle = Mutex(throttle) }
    func report(_ done: UInt64) { throttle.withLock { $0.report(done) } }
    func finish() { throttle.withLock { $0.finish() } }
}
