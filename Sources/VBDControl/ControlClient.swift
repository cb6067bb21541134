import Foundation
import VBDAccounting
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// Runs operator commands against a store: inside its running server when one answers on the
/// store's control socket, otherwise in this process on a store it opens (and closes) itself.
public enum ControlClient {
    /// The control socket of the store at `storePath`.
    public static func socketPath(forStore storePath: String) -> String {
        storePath + "/control.sock"
    }

    /// Where a request ran.
    public enum Route: Sendable, Equatable {
        case server(pid: Int32)
        case local
    }

    /// Sends `request` to the server of `storePath` if one is running; nil when none is.
    /// `family` names the RADOS family the request is for (see ``ControlEnvelope/family``).
    public static func sendIfServed(_ request: ControlRequest, family: String? = nil, storePath: String,
                                    progress: ProgressSink) throws(ControlFailure) -> ControlResult? {
        guard case let .connected(fd) = try UnixSocket.connect(socketPath(forStore: storePath)) else { return nil }
        defer { close(fd) }
        try ControlFraming.send(ControlEnvelope(request: request, family: family), on: fd, bytesMax: ControlLimits.requestBytesMax)
        while true {
            guard let reply = try ControlFraming.receive(ControlReply.self, from: fd, bytesMax: ControlLimits.replyBytesMax) else {
                throw ControlFailure(code: "io", message: "the server closed the control connection without an answer (did it stop?)")
            }
            switch reply {
            case .progress(let report): progress(report)
            case .success(let result): return result
            case .failure(let failure): throw failure
            }
        }
    }

    /// Runs `request` in the server if one answers, else locally against the store: opened
    /// read-only for a request that only reads it, else with `options` (a repair sets its
    /// journal callback there). Recovery warnings go to stderr. `openStore` opens a store that
    /// does not live in the files at `storePath` (a RADOS store); `storePath` is then only where
    /// the control socket and the tenancy state are.
    public static func run(_ request: ControlRequest, family: String? = nil, storePath: String, options: Store.Options = Store.Options(),
                           openStore: ((Store.Options) throws -> Store)? = nil,
                           progress: @escaping ProgressSink) throws(ControlFailure) -> ControlResult {
        if let result = try sendIfServed(request, family: family, storePath: storePath, progress: progress) { return result }
        if request.needsServer {
            throw ControlFailure(code: "no-server", message: "no server is running for the store at \(storePath)")
        }
        var options = options
        if request.onlyReadsStore && options.repairJournal == nil { options.readOnly = true }
        let store: Store
        do {
            store = try openStore?(options) ?? Store.open(path: storePath, options: options)
        } catch { throw ControlFailure(error) }
        for warning in store.recoveryWarnings {
            FileHandle.standardError.write(Data("vbdtool: warning: \(warning)\n".utf8))
        }
        // The audit log is appended by whichever process holds the store: here, this one. A
        // read-only request changes nothing worth auditing and must not create or append files.
        let tenancy: TenancyService
        do {
            tenancy = options.readOnly ? try TenancyService(configuration: .init())
                                       : try ControlService.openTenancy(storePath: storePath)
        } catch {
            try? store.close()
            throw (error as? ControlFailure) ?? ControlFailure(code: "tenancy", message: "\(error)")
        }
        let service = ControlService(store: store, storePath: storePath, tenancy: tenancy)
        let result: Result<ControlResult, ControlFailure>
        do { result = .success(try service.execute(request, progress: progress)) } catch { result = .failure(error) }
        do { try store.close() } catch {
            if case .success = result { throw ControlFailure(error) }
        }
        return try result.get()
    }
}
