import NIOCore

/// Joins the small writes of one flush into one before NIOSSLHandler,
/// which seals every write it is given as a TLS record of its own.
/// NIOHTTP2Handler writes each DATA frame as two pieces, its 9-byte header
/// and its payload: a tunnel stream's request or response of a few hundred
/// bytes cost two records, two AEAD seals at one end and two opens at the
/// other, ~3,400 and ~2,300 instructions each, and 22 bytes more on the
/// wire. Joined, they make one.
///
/// Writes are joined while the bytes held stay within a record's
/// plaintext (16 KiB); a larger write goes down as it is (after what was
/// held, in order), so a bulk payload is not copied here. The held bytes
/// go down at the next flush (or close), and the writes' promises
/// complete with the joined write's.
final class TLSRecordCoalescer: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    /// TLS's largest record plaintext.
    static let recordSize = 16 * 1024

    /// Reused for the joined bytes: once NIOSSLHandler has sealed them (at
    /// the flush) nothing else holds it, so clearing it allocates nothing.
    private var scratch: ByteBuffer?
    /// The one write held while nothing was joined to it (no copy yet).
    private var held: ByteBuffer?
    private var joined = false
    private var promise: EventLoopPromise<Void>?

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .byteBuffer(let buffer) = unwrapOutboundIn(data) else {
            emit(context: context)
            return context.write(data, promise: promise)
        }
        if let held, held.readableBytes + buffer.readableBytes <= Self.recordSize {
            join(buffer, after: held, context: context)
        } else {
            emit(context: context)
            guard buffer.readableBytes < Self.recordSize else { return context.write(data, promise: promise) }
            held = buffer
        }
        hold(promise)
    }

    func flush(context: ChannelHandlerContext) {
        emit(context: context)
        context.flush()
    }

    /// What is held goes down and out first (nothing would flush it later).
    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if held != nil {
            emit(context: context)
            context.flush()
        }
        context.close(mode: mode, promise: promise)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        emit(context: context)
    }

    private func join(_ buffer: ByteBuffer, after first: ByteBuffer, context: ChannelHandlerContext) {
        if !joined {
            var out = scratch ?? context.channel.allocator.buffer(capacity: Self.recordSize)
            scratch = nil
            out.clear()
            out.writeImmutableBuffer(first)
            held = out
            joined = true
        }
        held?.writeImmutableBuffer(buffer)
    }

    private func hold(_ next: EventLoopPromise<Void>?) {
        guard let next else { return }
        if let promise { promise.futureResult.cascade(to: next) } else { promise = next }
    }

    private func emit(context: ChannelHandlerContext) {
        guard let out = held else { return }
        held = nil
        let done = promise
        promise = nil
        context.write(wrapOutboundOut(.byteBuffer(out)), promise: done)
        if joined {
            joined = false
            scratch = out
        }
    }
}
