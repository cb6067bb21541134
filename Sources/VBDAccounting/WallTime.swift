/// A point in wall-clock time, nanoseconds since the Unix epoch.
///
/// Leases and audit records outlive the process, so they use wall time, not a monotone clock.
/// Callers pass it in (an injected clock), so tests drive time directly.
public struct WallTime: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var nanoseconds: Int64

    public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }
    public init(seconds: Int64) { self.nanoseconds = seconds * 1_000_000_000 }

    public static func < (lhs: WallTime, rhs: WallTime) -> Bool { lhs.nanoseconds < rhs.nanoseconds }

    public static func + (lhs: WallTime, rhs: Duration) -> WallTime {
        let (seconds, attoseconds) = rhs.components
        return WallTime(nanoseconds: lhs.nanoseconds + seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }

    public static func - (lhs: WallTime, rhs: WallTime) -> Duration {
        .nanoseconds(lhs.nanoseconds - rhs.nanoseconds)
    }

    /// The system's real-time clock.
    public static func now() -> WallTime {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return WallTime(nanoseconds: Int64(spec.tv_sec) * 1_000_000_000 + Int64(spec.tv_nsec))
    }

    /// Seconds.nanoseconds, e.g. "1795000000.000000123": exact and sortable as text.
    public var description: String {
        let seconds = nanoseconds / 1_000_000_000, fraction = nanoseconds % 1_000_000_000
        let digits = String(abs(fraction))
        return "\(seconds).\(String(repeating: "0", count: 9 - digits.count))\(digits)"
    }

    public init(from decoder: any Decoder) throws {
        nanoseconds = try decoder.singleValueContainer().decode(Int64.self)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(nanoseconds)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
