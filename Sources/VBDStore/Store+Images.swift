import VBDCore

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
        let group = groups.first { $0.value == r.domain }?.key ?? "domain-\(r.domain)"
        return ImageInfo(id: r.id, name: fullNameLocked(r), kind: r.kind, size: r.size, blockSize: r.blockSize,
                         createdAt: r.createdAt, origin: origin, group: group)
    }

    func checkOpen() throws {
        if closed { throw StoreError.io("store is closed") }
        if let poisoned { throw StoreError.io("store is read-only: \(poisoned)") }
    }

    // MARK: Operations

    /// Creates an empty volume. Sizes need not be multiples of the block size.
    @discardableResult
    public func createVolume(name: String, size: UInt64, blockSize: Int = Limits.blockBytesDefault,
                             group: String = "default") throws -> ImageInfo {
        try Store.validate(name: name, what: "volume")
        try Store.validate(name: group, what: "group")
        guard blockSize.nonzeroBitCount == 1, blockSize >= Limits.blockBytesMin, blockSize <= Limits.blockBytesMax else {
            throw StoreError.invalidArgument("block size must be a power of two from \(Limits.blockBytesMin) to \(Limits.blockBytesMax) bytes")
        }
        guard size > 0, size <= Limits.volumeBytesMax else {
            throw StoreError.invalidArgument("volume size must be between 1 byte and \(Limits.volumeBytesMax) bytes")
        }
        return try commitDurably { () throws -> (records: [JournalRecord], result: () -> ImageInfo) in
            guard volumeLocked(named: name) == nil else { throw StoreError.alreadyExists(name) }
            var records: [JournalRecord] = []
            var domain = groups[group]
            if domain == nil {
                let next = (groups.values.max() ?? 0) + 1
                guard next < UInt16.max else { throw StoreError.invalidArgument("too many sharing groups") }
                records.append(.renameGroup(domain: next, group: group))
                domain = next
            }
            let r = ImageRecord(id: nextImageID, kind: .volume, name: name, volumeID: 0, originID: 0, size: size,
                                blockShift: UInt8(blockSize.trailingZeroBitCount), domain: domain!, createdAt: options.now())
            records.append(.createImage(r))
            return (records, { self.infoLocked(self.images[r.id]!) })
        }
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

    /// The dedup domain (cache owner group) of a sharing group, if it exists.
    public func domain(ofGroup group: String) -> UInt16? {
        mutex.withLock { groups[group] }
    }

    public func list() -> [ImageInfo] {
        mutex.withLock {
            images.values.map { infoLocked($0) }.sorted { $0.name < $1.name }
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
            return MapRoot.diff(x.root, y.root, blocks: blocks).map {
                ($0.lowerBound << shift)..<min($0.upperBound << shift, maxSize)
            }
        }
    }
}
