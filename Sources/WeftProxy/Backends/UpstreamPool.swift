import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix
import Synchronization
import WeftCore
import WeftIdentity
import WeftKernel
import WeftStatus

/// A backend as the pool knows it: address and port (the identity), and
/// the node it runs on (carried along for policy, not part of the key).
/// Built once per route table, so a request hashes two integers, not strings.
struct EndpointKey: Hashable, CustomStringConvertible {
    var ip: IPv4Address
    var port: UInt16
    var node: String

    init(ip: IPv4Address, port: UInt16, node: String) {
        self.ip = ip
        self.port = port
        self.node = node
    }

    init(_ e: ProxyTable.Endpoint) {
        ip = IPv4Address(e.address) ?? IPv4Address(0)
        port = e.port
        node = e.node
    }

    /// From the route table's "ip:port" (node unknown, not part of the key).
    init?(backend: String) {
        guard let colon = backend.lastIndex(of: ":"), let ip = IPv4Address(String(backend[..<colon])),
              let port = UInt16(backend[backend.index(after: colon)...]) else { return nil }
        self.init(ip: ip, port: port, node: "")
    }

    /// A route table map by "ip:port" (ProxyTable.upstreamIdleTimeouts,
    /// connectTimeouts), by key; entries that do not parse are left out.
    static func keyed<V>(_ map: [String: V]?) -> [EndpointKey: V] {
        var out: [EndpointKey: V] = [:]
        for (address, value) in map ?? [:] {
            if let key = EndpointKey(backend: address) { out[key] = value }
        }
        return out
    }

    var address: String { ip.description }
    var description: String { "\(ip):\(port)" }

    static func == (a: EndpointKey, b: EndpointKey) -> Bool { a.ip == b.ip && a.port == b.port }
    func hash(into h: inout Hasher) {
        h.combine(ip.value)
        h.combine(port)
    }
}

extension ClientBootstrap {
    /// A backend, pod or node by its address, with no resolver (WeftStatus).
    func connect(_ key: EndpointKey) -> EventLoopFuture<Channel> { connect(literal: key.address, port: Int(key.port)) }
}

/// How long the pools keep a backend connection unused, in milliseconds
/// (0: for good): MeshConfig proxy.upstreamIdleTimeout, and TrafficPolicy
/// `timeout.http.connectionIdleTimeout` for the backends of the Services
/// that set it (ProxyTable.upstreamIdleTimeouts).
struct UpstreamIdleTimeouts: Sendable {
    let mesh: Int
    let byBackend: [EndpointKey: Int]
    /// The shortest above 0 (0: none), which sets how often the sweep goes.
    let shortest: Int

    init(_ table: ProxyTable) {
        mesh = table.upstreamIdleTimeoutMilliseconds ?? ConnectionRegistry.defaultUpstreamIdleTimeoutMilliseconds
        byBackend = EndpointKey.keyed(table.upstreamIdleTimeouts)
        shortest = byBackend.values.reduce(mesh) { ProxyTable.shorterIdleTimeout($0, $1) }
    }
}

/// A connection the pool keeps for the next request.
protocol KeptUpstream: AnyObject {
    var isActive: Bool { get }
    /// Sweeps it sat through kept (UpstreamPool.closeIdle), 0 when kept.
    var keptSweeps: Int { get set }
    /// Exchanges it carried, and when it was made (UpstreamLifetime).
    var uses: Int { get set }
    var opened: NIODeadline { get }
    func close()
}

/// TrafficPolicy bounds on how long and for how many requests the proxy
/// uses one connection to a backend (circuitBreaker.maxRequestsPerConnection,
/// timeout.http.maxConnectionDuration; ProxyTable.connectionLifetimes).
struct UpstreamLifetime: Sendable {
    let maxRequests: Int
    let maxAge: TimeAmount

    init(_ l: ProxyTable.ConnectionLifetime) {
        maxRequests = l.maxRequests ?? .max
        maxAge = l.maxMilliseconds.map { .milliseconds(Int64($0)) } ?? .nanoseconds(.max)
    }

    /// Whether a connection made at `opened` that carried `uses`
    /// exchanges takes no more.
    func spent(uses: Int, opened: NIODeadline, now: NIODeadline = .now()) -> Bool {
        uses >= maxRequests || (maxAge.nanoseconds != .max && now - opened >= maxAge)
    }
}

extension UpstreamHandler: KeptUpstream {}
extension ExpressUpstream: KeptUpstream {}

/// Upstream connections and load state for one event loop. Every downstream
/// connection is served on one loop, and its upstream connections are made
/// on the same loop, so nothing here is shared between threads and nothing
/// needs a lock. The price: in-flight counts and idle pools are per loop
/// (per core), which is what least-request needs anyway to stay cheap.
final class UpstreamPool {
    final class EndpointState {
        var inFlight = 0
        var ejectedUntil = NIODeadline.uptimeNanoseconds(0)
        var consecutiveFailures = 0
        var idle: [UpstreamHandler] = []
        /// Idle connections of the express path (no codec).
        var express: [ExpressUpstream] = []
        var h2 = HTTP2Connections()
        /// HTTP/2 connections nested in tunnels, by source identity (a
        /// tunnel speaks for one identity).
        var tunnelH2: [SpiffeID: HTTP2Connections] = [:]
        /// Idle HTTP/1.1 tunnel streams, by the source pod they carry (a
        /// stream names its source in its CONNECT, so only that pod's
        /// exchanges may reuse it).
        var tunnelIdle: [UInt32: [UpstreamHandler]] = [:]
        /// Idle express tunnel streams, by source pod, for the same reason.
        var expressTunnelIdle: [UInt32: [ExpressUpstream]] = [:]
        /// Full-path requests waiting for an HTTP/1.1 connection to the
        /// backend at its circuit breaker's maxConnections, first first;
        /// and how many wait on the proxy's other loops (told by them).
        var waiting: [ConnectionWait] = []
        var waitingElsewhere = 0
        /// Whether requests wait for a connection to the backend, here or
        /// on another loop: a connection freed is not kept idle then.
        var wanted: Bool { !waiting.isEmpty || waitingElsewhere > 0 }
    }

    /// A request waiting for a connection to a backend at its circuit
    /// breaker's maxConnections (`wait(for:)`), counted in the backend's
    /// pending requests (maxPendingRequests) while it waits, as Envoy
    /// queues it. It ends once: given an HTTP/1.1 connection to the backend
    /// freed on this loop, told there is room for a new one (one closed, on
    /// any loop), or timed out.
    final class ConnectionWait {
        enum Outcome {
            case connection(UpstreamHandler)
            case room
            case timedOut
        }
        fileprivate let key: EndpointKey
        fileprivate let counters: ClusterRuntime.Backend
        fileprivate var done: ((Outcome) -> Void)?
        fileprivate var timer: Scheduled<Void>?
        fileprivate weak var pool: UpstreamPool?

        fileprivate init(key: EndpointKey, counters: ClusterRuntime.Backend, done: @escaping (Outcome) -> Void) {
            self.key = key
            self.counters = counters
            self.done = done
        }

        /// The request went (its client left, its timeout): nothing is told.
        func cancel() {
            done = nil
            pool?.leave(self)
        }
    }

    /// The pools of the proxy's other loops, told when a backend's counted
    /// connection closes while requests wait for one (ProxyContext sets it).
    var peers: [Peer] = []

    /// Another loop's pool, touched only in a task on that loop.
    struct Peer: @unchecked Sendable {
        let loop: any EventLoop
        weak var pool: UpstreamPool?

        /// Runs `body` with the pool on its own loop.
        func run(_ body: @escaping @Sendable (UpstreamPool) -> Void) {
            loop.execute { [self] in
                if let pool { body(pool) }
            }
        }
    }

    let eventLoop: any EventLoop
    let configuration: ProxyConfiguration
    /// For tests: a handler put first on every plain connection to a pod
    /// (ProxyFuzzTests closes them at a write, as a pod's reset does).
    var front: (() -> any ChannelHandler)?
    private var endpoints: [EndpointKey: EndpointState] = [:]
    /// xorshift state for the two random choices.
    private var random: UInt64

    let tunnels: TunnelPool
    private let stats: ProxyStats?
    /// TrafficPolicy connect timeouts by backend in force (the route
    /// snapshot's); ProxyContext sets it.
    var connectTimeouts: () -> [EndpointKey: TimeAmount] = { [:] }
    /// TrafficPolicy connection lifetimes by backend in force (the route
    /// snapshot's); ProxyContext sets it.
    var lifetimes: () -> [EndpointKey: UpstreamLifetime] = { [:] }
    /// The idle timeouts in force (the route snapshot's); ProxyContext sets it.
    var idleTimeouts: () -> UpstreamIdleTimeouts = { UpstreamIdleTimeouts(ProxyTable()) }
    /// The shortcut's splice maps while splicing is on, else nil;
    /// ProxyContext sets it.
    var spliceMaps: () -> SpliceMaps? = { nil }
    private let idleSweep: KeptSweep

    init(eventLoop: any EventLoop, configuration: ProxyConfiguration, stats: ProxyStats? = nil, telemetry: ProxyTelemetry? = nil) {
        self.eventLoop = eventLoop
        self.configuration = configuration
        self.stats = stats
        idleSweep = KeptSweep(loop: eventLoop)
        tunnels = TunnelPool(loop: eventLoop, port: configuration.tunnelPort, codec: configuration.express, stats: stats, telemetry: telemetry)
        random = UInt64.random(in: 1...UInt64.max)
        tunnels.onGoAway = { [unowned self] tunnel in retire(tunnel: tunnel) }
        tunnels.idleStreams = { [unowned self] in idleTunnelStreams }
        idleSweep.bind(timeout: { [unowned self] in idleTimeouts().shortest }, keeps: { [unowned self] in keptConnections > 0 },
                       sweep: { [unowned self] in closeIdle(after: $0) })
    }

    /// The tunnel stream channels kept here for another exchange, and
    /// those of HTTP/2 connections in tunnel streams with no stream open:
    /// what a tunnel may carry and still be unused (TunnelPool).
    private var idleTunnelStreams: Set<ObjectIdentifier> {
        var idle = Set<ObjectIdentifier>()
        func add(_ c: Channel?) { if let c { idle.insert(ObjectIdentifier(c)) } }
        for s in endpoints.values {
            for h in s.tunnelIdle.values.joined() { add(h.channel) }
            for h in s.expressTunnelIdle.values.joined() { add(h.channel) }
            for h2 in s.tunnelH2.values.flatMap(\.list) where h2.openStreams == 0 { add(h2.transport) }
        }
        return idle
    }

    /// Tunnel connections whose far end sent GOAWAY (it drains), while they
    /// last: their streams are not kept for another exchange.
    private var goneAway: Set<ObjectIdentifier> = []

    /// The far proxy of a tunnel connection drains: the streams of it kept
    /// idle for another exchange close now (the far proxy closes the
    /// connection once none is open), and those in use close after their
    /// exchange. The next exchange opens a stream on a new connection, to
    /// the proxy that took over.
    private func retire(tunnel: Channel) {
        let id = ObjectIdentifier(tunnel)
        goneAway.insert(id)
        tunnel.closeFuture.assumeIsolated().whenComplete { [unowned self] _ in goneAway.remove(id) }
        func on(_ c: Channel?) -> Bool { c?.parent === tunnel }
        for s in endpoints.values {
            for (source, list) in s.tunnelIdle where list.contains(where: { on($0.channel) }) {
                for h in list where on(h.channel) { h.close() }
                s.tunnelIdle[source] = list.filter { !on($0.channel) }
            }
            for (source, list) in s.expressTunnelIdle where list.contains(where: { on($0.channel) }) {
                for h in list where on(h.channel) { h.close() }
                s.expressTunnelIdle[source] = list.filter { !on($0.channel) }
            }
            for (id, set) in s.tunnelH2 {
                for h2 in set.list where on(h2.transport) {
                    s.tunnelH2[id]?.remove(h2)
                    h2.retire()
                }
                if s.tunnelH2[id]?.isEmpty == true { s.tunnelH2[id] = nil }
            }
        }
    }

    /// Whether a tunnel stream may be kept for another exchange: not once
    /// its connection's far end sent GOAWAY.
    func keeps(tunnelStream channel: Channel?) -> Bool {
        guard !goneAway.isEmpty, let parent = channel?.parent else { return true }
        return !goneAway.contains(ObjectIdentifier(parent))
    }

    private func nextRandom() -> UInt64 {
        random ^= random << 13
        random ^= random >> 7
        random ^= random << 17
        return random
    }

    func state(_ key: EndpointKey) -> EndpointState {
        if let s = endpoints[key] { return s }
        let s = EndpointState()
        endpoints[key] = s
        return s
    }

    /// Least-request by the power of two choices: two endpoints at random,
    /// the one with fewer requests in flight wins. Endpoints ejected after
    /// connect failures are skipped while any other is usable; `excluding`
    /// (endpoints a retry already tried) likewise.
    func pick(_ candidates: [EndpointKey], excluding: Set<EndpointKey>) -> EndpointKey? {
        let n = candidates.count
        if n <= 1 { return candidates.first }
        let now = NIODeadline.now()
        func usable(_ k: EndpointKey) -> Bool {
            if !excluding.isEmpty && excluding.contains(k) { return false }
            if let s = endpoints[k], s.ejectedUntil > now { return false }
            return true
        }
        func load(_ k: EndpointKey) -> Int { endpoints[k]?.inFlight ?? 0 }
        // The common case: two random draws are both usable.
        let i = Int(nextRandom() % UInt64(n))
        var j = Int(nextRandom() % UInt64(n - 1))
        if j >= i { j += 1 }
        let a = candidates[i], b = candidates[j]
        switch (usable(a), usable(b)) {
        case (true, true): return load(a) <= load(b) ? a : b
        case (true, false): return a
        case (false, true): return b
        case (false, false):
            // Everything may be ejected or tried: any usable one, else any
            // one not tried yet, rather than failing without an attempt.
            let start = Int(nextRandom() % UInt64(n))
            for k in 0..<n where usable(candidates[(start + k) % n]) { return candidates[(start + k) % n] }
            for k in 0..<n where !excluding.contains(candidates[(start + k) % n]) { return candidates[(start + k) % n] }
            return candidates[start]
        }
    }

    /// Passive health: consecutive connect failures eject an endpoint for a
    /// while (1 s, doubling to 30 s), so retries and new requests go elsewhere.
    func recordConnectFailure(_ key: EndpointKey) {
        let s = state(key)
        s.consecutiveFailures += 1
        let seconds = min(30, 1 << min(s.consecutiveFailures - 1, 5))
        s.ejectedUntil = .now() + .seconds(Int64(seconds))
    }

    func recordSuccess(_ key: EndpointKey) {
        guard let s = endpoints[key], s.consecutiveFailures != 0 else { return }
        s.consecutiveFailures = 0
        s.ejectedUntil = .uptimeNanoseconds(0)
    }

    /// Whether an idle HTTP/1.1 connection to `key` waits on this loop.
    func hasIdle(_ key: EndpointKey, tunnel: TunnelChoice? = nil) -> Bool {
        guard let s = endpoints[key] else { return false }
        if let source = tunnel?.source.value { return s.tunnelIdle[source]?.contains { $0.isActive } ?? false }
        return s.idle.contains { $0.isActive }
    }

    /// An upstream handler ready for one exchange with `key`. `counters`
    /// (a TrafficPolicy cluster's backend) counts the connections opened
    /// and the requests waiting for one, for its circuit breaker. With a
    /// `tunnel`, the exchange runs in a CONNECT stream of the tunnel to the
    /// backend's node instead of a TCP connection of its own.
    /// HTTP/2: `breaker`'s (the cluster's) circuitBreaker.maxConnections
    /// bounds the connections to the backend, counted in `counters` as
    /// HTTP/1.1 ones are: at it, with every connection of this loop full,
    /// the stream goes on the least loaded one and waits there (in NIO's
    /// HTTP/2 layer) for one of its streams to end, counted among the
    /// backend's pending requests meanwhile, as Envoy's pending requests
    /// are; past maxPendingRequests it fails at once (`StreamsInUse`). A
    /// loop with none makes one, as Envoy's pools do (each of its workers
    /// may open a first connection past the limit).
    func acquire(_ key: EndpointKey, protocol proto: ProxyTable.UpstreamProtocol, counters: ClusterRuntime.Backend? = nil,
                 breaker: ClusterRuntime? = nil, tunnel: TunnelChoice? = nil,
                 _ completion: @escaping (Result<UpstreamHandler, any Error>) -> Void) {
        let maxConnections = breaker?.policy.circuitBreaker?.maxConnections
        let s = state(key)
        let lifetimes = self.lifetimes()
        let lifetime = lifetimes.isEmpty ? nil : lifetimes[key]
        if let tunnel {
            switch proto {
            case .http1:
                // A stream is one source pod's: kept alive for that pod's
                // next exchange with this backend, never anyone else's.
                while let handler = s.tunnelIdle[tunnel.source.value]?.popLast() {
                    if Self.usable(handler, lifetime) {
                        handler.reused = true
                        return completion(.success(handler))
                    }
                }
                let source = tunnel.source.value
                // (The stream is the source's connection to the backend,
                // kept as one: counted as one for its circuit breaker.)
                let opened = connecting(key, counters)
                tunnels.stream(tunnel.route, to: key, source: tunnel.source, identities: tunnel.identities, http: "http1", initialize: { stream in
                    try stream.pipeline.syncOperations.addHTTPClientHandlers(leftOverBytesStrategy: .forwardBytes)
                    let handler = UpstreamHandler()
                    handler.tunnelSource = source
                    try stream.pipeline.syncOperations.addHandler(handler)
                }) { result in
                    opened(try? result.get())
                    completion(Self.upstreamHandler(of: result))
                }
            case .http2:
                if let h2 = s.tunnelH2[tunnel.route.source]?.take(lifetime) { return h2.openStream(completion) }
                if let h2 = s.tunnelH2[tunnel.route.source]?.atLimit(counters, maxConnections) {
                    return Self.waitForStream(on: h2, counters, breaker, completion)
                }
                let tunnels = self.tunnels
                let h2 = HTTP2Upstream(key: key, pool: self) { [self] initializer, done in
                    tunnels.stream(tunnel.route, to: key, source: tunnel.source, identities: tunnel.identities, http: "h2",
                                   initialize: initializer, counted(key, counters, done))
                }
                s.tunnelH2[tunnel.route.source, default: HTTP2Connections()].add(h2)
                kept()
                h2.openStream(completion)
            }
            return
        }
        switch proto {
        case .http1:
            while let handler = s.idle.popLast() {
                if Self.usable(handler, lifetime) {
                    handler.reused = true
                    completion(.success(handler))
                    return
                }
            }
            guard let counters else { return connectHTTP1(key, completion) }
            let opened = connecting(key, counters)
            connectHTTP1(key) { result in
                opened((try? result.get())?.channel)
                completion(result)
            }
        case .http2:
            if let h2 = s.h2.take(lifetime) { return h2.openStream(completion) }
            if let h2 = s.h2.atLimit(counters, maxConnections) { return Self.waitForStream(on: h2, counters, breaker, completion) }
            let bootstrap = self.bootstrap(for: key)
            let pool = onLoop
            let h2 = HTTP2Upstream(key: key, pool: self) { [self] initializer, done in
                bootstrap.channelInitializer { channel in pool.value.initialize(channel) { _ in try initializer(channel) } }
                    .connect(key)
                    .assumeIsolated()
                    .whenComplete(counted(key, counters, done))
            }
            s.h2.add(h2)
            kept()
            h2.openStream(completion)
        }
    }

    /// A stream on `h2`, whose every stream is in use, at its backend's
    /// maxConnections: it waits there for one to end, holding a place among
    /// the backend's pending requests (`breaker`'s maxPendingRequests)
    /// until its head goes out or it ends; with none left it fails at once.
    private static func waitForStream(on h2: HTTP2Upstream, _ counters: ClusterRuntime.Backend?, _ breaker: ClusterRuntime?,
                                      _ completion: @escaping (Result<UpstreamHandler, any Error>) -> Void) {
        guard let counters, let breaker else { return h2.openStream(completion) }
        guard breaker.reserveWait(counters) else { return completion(.failure(StreamsInUse())) }
        h2.openStream(completion, waiting: PendingPlace(counters))
    }

    /// `done` for a connect beginning now, the connection counted in
    /// `counters` (ClusterRuntime's, for circuitBreaker.maxConnections)
    /// from now on (`counting`).
    private func counted(_ key: EndpointKey, _ counters: ClusterRuntime.Backend?,
                         _ done: @escaping (Result<Channel, any Error>) -> Void) -> (Result<Channel, any Error>) -> Void {
        guard let counters else { return done }
        let opened = counting(key, counters)
        return { result in
            opened(try? result.get())
            done(result)
        }
    }

    /// Whether a connection to `key` that has just carried an exchange
    /// (counted here) is spent by its TrafficPolicy's lifetime (the
    /// snapshot's `lifetimes`): closed rather than kept.
    static func spent(_ c: some KeptUpstream, key: EndpointKey, _ lifetimes: [EndpointKey: UpstreamLifetime]) -> Bool {
        c.uses += 1
        guard !lifetimes.isEmpty, let l = lifetimes[key] else { return false }
        return l.spent(uses: c.uses, opened: c.opened)
    }

    /// Whether a kept connection may carry the next exchange: open, and
    /// not past its `lifetime`'s maxConnectionDuration (then it is closed).
    static func usable(_ c: some KeptUpstream, _ lifetime: UpstreamLifetime?) -> Bool {
        guard c.isActive else { return false }
        guard let lifetime, lifetime.spent(uses: c.uses, opened: c.opened) else { return true }
        c.close()
        return false
    }

    /// Whether the HTTP/2 connection `h2` takes a new stream (its
    /// `lifetime` not spent); when not, it is retired (it closes once its
    /// streams have) and the caller makes another.
    fileprivate static func takesStreams(_ h2: HTTP2Upstream, _ lifetime: UpstreamLifetime?) -> Bool {
        guard h2.isUsable else { return false }
        guard let lifetime, lifetime.spent(uses: h2.streamsOpened, opened: h2.opened) else { return true }
        h2.retire()
        return false
    }

    /// Returns an HTTP/1.1 connection after a complete exchange.
    func release(_ handler: UpstreamHandler, to key: EndpointKey, reusable: Bool) {
        give(handler, to: key, reusable: reusable && !Self.spent(handler, key: key, lifetimes()))
    }

    private func give(_ handler: UpstreamHandler, to key: EndpointKey, reusable: Bool) {
        let s = state(key)
        // The exchange may have paused reading for a slow client as its
        // response ended: an idle connection reads (a server's close is
        // seen), and the next exchange must get its response. (Only then:
        // setting an option costs some 2,000 instructions of casts.)
        if reusable, handler.isActive { handler.resumeReads() }
        if let source = handler.tunnelSource {
            // (A stream is one source pod's: never handed to a request
            // waiting for a connection. While one waits, it is closed, so
            // that the room comes free.)
            guard reusable, handler.isActive, keeps(tunnelStream: handler.channel), !s.wanted,
                  s.tunnelIdle[source, default: []].count < configuration.maxIdlePerBackend else {
                handler.close()
                return
            }
            handler.keptSweeps = 0
            s.tunnelIdle[source, default: []].append(handler)
            kept()
            return
        }
        if reusable, handler.isActive, !s.waiting.isEmpty {
            // A request waits for a connection to this backend: it takes it.
            handler.reused = true
            return finish(s.waiting[0], .connection(handler))
        }
        // (One waits on another loop: the room is its.)
        guard reusable, handler.isActive, s.idle.count < configuration.maxIdlePerBackend, s.waitingElsewhere == 0 else {
            handler.close()
            return
        }
        handler.keptSweeps = 0
        s.idle.append(handler)
        kept()
    }

    // MARK: waiting for a connection (circuitBreaker.maxConnections)

    /// A connection to `key` about to be made, counted against its circuit
    /// breaker (`counters`) from now on, while it is being made as while it
    /// is open (Envoy counts one connecting too): requests that come before
    /// its connect is done see it, so a burst opens no more than
    /// maxConnections. Call what is returned with the connection made, or
    /// nil if the connect failed: the count is given back then, or when the
    /// connection closes; and while requests wait for one, every loop's
    /// pool is told there is room (`roomFreed`).
    private func counting(_ key: EndpointKey, _ counters: ClusterRuntime.Backend) -> ((any Channel)?) -> Void {
        counters.connections.add(1, ordering: .relaxed)
        return { [weak self] channel in
            guard let channel else { return Self.released(key, counters, self) }
            channel.closeFuture.assumeIsolated().whenComplete { [weak self] _ in Self.released(key, counters, self) }
        }
    }

    /// A connect one request waits on, to `key`: with `counters`, the
    /// request counted pending (maxPendingRequests) and the connection
    /// counted (`counting`) until what is returned is called with the
    /// connection made, or nil.
    func connecting(_ key: EndpointKey, _ counters: ClusterRuntime.Backend?) -> ((any Channel)?) -> Void {
        guard let counters else { return { _ in } }
        counters.pending.add(1, ordering: .relaxed)
        let opened = counting(key, counters)
        return { channel in
            counters.pending.subtract(1, ordering: .relaxed)
            opened(channel)
        }
    }

    private static func released(_ key: EndpointKey, _ counters: ClusterRuntime.Backend, _ pool: UpstreamPool?) {
        counters.connections.subtract(1, ordering: .relaxed)
        guard counters.waiting.load(ordering: .relaxed) > 0, let pool else { return }
        counters.freed.add(1, ordering: .relaxed)
        pool.roomFreed(key, counters)
        for peer in pool.peers { peer.run { $0.roomFreed(key, counters) } }
    }

    /// Waits, up to `timeout`, for a connection to `key`, whose every
    /// connection allowed is open (HTTPProxyHandler), its place among the
    /// backend's pending requests taken (ClusterRuntime.reserveWait; given
    /// back when the wait ends). Where another loop
    /// keeps one of them idle, or the express path does on this one, it is
    /// closed, so that the room comes free; and while it waits, the other
    /// loops keep none idle (`EndpointState.wanted`).
    func wait(for key: EndpointKey, counters: ClusterRuntime.Backend, timeout: TimeAmount,
              _ done: @escaping (ConnectionWait.Outcome) -> Void) -> ConnectionWait {
        let s = state(key)
        let wait = ConnectionWait(key: key, counters: counters, done: done)
        wait.pool = self
        counters.waiting.add(1, ordering: .relaxed)
        s.waiting.append(wait)
        wait.timer = eventLoop.assumeIsolated().scheduleTask(in: timeout) { [weak self, weak wait] in
            guard let self, let wait else { return }
            finish(wait, .timedOut)
        }
        closeOneIdle(key)
        for peer in peers {
            peer.run { pool in
                pool.state(key).waitingElsewhere += 1
                pool.closeOneIdle(key)
            }
        }
        return wait
    }

    /// A connection to `key` closed somewhere: the first request waiting
    /// here for one goes to open its own (it checks the limit again), if
    /// no request on another loop took the room first.
    func roomFreed(_ key: EndpointKey, _ counters: ClusterRuntime.Backend) {
        guard let first = endpoints[key]?.waiting.first else { return }
        var left = counters.freed.load(ordering: .relaxed)
        while left > 0 {
            let (taken, now) = counters.freed.compareExchange(expected: left, desired: left - 1, ordering: .relaxed)
            if taken { return finish(first, .room) }
            left = now
        }
    }

    /// Closes one connection to `key` kept idle here, the full path's or
    /// else the express path's, else a tunnel stream to it either path
    /// keeps for some source pod, if there is one.
    func closeOneIdle(_ key: EndpointKey) {
        guard let s = endpoints[key] else { return }
        if let c = s.idle.popLast() { return c.close() }
        if let c = s.express.popLast() { return c.close() }
        if let source = s.tunnelIdle.first(where: { !$0.value.isEmpty })?.key, let c = s.tunnelIdle[source]?.popLast() {
            return c.close()
        }
        if let source = s.expressTunnelIdle.first(where: { !$0.value.isEmpty })?.key {
            s.expressTunnelIdle[source]?.popLast()?.close()
        }
    }

    /// Ends `wait` with `outcome` (a connection given to a request that
    /// went meanwhile goes back to the pool).
    private func finish(_ wait: ConnectionWait, _ outcome: ConnectionWait.Outcome) {
        leave(wait)
        guard let done = wait.done else {
            if case .connection(let handler) = outcome { give(handler, to: wait.key, reusable: true) }
            return
        }
        wait.done = nil
        done(outcome)
    }

    fileprivate func leave(_ wait: ConnectionWait) {
        guard let s = endpoints[wait.key], let i = s.waiting.firstIndex(where: { $0 === wait }) else { return }
        s.waiting.remove(at: i)
        wait.timer?.cancel()
        wait.timer = nil
        wait.counters.pending.subtract(1, ordering: .relaxed)
        // (The last request waiting gone: room freed and not taken lapses.)
        if wait.counters.waiting.subtract(1, ordering: .relaxed).newValue == 0 { wait.counters.freed.store(0, ordering: .relaxed) }
        let key = wait.key
        for peer in peers { peer.run { $0.state(key).waitingElsewhere -= 1 } }
    }

    /// The connections kept for the next request now.
    var keptConnections: Int {
        endpoints.values.reduce(0) { n, s in
            n + s.idle.count + s.express.count + s.h2.list.count + s.tunnelH2.values.reduce(0) { $0 + $1.list.count }
                + s.tunnelIdle.values.reduce(0) { $0 + $1.count } + s.expressTunnelIdle.values.reduce(0) { $0 + $1.count }
        }
    }

    /// A connection was kept for the next request: the idle sweep runs.
    @inline(__always)
    func kept() { if !idleSweep.running { idleSweep.start() } }

    /// One sweep for MeshConfig `proxy.upstreamIdleTimeout` (KeptSweep,
    /// every quarter of the shortest timeout in force): the connections
    /// kept idle for their backend's whole timeout (a TrafficPolicy's
    /// connectionIdleTimeout, or the mesh's), and HTTP/2 ones with no
    /// stream open or opened that long, are closed; the other kept ones
    /// count the sweep.
    private func closeIdle(after _: IdleSweep) {
        var closed = 0
        let timeouts = idleTimeouts()
        let period = ConnectionRegistry.period(timeouts.shortest)
        let meshRounds = ConnectionRegistry.rounds(timeouts.mesh, period)
        var rounds = meshRounds
        let lifetimes = self.lifetimes()
        var lifetime: UpstreamLifetime?
        let now = NIODeadline.now()
        func aged<T: KeptUpstream>(_ list: [T]) -> [T] {
            list.filter { c in
                guard c.isActive else { return false }
                c.keptSweeps += 1
                // (Kept past its maxConnectionDuration: closed too.)
                guard c.keptSweeps >= rounds || lifetime?.spent(uses: c.uses, opened: c.opened, now: now) == true else { return true }
                c.close()
                closed += 1
                return false
            }
        }
        for (key, s) in endpoints {
            rounds = timeouts.byBackend.isEmpty ? meshRounds
                : timeouts.byBackend[key].map { ConnectionRegistry.rounds($0, period) } ?? meshRounds
            lifetime = lifetimes.isEmpty ? nil : lifetimes[key]
            if !s.idle.isEmpty { s.idle = aged(s.idle) }
            if !s.express.isEmpty { s.express = aged(s.express) }
            for (source, list) in s.tunnelIdle {
                let left = aged(list)
                s.tunnelIdle[source] = left.isEmpty ? nil : left
            }
            for (source, list) in s.expressTunnelIdle {
                let left = aged(list)
                s.expressTunnelIdle[source] = left.isEmpty ? nil : left
            }
            if !s.h2.isEmpty { closed += s.h2.closeUnused(rounds: rounds) }
            for id in s.tunnelH2.keys {
                closed += s.tunnelH2[id]?.closeUnused(rounds: rounds) ?? 0
                if s.tunnelH2[id]?.isEmpty == true { s.tunnelH2[id] = nil }
            }
        }
        if closed > 0 { stats?.upstreamIdleClosed.add(closed, ordering: .relaxed) }
    }

    /// How long a connect to `key` may take: its Service's TrafficPolicy
    /// `timeout.tcp.connectTimeout`, or the proxy's own.
    func connectTimeout(for key: EndpointKey) -> TimeAmount {
        let own = connectTimeouts()
        return own.isEmpty ? .nanoseconds(configuration.connectTimeout.nanoseconds)
            : own[key] ?? .nanoseconds(configuration.connectTimeout.nanoseconds)
    }

    /// (TCP_NODELAY is a ClientBootstrap's own default option.)
    func bootstrap(for key: EndpointKey) -> ClientBootstrap {
        ClientBootstrap(group: eventLoop).connectTimeout(connectTimeout(for: key))
    }

    /// The pool, for a channel initializer (run on the pool's loop, as the
    /// pool's bootstraps make their channels there).
    var onLoop: NIOLoopBound<UpstreamPool> { NIOLoopBound(self, eventLoop: eventLoop) }

    /// A plain connection's handlers, after the test's `front` if one is set.
    func initialize(_ channel: any Channel, _ handlers: (ChannelPipeline.SynchronousOperations) throws -> Void) -> EventLoopFuture<Void> {
        let front = self.front
        return channel.eventLoop.settingUp {
            if let front { try channel.pipeline.syncOperations.addHandler(front()) }
            try handlers(channel.pipeline.syncOperations)
        }
    }

    private func connectHTTP1(_ key: EndpointKey, _ completion: @escaping (Result<UpstreamHandler, any Error>) -> Void) {
        // To a pod of this node, while splicing is on: counted, in case an
        // Upgrade joins it to a client byte for byte (Upgrade.join).
        let maps = key.node == configuration.node ? spliceMaps() : nil
        let pool = onLoop
        bootstrap(for: key)
            .channelInitializer { channel in
                pool.value.initialize(channel) { pipeline in
                    if let maps { try pipeline.addHandler(ReadTally(maps: maps)) }
                    try pipeline.addHTTPClientHandlers(leftOverBytesStrategy: .forwardBytes)
                    try pipeline.addHandler(UpstreamHandler())
                }
            }
            .connect(key)
            .assumeIsolated()
            .whenComplete { completion(Self.upstreamHandler(of: $0)) }
    }

    /// The UpstreamHandler of a channel that came up (connection or stream).
    static func upstreamHandler(of result: Result<any Channel, any Error>) -> Result<UpstreamHandler, any Error> {
        result.flatMap { channel in Result { try channel.pipeline.syncOperations.handler(type: UpstreamHandler.self) } }
    }

    /// What is taken now over all endpoints: requests in flight and open
    /// HTTP/2 streams (once every client has gone, none: ProxyFuzzTests).
    var inUse: (requests: Int, streams: Int) {
        endpoints.values.reduce(into: (0, 0)) { sum, s in
            sum.0 += s.inFlight
            sum.1 += s.h2.openStreams + s.tunnelH2.values.reduce(0) { $0 + $1.openStreams }
        }
    }

    /// Every HTTP/2 connection, over all endpoints (direct and in tunnels).
    private var http2Connections: [HTTP2Upstream] {
        endpoints.values.flatMap { $0.h2.list + $0.tunnelH2.values.flatMap(\.list) }
    }

    /// HTTP/2 connections whose backend has not sent its SETTINGS yet.
    var http2AwaitingSettings: Int { http2Connections.filter { !$0.settingsSeen }.count }

    /// HTTP/2 streams past their connection's stream limit: those NIO holds
    /// until another ends (HTTP2UpstreamStreamsTests).
    var streamsWaiting: Int { http2Connections.reduce(0) { $0 + max(0, $1.openStreams - $1.maxStreams) } }

    fileprivate func forgetHTTP2(_ key: EndpointKey, _ h2: HTTP2Upstream) {
        guard let s = endpoints[key] else { return }
        s.h2.remove(h2)
        for id in s.tunnelH2.keys {
            s.tunnelH2[id]?.remove(h2)
            if s.tunnelH2[id]?.isEmpty == true { s.tunnelH2[id] = nil }
        }
    }

    /// Closes idle connections (drain, or a table without the endpoint).
    func closeIdle() {
        for s in endpoints.values {
            for h in s.idle { h.close() }
            s.idle.removeAll()
            for h in s.express { h.close() }
            s.express.removeAll()
            for h2 in s.h2.list { h2.close() }
            s.h2 = HTTP2Connections()
            for h2 in s.tunnelH2.values.flatMap(\.list) { h2.close() }
            s.tunnelH2.removeAll()
            for h in s.tunnelIdle.values.joined() { h.close() }
            s.tunnelIdle.removeAll()
            for h in s.expressTunnelIdle.values.joined() { h.close() }
            s.expressTunnelIdle.removeAll()
        }
        tunnels.closeAll()
    }
}

/// One multiplexed HTTP/2 connection to a backend: requests become streams.
final class HTTP2Upstream {
    let key: EndpointKey
    private weak var pool: UpstreamPool?
    private var multiplexer: NIOHTTP2Handler.StreamMultiplexer?
    private var channel: Channel?
    private var waiters: [(completion: (Result<UpstreamHandler, any Error>) -> Void, place: PendingPlace?)] = []
    private(set) var failed = false
    /// Streams open on it now, and opened on it in all.
    private var open = 0
    var openStreams: Int { open }
    private(set) var streamsOpened = 0
    /// When it was made (UpstreamLifetime).
    let opened = NIODeadline.now()
    /// It takes no new stream, and closes once its last one has.
    private var retired = false
    /// The backend's SETTINGS_MAX_CONCURRENT_STREAMS (NIO's and
    /// grpc-swift's servers say 100, nginx 128, Go's 250); 100 until its
    /// SETTINGS name one, as NIO's client takes it (RFC 9113 has it
    /// unbounded until then, and for good for a server that never names
    /// one, as gRPC's C core; NIO keeps to 100 all the same). Past it,
    /// NIO's HTTP/2 layer would hold a new stream until another ended.
    private(set) var maxStreams = 100
    /// It takes another stream now (those waiting for the connection to
    /// come up count: they all open as it does).
    var hasRoom: Bool { open + waiters.count < maxStreams }

    /// The connection (a TCP socket, or a tunnel stream) it runs over.
    var transport: Channel? { channel }

    /// No new stream; closes when none is open.
    func retire() {
        retired = true
        if open == 0 { close() }
    }

    var isUsable: Bool { !failed && (channel?.isActive ?? true) }

    /// `connect` makes the transport (a TCP connection, or a tunnel
    /// stream) and runs the initializer on it.
    init(key: EndpointKey, pool: UpstreamPool,
         connect: (_ initializer: @escaping @Sendable (Channel) throws -> Void, _ done: @escaping (Result<Channel, any Error>) -> Void) -> Void) {
        self.key = key
        self.pool = pool
        connect({ channel in
            _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
                mode: .client, connectionConfiguration: .init(), streamConfiguration: .init()
            ) { stream in stream.close() }
            try channel.pipeline.syncOperations.addHandler(ConnectionFramesWatch())
        }) { [self] result in
            switch result {
            case .success(let channel):
                do {
                    self.channel = channel
                    multiplexer = try channel.pipeline.syncOperations.handler(type: NIOHTTP2Handler.self).syncMultiplexer()
                    let watch = try channel.pipeline.syncOperations.handler(type: ConnectionFramesWatch.self)
                    watch.goAway = { [weak self] last, code in self?.goAway(last, code) }
                    watch.settings = { [weak self] limit in self?.settings(maxStreams: limit) }
                    channel.closeFuture.assumeIsolated().whenComplete { [self] _ in
                        failed = true
                        pool.forgetHTTP2(key, self)
                    }
                    let ready = waiters
                    waiters = []
                    for w in ready { openStream(w.completion, waiting: w.place) }
                } catch {
                    fail(error)
                }
            case .failure(let error):
                fail(error)
            }
        }
    }

    private func fail(_ error: any Error) {
        failed = true
        pool?.forgetHTTP2(key, self)
        let ready = waiters
        waiters = []
        for w in ready {
            w.place?.release()
            w.completion(.failure(error))
        }
    }

    /// A new stream for one exchange. One that `waiting` (its place among
    /// the backend's pending requests) gives the place back once its head
    /// goes out (NIO's HTTP/2 layer holds the head of a stream past the
    /// backend's limit, and completes its write as the stream opens) or it
    /// ends, whichever is first.
    func openStream(_ completion: @escaping (Result<UpstreamHandler, any Error>) -> Void, waiting place: PendingPlace? = nil) {
        used = true
        guard let multiplexer else {
            if failed {
                place?.release()
                completion(.failure(ChannelError.ioOnClosedChannel))
            } else {
                waiters.append((completion, place))
            }
            return
        }
        open += 1
        streamsOpened += 1
        multiplexer.createStreamChannel { stream in
            stream.eventLoop.settingUp {
                try stream.pipeline.syncOperations.addHandler(HTTP2FramePayloadToHTTP1ClientCodec(httpProtocol: .http))
                let upstream = UpstreamHandler()
                upstream.watchesHeadWrites = true
                upstream.waiting = place
                try stream.pipeline.syncOperations.addHandler(upstream)
            }
        }
        .assumeIsolated()
        .whenComplete { [self] result in
            if case .success(let stream) = result {
                stream.closeFuture.assumeIsolated().whenComplete { [self] _ in
                    place?.release()
                    streamClosed()
                }
            } else {
                place?.release()
                streamClosed()
            }
            let handler = UpstreamPool.upstreamHandler(of: result)
            if case .success(let upstream) = handler { upstream.http2 = self }
            completion(handler)
        }
    }

    /// The backend's GOAWAY: no new stream goes on this connection. One
    /// with an error ends it at once (RFC 9113 5.4.1 has the sender close
    /// it; a backend that does not would leave its streams waiting for
    /// good: NIO's server says GOAWAY(COMPRESSION_ERROR) with the last
    /// stream 2^31-1 for a field block over its limit, and keeps the
    /// connection open); the streams fail and their requests are retried
    /// or answered 502.
    private func goAway(_ last: HTTP2StreamID, _ code: HTTP2ErrorCode) {
        lastProcessed = min(lastProcessed ?? last, last)
        pool?.forgetHTTP2(key, self)
        if code == .noError { retire() } else { close() }
    }

    private func streamClosed() {
        open -= 1
        if retired && open == 0 { close() }
    }

    /// The backend's SETTINGS (`limit`: the maximum of concurrent streams
    /// it names, if it does).
    private func settings(maxStreams limit: Int?) {
        settingsSeen = true
        if let limit { maxStreams = limit }
    }

    /// The backend's first SETTINGS came.
    private(set) var settingsSeen = false

    /// The last stream the backend's GOAWAY says it processed (or may):
    /// those after it it never saw (RFC 9113 6.8).
    private var lastProcessed: HTTP2StreamID?

    /// Whether the backend's GOAWAY left stream `id` unprocessed: NIO then
    /// closes it with CANCEL, as if the backend had reset it.
    func unprocessed(_ id: HTTP2StreamID) -> Bool {
        guard let lastProcessed else { return false }
        return id > lastProcessed
    }

    /// A stream opened since the sweep before (UpstreamPool.closeIdle).
    private var used = false
    private var idleSweeps = 0

    /// One sweep: whether it has now gone `rounds` sweeps (its backend's
    /// timeout) with no stream open and none opened (nor is it still
    /// connecting).
    func unused(rounds: Int) -> Bool {
        defer { used = false }
        idleSweeps = open > 0 || used || multiplexer == nil ? 0 : idleSweeps + 1
        return idleSweeps >= rounds
    }

    func close() { channel?.close(promise: nil) }
}

/// An HTTP/2 stream's place among its backend's pending requests
/// (circuitBreaker.maxPendingRequests) while it waits at maxConnections for
/// a stream of a full connection to end: given back once.
final class PendingPlace: Sendable {
    private let counters: ClusterRuntime.Backend
    private let held = Atomic<Bool>(true)
    init(_ counters: ClusterRuntime.Backend) { self.counters = counters }
    /// Whether it is still held (the stream has not gone out).
    var isHeld: Bool { held.load(ordering: .relaxed) }
    func release() {
        guard held.exchange(false, ordering: .relaxed) else { return }
        counters.pending.subtract(1, ordering: .relaxed)
    }
}

/// A stream would wait at its backend's circuitBreaker.maxConnections,
/// and maxPendingRequests wait already.
struct StreamsInUse: Error {}

/// Tells of a GOAWAY and of SETTINGS on an HTTP/2 upstream connection
/// (NIO's handler passes the connection's own frames on up the pipeline).
final class ConnectionFramesWatch: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTP2Frame
    /// (The last stream it processed, and the code.)
    var goAway: ((HTTP2StreamID, HTTP2ErrorCode) -> Void)?
    /// SETTINGS (not an acknowledgement): its SETTINGS_MAX_CONCURRENT_STREAMS, if named.
    var settings: ((Int?) -> Void)?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data).payload {
        case .goAway(let last, let code, _):
            goAway?(last, code)
        case .settings(.settings(let list)):
            settings?(list.last { $0.parameter == .maxConcurrentStreams }.map(\.value))
        default:
            break
        }
    }
}

/// A backend's HTTP/2 connections on one event loop (or those of one source
/// identity through tunnels): a request takes a stream on the first with
/// room under the backend's SETTINGS_MAX_CONCURRENT_STREAMS; when all are
/// full the pool makes another, as Envoy and Linkerd do. (One connection
/// alone would hold the next stream until another ended, which a
/// long-lived gRPC stream never does.)
struct HTTP2Connections {
    private(set) var list: [HTTP2Upstream] = []

    var isEmpty: Bool { list.isEmpty }
    var openStreams: Int { list.reduce(0) { $0 + $1.openStreams } }

    /// A connection that takes a stream now; those that take none again
    /// (failed, or retired past their `lifetime`) leave the set.
    mutating func take(_ lifetime: UpstreamLifetime?) -> HTTP2Upstream? {
        var found: HTTP2Upstream?
        list.removeAll { h2 in
            guard UpstreamPool.takesStreams(h2, lifetime) else { return true }
            if found == nil && h2.hasRoom { found = h2 }
            return false
        }
        return found
    }

    /// The connection with the fewest streams, when the backend's
    /// connections (`counters`, over every loop) are at `max`: the next
    /// stream waits on it rather than open another.
    func atLimit(_ counters: ClusterRuntime.Backend?, _ max: Int?) -> HTTP2Upstream? {
        guard let counters, let max, counters.connections.load(ordering: .relaxed) >= max else { return nil }
        return list.filter(\.isUsable).min { $0.openStreams < $1.openStreams }
    }

    mutating func add(_ h2: HTTP2Upstream) { list.append(h2) }

    mutating func remove(_ h2: HTTP2Upstream) { list.removeAll { $0 === h2 } }

    /// Closes those unused for `rounds` sweeps (HTTP2Upstream.unused); how many.
    mutating func closeUnused(rounds: Int) -> Int {
        var closed = 0
        list.removeAll { h2 in
            guard h2.unused(rounds: rounds) else { return false }
            h2.close()
            closed += 1
            return true
        }
        return closed
    }
}
