// libFuzzer target nbd-transmission: the request stream of a connection already in the
// transmission phase. Input: one configuration byte (SessionConfiguration), one byte choosing what
// the handshake negotiated (structured replies, metadata contexts), then the client's requests.
// The seed corpus (fixtures/fuzz/nbd-transmission) is the transmission part of recorded sessions.

import NBDProtocol

@_cdecl("LLVMFuzzerTestOneInput")
public func nbdTransmissionFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeBufferPointer(start: data, count: size)
    guard input.count >= 2 else { return 0 }
    let configuration = SessionConfiguration(byte: input[0])
    let negotiation = input[1]
    let structured = negotiation & 1 != 0
    var contexts: [NBDMetaContext] = []
    if structured {
        if negotiation & 2 != 0 { contexts.append(.baseAllocation) }
        if negotiation & 4 != 0 { contexts.append(.vbdSharing) }
        if negotiation & 8 != 0 { contexts.reverse() }
    }
    let export = NBDExportDescription(name: "vm0", description: "", size: configuration.exportSize,
                                      isReadOnly: configuration.readOnly, preferredBlockSize: 4096)
    let negotiated = NBDNegotiatedExport(
        export: export,
        transmissionFlags: NBDNegotiatedExport.transmissionFlags(readOnly: export.isReadOnly, structuredReplies: structured),
        structuredReplies: structured, metaContexts: contexts, requestBytesMax: configuration.requestBytesMax)
    var session = NBDSession(transmissionOf: negotiated, configuration: configuration, choices: FuzzChoices(seed: input))
    session.run(UnsafeBufferPointer(rebasing: input[2...]))
    return 0
}
