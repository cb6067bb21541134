import VBDCore

extension Store {
    /// Drops the store without flushing or checkpointing, as a crash would, and releases the lock
    /// (the process goes on). Used by tests of recovery.
    public func abandonWithoutFlush() {
        mutex.withLock { closed = true }
        dataFile.close(); journalFile.close(); superblockFile.close(); metaFile.close()
        directory.unlock()
    }

    /// Bytes of RAM the metadata uses: the cached metadata pages (within the budget once they are
    /// committed) and the data file's allocation bitmap.
    public var indexMemoryBytes: Int {
        mutex.withLock { pager.residentBytes + space.bitmapBytes }
    }

    /// Metadata pages read from `meta`: all of them, and those read without the store lock.
    public var metadataPageReads: (all: Int, outsideLock: Int) { mutex.withLock { (pager.reads, pager.readsOutsideLock) } }

    /// What the metadata cache's pages hold, measured page by page now.
    public var metadataCacheMeasuredBytes: Int { mutex.withLock { pager.measuredResidentBytes } }

    public var uniqueChunkCount: Int { mutex.withLock { Int(chunks.liveCount) } }

    /// Bytes the data file occupies on disk (what `du` reports, holes excluded) is measured by the
    /// caller; this is what the allocator believes is in use.
    public var storedBytes: UInt64 { mutex.withLock { space.usedSectors * UInt64(Limits.sectorBytes) } }
}

extension Store {
    /// Holds `count` sectors of the data file in use without a chunk, as a write in flight does
    /// (until the store closes), so that the next chunks land past them: how a test spreads a few
    /// chunks over many sector-map pages without writing gigabytes.
    public func testingHoldDataSectors(_ count: Int) {
        mutex.withLock { _ = space.allocate(count) }
    }

    /// The free-space summary as the store holds it now: sectors in the sector map, its end.
    public var spaceSummaryFigures: (usedSectors: UInt64, endSector: UInt64) {
        mutex.withLock { (spaceSummary.usedSectors, spaceSummary.endSector) }
    }
}
