import Foundation
import Testing
import VBDCore
import VBDStore

extension RealServerTests {
    @Suite("nbdinfo, qemu, nbdcopy and fio against NBDServer serving a Store", .serialized)
    struct ClientToolTests {
        @Test(.enabled(if: Tool.exists("nbdinfo")))
        func nbdinfoListsExportsAsJSON() async throws {
            try await withServer { fixture in
                let result = try await runTool("nbdinfo", ["--list", "--json", "nbd+unix:///?socket=\(fixture.socketPath)"])
                try #require(result.status == 0, "\(result)")
                let json = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
                let exports = try #require(json["exports"] as? [[String: Any]])
                let byName = Dictionary(uniqueKeysWithValues: exports.map { ($0["export-name"] as? String ?? "", $0) })
                #expect(Set(byName.keys) == ["vol", "vol@snap", "small"])
                let volume = try #require(byName["vol"])
                #expect(volume["export-size"] as? Int == 64 << 20)
                #expect(volume["description"] as? String == "volume, 67108864 bytes", "\(volume)")
                #expect(volume["is_read_only"] as? Bool == false)
                #expect(volume["can_multi_conn"] as? Bool == true)
                #expect(volume["can_fast_zero"] as? Bool == true)
                #expect(volume["block_size_preferred"] as? Int == 4096)
                #expect(volume["block_size_maximum"] as? Int == 32 << 20)
                let contexts = volume["contexts"] as? [String] ?? []
                #expect(Set(contexts).isSuperset(of: ["base:allocation", "x-vbd:sharing"]), "\(volume)")
                let snapshot = try #require(byName["vol@snap"])
                #expect(snapshot["is_read_only"] as? Bool == true)
                #expect(snapshot["can_trim"] as? Bool == false)
            }
        }

        @Test(.enabled(if: Tool.exists("nbdinfo")))
        func tcpListenerOnAnEphemeralPortServesClients() async throws {
            try await withServer(tcp: true) { fixture in
                let port = try #require(fixture.server.tcpPort)
                #expect(port > 0)
                let result = try await runTool("nbdinfo", ["--json", "nbd://127.0.0.1:\(port)/vol@snap"])
                try #require(result.status == 0, "\(result)")
                let json = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
                let export = try #require((json["exports"] as? [[String: Any]])?.first)
                #expect(export["export-name"] as? String == "vol@snap")
                #expect(export["is_read_only"] as? Bool == true)
            }
        }

        @Test(.enabled(if: Tool.exists("nbdinfo")))
        func nbdinfoMapShowsDataHolesAndSharing() async throws {
            try await withServer { fixture in
                let block = [UInt8](repeating: 9, count: 65536)
                try fixture.store.device(named: "vol").writeArray(block, offset: 1 << 20)
                let map = try await runTool("nbdinfo", ["--map", fixture.uri("vol")])
                try #require(map.status == 0, "\(map)")
                let rows = map.stdout.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true) }
                let parsed = rows.compactMap { row -> (UInt64, UInt64, Int)? in
                    guard row.count >= 3, let offset = UInt64(row[0]), let length = UInt64(row[1]),
                          let type = Int(row[2]) else { return nil }
                    return (offset, length, type)
                }
                #expect(parsed.map(\.0) == [0, 8192, 1 << 20, (1 << 20) + 65536], "\(map.stdout)")
                #expect(parsed.map(\.2) == [0, 3, 0, 3], "\(map.stdout)")
                #expect(parsed.reduce(0) { $0 + $1.1 } == 64 << 20)

                let sharing = try await runTool("nbdinfo", ["--map=x-vbd:sharing", fixture.uri("vol")])
                try #require(sharing.status == 0, "\(sharing)")
                let first = sharing.stdout.split(separator: "\n").first.map { $0.split(separator: " ").map(String.init) } ?? []
                #expect(first.prefix(3) == ["0", "8192", "1"], "\(sharing.stdout)")
            }
        }

        @Test(.enabled(if: Tool.exists("qemu-io")))
        func qemuIoPatternWritesReadBack() async throws {
            try await withServer { fixture in
                let uri = fixture.uri("vol")
                let write = try await runTool("qemu-io", ["-f", "raw", "-c", "write -P 0x3c 0 1M", "-c", "write -P 0x81 4M 512k",
                                                          "-c", "write -z 4M 64k", "-c", "flush", uri])
                try #require(write.status == 0 && !write.stdout.contains("error"), "\(write)")
                let read = try await runTool("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x3c 0 1M",
                                                         "-c", "read -P 0 4M 64k", "-c", "read -P 0x81 4160k 448k",
                                                         "-c", "read -P 0 8M 1M", uri])
                #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"), "\(read)")
                let wrong = try await runTool("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x3d 0 4k", uri])
                #expect(wrong.stdout.contains("Pattern verification failed"), "\(wrong)")
                // A snapshot is read-only: qemu-io refuses to open it for writing, or the write fails.
                let snapshot = try await runTool("qemu-io", ["-f", "raw", "-c", "write -P 1 0 4k", fixture.uri("vol@snap")])
                #expect(snapshot.status != 0 || snapshot.stdout.contains("write failed"), "\(snapshot)")
                #expect(try fixture.read("vol@snap", offset: 0, count: 4096) == [UInt8](repeating: 0xA5, count: 4096))
                // The data went through the server into the store, and is durable after the flush.
                try await fixture.crashAndReopen()
                #expect(try fixture.read("vol", offset: 0, count: 1 << 20) == [UInt8](repeating: 0x3C, count: 1 << 20))
                #expect(try fixture.read("vol", offset: 4160 << 10, count: 448 << 10) == [UInt8](repeating: 0x81, count: 448 << 10))
            }
        }

        @Test(.enabled(if: Tool.exists("qemu-img")))
        func qemuImgConvertsAQcow2IntoAnExportAndComparesEqual() async throws {
            try await withServer { fixture in
                let qcow2 = fixture.directory.appendingPathComponent("source.qcow2").path
                let created = try await runTool("qemu-img", ["create", "-f", "qcow2", qcow2, "16M"])
                try #require(created.status == 0, "\(created)")
                let filled = try await runTool("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 5M 3M",
                                                           "-c", "write -P 0x33 15M 512k", qcow2])
                try #require(filled.status == 0, "\(filled)")
                let convert = try await runTool("qemu-img", ["convert", "-n", "-f", "qcow2", "-O", "raw", qcow2,
                                                             fixture.uri("vol")])
                try #require(convert.status == 0, "\(convert)")
                let compare = try await runTool("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", qcow2, fixture.uri("vol")])
                // The export is 64 MiB, the image 16 MiB: compare accepts a larger target when its tail is zero.
                #expect(compare.status == 0, "\(compare)")
                try fixture.store.device(named: "vol").writeArray([0xFF], offset: 5 << 20)
                let differs = try await runTool("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", qcow2, fixture.uri("vol")])
                #expect(differs.status == 1, "\(differs)")
            }
        }

        @Test(.enabled(if: Tool.exists("nbdcopy", "sha256sum")))
        func nbdcopyRoundTripsAFileWithAChecksum() async throws {
            // 32 MiB keeps the unit suite fast; IntegrationTests/test-nbd-nbdcopy.sh copies 256 MiB.
            let size = 32 << 20
            try await withServer(exports: { store in
                try store.createVolume(name: "big", size: UInt64(size))
                return store
            }) { fixture in
                let source = fixture.directory.appendingPathComponent("source.img").path
                let copy = fixture.directory.appendingPathComponent("copy.img").path
                // Random data with zero runs, so both data and hole paths are exercised.
                let head = try await runTool("dd", ["if=/dev/urandom", "of=\(source)", "bs=1M", "count=24", "status=none"])
                try #require(head.status == 0, "\(head)")
                let tail = try await runTool("truncate", ["-s", "\(size)", source])
                try #require(tail.status == 0)
                let up = try await runTool("nbdcopy", [source, fixture.uri("big")], timeout: .seconds(300))
                try #require(up.status == 0, "\(up)")
                let down = try await runTool("nbdcopy", [fixture.uri("big"), copy], timeout: .seconds(300))
                try #require(down.status == 0, "\(down)")
                let sums = try await runTool("sha256sum", [source, copy])
                let digests = sums.stdout.split(separator: "\n").map { $0.split(separator: " ").first.map(String.init) ?? "" }
                #expect(sums.status == 0 && digests.count == 2 && digests[0] == digests[1], "\(sums)")
                // The copy was served from the store: its extents show the zero tail as a hole.
                let extents = try fixture.store.device(named: "big").extents(offset: 24 << 20, length: 8 << 20, maxExtents: 4)
                #expect(extents.first?.flags.contains(.zero) == true, "\(extents)")
            }
        }

        @Test(.enabled(if: Tool.fioHasNBDEngine))
        func fioWithTheNbdEngineVerifiesItsWrites() async throws {
            try await withServer { fixture in
                let result = try await runTool("fio", [
                    "--name=verify", "--ioengine=nbd", "--uri=\(fixture.uri("vol"))", "--rw=randwrite", "--bs=4k",
                    "--size=8M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                    "--randrepeat=1", "--runtime=60",
                ], timeout: .seconds(180))
                #expect(result.status == 0 && !result.stdout.contains("verify: bad"), "\(result)")
                // fio really wrote through the server: every 4 KiB block of its 8 MiB now holds data
                // in the store (fio's random map covers each block once).
                let extents = try fixture.store.device(named: "vol").extents(offset: 0, length: 8 << 20, maxExtents: 64)
                #expect(extents.allSatisfy { !$0.flags.contains(.hole) }, "\(extents)")
            }
        }
    }
}
