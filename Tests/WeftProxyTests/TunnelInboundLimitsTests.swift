import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Testing
@testable import WeftCore
@testable import WeftIdentity
@testable import WeftProxy

/// The delivering node's own bounds on what other nodes hold at its tunnel
/// listener (TunnelServer, real mutual TLS, with and without the express
/// paths), whatever their sources do: a tunnel with no stream open for
/// twice MeshConfig `proxy.tunnelIdleTimeout` (400 ms here, so 800 ms) is
/// drained (GOAWAY, PING, GOAWAY) and closed, and closed at once a while
/// later if its peer never answers; a connection whose TLS handshake is
/// not done within `proxy.requestHeaderTimeout` (400 ms here) is closed.
/// The sources here are a bare TunnelConnection (no pool: it never
/// releases a tunnel itself), a TLS client that says nothing once its
/// handshake is done, and a TCP client that never starts one.
@Suite(.serialized) struct TunnelInboundLimitsTests {
    static let timeout = 400

    static func node(express: Bool, tunnel: Int = timeout) throws -> TunnelStreamIdleTests.Node {
        try TunnelStreamIdleTests.Node(express: express) {
            $0.tunnelIdleTimeoutMilliseconds = tunnel
            $0.requestHeaderTimeoutMilliseconds = timeout
        }
    }

    /// When something closed, seen from another thread.
    final class Closed: Sendable {
        private let at = Mutex<ContinuousClock.Instant?>(nil)
        func now() { at.withLock { if $0 == nil { $0 = .now } } }
        var instant: ContinuousClock.Instant? { at.withLock { $0 } }

        /// Waits up to `seconds` for the close; seconds from `start` to it.
        func wait(from start: ContinuousClock.Instant, within seconds: Double) -> Double? {
            let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
            while ContinuousClock.now < end {
                if let at = instant { return TunnelInboundLimitsTests.seconds(at - start) }
                usleep(10_000)
            }
            return nil
        }
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    /// A source that keeps its tunnel however long it goes unused.
    final class Source: Sendable {
        let loop: any EventLoop
        let connection: NIOLoopBound<TunnelConnection>
        let closed = Closed()

        /// `openTimeout`: how long an open waits for the node (beyond
        /// `podConnect`) before it takes the tunnel as stuck.
        init(_ node: TunnelStreamIdleTests.Node, openTimeout: TimeAmount = TunnelHTTP2.openTimeout) throws {
            loop = node.rig.group.next()
            let route = TunnelRoute(source: TunnelStreamIdleTests.source, destination: TunnelStreamIdleTests.pod,
                                    node: IPv4Address("127.0.0.1")!)
            let context = try #require(node.client.clientContexts[TunnelStreamIdleTests.source])
            let port = node.tunnel.localAddress?.port ?? 0, closed = closed, loop = loop
            connection = try loop.submit {
                NIOLoopBound(TunnelConnection(route: route, port: port, context: context, loop: loop, openTimeout: openTimeout) { _ in
                    closed.now()
                }, eventLoop: loop)
            }.wait()
        }

        /// An opaque stream to the node's HTTP/1.1 pod (or to 127.0.0.4:`port`),
        /// the node's connect to it allowed `podConnect` (TunnelConnection.openStream).
        func open(_ node: TunnelStreamIdleTests.Node, port: Int? = nil, podConnect: TimeAmount? = nil) throws -> any Channel {
            let opened = loop.makePromise(of: Channel.self)
            let port = port ?? node.rig.backends[0].localAddress?.port ?? 0, connection = connection
            try loop.submit {
                connection.value.openStream(authority: "127.0.0.4:\(port)", headers: [("x-weft-source", "198.18.9.10")],
                                            podConnect: podConnect, initialize: { _ in }) { opened.completeWith($0) }
            }.wait()
            loop.scheduleTask(in: .seconds(5)) { opened.fail(ChannelError.connectTimeout(.seconds(5))) }
            return try opened.futureResult.wait()
        }

        func close() { try? loop.submit { self.connection.value.close() }.wait() }
    }

    /// A plain client of the tunnel port: TCP only (`tls` nil), or mutual
    /// TLS with a mesh identity and nothing said after the handshake.
    static func connect(_ node: TunnelStreamIdleTests.Node, tls: NIOSSLContext?, handshake: EventLoopPromise<Void>? = nil,
                        closed: Closed) throws -> any Channel {
        let channel = try ClientBootstrap(group: node.rig.group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    channel.closeFuture.whenComplete { _ in closed.now() }
                    guard let tls, let handshake else { return }
                    try channel.pipeline.syncOperations.addHandler(
                        try NIOSSLClientHandler(context: tls, serverHostname: TunnelTLS.serverName(for: TunnelStreamIdleTests.pod)))
                    try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(handshake))
                }
            }
            .connect(host: "127.0.0.1", port: node.tunnel.localAddress?.port ?? 0).wait()
        return channel
    }

    @Test(arguments: [true, false])
    func tunnelsWithNoStreamOpenAreDrainedAndClosed(express: Bool) throws {
        let node = try Self.node(express: express)
        defer { node.shutdown() }
        let mode = express ? "express" : "--no-express"
        let stats = node.rig.proxy.stats

        // A stream held open with nothing on it for 2 s (two and a half
        // of the node's 800 ms) keeps its tunnel; the handshake's bound
        // (400 ms) does not touch a tunnel whose handshake was done.
        let source = try Source(node)
        defer { source.close() }
        let stream = try source.open(node)
        usleep(2_000_000)
        #expect(stream.isActive && source.closed.instant == nil, "\(mode): a tunnel with a stream open was closed")
        #expect(stats.tunnelsInIdleClosed.load(ordering: .relaxed) == 0)
        #expect(stats.tunnelHandshakeTimeouts.load(ordering: .relaxed) == 0)

        // Its stream closed, the tunnel is drained and closed by the node
        // 800 ms to about a second later (a sweep's slack); the source
        // answers the PING, so well before the 1.6 s of one that does not.
        let start = ContinuousClock.now
        stream.close(promise: nil)  // (its future fails: the stream is reset)
        let gone = source.closed.wait(from: start, within: 3)
        #expect(gone != nil && gone! >= 0.7 && gone! < 1.6,
                "\(mode): the tunnel with no stream open closed after \(gone.map { "\($0) s" } ?? "never")")
        #expect(stats.tunnelsInIdleClosed.load(ordering: .relaxed) == 1)

        // A peer that finishes its handshake and then says nothing (no
        // HTTP/2 preface, no answer to the PING) is closed all the same,
        // after twice that (1.6 s to about 2 s).
        let silent = Closed()
        let handshake = node.rig.group.next().makePromise(of: Void.self)
        let tls = try #require(node.client.clientContexts[TunnelStreamIdleTests.source])
        let peer = try Self.connect(node, tls: tls, handshake: handshake, closed: silent)
        defer { peer.close(promise: nil) }
        try handshake.futureResult.wait()
        let handshaken = ContinuousClock.now
        let cut = silent.wait(from: handshaken, within: 4)
        #expect(cut != nil && cut! >= 1.4 && cut! < 3,
                "\(mode): a silent peer after its handshake was closed after \(cut.map { "\($0) s" } ?? "never")")
        #expect(stats.tunnelsInIdleClosed.load(ordering: .relaxed) == 2)
        #expect(stats.tunnelHandshakeTimeouts.load(ordering: .relaxed) == 0)
        // (The node counts a tunnel closed once its side of the close has
        // run, which the peer may see a moment before: up to a second.)
        var open = stats.tunnelsInActive.load(ordering: .relaxed)
        for _ in 0..<100 where open != 0 {
            usleep(10_000)
            open = stats.tunnelsInActive.load(ordering: .relaxed)
        }
        #expect(open == 0, "\(mode): tunnels still counted open")
    }

    /// `tunnelIdleTimeout: 0s`: the node keeps a tunnel with no stream
    /// open as its source does, however long.
    @Test func withNoTimeoutTunnelsAreKept() throws {
        let node = try Self.node(express: true, tunnel: 0)
        defer { node.shutdown() }
        let source = try Source(node)
        defer { source.close() }
        let stream = try source.open(node)
        stream.close(promise: nil)
        usleep(2_000_000)
        #expect(source.closed.instant == nil, "a tunnel was closed with tunnelIdleTimeout 0s")
        #expect(node.rig.proxy.stats.tunnelsInIdleClosed.load(ordering: .relaxed) == 0)
    }

    /// A TCP connection that never starts a TLS handshake, and one that
    /// stops partway through its first record, are closed 400 ms to half
    /// a second after they were taken, with and without the express paths.
    @Test(arguments: [true, false])
    func handshakesNotDoneInTimeAreCut(express: Bool) throws {
        let node = try Self.node(express: express)
        defer { node.shutdown() }
        let mode = express ? "express" : "--no-express"
        for partial in [false, true] {
            let closed = Closed()
            let start = ContinuousClock.now
            let channel = try Self.connect(node, tls: nil, closed: closed)
            defer { channel.close(promise: nil) }
            if partial {
                // A handshake record's header, and 5 of the 512 bytes it declares.
                try channel.writeAndFlush(ByteBuffer(bytes: [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])).wait()
            }
            let cut = closed.wait(from: start, within: 3)
            #expect(cut != nil && cut! >= 0.35 && cut! < 1.5,
                    "\(mode), \(partial ? "a partial ClientHello" : "no ClientHello"): closed after \(cut.map { "\($0) s" } ?? "never")")
        }
        #expect(node.rig.proxy.stats.tunnelHandshakeTimeouts.load(ordering: .relaxed) == 2)
        #expect(node.rig.proxy.stats.tunnelsInIdleClosed.load(ordering: .relaxed) == 0)
    }
}
