import NBDProtocol
import NIOCore
import Testing

@testable import NBDServer

/// How the connection accumulates a stream of large WRITEs: the same loop as the handler (append a
/// socket read, parse, keep the rest), with every parsed payload kept alive as queued requests are.
@Suite struct InboundAccumulationTests {
    /// Feeds `count` WRITEs of `payloadBytes` in reads of `readBytes` (not a divisor, so reads
    /// straddle requests). Returns the payloads and the largest capacity the unread input had.
    func stream(count: Int, payloadBytes: Int, readBytes: Int) throws -> (payloads: [ByteBuffer], expected: [[UInt8]], maxCapacity: Int) {
        var wire = ByteBuffer()
        var expected: [[UInt8]] = []
        for i in 0..<count {
            NBDClientEncoder.writeRequest(type: NBDCommand.write.rawValue, handle: UInt64(i), offset: UInt64(i * payloadBytes),
                                          length: UInt32(payloadBytes), into: &wire)
            let payload = (0..<payloadBytes).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i &* 7) }
            wire.writeBytes(payload)
            expected.append(payload)
        }
        let allocator = ByteBufferAllocator()
        var parser = NBDMessageParser(optionBytesMax: 4096, requestBytesMax: 32 << 20)
        parser.enterTransmission()
        var inbound: ByteBuffer?
        var payloads: [ByteBuffer] = []
        var maxCapacity = 0
        while wire.readableBytes > 0 {
            var read = wire.readSlice(length: min(readBytes, wire.readableBytes))!
            // A socket read arrives in a buffer of its own (NIO's receive buffer).
            var incoming = allocator.buffer(capacity: readBytes)
            incoming.writeBuffer(&read)
            repeat {
                NBDConnectionHandler.append(&incoming, to: &inbound, messageBytes: parser.pendingPayloadBytes,
                                            allocator: allocator)
                maxCapacity = max(maxCapacity, inbound!.capacity)
                while var buffer = inbound {
                    inbound = nil
                    let message = try parser.nextMessage(from: &buffer)
                    inbound = buffer.readableBytes > 0 ? buffer : nil
                    guard case .request(let request)? = message else { break }
                    payloads.append(request.payload!)
                }
            } while incoming.readableBytes > 0
        }
        return (payloads, expected, maxCapacity)
    }

    @Test func largeWritesAreAccumulatedOnceInBuffersSizedForOneRequest() throws {
        let payloadBytes = 1 << 20, readBytes = 65536 - 100
        let (payloads, expected, maxCapacity) = try stream(count: 12, payloadBytes: payloadBytes, readBytes: readBytes)
        #expect(payloads.count == 12)
        for (payload, bytes) in zip(payloads, expected) { #expect(Array(payload.readableBytesView) == bytes) }
        // One request: growing the buffer instead doubled it, with the consumed bytes of earlier
        // requests carried along (2-8 MiB here).
        #expect(maxCapacity <= payloadBytes)
    }

    @Test func smallReadsAndSmallRequestsStayExact() throws {
        let (payloads, expected, maxCapacity) = try stream(count: 50, payloadBytes: 4096, readBytes: 1000)
        #expect(payloads.count == 50)
        for (payload, bytes) in zip(payloads, expected) { #expect(Array(payload.readableBytesView) == bytes) }
        #expect(maxCapacity <= 8192)  // ByteBufferAllocator rounds capacities up to a power of two
    }
}
