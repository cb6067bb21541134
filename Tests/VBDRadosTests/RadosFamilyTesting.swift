import Foundation
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

/// The two forms a store on RADOS has: its chunks in the family's striped data file (a store of
/// no sharing domain), or as shared objects of a sharing domain (`RadosChunkStorage`).
enum RadosChunkForm: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case dataFile = "data file"
    case chunkObjects = "chunk objects"
    var testDescription: String { rawValue }
}

/// One family (a store in a namespace of its own) of the micro cluster, in one of the two forms.
struct RadosTestFamily {
    let cluster: MicroCluster
    let form: RadosChunkForm
    let location: RadosStoreLocation
    /// The sharing domain, of this family alone (so that its objects are its own to count).
    let domain: String

    init(_ cluster: MicroCluster, form: RadosChunkForm, prefix: String) {
        self.cluster = cluster
        self.form = form
        let suffix = UUID().uuidString.prefix(8).lowercased()
        location = RadosStoreLocation(configurationFile: cluster.configurationFile, pool: "vbd", namespace: "\(prefix)-\(suffix)")
        domain = "d\(suffix)"
    }

    func open(_ options: Store.Options, create: Bool, ownership: RadosOwnership = .acquire) throws -> (store: Store, fenced: [String]) {
        try RadosStore.open(location, options: options, create: create,
                            sharingDomain: create && form == .chunkObjects ? domain : nil, ownership: ownership)
    }

    /// Every reference tag of this family on the domain's chunk objects, as "object tag".
    func referencesHeld(_ connection: RadosConnection) throws -> Set<String> {
        let pool = try connection.openPool(location.pool, namespace: RadosChunkStorage.chunkNamespace)
        defer { pool.close() }
        var held: Set<String> = []
        for name in try pool.objectNames() {
            guard let object = ChunkObjectName(objectName: name), object.group.hasPrefix(domain + "-") else { continue }
            let objects = try RadosChunkObjects(pool: pool, group: object.group, hashSeed: 0)
            for tag in try objects.referenceTags(object) where tag.hasPrefix(location.namespace + ":") {
                held.insert("\(name) \(tag)")
            }
        }
        return held
    }

    /// The references the family's committed metadata claims: one per installed chunk, on the
    /// object its record names (the sweep's claim rule, docs/RADOS.md step 6).
    func referencesClaimed(_ store: Store) throws -> Set<String> {
        Set(try store.installedChunkPlaces().map { place in
            let object = ChunkObjectName(group: "\(domain)-\(place.group.rawValue)", hash: place.hash,
                                         collisionIndex: RadosChunkStorage.collisionIndex(of: place.place))
            let reference = try ChunkReference(family: location.namespace, chunk: place.number,
                                               generation: RadosChunkStorage.serial(of: place.place))
            return "\(object.objectName) \(reference.tag)"
        })
    }

    /// Objects of the family's data file (stripes) in its namespace.
    func dataStripes(_ connection: RadosConnection) throws -> Int {
        let pool = try connection.openPool(location.pool, namespace: location.namespace)
        defer { pool.close() }
        return try pool.objectNames().filter { $0.hasPrefix("stripe.data.") }.count
    }
}

/// A 4 KiB block for content `id`: 0 is zeros; ids below 16 are the few shared contents that
/// duplicate writes use; odd ids compress (a 64-byte pattern repeated), even ones do not.
func modelBlock(_ id: UInt64) -> [UInt8] {
    if id == 0 { return [UInt8](repeating: 0, count: 4096) }
    if id % 2 == 1 {
        let unit = pattern(seed: id, count: 64)
        return (0..<64).flatMap { _ in unit }
    }
    return pattern(seed: id)
}

extension Store.Options {
    /// The options of a store on the micro cluster: a space reserve of 256 KiB instead of the
    /// default, written as RADOS objects at every open.
    static var onMicroCluster: Store.Options {
        var options = Store.Options()
        options.spaceReserveBytes = 256 << 10
        return options
    }
}

extension Store {
    func readBlock(_ image: String, _ block: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: 4096)
        let device = try device(named: image)
        try out.withUnsafeMutableBytes { try device.read(offset: UInt64(block) * 4096, into: $0) }
        return out
    }

    func writeBlocks(_ image: String, at block: Int, _ ids: [UInt64]) throws {
        let bytes = ids.flatMap { modelBlock($0) }
        let device = try device(named: image)
        try bytes.withUnsafeBytes { try device.write(offset: UInt64(block) * 4096, data: $0, fua: false) }
    }

    func trimBlocks(_ image: String, at block: Int, count: Int) throws {
        try device(named: image).trim(offset: UInt64(block) * 4096, length: UInt64(count) * 4096, fua: false)
    }
}
