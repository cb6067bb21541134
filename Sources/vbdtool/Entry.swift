import CVBDSys

/// The process entry: the allocator is tuned before anything starts a thread, because glibc gives
/// every thread that needs an arena before `M_ARENA_MAX` is set one of its own, and those stay.
@main
enum VBDToolEntry {
    static func main() async {
        tuneAllocator()
        await VBDTool.main()
    }

    /// Request payloads (up to 32 MiB) and their reply buffers are allocated and freed at high
    /// rates. By default glibc maps each large one afresh and unmaps it on free, so every byte is
    /// first touched through a page fault and zeroed by the kernel (measured: ~6 % of the CPU of a
    /// 1 MiB sequential write, and the payload copy ran at 1.5 GB/s). Serving them from the heap,
    /// and trimming the heap only past 256 MiB of free memory, keeps the pages; what the heap can
    /// hold is bounded by the in-flight limits (`ServerLimits.inFlightBytesMax`: about 64 MiB per connection).
    ///
    /// One arena for every thread: a cached block is allocated by whichever thread wrote or read
    /// it and freed by whichever thread overwrote it. With an arena per thread, the memory freed
    /// in one arena was not reused by allocations in another, which grew into fresh pages instead
    /// (4k random writes: 67 µs of server CPU per write with per-thread arenas, 36 µs with one;
    /// Benchmarks/README.md).
    static func tuneAllocator() {
        vbd_tune_allocator(64 << 20, 256 << 20, 1)
    }
}
