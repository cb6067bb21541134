// libFuzzer target nbd-handshake: a whole client session from the first byte after the server's
// greeting. Input: one configuration byte (SessionConfiguration), then the client's bytes: client
// flags, options, and -- once GO or EXPORT_NAME succeeds -- transmission requests. The seed corpus
// (fixtures/fuzz/nbd-handshake) holds sessions recorded from qemu-img, nbdinfo, nbdcopy and nbdsh.

@_cdecl("LLVMFuzzerTestOneInput")
public func nbdHandshakeFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeBufferPointer(start: data, count: size)
    guard let first = input.first else { return 0 }
    let stream = UnsafeBufferPointer(rebasing: input[1...])
    var session = NBDSession(configuration: SessionConfiguration(byte: first), choices: FuzzChoices(seed: input))
    session.run(stream)
    return 0
}
