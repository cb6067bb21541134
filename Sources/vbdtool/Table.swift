import Foundation
import VBDControl

/// Left-aligned text columns for human output.
struct Table {
    var header: [String]
    var rows: [[String]] = []

    init(_ header: String...) { self.header = header }
    init(_ header: [String]) { self.header = header }

    mutating func add(_ row: String...) { rows.append(row) }

    func render() -> String {
        var widths = header.map(\.count)
        for row in rows {
            for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) }
        }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, cell in
                i == cells.count - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }
}

enum Human {
    static func size(_ bytes: UInt64) -> String { ByteSize.format(bytes) }

    static func date(_ secondsSince1970: UInt64) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss'Z'"
        return formatter.string(from: Date(timeIntervalSince1970: TimeInterval(secondsSince1970)))
    }

    static func ratio(_ value: Double?) -> String {
        value.map { String(format: "%.2fx", $0) } ?? "-"
    }

    static func describe(_ image: ImageSummary) -> String {
        var parts = [image.kind == "snapshot" ? "snapshot (read-only)" : "volume", size(image.size),
                     "\(size(UInt64(image.blockSize))) blocks", "group \(image.group)"]
        if let origin = image.origin { parts.append("shared from \(origin)") }
        return "\(image.name): " + parts.joined(separator: ", ")
    }
}
