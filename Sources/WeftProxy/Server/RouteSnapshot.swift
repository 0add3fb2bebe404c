import NIOCore
import Synchronization
import WeftCore

/// One generation of the route table with its matchers compiled. Immutable;
/// the proxy swaps the whole snapshot when the agent writes a new table, and
/// a request keeps the snapshot it started with.
final class RouteSnapshot: Sendable {
    let table: ProxyTable
    let matchers: [String: RouteMatcher]
    /// GAMMA consumer routes' matchers: by frontend, then by the namespace
    /// whose clients they route (empty: no consumer route anywhere).
    let consumerMatchers: [String: [String: RouteMatcher]]
    /// Each cluster's endpoints, parsed once.
    let endpoints: [String: [EndpointKey]]
    /// Workloads by address, for metrics and access logs.
    let workloadsByIP: [UInt32: ProxyTable.WorkloadRef]
    /// Clusters with a TrafficPolicy: their shared balancing and breaking state.
    let runtimes: [String: ClusterRuntime]
    /// Frontends with a rate limit or injected faults, by "vip:port".
    let guards: [String: FrontendGuard]
    /// "namespace/serviceAccount" by pod address, built once when a rate
    /// limit is keyed by source identity (no string is made per request).
    let identities: [UInt32: String]
    /// AuthorizationPolicies of this node's pods, by address.
    let authorization: [UInt32: AuthorizationSet]
    /// MeshConfig proxy.maxRequestHeaderSize: a larger request head is
    /// answered 431 (HeadLimit).
    let maxRequestHead: Int
    /// MeshConfig proxy.http2MaxConcurrentStreams: what an HTTP/2 client
    /// connection is offered.
    let http2Streams: Int
    /// MeshConfig proxy.upstreamIdleTimeout and the TrafficPolicies'
    /// connectionIdleTimeout, as the pools' sweeps read them.
    let upstreamIdle: UpstreamIdleTimeouts
    /// TrafficPolicy connect timeouts by backend (empty: none set).
    let connectTimeouts: [EndpointKey: TimeAmount]
    /// TrafficPolicy bounds on a backend connection's use, by backend
    /// (empty: none set).
    let lifetimes: [EndpointKey: UpstreamLifetime]
    /// Frontends with TLSRoutes (routed by SNI), by `sniKey(vip, port)`:
    /// told apart per connection without making a "vip:port" string.
    let tlsRouted: Set<UInt64>

    static func sniKey(_ vip: UInt32, _ port: UInt16) -> UInt64 { UInt64(vip) << 16 | UInt64(port) }

    init(_ shipped: ProxyTable, node: String = "", previous: RouteSnapshot? = nil) {
        // External addresses and node ports take their clusterIP port's
        // frontend, matchers and guard (one guard: a rate limit holds over
        // every address of the port).
        let aliases = shipped.resolvedAliases()
        let table = shipped.expandingAliases()
        self.table = table
        maxRequestHead = table.maxRequestHeaderSize ?? MeshConfig.Proxy.headerSizes.upperBound
        http2Streams = table.http2MaxConcurrentStreams ?? MeshConfig.Proxy().http2MaxConcurrentStreams
        upstreamIdle = UpstreamIdleTimeouts(table)
        connectTimeouts = EndpointKey.keyed(table.connectTimeouts).mapValues { .milliseconds(Int64($0)) }
        lifetimes = EndpointKey.keyed(table.connectionLifetimes).mapValues(UpstreamLifetime.init)
        var matchers: [String: RouteMatcher] = [:]
        var consumerMatchers: [String: [String: RouteMatcher]] = [:]
        for (key, frontend) in table.frontends where aliases[key] == nil {
            matchers[key] = RouteMatcher(frontend)
            if let consumers = frontend.consumers {
                consumerMatchers[key] = consumers.mapValues { RouteMatcher($0.applied(to: frontend)) }
            }
        }
        for (alias, target) in aliases {
            matchers[alias] = matchers[target]
            consumerMatchers[alias] = consumerMatchers[target]
        }
        self.matchers = matchers
        self.consumerMatchers = consumerMatchers
        var tlsRouted: Set<UInt64> = []
        for (key, frontend) in table.frontends where frontend.sni != nil {
            let parts = key.split(separator: ":")
            if parts.count == 2, let vip = IPv4Address(String(parts[0])), let port = UInt16(parts[1]) {
                tlsRouted.insert(Self.sniKey(vip.value, port))
            }
        }
        self.tlsRouted = tlsRouted
        endpoints = table.clusters.mapValues { $0.map(EndpointKey.init) }
        var refs: [UInt32: ProxyTable.WorkloadRef] = [:]
        for (address, ref) in table.workloads ?? [:] {
            if let ip = IPv4Address(address) { refs[ip.value] = ref }
        }
        workloadsByIP = refs
        var runtimes: [String: ClusterRuntime] = [:]
        for (name, policy) in table.backendPolicies ?? [:] {
            // (A backend's nearness is kept with it: zones or hints that
            // moved make the runtime anew.)
            let hinted = table.zoneHints?[name]
            let old = previous?.runtimes[name].flatMap {
                $0.policy == policy && previous?.table.zones == table.zones && previous?.table.zoneHints?[name] == hinted ? $0 : nil
            }
            runtimes[name] = ClusterRuntime(name: name, policy: policy, endpoints: endpoints[name] ?? [], node: node,
                                            zones: table.zones, hinted: hinted, previous: old)
        }
        self.runtimes = runtimes
        var guards: [String: FrontendGuard] = [:]
        for (key, frontend) in table.frontends where aliases[key] == nil && (frontend.rateLimit != nil || frontend.faultInjection != nil) {
            if let old = previous?.guards[key], old.sameSettings(frontend.rateLimit, frontend.faultInjection) {
                guards[key] = old
            } else {
                guards[key] = FrontendGuard(rateLimit: frontend.rateLimit, faults: frontend.faultInjection)
            }
        }
        for (alias, target) in aliases { guards[alias] = guards[target] }
        self.guards = guards
        var identities: [UInt32: String] = [:]
        if guards.values.contains(where: { $0.rateLimit?.key == .sourceIdentity }) {
            for (ip, ref) in refs { identities[ip] = "\(ref.namespace)/\(ref.serviceAccount)" }
        }
        self.identities = identities
        var authorization: [UInt32: AuthorizationSet] = [:]
        for (address, set) in table.authorization ?? [:] {
            if let ip = IPv4Address(address), refs[ip.value]?.node == node { authorization[ip.value] = set }
        }
        self.authorization = authorization
    }

    /// This snapshot under a newer generation: what a change that left the
    /// route table as it was (ProxyTable.generationFileName) installs. Its
    /// compiled matchers, parsed endpoints, cluster runtimes and guards are
    /// shared, not built again (with 10,000 Workloads, rebuilding took
    /// tens of milliseconds of the agent's reconcile).
    func advanced(to generation: UInt64) -> RouteSnapshot {
        RouteSnapshot(self, generation: generation)
    }

    private init(_ other: RouteSnapshot, generation: UInt64) {
        var table = other.table
        table.generation = generation
        self.table = table
        matchers = other.matchers
        consumerMatchers = other.consumerMatchers
        endpoints = other.endpoints
        workloadsByIP = other.workloadsByIP
        runtimes = other.runtimes
        guards = other.guards
        identities = other.identities
        authorization = other.authorization
        maxRequestHead = other.maxRequestHead
        http2Streams = other.http2Streams
        upstreamIdle = other.upstreamIdle
        connectTimeouts = other.connectTimeouts
        lifetimes = other.lifetimes
        tlsRouted = other.tlsRouted
    }

    /// Backends ejected by outlier detection now, "ip:port" once each
    /// (the agent takes them out of the kernel's L4-only Services too).
    var ejected: [String] {
        let now = NIODeadline.now().uptimeNanoseconds
        var out = Set<String>()
        for runtime in runtimes.values {
            for b in runtime.backends where b.isEjected(now) { out.insert(b.key.description) }
        }
        return out.sorted()
    }

    var generation: UInt64 { table.generation }

    /// A TLSRoute port's frontend as a client at `source` sees it: with its
    /// namespace's consumer TLSRoutes of the port in place of the Service's
    /// own, if there are any (GEP-1294).
    func tlsFrontend(_ frontendKey: String, source: IPv4Address) -> ProxyTable.Frontend? {
        guard let frontend = table.frontends[frontendKey] else { return nil }
        if let consumers = frontend.consumers, let namespace = workloadsByIP[source.value]?.namespace,
           let consumer = consumers[namespace] {
            return consumer.applied(to: frontend)
        }
        return frontend
    }

    /// The routes of `frontendKey` a client at `source` is routed by: its
    /// namespace's consumer routes of that Service if there are any, else
    /// the Service's own (GEP-1294).
    func matcher(_ frontendKey: String, source: IPv4Address?) -> RouteMatcher? {
        if !consumerMatchers.isEmpty, let source, let byNamespace = consumerMatchers[frontendKey],
           let namespace = workloadsByIP[source.value]?.namespace, let consumer = byNamespace[namespace] {
            return consumer
        }
        return matchers[frontendKey]
    }
}

/// Request counters for `weft proxy`'s /stats (and the agent's /metrics).
final class ProxyStats: Sendable {
    let connections = Atomic<Int>(0)
    let activeConnections = Atomic<Int>(0)
    let requests = Atomic<Int>(0)
    /// Responses of the full path and of the proxy's own answers, by status class.
    let responses = ResponseClasses()
    let retries = Atomic<Int>(0)
    let retriesBudgetExhausted = Atomic<Int>(0)
    let upstreamConnectFailures = Atomic<Int>(0)
    let upstreamResets = Atomic<Int>(0)
    /// Connections to backends closed after waiting unused for MeshConfig
    /// proxy.upstreamIdleTimeout.
    let upstreamIdleClosed = Atomic<Int>(0)
    let timeouts = Atomic<Int>(0)
    let policyDenied = Atomic<Int>(0)
    let noOrigin = Atomic<Int>(0)
    let tcpPassthrough = Atomic<Int>(0)
    /// Connections to a TLSRoute's port: passed to a backend by their
    /// ClientHello's server name; closed for naming no route's hostname,
    /// or for sending no ClientHello (other bytes, or none in time).
    let tlsRouted = Atomic<Int>(0)
    let tlsRefused = Atomic<Int>(0)
    let http2Connections = Atomic<Int>(0)
    let idleClosed = Atomic<Int>(0)
    let headTimeouts = Atomic<Int>(0)
    /// Requests ended by MeshConfig proxy.streamIdleTimeout.
    let streamIdleTimeouts = Atomic<Int>(0)
    let headsTooLarge = Atomic<Int>(0)
    let upgrades = Atomic<Int>(0)
    /// Bytes relayed both ways after Upgrades, spliced ones included
    /// (added as each connection ends), and those the kernel spliced.
    let upgradedBytes = Atomic<Int>(0)
    let upgradedBytesSpliced = Atomic<Int>(0)
    /// HTTP/1.1 connections switched to HTTP/2 by the h2c Upgrade.
    let h2cUpgrades = Atomic<Int>(0)
    let mirrored = Atomic<Int>(0)
    let overflows = Atomic<Int>(0)
    /// Requests that waited for a connection at a backend's maxConnections.
    let connectionWaits = Atomic<Int>(0)
    let rateLimited = Atomic<Int>(0)
    /// Responses to requests of a rule with sessionPersistence (counted as
    /// their head is written): sent to their session's pod; that began a
    /// session (none, or an expired or foreign token); whose session's pod
    /// could not take them (gone, ejected, full, refused).
    let sessionsKept = Atomic<Int>(0)
    let sessionsStarted = Atomic<Int>(0)
    let sessionsMoved = Atomic<Int>(0)
    let faultsAborted = Atomic<Int>(0)
    let faultsDelayed = Atomic<Int>(0)
    let tunnelsIn = Atomic<Int>(0)
    let tunnelsOut = Atomic<Int>(0)
    /// Tunnels open now, from other nodes and to them.
    let tunnelsInActive = Atomic<Int>(0)
    let tunnelsOutActive = Atomic<Int>(0)
    /// Tunnels this node opened and closed for going unused (MeshConfig
    /// proxy.tunnelIdleTimeout).
    let tunnelsReleased = Atomic<Int>(0)
    /// Tunnels from other nodes this node drained for having no stream
    /// open for twice proxy.tunnelIdleTimeout (a source that did not close
    /// them).
    let tunnelsInIdleClosed = Atomic<Int>(0)
    /// Connections to the tunnel listener closed with their TLS handshake
    /// not done within proxy.requestHeaderTimeout.
    let tunnelHandshakeTimeouts = Atomic<Int>(0)
    let tunnelStreamsIn = Atomic<Int>(0)
    /// Of those, the ones carried at the frame level (TunnelRelay).
    let tunnelStreamsInRelayed = Atomic<Int>(0)
    /// HTTP/1.1 requests from tunnel streams that the express path judged
    /// and sent to (or refused for) a pod of this node.
    let tunnelRequestsExpress = Atomic<Int>(0)
    let tunnelStreamsOut = Atomic<Int>(0)
    let tunnelStreamsOutRelayed = Atomic<Int>(0)
    let tunnelRefused = Atomic<Int>(0)
    /// Health checks relayed for this node's agent, run for other nodes',
    /// and refused (not a node, or not a check the table lists).
    let probesRelayed = Atomic<Int>(0)
    let probesServed = Atomic<Int>(0)
    let probesRefused = Atomic<Int>(0)
    let authzAllowed = Atomic<Int>(0)
    let authzDenied = Atomic<Int>(0)
    let authzAudited = Atomic<Int>(0)
    /// Connections (HTTP/2: streams) the express paths handed to the full
    /// path; the requests they answered are in the LoopCounters.
    let expressHandovers = Atomic<Int>(0)

    /// The counters of requests the express paths answer, one set per
    /// event loop: every request moves them, and on counters shared by the
    /// loops each add would wait for the other core's cache line.
    final class LoopCounters: Sendable {
        let answered = Atomic<Int>(0)
        let responses = ResponseClasses()
        /// Keeps what is allocated next (the other loop's counters) off this cache line.
        private let padding: (Int, Int, Int, Int, Int, Int, Int, Int) = (0, 0, 0, 0, 0, 0, 0, 0)

        /// One request the express path answered with `code`.
        func answered(_ code: Int) {
            answered.add(1, ordering: .relaxed)
            responses.count(code)
        }
    }

    /// Response counters by status class, 1xx to 5xx.
    final class ResponseClasses: Sendable {
        private let c1xx = Atomic<Int>(0), c2xx = Atomic<Int>(0), c3xx = Atomic<Int>(0), c4xx = Atomic<Int>(0)
        private let c5xx = Atomic<Int>(0)
        /// As LoopCounters' own: one set per loop, allocated one after the other.
        private let padding: (Int, Int, Int, Int, Int, Int, Int, Int) = (0, 0, 0, 0, 0, 0, 0, 0)

        func count(_ code: Int) {
            switch code {
            case ..<200: c1xx.add(1, ordering: .relaxed)
            case ..<300: c2xx.add(1, ordering: .relaxed)
            case ..<400: c3xx.add(1, ordering: .relaxed)
            case ..<500: c4xx.add(1, ordering: .relaxed)
            default: c5xx.add(1, ordering: .relaxed)
            }
        }

        /// 1xx to 5xx.
        var values: [Int] {
            [c1xx.load(ordering: .relaxed), c2xx.load(ordering: .relaxed), c3xx.load(ordering: .relaxed),
             c4xx.load(ordering: .relaxed), c5xx.load(ordering: .relaxed)]
        }
    }
    private let loopCounters = Mutex<[LoopCounters]>([])

    /// A new set of per-loop counters, counted in `all` from now on.
    func makeLoopCounters() -> LoopCounters {
        let c = LoopCounters()
        loopCounters.withLock { $0.append(c) }
        return c
    }

    func response(_ code: Int) { responses.count(code) }

    var all: [(String, Int)] {
        var express = 0, classes = responses.values
        for c in loopCounters.withLock({ $0 }) {
            express += c.answered.load(ordering: .relaxed)
            for (i, v) in c.responses.values.enumerated() { classes[i] += v }
        }
        return [
            ("connections_total", connections.load(ordering: .relaxed)),
            ("connections_active", activeConnections.load(ordering: .relaxed)),
            ("requests_total", requests.load(ordering: .relaxed) + express),
            ("responses_1xx", classes[0]),
            ("responses_2xx", classes[1]),
            ("responses_3xx", classes[2]),
            ("responses_4xx", classes[3]),
            ("responses_5xx", classes[4]),
            ("retries_total", retries.load(ordering: .relaxed)),
            ("retries_budget_exhausted_total", retriesBudgetExhausted.load(ordering: .relaxed)),
            ("upstream_connect_failures_total", upstreamConnectFailures.load(ordering: .relaxed)),
            ("upstream_resets_total", upstreamResets.load(ordering: .relaxed)),
            ("upstream_idle_closed_total", upstreamIdleClosed.load(ordering: .relaxed)),
            ("timeouts_total", timeouts.load(ordering: .relaxed)),
            ("policy_denied_total", policyDenied.load(ordering: .relaxed)),
            ("no_origin_total", noOrigin.load(ordering: .relaxed)),
            ("tcp_passthrough_total", tcpPassthrough.load(ordering: .relaxed)),
            ("tls_routed_total", tlsRouted.load(ordering: .relaxed)),
            ("tls_refused_total", tlsRefused.load(ordering: .relaxed)),
            ("http2_connections_total", http2Connections.load(ordering: .relaxed)),
            ("idle_connections_closed_total", idleClosed.load(ordering: .relaxed)),
            ("request_header_timeouts_total", headTimeouts.load(ordering: .relaxed)),
            ("stream_idle_timeouts_total", streamIdleTimeouts.load(ordering: .relaxed)),
            ("request_heads_too_large_total", headsTooLarge.load(ordering: .relaxed)),
            ("upgrades_total", upgrades.load(ordering: .relaxed)),
            ("upgraded_bytes_total", upgradedBytes.load(ordering: .relaxed)),
            ("upgraded_bytes_spliced_total", upgradedBytesSpliced.load(ordering: .relaxed)),
            ("h2c_upgrades_total", h2cUpgrades.load(ordering: .relaxed)),
            ("mirrored_total", mirrored.load(ordering: .relaxed)),
            ("circuit_breaker_overflows_total", overflows.load(ordering: .relaxed)),
            ("circuit_breaker_waits_total", connectionWaits.load(ordering: .relaxed)),
            ("rate_limited_total", rateLimited.load(ordering: .relaxed)),
            ("faults_aborted_total", faultsAborted.load(ordering: .relaxed)),
            ("faults_delayed_total", faultsDelayed.load(ordering: .relaxed)),
            ("tunnel_connections_in_total", tunnelsIn.load(ordering: .relaxed)),
            ("tunnel_connections_out_total", tunnelsOut.load(ordering: .relaxed)),
            ("tunnel_connections_in_active", tunnelsInActive.load(ordering: .relaxed)),
            ("tunnel_connections_out_active", tunnelsOutActive.load(ordering: .relaxed)),
            ("tunnel_connections_released_total", tunnelsReleased.load(ordering: .relaxed)),
            ("tunnel_connections_in_idle_closed_total", tunnelsInIdleClosed.load(ordering: .relaxed)),
            ("tunnel_handshake_timeouts_total", tunnelHandshakeTimeouts.load(ordering: .relaxed)),
            ("tunnel_streams_in_total", tunnelStreamsIn.load(ordering: .relaxed)),
            ("tunnel_streams_in_relayed_total", tunnelStreamsInRelayed.load(ordering: .relaxed)),
            ("tunnel_requests_express_total", tunnelRequestsExpress.load(ordering: .relaxed)),
            ("tunnel_streams_out_total", tunnelStreamsOut.load(ordering: .relaxed)),
            ("tunnel_streams_out_relayed_total", tunnelStreamsOutRelayed.load(ordering: .relaxed)),
            ("tunnel_streams_refused_total", tunnelRefused.load(ordering: .relaxed)),
            ("tunnel_probes_relayed_total", probesRelayed.load(ordering: .relaxed)),
            ("tunnel_probes_served_total", probesServed.load(ordering: .relaxed)),
            ("tunnel_probes_refused_total", probesRefused.load(ordering: .relaxed)),
            ("authz_allowed_total", authzAllowed.load(ordering: .relaxed)),
            ("authz_denied_total", authzDenied.load(ordering: .relaxed)),
            ("authz_audited_total", authzAudited.load(ordering: .relaxed)),
            ("sessions_kept_total", sessionsKept.load(ordering: .relaxed)),
            ("sessions_started_total", sessionsStarted.load(ordering: .relaxed)),
            ("sessions_moved_total", sessionsMoved.load(ordering: .relaxed)),
            ("express_requests_total", express),
            ("express_handovers_total", expressHandovers.load(ordering: .relaxed)),
        ]
    }
}

/// A retry budget in Linkerd's manner: over a sliding window, retries may be
/// at most `ratio` of requests plus `minPerSecond` a second. During an
/// outage the retries stop at that bound instead of multiplying the load.
/// Kept per frontend and per event loop, so it needs no lock.
struct RetryBudget {
    static let ratio = 0.2
    static let minPerSecond = 10.0
    static let window = 10  // seconds, in one-second buckets

    private var requests = [Int](repeating: 0, count: window)
    private var retries = [Int](repeating: 0, count: window)
    private var second: Int64 = 0

    private mutating func advance(_ now: Int64) {
        if now - second >= Int64(Self.window) {
            for i in 0..<Self.window { requests[i] = 0; retries[i] = 0 }
        } else {
            var s = second + 1
            while s <= now {
                let i = Int(s % Int64(Self.window))
                requests[i] = 0
                retries[i] = 0
                s += 1
            }
        }
        second = now
    }

    mutating func recordRequest(now: Int64) {
        advance(now)
        requests[Int(now % Int64(Self.window))] += 1
    }

    /// Takes a retry from the budget if there is one left.
    mutating func withdraw(now: Int64) -> Bool {
        advance(now)
        let allowed = Self.ratio * Double(requests.reduce(0, +)) + Self.minPerSecond * Double(Self.window)
        guard Double(retries.reduce(0, +)) < allowed else { return false }
        retries[Int(now % Int64(Self.window))] += 1
        return true
    }
}
