import NIOCore
import NIOHPACK
import NIOHTTP2
import WeftCore

/// Turns one HTTP/2 CONNECT stream of a tunnel into a plain byte channel,
/// so that whatever runs above it (an HTTP/1.1 client codec, a nested
/// HTTP/2 connection, the TCP glue) cannot tell it from a TCP connection:
/// DATA frames in and out as ByteBuffers, END_STREAM as a half-close
/// (`ChannelEvent.inputClosed` in, `close(mode: .output)` out).
///
/// As the client end it opens the stream with the CONNECT request and holds
/// writes until the server's 2xx: a refusal (403 from authorization, 502
/// when the pod cannot be reached) fails the stream with `TunnelRefused`.
/// As the server end it is installed after the CONNECT was answered.
final class TunnelStreamCodec: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = HTTP2Frame.FramePayload

    enum Role {
        /// Send CONNECT for this authority with these extra headers.
        case client(authority: String, headers: [(String, String)])
        case server
    }

    private let role: Role
    private var established: Bool
    private var held: [(ByteBuffer, EventLoopPromise<Void>?)] = []
    private var heldClose: EventLoopPromise<Void>??
    /// A DATA frame has been written (an empty write then has something to
    /// wait for).
    private var wroteData = false
    /// The END_STREAM frame, once written: what comes after it (a barrier,
    /// another half-close) waits for it.
    private var ended: EventLoopFuture<Void>?
    private var sentConnect = false
    /// Client end: succeeds on the server's 2xx, fails on a refusal or when
    /// the stream ends first. The stream counts as connected only then, so a
    /// refusal is handled like a refused connect (retried elsewhere).
    private(set) var ready: EventLoopPromise<Void>?

    init(_ role: Role) {
        self.role = role
        if case .server = role { established = true } else { established = false }
    }

    func channelActive(context: ChannelHandlerContext) {
        if case .client(let authority, let extra) = role, !sentConnect {
            sentConnect = true
            var headers = HPACKHeaders([(":method", "CONNECT"), (":authority", authority)])
            for (n, v) in extra { headers.add(name: n, value: v) }
            context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: headers))), promise: nil)
        }
        context.fireChannelActive()
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if case .client = role, ready == nil { ready = context.eventLoop.makePromise() }
        // A client codec added to an already active stream sends its CONNECT now.
        if context.channel.isActive, case .client = role, !established { channelActive(context: context) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .headers(let h):
            // The client end's check of what the far proxy answers (Weft's
            // codec below does not check field blocks; NIOHTTP2Handler, with
            // `--no-express`, did already). The server end's blocks were
            // checked by TunnelRelay before the stream had a channel.
            if case .client = role, !HTTP2Fields.valid(h.headers, established ? .trailers : .response) {
                ready?.fail(MalformedFieldBlock())
                context.fireErrorCaught(MalformedFieldBlock())
                context.close(promise: nil)
                return
            }
            if !established {
                let status = h.headers.first(name: ":status") ?? ""
                guard status.hasPrefix("2") else {
                    let reason = h.headers.first(name: "x-weft-reason") ?? "status \(status)"
                    let refused = TunnelRefused(status: Int(status) ?? 0, reason: reason)
                    ready?.fail(refused)
                    context.fireErrorCaught(refused)
                    context.close(promise: nil)
                    return
                }
                established = true
                ready?.succeed()
                for (buffer, promise) in held { write(context: context, data: NIOAny(buffer), promise: promise) }
                held.removeAll()
                context.flush()
                if let closing = heldClose {
                    heldClose = nil
                    closeOutput(context: context, promise: closing)
                }
            }
            if h.endStream { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        case .data(let d):
            if case .byteBuffer(let buffer) = d.data, buffer.readableBytes > 0 {
                context.fireChannelRead(wrapInboundOut(buffer))
            }
            if d.endStream { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        case .rstStream:
            context.close(promise: nil)
        default:
            break
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let buffer = unwrapOutboundIn(data)
        guard established else {
            held.append((buffer, promise))
            return
        }
        if buffer.readableBytes == 0 {
            // An empty write is a barrier (WriteBarrier.swift): done once
            // the writes before it are. DATA frames go without a promise
            // each (one per frame cost ~6,000 instructions per request at
            // each end), so there is nothing to wait on but a frame queued
            // behind them. Weft's own barriers end the stream's output
            // instead (EndOutputAfterWrites: END_STREAM is that frame);
            // what is left are NIO's HTTP encoders, which write an empty
            // buffer for an `.end` sent with a promise (nothing sends one
            // on a tunnel stream). That goes out as an empty DATA frame:
            // NIO's peer takes one in a row, and ends the whole tunnel
            // connection past that, so it must stay rare.
            guard let promise else { return }
            if let ended { return ended.cascade(to: promise) }
            guard wroteData else { return promise.succeed() }
        }
        wroteData = true
        context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(buffer)))), promise: promise)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard event is EndOutputAfterWrites else { return context.triggerUserOutboundEvent(event, promise: promise) }
        close(context: context, mode: .output, promise: promise)
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .output else { return context.close(mode: mode, promise: promise) }
        guard established else {
            heldClose = .some(promise)
            return
        }
        closeOutput(context: context, promise: promise)
    }

    private func closeOutput(context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        if let ended {
            ended.cascade(to: promise)
            return
        }
        let written = promise ?? context.eventLoop.makePromise()
        ended = written.futureResult
        let end = HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(context.channel.allocator.buffer(capacity: 0)), endStream: true))
        context.writeAndFlush(wrapOutboundOut(end), promise: written)
    }

    func channelInactive(context: ChannelHandlerContext) {
        ready?.fail(ChannelError.ioOnClosedChannel)
        for (_, promise) in held { promise?.fail(ChannelError.ioOnClosedChannel) }
        held.removeAll()
        if let closing = heldClose {
            heldClose = nil
            closing?.fail(ChannelError.ioOnClosedChannel)
        }
        context.fireChannelInactive()
    }
}

/// A stream that never reached the far end: its connection had gone away
/// (GOAWAY: the far proxy is draining) before it was sent. Safe to open
/// again on a new connection.
struct TunnelNotOpened: Error, CustomStringConvertible {
    var description: String { "the tunnel connection went away before the stream was opened" }
}

/// No answer to a CONNECT (nor, for a new tunnel, its setup) within
/// TunnelHTTP2.openTimeout: the tunnel was closed.
struct TunnelTimedOut: Error, CustomStringConvertible {
    var node: IPv4Address
    var timeout: TimeAmount
    var description: String {
        "the tunnel to \(node) answered nothing within \(IdleSweep.shown(timeout)) (its proxy is stuck or gone)"
    }
}

/// The far end of a tunnel said no to a CONNECT.
struct TunnelRefused: Error, CustomStringConvertible {
    var status: Int
    var reason: String
    var description: String { "tunnel refused (\(status)): \(reason)" }
}
