import NIOCore
import WeftCore
import WeftKernel

/// The first handler of every captured connection: looks at the client's
/// first bytes and sets the pipeline up for what it sees.
///   - the HTTP/2 connection preface: HTTP/2 with prior knowledge (h2c);
///   - a request line (`METHOD SP`): HTTP/1.x;
///   - anything else, or nothing within `detectTimeout` (a protocol where
///     the server speaks first): opaque TCP to a backend of the Service.
/// Linkerd does the same; the timeout is what a server-first protocol pays
/// once per connection.
///
/// On a TLSRoute's port it waits for the TLS ClientHello instead and
/// passes the connection, ClientHello first, to a backend of the route its
/// server name matches (`routeBySNI`); a connection that sends anything
/// else, names no route's host, or sends nothing within `detectTimeout`
/// is closed. A client whose namespace has consumer TLSRoutes of the port
/// is routed by those; one that no TLSRoute routes (the port has only
/// other namespaces' consumer routes) goes to the Service itself as opaque
/// TCP, at once, as the kernel would have sent it.
final class ProtocolDetector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    enum Verdict: Equatable { case http1, http2, tcp, undecided }

    private let proxy: ProxyContext
    private let origin: CapturedOrigin
    private var buffered: ByteBuffer?
    /// The detect timeout: this connection's place in its loop's
    /// DetectWatch (no timer of its own).
    private var ticket: DetectWatch.Ticket?
    /// Set while the timeout runs, for it.
    private var timedContext: ChannelHandlerContext?
    private var decided = false
    /// The client shut its side (FIN) before the verdict: passed on once the
    /// pipeline behind is set up (connections allow half-closure, so a
    /// request-then-FIN client or a TCP stream's half-close works).
    private(set) var inputClosed = false
    /// The proxy began to drain before the verdict: the handler set up for
    /// the connection is told once it has the bytes (it answers what they
    /// ask and then closes), instead of never.
    private var quiesced = false
    /// The port has TLSRoutes: the ClientHello's server name routes it.
    private var sniRouted = false
    /// The port has TLSRoutes, none of them this client's: opaque TCP to
    /// the Service, decided once the connection is active.
    private var opaque = false

    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    init(proxy: ProxyContext, origin: CapturedOrigin) {
        self.proxy = proxy
        self.origin = origin
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // Sent here only to cross nodes in a tunnel (an L4 connection the
        // kernel already balanced): bytes pass as they are, whatever they
        // are, from when the connection is active (see channelActive).
        if origin.tunnel { return }
        let snapshot = proxy.snapshot
        sniRouted = !snapshot.tlsRouted.isEmpty && snapshot.tlsRouted.contains(RouteSnapshot.sniKey(origin.vip.value, origin.port))
        if sniRouted, snapshot.tlsFrontend("\(origin.vip):\(origin.port)", source: origin.source)?.sni?.isEmpty ?? false {
            sniRouted = false
            opaque = true
            return
        }
        timedContext = context
        ticket = proxy.loop(context.eventLoop).detectWatch.watch(self, on: context.eventLoop,
                                                                 timeout: .init(proxy.configuration.detectTimeout))
    }

    /// Out of the pipeline (decided, or the channel torn down before it
    /// was ever active): the timeout, which holds this handler, goes too.
    func handlerRemoved(context: ChannelHandlerContext) {
        stopTimer()
    }

    /// Nothing decided within the detect timeout (DetectWatch).
    fileprivate func timedOut() {
        ticket = nil
        guard let context = timedContext else { return }
        timedContext = nil
        if sniRouted { return refuse("no ClientHello in time", context: context) }
        decide(.tcp, context: context)
    }

    /// Stops the detect timeout: decided, refused or closed.
    private func stopTimer() {
        ticket?.detector = nil
        ticket = nil
        timedContext = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffered == nil {
            buffered = incoming
        } else {
            buffered!.writeBuffer(&incoming)
        }
        if sniRouted { return routeBySNI(context: context, final: false) }
        let verdict = Self.classify(buffered!.readableBytesView)
        if verdict != .undecided { decide(verdict, context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        // Not before: joining the connection to a tunnel stream that is
        // already open would otherwise happen before the channel is registered.
        if origin.tunnel || opaque { decide(.tcp, context: context) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        stopTimer()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e, decided {
            // Passthrough is connecting to the backend: it passes the FIN on
            // once joined (this handler leaves the pipeline then).
            inputClosed = true
            return
        }
        if let e = event as? ChannelEvent, case .inputClosed = e, !decided, sniRouted {
            inputClosed = true
            return routeBySNI(context: context, final: true)
        }
        if let e = event as? ChannelEvent, case .inputClosed = e, !decided {
            inputClosed = true
            // Nothing said at all: nothing to proxy.
            guard let buffered, buffered.readableBytes > 0 else {
                context.close(promise: nil)
                return
            }
            let verdict = Self.classify(buffered.readableBytesView)
            decide(verdict == .undecided ? .tcp : verdict, context: context)
            return
        }
        if event is ChannelShouldQuiesceEvent, !decided {
            quiesced = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// What the bytes so far say.
    static func classify(_ bytes: ByteBufferView) -> Verdict {
        let n = min(bytes.count, preface.count)
        if bytes.prefix(n).elementsEqual(preface.prefix(n)) {
            return n == preface.count ? .http2 : .undecided
        }
        // A request line: 1-16 token characters (uppercase letters in every
        // registered method) and a space.
        var i = 0
        for b in bytes {
            if b == UInt8(ascii: " ") { return i > 0 ? .http1 : .tcp }
            guard (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z")) || b == UInt8(ascii: "-"), i < 16 else { return .tcp }
            i += 1
        }
        return .undecided
    }

    private func decide(_ verdict: Verdict, context: ChannelHandlerContext) {
        guard !decided else { return }
        decided = true
        stopTimer()
        let pipeline = context.pipeline.syncOperations
        // (Looked up once: the express handler keeps it.)
        let express = verdict == .http1 && proxy.configuration.express
            ? Express.Routing.current(nil, frontendKey: "\(origin.vip):\(origin.port)", source: origin.source,
                                      loop: proxy.loop(context.eventLoop), proxy: proxy)
            : nil
        do {
            switch (verdict, express) {
            case (.http1, let routing?) where routing.serves:
                // (It counts what it reads, and puts a tally in front of
                // the full path if it hands the connection over.)
                try pipeline.addHandler(ExpressHTTP1Handler(proxy: proxy, origin: origin, routing: routing))
            case (.http1, _):
                // An HTTP/1 connection from a pod may be upgraded
                // (WebSocket) and then spliced past the proxy: its bytes
                // are counted from here (the detector's go on through it).
                if let tally = ReadTally.spliceable(origin, proxy: proxy) { try pipeline.addHandler(tally) }
                // Pipelining is handled by HTTPProxyHandler itself.
                let handler = HTTPProxyHandler(proxy: proxy, origin: origin, isHTTP2: false)
                handler.onUpgrade = Upgrade.splice
                handler.acceptsH2CUpgrade = true
                try HTTP1ServerPipeline.add(to: pipeline, proxy: proxy, then: handler)
            case (.http2, _):
                try HTTP2ServerPipeline.add(to: pipeline, channel: context.channel, proxy: proxy, origin: origin)
            case (.tcp, _), (.undecided, _):
                proxy.stats.tcpPassthrough.add(1, ordering: .relaxed)
                TCPPassthrough.start(context: context, proxy: proxy, origin: origin)
            }
        } catch {
            proxy.logger.warning("cannot set up \(verdict) pipeline: \(error)")
            context.close(promise: nil)
            return
        }
        if let buffered, buffered.readableBytes > 0, verdict != .tcp {
            context.fireChannelRead(wrapInboundOut(buffered))
            self.buffered = nil
            context.fireChannelReadComplete()
        }
        if inputClosed, verdict != .tcp {
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        }
        // (Opaque TCP has no point at which to stop: it runs until it ends
        // or the drain times out, as when the verdict came first.)
        if quiesced, verdict != .tcp {
            context.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        if verdict != .tcp {
            pipeline.removeHandler(context: context, promise: nil)
        }
    }

    /// A TLSRoute's port: once the ClientHello is whole, its server name
    /// picks the route (ProxyTable.SNIMatch), the route's weights a
    /// backendRef among those with a ready backend, and the connection
    /// goes there as opaque TCP, the ClientHello first. `final`: no more
    /// bytes will come.
    private func routeBySNI(context: ChannelHandlerContext, final: Bool) {
        guard !decided, let bytes = buffered?.readableBytesView else {
            if final, !decided { refuse("closed before a ClientHello", context: context) }
            return
        }
        let name: String?
        switch ClientHello.read(bytes) {
        case .more:
            if final || bytes.count > ClientHello.maxHandshake + 1024 {
                refuse("closed before a whole ClientHello", context: context)
            }
            return
        case .notTLS:
            return refuse("not a TLS ClientHello", context: context)
        case .serverName(let sent):
            name = sent
        }
        let snapshot = proxy.snapshot
        let frontend = snapshot.tlsFrontend("\(origin.vip):\(origin.port)", source: origin.source)
        guard let frontend, let action = frontend.sniAction(name) else {
            return refuse("server name \(name ?? "(none)") matches no TLSRoute", context: context)
        }
        let ready = action.backends.filter { !(snapshot.endpoints[$0.cluster]?.isEmpty ?? true) }
        let loop = proxy.loop(context.eventLoop)
        guard let chosen = HTTPProxyHandler.pickCluster(ready, using: &loop.random) else {
            return refuse("TLSRoute \(action.name) has no ready backend", context: context)
        }
        decided = true
        stopTimer()
        proxy.stats.tlsRouted.add(1, ordering: .relaxed)
        TCPPassthrough.start(context: context, proxy: proxy, origin: origin,
                             tls: .init(serverName: name, route: action.name, cluster: chosen.cluster))
    }

    private func refuse(_ reason: String, context: ChannelHandlerContext) {
        guard !decided else { return }
        decided = true
        stopTimer()
        buffered = nil
        proxy.stats.tlsRefused.add(1, ordering: .relaxed)
        proxy.logger.debug("TLS connection closed", metadata: ["to": "\(origin.vip):\(origin.port)", "reason": "\(reason)"])
        context.close(promise: nil)
    }

    /// Bytes read before passthrough was decided, for TCPPassthrough to send first.
    func takeBuffered() -> ByteBuffer? {
        defer { buffered = nil }
        return buffered
    }
}

/// The detect timeouts of one event loop's connections still being
/// detected, with one timer for them all, where a timer for each connection
/// (scheduled, then cancelled at the verdict, nearly always within a
/// millisecond) cost about 5,700 instructions of the 132,000 a new
/// connection took. Every connection has the same timeout, so their
/// deadlines come in the order they began: a queue, whose head the timer
/// waits for. The timer goes off up to `slack` after a deadline, so that
/// one firing ends every timeout due by then (a connection that sends
/// nothing waits 500 to 550 ms by default, not exactly 500). A connection
/// decided, refused or closed before its deadline leaves its ticket empty
/// in the queue (a few dozen bytes, until the deadline passes).
final class DetectWatch {
    final class Ticket {
        /// nil once the connection stopped waiting.
        var detector: ProtocolDetector?
        let deadline: NIODeadline
        init(_ detector: ProtocolDetector, deadline: NIODeadline) {
            self.detector = detector
            self.deadline = deadline
        }
    }

    static let slack = TimeAmount.milliseconds(50)
    /// Tickets from `head` on are waiting; those before it are done.
    private var queue: [Ticket] = []
    private var head = 0
    private var armed = false

    /// `detector` (on `loop`, this watch's) is told `timedOut()` once
    /// `timeout` has passed, unless it empties its ticket first.
    func watch(_ detector: ProtocolDetector, on loop: any EventLoop, timeout: TimeAmount) -> Ticket {
        let ticket = Ticket(detector, deadline: .now() + timeout)
        queue.append(ticket)
        if !armed { arm(loop, for: ticket.deadline) }
        return ticket
    }

    private func arm(_ loop: any EventLoop, for deadline: NIODeadline) {
        armed = true
        loop.assumeIsolated().scheduleTask(deadline: deadline + Self.slack) { self.fire(loop) }
    }

    private func fire(_ loop: any EventLoop) {
        // (`armed` stays set until the end: a watch() from a timeout's own
        // work adds its ticket and arms nothing.)
        let now = NIODeadline.now()
        while head < queue.count, queue[head].deadline <= now {
            let ticket = queue[head]
            head += 1
            if let detector = ticket.detector {
                ticket.detector = nil
                detector.timedOut()
            }
        }
        if head >= 256, head * 2 >= queue.count {
            queue.removeFirst(head)
            head = 0
        }
        armed = false
        if head < queue.count {
            arm(loop, for: queue[head].deadline)
        } else {
            queue.removeAll(keepingCapacity: true)
            head = 0
        }
    }
}
