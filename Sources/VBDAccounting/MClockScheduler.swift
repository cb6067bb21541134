// MARK: - Notes on the design
//
// mClock (Gulati, Merchant, Varman, OSDI 2010), Algorithm 1, with three documented changes.
//
// Every request of domain i gets tags when it arrives at time t, spaced by its cost c in I/O units:
//   R = max(R_prev + c / r_i, t)                    reservation tag
//   P = max(P_prev + c / w_i, t - sigma_i / w_i)     proportional (weight) tag; sigma = burst credit
// Dispatch at time t:
//   1. Constraint-based phase: among queue heads with R <= t, serve the smallest R.
//   2. Weight-based phase: otherwise, among heads whose domain is under its limit (and not
//      restricted to its reservation), serve the smallest P; then subtract c / r_i from the R tags
//      of that domain's remaining requests, so service beyond the reservation is not counted
//      against it (the paper's "R tag adjustment").
// When a domain goes from idle to active, the P tags of all active domains are shifted so that the
// smallest equals t (the paper's idle-domain adjustment): a domain returning from idle neither
// starves the others with stale small tags nor is starved by their tags running ahead of real time.
//
// Changes, and why:
// a. The limit is a token bucket evaluated at dispatch (`limitReadyAt`), not an L tag set at
//    arrival. With arrival tags a domain whose backlog waited behind others could later be served
//    in a burst far above its cap; at dispatch the cap holds over every window:
//    units served in [a, b] <= limit * (b - a) + limitBurstUnits + one request's cost.
// b. The limit gates both phases. mClock lets reservations ignore L; here reservation <= limit is
//    required, so gating costs a reserved request at most one request's c / limit of delay, and the
//    cap becomes a hard guarantee the hostile-tenant story can rely on.
// d. Service in the constraint phase also gives back its P-tag spacing (the mirror image of the
//    paper's R-tag adjustment), so weights split the capacity *left after reservations*, as the
//    issue asks ("weight: share of the rest"); in the paper, weights split the total and
//    reservations act only as a floor.
// c. `reservationOnly` removes a domain from the weight phase: congestion pricing uses it for a
//    domain that has overdrawn its credit (served only within its reservation).
//
// Invariants:
// 1. Each domain's queue holds at most `queueCapacity` requests; at most `domainsMax` domains.
// 2. Within a domain requests are served in arrival order (tags are monotone in a queue).
// 3. The scheduler never reads a clock: `now` is passed in (seconds on any monotone clock).

/// Per-domain scheduling parameters. Rates are in I/O units per second (see ``IOCost``).
public struct SchedulingPolicy: Sendable, Equatable, Codable {
    /// Guaranteed rate; 0 for none.
    public var reservation: Double
    /// Cap on the rate; nil for none.
    public var limit: Double?
    /// Share of the capacity left after reservations, relative to other domains' weights.
    public var weight: Double
    /// Idle credit (the paper's sigma): after idling, a domain may get up to this many units
    /// ahead of its proportional share.
    public var burstUnits: Double
    /// Units a domain below its limit may take at once beyond `limit * time` (token-bucket depth).
    public var limitBurstUnits: Double
    /// Requests waiting per domain; beyond it enqueue fails.
    public var queueCapacity: Int

    public init(reservation: Double = 0, limit: Double? = nil, weight: Double = 1, burstUnits: Double = 8,
                limitBurstUnits: Double = 8, queueCapacity: Int = 256) {
        self.reservation = reservation
        self.limit = limit
        self.weight = weight
        self.burstUnits = burstUnits
        self.limitBurstUnits = limitBurstUnits
        self.queueCapacity = queueCapacity
    }

    /// Requests one domain may queue at most: the queue is a preallocated ring.
    public static let queueCapacityMax = 65_536

    /// What is wrong with this policy, nil when it can be installed. Policies arrive over the
    /// control socket and from the persisted state, so this is checked, never trapped on.
    public var problem: String? {
        if !(reservation >= 0 && reservation.isFinite) { return "reservation must be a finite rate >= 0, got \(reservation)" }
        if !(weight > 0 && weight.isFinite) { return "weight must be a finite number > 0, got \(weight)" }
        if let limit, !(limit > 0 && limit.isFinite && limit >= reservation) {
            return "limit must be finite, > 0 and >= the reservation, got \(limit)"
        }
        if !(burstUnits >= 0 && burstUnits.isFinite && limitBurstUnits >= 0 && limitBurstUnits.isFinite) {
            return "burst units must be finite and >= 0"
        }
        if !(1...Self.queueCapacityMax).contains(queueCapacity) {
            return "queue capacity must be 1...\(Self.queueCapacityMax), got \(queueCapacity)"
        }
        return nil
    }

    /// For policies built in code (tests, defaults): an invalid one is a programming error.
    public func validate() {
        if let problem { preconditionFailure(problem) }
    }
}

public enum SchedulerError: Error, Equatable, Sendable, CustomStringConvertible {
    case queueFull(DomainID)
    case tooManyDomains
    case invalidPolicy(String)

    public var description: String {
        switch self {
        case .queueFull(let domain): return "\(domain) has too many requests queued"
        case .tooManyDomains: return "too many domains"
        case .invalidPolicy(let problem): return "invalid scheduling policy: \(problem)"
        }
    }
}

/// Which mClock phase dispatched a request.
public enum SchedulingPhase: Sendable, Equatable {
    case reservation
    case weight
}

// Declared outside the generic scheduler so that they are not generic themselves: a type nested
// in `MClockScheduler<Item>` has its metadata instantiated at run time for each `Item`, on every
// dispatch when the caller is in another module.

/// A queued request's tags; one split into pieces stays at the head of its queue until its
/// last piece is taken, its tags advancing by one piece's spacing each time.
///
/// Tags are stored relative to their domain's offsets (``MClockDomainState``): the paper's tag
/// adjustments move every tag of a domain by the same amount, so they change one offset
/// instead of rewriting each queued request (O(1) per dispatch, O(domains) per activation).
private struct MClockTags {
    var pieceCost: Double
    var pieces: Int
    var nextPiece = 0
    var reservationTag: Double
    var proportionTag: Double
}

private struct MClockDomainState {
    var domain: DomainID
    var policy: SchedulingPolicy
    /// Tags of the queued requests, in arrival order; the requests themselves are in
    /// the scheduler's `items` at the same index, kept apart so the scheduling loops touch no `Item`.
    var tags: BoundedQueue<MClockTags>
    /// A real R tag is the stored one plus this (the R-tag adjustment after weight-phase service).
    var reservationOffset = 0.0
    /// A real P tag is the stored one plus this (activation shifts; change d).
    var proportionOffset = 0.0
    var lastReservationTag = -Double.infinity
    var lastProportionTag = -Double.infinity
    /// Earliest time the limit admits the next request (token bucket as a virtual clock).
    var limitReadyAt = -Double.infinity
    var reservationOnly = false

    func reservationTag(of tags: MClockTags) -> Double { tags.reservationTag + reservationOffset }
    func proportionTag(of tags: MClockTags) -> Double { tags.proportionTag + proportionOffset }

    /// Folds the offsets into the last tags once the queue is empty, so offsets do not grow
    /// without bound over a long run.
    mutating func normalizeIfIdle() {
        guard tags.isEmpty else { return }
        lastReservationTag += reservationOffset
        lastProportionTag += proportionOffset
        reservationOffset = 0
        proportionOffset = 0
    }
}

/// The mClock dispatcher: queues requests per domain and says which to start next.
public struct MClockScheduler<Item> {
    public typealias Phase = SchedulingPhase

    public struct Dispatch {
        public var item: Item
        public var domain: DomainID
        /// The cost of this piece.
        public var cost: Double
        public var phase: Phase
        /// Which piece of the request this is (0 for an unsplit request).
        public var piece: Int
        /// Whether the request has no pieces left in the queue after this one.
        public var isLastPiece: Bool
    }

    /// Domains in the order they first appeared; never removed (at most `domainsMax`), so an
    /// index stays valid. Arrays rather than a dictionary of states so updates happen in place.
    private var indexOf: [DomainID: Int] = [:]
    private var states: [MClockDomainState] = []
    private var items: [BoundedQueue<Item>] = []
    public private(set) var defaultPolicy: SchedulingPolicy
    public let domainsMax: Int
    public private(set) var queuedCount = 0

    public init(defaultPolicy: SchedulingPolicy = .init(), policies: [DomainID: SchedulingPolicy] = [:],
                domainsMax: Int = 1024) {
        defaultPolicy.validate()
        self.defaultPolicy = defaultPolicy
        self.domainsMax = domainsMax
        for (domain, policy) in policies { setPolicy(policy, for: domain) }
    }

    /// Installs or changes a domain's policy; queued requests keep their tags.
    public mutating func setPolicy(_ policy: SchedulingPolicy, for domain: DomainID) {
        policy.validate()
        guard let i = indexOf[domain] else {
            indexOf[domain] = states.count
            states.append(MClockDomainState(domain: domain, policy: policy, tags: BoundedQueue(capacity: policy.queueCapacity)))
            items.append(BoundedQueue(capacity: policy.queueCapacity))
            return
        }
        var tags = BoundedQueue<MClockTags>(capacity: policy.queueCapacity)
        var queued = BoundedQueue<Item>(capacity: policy.queueCapacity)
        while let element = states[i].tags.removeFirst(), let item = items[i].removeFirst() {
            if !tags.append(element) || !queued.append(item) { preconditionFailure("shrinking a queue below its backlog") }
        }
        states[i].tags = tags
        states[i].policy = policy
        items[i] = queued
    }

    /// The index of `domain`'s state, adding it with the default policy if there is room.
    private mutating func index(adding domain: DomainID) -> Int? {
        if let i = indexOf[domain] { return i }
        guard states.count < domainsMax else { return nil }
        setPolicy(defaultPolicy, for: domain)
        return indexOf[domain]
    }

    public func policy(for domain: DomainID) -> SchedulingPolicy { indexOf[domain].map { states[$0].policy } ?? defaultPolicy }

    /// Overdrawn domains are served only within their reservation (congestion pricing).
    public mutating func setReservationOnly(_ restricted: Bool, for domain: DomainID) {
        guard let i = index(adding: domain) else { return }
        states[i].reservationOnly = restricted
    }

    public func isReservationOnly(_ domain: DomainID) -> Bool { indexOf[domain].map { states[$0].reservationOnly } ?? false }

    /// Domains currently restricted to their reservation (to re-check after a top-up).
    public var reservationOnlyDomains: [DomainID] { states.filter(\.reservationOnly).map(\.domain) }

    public func queuedCount(of domain: DomainID) -> Int { indexOf[domain].map { states[$0].tags.count } ?? 0 }

    /// Queues a request of `cost` I/O units that arrived at `now`.
    ///
    /// With `pieces` > 1 the request is served as that many pieces of `cost / pieces` units, each
    /// dispatched on its own and tagged as if it were a request of its own arriving with the
    /// others: a large request then holds the device for one piece at a time, so a reserved
    /// domain waits behind at most one piece rather than the whole request. The queue capacity
    /// still counts requests.
    public mutating func enqueue(_ item: Item, domain: DomainID, cost: Double, pieces: Int = 1,
                                 now: Double) throws(SchedulerError) {
        precondition(cost > 0 && cost.isFinite && pieces > 0)
        let pieceCost = cost / Double(pieces)
        guard let i = index(adding: domain) else { throw .tooManyDomains }
        guard !states[i].tags.isFull else { throw .queueFull(domain) }
        if states[i].tags.isEmpty { adjustProportionTagsForActivation(now: now, excluding: i) }
        let policy = states[i].policy
        // Tags of the first piece; piece k's are k spacings later, and the last piece's become
        // the domain's last tags (what the next request is spaced from). Computed in real time,
        // stored relative to the domain's offsets.
        let reservationOffset = states[i].reservationOffset, proportionOffset = states[i].proportionOffset
        let reservationTag = policy.reservation > 0
            ? max(states[i].lastReservationTag + reservationOffset + pieceCost / policy.reservation, now) : Double.infinity
        let proportionTag = max(states[i].lastProportionTag + proportionOffset + pieceCost / policy.weight,
                                now - policy.burstUnits / policy.weight)
        let later = Double(pieces - 1) * pieceCost
        states[i].lastReservationTag = (policy.reservation > 0 ? reservationTag + later / policy.reservation : reservationTag)
            - reservationOffset
        states[i].lastProportionTag = proportionTag + later / policy.weight - proportionOffset
        let appended = states[i].tags.append(MClockTags(pieceCost: pieceCost, pieces: pieces,
                                                  reservationTag: reservationTag - reservationOffset,
                                                  proportionTag: proportionTag - proportionOffset))
        let itemAppended = items[i].append(item)
        precondition(appended && itemAppended)
        queuedCount += 1
    }

    /// Picks the next request to start at `now`, or nil when none is eligible yet (all queues empty,
    /// or every waiting domain is at its limit or restricted and ahead of its reservation).
    /// With `weightPhaseAllowed` false only reservation-phase requests are considered (the server
    /// keeps some device slots for reservations this way).
    public mutating func dequeue(now: Double, weightPhaseAllowed: Bool = true) -> Dispatch? {
        var bestReservation: (index: Int, tag: Double)?
        var bestProportion: (index: Int, tag: Double)?
        for i in states.indices {
            guard let head = states[i].tags.first, states[i].limitReadyAt <= now else { continue }
            let reservationTag = states[i].reservationTag(of: head)
            if reservationTag <= now, reservationTag < (bestReservation?.tag ?? .infinity) {
                bestReservation = (i, reservationTag)
            }
            let proportionTag = states[i].proportionTag(of: head)
            if !states[i].reservationOnly, proportionTag < (bestProportion?.tag ?? .infinity) {
                bestProportion = (i, proportionTag)
            }
        }
        if let chosen = bestReservation {
            return take(from: chosen.index, now: now, phase: .reservation)
        }
        if weightPhaseAllowed, let chosen = bestProportion {
            return take(from: chosen.index, now: now, phase: .weight)
        }
        return nil
    }

    /// When `dequeue` returns nil with requests waiting: the earliest time one may become eligible
    /// (considering only reservation-phase eligibility when `weightPhaseAllowed` is false).
    public func nextEligibleTime(weightPhaseAllowed: Bool = true) -> Double? {
        var earliest: Double?
        for state in states {
            guard let head = state.tags.first else { continue }
            let ready = state.reservationOnly || !weightPhaseAllowed
                ? max(state.limitReadyAt, state.reservationTag(of: head)) : state.limitReadyAt
            // +infinity: restricted to a reservation of 0, never eligible until the restriction lifts.
            if ready < .infinity { earliest = min(earliest ?? ready, ready) }
        }
        return earliest
    }

    private mutating func take(from i: Int, now: Double, phase: Phase) -> Dispatch {
        guard var request = states[i].tags.first, let item = items[i].first else {
            preconditionFailure("chosen domain has no request")
        }
        let policy = states[i].policy
        let piece = request.nextPiece
        let cost = request.pieceCost
        let isLastPiece = piece + 1 == request.pieces
        if isLastPiece {
            _ = states[i].tags.removeFirst()
            _ = items[i].removeFirst()
            queuedCount -= 1
        } else {
            // The rest of the request stays at the head, tagged as its next piece.
            request.nextPiece += 1
            if policy.reservation > 0 { request.reservationTag += cost / policy.reservation }
            request.proportionTag += cost / policy.weight
            states[i].tags.updateFirst { $0 = request }
        }
        if let limit = policy.limit {
            let earliestStart = now - policy.limitBurstUnits / limit
            states[i].limitReadyAt = max(states[i].limitReadyAt, earliestStart) + cost / limit
        }
        if phase == .weight, policy.reservation > 0 {
            // The paper's R-tag adjustment, for every tag of the domain at once.
            states[i].reservationOffset -= cost / policy.reservation
        }
        if phase == .reservation {
            // Change d: reserved service does not use up the domain's weight share.
            states[i].proportionOffset -= cost / policy.weight
        }
        states[i].normalizeIfIdle()
        return Dispatch(item: item, domain: states[i].domain, cost: cost, phase: phase, piece: piece,
                        isLastPiece: isLastPiece)
    }

    private mutating func adjustProportionTagsForActivation(now: Double, excluding newcomer: Int) {
        var smallest = Double.infinity
        for i in states.indices where i != newcomer {
            if let head = states[i].tags.first { smallest = min(smallest, states[i].proportionTag(of: head)) }
        }
        guard smallest.isFinite else { return }
        let shift = smallest - now
        for i in states.indices where i != newcomer && !states[i].tags.isEmpty {
            states[i].proportionOffset -= shift
        }
    }
}
