/// Limits of the control socket and of the operator tools, each with its reason (see VBDCore's
/// `Limits` for the store and NBD ones; these belong to this module because only it uses them).
public enum ControlLimits {
    /// Largest request frame: a request carries a few names and a path, never data.
    public static let requestBytesMax = 64 << 10
    /// Largest reply frame: a `list` or `diff` of a big store fits; a client never buffers more.
    public static let replyBytesMax = 64 << 20
    /// Control connections served at once; more get a `busy` failure instead of a thread each.
    public static let connectionsMax = 16
    /// A client must send its whole request within this many seconds (one deadline for the request,
    /// not per recv), so a slow or idle peer cannot hold a slot.
    public static let requestReadTimeoutSeconds = 10
    /// Progress frames per second at most: enough for a smooth bar, negligible next to the work.
    public static let progressFramesPerSecondMax = 10.0
    /// Bytes read or written per step by import and export: a multiple of every block size
    /// (`Limits.blockBytesMax` is 1 MiB), small enough to keep memory flat, big enough for throughput.
    public static let transferBytesPerStep = 1 << 20
    /// Extents asked of a device per call when walking a volume (stats, export).
    public static let extentsPerCallMax = 4096
    /// Longest unix socket path (sun_path is 108 bytes on Linux, including the NUL).
    public static let unixPathBytesMax = 107
    /// Diff ranges in one reply (about 40 bytes of JSON each keeps the reply under `replyBytesMax`).
    public static let diffRangesMax = 1_000_000
}
