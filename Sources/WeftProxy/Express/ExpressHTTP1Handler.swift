import Glibc
import NIOCore
import NIOHTTP1
import WeftCore
import WeftKernel

/// The express path for HTTP/1.1: a request that needs nothing but routing,
/// a backend choice, the proxy's own headers and metrics is forwarded as
/// bytes, its head rewritten in one copy, and its response framed as it
/// goes by, with no codec and no typed messages on either connection.
/// SwiftNIO's pipeline then costs about what HAProxy costs in all
/// (docs/proxy.md, "Where the CPU goes").
///
/// Everything else goes to the full path (HTTPProxyHandler behind NIO's
/// codec), which this handler hands the connection to, for good, before it
/// sends anything of the request that needs it: HTTPRoute filters, retries,
/// timeouts, a TrafficPolicy the express paths do not carry (fault
/// injection; a cookie hash: ClusterRuntime.express), a request its
/// circuit breaker sheds, tracing export, AuthorizationPolicy on a pod of
/// this node, upgrades, chunked or large request bodies, a request with
/// X-Forwarded-For or traceparent already set, a looped
/// request, anything the strict parser of HTTP1Wire does not accept, and
/// failures it is safe to try again (a refused connect, a reused connection
/// closed under the request), so that the full path's retries and local
/// answers apply.
///
/// The same handler is the destination end of a tunnel stream that carries
/// HTTP/1.1 another node's proxy wrote (`delivering:`): there the requests
/// were routed and their headers written at the source, so each goes to
/// its one pod as it came, byte for byte, once the AuthorizationPolicy in
/// force when it arrives allows it (403 with the reason when not); the
/// response is framed as above. What it does not take (an upgrade, Expect,
/// a chunked or large body, a head HTTP1Wire refuses, a reused connection
/// closed under an idempotent request) goes to InboundHTTP behind NIO's
/// codec, as on the full path.
final class ExpressHTTP1Handler: ChannelDuplexHandler, RemovableChannelHandler, ExpressUpstream.Owner {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// A request (head and body) larger than this goes to the full path,
    /// which streams it; so does a head not complete within it.
    static let maxRequest = 64 * 1024
    /// A response body read with its head and no larger than this is
    /// copied behind the rewritten head and sent in the same write.
    static let sameWrite = 16 * 1024

    private let proxy: ProxyContext
    /// Captured from a pod of this node (nil when delivering).
    private let origin: CapturedOrigin?
    private let delivery: Delivery?
    private let source: IPv4Address
    private let frontendKey: String
    private let connectionHeaders: Express.ConnectionHeaders
    private var context: ChannelHandlerContext?
    private var loop: LoopState?
    /// Client bytes read and not yet sent on.
    private var inbound: ByteBuffer?
    private var fields: [HTTP1Wire.Field] = []
    private var exchange: Exchange?
    private var routing: Express.Routing?
    private var quiescing = false
    private var inputClosed = false
    private var readPending = false
    private var handedOver = false
    /// Every byte read from the client, for the count an upgraded
    /// connection is spliced by (ReadTally, put in at the handover).
    private var bytesRead: UInt64 = 0
    /// Written to the client since the last flush.
    private var unflushed = false
    private var lastSeries: Express.LastSeries?
    private var idle = IdleCount()
    /// The exchange: sweeps through which nothing came from its backend;
    /// before it, those through which no byte of a request whose head is
    /// in and whose body is not (`awaitingBody`) came from the client.
    private var stall = StallCount()
    private var awaitingBody = false
    /// The head waited on (captured connections only; a tunnel stream's
    /// requests were whole when the source proxy wrote them).
    private var head = HeadClock()
    /// The connection is ending (endAfterWrites): nothing more is taken,
    /// what comes is dropped.
    private var lingering = false

    /// `routing`: the frontend's, for "vip:port" of `origin`, as
    /// ProtocolDetector looked it up to choose this path.
    init(proxy: ProxyContext, origin: CapturedOrigin, routing: Express.Routing) {
        self.proxy = proxy
        self.origin = origin
        delivery = nil
        source = origin.source
        frontendKey = routing.frontendKey
        self.routing = routing
        connectionHeaders = Express.ConnectionHeaders(client: origin.source.description, via: proxy.viaToken)
    }

    /// A tunnel stream's requests for a pod of this node: `request` is who
    /// sends them (the peer's identity, the source pod's address).
    init(proxy: ProxyContext, delivering request: AuthorizationRequest, to key: EndpointKey) {
        self.proxy = proxy
        origin = nil
        delivery = Delivery(request: request, key: key)
        source = request.sourceIP
        frontendKey = key.description
        connectionHeaders = Express.ConnectionHeaders(client: request.sourceIP.description, via: proxy.viaToken)
    }

    /// Where a tunnel stream's requests go, and who they are from.
    private struct Delivery {
        let request: AuthorizationRequest
        let key: EndpointKey
    }

    /// Whether a connection to `frontendKey` starts on the express path: the
    /// snapshot has nothing that makes every request of it need the full one.
    /// A TrafficPolicy's rate limit and fault injection are judged here (a
    /// request over the limit or aborted is answered in place, a delayed
    /// one waits here).
    static func serves(_ snapshot: RouteSnapshot, frontendKey: String) -> Bool {
        snapshot.matchers[frontendKey] != nil && snapshot.table.tracing == nil
    }

    /// One request forwarded, from its head to the end of its response.
    private final class Exchange {
        let snapshot: RouteSnapshot
        let route: String
        let service: String?
        let serviceNamespace: String?
        let key: EndpointKey
        let state: UpstreamPool.EndpointState
        let tunnel: TunnelChoice?
        let start = NIODeadline.now()
        let keepAlive: Bool
        let isHEAD: Bool
        let idempotent: Bool
        let grpc: Bool
        /// The request as the client sent it (a slice of what was read, no
        /// copy), for a hand-over; set when the exchange starts.
        var request = ByteBuffer()
        let length: Int
        /// The request as the backend gets it (nil until the exchange starts
        /// when that is the request as it came).
        var outgoing: ByteBuffer?
        var upstream: ExpressUpstream?
        /// The connection came from the idle list.
        var reused = false
        var connecting = true
        /// Response head bytes read so far (nil once the head is through).
        var head: ByteBuffer?
        var framing = Express.Framing.head
        var status = 0
        /// Some of the response reached the client.
        var responded = false
        /// The backend keeps the connection open after this response.
        var reusable = true
        /// The response told the client the connection closes after it.
        var closesClient = false
        /// Response bytes after the head (a chunked body's framing included).
        var bytesOut = 0
        /// What the access log line needs, when access logs are on.
        var logged: Express.Logged?
        /// The backend's slot and outcome under a TrafficPolicy.
        var hold: ClusterRuntime.Hold?
        /// A minted cookie hash cookie, for the response (Set-Cookie).
        var setCookie: String?
        /// A persistent session's answer (sessionPersistence), counted when
        /// the response head is written.
        var session: StickySession.Answer?
        /// The backend of the route's split drawn (captured connections).
        var cluster = ""
        /// Delivering: the request went to the pod as it came, with
        /// `Connection: close`, so the pod's connection is not reused
        /// (the pod may close it, or read nothing more on it, whatever its
        /// response says).
        var closesUpstream = false
        /// An injected delay (TrafficPolicy): how long, then its timer.
        var delay: Duration?
        var waiting: Scheduled<Void>?
        var delayed = false
        /// Counted in its backend's in-flight requests (from the send on).
        var counted = false
        /// A gRPC-Web call (`grpc` too).
        var web = false
        /// A gRPC call's status from its response head; the reader of its
        /// trailers (chunked) or gRPC-Web trailer frame; whether the outlier
        /// detector waits for the status (a 2xx head without one).
        var grpcStatus: String?
        var grpcReader: GRPCStatusReader?
        var grpcOutcomePending = false

        init(snapshot: RouteSnapshot, route: String, service: String?, serviceNamespace: String?, key: EndpointKey, state: UpstreamPool.EndpointState,
             tunnel: TunnelChoice?, keepAlive: Bool, isHEAD: Bool, idempotent: Bool, grpc: Bool, length: Int,
             outgoing: ByteBuffer?) {
            self.snapshot = snapshot
            self.route = route
            self.service = service
            self.serviceNamespace = serviceNamespace
            self.key = key
            self.state = state
            self.tunnel = tunnel
            self.keepAlive = keepAlive
            self.isHEAD = isHEAD
            self.idempotent = idempotent
            self.grpc = grpc
            self.length = length
            self.outgoing = outgoing
        }
    }

    private enum ResponseHead {
        case incomplete
        case malformed
        /// From a tunnel: the backend's node could not reach the pod.
        case refused
        /// The head as the client gets it, its length as read, and whether
        /// the backend closes the connection after this response.
        case ready(head: ByteBuffer, length: Int, code: Int, framing: Express.Framing, close: Bool, closesClient: Bool)
    }

    /// What the next request's head says to do.
    private enum Plan {
        /// The head is not whole yet.
        case needHead
        /// The head is, its body is not.
        case needMore
        case handOver
        /// The head is larger than MeshConfig proxy.maxRequestHeaderSize.
        case tooLarge
        case forward(Exchange)
        /// Delivering: AuthorizationPolicy refuses the request (`length`
        /// bytes with its body).
        case deny(length: Int, keepAlive: Bool, isHEAD: Bool, reason: String, grpcType: String?)
        /// Answered by its Service's TrafficPolicy: over the rate limit, or
        /// a fault abort (`length` bytes with its body).
        /// (`grpcType`: a gRPC call's content-type.)
        case answered(length: Int, keepAlive: Bool, isHEAD: Bool, grpcType: String?, Express.LocalAnswer, Express.Logged?)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        loop = proxy.loop(context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        if !handedOver { abandon() }
        self.context = nil
    }

    // MARK: client side

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        idle.reset()
        if exchange == nil { stall.moved() }  // (during one, a pipelined request's bytes)
        if lingering { return }  // dropped
        var bytes = unwrapInboundIn(data)
        bytesRead &+= UInt64(bytes.readableBytes)
        let fresh = inbound == nil || inbound!.readableBytes == 0
        if fresh {
            inbound = bytes
        } else {
            inbound!.writeBuffer(&bytes)
        }
        if exchange == nil { next() }
        if fresh && delivery != nil, let rest = inbound {
            // A tunnel stream's bytes are slices of the TLS handler's read
            // buffer, which it decrypts the next record into: a slice kept
            // past this read would make it copy the whole buffer (32 KiB).
            inbound = rest.readableBytes == 0 ? nil : context.channel.allocator.buffer(buffer: rest)
        }
    }

    func read(context: ChannelHandlerContext) {
        // Pipelined requests wait in `inbound`; past the limit, reading stops.
        if (inbound?.readableBytes ?? 0) > Self.maxRequest {
            readPending = true
        } else {
            context.read()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        abandon()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let sweep = event as? IdleSweep {
            // Nothing from the exchange's backend for the stream idle
            // timeout (its request went whole; not while it connects or
            // waits out an injected delay), or no more of a request's body
            // from the client: 408, and the connection ends.
            if let exchange, !exchange.connecting, exchange.waiting == nil {
                if stall.stalled(sweep) { return stalled(exchange, sweep, context: context) }
            } else if exchange == nil, awaitingBody, !handedOver, !lingering {
                if stall.stalled(sweep) {
                    proxy.stats.streamIdleTimeouts.add(1, ordering: .relaxed)
                    return refuseHead(408, "Request Timeout", StallCount.body(sweep), context: context)
                }
            } else {
                stall.moved()
            }
            // A head begun too long ago and still not whole: 408, closed.
            if exchange == nil, !handedOver, !lingering, head.expired(sweep) {
                proxy.stats.headTimeouts.add(1, ordering: .relaxed)
                return refuseHead(408, "Request Timeout", HeadClock.body(sweep), context: context)
            }
            // Nothing in flight and nothing read through the sweeps: closed
            // once the last response is out (a slow reader gets all of it;
            // one that reads none of it, at the next timeout). Not a tunnel
            // stream: the source's pool keeps it, as it keeps a connection.
            guard delivery == nil else { return }
            switch idle.judge(sweep, busy: exchange != nil) {
            case .close:
                proxy.stats.idleClosed.add(1, ordering: .relaxed)
                context.closeAfterWrites()
            case .overdue:
                context.close(promise: nil)
            case .stay:
                break
            }
            return
        }
        if event is ChannelShouldQuiesceEvent {
            quiescing = true
            // Idle: close after a grace for a request on its way (answered
            // with Connection: close, then closed). A request partly read is
            // answered first (next() takes it when the rest comes, and
            // closes after it).
            if exchange == nil && (inbound?.readableBytes ?? 0) == 0 {
                context.eventLoop.assumeIsolated().scheduleTask(in: Express.drainIdleGrace) { [weak self] in
                    guard let self, let context = self.context, !self.handedOver, self.exchange == nil,
                          (self.inbound?.readableBytes ?? 0) == 0 else { return }
                    context.closeAfterWrites()
                }
            }
            return
        }
        // The client shut its side after its requests: answer those read, then close.
        if let e = event as? ChannelEvent, case .inputClosed = e {
            inputClosed = true
            if lingering { return context.close(promise: nil) }  // the linger is over
            if exchange == nil { next() }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { exchange?.upstream?.resume() }
        context.fireChannelWritabilityChanged()
    }

    /// Takes the requests read, one at a time, while none is in flight.
    private func next() {
        // (A loop, not recursion, through requests denied one after another.)
        while takeNext() {}
    }

    /// Takes the next request read, if it is complete and none is in
    /// flight; whether to take the one after it at once.
    private func takeNext() -> Bool {
        guard exchange == nil, !handedOver, !lingering, let context, let loop else { return false }
        awaitingBody = false
        guard let buffered = inbound, buffered.readableBytes > 0 else {
            // (The last response may still be on its way to a slow reader.)
            if inputClosed || quiescing { context.closeAfterWrites() }
            return false
        }
        let plan: Plan
        // (A tunnel stream's heads were held to the limit at the source.)
        var headLimit = Int.max
        if let delivery {
            plan = buffered.withUnsafeReadableBytes { self.plan($0, delivery: delivery, loop: loop) }
            switch plan {
            case .forward, .deny: proxy.stats.tunnelRequestsExpress.add(1, ordering: .relaxed)
            case .needHead, .needMore, .handOver, .tooLarge, .answered: break
            }
        } else {
            let routing = Express.Routing.current(routing, frontendKey: frontendKey, source: origin?.source, loop: loop, proxy: proxy)
            self.routing = routing
            headLimit = routing.snapshot.maxRequestHead
            guard routing.serves, let matcher = routing.matcher else {
                handOver()
                return false
            }
            plan = buffered.withUnsafeReadableBytes {
                self.plan($0, routing: routing, matcher: matcher, loop: loop, context: context)
            }
        }
        switch plan {
        case .needHead where buffered.readableBytes > headLimit, .tooLarge:
            proxy.stats.headsTooLarge.add(1, ordering: .relaxed)
            refuseHead(431, "Request Header Fields Too Large", HeadLimit.body(headLimit), context: context)
            return false
        case .needHead:
            if buffered.readableBytes > Self.maxRequest || inputClosed {
                handOver()
            } else if origin != nil {
                head.started()
            }
            return false
        case .needMore:
            head.stop()
            if buffered.readableBytes > Self.maxRequest || inputClosed { handOver() } else { awaitingBody = true }
            return false
        case .handOver:
            handOver()
            return false
        case .forward(let exchange):
            head.stop()
            exchange.request = inbound!.readSlice(length: exchange.length)!
            if exchange.outgoing == nil {
                // Delivering: the request as it came, in a buffer of its own
                // (kept for a hand-over; see channelRead).
                exchange.request = context.channel.allocator.buffer(buffer: exchange.request)
                exchange.outgoing = exchange.request
            }
            readMore(context)
            start(exchange, loop: loop)
            return false
        case .deny(let length, let keepAlive, let isHEAD, let reason, let grpcType):
            inbound!.moveReaderIndex(forwardBy: length)
            readMore(context)
            return deny(reason, keepAlive: keepAlive && !quiescing, isHEAD: isHEAD, grpcType: grpcType, context: context)
        case .answered(let length, let keepAlive, let isHEAD, let grpcType, let local, let logged):
            inbound!.moveReaderIndex(forwardBy: length)
            readMore(context)
            return answer(local, keepAlive: keepAlive && !quiescing, isHEAD: isHEAD, grpcType: grpcType, logged: logged,
                          context: context)
        }
    }

    private func readMore(_ context: ChannelHandlerContext) {
        if readPending && inbound!.readableBytes <= Self.maxRequest {
            readPending = false
            context.read()
        }
    }

    /// A request's length with its body, and what to do when it is not all
    /// read yet or is too large for the express path.
    private static func extent(_ p: UnsafeRawBufferPointer, head: Int, body: Int?) -> (Int, Plan?) {
        let total = head + (body ?? 0)
        if total > maxRequest { return (total, .handOver) }
        return (total, p.count >= total ? nil : .needMore)
    }

    /// Delivering: reads one request head in place; the pod gets the request
    /// as it came if the policies in force allow it.
    private func plan(_ p: UnsafeRawBufferPointer, delivery: Delivery, loop: LoopState) -> Plan {
        guard let length = HTTP1Wire.headLength(p) else { return .needHead }
        guard let line = HTTP1Wire.parseRequest(p, length: length, fields: &fields) else { return .handOver }
        var contentLength: Int?
        var close = false
        for f in fields {
            let n = f.name
            switch n.count {
            case 6 where HTTP1Wire.equals(p, n, "expect"), 7 where HTTP1Wire.equals(p, n, "upgrade"),
                 17 where HTTP1Wire.equals(p, n, "transfer-encoding"):
                return .handOver
            case 10 where HTTP1Wire.equals(p, n, "connection"):
                if HTTP1Wire.listContains(p, f.value, "close") { close = true }
            case 14 where HTTP1Wire.equals(p, n, "content-length"):
                guard contentLength == nil, let v = HTTP1Wire.decimal(p, f.value) else { return .handOver }
                contentLength = v
            default:
                break
            }
        }
        let (total, wait) = Self.extent(p, head: length, body: contentLength)
        if let wait { return wait }
        let method = String(decoding: UnsafeRawBufferPointer(rebasing: p[line.method]), as: UTF8.self)
        let keepAlive = !close && !proxy.draining.load(ordering: .relaxed)
        let snapshot = loop.snapshot(proxy)
        if let set = snapshot.authorization[delivery.key.ip.value] {
            var request = delivery.request
            func text(_ r: Range<Int>) -> String { String(decoding: UnsafeRawBufferPointer(rebasing: p[r]), as: UTF8.self) }
            request.http = Authorize.http(method: method, target: text(line.target),
                                          headers: fields.map { (name: text($0.name).lowercased(), value: text($0.value)) },
                                          paths: snapshot.table.pathNormalization ?? .base)
            let decision = set.evaluate(request)
            Authorize.record(proxy, decision, target: delivery.key.description)
            guard decision.allowed else {
                return .deny(length: total, keepAlive: keepAlive, isHEAD: method == "HEAD", reason: decision.reason,
                             grpcType: Self.values(p, fields, "content-type", split: false).first)
            }
        }
        let exchange = Exchange(snapshot: snapshot, route: "", service: nil, serviceNamespace: nil, key: delivery.key,
                                state: loop.pool.state(delivery.key), tunnel: nil, keepAlive: keepAlive,
                                isHEAD: method == "HEAD", idempotent: Express.isIdempotent(method), grpc: false,
                                length: total, outgoing: nil)
        exchange.closesUpstream = close
        return .forward(exchange)
    }

    /// The head in `inbound` is refused: 408 (MeshConfig
    /// proxy.requestHeaderTimeout ran out on it) or 431 (larger than
    /// proxy.maxRequestHeaderSize). The answer goes out with Connection:
    /// close and the connection ends after it (endAfterWrites).
    private func refuseHead(_ code: Int, _ phrase: StaticString, _ body: String, context: ChannelHandlerContext) {
        head.stop()
        proxy.stats.response(code)
        var out = context.channel.allocator.buffer(capacity: body.utf8.count + 160)
        out.writeString("HTTP/1.1 \(code) ")
        out.writeStaticString(phrase)
        out.writeString("\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: \(body.utf8.count)\r\n")
        out.writeStaticString("server: weft\r\nconnection: close\r\n\r\n")
        out.writeString(body)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        endAfterWrites(context)
    }

    /// The connection ends once what was written is out, as RFC 9112
    /// (section 9.6) asks: the output is shut (the client reads the answer,
    /// then EOF), and what the client still sends (more of a refused head,
    /// the rest of a body the answer did not wait for, a request pipelined
    /// behind `Connection: close`) is read and dropped until it shuts its
    /// side, or for Express.linger at most. Closing with bytes unread would
    /// reset the connection, and a client still sending could lose the
    /// answer. A client that has shut its side already: closed at once.
    private func endAfterWrites(_ context: ChannelHandlerContext) {
        lingering = true
        inbound = nil
        if inputClosed { return context.closeAfterWrites() }
        context.closeOutputAfterWrites { ended in
            if !ended { context.close(promise: nil) }
        }
        readPending = false
        context.closeAfterLinger()
    }

    /// Delivering: AuthorizationPolicy's refusal, as InboundHTTP answers it.
    /// Whether the stream stays open for the next request.
    /// A gRPC call (`grpcType`) is told PERMISSION_DENIED (GRPCLocalAnswer).
    private func deny(_ reason: String, keepAlive: Bool, isHEAD: Bool, grpcType: String?, context: ChannelHandlerContext) -> Bool {
        let body = Authorize.forbiddenBody(reason)
        if let grpc = GRPCLocalAnswer.contentType(grpcType, status: 403) {
            return answer(GRPCLocalAnswer.http1Head(contentType: grpc, httpCode: 403, body: body) + "x-weft-authz: denied\r\n",
                          body: "", keepAlive: keepAlive, isHEAD: isHEAD, context: context)
        }
        return answer("HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: \(body.utf8.count)\r\nx-weft-authz: denied\r\n",
                      body: body, keepAlive: keepAlive, isHEAD: isHEAD, context: context)
    }

    /// An answer of the proxy's own between exchanges: `head` (the status
    /// line and fields, each line ended), `connection: close` unless
    /// `keepAlive`, then `body` (not to HEAD); the connection ends after it
    /// unless `keepAlive`. Whether it stays open for the next request.
    private func answer(_ head: String, body: String, keepAlive: Bool, isHEAD: Bool, context: ChannelHandlerContext) -> Bool {
        var out = context.channel.allocator.buffer(capacity: head.utf8.count + body.utf8.count + 24)
        out.writeString(head)
        if !keepAlive { out.writeStaticString("connection: close\r\n") }
        out.writeStaticString("\r\n")
        if !isHEAD { out.writeString(body) }
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        if !keepAlive { endAfterWrites(context) }
        return keepAlive
    }

    /// A request its Service's TrafficPolicy answers: 429 with Retry-After
    /// over the rate limit, a fault abort's status, counted and logged as
    /// the full path answers them (flag RL or FI, no upstream). Whether the
    /// connection stays open for the next request.
    private func answer(_ local: Express.LocalAnswer, keepAlive: Bool, isHEAD: Bool, grpcType: String?, logged: Express.Logged?,
                        context: ChannelHandlerContext) -> Bool {
        guard let loop, let snapshot = routing?.snapshot else { return false }
        let outcome = Express.Outcome(answered: local, snapshot: snapshot, grpcType: grpcType, protocolName: "HTTP/1.1", logged: logged)
        loop.counters.answered(outcome.status)
        Express.record(outcome, source: source, last: &lastSeries, loop: loop, proxy: proxy)
        var body = local.body
        var head: String
        if let grpc = GRPCLocalAnswer.contentType(grpcType, status: local.status) {
            // A gRPC(-Web) call: its status and the reason in the head.
            head = GRPCLocalAnswer.http1Head(contentType: grpc, httpCode: local.status, body: body, grpcStatus: local.grpcStatus)
            body = ""
        } else {
            head = "HTTP/1.1 \(local.status) \(HTTPResponseStatus(statusCode: local.status).reasonPhrase)\r\n"
                + "content-type: text/plain; charset=utf-8\r\ncontent-length: \(body.utf8.count)\r\n"
        }
        head += "server: weft\r\n"
        for (name, value) in local.extra { head += "\(name): \(value)\r\n" }
        return answer(head, body: body, keepAlive: keepAlive, isHEAD: isHEAD, context: context)
    }

    /// Reads one request head in place and decides; builds the request the
    /// backend gets when the express path takes it.
    private func plan(_ p: UnsafeRawBufferPointer, routing: Express.Routing, matcher: RouteMatcher, loop: LoopState,
                      context: ChannelHandlerContext) -> Plan {
        guard let length = HTTP1Wire.headLength(p) else { return .needHead }
        if length > routing.snapshot.maxRequestHead { return .tooLarge }
        guard let line = HTTP1Wire.parseRequest(p, length: length, fields: &fields) else { return .handOver }
        var contentLength: Int?
        var close = false, strip = false, hasProto = false, hasRequestID = false, grpc = false, web = false
        for f in fields {
            let n = f.name
            switch n.count {
            case 2 where HTTP1Wire.equals(p, n, "te"):
                return .handOver
            case 3 where HTTP1Wire.equals(p, n, "via"):
                if contains(p, f.value, proxy.viaToken) { return .handOver }  // looped: the full path answers 508
            case 6 where HTTP1Wire.equals(p, n, "expect"):
                return .handOver
            case 7 where HTTP1Wire.equals(p, n, "upgrade") || HTTP1Wire.equals(p, n, "trailer"):
                if HTTP1Wire.equals(p, n, "upgrade") { return .handOver }
                strip = true
            case 10 where HTTP1Wire.equals(p, n, "connection"):
                // Only keep-alive and close: a header it names must go too.
                var tokens = 0
                if HTTP1Wire.listContains(p, f.value, "close") { close = true; tokens += 1 }
                if HTTP1Wire.listContains(p, f.value, "keep-alive") { tokens += 1 }
                if tokens != HTTP1Wire.count(p, f.value) { return .handOver }
                strip = true
            case 10 where HTTP1Wire.equals(p, n, "keep-alive"):
                strip = true
            case 11 where HTTP1Wire.equals(p, n, "traceparent"):
                return .handOver
            case 12 where HTTP1Wire.equals(p, n, "x-request-id"):
                hasRequestID = true
            case 12 where HTTP1Wire.equals(p, n, "content-type"):
                grpc = HTTP1Wire.hasPrefix(p, f.value, "application/grpc")
                web = HTTP1Wire.hasPrefix(p, f.value, "application/grpc-web")
            case 14 where HTTP1Wire.equals(p, n, "content-length"):
                guard contentLength == nil, let v = HTTP1Wire.decimal(p, f.value) else { return .handOver }
                contentLength = v
            case 15 where HTTP1Wire.equals(p, n, "x-forwarded-for"):
                return .handOver
            case 16 where HTTP1Wire.equals(p, n, "proxy-connection"):
                strip = true
            case 17 where HTTP1Wire.equals(p, n, "transfer-encoding"):
                return .handOver
            case 17 where HTTP1Wire.equals(p, n, "x-forwarded-proto"):
                hasProto = true
            case 18 where HTTP1Wire.equals(p, n, "proxy-authenticate"), 19 where HTTP1Wire.equals(p, n, "proxy-authorization"):
                strip = true
            default:
                break
            }
        }
        let (total, wait) = Self.extent(p, head: length, body: contentLength)
        if let wait { return wait }

        // Routing, as the full path does it.
        let method = String(decoding: UnsafeRawBufferPointer(rebasing: p[line.method]), as: UTF8.self)
        let target = String(decoding: UnsafeRawBufferPointer(rebasing: p[line.target]), as: UTF8.self)
        let (path, query) = HTTPProxyHandler.splitTarget(target)
        let fields = self.fields
        // (A closure that captures nothing costs no allocation.)
        let request = RouteMatcher.Request(method: method, path: path, query: query,
                                           header: matcher.readsHeaders ? { name in Self.values(p, fields, name) } : { _ in [] })
        let snapshot = routing.snapshot
        let chosen: Express.Target
        switch Express.target(request, matcher: matcher, routing: routing, loop: loop, proxy: proxy, source: source,
                              header: { name in Self.values(p, fields, name).first.map { Substring($0) } },
                              cookie: { name in ClusterRuntime.cookie(name, in: Self.values(p, fields, "cookie", split: false)) }) {
        case .handOver:
            return .handOver
        case .forward(let target):
            chosen = target
        case .answered(let local):
            let logged = Express.answeredLocally(snapshot, method: method, path: target, bytesIn: contentLength ?? 0,
                                                 hasProto: hasProto, hasRequestID: hasRequestID, fixed: connectionHeaders,
                                                 allocator: context.channel.allocator, loop: loop) { name in
                Self.values(p, fields, name, split: false).first
            }
            return .answered(length: total, keepAlive: !close && !proxy.draining.load(ordering: .relaxed), isHEAD: method == "HEAD",
                             grpcType: grpc ? Self.values(p, fields, "content-type", split: false).first : nil, local, logged)
        }

        // The request the backend gets: the client's head without its
        // hop-by-hop lines, then the proxy's own headers, then the body.
        var out = loop.requestHeads.take(capacity: total + 256)
        if strip {
            let firstField = fields.first?.name.lowerBound ?? (length - 2)
            var copier = RunCopier()
            copier.keep(0..<firstField, of: p, into: &out)
            for f in fields where !Express.isHopByHop(p, f.name) { copier.keep(HTTP1Wire.line(p, f), of: p, into: &out) }
            copier.flush(p, into: &out)
        } else {
            out.writeBytes(UnsafeRawBufferPointer(rebasing: p[0..<length - 2]))
        }
        let (requestID, span) = Express.writeProxyHeaders(&out, connectionHeaders, hasProto: hasProto,
                                                          hasRequestID: hasRequestID,
                                                          keep: snapshot.table.accessLog != nil, loop: loop)
        out.writeBytes(UnsafeRawBufferPointer(rebasing: p[length..<total]))

        let exchange = Exchange(snapshot: snapshot, route: chosen.route, service: matcher.frontend.service,
                                serviceNamespace: matcher.frontend.namespace, key: chosen.key, state: chosen.state, tunnel: chosen.tunnel,
                                keepAlive: !close && !proxy.draining.load(ordering: .relaxed),
                                isHEAD: method == "HEAD", idempotent: Express.isIdempotent(method), grpc: grpc,
                                length: total, outgoing: out)
        exchange.web = web
        exchange.hold = chosen.hold
        exchange.setCookie = chosen.setCookie
        exchange.session = chosen.session
        exchange.cluster = chosen.cluster
        exchange.delay = chosen.delay
        if snapshot.table.accessLog != nil, let span {  // (span: written with `keep`)
            func first(_ name: String) -> String? { Self.values(p, fields, name, split: false).first }
            exchange.logged = Express.Logged(wallStart: AccessLog.now(), method: method, path: target, authority: first("host"),
                                     userAgent: first("user-agent"), requestID: requestID ?? first("x-request-id"),
                                     span: span, bytesIn: contentLength ?? 0)
        }
        return .forward(exchange)
    }

    /// Header values by lower-case name, split at commas, as NIO's
    /// `headers[canonicalForm:]` gives them to the full path's matcher.
    private static func values(_ p: UnsafeRawBufferPointer, _ fields: [HTTP1Wire.Field], _ name: String,
                               split: Bool = true) -> [String] {
        var out: [String] = []
        let wanted = Array(name.utf8)
        for f in fields where f.name.count == wanted.count {
            var same = true
            for k in 0..<wanted.count where p[f.name.lowerBound + k] | 0x20 != wanted[k] | 0x20 { same = false; break }
            guard same else { continue }
            let value = String(decoding: UnsafeRawBufferPointer(rebasing: p[f.value]), as: UTF8.self)
            guard split else {
                out.append(value)
                continue
            }
            for part in value.split(separator: ",") {
                let t = part.trimmingASCIISpaces()
                if !t.isEmpty { out.append(String(t)) }
            }
        }
        return out
    }

    private func contains(_ p: UnsafeRawBufferPointer, _ range: Range<Int>, _ needle: String) -> Bool {
        let n = Array(needle.utf8)
        guard range.count >= n.count, !n.isEmpty else { return false }
        for start in range.lowerBound...(range.upperBound - n.count) {
            var k = 0
            while k < n.count && p[start + k] == n[k] { k += 1 }
            if k == n.count { return true }
        }
        return false
    }

    // MARK: the exchange

    private func start(_ exchange: Exchange, loop: LoopState) {
        self.exchange = exchange
        stall.moved()
        if let delay = exchange.delay, let context {
            // An injected delay: the request waits here (its backend's slot
            // given back, Express.Target.delay), then goes on.
            exchange.delay = nil
            exchange.delayed = true
            exchange.waiting = context.eventLoop.assumeIsolated().scheduleTask(in: .init(delay)) { [weak self] in
                guard let self, self.exchange === exchange else { return }
                exchange.waiting = nil
                guard Express.resume(&exchange.hold, state: exchange.state, tunnel: exchange.tunnel) else {
                    self.giveBack(exchange)
                    return self.handOver(Self.handed(exchange))
                }
                self.start(exchange, loop: loop)
            }
            return
        }
        exchange.state.inFlight += 1
        exchange.counted = true
        if let idle = Express.idleUpstream(from: exchange.state, tunnel: exchange.tunnel, key: exchange.key,
                                           lifetimes: exchange.snapshot.lifetimes) {
            return attach(idle)
        }
        Express.connectUpstream(to: exchange.key, tunnel: exchange.tunnel, counters: exchange.hold?.backend, loop: loop) { [weak self] result in
            guard let self, self.exchange === exchange, exchange.connecting else {
                (try? result.get())?.close()
                return
            }
            switch result {
            case .success(let upstream): self.attach(upstream)
            case .failure(let error): self.connectFailed(error)
            }
        }
    }

    private func attach(_ upstream: ExpressUpstream) {
        guard let exchange, let outgoing = exchange.outgoing else { return }
        exchange.connecting = false
        exchange.upstream = upstream
        exchange.reused = upstream.reused
        exchange.outgoing = nil
        upstream.owner = self
        upstream.send(outgoing)
        loop?.requestHeads.giveBack(outgoing)
    }

    private func connectFailed(_ error: any Error) {
        guard let exchange, let loop else { return }
        if delivery != nil {
            // Nothing reached the pod: the source proxy takes this as a
            // refused connect and tries another backend.
            proxy.logger.info("tunnelled request could not reach its pod", metadata: ["target": "\(exchange.key)", "error": "\(error)"])
            return respondLocally(exchange, .badGateway, "weft: cannot connect to \(exchange.key): \(error)\n", flags: "UF",
                                  refused: true)
        }
        if !Express.refusedByPolicy(error) {
            Express.countConnectFailure(exchange.key, error, snapshot: exchange.snapshot, frontendKey: frontendKey, loop: loop,
                                        proxy: proxy)
            exchange.hold?.record(.localFailure)
        }
        // Nothing was sent: the full path tries another backend or answers
        // 503 (403 for a policy's refusal), this connect its first attempt.
        giveBack(exchange)
        handOver(Self.handed(exchange, failed: .init(key: exchange.key, error: error)))
    }

    /// What the full path takes over with an exchange's request (captured
    /// connections; a delivering node's InboundHTTP starts over).
    private static func handed(_ exchange: Exchange, failed: Express.Handed.FailedConnect? = nil) -> Express.Handed {
        Express.Handed(cluster: exchange.cluster, delay: exchange.delayed ? .served : .none, failedConnect: failed)
    }

    /// Ends the exchange without an answer of its own and puts its request
    /// back in front of what the client sent after it.
    private func giveBack(_ exchange: Exchange) {
        self.exchange = nil
        exchange.upstream?.close()
        if exchange.counted { exchange.state.inFlight -= 1 }
        exchange.hold?.release()
        var request = exchange.request
        if var rest = inbound, rest.readableBytes > 0 { request.writeBuffer(&rest) }
        inbound = request
    }

    func upstreamRead(_ bytes: ByteBuffer) {
        guard let exchange, let context else { return }
        stall.moved()
        var bytes = bytes
        while bytes.readableBytes > 0 {
            switch exchange.framing {
            case .head:
                if exchange.head == nil { exchange.head = bytes } else { exchange.head!.writeBuffer(&bytes) }
                bytes.moveReaderIndex(to: bytes.writerIndex)
                guard let (head, rest) = responseHead(exchange, context: context) else { return }
                send(head, context)
                loop?.responseHeads.giveBack(head)
                bytes = rest
                if case .length(0) = exchange.framing { responseEnded(exchange, extra: bytes.readableBytes) }
                if self.exchange !== exchange { return }
            case .length(let remaining):
                let n = min(remaining, bytes.readableBytes)
                exchange.bytesOut += n
                let body = bytes.readSlice(length: n)!
                if exchange.grpcReader != nil { body.withUnsafeReadableBytes { exchange.grpcReader?.body($0) } }
                send(body, context)
                exchange.framing = .length(remaining - n)
                if remaining == n { return responseEnded(exchange, extra: bytes.readableBytes) }
            case .chunked(var framer):
                let used: Int?
                if var reader = exchange.grpcReader {
                    exchange.grpcReader = nil  // (mutated alone, not copied)
                    used = bytes.withUnsafeReadableBytes { p in
                        framer.consume(p, data: { reader.body(UnsafeRawBufferPointer(rebasing: p[$0])) },
                                       trailer: { reader.trailer(UnsafeRawBufferPointer(rebasing: p[$0])) })
                    }
                    exchange.grpcReader = reader
                } else {
                    used = bytes.withUnsafeReadableBytes { framer.consume($0) }
                }
                guard let used else { return broken(exchange, "a malformed chunked body") }
                exchange.bytesOut += used
                send(bytes.readSlice(length: used)!, context)
                exchange.framing = .chunked(framer)
                if framer.isDone { return responseEnded(exchange, extra: bytes.readableBytes) }
            case .close:
                exchange.bytesOut += bytes.readableBytes
                if exchange.grpcReader != nil { bytes.withUnsafeReadableBytes { exchange.grpcReader?.body($0) } }
                send(bytes, context)
                bytes.moveReaderIndex(to: bytes.writerIndex)
            }
        }
        if !context.channel.isWritable { exchange.upstream?.pause() }
    }

    /// The response head, rewritten for the client, once it is all read,
    /// and the bytes after it; sets the exchange's framing.
    private func responseHead(_ exchange: Exchange, context: ChannelHandlerContext) -> (ByteBuffer, ByteBuffer)? {
        guard var raw = exchange.head else { return nil }
        let parsed: ResponseHead = raw.withUnsafeReadableBytes { p in
            guard let length = HTTP1Wire.headLength(p) else { return .incomplete }
            guard let status = HTTP1Wire.parseResponse(p, length: length, fields: &fields),
                  let body = Express.responseBody(p, status, fields, isHEAD: exchange.isHEAD) else { return .malformed }
            if exchange.tunnel != nil && Express.isRefusal(p, fields) { return .refused }
            let framing = body.framing, chunked = body.chunked, named = body.named
            let closeClient = !exchange.keepAlive || quiescing
            // Room for the body read with the head, when it goes out in the same write.
            let room = length + 32 + min(p.count - length, Self.sameWrite)
            var out = loop?.responseHeads.take(capacity: room) ?? context.channel.allocator.buffer(capacity: room)
            var lineEnd = 8
            while p[lineEnd] != 13 { lineEnd += 1 }
            var copier = RunCopier()
            // The status line as it came, its version HTTP/1.1 (an HTTP/1.0 backend's is rewritten).
            if HTTP1Wire.exactly(p, at: 0, "HTTP/1.1") {
                copier.keep(0..<lineEnd + 2, of: p, into: &out)
            } else {
                out.writeStaticString("HTTP/1.1")
                copier.keep(8..<lineEnd + 2, of: p, into: &out)
            }
            for f in fields {
                if Express.isHopByHop(p, f.name) {
                    // Chunked framing goes on as it came; any other coding
                    // without it ends with the connection.
                    guard chunked, HTTP1Wire.equals(p, f.name, "transfer-encoding") else { continue }
                } else if !named.isEmpty && named.lists(p, name: f.name) {
                    continue
                }
                copier.keep(HTTP1Wire.line(p, f), of: p, into: &out)
            }
            copier.flush(p, into: &out)
            let delimited: Bool
            if case .close = framing { delimited = true } else { delimited = false }
            // (The final head's: an interim one carries neither cookie nor session.)
            let final = status.code >= 200
            if final, let cookie = exchange.setCookie {
                out.writeStaticString("set-cookie: ")
                out.writeString(cookie)
                out.writeStaticString("\r\n")
            }
            if final, let session = exchange.session {
                session.outcome.count(proxy.stats)
            }
            if final, let field = exchange.session?.field {
                out.writeString(field.name)
                out.writeStaticString(": ")
                out.writeString(field.value)
                out.writeStaticString("\r\n")
            }
            if final && exchange.grpc {
                (exchange.grpcStatus, exchange.grpcOutcomePending, exchange.grpcReader)
                    = Express.grpcHead(p, fields, code: status.code, trailerLines: chunked)
            }
            if closeClient || delimited { out.writeStaticString("connection: close\r\n") }
            out.writeStaticString("\r\n")
            return .ready(head: out, length: length, code: status.code, framing: framing, close: body.close || delimited,
                          closesClient: closeClient || delimited)
        }
        var head: ByteBuffer, length: Int, code: Int, framing: Express.Framing, close: Bool, closesClient: Bool
        // (Consumed: `head` is then the buffer's only holder, and the body
        // read with it is written in place, not into a copy.)
        switch consume parsed {
        case .incomplete:
            if raw.readableBytes > Self.maxRequest { broken(exchange, "a response head over \(Self.maxRequest) bytes") }
            return nil
        case .malformed:
            broken(exchange, "a malformed response head")
            return nil
        case .refused:
            // Nothing went to the client: the full path tries another
            // backend or answers 503, as for a refused connect.
            connectFailed(TunnelRefused(status: 0, reason: "\(exchange.key) could not be reached from its node"))
            return nil
        case .ready(let h, let l, let c, let f, let x, let y):
            (head, length, code, framing, close, closesClient) = (h, l, c, f, x, y)
        }
        raw.moveReaderIndex(forwardBy: length)
        if code < 200 {
            // An interim response (100, 103): on to the client, then the real one.
            exchange.responded = true
            exchange.head = raw.readableBytes > 0 ? raw : nil
            exchange.framing = .head
            send(head, context)
            loop?.responseHeads.giveBack(head)
            if let more = exchange.head {
                exchange.head = nil
                upstreamRead(more)
            }
            return nil
        }
        exchange.head = nil
        exchange.framing = framing
        // A small body read with the head goes out with it: one write, not two.
        if case .length(let remaining) = framing, remaining > 0, raw.readableBytes > 0,
           min(remaining, raw.readableBytes) <= Self.sameWrite {
            let n = min(remaining, raw.readableBytes)
            var body = raw.readSlice(length: n)!
            if exchange.grpcReader != nil { body.withUnsafeReadableBytes { exchange.grpcReader?.body($0) } }
            head.writeBuffer(&body)
            exchange.bytesOut += n
            exchange.framing = .length(remaining - n)
        }
        exchange.status = code
        exchange.hold?.record(head: code, grpcStatus: exchange.grpcStatus, pending: exchange.grpcOutcomePending)
        exchange.responded = true
        exchange.reusable = !close && !exchange.closesUpstream
        exchange.closesClient = closesClient
        if delivery == nil { loop?.counters.answered(code) }
        routing?.budget?.budget.recordRequest(now: HTTPProxyHandler.nowSeconds())
        return (head, raw)
    }

    func upstreamReadComplete() {
        if unflushed, let context { flush(context) }
    }

    /// Response bytes on to the client; flushed once per read burst.
    private func send(_ bytes: ByteBuffer, _ context: ChannelHandlerContext) {
        unflushed = true
        context.write(wrapOutboundOut(bytes), promise: nil)
    }

    private func flush(_ context: ChannelHandlerContext) {
        unflushed = false
        context.flush()
    }

    func upstreamClosed() {
        guard let exchange else { return }
        exchange.upstream = nil
        if exchange.responded, case .close = exchange.framing {
            exchange.reusable = false
            return responseEnded(exchange, extra: 0)
        }
        exchange.hold?.record(.localFailure)  // (a response that came was told already)
        if exchange.responded {
            // Part of the response went out: the client must see it broken.
            countReset(exchange)
            end(exchange, flags: "UC")
            context?.close(promise: nil)
            return
        }
        if exchange.reused && exchange.idempotent && exchange.head == nil {
            // Perhaps the server closed an idle connection as the request
            // went out: the full path sends it again.
            giveBack(exchange)
            return handOver(Self.handed(exchange))
        }
        countReset(exchange)
        respondLocally(exchange, .badGateway, "weft: upstream \(exchange.key) reset the connection before responding\n", flags: "UC")
    }

    /// MeshConfig proxy.streamIdleTimeout ran out on the exchange: nothing
    /// came from its backend that long (a client that does not read stops
    /// those reads). The backend connection is closed; 504 when nothing of
    /// the response went out, else the client sees it broken (closed).
    private func stalled(_ exchange: Exchange, _ sweep: IdleSweep, context: ChannelHandlerContext) {
        proxy.stats.streamIdleTimeouts.add(1, ordering: .relaxed)
        if delivery == nil {
            loop?.countEvent("stream_idle_timeout", proxy: proxy, snapshot: exchange.snapshot, frontendKey: frontendKey)
        }
        exchange.upstream?.close()
        exchange.upstream = nil
        exchange.reusable = false
        if exchange.responded {
            end(exchange, flags: "SI")
            context.close(promise: nil)
        } else {
            exchange.hold?.record(.localFailure)  // a backend that never answered
            respondLocally(exchange, .gatewayTimeout, StallCount.body(sweep), flags: "SI")
        }
    }

    private func countReset(_ exchange: Exchange) {
        guard delivery == nil else {
            proxy.stats.upstreamResets.add(1, ordering: .relaxed)
            return
        }
        Express.countReset(snapshot: exchange.snapshot, frontendKey: frontendKey, loop: loop, proxy: proxy)
    }

    /// The backend's response broke the protocol.
    private func broken(_ exchange: Exchange, _ what: String) {
        exchange.hold?.record(.localFailure)  // (a response that came was told already)
        exchange.upstream?.close()
        exchange.upstream = nil
        exchange.reusable = false
        if exchange.responded {
            end(exchange, flags: "UPE")
            context?.close(promise: nil)
        } else {
            respondLocally(exchange, .badGateway, "weft: upstream \(exchange.key) sent \(what)\n", flags: "UPE")
        }
    }

    private func responseEnded(_ exchange: Exchange, extra: Int) {
        guard let context, let loop else { return }
        if exchange.grpcOutcomePending {
            exchange.grpcOutcomePending = false
            exchange.hold?.record(grpcEnd: exchange.grpcReader?.status)
        }
        // Bytes past the response: none was asked for; the connection is out of step.
        if extra > 0 { exchange.reusable = false }
        if let upstream = exchange.upstream {
            Express.release(upstream, to: exchange.state, key: exchange.key, reusable: exchange.reusable,
                            snapshot: exchange.snapshot, proxy: proxy, pool: loop.pool)
            exchange.upstream = nil
        }
        end(exchange, flags: "-")
        if exchange.closesClient || !exchange.keepAlive || quiescing || (inputClosed && (inbound?.readableBytes ?? 0) == 0) {
            return endAfterWrites(context)
        }
        if unflushed { flush(context) }
        next()
    }

    /// The exchange is over: its backend has one request fewer in flight,
    /// and its metrics are recorded.
    private func end(_ exchange: Exchange, flags: String) {
        guard self.exchange === exchange, let loop else { return }
        self.exchange = nil
        if exchange.counted { exchange.state.inFlight -= 1 }
        exchange.hold?.release()
        // (Delivered requests are counted where they were routed.)
        guard delivery == nil else { return }
        Express.record(Express.Outcome(snapshot: exchange.snapshot, service: exchange.service,
                                       serviceNamespace: exchange.serviceNamespace, key: exchange.key, route: exchange.route,
                                       grpc: exchange.grpc, status: exchange.status,
                                       flags: Express.flags(flags, delayed: exchange.delayed), start: exchange.start,
                                       bytesOut: exchange.bytesOut, protocolName: "HTTP/1.1", logged: exchange.logged,
                                       grpcStatus: exchange.grpcStatus ?? exchange.grpcReader?.status, web: exchange.web),
                       source: source, last: &lastSeries, loop: loop, proxy: proxy)
    }

    /// An answer of the proxy's own, in place of the backend's.
    private func respondLocally(_ exchange: Exchange, _ status: HTTPResponseStatus, _ body: String, flags: String,
                                refused: Bool = false) {
        guard let context else { return }
        // A gRPC call's client (not another node's proxy, which reads the
        // status) is told a gRPC status (GRPCLocalAnswer).
        let grpc = exchange.grpc && delivery == nil
            ? GRPCLocalAnswer.contentType(GRPCLocalAnswer.expressType(web: exchange.web), status: Int(status.code)) : nil
        exchange.status = grpc == nil ? Int(status.code) : 200
        if delivery == nil { loop?.counters.answered(exchange.status) }
        var out = context.channel.allocator.buffer(capacity: body.utf8.count + 128)
        if let grpc {
            exchange.grpcStatus = GRPCLocalAnswer.fields(httpCode: Int(status.code), body: body).first?.1
            out.writeString(GRPCLocalAnswer.http1Head(contentType: grpc, httpCode: Int(status.code), body: body))
        } else {
            out.writeString("HTTP/1.1 \(status.code) \(status.reasonPhrase)\r\ncontent-type: text/plain; charset=utf-8\r\n")
            out.writeString("content-length: \(body.utf8.count)\r\n")
        }
        end(exchange, flags: flags)
        out.writeString("server: weft\r\n")
        if refused { out.writeString("\(Authorize.refusedHeader): connect\r\n") }
        let close = !exchange.keepAlive || quiescing
        if close { out.writeStaticString("connection: close\r\n") }
        out.writeStaticString("\r\n")
        if !exchange.isHEAD && grpc == nil { out.writeString(body) }
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        if close { endAfterWrites(context) } else { next() }
    }

    /// The client went away, or the handler left the pipeline mid-exchange.
    private func abandon() {
        guard let exchange else { return }
        exchange.waiting?.cancel()
        exchange.upstream?.close()
        exchange.upstream = nil
        end(exchange, flags: "DC")
    }

    // MARK: hand-over

    /// Puts the full HTTP/1 path behind this handler, gives it every byte
    /// not yet sent on, and leaves. Only between exchanges.
    /// `handed`: what was done for the request in front of `inbound`, an
    /// exchange given back (Express.Handed).
    private func handOver(_ handed: Express.Handed? = nil) {
        guard let context, !handedOver, exchange == nil else { return }
        handedOver = true
        proxy.stats.expressHandovers.add(1, ordering: .relaxed)
        let handler: any ChannelHandler
        var front: [any ChannelHandler] = []
        if let origin {
            let full = HTTPProxyHandler(proxy: proxy, origin: origin, isHTTP2: false)
            full.onUpgrade = Upgrade.splice
            full.acceptsH2CUpgrade = true
            full.handed = handed
            handler = full
            // The bytes this handler took in count as read: the rest, in
            // `inbound`, the tally counts as they go on to the full path.
            let held = UInt64(inbound?.readableBytes ?? 0)
            if bytesRead >= held, let tally = ReadTally.spliceable(origin, proxy: proxy, already: bytesRead - held) {
                front.append(tally)
            }
        } else if let delivery {
            handler = InboundHTTP(proxy: proxy, request: delivery.request, target: delivery.key, isHTTP2: false)
        } else {
            return
        }
        do {
            try context.pipeline.syncOperations.addHandlers(
                front + HTTP1ServerPipeline.handlers(proxy: proxy, then: handler), position: .after(self))
        } catch {
            proxy.logger.warning("cannot set up the HTTP/1 pipeline: \(error)")
            context.close(promise: nil)
            return
        }
        if let bytes = inbound, bytes.readableBytes > 0 {
            inbound = nil
            context.fireChannelRead(wrapInboundOut(bytes))
            context.fireChannelReadComplete()
        }
        if inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        if quiescing { context.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent()) }
        if readPending { context.read() }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
