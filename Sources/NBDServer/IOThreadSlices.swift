import CVBDSys
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Short scheduler time slices for the threads a small read waits on: the event loops (parsing,
/// cached reads, replies) and the read pool. They sleep most of the time; the write pool's
/// threads hash and compress and use whole slices. With EEVDF (Linux 6.12 and later) a thread
/// that asks for a short slice gets an earlier deadline when it wakes, so a read is not left
/// waiting behind a writer's slice on each of its hops (Benchmarks/README.md, "Issue 15, fourth
/// round"). `VBD_IO_THREAD_SLICE_US` sets the slice (0 leaves the kernel's default).
enum IOThreadSlices {
    static let sliceNanos: UInt64 = {
        if let text = getenv("VBD_IO_THREAD_SLICE_US"), let micros = UInt64(String(cString: text)) {
            return micros * 1000
        }
        return 0
    }()

    private final class Marker: Sendable {}
    private static let requested = ThreadSpecificVariable<Marker>()

    /// Once per event loop, at the server's start.
    static func request(eventLoops: MultiThreadedEventLoopGroup) {
        guard sliceNanos > 0 else { return }
        for loop in eventLoops.makeIterator() {
            loop.execute { requestOnThisThread() }
        }
    }

    /// The first time a thread of the read pool runs a request.
    @inline(__always)
    static func requestOnThisThread() {
        guard sliceNanos > 0, requested.currentValue == nil else { return }
        requested.currentValue = Marker()
        _ = vbd_request_time_slice(sliceNanos)
    }
}
