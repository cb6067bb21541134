import Dispatch
import Foundation
import NIOPosix
import Synchronization
import Testing
@testable import NBDServer

@Suite struct NBDWorkChainTests {
    struct Event: Equatable { var name: String; var thread: UInt }

    final class Recorder: Sendable {
        private let log = Mutex<[Event]>([])
        func record(_ name: String) {
            log.withLock { $0.append(Event(name: name, thread: UInt(bitPattern: Int(bitPattern: pthread_self())))) }
        }
        var events: [Event] { log.withLock { $0 } }
    }

    /// The first job submitted while a chained job runs waits for it to return and then runs on
    /// the same thread; a second one goes to the pool and may run beside them.
    @Test func workDispatchedByAFinishingJobRunsNextOnTheSameThread() async throws {
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        let recorder = Recorder()
        let record: @Sendable (String) -> Void = { recorder.record($0) }
        let pooledRan = DispatchSemaphore(value: 0)
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let remaining = Countdown(2)
            let finish: @Sendable () -> Void = { if remaining.decrement() == 0 { done.resume() } }
            NBDWorkChain.submit(to: pool) { _ in
                record("first")
                NBDWorkChain.submit(to: pool) { _ in
                    record("chained")
                    finish()
                }
                NBDWorkChain.submit(to: pool) { _ in
                    record("pooled")
                    pooledRan.signal()
                    finish()
                }
                // Return only after the pooled job has run on the other thread: a chained job
                // wrongly sent to the pool (queued before it) or run at once has run by then too.
                // The bound only turns a deadlock into a failure.
                if pooledRan.wait(timeout: .now() + 30) == .timedOut { record("pooled never ran") }
                record("first returns")
            }
        }
        try await pool.shutdownGracefully()
        let log = recorder.events
        let first = try #require(log.first { $0.name == "first" })
        let returns = try #require(log.firstIndex { $0.name == "first returns" })
        let chained = try #require(log.firstIndex { $0.name == "chained" })
        #expect(chained > returns, "the chained job ran before the job that dispatched it returned: \(log)")
        #expect(log[chained].thread == first.thread, "the chained job ran on another thread")
        #expect(log.contains { $0.name == "pooled" })
        #expect(!log.contains { $0.name == "pooled never ran" }, "the second job did not run beside the first: \(log)")
    }
}

final class Countdown: Sendable {
    private let count: Mutex<Int>
    init(_ count: Int) { self.count = Mutex(count) }
    func decrement() -> Int { count.withLock { $0 -= 1; return $0 } }
}
