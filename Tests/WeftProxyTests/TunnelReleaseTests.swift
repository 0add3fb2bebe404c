import Foundation
import Glibc
import NIOCore
import NIOPosix
import Synchronization
import Testing
@testable import WeftCore
@testable import WeftIdentity
@testable import WeftProxy

/// MeshConfig `proxy.tunnelIdleTimeout` at the source end of the tunnels:
/// a source node's TunnelPool (400 ms here) opens streams through the
/// delivering node's real mutual-TLS tunnel listener (TunnelServer, with
/// and without the express paths) to a pod of it, and closes a tunnel
/// once nothing has used it for the timeout: no opaque stream, no HTTP
/// stream but those the upstream pool holds idle (the test says which),
/// nothing being opened, nothing read. A tunnel in use is kept however
/// long; a released one is replaced by the next stream.
@Suite(.serialized) struct TunnelReleaseTests {
    /// The source end: a pool on one of the rig's loops, its idle streams
    /// as the test sets them.
    final class Source: Sendable {
        let node: TunnelStreamIdleTests.Node
        let loop: any EventLoop
        let stats = ProxyStats()
        let idle = IdleStreams()
        let pool: NIOLoopBound<TunnelPool>

        init(_ node: TunnelStreamIdleTests.Node, timeout: Int) throws {
            self.node = node
            let loop = node.rig.group.next()
            self.loop = loop
            let port = UInt16(node.tunnel.localAddress?.port ?? 0)
            let stats = stats, idle = idle
            pool = try loop.submit {
                let pool = TunnelPool(loop: loop, port: port, codec: node.express, stats: stats)
                pool.unusedTimeout = { timeout }
                pool.idleStreams = { idle.set.withLock { $0 } }
                return NIOLoopBound(pool, eventLoop: loop)
            }.wait()
        }

        var opened: Int { stats.tunnelsOut.load(ordering: .relaxed) }
        var released: Int { stats.tunnelsReleased.load(ordering: .relaxed) }

        /// A stream to the node's HTTP/1.1 pod: one that carries HTTP (kept
        /// idle between exchanges by an upstream pool) or an opaque one.
        func open(http: Bool) throws -> (stream: any Channel, inbox: TunnelStreamIdleTests.Inbox) {
            let inbox = TunnelStreamIdleTests.Inbox()
            let opened = loop.makePromise(of: Channel.self)
            let route = TunnelRoute(source: TunnelStreamIdleTests.source, destination: TunnelStreamIdleTests.pod,
                                    node: IPv4Address("127.0.0.1")!)
            let target = EndpointKey(ip: IPv4Address("127.0.0.4")!, port: UInt16(node.rig.backends[0].localAddress?.port ?? 0), node: "n1")
            let identities = node.client, pool = pool
            try loop.submit {
                pool.value.stream(route, to: target, source: IPv4Address("198.18.9.10")!, identities: identities,
                                  http: http ? "http1" : nil,
                                  initialize: { try $0.pipeline.syncOperations.addHandler(TunnelStreamIdleTests.Collect(inbox)) }) {
                    opened.completeWith($0)
                }
            }.wait()
            loop.scheduleTask(in: .seconds(5)) { opened.fail(ChannelError.connectTimeout(.seconds(5))) }
            return (try opened.futureResult.wait(), inbox)
        }

        /// One HTTP/1.1 exchange on a stream; whether it was answered.
        func exchange(_ stream: any Channel, _ inbox: TunnelStreamIdleTests.Inbox) -> Bool {
            let before = inbox.snapshot.0.count
            guard (try? stream.writeAndFlush(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: pod\r\n\r\n")).wait()) != nil else { return false }
            for _ in 0..<400 {
                let bytes = inbox.snapshot.0.dropFirst(before)
                if String(decoding: bytes, as: UTF8.self).hasSuffix("ok\n") { return true }
                usleep(5_000)
            }
            return false
        }

        func markIdle(_ stream: any Channel) { idle.set.withLock { _ = $0.insert(ObjectIdentifier(stream)) } }

        func shutdown() {
            try? loop.submit { self.pool.value.closeAll() }.wait()
        }
    }

    /// The stream channels the source's upstream pool would hold idle.
    final class IdleStreams: Sendable {
        let set = Mutex<Set<ObjectIdentifier>>([])
    }

    /// Waits up to `seconds` for `channel` to close; how long it took.
    static func closed(_ channel: any Channel, within seconds: Double) -> Double? {
        let start = Date()
        while Date().timeIntervalSince(start) < seconds {
            if !channel.isActive { return Date().timeIntervalSince(start) }
            usleep(10_000)
        }
        return nil
    }

    @Test(arguments: [true, false])
    func unusedTunnelsAreReleasedAndTunnelsInUseKept(express: Bool) throws {
        let node = try TunnelStreamIdleTests.Node(express: express)
        defer { node.shutdown() }
        let source = try Source(node, timeout: 400)
        defer { source.shutdown() }
        let mode = express ? "express" : "--no-express"

        // An opaque stream (TCP) held open with nothing on it keeps its
        // tunnel for three timeouts; closed, the tunnel goes within about
        // one (400-500 ms, and a sweep's slack).
        let (tcp, _) = try source.open(http: false)
        let tunnel = try #require(tcp.parent)
        usleep(1_200_000)
        #expect(tunnel.isActive && tcp.isActive && source.released == 0, "\(mode): an opaque stream's tunnel was released")
        tcp.close(promise: nil)  // (its future fails: the stream is reset)
        let gone = Self.closed(tunnel, within: 2)
        #expect(gone != nil && gone! >= 0.3, "\(mode): the unused tunnel closed after \(gone.map { "\($0) s" } ?? "never")")
        #expect(source.released == 1 && source.opened == 1)

        // An HTTP stream with an exchange in flight, or idle but used every
        // 150 ms (its answers read on the tunnel), keeps it; once the
        // upstream pool holds it idle and nothing moves, the tunnel and
        // the stream close.
        let (http, inbox) = try source.open(http: true)
        let second = try #require(http.parent)
        #expect(source.opened == 2, "\(mode): the next stream after a release opened a new tunnel")
        #expect(source.exchange(http, inbox), "\(mode): the new tunnel's exchange")
        usleep(1_200_000)
        #expect(second.isActive && source.released == 1, "\(mode): an HTTP stream not held idle had its tunnel released")
        source.markIdle(http)
        for _ in 0..<8 {
            usleep(150_000)
            #expect(source.exchange(http, inbox), "\(mode): an exchange on a tunnel in use")
        }
        #expect(second.isActive && source.released == 1, "\(mode): a tunnel whose idle stream was in use was released")
        let released = Self.closed(second, within: 2)
        #expect(released != nil && released! >= 0.3, "\(mode): the tunnel of an idle stream closed after \(released.map { "\($0) s" } ?? "never")")
        #expect(Self.closed(http, within: 1) != nil && source.released == 2)
    }

    /// `tunnelIdleTimeout: 0s`: tunnels are kept however long unused, and
    /// the next stream goes on the same one.
    @Test func withNoTimeoutTunnelsAreKept() throws {
        let node = try TunnelStreamIdleTests.Node(express: true)
        defer { node.shutdown() }
        let source = try Source(node, timeout: 0)
        defer { source.shutdown() }
        let (tcp, _) = try source.open(http: false)
        let tunnel = try #require(tcp.parent)
        tcp.close(promise: nil)  // (its future fails: the stream is reset)
        usleep(1_500_000)
        #expect(tunnel.isActive && source.released == 0)
        let (again, _) = try source.open(http: false)
        #expect(again.parent === tunnel && source.opened == 1)
    }
}
