import Foundation
import Testing
@testable import VBDRados

@Suite(.serialized) struct RadosConnectionTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    /// A pool keeps its connection alive: closing the connection first shuts it down only when the
    /// pool closes, and nothing is used after it was freed.
    @Test func closingInEitherOrderIsSafe() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "close")
        connection.close()
        #expect(throws: RadosError.self) { try connection.openPool("vbd") }
        try pool.writeFull("still-open", [1, 2])
        #expect(try pool.readAll("still-open") == [1, 2])
        pool.close()
        let closed = #expect(throws: RadosError.self) { try pool.writeFull("after-close", [3]) }
        #expect(closed?.code == EBADF)

        let second = try cluster.connect()
        let secondPool = try second.openPool("vbd", namespace: pool.namespace)
        #expect(try secondPool.readAll("still-open") == [1, 2])
        secondPool.close()
        second.close()
        #expect(throws: RadosError.self) { try second.clientAddress() }
    }

    @Test func failuresNameWhatFailedAndWhy() throws {
        let missingFile = #expect(throws: RadosError.self) {
            _ = try RadosConnection(RadosConnection.Options(configurationFile: "/nonexistent/ceph.conf"))
        }
        #expect(missingFile?.description.contains("/nonexistent/ceph.conf") == true)

        let connection = try cluster.connect()
        let noPool = #expect(throws: RadosError.self) { try connection.openPool("no-such-pool") }
        #expect(noPool?.code == ENOENT)
        #expect(noPool?.description.contains("no-such-pool") == true)
        #expect(noPool?.description.contains("No such file or directory") == true)

        let pool = try cluster.freshPool(connection, prefix: "errors")
        let missing = #expect(throws: RadosError.self) { _ = try pool.readAll("absent") }
        #expect(missing?.description.contains("\(pool.namespace)/absent") == true)
    }
}
