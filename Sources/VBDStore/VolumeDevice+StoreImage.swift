import VBDCore

// The NBD server reads `imageID` through this protocol to hold leases and bindings to the image.
extension VolumeDevice: StoreImageDevice {}
