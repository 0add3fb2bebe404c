import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import NIOSSL
import WeftCore
import WeftIdentity

/// The destination end of a tunnel: one CONNECT stream, from a peer whose
/// certificate chain the TLS handshake verified. Checks, in order, that the
/// target is a pod of this node, that the source address the peer names
/// belongs to a pod of the peer's identity (so no identity speaks for
/// another's address), that NetworkPolicy lets that pod reach the target,
/// and that AuthorizationPolicy allows it; then connects to the pod,
/// answers 200 and joins the stream to the connection byte for byte.
/// Any refusal answers with a status and a reason, and opens nothing.
final class TunnelInbound: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private let proxy: ProxyContext
    private var started = false
    private var early: [ByteBuffer] = []
    private var earlyEnd = false

    init(proxy: ProxyContext) { self.proxy = proxy }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let h) where !started:
            started = true
            open(context: context, headers: h.headers)
        case .data(let d):
            if case .byteBuffer(let b) = d.data, b.readableBytes > 0 { early.append(b) }
            if d.endStream { earlyEnd = true }
        default:
            break
        }
    }

    private func refuse(_ context: ChannelHandlerContext, _ status: Int, _ reason: String) {
        let headers = Self.refusal(proxy, status, reason)
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: headers, endStream: true))), promise: nil)
        context.close(promise: nil)
    }

    /// A health check another node's proxy asks for: run here, against the
    /// pod, if the peer is a node and the table lists the check; the stream
    /// ends with the verdict and carries no bytes.
    private func probe(_ context: ChannelHandlerContext, snapshot: RouteSnapshot, peer: SpiffeID, target: IPv4Address,
                       port: UInt16, path: String) {
        let check: TrafficPolicy.HealthCheck
        switch TunnelProbe.check(proxy, snapshot: snapshot, peer: peer, target: target, port: port, path: path) {
        case .failure(let refusal):
            proxy.stats.probesRefused.add(1, ordering: .relaxed)
            return refuse(context, refusal.status, refusal.reason)
        case .success(let c):
            check = c
        }
        proxy.stats.probesServed.add(1, ordering: .relaxed)
        let stream = context.channel
        TunnelProbe.run(check, target: target, port: port, on: context.eventLoop).assumeIsolated().whenSuccess { outcome in
            var headers = HPACKHeaders([(":status", "200")])
            switch outcome {
            case .success(let status): headers.add(name: "x-weft-probe-status", value: "\(status)")
            case .failure(let refusal): headers = HPACKHeaders([(":status", "\(refusal.status)"), ("x-weft-reason", refusal.reason)])
            }
            let frame = HTTP2Frame.FramePayload.headers(.init(headers: headers, endStream: true))
            stream.writeAndFlush(frame).assumeIsolated().whenComplete { _ in stream.close(promise: nil) }
        }
    }

    /// Answers the CONNECT with 200 and makes the stream a byte channel
    /// (the codec goes in before this handler, which then leaves).
    private func accept(_ context: ChannelHandlerContext) throws {
        let ok = HPACKHeaders([(":status", "200")])
        context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: ok))), promise: nil)
        try context.pipeline.syncOperations.addHandler(TunnelStreamCodec(.server), position: .before(self))
    }

    /// Accepts, sets up what reads the stream, then hands it what came early.
    private func answerAndInstall(_ context: ChannelHandlerContext,
                                  _ install: (ChannelPipeline.SynchronousOperations) throws -> Void) {
        let stream = context.channel
        do {
            let pipeline = stream.pipeline.syncOperations
            try accept(context)
            try install(pipeline)
            let early = self.early
            self.early.removeAll()
            pipeline.removeHandler(self, promise: nil)
            for b in early { pipeline.fireChannelRead(NIOAny(b)) }
            if earlyEnd { pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        } catch {
            stream.close(promise: nil)
        }
    }

    /// What a CONNECT stream gets, decided from its request and the peer's
    /// identity alone: nothing is written, counted or logged here (both
    /// this handler and TunnelRelay, which carries plain TCP streams
    /// without a stream channel, act on it).
    enum Admission {
        /// Refused before it counts as a stream: a status and a reason.
        case refused(Int, String)
        /// A health check another node's proxy asks for.
        case probe(peer: SpiffeID, target: IPv4Address, port: UInt16, path: String, snapshot: RouteSnapshot)
        /// Refused by AuthorizationPolicy whatever it carries.
        case denied(AuthorizationDecision, EndpointKey)
        /// HTTP the source proxy wrote, read request by request.
        case http(http2: Bool, AuthorizationRequest, EndpointKey)
        /// TCP whose first bytes decide (policies that read HTTP apply).
        case detect(AuthorizationRequest, EndpointKey)
        /// TCP to the pod, byte for byte; a decision to record if a policy applied.
        case tcp(EndpointKey, AuthorizationDecision?)
    }

    /// Checks, in order, that the target is a pod of this node, that the
    /// source address the peer names belongs to a pod of the peer's
    /// identity, that NetworkPolicy lets that pod reach the target, and
    /// what AuthorizationPolicy makes of it.
    static func admit(_ proxy: ProxyContext, headers: HPACKHeaders, peer: SpiffeID?, loop: LoopState) -> Admission {
        guard headers.first(name: ":method") == "CONNECT", let authority = headers.first(name: ":authority"),
              let colon = authority.lastIndex(of: ":"), let target = IPv4Address(authority[..<colon]),
              let port = UInt16(authority[authority.index(after: colon)...]) else {
            return .refused(400, "expected CONNECT to IPV4:PORT")
        }
        let snapshot = proxy.snapshot
        let node = proxy.configuration.node
        guard let peer else { return .refused(403, "the peer's certificate carries no SPIFFE ID") }
        guard let destination = snapshot.workloadsByIP[target.value], destination.node == node else {
            return .refused(404, "\(target) is not a pod of node \(node)")
        }
        if let path = headers.first(name: TunnelProbe.header) {
            return .probe(peer: peer, target: target, port: port, path: path, snapshot: snapshot)
        }
        guard let sourceText = headers.first(name: "x-weft-source"), let source = IPv4Address(sourceText),
              let sourcePod = snapshot.workloadsByIP[source.value] else {
            return .refused(403, "the source address is missing or not a mesh pod")
        }
        guard sourcePod.namespace == peer.namespace, sourcePod.serviceAccount == peer.serviceAccount,
              peer.trustDomain == proxy.identities?.trustDomain else {
            return .refused(403, "\(source) is \(sourcePod.namespace)/\(sourcePod.serviceAccount), not \(peer)")
        }
        guard loop.allowed(proxy, generation: snapshot.generation, source: source, destination: target, port: port, node: node) else {
            return .refused(403, "NetworkPolicy does not let \(source) reach \(target):\(port)")
        }
        let key = EndpointKey(ip: target, port: port, node: node)
        let request = AuthorizationRequest(principal: peer.principal, namespace: peer.namespace, sourceIP: source, port: port)
        let set = snapshot.authorization[target.value]
        // HTTP the source proxy wrote (L7 exchanges): read request by
        // request, under the policies in force at each, whether or not any
        // applies now; refused here only if no request could be allowed.
        if let declared = headers.first(name: "x-weft-protocol"), declared == "http1" || declared == "h2" {
            if let set, !set.couldAllowHTTP(request) { return .denied(set.evaluate(request), key) }
            return .http(http2: declared == "h2", request, key)
        }
        guard let set else { return .tcp(key, nil) }
        // A TCP connection is decided now when no HTTP request could change
        // the outcome: allowed on what TCP shows (so no DENY rule can match
        // and an ALLOW rule matches whatever it carries), or denied even if
        // every HTTP part went its way. Otherwise its first bytes say
        // whether it is HTTP.
        let decision = set.evaluate(request)
        if decision.allowed || !set.needsHTTP || !set.couldAllowHTTP(request) {
            return decision.allowed ? .tcp(key, decision) : .denied(decision, key)
        }
        return .detect(request, key)
    }

    /// The SPIFFE ID of the tunnel's peer, from the certificate its TLS
    /// handshake verified (the stream's parent is the tunnel connection).
    static func peer(of connection: Channel?) -> SpiffeID? {
        guard let cert = (try? connection?.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self))?.peerCertificate
        else { return nil }
        return TunnelTLS.identity(of: cert)
    }

    /// The answer to a refused CONNECT, counted and logged.
    static func refusal(_ proxy: ProxyContext, _ status: Int, _ reason: String) -> HPACKHeaders {
        proxy.stats.tunnelRefused.add(1, ordering: .relaxed)
        proxy.logger.info("tunnel stream refused", metadata: ["status": "\(status)", "reason": "\(reason)"])
        return HPACKHeaders([(":status", "\(status)"), ("x-weft-reason", reason)])
    }

    private func open(context: ChannelHandlerContext, headers: HPACKHeaders) {
        let admission = Self.admit(proxy, headers: headers, peer: Self.peer(of: context.channel.parent),
                                   loop: proxy.loop(context.eventLoop))
        switch admission {
        case .refused(let status, let reason):
            return refuse(context, status, reason)
        case .probe(let peer, let target, let port, let path, let snapshot):
            return probe(context, snapshot: snapshot, peer: peer, target: target, port: port, path: path)
        default:
            break
        }
        proxy.stats.tunnelStreamsIn.add(1, ordering: .relaxed)
        let stream = context.channel
        switch admission {
        case .denied(let decision, let key):
            Authorize.record(proxy, decision, target: key.description)
            return refuse(context, 403, decision.reason)
        case .http(let http2, let request, let key):
            return answerAndInstall(context) { pipeline in
                if !http2 && proxy.configuration.express {
                    // Bytes to the pod as they came, request by request.
                    try pipeline.addHandler(ExpressHTTP1Handler(proxy: proxy, delivering: request, to: key))
                } else {
                    try InboundHTTP.install(on: pipeline, http2: http2, proxy: self.proxy, request: request, target: key)
                }
            }
        case .detect(let request, let key):
            return answerAndInstall(context) { pipeline in
                try pipeline.addHandler(InboundDetector(proxy: self.proxy, request: request, target: key))
            }
        case .tcp(let key, let decision):
            if let decision { Authorize.record(proxy, decision, target: key.description) }
            Self.deliver(stream: stream, to: key, proxy: proxy, early: early, earlyEnd: earlyEnd, replacing: self,
                         prepare: { [self] in try accept(context) }, onRefusal: { [self] reason in refuse(context, 502, reason) })
            early.removeAll()
        case .refused, .probe:
            break
        }
    }

    /// A connection to a pod of this node, for a tunnel stream's bytes
    /// (`timeout`: the pod's Service's connect timeout, UpstreamPool.connectTimeout).
    static func connect(to pod: EndpointKey, on loop: any EventLoop, timeout: TimeAmount) -> EventLoopFuture<Channel> {
        // (NIO's own options for a client, TCP_NODELAY; the rest set in the
        // initializer, on the loop, with no future chained for each.)
        ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.settingUp {
                    try channel.syncOptions?.setOption(ChannelOptions.recvAllocator, value: TunnelHTTP2.recvAllocator)
                    try channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                }
            }
            .connect(pod)
    }

    /// Connects to the pod and joins the stream (a byte channel, or about to
    /// be one: `prepare` runs first once the pod answers) to it, sending
    /// what the stream already said and its end if it ended.
    static func deliver(stream: Channel, to target: EndpointKey, proxy: ProxyContext, early: [ByteBuffer], earlyEnd: Bool,
                        replacing handler: any RemovableChannelHandler, prepare: @escaping () throws -> Void = {},
                        onRefusal: @escaping (String) -> Void) {
        _ = stream.setOption(ChannelOptions.autoRead, value: false)
        connect(to: target, on: stream.eventLoop, timeout: proxy.loop(stream.eventLoop).pool.connectTimeout(for: target))
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    onRefusal("cannot connect to \(target): \(error)")
                case .success(let pod):
                    do {
                        try prepare()
                        let (a, b) = GlueHandler.pair()
                        try stream.pipeline.syncOperations.addHandler(a)
                        try pod.pipeline.syncOperations.addHandler(b)
                        for buffer in early { pod.write(buffer, promise: nil) }
                        pod.flush()
                        if earlyEnd { pod.close(mode: .output, promise: nil) }
                        stream.pipeline.syncOperations.removeHandler(handler, promise: nil)
                        _ = stream.setOption(ChannelOptions.autoRead, value: true)
                        stream.read()
                    } catch {
                        pod.close(promise: nil)
                        stream.close(promise: nil)
                    }
                }
            }
    }
}

/// The tunnel listeners: mutual TLS (the client's certificate required and
/// verified against the mesh root), HTTP/2, CONNECT streams.
enum TunnelServer {
    /// One listener per event loop on `port` of every address, as the
    /// captured connections have (ProxyServer.listen): a tunnel from another
    /// node is accepted, and served, by one loop, and new tunnels go to the
    /// loops in turn. The listeners and whether weft_listen_pick deals them out.
    /// `connections`: the proxy's drain reaches each tunnel from another
    /// node through it (a GOAWAY, then a close once its streams are done).
    /// `front` (tests): a handler made for each tunnel, put nearest its
    /// socket.
    static func start(proxy: ProxyContext, loops: [any EventLoop], port: UInt16, connections: ConnectionRegistry,
                      front: (@Sendable () -> any ChannelHandler)? = nil) throws -> ([any Channel], Bool) {
        try ProxyServer.listen(address: IPv4Address(0), port: port, loops: loops,
                               bootstrap: { bootstrap(proxy: proxy, loop: $0, connections: connections, front: front) },
                               logger: proxy.logger)
    }

    /// One loop's listener: its connections stay on that loop. (TCP_NODELAY
    /// comes with each socket from its listener.)
    private static func bootstrap(proxy: ProxyContext, loop: any EventLoop, connections: ConnectionRegistry,
                                  front: (@Sendable () -> any ChannelHandler)?) -> ServerBootstrap {
        ServerBootstrap(group: loop, childGroup: loop)
            .registering(in: connections)
            .childChannelInitializer { channel in
                channel.eventLoop.settingUp {
                    // (On the channel's own loop: no chain of futures, as a
                    // bootstrap's child option would make.)
                    try channel.syncOptions?.setOption(ChannelOptions.recvAllocator, value: TunnelHTTP2.recvAllocator)
                    // The bundle in force now: a renewed one serves new tunnels.
                    guard let context = proxy.identities?.serverContext else {
                        channel.close(promise: nil)
                        return
                    }
                    proxy.stats.tunnelsIn.add(1, ordering: .relaxed)
                    proxy.stats.tunnelsInActive.add(1, ordering: .relaxed)
                    let stats = proxy.stats
                    channel.closeFuture.whenComplete { _ in stats.tunnelsInActive.subtract(1, ordering: .relaxed) }
                    OpaqueKeepalive.tunnel(channel, proxy.snapshot.table.tcpKeepalive)
                    if let front { try channel.pipeline.syncOperations.addHandler(front()) }
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    let handshake = channel.eventLoop.makePromise(of: Void.self), started = NIODeadline.now()
                    let telemetry = proxy.telemetry
                    handshake.futureResult.whenComplete { result in
                        telemetry.handshake(role: "server", ok: (try? result.get()) != nil, duration: NIODeadline.now() - started)
                    }
                    try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(handshake, accepted: started, stats: proxy.stats))
                    try channel.pipeline.syncOperations.addHandler(TLSRecordCoalescer())
                    // The tunnel is not timed; the requests its streams
                    // carry are (the stream idle timeout).
                    let sweeps = SweepToStreams(loop: channel.eventLoop), streams = sweeps.streams
                    let inbound: NIOChannelInitializer = { stream in
                        stream.eventLoop.settingUp {
                            try stream.pipeline.syncOperations.addHandler(TunnelInbound(proxy: proxy))
                            StreamChannels.add(stream, to: streams)
                        }
                    }
                    guard proxy.configuration.express else {
                        let sync = channel.pipeline.syncOperations
                        // The drain (GOAWAY, PING, GOAWAY, close when no stream
                        // is open), which TunnelRelay does on the express path.
                        // It learns of streams from NIOHTTP2Handler's delegate:
                        // the inline multiplexer passes no stream events on,
                        // and without them it would close with streams open.
                        let management = NIOHTTP2ServerConnectionManagementHandler(
                            eventLoop: channel.eventLoop,
                            configuration: .init(maxIdleTime: nil, maxAge: nil, maxGraceTime: nil, keepalive: nil))
                        let idle = InboundTunnelIdle(proxy: proxy, passing: management.http2StreamDelegate)
                        _ = try sync.configureHTTP2Pipeline(
                            mode: .server, connectionConfiguration: TunnelHTTP2.connection, streamConfiguration: TunnelHTTP2.stream,
                            streamDelegate: idle.streamDelegate(on: channel.eventLoop), inboundStreamInitializer: inbound)
                        try sync.addHandler(management, position: .after(try sync.handler(type: NIOHTTP2Handler.self)))
                        try sync.addHandler(idle)
                        try sync.addHandler(sweeps)
                        return
                    }
                    // Weft's own HTTP/2 codec; plain TCP streams at the
                    // frame level (TunnelRelay); the rest get stream
                    // channels from the multiplexer behind it, with the
                    // stream window of the line above.
                    let sync = channel.pipeline.syncOperations
                    try sync.addHandler(HTTP2Codec(allocator: channel.allocator, settings: TunnelHTTP2.codec))
                    try sync.addHandler(TunnelRelay(.server(proxy)))
                    try sync.addHandler(HTTP2StreamMultiplexer(
                        mode: .server, channel: channel, targetWindowSize: TunnelHTTP2.stream.targetWindowSize,
                        outboundBufferSizeHighWatermark: TunnelHTTP2.stream.outboundBufferSizeHighWatermark,
                        outboundBufferSizeLowWatermark: TunnelHTTP2.stream.outboundBufferSizeLowWatermark,
                        inboundStreamInitializer: inbound))
                    try sync.addHandler(sweeps)
                }
            }
    }
}

/// A tunnel from another node with no stream open for twice the source's
/// MeshConfig `proxy.tunnelIdleTimeout` (IdleSweep.tunnelRounds, ten
/// minutes by default) is drained: GOAWAY, PING, GOAWAY, closed with no
/// stream open, as at the proxy's own drain; once more that long, closed
/// at once (a peer that never answers). Weft's sources close a tunnel
/// unused for one timeout themselves (TunnelPool), so this ends only the
/// tunnels of a source that does not: without it a peer with a mesh
/// identity could hold any number of them, and their TLS state, for as
/// long as the node ran. Twice, so that a Weft source always goes first
/// and never races the GOAWAY with a new stream (one that did would have
/// it refused, and open it on a new tunnel). The express path does this in
/// TunnelRelay; this is `--no-express`'s, behind NIO's connection
/// management handler, which it has drain by sending ChannelShouldQuiesceEvent
/// from the pipeline's front; told of streams by NIOHTTP2Handler's
/// delegate, which it passes on to the management handler's.
final class InboundTunnelIdle: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Never

    private let proxy: ProxyContext
    private let passing: NIOHTTP2ServerConnectionManagementHandler.HTTP2StreamDelegate
    private var open = 0
    private var idle = IdleCount()
    private var draining = false

    init(proxy: ProxyContext, passing: NIOHTTP2ServerConnectionManagementHandler.HTTP2StreamDelegate) {
        self.proxy = proxy
        self.passing = passing
    }

    func streamDelegate(on loop: any EventLoop) -> Delegate { Delegate(handler: NIOLoopBound(self, eventLoop: loop)) }

    struct Delegate: NIOHTTP2StreamDelegate {
        let handler: NIOLoopBound<InboundTunnelIdle>

        func streamCreated(_ id: HTTP2StreamID, channel: any Channel) {
            let h = handler.value
            h.passing.streamCreated(id, channel: channel)
            h.open += 1
            h.idle.reset()
        }

        func streamClosed(_ id: HTTP2StreamID, channel: any Channel) {
            let h = handler.value
            h.passing.streamClosed(id, channel: channel)
            h.open -= 1
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent { draining = true }
        if let sweep = event as? IdleSweep {
            switch idle.judge(rounds: sweep.tunnelRounds, busy: open > 0) {
            case .close where !draining:
                proxy.stats.tunnelsInIdleClosed.add(1, ordering: .relaxed)
                // From the front, so that the management handler sees it.
                context.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
            case .overdue:
                return context.close(promise: nil)
            case .close, .stay:
                break
            }
        }
        context.fireUserInboundEventTriggered(event)
    }
}
