/// What the node proxy needs to route, computed by the agent from the
/// desired state and handed to `weft proxy` whole: every Service port that
/// needs L7 work, the routes attached to it in precedence order, and the
/// ready endpoints of every Service port a route can send to ("clusters").
/// Pure data, so the proxy never parses manifests and both sides agree on
/// one generation.
public struct ProxyTable: Codable, Hashable, Sendable {
    public var generation: UInt64
    /// By "vip:port".
    public var frontends: [String: Frontend]
    /// By cluster name "namespace/service:port".
    public var clusters: [String: [Endpoint]]
    /// Every Workload of the cluster by address: who a source or an
    /// upstream is, for metrics and access logs.
    public var workloads: [String: WorkloadRef]?
    /// Every Service's TCP ports by "clusterIP:port": the Service a
    /// connection the kernel balanced and the proxy tunnels to another
    /// node was dialed for (CapturedOrigin.dialed), for its metrics.
    public var services: [String: ServiceRef]?
    /// Access logging (MeshConfig accessLog): nil is off.
    public var accessLog: AccessLogScope?
    /// MeshConfig telemetry.requestMetrics; nil is on.
    public var requestMetrics: Bool?
    /// MeshConfig proxy.idleTimeout in milliseconds; 0: never; nil: the
    /// default (MeshConfig.Proxy).
    public var idleTimeoutMilliseconds: Int?
    /// MeshConfig proxy.requestHeaderTimeout in milliseconds; 0: never;
    /// nil: the default (MeshConfig.Proxy).
    public var requestHeaderTimeoutMilliseconds: Int?
    /// MeshConfig proxy.streamIdleTimeout in milliseconds; 0: never; nil:
    /// the default (MeshConfig.Proxy).
    public var streamIdleTimeoutMilliseconds: Int?
    /// MeshConfig proxy.upstreamIdleTimeout in milliseconds; 0: never; nil:
    /// the default (MeshConfig.Proxy).
    public var upstreamIdleTimeoutMilliseconds: Int?
    /// MeshConfig proxy.tunnelIdleTimeout in milliseconds; 0: never; nil:
    /// the default (MeshConfig.Proxy).
    public var tunnelIdleTimeoutMilliseconds: Int?
    /// MeshConfig proxy.maxRequestHeaderSize in bytes; nil: the default
    /// (MeshConfig.Proxy).
    public var maxRequestHeaderSize: Int?
    /// MeshConfig proxy.http2MaxConcurrentStreams; nil: the default
    /// (MeshConfig.Proxy).
    public var http2MaxConcurrentStreams: Int?
    /// MeshConfig proxy.tcpKeepalive; nil: the default (MeshConfig.Proxy).
    public var tcpKeepalive: TCPKeepaliveSettings?
    /// MeshConfig proxy.pathNormalization; nil: BASE, the default.
    public var pathNormalization: RequestPath.Mode?
    /// MeshConfig telemetry.tracing: where spans go; nil is no export.
    public var tracing: TracingTarget?
    /// True when MeshConfig switches splicing (or the whole socket
    /// shortcut) off: the proxy then arms no splice for the opaque
    /// connections it joins, so their writes cost no report to the kernel.
    /// nil: on, the default.
    public var spliceOff: Bool?
    /// TrafficPolicy `timeout.http.connectionIdleTimeout` in milliseconds
    /// (0: never), by backend "ip:port", for the backends of the Services
    /// that set it; the others keep MeshConfig proxy.upstreamIdleTimeout. A
    /// backend of two such Services takes the shorter (0 the longest).
    public var upstreamIdleTimeouts: [String: Int]?
    /// TrafficPolicy `timeout.tcp.connectTimeout` in milliseconds, by
    /// backend "ip:port", for the backends of the Services that set it
    /// (the others: the proxy's own). A backend of two such Services takes
    /// the longer: a connect for either waits as long as the more patient
    /// asks.
    public var connectTimeouts: [String: Int]?
    /// How many requests, and for how long, the proxies use a connection
    /// to a backend (TrafficPolicy circuitBreaker.maxRequestsPerConnection,
    /// timeout.http.maxConnectionDuration), by backend "ip:port"; nil: no
    /// bound. A backend of two Services with their own takes the lower of
    /// each.
    public var connectionLifetimes: [String: ConnectionLifetime]?

    public struct ConnectionLifetime: Codable, Hashable, Sendable {
        public var maxRequests: Int?
        public var maxMilliseconds: Int?

        public init(maxRequests: Int? = nil, maxMilliseconds: Int? = nil) {
            self.maxRequests = maxRequests
            self.maxMilliseconds = maxMilliseconds
        }

        /// The lower of each bound.
        public func lower(_ other: ConnectionLifetime) -> ConnectionLifetime {
            func least(_ a: Int?, _ b: Int?) -> Int? { a.map { x in b.map { min(x, $0) } ?? x } ?? b }
            return ConnectionLifetime(maxRequests: least(maxRequests, other.maxRequests),
                                      maxMilliseconds: least(maxMilliseconds, other.maxMilliseconds))
        }
    }
    /// TrafficPolicy settings for sending to a cluster, by cluster name;
    /// a cluster without one balances by least request and breaks nothing.
    public var backendPolicies: [String: BackendPolicy]?
    /// Each node's zone (Node manifests), when a backend policy prefers
    /// its client's zone; nodes in no zone are absent.
    public var zones: [String: String]?
    /// For clusters under topology-aware routing (TopologyHints) that have
    /// hints: the addresses of the ready endpoints given to this node's
    /// zone, which its clients prefer in place of those in its zone.
    public var zoneHints: [String: [String]]?
    /// The other "address:port"s of Services' TCP ports (external
    /// addresses, node ports on the nodes' addresses: ClusterState.aliases),
    /// each to the "clusterIP:port" it is served as. The proxy takes each
    /// as that port's frontend and Service (expandingAliases); shipped as
    /// this map, not as copies, since node ports multiply by the nodes.
    public var frontendAliases: [String: String]?
    /// The nodes' addresses, where a node port alias ("0.0.0.0:port" in
    /// frontendAliases) is dialed; nil without node ports.
    public var nodeAddresses: [String]?
    /// Mutual-TLS tunnels between node proxies; nil: the agent has no CA.
    public var tunnel: TunnelSettings?
    /// The AuthorizationPolicies that apply to a pod, by its address (pods
    /// with none are absent): what the proxy decides with when it delivers
    /// to a pod of its node.
    public var authorization: [String: AuthorizationSet]?
    /// Every TrafficPolicy health check, by the backend "ip:port" it
    /// probes: what another node's proxy may ask this one to run against
    /// a pod of this node, and nothing else (nil: none configured).
    public var probes: [String: [TrafficPolicy.HealthCheck]]?

    /// TCP keepalive on opaque streams, in seconds; `time` 0: off.
    public struct TCPKeepaliveSettings: Codable, Hashable, Sendable {
        public var time: Int
        public var interval: Int
        public var probes: Int
        public init(_ k: MeshConfig.TCPKeepalive?) {
            time = Int(k?.time.components.seconds ?? 0)
            interval = Int(k?.interval.components.seconds ?? 0)
            probes = k?.probes ?? 0
        }
    }

    public struct TunnelSettings: Codable, Hashable, Sendable {
        /// Pod addresses whose PeerAuthentication mode is DISABLE: sent to
        /// in plaintext, never tunnelled.
        public var plaintext: Set<String>
        public init(plaintext: Set<String> = []) { self.plaintext = plaintext }
    }

    /// How requests to one cluster pick and guard their backends.
    public struct BackendPolicy: Codable, Hashable, Sendable {
        public var loadBalancer: TrafficPolicy.LoadBalancer
        public var outlierDetection: TrafficPolicy.OutlierDetection?
        public var circuitBreaker: TrafficPolicy.CircuitBreaker?
        /// "namespace/name" of the TrafficPolicy, for logs.
        public var policy: String
    }

    public struct TracingTarget: Codable, Hashable, Sendable {
        public var host: String
        public var port: UInt16
        public var samplingPercent: Double
        public init(host: String, port: UInt16, samplingPercent: Double) {
            self.host = host
            self.port = port
            self.samplingPercent = samplingPercent
        }
    }

    /// The file beside the route table (in the proxy's run directory) that
    /// moves the proxy to a newer generation of the same table: the agent
    /// writes a generation on every change it applies (the proxy's policy
    /// verdicts are cached per generation), and most changes (an L4
    /// Service, a policy) leave the table itself as it was, which then need
    /// not be written and read again whole (with 10,000 Workloads, about
    /// 1 MB of JSON each way).
    public static let generationFileName = "proxy-generation"

    static let nodePortPrefix = "\(ClusterState.nodePortVIP):"

    /// frontendAliases with each node port's on every node's address, as
    /// the proxy finds them dialed.
    public func resolvedAliases() -> [String: String] {
        guard let aliases = frontendAliases else { return [:] }
        var resolved: [String: String] = [:]
        for (alias, target) in aliases {
            guard alias.hasPrefix(Self.nodePortPrefix) else {
                resolved[alias] = target
                continue
            }
            let port = alias.dropFirst(Self.nodePortPrefix.count)
            for address in nodeAddresses ?? [] { resolved["\(address):\(port)"] = target }
        }
        return resolved
    }

    /// This table with each alias (resolvedAliases) given its target's
    /// frontend and Service, as the proxy looks them up.
    public func expandingAliases() -> ProxyTable {
        let aliases = resolvedAliases()
        guard !aliases.isEmpty else { return self }
        var table = self
        for (alias, target) in aliases {
            if let frontend = frontends[target] { table.frontends[alias] = frontend }
            if let service = services?[target] { table.services?[alias] = service }
        }
        return table
    }

    /// Whether `other` is this table but for its generation.
    public func sameContent(as other: ProxyTable) -> Bool {
        var copy = self
        copy.generation = other.generation
        return copy == other
    }

    public init(generation: UInt64 = 0, frontends: [String: Frontend] = [:], clusters: [String: [Endpoint]] = [:]) {
        self.generation = generation
        self.frontends = frontends
        self.clusters = clusters
    }

    public struct ServiceRef: Codable, Hashable, Sendable {
        public var name: String
        public var namespace: String
        public init(name: String, namespace: String) {
            self.name = name
            self.namespace = namespace
        }
    }

    public struct WorkloadRef: Codable, Hashable, Sendable {
        public var name: String
        public var namespace: String
        public var serviceAccount: String
        /// The node it runs on.
        public var node: String?
        public init(name: String, namespace: String, serviceAccount: String, node: String? = nil) {
            self.name = name
            self.namespace = namespace
            self.serviceAccount = serviceAccount
            self.node = node
        }
    }

    public struct AccessLogScope: Codable, Hashable, Sendable {
        /// Source namespaces whose requests are logged; empty: all.
        public var namespaces: [String]
        public init(namespaces: [String]) { self.namespaces = namespaces }
    }

    public enum UpstreamProtocol: String, Codable, Sendable {
        case http1, http2
    }

    public struct Frontend: Codable, Hashable, Sendable {
        /// "namespace/name:port-name".
        public var name: String
        public var namespace: String
        /// The Service's own name (metrics: destination_service_name).
        public var service: String?
        /// The Service port's own cluster: TCP passthrough goes there.
        public var cluster: String
        public var upstreamProtocol: UpstreamProtocol
        /// Route matches, most specific first (Gateway API precedence).
        public var matches: [RouteMatchEntry]
        /// What matched entries (and unmatched requests, at `fallback`) do.
        public var actions: [RouteAction]
        /// Action for a request no route matches: the Service itself when no
        /// route is attached, else nil (404, as the Gateway API says).
        public var fallback: Int?
        /// The Service's TrafficPolicy rate limit and injected faults.
        public var rateLimit: TrafficPolicy.RateLimit?
        public var faultInjection: TrafficPolicy.FaultInjection?
        /// GAMMA consumer routes, by the namespace they are in: a client in
        /// that namespace is routed by them instead of `matches` (a request
        /// none of them matches: 404); nil: none.
        public var consumers: [String: Consumers]? = nil
        /// TLSRoutes on the port (TLS passthrough): a connection's
        /// ClientHello server name against these, first match wins, and the
        /// matched entry's action (in `actions`) splits it among backends; a
        /// name none matches, or bytes that are no ClientHello, are closed.
        /// Empty: only consumer TLSRoutes attach here, and a client that none
        /// of them routes goes to the Service itself (`cluster`), its bytes
        /// passed on as they come. nil: the port is HTTP (`matches`).
        public var sni: [SNIMatch]? = nil

        /// The TLSRoute action a ClientHello's server name is routed by, if any.
        public func sniAction(_ serverName: String?) -> RouteAction? {
            guard let match = sni?.first(where: { $0.matches(serverName) }), actions.indices.contains(match.action) else { return nil }
            return actions[match.action]
        }
    }

    /// One TLSRoute hostname of a frontend: exact names first, then
    /// wildcards, longest suffix first, then routes with no hostnames
    /// (`hostname` nil: any name, or none); among equals, routes in
    /// namespace/name order (the Gateway API's oldest first).
    public struct SNIMatch: Codable, Hashable, Sendable {
        public var hostname: String?
        public var action: Int

        /// Whether a ClientHello's server name (lowercase; nil: it sent none) matches.
        public func matches(_ serverName: String?) -> Bool {
            guard let hostname else { return true }
            guard let serverName else { return false }
            return L4Route.hostname(hostname, matches: serverName)
        }

        /// Precedence: lower first.
        var rank: (Int, Int) {
            guard let hostname else { return (2, 0) }
            return (hostname.hasPrefix("*.") ? 1 : 0, -hostname.utf8.count)
        }
    }

    /// One namespace's consumer routes of a frontend: HTTPRoutes and
    /// GRPCRoutes (`matches`), or TLSRoutes (`sni`), their actions indexed
    /// from `actions`.
    public struct Consumers: Codable, Hashable, Sendable {
        public var matches: [RouteMatchEntry]
        public var actions: [RouteAction]
        public var sni: [SNIMatch]? = nil

        /// The frontend as a client in that namespace sees it.
        public func applied(to frontend: Frontend) -> Frontend {
            var f = frontend
            f.matches = matches
            f.actions = actions
            f.fallback = nil
            f.consumers = nil
            if let sni { f.sni = sni }
            return f
        }
    }

    public struct RouteMatchEntry: Codable, Hashable, Sendable {
        public var match: HTTPRoute.Match
        public var action: Int
    }

    public struct RouteAction: Codable, Hashable, Sendable {
        /// "namespace/route#rule" for logs and metrics; "namespace/service" for the default.
        public var name: String
        public var filters: [HTTPRoute.Filter]
        public var backends: [WeightedCluster]
        public var timeouts: HTTPRoute.Timeouts
        public var retry: HTTPRoute.Retry?
        /// The rule's sessionPersistence.
        public var session: SessionRule? = nil
    }

    /// A rule's `sessionPersistence` as the proxy applies it: the name of
    /// its cookie or header (the rule's own when it gives none, so that no
    /// two rules share a session), timeouts in whole seconds, and a tag
    /// that tells the rule's tokens from any other rule's.
    public struct SessionRule: Codable, Hashable, Sendable {
        public var name: String
        public var kind: SessionPersistence.Kind
        public var absoluteSeconds: UInt64?
        public var idleSeconds: UInt64?
        public var permanent: Bool
        public var tag: UInt32

        /// For the rule named `label` ("namespace/route#rule").
        public init(_ s: SessionPersistence, label: String) {
            // FNV-1a: stable across processes and nodes, as a token must be.
            var h: UInt32 = 0x811c_9dc5
            for b in label.utf8 { h = (h ^ UInt32(b)) &* 0x0100_0193 }
            tag = h
            let hex = String(h, radix: 16)
            let suffix = String(repeating: "0", count: 8 - hex.count) + hex
            name = s.sessionName ?? (s.kind == .cookie ? "weft-session-\(suffix)" : "x-weft-session-\(suffix)")
            kind = s.kind
            absoluteSeconds = s.absoluteTimeout.map { UInt64($0.components.seconds) }
            idleSeconds = s.idleTimeout.map { UInt64($0.components.seconds) }
            permanent = s.permanent
        }
    }

    public struct WeightedCluster: Codable, Hashable, Sendable {
        public var cluster: String
        public var weight: UInt32
        public var filters: [HTTPRoute.Filter]
        /// The upstream protocol of that Service port.
        public var upstreamProtocol: UpstreamProtocol
    }

    public struct Endpoint: Codable, Hashable, Sendable {
        public var address: String
        public var port: UInt16
        /// "namespace/name" of the Workload.
        public var workload: String
        /// The node it runs on.
        public var node: String
    }
}

extension ProxyTable {
    /// appProtocol values (and Istio-style port name prefixes) that mean HTTP.
    static let http1Names: Set<String> = ["http", "kubernetes.io/ws", "websocket", "http1"]
    static let http2Names: Set<String> = ["http2", "h2c", "grpc", "kubernetes.io/h2c", "grpc-web"]

    /// The L7 protocol a Service port declares, if any: appProtocol first,
    /// then the port name's prefix before "-" (`http-web`, `grpc`), as Istio reads it.
    public static func declaredProtocol(_ port: ServicePort) -> UpstreamProtocol? {
        if let app = port.appProtocol?.lowercased() {
            if http2Names.contains(app) { return .http2 }
            if http1Names.contains(app) { return .http1 }
            return nil
        }
        guard let name = port.name?.lowercased() else { return nil }
        let prefix = name.split(separator: "-", maxSplits: 1).first.map(String.init) ?? name
        if http2Names.contains(prefix) { return .http2 }
        if http1Names.contains(prefix) { return .http1 }
        return nil
    }

    /// The shorter of two idle timeouts in milliseconds, 0 (never) the longest.
    public static func shorterIdleTimeout(_ a: Int, _ b: Int) -> Int {
        a == 0 ? b : b == 0 ? a : min(a, b)
    }

    public static func clusterName(namespace: String, service: String, port: UInt16) -> String {
        "\(namespace)/\(service):\(port)"
    }

    /// `node`: the node the proxy serves (a Service with
    /// `internalTrafficPolicy: Local` has only its Workloads there).
    public init(_ state: ClusterState, generation: UInt64 = 0, health: EndpointHealth = .init(), node: String? = nil) {
        self.init(generation: generation)
        var refs: [String: WorkloadRef] = [:]
        refs.reserveCapacity(state.workloads.count)
        for w in state.workloads {
            refs[w.address.description] = WorkloadRef(name: w.metadata.name, namespace: w.metadata.namespace,
                                                      serviceAccount: w.serviceAccount, node: w.node)
        }
        workloads = refs
        var named: [String: ServiceRef] = [:]
        var aliases: [String: String] = [:]
        for s in state.services {
            guard let vip = s.clusterIP else { continue }
            for p in s.ports where p.transport == .tcp {
                named["\(vip):\(p.port)"] = ServiceRef(name: s.metadata.name, namespace: s.metadata.namespace)
                for (address, port) in state.aliases(of: s, p, nodesAsOne: true) { aliases["\(address):\(port)"] = "\(vip):\(p.port)" }
            }
        }
        if !named.isEmpty { services = named }
        if !aliases.isEmpty { frontendAliases = aliases }
        if aliases.keys.contains(where: { $0.hasPrefix(Self.nodePortPrefix) }) {
            nodeAddresses = state.nodeAddresses.map(\.description)
        }
        var checks: [String: [TrafficPolicy.HealthCheck]] = [:]
        for probe in state.healthChecks() where !(checks["\(probe.backend)"]?.contains(probe.check) ?? false) {
            checks["\(probe.backend)", default: []].append(probe.check)
        }
        if !checks.isEmpty { probes = checks }
        if !state.authorizationPolicies.isEmpty {
            var sets: [String: AuthorizationSet] = [:]
            for w in state.workloads {
                let applied = state.authorizationPolicies(for: w)
                if !applied.isEmpty { sets[w.address.description] = AuthorizationSet(applied) }
            }
            authorization = sets
        }
        if !state.meshConfig.telemetry.requestMetrics { requestMetrics = false }
        let proxy = state.meshConfig.proxy, defaults = MeshConfig.Proxy()
        if proxy.idleTimeout != defaults.idleTimeout {
            idleTimeoutMilliseconds = proxy.idleTimeout.map { Int($0 / .milliseconds(1)) } ?? 0
        }
        if proxy.requestHeaderTimeout != defaults.requestHeaderTimeout {
            requestHeaderTimeoutMilliseconds = proxy.requestHeaderTimeout.map { Int($0 / .milliseconds(1)) } ?? 0
        }
        if proxy.streamIdleTimeout != defaults.streamIdleTimeout {
            streamIdleTimeoutMilliseconds = proxy.streamIdleTimeout.map { Int($0 / .milliseconds(1)) } ?? 0
        }
        if proxy.upstreamIdleTimeout != defaults.upstreamIdleTimeout {
            upstreamIdleTimeoutMilliseconds = proxy.upstreamIdleTimeout.map { Int($0 / .milliseconds(1)) } ?? 0
        }
        if proxy.tunnelIdleTimeout != defaults.tunnelIdleTimeout {
            tunnelIdleTimeoutMilliseconds = proxy.tunnelIdleTimeout.map { Int($0 / .milliseconds(1)) } ?? 0
        }
        if proxy.maxRequestHeaderSize != defaults.maxRequestHeaderSize { maxRequestHeaderSize = proxy.maxRequestHeaderSize }
        if proxy.http2MaxConcurrentStreams != defaults.http2MaxConcurrentStreams {
            http2MaxConcurrentStreams = proxy.http2MaxConcurrentStreams
        }
        if proxy.tcpKeepalive != defaults.tcpKeepalive { tcpKeepalive = TCPKeepaliveSettings(proxy.tcpKeepalive) }
        if proxy.pathNormalization != defaults.pathNormalization { pathNormalization = proxy.pathNormalization }
        if !state.meshConfig.socketShortcut.enabled || !state.meshConfig.socketShortcut.splice { spliceOff = true }
        if let t = state.meshConfig.telemetry.tracing {
            tracing = TracingTarget(host: t.host.description, port: t.port, samplingPercent: t.samplingPercent)
        }
        if state.meshConfig.accessLog.enabled {
            accessLog = AccessLogScope(namespaces: state.meshConfig.accessLog.namespaces.sorted())
        }
        // Built on first use: a table with no HTTP Service selects nothing.
        var selectorIndex: SelectorIndex?
        var servicesByName: [String: Service] = [:]
        if !state.httpRoutes.isEmpty || state.l4Routes.contains(where: { $0.kind == .tls }) {
            servicesByName.reserveCapacity(state.services.count)
            for s in state.services { servicesByName[s.metadata.qualifiedName] = s }
        }

        var policies: [String: BackendPolicy] = [:]
        var idleTimeouts: [String: Int] = [:]
        var connectTimeouts: [String: Int] = [:]
        var lifetimes: [String: ConnectionLifetime] = [:]
        var hinted: [String: [String]] = [:]
        func endpoints(_ service: Service, _ port: ServicePort, cluster: String) -> [Endpoint] {
            let index = selectorIndex ?? SelectorIndex(state.workloads)
            selectorIndex = index
            let all = index.select(namespace: service.metadata.namespace, selector: service.selector).filter { w in
                !service.nodeLocal || node == nil || w.node == node
            }.compactMap { w in
                w.resolve(port.targetPort, transport: port.transport).map {
                    (Endpoint(address: w.address.description, port: $0, workload: w.metadata.qualifiedName, node: w.node),
                     BackendAddress(address: w.address, port: $0, transport: .tcp))
                }
            }
            let policy = state.trafficPolicy(forService: service.metadata.qualifiedName)
            if let idle = policy?.connectionIdleTimeout {
                let ms = Int(idle / .milliseconds(1))
                for (_, backend) in all {
                    let key = backend.description
                    idleTimeouts[key] = idleTimeouts[key].map { Self.shorterIdleTimeout($0, ms) } ?? ms
                }
            }
            if let connect = policy?.connectTimeout {
                let ms = max(1, Int(connect / .milliseconds(1)))
                for (_, backend) in all { connectTimeouts[backend.description] = max(connectTimeouts[backend.description] ?? 0, ms) }
            }
            let lifetime = ConnectionLifetime(maxRequests: policy?.circuitBreaker?.maxRequestsPerConnection,
                                              maxMilliseconds: policy?.maxConnectionDuration.map { max(1, Int($0 / .milliseconds(1))) })
            if lifetime != ConnectionLifetime() {
                for (_, backend) in all {
                    let key = backend.description
                    lifetimes[key] = lifetimes[key].map { $0.lower(lifetime) } ?? lifetime
                }
            }
            var balancer = policy?.loadBalancer ?? .init()
            var from = policy?.metadata.qualifiedName
            // sessionAffinity: ClientIP on a port the proxy serves: a hash of
            // the source address over a ring, so a client stays on one pod
            // from every node's proxy (with no timeout), unless a
            // TrafficPolicy chooses the balancer itself.
            if service.affinityTimeout != nil, balancer == .init() {
                balancer.algorithm = .ringHash
                balancer.hashOn = .sourceIP
                from = from ?? "sessionAffinity: ClientIP"
            }
            // trafficDistribution: PreferSameNode is the balancer's
            // PreferLocal, whatever algorithm picks among those backends (a
            // TrafficPolicy's locality None is its default, so a Service's
            // preference is not overruled by a policy that never spoke of it).
            if service.prefersSameNode, !service.topologyAware, balancer.locality == .none {
                balancer.locality = .preferLocal
                from = from ?? "trafficDistribution: PreferSameNode"
            }
            // Backends failing their active health check leave the proxy's
            // table (unless the Service publishes pods that are not ready);
            // its own outlier ejections it keeps track of itself.
            var ready = all.map(\.0)
            if !service.publishNotReadyAddresses, let failing = health.failing[cluster] {
                ready = EndpointHealth.usable(all, panicThreshold: policy?.healthCheck?.panicThreshold ?? EndpointHealth.defaultPanicThreshold) {
                    failing.contains($0.1)
                }.backends.map(\.0)
            }
            // The topology annotation goes before trafficDistribution (as in
            // Kubernetes), a TrafficPolicy's locality before both: the ready
            // endpoints the hints give this node's zone go first (the
            // ServiceTable does the same for the kernel's picks).
            if service.topologyAware, balancer.locality == .none {
                if !service.nodeLocal, let zone = node.flatMap({ state.zone(ofNode: $0) }),
                   case .success(let hints) = TopologyHints.assign(
                       ready.compactMap { e in IPv4Address(e.address).map { ($0, e.node) } }, in: state) {
                    balancer.locality = .preferSameZone
                    from = from ?? "\(TopologyHints.annotations[0]): Auto"
                    hinted[cluster] = ready.compactMap { e in IPv4Address(e.address).flatMap { hints[$0] } == zone ? e.address : nil }
                }
            } else if service.prefersSameZone, balancer.locality == .none {
                // PreferSameZone (PreferClose) is its PreferSameZone the same way.
                balancer.locality = .preferSameZone
                from = from ?? "trafficDistribution: \(service.trafficDistribution?.rawValue ?? "PreferSameZone")"
            }
            if balancer != .init() || policy?.outlierDetection != nil || policy?.circuitBreaker != nil, let from {
                policies[cluster] = BackendPolicy(loadBalancer: balancer, outlierDetection: policy?.outlierDetection,
                                                  circuitBreaker: policy?.circuitBreaker, policy: from)
            }
            return ready
        }
        func cluster(_ service: Service, _ port: ServicePort) -> WeightedCluster {
            let name = Self.clusterName(namespace: service.metadata.namespace, service: service.metadata.name, port: port.port)
            if clusters[name] == nil { clusters[name] = endpoints(service, port, cluster: name) }
            return WeightedCluster(cluster: name, weight: 1, filters: [],
                                   upstreamProtocol: Self.declaredProtocol(port) ?? .http1)
        }

        /// One group's routes (a Service's producer routes, or one
        /// namespace's consumer routes of it) as matches, most specific
        /// first (Gateway API precedence), and the rules' actions; a
        /// backendRef or mirror without a namespace is in its route's.
        func routeSet(_ routes: [HTTPRoute], policy: TrafficPolicy?)
            -> (matches: [RouteMatchEntry], actions: [RouteAction]) {
            var actions: [RouteAction] = []
            var entries: [(entry: RouteMatchEntry, order: RouteOrder)] = []
            // Gateway API: oldest route first among equals; Weft has no
            // creation times, so namespace/name order stands in for age.
            for route in routes.sorted(by: { $0.metadata.qualifiedName < $1.metadata.qualifiedName }) {
                let home = route.metadata.namespace
                func resolved(_ filters: [HTTPRoute.Filter]) -> [HTTPRoute.Filter] {
                    filters.map { filter in
                        guard case .requestMirror(var m) = filter else { return filter }
                        m.namespace = m.namespace ?? home
                        if let target = servicesByName["\(m.namespace ?? home)/\(m.name)"],
                           let tport = target.ports.first(where: { $0.port == m.port && $0.transport == .tcp }) {
                            _ = cluster(target, tport)
                        }
                        return .requestMirror(m)
                    }
                }
                for (r, rule) in route.rules.enumerated() {
                    let backends: [WeightedCluster] = rule.backendRefs.compactMap { ref in
                        guard let target = servicesByName["\(ref.namespace ?? home)/\(ref.name)"],
                              let tport = target.ports.first(where: { $0.port == ref.port && $0.transport == .tcp }) else { return nil }
                        var c = cluster(target, tport)
                        c.weight = ref.weight
                        c.filters = resolved(ref.filters)
                        // gRPC is HTTP/2, whatever the backend's port declares.
                        if route.kind == .grpc { c.upstreamProtocol = .http2 }
                        return c
                    }
                    let label = rule.name.map { "\(route.metadata.qualifiedName)#\($0)" } ?? "\(route.metadata.qualifiedName)#\(r)"
                    actions.append(RouteAction(name: label, filters: resolved(rule.filters), backends: backends,
                                               timeouts: policy.bound(rule.timeouts), retry: rule.retry ?? policy?.retry,
                                               session: rule.sessionPersistence.map { SessionRule($0, label: label) }))
                    for (m, match) in rule.matches.enumerated() {
                        entries.append((RouteMatchEntry(match: match, action: actions.count - 1),
                                        RouteOrder(match, route: route.metadata.qualifiedName, rule: r, index: m)))
                    }
                }
            }
            return (entries.sorted { $0.order < $1.order }.map(\.entry), actions)
        }

        // TLSRoutes (in namespace/name order) as SNI matches in precedence
        // order and the actions they index.
        func sniSet(_ routes: [L4Route]) -> (sni: [SNIMatch], actions: [RouteAction]) {
            var actions: [RouteAction] = []
            var sni: [(match: SNIMatch, order: Int)] = []
            for route in routes {
                let home = route.metadata.namespace
                let backends: [WeightedCluster] = route.backendRefs.compactMap { ref in
                    guard let target = servicesByName["\(ref.namespace ?? home)/\(ref.name)"],
                          let tport = target.ports.first(where: { $0.port == ref.port && $0.transport == .tcp }) else { return nil }
                    var c = cluster(target, tport)
                    c.weight = ref.weight
                    return c
                }
                actions.append(RouteAction(name: route.metadata.qualifiedName, filters: [], backends: backends,
                                           timeouts: .init(), retry: nil))
                let names: [String?] = route.hostnames.isEmpty ? [nil] : route.hostnames
                for name in names { sni.append((SNIMatch(hostname: name, action: actions.count - 1), sni.count)) }
            }
            sni.sort { ($0.match.rank.0, $0.match.rank.1, $0.order) < ($1.match.rank.0, $1.match.rank.1, $1.order) }
            return (sni.map(\.match), actions)
        }

        let attached = Self.routesByPort(state, servicesByName)
        let tlsAttached = Self.tlsRoutesByPort(state, servicesByName, attached: attached)

        for service in state.services {
            guard let vip = service.clusterIP else { continue }
            for port in service.ports where port.transport == .tcp {
                let declared = Self.declaredProtocol(port)
                // (No name is made for a port that is neither declared HTTP
                // nor routed: most of a large table.)
                guard declared != nil || !attached.isEmpty || !tlsAttached.isEmpty else { continue }
                let key = Self.clusterName(namespace: service.metadata.namespace, service: service.metadata.name, port: port.port)
                let routes = attached[key] ?? []
                let tlsRoutes = tlsAttached[key] ?? []
                guard declared != nil || !routes.isEmpty || !tlsRoutes.isEmpty else { continue }
                let own = cluster(service, port)
                let label = port.name.map { ":\($0)" } ?? ":\(port.port)"
                if !tlsRoutes.isEmpty {
                    // Producer routes (in the Service's namespace) route
                    // every client; a namespace's consumer routes, its own.
                    let ns = service.metadata.namespace
                    let producers = sniSet(tlsRoutes.filter { $0.metadata.namespace == ns })
                    var consumers: [String: Consumers] = [:]
                    for (consumer, its) in Dictionary(grouping: tlsRoutes.filter { $0.metadata.namespace != ns }, by: \.metadata.namespace) {
                        let set = sniSet(its)
                        consumers[consumer] = Consumers(matches: [], actions: set.actions, sni: set.sni)
                    }
                    frontends["\(vip):\(port.port)"] = Frontend(
                        name: service.metadata.qualifiedName + label, namespace: service.metadata.namespace,
                        service: service.metadata.name, cluster: own.cluster, upstreamProtocol: .http1,
                        matches: [], actions: producers.actions, fallback: nil, rateLimit: nil, faultInjection: nil,
                        consumers: consumers.isEmpty ? nil : consumers, sni: producers.sni)
                    continue
                }
                let policy = state.trafficPolicy(forService: service.metadata.qualifiedName)
                // Producer routes (in the Service's namespace) route every
                // client; a namespace's consumer routes, its own clients.
                let ns = service.metadata.namespace
                let producers = routeSet(routes.filter { $0.metadata.namespace == ns }, policy: policy)
                let matches = producers.matches
                var actions = producers.actions
                var consumers: [String: Consumers] = [:]
                for (consumer, its) in Dictionary(grouping: routes.filter { $0.metadata.namespace != ns }, by: \.metadata.namespace) {
                    let set = routeSet(its, policy: policy)
                    consumers[consumer] = Consumers(matches: set.matches, actions: set.actions)
                }
                var fallback: Int?
                if actions.isEmpty {
                    actions.append(RouteAction(name: service.metadata.qualifiedName, filters: [], backends: [own],
                                               timeouts: policy.bound(.init()), retry: policy?.retry))
                    fallback = actions.count - 1
                }
                frontends["\(vip):\(port.port)"] = Frontend(
                    name: service.metadata.qualifiedName + label, namespace: service.metadata.namespace,
                    service: service.metadata.name, cluster: own.cluster, upstreamProtocol: declared ?? .http1,
                    matches: matches, actions: actions, fallback: fallback,
                    rateLimit: policy?.rateLimit, faultInjection: policy?.faultInjection,
                    consumers: consumers.isEmpty ? nil : consumers)
            }
        }
        if !policies.isEmpty { backendPolicies = policies }
        if policies.values.contains(where: { $0.loadBalancer.locality == .preferSameZone }) {
            let zoned = state.nodes.compactMapValues(\.zone)
            if !zoned.isEmpty { zones = zoned }
        }
        if !hinted.isEmpty { zoneHints = hinted }
        if !idleTimeouts.isEmpty { upstreamIdleTimeouts = idleTimeouts }
        if !connectTimeouts.isEmpty { self.connectTimeouts = connectTimeouts }
        if !lifetimes.isEmpty { connectionLifetimes = lifetimes }
    }

    /// Routes by the Service port ("namespace/service:port") they attach to.
    /// Where GRPCRoutes and HTTPRoutes attach to one port, the GRPCRoutes
    /// (GEP-1294: one route type per Service port, GRPCRoute first).
    static func routesByPort(_ state: ClusterState, _ servicesByName: [String: Service]) -> [String: [HTTPRoute]] {
        var attached: [String: [HTTPRoute]] = [:]
        for route in state.httpRoutes {
            for parent in route.parentRefs {
                guard let service = servicesByName["\(parent.namespace)/\(parent.name)"] else { continue }
                for port in service.ports where parent.selects(port) {
                    let key = Self.clusterName(namespace: parent.namespace, service: parent.name, port: port.port)
                    if !(attached[key]?.contains(route) ?? false) { attached[key, default: []].append(route) }
                }
            }
        }
        for (key, routes) in attached where routes.contains(where: { $0.kind == .grpc }) && routes.contains(where: { $0.kind == .http }) {
            attached[key] = routes.filter { $0.kind == .grpc }
        }
        return attached
    }

    /// TLSRoutes by the Service port ("namespace/service:port") they
    /// attach to, in namespace/name order: TCP ports that declare no HTTP
    /// and that no HTTPRoute or GRPCRoute holds (ClusterState refuses a
    /// TLSRoute naming such a port; one naming none leaves them be).
    static func tlsRoutesByPort(_ state: ClusterState, _ servicesByName: [String: Service],
                                attached: [String: [HTTPRoute]]) -> [String: [L4Route]] {
        var out: [String: [L4Route]] = [:]
        for route in state.l4Routes where route.kind == .tls {
            for parent in route.parentRefs {
                guard let service = servicesByName["\(parent.namespace)/\(parent.name)"] else { continue }
                for port in service.ports where route.selects(port) && declaredProtocol(port) == nil {
                    let key = clusterName(namespace: parent.namespace, service: parent.name, port: port.port)
                    if attached[key] == nil && !(out[key]?.contains(route) ?? false) { out[key, default: []].append(route) }
                }
            }
        }
        return out
    }

    /// HTTPRoutes that a GRPCRoute on the same Service port displaces there
    /// ("kind namespace/name" to the ports, "namespace/service:port"): what
    /// `weft get routes` and the agent's log report as conflicted.
    public static func conflictedRoutes(_ state: ClusterState) -> [String: [String]] {
        var servicesByName: [String: Service] = [:]
        for s in state.services { servicesByName[s.metadata.qualifiedName] = s }
        let kept = routesByPort(state, servicesByName)
        var out: [String: [String]] = [:]
        for route in state.httpRoutes where route.kind == .http {
            for parent in route.parentRefs {
                guard let service = servicesByName["\(parent.namespace)/\(parent.name)"] else { continue }
                for port in service.ports where parent.selects(port) {
                    let key = Self.clusterName(namespace: parent.namespace, service: parent.name, port: port.port)
                    if kept[key]?.contains(route) != true {
                        out["\(route.kind.rawValue) \(route.metadata.qualifiedName)", default: []].append(key)
                    }
                }
            }
        }
        return out
    }

    /// Service ports ("namespace/service:port") that need the proxy: an
    /// HTTP-family protocol declared, or an HTTPRoute, GRPCRoute or
    /// TLSRoute attached.
    public static func l7Ports(_ state: ClusterState) -> Set<String> {
        var servicesByName: [String: Service] = [:]
        for s in state.services { servicesByName[s.metadata.qualifiedName] = s }
        let attached = routesByPort(state, servicesByName)
        var out = Set(attached.keys)
        if state.l4Routes.contains(where: { $0.kind == .tls }) {
            out.formUnion(tlsRoutesByPort(state, servicesByName, attached: attached).keys)
        }
        for service in state.services {
            for port in service.ports where port.transport == .tcp && declaredProtocol(port) != nil {
                out.insert(clusterName(namespace: service.metadata.namespace, service: service.metadata.name, port: port.port))
            }
        }
        return out
    }
}

/// Gateway API match precedence: Exact path, then the longest prefix, then
/// method, then the most header matches, then the most query matches, then
/// the oldest route and its rule order. Regular expressions are
/// implementation-specific: Weft ranks them after Exact and before prefixes.
/// Gateway API match precedence. A Service port's routes are all HTTPRoutes
/// or all GRPCRoutes (`routesByPort`); a GRPCRoute's matches go by the
/// length of their service, then of their method, then their header count.
struct RouteOrder: Comparable {
    var pathRank: Int
    var pathLength: Int
    var hasMethod: Int
    var headers: Int
    var queries: Int
    var grpcService = 0
    var grpcMethod = 0
    var route: String
    var rule: Int
    var index: Int

    init(_ m: HTTPRoute.Match, route: String, rule: Int, index: Int) {
        if let g = m.grpc {
            grpcService = g.service.utf8.count
            grpcMethod = g.method.utf8.count
        }
        switch m.path {
        case .exact(let p): pathRank = 3; pathLength = p.utf8.count
        case .regularExpression(let p): pathRank = 2; pathLength = p.utf8.count
        case .prefix(let p): pathRank = 1; pathLength = p.utf8.count
        }
        hasMethod = m.method == nil ? 0 : 1
        headers = m.headers.count
        queries = m.queryParams.count
        self.route = route
        self.rule = rule
        self.index = index
    }

    static func < (a: RouteOrder, b: RouteOrder) -> Bool {
        if a.grpcService != b.grpcService { return a.grpcService > b.grpcService }
        if a.grpcMethod != b.grpcMethod { return a.grpcMethod > b.grpcMethod }
        if a.grpcService + a.grpcMethod > 0 || b.grpcService + b.grpcMethod > 0 {
            // (Both gRPC method matches of the same lengths: headers next.)
            if a.headers != b.headers { return a.headers > b.headers }
            return (a.route, a.rule, a.index) < (b.route, b.rule, b.index)
        }
        if a.pathRank != b.pathRank { return a.pathRank > b.pathRank }
        if a.pathLength != b.pathLength { return a.pathLength > b.pathLength }
        if a.hasMethod != b.hasMethod { return a.hasMethod > b.hasMethod }
        if a.headers != b.headers { return a.headers > b.headers }
        if a.queries != b.queries { return a.queries > b.queries }
        return (a.route, a.rule, a.index) < (b.route, b.rule, b.index)
    }
}

extension TrafficPolicy? {
    /// A rule's timeouts with the Service's TrafficPolicy `requestTimeout`
    /// where the rule sets no `timeouts.request` of its own; one the rule
    /// turned off ("0s") stays off.
    func bound(_ own: HTTPRoute.Timeouts) -> HTTPRoute.Timeouts {
        var t = own
        if t.request == nil { t.request = self?.requestTimeout }
        if t.request == .zero { t.request = nil }
        return t
    }
}
