import Foundation
import Testing
import VBDControl

#if canImport(Glibc)
import Glibc
#endif

/// `vbdtool serve` in the background, a real NBD client (libnbd's Python binding) writing, and
/// the CLI taking snapshots and shares through the control socket meanwhile.
@Suite(.serialized) struct LiveTests {
    static let blockBytes = 4096

    /// The content the writer script puts in block `index` at generation `generation`.
    static func block(_ index: Int, _ generation: Int) -> [UInt8] {
        let unit = Array(String(format: "blk%06d-gen%03d;", index, generation).utf8)
        var out = [UInt8]()
        while out.count < blockBytes { out += unit }
        return Array(out.prefix(blockBytes))
    }

    static let writerScript = """
        import nbd, subprocess, sys, json
        uri, tool, store = sys.argv[1:4]
        B = 4096
        def block(i, gen):
            s = ("blk%06d-gen%03d;" % (i, gen)).encode()
            return (s * (B // len(s) + 1))[:B]
        def vbdtool(*args):
            r = subprocess.run([tool, *args, "--store", store], capture_output=True, text=True)
            if r.returncode != 0:
                print(json.dumps({"error": " ".join(args) + ": " + r.stderr})); sys.exit(1)
        h = nbd.NBD(); h.connect_uri(uri)
        acked = {}
        for i in range(64):
            h.pwrite(block(i, 0), i * B); acked[i] = 0
        for i in range(0, 64, 2):
            h.pwrite(block(i, 1), i * B); acked[i] = 1
        # Every write above is acknowledged; none below is sent yet. No flush: the snapshot
        # must hold acknowledged writes whether or not a client flushed them.
        at_snapshot = dict(acked)
        vbdtool("snapshot", "vm@s1")
        vbdtool("share", "vm@s1", "clone")
        # The share is an export at once, while this connection keeps writing to vm.
        c = nbd.NBD(); c.connect_uri(uri.replace("/vm?", "/clone?"))
        clone_reads_snapshot = c.pread(B, 0) == block(0, 1) and c.pread(B, B) == block(1, 0) and c.pread(B, 70 * B) == bytes(B)
        c.pwrite(block(0, 99), 0); c.flush()
        clone_writable = c.pread(B, 0) == block(0, 99)
        for i in range(96):
            h.pwrite(block(i, 2), i * B); acked[i] = 2
        h.flush()
        vbdtool("snapshot", "vm@s2")
        print(json.dumps({"snapshot": at_snapshot, "final": acked,
                          "cloneReadsSnapshot": clone_reads_snapshot, "cloneWritable": clone_writable}))
        """

    struct WriterResult: Decodable {
        var snapshot: [String: Int]
        var final: [String: Int]
        var cloneReadsSnapshot: Bool
        var cloneWritable: Bool
    }

    static func pythonWithNBD() -> String? {
        guard let python = Subprocess.find("python3"),
              let probe = try? Subprocess.run(python, ["-c", "import nbd"]), probe.succeeded else { return nil }
        return python
    }

    /// What both live tests start from: a served store with a 1 MiB volume "vm", and a Python
    /// client script run against it (arguments: the volume's URI, vbdtool, the store).
    struct LiveRun {
        let dir: TemporaryDirectory
        let store: String
        let server: RunningServer
        let python: String
        let nbdcopy: String
        let run: Tool.Outcome
    }

    /// Nil (recorded as an issue) when python3-libnbd or nbdcopy is missing.
    static func runScriptAgainstLiveServer(_ scriptText: String, named name: String) throws -> LiveRun? {
        guard let python = pythonWithNBD(), let nbdcopy = Subprocess.find("nbdcopy") else {
            Issue.record("python3-libnbd and nbdcopy (libnbd-bin) are needed for the live test")
            return nil
        }
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        #expect(try Tool.run(["create", "vm", "--size", "1M"], store: store).succeeded)
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        let script = dir.path + "/" + name
        try scriptText.write(toFile: script, atomically: true, encoding: .utf8)
        let run = try Subprocess.run(python, [script, server.uri("vm"), Tool.path, store], timeoutSeconds: 300)
        #expect(run.succeeded, "\(name): \(run.stdout) \(run.stderr) server log: \(server.log)")
        return LiveRun(dir: dir, store: store, server: server, python: python, nbdcopy: nbdcopy, run: run)
    }

    @Test func snapshotAndShareWhileAClientWrites() throws {
        guard let live = try Self.runScriptAgainstLiveServer(Self.writerScript, named: "writer.py") else { return }
        let (dir, store, server, python, nbdcopy, run) = (live.dir, live.store, live.server, live.python, live.nbdcopy, live.run)
        let result = try JSONDecoder().decode(WriterResult.self, from: Data(run.stdout.utf8))
        #expect(result.cloneReadsSnapshot, "the new share serves the snapshot's contents at once")
        #expect(result.cloneWritable)

        // Read the snapshot back over NBD and compare it with what was acknowledged before it.
        let snapshotFile = dir.path + "/s1.raw"
        let copied = try Subprocess.run(nbdcopy, [server.uri("vm@s1"), snapshotFile])
        #expect(copied.succeeded, "\(copied.stderr)")
        var expected = [UInt8](repeating: 0, count: 1 << 20)
        for (key, generation) in result.snapshot {
            let index = Int(key)!
            expected.replaceSubrange(index * Self.blockBytes..<(index + 1) * Self.blockBytes, with: Self.block(index, generation))
        }
        let snapshotBytes = try fileBytes(snapshotFile)
        #expect(snapshotBytes.count == expected.count)
        for index in 0..<(expected.count / Self.blockBytes) {
            let range = index * Self.blockBytes..<(index + 1) * Self.blockBytes
            #expect(Array(snapshotBytes[range]) == Array(expected[range]), "block \(index) of vm@s1")
        }

        // A snapshot is read-only over NBD.
        let readOnly = try Subprocess.run(python, ["-c", "import nbd,sys\nh=nbd.NBD();h.connect_uri(sys.argv[1])\ntry:\n h.pwrite(b'x'*512,0)\nexcept nbd.Error:\n sys.exit(3)",
                                                   server.uri("vm@s1")])
        #expect(readOnly.status == 3, "write to a snapshot must fail: \(readOnly.stderr)")

        // The volume holds every acknowledged write; export runs inside the server.
        let finalFile = dir.path + "/final.raw"
        let exported = try Tool.run(["export", "vm", finalFile], store: store)
        #expect(exported.succeeded, "\(exported.stderr)")
        let finalBytes = try fileBytes(finalFile)
        for index in 0..<96 {
            #expect(Array(finalBytes[index * Self.blockBytes..<(index + 1) * Self.blockBytes]) == Self.block(index, 2), "block \(index) of vm")
        }
        // Exactly blocks 0..95 changed between the two live snapshots.
        let diff = try Tool.run(["diff", "vm@s1", "vm@s2", "--json"], store: store).json(DiffReport.self)
        #expect(diff.ranges == [ByteRange(offset: 0, length: 96 * 4096)])

        // Live stats carry cache figures and show the share's extra space: one block.
        let stats = try Tool.run(["stats", "--json"], store: store).json(StoreStatistics.self)
        #expect(stats.live && stats.cache != nil)
        #expect(stats.images.first { $0.name == "clone" }?.uniqueBytes == 4096)
        #expect(try Tool.run(["fsck", "--json"], store: store).json(FsckSummary.self).clean)

        // Clean shutdown: the control socket goes away, the store opens without a server and
        // has everything.
        #expect(server.stop() == 0, "server log: \(server.log)")
        #expect(!FileManager.default.fileExists(atPath: store + "/control.sock"))
        #expect(server.log.contains("stopped cleanly"))
        let offline = try Tool.run(["list", "--json"], store: store).json([ImageSummary].self)
        #expect(offline.map(\.name) == ["clone", "vm", "vm@s1", "vm@s2"])
        let after = dir.path + "/after.raw"
        #expect(try Tool.run(["export", "vm@s1", after], store: store).succeeded)
        #expect(try fileBytes(after) == expected)
    }

    /// Two writers keep writing (each to its own half of the volume, so every block's writes are
    /// ordered) while the main thread takes a snapshot. Each write is logged with when it was
    /// sent and when it was acknowledged, on one clock with the snapshot call. The snapshot is
    /// taken once both writers have 50 acknowledged writes, and the writers stop once both have
    /// 50 more after it returned (counted, not slept for).
    static let concurrentWriterScript = """
        import nbd, random, subprocess, sys, json, threading, time
        uri, tool, store = sys.argv[1:4]
        B = 4096; BLOCKS = 256
        stop = threading.Event()
        logs = [[], []]
        progress = threading.Condition()
        def wait_until_both_wrote(targets):
            with progress:
                done = progress.wait_for(lambda: all(len(logs[k]) >= targets[k] for k in (0, 1)), timeout=120)
            if not done:
                print(json.dumps({"error": "writers stalled at %s" % [len(l) for l in logs]})); sys.exit(1)
        def block(i, seq):
            s = ("blk%06d-seq%08d;" % (i, seq)).encode()
            return (s * (B // len(s) + 1))[:B]
        def writer(k):
            h = nbd.NBD(); h.connect_uri(uri)
            rng = random.Random(k)
            seq = 0
            while not stop.is_set() and seq < 100000:
                i = rng.randrange(k * BLOCKS // 2, (k + 1) * BLOCKS // 2)
                seq += 1
                sent = time.monotonic()
                h.pwrite(block(i, seq), i * B)
                with progress:
                    logs[k].append([i, seq, sent, time.monotonic()])
                    progress.notify_all()
            h.shutdown()
        threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in (0, 1)]
        for t in threads: t.start()
        wait_until_both_wrote([50, 50])
        requested = time.monotonic()
        r = subprocess.run([tool, "snapshot", "vm@live", "--store", store], capture_output=True, text=True)
        returned = time.monotonic()
        with progress:
            after = [len(logs[k]) + 50 for k in (0, 1)]
        wait_until_both_wrote(after)
        stop.set()
        for t in threads: t.join()
        if r.returncode != 0:
            print(json.dumps({"error": r.stderr})); sys.exit(1)
        print(json.dumps({"requested": requested, "returned": returned, "writes": logs[0] + logs[1]}))
        """

    struct ConcurrentLog: Decodable {
        var requested: Double
        var returned: Double
        /// [block, seq, sent, acknowledged]
        var writes: [[Double]]
    }

    @Test func snapshotUnderConcurrentWritesHoldsEveryAcknowledgedWrite() throws {
        guard let live = try Self.runScriptAgainstLiveServer(Self.concurrentWriterScript, named: "writers.py") else { return }
        let (dir, server, nbdcopy, run) = (live.dir, live.server, live.nbdcopy, live.run)
        let log = try JSONDecoder().decode(ConcurrentLog.self, from: Data(run.stdout.utf8))
        let before = log.writes.filter { $0[3] < log.requested }.count
        #expect(before > 10 && log.writes.count > before, "writes happened before and after the snapshot (\(before) of \(log.writes.count))")

        let snapshotFile = dir.path + "/live.raw"
        let copied = try Subprocess.run(nbdcopy, [server.uri("vm@live"), snapshotFile])
        #expect(copied.succeeded, "\(copied.stderr)")
        let bytes = try fileBytes(snapshotFile)
        #expect(bytes.count == 1 << 20)
        var writesByBlock: [Int: [(seq: Int, sent: Double, acknowledged: Double)]] = [:]
        for w in log.writes { writesByBlock[Int(w[0]), default: []].append((Int(w[1]), w[2], w[3])) }
        for index in 0..<256 {
            let content = Array(bytes[index * Self.blockBytes..<(index + 1) * Self.blockBytes])
            let writes = writesByBlock[index] ?? []
            // The newest write acknowledged before the snapshot was asked for must be there (or a
            // later one that was in flight while it ran); nothing sent after it returned may be.
            let mustHave = writes.filter { $0.acknowledged < log.requested }.map(\.seq).max()
            if content.allSatisfy({ $0 == 0 }) {
                #expect(mustHave == nil, "block \(index) is empty in the snapshot but write \(mustHave ?? -1) was acknowledged before it")
                continue
            }
            let header = String(decoding: content.prefix(21), as: UTF8.self)   // "blk000123-seq00000042;"
            let seq = Int(header.dropFirst(13).prefix(8)) ?? -1
            guard let found = writes.first(where: { $0.seq == seq }) else {
                Issue.record("block \(index) holds \(header), which no writer wrote there")
                continue
            }
            #expect(content == LiveTests.sequencedBlock(index, seq), "block \(index) is torn")
            #expect(seq >= (mustHave ?? 0), "block \(index): snapshot has write \(seq), but \(mustHave ?? 0) was acknowledged before it")
            #expect(found.sent < log.returned, "block \(index): write \(seq) was sent after the snapshot returned")
        }
        #expect(server.stop() == 0)
    }

    static func sequencedBlock(_ index: Int, _ seq: Int) -> [UInt8] {
        let unit = Array(String(format: "blk%06d-seq%08d;", index, seq).utf8)
        var out = [UInt8]()
        while out.count < blockBytes { out += unit }
        return Array(out.prefix(blockBytes))
    }

    @Test func commandsRunInsideTheServerAndAreRefusedASecondWriter() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        let socket = store + "/control.sock"
        var st = stat()
        #expect(stat(socket, &st) == 0 && st.st_mode & 0o777 == 0o600, "control socket is owner-only")
        // Every command works while served (they would hit the lock if they opened the store).
        #expect(try Tool.run(["create", "a", "--size", "4M"], store: store).succeeded)
        let image = dir.path + "/i.raw"
        try writeBytes(patternBytes(count: 1 << 20, seed: 41), at: 0, to: image)
        #expect(try Tool.run(["import", image, "b"], store: store).succeeded)
        #expect(try Tool.run(["snapshot", "b@x"], store: store).succeeded)
        #expect(try Tool.run(["share", "b@x", "c"], store: store).succeeded)
        #expect(try Tool.run(["resize", "c", "--size", "2M"], store: store).succeeded)
        #expect(try Tool.run(["export", "b@x", dir.path + "/o.raw"], store: store).succeeded)
        #expect(try fileBytes(dir.path + "/o.raw") == fileBytes(image))
        if let qemuImg = Subprocess.find("qemu-img") {
            // Non-raw import while served: qemu-img streams into an NBD socket of the serving process.
            let qcow2 = dir.path + "/i.qcow2"
            #expect(try Subprocess.run(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", image, qcow2]).succeeded)
            let imported = try Tool.run(["import", qcow2, "q", "--json"], store: store)
            #expect(imported.succeeded, "\(imported.stderr)")
            #expect(try imported.json(TransferReport.self).format == "qcow2")
            #expect(try Tool.run(["export", "q", dir.path + "/q.raw"], store: store).succeeded)
            #expect(try fileBytes(dir.path + "/q.raw") == fileBytes(image))
            #expect(try Tool.run(["rm", "q"], store: store).succeeded)
        }
        #expect(try Tool.run(["gc"], store: store).succeeded)
        #expect(try Tool.run(["fsck"], store: store).succeeded)
        #expect(try Tool.run(["rm", "a"], store: store).succeeded)
        #expect(try Tool.run(["list", "--json"], store: store).json([ImageSummary].self).map(\.name) == ["b", "b@x", "c"])
        // A second server is refused by the store lock, with a clear message.
        let second = try Tool.run(["serve", "--unix", dir.path + "/other.sock"], store: store)
        #expect(second.status == 1 && second.stderr.contains("in use by another process"))
        // Ctrl-C stops as cleanly as SIGTERM.
        #expect(server.stop(signal: SIGINT) == 0)
        #expect(server.log.contains("stopped cleanly"))
        #expect(!FileManager.default.fileExists(atPath: socket))
    }

    @Test func aCrashedServerLeavesNothingThatBlocksTheNextOne() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        #expect(try Tool.run(["create", "kept", "--size", "1M"], store: store).succeeded)
        // SIGKILL: no cleanup at all; the control socket file stays behind.
        server.stop(signal: SIGKILL)
        #expect(FileManager.default.fileExists(atPath: store + "/control.sock"))
        // The CLI sees nobody answers, opens the store itself (the kernel dropped the flock) and
        // finds the acknowledged create.
        let list = try Tool.run(["list", "--json"], store: store)
        #expect(list.succeeded, "\(list.stderr)")
        #expect(try list.json([ImageSummary].self).map(\.name) == ["kept"])
        let status = try Tool.run(["status"], store: store)
        #expect(status.status == 1 && status.stderr.contains("no server is running"))
        // A new server replaces the stale socket.
        let again = try RunningServer(store: store, nbdSocket: dir.path + "/nbd2.sock")
        #expect(try Tool.run(["info", "kept"], store: store).succeeded)
        #expect(again.stop() == 0)
    }

    /// Needs root to switch users: reported as skipped otherwise (and make test fails on skips).
    @Test(.enabled(if: geteuid() == 0, "switching to another user needs root"))
    func otherUsersCannotControlTheServer() throws {
        let setpriv = try #require(Subprocess.find("setpriv"), "setpriv (util-linux) is needed")
        let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
        // The checkout may not be reachable by another user (a home directory of mode 0700): run
        // the tool from a copy the other user can reach.
        let reachable = try TemporaryDirectory()
        chmod(reachable.path, 0o755)
        let toolCopy = reachable.path + "/vbdtool"
        #expect(try Subprocess.run("/bin/cp", [Tool.path, toolCopy]).succeeded)
        #expect(try Subprocess.run(setpriv, nobody + [toolCopy, "--help"]).succeeded,
                "user nobody cannot run \(toolCopy)")
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        // Let another user reach the socket file; its 0600 mode must still keep them out.
        chmod(dir.path, 0o755)
        chmod(store, 0o755)
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        let asNobody = try Subprocess.run(setpriv, nobody + [toolCopy,
                                                    "create", "intruder", "--size", "1M", "--store", store])
        #expect(asNobody.status == 1)
        #expect(asNobody.stderr.contains("may not connect"), "\(asNobody.stderr)")
        #expect(try Tool.run(["list", "--json"], store: store).json([ImageSummary].self).isEmpty)
        #expect(server.stop() == 0)
    }

    @Test func controlSocketBoundsWhatAClientMaySend() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        // A frame header announcing 1 GiB: answered with a failure, not an allocation.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = Array((store + "/control.sock").utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: path + [0]) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(rc == 0)
        let header: [UInt8] = [0x40, 0, 0, 0]
        #expect(send(fd, header, 4, 0) == 4)
        var reply = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &reply, reply.count, Int32(MSG_WAITALL))
        let text = String(decoding: reply.prefix(max(0, n)), as: UTF8.self)
        #expect(text.contains("too-large"), "\(text)")
        // The server goes on serving.
        #expect(try Tool.run(["create", "after", "--size", "1M"], store: store).succeeded)
        #expect(server.stop() == 0)
    }
}
