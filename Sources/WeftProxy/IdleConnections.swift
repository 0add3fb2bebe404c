import NIOCore
import NIOHTTP2

/// Idle client connections (MeshConfig `proxy.idleTimeout`, an hour by
/// default): an HTTP connection with no request in flight that has read
/// nothing for that long is closed, HTTP/1.1 once its last response is
/// out, HTTP/2 with GOAWAY. Nothing is timed per read: a sweep goes round
/// the registry every quarter of the timeout (ConnectionRegistry.sweepIdle)
/// and each connection's handler counts the sweeps it sat through idle
/// (IdleCount). Opaque TCP streams and upgraded connections are not timed
/// (the kernel may move their bytes past the proxy, which would not see
/// them), nor are tunnels from other nodes.
struct IdleSweep: Sendable {
    /// Idle sweeps in a row after which a connection closes.
    let rounds: Int
}

/// A connection's count of idle sweeps: reset by what it reads, a sweep
/// that finds it busy resets it too.
struct IdleCount {
    private var sweeps = 0

    mutating func reset() { sweeps = 0 }

    /// Whether the connection has now been idle for the timeout.
    mutating func expired(_ sweep: IdleSweep, busy: Bool) -> Bool {
        if busy {
            sweeps = 0
            return false
        }
        sweeps += 1
        return sweeps >= sweep.rounds
    }
}

extension ConnectionRegistry {
    /// The default when the route table says nothing (MeshConfig.Proxy).
    static let defaultIdleTimeoutMilliseconds = 3_600_000

    /// Sends IdleSweep to every connection every quarter of the route
    /// table's idle timeout (50 ms to 15 s), on `loop`, for good. It looks
    /// at the table at least each second, so a reload's new timeout takes
    /// effect within one. A connection closes between one and one and a
    /// quarter timeouts after it went idle.
    func sweepIdle(proxy: ProxyContext, on loop: any EventLoop, last: NIODeadline = .now()) {
        let timeout = proxy.snapshot.table.idleTimeoutMilliseconds ?? Self.defaultIdleTimeoutMilliseconds
        let period = timeout > 0 ? min(max(timeout / 4, 50), 15_000) : 1_000
        var last = last
        let now = NIODeadline.now()
        if timeout > 0, now - last >= .milliseconds(Int64(period)) {
            let sweep = IdleSweep(rounds: (timeout + period - 1) / period + 1)
            for c in all { c.pipeline.fireUserInboundEventTriggered(sweep as any Sendable) }
            last = now
        }
        loop.scheduleTask(in: .milliseconds(Int64(min(period, 1_000)))) { [weak self, last] in
            self?.sweepIdle(proxy: proxy, on: loop, last: last)
        }
    }
}

/// On the full-path-only pipeline (`--no-express`), after NIOHTTP2Handler,
/// which tells it of streams as they open and close (`streamDelegate`: its
/// inline multiplexer passes no stream events up the pipeline). The
/// client's FIN ends the connection at once, as nginx and Go's server do
/// (NIOHTTP2Handler does nothing with it, and the connection would be held
/// open for good; Weft's own codec answers what is in flight first,
/// HTTP2Codec.userInboundEventTriggered); an idle one (no stream open
/// through the sweeps) is sent GOAWAY and closed.
final class HTTP2ConnectionEnds: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    private let proxy: ProxyContext
    private let loop: any EventLoop
    private var open = 0
    private var lastStreamID = HTTP2StreamID.rootStream
    private var idle = IdleCount()
    private var closing = false

    init(proxy: ProxyContext, loop: any EventLoop) {
        self.proxy = proxy
        self.loop = loop
    }

    /// For NIOHTTP2Handler (configureHTTP2Pipeline's `streamDelegate`); it
    /// calls on the connection's loop.
    var streamDelegate: Delegate { Delegate(handler: NIOLoopBound(self, eventLoop: loop)) }

    struct Delegate: NIOHTTP2StreamDelegate {
        let handler: NIOLoopBound<HTTP2ConnectionEnds>

        func streamCreated(_ id: HTTP2StreamID, channel: any Channel) {
            let h = handler.value
            h.open += 1
            if id > h.lastStreamID { h.lastStreamID = id }
            h.idle.reset()
        }

        func streamClosed(_ id: HTTP2StreamID, channel: any Channel) { handler.value.open -= 1 }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case let e as ChannelEvent where e == .inputClosed:
            context.close(promise: nil)
        case let sweep as IdleSweep:
            if !closing, idle.expired(sweep, busy: open > 0) {
                closing = true
                proxy.stats.idleClosed.add(1, ordering: .relaxed)
                let goAway = HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: lastStreamID, errorCode: .noError, opaqueData: nil))
                context.writeAndFlush(wrapOutboundOut(goAway)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            }
        default:
            context.fireUserInboundEventTriggered(event)
        }
    }
}
