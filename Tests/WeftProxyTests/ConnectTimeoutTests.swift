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
/// answered 503 once the connect gives up: after the Service's 300 ms, or
/// the proxy's own 2 s where no policy sets one, over HTTP/1.1 and h2c, on
/// the full path and on the express path (which hands a failed connect
/// over to the full path as its first attempt: with one backend, the full
/// path answers at once rather than trying it again).
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
    /// `port`, HTTP/1.1 or h2c with prior knowledge: the status code, and
    /// how long the answer took.
    static func request(_ port: Int, h2: Bool = false) -> (status: String, seconds: Double) {
        let start = ContinuousClock.now
        if h2 {
            let seen = StreamIdleTests.talk(port, FuzzInput.h2Request(), done: { FuzzInput.h2Status($0) != nil })
            return (FuzzInput.h2Status(seen.bytes) ?? "none", seen.after ?? StreamIdleTests.seconds(ContinuousClock.now - start))
        }
        let seen = StreamIdleTests.talk(port, Array("GET / HTTP/1.1\r\nhost: stall.fz\r\nconnection: close\r\n\r\n".utf8))
        let line = seen.text.split(separator: "\r\n").first ?? ""
        let status = line.hasPrefix("HTTP/1.1 ") ? String(line.dropFirst(9).prefix(3)) : "none: \(line)"
        return (status, StreamIdleTests.seconds(ContinuousClock.now - start))
    }

    /// The rig with its stalling backend's address in the route table
    /// pointed at `hole`; `table` changes the table after that.
    static func rig(_ hole: BlackHole, table: @escaping (inout ProxyTable) -> Void) throws -> ProxyFuzzTests.Rig {
        let port = hole.port
        return try ProxyFuzzTests.Rig { t in
            for (name, endpoints) in t.clusters {
                t.clusters[name] = endpoints.map { e in
                    var e = e
                    if e.address == "127.0.0.4" { e.port = port }
                    return e
                }
            }
            table(&t)
        }
    }

    @Test(arguments: [true, false])
    func aServicesConnectTimeoutEndsAConnectNobodyAnswers(own: Bool) throws {
        let hole = try BlackHole()
        let port = hole.port
        let rig = try Self.rig(hole) { table in
            if own { table.connectTimeouts = ["127.0.0.4:\(port)": 300] }
        }
        defer { rig.shutdown() }
        defer { withExtendedLifetime(hole) {} }
        for full in [false, true] {
            for h2 in [false, true] {
                let (status, seconds) = Self.request(rig.stallPort(full: full), h2: h2)
                let what = "\(full ? "full" : "express") path, \(h2 ? "h2c" : "HTTP/1.1"), "
                    + (own ? "the Service's 300 ms" : "the proxy's 2 s")
                #expect(status == "503", "\(what): \(status)")
                let bounds = own ? 0.28...0.55 : 1.9...2.6
                #expect(bounds.contains(seconds), "\(what): answered after \(seconds) s")
            }
        }
    }

    /// A request the express path delayed (fault injection, every request,
    /// 300 ms) and whose connect then failed (the Service's 300 ms) is
    /// handed over judged: the full path neither draws the fault again nor
    /// tries the one backend again, so the answer comes after one delay and
    /// one connect timeout, HTTP/1.1 and h2c.
    @Test func aHandedOverRequestIsJudgedOnce() throws {
        let hole = try BlackHole()
        let port = hole.port
        let rig = try Self.rig(hole) { table in
            table.connectTimeouts = ["127.0.0.4:\(port)": 500]
            var faults = TrafficPolicy.FaultInjection()
            faults.delay = .init(fixedDelay: .milliseconds(500), percentage: 100)
            table.frontends["\(ProxyFuzzTests.stallVIP):80"]?.faultInjection = faults
        }
        defer { rig.shutdown() }
        defer { withExtendedLifetime(hole) {} }
        #expect(rig.proxy.snapshot.guards["\(ProxyFuzzTests.stallVIP):80"] != nil, "the fault is in force")
        for h2 in [false, true] {
            let delayedBefore = rig.proxy.stats.faultsDelayed.load(ordering: .relaxed)
            let handedBefore = rig.proxy.stats.expressHandovers.load(ordering: .relaxed)
            let (status, seconds) = Self.request(rig.stallPort(full: false), h2: h2)
            let what = h2 ? "h2c" : "HTTP/1.1"
            #expect(status == "503", "\(what): \(status)")
            // (One delay and one timeout: 1 s; a second of either: 1.5 s.)
            #expect((0.98...1.45).contains(seconds), "\(what): answered after \(seconds) s")
            #expect(rig.proxy.stats.faultsDelayed.load(ordering: .relaxed) - delayedBefore == 1, "\(what): one delay drawn")
            #expect(rig.proxy.stats.expressHandovers.load(ordering: .relaxed) - handedBefore == 1, "\(what): handed over")
        }
    }

    /// A pod whose Service's connect timeout (600 ms) is longer than the
    /// source's open timeout (300 ms here, 5 s in the proxy): told of it
    /// (`podConnect`, as TCPPassthrough tells it), the source waits for the
    /// delivering node's answer, a refusal after 600 ms, and the tunnel
    /// stays open for the next stream; not told, it takes the tunnel as
    /// stuck after 300 ms and closes it, and every stream it carried.
    @Test(arguments: [true, false])
    func anOpaqueStreamWaitsOutItsPodsConnectTimeout(told: Bool) throws {
        let hole = try BlackHole()
        defer { withExtendedLifetime(hole) {} }
        let port = Int(hole.port)
        let node = try TunnelStreamIdleTests.Node(express: true) { $0.connectTimeouts = ["127.0.0.4:\(port)": 600] }
        defer { node.shutdown() }
        let source = try TunnelInboundLimitsTests.Source(node, openTimeout: .milliseconds(300))
        defer { source.close() }
        let start = ContinuousClock.now
        let opened = Result { try source.open(node, port: port, podConnect: told ? .milliseconds(600) : nil) }
        let seconds = StreamIdleTests.seconds(ContinuousClock.now - start)
        let what = told ? "told" : "not told"
        switch opened {
        case .success: Issue.record("\(what): a stream to a pod that never answers opened")
        case .failure(let error):
            #expect((error is TunnelTimedOut) == !told, "\(what): \(error)")
        }
        #expect((told ? 0.55...1.2 : 0.28...0.55).contains(seconds), "\(what): the open failed after \(seconds) s")
        if told {
            #expect(source.closed.instant == nil, "the tunnel was closed")
            #expect((try? source.open(node)) != nil, "the next stream on the same tunnel")
        } else {
            #expect(source.closed.wait(from: start, within: 1) != nil, "the tunnel taken as stuck stays open")
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
