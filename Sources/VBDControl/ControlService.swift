import Foundation
import VBDAccounting
import VBDCache
import VBDCore
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// Runs operator commands against an open ``VBDStore/Store``.
///
/// The server runs it for requests that arrive on the control socket; the CLI runs the very same
/// code against a store it opened itself when no server answers.
///
/// ### Concurrency
/// Thread-safe: the store serializes its own metadata, and this type holds no mutable state.
/// Several requests may run at once (one per control connection).
public final class ControlService: Sendable {
    public let store: Store
    /// Absolute path of the store directory.
    public let storePath: String
    /// The universal cache the store reads through, if any (only a server has one).
    public let cache: BlockCache?
    /// Who answers a ping; nil when the service runs inside the CLI.
    let status: ServerStatus?
    /// The hypervisor clean-page interface (only a server has one: it lives in memory).
    public let cleanPages: CleanPageCache?
    /// The tenant of each hypervisor domain the clean-page interface serves.
    public let hypervisorDomains: HypervisorDomainTable?
    /// Accounting, leases and the audit log every control operation is appended to.
    public let tenancy: TenancyService?

    public init(store: Store, storePath: String, cache: BlockCache? = nil, status: ServerStatus? = nil,
                cleanPages: CleanPageCache? = nil, hypervisorDomains: HypervisorDomainTable? = nil,
                tenancy: TenancyService? = nil) {
        self.store = store
        self.storePath = storePath
        self.cache = cache
        self.status = status
        self.cleanPages = cleanPages
        self.hypervisorDomains = hypervisorDomains
        self.tenancy = tenancy
    }

    /// A server's clean-page interface: pages live in `cache`'s last-chance tier and are served to a
    /// hypervisor domain only for images its tenant holds a lease on (``HypervisorDomainTable``).
    public static func cleanPageInterface(cache: BlockCache, store: Store, tenancy: TenancyService)
        -> (cleanPages: CleanPageCache, hypervisorDomains: HypervisorDomainTable) {
        let domains = HypervisorDomainTable(tenancy: tenancy)
        let oracle = StoreMappingOracle(store: store, holds: { domain, image, imageID in domains.holds(domain, image: image, imageID: imageID) })
        return (CleanPageCache(cache: cache, oracle: oracle), domains)
    }

    /// The actor recorded for requests run inside the CLI process itself.
    public static var localActor: String { "uid:\(getuid()) pid:\(getpid()) (local)" }

    /// The tenancy state of the store at `storePath`: the audit log `audit.log` and the accounting
    /// state `tenancy.json` live in the store directory, written only by the process that holds
    /// the store's lock (the server, or the CLI when no server runs).
    /// An error names the file at fault: a corrupt `tenancy.json` is not an audit log problem.
    /// `resolver` carries the server's identity maps (certificate subjects, unix peers).
    public static func openTenancy(storePath: String, leasesEnforced: Bool = false,
                                   resolver: DomainResolver = .init()) throws -> TenancyService {
        let statePath = storePath + "/tenancy.json", auditPath = storePath + "/audit.log"
        do {
            return try TenancyService(configuration: .init(resolver: resolver, leasesEnforced: leasesEnforced),
                                      stateStorage: FileStateStorage(path: statePath),
                                      auditStorage: FileAuditStorage(path: auditPath))
        } catch let e as DecodingError {
            throw ControlFailure(code: "corrupted", message: "the accounting state \(statePath) is corrupt (\(Self.describe(e))); " +
                                 "restore it from a backup, or move it away to start with empty leases and credits")
        } catch let e as AuditLogError {
            throw ControlFailure(code: "audit", message: "cannot open the audit log \(auditPath): \(e)")
        } catch let e as ControlFailure {
            throw e
        } catch {
            throw ControlFailure(code: "io", message: "cannot open the tenancy state of \(storePath) (\(statePath), \(auditPath)): \(error)")
        }
    }

    static func describe(_ e: DecodingError) -> String {
        switch e {
        case .dataCorrupted(let c), .keyNotFound(_, let c), .typeMismatch(_, let c), .valueNotFound(_, let c):
            let path = c.codingPath.map(\.stringValue).joined(separator: ".")
            return path.isEmpty ? c.debugDescription : "\(path): \(c.debugDescription)"
        @unknown default:
            return "\(e)"
        }
    }

    /// Runs one request. Progress reports go to `progress` while long work runs.
    public func execute(_ request: ControlRequest, actor: String = ControlService.localActor,
                        progress: @escaping ProgressSink) throws(ControlFailure) -> ControlResult {
        let result: ControlResult
        do {
            result = try executeThrowing(request, actor: actor, progress: progress)
        } catch let failure as ControlFailure {
            throw failure
        } catch {
            throw ControlFailure(error)
        }
        do {
            try auditIfChanging(request, result: result, actor: actor)
        } catch {
            throw ControlFailure(code: "audit", message: "the operation completed, but appending it to the audit log failed: \(error)")
        }
        return result
    }

    /// Appends one hash-chained audit record for every operation that changes the store.
    private func auditIfChanging(_ request: ControlRequest, result: ControlResult, actor: String) throws {
        guard let tenancy else { return }
        switch request {
        case let .create(name, size, blockSize, group):
            // The group the volume got (its own one when none was named).
            let created: String? = if case let .image(image) = result { image.group } else { nil }
            try tenancy.audit(actor: actor, operation: "volume.create", target: name,
                              details: ["size": "\(size)", "blockSize": "\(blockSize)", "group": created ?? group ?? "(its own)"])
        case let .cleanPageAttach(domain, tenant):
            try tenancy.audit(actor: actor, operation: "cleanpage.attach", target: "hypervisor domain \(domain)",
                              details: ["tenant": tenant])
        case let .snapshot(target):
            let volume = String(target.split(separator: "@", maxSplits: 1).first ?? "")
            try tenancy.audit(actor: actor, operation: "snapshot.create", target: volume, details: ["snapshot": target])
        case let .share(snapshot, newName):
            try tenancy.audit(actor: actor, operation: "share.create", target: newName, details: ["origin": snapshot])
        case let .remove(name, force):
            try tenancy.audit(actor: actor, operation: "image.delete", target: name, details: ["force": "\(force)"])
        case let .resize(name, size):
            try tenancy.audit(actor: actor, operation: "volume.resize", target: name, details: ["size": "\(size)"])
        case let .importImage(path, name, _, group, _):
            try tenancy.audit(actor: actor, operation: "volume.import", target: name, details: ["file": path, "group": group ?? "(its own)"])
        case .gc:
            if case let .gc(report) = result {
                try tenancy.audit(actor: actor, operation: "gc", target: storePath, details: ["report": "\(report)"])
            }
        default:
            break
        }
    }

    private func executeThrowing(_ request: ControlRequest, actor: String, progress: @escaping ProgressSink) throws -> ControlResult {
        switch request {
        case .ping:
            guard let status else { throw ControlFailure(code: "internal", message: "ping answered by the CLI itself") }
            return .pong(status)
        case let .create(name, size, blockSize, group):
            return .image(ImageSummary(try store.createVolume(name: name, size: size, blockSize: blockSize, group: group)))
        case .list:
            return .images(store.list().map(ImageSummary.init))
        case let .info(name):
            return .image(ImageSummary(try store.info(name)))
        case let .snapshot(target):
            let (volume, name) = try Self.splitSnapshotName(target)
            return .image(ImageSummary(try store.snapshot(volume: volume, name: name)))
        case let .share(snapshot, newName):
            guard snapshot.contains("@") else {
                throw ControlFailure(code: "invalid-argument",
                                     message: "'\(snapshot)' is not a snapshot: share takes VOLUME@SNAPSHOT (take one with `vbdtool snapshot \(snapshot)@NAME`)")
            }
            return .image(ImageSummary(try store.share(snapshot: snapshot, as: newName)))
        case let .remove(name, force):
            // Cache counters are per owner (image id, group): look them up while the images still exist.
            let removed = imagesRemoved(byDeleting: name, force: force)
            let owners = cache == nil ? [] : removed.compactMap { self.cacheOwner(of: $0) }
            try store.delete(name, force: force)
            for owner in owners { cache?.forgetStatistics(for: owner) }
            // Leases and bindings go with the image: a later image of the same name has none.
            try tenancy?.imagesDeleted(removed.map(\.name), actor: actor)
            return .done
        case let .resize(name, size):
            try store.resize(volume: name, size: size)
            return .image(ImageSummary(try store.info(name)))
        case let .diff(from, to):
            let ranges = try store.diff(from: from, to: to)
            guard ranges.count <= ControlLimits.diffRangesMax else {
                throw ControlFailure(code: "too-large", message: "'\(from)' and '\(to)' differ in \(ranges.count) ranges; the limit is \(ControlLimits.diffRangesMax)")
            }
            let out = ranges.map { ByteRange(offset: $0.lowerBound, length: $0.upperBound - $0.lowerBound) }
            return .ranges(DiffReport(from: from, to: to, ranges: out, changedBytes: out.reduce(0) { $0 + $1.length }))
        case let .importImage(path, name, blockSize, group, format):
            return .transfer(try ImageTransfer(store: store).importImage(path: path, name: name, blockSize: blockSize,
                                                                         group: group, format: format, progress: progress))
        case let .exportImage(name, path, overwrite):
            return .transfer(try ImageTransfer(store: store).exportImage(name: name, path: path, overwrite: overwrite, progress: progress))
        case .stats:
            return .stats(try statistics())
        case .gc:
            return .gc(try collectGarbage(progress: progress))
        case let .tenancy(tenancyRequest):
            guard let tenancy else {
                throw ControlFailure(code: "not-supported", message: "accounting and leases are not available here")
            }
            // Leases are on images that exist (a snapshot is leased by its full name), and hold the
            // image's id so they never apply to a later image of the same name; bindings likewise.
            var imageID: UInt64?
            switch tenancyRequest {
            case let .leaseGrant(volume, _, _, _), let .leaseRenew(volume, _, _):
                imageID = try store.info(volume).id
            case let .bind(export, _):
                imageID = try store.info(export).id
            default:
                break
            }
            do {
                if case .stats = tenancyRequest {
                    return .tenancy(.stats(tenancy.statistics(storage: tenancy.storageShares(usage: try store.usage()))))
                }
                return .tenancy(try tenancy.handle(tenancyRequest, actor: actor, imageID: imageID))
            } catch let e as LeaseError {
                throw ControlFailure(code: "lease", message: e.description)
            } catch let e as SchedulerError {
                throw ControlFailure(code: "invalid-argument", message: e.description)
            }
        case let .forensics(volume, from, to):
            guard let tenancy else {
                throw ControlFailure(code: "not-supported", message: "the audit log is not available here")
            }
            guard from <= to else { throw ControlFailure(code: "invalid-argument", message: "--from must not be after --to") }
            let records = try tenancy.auditRecords()
            let found = try VolumeForensics.investigate(
                volume: volume, from: WallTime(nanoseconds: from), to: WallTime(nanoseconds: to), records: records,
                diff: { a, b in try self.store.diff(from: a, to: b) })
            return .forensics(ForensicsReport(
                volume: volume, fromSnapshot: found.fromSnapshot, toSnapshot: found.toSnapshot,
                changedRanges: found.changedRanges.map { ByteRange(offset: $0.lowerBound, length: $0.upperBound - $0.lowerBound) },
                holders: found.holders.map {
                    ForensicsReport.Holding(domain: $0.domain.name, mode: $0.mode.rawValue, fromNanoseconds: $0.from.nanoseconds,
                                            untilNanoseconds: $0.until?.nanoseconds, end: $0.end?.rawValue,
                                            expiresNanoseconds: $0.expiresAt.nanoseconds)
                }))
        case let .cleanPageAttach(domain, tenant):
            _ = try cleanPageCache()
            guard let hypervisorDomains else { throw ControlFailure(code: "not-supported", message: "this server has no clean-page interface") }
            guard !tenant.isEmpty else { throw ControlFailure(code: "invalid-argument", message: "a tenant name is needed") }
            try hypervisorDomains.attach(HypervisorDomain(domain), tenant: DomainID(tenant))
            return .done
        case let .cleanPagePut(domain, volume, offset, page):
            let pages = try cleanPageCache()
            guard page.count <= Limits.blockBytesMax else { throw ControlFailure(code: "invalid-argument", message: "a page is at most \(Limits.blockBytesMax) bytes") }
            let id = try store.info(volume).id
            page.withUnsafeBytes { pages.put(domain: HypervisorDomain(domain), volume: id, offset: offset, page: $0) }
            return .done
        case let .cleanPageGet(domain, volume, offset, length):
            let pages = try cleanPageCache()
            guard length > 0, length <= Limits.blockBytesMax else { throw ControlFailure(code: "invalid-argument", message: "page length must be 1...\(Limits.blockBytesMax)") }
            let id = try store.info(volume).id
            var out = Data(count: length)
            let hit = out.withUnsafeMutableBytes { pages.get(domain: HypervisorDomain(domain), volume: id, offset: offset, into: $0) }
            return .page(hit ? out : nil)
        case let .cleanPageInvalidate(number, volume, offset):
            let pages = try cleanPageCache()
            let domain = HypervisorDomain(number)
            switch (volume, offset) {
            case let (v?, o?): pages.invalidate(domain: domain, volume: try store.info(v).id, offset: o)
            case let (v?, nil): pages.invalidate(domain: domain, volume: try store.info(v).id)
            case (nil, nil):
                pages.invalidate(domain: domain)
                hypervisorDomains?.detach(domain)
            case (nil, _?): throw ControlFailure(code: "invalid-argument", message: "an offset needs a volume")
            }
            return .done
        case .moveFamily, .adoptFamily:
            throw ControlFailure(code: "not-supported",
                                 message: "only a server serving RADOS families (`vbdtool serve --rados`) moves or takes over a family")
        case let .fsck(verifyData):
            let report = store.fsck(verifyData: verifyData) { done, total in
                progress(ProgressReport(phase: "fsck", done: UInt64(done), total: UInt64(total), unit: "chunks"))
            }
            return .fsck(FsckSummary(clean: report.isClean, dataVerified: verifyData, images: report.images,
                                     mapNodes: report.mapNodes, mappedBlocks: report.mappedBlocks, chunks: report.chunks,
                                     chunkBytesVerified: report.chunkBytesVerified, problems: report.problems))
        }
    }

    private func cleanPageCache() throws -> CleanPageCache {
        guard let cleanPages else {
            throw ControlFailure(code: "not-supported", message: "clean pages live in a running server's memory: start `vbdtool serve` first")
        }
        return cleanPages
    }

    /// `VOLUME@NAME` -> (`VOLUME`, `NAME`).
    static func splitSnapshotName(_ target: String) throws(ControlFailure) -> (String, String) {
        let parts = target.split(separator: "@", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw ControlFailure(code: "invalid-argument", message: "'\(target)' is not a snapshot name: write VOLUME@NAME, e.g. vm0@before-upgrade")
        }
        return (String(parts[0]), String(parts[1]))
    }

    // MARK: gc

    /// The store frees a chunk the moment its last reference goes and gives its space back once
    /// that is durable; `Store.gc()` finishes that now: flush, checkpoint (empties the journal),
    /// and truncate free space at the end of the data file.
    func collectGarbage(progress: ProgressSink) throws -> GCReport {
        let storedBefore = store.storedBytes
        let dataBefore = StoreFiles.dataBytesOnDisk(storePath)
        let metaBefore = StoreFiles.metadataBytesOnDisk(storePath)
        progress(ProgressReport(phase: "gc", done: 0, total: 1, unit: "steps"))
        let collected = try store.collectGarbage()
        progress(ProgressReport(phase: "gc", done: 1, total: 1, unit: "steps"))
        var report = GCReport(storedBytesBefore: storedBefore, storedBytesAfter: store.storedBytes,
                              dataFileBytesBefore: collected.dataFileBytesBefore, dataFileBytesAfter: collected.dataFileBytesAfter,
                              dataFileBytesOnDiskBefore: dataBefore, dataFileBytesOnDiskAfter: StoreFiles.dataBytesOnDisk(storePath),
                              metadataBytesOnDiskBefore: metaBefore, metadataBytesOnDiskAfter: StoreFiles.metadataBytesOnDisk(storePath))
        let unclaimed = collected.unclaimedChunks
        if unclaimed.swept {
            report.unclaimedChunkReferencesReleased = unclaimed.references
            report.unclaimedChunkObjectsRemoved = unclaimed.objectsRemoved
            report.unclaimedChunkBytesRemoved = unclaimed.bytesRemoved
        }
        return report
    }
}

extension ImageSummary {
    init(_ info: ImageInfo) {
        self.init(name: info.name, kind: info.isReadOnly ? "snapshot" : "volume", size: info.size, blockSize: info.blockSize,
                  createdAt: info.createdAt, origin: info.origin, group: info.group, readOnly: info.isReadOnly)
    }
}

extension ControlFailure {
    /// Maps any error of the layers below to a failure with a stable code.
    public init(_ error: any Error) {
        switch error {
        case let failure as ControlFailure:
            self = failure
        case let e as StoreError:
            if case let .hasDependents(_, dependents, _) = e {
                self.init(code: e.code, message: e.description, dependents: dependents)
            } else {
                self.init(code: e.code, message: e.description)
            }
        case let e as BlockDeviceError:
            let code: String
            switch e {
            case .noSpace: code = "no-space"
            case .gone: code = "not-found"
            case .readOnly: code = "read-only"
            case .corrupted: code = "corrupted"
            case .outOfRange, .invalid: code = "invalid-argument"
            case .notSupported: code = "not-supported"
            case .io: code = "io"
            }
            self.init(code: code, message: e.description)
        case let e as ByteSize.ParseError:
            self.init(code: "invalid-argument", message: e.description)
        default:
            self.init(code: "internal", message: "\(error)")
        }
    }
}

/// Sizes of the files in a store directory, as the file system reports them.
enum StoreFiles {
    /// Allocated bytes of `path` (st_blocks x 512): holes excluded, as `du` counts.
    static func bytesOnDisk(_ path: String) -> UInt64 {
        var st = stat()
        guard stat(path, &st) == 0 else { return 0 }
        return UInt64(st.st_blocks) * 512
    }

    static func dataBytesOnDisk(_ storePath: String) -> UInt64 {
        bytesOnDisk(storePath + "/data")
    }

    /// Superblock, checkpoints and journals: everything but the data, the lock and sockets.
    static func metadataBytesOnDisk(_ storePath: String) -> UInt64 {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: storePath) else { return 0 }
        return names.filter { $0 == "superblock" || $0.hasPrefix("checkpoint-") || $0.hasPrefix("journal-") }
            .reduce(0) { $0 + bytesOnDisk(storePath + "/" + $1) }
    }
}

extension TenancyService {
    /// Storage charged per domain from the store's per-image fair shares (``StorageShares``).
    public func storageShares(usage: StoreUsage) -> [DomainID: StorageShare] {
        storageShares(images: usage.images.map {
            ImageShareInput(name: $0.name, fairStoredBytes: $0.fairStoredBytes, exclusiveStoredBytes: $0.exclusiveStoredBytes)
        })
    }
}
