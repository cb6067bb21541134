import Foundation
import Testing
@testable import VBDAccounting

@Suite struct StateStorageTests {
    /// Replaces from two threads at once (the server's periodic persist beside a control change's)
    /// all succeed and leave one whole version: they used to share the temporary file, and about
    /// a third of them failed renaming it.
    @Test func concurrentReplacesAllSucceedAndLeaveOneWholeVersion() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("state-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let storage = FileStateStorage(path: dir.appendingPathComponent("tenancy.json").path)
        let versions = (0..<2).map { thread in (0..<300).map { [UInt8]("thread \(thread) version \($0) ".utf8) + [UInt8](repeating: UInt8(65 + thread), count: 2000 + $0) } }
        let failures = ConcurrentFailures()
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            for bytes in versions[thread] {
                do { try storage.replace(with: bytes) } catch { failures.add("\(error)") }
            }
        }
        let failed = failures.all
        #expect(failed.count == 0, "the first failure: \(failed.first ?? "")")
        let final = try #require(try storage.read())
        #expect(versions.joined().contains(final))
    }
}

private final class ConcurrentFailures: @unchecked Sendable {
    // @unchecked: every access goes through `lock`.
    private let lock = NSLock()
    private var messages: [String] = []
    func add(_ message: String) { lock.withLock { messages.append(message) } }
    var all: [String] { lock.withLock { messages } }
}
