import NIOCore

/// The backend end of an express exchange: a plain HTTP/1.1 connection
/// with no codec, or a tunnel stream carrying HTTP/1.1 to a pod on another
/// node (`tunnelSource`: the source pod it speaks for). It passes the bytes
/// it reads to the exchange that owns it, which frames the response;
/// between exchanges it waits in its endpoint's idle list of the loop's
/// UpstreamPool.
final class ExpressUpstream: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Called with the bytes read, once per read burst, and when the
    /// connection goes away (nil: closed or failed).
    protocol Owner: AnyObject {
        func upstreamRead(_ bytes: ByteBuffer)
        func upstreamReadComplete()
        func upstreamClosed()
    }

    /// Held strongly (a weak reference to each exchange's new object cost
    /// a side table and the slow release path per request); every way an
    /// exchange lets go of its upstream (`Express.release`, `close`, the
    /// channel going inactive) clears it.
    var owner: (any Owner)?
    private var context: ChannelHandlerContext?
    private(set) var isActive = true
    /// Handed out before: a close with no response byte may be the server
    /// closing an idle connection, which makes a resend safe.
    var reused = false
    /// Sweeps it sat through kept idle in the pool (UpstreamPool.closeIdle).
    var keptSweeps = 0
    /// Exchanges it carried, and when it was made (UpstreamLifetime).
    var uses = 0
    let opened = NIODeadline.now()
    /// A tunnel stream's source pod (its CONNECT named it): only that pod's
    /// exchanges may reuse it. Nil for a TCP connection.
    let tunnelSource: UInt32?

    init(tunnelSource: UInt32? = nil) { self.tunnelSource = tunnelSource }

    var channel: Channel? { context?.channel }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        // Closed as its connect completed: never told inactive (see
        // UpstreamHandler.handlerRemoved); its exchange hears of it here.
        guard let owner else { return }
        self.owner = nil
        isActive = false
        owner.upstreamClosed()
    }

    func send(_ bytes: ByteBuffer) {
        context?.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
    }

    private var paused = false

    /// Stops reading while the client cannot take more (backpressure).
    func pause() {
        guard !paused, let channel = context?.channel else { return }
        paused = true
        channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
    }

    func resume() {
        guard paused, let channel = context?.channel else { return }
        paused = false
        channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
    }

    func close() {
        owner = nil
        isActive = false
        context?.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let owner else {
            // Bytes while idle: the connection is out of step; drop it.
            close()
            return
        }
        owner.upstreamRead(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        owner?.upstreamReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // A tunnel stream's end (the destination closed its side): as a
        // TCP backend's close.
        if let e = event as? ChannelEvent, case .inputClosed = e { return context.close(promise: nil) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        isActive = false
        let owner = self.owner
        self.owner = nil
        owner?.upstreamClosed()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        isActive = false
        context.close(promise: nil)
    }
}
