import Foundation
import Glibc
import NIOCore
import Testing
@testable import WeftCore
@testable import WeftProxy

/// MeshConfig `proxy.upstreamIdleTimeout` on the proxy's whole captured
/// path over real sockets (the fuzz rig: its Service `api` on two HTTP/1.1
/// and HTTP/2 backends), with a 400 ms timeout: a connection to a backend
/// kept for the next request is closed once it has waited that long
/// unused, HTTP/1.1 on the express path and HTTP/2 (NIO's client); one
/// reused more often than that is kept however long; with `0s` every kept
/// connection stays.
@Suite(.serialized) struct UpstreamIdleTests {
    /// Connections the rig's pools keep now, over its loops.
    static func kept(_ rig: ProxyFuzzTests.Rig) throws -> Int {
        var n = 0
        for loop in Array(rig.group.makeIterator()) {
            let proxy = rig.proxy
            n += try loop.submit { proxy.loop(loop).pool.keptConnections }.wait()
        }
        return n
    }

    static func closed(_ rig: ProxyFuzzTests.Rig) -> Int { rig.proxy.stats.upstreamIdleClosed.load(ordering: .relaxed) }

    /// One request to `api` on a client connection of its own; whether it
    /// was answered 200.
    static func request(_ rig: ProxyFuzzTests.Rig, http2: Bool) -> Bool {
        let port = rig.port(http2 ? 1 : 0)
        let seen = StreamIdleTests.talk(port, Array("GET / HTTP/1.1\r\nhost: api.fz\r\nconnection: close\r\n\r\n".utf8))
        return seen.text.hasPrefix("HTTP/1.1 200")
    }

    /// A GET of `/` on the kept-alive client connection `fd`, read until
    /// the backends' `ok` body ends (2 s at most): what came back.
    static func get(on fd: Int32) -> String {
        exchange(on: fd, "GET / HTTP/1.1\r\nhost: api.fz\r\n\r\n")
    }

    /// `text` sent on the kept-alive client connection `fd`, then read
    /// until the backends' `ok` body ends (2 s at most): what came back.
    static func exchange(on fd: Int32, _ text: String) -> String {
        let request = Array(text.utf8)
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var got: [UInt8] = [], buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = Date().addingTimeInterval(2)
        while Date() < deadline, !String(decoding: got, as: UTF8.self).hasSuffix("ok\n") {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 { got += buffer[0..<n] } else if n == 0 { break }
        }
        return String(decoding: got, as: UTF8.self)
    }

    /// Waits up to 2 s for the rig's pools to keep `count` connections.
    static func waitKept(_ rig: ProxyFuzzTests.Rig, _ count: Int) throws -> Int {
        var now = try kept(rig)
        for _ in 0..<100 where now != count {
            usleep(20_000)
            now = try kept(rig)
        }
        return now
    }

    @Test(arguments: [false, true])
    func keptConnectionsCloseAfterTheMeshConfigTimeout(http2: Bool) throws {
        let rig = try ProxyFuzzTests.Rig { $0.upstreamIdleTimeoutMilliseconds = 400 }
        defer { rig.shutdown() }
        let kind = http2 ? "HTTP/2" : "HTTP/1.1"
        #expect(Self.request(rig, http2: http2), "\(kind): the first request")
        #expect(try Self.kept(rig) >= 1, "\(kind): no connection kept after a request")
        let start = Date()
        let left = try Self.waitKept(rig, 0)
        let took = Date().timeIntervalSince(start)
        #expect(left == 0 && took >= 0.3, "\(kind): \(left) kept connections after \(took) s")
        #expect(Self.closed(rig) >= 1, "\(kind): upstream_idle_closed_total")
        // The next request makes a new connection.
        #expect(Self.request(rig, http2: http2), "\(kind): a request after the close")
    }

    /// Requests every 150 ms from one kept-alive client connection (one
    /// loop, so one pool) reuse the connection it keeps: none closed over
    /// 1.2 s, three timeouts; then, unused, it goes. On the express path
    /// (the Service `stall`, one backend, answering "ok" to a plain GET)
    /// and on the full path (`api`, whose route splits it over two
    /// clusters: be-b's address turned into be-a's, so that no choice of
    /// route or backend leaves a connection unused).
    @Test(arguments: [true, false])
    func connectionsReusedInTimeAreKept(express: Bool) throws {
        let rig = try ProxyFuzzTests.Rig { table in
            table.upstreamIdleTimeoutMilliseconds = 400
            table.clusters = table.clusters.mapValues { endpoints in
                endpoints.map { e in
                    var one = e
                    if one.address == "127.0.0.2" { one.address = "127.0.0.1" }
                    return one
                }
            }
        }
        defer { rig.shutdown() }
        let path = express ? "express" : "full"
        let fd = try #require(ProxyFuzzTests.dial(express ? rig.stallPort(full: false) : rig.port(0)))
        defer { close(fd) }
        var answered = 0
        for _ in 0..<8 {
            if Self.get(on: fd).hasPrefix("HTTP/1.1 200") { answered += 1 }
            usleep(150_000)
        }
        #expect(answered == 8, "\(path) path")
        #expect(Self.closed(rig) == 0, "\(path) path: a connection reused every 150 ms was closed as idle")
        #expect(try Self.waitKept(rig, 0) == 0 && Self.closed(rig) >= 1, "\(path) path")
    }

    /// A Service's own timeout (TrafficPolicy
    /// `timeout.http.connectionIdleTimeout`, ProxyTable.upstreamIdleTimeouts:
    /// set here for every backend, in milliseconds under the 1 s a policy
    /// may say) over the mesh's: it closes kept HTTP/1.1 and HTTP/2
    /// connections where MeshConfig's `0s` would keep them, and keeps them
    /// (`0s`) where MeshConfig's 400 ms would close them.
    @Test func aServicesOwnTimeoutOverridesTheMeshs() throws {
        for (mesh, service) in [(0, 400), (400, 0)] {
            let rig = try ProxyFuzzTests.Rig { table in
                table.upstreamIdleTimeoutMilliseconds = mesh
                var own: [String: Int] = [:]
                for e in table.clusters.values.joined() { own["\(e.address):\(e.port)"] = service }
                table.upstreamIdleTimeouts = own
            }
            defer { rig.shutdown() }
            #expect(Self.request(rig, http2: false) && Self.request(rig, http2: true))
            if service > 0 {
                let start = Date()
                let left = try Self.waitKept(rig, 0)
                let took = Date().timeIntervalSince(start)
                #expect(left == 0 && took >= 0.3 && Self.closed(rig) >= 2,
                        "the Service's 400 ms over the mesh's 0s: \(left) kept after \(took) s, \(Self.closed(rig)) closed")
            } else {
                usleep(1_200_000)
                #expect(try Self.kept(rig) >= 2 && Self.closed(rig) == 0, "the Service's 0s over the mesh's 400 ms")
            }
        }
    }

    @Test func withNoTimeoutKeptConnectionsStay() throws {
        let rig = try ProxyFuzzTests.Rig { $0.upstreamIdleTimeoutMilliseconds = 0 }
        defer { rig.shutdown() }
        #expect(Self.request(rig, http2: false) && Self.request(rig, http2: true))
        usleep(1_200_000)
        #expect(try Self.kept(rig) >= 2 && Self.closed(rig) == 0)
    }
}
