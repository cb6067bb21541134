/// `struct ucred` (socket(7)), which Glibc declares only under _GNU_SOURCE: what SO_PEERCRED
/// reports about the process at the other end of a unix socket (the NBD server's per-peer limit,
/// the control socket's owner check).
public struct UnixPeerCredentials: Sendable {
    public var pid: Int32 = 0
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0

    public init() {}
}
