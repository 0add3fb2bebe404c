import NIOCore
import NIOHPACK
import NIOHTTP1
import NIOHTTP2
import WeftCore
import WeftKernel

/// The express path for HTTP/2 (h2c) clients of HTTP/1.1 backends. It sits
/// between HTTP2Codec (frames, HPACK, flow control, stream states)
/// and the stream multiplexer, and sees every frame first: the codec calls
/// it with frames and stream events, and it calls the codec to send.
///
/// A stream whose request is one HEADERS frame, with or without a body of
/// a declared length the stream's first window holds (DATA frames, no
/// trailers), and which needs no more than ExpressHTTP1Handler would do for
/// it, is answered from here: the request goes out as HTTP/1.1 bytes on a
/// pooled express connection (Express.idleUpstream, connectUpstream), the
/// response head comes back as a HEADERS frame (its block encoded straight
/// from the head's bytes, HPACKLiteral) and its body as DATA frames
/// (chunks unwrapped, trailers as a final HEADERS frame) as it goes by. No
/// stream channel, no HTTP codec, no typed HTTP messages.
///
/// Every other stream goes on to the multiplexer and the full path
/// (HTTPProxyHandler on a stream channel) as before, untouched: larger or
/// undeclared request bodies, trailers, CONNECT, and whatever Express.target
/// turns away. A stream whose body turns out not to fit is handed over with
/// what it sent so far. So is an express stream whose backend refused the
/// connection (or, through a tunnel, could not be reached from its node),
/// or closed a reused one under an idempotent request, before answering:
/// its frames are given to the multiplexer then, and the full path tries
/// again.
final class ExpressHTTP2Handler: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    /// Response bytes handed to the codec but not yet written out (the
    /// stream's window is shut, or the client reads slowly) past which a
    /// stream's backend is not read.
    static let highWater = 64 * 1024
    /// The largest request body taken: what a stream may send before any
    /// WINDOW_UPDATE (the protocol's initial window, which this proxy does
    /// not raise). Nobody updates an express stream's window.
    static let maxBody = 65_535

    private let proxy: ProxyContext
    private let origin: CapturedOrigin
    private let frontendKey: String
    private let connectionHeaders: Express.ConnectionHeaders
    private var context: ChannelHandlerContext?
    private var loop: LoopState?
    /// Express streams still being answered.
    private var streams = StreamTable<Stream>()
    /// Streams given to the multiplexer, until they close.
    private var handed = StreamSet()
    /// The request bodies of streams given to the multiplexer that declared
    /// a length, while they are due.
    private var bodies = StreamTable<DeclaredBody>()
    private var lastStreamID = HTTP2StreamID.rootStream
    private var routing: Express.Routing?
    private var quiescing = false
    /// Frames of ours not yet written out; a quiescing connection closes
    /// only when none is left.
    private var unwrittenFrames = 0
    /// Streams whose last frame was written without a promise, until
    /// the codec says they closed, which it does once that frame no longer
    /// waits on a window. A quiescing connection waits for them.
    private var ending = StreamSet()
    private var closing = false
    private var fields: [HTTP1Wire.Field] = []
    private var chunkData: [Range<Int>] = []
    private var lastSeries: Express.LastSeries?
    private var idle = IdleCount()

    /// The connection's codec, right below: frames are sent by a call to it.
    private let codec: HTTP2Codec
    /// MeshConfig proxy.maxRequestHeaderSize when the connection opened
    /// (its SETTINGS announced twice that: HeadLimit).
    private let headLimit: Int

    /// The full path's streams, which the sweep is passed on to.
    private let streamChannels: StreamChannels

    init(proxy: ProxyContext, origin: CapturedOrigin, codec: HTTP2Codec, headLimit: Int, streamChannels: StreamChannels) {
        self.proxy = proxy
        self.origin = origin
        self.codec = codec
        self.headLimit = headLimit
        self.streamChannels = streamChannels
        frontendKey = "\(origin.vip):\(origin.port)"
        connectionHeaders = Express.ConnectionHeaders(client: origin.source.description, via: proxy.viaToken)
        codec.express = self
    }

    /// One request answered on the express path.
    fileprivate final class Stream: ExpressUpstream.Owner {
        weak var handler: ExpressHTTP2Handler?
        let id: HTTP2StreamID
        /// The request as it came, for a hand-over.
        let request: HTTP2Frame.FramePayload.Headers
        /// Its body as read so far (a hand-over replays it); `declared`
        /// counts what is still due, and the request has not ended while
        /// `requestOpen`. The exchange starts when it ends.
        var body: ByteBuffer?
        var declared = DeclaredBody(length: 0)
        var requestOpen = false
        var created: NIOHTTP2StreamCreatedEvent?
        let snapshot: RouteSnapshot
        let route: String
        let service: String?
        let serviceNamespace: String?
        let key: EndpointKey
        let state: UpstreamPool.EndpointState
        let tunnel: TunnelChoice?
        let start = NIODeadline.now()
        let isHEAD: Bool
        let idempotent: Bool
        let grpc: Bool
        var outgoing: ByteBuffer?
        var upstream: ExpressUpstream?
        var reused = false
        var connecting = true
        /// Response head bytes read so far.
        var head: ByteBuffer?
        var framing = Express.Framing.head
        var trailer: ByteBuffer?
        var status = 0
        var responded = false
        var reusable = true
        var bytesOut = 0
        /// Response bytes given to the codec, not yet written out.
        var unwritten = 0
        var paused = false
        var logged: Express.Logged?
        /// The backend's slot and outcome under a TrafficPolicy.
        var hold: ClusterRuntime.Hold?
        /// A minted cookie hash cookie, for the response (Set-Cookie).
        var setCookie: String?
        /// A persistent session's answer (sessionPersistence), counted when
        /// the response head is written.
        var session: StickySession.Answer?
        /// The backend of the route's split drawn.
        var cluster = ""
        /// An injected delay (TrafficPolicy), and its timer while it runs.
        var delay: Duration?
        var waiting: Scheduled<Void>?
        var delayed = false
        /// Counted in its backend's in-flight requests (not while delayed).
        var counted = false
        /// Sweeps through which nothing of it moved (StallCount).
        var stall = StallCount()
        /// A gRPC-Web call (`grpc` too); a gRPC call's status from its
        /// response head (or, at the end, its trailers); the reader of a
        /// gRPC-Web body's trailer frame; whether the outlier detector
        /// waits for the status (a 2xx head without one).
        var web = false
        var grpcStatus: String?
        var grpcReader: GRPCStatusReader?
        var grpcOutcomePending = false

        init(handler: ExpressHTTP2Handler, id: HTTP2StreamID, request: HTTP2Frame.FramePayload.Headers, snapshot: RouteSnapshot,
             route: String, service: String?, serviceNamespace: String?, key: EndpointKey, state: UpstreamPool.EndpointState, tunnel: TunnelChoice?,
             isHEAD: Bool, idempotent: Bool, grpc: Bool, outgoing: ByteBuffer) {
            self.handler = handler
            self.id = id
            self.request = request
            self.snapshot = snapshot
            self.route = route
            self.service = service
            self.serviceNamespace = serviceNamespace
            self.key = key
            self.state = state
            self.tunnel = tunnel
            self.isHEAD = isHEAD
            self.idempotent = idempotent
            self.grpc = grpc
            self.outgoing = outgoing
        }

        func upstreamRead(_ bytes: ByteBuffer) {
            stall.moved()
            handler?.response(self, bytes)
        }
        func upstreamReadComplete() { handler?.flushSoon() }
        func upstreamClosed() { handler?.upstreamClosed(self) }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        loop = proxy.loop(context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        for stream in streams.values { abandon(stream) }
        self.context = nil
    }

    // MARK: client side

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        received(unwrapInboundIn(data))
    }

    /// A frame from the client (the codec calls this directly).
    func received(_ frame: HTTP2Frame) {
        guard let context else { return }
        idle.reset()
        let id = frame.streamID
        // The codec checks neither field blocks nor content lengths: every
        // block is checked here, before either path
        // sees it, and every request body is held to its declared length.
        var declared: Int?
        if case .headers(let h) = frame.payload, id != .rootStream {
            let opening = id > lastStreamID
            guard HTTP2Fields.valid(h.headers, opening ? .request : .trailers, contentLength: &declared,
                                    extendedConnect: true) else {
                return refuse(id, "a malformed field block", context: context)
            }
            if opening && h.endStream && (declared ?? 0) != 0 {
                return refuse(id, "a body shorter than its content-length", context: context)
            }
            if opening, HeadLimit.listSize(h.headers) > headLimit {
                return headTooLarge(id, requestOpen: !h.endStream)
            }
        }
        if id == .rootStream { return context.fireChannelRead(wrapInboundOut(frame)) }
        if !handed.isEmpty && handed.contains(id) {
            if !bodies.isEmpty, var body = bodies[id] {
                guard body.hold(frame.payload) else {
                    bodies[id] = nil
                    return refuse(id, "a body other than its content-length", context: context)
                }
                bodies[id] = body
            }
            return context.fireChannelRead(wrapInboundOut(frame))
        }
        if let stream = streams[id] {
            switch frame.payload {
            case .rstStream:
                abandon(stream)  // the client gave up on it
            case .data(let d) where stream.requestOpen:
                // The request's body, before the exchange starts.
                guard case .byteBuffer(var bytes) = d.data else { return handOver(stream, then: frame) }
                guard stream.declared.hold(frame.payload) else {
                    return refuse(id, "a body other than its content-length", context: context)
                }
                stream.stall.moved()
                stream.body?.writeBuffer(&bytes)
                if d.endStream {
                    stream.requestOpen = false
                    if stream.waiting == nil { start(stream) }  // (else when the delay is over)
                }
            case .headers where stream.requestOpen:
                guard stream.declared.hold(frame.payload) else {
                    return refuse(id, "a body shorter than its content-length", context: context)
                }
                handOver(stream, then: frame)  // trailers: the full path carries them
            default:
                break  // a WINDOW_UPDATE or PRIORITY is the codec's
            }
            return
        }
        switch frame.payload {
        case .headers(let headers) where id > lastStreamID:
            lastStreamID = id
            switch plan(id, headers, context: context) {
            case .stream(let stream):
                streams[id] = stream
                if stream.waiting == nil {
                    stream.state.inFlight += 1
                    stream.counted = true
                    if !stream.requestOpen { start(stream) }
                }
            case .answered:
                break  // what more comes of it is dropped (below)
            case .handOver:
                handed.insert(id)
                if let declared, !headers.endStream { bodies[id] = DeclaredBody(length: declared) }
                proxy.stats.expressHandovers.add(1, ordering: .relaxed)
                context.fireChannelRead(wrapInboundOut(frame))
            }
        case .priority:
            context.fireChannelRead(wrapInboundOut(frame))
        default:
            break  // a late frame of an express stream that has ended
        }
    }

    /// Stream events come from the codec by a call (below); events of
    /// streams the multiplexer was not given stop here: it has no channel
    /// for them and would only look each one up.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let sweep = event as? IdleSweep {
            // A header block begun a request-head timeout ago and not
            // whole: the codec sends GOAWAY and closes; what is in flight
            // is cut (its client's later frames are stuck behind the block).
            if codec.timeOutHead(sweep) {
                proxy.stats.headTimeouts.add(1, ordering: .relaxed)
                return
            }
            // Requests on which nothing moved for the stream idle timeout:
            // the full path's (on stream channels) and the express path's.
            streamChannels.sweep(sweep)
            if sweep.streamRounds != .max {
                for stream in streams.values where stream.waiting == nil && (stream.requestOpen || !stream.connecting) {
                    if stream.stall.stalled(sweep) { stalled(stream, sweep) }
                }
            }
            // No stream open and no frame read through the sweeps: GOAWAY,
            // and closed once written (at the next timeout, if the client
            // reads none of it).
            switch idle.judge(sweep, busy: !streams.isEmpty || !handed.isEmpty) {
            case .close where !quiescing:
                proxy.stats.idleClosed.add(1, ordering: .relaxed)
                goAway(context)
            case .overdue:
                context.close(promise: nil)
            case .close, .stay:
                break
            }
            return
        }
        if let e = event as? ChannelEvent, case .inputClosed = e {
            // The client's FIN: no stream comes after it (the codec reset
            // those it had not ended). What is in flight is answered, then
            // the connection closes, as in a drain; no GOAWAY: nobody
            // would read it to stop sending.
            quiescing = true
            closeIfDone()
        }
        if event is ChannelShouldQuiesceEvent, !quiescing {
            // Drain: no new streams (GOAWAY); close once every stream is answered.
            goAway(context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// No new streams (GOAWAY with the last one taken); the connection
    /// closes once every stream is answered.
    private func goAway(_ context: ChannelHandlerContext) {
        quiescing = true
        let goAway = HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: lastStreamID, errorCode: .noError, opaqueData: nil))
        context.writeAndFlush(wrapOutboundOut(goAway), promise: nil)
        closeIfDone()
    }

    /// A stream's inbound window changed (a stream channel reads it to open
    /// the window again); only handed-over streams have one.
    func windowUpdated(_ event: NIOHTTP2WindowUpdatedEvent) {
        guard !handed.isEmpty, handed.contains(event.streamID), let context else { return }
        context.fireUserInboundEventTriggered(event)
    }

    func streamCreated(_ event: NIOHTTP2StreamCreatedEvent) {
        if let stream = streams[event.streamID] {
            stream.created = event  // for a hand-over
            return
        }
        context?.fireUserInboundEventTriggered(event)
    }

    func streamClosed(_ event: StreamClosedEvent) {
        let wasHanded = !handed.isEmpty && handed.remove(event.streamID) != nil
        if !ending.isEmpty { ending.remove(event.streamID) }
        if !bodies.isEmpty { bodies[event.streamID] = nil }
        // Reset by the client, or by the codec (an error of ours).
        if let stream = streams[event.streamID] { abandon(stream) }
        closeIfDone()
        if wasHanded { context?.fireUserInboundEventTriggered(event) }
    }

    /// A stream whose request or trailers broke RFC 9113's rules for fields
    /// (HTTP2Fields), or whose body is not the length it declared, is reset
    /// with PROTOCOL_ERROR, as NIOHTTP2Handler's checks would; nothing
    /// more of it goes to a backend (a full-path stream's channel closes).
    private func refuse(_ id: HTTP2StreamID, _ why: String, context: ChannelHandlerContext) {
        if id > lastStreamID { lastStreamID = id }
        if let stream = streams[id] { abandon(stream) }
        proxy.logger.debug("HTTP/2 stream reset: \(why)", metadata: ["stream": "\(id)"])
        codec.reset(id, .protocolError, promise: nil)
        codec.flushNow()
    }

    /// A request head over MeshConfig proxy.maxRequestHeaderSize (as it
    /// was when the connection opened): 431 on its stream, from neither
    /// path, and RST_STREAM NO_ERROR after it while the request is still
    /// open (its body is not wanted, RFC 9113 section 8.1). The
    /// connection goes on.
    private func headTooLarge(_ id: HTTP2StreamID, requestOpen: Bool) {
        lastStreamID = id
        proxy.stats.headsTooLarge.add(1, ordering: .relaxed)
        answerAtOnce(id, status: 431, body: HeadLimit.body(headLimit), isHEAD: false, requestOpen: requestOpen)
    }

    /// A request its Service's TrafficPolicy answers (over the rate limit:
    /// 429 with Retry-After; a fault abort), counted and logged as the full
    /// path answers it (flag RL or FI, no upstream), as
    /// ExpressHTTP1Handler does.
    private func answer(_ id: HTTP2StreamID, _ local: Express.LocalAnswer, isHEAD: Bool, grpcType: String?, requestOpen: Bool,
                        snapshot: RouteSnapshot, logged: Express.Logged?) {
        guard let loop else { return }
        let outcome = Express.Outcome(answered: local, snapshot: snapshot, grpcType: grpcType, protocolName: "HTTP/2", logged: logged)
        Express.record(outcome, source: origin.source, last: &lastSeries, loop: loop, proxy: proxy)
        answerAtOnce(id, status: local.status, body: local.body, extra: local.extra, isHEAD: isHEAD, requestOpen: requestOpen,
                     grpc: GRPCLocalAnswer.contentType(grpcType, status: local.status), grpcStatus: local.grpcStatus)
    }

    /// An answer of the proxy's own to a stream it never took: the head,
    /// the body, and RST_STREAM NO_ERROR after them while the request is
    /// still open (its body is not wanted, RFC 9113 section 8.1). The
    /// connection goes on. To a gRPC call (`grpc`, its content-type) the
    /// status and reason as gRPC's, in the head alone (trailers-only).
    private func answerAtOnce(_ id: HTTP2StreamID, status: Int, body: String, extra: [(String, String)] = [],
                              isHEAD: Bool, requestOpen: Bool, grpc: String? = nil, grpcStatus: Int? = nil) {
        if let grpc {
            loop?.counters.answered(200)
            let head = GRPCLocalAnswer.http2Head(contentType: grpc, httpCode: status, body: body, grpcStatus: grpcStatus, extra: extra)
            codec.send(id, .headers(head, endStream: true), promise: nil)
            if requestOpen { codec.reset(id, .noError, promise: nil) }
            codec.flushNow()
            return
        }
        loop?.counters.answered(status)
        let head = HPACKHeaders([(":status", String(status)), ("content-type", "text/plain; charset=utf-8"),
                                 ("content-length", String(body.utf8.count)), ("server", "weft")] + extra)
        codec.send(id, .headers(head, endStream: isHEAD), promise: nil)
        if !isHEAD { codec.send(id, .data(ByteBuffer(string: body), endStream: true), promise: nil) }
        if requestOpen { codec.reset(id, .noError, promise: nil) }
        codec.flushNow()
    }

    func channelInactive(context: ChannelHandlerContext) {
        for stream in streams.values { abandon(stream) }
        context.fireChannelInactive()
    }

    /// Reads a request's HEADERS frame and decides; builds the HTTP/1.1
    /// request the backend gets when the express path takes it.
    /// What became of a new stream's request head.
    private enum Planned {
        /// Taken: the exchange goes on from here.
        case stream(Stream)
        /// Answered in place (a rate limit), never to be seen again.
        case answered
        /// For the multiplexer and the full path.
        case handOver
    }

    private func plan(_ id: HTTP2StreamID, _ h: HTTP2Frame.FramePayload.Headers, context: ChannelHandlerContext) -> Planned {
        guard !quiescing, let loop else { return .handOver }
        var bodyLength: Int?
        let routing = Express.Routing.current(routing, frontendKey: frontendKey, source: origin.source, loop: loop, proxy: proxy)
        self.routing = routing
        guard routing.serves, let matcher = routing.matcher else { return .handOver }
        let snapshot = routing.snapshot
        var method: String?, target: String?, authorityField: String?
        var hasHost = false, hasProto = false, hasRequestID = false, grpc = false, web = false, cookies = 0
        for (name, value, _) in h.headers {
            if name.utf8.first == UInt8(ascii: ":") {
                switch name.utf8.count {  // (by length first, as HTTP2Fields.pseudo)
                case 7 where name == ":method": method = value
                case 5 where name == ":path": target = value
                case 10 where name == ":authority": authorityField = value
                case 7 where name == ":scheme": break
                default: return .handOver
                }
                continue
            }
            // What ExpressHTTP1Handler hands over too; the rest are not
            // HTTP/2's. (By length first: most fields are none of these.)
            switch name.utf8.count {
            case 2 where name == "te", 6 where name == "expect", 7 where name == "upgrade",
                 10 where name == "connection" || name == "keep-alive", 11 where name == "traceparent",
                 15 where name == "x-forwarded-for", 16 where name == "proxy-connection",
                 17 where name == "transfer-encoding":
                return .handOver
            case 3 where name == "via":
                if value.contains(proxy.viaToken) { return .handOver }  // looped: the full path answers 508
            case 4 where name == "host": hasHost = true
            case 6 where name == "cookie": cookies += 1
            case 12 where name == "x-request-id": hasRequestID = true
            case 12 where name == "content-type":
                grpc = value.hasPrefix("application/grpc")
                web = value.hasPrefix("application/grpc-web")
            case 14 where name == "content-length":
                // One field, digits only: the backend must read the length
                // NIO checked the body against (no "+5", no second value).
                guard bodyLength == nil, !value.isEmpty, value.utf8.count <= 6,
                      value.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
                      let n = Int(value), n <= Self.maxBody else { return .handOver }
                bodyLength = n
            case 17 where name == "x-forwarded-proto": hasProto = true
            default: break
            }
        }
        guard let method, let target, method != "CONNECT", target.utf8.first == UInt8(ascii: "/"),
              authorityField != nil || hasHost else { return .handOver }
        // A constant for the closures below: a variable an escaping closure
        // captures is boxed on the heap, an allocation per request.
        let authority = authorityField
        // A body: declared, and small enough to be read whole first.
        if h.endStream { bodyLength = 0 }
        guard let bodyLength else { return .handOver }

        let (path, query) = HTTPProxyHandler.splitTarget(target)
        let headers = h.headers
        let request = RouteMatcher.Request(method: method, path: path, query: query, header: !matcher.readsHeaders ? { _ in [] } : { name in
            // The full path sees :authority as Host (NIO's HTTP/2 to HTTP/1 codec).
            if name == "host", let authority { return [authority] }
            return headers[canonicalForm: name]
        })
        let chosen: Express.Target
        switch Express.target(request, matcher: matcher, routing: routing, loop: loop, proxy: proxy, source: origin.source,
                              header: { name in
            (name == "host" ? authority : nil).map { Substring($0) } ?? headers[canonicalForm: name].first.map { Substring($0) }
        }, cookie: { name in ClusterRuntime.cookie(name, in: headers[canonicalForm: "cookie"]) }) {
        case .handOver:
            return .handOver
        case .forward(let target):
            chosen = target
        case .answered(let local):
            let logged = Express.answeredLocally(snapshot, method: method, path: target, bytesIn: bodyLength, hasProto: hasProto,
                                                 hasRequestID: hasRequestID, fixed: connectionHeaders,
                                                 allocator: context.channel.allocator, loop: loop) { name in
                (name == "host" ? authority : nil) ?? headers.first(name: name)
            }
            answer(id, local, isHEAD: method == "HEAD", grpcType: grpc ? headers.first(name: "content-type") : nil,
                   requestOpen: !h.endStream, snapshot: snapshot, logged: logged)
            return .answered
        }

        // The request the backend gets: an HTTP/1.1 head from the fields,
        // cookies joined in one line (RFC 9113, section 8.2.3), then the
        // proxy's own headers.
        // One copy of each piece (a ByteBuffer write per piece costs about
        // 190 instructions in its checks), into room for all of them: each
        // field as its own line at most (joined cookies take less).
        var size = method.utf8.count + target.utf8.count + 12 + (authority.map { $0.utf8.count + 8 } ?? 0)
        for (name, value, _) in headers where name.utf8.first != UInt8(ascii: ":") {
            size += name.utf8.count + value.utf8.count + 4
        }
        var out = loop.requestHeads.take(capacity: size + connectionHeaders.withProto.count + 126)
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { b in
            var i = 0
            func put(_ s: String) {
                let n = s.utf8.count
                if s.utf8.withContiguousStorageIfAvailable({
                    UnsafeMutableRawBufferPointer(rebasing: b[i..<(i + n)]).copyMemory(from: UnsafeRawBufferPointer($0))
                }) == nil {
                    for c in s.utf8 { b[i] = c; i += 1 }
                    return
                }
                i += n
            }
            func put(_ s: StaticString) {
                UnsafeMutableRawBufferPointer(rebasing: b[i..<(i + s.utf8CodeUnitCount)])
                    .copyMemory(from: UnsafeRawBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount))
                i += s.utf8CodeUnitCount
            }
            put(method); put(" "); put(target); put(" HTTP/1.1\r\n")
            if let authority { put("host: "); put(authority); put("\r\n") }
            var cookieDone = false
            for (name, value, _) in headers where name.utf8.first != UInt8(ascii: ":") {
                if authority != nil && name == "host" { continue }
                if cookies > 1 && name == "cookie" {
                    guard !cookieDone else { continue }
                    cookieDone = true
                    put("cookie: ")
                    var first = true
                    for (n, v, _) in headers where n == "cookie" {
                        if !first { put("; ") }
                        first = false
                        put(v)
                    }
                    put("\r\n")
                    continue
                }
                put(name); put(": "); put(value); put("\r\n")
            }
            return i
        }
        let (requestID, span) = Express.writeProxyHeaders(&out, connectionHeaders, hasProto: hasProto,
                                                          hasRequestID: hasRequestID,
                                                          keep: snapshot.table.accessLog != nil, loop: loop)
        let stream = Stream(handler: self, id: id, request: h, snapshot: snapshot, route: chosen.route,
                            service: matcher.frontend.service, serviceNamespace: matcher.frontend.namespace, key: chosen.key, state: chosen.state,
                            tunnel: chosen.tunnel, isHEAD: method == "HEAD", idempotent: Express.isIdempotent(method), grpc: grpc, outgoing: out)
        stream.web = web
        stream.hold = chosen.hold
        stream.setCookie = chosen.setCookie
        stream.session = chosen.session
        stream.cluster = chosen.cluster
        if let delay = chosen.delay {
            stream.delay = delay
            // An injected delay: the stream waits (its backend's slot given
            // back, Express.Target.delay), then starts once its body is in.
            stream.delayed = true
            stream.waiting = context.eventLoop.assumeIsolated().scheduleTask(in: .init(delay)) { [weak self, weak stream] in
                guard let self, let stream else { return }
                self.delayOver(stream)
            }
        }
        if !h.endStream {
            stream.requestOpen = true
            stream.declared = DeclaredBody(length: bodyLength)
            stream.body = context.channel.allocator.buffer(capacity: bodyLength)
        }
        if snapshot.table.accessLog != nil, let span {  // (span: written with `keep`)
            stream.logged = Express.Logged(wallStart: AccessLog.now(), method: method, path: target, authority: authority,
                                           userAgent: headers.first(name: "user-agent"),
                                           requestID: requestID ?? headers.first(name: "x-request-id"), span: span,
                                           bytesIn: bodyLength)
        }
        return .stream(stream)
    }

    // MARK: the exchange

    /// Sends the request (its backend's in-flight count went up as the
    /// stream was taken).
    private func start(_ stream: Stream) {
        guard let loop else { return }
        if let idle = Express.idleUpstream(from: stream.state, tunnel: stream.tunnel, key: stream.key,
                                           lifetimes: stream.snapshot.lifetimes) {
            return attach(stream, idle)
        }
        Express.connectUpstream(to: stream.key, tunnel: stream.tunnel, counters: stream.hold?.backend, loop: loop) { [weak self] result in
            guard let self, self.streams[stream.id] === stream, stream.connecting else {
                (try? result.get())?.close()
                return
            }
            switch result {
            case .success(let upstream):
                self.attach(stream, upstream)
            case .failure(let error):
                stream.connecting = false
                if !Express.refusedByPolicy(error) {
                    Express.countConnectFailure(stream.key, error, snapshot: stream.snapshot, frontendKey: self.frontendKey,
                                                loop: loop, proxy: self.proxy)
                    stream.hold?.record(.localFailure)
                }
                // Nothing was sent: the full path tries another backend or
                // answers 503 (403 for a policy's refusal), this connect
                // its first attempt.
                self.handOver(stream, failed: .init(key: stream.key, error: error))
            }
        }
    }

    /// An injected delay is over: the stream takes its backend's slot again
    /// and starts (now, or when its body is in).
    private func delayOver(_ stream: Stream) {
        guard streams[stream.id] === stream, stream.waiting != nil else { return }
        stream.waiting = nil
        guard Express.resume(&stream.hold, state: stream.state, tunnel: stream.tunnel) else { return handOver(stream) }
        stream.state.inFlight += 1
        stream.counted = true
        if !stream.requestOpen { start(stream) }
    }

    private func attach(_ stream: Stream, _ upstream: ExpressUpstream) {
        stream.connecting = false
        stream.upstream = upstream
        stream.reused = upstream.reused
        upstream.owner = stream
        if var outgoing = stream.outgoing {
            stream.outgoing = nil
            if var body = stream.body { outgoing.writeBuffer(&body) }
            upstream.send(outgoing)
            loop?.requestHeads.giveBack(outgoing)
        }
    }

    /// Gives a stream nothing was answered on to the multiplexer, as if its
    /// frames had just come: its HEADERS, the body read so far, then `then`
    /// (the frame that made the express path let go, if one did). The full
    /// path takes it from there, told what was done for the request
    /// (Express.Handed; `failed`: its connect failed).
    private func handOver(_ stream: Stream, then: HTTP2Frame? = nil, failed: Express.Handed.FailedConnect? = nil) {
        guard let context, loop != nil, streams.removeValue(forKey: stream.id) != nil else { return }
        let delay: Express.Handed.Delay = stream.delay.map { stream.waiting == nil ? .served : .pending($0) } ?? .none
        stream.waiting?.cancel()
        stream.upstream?.close()
        stream.upstream = nil
        if stream.counted { stream.state.inFlight -= 1 }
        stream.hold?.release()
        handed.insert(stream.id)
        if stream.requestOpen { bodies[stream.id] = stream.declared }
        proxy.stats.expressHandovers.add(1, ordering: .relaxed)
        // The multiplexer sets up the stream's channel as it reads the
        // HEADERS; its full path takes what was done from streamChannels.
        streamChannels.handing = (stream.id, Express.Handed(cluster: stream.cluster, delay: delay, failedConnect: failed))
        context.fireChannelRead(wrapInboundOut(HTTP2Frame(streamID: stream.id, payload: .headers(stream.request))))
        streamChannels.handing = nil
        if let created = stream.created { context.fireUserInboundEventTriggered(created) }
        if let body = stream.body, body.readableBytes > 0 || !stream.requestOpen {
            // All of it if the request had ended (a late hand-over), else what came.
            let data = HTTP2Frame.FramePayload.Data(data: .byteBuffer(body), endStream: !stream.requestOpen)
            context.fireChannelRead(wrapInboundOut(HTTP2Frame(streamID: stream.id, payload: .data(data))))
        }
        if let then { context.fireChannelRead(wrapInboundOut(then)) }
        context.fireChannelReadComplete()
    }

    fileprivate func response(_ stream: Stream, _ bytes: ByteBuffer) {
        guard streams[stream.id] === stream else { return }
        var bytes = bytes
        while bytes.readableBytes > 0 {
            switch stream.framing {
            case .head:
                if stream.head == nil { stream.head = bytes } else { stream.head!.writeBuffer(&bytes) }
                bytes.moveReaderIndex(to: bytes.writerIndex)
                guard let (rest, held) = responseHead(stream) else { return }
                bytes = rest
                if case .length(0) = stream.framing { return finish(stream, extra: bytes.readableBytes, last: nil, head: held) }
            case .length(let remaining):
                let n = min(remaining, bytes.readableBytes)
                stream.framing = .length(remaining - n)
                let data = bytes.readSlice(length: n)!
                if stream.grpcReader != nil { data.withUnsafeReadableBytes { stream.grpcReader?.body($0) } }
                if remaining == n { return finish(stream, extra: bytes.readableBytes, last: data) }
                writeData(stream, data)
            case .chunked(var framer):
                chunkData.removeAll(keepingCapacity: true)
                var trailer = stream.trailer
                let used = bytes.withUnsafeReadableBytes { p in
                    framer.consume(p, data: { self.chunkData.append($0) }, trailer: { range in
                        if trailer == nil { trailer = ByteBufferAllocator().buffer(capacity: 256) }
                        trailer!.writeBytes(UnsafeRawBufferPointer(rebasing: p[range]))
                    })
                }
                stream.trailer = trailer
                guard let used else { return broken(stream, "a malformed chunked body") }
                stream.framing = .chunked(framer)
                for range in chunkData {
                    let data = bytes.getSlice(at: bytes.readerIndex + range.lowerBound, length: range.count)!
                    if stream.grpcReader != nil { data.withUnsafeReadableBytes { stream.grpcReader?.body($0) } }
                    writeData(stream, data)
                }
                bytes.moveReaderIndex(forwardBy: used)
                if framer.isDone { return finish(stream, extra: bytes.readableBytes, last: nil) }
            case .close:
                if stream.grpcReader != nil { bytes.withUnsafeReadableBytes { stream.grpcReader?.body($0) } }
                writeData(stream, bytes)
                bytes.moveReaderIndex(to: bytes.writerIndex)
            }
        }
        if stream.unwritten > Self.highWater, !stream.paused {
            stream.paused = true
            stream.upstream?.pause()
        }
    }

    /// Turns the response head, once it is all read, into a HEADERS frame,
    /// sent at once unless the response ends with it: then it is returned
    /// (`held`) for finish to send with END_STREAM. Returns the bytes after
    /// the head too. Interim responses (1xx) are dropped.
    private static let setCookieName: StaticString = "set-cookie"

    private func responseHead(_ stream: Stream) -> (rest: ByteBuffer, held: ByteBuffer?)? {
        guard var raw = stream.head else { return nil }
        enum Parsed {
            case incomplete, malformed, refused
            case interim(length: Int)
            case ready(ByteBuffer, length: Int, code: Int, body: Express.ResponseBody)
        }
        let parsed: Parsed = raw.withUnsafeReadableBytes { p in
            guard let length = HTTP1Wire.headLength(p) else { return .incomplete }
            guard let status = HTTP1Wire.parseResponse(p, length: length, fields: &fields),
                  let body = Express.responseBody(p, status, fields, isHEAD: stream.isHEAD) else { return .malformed }
            if stream.tunnel != nil && Express.isRefusal(p, fields) { return .refused }
            if status.code < 200 { return .interim(length: length) }
            if stream.grpc {
                (stream.grpcStatus, stream.grpcOutcomePending, stream.grpcReader)
                    = Express.grpcHead(p, fields, code: status.code, trailerLines: false)
            }
            // The HEADERS block, encoded here from the head's bytes (names
            // lower-cased as they are copied): no field list in between.
            var size = 5
            for f in fields { size += HPACKLiteral.bound(name: f.name.count, value: f.value.count) }
            let cookie = stream.setCookie
            if let cookie { size += HPACKLiteral.bound(name: 10, value: cookie.utf8.count) }
            stream.session?.outcome.count(proxy.stats)
            let session = stream.session?.field
            if let session { size += HPACKLiteral.bound(name: session.name.utf8.count, value: session.value.utf8.count) }
            var block = loop?.responseHeads.take(capacity: size) ?? ByteBufferAllocator().buffer(capacity: size)
            block.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { b in
                var i = 0
                HPACKLiteral.status(status.code, into: b, at: &i)
                for f in fields {
                    if Express.isHopByHop(p, f.name) || (!body.named.isEmpty && body.named.lists(p, name: f.name)) {
                        continue
                    }
                    HPACKLiteral.field(name: UnsafeRawBufferPointer(rebasing: p[f.name]), value: UnsafeRawBufferPointer(rebasing: p[f.value]),
                                       lowercase: true, into: b, at: &i)
                }
                if var cookie {
                    cookie.withUTF8 { value in
                        HPACKLiteral.field(name: UnsafeRawBufferPointer(start: Self.setCookieName.utf8Start, count: 10),
                                           value: UnsafeRawBufferPointer(value), lowercase: false, into: b, at: &i)
                    }
                }
                if var name = session?.name, var value = session?.value {
                    // (A header session's name as the route gave it: lower-cased, as HTTP/2 has names.)
                    name.withUTF8 { n in
                        value.withUTF8 { v in
                            HPACKLiteral.field(name: UnsafeRawBufferPointer(n), value: UnsafeRawBufferPointer(v), lowercase: true,
                                               into: b, at: &i)
                        }
                    }
                }
                return i
            }
            return .ready(block, length: length, code: status.code, body: body)
        }
        switch parsed {
        case .incomplete:
            if raw.readableBytes > ExpressHTTP1Handler.maxRequest { broken(stream, "a response head over \(ExpressHTTP1Handler.maxRequest) bytes") }
            return nil
        case .malformed:
            broken(stream, "a malformed response head")
            return nil
        case .refused:
            // From a tunnel: the backend's node could not reach the pod.
            // Nothing went to the client: the full path tries another
            // backend or answers 503, as for a refused connect.
            let refused = TunnelRefused(status: 0, reason: "\(stream.key) could not be reached from its node")
            if let loop {
                Express.countConnectFailure(stream.key, refused, snapshot: stream.snapshot, frontendKey: frontendKey, loop: loop,
                                            proxy: proxy)
            }
            stream.hold?.record(.localFailure)
            handOver(stream, failed: .init(key: stream.key, error: refused))
            return nil
        case .interim(let length):
            raw.moveReaderIndex(forwardBy: length)
            stream.head = nil
            return (raw, nil)
        case .ready(let headers, let length, let code, let body):
            raw.moveReaderIndex(forwardBy: length)
            stream.head = nil
            stream.framing = body.framing
            stream.status = code
            stream.hold?.record(head: code, grpcStatus: stream.grpcStatus, pending: stream.grpcOutcomePending)
            stream.responded = true
            if case .close = body.framing { stream.reusable = false } else { stream.reusable = !body.close }
            loop?.counters.answered(code)
            routing?.budget?.budget.recordRequest(now: HTTPProxyHandler.nowSeconds())
            if case .length(0) = body.framing {
                stream.trailer = nil
                return (raw, headers)
            }
            // (Not tracked: the stream's later frames are, and they go out after it.)
            write(stream, .block(headers, endStream: false), tracked: false)
            loop?.responseHeads.giveBack(headers)
            return (raw, nil)
        }
    }

    private func writeData(_ stream: Stream, _ data: ByteBuffer, end: Bool = false) {
        stream.bytesOut += data.readableBytes
        write(stream, .data(data, endStream: end), bytes: data.readableBytes)
    }

    /// Writes one frame of a stream (a call to the codec); counts what is
    /// not out yet. Two kinds go without a promise and its callback (about
    /// 5,000 instructions each): a frame that is not `tracked` (a response
    /// head more frames of the stream follow, which are), and the frame
    /// that ends the stream (nothing waits on its bytes; a drain waits for
    /// the codec to close the stream, `ending`, then for the socket,
    /// closeIfDone).
    private func write(_ stream: Stream, _ frame: HTTP2Codec.Outgoing, bytes: Int = 0, tracked: Bool = true) {
        guard let context else { return }
        let ends = frame.endsStream
        // (In the set before the write: the codec may say "closed" during it.)
        if ends { ending.insert(stream.id) }
        guard tracked && !ends else { return codec.send(stream.id, frame, promise: nil) }
        let written = context.eventLoop.makePromise(of: Void.self)
        unwrittenFrames += 1
        stream.unwritten += bytes
        codec.send(stream.id, frame, promise: written)
        written.futureResult.assumeIsolated().whenComplete { [weak self] _ in
            guard let self else { return }
            self.unwrittenFrames -= 1
            stream.unwritten -= bytes
            if stream.paused, stream.unwritten < Self.highWater / 2 {
                stream.paused = false
                stream.upstream?.resume()
            }
            self.closeIfDone()
        }
    }

    /// MeshConfig proxy.streamIdleTimeout ran out on the stream: its body
    /// stopped coming from the client (408, then RST_STREAM NO_ERROR: the
    /// rest is not wanted), or nothing came from its backend (a client that
    /// does not read stops those reads): 504, or RST_STREAM CANCEL once
    /// part of the response went out. The backend connection is closed.
    private func stalled(_ stream: Stream, _ sweep: IdleSweep) {
        proxy.stats.streamIdleTimeouts.add(1, ordering: .relaxed)
        loop?.countEvent("stream_idle_timeout", proxy: proxy, snapshot: stream.snapshot, frontendKey: frontendKey)
        stream.waiting?.cancel()
        stream.upstream?.close()
        stream.upstream = nil
        stream.reusable = false
        if stream.responded {
            end(stream, flags: "SI")
            codec.reset(stream.id, .cancel, promise: nil)
            codec.flushNow()
        } else if stream.requestOpen {
            respondLocally(stream, .requestTimeout, StallCount.body(sweep), flags: "SI")
            codec.reset(stream.id, .noError, promise: nil)
            codec.flushNow()
        } else {
            stream.hold?.record(.localFailure)  // a backend that never answered
            respondLocally(stream, .gatewayTimeout, StallCount.body(sweep), flags: "SI")
        }
    }

    /// Resets a stream the client was answered on in part.
    private func reset(_ stream: Stream) {
        codec.reset(stream.id, .internalError, promise: nil)
        codec.flushNow()
    }

    /// The response is all read: the backend's connection goes back to the
    /// pool, the exchange is recorded, and the stream ends with `last` (or
    /// the head held back, or the trailers, or an empty DATA frame).
    private func finish(_ stream: Stream, extra: Int, last: ByteBuffer?, head: ByteBuffer? = nil) {
        guard let loop else { return }
        if extra > 0 { stream.reusable = false }  // bytes past the response: out of step
        if let upstream = stream.upstream {
            Express.release(upstream, to: stream.state, key: stream.key, reusable: stream.reusable, snapshot: stream.snapshot,
                            proxy: proxy, pool: loop.pool)
            stream.upstream = nil
        }
        // (The head's fields are well-formed HTTP/2 by construction: token
        // names lower-cased, values without control bytes, hop-by-hop
        // fields gone. Trailer lines are checked: the codec does not.)
        let trailers = stream.trailer.flatMap(Self.trailerFields)
        let malformed = trailers.map { !HTTP2Fields.valid($0, .trailers) } ?? false
        if stream.grpc && stream.grpcStatus == nil {
            stream.grpcStatus = trailers?.first(name: "grpc-status") ?? stream.grpcReader?.status
        }
        if stream.grpcOutcomePending {
            stream.grpcOutcomePending = false
            stream.hold?.record(grpcEnd: stream.grpcStatus)
        }
        // Out of the table first: the last frame closes the stream, and
        // the codec says so (StreamClosedEvent) as it is written.
        end(stream, flags: malformed ? "UPE" : "-")
        if let head {
            write(stream, .block(head, endStream: true))
            loop.responseHeads.giveBack(head)
        } else if let trailers {
            if let last { writeData(stream, last) }
            if malformed { return reset(stream) }
            write(stream, .headers(trailers, endStream: true))
        } else {
            writeData(stream, last ?? ByteBuffer(), end: true)
        }
        flushSoon()
    }

    /// Trailer lines ("name: value\r\n") as HTTP/2 trailers; nil if none.
    private static func trailerFields(_ raw: ByteBuffer) -> HPACKHeaders? {
        var headers = HPACKHeaders()
        for crlf in raw.readableBytesView.split(separator: 10) {
            let line = crlf.last == 13 ? crlf.dropLast() : crlf
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")) else { continue }
            let name = String(decoding: line[..<colon], as: UTF8.self).lowercased()
            guard !name.isEmpty, name != "content-length", name != "transfer-encoding", name != "connection" else { continue }
            let value = Substring(String(decoding: line[line.index(after: colon)...], as: UTF8.self)).trimmingASCIISpaces()
            headers.add(name: name, value: String(value))
        }
        return headers.isEmpty ? nil : headers
    }

    fileprivate func upstreamClosed(_ stream: Stream) {
        guard streams[stream.id] === stream, let loop else { return }
        stream.upstream = nil
        if stream.responded, case .close = stream.framing {
            return finish(stream, extra: 0, last: nil)
        }
        stream.hold?.record(.localFailure)  // (a response that came was told already)
        if stream.responded {
            // Part of the response went out: the client must see it broken.
            Express.countReset(snapshot: stream.snapshot, frontendKey: frontendKey, loop: loop, proxy: proxy)
            end(stream, flags: "UC")
            reset(stream)
            return
        }
        if stream.reused && stream.idempotent && stream.head == nil {
            // Perhaps the server closed an idle connection as the request
            // went out: the full path sends it again.
            return handOver(stream)
        }
        Express.countReset(snapshot: stream.snapshot, frontendKey: frontendKey, loop: loop, proxy: proxy)
        respondLocally(stream, .badGateway, "weft: upstream \(stream.key) reset the connection before responding\n", flags: "UC")
    }

    /// The backend's response broke the protocol.
    private func broken(_ stream: Stream, _ what: String) {
        stream.hold?.record(.localFailure)  // (a response that came was told already)
        stream.upstream?.close()
        stream.upstream = nil
        stream.reusable = false
        if stream.responded {
            end(stream, flags: "UPE")
            reset(stream)
        } else {
            respondLocally(stream, .badGateway, "weft: upstream \(stream.key) sent \(what)\n", flags: "UPE")
        }
    }

    /// An answer of the proxy's own, in place of the backend's.
    private func respondLocally(_ stream: Stream, _ status: HTTPResponseStatus, _ body: String, flags: String) {
        if stream.grpc, let grpc = GRPCLocalAnswer.contentType(GRPCLocalAnswer.expressType(web: stream.web), status: Int(status.code)) {
            // A gRPC call: its status and the reason, trailers-only (GRPCLocalAnswer).
            loop?.counters.answered(200)
            stream.status = 200
            let head = GRPCLocalAnswer.http2Head(contentType: grpc, httpCode: Int(status.code), body: body)
            stream.grpcStatus = head.first(name: "grpc-status")
            end(stream, flags: flags)
            write(stream, .headers(head, endStream: true))
            codec.flushNow()
            return
        }
        loop?.counters.answered(Int(status.code))
        stream.status = Int(status.code)
        end(stream, flags: flags)
        let headers = HPACKHeaders([(":status", String(status.code)), ("content-type", "text/plain; charset=utf-8"),
                                    ("content-length", String(body.utf8.count)), ("server", "weft")])
        write(stream, .headers(headers, endStream: stream.isHEAD))
        if !stream.isHEAD { writeData(stream, ByteBuffer(string: body), end: true) }
        codec.flushNow()
    }

    /// The client reset the stream or went away.
    private func abandon(_ stream: Stream) {
        stream.waiting?.cancel()
        stream.upstream?.close()
        stream.upstream = nil
        end(stream, flags: "DC")
    }

    /// The exchange is over: out of the table, its backend has one request
    /// fewer in flight, and it is recorded.
    private func end(_ stream: Stream, flags: String) {
        guard streams.removeValue(forKey: stream.id) != nil, let loop else { return }
        if stream.counted { stream.state.inFlight -= 1 }
        stream.hold?.release()
        Express.record(Express.Outcome(snapshot: stream.snapshot, service: stream.service,
                                       serviceNamespace: stream.serviceNamespace, key: stream.key, route: stream.route,
                                       grpc: stream.grpc, status: stream.status,
                                       flags: Express.flags(flags, delayed: stream.delayed), start: stream.start,
                                       bytesOut: stream.bytesOut, protocolName: "HTTP/2", logged: stream.logged,
                                       grpcStatus: stream.grpcStatus, web: stream.web),
                       source: origin.source, last: &lastSeries, loop: loop, proxy: proxy)
    }

    private var flushScheduled = false
    /// The task flushSoon schedules, made once: a closure made per call
    /// costs an allocation and a weak reference's set-up per response.
    private lazy var flushTask: () -> Void = { [weak self] in
        guard let self else { return }
        self.flushScheduled = false
        self.codec.flushNow()
    }

    /// Flushes once the event loop has handled every connection that is
    /// ready now: the responses of many streams, read from as many
    /// backends in one wake-up, leave in one write to the client.
    fileprivate func flushSoon() {
        guard !flushScheduled, let context else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute(flushTask)
    }

    /// A draining connection closes once every stream is answered and
    /// written out: each stream closed by the codec (so none of its frames
    /// waits on a window), then what the socket still holds written (an
    /// empty write below the codec completes after it; WriteBarrier.swift).
    private func closeIfDone() {
        guard quiescing, !closing, streams.isEmpty, handed.isEmpty, ending.isEmpty, unwrittenFrames == 0 else { return }
        closing = true
        codec.closeAfterWrites()
    }
}
