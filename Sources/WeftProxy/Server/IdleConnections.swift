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
/// behind it: GOAWAY (ENHANCE_YOUR_CALM) and the connection closes. And
/// stalled requests (MeshConfig `proxy.streamIdleTimeout`, five minutes by
/// default): a request in flight on which nothing moved that long is
/// answered 504 (408 while its request is still being read) or, once its
/// response began, cut (StallCount).
/// Nothing is timed per read: a sweep goes round the registry every
/// quarter of the shortest timeout (ConnectionRegistry.sweepIdle) and each
/// connection's handler counts the sweeps it sat through idle (IdleCount)
/// or stalled (StallCount, per request; an HTTP/2 connection passes the
/// sweep on to its stream channels, StreamChannels), or compares the
/// sweep's time with when its head began (HeadClock).
/// Opaque TCP streams and upgraded connections are not timed (the kernel
/// may move their bytes past the proxy, which would not see them; they get
/// TCP keepalive instead, OpaqueKeepalive), nor are the streams tunnels
/// from other nodes carry, but for the requests in those streams' HTTP
/// (the stream idle timeout: SweepToStreams). A tunnel from another node
/// is closed with no stream open for twice MeshConfig
/// `proxy.tunnelIdleTimeout` (IdleSweep.tunnelRounds: TunnelRelay,
/// InboundTunnelIdle), and with its TLS handshake not done within the
/// request-head timeout (HandshakeWatcher). Tunnels to other nodes have a
/// sweep of their own (TunnelPool, `proxy.tunnelIdleTimeout`).
struct IdleSweep: Sendable {
    /// Idle sweeps in a row after which a connection closes (Int.max: never).
    let rounds: Int
    /// When the sweep began.
    let now: NIODeadline
    /// How long a request head may take (nil: no limit).
    let headTimeout: TimeAmount?
    /// Sweeps in a row with nothing moved on a request after which it is
    /// ended (Int.max: never); and that timeout, for the answer.
    var streamRounds = Int.max
    var streamTimeout: TimeAmount?
    /// Sweeps in a row with no stream open after which a tunnel from
    /// another node is closed (Int.max: never): twice MeshConfig
    /// `proxy.tunnelIdleTimeout`, so that a Weft source, which closes an
    /// unused tunnel after one, always goes first (InboundTunnelIdle).
    var tunnelRounds = Int.max

    /// A timeout as the answers that name it write it (a Gateway API
    /// duration: "1m", "30s", "400ms").
    static func shown(_ t: TimeAmount) -> String {
        Duration.nanoseconds(t.nanoseconds).manifestText
    }
}

/// A connection's count of idle sweeps: reset by what it reads, a sweep
/// that finds it busy resets it too.
struct IdleCount {
    private var sweeps = 0

    mutating func reset() { sweeps = 0 }

    /// What the sweep finds: the connection idle for the timeout just now
    /// (`close`: closed once what was written is out, once), or still
    /// open a whole timeout after that (`overdue`: its client has read
    /// nothing of what is left, which would hold the connection and those
    /// bytes for as long as it stays; closed at once, once).
    enum Verdict {
        case stay, close, overdue
    }

    mutating func judge(_ sweep: IdleSweep, busy: Bool) -> Verdict { judge(rounds: sweep.rounds, busy: busy) }

    /// The same with another timeout's rounds (Int.max: never).
    mutating func judge(rounds: Int, busy: Bool) -> Verdict {
        if busy {
            sweeps = 0
            return .stay
        }
        sweeps += 1
        if sweeps == rounds { return .close }
        if rounds != .max && sweeps == 2 * rounds { return .overdue }
        return .stay
    }
}

/// A request in flight: the sweeps in a row through which nothing of it
/// moved (MeshConfig `proxy.streamIdleTimeout`, five minutes by default).
/// What moves it is a read of its backend's response and, while its
/// request is still being read, a read of that from the client; a client
/// that does not read the response stops the proxy reading the backend
/// (backpressure), so it stalls the request too. `moved` is one store, on
/// the reads that do it; the sweep counts.
struct StallCount {
    private var sweeps = 0

    @inline(__always)
    mutating func moved() { sweeps = 0 }

    /// Whether the request has now gone the timeout with nothing moved.
    mutating func stalled(_ sweep: IdleSweep) -> Bool {
        sweeps += 1
        return sweeps >= sweep.streamRounds
    }

    /// What ran out, for the proxy's answer (408 or 504) and its log.
    static func reason(_ sweep: IdleSweep) -> String {
        "weft: nothing moved on the request for \(IdleSweep.shown(sweep.streamTimeout ?? .zero)) (MeshConfig spec.proxy.streamIdleTimeout)"
    }

    static func body(_ sweep: IdleSweep) -> String { reason(sweep) + "\n" }
}

/// An HTTP/2 connection's stream channels (the full path's streams, each
/// with its HTTPProxyHandler): the sweep reaches the connection's pipeline
/// only, and its handler (ExpressHTTP2Handler, HTTP2ConnectionEnds) passes
/// it on to each, for the stream idle timeout. Used on the connection's
/// event loop only (NIOLoopBound where it is captured).
final class StreamChannels {
    private var channels: [ObjectIdentifier: any Channel] = [:]
    /// A stream the express path hands to the full path, while the
    /// multiplexer reads its HEADERS and sets up its channel: what was done
    /// for its request, for the stream's full path (`handed(to:)`).
    var handing: (id: HTTP2StreamID, handed: Express.Handed)?

    /// What the express path did for the request of `stream`, a stream
    /// channel being set up, if it handed it over (ExpressHTTP2Handler).
    func handed(to stream: any Channel) -> Express.Handed? {
        guard let handing, (try? stream.syncOptions?.getOption(HTTP2StreamChannelOptions.streamID)) == handing.id else { return nil }
        self.handing = nil
        return handing.handed
    }

    /// A stream channel set up; it leaves when it closes.
    static func add(_ stream: any Channel, to box: NIOLoopBound<StreamChannels>) {
        let id = ObjectIdentifier(stream)
        box.value.channels[id] = stream
        stream.closeFuture.whenComplete { _ in box.value.channels[id] = nil }
    }

    func sweep(_ sweep: IdleSweep) {
        guard sweep.streamRounds != .max, !channels.isEmpty else { return }
        for stream in channels.values { stream.pipeline.fireUserInboundEventTriggered(sweep) }
    }
}

/// At the end of a connection's pipeline whose own handlers are not timed
/// and whose streams are channels (a tunnel from another node; the h2c
/// connection a tunnel stream carries, InboundHTTP): the sweep goes on to
/// every stream channel added (`streams`, by the stream initializer), for the
/// requests they carry (MeshConfig `proxy.streamIdleTimeout`), and no
/// further. At the end, so that no read passes through it.
final class SweepToStreams: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Never

    /// The stream initializer adds each stream here (StreamChannels.add).
    let streams: NIOLoopBound<StreamChannels>

    init(loop: any EventLoop) { streams = NIOLoopBound(StreamChannels(), eventLoop: loop) }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let sweep = event as? IdleSweep { return streams.value.sweep(sweep) }
        context.fireUserInboundEventTriggered(event)
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

    /// After a read of an HTTP/2 connection (HTTP2Codec on the express
    /// path, HTTP2HeadWatch in front of NIOHTTP2Handler): the clock runs
    /// from the first read that left a header block partly read (a HEADERS
    /// frame cut short, a block continued, a frame header cut before its
    /// type, the client's preface) until one that ends it (a CONTINUATION
    /// that does not end its block does not stop it). `progressed`: a
    /// frame, or the preface, ended that left no block open; `blockOpen`:
    /// a block waits for its CONTINUATIONs; `leftover`: part of a frame or
    /// of the preface is held; `leftoverType`: that frame's type, if its
    /// header got so far. A DATA frame cut short is a body, not timed, and
    /// the other frames are not a head.
    @inline(__always)
    mutating func afterHTTP2Read(progressed: Bool, blockOpen: Bool, leftover: Bool, prefaceRead: Bool, leftoverType: UInt8?) {
        if progressed || (!blockOpen && !leftover) { stop() }
        guard blockOpen || leftover else { return }
        guard !blockOpen, prefaceRead, let type = leftoverType else { return started() }
        if type == 0x1 || type == 0x9 { started() } else { stop() }
    }

    /// What ran out: HTTP/2's GOAWAY carries it as debug data.
    static func reason(_ sweep: IdleSweep) -> String {
        "weft: the request head was not received whole within \(IdleSweep.shown(sweep.headTimeout ?? .zero)) (MeshConfig spec.proxy.requestHeaderTimeout)"
    }

    /// The 408 body.
    static func body(_ sweep: IdleSweep) -> String { reason(sweep) + "\n" }
}

extension ConnectionRegistry {
    /// The defaults when the route table says nothing (MeshConfig.Proxy).
    static let defaultIdleTimeoutMilliseconds = 3_600_000
    static let defaultHeadTimeoutMilliseconds = 60_000
    static let defaultStreamIdleTimeoutMilliseconds = 300_000
    static let defaultTunnelIdleTimeoutMilliseconds = 300_000
    static let defaultUpstreamIdleTimeoutMilliseconds = 3_000

    /// MeshConfig proxy.streamIdleTimeout in force with `table` (nil: never).
    static func streamIdleTimeout(_ table: ProxyTable) -> TimeAmount? {
        let ms = table.streamIdleTimeoutMilliseconds ?? defaultStreamIdleTimeoutMilliseconds
        return ms > 0 ? .milliseconds(Int64(ms)) : nil
    }

    /// Sends IdleSweep to every connection every quarter of the route
    /// table's shortest timeout (idle, request head, stream idle, tunnels
    /// from other nodes; 50 ms to
    /// 15 s), on `loop`, for good. It looks at the table at least each
    /// second, so a reload's new timeouts take effect within one. A
    /// connection closes between one and one and a quarter timeouts after
    /// it went idle (or its head began); a request ends so after the last
    /// byte moved on it.
    func sweepIdle(proxy: ProxyContext, on loop: any EventLoop, last: NIODeadline = .now()) {
        let table = proxy.snapshot.table
        let idle = table.idleTimeoutMilliseconds ?? Self.defaultIdleTimeoutMilliseconds
        let head = table.requestHeaderTimeoutMilliseconds ?? Self.defaultHeadTimeoutMilliseconds
        let stream = table.streamIdleTimeoutMilliseconds ?? Self.defaultStreamIdleTimeoutMilliseconds
        let tunnel = Self.inboundTunnelIdleTimeout(table)
        let shorter = [idle, head, stream, tunnel].filter { $0 > 0 }.min()
        let period = shorter.map(Self.period) ?? 1_000
        var last = last
        let now = NIODeadline.now()
        if shorter != nil, now - last >= .milliseconds(Int64(period)) {
            var sweep = IdleSweep(rounds: Self.rounds(idle, period), now: now,
                                  headTimeout: head > 0 ? .milliseconds(Int64(head)) : nil)
            if stream > 0 {
                sweep.streamRounds = Self.rounds(stream, period)
                sweep.streamTimeout = .milliseconds(Int64(stream))
            }
            sweep.tunnelRounds = Self.rounds(tunnel, period)
            for c in all { c.pipeline.fireUserInboundEventTriggered(sweep as any Sendable) }
            last = now
        }
        loop.scheduleTask(in: .milliseconds(Int64(min(period, 1_000)))) { [weak self, last] in
            self?.sweepIdle(proxy: proxy, on: loop, last: last)
        }
    }

    /// How long a tunnel from another node may go with no stream open
    /// before this node closes it, in milliseconds (0: never): twice the
    /// source's MeshConfig proxy.tunnelIdleTimeout.
    static func inboundTunnelIdleTimeout(_ table: ProxyTable) -> Int {
        2 * (table.tunnelIdleTimeoutMilliseconds ?? defaultTunnelIdleTimeoutMilliseconds)
    }

    /// How far apart sweeps for a timeout go, in milliseconds: a quarter
    /// of it, 50 ms to 15 s.
    static func period(_ timeout: Int) -> Int { min(max(timeout / 4, 50), 15_000) }

    /// Sweeps `period` apart that make up `timeout` (0: never), one more
    /// for the part of a period that had gone when the wait began.
    static func rounds(_ timeout: Int, _ period: Int) -> Int {
        timeout > 0 ? (timeout + period - 1) / period + 1 : .max
    }
}

/// On the full-path-only pipeline (`--no-express`), after NIOHTTP2Handler,
/// which tells it of streams as they open and close (`streamDelegate`: its
/// inline multiplexer passes no stream events up the pipeline). The
/// client's FIN ends the connection at once, as nginx and Go's server do
/// (NIOHTTP2Handler does nothing with it, and the connection would be held
/// open for good; Weft's own codec answers what is in flight first,
/// HTTP2Codec.userInboundEventTriggered); an idle one (no stream open
/// through the sweeps) is sent GOAWAY and closed, and so is one whose
/// header block HTTP2HeadWatch found late.
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
    /// Every stream's channel, which the sweep is passed on to.
    private let streamChannels: StreamChannels

    init(proxy: ProxyContext, loop: any EventLoop, streamChannels: StreamChannels) {
        self.proxy = proxy
        self.loop = loop
        self.streamChannels = streamChannels
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
            streamChannels.sweep(sweep)
            switch idle.judge(sweep, busy: open > 0) {
            case .close where !closing:
                proxy.stats.idleClosed.add(1, ordering: .relaxed)
                goAway(.noError, debug: nil, context: context)
            case .overdue:
                context.close(promise: nil)
            case .close, .stay:
                break
            }
        case let late as HTTP2HeadWatch.Late:
            // A header block begun a request-head timeout ago and not whole:
            // what is in flight is cut (the client's later frames are stuck
            // behind the block), as on the express path.
            if !closing {
                proxy.stats.headTimeouts.add(1, ordering: .relaxed)
                goAway(.enhanceYourCalm, debug: late.reason, context: context)
            }
        default:
            context.fireUserInboundEventTriggered(event)
        }
    }

    /// GOAWAY naming the last stream opened, then the close once it is written.
    private func goAway(_ code: HTTP2ErrorCode, debug: String?, context: ChannelHandlerContext) {
        closing = true
        let data = debug.map { context.channel.allocator.buffer(string: $0) }
        let goAway = HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: lastStreamID, errorCode: code, opaqueData: data))
        context.writeAndFlush(wrapOutboundOut(goAway)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }
}

/// Follows HTTP/2 frames through a connection's bytes one way as they
/// pass, without holding any: the client's 24-byte preface first
/// (`preface`), then each frame's 9-byte header and its payload, told of
/// each frame as its last byte passes. For handlers beside NIOHTTP2Handler
/// that must know of frames it says nothing of (HTTP2HeadWatch: a header
/// block cut short; GoAwaySentCloses: a GOAWAY it wrote).
struct HTTP2FrameWalk {
    /// Bytes of the client's preface still to come.
    private(set) var prefaceLeft: Int
    /// Bytes of the current frame's header read (0 to 9), and its first
    /// five (length, type, flags) as they came, last in the low byte.
    private var headerRead = 0
    private var header: UInt64 = 0
    /// Payload bytes of the current frame still to come.
    private var payloadLeft = 0
    /// The preface's last byte passed in the last walk.
    private(set) var prefaceEnded = false

    init(preface: Bool) { prefaceLeft = preface ? 24 : 0 }

    /// Walks one read's (or write's) bytes; `frameEnded(type, flags)` for
    /// each frame whose last byte is among them. Whether any of those
    /// calls returned true.
    mutating func walk(_ bytes: ByteBufferView, frameEnded: (_ type: UInt8, _ flags: UInt8) -> Bool) -> Bool {
        var i = bytes.startIndex
        var any = false
        prefaceEnded = false
        if prefaceLeft > 0 {
            let n = min(prefaceLeft, bytes.count)
            prefaceLeft -= n
            i += n
            prefaceEnded = prefaceLeft == 0
        }
        while i < bytes.endIndex {
            if headerRead < 9 {
                if headerRead < 5 { header = header << 8 | UInt64(bytes[i]) }
                headerRead += 1
                i += 1
                if headerRead == 9 {
                    payloadLeft = Int(header >> 16)
                    if payloadLeft == 0 { any = ended(frameEnded) || any }
                }
                continue
            }
            let n = min(payloadLeft, bytes.endIndex - i)
            payloadLeft -= n
            i += n
            if payloadLeft == 0 { any = ended(frameEnded) || any }
        }
        return any
    }

    private mutating func ended(_ frameEnded: (UInt8, UInt8) -> Bool) -> Bool {
        let type = UInt8(truncatingIfNeeded: header >> 8), flags = UInt8(truncatingIfNeeded: header)
        headerRead = 0
        header = 0
        return frameEnded(type, flags)
    }

    /// Part of a frame, or of the preface, has passed and the rest not.
    var leftover: Bool { prefaceLeft > 0 || headerRead > 0 }

    /// The type of the frame part-passed, if its header got so far.
    var leftoverType: UInt8? {
        headerRead >= 5 ? UInt8(truncatingIfNeeded: header >> 8) : headerRead == 4 ? UInt8(truncatingIfNeeded: header) : nil
    }
}

/// On the full-path-only pipeline (`--no-express`), in front of
/// NIOHTTP2Handler: MeshConfig `proxy.requestHeaderTimeout` for HTTP/2
/// header blocks, which HTTP2Codec keeps on the express path
/// (NIOHTTP2Handler holds a block cut short and says nothing of it). It
/// follows the frames' 9-byte headers through the bytes as they pass, each
/// read passed on as it came, and runs the same clock
/// (`HeadClock.afterHTTP2Read`); when a sweep finds the block late it sends
/// `Late` up in the sweep's place, and HTTP2ConnectionEnds sends GOAWAY
/// (ENHANCE_YOUR_CALM, the reason as debug data) and closes.
final class HTTP2HeadWatch: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    /// In place of the IdleSweep that found the header block late.
    struct Late: Sendable {
        let reason: String
    }

    /// The frames, from the client's preface on.
    private var frames = HTTP2FrameWalk(preface: true)
    /// A HEADERS frame's block waits for CONTINUATIONs.
    private var blockOpen = false
    private(set) var clock = HeadClock()
    private var late = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        follow(unwrapInboundIn(data).readableBytesView)
        context.fireChannelRead(data)
    }

    /// Follows the frames through one read's bytes, then clocks the head.
    func follow(_ bytes: ByteBufferView) {
        var progressed = frames.walk(bytes) { type, flags in
            if type == 0x1 || type == 0x9 { blockOpen = flags & 0x4 == 0 }  // END_HEADERS
            return !blockOpen
        }
        if frames.prefaceEnded { progressed = true }
        clock.afterHTTP2Read(progressed: progressed, blockOpen: blockOpen, leftover: frames.leftover,
                             prefaceRead: frames.prefaceLeft == 0, leftoverType: frames.leftoverType)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let sweep = event as? IdleSweep, !late, clock.expired(sweep) {
            late = true
            clock.stop()
            context.fireUserInboundEventTriggered(Late(reason: HeadClock.reason(sweep)))
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// MeshConfig `proxy.tcpKeepalive` on the sockets of an opaque stream (TCP
/// passthrough, a connection after an HTTP Upgrade): an opaque stream has
/// no idle timeout, and one whose peer vanished without a FIN (its pod's
/// network gone) would hold both connections for good. The kernel probes
/// a socket silent for `time`, then every `interval`, and after `probes`
/// unanswered ends it with ETIMEDOUT, which closes its partner too
/// (GlueHandler). Set when the stream is joined; a tunnel stream is no
/// socket and is left as it is, but the tunnel's own socket gets it at
/// both ends when the tunnel is made (`tunnel`: TunnelConnection,
/// TunnelServer): a node gone without a FIN ends the tunnel, and so every
/// stream in it.
enum OpaqueKeepalive {
    static let defaults = ProxyTable.TCPKeepaliveSettings(MeshConfig.TCPKeepalive())

    static func apply(to channels: [any Channel], _ settings: ProxyTable.TCPKeepaliveSettings?) {
        let k = settings ?? defaults
        guard k.time > 0 else { return }
        let tcp = SocketOptionLevel(IPPROTO_TCP)
        for channel in channels where channel is any SocketOptionProvider {
            // On the channel's loop (a joined stream's two sockets are):
            // set at once, with no future and callback made per option.
            if channel.eventLoop.inEventLoop, let sync = channel.syncOptions {
                try? sync.setOption(ChannelOptions.socketOption(.so_keepalive), value: 1)
                try? sync.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPIDLE)), value: SocketOptionValue(k.time))
                try? sync.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPINTVL)), value: SocketOptionValue(k.interval))
                try? sync.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPCNT)), value: SocketOptionValue(k.probes))
                continue
            }
            channel.setOption(ChannelOptions.socketOption(.so_keepalive), value: 1).whenFailure { _ in }
            channel.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPIDLE)), value: SocketOptionValue(k.time)).whenFailure { _ in }
            channel.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPINTVL)), value: SocketOptionValue(k.interval)).whenFailure { _ in }
            channel.setOption(ChannelOptions.socket(tcp, SocketOptionName(TCP_KEEPCNT)), value: SocketOptionValue(k.probes)).whenFailure { _ in }
        }
    }

    /// A tunnel's socket: the keepalive above, and TCP_USER_TIMEOUT at the
    /// same deadline (`time` + `interval` x `probes`), as gRPC pairs them.
    /// Keepalive probes only a silent socket: one with bytes in flight when
    /// its peer vanished (a window update, a PING, a stream's data) is
    /// retransmitted instead, for some fifteen minutes before the kernel
    /// gives up; the user timeout ends it at the deadline all the same. Not
    /// on pods' sockets: a pod may keep its receive window shut for as long
    /// as it likes, which the user timeout would take for a dead peer; the
    /// far proxy always reads its tunnel.
    static func tunnel(_ channel: any Channel, _ settings: ProxyTable.TCPKeepaliveSettings?) {
        let k = settings ?? defaults
        guard k.time > 0, channel is any SocketOptionProvider else { return }
        apply(to: [channel], k)
        let deadline = (k.time + k.interval * k.probes) * 1000
        channel.setOption(ChannelOptions.socket(SocketOptionLevel(IPPROTO_TCP), SocketOptionName(TCP_USER_TIMEOUT)),
                          value: SocketOptionValue(deadline)).whenFailure { _ in }
    }
}

/// A pool's sweep of what it keeps for later use (TunnelPool's tunnels,
/// UpstreamPool's idle connections), as ConnectionRegistry.sweepIdle sweeps
/// client connections: every quarter of the timeout (50 ms to 15 s), while
/// the pool keeps anything, each kept thing counting the sweeps it sat
/// through unused, so that it goes between one and one and a quarter
/// timeouts after its last use. No timer per thing kept, none while the
/// pool keeps nothing (`start` when it keeps something again); the timeout
/// is read each second, so a reload's takes effect within one.
/// Loop-confined, like its pool.
final class KeptSweep {
    private let loop: any EventLoop
    /// The timeout in force, in milliseconds (0: never).
    private var timeout: () -> Int = { 0 }
    /// Whether the pool keeps anything now.
    private var keeps: () -> Bool = { false }
    /// One sweep, with the rounds of `timeout`.
    private var sweep: (IdleSweep) -> Void = { _ in }
    /// Whether sweeps are scheduled.
    private(set) var running = false
    private var last = NIODeadline.now()

    init(loop: any EventLoop) { self.loop = loop }

    /// What it sweeps (set once, by the pool's init).
    func bind(timeout: @escaping () -> Int, keeps: @escaping () -> Bool, sweep: @escaping (IdleSweep) -> Void) {
        self.timeout = timeout
        self.keeps = keeps
        self.sweep = sweep
    }

    /// The pool keeps something: sweeps from now on, if not already (the
    /// pool checks `running` first, inline, where it keeps per request).
    func start() {
        guard !running else { return }
        running = true
        last = .now()
        schedule(timeout())
    }

    private func tick() {
        guard keeps() else {
            running = false
            return
        }
        let t = timeout()
        let period = ConnectionRegistry.period(t)
        let now = NIODeadline.now()
        if t > 0, now - last >= .milliseconds(Int64(period)) {
            sweep(IdleSweep(rounds: ConnectionRegistry.rounds(t, period), now: now, headTimeout: nil))
            last = now
        }
        schedule(t)
    }

    /// The next look: a sweep's period away, or a second at most.
    private func schedule(_ t: Int) {
        let next = t > 0 ? min(ConnectionRegistry.period(t), 1_000) : 1_000
        loop.assumeIsolated().scheduleTask(in: .milliseconds(Int64(next))) { [weak self] in self?.tick() }
    }
}
