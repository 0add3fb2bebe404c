import NIOCore

/// In front of an upstream connection's response decoder while it leaves
/// after a 101 (Upgrade.afterResponseEnd): holds back the backend's close,
/// on which NIO's decoder would drop the bytes it still holds (its
/// decodeLast forwards left-over bytes only when it has seen no EOF), and
/// lets it through once the decoder has handed them on (open).
final class EOFGate: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private var inactive = false
    private var inputClosed = false

    func channelInactive(context: ChannelHandlerContext) { inactive = true }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e { inputClosed = true } else { context.fireUserInboundEventTriggered(event) }
    }

    /// Passes on what was held back and leaves `channel`'s pipeline, if
    /// there is a gate in it.
    static func open(on channel: any Channel) {
        let ops = channel.pipeline.syncOperations
        guard let gate = try? ops.handler(type: EOFGate.self), let context = try? ops.context(handler: gate) else { return }
        if gate.inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        if gate.inactive { context.fireChannelInactive() }
        ops.removeHandler(context: context, promise: nil)
    }
}
