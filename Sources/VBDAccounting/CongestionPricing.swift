// MARK: - Notes on the design
//
// Price of one I/O unit at device utilisation u (0 = idle, 1 = saturated):
//
//     p(u) = base / (1 - min(u, uMax))^k          base = 1 credit, uMax = 0.95, k = 2 by default
//
// p(0) = base, p(0.5) = 4 base, p(0.9) = 100 base, p(>= 0.95) = 400 base. It is the queueing-delay
// shape of an M/M/1 queue (delay grows as 1/(1-u)), squared so that the last few percent of
// capacity are steep; uMax keeps it finite. Monotone non-decreasing in u for k >= 0 (tested).
//
// Utilisation is measured, not guessed: device busy time over wall time in fixed windows, divided
// by the number of requests the device runs at once, and smoothed (EWMA) so one slow request does
// not make the next thousand expensive.
//
// Credit: each domain has a balance. A charge (units x price at the time the request completed)
// is always taken, even into overdraft, so the sum of charges equals the sum of balance decreases
// (tested). Once a balance is below -overdraftLimit the domain is *overdrawn*: the scheduler serves
// it only within its reservation until a top-up brings it back above the line.

/// The congestion price curve.
public struct PriceFunction: Sendable, Equatable, Codable {
    public var base: Double
    public var exponent: Double
    public var utilisationCap: Double

    public init(base: Double = 1, exponent: Double = 2, utilisationCap: Double = 0.95) {
        precondition(base >= 0 && exponent >= 0 && utilisationCap >= 0 && utilisationCap < 1)
        self.base = base
        self.exponent = exponent
        self.utilisationCap = utilisationCap
    }

    /// Credits per I/O unit at `utilisation` (values outside 0...1 are clamped).
    public func price(utilisation: Double) -> Double {
        let u = min(max(utilisation.isNaN ? 0 : utilisation, 0), utilisationCap)
        // Every request is priced: the default exponent 2 without pow() (3% of a cache-hit read's CPU).
        if exponent == 2 { return base / ((1 - u) * (1 - u)) }
        return base / pow(1 - u, exponent)
    }
}

/// Device utilisation from busy time, in fixed windows with exponential smoothing.
public struct UtilisationMeter: Sendable, Equatable {
    /// Requests the device serves at once (the scheduler's dispatch slots): busy time is divided
    /// by it, so 4 slots each busy all the time is 100%.
    public private(set) var parallelism: Int
    public let window: Duration
    /// Weight of the newest window in the moving average.
    public let smoothing: Double
    public private(set) var utilisation: Double = 0
    private var windowStart: Duration
    private var busyInWindow: Duration = .zero

    public init(parallelism: Int, window: Duration = .milliseconds(100), smoothing: Double = 0.5,
                start: Duration = .zero) {
        precondition(parallelism > 0 && window > .zero && smoothing > 0 && smoothing <= 1)
        self.parallelism = parallelism
        self.window = window
        self.smoothing = smoothing
        self.windowStart = start
    }

    /// Divides busy time by `parallelism` from now on; the smoothed utilisation so far is kept.
    public mutating func setParallelism(_ parallelism: Int) {
        precondition(parallelism > 0)
        self.parallelism = parallelism
    }

    /// A device call took `busy`, ending at `now` (time since any fixed origin).
    public mutating func record(busy: Duration, now: Duration) {
        advance(to: now)
        busyInWindow += busy
    }

    /// Closes the windows that ended before `now`; empty windows pull utilisation towards 0.
    public mutating func advance(to now: Duration) {
        var closed = 0
        while now - windowStart >= window && closed < 64 {
            let fraction = min(1, (busyInWindow / window) / Double(parallelism))
            utilisation = smoothing * fraction + (1 - smoothing) * utilisation
            busyInWindow = .zero
            windowStart += window
            closed += 1
        }
        if now - windowStart >= window {
            // Idle for 64+ windows: the average has decayed to (1-smoothing)^64 of itself; stop looping.
            utilisation = 0
            windowStart = now
        }
    }
}

/// One domain's credit account.
public struct CreditAccount: Sendable, Equatable, Codable {
    public var balance: Double
    /// How far below zero the balance may go before the domain is restricted to its reservation;
    /// nil: no limit (charges are still taken and shown, but the domain is never restricted).
    public var overdraftLimit: Double?
    public var totalCharged: Double = 0
    public var totalToppedUp: Double = 0
    public var charges: UInt64 = 0

    public init(balance: Double = 0, overdraftLimit: Double? = nil) {
        self.balance = balance
        self.overdraftLimit = overdraftLimit
    }

    public var isOverdrawn: Bool {
        guard let overdraftLimit else { return false }
        return balance < -overdraftLimit
    }
}

/// The result of one charge, for the ledger and for the scheduler.
public struct Charge: Sendable, Equatable {
    public var domain: DomainID
    public var units: Double
    public var price: Double
    public var amount: Double
    public var balanceAfter: Double
    /// Whether this charge moved the domain across the overdraft line (either way).
    public var overdrawnChanged: Bool
    public var isOverdrawn: Bool
}

/// Credit balances of all domains, and the price curve they are charged by.
public struct CreditBook: Sendable, Equatable, Codable {
    public var priceFunction: PriceFunction
    /// Account opened for a domain charged before an operator configured it.
    public var defaultAccount: CreditAccount
    public private(set) var accounts: [DomainID: CreditAccount]
    public private(set) var totalCharged: Double = 0
    public static let accountsMax = 4096

    /// The default account has no overdraft limit: until an operator sets one for a domain, charges
    /// accumulate (visible, persisted) but nobody is restricted. A finite default would silently
    /// cut off every tenant of a server whose operator never configured credit.
    public init(priceFunction: PriceFunction = .init(), defaultAccount: CreditAccount = .init(balance: 0),
                accounts: [DomainID: CreditAccount] = [:]) {
        self.priceFunction = priceFunction
        self.defaultAccount = defaultAccount
        self.accounts = accounts
    }

    public func account(_ domain: DomainID) -> CreditAccount { accounts[domain] ?? defaultAccount }

    /// Charges `units` I/O units at the price for `utilisation`.
    public mutating func charge(_ domain: DomainID, units: Double, utilisation: Double) -> Charge {
        precondition(units >= 0 && units.isFinite)
        let key = accounts[domain] != nil || accounts.count < Self.accountsMax ? domain : Ledger.overflowDomain
        var account = account(key)
        let wasOverdrawn = account.isOverdrawn
        let price = priceFunction.price(utilisation: utilisation)
        let amount = units * price
        account.balance -= amount
        account.totalCharged += amount
        account.charges += 1
        accounts[key] = account
        totalCharged += amount
        return Charge(domain: key, units: units, price: price, amount: amount, balanceAfter: account.balance,
                      overdrawnChanged: wasOverdrawn != account.isOverdrawn, isOverdrawn: account.isOverdrawn)
    }

    /// Adds credit (an operator's top-up); returns whether the domain is still overdrawn.
    @discardableResult
    public mutating func topUp(_ domain: DomainID, amount: Double) -> Bool {
        precondition(amount >= 0 && amount.isFinite)
        var account = account(domain)
        account.balance += amount
        account.totalToppedUp += amount
        accounts[domain] = account
        return account.isOverdrawn
    }

    public mutating func setOverdraftLimit(_ domain: DomainID, limit: Double) {
        precondition(limit >= 0 && limit.isFinite)
        var account = account(domain)
        account.overdraftLimit = limit
        accounts[domain] = account
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
