import CRados
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A client's connection to a Ceph cluster (one `rados_t`).
///
/// Thread safety: librados' cluster handle and its I/O contexts are safe to use from several
/// threads at once, except that changing an I/O context's namespace is not; ``RadosPool`` fixes its
/// namespace when it is opened and never changes it, so every type here may be shared across threads.
/// Closing: a pool keeps its connection alive (librados must not shut down under an open I/O
/// context), so `close()` on the connection takes effect when its last pool is closed, and refuses
/// new pools and calls from then on. `close()` must not race with I/O still running on that object.
public final class RadosConnection: @unchecked Sendable {
    /// Settings a connection is opened with.
    public struct Options: Sendable {
        /// The ceph.conf to read (it names the monitors and the client keyring).
        public var configurationFile: String
        /// The cephx user, without the `client.` prefix.
        public var user: String = "admin"
        /// A RADOS operation that gets no answer in this time fails with ETIMEDOUT instead of
        /// waiting forever for a cluster that is gone (0 = wait forever).
        public var operationTimeoutSeconds: Int = 30

        public init(configurationFile: String) {
            self.configurationFile = configurationFile
        }
    }

    private struct State {
        /// The `rados_t` as a bit pattern (0 once shut down): raw pointers are not Sendable.
        var cluster: UInt
        /// Pools opened on the connection and not closed yet: librados must not shut down under them.
        var openPools = 0
        var closeRequested = false
    }
    private let state: Mutex<State>
    /// The settings it was opened with (``newInstance()`` opens another client with them).
    public let options: Options
    /// For messages: the ceph.conf the connection was opened from.
    public var configurationFile: String { options.configurationFile }

    public init(_ options: Options) throws(RadosError) {
        var cluster: rados_t?
        var rc = rados_create2(&cluster, "ceph", "client." + options.user, 0)
        guard rc == 0, let cluster else { throw RadosError("create client.\(options.user)", code: rc) }
        func fail(_ operation: String, _ rc: Int32) -> RadosError {
            rados_shutdown(cluster)
            return RadosError(operation, code: rc)
        }
        rc = rados_conf_read_file(cluster, options.configurationFile)
        if rc != 0 { throw fail("read configuration \(options.configurationFile)", rc) }
        let timeout = String(options.operationTimeoutSeconds)
        for option in ["rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"] {
            rc = rados_conf_set(cluster, option, timeout)
            if rc != 0 { throw fail("set \(option)", rc) }
        }
        rc = rados_connect(cluster)
        if rc != 0 { throw fail("connect with \(options.configurationFile)", rc) }
        state = Mutex(State(cluster: UInt(bitPattern: cluster)))
        self.options = options
    }

    /// Another client instance with the same settings: its own global id, address, operation
    /// queues and OSD sessions, so its operations never wait behind this one's (and a blocklist
    /// entry for one of them does not fence the other).
    public func newInstance() throws(RadosError) -> RadosConnection {
        try RadosConnection(options)
    }

    deinit { shutDown() }

    /// Closes the connection: at once, or when the last pool opened on it is closed.
    public func close() {
        let now = state.withLock { s -> Bool in
            s.closeRequested = true
            return s.openPools == 0
        }
        if now { shutDown() }
    }

    private func shutDown() {
        state.withLock { s in
            if let handle = rados_t(bitPattern: s.cluster) { rados_shutdown(handle) }
            s.cluster = 0
        }
    }

    func handle(_ operation: @autoclosure () -> String) throws(RadosError) -> rados_t {
        guard let handle = rados_t(bitPattern: state.withLock { $0.closeRequested ? 0 : $0.cluster }) else {
            throw RadosError(operation(), code: ENOTCONN)
        }
        return handle
    }

    /// Registers a pool about to be opened; nil once the connection is closed.
    fileprivate func retainForPool() -> rados_t? {
        let bits = state.withLock { s -> UInt in
            guard !s.closeRequested, s.cluster != 0 else { return 0 }
            s.openPools += 1
            return s.cluster
        }
        return rados_t(bitPattern: bits)
    }

    fileprivate func releaseForPool() {
        let now = state.withLock { s -> Bool in
            s.openPools -= 1
            return s.openPools == 0 && s.closeRequested
        }
        if now { shutDown() }
    }

    /// The address this client talks from, e.g. `v2:127.0.0.1:0/2749102874`: what a blocklist entry
    /// names to fence exactly this client instance.
    public func clientAddress() throws(RadosError) -> String {
        let cluster = try handle("getaddrs")
        var addresses: UnsafeMutablePointer<CChar>?
        let rc = rados_getaddrs(cluster, &addresses)
        guard rc == 0, let addresses else { throw RadosError("getaddrs", code: rc) }
        defer { rados_buffer_free(addresses) }
        // librados may answer with an address vector, "[v2:127.0.0.1:0/2749102874,...]": the first
        // entry without brackets is what the blocklist command parses.
        var text = Substring(String(cString: addresses))
        if text.hasPrefix("[") { text = text.dropFirst() }
        if text.hasSuffix("]") { text = text.dropLast() }
        return String(text.split(separator: ",").first ?? text)
    }

    /// The client's global id, unique per connection in the cluster (the `client.N` in lock holders).
    public func instanceID() throws(RadosError) -> UInt64 {
        rados_get_instance_id(try handle("get instance id"))
    }

    /// Adds `address` to the cluster's blocklist for `seconds`: an OSD that has the map with the
    /// entry refuses that client's operations (EBLOCKLISTED), also ones sent before. Returns once the
    /// monitors have committed the entry; ``waitForLatestMap()`` makes this client's next operations
    /// carry that map to the OSDs.
    public func blocklist(address: String, seconds: UInt32) throws(RadosError) {
        let cluster = try handle("blocklist add \(address)")
        let rc = address.withCString { rados_blocklist_add(cluster, UnsafeMutablePointer(mutating: $0), seconds) }
        if rc != 0 { throw RadosError("blocklist add \(address)", code: rc) }
    }

    /// Waits until this client has the cluster's newest OSD map (e.g. one with a new blocklist entry).
    public func waitForLatestMap() throws(RadosError) {
        let rc = rados_wait_for_latest_osdmap(try handle("wait for latest osdmap"))
        if rc != 0 { throw RadosError("wait for latest osdmap", code: rc) }
    }

    /// Opens an I/O context on `pool`, restricted to `namespace` ("" = the default namespace).
    public func openPool(_ pool: String, namespace: String = "") throws(RadosError) -> RadosPool {
        try RadosPool(connection: self, pool: pool, namespace: namespace)
    }
}

/// An I/O context: one pool and one namespace of it, fixed for its lifetime.
///
/// The synchronous calls below block the calling thread for one round trip to the OSD (bounded by
/// the connection's operation timeout); they are safe to call from several threads at once.
public final class RadosPool: @unchecked Sendable {
    public let connection: RadosConnection
    public let pool: String
    public let namespace: String
    /// The `rados_ioctx_t` as a bit pattern (0 once closed).
    private let state: Mutex<UInt>

    init(connection: RadosConnection, pool: String, namespace: String) throws(RadosError) {
        guard let cluster = connection.retainForPool() else { throw RadosError("open pool \(pool)", code: ENOTCONN) }
        var ioctx: rados_ioctx_t?
        let rc = rados_ioctx_create(cluster, pool, &ioctx)
        guard rc == 0, let ioctx else {
            connection.releaseForPool()
            throw RadosError("open pool \(pool)", code: rc)
        }
        rados_ioctx_set_namespace(ioctx, namespace)
        self.connection = connection
        self.pool = pool
        self.namespace = namespace
        self.state = Mutex(UInt(bitPattern: ioctx))
    }

    deinit { close() }

    /// Waits for this context's outstanding asynchronous operations, then releases it.
    public func close() {
        let closed = state.withLock { ioctx -> Bool in
            guard let handle = rados_ioctx_t(bitPattern: ioctx) else { return false }
            _ = rados_aio_flush(handle)
            rados_ioctx_destroy(handle)
            ioctx = 0
            return true
        }
        if closed { connection.releaseForPool() }
    }

    /// "pool/namespace/object", for messages.
    public func describe(_ object: String) -> String {
        namespace.isEmpty ? "\(pool)/\(object)" : "\(pool)/\(namespace)/\(object)"
    }

    func handle(_ operation: @autoclosure () -> String) throws(RadosError) -> rados_ioctx_t {
        guard let handle = rados_ioctx_t(bitPattern: state.withLock { $0 }) else { throw RadosError(operation(), code: EBADF) }
        return handle
    }

    // MARK: Whole-object calls

    /// Reads up to `buffer.count` bytes at `offset`; returns how many there were (0 past the end).
    /// Throws ENOENT for a missing object.
    public func read(_ object: String, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(RadosError) -> Int {
        let ioctx = try handle("read \(describe(object))")
        if buffer.count == 0 { return 0 }
        let rc = rados_read(ioctx, object, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), buffer.count, offset)
        if rc < 0 { throw RadosError("read \(describe(object))", code: rc) }
        return Int(rc)
    }

    /// The whole object's bytes (ENOENT when it does not exist).
    public func readAll(_ object: String) throws(RadosError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(try size(of: object)))
        var failure: RadosError?
        let n = bytes.withUnsafeMutableBytes { b -> Int in
            do throws(RadosError) { return try read(object, into: b, at: 0) } catch { failure = error; return 0 }
        }
        if let failure { throw failure }
        if n < bytes.count { bytes.removeLast(bytes.count - n) }
        return bytes
    }

    /// The object's size; throws ENOENT for a missing object.
    public func size(of object: String) throws(RadosError) -> UInt64 {
        let ioctx = try handle("stat \(describe(object))")
        var size: UInt64 = 0
        var mtime: time_t = 0
        let rc = rados_stat(ioctx, object, &size, &mtime)
        if rc != 0 { throw RadosError("stat \(describe(object))", code: rc) }
        return size
    }

    /// True when the object exists.
    public func exists(_ object: String) throws(RadosError) -> Bool {
        do { _ = try size(of: object); return true } catch where error.code == ENOENT { return false }
    }

    /// Replaces the object's bytes (creating it).
    public func writeFull(_ object: String, _ bytes: [UInt8]) throws(RadosError) {
        let ioctx = try handle("write_full \(describe(object))")
        let rc = bytes.withUnsafeBytes { rados_write_full(ioctx, object, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        if rc != 0 { throw RadosError("write_full \(describe(object))", code: rc) }
    }

    /// Removes the object; a missing object is not an error when `missingOK`.
    public func remove(_ object: String, missingOK: Bool = true) throws(RadosError) {
        let ioctx = try handle("remove \(describe(object))")
        let rc = rados_remove(ioctx, object)
        if rc != 0 && !(missingOK && rc == -ENOENT) { throw RadosError("remove \(describe(object))", code: rc) }
    }

    /// An extended attribute's value, nil when the object has no such attribute (ENOENT when the
    /// object does not exist).
    public func attribute(_ object: String, _ name: String) throws(RadosError) -> [UInt8]? {
        let ioctx = try handle("getxattr \(describe(object)) \(name)")
        var capacity = 256
        while true {
            var value = [UInt8](repeating: 0, count: capacity)
            let rc = value.withUnsafeMutableBytes { rados_getxattr(ioctx, object, name, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) }
            if rc == -ENODATA { return nil }
            if rc == -ERANGE && capacity < 1 << 20 { capacity *= 4; continue }
            if rc < 0 { throw RadosError("getxattr \(describe(object)) \(name)", code: rc) }
            return Array(value[..<Int(rc)])
        }
    }

    public func setAttribute(_ object: String, _ name: String, _ value: [UInt8]) throws(RadosError) {
        let ioctx = try handle("setxattr \(describe(object)) \(name)")
        let rc = value.withUnsafeBytes { rados_setxattr(ioctx, object, name, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        if rc != 0 { throw RadosError("setxattr \(describe(object)) \(name)", code: rc) }
    }

    /// The names of every object in this pool's namespace.
    public func objectNames() throws(RadosError) -> [String] {
        let ioctx = try handle("list \(describe(""))")
        var cursor: rados_list_ctx_t?
        var rc = rados_nobjects_list_open(ioctx, &cursor)
        guard rc == 0, let cursor else { throw RadosError("list \(describe(""))", code: rc) }
        defer { rados_nobjects_list_close(cursor) }
        var names: [String] = []
        while true {
            var entry: UnsafePointer<CChar>?
            var entrySize = 0
            rc = rados_nobjects_list_next2(cursor, &entry, nil, nil, &entrySize, nil, nil)
            if rc == -ENOENT { return names }
            if rc != 0 { throw RadosError("list \(describe(""))", code: rc) }
            guard let entry else { continue }
            names.append(String(decoding: UnsafeRawBufferPointer(start: entry, count: entrySize), as: UTF8.self))
        }
    }

    // MARK: Compound operations

    /// Runs a compound write: every step applies, or (on an error) none does.
    public func operate(_ object: String, _ build: (RadosWriteOperation) -> Void) throws(RadosError) {
        let ioctx = try handle("write \(describe(object))")
        let op = RadosWriteOperation()
        defer { op.release() }
        build(op)
        let rc = rados_write_op_operate2(op.handle, ioctx, object, nil, 0)
        if rc != 0 { throw RadosError("\(op.summary) \(describe(object))", code: rc) }
    }

    /// Calls an object class method in a read-only operation and returns its output.
    public func callReading(_ object: String, objectClass: String, method: String, input: [UInt8]) throws(RadosError) -> [UInt8] {
        let ioctx = try handle("\(objectClass).\(method) \(describe(object))")
        // librados writes the results when the operation runs, after the exec call returned: they
        // need addresses that stay valid until then.
        let output = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: 1)
        let outputLength = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        let methodResult = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
        output.initialize(to: nil); outputLength.initialize(to: 0); methodResult.initialize(to: 0)
        defer {
            if let buffer = output.pointee { rados_buffer_free(buffer) }
            output.deallocate(); outputLength.deallocate(); methodResult.deallocate()
        }
        guard let op = rados_create_read_op() else { throw RadosError("create read op", code: ENOMEM) }
        defer { rados_release_read_op(op) }
        input.withUnsafeBytes { bytes in
            rados_read_op_exec(op, objectClass, method, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count,
                               output, outputLength, methodResult)
        }
        let rc = rados_read_op_operate(op, ioctx, object, 0)
        if rc != 0 { throw RadosError("\(objectClass).\(method) \(describe(object))", code: rc) }
        if methodResult.pointee != 0 { throw RadosError("\(objectClass).\(method) \(describe(object))", code: methodResult.pointee) }
        guard let result = output.pointee else { return [] }
        return Array(UnsafeRawBufferPointer(start: result, count: outputLength.pointee))
    }
}

/// The steps of one compound write (`rados_write_op_t`); the buffers it is given are copied into
/// the operation when a step is added, so they need not outlive the call.
public final class RadosWriteOperation {
    let handle: rados_write_op_t
    /// The step names, for error messages ("create+write_full+refcount.set").
    private(set) var steps: [String] = []

    init() {
        handle = rados_create_write_op()
    }

    func release() { rados_release_write_op(handle) }

    var summary: String { steps.joined(separator: "+") }

    /// Fails the whole operation with EEXIST when the object exists.
    public func createExclusive() {
        steps.append("create(exclusive)")
        rados_write_op_create(handle, Int32(LIBRADOS_CREATE_EXCLUSIVE), nil)
    }

    public func assertExists() {
        steps.append("assert_exists")
        rados_write_op_assert_exists(handle)
    }

    public func writeFull(_ bytes: UnsafeRawBufferPointer) {
        steps.append("write_full")
        rados_write_op_write_full(handle, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) {
        steps.append("write")
        rados_write_op_write(handle, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count, offset)
    }

    public func truncate(to size: UInt64) {
        steps.append("truncate")
        rados_write_op_truncate(handle, size)
    }

    public func zero(offset: UInt64, length: UInt64) {
        steps.append("zero")
        rados_write_op_zero(handle, offset, length)
    }

    public func remove() {
        steps.append("remove")
        rados_write_op_remove(handle)
    }

    public func setAttribute(_ name: String, _ value: [UInt8]) {
        steps.append("setxattr(\(name))")
        value.withUnsafeBytes { rados_write_op_setxattr(handle, name, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
    }

    public func removeAttribute(_ name: String) {
        steps.append("rmxattr(\(name))")
        rados_write_op_rmxattr(handle, name)
    }

    /// Fails the whole operation (ECANCELED) unless the attribute equals `value` (a missing
    /// attribute compares as empty).
    public func assertAttribute(_ name: String, equals value: [UInt8]) {
        steps.append("cmpxattr(\(name))")
        value.withUnsafeBytes {
            rados_write_op_cmpxattr(handle, name, UInt8(LIBRADOS_CMPXATTR_OP_EQ), $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count)
        }
    }

    /// Fails the whole operation unless the object's bytes from `offset` equal `expected` (the OSD
    /// compares; bytes past the object's end compare as zeroes). A mismatch at byte i fails with
    /// -(MAX_ERRNO + i), i.e. ``RadosError/isExtentMismatch``.
    public func assertBytes(_ expected: UnsafeRawBufferPointer, at offset: UInt64) {
        steps.append("cmpext")
        rados_write_op_cmpext(handle, expected.baseAddress?.assumingMemoryBound(to: CChar.self), expected.count, offset, nil)
    }

    /// Calls an object class method as part of the operation.
    public func call(_ objectClass: String, _ method: String, input: [UInt8]) {
        steps.append("\(objectClass).\(method)")
        input.withUnsafeBytes {
            rados_write_op_exec(handle, objectClass, method, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count, nil)
        }
    }
}

extension RadosError {
    /// Linux's MAX_ERRNO: cmpext reports a mismatch at byte i as -(MAX_ERRNO + i).
    static let maxErrno: Int32 = 4095

    /// True when a `cmpext` step found different bytes.
    public var isExtentMismatch: Bool { code >= Self.maxErrno }
}
