import NIOCore
import NIOHTTP1

/// Receives one upstream exchange's response, on the event loop both
/// channels share.
protocol UpstreamSink: AnyObject {
    func upstreamResponse(_ part: HTTPClientResponsePart)
    /// The upstream failed or closed before the response ended. `responded`
    /// says whether any response bytes had arrived.
    func upstreamFailed(_ error: any Error, responded: Bool)
    func upstreamWritabilityChanged(_ writable: Bool)
    /// The upstream's read burst ended: flush what was written downstream.
    func upstreamReadComplete()
}

/// The last handler of an upstream connection (HTTP/1.1) or stream (HTTP/2):
/// hands response parts to the exchange that owns it and sends its request
/// parts. One exchange at a time; an HTTP/1.1 connection goes back to the
/// pool when its response ends with keep-alive on both sides and the whole
/// request sent. A backend may answer before it has read the request (a
/// 401 or 413 to an upload): the rest of that request is never sent (the
/// exchange is over), so the connection is not reused, or the next
/// request on it would be read as the first one's body.
final class UpstreamHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    weak var sink: (any UpstreamSink)?
    private var context: ChannelHandlerContext?
    private(set) var responded = false
    private(set) var isActive = true
    /// Set when the pool handed this connection out before: a failure with no
    /// response byte may be the server closing an idle connection.
    var reused = false
    /// Runs in a tunnel stream carrying this source pod's exchanges (its
    /// address): parked only for that pod, never in the shared idle pool.
    var tunnelSource: UInt32?
    /// Called when a response has ended; true if the connection may be reused.
    var onResponseEnd: ((Bool) -> Void)?
    private var requestKeepAlive = true
    private var responseKeepAlive = true
    /// The exchange's request `.end` went out.
    private var requestSent = true
    /// Sweeps it sat through kept idle in the pool (UpstreamPool.closeIdle).
    var keptSweeps = 0
    /// Exchanges it carried, and when it was made (UpstreamLifetime).
    var uses = 0
    let opened = NIODeadline.now()

    var channel: Channel? { context?.channel }
    var isWritable: Bool { context?.channel.isWritable ?? false }

    /// Reading stopped for a slow client (autoRead off), until
    /// `resumeReads` or the pool takes the connection back.
    private(set) var readsPaused = false

    /// Stops reading the response while the client cannot take more.
    /// (Set in place where the channel allows, on the loop both channels
    /// share: no future.)
    func pauseReads() {
        guard !readsPaused, let channel = context?.channel else { return }
        readsPaused = true
        Self.setAutoRead(false, on: channel)
    }

    /// Reads again; nothing to do (and no option set) unless paused.
    func resumeReads() {
        guard readsPaused, let channel = context?.channel else { return }
        readsPaused = false
        Self.setAutoRead(true, on: channel)
    }

    private static func setAutoRead(_ on: Bool, on channel: Channel) {
        if let options = channel.syncOptions {
            try? options.setOption(ChannelOptions.autoRead, value: on)
        } else {
            channel.setOption(ChannelOptions.autoRead, value: on).whenComplete { _ in }
        }
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        // A connection closed as its connect completed (a first write that
        // failed, the pod having reset) is never told inactive: NIO
        // completes the connect before it calls the channel active, and a
        // close in between only removes the handlers. The exchange hears of
        // it here, or it would wait for its timeout with its backend held.
        guard let sink else { return }
        self.sink = nil
        isActive = false
        sink.upstreamFailed(ChannelError.eof, responded: responded)
    }

    /// Begins an exchange.
    func begin(sink: any UpstreamSink, keepAlive: Bool) {
        self.sink = sink
        responded = false
        requestSent = false
        requestKeepAlive = keepAlive
        responseKeepAlive = true
    }

    /// An HTTP/2 stream's: NIO's HTTP/2 client refuses a field block over
    /// the server's SETTINGS_MAX_HEADER_LIST_SIZE by failing the write
    /// alone, with the stream left open: the request would wait for a
    /// response never asked for. So a head's write has a promise there,
    /// and its failure fails the exchange (one promise per request; HTTP/1.1
    /// connections go without).
    var watchesHeadWrites = false
    /// An HTTP/2 stream's place among its backend's pending requests while
    /// NIO holds its head (the connection at the backend's stream limit),
    /// given back as the head goes out.
    var waiting: PendingPlace?
    /// An HTTP/2 stream's connection.
    weak var http2: HTTP2Upstream?

    func send(_ part: HTTPClientRequestPart, flush: Bool) {
        guard let context else { return }
        if case .end = part { requestSent = true }
        var promise: EventLoopPromise<Void>?
        if watchesHeadWrites, case .head = part {
            let p = context.eventLoop.makePromise(of: Void.self)
            p.futureResult.assumeIsolated().whenComplete { [weak self] result in
                self?.waiting?.release()
                if case .failure(let error) = result { self?.writeFailed(error) }
            }
            promise = p
        }
        if flush {
            context.writeAndFlush(wrapOutboundOut(part), promise: promise)
        } else {
            context.write(wrapOutboundOut(part), promise: promise)
        }
    }

    private func writeFailed(_ error: any Error) {
        guard let context, sink != nil else { return }
        errorCaught(context: context, error: error)
    }

    func flush() { context?.flush() }

    func close() {
        sink = nil
        isActive = false
        context?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        responded = true
        switch part {
        case .head(let head):
            responseKeepAlive = head.isKeepAlive
        case .body:
            break
        case .end:
            let sink = self.sink
            self.sink = nil
            sink?.upstreamResponse(part)
            onResponseEnd?(requestSent && requestKeepAlive && responseKeepAlive && isActive)
            return
        }
        sink?.upstreamResponse(part)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        sink?.upstreamReadComplete()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        sink?.upstreamWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isActive = false
        let sink = self.sink
        self.sink = nil
        sink?.upstreamFailed(ChannelError.eof, responded: responded)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        isActive = false
        let sink = self.sink
        self.sink = nil
        sink?.upstreamFailed(error, responded: responded)
        context.close(promise: nil)
    }
}
