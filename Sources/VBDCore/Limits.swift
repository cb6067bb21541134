/// Every limit in one place, each with its reason (TigerBeetle's constants.zig, sqliteLimit.h).
public enum Limits {
    // MARK: Blocks and volumes

    /// Smallest block size: one 512-byte sector, what every client can address.
    public static let blockBytesMin = 512
    /// Default block size: the guest page and filesystem block size, so most I/O needs no read-modify-write.
    public static let blockBytesDefault = 4096
    /// Largest block size: keeps one block's compression and verification under a millisecond.
    public static let blockBytesMax = 1 << 20
    /// Largest volume: 2^50 bytes (1 PiB) keeps block indexes in 40 bits for every block size.
    public static let volumeBytesMax: UInt64 = 1 << 50
    /// Longest volume or snapshot name: fits NBD export names and file system paths comfortably.
    public static let nameBytesMax = 200

    // MARK: Store

    /// Data file allocation unit: compressed blocks are packed at this granularity.
    public static let sectorBytes = 512
    /// Unflushed journal records held in memory before an implicit flush (bounded memory).
    public static let pendingJournalBytesMax = 4 << 20
    /// Journal size at which the store writes a checkpoint and starts a new journal (bounds recovery time).
    public static let journalBytesCheckpoint: UInt64 = 256 << 20
    /// Default byte budget of the metadata page cache (`serve --metadata-cache`).
    public static let metadataCacheBytesDefault = 256 << 20
    /// Changed metadata pages that start a commit whatever the cache's size: a commit's freeze
    /// visits each changed page, and changes wait for all of it (readers only for one step of
    /// `commitFreezeStepPages`), so this bounds what a commit costs writers (Benchmarks/README.md,
    /// "Issue 15").
    public static let commitDirtyPagesMax = 4096
    /// Changed pages a commit freezes per hold of the store lock: 1.1 ms at most measured here at
    /// 32 M chunks (Benchmarks/README.md, issue 15, eighth round).
    public static let commitFreezeStepPages = 512
    /// Bytes of new chunks written to the data file one after another (a sequential run) after
    /// which their write-back is started (`sync_file_range`), so that a flush's or commit's sync
    /// finds little of a streaming writer dirty (RocksDB's bytes_per_sync); the step chosen in
    /// Benchmarks/README.md (issue 15, ninth round).
    public static let dataWriteBackBytes: UInt64 = 4 << 20
    /// Shortest run of freed data-file pages a flush hole-punches. Scattered frees (overwrites)
    /// stay allocated: a new chunk written there lands on a page the page cache still holds,
    /// where a punched page costs a fresh, zeroed page and a block allocation on the next write
    /// (Benchmarks/README.md). Deleting a volume frees long runs, which go back to the file system.
    public static let holePunchRunBytesMin: UInt64 = 1 << 20
    /// Most free space a flush keeps in the data file for reuse (as much as the writes around the
    /// frees allocated) before it punches long freed runs: overwriting a volume frees long runs at
    /// every flush, and the next writes landing in punched pages refault them
    /// (Benchmarks/README.md, "Issue 14, second round"). One implicit flush's worth of 1 MiB
    /// overwrites freed ~250 MiB there (`pendingJournalBytesMax` of journal names ~500 MiB of
    /// writes), so 1 GiB keeps a steady overwrite from punching anything.
    public static let unpunchedFreeBytesMax: UInt64 = 1 << 30

    // MARK: NBD (doc/proto.md; nbdkit's limits where the spec leaves it open)

    /// Largest READ/WRITE payload: 32 MiB, as nbdkit and qemu-nbd accept; the spec's advised maximum.
    public static let nbdRequestBytesMax = 32 << 20
    /// Requests in flight on one connection: enough for QD64 clients; bounds per-connection memory
    /// to about `nbdInFlightRequestsMax * nbdRequestBytesMax` in the worst case.
    public static let nbdInFlightRequestsMax = 64
    /// Concurrent client connections per server.
    public static let nbdConnectionsMax = 256
    /// Concurrent connections from one peer (IP address or unix uid): half the server's slots, so
    /// one peer cannot take them all while a hypervisor host, whose guests all connect from one
    /// address or one uid, still gets 128 disks; `vbdtool serve --connections-per-peer` changes it.
    public static let nbdConnectionsPerPeerMax = 128
    /// Options accepted during one handshake (nbdkit allows 32).
    public static let nbdHandshakeOptionsMax = 32
    /// Largest option payload: export names are at most 4 KiB by spec, and no option needs more.
    public static let nbdOptionBytesMax = 64 << 10
    /// Extents in one BLOCK_STATUS reply: bounds reply size for a huge range.
    public static let nbdExtentsPerReplyMax = 128 << 10
}
