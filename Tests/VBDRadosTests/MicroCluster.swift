import Foundation
import Synchronization
import Testing
import VBDRados

/// The real Ceph cluster the RADOS tests run against: one monitor and one memstore OSD on
/// 127.0.0.1 (scripts/ceph-micro-cluster.sh), started by the first test that needs it and stopped
/// when the test process exits (and by the script's watchdog should the process die instead).
///
/// There is no skip: on a machine without Ceph every RADOS test fails with the script's message
/// ("'ceph-mon' is not installed ..."), so a CI run can never pass without having run them.
final class MicroCluster: Sendable {
    let directory: String
    let configurationFile: String

    private static let shared = Mutex<Result<MicroCluster, MicroClusterError>?>(nil)

    /// The cluster, started on first use.
    static func get() throws -> MicroCluster {
        try shared.withLock { started in
            if started == nil { started = Result { () throws(MicroClusterError) in try MicroCluster() } }
            return try started!.get()
        }
    }

    static var scriptPath: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/ceph-micro-cluster.sh").path
    }

    /// A cluster of its own, for a test that breaks it (stop it with ``stop()``).
    static func startPrivate() throws -> MicroCluster {
        try MicroCluster()
    }

    /// Stops the cluster and removes its directory.
    func stop() {
        _ = Self.runScript(["stop", directory])
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Kills the OSD (SIGKILL): the cluster then answers no object operation.
    func killOSD() throws {
        guard kill(try osdPID(), SIGKILL) == 0 else { throw MicroClusterError(message: "cannot kill the OSD: \(String(cString: strerror(errno)))") }
    }

    func osdPID() throws -> pid_t {
        let pidText = try String(contentsOfFile: directory + "/run/osd.0.pid", encoding: .utf8)
        guard let pid = pid_t(pidText.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw MicroClusterError(message: "no OSD pid in \(directory)/run/osd.0.pid ('\(pidText)')")
        }
        return pid
    }

    /// Starves the OSD of CPU, as a machine loaded by other work does: it runs `runMilliseconds`
    /// of every 200 (SIGCONT, then SIGSTOP for the rest) until the returned function is called,
    /// which lets it run freely again.
    func starveOSD(runMilliseconds: Int) throws -> @Sendable () -> Void {
        precondition(runMilliseconds > 0 && runMilliseconds < 200)
        let pid = try osdPID()
        let stopping = Atomic<Bool>(false)
        let finished = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            while !stopping.load(ordering: .relaxed) {
                usleep(UInt32(runMilliseconds * 1000))
                kill(pid, SIGSTOP)
                usleep(UInt32((200 - runMilliseconds) * 1000))
                kill(pid, SIGCONT)
            }
            kill(pid, SIGCONT)
            finished.signal()
        }
        return {
            stopping.store(true, ordering: .relaxed)
            finished.wait()
        }
    }

    private init() throws(MicroClusterError) {
        directory = NSTemporaryDirectory() + "vbd-ceph-" + UUID().uuidString
        let (status, output) = Self.runScript(["start", directory])
        // The script prints the conf path last on success (also checked in case the exit status was lost).
        guard status == 0, output.contains(directory + "/ceph.conf") else {
            _ = Self.runScript(["stop", directory])
            try? FileManager.default.removeItem(atPath: directory)
            throw MicroClusterError(message: "scripts/ceph-micro-cluster.sh start failed (exit \(status)): \(output)")
        }
        configurationFile = directory + "/ceph.conf"
        let directory = self.directory
        atexit_b {
            guard FileManager.default.fileExists(atPath: directory) else { return }
            _ = MicroCluster.runScript(["stop", directory])
            try? FileManager.default.removeItem(atPath: directory)
        }
    }

    /// Runs the script with posix_spawn and waitpid (Foundation's Process did not notice the exit
    /// of a script whose daemons outlive it), its output going to a file that is returned.
    static func runScript(_ arguments: [String]) -> (Int32, String) {
        let outputPath = NSTemporaryDirectory() + "vbd-ceph-script-" + UUID().uuidString + ".out"
        defer { unlink(outputPath) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var environment = ProcessInfo.processInfo.environment
        environment["VBD_CEPH_OWNER_PID"] = String(getpid())
        let argv = ["/bin/bash", scriptPath] + arguments
        let envp = environment.map { "\($0.key)=\($0.value)" }
        var cArgv = argv.map { strdup($0) } + [nil]
        var cEnvp = envp.map { strdup($0) } + [nil]
        defer { for p in cArgv + cEnvp { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/bin/bash", &actions, nil, &cArgv, &cEnvp)
        guard rc == 0 else { return (127, "cannot run \(scriptPath): \(String(cString: strerror(rc)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno == EINTR { continue }
            return (126, "waitpid \(pid): \(String(cString: strerror(errno)))")
        }
        let output = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        // WIFEXITED / WEXITSTATUS, which Glibc does not export to Swift.
        let exitCode: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return (exitCode, output)
    }

    /// A new client connection: each one is a separate "host" to the cluster.
    func connect(timeoutSeconds: Int = 20) throws -> RadosConnection {
        var options = RadosConnection.Options(configurationFile: configurationFile)
        options.operationTimeoutSeconds = timeoutSeconds
        return try RadosConnection(options)
    }

    /// A pool handle on a namespace no other test uses.
    func freshPool(_ connection: RadosConnection, prefix: String = "t") throws -> RadosPool {
        try connection.openPool("vbd", namespace: prefix + "-" + UUID().uuidString.prefix(8).lowercased())
    }
}

struct MicroClusterError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// `atexit` with a Swift closure (at most a handful are registered per process).
private let exitHandlers = Mutex<[@Sendable () -> Void]>([])
private func atexit_b(_ handler: @escaping @Sendable () -> Void) {
    let first = exitHandlers.withLock { handlers in
        handlers.append(handler)
        return handlers.count == 1
    }
    if first {
        atexit {
            for handler in exitHandlers.withLock({ $0 }) { handler() }
        }
    }
}

extension MicroCluster {
    /// A store location of its own in the pool "vbd": `prefix` and a random suffix.
    func location(_ prefix: String) -> RadosStoreLocation {
        RadosStoreLocation(configurationFile: configurationFile, pool: "vbd",
                           namespace: prefix + "-" + UUID().uuidString.prefix(8).lowercased())
    }

    /// The sharing domain's chunk objects (every group) and the tags each holds. With
    /// `skippingVanished` (a sweep running beside the listing), an object whose tags cannot be
    /// read is left out (its last reference went since the listing); else that is an error.
    func chunkObjects(_ domain: String, _ connection: RadosConnection, skippingVanished: Bool = false) throws -> [String: [String]] {
        let pool = try connection.openPool("vbd", namespace: RadosChunkStorage.chunkNamespace)
        defer { pool.close() }
        var found: [String: [String]] = [:]
        for name in try pool.objectNames() {
            guard let object = ChunkObjectName(objectName: name), object.group.hasPrefix(domain + "-") else { continue }
            let objects = try RadosChunkObjects(pool: pool, group: object.group, hashSeed: 0)
            if skippingVanished {
                if let tags = try? objects.referenceTags(object) { found[name] = tags }
            } else {
                found[name] = try objects.referenceTags(object)
            }
        }
        return found
    }
}
