import NIOCore

/// Joins two channels byte for byte (TCP passthrough, and a connection after
/// an HTTP Upgrade). Reads from one side only while the other can take the
/// writes, so a slow reader slows the writer instead of filling memory; a
/// half-close is passed on as a half-close.
final class GlueHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var partner: GlueHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    var onClose: (() -> Void)?
    /// Bytes read from this handler's channel (and written to the partner).
    private(set) var bytesRead = 0
    /// Called once, when both channels are closed, with each side's bytes.
    var onFinish: ((_ mine: Int, _ partners: Int) -> Void)?
    private var inactive = false
    /// This channel ended with an error (a reset, say), not a clean close.
    private var failed = false
    /// Set when the kernel may splice this direction past the proxy: each
    /// completed write to the partner is reported to it.
    var splice: SpliceLeg?

    /// Two handlers, one for each channel.
    static func pair() -> (GlueHandler, GlueHandler) {
        let a = GlueHandler(), b = GlueHandler()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // A channel that closed before its glue was in place told the
        // handlers it had then, not this one (NIO removes a closed
        // channel's handlers in a later task, and one added meanwhile
        // hears nothing more): end the pair now, or the other channel
        // would be held until its own peer closed.
        if !context.channel.isActive { return channelInactive(context: context) }
        if let partner, partner.inactive {
            return partner.failed ? context.close(promise: nil) : partnerClose()
        }
        // The partner may have been asked to read before this side was in
        // place (an HTTP/2 stream channel reads as soon as it has a
        // handler): it held the read for want of a writable partner; let it go.
        if let partner, partner.pendingRead, context.channel.isWritable { partner.partnerWritabilityChanged(true) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // Closed as its connect completed (the first write failed): never
        // told inactive (UpstreamHandler.handlerRemoved); end the pair now.
        if !inactive, !context.channel.isActive { channelInactive(context: context) }
        self.context = nil
        partner = nil
    }

    private var partnerWritable: Bool { partner?.context?.channel.isWritable ?? false }

    private func partnerFlush() { partner?.context?.flush() }

    private func partnerWritabilityChanged(_ writable: Bool) {
        if writable, pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    /// Passes a half-close on, after the bytes already written to this
    /// channel (WriteBarrier.swift).
    private func partnerCloseOutput() {
        guard let context else { return }
        context.closeOutputAfterWrites { ended in
            if !ended { context.close(promise: nil) }
        }
    }

    /// Closes this channel after the bytes already written to it, its
    /// output ended first (a tunnel stream's peer then sees END_STREAM, not
    /// only the reset a close of an open stream sends).
    private func partnerClose() {
        guard let context else { return }
        context.closeOutputAfterWrites { _ in context.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let count = Self.unwrapInboundIn(data).readableBytes
        bytesRead += count
        guard let partnerContext = partner?.context else { return }
        partnerContext.write(data, promise: splice?.reporting(count, on: context.eventLoop))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        partnerFlush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        inactive = true
        // Its 4-tuple may be reused from now on: no more reports under it.
        splice?.stop()
        partner?.splice?.stop()
        let partner = self.partner
        // A reset ends the partner at once; a clean end after its writes.
        if failed { partner?.context?.close(promise: nil) } else { partner?.partnerClose() }
        onClose?()
        onClose = nil
        finishIfBothClosed(partner)
        if let partner { partner.finishIfBothClosed(self) }
    }

    private func finishIfBothClosed(_ other: GlueHandler?) {
        guard inactive, other?.inactive ?? true, let done = onFinish else { return }
        onFinish = nil
        done(bytesRead, other?.bytesRead ?? 0)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e {
            partner?.partnerCloseOutput()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failed = true
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        partner?.partnerWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if partnerWritable {
            context.read()
        } else {
            pendingRead = true
        }
    }
}
