import Crypto
import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP1
import NIOHTTP2

/// WebSocket over HTTP/2 (RFC 8441): an h2c client opens a stream with an
/// extended CONNECT (`:method CONNECT`, `:protocol websocket`, `:scheme`,
/// `:path`, `:authority`), which every client-facing connection announces
/// (SETTINGS_ENABLE_CONNECT_PROTOCOL, in Weft's codec and on
/// `--no-express` in NIOHTTP2Handler's SETTINGS).
///
/// The backend is asked the HTTP/1.1 way, as RFC 8441 section 5 maps the
/// two: the full path (HTTPProxyHandler on the stream's channel) sees a GET
/// of `:path` with `Upgrade: <:protocol>` and `Connection: Upgrade`, routed,
/// filtered and balanced as the same request from an HTTP/1.1 client
/// (HTTPRoute method matches see GET, as they would for a WebSocket over
/// HTTP/1.1). A WebSocket gets the `Sec-WebSocket-Key` an HTTP/2 client
/// does not send, and the backend's `Sec-WebSocket-Accept` is checked
/// against it. On the backend's 101 the client gets `:status 200` (no
/// END_STREAM), and from then on the stream's DATA frames and the backend
/// connection's bytes are joined as a tunnel is (TunnelStreamCodec and
/// GlueHandler): END_STREAM is a half-close either way, RST_STREAM or a
/// closed connection ends both. Any other answer goes to the client as it
/// is, and the stream ends with it.
///
/// What the client sends on the stream before the tunnel is up waits here,
/// up to `maxEarly` bytes (RFC 8441 clients wait for the 200); past that
/// the stream is reset.
enum ExtendedConnect {
    /// What the client may send on the stream before its tunnel is up.
    static let maxEarly = 65_536

    static let websocketGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    /// The `Sec-WebSocket-Accept` a backend owes `key` (RFC 6455 4.2.2).
    static func accept(_ key: String) -> String {
        Data(Insecure.SHA1.hash(data: Data((key + websocketGUID).utf8))).base64EncodedString()
    }

    /// The full path's first handler on a stream channel, before NIO's
    /// HTTP/2-to-HTTP/1 codec. A stream whose request is no extended
    /// CONNECT finds it gone after its first frame.
    final class Stream: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = HTTP2Frame.FramePayload
        typealias InboundOut = HTTP2Frame.FramePayload

        /// Told that its request is an extended CONNECT (the upgrade it
        /// sees is one to make, not one an HTTP/2 client may ask for).
        private weak var full: HTTPProxyHandler?
        /// The Sec-WebSocket-Key sent to the backend, when it is a WebSocket.
        private(set) var key: String?
        private var context: ChannelHandlerContext?
        /// The request was an extended CONNECT: frames after it wait.
        private var tunnelling = false
        private var held: [HTTP2Frame.FramePayload] = []
        private var heldBytes = 0

        init(full: HTTPProxyHandler) { self.full = full }

        func handlerAdded(context: ChannelHandlerContext) { self.context = context }
        func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let payload = unwrapInboundIn(data)
            if tunnelling {
                if case .data(let d) = payload { heldBytes += d.data.readableBytes }
                guard heldBytes <= ExtendedConnect.maxEarly else {
                    held.removeAll()
                    return context.close(promise: nil)
                }
                held.append(payload)
                return
            }
            // (A `:protocol` that is no token, which the connection's checks
            // let by, is passed on as it came: a CONNECT, which the full
            // path refuses with 405.)
            guard case .headers(let h) = payload, let upgrade = h.headers.first(name: ":protocol"), !upgrade.isEmpty,
                  upgrade.utf8.allSatisfy(HTTP1Wire.isToken) else {
                context.fireChannelRead(data)
                context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
                return
            }
            // (The connection's checks let `:protocol` through only on a
            // CONNECT with :scheme and :path.)
            tunnelling = true
            var fields: [(String, String)] = []
            fields.reserveCapacity(h.headers.count + 3)
            let websocket = upgrade.lowercased() == "websocket"
            for (name, value, _) in h.headers {
                switch name {
                case ":protocol": continue
                case ":method": fields.append((name, "GET"))
                case "sec-websocket-key" where websocket: continue  // ours goes instead
                default: fields.append((name, value))
                }
            }
            fields.append(("connection", "upgrade"))
            fields.append(("upgrade", upgrade))
            if websocket {
                var random = SystemRandomNumberGenerator()
                let key = Data((0..<16).map { _ in UInt8.random(in: 0...255, using: &random) }).base64EncodedString()
                self.key = key
                fields.append(("sec-websocket-key", key))
            }
            full?.extendedConnect = true
            // The request ends with its head: nothing after it is a body
            // for the backend (it is the tunnel's, and waits).
            context.fireChannelRead(wrapInboundOut(.headers(.init(headers: HPACKHeaders(fields), endStream: true))))
        }

        /// The tunnel is joined: what waited goes on to the handlers now
        /// after this one, which leaves.
        func release() {
            guard let context else { return }
            tunnelling = false
            for payload in held { context.fireChannelRead(wrapInboundOut(payload)) }
            held.removeAll()
            context.fireChannelReadComplete()
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    /// HTTPProxyHandler.onUpgrade on a stream channel: the backend answered
    /// 101 to the request `Stream` made of an extended CONNECT. `context`
    /// is the HTTPProxyHandler's; it leaves with NIO's codec.
    static func tunnel(_ context: ChannelHandlerContext, _ upstream: UpstreamHandler, _ head: HTTPResponseHead,
                       stats: ProxyStats) {
        let stream = context.channel
        let ops = stream.pipeline.syncOperations
        guard let upstreamChannel = upstream.channel, let adapter = try? ops.handler(type: Stream.self) else {
            upstream.channel?.close(promise: nil)
            context.close(promise: nil)
            return
        }
        upstream.sink = nil
        if let key = adapter.key, head.headers.first(name: "sec-websocket-accept") != accept(key) {
            // Not the backend's answer to this handshake: no tunnel.
            upstreamChannel.close(promise: nil)
            context.close(promise: nil)
            return
        }
        var headers = head.headers
        for name in ["connection", "upgrade", "keep-alive", "proxy-connection", "transfer-encoding", "content-length",
                     "sec-websocket-accept"] {
            headers.remove(name: name)
        }
        // HEADERS :status 200, no END_STREAM: the tunnel is open.
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: .http2, status: .ok, headers: headers))),
                              promise: nil)
        // The stream: DATA frames as bytes from here on, in front of NIO's
        // codec, which cannot leave a pipeline and is left behind with
        // nothing after it (what the client sends meanwhile waits in
        // `adapter`).
        let bytes = TunnelStreamCodec(.server)
        do {
            try ops.addHandler(bytes, position: .after(adapter))
            ops.removeHandler(context: context, promise: nil)
        } catch {
            upstreamChannel.close(promise: nil)
            stream.close(promise: nil)
            return
        }
        // The backend's connection: its HTTP handlers leave once NIO's
        // decoder has passed on the 101's end.
        Upgrade.afterResponseEnd(upstream, on: stream.eventLoop) {
            join(stream, upstreamChannel, bytes, adapter, stats)
        }
    }

    /// The HTTP handlers out of the backend's connection, then the glue
    /// between it and the stream's bytes (`bytes`), and what waited on
    /// either side let go.
    private static func join(_ stream: any Channel, _ upstreamChannel: any Channel, _ bytes: TunnelStreamCodec,
                             _ adapter: Stream, _ stats: ProxyStats) {
        Upgrade.detach(upstreamChannel, downstream: stream) { held in
            guard stream.isActive else {
                upstreamChannel.close(promise: nil)
                return
            }
            let (a, b) = GlueHandler.pair()
            a.onFinish = { read, readBack in stats.upgradedBytes.add(read + readBack, ordering: .relaxed) }
            do {
                try stream.pipeline.syncOperations.addHandler(a, position: .after(bytes))
                guard upstreamChannel.isActive else {
                    // The backend had its say and closed before the decoder
                    // left (a refusal after the handshake, say): what it
                    // said goes on, then END_STREAM.
                    let context = try stream.pipeline.syncOperations.context(handler: a)
                    held.passOn(through: context, stats)
                    context.closeOutputAfterWrites { _ in context.close(promise: nil) }
                    return
                }
                try upstreamChannel.pipeline.syncOperations.addHandler(b)
            } catch {
                upstreamChannel.close(promise: nil)
                stream.close(promise: nil)
                return
            }
            held.release()
            adapter.release()
            stream.read()
            upstreamChannel.read()
        }
    }
}
