import Testing
import VBDCore
@testable import VBDAccounting

@Suite struct PricingTests {
    @Test func priceIsMonotoneInUtilisationAndCheapWhenIdle() {
        for function in [PriceFunction(), PriceFunction(base: 0.5, exponent: 1), PriceFunction(base: 2, exponent: 3, utilisationCap: 0.9)] {
            var previous = function.price(utilisation: -1)
            #expect(previous == function.base)
            for step in 0...1000 {
                let price = function.price(utilisation: Double(step) / 1000)
                #expect(price >= previous, "not monotone at \(step)")
                #expect(price.isFinite)
                previous = price
            }
            #expect(function.price(utilisation: 2) == previous)
        }
        let standard = PriceFunction()
        #expect(standard.price(utilisation: 0) == 1)
        #expect(abs(standard.price(utilisation: 0.5) - 4) < 1e-9)
        #expect(abs(standard.price(utilisation: 0.9) - 100) < 1e-6)
        #expect(abs(standard.price(utilisation: 1) - 400) < 1e-6)
    }

    @Test func totalChargedEqualsSumOfCharges() {
        var book = CreditBook(defaultAccount: .init(balance: 1000, overdraftLimit: 500))
        var generator = SplitMix64(seed: 7)
        var sum = 0.0
        var perDomain: [DomainID: Double] = [:]
        for _ in 0..<5000 {
            let domain = DomainID("d\(generator.next() % 5)")
            let units = Double(generator.next() % 40) / 3
            let utilisation = Double(generator.next() % 1000) / 1000
            let charge = book.charge(domain, units: units, utilisation: utilisation)
            #expect(charge.amount == units * book.priceFunction.price(utilisation: utilisation))
            sum += charge.amount
            perDomain[domain, default: 0] += charge.amount
        }
        #expect(abs(book.totalCharged - sum) <= 1e-9 * sum)
        for (domain, charged) in perDomain {
            #expect(abs(book.account(domain).totalCharged - charged) <= 1e-9 * charged)
            #expect(abs(book.account(domain).balance - (1000 - charged)) <= 1e-9 * charged)
        }
    }

    @Test func overdraftBoundary() {
        var book = CreditBook(priceFunction: PriceFunction(base: 1), defaultAccount: .init(balance: 10, overdraftLimit: 5))
        var charge = book.charge("t", units: 10, utilisation: 0)  // balance 0
        #expect(!charge.isOverdrawn && !charge.overdrawnChanged)
        charge = book.charge("t", units: 5, utilisation: 0)  // balance -5: at the limit, not beyond it
        #expect(charge.balanceAfter == -5 && !charge.isOverdrawn)
        charge = book.charge("t", units: 0.5, utilisation: 0)  // -5.5: overdrawn
        #expect(charge.isOverdrawn && charge.overdrawnChanged)
        charge = book.charge("t", units: 1, utilisation: 0)  // charged even while overdrawn
        #expect(charge.balanceAfter == -6.5 && charge.isOverdrawn && !charge.overdrawnChanged)
        #expect(book.topUp("t", amount: 1) == true)   // -5.5: still overdrawn
        #expect(book.topUp("t", amount: 0.5) == false) // -5: back within the limit
    }

    @Test func utilisationFollowsBusyTime() {
        var meter = UtilisationMeter(parallelism: 2, window: .milliseconds(100), smoothing: 1)
        meter.record(busy: .milliseconds(100), now: .milliseconds(50))
        meter.advance(to: .milliseconds(100))
        #expect(abs(meter.utilisation - 0.5) < 1e-9)   // 100 ms busy of 2 x 100 ms
        meter.record(busy: .milliseconds(400), now: .milliseconds(150))
        meter.advance(to: .milliseconds(200))
        #expect(meter.utilisation == 1)                 // clamped
        meter.advance(to: .seconds(100))
        #expect(meter.utilisation == 0)                 // idle for long
    }

    @Test func balancesAndChargesArePersistedAndReloaded() throws {
        let storage = MemoryStateStorage()
        let configuration = TenancyService.Configuration(credits: CreditBook(defaultAccount: .init(balance: 100, overdraftLimit: 10)))
        let first = try TenancyService(configuration: configuration, stateStorage: storage)
        let charge = first.requestCompleted(domain: "tenant", kind: .write, bytes: 1 << 20, deviceTime: .milliseconds(3), failed: false)
        #expect(charge.units == 17)
        try first.topUp("tenant", amount: 50, actor: "op")
        try first.persist()
        let second = try TenancyService(configuration: configuration, stateStorage: storage)
        let snapshot = second.snapshot()
        #expect(snapshot.credits.account("tenant") == first.snapshot().credits.account("tenant"))
        #expect(snapshot.credits.account("tenant").balance == 100 - charge.amount + 50)
        #expect(snapshot.ledger.usage(of: "tenant").bytesWritten == 1 << 20)
        #expect(snapshot.ledger.usage(of: "tenant").creditsCharged == charge.amount)
    }
}
