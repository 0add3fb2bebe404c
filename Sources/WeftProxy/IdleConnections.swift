import Glibc
import NIOCore
import NIOHTTP2
import WeftCore

/// Idle client connections (MeshConfig `proxy.idleTimeout`, an hour by
/// default): an HTTP connection with no request in flight that has read
/// nothing for that long is closed, HTTP/1.1 once its last response is
/// out, HTTP/2 with GOAWAY. And slow request heads (MeshConfig
/// `proxy.requestHeaderTimeout`, a minute by default): an HTTP/1.1 request
/// head still not whole that long after its first byte is answered 408 and
/// the connection closed; a client trickling a head never looks idle. An
/// HTTP/2 header block so late (HTTP2Codec.headClock) holds up every frame
/// behind it: GOAWAY (ENHANCE_YOUR_CALM) and the connection closes.
/// Nothing is timed per read: a sweep goes round the registry every
/// quarter of the shorter timeout (ConnectionRegistry.sweepIdle) and each
/// connection's handler counts the sweeps it sat through idle (IdleCount)
/// or compares the sweep's time with when its head began (HeadClock).
/// Opaque TCP streams and upgraded connections are not timed (the kernel
/// may move their bytes past the proxy, which would not see them; they get
/// TCP keepalive instead, OpaqueKeepalive), nor are tunnels from other nodes.
struct IdleSweep: Sendable {
    /// Idle sweeps in a row after which a connection closes (Int.max: never).
    let rounds: Int
    /// When the sweep began.
    let now: NIODeadline
    /// How long a request head may take (nil: no limit).
    let headTimeout: TimeAmount?
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

/// When the request head a connection waits on began to arrive: started
/// by a read that leaves a head partly read (off the hot path: a head
/// read whole in one read never starts it), stopped when the head is whole.
struct HeadClock {
    private(set) var since: NIODeadline?

    /// Part of a head is read; the clock runs from the first such read.
    mutating func started() {
        if since == nil { since = .now() }
    }

    mutating func stop() { since = nil }

    /// Whether the head has now taken longer than the sweep allows.
    func expired(_ sweep: IdleSweep) -> Bool {
        guard let since, let limit = sweep.headTimeout else { return false }
        return sweep.now - since >= limit
    }

    /// What ran out: HTTP/2's GOAWAY carries it as debug data.
    static func reason(_ sweep: IdleSweep) -> String {
        let ms = (sweep.headTimeout ?? .zero).nanoseconds / 1_000_000
        let limit = ms % 1000 == 0 ? "\(ms / 1000)s" : "\(ms)ms"
        return "weft: the request head was not received whole within \(limit) (MeshConfig spec.proxy.requestHeaderTimeout)"
    }

    /// The 408 body.
    static func body(_ sweep: IdleSweep) -> String { reason(sweep) + "\n" }
}

extension ConnectionRegistry {
    /// The defaults when the route table says nothing (MeshConfig.Proxy).
    static let defaultIdleTimeoutMilliseconds = 3_600_000
    static let defaultHeadTimeoutMilliseconds = 60_000

    /// Sends IdleSweep to every connection every quarter of the route
    /// table's shorter timeout (idle, request head; 50 ms to 15 s), on
    /// `loop`, for good. It looks at the table at least each second, so a
    /// reload's new timeouts take effect within one. A connection closes
    /// between one and one and a quarter timeouts after it went idle (or
    /// its head began).
    func sweepIdle(proxy: ProxyContext, on loop: any EventLoop, last: NIODeadline = .now()) {
        let table = proxy.snapshot.table
        let idle = table.idleTimeoutMilliseconds ?? Self.defaultIdleTimeoutMilliseconds
        let head = table.requestHeaderTimeoutMilliseconds ?? Self.defaultHeadTimeoutMilliseconds
        let shorter = [idle, head].filter { $0 > 0 }.min()
        let period = shorter.map { min(max($0 / 4, 50), 15_000) } ?? 1_000
        var last = last
        let now = NIODeadline.now()
        if shorter != nil, now - last >= .milliseconds(Int64(period)) {
            let sweep = IdleSweep(rounds: idle > 0 ? (idle + period - 1) / period + 1 : .max, now: now,
                                  headTimeout: head > 0 ? .milliseconds(Int64(head)) : nil)
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

/// MeshConfig `proxy.tcpKeepalive` on the sockets of an opaque stream (TCP
/// passthrough, a connection after an HTTP Upgrade): an opaque stream has
/// no idle timeout, and one whose peer vanished without a FIN (its pod's
/// network gone) would hold both connections for good. The kernel probes
/// a socket silent for `time`, then every `interval`, and after `probes`
/// unanswered ends it with ETIMEDOUT, which closes its partner too
/// (GlueHandler). Set when the stream is joined; a tunnel stream is no
/// socket and is left as it is.
enum OpaqueKeepalive {
    static let defaults = ProxyTable.TCPKeepaliveSettings(MeshConfig.TCPKeepalive())

    static func apply(to channels: [any Channel], _ settings: ProxyTable.TCPKeepaliveSettings?) {
        let k = settings ?? defaults
        guard k.time > 0 else { return }
        let tcp = SocketOptionLevel(IPPROTO_TCP)
        for channel in channels where channel is any SocketOptionProvider {
            channel.setOption(ChannelOptions.socketOption(.so_keepalive), value: 1).whenFailure { _ in }
            channel.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPIDLE)), value: SocketOptionValue(k.time)).whenFailure { _ in }
            channel.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPINTVL)), value: SocketOptionValue(k.interval)).whenFailure { _ in }
            channel.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPCNT)), value: SocketOptionValue(k.probes)).whenFailure { _ in }
        }
    }
}
