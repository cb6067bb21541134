import Testing
import VBDCore
@testable import VBDAccounting

/// mClock as the design notes in MClockScheduler.swift state it, transcribed directly: every tag
/// adjustment rewrites every queued request. `MClockScheduler` keeps per-domain offsets instead
/// (O(1) per dispatch); this model is what it must agree with.
struct ReferenceMClock {
    struct Request { var id: Int; var pieceCost: Double; var pieces: Int; var nextPiece = 0; var r: Double; var p: Double }
    struct Domain {
        var policy: SchedulingPolicy
        var queue: [Request] = []
        var lastR = -Double.infinity, lastP = -Double.infinity, limitReadyAt = -Double.infinity
        var reservationOnly = false
    }
    var domains: [DomainID: Domain] = [:]
    /// Domains in the order they were added: the scheduler breaks exact ties by that order.
    var order: [DomainID] = []

    mutating func add(_ domain: DomainID, _ policy: SchedulingPolicy) {
        domains[domain] = Domain(policy: policy)
        order.append(domain)
    }

    mutating func enqueue(_ id: Int, domain: DomainID, cost: Double, pieces: Int, now: Double) -> Bool {
        guard domains[domain]!.queue.count < domains[domain]!.policy.queueCapacity else { return false }
        if domains[domain]!.queue.isEmpty {
            // Activation: shift every other backlogged domain's P tags so the smallest is `now`.
            let heads = order.filter { $0 != domain }.compactMap { domains[$0]!.queue.first?.p }
            if let smallest = heads.min() {
                let shift = smallest - now
                for other in order where other != domain && !domains[other]!.queue.isEmpty {
                    for k in domains[other]!.queue.indices { domains[other]!.queue[k].p -= shift }
                    domains[other]!.lastP -= shift
                }
            }
        }
        var d = domains[domain]!
        let pc = cost / Double(pieces), policy = d.policy
        let r = policy.reservation > 0 ? max(d.lastR + pc / policy.reservation, now) : .infinity
        let p = max(d.lastP + pc / policy.weight, now - policy.burstUnits / policy.weight)
        let later = Double(pieces - 1) * pc
        d.lastR = policy.reservation > 0 ? r + later / policy.reservation : r
        d.lastP = p + later / policy.weight
        d.queue.append(Request(id: id, pieceCost: pc, pieces: pieces, r: r, p: p))
        domains[domain] = d
        return true
    }

    mutating func dequeue(now: Double, weightPhaseAllowed: Bool) -> (id: Int, domain: DomainID, piece: Int, phase: SchedulingPhase)? {
        var bestR: (DomainID, Double)?, bestP: (DomainID, Double)?
        for domain in order {
            let d = domains[domain]!
            guard let head = d.queue.first, d.limitReadyAt <= now else { continue }
            if head.r <= now, head.r < (bestR?.1 ?? .infinity) { bestR = (domain, head.r) }
            if !d.reservationOnly, head.p < (bestP?.1 ?? .infinity) { bestP = (domain, head.p) }
        }
        let chosen: (DomainID, SchedulingPhase)
        if let bestR { chosen = (bestR.0, .reservation) } else if weightPhaseAllowed, let bestP { chosen = (bestP.0, .weight) } else { return nil }
        var d = domains[chosen.0]!
        let policy = d.policy
        let request = d.queue[0], cost = request.pieceCost
        if request.nextPiece + 1 == request.pieces {
            d.queue.removeFirst()
        } else {
            d.queue[0].nextPiece += 1
            if policy.reservation > 0 { d.queue[0].r += cost / policy.reservation }
            d.queue[0].p += cost / policy.weight
        }
        if let limit = policy.limit {
            d.limitReadyAt = max(d.limitReadyAt, now - policy.limitBurstUnits / limit) + cost / limit
        }
        if chosen.1 == .weight, policy.reservation > 0 {
            for k in d.queue.indices { d.queue[k].r -= cost / policy.reservation }
            d.lastR -= cost / policy.reservation
        }
        if chosen.1 == .reservation {
            for k in d.queue.indices { d.queue[k].p -= cost / policy.weight }
            d.lastP -= cost / policy.weight
        }
        domains[chosen.0] = d
        return (request.id, chosen.0, request.nextPiece, chosen.1)
    }
}

@Suite struct MClockReferenceTests {
    /// Random arrivals, costs, pieces, policies, restrictions and slot states: every dispatch of
    /// the scheduler names the same request, piece, domain and phase as the reference model.
    @Test(arguments: [1, 2, 3, 4, 5, 6, 7, 8] as [UInt64])
    func dispatchesExactlyAsTheAlgorithmStates(seed: UInt64) {
        var random = SplitMix64(seed: seed)
        func uniform(_ range: ClosedRange<Double>) -> Double {
            range.lowerBound + Double(random.next() % 1_000_000) / 1_000_000 * (range.upperBound - range.lowerBound)
        }
        let names: [DomainID] = ["a", "b", "c", "d"]
        var scheduler = MClockScheduler<Int>()
        var reference = ReferenceMClock()
        for name in names {
            let reservation = random.next() % 3 == 0 ? 0 : uniform(50...400)
            let limit: Double? = random.next() % 2 == 0 ? nil : reservation + uniform(100...800)
            let policy = SchedulingPolicy(reservation: reservation, limit: limit, weight: uniform(0.5...4),
                                          burstUnits: uniform(0...16), limitBurstUnits: uniform(0...16), queueCapacity: 12)
            scheduler.setPolicy(policy, for: name)
            reference.add(name, policy)
        }
        var now = 0.0, id = 0, dispatched = 0
        for _ in 0..<4000 {
            now += uniform(0...0.004)
            switch random.next() % 10 {
            case 0...4:
                let domain = names[Int(random.next() % 4)]
                let cost = uniform(0.5...20), pieces = 1 + Int(random.next() % 4)
                id += 1
                let accepted = reference.enqueue(id, domain: domain, cost: cost, pieces: pieces, now: now)
                do {
                    try scheduler.enqueue(id, domain: domain, cost: cost, pieces: pieces, now: now)
                    #expect(accepted, "the scheduler took a request the model refused")
                } catch {
                    #expect(!accepted && error == .queueFull(domain))
                }
            case 5:
                let domain = names[Int(random.next() % 4)]
                let restricted = random.next() % 2 == 0
                scheduler.setReservationOnly(restricted, for: domain)
                reference.domains[domain]!.reservationOnly = restricted
            default:
                let weightAllowed = random.next() % 4 != 0
                let expected = reference.dequeue(now: now, weightPhaseAllowed: weightAllowed)
                let actual = scheduler.dequeue(now: now, weightPhaseAllowed: weightAllowed)
                #expect(actual?.item == expected?.id && actual?.domain == expected?.domain &&
                        actual?.piece == expected?.piece && actual?.phase == expected?.phase,
                        "seed \(seed), dispatch \(dispatched) at \(now)")
                if actual?.item != expected?.id { return }
                if actual != nil { dispatched += 1 }
            }
        }
        #expect(dispatched > 500, "the random schedule exercised too few dispatches")
    }
}
