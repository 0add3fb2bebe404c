import Foundation
import Glibc
import NIOCore
import Testing
@testable import WeftCore
@testable import WeftProxy

/// TrafficPolicy `timeout.tcp.connectTimeout` (ProxyTable.connectTimeouts)
/// on the proxy's whole captured path over real sockets (the fuzz rig):
/// the rig's `stall` Service (the express path) and `stall-full` (a route
/// with filters: the full path) are pointed at a backend that never
/// answers a SYN (a listener whose accept queue is full), and a request is
/// answered 503 once the connect gives up: after the Service's 300 ms on
/// the full path, and twice that on the express path (which hands a failed
/// connect over to the full path, which tries once more: one backend
/// here); after the proxy's own 2 s where no policy sets one (the full
/// path only: the express path's twice that is past the client's 4 s).
@Suite(.serialized) struct ConnectTimeoutTests {
    /// A listener on 127.0.0.4 whose accept queue (backlog 0) is filled by
    /// one connection nobody accepts: the kernel drops every later SYN.
    final class BlackHole {
        let listener: Int32
        let filler: Int32
        let port: UInt16

        init() throws {
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.4")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    bind(listener, sa, length) == 0 && listen(listener, 0) == 0 && getsockname(listener, sa, &length) == 0
                }
            }
            guard bound else {
                close(listener)
                throw POSIXError(.EADDRNOTAVAIL)
            }
            let filler = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            _ = withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(filler, $0, length) }
            }
            self.listener = listener
            self.filler = filler
            port = UInt16(bigEndian: address.sin_port)
        }

        deinit {
            close(filler)
            close(listener)
        }
    }

    /// One request on a client connection of its own to the rig's listener
    /// `port`: the status line, and how long the answer took.
    static func request(_ port: Int) -> (status: String, seconds: Double) {
        let start = ContinuousClock.now
        let seen = StreamIdleTests.talk(port, Array("GET / HTTP/1.1\r\nhost: stall.fz\r\nconnection: close\r\n\r\n".utf8))
        let status = seen.text.split(separator: "\r\n").first.map(String.init) ?? ""
        return (status, StreamIdleTests.seconds(ContinuousClock.now - start))
    }

    @Test(arguments: [true, false])
    func aServicesConnectTimeoutEndsAConnectNobodyAnswers(own: Bool) throws {
        let hole = try BlackHole()
        let port = hole.port
        let rig = try ProxyFuzzTests.Rig { table in
            for (name, endpoints) in table.clusters {
                table.clusters[name] = endpoints.map { e in
                    var e = e
                    if e.address == "127.0.0.4" { e.port = port }
                    return e
                }
            }
            if own { table.connectTimeouts = ["127.0.0.4:\(port)": 300] }
        }
        defer { rig.shutdown() }
        defer { withExtendedLifetime(hole) {} }
        for full in own ? [false, true] : [true] {
            let (status, seconds) = Self.request(rig.stallPort(full: full))
            let what = "\(full ? "full" : "express") path, \(own ? "the Service's 300 ms" : "the proxy's 2 s")"
            #expect(status.hasPrefix("HTTP/1.1 503"), "\(what): \(status)")
            let bounds = own ? (full ? 0.28...0.9 : 0.56...1.4) : 1.9...3.0
            #expect(bounds.contains(seconds), "\(what): answered after \(seconds) s")
        }
    }

    /// The delivering node's connect to its pod, for a stream that came
    /// through a tunnel from another node (the source is a bare
    /// TunnelConnection here): the open fails once the pod's Service's
    /// timeout (300 ms) has passed, or the proxy's own 2 s, on the
    /// relayed path (an opaque stream) with and without the express paths.
    @Test(arguments: [true, false])
    func theDeliveringNodeUsesThePodsConnectTimeout(express: Bool) throws {
        let hole = try BlackHole()
        defer { withExtendedLifetime(hole) {} }
        let port = Int(hole.port)
        for own in [true, false] {
            let node = try TunnelStreamIdleTests.Node(express: express) {
                if own { $0.connectTimeouts = ["127.0.0.4:\(port)": 300] }
            }
            defer { node.shutdown() }
            let source = try TunnelInboundLimitsTests.Source(node)
            defer { source.close() }
            let start = ContinuousClock.now
            let opened = Result { try source.open(node, port: port) }
            let seconds = StreamIdleTests.seconds(ContinuousClock.now - start)
            let what = "\(express ? "express" : "--no-express"), \(own ? "the Service's 300 ms" : "the proxy's 2 s")"
            if case .success = opened { Issue.record("\(what): a stream to a pod that never answers opened") }
            let bounds = own ? 0.28...1.2 : 1.9...3.5
            #expect(bounds.contains(seconds), "\(what): the open failed after \(seconds) s")
        }
    }
}
