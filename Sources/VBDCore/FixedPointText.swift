/// `units` of 10^-`decimals` as decimal text with exactly `decimals` digits after the point
/// (1234, 3 -> "1.234"; 5, 2 -> "0.05"), for trace and log lines written without Foundation.
public func fixedPointText(_ units: UInt64, decimals: Int) -> String {
    var scale: UInt64 = 1
    for _ in 0..<decimals { scale *= 10 }
    let fraction = String(units % scale)
    return "\(units / scale).\(String(repeating: "0", count: decimals - fraction.count))\(fraction)"
}
