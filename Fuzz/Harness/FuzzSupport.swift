// Shared by every fuzz target (compiled into each target's executable, see Fuzz/build.sh).

#if canImport(Glibc)
import Glibc
#endif

/// Ends the run with a message libFuzzer shows next to the crashing input. An invariant that
/// fails is a product bug: the input is saved as crash-<sha1> and the run stops.
func invariant(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
               file: StaticString = #fileID, line: UInt = #line) {
    if !condition() {
        let text = "FUZZ INVARIANT FAILED (\(file):\(line)): \(message())\n"
        _ = text.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
        abort()
    }
}

/// Deterministic choices derived from the input, so a saved crash replays exactly.
struct FuzzChoices {
    private var state: UInt64

    init(seed bytes: UnsafeBufferPointer<UInt8>) {
        // FNV-1a over the input: every byte influences the schedule.
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01b3 }
        state = hash
    }

    /// SplitMix64 step.
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }

    mutating func below(_ bound: Int) -> Int {
        precondition(bound > 0)
        return Int(next() % UInt64(bound))
    }

    mutating func coin() -> Bool { next() & 1 == 1 }
}

/// How the client's byte stream reaches the parser: the server sees whatever segmentation TCP
/// produced, so the same bytes are fed in differently sized reads.
enum Segmentation: Int, CaseIterable {
    case whole, singleBytes, sevenBytes, random

    func chunks(_ count: Int, choices: inout FuzzChoices) -> [Range<Int>] {
        var ranges: [Range<Int>] = []
        var start = 0
        while start < count {
            let size: Int
            switch self {
            case .whole: size = count
            case .singleBytes: size = 1
            case .sevenBytes: size = 7
            case .random: size = 1 + choices.below(64)
            }
            let end = min(count, start + size)
            ranges.append(start..<end)
            start = end
        }
        return ranges
    }
}
