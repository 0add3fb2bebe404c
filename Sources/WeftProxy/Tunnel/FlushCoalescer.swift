import NIOCore

/// Put under a tunnel connection's HTTP/2 handler, above TLS: many pod
/// connections share the tunnel, and each of their reads ends in a flush.
/// Flushes are held to the end of the event loop's current turn, so what
/// the streams wrote in one wake-up leaves in one TLS flush (fewer, fuller
/// records) and one write. A close first lets a held flush through.
final class FlushCoalescer: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = ByteBuffer

    private var scheduled = false
    private var held = false

    func flush(context: ChannelHandlerContext) {
        held = true
        guard !scheduled else { return }
        scheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.scheduled = false
            self.release(context)
        }
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        release(context)
        context.close(mode: mode, promise: promise)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        release(context)
    }

    private func release(_ context: ChannelHandlerContext) {
        guard held else { return }
        held = false
        context.flush()
    }
}
