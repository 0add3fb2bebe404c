import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import WeftCore
import WeftKernel

/// Opaque TCP: a captured connection that is not HTTP is joined to a
/// backend of the Service it dialed, chosen the same way as for requests
/// (least-request, policy-checked), and bytes flow both ways untouched.
enum TCPPassthrough {
    /// A connection a TLSRoute routed: the ClientHello's server name, the
    /// route (for the access log) and the backendRef's cluster it drew.
    struct TLSRouted {
        var serverName: String?
        var route: String
        var cluster: String
    }

    /// `tls`: a TLSRoute's choice (nil: the dialed Service port's own backends).
    static func start(context: ChannelHandlerContext, proxy: ProxyContext, origin: CapturedOrigin, tls: TLSRouted? = nil) {
        let loop = proxy.loop(context.eventLoop)
        let snapshot = proxy.snapshot
        let key = "\(origin.vip):\(origin.port)"
        let frontend = snapshot.table.frontends[key]
        var chosen: EndpointKey?
        if origin.tunnel {
            // The kernel chose the pod; only the tunnel is the proxy's to add.
            guard let pod = snapshot.workloadsByIP[origin.vip.value], let node = pod.node else {
                context.close(promise: nil)
                return
            }
            chosen = EndpointKey(ip: origin.vip, port: origin.port, node: node)
        }
        let endpoints = (tls?.cluster ?? frontend?.cluster).flatMap { snapshot.endpoints[$0] } ?? []
        guard chosen != nil || !endpoints.isEmpty else {
            context.close(promise: nil)
            return
        }
        if chosen == nil {
            chosen = loop.pickReachable(endpoints, proxy: proxy, generation: snapshot.generation, source: origin.source)
        }
        guard let endpoint = chosen else {
            proxy.stats.policyDenied.add(1, ordering: .relaxed)
            context.close(promise: nil)
            return
        }
        // A pod of this node: its AuthorizationPolicies, judged on what a
        // TCP connection shows (another node's proxy judges its own pods).
        if !snapshot.authorization.isEmpty, endpoint.node == proxy.configuration.node, let set = snapshot.authorization[endpoint.ip.value] {
            let decision = set.evaluate(Authorize.local(proxy, snapshot, source: origin.source, port: endpoint.port))
            Authorize.record(proxy, decision, target: endpoint.description)
            guard decision.allowed else { return Authorize.reset(context.channel) }
        }
        let downstream = context.channel
        let detector = context.handler as? ProtocolDetector
        let start = NIODeadline.now(), wallStart = AccessLog.now()
        _ = downstream.setOption(ChannelOptions.autoRead, value: false)
        loop.pool.state(endpoint).inFlight += 1
        let pool = loop.pool
        let tunnel = loop.tunnel(proxy, to: endpoint, from: origin.source, snapshot: snapshot)
        // (A tunnel the kernel balanced: the Service the client dialed.)
        let dialed = origin.dialed.flatMap { snapshot.table.services?[$0] }
        let peers = PeerLabels(snapshot: snapshot, source: origin.source, service: frontend?.service ?? dialed?.name,
                               serviceNamespace: frontend?.namespace ?? dialed?.namespace, upstream: endpoint)

        func failed(_ error: any Error) {
            proxy.logger.info("passthrough connect failed", metadata: ["endpoint": "\(endpoint)", "error": "\(error)"])
            pool.state(endpoint).inFlight -= 1
            pool.recordConnectFailure(endpoint)
            proxy.stats.upstreamConnectFailures.add(1, ordering: .relaxed)
            // Refused by the far node's policy: the client sees a reset.
            if let refused = error as? TunnelRefused, refused.status == 403 { return Authorize.reset(downstream) }
            downstream.close(promise: nil)
        }

        /// Counts the connection's bytes and logs it, once it is over.
        func finished(sent: Int, received: Int, series: ProxyTelemetry.TCPSeries?) {
            series?.closed.increment()
            series?.sent.increment(by: Int64(sent))
            series?.received.increment(by: Int64(received))
            guard AccessLog.covers(snapshot.table.accessLog, namespace: peers.sourceNamespace) else { return }
            var line = JSONLine()
            line.add("start_time", AccessLog.timestamp(wallStart))
            line.add("kind", "tcp")
            if let tls {
                line.add("requested_server_name", tls.serverName ?? "")
                line.add("route", tls.route)
            }
            line.add("duration_ms", milliseconds: Double((NIODeadline.now() - start).nanoseconds) / 1e6)
            line.add("bytes_received", sent)
            line.add("bytes_sent", received)
            line.add("source_address", origin.source.description)
            line.add("source_workload", peers.sourceWorkload)
            line.add("source_namespace", peers.sourceNamespace)
            line.add("destination_service", peers.destinationService)
            line.add("upstream_host", endpoint.description)
            line.add("destination_workload", peers.destinationWorkload)
            line.add("destination_namespace", peers.destinationWorkloadNamespace)
            proxy.accessLog.append(line.finish())
        }

        func opened() -> ProxyTelemetry.TCPSeries? {
            let series = snapshot.table.requestMetrics == false ? nil : loop.telemetry.tcp(peers, proxy.telemetry)
            series?.opened.increment()
            return series
        }

        /// The client's reads go on, with what the detector held first.
        func resume() {
            if let detector { downstream.pipeline.syncOperations.removeHandler(detector, promise: nil) }
            _ = downstream.setOption(ChannelOptions.autoRead, value: true)
            downstream.read()
        }

        if let tunnel, proxy.configuration.express {
            // To another node, at the frame level: a CONNECT stream of a
            // relaying tunnel (TunnelRelay) joined to the client's socket.
            pool.tunnels.relay(tunnel.route, to: endpoint, source: origin.source, identities: tunnel.identities,
                               podConnect: pool.connectTimeout(for: endpoint)) { result in
                switch result {
                case .failure(let error):
                    failed(error)
                case .success(let stream):
                    let series = opened()
                    stream.onFinish = { sent, received in
                        pool.state(endpoint).inFlight -= 1
                        finished(sent: sent, received: received, series: series)
                    }
                    let early = detector?.takeBuffered()
                    do {
                        // Gone meanwhile: no close of it would end the stream.
                        guard downstream.isActive else { throw ChannelError.ioOnClosedChannel }
                        try downstream.pipeline.syncOperations.addHandler(stream)
                    } catch {
                        stream.onFinish = nil
                        pool.state(endpoint).inFlight -= 1
                        stream.cancel()
                        return downstream.close(promise: nil)
                    }
                    if let early, early.readableBytes > 0 { stream.send(early) }
                    // The client's FIN came before the tunnel was there: pass it on now.
                    if detector?.inputClosed ?? false { stream.endOutput() } else { stream.flushTunnel() }
                    resume()
                }
            }
            return
        }

        let connected: (@escaping (Result<Channel, any Error>) -> Void) -> Void
        // A pod of this node over the shortcut: the kernel may take the
        // bytes past the proxy (SpliceLeg), unless MeshConfig switched
        // splicing off (then arming would only cost a report per write).
        let spliceMaps = tunnel == nil ? proxy.splice(under: proxy.snapshot) : nil
        if let tunnel {
            // To another node: a CONNECT stream of the mutual-TLS tunnel.
            connected = { done in
                pool.tunnels.stream(tunnel.route, to: endpoint, source: origin.source, identities: tunnel.identities,
                                    podConnect: pool.connectTimeout(for: endpoint), initialize: { _ in }, done)
            }
        } else {
            let bound = pool.onLoop
            connected = { done in
                pool.bootstrap(for: endpoint)
                    .channelInitializer { channel in
                        // (Set on the loop: no future chained for it.)
                        bound.value.initialize(channel) { _ in try channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: true) }
                    }
                    .connect(endpoint)
                    .assumeIsolated()
                    .whenComplete(done)
            }
        }
        connected { result in
                switch result {
                case .failure(let error):
                    failed(error)
                case .success(let upstream):
                    // The client went away meanwhile (a reset, say). Its
                    // pipeline may not know yet: NIO removes the handlers
                    // of a closed channel in a later task, and a handler
                    // added before that would never hear of the close, so
                    // the backend's connection would be held until the
                    // backend closed it and keepalive found it gone.
                    guard downstream.isActive else {
                        pool.state(endpoint).inFlight -= 1
                        upstream.close(promise: nil)
                        return downstream.close(promise: nil)
                    }
                    let (a, b) = GlueHandler.pair()
                    (a.splice, b.splice) = SpliceLeg.legs(maps: spliceMaps, downstream: downstream, upstream: upstream)
                    OpaqueKeepalive.apply(to: [downstream, upstream], proxy.snapshot.table.tcpKeepalive)
                    a.onClose = { pool.state(endpoint).inFlight -= 1 }
                    let series = opened()
                    a.onFinish = { [splices = (a.splice, b.splice)] read, readBack in
                        // Bytes the kernel took past the proxy count as relayed.
                        let sent = read + (splices.0?.finish() ?? 0)
                        let received = readBack + (splices.1?.finish() ?? 0)
                        finished(sent: sent, received: received, series: series)
                    }
                    do {
                        let early = detector?.takeBuffered()
                        let closedEarly = detector?.inputClosed ?? false
                        try upstream.pipeline.syncOperations.addHandler(b)
                        try downstream.pipeline.syncOperations.addHandler(a)
                        if let early, early.readableBytes > 0 {
                            upstream.writeAndFlush(early, promise: a.splice?.reporting(early.readableBytes, on: upstream.eventLoop))
                        }
                        // The client's FIN came before the backend was there: pass it on now.
                        if closedEarly { upstream.close(mode: .output, promise: nil) }
                        resume()
                    } catch {
                        upstream.close(promise: nil)
                        downstream.close(promise: nil)
                    }
                }
            }
    }
}

/// HTTP/1.1 Upgrade (WebSocket and the like): once the backend answers 101,
/// the proxy forwards the 101 and joins the two connections byte for byte.
/// `context` is the downstream HTTP handler's (HTTPProxyHandler, or
/// InboundHTTP at the far end of a tunnel); it leaves with the codecs.
enum Upgrade {
    static func splice(_ context: ChannelHandlerContext, _ upstream: UpstreamHandler, _ head: HTTPResponseHead,
                       stats: ProxyStats) {
        guard let upstreamChannel = upstream.channel else {
            context.close(promise: nil)
            return
        }
        upstream.sink = nil
        let downstream = context.channel
        var response = head
        response.headers.remove(name: "keep-alive")
        // The 101 goes out through the HTTP encoder; once it is written,
        // the HTTP handlers leave both pipelines (afterResponseEnd: we are
        // inside the upstream decoder's read).
        context.write(NIOAny(HTTPServerResponsePart.head(response)), promise: nil)
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)), promise: nil)
        afterResponseEnd(upstream, on: context.eventLoop) {
            detach(upstreamChannel, downstream: downstream) { held in
                join(context, downstream, upstreamChannel, held, stats)
            }
        }
    }

    /// Runs `body` once NIO's response decoder has passed on the end of
    /// the 101 `upstream` is reading, or at the latest on the next turn of
    /// the loop. The decoder, asked to leave then, hands on what the
    /// backend sent behind its 101 a turn later, but drops what it holds
    /// if it sees the backend's close first; so from here the close waits
    /// in front of it (EOFGate) until it has left. (Until 2026-12-07 the
    /// decoder left a turn later with no gate, and a backend that wrote
    /// and closed at once lost its last bytes whenever its FIN came before
    /// that turn; then, until the gate, when it came in the same read.)
    static func afterResponseEnd(_ upstream: UpstreamHandler, on loop: any EventLoop, _ body: @escaping () -> Void) {
        if let ops = upstream.channel?.pipeline.syncOperations,
           let decoder = try? ops.handler(type: ByteToMessageHandler<HTTPResponseDecoder>.self) {
            try? ops.addHandler(EOFGate(), position: .before(decoder))
        }
        var done = false
        let once = {
            guard !done else { return }
            done = true
            body()
        }
        upstream.onResponseEnd = { _ in once() }
        loop.assumeIsolated().execute { once() }
    }

    /// Takes the HTTP handlers out of an upstream connection whose backend
    /// answered 101 (or, for ExtendedConnect, of the connection behind a
    /// stream), then calls `then` with what the connection read meanwhile,
    /// whatever closed meanwhile: `then` sees to that (a backend gone may
    /// have had its say first: HeldBytes.passOn). Runs once NIO's decoder
    /// has passed on the 101's end (afterResponseEnd).
    static func detach(_ upstreamChannel: any Channel, downstream: any Channel, then: @escaping (HeldBytes) -> Void) {
        do {
            let up = upstreamChannel.pipeline.syncOperations
            try up.removeHandler(up.handler(type: UpstreamHandler.self), promise: nil)
            try up.removeHandler(up.handler(type: HTTPRequestEncoder.self), promise: nil)
            // addHTTPClientHandlers also validates outbound headers.
            if let validator = try? up.handler(type: NIOHTTPRequestHeadersValidator.self) {
                up.removeHandler(validator, promise: nil)
            }
            // The response decoder watches what is written past it
            // (request heads, for the responses to HEAD) and traps on
            // anything else, and NIO takes it out on a later turn of the
            // loop: the glue, which writes bytes, goes in only once it has
            // left. What it still held, and what comes meanwhile, wait in
            // `held` (found by ProxyFuzzTests: a backend that sent 101 and
            // broken bytes after it crashed the proxy).
            let held = HeldBytes()
            try up.addHandler(held)
            let decoderGone = upstreamChannel.eventLoop.makePromise(of: Void.self)
            try up.removeHandler(up.handler(type: ByteToMessageHandler<HTTPResponseDecoder>.self), promise: decoderGone)
            decoderGone.futureResult.assumeIsolated().whenComplete { _ in
                // (The backend's close, if it came meanwhile, now reaches
                // `held` behind what the decoder handed on.)
                EOFGate.open(on: upstreamChannel)
                then(held)
            }
        } catch {
            EOFGate.open(on: upstreamChannel)
            upstreamChannel.close(promise: nil)
            downstream.close(promise: nil)
        }
    }

    /// Glue in place of the HTTP handlers on both sides, once the upstream
    /// has none left; what the upstream read meanwhile goes on through it.
    ///
    /// Between two pods of this node on the shortcut, the kernel may then
    /// splice the connection past the proxy as it does opaque TCP
    /// (docs/shortcut.md, rule 7). Each peer has sent HTTP bytes the proxy
    /// took in (requests before the Upgrade on a kept-alive connection, the
    /// backend's earlier responses), so each direction is armed with what
    /// its connection's ReadTally counted, less what went on to the glue
    /// (whose writes report themselves), and only once every write queued
    /// before the glue has left: the 101 to the client, the request (and a
    /// body, if any) to the backend.
    private static func join(_ context: ChannelHandlerContext, _ downstream: any Channel, _ upstreamChannel: any Channel,
                             _ held: HeldBytes, _ stats: ProxyStats) {
        // (As before the surgery: a client that went meanwhile ends both.)
        guard downstream.isActive else {
            upstreamChannel.close(promise: nil)
            return
        }
        let (a, b) = GlueHandler.pair()
        let tallies = ReadTally.of(downstream).flatMap { d in ReadTally.of(upstreamChannel).map { (d, $0) } }
        // (No splicing for a backend that is gone already.)
        let legs = upstreamChannel.isActive
            ? tallies.map { SpliceLeg.unarmed(maps: $0.0.maps, downstream: downstream, upstream: upstreamChannel) } ?? (nil, nil)
            : (nil, nil)
        (a.splice, b.splice) = legs
        a.onFinish = { read, readBack in
            let spliced = (legs.0?.finish() ?? 0) + (legs.1?.finish() ?? 0)
            stats.upgradedBytes.add(read + readBack + spliced, ordering: .relaxed)
            stats.upgradedBytesSpliced.add(spliced, ordering: .relaxed)
        }
        do {
            let down = downstream.pipeline.syncOperations
            try down.addHandler(a)
            down.removeHandler(context: context, promise: nil)  // the HTTP handler that asked
            // (The request decoder passes on the bytes it holds as it
            // goes, a turn of the loop later.)
            let decoderGone = downstream.eventLoop.makePromise(of: Void.self)
            try HTTP1ServerPipeline.remove(from: down, decoderGone: decoderGone)
            guard upstreamChannel.isActive else {
                // The backend had its say and closed before its decoder
                // left: what it said goes to the client, then the close.
                let glue = try down.context(handler: a)
                held.passOn(through: glue, stats)
                glue.closeAfterWrites()
                return
            }
            try upstreamChannel.pipeline.syncOperations.addHandler(b)
            held.release()
            decoderGone.futureResult.assumeIsolated().whenSuccess {
                // What the client sent behind its request, before the 101,
                // goes on now, though the client may send nothing more (the
                // decoder's bytes come without a read's end, which flushes).
                upstreamChannel.flush()
                guard let (d, u) = tallies, legs.0 != nil || legs.1 != nil else { return }
                // Empty writes complete in order, after those before them.
                let sentDown = downstream.eventLoop.makePromise(of: Void.self)
                let sentUp = upstreamChannel.eventLoop.makePromise(of: Void.self)
                downstream.writeAndFlush(ByteBuffer(), promise: sentDown)
                upstreamChannel.writeAndFlush(ByteBuffer(), promise: sentUp)
                sentDown.futureResult.and(sentUp.futureResult).assumeIsolated().whenSuccess { _ in
                    // (Glue reads only what the tally counted first.)
                    let (taken, takenBack) = (UInt64(a.bytesRead), UInt64(b.bytesRead))
                    if d.count >= taken { legs.0?.arm(base: d.count - taken) }
                    if u.count >= takenBack { legs.1?.arm(base: u.count - takenBack) }
                }
            }
            downstream.read()
            upstreamChannel.read()
        } catch {
            upstreamChannel.close(promise: nil)
            downstream.close(promise: nil)
        }
    }
}

/// What an upstream connection reads while its HTTP handlers leave after a
/// 101, kept for the glue that follows it (release) and passed on to it.
final class HeldBytes: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var context: ChannelHandlerContext?
    private var held: [ByteBuffer] = []
    private var inputClosed = false
    private var error: (any Error)?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { held.append(unwrapInboundIn(data)) }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e { inputClosed = true } else { context.fireUserInboundEventTriggered(event) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if self.error == nil { self.error = error }
    }

    /// What was held, written out through `context` (the client's side of
    /// an upgrade whose backend has closed: this channel has no one left
    /// to read it) and counted as upgraded bytes; no longer held. The
    /// caller flushes, by the close that follows.
    func passOn(through context: ChannelHandlerContext, _ stats: ProxyStats) {
        stats.upgradedBytes.add(held.reduce(0) { $0 + $1.readableBytes }, ordering: .relaxed)
        for buffer in held { context.write(NIOAny(buffer), promise: nil) }
        held.removeAll()
    }

    /// Passes on what was held, in order, to the handler after this one,
    /// and leaves the pipeline.
    func release() {
        guard let context else { return }
        for buffer in held { context.fireChannelRead(wrapInboundOut(buffer)) }
        held.removeAll()
        context.fireChannelReadComplete()
        if inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        if let error { context.fireErrorCaught(error) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
