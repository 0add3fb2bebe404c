import NIOCore
import NIOHPACK
import NIOHTTP1
import NIOHTTP2
import WeftCore
import WeftKernel

/// The server side of an h2c client connection, whether the client began
/// with the HTTP/2 preface (ProtocolDetector) or asked for the h2c Upgrade
/// on an HTTP/1.1 request (H2CUpgrade).
enum HTTP2ServerPipeline {
    /// Adds the HTTP/2 handlers at the end of `pipeline`. With the express
    /// path on: Weft's HTTP/2 codec (server), then the express path
    /// (ExpressHTTP2Handler), then the multiplexer: streams the express
    /// path does not answer (all of them while it does not serve the
    /// frontend: tracing on, a FrontendGuard, no route) get stream channels
    /// and the full path. The codec checks every field block that comes in
    /// (HTTP2Fields) and holds each request body to its content-length
    /// (DeclaredBody) in place of NIO's checks; HTTP2FieldCheck checks what
    /// the full path sends. `--no-express`: NIOHTTP2Handler and the full
    /// path for every stream.
    static func add(to pipeline: ChannelPipeline.SynchronousOperations, channel: any Channel,
                    proxy: ProxyContext, origin: CapturedOrigin) throws {
        proxy.stats.http2Connections.add(1, ordering: .relaxed)
        // A stream channel's full path; `checked`: the outgoing field blocks
        // are checked there (HTTP2FieldCheck). Each is known to the
        // connection's handler, which passes the idle sweep on to it.
        let streamChannels = StreamChannels()
        let known = NIOLoopBound(streamChannels, eventLoop: channel.eventLoop)
        let fullPath = { (checked: Bool) -> NIOChannelInitializer in
            { stream in
                stream.eventLoop.settingUp {
                    let pipeline = stream.pipeline.syncOperations
                    if checked { try pipeline.addHandler(HTTP2FieldCheck()) }
                    let full = HTTPProxyHandler(proxy: proxy, origin: origin, isHTTP2: true)
                    full.handed = known.value.handed(to: stream)
                    full.onUpgrade = ExtendedConnect.tunnel
                    try pipeline.addHandler(ExtendedConnect.Stream(full: full))
                    try pipeline.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
                    try pipeline.addHandler(full)
                    StreamChannels.add(stream, to: known)
                }
            }
        }
        if proxy.configuration.express {
            // Header lists to twice the MeshConfig limit are read, so that
            // one over the limit gets 431 (HeadLimit).
            let headLimit = proxy.snapshot.maxRequestHead
            var settings = HTTP2Codec.Settings.h2c
            settings.maxHeaderListSize = 2 * headLimit
            settings.maxConcurrentStreams = proxy.snapshot.http2Streams
            settings.enableConnectProtocol = true
            let codec = HTTP2Codec(allocator: channel.allocator, settings: settings)
            try pipeline.addHandler(codec)
            try pipeline.addHandler(ExpressHTTP2Handler(proxy: proxy, origin: origin, codec: codec, headLimit: headLimit,
                                                        streamChannels: streamChannels))
            try pipeline.addHandler(HTTP2StreamMultiplexer(mode: .server, channel: channel,
                                                           inboundStreamInitializer: fullPath(true)))
        } else {
            let ends = HTTP2ConnectionEnds(proxy: proxy, loop: channel.eventLoop, streamChannels: streamChannels)
            try pipeline.addHandler(HTTP2HeadWatch())
            // NIO's settings with the MeshConfig header limit (its decoder
            // holds lists to it: a larger one ends the connection) and
            // streams.
            var connection = NIOHTTP2Handler.ConnectionConfiguration()
            connection.initialSettings = [HTTP2Setting(parameter: .maxConcurrentStreams, value: proxy.snapshot.http2Streams),
                                          HTTP2Setting(parameter: .maxHeaderListSize, value: proxy.snapshot.maxRequestHead),
                                          HTTP2Setting(parameter: .enableConnectProtocol, value: 1)]
            _ = try pipeline.configureHTTP2Pipeline(mode: .server, connectionConfiguration: connection, streamConfiguration: .init(),
                                                    streamDelegate: ends.streamDelegate, inboundStreamInitializer: fullPath(false))
            try pipeline.addHandler(ends)
        }
    }
}

/// The h2c Upgrade (RFC 7540 3.2; RFC 9113 deprecates it, curl `--http2`
/// and `nghttp -u` still ask for it): an HTTP/1.1 request with
/// `Upgrade: h2c`, `Connection: Upgrade, HTTP2-Settings` and one valid
/// `HTTP2-Settings` is answered `101 Switching Protocols`, the connection
/// goes on as HTTP/2 behind the same handlers as a client with prior
/// knowledge (HTTP2ServerPipeline), and the request is answered there as
/// stream 1. The proxy does it itself: the backend sees an HTTP/2 stream's
/// request, never the upgrade.
///
/// A request with a body (curl `--http2 -d`) is read whole first, as RFC
/// 7540 3.2 has it, and its body goes on stream 1 as DATA, up to
/// `maxBody` bytes with a content-length. Declined (the request answered
/// over HTTP/1.1, as RFC 9110 7.8 lets a server do, and the connection
/// closed after it, since NIO's decoder parses nothing after a request
/// that asked for an upgrade) when its body is larger, chunked or waits
/// for `100 Continue`, when it is not in origin form, has no Host, or the
/// proxy is draining.
enum H2CUpgrade {
    /// The largest body an upgrade takes: the window every HTTP/2 receiver
    /// opens before settings change it (RFC 9113 6.9.2), so that stream 1's
    /// DATA fits whatever window the codec (or NIOHTTP2Handler on
    /// `--no-express`) holds the client to, though the client never sent
    /// it as HTTP/2. A body is held in memory until the switch, so this is
    /// also what one upgrading connection can make the proxy hold.
    static let maxBody = 65_535

    /// Whether `head` asks for the h2c Upgrade at all (the Upgrade field
    /// names h2c and Connection names upgrade).
    static func asks(_ head: HTTPRequestHead) -> Bool {
        tokens(head.headers, "upgrade").contains("h2c") && tokens(head.headers, "connection").contains("upgrade")
    }

    /// Whether the proxy takes the upgrade `head` asks for.
    static func accepts(_ head: HTTPRequestHead) -> Bool {
        // (The first test, a scan without allocation, is all most requests see.)
        guard head.headers.contains(name: "http2-settings"), head.version == .http1_1, asks(head),
              tokens(head.headers, "connection").contains("http2-settings"),
              head.headers["http2-settings"].count == 1,
              let settings = head.headers.first(name: "http2-settings"), validSettings(settings),
              head.headers["host"].count == 1, head.uri.hasPrefix("/"),
              head.method != .CONNECT, !head.headers.contains(name: "transfer-encoding"),
              !head.headers.contains(name: "expect")
        else { return false }
        let lengths = head.headers[canonicalForm: "content-length"]
        guard let length = lengths.first else { return true }
        // One length of digits alone (NIO's decoder has refused any other
        // spelling before this is asked), no larger than a stream's window.
        return lengths.count == 1 && length.utf8.count <= 5 && length.utf8.allSatisfy { $0 >= 0x30 && $0 <= 0x39 }
            && Int(length).map { $0 <= maxBody } == true
    }

    /// The comma-separated tokens of the fields named `name`, lower-cased.
    private static func tokens(_ headers: HTTPHeaders, _ name: String) -> [String] {
        headers[canonicalForm: name].map { $0.lowercased() }
    }

    /// HTTP2-Settings: a SETTINGS payload (6-byte entries), base64url
    /// without padding (RFC 7540 3.2.1). The values take effect from the
    /// client's preface SETTINGS, which has to follow; the stream of the
    /// request waits for it (H2CUpgradeStream).
    static func validSettings(_ value: String) -> Bool {
        var digits = 0
        for c in value.utf8 {
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
                digits += 1
            default:
                return false
            }
        }
        // Four digits carry three bytes; a last group of 2 or 3 digits one or two.
        guard digits > 0, digits % 4 != 1 else { return false }
        let bytes = digits / 4 * 3 + max(0, digits % 4 - 1)
        return bytes % 6 == 0
    }

    /// From HTTPProxyHandler (acceptsH2CUpgrade) at the end of `head`, a
    /// request `accepts` took, with its `body` (whole; nil or empty: none).
    /// The 101 goes out through the HTTP/1 encoder; the pipeline changes
    /// on the next loop turn (the call comes from inside NIO's decoder,
    /// which can leave only once it returns): H2CUpgradeStream goes last
    /// and the HTTP/1 handlers leave (the bytes the decoder still holds, if
    /// the client sent any after the request, reach it), then the HTTP/2
    /// handlers go behind it, the codec's SETTINGS following the 101.
    static func switchProtocols(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, body: ByteBuffer?,
                                proxy: ProxyContext, origin: CapturedOrigin) {
        var headers = HTTPHeaders()
        headers.add(name: "connection", value: "Upgrade")
        headers.add(name: "upgrade", value: "h2c")
        context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .switchingProtocols,
                                                                          headers: headers))), promise: nil)
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)), promise: nil)
        proxy.stats.h2cUpgrades.add(1, ordering: .relaxed)
        let channel = context.channel
        let streamOne = requestFrames(head, body: body, allocator: channel.allocator)
        context.eventLoop.assumeIsolated().execute {
            guard channel.isActive else { return }
            let pipeline = channel.pipeline.syncOperations
            let stream = H2CUpgradeStream(request: streamOne)
            do {
                try pipeline.addHandler(stream)
                pipeline.removeHandler(context: context, promise: nil)  // the HTTP handler that asked
                try HTTP1ServerPipeline.remove(from: pipeline)
                try HTTP2ServerPipeline.add(to: pipeline, channel: channel, proxy: proxy, origin: origin)
            } catch {
                proxy.logger.warning("cannot switch to HTTP/2 after the h2c upgrade: \(error)")
                channel.close(promise: nil)
                return
            }
            // A drain begun since the request was read went to the handler
            // that has left: the HTTP/2 handlers hear of it after stream 1.
            if proxy.draining.load(ordering: .relaxed) { stream.quiesced = true }
            stream.start()
            channel.read()
        }
    }

    /// Connection-specific fields, which HTTP/2 forbids (RFC 9113 8.2.2),
    /// and the upgrade's own; Host becomes :authority.
    private static let dropped: Set<String> = ["connection", "upgrade", "http2-settings", "host", "keep-alive",
                                               "proxy-connection", "transfer-encoding"]

    /// `head` and `body` as the client would have sent them on stream 1:
    /// HEADERS (and CONTINUATIONs past 16,384 bytes, the frame size every
    /// HTTP/2 endpoint takes), every field a literal never indexed, so that
    /// the HPACK state the client's own blocks build on stays as it is;
    /// then the body in DATA frames of that size at most. END_STREAM on the
    /// last DATA frame, or on HEADERS when there is no body.
    static func requestFrames(_ head: HTTPRequestHead, body: ByteBuffer? = nil,
                              allocator: ByteBufferAllocator) -> ByteBuffer {
        var fields = HPACKHeaders()
        fields.add(name: ":method", value: head.method.rawValue)
        fields.add(name: ":scheme", value: "http")
        fields.add(name: ":authority", value: head.headers.first(name: "host") ?? "")
        fields.add(name: ":path", value: head.uri)
        for (name, value) in head.headers {
            let lower = name.lowercased()
            if dropped.contains(lower) || (lower == "te" && value.lowercased() != "trailers") { continue }
            fields.add(name: lower, value: value)
        }
        var block = allocator.buffer(capacity: 256)
        HPACKLiteral.write(fields, into: &block)
        var data = body ?? ByteBuffer()
        let ended = data.readableBytes == 0
        let frameSize = 16_384
        let bytes = block.readableBytes + data.readableBytes
        var out = allocator.buffer(capacity: bytes + 9 * (2 + bytes / frameSize))
        var first = true
        repeat {
            let piece = block.readSlice(length: min(frameSize, block.readableBytes)) ?? ByteBuffer()
            let last = block.readableBytes == 0
            // HEADERS: END_STREAM (0x1) with no body, END_HEADERS (0x4) on the last frame.
            let flags: UInt8 = (first && ended ? 0x1 : 0) | (last ? 0x4 : 0)
            frame(piece, type: first ? 0x1 : 0x9, flags: flags, into: &out)
            first = false
        } while block.readableBytes > 0
        while data.readableBytes > 0, let piece = data.readSlice(length: min(frameSize, data.readableBytes)) {
            // DATA: END_STREAM (0x1) on the last.
            frame(piece, type: 0x0, flags: data.readableBytes == 0 ? 0x1 : 0, into: &out)
        }
        return out
    }

    /// One frame of stream 1.
    private static func frame(_ payload: ByteBuffer, type: UInt32, flags: UInt8, into out: inout ByteBuffer) {
        out.writeInteger(UInt32(payload.readableBytes) << 8 | type)
        out.writeInteger(flags)
        out.writeInteger(UInt32(1))
        out.writeImmutableBuffer(payload)
    }
}

/// In front of the HTTP/2 handlers after an h2c Upgrade: passes the client's
/// bytes on as they come, and puts the upgrade request's frames (stream 1)
/// right after the client's preface and first frame, its SETTINGS (a
/// connection that begins otherwise is the codec's to refuse). Then it
/// leaves. Until `start`, what it reads waits (the bytes NIO's decoder
/// held, passed on as the HTTP/1 handlers leave). A drain (quiesce) before
/// the request is in is passed on after it, so that the GOAWAY the HTTP/2
/// handlers send counts stream 1 in.
final class H2CUpgradeStream: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let request: ByteBuffer
    private var context: ChannelHandlerContext?
    private var started = false
    private var held: [ByteBuffer] = []
    /// Bytes of the preface and the first frame's header seen so far.
    private var head: [UInt8] = []
    /// Bytes still to pass before the request goes in, once the first
    /// frame's header is whole.
    private var remaining: Int?
    private static let prefaceLength = 24
    /// A drain to pass on once the request is in.
    var quiesced = false

    init(request: ByteBuffer) { self.request = request }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    /// The HTTP/2 handlers are behind it now.
    func start() {
        started = true
        guard let context else { return }
        let waiting = held
        held = []
        for bytes in waiting { pass(bytes, context: context) }
        if !waiting.isEmpty { context.fireChannelReadComplete() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        guard started else { return held.append(bytes) }
        pass(bytes, context: context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if started { context.fireChannelReadComplete() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent {
            quiesced = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func pass(_ incoming: ByteBuffer, context: ChannelHandlerContext) {
        var bytes = incoming
        if remaining == nil {
            let need = Self.prefaceLength + 9 - head.count
            let seen = bytes.readableBytesView.prefix(need)
            head.append(contentsOf: seen)
            if head.count == Self.prefaceLength + 9 {
                let h = head[Self.prefaceLength...]
                let length = Int(h[h.startIndex]) << 16 | Int(h[h.startIndex + 1]) << 8 | Int(h[h.startIndex + 2])
                // Not SETTINGS: the codec refuses the connection; nothing to add.
                remaining = h[h.startIndex + 3] == 0x4 ? length + seen.count : 0
                if h[h.startIndex + 3] != 0x4 { return finish(bytes, inject: false, context: context) }
            } else {
                return context.fireChannelRead(wrapInboundOut(bytes))
            }
        }
        let left = remaining ?? 0
        guard bytes.readableBytes >= left, let before = bytes.readSlice(length: left) else {
            remaining = left - bytes.readableBytes
            return context.fireChannelRead(wrapInboundOut(bytes))
        }
        if before.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(before)) }
        finish(bytes, inject: true, context: context)
    }

    /// The request in (if `inject`), the rest of the read after it, and out.
    private func finish(_ rest: ByteBuffer, inject: Bool, context: ChannelHandlerContext) {
        if inject { context.fireChannelRead(wrapInboundOut(request)) }
        if rest.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(rest)) }
        if quiesced { context.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent()) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
