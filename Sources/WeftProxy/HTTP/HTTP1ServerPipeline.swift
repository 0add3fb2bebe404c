import NIOCore
import NIOHTTP1

/// The server side of the full HTTP/1.1 path (HTTPProxyHandler, InboundHTTP,
/// and the express path's handover): NIO's response encoder and request
/// decoder, the MeshConfig head limit held on both sides of the decoder, and
/// Weft's answer to a request the decoder refuses in place of NIO's bare 400
/// (docs/proxy.md, "Request head size").
///
/// Heads up to twice the limit are read whole, so that the one over the
/// limit is answered and the connection goes on (as on HTTP/2); past that:
/// - Before the decoder, `HeadBytes` counts the bytes read while a request
///   head is due. NIO's decoder holds a head until it is whole and sets no
///   bound on the request line, so without this a client could grow one
///   connection's buffer without end. It under-counts by at most one read
///   (bytes after a request's end in the read that ended it).
/// - The decoder refuses a field, or all fields together, over twice the
///   limit (NIO counts names and values only).
/// - After the decoder, `RequestErrors` answers either refusal: 431 with the
///   limit's reason, or 400 naming what NIO could not parse. The answer
///   waits for the response in progress, if any; then the connection
///   half-closes, reads and drops what still comes for Express.linger, and
///   closes (closing over unread bytes would reset the connection, and the
///   client could lose the answer).
///
/// A head that parses but is over the limit as written is answered by
/// HTTPProxyHandler, and the connection goes on.
///
/// The handler ends a connection after its last response the same way
/// (`LingeringClose`), unless the client has already shut its side.
enum HTTP1ServerPipeline {
    /// Outbound user event from the handler, sent once its last response is
    /// written: RFC 9112's staged close (section 9.6). The output is shut
    /// (the client reads the response, then EOF); what the client still
    /// sends (the rest of a body the answer did not wait for, a request
    /// pipelined behind `Connection: close`, more of a head that timed out)
    /// is read and dropped until it shuts its side, or for Express.linger
    /// at most, then the connection closes. Closed at once instead, the
    /// kernel answers those bytes with a reset, and a client still sending
    /// can lose the response. `RequestErrors` takes it; a pipeline without
    /// one fails its promise, and the sender closes.
    struct LingeringClose: Sendable {}

    /// Ends the connection of `context`'s handler once its last response is
    /// written: lingering if RequestErrors is below it, else closed.
    static func linger(_ context: ChannelHandlerContext) {
        let done = context.eventLoop.makePromise(of: Void.self)
        context.triggerUserOutboundEvent(LingeringClose(), promise: done)
        done.futureResult.assumeIsolated().whenFailure { _ in context.close(promise: nil) }
    }

    /// The handlers to add, `handler` last.
    static func handlers(proxy: ProxyContext, then handler: any ChannelHandler) -> [any ChannelHandler] {
        let limit = proxy.snapshot.maxRequestHead
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderFieldSize = 2 * limit
        limits.maxHeaderListSize = 2 * limit
        let bytes = HeadBytes(limit: 2 * limit)
        (handler as? HTTPProxyHandler)?.headBytes = bytes
        // Bytes after an Upgrade request stay for the spliced stream.
        let decoder = HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .drop,
                                         limitConfiguration: limits)
        return [HTTPResponseEncoder(), bytes, ByteToMessageHandler(decoder),
                RequestErrors(proxy: proxy, bytes: bytes, limit: limit), handler]
    }

    /// Adds them at the end of `pipeline`.
    static func add(to pipeline: ChannelPipeline.SynchronousOperations, proxy: ProxyContext,
                    then handler: any ChannelHandler) throws {
        try pipeline.addHandlers(handlers(proxy: proxy, then: handler))
    }

    /// After an Upgrade: takes out all but the last handler (the decoder
    /// passes on the bytes it holds as it goes, on a later turn of the
    /// loop; `decoderGone` completes once it has).
    static func remove(from pipeline: ChannelPipeline.SynchronousOperations,
                       decoderGone: EventLoopPromise<Void>? = nil) throws {
        try pipeline.removeHandler(pipeline.handler(type: RequestErrors.self), promise: nil)
        try pipeline.removeHandler(pipeline.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self), promise: decoderGone)
        try pipeline.removeHandler(pipeline.handler(type: HeadBytes.self), promise: nil)
        try pipeline.removeHandler(pipeline.handler(type: HTTPResponseEncoder.self), promise: nil)
    }
}

/// Counts the bytes read while a request head is due; over the limit, the
/// request is refused as the decoder refuses a head over it.
final class HeadBytes: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let limit: Int
    /// Bytes read since the last request ended (or the connection began),
    /// while no head has come.
    fileprivate var pending = 0
    fileprivate var headDue = true
    /// Set once the request is refused: nothing more goes to the decoder.
    fileprivate var refused = false

    init(limit: Int) { self.limit = limit }

    /// Part of a request head is held: read after the last request ended,
    /// in reads of its own (not the one that ended it), and not yet whole.
    var headPartlyRead: Bool { headDue && pending > 0 && !refused }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        if headDue { pending += Self.unwrapInboundIn(data).readableBytes }
        context.fireChannelRead(data)
        // The decoder has taken all it can of this read: a head it finished
        // has reset the count (RequestErrors).
        if headDue, pending > limit, !refused {
            context.fireErrorCaught(HTTPParserError.headerOverflow)
        }
    }
}

/// Answers a request the decoder (or HeadBytes) refused, then ends the
/// connection: see HTTP1ServerPipeline.
final class RequestErrors: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let proxy: ProxyContext
    private let bytes: HeadBytes
    private let limit: Int
    /// Requests read whose responses have not ended.
    private var open = 0
    private var responseStarted = false
    /// What the decoder refused, until it is answered.
    private var refusal: HTTPParserError?
    private var answered = false

    init(proxy: ProxyContext, bytes: HeadBytes, limit: Int) {
        self.proxy = proxy
        self.bytes = bytes
        self.limit = limit
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard refusal == nil, !answered else { return }
        switch Self.unwrapInboundIn(data) {
        case .head:
            bytes.headDue = false
            bytes.pending = 0
            open += 1
        case .end:
            bytes.headDue = true
            bytes.pending = 0
        case .body:
            break
        }
        context.fireChannelRead(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if answered { return context.read() }  // lingering: read on, and drop
        context.fireChannelReadComplete()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if refusal != nil || answered { return }  // the decoder refusing what follows
        guard let error = error as? HTTPParserError else { return context.fireErrorCaught(error) }
        bytes.refused = true
        refusal = error
        if !bytes.headDue && responseStarted {
            // A request's body cannot be read on, and its response has
            // begun: nothing can be said in HTTP any more.
            return context.close(promise: nil)
        }
        if !bytes.headDue { open -= 1 }  // this request gets the answer, not its response
        if open <= 0 { answer(context: context) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Lingering, the client's EOF ends it.
        if answered, let e = event as? ChannelEvent, case .inputClosed = e { return context.close(promise: nil) }
        context.fireUserInboundEventTriggered(event)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard event is HTTP1ServerPipeline.LingeringClose else {
            return context.triggerUserOutboundEvent(event, promise: promise)
        }
        promise?.succeed()
        guard !answered else { return }
        answered = true
        bytes.refused = true
        Self.shutOutput(context)
        context.closeAfterLinger()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if answered {
            promise?.fail(ChannelError.outputClosed)
            return
        }
        switch Self.unwrapOutboundIn(data) {
        case .head(let head) where head.status.code < 200:
            break
        case .head:
            responseStarted = true
        case .body:
            break
        case .end:
            responseStarted = false
            open -= 1
        }
        context.write(data, promise: promise)
        // At once, so that no response the handler writes next goes first.
        if refusal != nil, open <= 0, !responseStarted { answer(context: context) }
    }

    private func answer(context: ChannelHandlerContext) {
        guard let refusal, !answered else { return }
        answered = true
        let status: HTTPResponseStatus
        let body: String
        if refusal == .headerOverflow {
            proxy.stats.headsTooLarge.add(1, ordering: .relaxed)
            status = .requestHeaderFieldsTooLarge
            body = HeadLimit.body(limit)
        } else {
            status = .badRequest
            body = "weft: the request is not valid HTTP/1.1 (\(refusal))\n"
        }
        proxy.stats.response(Int(status.code))
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        headers.add(name: "content-length", value: "\(body.utf8.count)")
        headers.add(name: "server", value: "weft")
        headers.add(name: "connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))),
                      promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { result in
            guard case .success = result else { return context.close(promise: nil) }
            Self.shutOutput(context)
        }
        context.closeAfterLinger()
    }

    /// Once what was written is out: the output shut (or, failing that,
    /// the connection closed).
    private static func shutOutput(_ context: ChannelHandlerContext) {
        context.close(mode: .output).assumeIsolated().whenFailure { _ in context.close(promise: nil) }
    }
}
