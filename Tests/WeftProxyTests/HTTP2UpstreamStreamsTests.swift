import Foundation
import Glibc
import NIOCore
import Testing
@testable import WeftCore
@testable import WeftProxy

/// A backend's SETTINGS_MAX_CONCURRENT_STREAMS on the proxy's HTTP/2
/// connections to it (NIO's and grpc-swift's servers say 100, nginx 128,
/// HAProxy 100, Go's 250): a connection with that many streams open takes
/// no more; the next request opens another connection to the backend, as
/// Envoy and Linkerd do. Else it would wait in the HTTP/2 layer for a
/// stream to end, which a long-lived gRPC stream (a watch) never does.
@Suite(.serialized) struct HTTP2UpstreamStreamsTests {
    /// HTTP/1.1 requests to the rig's h2c Service whose bodies never end:
    /// each holds a stream to a pod open.
    /// In waves of 8, 50 ms apart: the first makes the connections (2 per
    /// pod and loop), the rest come once the pods' SETTINGS have (before
    /// them a connection is taken to allow 100 streams, as gRPC's Go client
    /// takes it).
    static func hold(_ rig: ProxyFuzzTests.Rig, _ n: Int) throws -> [Int32] {
        var fds: [Int32] = []
        for i in 0..<n {
            if i > 0 && i % 8 == 0 { usleep(50_000) }
            let fd = try #require(ProxyFuzzTests.dial(rig.port(1)))
            ExpectContinueTests.send(fd, "POST /hold HTTP/1.1\r\nhost: grpc.fz\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            fds.append(fd)
        }
        return fds
    }

    /// HTTP/2 streams open to the pods, over the loops (once `awaiting`
    /// are, or 5 s have passed).
    static func streamsOpen(_ rig: ProxyFuzzTests.Rig, awaiting: Int = 0) throws -> Int {
        let deadline = ContinuousClock.now + .seconds(5)
        while true {
            let open = try rig.held().enumerated().filter { $0.offset % 2 == 1 }.reduce(0) { $0 + $1.element }
            guard open < awaiting, ContinuousClock.now < deadline else { return open }
            usleep(10_000)
        }
    }

    /// The connections the proxy keeps to the pods, over the loops.
    static func connections(_ rig: ProxyFuzzTests.Rig) throws -> Int {
        let proxy = rig.proxy
        return try Array(rig.group.makeIterator()).reduce(0) { n, loop in
            n + (try loop.submit { proxy.loop(loop).pool.keptConnections }.wait())
        }
    }

    @Test func requestsPastABackendsStreamLimitOpenAnotherConnection() throws {
        // Two pods, two event loops, 4 streams a connection: 16 fill one
        // connection per pod and loop; 40 are held.
        let rig = try ProxyFuzzTests.Rig(http2Streams: 4)
        defer { rig.shutdown() }
        let held = try Self.hold(rig, 40)
        defer { for fd in held { close(fd) } }
        #expect(try Self.streamsOpen(rig, awaiting: 40) == 40, "every held request has its stream")
        // Ten connections at least carry them (4 streams each).
        let connections = try Self.connections(rig)
        #expect(connections >= 10, "\(connections) connections")
        // New requests are answered at once, on new connections.
        for i in 0..<8 {
            let fd = try #require(ProxyFuzzTests.dial(rig.port(1)))
            defer { close(fd) }
            let start = ContinuousClock.now
            ExpectContinueTests.send(fd, "GET /\(i) HTTP/1.1\r\nhost: grpc.fz\r\n\r\n")
            let got = ExpectContinueTests.read(fd, seconds: 4) { $0.hasSuffix("ok\n") }
            #expect(got.hasPrefix("HTTP/1.1 200"), "request \(i) after \(ContinuousClock.now - start): \(got)")
        }
        // Each held request's body ends: every one is answered.
        for fd in held { ExpectContinueTests.send(fd, "0\r\n\r\n") }
        for (i, fd) in held.enumerated() {
            let got = ExpectContinueTests.read(fd, seconds: 4) { $0.hasSuffix("ok\n") }
            #expect(got.hasPrefix("HTTP/1.1 200"), "held request \(i): \(got)")
        }
        for fd in held { shutdown(fd, Int32(SHUT_RDWR)) }
        try rig.settle()
        #expect(try Self.streamsOpen(rig) == 0)
    }

    /// Under a TrafficPolicy's circuitBreaker.maxConnections the proxy
    /// opens no more than that (one per event loop at least): at it, a
    /// stream past the backend's limit waits on the least loaded
    /// connection for one of its streams to end, as Envoy's pending
    /// requests do, and every request is answered in the end.
    @Test func maxConnectionsBoundsTheConnectionsAndTheRestWait() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: ProxyFuzzTests.trafficPolicy("grpc", "circuitBreaker: {maxConnections: 2}"),
                                         http2Streams: 4)
        defer { rig.shutdown() }
        let held = try Self.hold(rig, 24)
        defer { for fd in held { close(fd) } }
        #expect(try Self.streamsOpen(rig, awaiting: 24) == 24, "every held request has its stream (some waiting)")
        let connections = try Self.connections(rig)
        // (Two loops: one each at least, and the limit's two at most
        // beyond what a loop made before it heard of the other's.)
        #expect(connections >= 2 && connections <= 4, "\(connections) connections")
        for fd in held { ExpectContinueTests.send(fd, "0\r\n\r\n") }
        for (i, fd) in held.enumerated() {
            let got = ExpectContinueTests.read(fd, seconds: 4) { $0.hasSuffix("ok\n") }
            #expect(got.hasPrefix("HTTP/1.1 200"), "held request \(i): \(got)")
        }
    }

    /// Requests that came while the connection was still being made count
    /// against its limit (100 until the backend's SETTINGS), as they all
    /// open when it is up: the 101st makes another connection instead of
    /// waiting behind them in NIO's HTTP/2 layer.
    @Test func streamsWaitingForTheConnectionCountAgainstItsLimit() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        let loop = rig.group.next(), proxy = rig.proxy
        let key = EndpointKey(ip: IPv4Address("127.0.0.9")!, port: 9, node: "n1")
        let (before, after, taken) = try loop.submit {
            // A connection that never comes up.
            let h2 = HTTP2Upstream(key: key, pool: proxy.loop(loop).pool) { _, _ in }
            var set = HTTP2Connections()
            set.add(h2)
            for _ in 0..<99 { h2.openStream { _ in } }
            let before = h2.hasRoom
            h2.openStream { _ in }
            return (before, h2.hasRoom, set.take(nil) != nil)
        }.wait()
        #expect(before && !after && !taken)
    }
}
