import NIOCore

// NIO fails the writes still queued on a channel when it closes, and turns
// a half-close of a channel whose input has already ended into a full close.
// A proxy that closes as soon as it has nothing more to say would cut off
// the bytes a slow reader has not taken yet; these wait for them.

/// Outbound user event: end the channel's output once what was written
/// before it is out, and succeed then. Only a channel that orders the end
/// behind its writes by itself takes it: a tunnel stream, whose END_STREAM
/// NIO queues behind the stream's DATA (TunnelStreamCodec). A socket
/// channel fails it as unsupported.
struct EndOutputAfterWrites: Sendable {}

extension ChannelHandlerContext {
    /// Runs `then` once every write issued from here so far has completed
    /// or failed: an empty, flushed write completes after them. Only for
    /// handlers whose outbound data is ByteBuffer.
    func afterWrites(_ then: @escaping () -> Void) {
        let barrier = eventLoop.makePromise(of: Void.self)
        writeAndFlush(NIOAny(channel.allocator.buffer(capacity: 0)), promise: barrier)
        barrier.futureResult.assumeIsolated().whenComplete { _ in then() }
    }

    /// The rest of RFC 9112's staged close (section 9.6), once the output
    /// is shut or about to be: reads on, for the handler to drop what the
    /// client still sends, until the client's EOF (the handler closes then)
    /// or Express.linger, when it closes. The express path and the full
    /// path's RequestErrors both end connections so.
    func closeAfterLinger() {
        read()
        eventLoop.assumeIsolated().scheduleTask(in: Express.linger) { self.close(promise: nil) }
    }

    /// Closes the channel once what was written to it is out.
    func closeAfterWrites() {
        afterWrites { self.close(promise: nil) }
    }

    /// Half-closes the channel once what was written to it is out; `done`
    /// gets whether that worked. A tunnel stream ends its output itself
    /// (EndOutputAfterWrites: no barrier, and no promise per write for one
    /// to wait on); a socket after an empty write.
    func closeOutputAfterWrites(_ done: @escaping (Bool) -> Void) {
        let ended = eventLoop.makePromise(of: Void.self)
        triggerUserOutboundEvent(EndOutputAfterWrites(), promise: ended)
        ended.futureResult.assumeIsolated().whenComplete { result in
            switch result {
            case .success:
                done(true)
            case .failure(let error as ChannelError) where error == .operationUnsupported:
                self.afterWrites {
                    self.close(mode: .output).assumeIsolated().whenComplete { result in
                        if case .success = result { done(true) } else { done(false) }
                    }
                }
            case .failure:
                done(false)
            }
        }
    }
}
