import Glibc
import Logging
import NIOCore
import Synchronization
import WeftCore
import WeftKernel

/// How a connection from a pod reaches a backend on another node: the
/// tunnel (source and destination identities, destination node), the
/// source pod it speaks for, and the identities to present.
typealias TunnelChoice = (route: TunnelRoute, source: IPv4Address, identities: TunnelIdentities)

/// What every connection of the proxy shares: configuration, the current
/// route snapshot, the kernel maps it reads, counters, and one LoopState
/// per event loop.
final class ProxyContext: Sendable {
    let configuration: ProxyConfiguration
    let logger: Logger
    let stats = ProxyStats()
    let telemetry: ProxyTelemetry
    let accessLog: AccessLog
    let spans: SpanExporter
    let origins: ProxyMaps?
    let policy: PolicyMaps?
    private let current: Mutex<RouteSnapshot>
    private let identityState = Mutex<TunnelIdentities?>(nil)
    /// The identities the agent issued for this node's pods (nil: no CA, no tunnels).
    var identities: TunnelIdentities? { identityState.withLock { $0 } }
    func install(identities: TunnelIdentities) {
        identityState.withLock { $0 = identities }
        identitiesInstalled.add(1, ordering: .releasing)
    }
    /// Counts installed identity bundles (LoopState.tunnel's cache reads it).
    let identitiesInstalled = Atomic<UInt64>(0)
    let draining = Atomic<Bool>(false)
    private let spliceMaps = Mutex<SpliceMaps?>(nil)
    /// The shortcut's splice maps, once the agent has pinned them.
    var splice: SpliceMaps? { spliceMaps.withLock { $0 } }

    /// The splice maps while `snapshot` lets the kernel splice (MeshConfig
    /// socketShortcut.splice), else nil: what a connection joined now is
    /// armed, or counted, with.
    func splice(under snapshot: RouteSnapshot) -> SpliceMaps? {
        snapshot.table.spliceOff == true ? nil : splice
    }

    /// Opens the splice maps if the agent has pinned them and they are not
    /// open yet (the proxy may start before the shortcut, or without it),
    /// and clears what a previous proxy left there.
    func openSpliceMaps() {
        guard splice == nil, let maps = try? SpliceMaps(pinDirectory: configuration.pinDirectory) else { return }
        maps.clear()
        spliceMaps.withLock { $0 = maps }
        logger.info("splicing opaque TCP between shortcut sockets")
    }
    private let loops: [ObjectIdentifier: LoopState]
    /// Via token; a request that already carries it has looped.
    let viaToken: String

    init(configuration: ProxyConfiguration, logger: Logger, origins: ProxyMaps?, policy: PolicyMaps?,
         eventLoops: [any EventLoop]) {
        self.configuration = configuration
        self.logger = logger
        self.origins = origins
        self.policy = policy
        telemetry = ProxyTelemetry(labelLimit: configuration.labelValueLimit, loops: eventLoops.count)
        accessLog = AccessLog(path: configuration.accessLogPath ?? configuration.runDirectory + "/access.log")
        spans = SpanExporter(node: configuration.node, logger: logger)
        current = Mutex(RouteSnapshot(ProxyTable()))
        var loops: [ObjectIdentifier: LoopState] = [:]
        for (i, loop) in eventLoops.enumerated() {
            let state = LoopState(pool: UpstreamPool(eventLoop: loop, configuration: configuration, stats: stats, telemetry: telemetry),
                                  counters: stats.makeLoopCounters())
            state.telemetry.shard = i
            loops[ObjectIdentifier(loop)] = state
        }
        self.loops = loops
        viaToken = "weft-\(configuration.node)"
        // Each pool knows the others, to tell them a backend has room for a
        // connection that requests wait for (UpstreamPool.wait).
        let pools = eventLoops.compactMap { loop in loops[ObjectIdentifier(loop)].map { (loop, $0.pool) } }
        for (loop, pool) in pools {
            pool.peers = pools.filter { $0.0 !== loop }.map { UpstreamPool.Peer(loop: $0.0, pool: $0.1) }
        }
        for state in loops.values {
            state.pool.tunnels.keepalive = { [weak self] in self?.snapshot.table.tcpKeepalive }
            state.pool.idleTimeouts = { [weak self] in self?.snapshot.upstreamIdle ?? UpstreamIdleTimeouts(ProxyTable()) }
            // Per new backend connection: the loop's snapshot, without the lock.
            state.pool.connectTimeouts = { [weak self, unowned state] in
                guard let self else { return [:] }
                return state.snapshot(self).connectTimeouts
            }
            state.pool.spliceMaps = { [weak self, unowned state] in
                guard let self else { return nil }
                return self.splice(under: state.snapshot(self))
            }
            state.pool.lifetimes = { [weak self, unowned state] in
                guard let self else { return [:] }
                return state.snapshot(self).lifetimes
            }
            state.pool.tunnels.unusedTimeout = { [weak self] in
                self?.snapshot.table.tunnelIdleTimeoutMilliseconds ?? ConnectionRegistry.defaultTunnelIdleTimeoutMilliseconds
            }
        }
    }

    var snapshot: RouteSnapshot { current.withLock { $0 } }
    /// Counts installed snapshots, so that an event loop can tell without
    /// the lock whether the snapshot it holds is still the current one.
    let installed = Atomic<UInt64>(0)

    func install(_ table: ProxyTable) {
        // One writer (the table watcher): reading the previous snapshot and
        // swapping in the next need not be one critical section.
        let snapshot = RouteSnapshot(table, node: configuration.node, previous: self.snapshot)
        current.withLock { $0 = snapshot }
        installed.add(1, ordering: .releasing)
    }

    /// Moves the snapshot in force to a newer generation of the same table
    /// (RouteSnapshot.advanced): per-generation caches (policy verdicts,
    /// tunnel choices) start over, nothing is compiled again.
    func advance(to generation: UInt64) {
        let snapshot = self.snapshot
        guard generation > snapshot.generation else { return }
        let next = snapshot.advanced(to: generation)
        current.withLock { $0 = next }
        installed.add(1, ordering: .releasing)
    }

    /// The state of the loop a handler runs on. Only ever touched from that loop.
    func loop(_ eventLoop: any EventLoop) -> LoopState {
        guard let state = loops[ObjectIdentifier(eventLoop)] else {
            preconditionFailure("event loop not owned by the proxy")
        }
        return state
    }
}

/// Per event loop: the upstream pool, retry budgets, and policy verdicts
/// already asked for in this table generation.
final class LoopState: @unchecked Sendable {
    // @unchecked: every member is used only on the loop this state belongs to.
    let pool: UpstreamPool
    private var budgets: [String: BudgetBox] = [:]
    /// Request ids, weighted draws, jitter: one seeded generator per loop.
    /// The system generator costs a getrandom(2) call per number.
    var random = LoopRandom()
    /// Metric series handles by label set.
    var telemetry = LoopTelemetry()
    /// The express routing this loop's last new connection took
    /// (Express.Routing.current).
    var lastRouting: Express.Routing?
    /// The request series this loop last built labels for (Express.record).
    var lastSeries: Express.LoopSeries?
    /// The detect timeouts of this loop's new connections (ProtocolDetector).
    let detectWatch = DetectWatch()

    final class BudgetBox { var budget = RetryBudget() }

    /// The retry budget of a frontend on this loop (handlers keep the box).
    func budget(_ frontend: String) -> BudgetBox {
        if let b = budgets[frontend] { return b }
        let b = BudgetBox()
        budgets[frontend] = b
        return b
    }
    private var verdicts: [PolicyKey: Bool] = [:]
    private var verdictGeneration: UInt64 = .max

    struct PolicyKey: Hashable {
        var source: UInt32
        var destination: UInt32
        var port: UInt16
    }

    /// This loop's share of the proxy's request counters (ProxyStats.LoopCounters).
    let counters: ProxyStats.LoopCounters

    /// Storage the express paths write whole heads into, kept between
    /// requests: a head is built in it, handed to NIO and the buffer given
    /// back (`Scratch`); the next head on this loop writes over the same
    /// storage if NIO has written the last one out by then (it usually has:
    /// writes go out within the loop's turn), and gets new storage if not.
    /// A head so costs no allocation, where a buffer of its own cost two.
    var requestHeads = Scratch()
    var responseHeads = Scratch()

    struct Scratch {
        private var kept = ByteBuffer()

        /// An empty buffer of at least `capacity`: the kept storage when
        /// nothing else holds it any more, new storage otherwise.
        mutating func take(capacity: Int) -> ByteBuffer {
            var buffer = kept
            kept = ByteBuffer()
            buffer.clear(minimumCapacity: capacity)
            return buffer
        }

        /// The buffer back, once it is handed on; storage grown past
        /// `Scratch.largest` is let go rather than kept.
        mutating func giveBack(_ buffer: ByteBuffer) {
            if buffer.capacity <= Self.largest { kept = buffer }
        }

        static let largest = 64 * 1024
    }

    init(pool: UpstreamPool, counters: ProxyStats.LoopCounters) {
        self.pool = pool
        self.counters = counters
    }

    private var snapshotSeen: (installed: UInt64, snapshot: RouteSnapshot)?

    /// Tunnel choices already worked out on this loop, by source and
    /// destination address, for one table generation and identity bundle.
    /// Working one out (TunnelPool.route) builds both identities, hashes
    /// their strings and the address's text: about 3,700 instructions, per
    /// request of the express paths before this cache.
    private var tunnelChoices: [UInt64: TunnelChoice?] = [:]
    private var tunnelChoicesFor: (generation: UInt64, identities: UInt64) = (.max, .max)

    /// The tunnel to use from `source` to `endpoint`, if one applies.
    func tunnel(_ proxy: ProxyContext, to endpoint: EndpointKey, from source: IPv4Address,
                snapshot: RouteSnapshot) -> TunnelChoice? {
        // Same-node backends never tunnel: decided before the cache and the identity lock.
        guard endpoint.node != proxy.configuration.node, snapshot.table.tunnel != nil else { return nil }
        // Read before the identities themselves: a bundle installed in
        // between is cached under the older count and worked out again.
        let installed = proxy.identitiesInstalled.load(ordering: .acquiring)
        if tunnelChoicesFor != (snapshot.generation, installed) {
            tunnelChoices.removeAll(keepingCapacity: true)
            tunnelChoicesFor = (snapshot.generation, installed)
        }
        let key = UInt64(source.value) << 32 | UInt64(endpoint.ip.value)
        if let known = tunnelChoices[key] { return known }
        let choice = proxy.identities.flatMap { ids in
            TunnelPool.route(endpoint, source: source, snapshot: snapshot, identities: ids, node: proxy.configuration.node)
                .map { (route: $0, source: source, identities: ids) }
        }
        if tunnelChoices.count > 65536 { tunnelChoices.removeAll(keepingCapacity: true) }
        tunnelChoices[key] = .some(choice)
        return choice
    }

    /// The proxy's current snapshot, as `proxy.snapshot` gives it, without
    /// taking its lock while no new one was installed: this runs for every
    /// request of the express paths.
    func snapshot(_ proxy: ProxyContext) -> RouteSnapshot {
        let installed = proxy.installed.load(ordering: .acquiring)
        if let seen = snapshotSeen, seen.installed == installed { return seen.snapshot }
        let snapshot = proxy.snapshot
        snapshotSeen = (installed, snapshot)
        return snapshot
    }

    /// An endpoint the kernel would let `source` reach (its egress policy
    /// and the endpoint's ingress), by least request; nil when none is. The
    /// proxy connects on the pod's behalf, so it may reach only what the pod could.
    func pickReachable(_ endpoints: [EndpointKey], excluding: Set<EndpointKey> = [], proxy: ProxyContext,
                       generation: UInt64, source: IPv4Address) -> EndpointKey? {
        var excluded = excluding
        while let candidate = pool.pick(endpoints, excluding: excluded), !excluded.contains(candidate) {
            if allowed(proxy, generation: generation, source: source, destination: candidate.ip, port: candidate.port,
                       node: candidate.node) {
                return candidate
            }
            excluded.insert(candidate)
        }
        return nil
    }

    enum PolicyPick {
        /// Its request slot is taken (ClusterRuntime.reserve).
        case picked(EndpointKey)
        /// Every backend the pod may reach is at its maxRequests.
        case overflow
        /// None the pod may reach (or none left past `excluding`).
        case none
    }

    /// A backend of a cluster with a TrafficPolicy, by the policy's
    /// algorithm, that `source` may reach, its request slot taken: one
    /// another loop took the last slot of meanwhile is passed over.
    func pick(_ runtime: ClusterRuntime, hash: UInt64?, excluding excluded: Set<EndpointKey> = [], proxy: ProxyContext,
              generation: UInt64, source: IPv4Address) -> PolicyPick {
        var denied = Set<EndpointKey>()
        var full = false
        while true {
            let picked = runtime.pick(hash: hash, random: &random) { k in
                // Usually both are empty: no hashing of the key then.
                (!excluded.isEmpty && excluded.contains(k)) || (!denied.isEmpty && denied.contains(k))
            }
            switch picked {
            case .failure(let refusal):
                return refusal == .overflow || full ? .overflow : .none
            case .success(let candidate):
                if !allowed(proxy, generation: generation, source: source, destination: candidate.ip, port: candidate.port,
                            node: candidate.node) {
                    denied.insert(candidate)
                } else if runtime.reserve(candidate) {
                    return .picked(candidate)
                } else {
                    full = true
                    denied.insert(candidate)
                }
            }
        }
    }

    /// Counts an upstream event (retry, reset, ...) against the Service the
    /// request dialed.
    func countEvent(_ event: String, proxy: ProxyContext, snapshot: RouteSnapshot, frontendKey: String) {
        guard snapshot.table.requestMetrics != false else { return }
        let frontend = snapshot.table.frontends[frontendKey]
        let e = ProxyTelemetry.ServiceEvent(serviceName: frontend?.service ?? PeerLabels.unknown,
                                            serviceNamespace: frontend?.namespace ?? PeerLabels.unknown, event: event)
        telemetry.event(e, proxy.telemetry).increment()
    }

    /// Would the kernel let `source` connect to `destination:port`? Asked of
    /// the pinned policy maps once per (source, destination, port) and table
    /// generation: the agent writes a new table on every change it applies,
    /// policy changes included, after it has written the policy maps.
    func allowed(_ context: ProxyContext, generation: UInt64, source: IPv4Address,
                 destination: IPv4Address, port: UInt16, node: String) -> Bool {
        guard let policy = context.policy else { return true }
        if generation != verdictGeneration {
            verdicts.removeAll(keepingCapacity: true)
            verdictGeneration = generation
        }
        let key = PolicyKey(source: source.value, destination: destination.value, port: port)
        if let v = verdicts[key] { return v }
        let verdict: Bool
        do {
            let via = node == context.configuration.node ? nil : SourceAddress.toward(destination)
            verdict = try policy.connectVerdict(source: source, destination: destination, port: port, via: via) == nil
        } catch {
            // The maps are unreadable: fail closed, and say so.
            context.logger.error("policy lookup failed: \(error)")
            return false
        }
        if verdicts.count > 65536 { verdicts.removeAll(keepingCapacity: true) }
        verdicts[key] = verdict
        return verdict
    }
}

/// The address the kernel would give a connection from this node to
/// `destination` (a connected UDP socket sends nothing and asks the routing
/// table); cached per destination.
enum SourceAddress {
    private static let cache = Mutex<[UInt32: IPv4Address]>([:])

    static func toward(_ destination: IPv4Address) -> IPv4Address? {
        if let hit = cache.withLock({ $0[destination.value] }) { return hit }
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(9).bigEndian
        addr.sin_addr.s_addr = destination.networkOrder
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
        guard ok else { return nil }
        var local = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        guard withUnsafeMutablePointer(to: &local, {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }) == 0 else { return nil }
        let source = IPv4Address(networkOrder: local.sin_addr.s_addr)
        cache.withLock { $0[destination.value] = source }
        return source
    }
}

/// SplitMix64, seeded once from the system generator: fast and good enough
/// for request ids, traffic splits and jitter (nothing here is a secret).
struct LoopRandom: RandomNumberGenerator {
    private var state = UInt64.random(in: 0...UInt64.max)

    init() {}
    /// A fixed sequence (tests).
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
