import Foundation
import Glibc
import NIOCore
import NIOHTTP2
import NIOPosix
import Synchronization
import Testing
@testable import WeftCore
@testable import WeftIdentity
@testable import WeftProxy

/// MeshConfig `proxy.streamIdleTimeout` at the delivering end of a tunnel.
/// The test is another node's proxy: with a mesh identity it opens CONNECT
/// streams through the node's real mutual-TLS tunnel listener
/// (TunnelServer) to a pod of the node, and writes into them requests the
/// pod never answers, answers part of, or whose bodies stop. Nothing on
/// the source's side times them (the test sets no timeout), so what ends
/// them is the delivering node's own sweep, passed from the tunnel to its
/// streams (SweepToStreams): on the express path (ExpressHTTP1Handler,
/// delivering), on InboundHTTP (HTTP/1.1 handed over to it, and h2c inside
/// a stream), and with `--no-express` (NIO's HTTP/2 for the tunnel). The
/// timeout is 400 ms, as in StreamIdleTests.
@Suite(.serialized) struct TunnelStreamIdleTests {
    static let source = SpiffeID(trustDomain: "cluster.local", namespace: "fz", serviceAccount: "far")
    static let pod = SpiffeID(trustDomain: "cluster.local", namespace: "fz", serviceAccount: "default")

    /// The delivering node: the fuzz rig's proxy (the stalling backend is
    /// its pod 127.0.0.4) with identities and the tunnel listener, an h2c
    /// pod on the same address that takes requests and answers none, and
    /// the identity of the far pod (fz/far, 198.18.9.10, on node n2).
    final class Node: Sendable {
        let rig: ProxyFuzzTests.Rig
        /// The tunnel listeners, one per event loop, on one port.
        let tunnels: [any Channel]
        var tunnel: any Channel { tunnels[0] }
        let silentH2: any Channel
        let client: TunnelIdentities
        let express: Bool

        /// `table`: what the test sets in the route table beyond the
        /// stream idle timeout.
        /// `front`: a handler put nearest the socket of each tunnel the
        /// node accepts (TunnelServer.start).
        init(express: Bool, table: @escaping (inout ProxyTable) -> Void = { _ in },
             front: (@Sendable () -> any ChannelHandler)? = nil) throws {
            self.express = express
            rig = try ProxyFuzzTests.Rig(table: { $0.streamIdleTimeoutMilliseconds = StreamIdleTests.timeout; table(&$0) },
                                         configure: { $0.express = express })
            let mesh = try TestMesh()
            rig.proxy.install(identities: try mesh.bundle([try mesh.identity("fz", "default")]))
            client = try mesh.bundle([try mesh.identity("fz", "far")])
            var loops: [any EventLoop] = []
            for loop in rig.group.makeIterator() { loops.append(loop) }
            tunnels = try TunnelServer.start(proxy: rig.proxy, loops: loops, port: 0, connections: rig.registry, front: front).0
            silentH2 = try ServerBootstrap(group: rig.group)
                .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
                            mode: .server, connectionConfiguration: .init(), streamConfiguration: .init()) { stream in
                            stream.eventLoop.makeCompletedFuture { try stream.pipeline.syncOperations.addHandler(Silent()) }
                        }
                    }
                }
                .bind(host: "0.0.0.0", port: 0).wait()
        }

        var stallPort: Int { rig.backends[4].localAddress?.port ?? 0 }
        var silentH2Port: Int { silentH2.localAddress?.port ?? 0 }
        var stalls: Int { StreamIdleTests.stalls(rig) }

        /// Opens a stream to the pod's `port`, declaring `protocol` as the
        /// source proxy does (http1, h2), writes `request` and reads as
        /// StreamIdleTests.talk does: until the stream ends, or `done`
        /// holds (then 300 ms more), or 4 s pass.
        func talk(_ protocol: String, port: Int, _ request: [UInt8],
                  done: @escaping ([UInt8]) -> Bool = { _ in false }) throws -> StreamIdleTests.Seen {
            let loop = rig.group.next()
            let route = TunnelRoute(source: TunnelStreamIdleTests.source, destination: TunnelStreamIdleTests.pod,
                                    node: IPv4Address("127.0.0.1")!)
            let context = try #require(client.clientContexts[TunnelStreamIdleTests.source])
            let tunnelPort = tunnel.localAddress?.port ?? 0
            let inbox = Inbox()
            let opened = loop.makePromise(of: Channel.self)
            let connection = try loop.submit {
                let c = TunnelConnection(route: route, port: tunnelPort, context: context, loop: loop) { _ in }
                c.openStream(authority: "127.0.0.4:\(port)",
                             headers: [("x-weft-source", "198.18.9.10"), ("x-weft-protocol", `protocol`)],
                             initialize: { try $0.pipeline.syncOperations.addHandler(Collect(inbox)) }) { opened.completeWith($0) }
                return NIOLoopBound(c, eventLoop: loop)
            }.wait()
            defer { try? loop.submit { connection.value.close() }.wait() }
            loop.scheduleTask(in: .seconds(5)) { opened.fail(ChannelError.connectTimeout(.seconds(5))) }
            let stream = try opened.futureResult.wait()
            try stream.writeAndFlush(ByteBuffer(bytes: request)).wait()
            let start = ContinuousClock.now
            var seen = StreamIdleTests.Seen()
            var deadline = start + .seconds(4)
            while ContinuousClock.now < deadline {
                let (bytes, ended) = inbox.snapshot
                seen.bytes = bytes
                if seen.after == nil, ended || done(bytes) {
                    seen.after = StreamIdleTests.seconds(ContinuousClock.now - start)
                    deadline = min(deadline, ContinuousClock.now + .milliseconds(300))
                }
                seen.closed = ended
                if ended { break }
                usleep(5_000)
            }
            return seen
        }

        func shutdown() {
            for listener in tunnels { try? listener.close().wait() }
            try? silentH2.close().wait()
            rig.shutdown()
        }
    }

    /// What came back on a stream, and whether it ended.
    final class Inbox: Sendable {
        private let state = Mutex<([UInt8], Bool)>(([], false))
        func append(_ b: ByteBuffer) { state.withLock { $0.0 += b.readableBytesView } }
        func end() { state.withLock { $0.1 = true } }
        var snapshot: ([UInt8], Bool) { state.withLock { $0 } }
    }

    final class Collect: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let inbox: Inbox
        init(_ inbox: Inbox) { self.inbox = inbox }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) { inbox.append(unwrapInboundIn(data)) }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let e = event as? ChannelEvent, case .inputClosed = e { inbox.end() }
            context.fireUserInboundEventTriggered(event)
        }

        func channelInactive(context: ChannelHandlerContext) {
            inbox.end()
            context.fireChannelInactive()
        }
    }

    /// An h2c pod's stream that takes its request and never answers.
    final class Silent: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame.FramePayload
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
    }

    /// The ways a request reaches the pod: HTTP/1.1 on the express path
    /// (delivering), HTTP/1.1 on InboundHTTP (handed over by the express
    /// path for a body over its limit, or every request with
    /// `--no-express`), h2c on InboundHTTP.
    enum Way: CustomStringConvertible {
        case express, inbound, h2
        var description: String { self == .express ? "express" : self == .inbound ? "InboundHTTP" : "h2c InboundHTTP" }
        var http2: Bool { self == .h2 }
    }

    static func ways(_ node: Node) -> [Way] { node.express ? [.express, .inbound, .h2] : [.inbound, .h2] }

    /// `path`'s request as `way` sends it: a body of `body.sent` bytes of
    /// `body.declared`; on InboundHTTP behind the express path, one over
    /// its 64 KiB (so it is handed over).
    static func request(_ way: Way, _ node: Node, _ path: String, body: (declared: Int, sent: Int)? = nil) -> [UInt8] {
        switch way {
        case .h2:
            return StreamIdleTests.http2(path, body: body)
        case .express:
            return StreamIdleTests.http1(path, body: body)
        case .inbound:
            guard node.express else { return StreamIdleTests.http1(path, body: body) }
            let big = ExpressHTTP1Handler.maxRequest + 4096
            return StreamIdleTests.http1(path, body: body.map { (big + $0.declared, big + $0.sent) } ?? (big, big))
        }
    }

    static func port(_ way: Way, _ node: Node) -> Int { way == .h2 ? node.silentH2Port : node.stallPort }

    static func status(_ way: Way, _ seen: StreamIdleTests.Seen) -> String? {
        StreamIdleTests.status(way.http2 ? .http2Express : .http1Express, seen)
    }

    static func body(_ way: Way, _ seen: StreamIdleTests.Seen) -> String {
        StreamIdleTests.body(way.http2 ? .http2Express : .http1Express, seen)
    }

    static func answered(_ way: Way) -> ([UInt8]) -> Bool {
        { bytes in way.http2 && StreamIdleTests.streamOver(bytes) }
    }

    static func expectNothingHeld(_ node: Node, _ what: String) throws {
        try node.rig.settle()
        let held = try node.rig.held()
        #expect(held.allSatisfy { $0 == 0 }, "\(what): requests in flight and streams per loop: \(held)")
    }

    static func nodes(_ body: (Node) throws -> Void) throws {
        for express in [true, false] {
            let node = try Node(express: express)
            defer { node.shutdown() }
            try body(node)
        }
    }

    /// Sends `way`'s request for /silent (with `body` declared and begun, if
    /// given) and checks what every stalled request gets: `status` with the
    /// body naming the setting, a timeout after the request and not before,
    /// one stall counted, and the pod's connection let go after.
    @discardableResult
    static func expectStalled(_ node: Node, _ way: Way, body: (declared: Int, sent: Int)? = nil, status: String,
                              done: @escaping ([UInt8]) -> Bool) throws -> StreamIdleTests.Seen {
        let what = "\(way)\(node.express ? "" : ", --no-express")"
        let before = node.stalls
        let seen = try node.talk(way.http2 ? "h2" : "http1", port: Self.port(way, node),
                                 Self.request(way, node, "/silent", body: body), done: done)
        #expect(Self.status(way, seen) == status, "\(what): \(FuzzInput.show(seen.bytes))")
        #expect(Self.body(way, seen) == StreamIdleTests.reason, "\(what)")
        let after = seen.after ?? 99
        #expect(after >= 0.38 && after < 3, "\(what): answered \(after) s after the request")
        #expect(node.stalls - before == 1, "\(what)")
        try Self.expectNothingHeld(node, what)
        return seen
    }

    /// A pod that takes the request and never answers: 504 naming the
    /// setting, a timeout after the request, the pod's connection let go.
    @Test func requestsThePodNeverAnswersGet504() throws {
        try Self.nodes { node in
            for way in Self.ways(node) {
                try Self.expectStalled(node, way, status: "504", done: Self.answered(way))
            }
        }
    }

    /// A request whose body stops coming: 408 naming the setting, and the
    /// rest is not waited for (HTTP/1.1: the stream ends; h2c: its stream
    /// is reset after the answer).
    @Test func requestBodiesThatStopComingGet408() throws {
        try Self.nodes { node in
            for way in Self.ways(node) {
                let seen = try Self.expectStalled(node, way, body: (100, 10), status: "408",
                                                  done: { way.http2 && StreamIdleTests.reset($0) != nil })
                if way.http2 {
                    #expect(StreamIdleTests.reset(seen.bytes) != nil, "\(way): \(FuzzInput.show(seen.bytes))")
                } else {
                    #expect(seen.closed, "\(way)\(node.express ? "" : ", --no-express"): the stream stayed open")
                }
            }
        }
    }

    /// A response that stops part-way ends the stream (the source sees it
    /// broken); one that trickles in, a byte every 150 ms for 1.2 s, is
    /// delivered whole. (HTTP/1.1 pods.)
    @Test func responsesThatStopAreCutAndSlowOnesAreNot() throws {
        try Self.nodes { node in
            for way in Self.ways(node) where !way.http2 {
                let what = "\(way)\(node.express ? "" : ", --no-express")"
                let before = node.stalls
                let cut = try node.talk("http1", port: node.stallPort, Self.request(way, node, "/half"))
                #expect(Self.status(way, cut) == "200", "\(what): \(FuzzInput.show(cut.bytes))")
                #expect(Self.body(way, cut) == "partial", "\(what)")
                #expect(cut.closed, "\(what): the stream stayed open")
                let after = cut.after ?? 99
                #expect(after >= 0.38 && after < 3, "\(what): cut \(after) s after the request")
                #expect(node.stalls - before == 1, "\(what)")
                let slow = try node.talk("http1", port: node.stallPort, Self.request(way, node, "/trickle"),
                                         done: { String(decoding: $0, as: UTF8.self).hasSuffix("abcdefgh") })
                #expect(Self.body(way, slow) == "abcdefgh", "\(what): \(FuzzInput.show(slow.bytes))")
                #expect(node.stalls - before == 1, "\(what): a steady response was cut")
                try Self.expectNothingHeld(node, what)
            }
        }
    }
}
