#if canImport(Glibc)
import Glibc
#endif

/// The threads that serve requests (NBD's event loops and I/O pools, vhost-user's queue and I/O
/// threads) run at the nice value the process was started with (`nice -n -15 vbdtool serve ...`),
/// as every thread of a process started that way would in C.
///
/// A Linux thread inherits its nice value from the thread that creates it, and the worker threads
/// libdispatch starts run at their QoS's (nice 0 for the default QoS, whatever the process's); a
/// thread started from one of them (through `serve` running on GCD: a vhost-user queue's, NIO's
/// event loops and thread pools) inherits that. Measured: under `nice -n -15` the queue thread ran
/// at nice 0 while QEMU's threads ran at -15, and waited behind other processes' work on a busy
/// machine (Benchmarks/README.md, "Issue 16: the QD1 path"); NBD's threads did the same beside fio
/// and the peers it was compared with.
public enum ServingPriority {
    /// Linux keeps nice values per thread: PRIO_PROCESS with a thread id (0: the calling thread)
    /// reads or sets that thread's alone.
    private static let thread = __priority_which_t(PRIO_PROCESS.rawValue)

    /// The nice value of the process's main thread (its thread id is the process id), or nil when
    /// it cannot be read.
    public static func processNice() -> Int32? {
        errno = 0
        let nice = getpriority(thread, id_t(getpid()))
        return errno == 0 ? nice : nil
    }

    /// The calling thread's nice value, or nil when it cannot be read.
    public static func currentNice() -> Int32? {
        errno = 0
        let nice = getpriority(thread, 0)
        return errno == 0 ? nice : nil
    }

    /// Gives the calling thread the process's nice value. Best effort: lowering it needs
    /// CAP_SYS_NICE or room under RLIMIT_NICE, and without them the thread keeps its own.
    public static func adoptProcessNice() {
        guard let nice = processNice(), currentNice() != nice else { return }
        _ = setpriority(thread, 0, nice)
    }

    /// The nice value each thread last adopted, plus one (0: none yet), for threads that are not
    /// this module's own (GCD's I/O threads): one system call per use when nothing changed.
    private static let adoptedKey: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
        return key
    }()

    /// ``adoptProcessNice()`` for a borrowed thread: skips the change when this thread already
    /// adopted the process's current value.
    public static func adoptProcessNiceOnBorrowedThread() {
        guard let nice = processNice() else { return }
        let marker = Int(nice) + 100   // never 0 (nice is -20...19)
        if Int(bitPattern: pthread_getspecific(adoptedKey)) == marker { return }
        if currentNice() != nice { _ = setpriority(thread, 0, nice) }
        _ = pthread_setspecific(adoptedKey, UnsafeRawPointer(bitPattern: marker))
    }
}
