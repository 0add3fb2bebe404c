import NIOCore

// NIO fails the writes still queued on a channel when it closes, and turns
// a half-close of a channel whose input has already ended into a full close.
// A proxy that closes as soon as it has nothing more to say would cut off
// the bytes a slow reader has not taken yet; these wait for them.

extension ChannelHandlerContext {
    /// Runs `then` once every write issued from here so far has completed
    /// or failed: an empty, flushed write completes after them. Only for
    /// handlers whose outbound data is ByteBuffer, and only ahead of a
    /// half-close or close: on a tunnel stream it ends the output
    /// (TunnelStreamCodec).
    func afterWrites(_ then: @escaping () -> Void) {
        let barrier = eventLoop.makePromise(of: Void.self)
        writeAndFlush(NIOAny(channel.allocator.buffer(capacity: 0)), promise: barrier)
        barrier.futureResult.assumeIsolated().whenComplete { _ in then() }
    }

    /// Closes the channel once what was written to it is out.
    func closeAfterWrites() {
        afterWrites { self.close(promise: nil) }
    }
}
