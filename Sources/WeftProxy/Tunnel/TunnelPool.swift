import Foundation
import NIOCore
import NIOHTTP2
import NIOPosix
import NIOSSL
import NIOTLS
import Synchronization
import WeftCore
import WeftIdentity
import WeftStatus

/// The TLS material of the agent's identity bundle, parsed once per bundle:
/// every local identity's credential, a client context per identity, and
/// the server configuration that picks a certificate by SNI.
final class TunnelIdentities: Sendable {
    let trustDomain: String
    let roots: [NIOSSLCertificate]
    let credentials: [SpiffeID: TunnelTLS.Credential]
    let clientContexts: [SpiffeID: NIOSSLContext]
    let serverContext: NIOSSLContext?

    init(_ bundle: IdentityBundle) throws {
        trustDomain = bundle.trustDomain
        let (roots, credentials) = try TunnelTLS.credentials(bundle)
        self.roots = roots
        self.credentials = credentials
        var clients: [SpiffeID: NIOSSLContext] = [:]
        var bySNI: [String: TunnelTLS.Credential] = [:]
        for (id, credential) in credentials {
            clients[id] = try NIOSSLContext(configuration: TunnelTLS.client(credential, roots: roots))
            bySNI[TunnelTLS.serverName(for: id)] = credential
        }
        clientContexts = clients
        if let fallback = credentials.values.first {
            let table = bySNI
            serverContext = try NIOSSLContext(configuration: TunnelTLS.server(default: fallback, roots: roots) { name in
                name.flatMap { table[$0] }
            })
        } else {
            serverContext = nil
        }
    }

    func id(namespace: String, serviceAccount: String) -> SpiffeID {
        SpiffeID(trustDomain: trustDomain, namespace: namespace, serviceAccount: serviceAccount)
    }
}

/// HTTP/2 settings of a tunnel. Every pod connection is a stream, and a
/// stream usually ends with a RST_STREAM from one side (a connection closed
/// whole, not half by half): NIO's guard against reset floods (200 per 30 s
/// by default, then GOAWAY) would stop a busy tunnel within seconds. The
/// peer is another node's proxy that proved its identity, so the limits are
/// set for the load a node carries, not for strangers.
enum TunnelHTTP2 {
    /// A stream's receive window, announced at the start.
    static let streamWindow = 1 << 20
    /// The connection's receive window, kept open as data arrives.
    static let connectionWindow = 4 << 20

    static var connection: NIOHTTP2Handler.ConnectionConfiguration {
        var c = NIOHTTP2Handler.ConnectionConfiguration()
        // Every pod connection between two identities is a stream of one
        // tunnel: far more than a browser's 100 at once. Large frames and
        // a full window from the start: one DATA frame (and one frame
        // header, its own small TLS record) per read instead of per 16 KiB.
        c.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 10_000),
            HTTP2Setting(parameter: .maxHeaderListSize, value: 16_384),
            HTTP2Setting(parameter: .maxFrameSize, value: 1 << 20),
            HTTP2Setting(parameter: .initialWindowSize, value: streamWindow),
        ]
        c.maximumConnectionGlitches = 1_000_000
        c.targetWindowSize = connectionWindow
        c.controlFrameRateLimit.maximumCount = 100_000
        c.controlFrameRateLimit.windowLength = .seconds(1)
        return c
    }

    /// Reads grow up to 256 KiB on bulk flows (NIO's default stops at 64
    /// KiB) and stay small otherwise: fewer trips through the pipeline,
    /// larger frames and TLS writes.
    static let recvAllocator = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 256 << 10)

    /// The same for Weft's own codec, on both ends of the tunnels the
    /// express path uses (TunnelRelay's: TunnelInbound, and TunnelPool's
    /// relayed connections). Its peers are mesh proxies that proved a
    /// node's identity: resets are not rationed.
    static let codec = HTTP2Codec.Settings(
        maxConcurrentStreams: 10_000, maxFrameSize: 1 << 20, maxHeaderListSize: 16_384, initialWindow: streamWindow,
        connectionWindow: connectionWindow, resetAllowance: 1_000_000, reportsSendWindows: true)

    /// The same for the source end's tunnels with stream channels (NIO's
    /// HTTP2StreamMultiplexer right above the codec), with no send windows
    /// told: the multiplexer reads NIO's window events as being about
    /// receive windows. A stream channel is held back by its writes instead:
    /// the codec completes a DATA frame's write once the frame went out, so
    /// a stream whose window is shut fills the channel's outbound buffer and
    /// the channel stops being writable.
    static let channelCodec = {
        var s = codec
        s.reportsSendWindows = false
        return s
    }()

    /// How long a stream's open may take, from the call to the far end's
    /// answer: the tunnel's TCP connect (2 s at most), TLS and HTTP/2 setup
    /// if it is new, and the CONNECT's answer (at once for HTTP; for TCP
    /// after the far proxy's own connect to the pod, 2 s at most, then 502).
    /// A peer that accepts the TCP connection and then says nothing (its
    /// proxy stopped or stuck) held every open on the tunnel, and the
    /// requests behind them, for good. An opaque stream to a pod whose
    /// Service sets its own connect timeout waits that long beyond it
    /// (TunnelConnection.openStream's `podConnect`): the far proxy may
    /// take all of it, and a tunnel taken as stuck is closed for every
    /// stream it carries.
    static let openTimeout = TimeAmount.seconds(5)

    static var stream: NIOHTTP2Handler.StreamConfiguration {
        var s = NIOHTTP2Handler.StreamConfiguration()
        s.streamResetFrameRateLimit.maximumCount = 100_000
        s.streamResetFrameRateLimit.windowLength = .seconds(1)
        s.streamErrorRateLimit.maximumCount = 100_000
        s.streamErrorRateLimit.windowLength = .seconds(1)
        s.targetWindowSize = streamWindow
        return s
    }
}

/// Where and as whom one connection is tunnelled.
struct TunnelRoute: Hashable {
    var source: SpiffeID
    var destination: SpiffeID
    /// The destination node's proxy (the next hop toward the pod).
    var node: IPv4Address
}

/// Tunnels from this event loop: one mutual-TLS HTTP/2 connection per
/// (source identity, destination identity, destination node), as ztunnel
/// pools HBONE connections; every pod connection is one CONNECT stream on
/// it. Loop-confined, like UpstreamPool.
final class TunnelPool {
    private let loop: any EventLoop
    private let port: Int
    private var connections: [TunnelRoute: TunnelConnection] = [:]
    /// Connections whose streams are relayed at the frame level (TunnelRelay):
    /// plain TCP from local pods. Apart from those above, which give stream
    /// channels: a relay opens its own stream IDs, and HTTP/2 wants them
    /// rising in the order they are used on a connection.
    private var relayConnections: [TunnelRoute: TunnelConnection] = [:]
    /// Where the streams and connections this pool opens, and its
    /// handshakes, are counted (nil in tests that need no counts).
    private let stats: ProxyStats?
    private let onHandshake: HandshakeObserver?
    /// Told of a connection (with stream channels) whose far end sent
    /// GOAWAY: the streams kept for reuse on it are retired.
    var onGoAway: ((Channel) -> Void)?
    /// MeshConfig `proxy.tcpKeepalive` in force (nil: its defaults), for
    /// each new connection's socket (ProxyContext sets it).
    var keepalive: () -> ProxyTable.TCPKeepaliveSettings? = { nil }
    /// MeshConfig `proxy.tunnelIdleTimeout` in force, in milliseconds (0:
    /// never); ProxyContext sets it.
    var unusedTimeout: () -> Int = { ConnectionRegistry.defaultTunnelIdleTimeoutMilliseconds }
    /// The tunnel stream channels the upstream pool holds idle for their
    /// next exchange (UpstreamPool sets it): a tunnel carrying only those
    /// is unused.
    var idleStreams: () -> Set<ObjectIdentifier> = { [] }
    /// Closes the tunnels unused for MeshConfig `proxy.tunnelIdleTimeout`
    /// (TunnelConnection.unused).
    private let unusedSweep: KeptSweep

    /// Whether connections with stream channels run Weft's codec (off with `--no-express`).
    private let codec: Bool

    init(loop: any EventLoop, port: UInt16, codec: Bool = true, stats: ProxyStats? = nil, telemetry: ProxyTelemetry? = nil) {
        self.loop = loop
        self.port = Int(port)
        self.codec = codec
        unusedSweep = KeptSweep(loop: loop)
        self.stats = stats
        if let telemetry {
            onHandshake = { ok, took in telemetry.handshake(role: "client", ok: ok, duration: took) }
        } else {
            onHandshake = nil
        }
        unusedSweep.bind(timeout: { [unowned self] in unusedTimeout() },
                         keeps: { [unowned self] in !connections.isEmpty || !relayConnections.isEmpty },
                         sweep: { [unowned self] in release(unusedFor: $0) })
    }

    /// Whether a connection from `source` to `endpoint` goes through a
    /// tunnel, and which: only to pods on other nodes, when this node has
    /// identities, the source pod has one, the destination pod is known and
    /// does not opt out (PeerAuthentication DISABLE).
    static func route(_ endpoint: EndpointKey, source: IPv4Address, snapshot: RouteSnapshot,
                      identities: TunnelIdentities?, node: String) -> TunnelRoute? {
        guard let identities, let settings = snapshot.table.tunnel, endpoint.node != node,
              let src = snapshot.workloadsByIP[source.value], let dst = snapshot.workloadsByIP[endpoint.ip.value],
              !settings.plaintext.contains(endpoint.address) else { return nil }
        let sourceID = identities.id(namespace: src.namespace, serviceAccount: src.serviceAccount)
        guard identities.clientContexts[sourceID] != nil, let hop = NextHop.toward(endpoint.ip) else { return nil }
        return TunnelRoute(source: sourceID, destination: identities.id(namespace: dst.namespace, serviceAccount: dst.serviceAccount),
                           node: hop)
    }

    /// A new CONNECT stream to `target` through the route's tunnel, with
    /// `initialize` building the byte-channel pipeline above the codec.
    /// `http`: the stream carries HTTP the proxy wrote itself ("http1" or
    /// "h2"), sent as `x-weft-protocol` so the far proxy reads it as such.
    /// `podConnect`: an opaque stream's, the far proxy's connect to the pod
    /// may take this long (the pod's Service's connect timeout).
    func stream(_ route: TunnelRoute, to target: EndpointKey, source: IPv4Address, identities: TunnelIdentities, http: String? = nil,
                extraHeaders: [(String, String)] = [], podConnect: TimeAmount? = nil,
                initialize: @escaping @Sendable (Channel) throws -> Void, _ completion: @escaping (Result<Channel, any Error>) -> Void) {
        let connection: TunnelConnection
        switch self.connection(route, identities: identities, relay: false) {
        case .failure(let error): return completion(.failure(error))
        case .success(let c): connection = c
        }
        var headers = [("x-weft-source", source.description)]
        if let http { headers.append(("x-weft-protocol", http)) }
        headers += extraHeaders
        connection.openStream(authority: "\(target.address):\(target.port)", headers: headers, http: http != nil,
                              podConnect: podConnect, initialize: initialize, completion)
    }

    /// A CONNECT stream to `target` carried at the frame level, for plain
    /// TCP (TunnelRelay.open): `completion` gets it once the far end said
    /// 2xx, to be added to the socket's pipeline.
    /// A stream that could not be opened because its connection went away
    /// first (TunnelNotOpened) is opened once more, on a new connection.
    func relay(_ route: TunnelRoute, to target: EndpointKey, source: IPv4Address, identities: TunnelIdentities, again: Bool = true,
               podConnect: TimeAmount? = nil, _ completion: @escaping (Result<TunnelRelay.Stream, any Error>) -> Void) {
        switch connection(route, identities: identities, relay: true) {
        case .failure(let error): completion(.failure(error))
        case .success(let c):
            stats?.tunnelStreamsOutRelayed.add(1, ordering: .relaxed)
            c.openRelayed(authority: "\(target.address):\(target.port)", headers: [("x-weft-source", source.description)],
                          podConnect: podConnect) { [self] result in
                guard again, case .failure(let error) = result, error is TunnelNotOpened else { return completion(result) }
                relay(route, to: target, source: source, identities: identities, again: false, podConnect: podConnect, completion)
            }
        }
    }

    /// The route's usable connection of that kind, or a new one; one more
    /// stream counted on it.
    private func connection(_ route: TunnelRoute, identities: TunnelIdentities, relay: Bool) -> Result<TunnelConnection, any Error> {
        let existing = relay ? relayConnections[route] : connections[route]
        if let c = existing, c.isUsable {
            stats?.tunnelStreamsOut.add(1, ordering: .relaxed)
            return .success(c)
        }
        guard let context = identities.clientContexts[route.source] else {
            return .failure(TunnelRefused(status: 0, reason: "no certificate for \(route.source)"))
        }
        let c = TunnelConnection(route: route, port: port, context: context, loop: loop, relay: relay, codec: codec,
                                 keepalive: keepalive(), onHandshake: onHandshake,
                                 onGoAway: { [weak self] channel in self?.onGoAway?(channel) }) { [weak self, stats] dead in
            stats?.tunnelsOutActive.subtract(1, ordering: .relaxed)
            if relay {
                if self?.relayConnections[route] === dead { self?.relayConnections[route] = nil }
            } else if self?.connections[route] === dead {
                self?.connections[route] = nil
            }
        }
        if relay { relayConnections[route] = c } else { connections[route] = c }
        unusedSweep.start()
        stats?.tunnelsOut.add(1, ordering: .relaxed)
        stats?.tunnelsOutActive.add(1, ordering: .relaxed)
        stats?.tunnelStreamsOut.add(1, ordering: .relaxed)
        return .success(c)
    }

    /// One sweep for unused tunnels: each counts it, and those unused for
    /// the whole timeout close.
    private func release(unusedFor sweep: IdleSweep) {
        let idle = idleStreams()
        for (route, c) in connections where c.unused(sweep, idle: idle) {
            connections[route] = nil
            release(c)
        }
        for (route, c) in relayConnections where c.unused(sweep, idle: idle) {
            relayConnections[route] = nil
            release(c)
        }
    }

    private func release(_ c: TunnelConnection) {
        c.release()
        stats?.tunnelsReleased.add(1, ordering: .relaxed)
    }

    func closeAll() {
        for c in connections.values { c.close() }
        for c in relayConnections.values { c.close() }
        connections.removeAll()
        relayConnections.removeAll()
    }
}

/// One tunnel: TLS 1.3 to the destination node's proxy, the server's
/// certificate checked to carry the expected SPIFFE ID before any stream is
/// opened, then HTTP/2.
final class TunnelConnection {
    /// What streams are opened with, once the tunnel is up.
    enum Streams {
        /// Stream channels (TunnelStreamCodec); the watcher says whether the
        /// peer sent GOAWAY.
        case channels(StreamOpener, GoAwayWatcher)
        /// Streams relayed at the frame level.
        case relayed(TunnelRelay)
    }

    /// Opens a stream channel: NIO's HTTP2StreamMultiplexer above Weft's
    /// codec, or NIOHTTP2Handler's own multiplexer (`--no-express`).
    typealias StreamOpener = (_ initializer: @escaping NIOChannelInitializer) -> EventLoopFuture<Channel>

    let route: TunnelRoute
    private var streams: Streams?
    private var channel: Channel?
    private var waiters: [(Result<Streams, any Error>) -> Void] = []
    private(set) var failed = false
    /// Told once, when the connection failed or closed.
    private var onClose: ((TunnelConnection) -> Void)?
    private let loop: any EventLoop
    /// TunnelHTTP2.openTimeout, unless a test says otherwise.
    private let openTimeout: TimeAmount
    /// What keeps it from being released as unused (TunnelPool's sweep):
    /// opens not yet answered, opaque streams open on it (TCP, upgraded
    /// connections; a relayed connection's are its relay's), HTTP streams
    /// open on it (unless the upstream pool holds them idle), and reads.
    private var opening = 0
    private var opaque = 0
    private var httpStreams = Set<ObjectIdentifier>()
    private var reads: TunnelReads?
    private var unused = IdleCount()

    /// Not once the peer sent GOAWAY (it is draining: a new connection
    /// reaches the proxy that took its place), closed or failed.
    var isUsable: Bool {
        switch streams {
        case .relayed(let relay) where !relay.canOpen: return false
        case .channels(_, let watcher) where watcher.goneAway: return false
        default: return !failed && (channel?.isActive ?? true)
        }
    }

    /// `relay`: streams relayed at the frame level (TunnelRelay), else
    /// stream channels; `codec`: the stream channels' connection speaks
    /// HTTP/2 through Weft's codec (relayed ones always do), else through
    /// NIOHTTP2Handler.
    /// `keepalive`: TCP keepalive for its socket (OpaqueKeepalive; nil:
    /// MeshConfig's defaults). `front` (tests): a handler put nearest its
    /// socket.
    init(route: TunnelRoute, port: Int, context: NIOSSLContext, loop: any EventLoop, relay: Bool = false, codec: Bool = true,
         openTimeout: TimeAmount = TunnelHTTP2.openTimeout, keepalive: ProxyTable.TCPKeepaliveSettings? = nil,
         onHandshake: HandshakeObserver? = nil, onGoAway: ((Channel) -> Void)? = nil,
         front: (@Sendable () -> any ChannelHandler)? = nil, onClose: @escaping (TunnelConnection) -> Void) {
        self.route = route
        self.onClose = onClose
        self.loop = loop
        self.openTimeout = openTimeout
        let expected = route.destination
        let handshake = loop.makePromise(of: Void.self)
        if let onHandshake {
            let started = NIODeadline.now()
            handshake.futureResult.whenComplete { onHandshake((try? $0.get()) != nil, NIODeadline.now() - started) }
        }
        ClientBootstrap(group: loop)
            .connectTimeout(.seconds(2))
            .channelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(ChannelOptions.recvAllocator, value: TunnelHTTP2.recvAllocator)
            .channelInitializer { channel in
                channel.eventLoop.settingUp {
                    if let front { try channel.pipeline.syncOperations.addHandler(front()) }
                    let tls = try NIOSSLClientHandler(context: context, serverHostname: TunnelTLS.serverName(for: expected))
                    try channel.pipeline.syncOperations.addHandler(tls)
                    try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(handshake))
                    try channel.pipeline.syncOperations.addHandler(TunnelReads())
                    try channel.pipeline.syncOperations.addHandler(TLSRecordCoalescer())
                    if relay {
                        try channel.pipeline.syncOperations.addHandler(HTTP2Codec(allocator: channel.allocator, role: .client,
                                                                                  settings: TunnelHTTP2.codec))
                        try channel.pipeline.syncOperations.addHandler(TunnelRelay(.client))
                        return
                    }
                    let sync = channel.pipeline.syncOperations
                    if codec {
                        try sync.addHandler(HTTP2Codec(allocator: channel.allocator, role: .client, settings: TunnelHTTP2.channelCodec))
                        try sync.addHandler(HTTP2StreamMultiplexer(
                            mode: .client, channel: channel, targetWindowSize: TunnelHTTP2.stream.targetWindowSize,
                            outboundBufferSizeHighWatermark: TunnelHTTP2.stream.outboundBufferSizeHighWatermark,
                            outboundBufferSizeLowWatermark: TunnelHTTP2.stream.outboundBufferSizeLowWatermark
                        ) { stream in stream.close() })  // the server opens no streams
                    } else {
                        try sync.addHandler(GoAwaySentCloses())
                        _ = try sync.configureHTTP2Pipeline(
                            mode: .client, connectionConfiguration: TunnelHTTP2.connection, streamConfiguration: TunnelHTTP2.stream
                        ) { stream in stream.close() }
                    }
                    try sync.addHandler(GoAwayWatcher())
                }
            }
            .connect(literal: route.node.description, port: port)
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .failure(let error):
                    handshake.fail(error)
                    fail(error)
                case .success(let channel):
                    self.channel = channel
                    reads = try? channel.pipeline.syncOperations.handler(type: TunnelReads.self)
                    OpaqueKeepalive.tunnel(channel, keepalive)
                    channel.closeFuture.assumeIsolated().whenComplete { [self] _ in
                        failed = true
                        ended()
                        flush(.failure(ChannelError.ioOnClosedChannel))
                    }
                    handshake.futureResult.assumeIsolated().whenComplete { [self] outcome in
                        do {
                            try outcome.get()
                            let tls = try channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)
                            // Chain and expiry were checked by the handshake;
                            // the identity is checked here, before any byte.
                            guard let cert = tls.peerCertificate, let peer = TunnelTLS.identity(of: cert) else {
                                throw TunnelRefused(status: 0, reason: "the peer presented no SPIFFE ID")
                            }
                            guard peer == expected else {
                                throw TunnelRefused(status: 0, reason: "the peer is \(peer), expected \(expected)")
                            }
                            let ready: Streams
                            if relay {
                                ready = .relayed(try channel.pipeline.syncOperations.handler(type: TunnelRelay.self))
                            } else {
                                let watcher = try channel.pipeline.syncOperations.handler(type: GoAwayWatcher.self)
                                if let onGoAway { watcher.onGoAway = { onGoAway(channel) } }
                                let open: StreamOpener
                                if codec {
                                    let mux = try channel.pipeline.syncOperations.handler(type: HTTP2StreamMultiplexer.self)
                                    open = { mux.createStreamChannel($0) }
                                } else {
                                    let mux = try channel.pipeline.syncOperations.handler(type: NIOHTTP2Handler.self).syncMultiplexer()
                                    open = { mux.createStreamChannel($0) }
                                }
                                ready = .channels(open, watcher)
                            }
                            streams = ready
                            flush(.success(ready))
                        } catch {
                            fail(error)
                            channel.close(promise: nil)
                        }
                    }
                }
            }
    }

    private func fail(_ error: any Error) {
        failed = true
        ended()
        flush(.failure(error))
    }

    private func ended() {
        guard let onClose else { return }
        self.onClose = nil
        onClose(self)
    }

    private func flush(_ result: Result<Streams, any Error>) {
        let ready = waiters
        waiters = []
        for w in ready { w(result) }
    }

    /// `http`: the stream carries HTTP exchanges (kept idle between them
    /// by the upstream pool), else an opaque stream. `podConnect`: the far
    /// proxy answers only once its connect to the pod is made, which may
    /// take this long (its Service's connect timeout): the open waits that
    /// much beyond `openTimeout` before it takes the peer as stuck.
    func openStream(authority: String, headers: [(String, String)], http: Bool = false, podConnect: TimeAmount? = nil,
                    initialize: @escaping @Sendable (Channel) throws -> Void, _ done: @escaping (Result<Channel, any Error>) -> Void) {
        opening += 1
        let completion = bounded(podConnect: podConnect, { [self] (result: Result<Channel, any Error>) in
            opening -= 1
            if case .success(let stream) = result { carry(stream, http: http) }
            done(result)
        }) { stream in stream.close(promise: nil) }
        whenUp { result in
            switch result {
            case .failure(let error): completion(.failure(error))
            case .success(.relayed): completion(.failure(ChannelError.operationUnsupported))
            case .success(.channels(let open, _)):
                open { stream in
                    stream.eventLoop.settingUp {
                        try stream.pipeline.syncOperations.addHandler(
                            TunnelStreamCodec(.client(authority: authority, headers: headers)))
                        try initialize(stream)
                    }
                }
                .assumeIsolated()
                .whenComplete { result in
                    // Connected when the far end said 200: until then a
                    // refusal is a failed connect, not a broken exchange.
                    guard case .success(let stream) = result,
                          let codec = try? stream.pipeline.syncOperations.handler(type: TunnelStreamCodec.self),
                          let ready = codec.ready else { return completion(result) }
                    ready.futureResult.assumeIsolated().whenComplete { outcome in
                        switch outcome {
                        case .success: completion(.success(stream))
                        case .failure(let error):
                            stream.close(promise: nil)
                            completion(.failure(error))
                        }
                    }
                }
            }
        }
    }

    /// A stream relayed at the frame level (a connection made with `relay`).
    func openRelayed(authority: String, headers: [(String, String)], podConnect: TimeAmount? = nil,
                     _ done: @escaping (Result<TunnelRelay.Stream, any Error>) -> Void) {
        // (A stream answered after the timeout goes with its connection.)
        opening += 1
        let completion = bounded(podConnect: podConnect, { [self] (result: Result<TunnelRelay.Stream, any Error>) in
            opening -= 1
            done(result)
        }) { _ in }
        whenUp { result in
            switch result {
            case .failure(let error): completion(.failure(error))
            case .success(.channels): completion(.failure(ChannelError.operationUnsupported))
            case .success(.relayed(let relay)): relay.open(authority: authority, headers: headers, completion)
            }
        }
    }

    /// `done`, called once: with the open's outcome, or when
    /// `openTimeout` (and `podConnect` beyond it) runs out first with
    /// TunnelTimedOut, and then the whole connection is closed (a peer that
    /// answers no CONNECT in that time is taken as stuck; the opens waiting
    /// on it fail, and the next one makes a new connection). `late` gets
    /// what is answered after.
    private func bounded<T>(podConnect: TimeAmount? = nil, _ done: @escaping (Result<T, any Error>) -> Void,
                            late: @escaping (T) -> Void) -> (Result<T, any Error>) -> Void {
        let once = OnceCompletion(done)
        let timeout = openTimeout + (podConnect ?? .zero), target = route.node
        once.timer = loop.assumeIsolated().scheduleTask(in: timeout) { [weak self] in
            guard let done = once.done else { return }
            once.done = nil
            let error = TunnelTimedOut(node: target, timeout: timeout)
            done(.failure(error))
            guard let self else { return }
            if !failed { fail(error) }
            close()
        }
        return { result in
            guard let done = once.done else {
                if case .success(let value) = result { late(value) }
                return
            }
            once.done = nil
            once.timer?.cancel()
            done(result)
        }
    }

    private func whenUp(_ then: @escaping (Result<Streams, any Error>) -> Void) {
        if let streams { return then(.success(streams)) }
        if failed { return then(.failure(ChannelError.ioOnClosedChannel)) }
        waiters.append(then)
    }

    func close() { channel?.close(promise: nil) }

    /// A stream open on it, counted until it closes.
    private func carry(_ stream: Channel, http: Bool) {
        let id = ObjectIdentifier(stream)
        if http { httpStreams.insert(id) } else { opaque += 1 }
        stream.closeFuture.assumeIsolated().whenComplete { [self] _ in
            if http { httpStreams.remove(id) } else { opaque -= 1 }
        }
    }

    /// One sweep for unused tunnels (TunnelPool): whether it has now gone
    /// the sweep's rounds in a row unused, with nothing opening, no
    /// opaque stream, no HTTP stream but those in `idle` (the stream
    /// channels the upstream pool holds for the next exchange) and
    /// nothing read since the sweep before.
    func unused(_ sweep: IdleSweep, idle: Set<ObjectIdentifier>) -> Bool {
        var busy = opening > 0 || reads?.moved == true
        reads?.moved = false
        switch streams {
        case .relayed(let relay): busy = busy || relay.carriesStreams
        case .channels: busy = busy || opaque > 0 || !httpStreams.isSubset(of: idle)
        case .none: break  // not up yet: the open that made it is waiting (`opening`), or it failed
        }
        return unused.judge(sweep, busy: busy) == .close
    }

    /// Closed as unused: no open takes it from now on.
    func release() {
        failed = true
        close()
    }

    /// Its socket's channel, once connected (for tests).
    var transport: Channel? { channel }
}

/// A completion still to be called, and the timer that may call it first.
private final class OnceCompletion<T> {
    var done: ((Result<T, any Error>) -> Void)?
    var timer: Scheduled<Void>?
    init(_ done: @escaping (Result<T, any Error>) -> Void) { self.done = done }
}

/// After the stream multiplexer on a tunnel with stream channels: notes a GOAWAY
/// (the connection frames of stream 0 come through here; stream frames go
/// to their channels).
final class GoAwayWatcher: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame
    private(set) var goneAway = false
    /// Called at the first GOAWAY.
    var onGoAway: (() -> Void)?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .goAway = unwrapInboundIn(data).payload, !goneAway {
            goneAway = true
            onGoAway?()
        }
        context.fireChannelRead(data)
    }
}

/// On a source's tunnel with `--no-express` (NIO's HTTP/2), below
/// NIOHTTP2Handler: NIO answers a connection error of the peer's (an HPACK
/// block it cannot decode, a PUSH_PROMISE, a flood of resets) with a
/// GOAWAY but leaves the connection open, so an open waiting on it would
/// end only at the open timeout, and the pool would keep offering the
/// tunnel. The source writes a GOAWAY for nothing else (it closes a tunnel
/// it is done with without one), so one passing here closes the connection
/// once it is written: every open on it fails at once, and the next goes
/// on a new tunnel. (Weft's own codec closes on its connection errors
/// itself.)
final class GoAwaySentCloses: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData
    private var frames = HTTP2FrameWalk(preface: true)
    private var closing = false

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard !closing, case .byteBuffer(let bytes) = unwrapOutboundIn(data),
              frames.walk(bytes.readableBytesView, frameEnded: { type, _ in type == 0x7 }) else {
            return context.write(data, promise: promise)
        }
        closing = true
        let written = context.eventLoop.makePromise(of: Void.self)
        if let promise { written.futureResult.cascade(to: promise) }
        context.write(data, promise: written)
        written.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }
}

/// Right after TLS on a source's tunnel: notes a read since the last
/// sweep for unused tunnels (TunnelConnection.unused), one store a read.
final class TunnelReads: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    var moved = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        moved = true
        context.fireChannelRead(data)
    }
}

/// Told of a TLS handshake's outcome and duration (for the proxy's series).
typealias HandshakeObserver = @Sendable (_ ok: Bool, _ duration: TimeAmount) -> Void

/// Completes a promise when the TLS handshake is done (or fails it), then
/// leaves the pipeline.
///
/// At the tunnel listener (`accepted`: when the connection was taken) it
/// also bounds the handshake: a connection the registry's sweep finds
/// with its handshake not done MeshConfig `proxy.requestHeaderTimeout`
/// after it was taken (a minute by default, as nginx's
/// ssl_handshake_timeout) is closed. Without it anyone who can reach the
/// port could hold connections there for good by never finishing a
/// handshake (TCP keepalive ends only a peer that is gone). A source's own
/// opens have their own bound (TunnelConnection).
final class HandshakeWatcher: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    private let promise: EventLoopPromise<Void>
    private let accepted: NIODeadline?
    private let stats: ProxyStats?

    init(_ promise: EventLoopPromise<Void>, accepted: NIODeadline? = nil, stats: ProxyStats? = nil) {
        self.promise = promise
        self.accepted = accepted
        self.stats = stats
    }

    /// The handshake was not done in time.
    struct TimedOut: Error, CustomStringConvertible {
        let limit: TimeAmount
        var description: String {
            "the TLS handshake was not done within \(IdleSweep.shown(limit)) (MeshConfig spec.proxy.requestHeaderTimeout)"
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let sweep = event as? IdleSweep {
            guard let accepted, let limit = sweep.headTimeout, sweep.now - accepted >= limit else { return }
            stats?.tunnelHandshakeTimeouts.add(1, ordering: .relaxed)
            promise.fail(TimedOut(limit: limit))
            return context.close(promise: nil)
        }
        guard let e = event as? TLSUserEvent, case .handshakeCompleted = e else {
            return context.fireUserInboundEventTriggered(event)
        }
        promise.succeed()
        context.fireUserInboundEventTriggered(event)
        // Its work is done: out of the way of every later read.
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        promise.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(ChannelError.ioOnClosedChannel)
        context.fireChannelInactive()
    }
}

/// The next hop toward an address, from this network namespace's IPv4
/// routing table (/proc/net/route, longest prefix first): for a pod on
/// another node, that node's address, where its proxy takes tunnels.
enum NextHop {
    private static let cache = Mutex<[UInt32: IPv4Address]>([:])

    static func toward(_ destination: IPv4Address) -> IPv4Address? {
        if let hit = cache.withLock({ $0[destination.value] }) { return hit }
        guard let text = try? String(contentsOfFile: "/proc/net/route", encoding: .utf8) else { return nil }
        var best: (length: Int, gateway: UInt32)?
        for line in text.split(separator: "\n").dropFirst() {
            let f = line.split(whereSeparator: { $0 == "\t" || $0 == " " })
            guard f.count >= 8, let dst = UInt32(f[1], radix: 16), let gw = UInt32(f[2], radix: 16),
                  let mask = UInt32(f[7], radix: 16) else { continue }
            // The kernel prints them in network order, read as little-endian.
            let d = dst.byteSwapped, g = gw.byteSwapped, m = mask.byteSwapped
            // Gateway routes only, and never the default route: a pod on
            // another node is reached through that node, or not at all.
            let length = m.nonzeroBitCount
            guard destination.value & m == d & m, g != 0, length > 0 else { continue }
            if length > (best?.length ?? -1) { best = (length, g) }
        }
        guard let best else { return nil }
        let hop = IPv4Address(best.gateway)
        cache.withLock { $0[destination.value] = hop }
        return hop
    }
}
