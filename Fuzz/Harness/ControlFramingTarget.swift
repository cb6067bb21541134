// libFuzzer target control-framing: bytes a peer sends on the control socket, read by the real
// ControlFraming.receive from a socketpair and decoded as the server decodes requests
// (ControlEnvelope) or as the CLI decodes replies (ControlReply). Input: one byte choosing the side,
// then the bytes on the wire. The seed corpus (fixtures/fuzz/control-framing) holds frames
// recorded from `vbdtool` commands against a running `vbdtool serve`.
//
// Checked: no trap; a failure is one of the framing's documented codes; nothing decoded that the
// sender could not have sent (re-encoding a decoded message and reading it back gives it again);
// the server's reply to whatever arrived is a frame within the reply limit that a client decodes.

import Foundation
@testable import VBDControl

#if canImport(Glibc)
import Glibc
#endif

private let framingFailureCodes: Set<String> = ["protocol", "too-large", "timeout", "io"]

/// Writes `bytes` into one end of a socketpair, closes that end for writing, returns the other end.
private func wire(_ bytes: UnsafeRawBufferPointer) -> Int32 {
    var fds: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else {
        invariant(false, "socketpair: \(errno)")
        return -1
    }
    var capacity: Int32 = 1 << 20
    setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &capacity, socklen_t(MemoryLayout<Int32>.size))
    setsockopt(fds[0], SOL_SOCKET, SO_RCVBUF, &capacity, socklen_t(MemoryLayout<Int32>.size))
    var offset = 0
    while offset < bytes.count {
        let n = write(fds[1], bytes.baseAddress! + offset, bytes.count - offset)
        invariant(n > 0, "socketpair write failed (\(errno)); inputs are capped below the socket buffer")
        offset += n
    }
    shutdown(fds[1], Int32(SHUT_WR))
    close(fds[1])
    return fds[0]
}

/// Sends `value` with the real framing and reads it back with the real framing.
private func roundTrip<T: Codable & Equatable>(_ value: T, bytesMax: Int) -> Result<T?, ControlFailure> {
    var fds: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { return .failure(ControlFailure(code: "io", message: "socketpair")) }
    var capacity: Int32 = 1 << 20
    setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &capacity, socklen_t(MemoryLayout<Int32>.size))
    setsockopt(fds[0], SOL_SOCKET, SO_RCVBUF, &capacity, socklen_t(MemoryLayout<Int32>.size))
    defer { close(fds[0]) }
    do {
        try ControlFraming.send(value, on: fds[1], bytesMax: bytesMax)
    } catch {
        close(fds[1])
        return .failure(error)
    }
    shutdown(fds[1], Int32(SHUT_WR))
    close(fds[1])
    return Result { () throws(ControlFailure) -> T? in
        try ControlFraming.receive(T.self, from: fds[0], bytesMax: bytesMax, deadline: .now + .seconds(5))
    }
}

/// What the server does with one received request before it reaches the store: the version
/// check, the log line, and for a request it refuses, the failure frame it sends back.
private func serverSide(_ fd: Int32) {
    let failure: ControlFailure
    do {
        guard let envelope = try ControlFraming.receive(ControlEnvelope.self, from: fd, bytesMax: ControlLimits.requestBytesMax,
                                                        deadline: .now + .seconds(5)) else { return }
        _ = "\(envelope.request)"  // the server logs every request
        _ = envelope.request.onlyReadsStore
        _ = envelope.request.involvesFile
        // Whatever was decoded is something a client can send: it survives the trip again.
        switch roundTrip(envelope, bytesMax: ControlLimits.requestBytesMax) {
        case .success(let back): invariant(back == envelope, "request changed on a second trip: \(envelope) -> \(String(describing: back))")
        case .failure(let failure): invariant(failure.code == "too-large", "re-sending a decoded request failed: \(failure)")
        }
        guard envelope.version != controlProtocolVersion else { return }  // the store would run it
        failure = ControlFailure(code: "protocol", message: "control protocol version \(envelope.version) is not supported")
    } catch {
        invariant(framingFailureCodes.contains(error.code), "receive failed with code \(error.code): \(error.message)")
        failure = error
    }
    let reply = ControlReply.failure(failure)
    switch roundTrip(reply, bytesMax: ControlLimits.replyBytesMax) {
    case .success(let back): invariant(back == reply, "failure reply changed on the wire")
    case .failure(let failure): invariant(false, "the failure reply to a hostile request cannot be sent: \(failure)")
    }
}

/// The reply limit on the client side of the harness. The CLI's is ControlLimits.replyBytesMax
/// (64 MiB): receive allocates the announced length before reading it, so with that limit most
/// mutated headers cost a 64 MiB zero fill and the run crawls; the code path is the same.
private let clientReplyBytesMax = 1 << 20

/// What the CLI does with the server's frames: progress frames until one success or failure.
private func clientSide(_ fd: Int32, frameBudget: Int) {
    for _ in 0..<frameBudget {
        let reply: ControlReply?
        do {
            reply = try ControlFraming.receive(ControlReply.self, from: fd, bytesMax: clientReplyBytesMax)
        } catch {
            invariant(framingFailureCodes.contains(error.code), "receive failed with code \(error.code): \(error.message)")
            return
        }
        guard let reply else { return }
        _ = "\(reply)"
        switch roundTrip(reply, bytesMax: clientReplyBytesMax) {
        case .success(let back): invariant(back == reply, "reply changed on a second trip: \(reply) -> \(String(describing: back))")
        case .failure(let failure): invariant(failure.code == "too-large", "re-sending a decoded reply failed: \(failure)")
        }
        if case .progress = reply { continue }
        return
    }
}

/// Largest input fed through the socketpair (above the request limit, so oversized frames reach
/// the length check with their bytes present).
private let inputBytesMax = ControlLimits.requestBytesMax + (16 << 10)

@_cdecl("LLVMFuzzerTestOneInput")
public func controlFramingFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1, size - 1 <= inputBytesMax else { return 0 }
    let side = data[0]
    let fd = wire(UnsafeRawBufferPointer(start: data + 1, count: size - 1))
    guard fd >= 0 else { return 0 }
    defer { close(fd) }
    if side & 1 == 0 {
        serverSide(fd)
    } else {
        // A frame needs at least 4 bytes: bounds the loop by the input.
        clientSide(fd, frameBudget: (size - 1) / 4 + 1)
    }
    return 0
}
