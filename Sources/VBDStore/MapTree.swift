// MARK: - Notes on the design
//
// A volume's map (logical block -> stored chunk) is a fixed-fanout radix tree whose nodes are
// reference counted and copied on write, after Rodeh ("B-trees, shadowing, and clones", 2008) and
// Linux dm-thin. Why a radix tree and not a B-tree: block indexes are dense integers, so a radix
// tree needs no keys, no rebalancing and no splits, every lookup walks exactly `levels` nodes,
// and a 512-way fanout keeps a 1 TiB volume of 4 KiB blocks at 4 levels.
//
// Sharing. A snapshot or a share is a new root pointer to the same top node, whose reference
// count goes up by one: O(1) whatever the volume's size. Every image has its own root and the
// same depth, so a read 100 shares deep walks as many nodes as a read of the original: there is
// no backing chain.
//
// Nodes are metadata pages (PagedMapTree.swift has the tree's code and its invariants): a node's
// reference count is its page's count in the page table, a child pointer is a page number.
//
// Chunk number 0 means "no chunk": the block reads as zeroes.

/// Receives the chunk reference changes that tree operations cause.
protocol ChunkReferenceCounter: AnyObject {
    func retainChunk(_ chunk: UInt64) throws
    func releaseChunk(_ chunk: UInt64) throws
}

/// The shape of every map tree: 512 slots per node, `levels` nodes from root to leaf.
enum MapGeometry {
    static let fanoutShift = 9
    static let fanout = 1 << fanoutShift

    static func levels(forBlocks blocks: UInt64) -> Int {
        var levels = 1
        var covered = UInt64(fanout)
        while covered < blocks {
            levels += 1
            covered = covered.multipliedReportingOverflow(by: UInt64(fanout)).overflow ? .max : covered << fanoutShift
        }
        return levels
    }

    /// The slot of `block` in its node at `level` (1 = leaf).
    @inline(__always)
    static func slot(_ block: UInt64, level: Int) -> Int {
        Int((block >> UInt64(fanoutShift * (level - 1))) & UInt64(fanout - 1))
    }

    /// Blocks one child of a node at `level` covers.
    @inline(__always)
    static func span(level: Int) -> UInt64 {
        let shift = fanoutShift * (level - 1)
        return shift >= 64 ? .max : UInt64(1) << UInt64(shift)
    }
}
