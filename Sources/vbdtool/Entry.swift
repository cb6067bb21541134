/// The process entry. The allocator is tuned before anything starts a thread: glibc gives every
/// thread that needs an arena before `M_ARENA_MAX` is set one of its own, and those arenas stay
/// (tuned inside `serve`, the server ran with three arenas and kept ~110 MiB freed in them at
/// 4 M chunks; Benchmarks/README.md, issue 15).
@main
enum VBDToolEntry {
    static func main() async {
        ServeCommand.tuneAllocator()
        await VBDTool.main()
    }
}
