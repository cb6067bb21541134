import Foundation
import Testing
import VBDControl
import VBDStore

/// Every operator mistake gives a clear message on stderr and a non-zero exit status.
@Suite struct ErrorTests {
    @Test func unknownVolume() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        for args in [["info", "nope"], ["snapshot", "nope@s"], ["rm", "nope"], ["resize", "nope", "--size", "1G"],
                     ["share", "nope@s", "x"], ["diff", "nope@a", "nope@b"], ["export", "nope", dir.path + "/x.raw"]] {
            let r = try Tool.run(args, store: store)
            #expect(r.status == 1, "\(args)")
            #expect(r.stderr.contains("no volume or snapshot named 'nope"), "\(args): \(r.stderr)")
            #expect(r.stdout.isEmpty)
        }
        let json = try Tool.run(["info", "nope", "--json"], store: store)
        #expect(json.status == 1)
        #expect(try json.jsonError().code == "not-found")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/x.raw"), "a failed export leaves no file")
    }

    @Test func nameAlreadyTaken() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        #expect(try Tool.run(["create", "vm0", "--size", "1G"], store: store).succeeded)
        let again = try Tool.run(["create", "vm0", "--size", "1G"], store: store)
        #expect(again.status == 1)
        #expect(again.stderr.contains("the name 'vm0' is already taken"))
        #expect(try Tool.run(["snapshot", "vm0@s"], store: store).succeeded)
        let snap = try Tool.run(["snapshot", "vm0@s", "--json"], store: store)
        #expect(try snap.status == 1 && snap.jsonError().code == "already-exists")
        let share = try Tool.run(["share", "vm0@s", "vm0"], store: store)
        #expect(share.status == 1 && share.stderr.contains("already taken"))
        let image = dir.path + "/d.raw"
        try writeBytes([1, 2, 3], at: 0, to: image)
        let imported = try Tool.run(["import", image, "vm0"], store: store)
        #expect(imported.status == 1 && imported.stderr.contains("already taken"))
        #expect(try Tool.run(["info", "vm0", "--json"], store: store).json(ImageSummary.self).size == 1 << 30, "the existing volume is untouched")
    }

    @Test func deletingWhatOthersDependOnNamesThemAndSuggestsForce() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        #expect(try Tool.run(["create", "base", "--size", "1G"], store: store).succeeded)
        #expect(try Tool.run(["snapshot", "base@gold"], store: store).succeeded)
        #expect(try Tool.run(["share", "base@gold", "vm1"], store: store).succeeded)
        #expect(try Tool.run(["share", "base@gold", "vm2"], store: store).succeeded)

        let snap = try Tool.run(["rm", "base@gold"], store: store)
        #expect(snap.status == 1)
        #expect(snap.stderr.contains("vm1, vm2") && snap.stderr.contains("--force"), "\(snap.stderr)")
        let snapJSON = try Tool.run(["rm", "base@gold", "--json"], store: store).jsonError()
        #expect(snapJSON.code == "has-dependents" && snapJSON.dependents == ["vm1", "vm2"])

        let volume = try Tool.run(["rm", "base"], store: store)
        #expect(volume.status == 1 && volume.stderr.contains("base@gold") && volume.stderr.contains("--force"))
        #expect(try Tool.run(["list", "--json"], store: store).json([ImageSummary].self).count == 4, "nothing was deleted")

        #expect(try Tool.run(["rm", "base@gold", "--force"], store: store).succeeded)
        let left = try Tool.run(["list", "--json"], store: store).json([ImageSummary].self)
        #expect(left.map(\.name) == ["base", "vm1", "vm2"])
        #expect(left.allSatisfy { $0.origin == nil })
    }

    @Test func badSizeSyntaxIsAUsageError() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        for args in [["create", "v", "--size", "20X"], ["create", "v", "--size", "1.5G"], ["create", "v", "--size=-3"],
                     ["create", "v", "--size", "1G", "--block-size", "3K"], ["resize", "v", "--size", "lots"],
                     ["serve", "--cache-size", "big"]] {
            let r = try Tool.run(args, store: store)
            #expect(r.status == 64, "\(args): \(r.status)")
            #expect(r.stderr.contains("invalid size") || r.stderr.contains("power of two"), "\(args): \(r.stderr)")
        }
        #expect(try Tool.run(["list", "--json"], store: store).json([ImageSummary].self).isEmpty)
    }

    @Test func sizesTheStoreRefuses() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let zero = try Tool.run(["create", "v", "--size", "0"], store: store)
        #expect(zero.status == 1 && zero.stderr.contains("volume size must be"))
        let huge = try Tool.run(["create", "v", "--size", "2P"], store: store)
        #expect(huge.status == 1 && huge.stderr.contains("volume size must be"))
        #expect(try Tool.run(["create", "v", "--size", "2G"], store: store).succeeded)
        let shrink = try Tool.run(["resize", "v", "--size", "1G", "--json"], store: store)
        #expect(try shrink.status == 1 && shrink.jsonError().code == "not-supported")
        #expect(try Tool.run(["snapshot", "v@s"], store: store).succeeded)
        let snapResize = try Tool.run(["resize", "v@s", "--size", "4G"], store: store)
        #expect(snapResize.status == 1 && snapResize.stderr.contains("read-only"))
        let badName = try Tool.run(["create", "has space", "--size", "1G"], store: store)
        #expect(badName.status == 1 && badName.stderr.contains("invalid name"))
        let notSnapshot = try Tool.run(["snapshot", "v"], store: store)
        #expect(notSnapshot.status == 1 && notSnapshot.stderr.contains("VOLUME@NAME"))
        let shareVolume = try Tool.run(["share", "v", "w"], store: store)
        #expect(shareVolume.status == 1 && shareVolume.stderr.contains("VOLUME@SNAPSHOT"))
    }

    @Test func storeNotInitialised() throws {
        let dir = try TemporaryDirectory()
        let missing = dir.path + "/nothing-here"
        for args in [["list"], ["create", "v", "--size", "1G"], ["stats"], ["fsck"], ["gc"], ["serve", "--unix", dir.path + "/s.sock"]] {
            let r = try Tool.run(args, store: missing)
            #expect(r.status == 1, "\(args)")
            #expect(r.stderr.contains("no store at \(missing)") && r.stderr.contains("vbdtool init"), "\(args): \(r.stderr)")
        }
        let json = try Tool.run(["list", "--json"], store: missing)
        #expect(try json.jsonError().code == "not-initialized")
        let store = try dir.initializedStore()
        let twice = try Tool.run(["init"], store: store)
        #expect(twice.status == 1 && twice.stderr.contains("already exists"))
    }

    @Test func storeLockedByAnotherProcess() throws {
        let dir = try TemporaryDirectory()
        let path = try dir.initializedStore()
        // This test process holds the store open: no control socket, so the CLI finds the lock.
        let held = try Store.open(path: path)
        defer { try? held.close() }
        let r = try Tool.run(["list"], store: path)
        #expect(r.status == 1)
        #expect(r.stderr.contains("in use by another process") && r.stderr.contains("pid \(getpid())"), "\(r.stderr)")
        let json = try Tool.run(["create", "v", "--size", "1G", "--json"], store: path)
        #expect(try json.jsonError().code == "locked")
        let serve = try Tool.run(["serve", "--unix", dir.path + "/s.sock"], store: path)
        #expect(serve.status == 1 && serve.stderr.contains("in use by another process"))
    }

    @Test func noSpaceLeft() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock", extraArguments: ["--max-data-size", "1M"])
        let image = dir.path + "/big.raw"
        try writeBytes(patternBytes(count: 4 << 20, seed: 7), at: 0, to: image)   // incompressible
        let r = try Tool.run(["import", image, "big", "--json"], store: store)
        #expect(r.status == 1)
        let failure = try r.jsonError()
        #expect(failure.code == "no-space" && failure.message.contains("no space left"), "\(failure)")
        #expect(try Tool.run(["info", "big"], store: store).status == 1, "the half-imported volume is removed")
        #expect(try Tool.run(["fsck", "--json"], store: store).json(FsckSummary.self).clean, "nothing acknowledged is lost")
        #expect(server.stop() == 0)
    }

    @Test func missingAndUnreadableImportFiles() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let missing = try Tool.run(["import", dir.path + "/absent.raw", "v"], store: store)
        #expect(missing.status == 1 && missing.stderr.contains("cannot open") && missing.stderr.contains("No such file"))
        let empty = dir.path + "/empty.raw"
        _ = FileManager.default.createFile(atPath: empty, contents: nil)
        let emptyResult = try Tool.run(["import", empty, "v"], store: store)
        #expect(emptyResult.status == 1 && emptyResult.stderr.contains("empty"))
        #expect(try Tool.run(["create", "v", "--size", "1M"], store: store).succeeded)
        let out = dir.path + "/exists.raw"
        try writeBytes([1], at: 0, to: out)
        let clobber = try Tool.run(["export", "v", out], store: store)
        #expect(clobber.status == 1 && clobber.stderr.contains("--force"))
        #expect(try fileBytes(out) == [1], "the existing file is untouched")
        #expect(try Tool.run(["export", "v", out, "--force"], store: store).succeeded)
    }
}
