import Glibc
import NIOCore
import NIOHTTP1
import NIOHTTP2
import WeftCore
import WeftKernel

/// The L7 work for one downstream HTTP/1.1 connection or one HTTP/2 stream:
/// route each request, apply the route's filters, pick a backend, forward,
/// and retry or time out as the route says. Requests arrive one at a time
/// (HTTP/1.1 pipelining is serialised by NIO's HTTPServerPipelineHandler; an
/// HTTP/2 stream carries one request).
///
/// The request body streams to the upstream as it arrives; up to
/// `replayBufferLimit` of it is also kept so that a retry (or a mirror) can
/// send it again. A larger body makes the request not retryable.
final class HTTPProxyHandler: ChannelDuplexHandler, RemovableChannelHandler, UpstreamSink {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// Pipelined requests (HTTP/1.1) read while a response is in flight,
    /// answered in order. Reading stops when this many parts wait: the
    /// backpressure NIO's HTTPServerPipelineHandler gives, without its
    /// epoll_ctl pair per request (it pauses reading between every request
    /// and its response, whether the client pipelines or not).
    private var queued = CircularBuffer<HTTPServerRequestPart>()
    private static let maxQueued = 64
    private var readPending = false
    /// Between a request's head and its end, as the client sends them.
    private var receiving = false
    /// The request asked `Expect: 100-continue` and has not been told to go
    /// on: the 100 goes out once it is sure to be forwarded (sendContinue).
    private var continuePending: HTTPVersion?
    /// Told to wind down (drain): close once the current response is done.
    private var quiescing = false
    private var inputClosed = false
    /// The client half-closed and every request it sent has been answered.
    /// The last response's final write (closeAfterLastResponse).
    private var lastEnd: EventLoopFuture<Void>?
    private var clientGone: Bool { inputClosed && request == nil && !receiving && queued.isEmpty }
    private var idle = IdleCount()
    /// The request in flight: sweeps through which nothing of it moved.
    private var stall = StallCount()
    /// The head waited on (HTTP/1.1): started by a read that gave no part
    /// while no request was open, so the decoder holds part of a head.
    private var head = HeadClock()
    private var partsRead = false
    /// The HTTP/1.1 pipeline's byte count before the decoder: whether part
    /// of the next head came while a response was on its way.
    var headBytes: HeadBytes?
    /// Answered 408: nothing more is taken.
    private var headTimedOut = false

    private let proxy: ProxyContext
    private let origin: CapturedOrigin
    private let frontendKey: String
    private let isHTTP2: Bool
    private var context: ChannelHandlerContext?
    private var loop: LoopState?
    private var request: RequestState?
    /// This connection's frontend in the current route snapshot.
    private var cached: (snapshot: RouteSnapshot, matcher: RouteMatcher, budget: LoopState.BudgetBox?)?
    /// The request being answered, for its metrics and access log line:
    /// from its head until its response ends (or breaks).
    private var record: Record?
    /// On an HTTP/2 stream: its request is an extended CONNECT
    /// (ExtendedConnect.Stream made it an HTTP/1.1 Upgrade to pass on).
    var extendedConnect = false
    /// Set while a websocket (or other Upgrade) exchange waits for its 101.
    var onUpgrade: ((ChannelHandlerContext, UpstreamHandler, HTTPResponseHead, ProxyStats) -> Void)?
    /// A client connection's (not a tunnel stream's): the h2c Upgrade is
    /// taken (H2CUpgrade).
    var acceptsH2CUpgrade = false
    /// An h2c Upgrade request taken, until its end, and its body so far.
    private var h2cUpgrade: HTTPRequestHead?
    private var h2cBody: ByteBuffer?
    /// Set by the express path that hands this connection or stream over
    /// with a request it chose a backend for: what it did (its split's
    /// draw, the TrafficPolicy judged, a failed connect as the first
    /// attempt), for the first request read (Express.Handed).
    var handed: Express.Handed?

    init(proxy: ProxyContext, origin: CapturedOrigin, isHTTP2: Bool) {
        self.proxy = proxy
        self.origin = origin
        self.frontendKey = "\(origin.vip):\(origin.port)"
        self.isHTTP2 = isHTTP2
    }

    /// One request's state, from its head to the end of its response. A
    /// class: it is read and changed at every step of an exchange, and a
    /// struct this size would be copied (and every reference in it
    /// retained) at each.
    private final class RequestState {
        var head: HTTPRequestHead
        var upstreamHead: HTTPRequestHead
        var snapshot: RouteSnapshot
        var action: ProxyTable.RouteAction
        var cluster: ProxyTable.WeightedCluster
        var responseModifiers: [HTTPRoute.HeaderModifier]
        var mirrors: [HTTPRoute.Mirror]
        var keepAlive: Bool
        var idempotent: Bool
        var isUpgrade: Bool
        /// Every body part so far, while the body is under the replay limit.
        var replay: [ByteBuffer]? = []
        var replayBytes = 0
        /// Parts not yet written to the current upstream.
        var pending: [ByteBuffer] = []
        var ended = false
        var endSent = false
        var trailers: HTTPHeaders?
        var attempts = 0
        var tried: Set<EndpointKey> = []
        var endpoint: EndpointKey?
        var upstream: UpstreamHandler?
        var connecting = false
        var responseStarted = false
        var heldHead: HTTPResponseHead?
        /// A gRPC response whose status comes in its trailers: the outlier
        /// detector is told at its end, not at its head.
        var grpcOutcomePending = false
        /// A gRPC-Web response's status, read from its body's trailer frame
        /// (nil for any other response).
        var grpcWeb: GRPCStatusReader?
        var requestTimer: Scheduled<Void>?
        var attemptTimer: Scheduled<Void>?
        var retryTimer: Scheduled<Void>?
        /// Waiting for a connection to the attempt's backend at its
        /// circuit breaker's maxConnections (UpstreamPool.wait).
        var waiting: UpstreamPool.ConnectionWait?
        /// Bumped by every attempt; callbacks of an abandoned attempt see a
        /// different number and do nothing.
        var attemptID = 0
        /// Why the last attempt failed, for when no endpoint is left to try.
        var lastFailure: (status: HTTPResponseStatus, body: String)?
        /// The cluster's TrafficPolicy state, when it has one.
        var runtime: ClusterRuntime?
        /// The current attempt's backend in `runtime`: its request slot and
        /// the outcome the outlier detector is told (as an express exchange
        /// keeps them).
        var hold: ClusterRuntime.Hold?
        /// Consistent hashing: the request's key hash.
        var hash: UInt64?
        /// A hash cookie minted for this request, set on its response.
        var setCookie: String?
        /// The rule's persistent session (sessionPersistence).
        var session: StickySession?
        /// Counted in the cluster's retries in progress (circuitBreaker.maxRetries).
        var retrying = false

        init(head: HTTPRequestHead, upstreamHead: HTTPRequestHead, snapshot: RouteSnapshot, action: ProxyTable.RouteAction,
             cluster: ProxyTable.WeightedCluster, responseModifiers: [HTTPRoute.HeaderModifier], mirrors: [HTTPRoute.Mirror],
             keepAlive: Bool, idempotent: Bool, isUpgrade: Bool) {
            self.head = head
            self.upstreamHead = upstreamHead
            self.snapshot = snapshot
            self.action = action
            self.cluster = cluster
            self.responseModifiers = responseModifiers
            self.mirrors = mirrors
            self.keepAlive = keepAlive
            self.idempotent = idempotent
            self.isUpgrade = isUpgrade
        }
    }

    /// What a request's metrics and access log line need.
    private struct Record {
        var start: NIODeadline
        var wallStart: timespec
        var snapshot: RouteSnapshot
        /// The Service's name and namespace (not the whole frontend: this is per request).
        var service: String?
        var serviceNamespace: String?
        var head: HTTPRequestHead
        var route = "-"
        var span: TraceContext.Span?
        var requestID: String?
        var upstream: EndpointKey?
        var attempts = 0
        var status = 0
        var bytesIn = 0
        var bytesOut = 0
        /// Envoy-style response flags (docs/observability.md), "," separated.
        var flags: [String] = []
        /// Why the last attempt failed; a flag if the request fails with it.
        var lastFlag: String?
        /// The gRPC status the backend sent back (the response head's, for
        /// a trailers-only answer, or its trailers').
        var grpcStatus: Substring?
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        loop = proxy.loop(context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        abandon()
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        abandon()
        context.fireChannelInactive()
    }

    /// On an HTTP/2 stream: NIO's HTTP/2-to-HTTP/1 codec could not make a
    /// request of the stream's HEADERS (no :authority, which RFC 9113 lets
    /// a client leave out but NIO's request head needs; a CONNECT without
    /// :path). Answered 400 naming the fault when nothing else is under way
    /// on the stream; otherwise the stream ends. Left alone, the stream
    /// waited for an answer nobody was making.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard isHTTP2 else { return context.fireErrorCaught(error) }
        if request == nil, !receiving, record == nil {
            proxy.stats.requests.add(1, ordering: .relaxed)
            return respondLocally(HTTPRequestHead(version: .http2, method: .GET, uri: "/"), .badRequest,
                                  "weft: the HTTP/2 request cannot be read: \(error)\n", keepAlive: false)
        }
        context.close(promise: nil)
    }

    // MARK: downstream

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        idle.reset()
        if receiving { stall.moved() }  // (the body of the request in flight)
        partsRead = true
        let part = unwrapInboundIn(data)
        if case .head = part { head.stop() }
        if headTimedOut { return }
        // A new request while the previous one is still being answered waits.
        if !queued.isEmpty || (!receiving && request != nil) {
            queued.append(part)
            return
        }
        process(part, context: context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !partsRead && !isHTTP2 && request == nil && !receiving && queued.isEmpty { head.started() }
        partsRead = false
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        if queued.count >= Self.maxQueued || bodyHeld {
            readPending = true
        } else {
            context.read()
        }
    }

    /// The request's body is read only as fast as its backend takes it:
    /// not while there is no backend connection to send it on (connecting,
    /// a retry's backoff) or that connection cannot take more (its socket
    /// full, or an HTTP/2 stream's window shut). A client's TCP window (or
    /// the stream's HTTP/2 window, which NIO opens only as frames are read)
    /// then holds the rest; without this, an upload to a slow backend piled
    /// up in the proxy, all of it (512 MiB in uploadsGoAtTheirBackendsPace).
    private var bodyHeld: Bool {
        guard receiving, let r = request else { return false }
        guard let upstream = r.upstream, !r.connecting else { return true }
        return !upstream.isWritable
    }

    /// Reads again if reading was held and nothing holds it now.
    private func resumeReads() {
        guard readPending, queued.count < Self.maxQueued, !bodyHeld, let context else { return }
        readPending = false
        context.read()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // (An HTTP/1.1 connection's, or passed on to a stream channel by its
        // connection: StreamChannels.)
        if let sweep = event as? IdleSweep {
            // Nothing moved on the request in flight for the stream idle
            // timeout (not while it connects, which connectTimeout bounds,
            // or waits out a retry's backoff or an injected delay).
            if let r = request, !r.connecting, r.retryTimer == nil {
                if stall.stalled(sweep) { return streamIdleTimedOut(sweep) }
            } else {
                stall.moved()
            }
            let open = request != nil || receiving || !queued.isEmpty
            if !isHTTP2, !open, !inputClosed, !headTimedOut, head.expired(sweep) {
                // A head begun too long ago and still not whole: 408, closed.
                headTimedOut = true
                head.stop()
                proxy.stats.headTimeouts.add(1, ordering: .relaxed)
                let none = HTTPRequestHead(version: .http1_1, method: .GET, uri: "")
                return respondLocally(none, .requestTimeout, HeadClock.body(sweep), keepAlive: false)
            }
            if !isHTTP2 {
                switch idle.judge(sweep, busy: open) {
                case .close:
                    proxy.stats.idleClosed.add(1, ordering: .relaxed)
                    closeAfterLastResponse(context)
                case .overdue:
                    context.close(promise: nil)  // the client read none of the last response
                case .stay:
                    break
                }
            }
            return
        }
        if event is ChannelShouldQuiesceEvent {
            quiescing = true
            guard request == nil && !receiving && queued.isEmpty else { return }
            // An idle HTTP/1.1 connection closes after a grace for a request
            // on its way (Express.drainIdleGrace); a stream at once.
            if isHTTP2 { return closeAfterLastResponse(context) }
            context.eventLoop.assumeIsolated().scheduleTask(in: Express.drainIdleGrace) { [weak self] in
                guard let self, let context = self.context, self.request == nil, !self.receiving, self.queued.isEmpty else { return }
                closeAfterLastResponse(context)
            }
            return
        }
        // The client shut its side after its requests (HTTP/1 half-close):
        // answer every one already read, pipelined ones too, then close.
        if let e = event as? ChannelEvent, case .inputClosed = e, !isHTTP2 {
            inputClosed = true
            if request == nil && !receiving && queued.isEmpty { closeAfterLastResponse(context) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// After a response: take the next pipelined request, if one waits.
    /// Closes once the last response is out: NIO fails writes still queued
    /// when a channel closes, so a slow reader would lose its tail.
    private func closeAfterLastResponse(_ context: ChannelHandlerContext) {
        guard let lastEnd else { return context.close(promise: nil) }
        lastEnd.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    /// An HTTP/1.1 connection after its last response (written): closed
    /// at once if the client has shut its side, else RFC 9112's staged
    /// close (HTTP1ServerPipeline.LingeringClose), so that a client still
    /// sending (a body the answer did not wait for, a head that timed out)
    /// reads the response instead of a reset.
    private func endConnection(_ context: ChannelHandlerContext) {
        if inputClosed { return context.close(promise: nil) }
        HTTP1ServerPipeline.linger(context)
    }

    private func responseDone(_ context: ChannelHandlerContext) {
        while !queued.isEmpty && !(request != nil && !receiving) {
            process(queued.removeFirst(), context: context)
        }
        // Part of the next head came while this response was on its way
        // (pipelined): its clock starts now, not at a read that may never come.
        if request == nil, !receiving, queued.isEmpty, headBytes?.headPartlyRead == true { head.started() }
        // The client had shut its side and the last request it sent was
        // answered here and now (a redirect, a 404): nothing more comes.
        // (A response whose write completed before that request's end
        // was read did not see it gone.)
        if clientGone && !isHTTP2 { closeAfterLastResponse(context) }

        resumeReads()
    }

    private func process(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        switch part {
        case .head(var head):
            receiving = true
            if acceptsH2CUpgrade, !quiescing, !proxy.draining.load(ordering: .relaxed), H2CUpgrade.accepts(head) {
                h2cUpgrade = head
                return
            }
            continuePending = nil
            if !isHTTP2, Self.expectsContinue(head) {
                // The proxy answers it, not the backend: forwarded, the
                // backend's 100 was dropped by the response decoder, and a
                // client waited for it (curl 1 s, on every upload over 1
                // MiB) before sending its body. Told once the request is
                // sure to go upstream (sendContinue), so that a request the
                // proxy answers itself (403, 404, 429, 503...) is answered
                // before its body is sent at all.
                head.headers.remove(name: "expect")
                continuePending = head.version
            }
            // Routes and policies judge the path in normal form, and the
            // backend is sent that form (Envoy's normalize_path, Istio's
            // default; MeshConfig proxy.pathNormalization): no spelling of
            // a path dodges a rule.
            // (The loop's cached snapshot: no lock per request for this.)
            let paths = (loop?.snapshot(proxy) ?? proxy.snapshot).table.pathNormalization ?? .base
            switch RequestPath.normalize(target: head.uri, mode: paths) {
            case .normal:
                break
            case .changed(let uri):
                head.uri = uri
            case .malformed:
                proxy.stats.requests.add(1, ordering: .relaxed)
                return respondLocally(head, .badRequest, "weft: the request path has a malformed percent-encoding\n",
                                      keepAlive: head.isKeepAlive)
            }
            begin(head, context: context)
        case .body(var buffer):
            if h2cUpgrade != nil {
                // (At most H2CUpgrade.maxBody: the content-length it took.)
                if h2cBody == nil { h2cBody = buffer } else { h2cBody?.writeBuffer(&buffer) }
                return
            }
            record?.bytesIn += buffer.readableBytes
            guard let r = request else { return }
            r.pending.append(buffer)
            if r.replay != nil {
                r.replayBytes += buffer.readableBytes
                if r.replayBytes > proxy.configuration.replayBufferLimit {
                    r.replay = nil
                } else {
                    r.replay?.append(buffer)
                }
            }
            flushPending()
        case .end(let trailers):
            receiving = false
            if let upgrade = h2cUpgrade {
                let body = h2cBody
                h2cUpgrade = nil
                h2cBody = nil
                return H2CUpgrade.switchProtocols(context, upgrade, body: body, proxy: proxy, origin: origin)
            }
            guard let r = request else { return }
            r.ended = true
            r.trailers = trailers
            flushPending()
            startMirrors()
        }
    }

    private func begin(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        proxy.stats.requests.add(1, ordering: .relaxed)
        let snapshot = proxy.snapshot
        let handed = self.handed
        self.handed = nil
        record = Record(start: .now(), wallStart: AccessLog.now(), snapshot: snapshot, head: head)
        // NIO's HTTP/1 decoder parses nothing after a request that asks for
        // an upgrade: unless the upgrade happens, the connection ends after
        // the response (a WebSocket refused, an h2c Upgrade declined).
        let keepAlive = head.isKeepAlive && !proxy.draining.load(ordering: .relaxed)
            && (isHTTP2 || !Self.stopsTheDecoder(head))
        // (An HTTP/2 stream's list was held to the limit by the express
        // path, or by NIO's HTTP/2 decoder on --no-express, which ends
        // the connection over it. NIO's HTTP/1.1 decoder has read
        // this head whole, so the connection can go on after the 431.)
        if !isHTTP2, HeadLimit.size(head) > snapshot.maxRequestHead {
            proxy.stats.headsTooLarge.add(1, ordering: .relaxed)
            return respondLocally(head, .requestHeaderFieldsTooLarge, HeadLimit.body(snapshot.maxRequestHead), keepAlive: keepAlive)
        }
        if head.method == .CONNECT {
            // A proxy request: a Service's port takes requests for itself.
            record?.flags.append("NR")
            return respondLocally(head, .methodNotAllowed, "weft: CONNECT is not taken on \(frontendKey), an HTTP Service's port\n",
                                  keepAlive: false, extraHeaders: [("allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE")])
        }
        if cached?.snapshot !== snapshot {
            cached = snapshot.matcher(frontendKey, source: origin.source).map { (snapshot, $0, loop?.budget($0.frontend.name)) }
        }
        record?.service = cached?.matcher.frontend.service
        record?.serviceNamespace = cached?.matcher.frontend.namespace
        guard let matcher = cached?.matcher else {
            record?.flags.append("NR")
            return respondLocally(head, .serviceUnavailable, "weft: \(frontendKey) is not an HTTP Service in the proxy's table (generation \(snapshot.generation))\n", keepAlive: keepAlive)
        }
        if head.headers[canonicalForm: "via"].contains(where: { $0.contains(proxy.viaToken) }) {
            record?.flags.append("LOOP")
            return respondLocally(head, .loopDetected, "weft: request looped through \(proxy.viaToken)\n", keepAlive: keepAlive)
        }
        let (path, query) = Self.splitTarget(head.uri)
        let routed = matcher.route(RouteMatcher.Request(method: head.method.rawValue, path: path, query: query,
                                                        header: { head.headers[canonicalForm: $0].map(String.init) }))
        guard let (action, match) = routed else {
            record?.flags.append("NR")
            return respondLocally(head, .notFound, "weft: no HTTPRoute rule of \(matcher.frontend.name) matches \(head.method) \(path)\n", keepAlive: keepAlive)
        }

        record?.route = action.name
        var upstream = head
        upstream.version = .http1_1
        var responseModifiers: [HTTPRoute.HeaderModifier] = []
        var mirrors: [HTTPRoute.Mirror] = []
        var newPath: String?
        var newHost: String?
        for filter in action.filters {
            switch filter {
            case .requestRedirect(let r):
                return redirect(head, r, path: path, query: query, match: match, keepAlive: keepAlive)
            case .requestHeaderModifier(let m):
                Self.modify(&upstream.headers, m)
            case .responseHeaderModifier(let m):
                responseModifiers.append(m)
            case .urlRewrite(let w):
                newHost = w.hostname
                if let p = w.path { newPath = RouteMatcher.rewrite(path: path, with: p, match: match) }
            case .requestMirror(let m):
                mirrors.append(m)
            }
        }
        // A persistent session's backend, whatever the weights say; else
        // the express path's draw stands for a request it hands over.
        var session = action.session.map { StickySession(rule: $0, headers: head.headers, match: match, now: StickySession.now()) }
        let pinned = session?.pin(action.backends) { snapshot.endpoints[$0] }
        let drawn = handed.flatMap { h in action.backends.first { $0.cluster == h.cluster && $0.weight > 0 } }
        guard let cluster = pinned ?? drawn ?? loop.flatMap({ Self.pickCluster(action.backends, using: &$0.random) }) else {
            let reason = action.backends.isEmpty ? "has no backendRefs" : "has only backends of weight 0"
            record?.flags.append("NR")
            return respondLocally(head, .internalServerError, "weft: route \(action.name) \(reason)\n", keepAlive: keepAlive)
        }
        for filter in cluster.filters {
            switch filter {
            case .requestHeaderModifier(let m): Self.modify(&upstream.headers, m)
            case .responseHeaderModifier(let m): responseModifiers.append(m)
            case .urlRewrite(let w):
                newHost = w.hostname ?? newHost
                if let p = w.path { newPath = RouteMatcher.rewrite(path: path, with: p, match: match) }
            case .requestMirror(let m): mirrors.append(m)
            case .requestRedirect: break
            }
        }
        if let newPath { upstream.uri = query.map { "\(newPath)?\($0)" } ?? newPath }
        if let newHost { upstream.headers.replaceOrAdd(name: "host", value: newHost) }
        let isUpgrade = (!isHTTP2 || extendedConnect) && Self.isUpgradeRequest(head)
        let span: TraceContext.Span
        if let loop {
            span = Self.prepareUpstreamHeaders(&upstream.headers, client: origin.source, via: proxy.viaToken, keepUpgrade: isUpgrade,
                                               random: &loop.random, samplingPercent: snapshot.table.tracing?.samplingPercent)
        } else {
            var system = SystemRandomNumberGenerator()
            span = Self.prepareUpstreamHeaders(&upstream.headers, client: origin.source, via: proxy.viaToken, keepUpgrade: isUpgrade,
                                               random: &system)
        }
        record?.span = span
        record?.requestID = upstream.headers.first(name: "x-request-id")

        // The Service's TrafficPolicy, request side: rate limit, then faults
        // (judged once: the express path judged a request it hands over).
        var delay: Duration?
        if let handed {
            switch handed.delay {
            case .none: break
            case .served: record?.flags.append("DI")
            case .pending(let d):
                record?.flags.append("DI")
                delay = d
            }
        } else if !snapshot.guards.isEmpty, let guardState = snapshot.guards[frontendKey], let loop {
            let headers = head.headers
            switch guardState.judge(route: action.name, source: origin.source, header: { headers[canonicalForm: $0].first },
                                    snapshot: snapshot, random: &loop.random) {
            case .pass: break
            case .limited(let key, let wait):
                proxy.stats.rateLimited.add(1, ordering: .relaxed)
                record?.flags.append("RL")
                let limited = FrontendGuard.limitedAnswer(frontend: matcher.frontend.name, key: key, wait: wait)
                return respondLocally(head, .tooManyRequests, limited.body, keepAlive: keepAlive, extraHeaders: [limited.retryAfter])
            case .abort(let status, let grpc):
                proxy.stats.faultsAborted.add(1, ordering: .relaxed)
                record?.flags.append("FI")
                return respondLocally(head, HTTPResponseStatus(statusCode: status), Self.faultAbortBody, keepAlive: keepAlive,
                                      grpcStatus: grpc)
            case .delay(let d):
                proxy.stats.faultsDelayed.add(1, ordering: .relaxed)
                record?.flags.append("DI")
                delay = d
            }
        }

        let method = head.method
        let idempotent = method == .GET || method == .HEAD || method == .OPTIONS || method == .TRACE
            || method == .PUT || method == .DELETE
        let r = RequestState(head: head, upstreamHead: upstream, snapshot: snapshot, action: action, cluster: cluster,
                             responseModifiers: responseModifiers, mirrors: mirrors, keepAlive: keepAlive,
                             idempotent: idempotent && !isUpgrade, isUpgrade: isUpgrade)
        r.session = session
        request = r
        stall.moved()
        if !snapshot.runtimes.isEmpty, let runtime = snapshot.runtimes[cluster.cluster] {
            r.runtime = runtime
            if runtime.policy.loadBalancer.hashOn != nil, let loop {
                let headers = head.headers
                (r.hash, r.setCookie) = runtime.requestKey(
                    header: { headers[canonicalForm: $0].first }, cookie: { ClusterRuntime.cookie($0, in: headers) },
                    source: origin.source, random: &loop.random)
            }
        }
        cached?.budget?.budget.recordRequest(now: Self.nowSeconds())
        if let limit = action.timeouts.request {
            r.requestTimer = context.eventLoop.assumeIsolated().scheduleTask(in: .init(limit)) { [weak self] in
                self?.requestTimedOut()
            }
        }
        if let delay {
            // Injected delay: the request waits here, inside its timeout.
            r.retryTimer = context.eventLoop.assumeIsolated().scheduleTask(in: .init(delay)) { [weak self] in
                self?.request?.retryTimer = nil
                self?.startAttempt()
            }
            return
        }
        if let failed = handed?.failedConnect { return failedOnTheExpressPath(failed) }
        startAttempt()
    }

    /// The express path's connect for this request failed (nothing was
    /// sent): that was its first attempt, so the request goes on as after a
    /// failed connect of its own: another backend, or 503 when it would
    /// not try again; 403 when the backend's node refused it by policy.
    private func failedOnTheExpressPath(_ failed: Express.Handed.FailedConnect) {
        guard let r = request else { return }
        r.attempts = 1
        r.tried.insert(failed.key)
        record?.upstream = failed.key
        record?.attempts = 1
        if let refused = failed.error as? TunnelRefused, Express.refusedByPolicy(refused) {
            record?.flags.append("RBAC")
            return fail(.forbidden, Authorize.forbiddenBody("\(refused.reason) (at \(failed.key.node))"))
        }
        record?.lastFlag = "UF"
        retryOrFail(.serviceUnavailable, "weft: cannot connect to \(failed.key) for \(r.cluster.cluster): \(failed.error)\n",
                    sentNothing: true)
    }

    // MARK: attempts

    private func startAttempt() {
        guard let r = request, let context, let loop else { return }
        r.attemptID += 1
        let id = r.attemptID
        let endpoints = r.snapshot.endpoints[r.cluster.cluster] ?? []
        guard !endpoints.isEmpty else {
            record?.flags.append("UH")
            return fail(.serviceUnavailable, "weft: no ready backend for \(r.cluster.cluster)\n")
        }
        var key: EndpointKey?
        // A retry prefers endpoints not tried yet; when every one has been,
        // it may go back to one (a Service with a single backend).
        let excluded = r.tried.isEmpty || endpoints.allSatisfy({ r.tried.contains($0) }) ? [] : r.tried
        // The proxy connects on the pod's behalf: it may reach only what the
        // pod itself could (its egress policy and the backend's ingress).
        if r.tried.isEmpty, let claimed = r.session?.claim(among: endpoints, runtime: r.runtime, loop: loop, proxy: proxy,
                                                           generation: r.snapshot.generation, source: origin.source) {
            (key, r.hold) = claimed
        } else if let runtime = r.runtime {
            switch loop.pick(runtime, hash: r.hash, excluding: excluded, proxy: proxy, generation: r.snapshot.generation,
                             source: origin.source) {
            case .picked(let candidate):
                key = candidate
                r.hold = runtime.index[candidate].map { ClusterRuntime.Hold(runtime, $0) }
            case .overflow:
                proxy.stats.overflows.add(1, ordering: .relaxed)
                countEvent("overflow")
                record?.flags.append("UO")
                return fail(.serviceUnavailable, "weft: every backend of \(r.cluster.cluster) is at its circuit breaker's maxRequests\n")
            case .none:
                break
            }
        } else {
            key = loop.pickReachable(endpoints, excluding: excluded, proxy: proxy, generation: r.snapshot.generation,
                                     source: origin.source)
        }
        guard let key else {
            if let last = r.lastFailure { return fail(last.status, last.body) }
            proxy.stats.policyDenied.add(1, ordering: .relaxed)
            record?.flags.append("RBAC")
            return fail(.forbidden, "weft: NetworkPolicy allows \(origin.source) to reach no backend of \(r.cluster.cluster)\n")
        }
        // A pod of this node: its AuthorizationPolicies are this proxy's to
        // apply (another node's proxy applies its own pods').
        if !r.snapshot.authorization.isEmpty, let set = r.snapshot.authorization[key.ip.value] {
            var ask = Authorize.local(proxy, r.snapshot, source: origin.source, port: key.port)
            ask.http = Authorize.http(r.upstreamHead, paths: r.snapshot.table.pathNormalization ?? .base)
            let decision = set.evaluate(ask)
            Authorize.record(proxy, decision, target: key.description)
            if !decision.allowed {
                // The slot reserved when the key was picked goes back.
                releaseBackend()
                record?.flags.append("RBAC")
                return fail(.forbidden, Authorize.forbiddenBody(decision.reason))
            }
        }
        sendContinue()
        guard request === r else {
            // The 100's write failed and closed the connection under this
            // attempt (abandon ran): nothing else gives back the slot taken.
            r.hold?.release()
            r.hold = nil
            return
        }
        r.attempts += 1
        r.tried.insert(key)
        r.endpoint = key
        record?.upstream = key
        record?.attempts = r.attempts
        r.connecting = true
        var counters: ClusterRuntime.Backend?
        var queue = false
        if let hold = r.hold {
            counters = hold.backend
            // A new connection is needed unless an idle one waits: that is
            // where maxConnections and maxPendingRequests bite. At
            // maxConnections the request waits for one (counted pending)
            // while fewer than maxPendingRequests do; it is shed otherwise.
            if r.cluster.upstreamProtocol == .http1,
               let limit = hold.runtime.connectionLimit(hold.backend, idle: { hasIdle(key, loop, r) }) {
                if limit == "maxConnections", hold.runtime.reserveWait(hold.backend) {
                    queue = true
                } else {
                    // (At maxConnections with maxPendingRequests waiting: named as such.)
                    let which = limit == "maxConnections" ? "maxConnections and maxPendingRequests" : limit
                    return shed(key, "is at its circuit breaker's \(which)", inFlight: false)
                }
            }
        }
        loop.pool.state(key).inFlight += 1
        if let limit = r.action.timeouts.backendRequest {
            r.attemptTimer = context.eventLoop.assumeIsolated().scheduleTask(in: .init(limit)) { [weak self] in
                self?.attemptTimedOut(id)
            }
        }
        if queue, let counters {
            proxy.stats.connectionWaits.add(1, ordering: .relaxed)
            // As Envoy's pending requests: a request with a timeout of its
            // own (timeouts.request or backendRequest, or the Service's
            // requestTimeout) waits until a connection comes or that timeout
            // answers it (504); one without waits at most its backend's
            // connect timeout, so that nothing queues for good.
            let timeout = r.requestTimer != nil || r.attemptTimer != nil ? Self.queuedUntilTimedOut : loop.pool.connectTimeout(for: key)
            return waitForConnection(id: id, key: key, counters: counters, deadline: .now() + timeout, timeout: timeout)
        }
        connect(id: id, key: key, counters: counters)
    }

    /// The tunnel this request's exchanges with `key` go through (a pod on
    /// another node), or nil.
    private func tunnel(to key: EndpointKey, _ loop: LoopState, _ r: RequestState) -> TunnelChoice? {
        loop.tunnel(proxy, to: key, from: origin.source, snapshot: r.snapshot)
    }

    /// Whether a connection to `key` this request may take waits idle (a
    /// tunnel stream of its own source pod's, to a pod on another node).
    private func hasIdle(_ key: EndpointKey, _ loop: LoopState, _ r: RequestState) -> Bool {
        loop.pool.hasIdle(key, tunnel: tunnel(to: key, loop, r))
    }

    private func connect(id: Int, key: EndpointKey, counters: ClusterRuntime.Backend?) {
        guard let loop, let r = request else { return }
        let tunnel = tunnel(to: key, loop, r)
        loop.pool.acquire(key, protocol: r.cluster.upstreamProtocol, counters: counters, breaker: r.hold?.runtime,
                          tunnel: tunnel) { [weak self] result in
            guard let self else {
                if case .success(let h) = result { h.close() }
                return
            }
            self.attached(result, id: id, key: key)
        }
    }

    /// The attempt's backend is at a circuit breaker limit: 503 (flag UO),
    /// its slot given back (and its in-flight count, once taken).
    private func shed(_ key: EndpointKey, _ why: String, inFlight: Bool) {
        guard let r = request else { return }
        if inFlight, let loop { loop.pool.state(key).inFlight -= 1 }
        releaseBackend()
        r.endpoint = nil
        r.connecting = false
        proxy.stats.overflows.add(1, ordering: .relaxed)
        countEvent("overflow")
        record?.flags.append("UO")
        fail(.serviceUnavailable, "weft: \(key) of \(r.cluster.cluster) \(why)\n")
    }

    /// The attempt's backend has every connection its circuit breaker
    /// allows open (maxConnections): the request waits, up to the
    /// backend's connect timeout from when it began to, for one to come
    /// free on this loop or for room to open its own (UpstreamPool.wait),
    /// and is answered 503 (flag UO) if neither comes.
    private func waitForConnection(id: Int, key: EndpointKey, counters: ClusterRuntime.Backend, deadline: NIODeadline,
                                   timeout: TimeAmount) {
        guard let loop, let r = request else { return }
        r.waiting = loop.pool.wait(for: key, counters: counters, timeout: deadline - .now()) { [weak self] outcome in
            guard let self, let loop = self.loop, let r = self.request, r.attemptID == id, r.endpoint == key else {
                if case .connection(let h) = outcome { h.close() }
                return
            }
            r.waiting = nil
            switch outcome {
            case .connection(let handler):
                self.attached(.success(handler), id: id, key: key)
            case .room:
                // Another request may have taken the room meanwhile.
                if let hold = r.hold, hold.runtime.connectionLimit(counters, idle: { self.hasIdle(key, loop, r) }) == "maxConnections" {
                    guard hold.runtime.reserveWait(counters) else {
                        return self.shed(key, "is at its circuit breaker's maxConnections and maxPendingRequests", inFlight: true)
                    }
                    return self.waitForConnection(id: id, key: key, counters: counters, deadline: deadline, timeout: timeout)
                }
                self.connect(id: id, key: key, counters: counters)
            case .timedOut:
                self.shed(key, "is at its circuit breaker's maxConnections, and no connection to it came free in "
                          + IdleSweep.shown(timeout), inFlight: true)
            }
        }
    }

    /// The attempt's HTTP/2 stream waits, at its backend's maxConnections,
    /// for a stream of a full connection to end (UpstreamPool.acquire): as
    /// a request waiting for an HTTP/1.1 connection, it waits until its own
    /// timeout if it has one, else at most its backend's connect timeout,
    /// and is answered 503 (flag UO) if its stream has not gone out by then.
    private func waitForStream(id: Int, key: EndpointKey, on upstream: UpstreamHandler) {
        guard let context, let loop, let r = request else { return }
        proxy.stats.connectionWaits.add(1, ordering: .relaxed)
        guard r.requestTimer == nil && r.attemptTimer == nil else { return }
        let timeout = loop.pool.connectTimeout(for: key)
        context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [weak self, weak upstream] in
            guard let self, let upstream, let r = self.request, r.attemptID == id, r.upstream === upstream,
                  upstream.waiting?.isHeld == true else { return }
            upstream.close()
            r.upstream = nil
            self.shed(key, "is at its circuit breaker's maxConnections, and no stream to it came free in " + IdleSweep.shown(timeout),
                      inFlight: true)
        }
    }

    private func attached(_ result: Result<UpstreamHandler, any Error>, id: Int, key: EndpointKey) {
        guard let loop, let r = request, r.attemptID == id, r.endpoint == key else {
            if case .success(let h) = result { h.close() }
            return
        }
        r.connecting = false
        switch result {
        case .failure(is StreamsInUse):
            shed(key, "is at its circuit breaker's maxConnections and maxPendingRequests (every stream of its connections in use)",
                 inFlight: true)
        case .failure(let error):
            loop.pool.state(key).inFlight -= 1
            if let refused = error as? TunnelRefused, refused.status == 403 {
                // The backend's node refused by policy: final, and no fault of the backend's.
                releaseBackend()
                r.endpoint = nil
                record?.flags.append("RBAC")
                return fail(.forbidden, Authorize.forbiddenBody("\(refused.reason) (at \(key.node))"))
            }
            recordOutcome(.localFailure)
            releaseBackend()
            loop.pool.recordConnectFailure(key)
            proxy.stats.upstreamConnectFailures.add(1, ordering: .relaxed)
            countEvent("connect_failure")
            record?.lastFlag = "UF"
            proxy.logger.debug("upstream connect failed", metadata: ["endpoint": "\(key)", "error": "\(error)"])
            r.endpoint = nil
            // Nothing reached the backend: safe to retry whatever the method.
            retryOrFail(.serviceUnavailable, "weft: cannot connect to \(key) for \(r.cluster.cluster): \(error)\n",
                        sentNothing: true)
        case .success(let upstream):
            let pool = loop.pool
            let reused = upstream.reused
            let http1 = r.cluster.upstreamProtocol == .http1
            // Set once per upstream connection: it outlives this request.
            if upstream.onResponseEnd == nil {
                upstream.onResponseEnd = { [weak upstream] reusable in
                    guard let upstream else { return }
                    pool.release(upstream, to: key, reusable: reusable && http1)
                }
            }
            if !reused { pool.recordSuccess(key) }
            r.upstream = upstream
            upstream.begin(sink: self, keepAlive: !r.isUpgrade)
            if upstream.waiting != nil { waitForStream(id: id, key: key, on: upstream) }
            upstream.send(.head(r.upstreamHead), flush: false)
            // (A write that fails at once may have ended the request.)
            guard request === r else { return }
            // A retry sends the whole body again; a first attempt sends what
            // has arrived so far.
            if r.attempts > 1, let replay = r.replay {
                r.pending = replay
                r.endSent = false
            }
            flushPending()
        }
    }

    private func flushPending() {
        guard let r = request, let upstream = r.upstream, !r.connecting, !r.endSent else { return }
        let pending = r.pending
        r.pending.removeAll(keepingCapacity: true)
        // Marked before the writes: one that fails at once calls back
        // (upstreamFailed) and may end or retry the request there.
        if r.ended { r.endSent = true }
        for buffer in pending {
            upstream.send(.body(.byteBuffer(buffer)), flush: false)
            guard request === r, r.upstream === upstream else { return }
        }
        if r.ended {
            upstream.send(.end(r.trailers), flush: true)
        } else {
            upstream.flush()
        }
        resumeReads()
    }

    // MARK: upstream

    func upstreamResponse(_ part: HTTPClientResponsePart) {
        guard let context, let r = request else { return }
        stall.moved()
        switch part {
        case .head(var head):
            if let key = r.endpoint, key.node != proxy.configuration.node, head.headers.contains(name: Authorize.refusedHeader),
               let loop {
                // The backend's node could not reach it: a refused connect.
                r.upstream?.close()
                r.upstream = nil
                recordOutcome(.localFailure)
                endAttempt(success: false)
                loop.pool.recordConnectFailure(key)
                proxy.stats.upstreamConnectFailures.add(1, ordering: .relaxed)
                countEvent("connect_failure")
                record?.lastFlag = "UF"
                return retryOrFail(.serviceUnavailable, "weft: \(key) could not be reached from its node\n", sentNothing: true)
            }
            let code = Int(head.status.code)
            // (Read once: the outcome, a gRPC retry and the metrics label use it.)
            let grpcStatus = head.headers.first(name: "grpc-status")
            r.grpcWeb = nil
            if let grpc = grpcStatus.flatMap(Self.grpcOutcome(status:)) {
                recordOutcome(grpc)  // trailers-only: the status is in the head
            } else if code < 300, let type = head.headers.first(name: "content-type"), type.hasPrefix("application/grpc") {
                r.grpcOutcomePending = true
                r.grpcWeb = GRPCStatusReader.reading(contentType: type)
            } else {
                recordOutcome(code >= 500 ? .serverError(code) : .success)
            }
            if shouldRetry(status: head.status) || shouldRetry(grpc: grpcStatus), let budgetOK = withdrawRetry(), budgetOK,
               retryAllowedByBreaker() {
                r.upstream?.close()
                r.upstream = nil
                endAttempt(success: false)
                scheduleRetry()
                return
            }
            r.attemptTimer?.cancel()
            r.attemptTimer = nil
            if head.status == .switchingProtocols, r.isUpgrade, let upstream = r.upstream, let onUpgrade {
                endAttempt(success: true)
                request = nil
                proxy.stats.upgrades.add(1, ordering: .relaxed)
                // (An extended CONNECT's client is answered 200: ExtendedConnect.)
                let answered = extendedConnect ? 200 : 101
                proxy.stats.response(answered)
                complete(answered)
                r.requestTimer?.cancel()
                OpaqueKeepalive.apply(to: [context.channel] + (upstream.channel.map { [$0] } ?? []), proxy.snapshot.table.tcpKeepalive)
                onUpgrade(context, upstream, head, proxy.stats)
                return
            }
            r.responseStarted = true
            record?.status = Int(head.status.code)
            if let grpcStatus { record?.grpcStatus = Substring(grpcStatus) }
            Self.stripHopByHop(&head.headers, keepUpgrade: false)
            for m in r.responseModifiers { Self.modify(&head.headers, m) }
            if let cookie = r.setCookie { head.headers.add(name: "set-cookie", value: cookie) }
            if let session = r.session, let endpoint = r.endpoint {
                let answer = session.response(endpoint: endpoint, now: StickySession.now())
                answer.outcome.count(proxy.stats)
                if let field = answer.field { head.headers.add(name: field.name, value: field.value) }
            }
            head.version = r.head.version
            if !isHTTP2 && !r.keepAlive { head.headers.replaceOrAdd(name: "connection", value: "close") }
            proxy.stats.response(Int(head.status.code))
            if isHTTP2 && head.headers.contains(name: "grpc-status") {
                // Perhaps a gRPC "trailers-only" response (status in the one
                // HEADERS frame): held until we know whether a body follows.
                r.heldHead = head
            } else {
                context.write(wrapOutboundOut(.head(head)), promise: nil)
            }
        case .body(let buffer):
            guard r.responseStarted else { return }
            if let held = r.heldHead {
                r.heldHead = nil
                context.write(wrapOutboundOut(.head(held)), promise: nil)
            }
            record?.bytesOut += buffer.readableBytes
            if r.grpcWeb != nil { buffer.withUnsafeReadableBytes { r.grpcWeb?.body($0) } }
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            if !context.channel.isWritable { r.upstream?.pauseReads() }
        case .end(var trailers):
            guard r.responseStarted else { return }
            if var held = r.heldHead {
                // Trailers-only: NIO's HTTP/1-style codec would send the
                // head and an empty end apart, and gRPC clients then miss the
                // status. Send it as a head and trailers instead.
                if trailers == nil {
                    var moved = HTTPHeaders()
                    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                        for v in held.headers[name] { moved.add(name: name, value: v) }
                        held.headers.remove(name: name)
                    }
                    trailers = moved
                }
                context.write(wrapOutboundOut(.head(held)), promise: nil)
            }
            let keepAlive = r.keepAlive
            let trailerStatus = trailers?.first(name: "grpc-status") ?? r.grpcWeb?.status
            if let trailerStatus { record?.grpcStatus = Substring(trailerStatus) }
            if r.grpcOutcomePending {
                r.grpcOutcomePending = false
                recordOutcome(trailerStatus.flatMap(Self.grpcOutcome(status:)) ?? .success)
            }
            endAttempt(success: true)
            complete(record?.status ?? 0)
            finish()
            let written = context.writeAndFlush(wrapOutboundOut(.end(trailers)))
            lastEnd = written
            stopRequestBody(context)
            written.assumeIsolated().whenComplete { _ in
                if (!keepAlive || self.quiescing || self.clientGone) && !self.isHTTP2 { self.endConnection(context) }
            }
            if keepAlive && !quiescing { responseDone(context) }
        }
    }

    func upstreamFailed(_ error: any Error, responded: Bool) {
        guard let r = request else { return }
        let unprocessed = Self.unprocessed(error, on: r.upstream)
        if !responded || r.grpcOutcomePending { recordOutcome(.localFailure) }
        let endpoint = endAttempt(success: false)
        r.upstream = nil
        if r.responseStarted || responded {
            // Part of a response went out: the client must see it broken.
            proxy.stats.upstreamResets.add(1, ordering: .relaxed)
            countEvent("reset")
            record?.flags.append("UC")
            abandon()
            context?.close(promise: nil)
            return
        }
        proxy.stats.upstreamResets.add(1, ordering: .relaxed)
        countEvent("reset")
        record?.lastFlag = "UC"
        if let unprocessed, r.replay != nil {
            // An HTTP/2 backend refused the stream (REFUSED_STREAM: past its
            // stream limit, or shedding load) or its GOAWAY left it out (a
            // graceful shutdown): RFC 9113 8.7 has such a request
            // unprocessed, safe to send again whatever its method, as gRPC's
            // clients retry one transparently. Once, unbudgeted, the whole
            // request sent again from what was kept of it.
            return retryOrFail(.serviceUnavailable, "weft: upstream \(endpoint.map(\.description) ?? "?") \(unprocessed)\n",
                               sentNothing: true, free: true)
        }
        let reusedIdle = r.upstream?.reused ?? false
        retryOrFail(.badGateway, "weft: upstream \(endpoint.map(\.description) ?? "?") reset the connection before responding\n",
                    sentNothing: false, free: reusedIdle && r.idempotent)
    }

    /// How the backend left an upstream HTTP/2 stream unprocessed, if it
    /// did: RST_STREAM REFUSED_STREAM, or a GOAWAY whose last processed
    /// stream came before it (NIO closes such a stream with CANCEL).
    static func unprocessed(_ error: any Error, on upstream: UpstreamHandler?) -> String? {
        guard let closed = error as? NIOHTTP2Errors.StreamClosed else { return nil }
        if closed.errorCode == .refusedStream { return "refused the stream (REFUSED_STREAM)" }
        if closed.errorCode == .cancel, upstream?.http2?.unprocessed(closed.streamID) == true {
            return "went away before the stream (GOAWAY)"
        }
        return nil
    }

    func upstreamReadComplete() {
        // Streamed responses (gRPC server streams, SSE) reach the client as
        // they arrive, one flush per upstream read burst.
        if request?.responseStarted == true { context?.flush() }
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        // The body's reads wait for the backend (bodyHeld).
        if writable { resumeReads() }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { request?.upstream?.resumeReads() }
        context.fireChannelWritabilityChanged()
    }

    // MARK: retries and timeouts

    private func shouldRetry(status: HTTPResponseStatus) -> Bool {
        guard let r = request, let retry = r.action.retry, r.idempotent, r.attempts <= retry.attempts,
              r.replay != nil else { return false }
        return retry.codes.contains(Int(status.code))
    }

    /// A gRPC call answered with a status alone (trailers-only: the status
    /// in the head, no message sent back) that the retry policy names:
    /// tried again whatever the method, as gRPC's own retry does before a
    /// call is committed, once the request was received, and kept, whole.
    private func shouldRetry(grpc text: String?) -> Bool {
        guard let r = request, let retry = r.action.retry, let statuses = retry.grpcStatuses, !statuses.isEmpty,
              r.attempts <= retry.attempts, r.ended, r.replay != nil, let text, let status = Int(text) else { return false }
        return statuses.contains(status)
    }

    /// nil when no retry policy applies; false when the budget is spent.
    private func withdrawRetry() -> Bool? {
        guard request != nil, let box = cached?.budget else { return nil }
        let ok = box.budget.withdraw(now: Self.nowSeconds())
        if !ok {
            proxy.stats.retriesBudgetExhausted.add(1, ordering: .relaxed)
            countEvent("retry_budget_exhausted")
        }
        return ok
    }

    private func retryOrFail(_ status: HTTPResponseStatus, _ body: String, sentNothing: Bool, free: Bool = false) {
        guard let r = request else { return }
        let maxAttempts = 1 + (r.action.retry?.attempts ?? 0) + (free ? 1 : 0)
        // Connect failures are retried even without a retry policy, once per
        // other endpoint: nothing was sent, so nothing can be applied twice.
        let connectRetries = sentNothing ? max(maxAttempts, min(3, (r.snapshot.table.clusters[r.cluster.cluster]?.count ?? 1))) : maxAttempts
        r.lastFailure = (status, body)
        let safe = sentNothing || (r.idempotent && r.replay != nil)
        if safe, r.attempts < connectRetries, !r.isUpgrade || sentNothing {
            if (free || withdrawRetry() ?? true) && retryAllowedByBreaker() {
                scheduleRetry()
                return
            }
        }
        if let flag = record?.lastFlag { record?.flags.append(flag) }
        if r.attempts > 1 { record?.flags.append("URX") }
        fail(status, body)
    }

    private func scheduleRetry() {
        guard let context, let r = request else { return }
        proxy.stats.retries.add(1, ordering: .relaxed)
        countEvent("retry")
        let base = r.action.retry?.backoff ?? .milliseconds(5)
        // Exponential backoff with full jitter, capped at 10x the base.
        let factor = min(1 << max(r.attempts - 1, 0), 10)
        let ceiling = Double(base.nanoseconds)
        let jitter = loop.map { Double.random(in: 0.5...1.0, using: &$0.random) } ?? 0.75
        let delay = Int64(jitter * ceiling * Double(factor))
        r.retryTimer = context.eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(delay)) { [weak self] in
            self?.request?.retryTimer = nil
            self?.startAttempt()
        }
    }

    private func attemptTimedOut(_ id: Int) {
        guard let r = request, r.attemptID == id, !r.responseStarted else { return }
        proxy.stats.timeouts.add(1, ordering: .relaxed)
        countEvent("timeout")
        record?.lastFlag = "UT"
        recordOutcome(.localFailure)
        r.upstream?.close()
        let endpoint = endAttempt(success: false)
        r.upstream = nil
        r.connecting = false
        retryOrFail(.gatewayTimeout, "weft: backend \(endpoint.map(\.description) ?? "?") did not answer within \(r.action.timeouts.backendRequest.map(\.manifestText) ?? "")\n",
                    sentNothing: false)
    }

    private func requestTimedOut() {
        guard let r = request else { return }
        proxy.stats.timeouts.add(1, ordering: .relaxed)
        countEvent("timeout")
        record?.flags.append("UT")
        if r.responseStarted {
            abandon()
            context?.close(promise: nil)
            return
        }
        r.upstream?.close()
        endAttempt(success: false)
        r.upstream = nil
        fail(.gatewayTimeout, "weft: request timed out after \(r.action.timeouts.request.map(\.manifestText) ?? "")\n")
    }

    /// MeshConfig proxy.streamIdleTimeout ran out on the request in flight:
    /// nothing came from its backend (a client that does not read stops
    /// those reads), nor of its body from the client while that was being
    /// read. Its backend connection is closed. Nothing of the response out
    /// yet: 504, or 408 while the request is still being read (and then the
    /// connection, or the stream, ends after the answer: the rest of the
    /// body is not waited for). Otherwise the client sees the response
    /// broken: the connection closed (HTTP/1.1) or the stream reset.
    private func streamIdleTimedOut(_ sweep: IdleSweep) {
        guard let r = request, let context else { return }
        proxy.stats.streamIdleTimeouts.add(1, ordering: .relaxed)
        countEvent("stream_idle_timeout")
        record?.flags.append("SI")
        proxy.logger.debug("request ended: nothing moved on it", metadata: [
            "target": "\(r.endpoint.map(\.description) ?? r.cluster.cluster)", "timeout": "\(IdleSweep.shown(sweep.streamTimeout ?? .zero))"])
        if r.responseStarted {
            abandon()
            context.close(promise: nil)
            return
        }
        // The body stopped coming while the proxy was reading it: the
        // client's. Held for the backend (bodyHeld): the backend's.
        let unread = receiving && !bodyHeld
        if !unread { recordOutcome(.localFailure) }  // a backend that never answered, or took no more
        r.upstream?.close()
        endAttempt(success: false)
        r.upstream = nil
        fail(unread ? .requestTimeout : .gatewayTimeout, StallCount.body(sweep), keepAlive: unread ? false : nil)
        if unread && isHTTP2 { closeAfterLastResponse(context) }
    }

    /// The in-flight count and timers of the current attempt; the backend
    /// it went to (which it forgets), for the messages that name it.
    @discardableResult
    private func endAttempt(success: Bool) -> EndpointKey? {
        guard let r = request else { return nil }
        let endpoint = r.endpoint
        r.attemptTimer?.cancel()
        r.attemptTimer = nil
        r.waiting?.cancel()
        r.waiting = nil
        // (Also while still connecting: the connection, when it comes, finds
        // its attempt over and is closed; nothing else would count it off.)
        if let key = endpoint, let loop {
            loop.pool.state(key).inFlight -= 1
            r.endpoint = nil
            releaseBackend()
        }
        return endpoint
    }

    /// The attempt is over: its backend has one request fewer in flight.
    @inline(never)
    private func releaseBackend() {
        guard let r = request else { return }
        r.hold?.release()
        r.hold = nil
    }

    /// Tells the cluster's outlier detector how the attempt went (once).
    @inline(never)
    private func recordOutcome(_ outcome: OutlierDetector.Outcome) {
        request?.hold?.record(outcome)
    }

    /// circuitBreaker.maxRetries: retries in progress for the cluster. A
    /// request counts once from its first retry until it finishes; the
    /// place is taken atomically, as maxRequests' slots are (two loops that
    /// both saw room cannot both take the last).
    @inline(never)
    private func retryAllowedByBreaker() -> Bool {
        guard let r = request, let runtime = r.runtime else { return true }
        if r.retrying { return true }
        guard let max = runtime.policy.circuitBreaker?.maxRetries else { return true }
        if runtime.retries.wrappingAdd(1, ordering: .relaxed).oldValue >= max {
            runtime.retries.subtract(1, ordering: .relaxed)
            proxy.stats.overflows.add(1, ordering: .relaxed)
            countEvent("overflow")
            record?.lastFlag = "UO"
            return false
        }
        r.retrying = true
        return true
    }

    private func finish() {
        request?.requestTimer?.cancel()
        request?.retryTimer?.cancel()
        if let r = request, r.retrying { r.runtime?.retries.subtract(1, ordering: .relaxed) }
        request = nil
        resumeReads()
    }

    /// The downstream went away, or a response broke: drop everything.
    private func abandon() {
        if record != nil {
            if record?.flags.isEmpty == true { record?.flags.append("DC") }
            complete(record?.status ?? 0)
        }
        guard let r = request else { return }
        r.upstream?.close()
        endAttempt(success: false)
        finish()
    }

    // MARK: telemetry

    /// Counts an upstream event against the Service this request dialed.
    private func countEvent(_ event: String) {
        guard let loop, let snapshot = record?.snapshot ?? request?.snapshot else { return }
        loop.countEvent(event, proxy: proxy, snapshot: snapshot, frontendKey: frontendKey)
    }

    /// The request is answered (or broken): count it, time it, log it.
    private func complete(_ code: Int) {
        guard let rec = record, let loop else { return }
        record = nil
        // Nothing to count, log or trace: the request costs no more than that.
        guard rec.snapshot.table.requestMetrics != false || rec.snapshot.table.accessLog != nil
            || rec.snapshot.table.tracing != nil else { return }
        let peers = PeerLabels(snapshot: rec.snapshot, source: origin.source, service: rec.service,
                               serviceNamespace: rec.serviceNamespace, upstream: rec.upstream)
        let contentType = rec.head.headers.first(name: "content-type")
        let grpc = contentType?.hasPrefix("application/grpc") ?? false
        let flags = rec.flags.isEmpty ? "-" : rec.flags.joined(separator: ",")
        let grpcStatus = grpc ? GRPCStatus.reported(rec.grpcStatus, httpCode: code,
                                                    web: contentType?.hasPrefix("application/grpc-web") ?? false) : ""
        let labels = RequestLabels(peers: peers, route: rec.route, requestProtocol: grpc ? "grpc" : "http",
                                   responseCode: code, responseFlags: flags, grpcResponseStatus: grpcStatus)
        let elapsed = NIODeadline.now() - rec.start
        if rec.snapshot.table.requestMetrics != false {
            let series = loop.telemetry.request(labels, proxy.telemetry)
            series.count.increment()
            series.duration.record(nanoseconds: elapsed.nanoseconds)
        }
        if let target = rec.snapshot.table.tracing, let span = rec.span, span.sampled {
            proxy.spans.export(to: target, span: span, name: "\(rec.head.method.rawValue) \(rec.route)",
                               start: rec.wallStart, durationNanos: elapsed.nanoseconds, attributes: [
                                   ("http.request.method", .string(rec.head.method.rawValue)),
                                   ("url.path", .string(rec.head.uri)),
                                   ("http.response.status_code", .int(code)),
                                   ("server.address", .string(rec.head.headers.first(name: "host") ?? "")),
                                   ("weft.route", .string(rec.route)),
                                   ("weft.response_flags", .string(flags)),
                                   ("weft.source_workload", .string("\(peers.sourceNamespace)/\(peers.sourceWorkload)")),
                                   ("weft.destination_service", .string(peers.destinationService)),
                                   ("weft.upstream", .string(rec.upstream?.description ?? "")),
                                   ("weft.attempts", .int(rec.attempts)),
                               ] + (Int(grpcStatus).map { [("rpc.grpc.status_code", .int($0))] } ?? []),
                               error: code >= 500 || code == 0)
        }
        guard AccessLog.covers(rec.snapshot.table.accessLog, namespace: peers.sourceNamespace) else { return }
        let line = HTTPLogLine(
            start: rec.wallStart, protocolName: isHTTP2 ? "HTTP/2" : "HTTP/\(rec.head.version.major).\(rec.head.version.minor)",
            method: rec.head.method.rawValue, path: rec.head.uri, authority: rec.head.headers.first(name: "host"), code: code,
            flags: flags, elapsedNanos: elapsed.nanoseconds, bytesIn: rec.bytesIn, bytesOut: rec.bytesOut, attempts: rec.attempts,
            route: rec.route, source: origin.source, peers: peers, upstream: rec.upstream, requestID: rec.requestID,
            span: rec.span, userAgent: rec.head.headers.first(name: "user-agent"), grpcStatus: grpc ? grpcStatus : nil)
        proxy.accessLog.append(line.render())
    }

    // MARK: local responses

    /// `keepAlive` false: the connection ends after the answer, whatever
    /// the request asked.
    private func fail(_ status: HTTPResponseStatus, _ body: String, keepAlive: Bool? = nil) {
        guard let r = request else { return }
        let head = r.head
        let keepAlive = keepAlive ?? r.keepAlive
        r.upstream?.close()
        finish()
        respondLocally(head, status, body, keepAlive: keepAlive)
    }

    /// `100 Continue` for a request that asked for it, now that it goes to
    /// a backend (its first attempt; once).
    private func sendContinue() {
        guard let version = continuePending, let context else { return }
        continuePending = nil
        context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: .continue))), promise: nil)
    }

    /// RFC 9113 8.1: an HTTP/2 stream answered whole while its request is
    /// still coming (a backend that answered an upload at its head, a
    /// local answer) is reset NO_ERROR after the response's end, so that
    /// the client stops sending what nobody will read. (Written past the
    /// HTTP/1 translation, as the frame it is.)
    private func stopRequestBody(_ context: ChannelHandlerContext) {
        guard isHTTP2, receiving,
              let codec = try? context.pipeline.syncOperations.context(handlerType: HTTP2FramePayloadToHTTP1ServerCodec.self)
        else { return }
        codec.writeAndFlush(NIOAny(HTTP2Frame.FramePayload.rstStream(.noError)), promise: nil)
    }

    private func respondLocally(_ request: HTTPRequestHead, _ status: HTTPResponseStatus, _ body: String,
                                keepAlive: Bool, extraHeaders: [(String, String)] = [], grpcStatus: Int? = nil) {
        guard let context else { return }
        // Answered before the client was told to send its body: it may
        // send it or not (RFC 9110 10.1.1), so the connection cannot carry
        // another request in step; it ends (staged, reading what comes).
        let keepAlive = keepAlive && continuePending == nil
        continuePending = nil
        var headers = HTTPHeaders()
        var trailers: HTTPHeaders?
        var sent = status
        let grpc = GRPCLocalAnswer.contentType(request.headers.first(name: "content-type"), status: Int(status.code))
        if let grpc {
            // A gRPC call: its status and the reason (GRPCLocalAnswer), in
            // the head or, to an HTTP/2 gRPC client, in trailers (NIO's
            // HTTP/1 translation sends no HEADERS with END_STREAM).
            let fields = GRPCLocalAnswer.fields(httpCode: Int(status.code), body: body, grpcStatus: grpcStatus)
            record?.grpcStatus = fields.first.map { Substring($0.1) }
            sent = .ok
            headers.add(name: "content-type", value: grpc)
            if GRPCLocalAnswer.inHead(grpc, http2: isHTTP2) {
                headers.add(contentsOf: fields)
                headers.add(name: "content-length", value: "0")
            } else {
                trailers = HTTPHeaders(fields)
            }
        } else {
            headers.add(name: "content-type", value: "text/plain; charset=utf-8")
            headers.add(name: "content-length", value: "\(body.utf8.count)")
        }
        proxy.stats.response(Int(sent.code))
        complete(Int(sent.code))
        headers.add(name: "server", value: "weft")
        for (n, v) in extraHeaders { headers.add(name: n, value: v) }
        if !isHTTP2 && !keepAlive { headers.add(name: "connection", value: "close") }
        let head = HTTPResponseHead(version: request.version, status: sent, headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if request.method != .HEAD && grpc == nil {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        let isHTTP2 = self.isHTTP2
        let written = context.writeAndFlush(wrapOutboundOut(.end(trailers)))
        lastEnd = written
        stopRequestBody(context)
        written.assumeIsolated().whenComplete { _ in
            if (!keepAlive || self.quiescing || self.clientGone) && !isHTTP2 { self.endConnection(context) }
        }
        if keepAlive && !quiescing { responseDone(context) }
    }

    private func redirect(_ head: HTTPRequestHead, _ r: HTTPRoute.Redirect, path: Substring, query: Substring?,
                          match: HTTPRoute.Match?, keepAlive: Bool) {
        let scheme = r.scheme ?? "http"
        let hostHeader = head.headers.first(name: "host") ?? "\(origin.vip)"
        var host = hostHeader
        var port: UInt16?
        if let colon = hostHeader.lastIndex(of: ":"), let p = UInt16(hostHeader[hostHeader.index(after: colon)...]) {
            host = String(hostHeader[..<colon])
            port = p
        }
        if let h = r.hostname { host = h }
        if let p = r.port { port = p } else if r.scheme != nil { port = nil }
        let defaultPort: UInt16 = scheme == "https" ? 443 : 80
        let newPath = r.path.map { RouteMatcher.rewrite(path: path, with: $0, match: match) } ?? String(path)
        var location = "\(scheme)://\(host)"
        if let port, port != defaultPort { location += ":\(port)" }
        location += newPath
        if let query { location += "?\(query)" }
        respondLocally(head, HTTPResponseStatus(statusCode: r.statusCode), "", keepAlive: keepAlive,
                       extraHeaders: [("location", location)])
    }

    // MARK: mirrors

    private func startMirrors() {
        // Not an Upgrade (WebSocket): its copy would ask the mirror's backend
        // to switch protocols, and an HTTP/1.1 server's parser stops after
        // such a request, so the pooled connection the copy went out on
        // would swallow every request sent on it after.
        guard let r = request, !r.mirrors.isEmpty, !r.isUpgrade, let replay = r.replay, let loop, let context else { return }
        for m in r.mirrors where Double.random(in: 0..<100, using: &loop.random) < m.percent {
            let cluster = ProxyTable.clusterName(namespace: m.namespace ?? r.snapshot.table.frontends[frontendKey]?.namespace ?? "",
                                                 service: m.name, port: m.port)
            guard let endpoints = r.snapshot.endpoints[cluster], let key = loop.pool.pick(endpoints, excluding: []),
                  loop.allowed(proxy, generation: r.snapshot.generation, source: origin.source, destination: key.ip, port: key.port, node: key.node)
            else { continue }
            proxy.stats.mirrored.add(1, ordering: .relaxed)
            let limit = r.action.timeouts.request.map { TimeAmount($0) } ?? ConnectionRegistry.streamIdleTimeout(r.snapshot.table)
            MirrorExchange.send(head: r.upstreamHead, body: replay, to: key,
                                tunnel: tunnel(to: key, loop, r),
                                pool: loop.pool, limit: limit, on: context.eventLoop)
        }
    }

    // MARK: header work

    /// A gRPC status (`grpc-status` in a response's head or trailers) as
    /// the outlier detector counts it, by Envoy's mapping to HTTP: UNKNOWN,
    /// INTERNAL and DATA_LOSS 500, UNIMPLEMENTED 501, UNAVAILABLE 503,
    /// DEADLINE_EXCEEDED 504 (a gateway error too); the rest are the
    /// caller's or the call's own outcome, not the backend's failure. nil
    /// when there is no status.
    static func grpcOutcome(_ headers: HTTPHeaders) -> OutlierDetector.Outcome? {
        headers.first(name: "grpc-status").flatMap(grpcOutcome(status:))
    }

    /// The same for a `grpc-status` value already read.
    static func grpcOutcome(status text: String) -> OutlierDetector.Outcome? {
        guard let status = Int(text) else { return nil }
        switch status {
        case 2, 13, 15: return .serverError(500)
        case 12: return .serverError(501)
        case 14: return .serverError(503)
        case 4: return .serverError(504)
        default: return .success
        }
    }

    /// An HTTP/1.1 request with `Expect: 100-continue` (RFC 9110 10.1.1: not
    /// an HTTP/1.0 one, which cannot be sent a 1xx).
    static func expectsContinue(_ head: HTTPRequestHead) -> Bool {
        guard head.version.major == 1, head.version.minor >= 1 else { return false }
        return head.headers["expect"].contains { $0.lowercased().filter { $0 != " " && $0 != "\t" } == "100-continue" }
    }

    /// How long a request queued at maxConnections may wait when its own
    /// timeout will end the wait first (a bound all the same).
    static let queuedUntilTimedOut = TimeAmount.hours(1)

    /// The body of an answer a TrafficPolicy fault abort gives (both paths).
    static let faultAbortBody = "weft: fault injected by TrafficPolicy (abort)\n"

    static func splitTarget(_ uri: String) -> (Substring, Substring?) {
        // By UTF-8 code unit: "/" and "?" are ASCII, and Character
        // comparisons cost grapheme breaking on every request.
        var target = Substring(uri)
        // Absolute-form (a client that thinks it talks to a proxy).
        if target.utf8.starts(with: "http://".utf8),
           let slash = target.utf8.dropFirst(7).firstIndex(of: UInt8(ascii: "/")) {
            target = target[slash...]
        }
        if let q = target.utf8.firstIndex(of: UInt8(ascii: "?")) {
            return (target[..<q], target[target.utf8.index(after: q)...])
        }
        return (target, nil)
    }

    static func modify(_ headers: inout HTTPHeaders, _ m: HTTPRoute.HeaderModifier) {
        for h in m.set { headers.replaceOrAdd(name: h.name, value: h.value) }
        for h in m.add { headers.add(name: h.name, value: h.value) }
        for name in m.remove { headers.remove(name: name) }
    }

    /// RFC 9110 section 7.6.1: Connection and the headers it names, and the
    /// classic hop-by-hop set, never travel past a proxy.
    static func stripHopByHop(_ headers: inout HTTPHeaders, keepUpgrade: Bool) {
        // One pass to see what there is to do. The usual case is one
        // `connection: keep-alive` (nginx sends it on every response):
        // removed by name, without rebuilding the headers.
        var named: [Substring] = []
        var present = 0, first: String?, several = false
        for (name, value) in headers {
            guard isHopByHop(name) else { continue }
            present += 1
            if let f = first { several = several || !name.asciiCaseInsensitiveEquals(f) } else { first = name }
            if name.asciiCaseInsensitiveEquals("connection") {
                for token in value.split(separator: ",") {
                    let t = token.trimmingASCIISpaces()
                    if !t.isEmpty && !t.asciiCaseInsensitiveEquals("keep-alive") && !t.asciiCaseInsensitiveEquals("close")
                        && !(keepUpgrade && t.asciiCaseInsensitiveEquals("upgrade")) {
                        named.append(t)
                    }
                }
            }
        }
        if named.isEmpty && !keepUpgrade && !several, let only = first {
            headers.remove(name: only)
        } else if present > 0 || !named.isEmpty {
            var kept = HTTPHeaders()
            kept.reserveCapacity(headers.count)
            for (name, value) in headers {
                if keepUpgrade && name.asciiCaseInsensitiveEquals("upgrade") { kept.add(name: name, value: value); continue }
                if isHopByHop(name) || named.contains(where: { name.asciiCaseInsensitiveEquals($0) }) { continue }
                kept.add(name: name, value: value)
            }
            headers = kept
        }
        if keepUpgrade { headers.replaceOrAdd(name: "connection", value: "upgrade") }
    }

    /// RFC 9110 7.6.1's list, plus the proxy-era ones.
    static func isHopByHop(_ name: String) -> Bool {
        switch name.utf8.count {
        case 2: return name.asciiCaseInsensitiveEquals("te")
        case 7: return name.asciiCaseInsensitiveEquals("upgrade") || name.asciiCaseInsensitiveEquals("trailer")
        case 10: return name.asciiCaseInsensitiveEquals("connection") || name.asciiCaseInsensitiveEquals("keep-alive")
        case 16: return name.asciiCaseInsensitiveEquals("proxy-connection")
        case 17: return name.asciiCaseInsensitiveEquals("transfer-encoding")
        case 18: return name.asciiCaseInsensitiveEquals("proxy-authenticate")
        case 19: return name.asciiCaseInsensitiveEquals("proxy-authorization")
        default: return false
        }
    }

    /// The hop-by-hop fields out of a request going on to a backend (its
    /// framing is then the encoder's own, from what the body is), but
    /// "te: trailers": gRPC needs it end to end, and it is the one TE value
    /// HTTP/2 allows.
    static func stripForForwarding(_ headers: inout HTTPHeaders, keepUpgrade: Bool) {
        var teTrailers = false
        for (name, value) in headers where name.asciiCaseInsensitiveEquals("te") {
            teTrailers = teTrailers || value.split(separator: ",").contains { $0.trimmingASCIISpaces().asciiCaseInsensitiveEquals("trailers") }
        }
        stripHopByHop(&headers, keepUpgrade: keepUpgrade)
        if teTrailers { headers.add(name: "te", value: "trailers") }
    }

    @discardableResult
    static func prepareUpstreamHeaders<R: RandomNumberGenerator>(_ headers: inout HTTPHeaders, client: IPv4Address, via: String,
                                                                 keepUpgrade: Bool, random: inout R,
                                                                 samplingPercent: Double? = nil) -> TraceContext.Span {
        stripForForwarding(&headers, keepUpgrade: keepUpgrade)
        let xff = headers[canonicalForm: "x-forwarded-for"]
        if xff.isEmpty {
            headers.add(name: "x-forwarded-for", value: client.description)
        } else {
            headers.replaceOrAdd(name: "x-forwarded-for", value: "\(xff.joined(separator: ", ")), \(client)")
        }
        if !headers.contains(name: "x-forwarded-proto") { headers.add(name: "x-forwarded-proto", value: "http") }
        headers.add(name: "forwarded", value: "for=\(client);proto=http")
        headers.add(name: "via", value: "1.1 \(via)")
        if !headers.contains(name: "x-request-id") { headers.add(name: "x-request-id", value: requestID(using: &random)) }
        return TraceContext.propagate(&headers, random: &random, samplingPercent: samplingPercent)
    }

    /// Whether NIO's HTTP/1 decoder (llhttp) takes `head` for an upgrade
    /// and stops parsing after it: an Upgrade field and the upgrade token in
    /// Connection, or CONNECT.
    static func stopsTheDecoder(_ head: HTTPRequestHead) -> Bool {
        head.method == .CONNECT || (head.headers.contains(name: "upgrade")
            && head.headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" })
    }

    /// An HTTP/1.1 Upgrade the proxy passes through (WebSocket and the
    /// like). `h2c` is not one of them: the proxy takes that one itself
    /// (H2CUpgrade) or declines it and answers over HTTP/1.1.
    static func isUpgradeRequest(_ head: HTTPRequestHead) -> Bool {
        guard head.headers[canonicalForm: "connection"].contains(where: { $0.lowercased() == "upgrade" }) else { return false }
        let tokens = head.headers[canonicalForm: "upgrade"]
        return !tokens.isEmpty && !tokens.contains { $0.lowercased().hasPrefix("h2c") }
    }

    /// A random 128-bit id in UUID (version 4) form, written straight into
    /// one string buffer: this runs for every request.
    static func requestID<R: RandomNumberGenerator>(using random: inout R) -> String {
        let (a, b) = requestIDBits(using: &random)
        return String(unsafeUninitializedCapacity: 36) { writeRequestID(a, b, into: UnsafeMutableRawBufferPointer($0)) }
    }

    /// The 128 bits of a version 4 UUID.
    static func requestIDBits<R: RandomNumberGenerator>(using random: inout R) -> (UInt64, UInt64) {
        let a = random.next(), b = random.next()
        return ((a & 0xFFFF_FFFF_FFFF_0FFF) | 0x4000, (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000)
    }

    /// Writes the UUID of `requestIDBits` (36 bytes, 8-4-4-4-12 hex) at the
    /// start of `out` and returns 36.
    static func writeRequestID(_ a: UInt64, _ b: UInt64, into out: UnsafeMutableRawBufferPointer) -> Int {
        precondition(out.count >= 36)
        Hex.write(UInt32(truncatingIfNeeded: a >> 32), into: out, at: 0)
        out[8] = UInt8(ascii: "-")
        Hex.write(UInt16(truncatingIfNeeded: a >> 16), into: out, at: 9)
        out[13] = UInt8(ascii: "-")
        Hex.write(UInt16(truncatingIfNeeded: a), into: out, at: 14)
        out[18] = UInt8(ascii: "-")
        Hex.write(UInt16(truncatingIfNeeded: b >> 48), into: out, at: 19)
        out[23] = UInt8(ascii: "-")
        Hex.write(UInt16(truncatingIfNeeded: b >> 32), into: out, at: 24)
        Hex.write(UInt32(truncatingIfNeeded: b), into: out, at: 28)
        return 36
    }

    /// A weighted draw among a rule's backendRefs (canary and blue-green
    /// splits); nil when every weight is 0.
    static func pickCluster<R: RandomNumberGenerator>(_ backends: [ProxyTable.WeightedCluster],
                                                      using random: inout R) -> ProxyTable.WeightedCluster? {
        let total = backends.reduce(UInt64(0)) { $0 + UInt64($1.weight) }
        guard total > 0 else { return nil }
        if backends.count == 1 { return backends[0] }
        var draw = UInt64.random(in: 0..<total, using: &random)
        for b in backends {
            if draw < UInt64(b.weight) { return b }
            draw -= UInt64(b.weight)
        }
        return backends.last
    }

    static func nowSeconds() -> Int64 { Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000_000) }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

extension StringProtocol {
    /// Equal under ASCII case folding (header names and tokens), without
    /// allocating a lowercased copy.
    func asciiCaseInsensitiveEquals(_ other: some StringProtocol) -> Bool {
        var a = utf8.makeIterator(), b = other.utf8.makeIterator()
        while true {
            switch (a.next(), b.next()) {
            case (nil, nil): return true
            case (let x?, let y?):
                if x != y && Self.fold(x) != Self.fold(y) { return false }
            default: return false
            }
        }
    }

    private static func fold(_ c: UInt8) -> UInt8 { c >= 65 && c <= 90 ? c + 32 : c }
}

extension Substring {
    /// Without leading and trailing spaces and tabs (RFC 9110 OWS).
    func trimmingASCIISpaces() -> Substring {
        var s = self
        while let f = s.utf8.first, f == 32 || f == 9 { s = s.dropFirst() }
        while let l = s.utf8.last, l == 32 || l == 9 { s = s.dropLast() }
        return s
    }
}
