/// A controlled scheduler for deterministic concurrency tests (the simulator's; FoundationDB's and
/// Coyote's approach): real threads, of which only one runs at a time, and at every call below the
/// scheduler picks which one runs next. The store calls it at each lock operation of its
/// ``StoreMutex``es; the simulator's storage wrapper calls ``yield()`` before every file operation.
///
/// Calls from threads the scheduler does not manage must pass straight through, so one store
/// can be set up (and checked) from an ordinary thread.
public protocol InterleavingScheduler: AnyObject, Sendable {
    /// Returns once the calling thread may take `lock` (it is free, and the scheduler chose this thread).
    func acquire(_ lock: ObjectIdentifier)
    /// Takes `lock` if it is free when the scheduler next runs this thread; false otherwise; nil
    /// when the calling thread is not managed (it then tries the lock the ordinary way).
    func tryAcquire(_ lock: ObjectIdentifier) -> Bool?
    /// `lock` was released: threads waiting for it may run again.
    func release(_ lock: ObjectIdentifier)
    /// A point where another thread may run (before I/O).
    func yield()
}
