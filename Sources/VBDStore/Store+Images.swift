import VBDCore
import VBDCache

/// A volume or snapshot as the operator sees it.
public struct ImageInfo: Equatable, Sendable {
    public var id: UInt64
    /// `VOLUME` or `VOLUME@SNAPSHOT`: the NBD export name.
    public var name: String
    public var kind: ImageRecord.Kind
    public var size: UInt64
    public var blockSize: Int
    public var createdAt: UInt64
    /// For a share: the snapshot it started from, if that still exists.
    public var origin: String?
    public var group: String
    public var isReadOnly: Bool { kind == .snapshot }
}

extension Store {
    // MARK: Names

    static func validate(name: String, what: String) throws {
        guard !name.isEmpty else { throw StoreError.invalidName(name, reason: "\(what) name is empty") }
        guard name.utf8.count <= Limits.nameBytesMax else {
            throw StoreError.invalidName(name, reason: "longer than \(Limits.nameBytesMax) bytes")
        }
        guard name.first != "-" && name.first != "." else {
            throw StoreError.invalidName(name, reason: "must not start with '-' or '.'")
        }
        for c in name.unicodeScalars {
            let ok = (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9") || c == "-" || c == "_" || c == "." || c == ":"
            guard ok else { throw StoreError.invalidName(name, reason: "use letters, digits, '-', '_', '.', ':' (a snapshot is VOLUME@NAME)") }
        }
    }

    /// With `mutex` held.
    func volumeLocked(named name: String) -> Image? {
        mutex.assertOwned("volumeLocked")
        return images.values.first { $0.record.kind == .volume && $0.record.name == name }
    }

    /// With `mutex` held. Accepts `VOLUME` or `VOLUME@SNAPSHOT`.
    func imageLocked(named fullName: String) -> Image? {
        mutex.assertOwned("imageLocked")
        guard let at = fullName.firstIndex(of: "@") else { return volumeLocked(named: fullName) }
        let volumeName = String(fullName[..<at]), snapName = String(fullName[fullName.index(after: at)...])
        guard let volume = volumeLocked(named: volumeName) else { return nil }
        return images.values.first { $0.record.kind == .snapshot && $0.record.volumeID == volume.record.id && $0.record.name == snapName }
    }

    func fullNameLocked(_ r: ImageRecord) -> String {
        mutex.assertOwned("fullNameLocked")
        if r.kind == .snapshot, let v = images[r.volumeID] { return v.record.name + "@" + r.name }
        return r.name
    }

    func infoLocked(_ image: Image) -> ImageInfo {
        mutex.assertOwned("infoLocked")
        let r = image.record
        let origin = r.originID == 0 ? nil : images[r.originID].map { fullNameLocked($0.record) }
        let group = groups.first { $0.value == r.group }?.key ?? "group-\(r.group.rawValue)"
        return ImageInfo(id: r.id, name: fullNameLocked(r), kind: r.kind, size: r.size, blockSize: r.blockSize,
                         createdAt: r.createdAt, origin: origin, group: group)
    }

    func checkOpen() throws {
        if closed { throw StoreError.io("store is closed") }
        if let poisoned { throw StoreError.io("store is read-only: \(poisoned)") }
    }

    // MARK: Operations

    /// Creates an empty volume. Sizes need not be multiples of the block size.
    ///
    /// `group` nil (the default) gives the volume a sharing group of its own, which its snapshots
    /// and shares inherit: it deduplicates with nothing another tenant writes. Naming a group is
    /// the operator's decision to deduplicate (and cache) across the volumes created in it.
    @discardableResult
    public func createVolume(name: String, size: UInt64, blockSize: Int = Limits.blockBytesDefault,
                             group: String? = nil) throws -> ImageInfo {
        try Store.validate(name: name, what: "volume")
        if let group {
            try Store.validate(name: group, what: "group")
        }
        guard blockSize.nonzeroBitCount == 1, blockSize >= Limits.blockBytesMin, blockSize <= Limits.blockBytesMax else {
            throw StoreError.invalidArgument("block size must be a power of two from \(Limits.blockBytesMin) to \(Limits.blockBytesMax) bytes")
        }
        guard size > 0, size <= Limits.volumeBytesMax else {
            throw StoreError.invalidArgument("volume size must be between 1 byte and \(Limits.volumeBytesMax) bytes")
        }
        return try commitDurably { () throws -> (records: [JournalRecord], result: () -> ImageInfo) in
            guard volumeLocked(named: name) == nil else { throw StoreError.alreadyExists(name) }
            var records: [JournalRecord] = []
            let groupName = group ?? Store.privateGroupPrefix + String(nextImageID)
            if group != nil && groupName.hasPrefix(Store.privateGroupPrefix) && groups[groupName] == nil {
                throw StoreError.invalidName(groupName, reason: "'\(Store.privateGroupPrefix)' names a volume's own group; choose another group name")
            }
            var sharingGroup = groups[groupName]
            if sharingGroup == nil {
                let next = try newSharingGroupLocked()
                records.append(.renameGroup(group: next, name: groupName))
                sharingGroup = next
            }
            let r = ImageRecord(id: nextImageID, kind: .volume, name: name, volumeID: 0, originID: 0, size: size,
                                blockShift: UInt8(blockSize.trailingZeroBitCount), group: sharingGroup!, createdAt: options.now())
            records.append(.createImage(r))
            return (records, { self.infoLocked(self.images[r.id]!) })
        }
    }

    /// The name a volume's own sharing group gets (followed by the volume's id, which is never
    /// reused). An operator cannot create a group of this form, only join an existing one.
    public static let privateGroupPrefix = "volume-group-"

    /// With `mutex` held: a number for a new sharing group. The next unused one while there are;
    /// after 65,534 groups, one whose images are all gone and that holds no chunk (its old name is
    /// dropped when the number is given its new one, see `apply(.renameGroup)`).
    func newSharingGroupLocked() throws -> SharingGroupID {
        mutex.assertOwned("newSharingGroupLocked")
        let next = Int(groups.values.max()?.rawValue ?? 0) + 1
        if next < Int(UInt16.max) { return SharingGroupID(UInt16(next)) }
        var inUse = Set(images.values.map { $0.record.group })
        inUse.insert(0)   // "default"
        try chunks.records.forEachLeaf(pager: pager) { _, leaf in
            for r in leaf.elements where r.entry.isInstalled { inUse.insert(r.entry.group) }
        }
        guard let free = (1..<UInt16.max).lazy.map({ SharingGroupID($0) }).first(where: { !inUse.contains($0) }) else {
            throw StoreError.invalidArgument("every one of the \(UInt16.max - 1) sharing groups holds images or blocks")
        }
        return free
    }

    /// A read-only point-in-time image of `volume`, named `volume@name`. O(1): the snapshot's
    /// root is the volume's root with one more reference. Holds exactly the writes completed
    /// before the call (crash-consistent), and is durable when this returns.
    @discardableResult
    public func snapshot(volume: String, name: String) throws -> ImageInfo {
        try Store.validate(name: name, what: "snapshot")
        return try commitDurably { () throws -> (records: [JournalRecord], result: () -> ImageInfo) in
            guard let v = volumeLocked(named: volume) else { throw StoreError.notFound(volume) }
            guard imageLocked(named: volume + "@" + name) == nil else { throw StoreError.alreadyExists(volume + "@" + name) }
            var r = v.record
            r.id = nextImageID
            r.kind = .snapshot
            r.name = name
            r.volumeID = v.record.id
            r.createdAt = options.now()
            return ([.cloneImage(source: v.record.id, r)], { self.infoLocked(self.images[r.id]!) })
        }
    }

    /// A new writable volume that starts as `snapshot`'s contents (`VOLUME@SNAP`). O(1).
    @discardableResult
    public func share(snapshot: String, as newName: String) throws -> ImageInfo {
        try Store.validate(name: newName, what: "volume")
        return try commitDurably { () throws -> (records: [JournalRecord], result: () -> ImageInfo) in
            guard let s = imageLocked(named: snapshot) else { throw StoreError.notFound(snapshot) }
            guard s.record.kind == .snapshot else {
                throw StoreError.invalidArgument("'\(snapshot)' is a volume; share a snapshot of it (VOLUME@SNAPSHOT)")
            }
            guard volumeLocked(named: newName) == nil else { throw StoreError.alreadyExists(newName) }
            var r = s.record
            r.id = nextImageID
            r.kind = .volume
            r.name = newName
            r.volumeID = 0
            r.originID = s.record.id
            r.createdAt = options.now()
            return ([.cloneImage(source: s.record.id, r)], { self.infoLocked(self.images[r.id]!) })
        }
    }

    /// Deletes a volume or a snapshot. Blocks no other image holds are reclaimed (given back to
    /// the file system once the delete is durable, which it is when this returns).
    /// Refuses, naming them, when snapshots or shares depend on it, unless `force`.
    public func delete(_ name: String, force: Bool = false) throws {
        try commitDurably { () throws -> (records: [JournalRecord], result: () -> Void) in
            guard let image = imageLocked(named: name) else { throw StoreError.notFound(name) }
            var victims: [Image] = [image]
            if image.record.kind == .snapshot {
                let shares = images.values.filter { $0.record.originID == image.record.id }
                if !shares.isEmpty && !force {
                    throw StoreError.hasDependents(
                        name: name, dependents: shares.map { $0.record.name }.sorted(),
                        hint: "delete those shares first, or delete with --force: the shares keep all their data and only lose the link to their origin")
                }
            } else {
                let snaps = images.values.filter { $0.record.kind == .snapshot && $0.record.volumeID == image.record.id }
                if !snaps.isEmpty && !force {
                    throw StoreError.hasDependents(
                        name: name, dependents: snaps.map { fullNameLocked($0.record) }.sorted(),
                        hint: "delete those snapshots first, or delete with --force to remove the volume and its snapshots (shares made from them keep their data)")
                }
                victims.append(contentsOf: snaps)
            }
            let records = victims.sorted(by: { $0.record.id > $1.record.id }).map { JournalRecord.deleteImage($0.record.id) }
            return (records, {})
        }
    }

    /// Grows a volume. Shrinking would silently drop data and is refused.
    public func resize(volume: String, size: UInt64) throws {
        try commitDurably { () throws -> (records: [JournalRecord], result: () -> Void) in
            guard let v = volumeLocked(named: volume) else {
                if imageLocked(named: volume) != nil { throw StoreError.readOnly(volume) }
                throw StoreError.notFound(volume)
            }
            guard size <= Limits.volumeBytesMax else { throw StoreError.invalidArgument("size exceeds \(Limits.volumeBytesMax) bytes") }
            guard size >= v.record.size else {
                throw StoreError.notSupported("shrinking '\(volume)' from \(v.record.size) to \(size) bytes would discard data; only growing is supported")
            }
            if size == v.record.size { return ([], {}) }
            return ([.resize(image: v.record.id, size: size)], {})
        }
    }

    // MARK: Lineage

    /// With `mutex` held: the other images of `image`'s lineage (the images connected to it by
    /// snapshot and share links), or nil when its sharing group holds nothing but that lineage.
    ///
    /// A chunk's reference count says how many maps hold it, not whose they are: in a group that
    /// holds only one lineage (every group `create` makes by default) all holders are the lineage,
    /// but in a group an operator shares between volumes a count above one may be another tenant's
    /// copy of the same bytes. There, only holders this returns may be reported.
    func lineagePeersLocked(of image: Image) -> [Image]? {
        mutex.assertOwned("lineagePeersLocked")
        let group = image.record.group
        let members = images.values.filter { $0.record.group == group }
        if members.count == 1 { return nil }
        // Union-find over the links; a link to an image that is gone joins nothing (a forced
        // delete of a snapshot cuts its shares off, which only hides sharing, never reveals it).
        var parent: [UInt64: UInt64] = [:]
        for m in members { parent[m.record.id] = m.record.id }
        func find(_ x: UInt64) -> UInt64 {
            var x = x
            while let p = parent[x], p != x { parent[x] = parent[p]; x = parent[x]! }
            return x
        }
        for m in members {
            for link in [m.record.volumeID, m.record.originID] where link != 0 && parent[link] != nil {
                let a = find(m.record.id), b = find(link)
                if a != b { parent[a] = b }
            }
        }
        let root = find(image.record.id)
        let lineage = members.filter { find($0.record.id) == root }
        if lineage.count == members.count { return nil }
        return lineage.filter { $0 !== image }
    }

    /// The sharing group of this name (as `ImageInfo.group` shows it), if it exists.
    public func sharingGroup(named name: String) -> SharingGroupID? {
        mutex.withLock { groups[name] }
    }

    public func list() -> [ImageInfo] {
        mutex.withLock {
            images.values.filter { !($0.record.kind == .volume && Store.isIncomplete(name: $0.record.name)) }
                .map { infoLocked($0) }.sorted { $0.name < $1.name }
        }
    }

    public func info(_ name: String) throws -> ImageInfo {
        try mutex.withLock { () throws -> ImageInfo in
            guard let image = imageLocked(named: name) else { throw StoreError.notFound(name) }
            return infoLocked(image)
        }
    }

    /// Byte ranges whose contents differ between two images (normally two snapshots of one
    /// volume), computed from the maps: shared subtrees are skipped without reading any block.
    public func diff(from a: String, to b: String) throws -> [Range<UInt64>] {
        try mutex.withLock { () throws -> [Range<UInt64>] in
            guard let x = imageLocked(named: a) else { throw StoreError.notFound(a) }
            guard let y = imageLocked(named: b) else { throw StoreError.notFound(b) }
            guard x.record.blockShift == y.record.blockShift else {
                throw StoreError.invalidArgument("'\(a)' and '\(b)' have different block sizes")
            }
            let shift = UInt64(x.record.blockShift)
            let blocks = max(x.record.blockCount, y.record.blockCount)
            let maxSize = max(x.record.size, y.record.size)
            return try MapRoot.diff(x.root, y.root, blocks: blocks, pager: pager).map {
                ($0.lowerBound << shift)..<min($0.upperBound << shift, maxSize)
            }
        }
    }
}

// MARK: - Incomplete volumes (all-or-nothing imports)

extension Store {
    /// Names of incomplete volumes start with this; a user's names cannot start with '.'.
    static let incompletePrefix = ".incomplete-"

    /// Whether `name` is an incomplete volume's (an import still writing, or one that died).
    public static func isIncomplete(name: String) -> Bool { name.hasPrefix(incompletePrefix) }

    /// A volume for data that is not all in yet (an import): its name is one no user can give or
    /// see in `list`, `publishIncompleteVolume` turns it into the named volume in one durable step,
    /// and a writable open deletes any left by a process that died. Returns its name.
    public func createIncompleteVolume(size: UInt64, blockSize: Int, group: String?) throws -> ImageInfo {
        if let group { try Store.validate(name: group, what: "group") }
        guard blockSize.nonzeroBitCount == 1, blockSize >= Limits.blockBytesMin, blockSize <= Limits.blockBytesMax else {
            throw StoreError.invalidArgument("block size must be a power of two from \(Limits.blockBytesMin) to \(Limits.blockBytesMax) bytes")
        }
        guard size > 0, size <= Limits.volumeBytesMax else {
            throw StoreError.invalidArgument("volume size must be between 1 byte and \(Limits.volumeBytesMax) bytes")
        }
        return try commitDurably { () throws -> (records: [JournalRecord], result: () -> ImageInfo) in
            var records: [JournalRecord] = []
            let groupName = group ?? Store.privateGroupPrefix + String(nextImageID)
            var sharingGroup = groups[groupName]
            if sharingGroup == nil {
                let next = try newSharingGroupLocked()
                records.append(.renameGroup(group: next, name: groupName))
                sharingGroup = next
            }
            let r = ImageRecord(id: nextImageID, kind: .volume, name: Store.incompletePrefix + String(nextImageID), volumeID: 0,
                                originID: 0, size: size, blockShift: UInt8(blockSize.trailingZeroBitCount), group: sharingGroup!,
                                createdAt: options.now())
            records.append(.createImage(r))
            return (records, {
                self.incompleteInUse.insert(r.name)
                return self.infoLocked(self.images[r.id]!)
            })
        }
    }

    /// Makes incomplete volume `incomplete` the volume `name`, with all its data, in one durable
    /// journal frame (a clone of its map under the new name, and its deletion): a crash leaves
    /// either the incomplete volume or the finished one, never both or a part.
    @discardableResult
    public func publishIncompleteVolume(_ incomplete: String, as name: String) throws -> ImageInfo {
        try Store.validate(name: name, what: "volume")
        return try commitDurably { () throws -> (records: [JournalRecord], result: () -> ImageInfo) in
            guard Store.isIncomplete(name: incomplete), let source = volumeLocked(named: incomplete) else {
                throw StoreError.notFound(incomplete)
            }
            guard volumeLocked(named: name) == nil else { throw StoreError.alreadyExists(name) }
            var r = source.record
            r.id = nextImageID
            r.name = name
            r.createdAt = options.now()
            return ([.cloneImage(source: source.record.id, r), .deleteImage(source.record.id)], {
                self.incompleteInUse.remove(incomplete)
                return self.infoLocked(self.images[r.id]!)
            })
        }
    }

    /// Deletes the incomplete volumes nobody is filling (their import died; the one named
    /// `abandoning` is given up by its caller, whose import failed); returns their names.
    @discardableResult
    public func discardIncompleteVolumes(abandoning: String? = nil) throws -> [String] {
        func stale() -> [Image] {
            images.values.filter {
                $0.record.kind == .volume && Store.isIncomplete(name: $0.record.name)
                    && ($0.record.name == abandoning || !incompleteInUse.contains($0.record.name))
            }
        }
        guard mutex.withLock({ !stale().isEmpty }) else { return [] }
        return try commitDurably { () throws -> (records: [JournalRecord], result: () -> [String]) in
            let victims = stale()
            let names = victims.map { $0.record.name }.sorted()
            // An incomplete volume has no snapshots: nothing but its filler knows its name.
            return (victims.map { JournalRecord.deleteImage($0.record.id) }, {
                if let abandoning { self.incompleteInUse.remove(abandoning) }
                return names
            })
        }
    }
}
