import Foundation
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

/// The store's behaviour on RADOS against a model, in both forms a RADOS store has: a seeded
/// random run of writes (unique, duplicate, compressible), trims, snapshots, shares, deletes,
/// grows, flushes, checkpoints and gc, with clean reopens and crash replays (flushed, then
/// abandoned with its lock force-taken) on a new client connection each, i.e. another host.
/// Every block of every image is compared with the model after each reopen and at the end, and
/// fsck must be clean. A small metadata cache makes the paged metadata go to RADOS and back.
/// For chunk objects the references the family holds must be exactly those its metadata
/// claims (no leak, none missing).
@Suite(.serialized) struct RadosStoreModelTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    func options() -> Store.Options {
        var options = Store.Options.onMicroCluster
        options.metadataCacheBytes = 64 << 10
        options.commitDirtyPagesMax = 16
        options.checkpointJournalBytes = 64 << 10
        return options
    }

    /// A live image of the model: its blocks' content ids, and for a snapshot the volume it
    /// belongs to (deleted with it).
    struct ModelImage {
        var blocks: [UInt64]
        var isSnapshot: Bool
        var volume: String?
    }

    @Test(arguments: RadosChunkForm.allCases)
    func seededRunMatchesTheModelAcrossReopensAndCrashReplays(_ form: RadosChunkForm) throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["VBD_RADOS_MODEL_SEED"] ?? "") ?? UInt64.random(in: 1...UInt64(UInt32.max))
        let steps = 400
        var rng = SplitMix64(seed: seed)
        func random(_ n: Int) -> Int { Int(rng.next() % UInt64(n)) }
        let family = RadosTestFamily(cluster, form: form, prefix: "model")
        let host = try cluster.connect()
        defer { host.close() }
        var store = try family.open(options(), create: true).store
        var model: [String: ModelImage] = [:]
        var nextID: UInt64 = 1000, names = 0
        var counts: [String: Int] = [:]
        func note(_ what: String) { counts[what, default: 0] += 1 }
        func fail(_ step: Int, _ message: String) -> String { "seed \(seed) (VBD_RADOS_MODEL_SEED=\(seed)) step \(step): \(message)" }

        func verifyAll(_ step: Int, _ when: String) throws {
            let listed = Set(store.list().map(\.name))
            #expect(listed == Set(model.keys), "\(fail(step, when)): images \(listed.sorted()) != model \(model.keys.sorted())")
            for (name, image) in model.sorted(by: { $0.key < $1.key }) {
                for (b, id) in image.blocks.enumerated() {
                    let got = try store.readBlock(name, b)
                    if got != modelBlock(id) {
                        Issue.record("\(fail(step, when)): \(name) block \(b) differs from content \(id)")
                        return
                    }
                }
            }
            let report = store.fsck()
            #expect(report.isClean, "\(fail(step, when)): fsck \(report)")
        }

        for n in 0..<2 {
            try store.createVolume(name: "v\(n)", size: 32 * 4096, group: "pool")
            model["v\(n)"] = ModelImage(blocks: [UInt64](repeating: 0, count: 32), isSnapshot: false, volume: nil)
        }
        for step in 0..<steps {
            let volumes = model.filter { !$0.value.isSnapshot }.keys.sorted()
            let snapshots = model.filter { $0.value.isSnapshot }.keys.sorted()
            let roll = random(100)
            switch roll {
            case 0..<45 where !volumes.isEmpty:
                let name = volumes[random(volumes.count)]
                let count = 1 + random(4)
                let at = random(model[name]!.blocks.count - count + 1)
                let ids: [UInt64] = (0..<count).map { _ in
                    if random(10) < 3 { return UInt64(1 + random(15)) }   // a shared content: dedup
                    nextID += 1
                    return nextID
                }
                try store.writeBlocks(name, at: at, ids)
                model[name]!.blocks.replaceSubrange(at..<at + count, with: ids)
                note("write")
            case 45..<52 where !volumes.isEmpty:
                let name = volumes[random(volumes.count)]
                let count = 1 + random(6)
                let at = random(model[name]!.blocks.count - count + 1)
                try store.trimBlocks(name, at: at, count: count)
                model[name]!.blocks.replaceSubrange(at..<at + count, with: [UInt64](repeating: 0, count: count))
                note("trim")
            case 52..<58 where !volumes.isEmpty && snapshots.count < 6:
                let volume = volumes[random(volumes.count)]
                names += 1
                try store.snapshot(volume: volume, name: "s\(names)")
                model["\(volume)@s\(names)"] = ModelImage(blocks: model[volume]!.blocks, isSnapshot: true, volume: volume)
                note("snapshot")
            case 58..<63 where !snapshots.isEmpty && volumes.count < 6:
                let snapshot = snapshots[random(snapshots.count)]
                names += 1
                _ = try store.share(snapshot: snapshot, as: "sh\(names)")
                model["sh\(names)"] = ModelImage(blocks: model[snapshot]!.blocks, isSnapshot: false, volume: nil)
                note("share")
            case 63..<68 where volumes.count > 1 || !snapshots.isEmpty:
                // Never the last volume: the run would have nothing left to write.
                let candidates = volumes.count > 1 ? volumes + snapshots : snapshots
                let name = candidates[random(candidates.count)]
                try store.delete(name, force: true)
                if !model[name]!.isSnapshot {
                    for (other, image) in model where image.volume == name { model[other] = nil }
                }
                model[name] = nil
                note("delete")
            case 68..<71 where !volumes.isEmpty:
                let name = volumes[random(volumes.count)]
                guard model[name]!.blocks.count < 64 else { continue }
                try store.resize(volume: name, size: UInt64(model[name]!.blocks.count + 8) * 4096)
                model[name]!.blocks += [UInt64](repeating: 0, count: 8)
                note("grow")
            case 71..<80:
                try store.flush()
                note("flush")
            case 80..<83:
                _ = try store.gc()
                note("gc")
            case 83..<86:
                try store.checkpoint()
                note("checkpoint")
            case 86..<89:
                // A clean handover to another host.
                try store.close()
                store = try family.open(options(), create: false).store
                try verifyAll(step, "after a clean reopen")
                note("reopen")
            case 89..<92:
                // A crash after a flush: the next owner fences this one and replays its journal.
                try store.flush()
                let (next, fenced) = try family.open(options(), create: false, ownership: .takeOver(waitingUpTo: 0, force: true))
                #expect(!fenced.isEmpty, "\(fail(step, "the crashed owner was not fenced"))")
                store.abandonWithoutFlush()
                store = next
                try verifyAll(step, "after a crash replay")
                note("crash replay")
            default:
                if let name = model.keys.sorted().randomElement(using: &rng) {
                    let b = random(model[name]!.blocks.count)
                    let got = try store.readBlock(name, b)
                    #expect(got == modelBlock(model[name]!.blocks[b]), "\(fail(step, "\(name) block \(b)"))")
                    note("read")
                }
            }
        }
        try store.flush()
        try verifyAll(steps, "at the end")
        if form == .chunkObjects {
            let held = try family.referencesHeld(host), claimed = try family.referencesClaimed(store)
            #expect(held == claimed, "seed \(seed): references held but not claimed \(held.subtracting(claimed).sorted().prefix(5)), claimed but not held \(claimed.subtracting(held).sorted().prefix(5))")
            #expect(!claimed.isEmpty)
            #expect(try family.dataStripes(host) == 0)
        } else {
            #expect(try family.dataStripes(host) > 0)
        }
        try store.close()
        print("RadosStoreModelTests \(form.rawValue): seed \(seed), \(steps) steps: \(counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))")
    }
}
