import CVBDSys
import Dispatch
import NIOCore
import NIOPosix
import VBDCore

#if canImport(Glibc)
import Glibc
#endif

/// Sets up the threads that serve requests, once each, from inside the thread: NIO starts its
/// event loops and pools from whichever thread creates them, here one of GCD's at nice 0.
/// - Every serving thread takes the process's nice value (`ServingPriority`).
/// - The threads a small read waits on (the event loops: parsing, cached reads, replies; and the
///   read pool) may ask for short scheduler slices. The write pool's threads hash and compress
///   and use whole slices. With EEVDF (Linux 6.12 and later) a thread with a short slice gets an
///   earlier deadline when it wakes, so a read does not wait behind a writer's slice at each hop
///   (Benchmarks/README.md, "Issue 15, fourth round"). `VBD_IO_THREAD_SLICE_US` sets the slice;
///   unset or 0 leaves the kernel's default.
enum ServingThreads {
    static let shortSliceNanos: UInt64 = {
        if let text = getenv("VBD_IO_THREAD_SLICE_US"), let micros = UInt64(String(cString: text)) {
            return micros * 1000
        }
        return 0
    }()

    /// One task per event loop.
    static func prepare(eventLoops: MultiThreadedEventLoopGroup, shortSlices: Bool) {
        for loop in eventLoops.makeIterator() { loop.execute { prepareThisThread(shortSlices: shortSlices) } }
    }

    /// One task per thread of `pool`, each waiting until all have started, so that every thread
    /// takes one (bounded: a pool that does not start its threads is left after 5 s).
    static func prepare(pool: NIOThreadPool, threads: Int, shortSlices: Bool) {
        let started = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        for _ in 0..<threads {
            pool.submit { _ in
                prepareThisThread(shortSlices: shortSlices)
                started.signal()
                _ = release.wait(timeout: .now() + 5)
            }
        }
        for _ in 0..<threads { _ = started.wait(timeout: .now() + 5) }
        for _ in 0..<threads { release.signal() }
    }

    private static func prepareThisThread(shortSlices: Bool) {
        ServingPriority.adoptProcessNice()
        if shortSlices && shortSliceNanos > 0 { _ = vbd_request_time_slice(shortSliceNanos) }
    }
}
