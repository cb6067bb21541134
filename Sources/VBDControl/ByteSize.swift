/// Byte sizes as operators write them: `20G`, `512M`, `4K`, `1T`, or plain bytes.
///
/// Suffixes are powers of 1024 (as qemu-img and most hypervisor tools use them); `K`/`KiB`/`KB`
/// all mean 1024. Fractions are refused rather than rounded: a volume size must be exact.
public enum ByteSize {
    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let text: String
        public var description: String {
            "invalid size '\(text)': use a whole number of bytes with an optional suffix K, M, G, T or P (powers of 1024), e.g. 20G, 512M, 4K, 1048576"
        }
    }

    private static let multipliers: [Character: UInt64] = [
        "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
    ]

    /// Parses `text`; throws ``ParseError`` for anything else (empty, fractions, negative, unknown
    /// suffix, overflow).
    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        let trimmed = text.trimmingSpaces()
        var digits = Substring(trimmed)
        var suffix = ""
        while let last = digits.last, !last.isASCIIDigit {
            suffix.insert(last, at: suffix.startIndex)
            digits.removeLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isASCIIDigit), let number = UInt64(digits) else {
            throw ParseError(text: text)
        }
        var unit = suffix.uppercased()
        if unit.hasSuffix("IB") { unit.removeLast(2) } else if unit.count == 2 && unit.hasSuffix("B") { unit.removeLast() }
        if unit.isEmpty { return number }
        guard unit.count == 1, let multiplier = multipliers[unit.first!] else { throw ParseError(text: text) }
        let (product, overflow) = number.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw ParseError(text: text) }
        return product
    }

    /// `21474836480` -> `20 GiB`, `1536` -> `1.5 KiB`: for tables, not for parsing back.
    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(bytes)
        var index = 0
        while value >= 1024 && index < units.count - 1 {
            value /= 1024
            index += 1
        }
        if index == 0 { return "\(bytes) B" }
        let rounded = (value * 10).rounded() / 10
        if rounded == rounded.rounded() { return "\(Int(rounded)) \(units[index])" }
        return "\(rounded) \(units[index])"
    }
}

extension Character {
    var isASCIIDigit: Bool { isASCII && isNumber }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first == " " { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        return String(s)
    }
}
