import Glibc
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import WeftCore

/// AuthorizationPolicy in the proxy. The proxy decides for the pods of its
/// own node only: for a request it delivers itself to a local backend
/// (the source is then a local pod too, attested by capture), and for every
/// tunnel stream that arrives (the peer proven by its certificate).
enum Authorize {
    /// A request from a pod of this node: its identity is the node's to
    /// vouch for (the kernel captured it from the pod's cgroup).
    static func local(_ proxy: ProxyContext, _ snapshot: RouteSnapshot, source: IPv4Address, port: UInt16)
        -> AuthorizationRequest
    {
        let ref = snapshot.workloadsByIP[source.value]
        let principal = ref.flatMap { r in proxy.identities.map { "\($0.trustDomain)/ns/\(r.namespace)/sa/\(r.serviceAccount)" } }
        return AuthorizationRequest(principal: principal, namespace: ref?.namespace, sourceIP: source, port: port)
    }

    static func http(_ head: HTTPRequestHead, paths mode: RequestPath.Mode) -> AuthorizationRequest.HTTP {
        http(method: head.method.rawValue, target: head.uri, headers: head.headers.map { ($0.name.lowercased(), $0.value) },
             paths: mode)
    }

    /// The request as policies read it: the target's path without its
    /// query, in normal form by MeshConfig's `mode` (RequestPath: under
    /// BASE, `/./admin`, `/x/../admin` and `/%61dmin` are all `/admin` to a
    /// rule), and the header fields by lower-case name.
    static func http(method: String, target: String, headers: [(name: String, value: String)],
                     paths mode: RequestPath.Mode) -> AuthorizationRequest.HTTP {
        let raw = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? target[...]
        var path = String(raw)
        if case .changed(let normal) = RequestPath.normalize(raw, mode: mode, lenient: true) { path = normal }
        return AuthorizationRequest.HTTP(method: method, path: path, host: headers.first { $0.name == "host" }?.value,
                                         headers: headers)
    }

    /// Counts and logs a decision.
    static func record(_ proxy: ProxyContext, _ decision: AuthorizationDecision, target: String) {
        if decision.allowed {
            proxy.stats.authzAllowed.add(1, ordering: .relaxed)
        } else {
            proxy.stats.authzDenied.add(1, ordering: .relaxed)
            proxy.logger.info("authorization denied", metadata: ["target": "\(target)", "reason": "\(decision.reason)"])
        }
        if !decision.audited.isEmpty {
            proxy.stats.authzAudited.add(1, ordering: .relaxed)
            proxy.logger.notice("authorization audit", metadata: [
                "target": "\(target)", "allowed": "\(decision.allowed)", "policies": "\(decision.audited.joined(separator: ", "))",
            ])
        }
    }

    static func forbiddenBody(_ reason: String) -> String { "weft: RBAC: access denied: \(reason)\n" }

    /// On a response from another node's proxy: the pod was never reached
    /// (nothing was sent to it), so the exchange may be tried elsewhere.
    static let refusedHeader = "x-weft-refused"

    /// Closes a TCP connection with a reset, as a refused connection should look.
    static func reset(_ channel: Channel) {
        guard let provider = channel as? any SocketOptionProvider else { return channel.close(promise: nil) }
        provider.setSoLinger(linger(l_onoff: 1, l_linger: 0)).whenComplete { _ in channel.close(promise: nil) }
    }
}

/// The destination end of a tunnel stream whose pod has policies that read
/// HTTP: after the CONNECT is answered, the first bytes say what follows.
/// HTTP/1.x and HTTP/2 are decided per request (`InboundHTTP`); anything
/// else once, as TCP, then joined to the pod.
final class InboundDetector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let proxy: ProxyContext
    private let request: AuthorizationRequest
    private let target: EndpointKey
    private var buffered: ByteBuffer?
    private var inputClosed = false
    private var decided = false
    private var timer: Scheduled<Void>?

    init(proxy: ProxyContext, request: AuthorizationRequest, target: EndpointKey) {
        self.proxy = proxy
        self.request = request
        self.target = target
    }

    func handlerAdded(context: ChannelHandlerContext) {
        timer = context.eventLoop.assumeIsolated().scheduleTask(in: .init(proxy.configuration.detectTimeout)) { [weak self] in
            self?.decide(.tcp, context: context)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffered == nil { buffered = incoming } else { buffered!.writeBuffer(&incoming) }
        let verdict = ProtocolDetector.classify(buffered!.readableBytesView)
        if verdict != .undecided { decide(verdict, context: context) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e, !decided {
            inputClosed = true
            let verdict = buffered.map { ProtocolDetector.classify($0.readableBytesView) } ?? .tcp
            return decide(verdict == .undecided ? .tcp : verdict, context: context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        context.fireChannelInactive()
    }

    private func decide(_ verdict: ProtocolDetector.Verdict, context: ChannelHandlerContext) {
        guard !decided else { return }
        decided = true
        timer?.cancel()
        let pipeline = context.pipeline.syncOperations
        do {
            switch verdict {
            case .http1, .http2:
                try InboundHTTP.install(on: pipeline, http2: verdict == .http2, proxy: proxy, request: request, target: target)
            case .tcp, .undecided:
                // Judged on the policies in force now, as TCP.
                let decision = proxy.snapshot.authorization[target.ip.value]?.evaluate(request)
                if let decision { Authorize.record(proxy, decision, target: target.description) }
                guard decision?.allowed ?? true else {
                    context.close(promise: nil)  // the stream is reset; the source closes its connection
                    return
                }
                TunnelInbound.deliver(stream: context.channel, to: target, proxy: proxy, early: buffered.map { [$0] } ?? [],
                                      earlyEnd: inputClosed, replacing: self, onRefusal: { _ in context.close(promise: nil) })
                buffered = nil
                return
            }
        } catch {
            proxy.logger.warning("cannot set up the inbound \(verdict) pipeline: \(error)")
            context.close(promise: nil)
            return
        }
        if let buffered, buffered.readableBytes > 0 {
            context.fireChannelRead(wrapInboundOut(buffered))
            self.buffered = nil
            context.fireChannelReadComplete()
        }
        if inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        pipeline.removeHandler(context: context, promise: nil)
    }
}

/// One inbound HTTP connection (HTTP/1.x) or stream (HTTP/2) to a pod of
/// this node: every request is decided on by the policies in force when it
/// arrives, then sent to the pod over the proxy's pool, or answered 403
/// with the reason. Requests on an HTTP/1.x connection are handled one at a
/// time, in order.
final class InboundHTTP: ChannelDuplexHandler, RemovableChannelHandler, UpstreamSink {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State { case idle, denying, connecting, forwarding }

    private let proxy: ProxyContext
    private let base: AuthorizationRequest
    private let target: EndpointKey
    private let isHTTP2: Bool
    private var context: ChannelHandlerContext?
    private var state = State.idle
    private var keepAlive = true
    private var idempotent = false
    private var isUpgrade = false
    /// The current request's end has been read.
    private var requestEnded = false
    private var upstream: UpstreamHandler?
    private var pending: [HTTPClientRequestPart] = []
    /// Parts of a pipelined request that came before the previous ended.
    private var queued: [HTTPServerRequestPart] = []
    /// A read held back (bodyHeld), to be made when the pod takes more.
    private var readPending = false
    /// The source ended its side (a socket's FIN, a tunnel stream's
    /// END_STREAM): what it sent is answered, then the stream ends.
    private var inputClosed = false
    private var ending = false
    /// Switched protocols: the glue takes the stream's end from here.
    private var upgraded = false
    /// MeshConfig proxy.streamIdleTimeout, as on the source's paths: the
    /// sweeps through which nothing moved on the request in flight (no
    /// part of it from the source while it is read, nothing of its
    /// response from the pod); the sweep reaches a tunnel stream through
    /// its connection (SweepToStreams).
    private var stall = StallCount()
    /// The current response's head went to the stream.
    private var responded = false
    /// The stream (or connection) ended, or the handler left it.
    private var gone = false

    init(proxy: ProxyContext, request: AuthorizationRequest, target: EndpointKey, isHTTP2: Bool) {
        self.proxy = proxy
        self.base = request
        self.target = target
        self.isHTTP2 = isHTTP2
    }

    /// Sets a byte channel up to read HTTP/1.x or HTTP/2 requests into InboundHTTP handlers.
    static func install(on pipeline: ChannelPipeline.SynchronousOperations, http2: Bool, proxy: ProxyContext,
                        request: AuthorizationRequest, target: EndpointKey) throws {
        if http2 {
            let sweeps = SweepToStreams(loop: pipeline.eventLoop), streams = sweeps.streams
            _ = try pipeline.configureHTTP2Pipeline(mode: .server, connectionConfiguration: TunnelHTTP2.connection,
                                                    streamConfiguration: TunnelHTTP2.stream) { stream in
                stream.eventLoop.settingUp {
                    try stream.pipeline.syncOperations.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
                    try stream.pipeline.syncOperations.addHandler(InboundHTTP(proxy: proxy, request: request, target: target, isHTTP2: true))
                    StreamChannels.add(stream, to: streams)
                }
            }
            try pipeline.addHandler(sweeps)
        } else {
            try HTTP1ServerPipeline.add(to: pipeline, proxy: proxy,
                                        then: InboundHTTP(proxy: proxy, request: request, target: target, isHTTP2: false))
        }
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        gone = true
        upstream?.close()
        upstream = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        if state == .connecting || state == .forwarding { upstream?.close() }
        upstream = nil
        gone = true
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        stall.moved()
        if !queued.isEmpty {
            queued.append(part)
            return
        }
        handle(part, context: context)
    }

    private func handle(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        switch part {
        case .head(let head):
            guard state == .idle else {
                queued.append(part)
                return
            }
            // (NIO's decoder parses nothing after an upgrade request: the
            // stream ends after its answer unless the upgrade happens.)
            keepAlive = head.isKeepAlive && (isHTTP2 || !HTTPProxyHandler.stopsTheDecoder(head))
            requestEnded = false
            responded = false
            idempotent = [.GET, .HEAD, .OPTIONS, .PUT, .DELETE, .TRACE].contains(head.method)
            isUpgrade = !isHTTP2 && HTTPProxyHandler.isUpgradeRequest(head)
            let snapshot = proxy.snapshot
            if let set = snapshot.authorization[target.ip.value] {
                var request = base
                request.http = Authorize.http(head, paths: snapshot.table.pathNormalization ?? .base)
                let decision = set.evaluate(request)
                Authorize.record(proxy, decision, target: target.description)
                guard decision.allowed else {
                    state = .denying
                    respond(context, .forbidden, Authorize.forbiddenBody(decision.reason),
                            grpcType: head.headers.first(name: "content-type"))
                    return
                }
            }
            state = .connecting
            // The pod's connection is HTTP/1.1, kept alive, and the body's
            // framing the encoder's own (as on the full path): an HTTP/1.0
            // head with a chunked body went out as 1.0, and a
            // "transfer-encoding: gzip, chunked" one as it came with the
            // body unframed, and the pod, waiting for the rest, never
            // answered (mangledDeliveriesNeitherCrashNorHangTheProxy).
            var outgoing = head
            outgoing.version = .http1_1
            HTTPProxyHandler.stripForForwarding(&outgoing.headers, keepUpgrade: isUpgrade)
            pending = [.head(outgoing)]
            let loop = proxy.loop(context.eventLoop)
            let pool = loop.pool, key = target, http1 = !isHTTP2
            loop.pool.acquire(key, protocol: isHTTP2 ? .http2 : .http1) { [weak self] result in
                // (A stream that ended while the pod's connection was
                // made: a pod that never answered held a stream, or a
                // connection, for good, past every sweep.)
                guard let self, self.state == .connecting, !self.gone else {
                    if case .success(let h) = result { h.close() }
                    return
                }
                switch result {
                case .failure(let error):
                    self.state = .denying
                    self.pending.removeAll()
                    self.resumeReads()
                    // Nothing reached the pod: the source proxy takes this
                    // as a refused connect and tries another backend.
                    self.proxy.logger.info("tunnelled request could not reach its pod", metadata: ["target": "\(key)", "error": "\(error)"])
                    self.respond(context, .badGateway, "weft: cannot connect to \(key): \(error)\n", refused: true)
                    if self.requestEnded { self.exchangeDone(context) }
                case .success(let upstream):
                    if upstream.onResponseEnd == nil {
                        upstream.onResponseEnd = { [weak upstream] reusable in
                            guard let upstream else { return }
                            pool.release(upstream, to: key, reusable: reusable && http1)
                        }
                    }
                    self.upstream = upstream
                    self.state = .forwarding
                    upstream.begin(sink: self, keepAlive: self.keepAlive)
                    for p in self.pending { upstream.send(p, flush: false) }
                    self.pending.removeAll()
                    upstream.flush()
                    self.resumeReads()
                }
            }
        case .body(let body):
            switch state {
            case .connecting: pending.append(.body(.byteBuffer(body)))
            case .forwarding: upstream?.send(.body(.byteBuffer(body)), flush: false)
            default: break
            }
        case .end(let trailers):
            requestEnded = true
            switch state {
            case .connecting: pending.append(.end(trailers))
            case .forwarding: upstream?.send(.end(trailers), flush: true)
            case .denying: exchangeDone(context)
            case .idle: break
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        upstream?.flush()
        context.fireChannelReadComplete()
    }

    /// Both ways at the pace of the slower side, as on the source's full
    /// path (HTTPProxyHandler.bodyHeld): the request's body is read from
    /// the stream only while the pod's connection takes more (not while it
    /// is being made), and the pod's response only while the stream does.
    func read(context: ChannelHandlerContext) {
        if bodyHeld { readPending = true } else { context.read() }
    }

    private var bodyHeld: Bool {
        guard !requestEnded else { return false }
        switch state {
        case .connecting: return true
        case .forwarding: return !(upstream?.isWritable ?? true)
        case .idle, .denying: return false
        }
    }

    private func resumeReads() {
        guard readPending, !bodyHeld, let context else { return }
        readPending = false
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { upstream?.resumeReads() }
        context.fireChannelWritabilityChanged()
    }

    /// The source's end (HTTP/1): once nothing is in flight or waiting,
    /// the stream ends as one with `Connection: close` does, staged
    /// (HTTP1ServerPipeline.linger: the output shut behind the last
    /// response, then closed). It stayed half-open for good before, and a
    /// stream of the tunnel with it (mangledDeliveriesNeitherCrashNorHangTheProxy).
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let sweep = event as? IdleSweep { return self.sweep(sweep, context: context) }
        if let e = event as? ChannelEvent, case .inputClosed = e, !isHTTP2 {
            inputClosed = true
            closeIfDone(context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// Nothing moved on the request for the stream idle timeout: from the
    /// pod (a source that does not read stops those reads too), or of its
    /// body from the source while that is read, or of the rest of a refused
    /// request's body. Not while the pod's connection is made (the pool's
    /// connect timeout bounds that). The pod's connection is closed; 504,
    /// or 408 when the source's body stopped, if nothing of a response went
    /// out (then the stream goes on if the request was whole, else ends
    /// after the answer); otherwise the stream ends at once, and the source
    /// sees the response broken. A peer that never resets its stream held
    /// the request and a pod connection for as long as its tunnel stayed.
    private func sweep(_ sweep: IdleSweep, context: ChannelHandlerContext) {
        let waiting = state == .forwarding || (state == .denying && !requestEnded)
        guard waiting else { return stall.moved() }
        guard stall.stalled(sweep) else { return }
        proxy.stats.streamIdleTimeouts.add(1, ordering: .relaxed)
        proxy.logger.debug("tunnelled request ended: nothing moved on it",
                           metadata: ["target": "\(target)", "timeout": "\(IdleSweep.shown(sweep.streamTimeout ?? .zero))"])
        let unread = !requestEnded && !bodyHeld  // the source's, not the pod's
        upstream?.close()
        upstream = nil
        if responded || state == .denying { return context.close(promise: nil) }
        state = .denying
        keepAlive = keepAlive && requestEnded
        guard isHTTP2, !requestEnded else {
            respond(context, unread ? .requestTimeout : .gatewayTimeout, StallCount.body(sweep))
            return exchangeDone(context)
        }
        // The rest of the stream's body is not waited for: RST_STREAM
        // once the answer is written.
        let answered = context.eventLoop.makePromise(of: Void.self)
        respond(context, unread ? .requestTimeout : .gatewayTimeout, StallCount.body(sweep), ended: answered)
        answered.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    private func closeIfDone(_ context: ChannelHandlerContext) {
        guard inputClosed, !ending, !upgraded, state == .idle, queued.isEmpty else { return }
        ending = true
        HTTP1ServerPipeline.linger(context)
    }

    /// (A gRPC call, `grpcType`, refused by policy is told PERMISSION_DENIED
    /// in the head: GRPCLocalAnswer. A refused connect stays an HTTP 503:
    /// the source node's proxy reads it.)
    private func respond(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ body: String, refused: Bool = false,
                         grpcType: String? = nil, ended: EventLoopPromise<Void>? = nil) {
        let grpc = GRPCLocalAnswer.contentType(grpcType, status: Int(status.code))
        var headers = grpc.map { HTTPHeaders([("content-type", $0)] + GRPCLocalAnswer.fields(httpCode: Int(status.code), body: body)
                                             + [("content-length", "0")]) }
            ?? HTTPHeaders([("content-type", "text/plain"), ("content-length", "\(body.utf8.count)")])
        if refused { headers.add(name: Authorize.refusedHeader, value: "connect") }
        if status == .forbidden { headers.add(name: "x-weft-authz", value: "denied") }
        if !keepAlive && !isHTTP2 { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: grpc == nil ? status : .ok, headers: headers))),
                      promise: nil)
        if grpc == nil {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: ended)
    }

    /// The response is over (and the request, unless the pod answered before
    /// reading all of it): take the next.
    private func exchangeDone(_ context: ChannelHandlerContext) {
        state = .idle
        upstream = nil
        resumeReads()
        if isHTTP2 { return }
        guard keepAlive else {
            // RFC 9112's staged close, as HTTPProxyHandler ends one: the
            // stream's END_STREAM goes behind the response's DATA
            // (TunnelStreamCodec), where a close at once could reset the
            // stream over a tail its window still holds back; one whose
            // source has ended too is then closed. (Not after a promise on
            // the `.end`: NIO's encoder sends an empty DATA frame for one,
            // which NIO's HTTP/2 peer takes once in a row.)
            return HTTP1ServerPipeline.linger(context)
        }
        // The next request's parts, up to the head of the one after it.
        while let part = queued.first {
            if case .head = part, state != .idle { break }
            queued.removeFirst()
            handle(part, context: context)
        }
        closeIfDone(context)
    }

    // MARK: UpstreamSink

    func upstreamResponse(_ part: HTTPClientResponsePart) {
        guard let context else { return }
        stall.moved()
        switch part {
        case .head(let head):
            if head.status == .switchingProtocols, isUpgrade, let upstream {
                // WebSocket and the like: the pod agreed; from here on the
                // stream and the pod connection are joined byte for byte.
                self.upstream = nil
                state = .idle
                upgraded = true
                OpaqueKeepalive.apply(to: upstream.channel.map { [$0] } ?? [], proxy.snapshot.table.tcpKeepalive)
                return Upgrade.splice(context, upstream, head, stats: proxy.stats)
            }
            responded = true
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: head.status, headers: head.headers))),
                          promise: nil)
        case .body(let body):
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            if !context.channel.isWritable { upstream?.pauseReads() }
        case .end(let trailers):
            context.writeAndFlush(wrapOutboundOut(.end(trailers)), promise: nil)
            exchangeDone(context)
        }
    }

    func upstreamFailed(_ error: any Error, responded: Bool) {
        guard let context else { return }
        let reused = upstream?.reused ?? false
        upstream = nil
        if responded {
            context.close(promise: nil)
        } else {
            state = .denying
            resumeReads()
            // A kept-alive connection the pod had closed: an idempotent
            // request may go elsewhere, as if never sent.
            respond(context, .badGateway, "weft: \(target) closed the connection before responding\n", refused: reused && idempotent)
            if requestEnded { exchangeDone(context) }
        }
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        if writable { resumeReads() }
    }

    func upstreamReadComplete() { context?.flush() }
}
