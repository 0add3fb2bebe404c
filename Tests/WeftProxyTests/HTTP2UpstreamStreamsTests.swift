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
    /// takes it, and NIO's server, the rig's pods, would end a connection
    /// that opened a stream past its limit before they came).
    static func hold(_ rig: ProxyFuzzTests.Rig, _ n: Int) throws -> [Int32] {
        var fds: [Int32] = []
        for i in 0..<n {
            if i > 0 && i % 8 == 0 { usleep(50_000) }
            if i == 8 { try settingsCame(rig) }
            let fd = try #require(ProxyFuzzTests.dial(rig.port(1)))
            ExpectContinueTests.send(fd, "POST /hold HTTP/1.1\r\nhost: grpc.fz\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            fds.append(fd)
        }
        return fds
    }

    /// Waits (2 s at most) until every connection to the pods has its
    /// SETTINGS.
    static func settingsCame(_ rig: ProxyFuzzTests.Rig) throws {
        let proxy = rig.proxy
        let deadline = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < deadline, try Array(rig.group.makeIterator()).reduce(0, { n, loop in
            n + (try loop.submit { proxy.loop(loop).pool.http2AwaitingSettings }.wait())
        }) > 0 {
            usleep(5_000)
        }
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
        Self.endAndRead(held)
        for fd in held { shutdown(fd, Int32(SHUT_RDWR)) }
        try rig.settle()
        #expect(try Self.streamsOpen(rig) == 0)
    }

    /// Under a TrafficPolicy's circuitBreaker.maxConnections the proxy
    /// opens no more than that to a backend (counted from each connect's
    /// start), but for one per event loop at least: at it, a stream past
    /// the backend's limit waits on the least loaded connection for one of
    /// its streams to end, as Envoy's pending requests do, and every
    /// request is answered in the end.
    @Test func maxConnectionsBoundsTheConnectionsAndTheRestWait() throws {
        // (A connect timeout past the test's length: a stream with no
        // timeout of its own waits no longer than that.)
        let rig = try ProxyFuzzTests.Rig(manifests: ProxyFuzzTests.trafficPolicy("grpc", """
            circuitBreaker: {maxConnections: 2}
              timeout: {tcp: {connectTimeout: 30s}}
            """), http2Streams: 4)
        defer { rig.shutdown() }
        // 40 held streams over two pods: 5 connections a pod without the
        // limit.
        let held = try Self.hold(rig, 40)
        defer { for fd in held { close(fd) } }
        #expect(try Self.streamsOpen(rig, awaiting: 40) == 40, "every held request has its stream (some waiting)")
        let runtime = try #require(rig.proxy.snapshot.runtimes.values.first { $0.policy.circuitBreaker != nil })
        let perPod = runtime.backends.map { $0.connections.load(ordering: .relaxed) }
        // Each pod: the limit's two, and one more at most where a loop that
        // had none made its first after the other loop had made two (two
        // loops, as Envoy's workers).
        #expect(perPod.count == 2 && perPod.allSatisfy { (1...3).contains($0) }, "connections per pod: \(perPod)")
        #expect(try Self.connections(rig) == perPod.reduce(0, +), "the pools keep what the breaker counts")
        #expect(try Self.waiting(rig) >= 40 - 4 * perPod.reduce(0, +), "the streams past them wait")
        Self.endAndRead(held)
    }

    /// Of `held`, those answered after `seconds`: their indexes, and the
    /// answers.
    static func answered(_ held: [Int32], after seconds: Double) -> [(Int, String)] {
        usleep(UInt32(seconds * 1_000_000))
        return held.enumerated().compactMap { i, fd in
            let got = ExpectContinueTests.read(fd, seconds: 0.05) { $0.contains("\r\n\r\n") && $0.hasSuffix("\n") }
            return got.isEmpty ? nil : (i, got)
        }
    }

    /// The rig under circuitBreaker maxConnections 1 (one connection per
    /// pod and loop: each loop makes a first) with `maxPendingRequests`, its
    /// pods allowing 4 streams a connection.
    static func breakerRig(maxPendingRequests: Int, connectTimeout: String) throws -> ProxyFuzzTests.Rig {
        try ProxyFuzzTests.Rig(manifests: ProxyFuzzTests.trafficPolicy("grpc", """
            circuitBreaker: {maxConnections: 1, maxPendingRequests: \(maxPendingRequests)}
              timeout: {tcp: {connectTimeout: \(connectTimeout)}}
            """), http2Streams: 4)
    }

    /// Ends the held requests' bodies: each is answered 200 (`first`: the
    /// index of the first, for the messages).
    static func endAndRead(_ fds: some Collection<Int32>, first: Int = 0) {
        for fd in fds { ExpectContinueTests.send(fd, "0\r\n\r\n") }
        for (i, fd) in fds.enumerated() {
            let got = ExpectContinueTests.read(fd, seconds: 4) { $0.hasSuffix("ok\n") }
            #expect(got.hasPrefix("HTTP/1.1 200"), "held request \(first + i): \(got)")
        }
    }

    /// `held` but those `answered`.
    static func except(_ held: [Int32], _ answered: [(Int, String)]) -> [Int32] {
        let gone = Set(answered.map(\.0))
        return held.enumerated().filter { !gone.contains($0.offset) }.map(\.element)
    }

    /// The Service's backends' pending requests (circuitBreaker), summed.
    static func pending(_ rig: ProxyFuzzTests.Rig) throws -> Int {
        let runtime = try #require(rig.proxy.snapshot.runtimes.values.first { $0.policy.circuitBreaker != nil })
        return runtime.backends.reduce(0) { $0 + $1.pending.load(ordering: .relaxed) }
    }

    /// Streams NIO holds past their connections' limits, over the loops.
    static func waiting(_ rig: ProxyFuzzTests.Rig) throws -> Int {
        let proxy = rig.proxy
        return try Array(rig.group.makeIterator()).reduce(0) { n, loop in
            n + (try loop.submit { proxy.loop(loop).pool.streamsWaiting }.wait())
        }
    }

    /// Streams that wait at maxConnections count among their backend's
    /// pending requests, as Envoy's do: at most maxPendingRequests wait per
    /// backend, the rest are answered 503 at once; a waiting stream goes
    /// out when a stream of its connection ends, and gives its place back.
    /// (Without the bound every one of the 30 waits.)
    @Test func maxPendingRequestsBoundsTheStreamsThatWait() throws {
        // maxConnections 1: one connection per pod and loop (each loop
        // makes a first), 4 streams each: 16 open, at most 2 waiting per pod.
        let rig = try Self.breakerRig(maxPendingRequests: 2, connectTimeout: "30s")
        defer { rig.shutdown() }
        let held = try Self.hold(rig, 30)
        defer { for fd in held { close(fd) } }
        let streams = try Self.streamsOpen(rig, awaiting: 20)
        let shed = Self.answered(held, after: 0.5)
        #expect(streams >= 16 && streams <= 20, "\(streams) streams: 16 open, at most 4 waiting")
        #expect(shed.count == 30 - streams, "\(shed.count) answered at once, \(streams) streams")
        for (i, got) in shed {
            #expect(got.hasPrefix("HTTP/1.1 503") && got.contains("maxConnections and maxPendingRequests"), "request \(i): \(got)")
        }
        // (How many wait depends on how the requests fell over the loops
        // and pods: 4 at most, one pair's 4 open each.)
        let waiting = try Self.waiting(rig)
        #expect(waiting >= 1 && waiting <= 4 && streams - waiting <= 16, "\(waiting) waiting of \(streams)")
        #expect(try Self.pending(rig) == waiting, "the waiting streams hold their places")
        // Counted as Envoy counts them: the waits, and what was shed.
        #expect(rig.proxy.stats.connectionWaits.load(ordering: .relaxed) == waiting)
        #expect(rig.proxy.stats.overflows.load(ordering: .relaxed) == shed.count)
        // The first 16 end: streams that waited go out (and stay open, their
        // bodies not ended) and give their places back as they do.
        let rest = Self.except(held, shed)
        Self.endAndRead(rest.prefix(16))
        usleep(200_000)
        let stillWaiting = try Self.waiting(rig)
        #expect(stillWaiting < waiting, "streams that waited went out")
        #expect(try Self.pending(rig) == stillWaiting, "places held only while waiting")
        // The rest end: every one is answered, those that waited too.
        Self.endAndRead(rest.dropFirst(16), first: 16)
        #expect(try Self.pending(rig) == 0, "every place given back")
        for fd in held { shutdown(fd, Int32(SHUT_RDWR)) }
        try rig.settle()
        #expect(try Self.streamsOpen(rig) == 0)
    }

    /// A stream waiting at maxConnections with no timeout of its own waits
    /// at most its backend's connect timeout, as a request waiting for an
    /// HTTP/1.1 connection does, then is answered 503; its place comes back.
    @Test func aWaitingStreamWaitsAtMostTheConnectTimeout() throws {
        let rig = try Self.breakerRig(maxPendingRequests: 100, connectTimeout: "500ms")
        defer { rig.shutdown() }
        let held = try Self.hold(rig, 24)
        defer { for fd in held { close(fd) } }
        let streams = try Self.streamsOpen(rig, awaiting: 24)
        #expect(streams == 24)
        // 16 open on the 4 connections at most (as the requests fell over
        // the loops and pods); the rest wait, and are let go after 500 ms.
        let waiting = try Self.waiting(rig)
        #expect(waiting >= 8, "\(waiting) waiting")
        let timedOut = Self.answered(held, after: 1.5)
        #expect(timedOut.count == waiting, "\(timedOut.count) answered")
        for (i, got) in timedOut {
            #expect(got.hasPrefix("HTTP/1.1 503") && got.contains("no stream to it came free in 500ms"), "request \(i): \(got)")
        }
        #expect(try Self.pending(rig) == 0)
        #expect(try Self.streamsOpen(rig, awaiting: 0) == 24 - waiting)
        Self.endAndRead(Self.except(held, timedOut))
    }

    /// Clients that go (reset) while their streams wait: every place and
    /// stream is given back.
    @Test func waitingStreamsWhoseClientsGoGiveTheirPlacesBack() throws {
        let rig = try Self.breakerRig(maxPendingRequests: 100, connectTimeout: "30s")
        defer { rig.shutdown() }
        let held = try Self.hold(rig, 24)
        #expect(try Self.streamsOpen(rig, awaiting: 24) == 24)
        let waiting = try Self.waiting(rig), pending = try Self.pending(rig)
        #expect(waiting >= 8 && pending == waiting, "\(waiting) waiting, \(pending) pending, 16 open at most")
        // The last held go first (the waiting among them), then the rest.
        for fd in held.reversed() {
            var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
            close(fd)
        }
        try rig.settle()
        #expect(try Self.streamsOpen(rig) == 0)
        #expect(try Self.pending(rig) == 0, "no place kept")
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
