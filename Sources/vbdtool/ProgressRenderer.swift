import Foundation
import VBDCore
import Synchronization
import VBDControl

/// A one-line progress bar on stderr (percent, rate, ETA), redrawn in place. Only used when
/// stdout and stderr are terminals; otherwise every call is a no-op, so scripts see no noise.
final class ProgressRenderer: Sendable {
    let enabled: Bool
    private struct State {
        var start: ContinuousClock.Instant?
        var drawn = false
    }
    private let state = Mutex(State())

    init(enabled: Bool) { self.enabled = enabled }

    func update(_ report: ProgressReport) {
        guard enabled else { return }
        let line = state.withLock { s -> String in
            let now = ContinuousClock.now
            if s.start == nil { s.start = now }
            s.drawn = true
            return Self.line(report, elapsed: now - s.start!)
        }
        FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8))
    }

    func finish() {
        guard enabled else { return }
        let drawn = state.withLock { $0.drawn }
        if drawn { FileHandle.standardError.write(Data("\n".utf8)) }
    }

    static func line(_ report: ProgressReport, elapsed: Duration) -> String {
        let seconds = elapsed.inSeconds
        let fraction = report.total == 0 ? 0 : min(1, Double(report.done) / Double(report.total))
        let width = 30
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        var text = "\(report.phase) [\(bar)] \(String(format: "%5.1f", fraction * 100))%"
        if seconds > 0.2 && report.done > 0 {
            let rate = Double(report.done) / seconds
            switch report.unit {
            case "bytes": text += "  \(ByteSize.format(UInt64(rate)))/s"
            case "chunks": text += "  \(Int(rate)) chunks/s"
            default: break
            }
            if fraction > 0 && fraction < 1 {
                let remaining = seconds * (1 - fraction) / fraction
                text += "  ETA \(formatDuration(remaining))"
            }
        }
        return text
    }

    static func formatDuration(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
    }
}
