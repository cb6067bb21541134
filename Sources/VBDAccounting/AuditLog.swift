import Crypto
import Foundation

// MARK: - Notes on the design
//
// The audit log is a text file of JSON lines, one record per line, appended and fsynced per record.
// Each record carries `previousHash`, the hash of the record before it (64 zeros for the first), and
// `hash` = SHA-256 over a canonical binary encoding of its own fields including `previousHash`
// (``AuditRecord/canonicalBytes``), so JSON formatting never affects the chain.
//
// `verify` reports, per record:
// - altered: the stored hash is not the hash of the record's fields, or (when the editor also
//   recomputed that hash) the next record's `previousHash` no longer matches it;
// - removed: a sequence number between the first (0) and the last is missing;
// - reordered: a record appears after one with a larger sequence number;
// - malformed: a line that is not a record (including a line torn by a crash during append);
// - truncated: with an anchor (a record's sequence and hash, kept outside the store, e.g. the head
//   `vbdtool audit verify` printed, in the operator's notes), the log ends before the anchor;
// - anchor mismatch: the record at the anchor's sequence has another hash. Records dropped from the
//   tail and new ones appended after them form a valid chain with consecutive numbers, so this is
//   the only trace such a rewrite leaves; since every record's hash covers its predecessor's, a
//   matching anchor also vouches for every record before it.
// Without an anchor, removing the tail or rewriting the whole file consistently is undetectable:
// that is the limit of any self-contained hash chain, and why the head hash is shown.

/// One control operation, as logged.
public struct AuditRecord: Codable, Equatable, Sendable {
    public var sequence: UInt64
    public var time: WallTime
    /// Who did it: a domain, an operator name, or "server" for automatic actions (lease expiry).
    public var actor: String
    /// e.g. "volume.create", "snapshot.create", "share", "volume.delete", "volume.resize",
    /// "lease.grant", "lease.renew", "lease.revoke", "lease.expire", "policy.set", "credit.topup", "gc".
    public var operation: String
    /// The volume, snapshot or domain acted on.
    public var target: String
    public var details: [String: String]
    public var previousHash: String
    public var hash: String

    public static let genesisHash = String(repeating: "0", count: 64)

    /// The bytes hashed: a version tag and every field except `hash`, each length-prefixed so no
    /// two different records encode alike; details sorted by key.
    public var canonicalBytes: [UInt8] {
        var bytes = Array("vbd-audit-v1".utf8)
        func put(_ value: UInt64) { for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) } }
        func put(_ text: String) {
            let utf8 = Array(text.utf8)
            put(UInt64(utf8.count))
            bytes += utf8
        }
        put(sequence)
        put(UInt64(bitPattern: time.nanoseconds))
        put(actor)
        put(operation)
        put(target)
        put(UInt64(details.count))
        for key in details.keys.sorted() {
            put(key)
            put(details[key]!)
        }
        put(previousHash)
        return bytes
    }

    /// SHA-256 (swift-crypto) of ``canonicalBytes``, as 64 lowercase hex digits.
    public var computedHash: String {
        SHA256.hash(data: canonicalBytes).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }
}

/// Where the log's bytes live. `append` must be durable when it returns (fsync).
public protocol AuditStorage: AnyObject, Sendable {
    func readAll() throws -> [UInt8]
    func append(_ bytes: [UInt8]) throws
}

/// In-memory storage, for tests and for servers run without an audit file.
public final class MemoryAuditStorage: AuditStorage, @unchecked Sendable {
    // @unchecked: every access goes through `lock`.
    private let lock = NSLock()
    private var bytes: [UInt8]

    public init(bytes: [UInt8] = []) { self.bytes = bytes }

    public func readAll() throws -> [UInt8] { lock.withLock { bytes } }
    public func append(_ more: [UInt8]) throws { lock.withLock { bytes += more } }
    /// Tests tamper with the stored text through this.
    public func replaceAll(_ new: [UInt8]) { lock.withLock { bytes = new } }
}

/// An append-only file: O_APPEND writes, fsync after each record.
public final class FileAuditStorage: AuditStorage, @unchecked Sendable {
    // @unchecked: the descriptor is immutable and appends are serialised by `lock`.
    private let lock = NSLock()
    private let descriptor: Int32
    public let path: String

    public enum FileError: Error, CustomStringConvertible {
        case open(String, Int32), write(Int32), sync(Int32), read(Int32)
        public var description: String {
            switch self {
            case .open(let path, let code): return "cannot open audit log \(path): \(String(cString: strerror(code)))"
            case .write(let code): return "audit log write failed: \(String(cString: strerror(code)))"
            case .sync(let code): return "audit log fsync failed: \(String(cString: strerror(code)))"
            case .read(let code): return "audit log read failed: \(String(cString: strerror(code)))"
            }
        }
    }

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw FileError.open(path, errno) }
        descriptor = fd
    }

    deinit { close(descriptor) }

    public func readAll() throws -> [UInt8] {
        try lock.withLock {
            var result: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 64 << 10)
            var offset: off_t = 0
            while true {
                let count = chunk.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, $0.count, offset) }
                if count < 0 { throw FileError.read(errno) }
                if count == 0 { return result }
                result += chunk[0..<count]
                offset += off_t(count)
            }
        }
    }

    public func append(_ bytes: [UInt8]) throws {
        try lock.withLock {
            var written = 0
            while written < bytes.count {
                let count = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + written, $0.count - written) }
                if count < 0 {
                    if errno == EINTR { continue }
                    throw FileError.write(errno)
                }
                written += count
            }
            guard fsync(descriptor) == 0 else { throw FileError.sync(errno) }
        }
    }
}

public enum AuditProblem: Equatable, Sendable, CustomStringConvertible {
    case malformed(line: Int)
    case altered(sequence: UInt64, line: Int)
    case removed(sequence: UInt64)
    case reordered(sequence: UInt64, line: Int)
    case truncated(expectedLastSequence: UInt64, foundLastSequence: UInt64?)
    /// The record at the anchor's sequence is not the one the anchor names: the log was cut back
    /// to before it and written on from there.
    case anchorMismatch(sequence: UInt64, line: Int)

    public var description: String {
        switch self {
        case .malformed(let line): return "line \(line): not an audit record"
        case .altered(let sequence, let line): return "record \(sequence) (line \(line)) was altered"
        case .removed(let sequence): return "record \(sequence) was removed"
        case .reordered(let sequence, let line): return "record \(sequence) (line \(line)) is out of order"
        case .truncated(let expected, let found):
            return "records after \(found.map(String.init) ?? "the start") were removed (anchor says \(expected))"
        case .anchorMismatch(let sequence, let line):
            return "record \(sequence) (line \(line)) is not the record the anchor names: the log was cut back and rewritten from there"
        }
    }
}

public struct AuditVerification: Equatable, Sendable {
    public var recordCount: Int
    public var problems: [AuditProblem]
    /// Sequence and hash of the last record: the anchor to keep for later verification.
    public var head: AuditAnchor?
    public var isIntact: Bool { problems.isEmpty }
}

public struct AuditAnchor: Equatable, Sendable, Codable {
    public var sequence: UInt64
    public var hash: String
    public init(sequence: UInt64, hash: String) {
        self.sequence = sequence
        self.hash = hash
    }
}

public enum AuditLogError: Error, Equatable, CustomStringConvertible {
    case storage(String)
    case recordTooLarge(Int)
    public var description: String {
        switch self {
        case .storage(let detail): return detail
        case .recordTooLarge(let bytes): return "audit record of \(bytes) bytes exceeds \(AuditLog.recordBytesMax)"
        }
    }
}

/// The hash-chained log. Not thread-safe by itself: one owner (the tenancy service) serialises it.
public struct AuditLog {
    /// A record is one control operation's description; 64 KiB is far beyond any, and bounds reads.
    public static let recordBytesMax = 64 << 10

    public let storage: any AuditStorage
    public private(set) var nextSequence: UInt64 = 0
    public private(set) var lastHash = AuditRecord.genesisHash
    /// The stored text ended without a newline (a torn append): the next record starts a new line.
    private var needsNewline = false

    /// Opens a log, continuing the chain from its last well-formed record.
    public init(storage: any AuditStorage) throws(AuditLogError) {
        self.storage = storage
        let bytes: [UInt8]
        do { bytes = try storage.readAll() } catch { throw .storage("\(error)") }
        needsNewline = !(bytes.isEmpty || bytes.last == UInt8(ascii: "\n"))
        for line in Self.lines(bytes).reversed() {
            if let record = try? JSONDecoder().decode(AuditRecord.self, from: Data(line.text)) {
                nextSequence = record.sequence + 1
                lastHash = record.hash
                break
            }
        }
    }

    @discardableResult
    public mutating func append(actor: String, operation: String, target: String, details: [String: String] = [:],
                                time: WallTime) throws(AuditLogError) -> AuditRecord {
        var record = AuditRecord(sequence: nextSequence, time: time, actor: actor, operation: operation,
                                 target: target, details: details, previousHash: lastHash, hash: "")
        record.hash = record.computedHash
        var line: [UInt8] = needsNewline ? [UInt8(ascii: "\n")] : []
        do { line += try Self.encoder.encode(record) } catch { throw .storage("\(error)") }
        line.append(UInt8(ascii: "\n"))
        guard line.count <= Self.recordBytesMax else { throw .recordTooLarge(line.count) }
        do { try storage.append(line) } catch { throw .storage("\(error)") }
        needsNewline = false
        nextSequence += 1
        lastHash = record.hash
        return record
    }

    /// Every well-formed record, in file order.
    public func records() throws(AuditLogError) -> [AuditRecord] {
        let bytes: [UInt8]
        do { bytes = try storage.readAll() } catch { throw .storage("\(error)") }
        return Self.lines(bytes).compactMap { try? JSONDecoder().decode(AuditRecord.self, from: Data($0.text)) }
    }

    public func verify(anchor: AuditAnchor? = nil) throws(AuditLogError) -> AuditVerification {
        let bytes: [UInt8]
        do { bytes = try storage.readAll() } catch { throw .storage("\(error)") }
        return Self.verify(bytes: bytes, anchor: anchor)
    }

    /// Checks a log's text (see the notes at the top of the file).
    public static func verify(bytes: [UInt8], anchor: AuditAnchor? = nil) -> AuditVerification {
        var problems: [AuditProblem] = []
        var parsed: [(record: AuditRecord, line: Int)] = []
        for line in lines(bytes) {
            guard let record = try? JSONDecoder().decode(AuditRecord.self, from: Data(line.text)) else {
                problems.append(.malformed(line: line.number))
                continue
            }
            parsed.append((record, line.number))
        }
        var altered = Set<UInt64>()
        for (record, line) in parsed where record.hash != record.computedHash {
            altered.insert(record.sequence)
            problems.append(.altered(sequence: record.sequence, line: line))
        }
        // Order: a record after one with a larger sequence number is out of place.
        var largest: UInt64?
        for (record, line) in parsed {
            if let seen = largest, record.sequence < seen {
                problems.append(.reordered(sequence: record.sequence, line: line))
            }
            largest = max(largest ?? record.sequence, record.sequence)
        }
        // Gaps: every number from 0 to the largest must be present.
        let present = Set(parsed.map(\.record.sequence))
        if let largest {
            // Bounded by the file's record count: a forged huge sequence number reports one gap range
            // as at most `parsed.count + 1` entries instead of looping to 2^64.
            var reported = 0
            var sequence: UInt64 = 0
            while sequence <= largest && reported <= parsed.count {
                if !present.contains(sequence) {
                    problems.append(.removed(sequence: sequence))
                    reported += 1
                }
                if sequence == UInt64.max { break }
                sequence += 1
            }
        }
        // Links: a record whose successor does not name its hash was replaced (rehashed) or is
        // followed by a replaced link; only checked where the sequence numbers are consecutive.
        for index in parsed.indices.dropFirst() {
            let previous = parsed[index - 1].record, current = parsed[index].record
            guard current.sequence == previous.sequence + 1, !altered.contains(current.sequence),
                  !altered.contains(previous.sequence) else { continue }
            if current.previousHash != previous.hash {
                altered.insert(previous.sequence)
                problems.append(.altered(sequence: previous.sequence, line: parsed[index - 1].line))
            }
        }
        if let first = parsed.first, first.record.sequence == 0,
           first.record.previousHash != AuditRecord.genesisHash, !altered.contains(0) {
            problems.append(.altered(sequence: 0, line: first.line))
        }
        let last = parsed.last?.record
        if let anchor {
            // The anchor pins one record: the one at its sequence must be there with its hash, however
            // many records follow. Cutting the log back and appending again reuses the sequence numbers
            // (and forms a valid chain), but cannot reproduce the anchored record's hash.
            if let anchored = parsed.first(where: { $0.record.sequence == anchor.sequence }) {
                if anchored.record.hash != anchor.hash {
                    problems.append(.anchorMismatch(sequence: anchor.sequence, line: anchored.line))
                }
            } else if (last?.sequence ?? 0) < anchor.sequence || last == nil {
                problems.append(.truncated(expectedLastSequence: anchor.sequence, foundLastSequence: last?.sequence))
            }
        }
        return AuditVerification(recordCount: parsed.count, problems: problems,
                                 head: last.map { AuditAnchor(sequence: $0.sequence, hash: $0.hash) })
    }

    static var encoder: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }

    /// Non-empty lines with their 1-based numbers.
    static func lines(_ bytes: [UInt8]) -> [(text: ArraySlice<UInt8>, number: Int)] {
        var result: [(ArraySlice<UInt8>, Int)] = []
        var start = 0, number = 1
        for index in bytes.indices where bytes[index] == UInt8(ascii: "\n") {
            if index > start { result.append((bytes[start..<index], number)) }
            start = index + 1
            number += 1
        }
        if start < bytes.count { result.append((bytes[start...], number)) }
        return result
    }
}
