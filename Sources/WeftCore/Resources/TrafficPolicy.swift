/// `weft.dev/v1alpha1 TrafficPolicy`: how traffic to a Service is balanced,
/// checked, shed and broken on purpose, in one resource attached to the
/// Service the Gateway API's way (targetRefs). What Istio spreads over
/// DestinationRule and Envoy Gateway over BackendTrafficPolicy.
///
/// ```yaml
/// apiVersion: weft.dev/v1alpha1
/// kind: TrafficPolicy
/// metadata: {name: web, namespace: shop}
/// spec:
///   targetRefs: [{group: "", kind: Service, name: web}]
///   loadBalancer:
///     type: LeastRequest        # RoundRobin | LeastRequest (default) | Random | RingHash | Maglev
///     hashOn: {header: x-user}  # RingHash/Maglev: header | cookie {name, ttl} | sourceIP: true
///     slowStart: {window: 30s, aggression: 1.0}
///     locality: PreferLocal     # None (default) | PreferLocal: this node's backends while any is healthy
///   healthCheck:                # active probes from each node's agent
///     interval: 1s
///     timeout: 500ms
///     healthyThreshold: 1
///     unhealthyThreshold: 2
///     http: {path: /healthz, expectedStatuses: [200]}   # absent: a TCP connect probe
///     # or grpc: {service: shop.Cart}: the gRPC Health Checking Protocol over h2c
///     # (grpc.health.v1.Health/Check; service "" by default): passes when SERVING
///     panicThreshold: 50        # % healthy below which every backend is used again
///   outlierDetection:           # passive, in the node proxy
///     consecutive5xx: 5
///     consecutiveGatewayErrors: 5
///     interval: 10s
///     baseEjectionTime: 30s
///     maxEjectionPercent: 10
///     successRate: {minimumHosts: 5, requestVolume: 100, stdevFactor: 1900}
///   circuitBreaker: {maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 1024, maxRetries: 3}
///                               # past maxConnections a request waits for a connection (up to its
///                               # own timeout, else the connect timeout) while fewer than
///                               # maxPendingRequests wait
///   timeout:
///     tcp: {connectTimeout: 500ms}        # a connection to a backend not made in that long
///                               # fails (and the request tries another, or gets 503); 2s where absent
///     http: {connectionIdleTimeout: 1s}   # a backend connection kept for the next request,
///                               # unused that long, is closed ("0s": never); MeshConfig
///                               # spec.proxy.upstreamIdleTimeout (3s) where absent;
///                               # maxConnectionDuration: 10m: a backend connection that old takes
///                               # no new request (with circuitBreaker.maxRequestsPerConnection: N,
///                               # one that carried N); both close once what they carry is done;
///                               # requestTimeout: 5s: a request to the Service not answered in
///                               # that long, retries included, gets 504 (an HTTPRoute rule's
///                               # timeouts.request wins)
///   retry: {codes: [503], attempts: 2, backoff: 25ms}   # for requests whose route rule sets no retry
///                               # (+ grpcStatuses: [UNAVAILABLE]: a gRPC call answered with that status alone)
///   rateLimit: {requests: 100, interval: 1s, burst: 100, key: Route}   # Route | SourceIdentity | Header (+ header: NAME)
///   faultInjection:
///     delay: {fixedDelay: 100ms, percentage: 10}
///     abort: {httpStatus: 503, percentage: 5}   # or grpcStatus: 14 (a gRPC call gets it; others its HTTP status)
///     routes: [shop/web-route]  # HTTPRoute names (or name#rule); absent: every request
///     sources: [{namespace: shop, serviceAccount: client}]   # absent: every source
/// ```
public struct TrafficPolicy: Hashable, Sendable {
    public var metadata: ObjectMeta
    /// Service names in the policy's namespace.
    public var targets: [String]
    public var loadBalancer = LoadBalancer()
    public var healthCheck: HealthCheck?
    public var outlierDetection: OutlierDetection?
    public var circuitBreaker: CircuitBreaker?
    public var rateLimit: RateLimit?
    public var faultInjection: FaultInjection?
    /// `timeout.http.connectionIdleTimeout` (Envoy Gateway's
    /// BackendTrafficPolicy field; Istio's DestinationRule
    /// connectionPool.http.idleTimeout): how long the node proxies keep a
    /// connection to one of the Services' backends unused for the next
    /// request; `.zero`: for good; nil: MeshConfig proxy.upstreamIdleTimeout.
    /// For a server whose own keep-alive is shorter than the mesh's
    /// setting (gunicorn's 2 s), which a kept connection would race.
    public var connectionIdleTimeout: Duration?
    /// `timeout.tcp.connectTimeout` (Envoy Gateway's BackendTrafficPolicy;
    /// Istio's DestinationRule connectionPool.tcp.connectTimeout): how long
    /// the node proxies wait for a connection to one of the Services'
    /// backends; nil: the proxy's own (2 s).
    public var connectTimeout: Duration?
    /// `timeout.http.maxConnectionDuration` (Envoy Gateway's
    /// BackendTrafficPolicy; Istio's DestinationRule
    /// connectionPool.tcp.maxConnectionDuration): a connection to one of
    /// the Services' backends takes no new request once it is this old,
    /// and is closed once the one it carries is done (HTTP/2: once its
    /// streams are); nil: no bound. So that clients of a backend behind a
    /// load balancer, or one scaled out, move over in time.
    public var maxConnectionDuration: Duration?
    /// `timeout.http.requestTimeout` (Envoy Gateway's
    /// BackendTrafficPolicy): how long a request to the Service may take
    /// as its client sees it, retries included, where the HTTPRoute rule
    /// that routes it sets no `timeouts.request` (the rule's own wins), and
    /// for every request where no route is attached; past it the client is
    /// answered 504. nil: no bound but the rule's.
    public var requestTimeout: Duration?
    /// `retry` (as an HTTPRoute rule's: codes, attempts, backoff; Envoy
    /// Gateway's BackendTrafficPolicy has one): the retry policy of every
    /// request to the Service whose route rule sets none, and of every
    /// request where no route is attached. Idempotent requests only, within
    /// the retry budget, as a rule's; `grpcStatuses` (this policy's own
    /// field) retries a gRPC call, a POST, answered with such a status
    /// alone.
    public var retry: HTTPRoute.Retry?

    public init(metadata: ObjectMeta, targets: [String]) {
        self.metadata = metadata
        self.targets = targets
    }

    public struct LoadBalancer: Hashable, Sendable, Codable {
        public enum Algorithm: String, Hashable, Sendable, Codable, CaseIterable {
            case roundRobin = "RoundRobin", leastRequest = "LeastRequest", random = "Random"
            case ringHash = "RingHash", maglev = "Maglev"
            public var isConsistentHash: Bool { self == .ringHash || self == .maglev }
        }
        public enum HashKey: Hashable, Sendable, Codable {
            case header(String)
            /// A cookie; when a request has none and `ttl` is set, the proxy
            /// makes one up and sets it on the response (Envoy's behaviour).
            case cookie(name: String, ttl: Duration?)
            case sourceIP
        }
        public enum Locality: String, Hashable, Sendable, Codable, CaseIterable {
            /// PreferLocal: the client's node's backends first;
            /// PreferSameZone: those in its node's zone (Node).
            case none = "None", preferLocal = "PreferLocal", preferSameZone = "PreferSameZone"
        }
        public var algorithm = Algorithm.leastRequest
        public var hashOn: HashKey?
        /// New backends take a growing share of requests over this window.
        public var slowStartWindow: Duration?
        public var slowStartAggression = 1.0
        public var locality = Locality.none
        public init() {}
    }

    public struct HealthCheck: Hashable, Sendable, Codable {
        public var interval = Duration.seconds(5)
        public var timeout = Duration.seconds(1)
        public var healthyThreshold = 1
        public var unhealthyThreshold = 2
        /// nil (and `grpc` nil): a TCP connect probe.
        public var http: HTTPProbe?
        /// The gRPC Health Checking Protocol (Envoy Gateway's
        /// `healthCheck.active.grpc`, Kubernetes' gRPC probe): one
        /// `grpc.health.v1.Health/Check` call over h2c for this service
        /// name ("" asks for the server as a whole); it passes when the
        /// answer is SERVING.
        public var grpc: GRPCProbe?
        /// Percent of healthy backends below which all are used (Envoy's panic mode).
        public var panicThreshold = 50.0
        public init() {}

        public struct HTTPProbe: Hashable, Sendable, Codable {
            public var path = "/healthz"
            public var expectedStatuses: [ClosedRange<Int>] = [200...299]
            public init() {}
            public func expects(_ status: Int) -> Bool { expectedStatuses.contains { $0.contains(status) } }
        }

        public struct GRPCProbe: Hashable, Sendable, Codable {
            public var service = ""
            public init(service: String = "") { self.service = service }
        }

        /// What names this check to the node proxy that runs it for
        /// another node (TunnelProbe): the HTTP path, `grpc:` and the
        /// service for a gRPC check, "" for a TCP connect.
        public var probeKey: String {
            if let grpc { return "grpc:" + grpc.service }
            return http?.path ?? ""
        }
    }

    public struct OutlierDetection: Hashable, Sendable, Codable {
        /// 0 turns the check off.
        public var consecutive5xx = 5
        public var consecutiveGatewayErrors = 0
        public var interval = Duration.seconds(10)
        public var baseEjectionTime = Duration.seconds(30)
        public var maxEjectionPercent = 10.0
        public var successRate: SuccessRate?
        public init() {}

        public struct SuccessRate: Hashable, Sendable, Codable {
            public var minimumHosts = 5
            public var requestVolume = 100
            /// Ejected below mean - stdev * stdevFactor / 1000 (Envoy's unit).
            public var stdevFactor = 1900
            public init() {}
        }
    }

    /// Limits per backend; what exceeds them fails at once with 503 (flag UO).
    public struct CircuitBreaker: Hashable, Sendable, Codable {
        public var maxConnections: Int?
        public var maxPendingRequests: Int?
        public var maxRequests: Int?
        public var maxRetries: Int?
        /// Requests one upstream connection carries before it is closed
        /// (HTTP/2: streams opened on it); nil: no bound. Envoy Gateway's
        /// circuitBreaker.maxRequestsPerConnection, Istio's
        /// connectionPool.http.maxRequestsPerConnection.
        public var maxRequestsPerConnection: Int?
        public init() {}
    }

    public struct RateLimit: Hashable, Sendable, Codable {
        public enum Key: Hashable, Sendable, Codable {
            /// One bucket per route rule.
            case route
            /// One bucket per source pod identity (namespace/serviceAccount).
            case sourceIdentity
            /// One bucket per value of this request header.
            case header(String)
        }
        public var requests: Int
        public var interval: Duration
        /// Bucket size; default `requests`.
        public var burst: Int
        public var key: Key
        public init(requests: Int, interval: Duration, burst: Int, key: Key) {
            self.requests = requests
            self.interval = interval
            self.burst = burst
            self.key = key
        }
    }

    public struct FaultInjection: Hashable, Sendable, Codable {
        public struct Delay: Hashable, Sendable, Codable {
            public var fixedDelay: Duration
            public var percentage: Double
        }
        /// `httpStatus`, or `grpcStatus` (Envoy Gateway's, one of the two):
        /// a gRPC call is then answered that status, any other request the
        /// HTTP status it maps to (`httpStatus`, as Envoy maps one).
        public struct Abort: Hashable, Sendable, Codable {
            public var httpStatus: Int
            public var grpcStatus: Int? = nil
            public var percentage: Double

            /// The HTTP status a gRPC status stands for (google.rpc.Code's,
            /// as Envoy's grpcToHttpStatus): 1 CANCELLED 499, 2 UNKNOWN 500,
            /// 3 INVALID_ARGUMENT 400, 4 DEADLINE_EXCEEDED 504, 5 NOT_FOUND
            /// 404, 6 ALREADY_EXISTS 409, 7 PERMISSION_DENIED 403, 8
            /// RESOURCE_EXHAUSTED 429, 9 FAILED_PRECONDITION 400, 10 ABORTED
            /// 409, 11 OUT_OF_RANGE 400, 12 UNIMPLEMENTED 501, 13 INTERNAL 500,
            /// 14 UNAVAILABLE 503, 15 DATA_LOSS 500, 16 UNAUTHENTICATED 401.
            public static func httpStatus(grpc: Int) -> Int {
                [0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
                 12: 501, 13: 500, 14: 503, 15: 500, 16: 401][grpc] ?? 500
            }
        }
        public struct Source: Hashable, Sendable, Codable {
            public var namespace: String
            public var serviceAccount: String?
        }
        public var delay: Delay?
        public var abort: Abort?
        /// HTTPRoute names "namespace/name" or rules "namespace/name#rule"; empty: all.
        public var routes: [String] = []
        /// Empty: every source.
        public var sources: [Source] = []
        public init() {}

        public func applies(route: String, sourceNamespace: String?, serviceAccount: String?) -> Bool {
            if !routes.isEmpty && !routes.contains(where: { $0 == route || route.hasPrefix($0 + "#") }) { return false }
            if sources.isEmpty { return true }
            return sources.contains { s in
                s.namespace == sourceNamespace && (s.serviceAccount == nil || s.serviceAccount == serviceAccount)
            }
        }
    }
}

extension TrafficPolicy {
    init(spec node: YAMLNode, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        guard let refs = try spec.list("targetRefs"), !refs.isEmpty else {
            throw spec.error("targetRefs", "a TrafficPolicy needs at least one targetRef (a Service)")
        }
        var targets: [String] = []
        var found = ErrorList()
        _ = found.each(refs) { path, node throws(ManifestError) in
            var r = try FieldReader(node, at: location, path: path)
            var inner = ErrorList()
            inner.attempt { () throws(ManifestError) in
                let group = try r.string("group") ?? ""
                let kind = try r.string("kind") ?? "Service"
                guard group == "" || group == "core", kind == "Service" else {
                    throw ManifestError(location, field: "\(path).kind",
                                        "a TrafficPolicy targets a Service (group \"\", kind Service), got \(group.isEmpty ? "core" : group)/\(kind)")
                }
            }
            let name = inner.attempt { () throws(ManifestError) in try r.requiredString("name") } ?? ""
            inner.attempt { () throws(ManifestError) in
                if let ns = try r.string("namespace"), ns != metadata.namespace {
                    throw r.error("namespace", "a TrafficPolicy applies to Services of its own namespace (\(metadata.namespace))")
                }
            }
            try inner.check(finishing: r)
            guard !targets.contains(name) else {
                throw ManifestError(location, field: "\(path).name", "Service \(name) is targeted twice")
            }
            targets.append(name)
        }
        self.init(metadata: metadata, targets: targets)
        // Each section is read on its own, so that a mistake in one does
        // not hide another's.
        found.section(&spec, "loadBalancer") { lb throws(ManifestError) in loadBalancer = try Self.loadBalancer(&lb, at: location) }
        found.section(&spec, "healthCheck") { hc throws(ManifestError) in healthCheck = try Self.healthCheck(&hc, at: location) }
        found.section(&spec, "outlierDetection") { od throws(ManifestError) in outlierDetection = try Self.outlierDetection(&od, at: location) }
        found.section(&spec, "circuitBreaker") { cb throws(ManifestError) in circuitBreaker = try Self.circuitBreaker(&cb) }
        found.section(&spec, "rateLimit") { rl throws(ManifestError) in rateLimit = try Self.rateLimit(&rl, at: location) }
        found.section(&spec, "faultInjection") { fi throws(ManifestError) in faultInjection = try Self.faultInjection(&fi, at: location) }
        found.section(&spec, "retry") { r throws(ManifestError) in retry = try HTTPRoute.Retry(r, grpc: true, at: location) }
        found.section(&spec, "timeout") { t throws(ManifestError) in try Self.timeouts(&t, into: &self, at: location) }
        try found.check(finishing: spec)
    }

    // Each section below reads its fields each on its own (ErrorList), so
    // one mistake does not hide the next; checks that join fields come
    // after they read clean.

    static func loadBalancer(_ lb: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> LoadBalancer {
        var out = LoadBalancer()
        var found = ErrorList()
        let algorithm = found.attempt { () throws(ManifestError) in try lb.oneOf("type", LoadBalancer.Algorithm.self) }
        if let algorithm {
            out.algorithm = algorithm ?? out.algorithm
            out.hashOn = found.attempt { () throws(ManifestError) in try Self.hashOn(&lb, for: out.algorithm, at: location) } ?? nil
            found.attempt { () throws(ManifestError) in
                guard var s = try lb.mapping("slowStart") else { return }
                guard !out.algorithm.isConsistentHash else {
                    throw lb.error("slowStart", "slow start applies to RoundRobin, LeastRequest and Random, not to consistent hashing")
                }
                var inner = ErrorList()
                out.slowStartWindow = inner.attempt { () throws(ManifestError) in
                    let window = try s.requiredString("window")
                    guard let w = try HTTPRoute.duration(window, field: s.field("window"), at: location) else {
                        throw s.error("window", "must be longer than 0s")
                    }
                    return w
                }
                inner.attempt { () throws(ManifestError) in
                    guard let a = s.node("aggression") else { return }
                    guard let v = MeshConfig.percent(a), v > 0, v <= 10 else {
                        throw s.error("aggression", "must be a number above 0 and at most 10")
                    }
                    out.slowStartAggression = v
                }
                try inner.check(finishing: s)
            }
        } else {
            // Whether these fit depends on the type, which is wrong already.
            lb.ignore("hashOn", "slowStart")
        }
        found.set(&out, \.locality) { () throws(ManifestError) in try lb.oneOf("locality", LoadBalancer.Locality.self) }
        try found.check(finishing: lb)
        return out
    }

    /// `loadBalancer.hashOn`: exactly one key, for the consistent-hashing
    /// types only (which need it).
    static func hashOn(_ lb: inout FieldReader, for algorithm: LoadBalancer.Algorithm,
                       at location: DocumentLocation) throws(ManifestError) -> LoadBalancer.HashKey? {
        guard var h = try lb.mapping("hashOn") else {
            guard !algorithm.isConsistentHash else {
                throw lb.error("hashOn", "\(algorithm.rawValue) needs hashOn (header, cookie or sourceIP)")
            }
            return nil
        }
        guard algorithm.isConsistentHash else {
            throw lb.error("hashOn", "applies only to type RingHash or Maglev")
        }
        var found = ErrorList()
        var keys: [LoadBalancer.HashKey] = []
        found.attempt { () throws(ManifestError) in
            guard let name = try h.string("header") else { return }
            try HTTPRoute.headerName(name, field: h.field("header"), at: location)
            keys.append(.header(name.lowercased()))
        }
        found.attempt { () throws(ManifestError) in
            guard var c = try h.mapping("cookie") else { return }
            var inner = ErrorList()
            let name = inner.attempt { () throws(ManifestError) in
                let name = try c.requiredString("name")
                try HTTPRoute.headerName(name, field: c.field("name"), at: location)
                return name
            }
            let ttl = inner.attempt { () throws(ManifestError) in
                try c.string("ttl").flatMap { (t: String) throws(ManifestError) -> Duration? in
                    try HTTPRoute.duration(t, field: c.field("ttl"), at: location)
                }
            } ?? nil
            try inner.check(finishing: c)
            keys.append(.cookie(name: name ?? "", ttl: ttl))
        }
        found.attempt { () throws(ManifestError) in
            if let ip = try h.bool("sourceIP"), ip { keys.append(.sourceIP) }
        }
        try found.check(finishing: h)
        guard keys.count == 1 else {
            throw ManifestError(location, field: h.path, "give exactly one of header, cookie or sourceIP: true")
        }
        return keys[0]
    }

    static func healthCheck(_ hc: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> HealthCheck {
        var out = HealthCheck()
        var found = ErrorList()
        let interval = found.attempt { () throws(ManifestError) in try positiveDuration(&hc, "interval", at: location) }
        let timeout = found.attempt { () throws(ManifestError) in try positiveDuration(&hc, "timeout", at: location) }
        if let interval, let timeout {
            out.interval = interval ?? out.interval
            out.timeout = timeout ?? out.timeout
            if out.timeout > out.interval {
                found.append(hc.error("timeout", "must not be longer than interval (\(out.interval))"))
            }
        }
        found.set(&out, \.healthyThreshold) { () throws(ManifestError) in try positive(&hc, "healthyThreshold", allowZero: false) }
        found.set(&out, \.unhealthyThreshold) { () throws(ManifestError) in try positive(&hc, "unhealthyThreshold", allowZero: false) }
        found.set(&out, \.panicThreshold) { () throws(ManifestError) in try percent(&hc, "panicThreshold") }
        // One probe kind: the first given is the check, a second is an error.
        var kinds: [String] = []
        found.section(&hc, "http") { h throws(ManifestError) in
            kinds.append("http")
            out.http = try Self.httpProbe(&h, at: location)
        }
        found.section(&hc, "grpc") { g throws(ManifestError) in
            kinds.append("grpc")
            var probe = HealthCheck.GRPCProbe()
            var inner = ErrorList()
            inner.attempt { () throws(ManifestError) in
                guard let service = try g.string("service") else { return }
                // A fully qualified service name, as gRPC names them (or "").
                guard service.isEmpty || HTTPRoute.Match.isGRPCService(service) else {
                    throw g.error("service", "must be a gRPC service name such as shop.Cart (letters, digits, _ and dots), got \(quoted(service))")
                }
                probe.service = service
            }
            try inner.check(finishing: g)
            out.grpc = probe
        }
        found.section(&hc, "tcp") { t throws(ManifestError) in
            kinds.append("tcp")
            try t.finish()
        }
        for kind in kinds.dropFirst() {
            found.append(hc.error(kind, "a health check is one of http, grpc and tcp, not several"))
        }
        try found.check(finishing: hc)
        return out
    }

    /// `healthCheck.http`: the path probed and the statuses that pass.
    static func httpProbe(_ h: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> HealthCheck.HTTPProbe {
        var probe = HealthCheck.HTTPProbe()
        var found = ErrorList()
        found.attempt { () throws(ManifestError) in
            guard let path = try h.string("path") else { return }
            guard path.hasPrefix("/"), !path.utf8.contains(where: { $0 <= 0x20 || $0 >= 0x7f }) else {
                throw h.error("path", "must start with \"/\" and hold no spaces or control characters")
            }
            probe.path = path
        }
        if let statuses = found.attempt({ () throws(ManifestError) in try h.list("expectedStatuses") }) ?? nil {
            if statuses.isEmpty { found.append(h.error("expectedStatuses", "must not be empty")) }
            probe.expectedStatuses = found.each(statuses) { path, node throws(ManifestError) in
                let code = try FieldReader.int(node, at: location, path: path)
                guard (100...599).contains(code) else {
                    throw ManifestError(location, field: path, "must be an HTTP status from 100 to 599, got \(code)")
                }
                return code...code
            }
        }
        try found.check(finishing: h)
        return probe
    }

    static func outlierDetection(_ od: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> OutlierDetection {
        var out = OutlierDetection()
        var found = ErrorList()
        found.set(&out, \.consecutive5xx) { () throws(ManifestError) in try positive(&od, "consecutive5xx", allowZero: true) }
        found.set(&out, \.consecutiveGatewayErrors) { () throws(ManifestError) in try positive(&od, "consecutiveGatewayErrors", allowZero: true) }
        found.set(&out, \.interval) { () throws(ManifestError) in try positiveDuration(&od, "interval", at: location) }
        found.set(&out, \.baseEjectionTime) { () throws(ManifestError) in try positiveDuration(&od, "baseEjectionTime", at: location) }
        found.set(&out, \.maxEjectionPercent) { () throws(ManifestError) in try percent(&od, "maxEjectionPercent") }
        found.section(&od, "successRate") { sr throws(ManifestError) in
            var s = OutlierDetection.SuccessRate()
            var inner = ErrorList()
            inner.set(&s, \.minimumHosts) { () throws(ManifestError) in try positive(&sr, "minimumHosts", allowZero: false) }
            inner.set(&s, \.requestVolume) { () throws(ManifestError) in try positive(&sr, "requestVolume", allowZero: false) }
            inner.set(&s, \.stdevFactor) { () throws(ManifestError) in try positive(&sr, "stdevFactor", allowZero: false) }
            try inner.check(finishing: sr)
            out.successRate = s
        }
        try found.check(finishing: od)
        guard out.consecutive5xx > 0 || out.consecutiveGatewayErrors > 0 || out.successRate != nil else {
            throw ManifestError(location, field: od.path, "every check is off: set consecutive5xx, consecutiveGatewayErrors or successRate")
        }
        return out
    }

    static func circuitBreaker(_ cb: inout FieldReader) throws(ManifestError) -> CircuitBreaker {
        var out = CircuitBreaker()
        var found = ErrorList()
        let limits: [(key: String, field: WritableKeyPath<CircuitBreaker, Int?>, allowZero: Bool)] = [
            ("maxConnections", \.maxConnections, false), ("maxPendingRequests", \.maxPendingRequests, true),
            ("maxRequests", \.maxRequests, false), ("maxRetries", \.maxRetries, true),
            ("maxRequestsPerConnection", \.maxRequestsPerConnection, false),
        ]
        for limit in limits {
            found.set(&out, limit.field) { () throws(ManifestError) in try Self.positive(&cb, limit.key, allowZero: limit.allowZero) }
        }
        try found.check(finishing: cb)
        return out
    }

    static func rateLimit(_ rl: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> RateLimit {
        var found = ErrorList()
        let requests = found.attempt { () throws(ManifestError) in
            guard let requests = try positive(&rl, "requests", allowZero: false) else {
                throw rl.error("requests", "required field is missing")
            }
            return requests
        }
        let interval = found.attempt { () throws(ManifestError) in try positiveDuration(&rl, "interval", at: location) } ?? nil
        let burst = found.attempt { () throws(ManifestError) in try positive(&rl, "burst", allowZero: false) } ?? nil
        let keyName = found.attempt { () throws(ManifestError) in
            let keyName = try rl.string("key") ?? "Route"
            guard ["Route", "SourceIdentity", "Header"].contains(keyName) else {
                throw rl.error("key", "must be one of Route, SourceIdentity, Header, got \(quoted(keyName))")
            }
            return keyName
        }
        let header = found.attempt { () throws(ManifestError) in
            let header = try rl.string("header")
            if let header { try HTTPRoute.headerName(header, field: rl.field("header"), at: location) }
            return header
        }
        try found.check(finishing: rl)
        // (Every field read clean: the values stand in for the compiler only.)
        let key: RateLimit.Key
        switch (keyName ?? "Route", header ?? nil) {
        case ("Header", let name?): key = .header(name.lowercased())
        case ("Header", nil): throw rl.error("header", "key Header needs the header's name")
        case (_, .some): throw rl.error("header", "applies only to key Header")
        case ("SourceIdentity", nil): key = .sourceIdentity
        default: key = .route
        }
        let limit = requests ?? 1
        return RateLimit(requests: limit, interval: interval ?? .seconds(1), burst: burst ?? limit, key: key)
    }

    static func faultInjection(_ fi: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> FaultInjection {
        var out = FaultInjection()
        var found = ErrorList()
        found.section(&fi, "delay") { d throws(ManifestError) in
            var inner = ErrorList()
            let delay = inner.attempt { () throws(ManifestError) in
                let text = try d.requiredString("fixedDelay")
                guard let delay = try HTTPRoute.duration(text, field: d.field("fixedDelay"), at: location) else {
                    throw d.error("fixedDelay", "must be longer than 0s")
                }
                return delay
            }
            let p = inner.attempt { () throws(ManifestError) in try required(percent(&d, "percentage"), d, "percentage") }
            try inner.check(finishing: d)
            if let delay, let p { out.delay = .init(fixedDelay: delay, percentage: p) }
        }
        found.section(&fi, "abort") { a throws(ManifestError) in
            var inner = ErrorList()
            let status = inner.attempt { () throws(ManifestError) -> (http: Int, grpc: Int?) in
                let code = try a.int("httpStatus"), grpc = try a.int("grpcStatus")
                if code != nil && grpc != nil { throw a.error("grpcStatus", "give httpStatus or grpcStatus, not both") }
                if let code, !(200...599).contains(code) {
                    throw a.error("httpStatus", "must be an HTTP status from 200 to 599, got \(code)")
                }
                if let grpc, !(1...16).contains(grpc) {
                    throw a.error("grpcStatus", "must be a gRPC status code from 1 (CANCELLED) to 16 (UNAUTHENTICATED), got \(grpc)")
                }
                guard let status = code ?? grpc.map({ FaultInjection.Abort.httpStatus(grpc: $0) }) else {
                    throw a.error("httpStatus", "required field is missing (or grpcStatus)")
                }
                return (status, grpc)
            }
            let p = inner.attempt { () throws(ManifestError) in try required(percent(&a, "percentage"), a, "percentage") }
            try inner.check(finishing: a)
            if let status, let p { out.abort = .init(httpStatus: status.http, grpcStatus: status.grpc, percentage: p) }
        }
        out.routes = found.each(&fi, "routes") { path, node throws(ManifestError) in
            let name = try FieldReader.string(node, at: location, path: path)
            let base = name.split(separator: "#", maxSplits: 1).first.map(String.init) ?? name
            let parts = base.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 2, parts.allSatisfy({ MeshConfig.isDNSLabel(String($0)) || Validation.dnsSubdomain(String($0)) }) else {
                throw ManifestError(location, field: path, "must name an HTTPRoute as namespace/name (or namespace/name#rule), got \(quoted(name))")
            }
            return name
        }
        out.sources = found.each(&fi, "sources") { path, node throws(ManifestError) in
            var s = try FieldReader(node, at: location, path: path)
            var inner = ErrorList()
            let ns = inner.attempt { () throws(ManifestError) in try s.requiredString("namespace") }
            let sa = inner.attempt { () throws(ManifestError) in try s.string("serviceAccount") } ?? nil
            try inner.check(finishing: s)
            return .init(namespace: ns ?? "", serviceAccount: sa)
        }
        try found.check(finishing: fi)
        guard out.delay != nil || out.abort != nil else {
            throw ManifestError(location, field: fi.path, "give delay, abort or both")
        }
        return out
    }

    /// `timeout: {tcp: {connectTimeout}, http: {connectionIdleTimeout,
    /// maxConnectionDuration, requestTimeout}}`, into `policy`.
    static func timeouts(_ t: inout FieldReader, into policy: inout TrafficPolicy, at location: DocumentLocation) throws(ManifestError) {
        var found = ErrorList()
        found.section(&t, "tcp") { tcp throws(ManifestError) in
            var inner = ErrorList()
            policy.connectTimeout = inner.attempt { () throws(ManifestError) in
                try Self.positiveDuration(&tcp, "connectTimeout", at: location)
            } ?? nil
            try inner.check(finishing: tcp)
        }
        found.section(&t, "http") { http throws(ManifestError) in
            var inner = ErrorList()
            inner.attempt { () throws(ManifestError) in
                guard let text = try http.string("connectionIdleTimeout") else { return }
                let never = "must be at least 1s (or 0s: never), got \(quoted(text))"
                if text.hasPrefix("-") { throw http.error("connectionIdleTimeout", never) }
                let d = try HTTPRoute.duration(text, field: http.field("connectionIdleTimeout"), at: location)
                if let d, d < .seconds(1) { throw http.error("connectionIdleTimeout", never) }
                policy.connectionIdleTimeout = d ?? .zero
            }
            policy.maxConnectionDuration = inner.attempt { () throws(ManifestError) in
                try Self.positiveDuration(&http, "maxConnectionDuration", at: location)
            } ?? nil
            policy.requestTimeout = inner.attempt { () throws(ManifestError) in
                try Self.positiveDuration(&http, "requestTimeout", at: location)
            } ?? nil
            try inner.check(finishing: http)
        }
        try found.check(finishing: t)
    }

    /// A field that must be given.
    static func required<T>(_ value: T?, _ r: FieldReader, _ key: String) throws(ManifestError) -> T {
        guard let value else { throw r.error(key, "required field is missing") }
        return value
    }

    /// An integer >= 1 (or >= 0).
    static func positive(_ r: inout FieldReader, _ key: String, allowZero: Bool) throws(ManifestError) -> Int? {
        guard let v = try r.int(key) else { return nil }
        guard v >= (allowZero ? 0 : 1) else { throw r.error(key, "must be \(allowZero ? "0 or more" : "at least 1"), got \(v)") }
        return v
    }

    /// A Gateway API duration above zero ("-1s" and "0s" are refused).
    static func positiveDuration(_ r: inout FieldReader, _ key: String, at location: DocumentLocation) throws(ManifestError) -> Duration? {
        guard let text = try r.string(key) else { return nil }
        if text.hasPrefix("-") { throw r.error(key, "must be positive, got \(quoted(text))") }
        guard let d = try HTTPRoute.duration(text, field: r.field(key), at: location) else {
            throw r.error(key, "must be longer than 0s")
        }
        return d
    }

    /// A number from 0 to 100.
    static func percent(_ r: inout FieldReader, _ key: String) throws(ManifestError) -> Double? {
        guard let node = r.node(key) else { return nil }
        guard let v = MeshConfig.percent(node) else { throw r.error(key, "expected a number from 0 to 100, got \(FieldReader.describe(node))") }
        guard (0...100).contains(v) else { throw r.error(key, "must be from 0 to 100, got \(v.plainNumber)") }
        return v
    }
}

extension Double {
    /// "12" for 12.0, "12.5" otherwise (for error messages).
    var plainNumber: String { self == rounded() && abs(self) < 1e15 ? String(Int(self)) : String(self) }
}

extension ClusterState {
    /// One active health check of one backend.
    public struct HealthProbe: Hashable, Sendable {
        /// The Service port's cluster name.
        public var cluster: String
        public var workload: Workload
        public var backend: BackendAddress
        public var check: TrafficPolicy.HealthCheck
    }

    /// Every TCP port of every Service whose TrafficPolicy has a
    /// healthCheck, at each of its backends.
    /// Called by each reconcile twice (the agent's probes, the proxy's
    /// table): one pass over the Services, not one per policy.
    public func healthChecks() -> [HealthProbe] {
        var out: [HealthProbe] = []
        let checked = trafficPolicies.filter { $0.healthCheck != nil }
        guard !checked.isEmpty else { return out }
        var byName: [String: Service] = [:]
        for s in services { byName[s.metadata.qualifiedName] = s }
        for policy in checked {
            guard let check = policy.healthCheck else { continue }
            for name in policy.targets {
                guard let service = byName["\(policy.metadata.namespace)/\(name)"] else { continue }
                for port in service.ports where port.transport == .tcp {
                    let cluster = ProxyTable.clusterName(namespace: service.metadata.namespace, service: name, port: port.port)
                    for w in backends(of: service) {
                        guard let target = w.resolve(port.targetPort, transport: .tcp) else { continue }
                        out.append(HealthProbe(cluster: cluster, workload: w,
                                               backend: BackendAddress(address: w.address, port: target, transport: .tcp), check: check))
                    }
                }
            }
        }
        return out
    }
}
