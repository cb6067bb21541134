import VBDCore
import VBDStore

// MARK: - Notes on the design
//
// One seed = one deterministic run: store options, volume shapes, a random workload of writes
// (aligned, unaligned, duplicate, zero), trims, write-zeroes, flushes, snapshots, shares,
// deletes, resizes, checkpoints, gc, clean reopens, power cuts (immediate or scheduled to
// strike inside a later call, so every gap between two steps of a flush or checkpoint is hit)
// and kills of the process (scheduled the same way; the disk keeps its unsynced writes).
//
// The model knows, per image, the current bytes and, per block, the contents it may hold after
// a crash: what was durable at the last completed flush plus every content written since. After
// each power cut the store is reopened and checked:
//   1. every block reads one of its allowed contents: never a mix, never garbage; after a kill,
//      the content last written (every acknowledged write survives, flushed or not), or for the
//      blocks of the request the kill interrupted, that or what they held before it;
//   2. an image exists iff it was created durably (or its creation was in flight);
//   3. a snapshot or share that exists holds exactly its source's contents at that moment;
//   4. fsck is clean: reference counts, maps, dedup index, space map and every chunk's hash.
// Injected faults (EIO, ENOSPC, a failed fsync that drops dirty pages, a failed directory sync)
// strike some steps, drawn from a random stream of their own. After one, the run flushes: a
// store that accepts the flush must hold what it reports (checked as after a crash) and keep
// it through the power cut that follows; a store that refuses (poisoned) recovers from disk.
// Bit rot: after some steps one byte of the data file is flipped at rest (durably, as on the
// platter). Every block of every image is then read: each read returns the model's bytes or fails
// as corrupted, never other bytes; a read that fails must be matched by an unclean fsck. The byte
// is flipped back afterwards. Only with the real 64-bit hash: the weak test hash (6 bits) cannot
// tell a flipped chunk from its original one time in 64, by design.
// Writes, trims and write-zeroes carry FUA at random; a FUA request returns only once durable.
// Anything else fails the run with the seed and the operation number, and `vbd-sim --seed N`
// replays it exactly.

public struct SimulationFailure: Error, CustomStringConvertible {
    public let seed: UInt64
    public let step: Int
    public let message: String
    public var description: String { "seed \(seed) failed at step \(step): \(message)\n  replay: vbd-sim --seed \(seed)" }
}

enum SimulationFault: Error { case noStore }

public struct SimulationSummary: Sendable {
    public var seed: UInt64
    public var steps = 0
    public var crashes = 0
    /// Crashes that were kills of the process (the rest were power cuts).
    public var kills = 0
    public var cleanReopens = 0
    public var checkpoints = 0
    public var snapshots = 0
    public var shares = 0
    public var deletes = 0
    public var writes = 0
    public var faults = 0
    /// Bytes of the data file flipped at rest, and how many of those fsck (and reads) caught;
    /// the rest struck space no chunk uses.
    public var flips = 0
    public var flipsFoundByFsck = 0
    public var flipsFoundByReads = 0
}

public final class Simulation {
    final class ModelImage {
        var name: String
        var isSnapshot: Bool
        var blockSize: Int
        var bytes: [UInt8]
        /// Contents each block may hold after a crash: durable first, then later writes.
        var allowed: [Int: [[UInt8]]] = [:]
        /// What the blocks of the request in flight held before it, until it returns: after a kill
        /// that interrupted it each of them may hold either.
        var beforeRequest: [Int: [UInt8]] = [:]
        /// Its creation (or deletion) may or may not have reached the disk.
        var inDoubt = false
        var deletionInDoubt = false
        var origin: String?
        var oldSizeInDoubt: Int?

        init(name: String, isSnapshot: Bool, blockSize: Int, bytes: [UInt8]) {
            self.name = name
            self.isSnapshot = isSnapshot
            self.blockSize = blockSize
            self.bytes = bytes
        }

        var blockCount: Int { (bytes.count + blockSize - 1) / blockSize }

        func block(_ b: Int) -> [UInt8] {
            Array(bytes[(b * blockSize)..<min((b + 1) * blockSize, bytes.count)])
        }

        /// Before changing blocks: remember what they may hold after a crash.
        func willChange(blocks: Range<Int>, newBytes: [UInt8]) {
            for b in blocks {
                let lo = b * blockSize, hi = min((b + 1) * blockSize, bytes.count)
                if allowed[b] == nil { allowed[b] = [Array(bytes[lo..<hi])] }
                if beforeRequest[b] == nil { beforeRequest[b] = Array(bytes[lo..<hi]) }
                allowed[b]!.append(Array(newBytes[lo..<hi]))
            }
            bytes = newBytes
        }

        func becameDurable() {
            allowed = [:]
            inDoubt = false
            oldSizeInDoubt = nil
        }
    }

    public let seed: UInt64
    var rng: SimulationRandom
    /// Draws for injected faults: a stream of its own, so seeds without faults replay as before.
    var faultRng: SimulationRandom
    /// Percent of steps with a fault armed (0 = none).
    public var faultPercent = 3
    /// Draws for kills of the process, a stream of its own like `faultRng`.
    var killRng: SimulationRandom
    /// Percent of steps with a kill scheduled (when no power cut is).
    public var killPercent = 4
    /// Draws for bit rot, a stream of its own like `faultRng`.
    var corruptionRng: SimulationRandom
    /// Percent of steps after which a byte of the data file is flipped at rest and checked (0 = none).
    public var flipPercent = 3
    let disk: SimulatedDisk
    var options = Store.Options()
    var store: Store?
    var model: [String: ModelImage] = [:]
    var step = 0
    public private(set) var summary: SimulationSummary
    let patterns: [[UInt8]]
    let blockSize: Int

    /// Prints every operation (for replaying a failing seed).
    public var trace = false

    func log(_ s: @autoclosure () -> String) { if trace { print("[\(step)] " + s()) } }

    public init(seed: UInt64) {
        self.seed = seed
        rng = SimulationRandom(seed: seed)
        faultRng = SimulationRandom(seed: seed ^ 0xFA17)
        corruptionRng = SimulationRandom(seed: seed ^ 0xB17F)
        killRng = SimulationRandom(seed: seed ^ 0x4B11)
        // Every eighth seed models RADOS: unsynced writes die with the process, records wait for
        // flushes, and a kill is checked as a power cut.
        disk = SimulatedDisk(seed: seed, unsyncedWritesSurviveProcess: seed % 8 != 7)
        summary = SimulationSummary(seed: seed)
        blockSize = rng.chance(50) ? 512 : 4096
        options.now = { 1_700_000_000 }
        options.secretForNewStore = seed | 1
        options.hashFunction = rng.chance(35) ? .weak(bits: 6) : .xxh3
        options.pendingJournalBytesMax = 128 << rng.below(6)
        options.checkpointJournalBytes = UInt64(1024 << rng.below(7))
        // Writers start commits once this many pages changed (from the seed: see ConcurrentSimulation).
        options.commitDirtyPagesMax = 8 << Int(seed % 7)
        // Commits freeze a few pages per hold of the store lock, so that readers (and changes
        // that must wait) come between the steps.
        options.commitFreezeStepPages = 1 + Int(seed / 7 % 8)
        // Every freed page is punched at once: the punch and its races stay in every run.
        options.holePunchRunBytesMin = 4096
        options.unpunchedFreeBytesMax = 0
        options.spaceReserveBytes = 16 << 10
        var p: [[UInt8]] = []
        var g = SimulationRandom(seed: seed ^ 0xA5A5)
        for _ in 0..<12 {
            var b = [UInt8](repeating: 0, count: blockSize)
            let fill = UInt8(truncatingIfNeeded: g.next())
            for i in 0..<blockSize { b[i] = (i % 7 == 0) ? UInt8(truncatingIfNeeded: g.next()) : fill }
            p.append(b)
        }
        patterns = p
    }

    func fail(_ message: String) -> SimulationFailure {
        SimulationFailure(seed: seed, step: step, message: message)
    }

    // MARK: Running

    public func run(steps: Int) throws -> SimulationSummary {
        do {
            store = try Store(directory: disk.directory(), options: options, create: true)
        } catch {
            throw fail("init failed: \(error)")
        }
        try createVolume()
        for _ in 0..<steps {
            step += 1
            summary.steps += 1
            try oneStep()
            if step % 16 == 0 || trace { try checkExact(); try checkSpaceSummary() }
            if corruptionRng.below(100) < flipPercent { try flipByteAtRest() }
        }
        disk.crashCountdown = nil
        try checkExact()
        try checkFsck()
        do { try store?.close() } catch { throw fail("close failed: \(error)") }
        store = try reopen()
        try checkExact()
        try checkFsck()
        try? store?.close()
        return summary
    }

    func oneStep() throws {
        if rng.chance(4) && disk.crashCountdown == nil {
            disk.crashCountdown = rng.below(12)
            disk.scheduledCrash = .powerLoss
        }
        if killRng.below(100) < killPercent && disk.crashCountdown == nil {
            disk.crashCountdown = killRng.below(12)
            disk.scheduledCrash = .processKill
        }
        let roll = rng.below(100)
        log("roll \(roll) crashCountdown \(String(describing: disk.crashCountdown))")
        let faultsBefore = disk.faultsFired
        if faultRng.below(100) < faultPercent { disk.injectRandomFault(using: &faultRng) }
        defer { disk.removeInjectedFaults() }
        do {
            switch roll {
            case 0..<40: try randomWrite()
            case 40..<47: try randomZero(punch: true)
            case 47..<52: try randomZero(punch: false)
            case 52..<60: try randomFlush()
            case 60..<66: try randomSnapshot()
            case 66..<71: try randomShare()
            case 71..<76: try randomDelete()
            case 76..<79: try randomResize()
            case 79..<82: try createVolume()
            case 82..<85:
                summary.checkpoints += 1
                try store!.checkpoint()
                allDurable()
            case 85..<87:
                try store!.gc()
                allDurable()
            case 87..<90:
                try cleanReopen()
            case 90..<95:
                try randomRead()
            default:
                disk.powerLoss()
            }
        } catch let e as SimulationFailure {
            throw e
        } catch {
            if disk.faultsFired > faultsBefore && !disk.isCrashed {
                try afterInjectedFault(error)
            } else if !disk.isCrashed {
                throw fail("operation failed without a crash: \(error)")
            }
        }
        // A fault can strike work that does not fail the operation (the flush or checkpoint
        // after a durable control operation) and still poison the store.
        if disk.faultsFired > faultsBefore && !disk.isCrashed { try afterInjectedFault(nil) }
        if disk.isCrashed {
            disk.removeInjectedFaults()
            try recoverFromCrash()
        }
        // The request returned, failed or was recovered from: it is no longer in flight.
        for m in model.values { m.beforeRequest = [:] }
    }

    // MARK: Operations

    /// Dictionary order differs between processes; sort before drawing so a seed replays exactly.
    func sortedModel() -> [ModelImage] { model.values.sorted { $0.name < $1.name } }

    func volumes() -> [ModelImage] { model.values.filter { !$0.isSnapshot && !$0.deletionInDoubt }.sorted { $0.name < $1.name } }
    func snapshots() -> [ModelImage] { model.values.filter { $0.isSnapshot && !$0.deletionInDoubt }.sorted { $0.name < $1.name } }

    func createVolume() throws {
        guard model.count < 10 else { return }
        let name = "v\(step)"
        let blocks = 4 + rng.below(60)
        let size = blocks * blockSize - (rng.chance(25) ? rng.below(blockSize - 1) + 1 : 0)
        let m = ModelImage(name: name, isSnapshot: false, blockSize: blockSize, bytes: [UInt8](repeating: 0, count: size))
        m.inDoubt = true
        model[name] = m
        // Most volumes share one named group, so writes deduplicate across volumes (and the
        // reuse of a chunk freed by another volume is exercised); every fourth has its own.
        try store!.createVolume(name: name, size: UInt64(size), blockSize: blockSize, group: step % 4 == 0 ? nil : "pool")
        allDurable()
    }

    func content(length: Int, aligned: Bool) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: length)
        var at = 0
        while at < length {
            let n = min(blockSize, length - at)
            switch rng.below(10) {
            case 0..<5:
                let p = patterns[rng.below(patterns.count)]
                out.replaceSubrange(at..<at + n, with: p[0..<n])
            case 5: break   // zeroes
            default:
                for i in 0..<n { out[at + i] = UInt8(truncatingIfNeeded: rng.next()) }
            }
            at += n
        }
        return out
    }

    func randomWrite() throws {
        guard let v = volumes().randomElement(using: &rng) else { return }
        summary.writes += 1
        let aligned = rng.chance(70)
        var offset: Int, length: Int
        if aligned {
            let b = rng.below(v.blockCount)
            offset = b * blockSize
            length = min((1 + rng.below(4)) * blockSize, v.bytes.count - offset)
        } else {
            offset = rng.below(v.bytes.count)
            length = 1 + rng.below(min(2 * blockSize, v.bytes.count - offset))
        }
        let data = content(length: length, aligned: aligned)
        var newBytes = v.bytes
        newBytes.replaceSubrange(offset..<offset + length, with: data)
        v.willChange(blocks: (offset / blockSize)..<((offset + length - 1) / blockSize + 1), newBytes: newBytes)
        let dev = try store!.device(named: v.name)
        let fua = rng.chance(10)
        log("write \(v.name) [\(offset), +\(length)) fua \(fua)")
        try data.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try dev.write(offset: UInt64(offset), data: b, fua: fua) }
        if fua { allDurable() }
    }

    func randomZero(punch: Bool) throws {
        guard let v = volumes().randomElement(using: &rng) else { return }
        let offset = rng.chance(60) ? rng.below(v.blockCount) * blockSize : rng.below(v.bytes.count)
        let length = 1 + rng.below(min(6 * blockSize, v.bytes.count - offset))
        var newBytes = v.bytes
        for i in offset..<offset + length { newBytes[i] = 0 }
        v.willChange(blocks: (offset / blockSize)..<((offset + length - 1) / blockSize + 1), newBytes: newBytes)
        let dev = try store!.device(named: v.name)
        let fua = rng.chance(10)
        if punch {
            log("trim \(v.name) [\(offset), +\(length)) fua \(fua)")
            try dev.trim(offset: UInt64(offset), length: UInt64(length), fua: fua)
        } else {
            let mayTrim = rng.chance(50)
            log("write-zeroes \(v.name) [\(offset), +\(length)) may trim \(mayTrim) fua \(fua)")
            try dev.writeZeroes(offset: UInt64(offset), length: UInt64(length), mayTrim: mayTrim, fastOnly: false, fua: fua)
        }
        if fua { allDurable() }
    }

    func randomRead() throws {
        guard let v = sortedModel().filter({ !$0.deletionInDoubt && !$0.inDoubt }).randomElement(using: &rng) else { return }
        let offset = rng.below(v.bytes.count)
        let length = 1 + rng.below(min(3 * blockSize, v.bytes.count - offset))
        var got = [UInt8](repeating: 0, count: length)
        let dev = try store!.device(named: v.name)
        try got.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in try dev.read(offset: UInt64(offset), into: b) }
        if got != Array(v.bytes[offset..<offset + length]) {
            throw fail("read of \(v.name) [\(offset), +\(length)) returned wrong data")
        }
    }

    func randomFlush() throws {
        try store!.flush()
        allDurable()
    }

    func randomSnapshot() throws {
        guard model.count < 10, let v = volumes().randomElement(using: &rng) else { return }
        summary.snapshots += 1
        let name = "s\(step)"
        let m = ModelImage(name: v.name + "@" + name, isSnapshot: true, blockSize: blockSize, bytes: v.bytes)
        m.inDoubt = true
        model[m.name] = m
        try store!.snapshot(volume: v.name, name: name)
        allDurable()
    }

    func randomShare() throws {
        guard model.count < 10, let s = snapshots().randomElement(using: &rng), !s.inDoubt else { return }
        summary.shares += 1
        let name = "c\(step)"
        let m = ModelImage(name: name, isSnapshot: false, blockSize: blockSize, bytes: s.bytes)
        m.inDoubt = true
        m.origin = s.name
        model[name] = m
        try store!.share(snapshot: s.name, as: name)
        allDurable()
    }

    func randomDelete() throws {
        guard model.count > 1, let victim = sortedModel().filter({ !$0.inDoubt }).randomElement(using: &rng) else { return }
        summary.deletes += 1
        // Deleting a volume removes its snapshots (force); a snapshot's shares keep their data.
        var doomed = [victim]
        if !victim.isSnapshot { doomed += model.values.filter { $0.isSnapshot && $0.name.hasPrefix(victim.name + "@") } }
        for d in doomed { d.deletionInDoubt = true }
        try store!.delete(victim.name, force: true)
        for d in doomed { model[d.name] = nil }
        allDurable()
    }

    func randomResize() throws {
        guard let v = volumes().randomElement(using: &rng), !v.inDoubt else { return }
        let grow = rng.below(8 * blockSize) + 1
        v.oldSizeInDoubt = v.bytes.count
        // Growing exposes zeroes (the old partial last block keeps its bytes).
        let oldBlocks = v.blockCount
        v.bytes += [UInt8](repeating: 0, count: grow)
        _ = oldBlocks
        try store!.resize(volume: v.name, size: UInt64(v.bytes.count))
        allDurable()
    }

    func allDurable() {
        for m in model.values { m.becameDurable() }
    }

    func cleanReopen() throws {
        summary.cleanReopens += 1
        try store!.close()
        allDurable()
        store = nil
        // A scheduled power cut may strike inside this open; oneStep then recovers.
        store = try Store(directory: disk.directory(), options: options, create: false)
        log("reopened: files \(disk.fileNames.map { "\($0):\(disk.size(of: $0))" }), warnings \(store!.recoveryWarnings)")
        try checkExact()
        try checkFsck()
    }

    // MARK: Bit rot

    /// Flips one byte of the data file at rest, reads every block of every image and runs fsck,
    /// then flips it back. A read returns the model's bytes or fails as corrupted; a failed read
    /// implies an unclean fsck. An fsck that stays clean means the byte was in unused space.
    func flipByteAtRest() throws {
        guard options.hashFunction == .xxh3, let store, !disk.isCrashed, disk.crashCountdown == nil else { return }
        let size = disk.size(of: "data")
        guard size > 0 else { return }
        let offset = corruptionRng.below(size)
        summary.flips += 1
        disk.flipByte(file: "data", at: offset)
        log("flipped byte \(offset) of data (\(size) bytes)")
        var readFailures: [String] = []
        for m in sortedModel() {
            let device = try store.device(named: m.name)
            for b in 0..<m.blockCount {
                let lo = b * blockSize, hi = min(lo + blockSize, m.bytes.count)
                var got = [UInt8](repeating: 0, count: hi - lo)
                do {
                    try got.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) throws in
                        try device.read(offset: UInt64(lo), into: p)
                    }
                } catch {
                    guard case BlockDeviceError.corrupted(let volume, let at, let detail) = error else {
                        throw fail("read of \(m.name) block \(b) with byte \(offset) of data flipped failed other than as corrupted: \(error)")
                    }
                    readFailures.append("\(volume) at \(at): \(detail)")
                    continue
                }
                if got != m.block(b) {
                    throw fail("byte \(offset) of data flipped at rest: \(m.name) block \(b) read back wrong bytes, not an error")
                }
            }
        }
        let report = store.fsck()
        if !report.isClean { summary.flipsFoundByFsck += 1 }
        if !readFailures.isEmpty {
            summary.flipsFoundByReads += 1
            if report.isClean {
                throw fail("byte \(offset) of data flipped at rest: reads failed (\(readFailures.prefix(2))) but fsck is clean")
            }
        }
        log("flip: \(readFailures.count) reads failed, fsck \(report.isClean ? "clean" : "found \(report.problems.prefix(2))")")
        disk.flipByte(file: "data", at: offset)
        if disk.isCrashed { throw fail("the disk crashed while checking a flipped byte") }
    }

    // MARK: Crashes

    /// An operation failed with an injected fault. If the store still accepts a flush, what it
    /// then reports is durable: adopt it into the model (each block old or new, each image in
    /// doubt present or not), so the power cut that follows must keep it.
    func afterInjectedFault(_ error: (any Error)?) throws {
        summary.faults += 1
        log("injected fault: \(error.map { "\($0)" } ?? "the operation succeeded")")
        disk.removeInjectedFaults()
        do {
            // No store when the fault struck while one was opening.
            guard let store else { throw SimulationFault.noStore }
            try store.flush()
            try checkAfterCrash()
            log("store accepted a flush after the fault")
        } catch let e as SimulationFailure {
            throw e
        } catch {
            log("store refuses after the fault: \(error)")
        }
        disk.powerLoss()
    }

    func reopen() throws -> Store {
        do {
            return try Store(directory: disk.directory(), options: options, create: false)
        } catch {
            throw fail("reopen failed: \(error)")
        }
    }

    func recoverFromCrash() throws {
        summary.crashes += 1
        // After a kill on storage whose unsynced writes outlive the process, every acknowledged
        // write must be back; unless the power fails during recovery, checked as a power cut.
        var killed = disk.lastCrash == .processKill && disk.unsyncedWritesSurviveProcess
        if disk.lastCrash == .processKill { summary.kills += 1 }
        log(disk.lastCrash == .processKill ? "process killed; recovering" : "power lost; recovering")
        store?.abandonWithoutFlush()
        store = nil
        disk.reboot()
        // Sometimes the power fails again during recovery itself.
        if rng.chance(20) {
            killed = false
            disk.crashCountdown = rng.below(3)
            disk.scheduledCrash = .powerLoss
            if let s = try? Store(directory: disk.directory(), options: options, create: false) {
                s.abandonWithoutFlush()
            }
            if !disk.isCrashed { disk.powerLoss() }
            disk.reboot()
        }
        store = try reopen()
        try checkAfterCrash(killed: killed)
        try checkFsck()
    }

    func readAll(_ name: String, size: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: size)
        let dev = try store!.device(named: name)
        try out.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in try dev.read(offset: 0, into: b) }
        return out
    }

    /// `killed`: the process was killed, and every write it acknowledged must read back.
    func checkAfterCrash(killed: Bool = false) throws {
        let present = Dictionary(uniqueKeysWithValues: store!.list().map { ($0.name, $0) })
        for (name, m) in model {
            guard let info = present[name] else {
                if m.inDoubt || m.deletionInDoubt { model[name] = nil; continue }
                throw fail("\(name) vanished after a \(killed ? "kill" : "crash")")
            }
            if m.deletionInDoubt { m.deletionInDoubt = false }
            if let old = m.oldSizeInDoubt {
                guard info.size == UInt64(old) || info.size == UInt64(m.bytes.count) else {
                    throw fail("\(name) has size \(info.size), neither \(old) nor \(m.bytes.count)")
                }
                if info.size == UInt64(old) { m.bytes = Array(m.bytes[0..<old]) }
            }
            guard info.size == UInt64(m.bytes.count) else { throw fail("\(name) has size \(info.size), model \(m.bytes.count)") }
            let actual = try readAll(name, size: m.bytes.count)
            if m.inDoubt {
                // A snapshot or share that made it holds exactly its source at that moment.
                if actual != m.bytes { throw fail("\(name) exists after a crash with contents other than its source's") }
            } else {
                for b in 0..<m.blockCount {
                    let lo = b * blockSize, hi = min(lo + blockSize, actual.count)
                    let got = Array(actual[lo..<hi])
                    // A block recorded while it was the partial last block reads zero-padded after growth.
                    let possible = killed ? [m.block(b)] + (m.beforeRequest[b].map { [$0] } ?? []) : (m.allowed[b] ?? [m.block(b)])
                    let allowed = possible.map { $0.count < got.count ? $0 + [UInt8](repeating: 0, count: got.count - $0.count) : $0 }
                    if !allowed.contains(got) {
                        if trace {
                            print("actual:  \(got.prefix(24).map { String($0) })")
                            for a in allowed { print("allowed: \(a.prefix(24).map { String($0) })") }
                            print("differing bytes vs last allowed: \(zip(got, allowed.last!).enumerated().filter { $0.element.0 != $0.element.1 }.map { $0.offset }.prefix(40))")
                        }
                        throw fail(killed ? "\(name) block \(b) lost an acknowledged write in a kill of the process"
                                          : "\(name) block \(b) holds contents that were never written (\(allowed.count) allowed)")
                    }
                }
            }
            m.bytes = actual
            m.becameDurable()
        }
        for name in present.keys where model[name] == nil {
            throw fail("\(name) exists after a crash but was never created")
        }
    }

    func checkExact() throws {
        for (name, m) in model {
            let actual = try readAll(name, size: m.bytes.count)
            if actual != m.bytes {
                if trace {
                    let differing = zip(actual, m.bytes).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
                    print("\(name): \(differing.count) bytes differ, first \(differing.prefix(8)); sizes \(actual.count)/\(m.bytes.count)")
                }
                throw fail("\(name) differs from the model")
            }
        }
        let names = Set(store!.list().map { $0.name })
        if names != Set(model.keys) { throw fail("images \(names.sorted()) but model has \(model.keys.sorted())") }
    }

    /// The free-space summary and the allocator against a recount of the sector map (fsck checks
    /// them too; this runs between fscks, where crashes and commits happen).
    func checkSpaceSummary() throws {
        guard let store else { return }
        let problems: [String]
        do { problems = try store.spaceSummaryProblems() } catch { throw fail("the sector map cannot be read: \(error)") }
        if !problems.isEmpty { throw fail(problems.prefix(3).joined(separator: "; ")) }
    }

    func checkFsck() throws {
        let report = store!.fsck()
        if !report.isClean { throw fail("fsck: " + report.problems.prefix(5).joined(separator: "; ")) }
    }
}
