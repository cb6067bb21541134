/// A device that is one image of a store: `imageID` is the store's internal id of it, never reused,
/// so leases and bindings can follow the image rather than its name (which a later image may take).
public protocol StoreImageDevice: BlockDevice {
    var imageID: UInt64 { get }
}
