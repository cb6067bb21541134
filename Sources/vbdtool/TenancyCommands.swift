import ArgumentParser
import Foundation
import VBDAccounting
import VBDControl

/// Runs a tenancy request and returns its response (exits 1 with the error otherwise).
func performTenancy(_ request: TenancyRequest, store: StoreOptions, output: OutputOptions) throws -> TenancyResponse {
    guard case let .tenancy(response) = try perform(.tenancy(request), store: store, output: output) else {
        fail(ControlFailure(code: "internal", message: "unexpected reply"), json: output.json)
    }
    return response
}

func describe(_ lease: Lease) -> String {
    "\(lease.domain) holds a \(lease.mode.rawValue) lease on \(lease.volume) until \(humanTime(lease.expiresAt))"
}

func humanTime(_ t: WallTime) -> String { Human.date(UInt64(max(t.nanoseconds, 0) / 1_000_000_000)) }

/// Parses `--duration` (`90`, `90s`, `15m`, `2h`, `1d`) into seconds.
func parseDuration(_ text: String) throws -> Int64 {
    let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
    var digits = Substring(text), multiplier: Int64 = 1
    if let last = text.last, let m = units[last] { digits = text.dropLast(); multiplier = m }
    guard let n = Int64(digits), n > 0, n <= 366 * 86400 / multiplier else {
        throw ValidationError("--duration: expected a positive number of seconds, or with s/m/h/d (e.g. 15m, 2h), up to a year; got '\(text)'")
    }
    return n * multiplier
}

struct LeaseCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lease", abstract: "Grant, renew, revoke and list domains' leases on volumes.",
        discussion: """
            A domain (a tenant: the identity the server charges) holds a volume under a lease that expires. \
            With `serve --enforce-leases` a domain's NBD connections to a volume are refused without a lease, and \
            closed (after in-flight requests finish) when the lease expires or is revoked. Two domains never hold \
            a write lease on one volume at once. Every change is in the audit log.
            """,
        subcommands: [Grant.self, Renew.self, Revoke.self, List.self], defaultSubcommand: List.self)

    struct Grant: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Lease a volume to a domain.")
        @Argument(help: "VOLUME (or VOLUME@SNAPSHOT for a read lease).") var volume: String
        @Option(help: "The domain that gets the lease.") var domain: String
        @Option(help: "write or read.") var mode: String = "write"
        @Option(help: "How long: seconds, or 15m, 2h, 1d.") var duration: String = "1h"
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func validate() throws {
            guard LeaseMode(rawValue: mode) != nil else { throw ValidationError("--mode: write or read, got '\(mode)'") }
            _ = try parseDuration(duration)
        }
        func run() throws {
            let response = try performTenancy(.leaseGrant(volume: volume, domain: domain, mode: LeaseMode(rawValue: mode)!,
                                                          seconds: try parseDuration(duration)), store: store, output: output)
            guard case let .lease(lease) = response else { return }
            if output.json { JSON.print(lease) } else { print("granted: " + describe(lease)) }
        }
    }

    struct Renew: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Extend a domain's lease.")
        @Argument var volume: String
        @Option var domain: String
        @Option(help: "New length from now: seconds, or 15m, 2h, 1d.") var duration: String = "1h"
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func validate() throws { _ = try parseDuration(duration) }
        func run() throws {
            let response = try performTenancy(.leaseRenew(volume: volume, domain: domain, seconds: try parseDuration(duration)),
                                              store: store, output: output)
            guard case let .lease(lease) = response else { return }
            if output.json { JSON.print(lease) } else { print("renewed: " + describe(lease)) }
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "End a domain's lease now (its connections to the volume close).")
        @Argument var volume: String
        @Option var domain: String
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func run() throws {
            let response = try performTenancy(.leaseRevoke(volume: volume, domain: domain), store: store, output: output)
            guard case let .lease(lease) = response else { return }
            if output.json { JSON.print(lease) } else { print("revoked: \(lease.domain) no longer holds \(lease.volume)") }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Current leases (expired ones are expired first).")
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func run() throws {
            guard case let .leases(leases) = try performTenancy(.leaseList, store: store, output: output) else { return }
            if output.json { JSON.print(leases); return }
            var table = Table("VOLUME", "DOMAIN", "MODE", "GRANTED", "EXPIRES")
            for l in leases { table.add(l.volume, l.domain.name, l.mode.rawValue, humanTime(l.grantedAt), humanTime(l.expiresAt)) }
            print(leases.isEmpty ? "no leases" : table.render())
        }
    }
}

struct AuditCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit", abstract: "List or verify the tamper-evident audit log of control operations.",
        discussion: """
            Every control operation (create, snapshot, share, delete, resize, import, gc, lease grant/renew/revoke/expire, \
            policy and credit changes) is appended to DIR/audit.log, fsynced, each record carrying the SHA-256 of the one \
            before it, the actor and a timestamp. `audit verify` finds any altered, removed or reordered record and says which.
            """,
        subcommands: [List.self, Verify.self, Forensics.self], defaultSubcommand: List.self)

    struct Forensics: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Which domains held a volume between two times, and which byte ranges changed (snapshot diff).",
            discussion: "Times are seconds since 1970, fractions allowed (`date +%s.%N`). The changed ranges are the diff between the last snapshot at or before --from and the first at or after --to.")
        @Argument var volume: String
        @Option(help: "Start of the interval (seconds since 1970; default: the beginning).") var from: Double = 0
        @Option(help: "End of the interval (seconds since 1970; default: now).") var to: Double?
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func run() throws {
            let end = to ?? Date().timeIntervalSince1970
            guard case let .forensics(r) = try perform(.forensics(volume: volume, fromNanoseconds: Int64(from * 1e9),
                                                                 toNanoseconds: Int64(end * 1e9)),
                                                     store: store, output: output) else { return }
            if output.json { JSON.print(r); return }
            print("\(r.volume): snapshots \(r.fromSnapshot ?? "(none)") -> \(r.toSnapshot ?? "(none)")")
            var holders = Table("DOMAIN", "MODE", "FROM", "UNTIL", "HOW IT ENDED")
            for h in r.holders {
                holders.add(h.domain, h.mode, humanTime(WallTime(nanoseconds: h.fromNanoseconds)),
                            h.untilNanoseconds.map { humanTime(WallTime(nanoseconds: $0)) } ?? "held (expires \(humanTime(WallTime(nanoseconds: h.expiresNanoseconds))))",
                            h.end ?? "-")
            }
            print(r.holders.isEmpty ? "no domain held it in that interval" : holders.render())
            let bytes = r.changedRanges.reduce(UInt64(0)) { $0 + $1.length }
            print("changed: \(r.changedRanges.count) ranges, \(Human.size(bytes))")
            for range in r.changedRanges.prefix(20) { print("  [\(range.offset), +\(range.length))") }
            if r.changedRanges.count > 20 { print("  ... (\(r.changedRanges.count - 20) more; --json lists all)") }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print the audit log.")
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func run() throws {
            guard case let .audit(records) = try performTenancy(.auditList, store: store, output: output) else { return }
            if output.json { JSON.print(records); return }
            var table = Table("SEQ", "TIME", "ACTOR", "OPERATION", "TARGET", "DETAILS")
            for r in records {
                table.add("\(r.sequence)", humanTime(r.time), r.actor, r.operation, r.target,
                          r.details.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
            }
            print(records.isEmpty ? "the audit log is empty" : table.render())
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Check the hash chain; exit 2 if it was tampered with.")
        @Option(help: "Sequence number of an anchor: a head printed by an earlier `audit verify`, kept outside the store. The record with that number must still have --anchor-hash, whatever was appended since.")
        var anchorSequence: UInt64?
        @Option(help: "Hash of the anchor's record.") var anchorHash: String?
        func validate() throws {
            if (anchorSequence == nil) != (anchorHash == nil) { throw ValidationError("--anchor-sequence and --anchor-hash go together") }
        }
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func run() throws {
            let response = try performTenancy(.auditVerify(anchorSequence: anchorSequence, anchorHash: anchorHash), store: store, output: output)
            guard case let .verification(problems, count, head) = response else { return }
            if output.json {
                struct Report: Encodable { var intact: Bool; var records: Int; var problems: [String]; var headSequence: UInt64?; var headHash: String? }
                JSON.print(Report(intact: problems.isEmpty, records: count, problems: problems, headSequence: head?.sequence, headHash: head?.hash))
            } else if problems.isEmpty {
                print("audit log intact: \(count) records" + (head.map { ", head #\($0.sequence) \($0.hash)" } ?? ""))
            } else {
                print("audit log TAMPERED (\(problems.count) problems in \(count) records):")
                for p in problems { print("  - " + p) }
            }
            if !problems.isEmpty { throw ExitCode(2) }
        }
    }
}

struct DomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "domain", abstract: "Per-domain accounting, I/O policy, credit and export bindings.",
        discussion: """
            A domain (a tenant) is the identity the server charges, and only ever one the client proved: its TLS \
            client certificate verified against `serve --tls-ca` (mapped by `--certificate-domain`), or its uid/gid \
            on the unix socket (mapped by `serve --peer-domain`). A binding only narrows: a bound export can be \
            opened by its domain alone. See docs/ACCOUNTING.md and docs/SECURITY.md.
            """,
        subcommands: [Stats.self, Bind.self, Policy.self, Credit.self], defaultSubcommand: Stats.self)

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "What each domain used and was charged.")
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func run() throws {
            guard case let .stats(s) = try performTenancy(.stats, store: store, output: output) else { return }
            if output.json { JSON.print(s); return }
            print("device utilisation \(String(format: "%.0f%%", s.utilisation * 100)), price \(String(format: "%.4f", s.price)) credits per I/O unit, charged in all \(String(format: "%.2f", s.totalCharged))")
            // CACHE HITS: blocks served from the main cache / from the last-chance tier. STORED: the
            // domain's share of the bytes on disk (shared blocks split among holders; EXCLUSIVE: held by it alone).
            var table = Table("DOMAIN", "OPS", "READ", "WRITTEN", "CACHE HITS", "STORED", "EXCLUSIVE", "DEVICE TIME",
                              "CHARGED", "BALANCE", "RES/LIMIT/WEIGHT")
            for d in s.domains {
                let ops = d.usage.operations.values.reduce(0, +)
                let limit = d.policy.limit.map { String(format: "%.0f", $0) } ?? "-"
                table.add(d.domain, "\(ops)", Human.size(d.usage.bytesRead), Human.size(d.usage.bytesWritten),
                          "\(d.usage.cacheHits)/\(d.usage.lastChanceHits)",
                          d.storage.map { Human.size(UInt64($0.fairStoredBytes.rounded())) } ?? "-",
                          d.storage.map { Human.size($0.exclusiveStoredBytes) } ?? "-", "\(d.usage.deviceTime)",
                          String(format: "%.2f", d.account.totalCharged), String(format: "%.2f", d.account.balance),
                          String(format: "%.0f/%@/%.0f", d.policy.reservation, limit, d.policy.weight))
            }
            print(s.domains.isEmpty ? "no domain has used the server yet" : table.render())
        }
    }

    struct Bind: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Let only DOMAIN open an export (and a volume's snapshots); its storage is charged to DOMAIN.",
            discussion: "The binding follows the image, not the name: `vbdtool rm` drops it, and a new image of the same name is unbound.")
        @Argument var export: String
        @Argument var domain: String
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func run() throws {
            _ = try performTenancy(.bind(export: export, domain: domain), store: store, output: output)
            if output.json { JSON.print(["bound": export, "domain": domain]) } else { print("\(export) may be opened only by \(domain)") }
        }
    }

    struct Policy: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set a domain's I/O reservation, limit and weight (mClock).")
        @Argument var domain: String
        @Option(help: "Guaranteed I/O units per second.") var reservation: Double = 0
        @Option(help: "Cap in I/O units per second (none if omitted).") var limit: Double?
        @Option(help: "Share of the remaining capacity.") var weight: Double = 1
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func validate() throws {
            guard reservation >= 0, weight > 0, limit.map({ $0 > 0 && $0 >= reservation }) ?? true else {
                throw ValidationError("need reservation >= 0, weight > 0, and limit >= reservation")
            }
        }
        func run() throws {
            let policy = SchedulingPolicy(reservation: reservation, limit: limit, weight: weight)
            _ = try performTenancy(.setPolicy(domain: domain, policy: policy), store: store, output: output)
            if output.json { JSON.print(policy) } else { print("\(domain): reservation \(reservation), limit \(limit.map { "\($0)" } ?? "none"), weight \(weight)") }
        }
    }

    struct Credit: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Top up a domain's credit or set its overdraft limit.")
        @Argument var domain: String
        @Option(help: "Credits to add.") var topUp: Double?
        @Option(help: "How far below zero the balance may go before only the reservation is served.") var overdraft: Double?
        @OptionGroup var store: StoreOptions
        @OptionGroup var output: OutputOptions
        func validate() throws {
            if topUp == nil && overdraft == nil { throw ValidationError("give --top-up and/or --overdraft") }
            if let topUp, topUp <= 0 { throw ValidationError("--top-up must be positive") }
            if let overdraft, overdraft < 0 { throw ValidationError("--overdraft must be >= 0") }
        }
        func run() throws {
            if let topUp { _ = try performTenancy(.topUp(domain: domain, amount: topUp), store: store, output: output) }
            if let overdraft { _ = try performTenancy(.setOverdraft(domain: domain, limit: overdraft), store: store, output: output) }
            if output.json { JSON.print(["domain": domain]) } else { print("\(domain): credit updated") }
        }
    }
}
