import Testing
@testable import VBDAccounting

/// Drives a scheduler against a simulated device that serves `capacity` I/O units per second, one
/// request at a time, with every domain kept backlogged (overload), and returns what was served.
struct SchedulerSimulation {
    struct Served { var domain: DomainID; var cost: Double; var time: Double; var phase: MClockScheduler<Int>.Phase }

    var scheduler: MClockScheduler<Int>
    var capacity: Double
    var costs: [DomainID: Double]
    var backlogged: Set<DomainID>
    /// Pieces each request of a domain is split into (1 when absent).
    var pieces: [DomainID: Int] = [:]
    var now = 0.0
    var served: [Served] = []
    var counter = 0

    mutating func run(until end: Double) {
        while now < end {
            for domain in backlogged.sorted() {
                while scheduler.queuedCount(of: domain) < 8 {
                    counter += 1
                    try! scheduler.enqueue(counter, domain: domain, cost: costs[domain] ?? 1,
                                           pieces: pieces[domain] ?? 1, now: now)
                }
            }
            if let dispatch = scheduler.dequeue(now: now) {
                served.append(Served(domain: dispatch.domain, cost: dispatch.cost, time: now, phase: dispatch.phase))
                now += dispatch.cost / capacity
            } else if let next = scheduler.nextEligibleTime() {
                #expect(next > now, "nothing eligible, yet the next eligible time is not in the future")
                now = max(next, now + 1e-9)
            } else {
                now = end
            }
        }
    }

    func units(of domain: DomainID, from start: Double = 0, to end: Double = .infinity) -> Double {
        served.filter { $0.domain == domain && $0.time >= start && $0.time < end }.reduce(0) { $0 + $1.cost }
    }
}

/// Every window [a, b] starting and ending at dispatches of `served`: units <= limit * (b - a) +
/// burst + the largest single cost (a request, or a piece of a split one).
func expectWithinLimit(_ served: [SchedulerSimulation.Served], limit: Double, burst: Double, largestCost: Double) {
    for i in served.indices {
        var units = 0.0
        for j in i..<served.count {
            units += served[j].cost
            let window = served[j].time - served[i].time
            let bound = limit * window + burst + largestCost + 1e-6
            #expect(units <= bound, "window \(served[i].time)...\(served[j].time)")
            if units > bound { return }
        }
    }
}

@Suite struct MClockSchedulerTests {
    @Test func reservationsAreMetUnderOverload() {
        // Device: 1000 units/s. A reserves 300, B reserves 100 with a huge weight that would take
        // nearly everything in the weight phase; C has no reservation and a weight of 1.
        let scheduler = MClockScheduler<Int>(policies: [
            "A": .init(reservation: 300, weight: 1),
            "B": .init(reservation: 100, weight: 100),
            "C": .init(reservation: 0, weight: 1),
        ])
        var simulation = SchedulerSimulation(scheduler: scheduler, capacity: 1000, costs: [:],
                                             backlogged: ["A", "B", "C"])
        simulation.run(until: 10)
        for second in 1..<10 {
            let start = Double(second), end = start + 1
            #expect(simulation.units(of: "A", from: start, to: end) >= 300 - 2, "second \(second)")
            #expect(simulation.units(of: "B", from: start, to: end) >= 100 - 2, "second \(second)")
        }
        // B's weight takes the rest of the capacity: most of it, which A's reservation alone could not get.
        #expect(simulation.units(of: "B", from: 1, to: 10) > simulation.units(of: "A", from: 1, to: 10))
    }

    @Test func limitsAreNeverExceededOverAnyWindow() {
        let limit = 200.0, burst = 8.0
        let scheduler = MClockScheduler<Int>(policies: [
            "capped": .init(reservation: 50, limit: limit, weight: 10, limitBurstUnits: burst),
            "other": .init(reservation: 0, weight: 1),
        ])
        var simulation = SchedulerSimulation(scheduler: scheduler, capacity: 1000, costs: ["capped": 3, "other": 1],
                                             backlogged: ["capped", "other"])
        simulation.run(until: 5)
        let times = simulation.served.filter { $0.domain == "capped" }
        #expect(times.count > 100)
        expectWithinLimit(times, limit: limit, burst: burst, largestCost: 3)
        // And the capped domain is not throttled below its limit when capacity is free.
        #expect(simulation.units(of: "capped", from: 1, to: 5) >= limit * 4 * 0.95)
    }

    @Test func weightsSplitTheRemainderInProportion() {
        let scheduler = MClockScheduler<Int>(policies: [
            "light": .init(reservation: 100, weight: 1),
            "heavy": .init(reservation: 100, weight: 3),
        ])
        var simulation = SchedulerSimulation(scheduler: scheduler, capacity: 1000, costs: [:],
                                             backlogged: ["light", "heavy"])
        simulation.run(until: 10)
        // Remainder after reservations: 800 units/s, split 1:3 -> light 100+200, heavy 100+600.
        let light = simulation.units(of: "light", from: 1, to: 10), heavy = simulation.units(of: "heavy", from: 1, to: 10)
        #expect(abs(light / 9 - 300) < 300 * 0.05, "light got \(light / 9)/s")
        #expect(abs(heavy / 9 - 700) < 700 * 0.05, "heavy got \(heavy / 9)/s")
    }

    @Test func largeRequestsCostMoreSoBytesAreShared() {
        // Equal weights, one domain sends 1 MiB writes (17 units) and the other 4 KiB reads: each gets
        // half the units, so the small-request domain completes ~17x more requests.
        let big = IOCost.units(kind: .write, bytes: 1 << 20), small = IOCost.units(kind: .read, bytes: 4096)
        #expect(big == 17)
        let scheduler = MClockScheduler<Int>(policies: ["big": .init(), "small": .init()])
        var simulation = SchedulerSimulation(scheduler: scheduler, capacity: 1000, costs: ["big": big, "small": small],
                                             backlogged: ["big", "small"])
        simulation.run(until: 10)
        let bigUnits = simulation.units(of: "big", from: 1), smallUnits = simulation.units(of: "small", from: 1)
        #expect(abs(bigUnits - smallUnits) / smallUnits < 0.05)
    }

    @Test func splitRequestIsServedPieceByPieceAndCountedOnceInItsQueue() {
        var scheduler = MClockScheduler<Int>(policies: ["bulk": .init(queueCapacity: 2)])
        try! scheduler.enqueue(1, domain: "bulk", cost: 17, pieces: 16, now: 0)
        try! scheduler.enqueue(2, domain: "bulk", cost: 1, now: 0)
        #expect(throws: SchedulerError.queueFull("bulk")) { try scheduler.enqueue(3, domain: "bulk", cost: 1, now: 0) }
        var dispatched: [MClockScheduler<Int>.Dispatch] = []
        while let next = scheduler.dequeue(now: 100) { dispatched.append(next) }
        #expect(dispatched.map(\.item) == Array(repeating: 1, count: 16) + [2])
        #expect(dispatched.prefix(16).map(\.piece) == Array(0..<16))
        #expect(dispatched.map(\.isLastPiece) == Array(repeating: false, count: 15) + [true, true])
        #expect(abs(dispatched.prefix(16).reduce(0) { $0 + $1.cost } - 17) < 1e-9, "pieces add up to the request's cost")
        #expect(scheduler.queuedCount == 0)
    }

    @Test func reservedRequestWaitsBehindOnePieceNotAWholeLargeRequest() {
        // A device serving 1000 units/s one request at a time (no preemption). "bulk" keeps 1 MiB
        // writes (17 units = 17 ms each) queued; "victim" (reservation 100 units/s) sends one small
        // request at a time. Unsplit, the victim can wait up to a whole 17 ms write; in 16 pieces,
        // at most one piece (~1.06 ms) plus its own service.
        func worstWait(pieces: Int) -> Double {
            var scheduler = MClockScheduler<Int>(policies: [
                "victim": .init(reservation: 100, weight: 1),
                "bulk": .init(reservation: 0, weight: 1),
            ])
            var now = 0.0, worst = 0.0, counter = 0
            var victimArrival: Double? = nil
            var nextVictim = 0.0013
            while now < 5 {
                while scheduler.queuedCount(of: "bulk") < 4 {
                    counter += 1
                    try! scheduler.enqueue(counter, domain: "bulk", cost: 17, pieces: pieces, now: now)
                }
                if victimArrival == nil, now >= nextVictim {
                    // It arrived at nextVictim, perhaps while a bulk request or piece was on the device.
                    try! scheduler.enqueue(0, domain: "victim", cost: 1, now: now)
                    victimArrival = nextVictim
                }
                guard let dispatch = scheduler.dequeue(now: now) else {
                    now = max(now + 1e-6, min(scheduler.nextEligibleTime() ?? .infinity, victimArrival == nil ? nextVictim : .infinity))
                    continue
                }
                if dispatch.domain == "victim", let arrival = victimArrival {
                    worst = max(worst, now - arrival)
                    victimArrival = nil
                    nextVictim = now + 0.0123  // about 80 requests/s: inside the reservation
                }
                now += dispatch.cost / 1000
            }
            return worst
        }
        let unsplit = worstWait(pieces: 1), split = worstWait(pieces: 16)
        #expect(unsplit > 0.010, "unsplit worst wait \(unsplit)")
        #expect(split <= 17.0 / 16 / 1000 + 1e-9, "split worst wait \(split)")
    }

    @Test func limitsHoldForSplitRequests() {
        let limit = 200.0, burst = 8.0
        let scheduler = MClockScheduler<Int>(policies: [
            "capped": .init(reservation: 0, limit: limit, weight: 10, limitBurstUnits: burst),
            "other": .init(reservation: 0, weight: 1),
        ])
        var simulation = SchedulerSimulation(scheduler: scheduler, capacity: 1000, costs: ["capped": 17, "other": 1],
                                             backlogged: ["capped", "other"], pieces: ["capped": 16])
        simulation.run(until: 5)
        expectWithinLimit(simulation.served.filter { $0.domain == "capped" }, limit: limit, burst: burst,
                          largestCost: 17.0 / 16)
        #expect(simulation.units(of: "capped", from: 1, to: 5) >= limit * 4 * 0.95)
    }

    @Test func queuesAreBoundedPerDomain() {
        var scheduler = MClockScheduler<Int>(policies: ["a": .init(queueCapacity: 4)], domainsMax: 2)
        for i in 0..<4 { try! scheduler.enqueue(i, domain: "a", cost: 1, now: 0) }
        #expect(throws: SchedulerError.queueFull("a")) { try scheduler.enqueue(9, domain: "a", cost: 1, now: 0) }
        try! scheduler.enqueue(0, domain: "b", cost: 1, now: 0)
        #expect(throws: SchedulerError.tooManyDomains) { try scheduler.enqueue(0, domain: "c", cost: 1, now: 0) }
        #expect(scheduler.queuedCount == 5)
        // Within a domain requests leave in arrival order.
        var order: [Int] = []
        while let next = scheduler.dequeue(now: 1) {
            if next.domain == "a" { order.append(next.item) }
        }
        #expect(order == [0, 1, 2, 3])
        #expect(scheduler.queuedCount == 0)
    }

    @Test func reservationOnlyDomainGetsExactlyItsReservation() {
        var scheduler = MClockScheduler<Int>(policies: [
            "overdrawn": .init(reservation: 100, weight: 10),
            "paying": .init(reservation: 0, weight: 1),
        ])
        scheduler.setReservationOnly(true, for: "overdrawn")
        var simulation = SchedulerSimulation(scheduler: scheduler, capacity: 1000, costs: [:],
                                             backlogged: ["overdrawn", "paying"])
        simulation.run(until: 10)
        let overdrawn = simulation.units(of: "overdrawn", from: 1, to: 10) / 9
        #expect(overdrawn >= 98 && overdrawn <= 102, "overdrawn domain got \(overdrawn)/s")
        #expect(simulation.served.filter { $0.domain == "overdrawn" }.allSatisfy { $0.phase == .reservation })
    }

    @Test func returningIdleDomainGetsABoundedBurstAndThenItsShare() {
        // "steady" runs alone for 5 s (its P tags run far ahead of real time); then "returning" arrives.
        let burst = 20.0
        var scheduler = MClockScheduler<Int>(policies: [
            "steady": .init(weight: 1, burstUnits: burst),
            "returning": .init(weight: 1, burstUnits: burst),
        ])
        var now = 0.0, id = 0
        while now < 5 {
            while scheduler.queuedCount(of: "steady") < 8 { id += 1; try! scheduler.enqueue(id, domain: "steady", cost: 1, now: now) }
            _ = scheduler.dequeue(now: now)
            now += 0.001
        }
        var servedReturning = 0, servedSteady = 0, firstRunOfReturning = 0, countingRun = true
        for _ in 0..<2000 {
            for domain in ["steady", "returning"] as [DomainID] {
                while scheduler.queuedCount(of: domain) < 8 { id += 1; try! scheduler.enqueue(id, domain: domain, cost: 1, now: now) }
            }
            let dispatch = scheduler.dequeue(now: now)!
            if dispatch.domain == "returning" {
                servedReturning += 1
                if countingRun { firstRunOfReturning += 1 }
            } else {
                servedSteady += 1
                countingRun = false
            }
            now += 0.001
        }
        // Without the idle adjustment the newcomer would get ~5000 requests in a row (steady's tags
        // are 5 s ahead); with it, its head start is bounded by its burst credit.
        #expect(firstRunOfReturning >= Int(burst) - 1 && firstRunOfReturning <= Int(burst) + 2,
                "returning domain ran \(firstRunOfReturning) requests before steady got one")
        #expect(abs(servedReturning - servedSteady) <= Int(burst) + 4)
    }
}
