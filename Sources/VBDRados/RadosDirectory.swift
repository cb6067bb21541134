import CRados
import Logging
import Synchronization
import VBDStore
#if canImport(Glibc)
import Glibc
#endif

/// The store's ``StorageDirectory`` over RADOS objects in one pool namespace (one volume family).
///
/// A file `NAME` is a head object `file.NAME`, whose attributes hold the file's durable size and
/// an upper bound on its stripe numbers, and its bytes striped over objects `stripe.NAME.<n>` of
/// `stripeBytes` each (a missing stripe, or the part past a stripe object's end, reads as zeroes).
/// How the contract of StorageIO.swift is met:
/// 1. `write` sends the stripe writes asynchronously and returns; a later read of the same
///    object from this client is ordered after them by the OSD, so it sees the bytes. Small
///    writes are held back and combined per stripe object into one compound operation, sent
///    before anything else touches that stripe or the file (a read, a larger write, a truncate,
///    a punch, a sync): the order of the changes to each object is the order they were made in.
/// 2. `sync` waits for every write, truncate and punch sent before it, then writes the size.
/// 3. A crash may leave any subset of the unsynced stripe writes (each one whole: a combined
///    operation applies all of its writes or none).
/// 4. Creating and removing a file are synchronous object operations, durable when they return.
///    `syncDirectory` only checks that the lock is still held.
/// Bytes past the durable size that unsynced writes left behind are cleared by the first change
/// after the file is opened, so they cannot reappear when the file grows again; the stripe bound is
/// written before any stripe beyond it, so that clean-up knows where to stop.
///
/// `lockExclusive` takes a ``RadosLock`` with an expiry and renews it in the background; once the
/// lock is lost (taken over, broken, or not renewed in time) every change to any file of this
/// directory fails with `.locked`, so a server that lost its volume stops committing. Fencing by
/// blocklisting (``takeOver(waitingUpTo:force:)``) stops the writes it had already sent.
///
/// The lock is taken and renewed through a client instance of its own (opened with the same
/// settings as `pool`'s for each lock taken): renewals must not queue behind the files' writes in
/// `pool`'s client, or a busy holder loses its lock. The holder record names both instances, and a
/// takeover fences both.
public final class RadosDirectory: StorageDirectory, @unchecked Sendable {
    public let pool: RadosPool
    public let stripeBytes: UInt64
    public let lockDurationSeconds: Int
    /// Most asynchronous operations a file keeps in flight before `write` waits for the oldest.
    public let inFlightMax: Int
    /// Most bytes of writes a file keeps in flight (sent, not answered) before `write` waits: well
    /// below librados' in-flight throttle (`objecter_inflight_op_bytes`, 100 MiB by default), so
    /// that the client's other operations are not held in it behind one file's writes.
    public let inFlightBytesMax: Int
    /// A write's part in one stripe shorter than this is not sent at once: it waits, with the
    /// file's other unsent small writes into the same stripe object, to go out in one compound
    /// operation (a commit's metadata pages land all over the metadata file, one page each;
    /// docs/RADOS.md, "Combining small writes"). 0: every write is sent at once.
    public let combineWritesBelowBytes: Int
    /// A stripe's unsent writes go out once they are this many (the operation's steps).
    public let combinedExtentsMax: Int
    /// ... or hold this many bytes; and a file's unsent writes all go out above `unsentBytesMax`.
    public let combinedBytesMax: Int
    public let unsentBytesMax: Int
    public static let lockObject = "directory.lock"
    let logger: Logger

    private struct LockState {
        var lock: RadosLock?
        var keeper: RadosLockKeeper?
    }
    private let lockState = Mutex(LockState())

    /// The files' names, known without listing while this directory holds its exclusive lock:
    /// then nobody else creates or removes files here (a takeover fences the holder first), so
    /// after one listing this directory's own creations and removals keep the set exact. A
    /// listing is a scan of every object in the pool at the OSDs (all namespaces: the chunk
    /// objects of every family too), and the store lists at every commit (docs/RADOS.md, "Random
    /// writes"). `changes` counts creations and removals: a listing that ran beside one is not
    /// kept. Valid only for the lock it was listed under (`lock`). Its mutex may be held while
    /// `lockState`'s is taken, never the other way round.
    private struct NameCache {
        var names: Set<String>?
        var lock: ObjectIdentifier?
        var changes: UInt64 = 0
    }
    private let nameCache = Mutex(NameCache())
    /// Listings of the pool this directory made (tests).
    public var listings: Int { listingCount.load(ordering: .relaxed) }
    private let listingCount = Atomic<Int>(0)

    /// Called once when the directory's lock is lost, with the reason (from the renewal thread).
    public let onLockLost: @Sendable (String) -> Void

    public init(pool: RadosPool, stripeBytes: UInt64 = 4 << 20, lockDurationSeconds: Int = 30, inFlightMax: Int = 64,
                inFlightBytesMax: Int = 16 << 20, combineWritesBelowBytes: Int = 64 << 10, combinedExtentsMax: Int = 128,
                combinedBytesMax: Int = 1 << 20, unsentBytesMax: Int = 8 << 20, logger: Logger = Logger(label: "vbd.rados"),
                onLockLost: @escaping @Sendable (String) -> Void = { _ in }) {
        precondition(stripeBytes > 0 && stripeBytes % 4096 == 0 && inFlightMax > 0 && inFlightBytesMax > 0)
        precondition(combineWritesBelowBytes >= 0 && combinedExtentsMax >= 1 && combinedBytesMax >= 1 && unsentBytesMax >= 1)
        self.combineWritesBelowBytes = combineWritesBelowBytes
        self.combinedExtentsMax = combinedExtentsMax
        self.combinedBytesMax = combinedBytesMax
        self.unsentBytesMax = unsentBytesMax
        self.onLockLost = onLockLost
        self.pool = pool
        self.stripeBytes = stripeBytes
        self.lockDurationSeconds = lockDurationSeconds
        self.inFlightMax = inFlightMax
        self.inFlightBytesMax = inFlightBytesMax
        self.logger = logger
    }

    deinit { unlock() }

    public var path: String { "rados:" + pool.describe("") }
    /// A write is an asynchronous librados operation that dies with the process until `sync`
    /// waits for it: unsynced journal frames are never trusted, so the store journals at flush.
    public var unsyncedWritesEpoch: String? { nil }

    static func headObject(_ name: String) -> String { "file." + name }
    static func stripeObject(_ name: String, _ index: UInt64) -> String {
        let hex = String(index, radix: 16)
        return "stripe.\(name).\(String(repeating: "0", count: max(0, 8 - hex.count)))\(hex)"
    }
    static let sizeAttribute = "vbd.size"
    static let stripeBoundAttribute = "vbd.stripe-bound"

    private func validate(_ name: String) throws(StorageError) {
        guard !name.isEmpty, !name.contains("/"), name.utf8.count <= 200 else {
            throw .io("invalid file name '\(name)' for \(path)")
        }
    }

    // MARK: StorageDirectory

    public func openFile(_ name: String, create: Bool) throws(StorageError) -> any StorageFile {
        try validate(name)
        let head = Self.headObject(name)
        if create {
            try checkLock()
            do {
                try pool.operate(head) { op in
                    op.createExclusive()
                    op.setAttribute(Self.sizeAttribute, Array("0".utf8))
                    op.setAttribute(Self.stripeBoundAttribute, Array("0".utf8))
                }
                noteNames { $0.insert(name) }
            } catch where error.code == EEXIST {
                // It exists: open it as it is.
                noteNames { $0.insert(name) }
            } catch {
                noteNames(nil)
                throw Self.storageError(error)
            }
        }
        let size = try readNumber(head, Self.sizeAttribute, name: name)
        let bound = try readNumber(head, Self.stripeBoundAttribute, name: name)
        return RadosFile(directory: self, name: name, durableSize: size, stripeBound: bound)
    }

    private func readNumber(_ head: String, _ attribute: String, name: String) throws(StorageError) -> UInt64 {
        let value: [UInt8]?
        do { value = try pool.attribute(head, attribute) } catch where error.code == ENOENT {
            throw .notFound(path + "/" + name)
        } catch { throw Self.storageError(error) }
        guard let value, let number = UInt64(String(decoding: value, as: UTF8.self)) else {
            throw .io("\(pool.describe(head)): attribute \(attribute) is missing or not a number")
        }
        return number
    }

    public func fileExists(_ name: String) -> Bool {
        (try? pool.exists(Self.headObject(name))) ?? false
    }

    /// Removes the stripes first and the head last: a crash in between leaves a file that still
    /// exists (its removal was not durable yet) rather than stripes that a new file of the same name
    /// would inherit.
    public func removeFile(_ name: String) throws(StorageError) {
        try validate(name)
        try checkLock()
        let head = Self.headObject(name)
        let size: UInt64, bound: UInt64
        do {
            size = try readNumber(head, Self.sizeAttribute, name: name)
            bound = try readNumber(head, Self.stripeBoundAttribute, name: name)
        } catch .notFound {
            noteNames { $0.remove(name) }
            return
        }
        let stripes = max(bound, (size + stripeBytes - 1) / stripeBytes)
        let batch = AsyncOperations(pool: pool, limit: inFlightMax)
        for index in 0..<stripes {
            batch.submitRemove(Self.stripeObject(name, index))
        }
        // The head goes last: until then the file exists (and stays in the names).
        if let error = batch.waitAll() { throw Self.storageError(error) }
        do { try pool.remove(head) } catch {
            noteNames(nil)
            throw Self.storageError(error)
        }
        noteNames { $0.remove(name) }
    }

    /// A file was created or removed (`update`), or may have been (nil: the names are unknown).
    private func noteNames(_ update: ((inout Set<String>) -> Void)?) {
        nameCache.withLock { c in
            c.changes &+= 1
            if let update, c.names != nil { update(&c.names!) } else { c.names = nil }
        }
    }

    /// The exclusive lock this directory holds now, if any.
    private var heldExclusiveLock: ObjectIdentifier? {
        let held = lockState.withLock { $0 }
        guard let lock = held.lock, lock.exclusive, let keeper = held.keeper, keeper.isHeld else { return nil }
        return ObjectIdentifier(lock)
    }

    public func fileNames() throws(StorageError) -> [String] {
        let lock = heldExclusiveLock
        let (cached, changesBefore) = nameCache.withLock { c in (lock != nil && c.lock == lock ? c.names : nil, c.changes) }
        if let cached { return cached.sorted() }
        let names = try listFileNames()
        if lock != nil {
            nameCache.withLock { c in
                guard c.changes == changesBefore, heldExclusiveLock == lock else { return }
                c.names = Set(names)
                c.lock = lock
            }
        }
        return names
    }

    private func listFileNames() throws(StorageError) -> [String] {
        listingCount.add(1, ordering: .relaxed)
        do {
            return try pool.objectNames().compactMap { $0.hasPrefix("file.") ? String($0.dropFirst(5)) : nil }
        } catch { throw Self.storageError(error) }
    }

    public func syncDirectory() throws(StorageError) {
        try checkLock()
    }

    public func lockExclusive() throws(StorageError) {
        try takeLock(exclusive: true)
    }

    public func lockShared() throws(StorageError) {
        try takeLock(exclusive: false)
    }

    private func takeLock(exclusive: Bool) throws(StorageError) {
        // Already ours (e.g. taken over just before the store opened the directory): keep it.
        let current = lockState.withLock { $0 }
        if let held = current.lock, let keeper = current.keeper, held.exclusive == exclusive, keeper.isHeld { return }
        let lock: RadosLock
        do {
            lock = try makeLock(exclusive: exclusive)
        } catch {
            throw Self.storageError(error)
        }
        do {
            try lock.acquire()
        } catch {
            Self.close(lock)
            if error.code == EBUSY || error.code == EEXIST {
                let holders = (try? RadosLock.holders(pool: pool, object: Self.lockObject, lockName: RadosLock.ownerLockName)) ?? []
                let who = holders.map { "\($0.client) at \($0.address)" }.joined(separator: ", ")
                throw .locked("store at \(path) is in use by \(who.isEmpty ? "another client" : who); it expires \(lockDurationSeconds) s after its holder stops renewing it")
            }
            throw Self.storageError(error)
        }
        install(lock)
    }

    /// A lock on a client instance of its own, naming `pool`'s client as the one writing the data.
    private func makeLock(exclusive: Bool) throws(RadosError) -> RadosLock {
        let connection = try pool.connection.newInstance()
        do {
            let lockPool = try connection.openPool(pool.pool, namespace: pool.namespace)
            return try RadosLock(pool: lockPool, object: Self.lockObject, exclusive: exclusive, durationSeconds: lockDurationSeconds,
                                 dataClients: [pool.connection])
        } catch {
            connection.close()
            throw error
        }
    }

    /// Closes the lock's own client instance (after its lock was released, or never taken).
    private static func close(_ lock: RadosLock) {
        lock.pool.close()
        lock.pool.connection.close()
    }

    private func install(_ lock: RadosLock) {
        let keeper = RadosLockKeeper(lock: lock, logger: logger, onLost: onLockLost)
        let old = lockState.withLock { s in
            defer { s = LockState(lock: lock, keeper: keeper) }
            return s
        }
        Self.retire(old)
    }

    /// Stops renewing and releases the lock. A lock already lost is not released: it is no longer
    /// ours, and the calls could only wait for a cluster that does not answer; its client instance
    /// is then closed when the last reference goes (a renewal may still be blocked in it).
    private static func retire(_ held: LockState) {
        guard let lock = held.lock else { return }
        let lost = held.keeper?.lostReason != nil
        held.keeper?.stop()
        if !lost {
            lock.release()
            close(lock)
        }
    }

    /// Takes the directory over from a server that holds it, fencing that server
    /// (``RadosLock/takeOver(waitingUpTo:force:blocklistSeconds:whileWaiting:)``). Returns the fenced addresses.
    @discardableResult
    public func takeOver(waitingUpTo seconds: Double, force: Bool = false,
                         whileWaiting: ([RadosLockHolder]) -> Void = { _ in }) throws(StorageError) -> [String] {
        let fenced: [String]
        let lock: RadosLock
        do {
            lock = try makeLock(exclusive: true)
        } catch {
            throw Self.storageError(error)
        }
        do {
            fenced = try lock.takeOver(waitingUpTo: seconds, force: force, whileWaiting: whileWaiting)
        } catch {
            Self.close(lock)
            if error.code == EBUSY { throw .locked("store at \(path) is still held and renewed by its owner after \(seconds) s") }
            throw Self.storageError(error)
        }
        install(lock)
        return fenced
    }

    /// A lock already lost is not released (see `retire`).
    public func unlock() {
        let old = lockState.withLock { s in
            defer { s = LockState() }
            return s
        }
        Self.retire(old)
    }

    /// Why this directory may no longer change anything, or nil. A directory without a lock (tests
    /// of the file layer alone) is not restricted.
    public var lockLostReason: String? {
        lockState.withLock { $0.keeper }?.lostReason
    }

    /// True while this directory holds its exclusive lock (taken, and not lost).
    public var ownsExclusively: Bool {
        let held = lockState.withLock { $0 }
        guard let lock = held.lock, let keeper = held.keeper else { return false }
        return lock.exclusive && keeper.isHeld
    }

    /// The lock keeper, for tests that stop renewal to play a server that hangs.
    public var lockKeeper: RadosLockKeeper? { lockState.withLock { $0.keeper } }

    func checkLock() throws(StorageError) {
        if let reason = lockLostReason {
            throw .locked("store at \(path) is no longer ours (\(reason)); it must stop committing")
        }
    }

    static func storageError(_ error: RadosError) -> StorageError {
        switch error.code {
        case ENOSPC, EDQUOT: return .noSpace
        case ENOENT: return .notFound(error.description)
        case RadosError.blocklisted: return .locked("\(error.description): this client was fenced (blocklisted) after another server took the store over")
        default: return .io(error.description)
        }
    }
}

/// The bytes of one file's writes that were sent and not yet answered, held below `bytesMax`.
///
/// Counted from the completions' callbacks (librados' finisher thread), not when the file waits
/// for them: writes that a `sync` is waiting for outside the file's mutex still count, so the bound
/// holds for the file as a whole.
final class InFlightBudget: @unchecked Sendable {
    let bytesMax: Int
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// Guarded by `mutex`.
    private var bytes = 0

    init(bytesMax: Int) {
        self.bytesMax = bytesMax
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    /// Waits until `count` more bytes fit. A write larger than the whole budget waits until
    /// nothing else is in flight, then goes alone.
    func take(_ count: Int) {
        pthread_mutex_lock(mutex)
        while bytes > 0 && bytes + count > bytesMax { pthread_cond_wait(condition, mutex) }
        bytes += count
        pthread_mutex_unlock(mutex)
    }

    func give(_ count: Int) {
        pthread_mutex_lock(mutex)
        bytes -= count
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }

    var inFlight: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return bytes
    }
}

/// What a write's completion gives back to its file's budget (the callback's argument).
private final class BudgetRefund {
    let budget: InFlightBudget
    let bytes: Int
    init(budget: InFlightBudget, bytes: Int) {
        self.budget = budget
        self.bytes = bytes
    }
}

/// Asynchronous operations whose completions are collected later; at most `limit` in flight, and
/// writes hold their bytes in `budget` (shared by every batch of one file) until they complete.
/// Not thread-safe: one owner at a time (a file's mutex, or the thread that took them over to wait).
final class AsyncOperations: @unchecked Sendable {
    let pool: RadosPool
    let limit: Int
    let budget: InFlightBudget?
    private var pending: [(completion: rados_completion_t, what: String, missingOK: Bool)] = []
    private var firstError: RadosError?
    /// The most operations that were in flight at once (tests).
    private(set) var peakInFlight = 0

    init(pool: RadosPool, limit: Int, budget: InFlightBudget? = nil) {
        self.pool = pool
        self.limit = limit
        self.budget = budget
    }

    deinit { _ = waitAll() }

    private func makeCompletion() -> rados_completion_t? {
        var completion: rados_completion_t?
        let rc = rados_aio_create_completion2(nil, nil, &completion)
        if rc != 0 { record(RadosError("create completion", code: rc)) }
        return completion
    }

    private func record(_ error: RadosError) {
        if firstError == nil { firstError = error }
    }

    private func submitted(_ rc: Int32, _ completion: rados_completion_t, _ what: String, missingOK: Bool) {
        if rc != 0 {
            rados_aio_release(completion)
            record(RadosError(what, code: rc))
            return
        }
        pending.append((completion, what, missingOK))
        peakInFlight = max(peakInFlight, pending.count)
        if pending.count >= limit { waitOldest(max(1, pending.count / 2)) }
    }

    func submitWrite(_ object: String, _ bytes: UnsafeRawBufferPointer, at offset: UInt64) {
        submitHoldingBudget(object, "write", byteCount: bytes.count) { ioctx, completion in
            // librados copies the bytes before it returns.
            rados_aio_write(ioctx, object, completion, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count, offset)
        }
    }

    /// Several writes into one object as ONE compound operation, applied in their order (a later
    /// extent overwrites an earlier one where they overlap) and atomically: all or none land.
    func submitWrites(_ object: String, _ extents: [(offset: UInt64, bytes: [UInt8])]) {
        let byteCount = extents.reduce(0) { $0 + $1.bytes.count }
        submitHoldingBudget(object, "write(\(extents.count) extents)", byteCount: byteCount) { ioctx, completion in
            let op = rados_create_write_op()!
            defer { rados_release_write_op(op) }
            // Each step copies its bytes when it is added.
            for extent in extents {
                extent.bytes.withUnsafeBytes { b in
                    rados_write_op_write(op, b.baseAddress?.assumingMemoryBound(to: CChar.self), b.count, extent.offset)
                }
            }
            return rados_aio_write_op_operate(op, ioctx, completion, object, nil, 0)
        }
    }

    /// Sends a write whose `byteCount` bytes are held in `budget` (when there is one) until its
    /// completion's callback gives them back.
    private func submitHoldingBudget(_ object: String, _ summary: String, byteCount: Int,
                                     _ send: (rados_ioctx_t, rados_completion_t) -> Int32) {
        guard let ioctx = try? pool.handle(summary) else { return record(RadosError("\(summary) \(pool.describe(object))", code: EBADF)) }
        var completion: rados_completion_t?
        var refund: Unmanaged<BudgetRefund>?
        let rc: Int32
        if let budget {
            budget.take(byteCount)
            refund = Unmanaged.passRetained(BudgetRefund(budget: budget, bytes: byteCount))
            rc = rados_aio_create_completion2(refund!.toOpaque(), { _, argument in
                let refund = Unmanaged<BudgetRefund>.fromOpaque(argument!).takeRetainedValue()
                refund.budget.give(refund.bytes)
            }, &completion)
        } else {
            rc = rados_aio_create_completion2(nil, nil, &completion)
        }
        guard rc == 0, let completion else {
            if let refund { refund.takeRetainedValue().budget.give(byteCount) }
            return record(RadosError("create completion", code: rc))
        }
        let submitRC = send(ioctx, completion)
        // Not sent: the callback will never run.
        if submitRC != 0, let refund { refund.takeRetainedValue().budget.give(byteCount) }
        submitted(submitRC, completion, "\(summary) \(pool.describe(object))", missingOK: false)
    }

    /// A compound write built by `build`; ENOENT counts as done when `missingOK`.
    func submit(_ object: String, missingOK: Bool, _ build: (RadosWriteOperation) -> Void) {
        let op = RadosWriteOperation()
        defer { op.release() }
        build(op)
        guard let ioctx = try? pool.handle(op.summary), let completion = makeCompletion() else {
            return record(RadosError("\(op.summary) \(pool.describe(object))", code: EBADF))
        }
        let rc = rados_aio_write_op_operate(op.handle, ioctx, completion, object, nil, 0)
        submitted(rc, completion, "\(op.summary) \(pool.describe(object))", missingOK: missingOK)
    }

    func submitRemove(_ object: String) {
        guard let ioctx = try? pool.handle("remove"), let completion = makeCompletion() else { return record(RadosError("remove \(pool.describe(object))", code: EBADF)) }
        let rc = rados_aio_remove(ioctx, object, completion)
        submitted(rc, completion, "remove \(pool.describe(object))", missingOK: true)
    }

    /// A write operation on an object that may not exist (then there is nothing to change).
    func submitOnExisting(_ object: String, _ summary: String, _ build: (rados_write_op_t) -> Void) {
        guard let ioctx = try? pool.handle(summary), let completion = makeCompletion() else { return record(RadosError("\(summary) \(pool.describe(object))", code: EBADF)) }
        let op = rados_create_write_op()!
        defer { rados_release_write_op(op) }
        rados_write_op_assert_exists(op)
        build(op)
        let rc = rados_aio_write_op_operate(op, ioctx, completion, object, nil, 0)
        submitted(rc, completion, "\(summary) \(pool.describe(object))", missingOK: true)
    }

    private func waitOldest(_ n: Int) {
        for entry in pending.prefix(n) {
            rados_aio_wait_for_complete(entry.completion)
            let rc = rados_aio_get_return_value(entry.completion)
            rados_aio_release(entry.completion)
            if rc < 0 && !(entry.missingOK && rc == -ENOENT) { record(RadosError(entry.what, code: rc)) }
        }
        pending.removeFirst(min(n, pending.count))
    }

    /// Waits for every operation; returns the first failure since the last call, if any.
    func waitAll() -> RadosError? {
        waitOldest(pending.count)
        defer { firstError = nil }
        return firstError
    }

    /// Hands the pending operations over to `other` (to wait for them outside a lock).
    func moveAll(to other: AsyncOperations) {
        other.pending += pending
        if let firstError { other.record(firstError) }
        pending = []
        firstError = nil
    }
}

/// One file of a ``RadosDirectory``. Safe to use from several threads: the size and the list of
/// operations in flight are behind a mutex; reads go to librados without it.
final class RadosFile: StorageFile, @unchecked Sendable {
    private let directory: RadosDirectory
    private let name: String
    private let head: String
    private let stripeBytes: UInt64

    private struct State {
        var size: UInt64
        var durableSize: UInt64
        /// No stripe at or past this number exists (durable: written before such a stripe is).
        var stripeBound: UInt64
        var durableStripeBound: UInt64
        /// Cleared the stale bytes past `durableSize` since the open (done before the first change).
        var cleaned = false
        var closed = false
        var operations: AsyncOperations
        /// Small writes not sent yet, by stripe: each stripe's go out as one compound operation,
        /// before anything else touches that stripe (a read, a larger write) or the file (a
        /// truncate, a punch, a sync, the close), so the order of changes to an object is kept.
        var unsent: [UInt64: UnsentWrites] = [:]
        var unsentBytes = 0
    }

    /// One stripe's unsent writes, in their order; a write that continues the last one is joined to it.
    struct UnsentWrites {
        var extents: [(offset: UInt64, bytes: [UInt8])] = []
        var byteCount = 0

        mutating func append(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) {
            if let last = extents.indices.last, extents[last].offset + UInt64(extents[last].bytes.count) == offset {
                extents[last].bytes.append(contentsOf: bytes)
            } else {
                extents.append((offset, Array(bytes)))
            }
            byteCount += bytes.count
        }
    }
    private let state: Mutex<State>
    /// The file's write bytes in flight, across the batch being written and those a `sync` waits for.
    let budget: InFlightBudget
    /// Write operations sent so far, combined or not (tests).
    var writeOperationsSent: Int { writesSent.load(ordering: .relaxed) }
    private let writesSent = Atomic<Int>(0)

    init(directory: RadosDirectory, name: String, durableSize: UInt64, stripeBound: UInt64) {
        let budget = InFlightBudget(bytesMax: directory.inFlightBytesMax)
        self.budget = budget
        self.directory = directory
        self.name = name
        self.head = RadosDirectory.headObject(name)
        self.stripeBytes = directory.stripeBytes
        self.state = Mutex(State(size: durableSize, durableSize: durableSize, stripeBound: stripeBound,
                                 durableStripeBound: stripeBound,
                                 operations: AsyncOperations(pool: directory.pool, limit: directory.inFlightMax, budget: budget)))
    }

    deinit { close() }

    private var pool: RadosPool { directory.pool }

    private func stripes(covering size: UInt64) -> UInt64 { (size + stripeBytes - 1) / stripeBytes }

    // MARK: Reads

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        let size = state.withLock { s in
            // Unsent writes into the stripes read go out first: RADOS orders the read after them.
            if !s.unsent.isEmpty, offset < s.size, buffer.count > 0 {
                let end = offset + min(UInt64(buffer.count), s.size - offset)
                for index in offset / stripeBytes...(end - 1) / stripeBytes { sendUnsent(&s, stripe: index) }
            }
            return s.size
        }
        guard offset < size, buffer.count > 0 else { return 0 }
        let count = Int(min(UInt64(buffer.count), size - offset))
        var done = 0
        while done < count {
            let at = offset + UInt64(done)
            let index = at / stripeBytes
            let within = at % stripeBytes
            let n = min(count - done, Int(stripeBytes - within))
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n])
            var got = 0
            do {
                got = try pool.read(RadosDirectory.stripeObject(name, index), into: part, at: within)
            } catch where error.code == ENOENT {
                got = 0
            } catch {
                throw RadosDirectory.storageError(error)
            }
            if got < n { UnsafeMutableRawBufferPointer(rebasing: part[got...]).initializeMemory(as: UInt8.self, repeating: 0) }
            done += n
        }
        return count
    }

    func size() throws(StorageError) -> UInt64 {
        state.withLock { $0.size }
    }

    // MARK: Changes

    /// Runs a change under the state mutex after the checks every change needs: the directory's
    /// lock still held, the file open, and the stale bytes from before the open cleared.
    private func change(_ body: (inout State) throws(StorageError) -> Void) throws(StorageError) {
        try directory.checkLock()
        var failure: StorageError?
        state.withLock { s in
            do throws(StorageError) {
                guard !s.closed else { throw .io("\(pool.describe(head)): file is closed") }
                if !s.cleaned {
                    clearPastDurableSize(&s)
                    s.cleaned = true
                }
                try body(&s)
            } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Unsynced writes of an earlier holder may have left bytes past the durable size; a file that
    /// grows must read zeroes there, as a file system's would.
    private func clearPastDurableSize(_ s: inout State) {
        let keep = s.durableSize
        let firstGone = stripes(covering: keep)
        if keep % stripeBytes != 0 {
            let within = keep % stripeBytes
            s.operations.submitOnExisting(RadosDirectory.stripeObject(name, keep / stripeBytes), "truncate") { op in
                rados_write_op_truncate(op, within)
            }
        }
        if s.stripeBound > firstGone {
            for index in firstGone..<s.stripeBound { s.operations.submitRemove(RadosDirectory.stripeObject(name, index)) }
        }
    }

    /// Sends one stripe's unsent writes as one compound operation (under the state mutex).
    private func sendUnsent(_ s: inout State, stripe index: UInt64) {
        guard let stripe = s.unsent.removeValue(forKey: index) else { return }
        s.unsentBytes -= stripe.byteCount
        s.operations.submitWrites(RadosDirectory.stripeObject(name, index), stripe.extents)
        writesSent.add(1, ordering: .relaxed)
    }

    private func sendAllUnsent(_ s: inout State) {
        for index in s.unsent.keys.sorted() { sendUnsent(&s, stripe: index) }
    }

    /// Writes waiting to be combined, and stripes they touch (tests).
    var unsentWrites: (bytes: Int, stripes: Int) { state.withLock { ($0.unsentBytes, $0.unsent.count) } }

    /// Makes the stripe bound cover `index` durably before anything is written to that stripe.
    private func raiseStripeBound(_ s: inout State, toCover index: UInt64) throws(StorageError) {
        guard index >= s.stripeBound else { return }
        // Headroom, so that a growing file rewrites the head once per 16 stripes, not per stripe.
        let bound = index + 16
        do {
            try pool.operate(head) { op in
                op.assertExists()
                op.setAttribute(RadosDirectory.stripeBoundAttribute, Array(String(bound).utf8))
            }
        } catch { throw RadosDirectory.storageError(error) }
        s.stripeBound = bound
        s.durableStripeBound = bound
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        guard bytes.count > 0 else { return }
        try change { s throws(StorageError) in
            let end = offset + UInt64(bytes.count)
            try raiseStripeBound(&s, toCover: (end - 1) / stripeBytes)
            var done = 0
            while done < bytes.count {
                let at = offset + UInt64(done)
                let index = at / stripeBytes
                let within = at % stripeBytes
                let n = min(bytes.count - done, Int(stripeBytes - within))
                let part = UnsafeRawBufferPointer(rebasing: bytes[done..<done + n])
                if n < directory.combineWritesBelowBytes {
                    s.unsent[index, default: UnsentWrites()].append(part, at: within)
                    s.unsentBytes += n
                    if let stripe = s.unsent[index], stripe.extents.count >= directory.combinedExtentsMax
                        || stripe.byteCount >= directory.combinedBytesMax {
                        sendUnsent(&s, stripe: index)
                    }
                } else {
                    sendUnsent(&s, stripe: index)
                    s.operations.submitWrite(RadosDirectory.stripeObject(name, index), part, at: within)
                    writesSent.add(1, ordering: .relaxed)
                }
                done += n
            }
            if s.unsentBytes >= directory.unsentBytesMax { sendAllUnsent(&s) }
            s.size = max(s.size, end)
        }
    }

    /// One buffer for the whole gather, so a journal frame of many parts is one operation per
    /// stripe rather than one per part.
    func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError) {
        let total = parts.reduce(0) { $0 + $1.count }
        guard total > 0 else { return }
        let joined = UnsafeMutableRawBufferPointer.allocate(byteCount: total, alignment: 16)
        defer { joined.deallocate() }
        var at = 0
        for part in parts where part.count > 0 {
            UnsafeMutableRawBufferPointer(rebasing: joined[at..<at + part.count]).copyMemory(from: part)
            at += part.count
        }
        try write(UnsafeRawBufferPointer(joined), at: offset)
    }

    func truncate(to newSize: UInt64) throws(StorageError) {
        try change { s throws(StorageError) in
            sendAllUnsent(&s)
            if newSize < s.size {
                let firstGone = stripes(covering: newSize)
                let last = max(stripes(covering: s.size), s.stripeBound)
                if newSize % stripeBytes != 0 {
                    let within = newSize % stripeBytes
                    s.operations.submitOnExisting(RadosDirectory.stripeObject(name, newSize / stripeBytes), "truncate") { op in
                        rados_write_op_truncate(op, within)
                    }
                }
                if last > firstGone {
                    for index in firstGone..<last { s.operations.submitRemove(RadosDirectory.stripeObject(name, index)) }
                }
                // Lowered in the head by the next sync, after the removals completed.
                s.stripeBound = firstGone
            }
            s.size = newSize
        }
    }

    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) {
        guard length > 0 else { return }
        try change { s throws(StorageError) in
            sendAllUnsent(&s)
            let end = min(offset + length, max(s.size, stripes(covering: s.size) * stripeBytes))
            var at = offset
            while at < end {
                let index = at / stripeBytes
                let within = at % stripeBytes
                let n = min(end - at, stripeBytes - within)
                let object = RadosDirectory.stripeObject(name, index)
                if within == 0 && n == stripeBytes {
                    s.operations.submitRemove(object)
                } else {
                    s.operations.submitOnExisting(object, "zero") { op in rados_write_op_zero(op, within, n) }
                }
                at += n
            }
        }
    }

    func sync() throws(StorageError) {
        try directory.checkLock()
        // Wait outside the mutex, so reads and new writes go on meanwhile.
        let waiting = AsyncOperations(pool: pool, limit: Int.max)
        let (size, bound, durableSize, durableBound) = state.withLock { s in
            sendAllUnsent(&s)
            s.operations.moveAll(to: waiting)
            return (s.size, s.stripeBound, s.durableSize, s.durableStripeBound)
        }
        if let error = waiting.waitAll() { throw RadosDirectory.storageError(error) }
        guard size != durableSize || bound != durableBound else { return }
        try directory.checkLock()
        // Under the mutex: a concurrent write may have raised the bound in the head meanwhile, and
        // that must not be overwritten by the lower value seen above. A concurrent truncate's lower
        // bound waits for the next sync (its removals have not been waited for).
        var failure: StorageError?
        state.withLock { s in
            let durable = max(bound, s.stripeBound)
            do throws(RadosError) {
                try pool.operate(head) { op in
                    op.assertExists()
                    op.setAttribute(RadosDirectory.sizeAttribute, Array(String(size).utf8))
                    op.setAttribute(RadosDirectory.stripeBoundAttribute, Array(String(durable).utf8))
                }
                s.durableSize = size
                s.durableStripeBound = durable
            } catch { failure = RadosDirectory.storageError(error) }
        }
        if let failure { throw failure }
    }

    /// Waits for the operations in flight (their results are dropped: unsynced changes may be lost).
    func close() {
        let waiting = AsyncOperations(pool: directory.pool, limit: Int.max)
        state.withLock { s in
            if !s.closed { sendAllUnsent(&s) }
            s.closed = true
            s.operations.moveAll(to: waiting)
        }
        _ = waiting.waitAll()
    }
}
