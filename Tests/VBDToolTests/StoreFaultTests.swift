import Foundation
import Testing
import VBDControl
import VBDCore
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// The operator's view of store faults: read-only commands change nothing, a damaged journal is
/// refused and repaired only on request, the lock survives `rm lock`, serve options and a corrupt
/// tenancy.json fail with messages that say what is wrong.
@Suite struct StoreFaultTests {
    /// Every file of the store with its bytes (the control socket and pid file excluded).
    func snapshotFiles(_ store: String) throws -> [String: [UInt8]] {
        var out: [String: [UInt8]] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: store) where name != "lock" {
            out[name] = try fileBytes(store + "/" + name)
        }
        return out
    }

    /// A store whose journal holds three flushed frames after the last checkpoint.
    func storeWithJournalFrames(_ dir: TemporaryDirectory) throws -> (store: String, journal: String) {
        let store = try dir.initializedStore()
        let opened = try Store.open(path: store)
        try opened.createVolume(name: "v", size: 1 << 20)
        let dev = try opened.device(named: "v")
        for i in 0..<3 {
            try patternBytes(count: 4096, seed: UInt64(i)).withUnsafeBytes { try dev.write(offset: UInt64(i) * 4096, data: $0, fua: false) }
            try dev.flush()
        }
        opened.abandonWithoutFlush()
        let journal = try FileManager.default.contentsOfDirectory(atPath: store)
            .filter { $0.hasPrefix("journal-") }
            .max { (try? fileBytes(store + "/" + $0).count) ?? 0 < (try? fileBytes(store + "/" + $1).count) ?? 0 }!
        return (store, store + "/" + journal)
    }

    @Test func readOnlyCommandsLeaveEveryFileAsItWas() throws {
        let dir = try TemporaryDirectory()
        let (store, _) = try storeWithJournalFrames(dir)
        let before = try snapshotFiles(store)
        let image = dir.path + "/out.raw"
        for args in [["list"], ["info", "v"], ["stats"], ["fsck"], ["diff", "v", "v"], ["export", "v", image]] {
            let r = try Tool.run(args, store: store)
            #expect(r.succeeded, "\(args): \(r.stderr)")
            #expect(try snapshotFiles(store) == before, "`vbdtool \(args.joined(separator: " "))` changed the store")
        }
    }

    @Test func corruptJournalFrameIsRefusedAndRepairedOnlyOnRequest() throws {
        let dir = try TemporaryDirectory()
        let (store, journal) = try storeWithJournalFrames(dir)
        var bytes = try fileBytes(journal)
        bytes[30] ^= 0x40   // the first frame's payload
        try writeBytes(bytes, at: 0, to: journal)
        let before = try snapshotFiles(store)
        let name = URL(fileURLWithPath: journal).lastPathComponent
        for args in [["list"], ["fsck"], ["create", "w", "--size", "1M"]] {
            let r = try Tool.run(args, store: store)
            #expect(r.status == 1, "\(args)")
            #expect(r.stderr.contains("\(name) frame 0 at offset 0 is corrupt") && r.stderr.contains("frame 2 at offset"), "\(args): \(r.stderr)")
            #expect(try snapshotFiles(store) == before, "`vbdtool \(args.joined(separator: " "))` changed a damaged store")
        }
        let serve = try Tool.run(["serve", "--unix", dir.path + "/s.sock"], store: store)
        #expect(serve.status == 1 && serve.stderr.contains("is corrupt"), "\(serve.stderr)")

        let repair = try Tool.run(["fsck", "--repair"], store: store)
        #expect(repair.succeeded, "\(repair.stderr)")
        #expect(repair.stderr.contains("repair: \(name): dropping corrupt frame 0 at offset 0"), "\(repair.stderr)")
        #expect(repair.stderr.contains("frame 1 at offset") && repair.stderr.contains("frame 2 at offset"), "\(repair.stderr)")
        #expect(repair.stdout.contains("clean"))
        #expect(try Tool.run(["list"], store: store).succeeded)
    }

    @Test func secondServerIsRefusedEvenAfterTheLockFileIsDeleted() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        #expect(unlink(store + "/lock") == 0)
        unlink(store + "/control.sock")   // so the commands below cannot reach the server and open the store themselves
        let second = try Tool.run(["serve", "--unix", dir.path + "/nbd2.sock"], store: store)
        #expect(second.status == 1 && second.stderr.contains("in use by another process"), "\(second.stderr)")
        let list = try Tool.run(["list"], store: store)
        #expect(list.status == 1 && list.stderr.contains("in use by another process"), "\(list.stderr)")
        #expect(server.stop() == 0, "\(server.log)")
    }

    @Test func serveOptionsAreCheckedBeforeAnythingStarts() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let cases: [([String], String)] = [
            (["--cache-size", "0"], "--cache-size: expected 1M"),
            (["--cache-size", "16E"], "--cache-size"),
            (["--last-chance-size", "16E"], "--last-chance-size"),
            (["--max-data-size", "0"], "--max-data-size: expected at least 1M"),
            (["--tls-cert", dir.path + "/none.pem", "--tls-key", dir.path + "/none.key"], "--tls-cert: cannot read"),
            (["--unix", dir.path + "/" + String(repeating: "s", count: 120)], "--unix: the socket path"),
        ]
        for (options, message) in cases {
            var args = ["serve"] + options
            if !options.contains("--unix") { args += ["--unix", dir.path + "/s.sock"] }
            let r = try Tool.run(args, store: store, timeoutSeconds: 30)
            #expect(r.status == 64, "\(options): status \(r.status), \(r.stderr)")
            #expect(r.stderr.contains(message), "\(options): \(r.stderr)")
        }
    }

    @Test func corruptTenancyStateIsNamedAsSuch() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        #expect(try Tool.run(["create", "v", "--size", "1M"], store: store).succeeded)
        try writeBytes(Array("{ not json".utf8), at: 0, to: store + "/tenancy.json")
        for args in [["create", "w", "--size", "1M"], ["serve", "--unix", dir.path + "/s.sock"]] {
            let r = try Tool.run(args, store: store, timeoutSeconds: 30)
            #expect(r.status == 1, "\(args)")
            #expect(r.stderr.contains(store + "/tenancy.json is corrupt") && !r.stderr.contains("audit log"), "\(args): \(r.stderr)")
        }
        // Commands that only read the store do not need the accounting state.
        #expect(try Tool.run(["list"], store: store).succeeded)
    }
}
