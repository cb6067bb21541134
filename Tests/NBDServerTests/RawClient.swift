import Foundation
import NBDProtocol
import NIOCore

/// A deliberately primitive, blocking unix-socket client for hostile and vanishing-client tests:
/// it sends exactly the bytes a test gives it.
final class RawClient {
    private let descriptor: Int32

    init(socketPath: String, receiveTimeout: Duration = .seconds(10)) throws {
        descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw POSIXError(.EIO) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { path in
            let bytes = Array(socketPath.utf8)
            path.copyBytes(from: bytes.prefix(path.count - 1))
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            close(descriptor)
            throw POSIXError(.ECONNREFUSED)
        }
        let seconds = receiveTimeout.components.seconds
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(descriptor) }

    func send(_ bytes: [UInt8]) {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }  // peer closed: the test observes it on receive
            sent += n
        }
    }

    func send(_ buffer: ByteBuffer) {
        send(Array(buffer.readableBytesView))
    }

    /// Reads exactly `count` bytes; nil if the peer closed first or the receive timed out.
    func receive(_ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            let n = bytes[received...].withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return nil }
            received += n
        }
        return bytes
    }

    /// True when the server closed the connection (EOF) within the receive timeout.
    func waitForClose() -> Bool {
        var byte: UInt8 = 0
        while true {
            let n = recv(descriptor, &byte, 1, 0)
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
    }

    func shutdownBoth() {
        shutdown(descriptor, Int32(SHUT_RDWR))
    }

    // MARK: Protocol helpers

    /// Reads the greeting and sends client flags; returns the handshake flags.
    @discardableResult
    func greet(flags: NBDClientFlags = [.fixedNewstyle, .noZeroes]) -> UInt16? {
        guard let greeting = receive(NBDWireSize.greeting) else { return nil }
        var buffer = ByteBuffer()
        NBDClientEncoder.writeClientFlags(flags, into: &buffer)
        send(buffer)
        return UInt16(greeting[16]) << 8 | UInt16(greeting[17])
    }

    func sendOption(_ code: UInt32, payload: [UInt8] = [], announcedLength: UInt32? = nil) {
        var buffer = ByteBuffer()
        NBDClientEncoder.writeOption(code, payload: payload, announcedLength: announcedLength, into: &buffer)
        send(buffer)
    }

    /// Reads one option reply: (option, type, payload).
    func receiveOptionReply() -> (option: UInt32, type: UInt32, payload: [UInt8])? {
        guard let header = receive(20) else { return nil }
        var buffer = ByteBuffer(bytes: header)
        guard buffer.readInteger(as: UInt64.self) == NBDMagic.optionReply,
              let option = buffer.readInteger(as: UInt32.self), let type = buffer.readInteger(as: UInt32.self),
              let length = buffer.readInteger(as: UInt32.self) else { return nil }
        guard let payload = length == 0 ? [] : receive(Int(length)) else { return nil }
        return (option, type, payload)
    }

    /// Fixed newstyle + NO_ZEROES, then NBD_OPT_EXPORT_NAME: enters transmission with simple replies.
    func enterTransmission(export: String) -> (size: UInt64, flags: UInt16)? {
        guard greet() != nil else { return nil }
        sendOption(NBDOptionCode.exportName, payload: Array(export.utf8))
        guard let reply = receive(10) else { return nil }
        var buffer = ByteBuffer(bytes: reply)
        return (buffer.readInteger()!, buffer.readInteger()!)
    }

    func sendRequest(_ command: UInt16, flags: NBDCommandFlags = [], handle: UInt64, offset: UInt64, length: UInt32,
                     payload: [UInt8] = []) {
        var buffer = ByteBuffer()
        NBDClientEncoder.writeRequest(type: command, flags: flags, handle: handle, offset: offset, length: length,
                                      into: &buffer)
        buffer.writeBytes(payload)
        send(buffer)
    }

    /// Reads one simple reply header: (error, handle).
    func receiveSimpleReply() -> (error: UInt32, handle: UInt64)? {
        guard let header = receive(16) else { return nil }
        var buffer = ByteBuffer(bytes: header)
        guard buffer.readInteger(as: UInt32.self) == NBDMagic.simpleReply else { return nil }
        return (buffer.readInteger()!, buffer.readInteger()!)
    }
}
