import Foundation
import Glibc
import NIOCore
import Testing
@testable import WeftCore
@testable import WeftProxy

/// TrafficPolicy `circuitBreaker.maxRequestsPerConnection` and
/// `timeout.http.maxConnectionDuration` (ProxyTable.connectionLifetimes) on
/// the proxy's whole captured path over real sockets (the fuzz rig, its
/// pods made one: be-b's address turned into be-a's). The backend names
/// in `x-conn` the connection each request came on. Every client
/// connection goes to loop 0, so one pool serves them: the express path
/// (`api-b`, no route), the full path to HTTP/1.1 (`api`) and to HTTP/2
/// (`grpc`).
@Suite(.serialized) struct ConnectionLifetimeTests {
    static let ways = [("express path", "198.19.250.13"), ("full path", ProxyFuzzTests.vip), ("HTTP/2 upstream", ProxyFuzzTests.h2vip)]

    static func rig(_ lifetime: ProxyTable.ConnectionLifetime) throws -> ProxyFuzzTests.Rig {
        try ProxyFuzzTests.Rig { table in
            table.clusters = table.clusters.mapValues { endpoints in
                endpoints.map { e in
                    var one = e
                    if one.address == "127.0.0.2" { one.address = "127.0.0.1" }
                    return one
                }
            }
            guard lifetime != .init() else { return }
            var lifetimes: [String: ProxyTable.ConnectionLifetime] = [:]
            for e in table.clusters.values.joined() { lifetimes["\(e.address):\(e.port)"] = lifetime }
            table.connectionLifetimes = lifetimes
        }
    }

    /// Requests one after another on one kept-alive client connection to
    /// `port`, `pauses[i]` seconds before the i-th: the backend connection
    /// of each (`x-conn`; "" for a request not answered 200).
    static func connections(_ port: Int, pauses: [Double]) throws -> [String] {
        let fd = try #require(ProxyFuzzTests.dial(port))
        defer { close(fd) }
        var seen: [String] = []
        for pause in pauses {
            usleep(UInt32(pause * 1_000_000))
            let text = UpstreamIdleTests.get(on: fd)
            let conn = text.split(separator: "\r\n").first { $0.lowercased().hasPrefix("x-conn:") }
                .map { $0.dropFirst(7).trimmingCharacters(in: .whitespaces) }
            seen.append(text.hasPrefix("HTTP/1.1 200") && conn != "0" ? conn ?? "?" : "")
        }
        return seen
    }

    /// maxRequestsPerConnection 2: six requests in a row go on three
    /// backend connections, two each (HTTP/2: two streams each).
    @Test func aConnectionCarriesAtMostMaxRequestsPerConnection() throws {
        let rig = try Self.rig(.init(maxRequests: 2))
        defer { rig.shutdown() }
        for (way, vip) in Self.ways {
            let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: vip)
            defer { close() }
            let seen = try Self.connections(ports[0], pauses: Array(repeating: 0, count: 6))
            #expect(!seen.contains("") && seen[0] == seen[1] && seen[2] == seen[3] && seen[4] == seen[5]
                        && Set(seen).count == 3, "\(way): \(seen)")
        }
        // The delivering node's connections to its pod, for requests that
        // came through a tunnel (the rig's delivering listener: the same
        // express path, delivering, on a plain connection).
        let delivered = try Self.connections(rig.deliveringListener.localAddress?.port ?? 0, pauses: Array(repeating: 0, count: 6))
        #expect(!delivered.contains("") && delivered[0] == delivered[1] && delivered[2] == delivered[3]
                    && delivered[4] == delivered[5] && Set(delivered).count == 3, "delivering: \(delivered)")
    }

    /// maxConnectionDuration 300 ms: a request 100 ms after the first goes
    /// on its connection, one 500 ms after that on a new one (the old one
    /// too old to take it, kept idle or not).
    @Test func aConnectionTakesNoRequestOnceMaxConnectionDurationOld() throws {
        let rig = try Self.rig(.init(maxMilliseconds: 300))
        defer { rig.shutdown() }
        for (way, vip) in Self.ways {
            let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: vip)
            defer { close() }
            let seen = try Self.connections(ports[0], pauses: [0, 0.1, 0.5])
            #expect(!seen.contains("") && seen[0] == seen[1] && seen[1] != seen[2], "\(way): \(seen)")
        }
    }

    /// A backend that answers a request before it has read all of it (the
    /// rig's `/early`: the chunked body's last chunk not yet sent) leaves
    /// its connection with a request half sent: it is closed, not kept,
    /// and the next request goes on a new one, where it is read as itself.
    /// (It was kept: the next request on it reached the backend as the
    /// first one's body, and was refused 400; seen in a clean-clone CI run
    /// as an h2c GET through a tunnel answered "invalid character in chunk
    /// size header" by the far node.) On every HTTP/1.1 way of the rows
    /// above, and at the delivering node; to HTTP/2 the stream ends (reset)
    /// and its connection carries the next requests.
    @Test func aConnectionAnsweredBeforeItsRequestWasSentWholeIsNotReused() throws {
        let rig = try Self.rig(.init())
        defer { rig.shutdown() }
        let early = "POST /early HTTP/1.1\r\nhost: api.fz\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
        func conn(_ text: String) -> String {
            let line = text.split(separator: "\r\n").first { $0.lowercased().hasPrefix("x-conn:") }
            return text.hasPrefix("HTTP/1.1 200") ? line.map { $0.dropFirst(7).trimmingCharacters(in: .whitespaces) } ?? "?" : text
        }
        func check(_ way: String, port: Int, http2: Bool = false) throws {
            let fd = try #require(ProxyFuzzTests.dial(port))
            defer { close(fd) }
            let first = conn(UpstreamIdleTests.exchange(on: fd, early))
            // The client ends its body (the proxy lets it go), then asks again.
            let second = conn(UpstreamIdleTests.exchange(on: fd, "0\r\n\r\nGET / HTTP/1.1\r\nhost: api.fz\r\n\r\n"))
            let third = conn(UpstreamIdleTests.get(on: fd))
            #expect(Int(first) != nil && Int(second) != nil && (first == second) == http2 && second == third,
                    "\(way): \(first) | \(second) | \(third)")
        }
        for (way, vip) in Self.ways {
            let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: vip)
            defer { close() }
            try check(way, port: ports[0], http2: vip == ProxyFuzzTests.h2vip)
        }
        try check("delivering", port: rig.deliveringListener.localAddress?.port ?? 0)
    }

    /// Without a lifetime every request of the same rows reuses one connection.
    @Test func withoutOneAConnectionIsReused() throws {
        let rig = try Self.rig(.init())
        defer { rig.shutdown() }
        for (way, vip) in Self.ways {
            let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: vip)
            defer { close() }
            let seen = try Self.connections(ports[0], pauses: [0, 0, 0, 0.5])
            #expect(!seen.contains("") && Set(seen).count == 1, "\(way): \(seen)")
        }
    }
}
