import Foundation
import Testing
@testable import WeftCore

private let service = """
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: a, namespace: shop, labels: {app: web}}
    spec: {node: n1, address: 198.18.1.10}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: b, namespace: shop, labels: {app: web}}
    spec: {node: n2, address: 198.18.2.10}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: c, namespace: shop, labels: {app: web}}
    spec: {node: n2, address: 198.18.2.11}
    """

private func policy(_ spec: String, name: String = "p", target: String = "web") -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: TrafficPolicy
    metadata: {name: \(name), namespace: shop}
    spec:
      targetRefs: [{group: "", kind: Service, name: \(target)}]
    \(spec.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
    """
}

private func parse(_ text: String) -> (ClusterState?, [String]) { buildState(text, file: "tp.yaml") }

struct TrafficPolicyTests {
    @Test func internalTrafficPolicyLocalLeavesEachNodeItsOwnPods() throws {
        let local = service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                 with: "spec: {internalTrafficPolicy: Local, clusterIP: 198.19.0.10,")
        let (state, errors) = parse(local)
        let s = try #require(state, "\(errors)")
        func addresses(_ node: String?) -> [String] {
            ServiceTable(s, node: node).entries.values.flatMap { $0.backends.map(\.address.description) }.sorted()
        }
        #expect(addresses("n1") == ["198.18.1.10"])
        #expect(addresses("n2") == ["198.18.2.10", "198.18.2.11"])
        #expect(addresses("n3") == [], "no pod there: no backend, connect() refused")
        #expect(addresses(nil).count == 3)
        #expect(ProxyTable(s, node: "n2").clusters["shop/web:80"]?.map(\.address).sorted() == ["198.18.2.10", "198.18.2.11"])
        // Cluster (the default) leaves every node every pod.
        let (plain, _) = parse(service)
        #expect(plain.map { ServiceTable($0, node: "n1").entries.values.flatMap(\.backends).count } == 3)
    }

    /// trafficDistribution: PreferSameNode: each node's ready pods while it
    /// has any, else every ready pod; the proxy's balancer PreferLocal.
    /// PreferSameZone and PreferClose, with no zones, change nothing.
    @Test func trafficDistributionPreferSameNodeKeepsClientsOnTheirNodeWhileItHasAReadyPod() throws {
        let near = service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                with: "spec: {trafficDistribution: PreferSameNode, clusterIP: 198.19.0.10,")
        let (state, errors) = parse(near)
        let s = try #require(state, "\(errors)")
        func addresses(_ node: String?, _ health: EndpointHealth = .init()) -> [String] {
            ServiceTable(s, health: health, node: node).entries.values.flatMap { $0.backends.map(\.address.description) }.sorted()
        }
        #expect(addresses("n1") == ["198.18.1.10"])
        #expect(addresses("n2") == ["198.18.2.10", "198.18.2.11"])
        #expect(addresses("n3") == ["198.18.1.10", "198.18.2.10", "198.18.2.11"], "no pod there: every pod, never refused")
        #expect(addresses(nil).count == 3)
        // n1's one pod failing its check: n1's clients go to n2's pods; one
        // of n2's failing leaves n2 its other.
        let a = BackendAddress(address: try #require(IPv4Address("198.18.1.10")), port: 8080, transport: .tcp)
        let b = BackendAddress(address: try #require(IPv4Address("198.18.2.10")), port: 8080, transport: .tcp)
        #expect(addresses("n1", EndpointHealth(failing: ["shop/web:80": [a]])) == ["198.18.2.10", "198.18.2.11"])
        #expect(addresses("n2", EndpointHealth(failing: ["shop/web:80": [b]])) == ["198.18.2.11"])
        // On the proxy: the balancer's PreferLocal (every node's pods in the
        // cluster, this node's picked first), with a policy's algorithm.
        #expect(ProxyTable(s, node: "n2").clusters["shop/web:80"]?.count == 3)
        #expect(ProxyTable(s).backendPolicies?["shop/web:80"]?.loadBalancer.locality == .preferLocal)
        #expect(ProxyTable(s).backendPolicies?["shop/web:80"]?.policy == "trafficDistribution: PreferSameNode")
        let (withPolicy, _) = parse(near + "\n---\n" + policy("loadBalancer: {type: RoundRobin}"))
        let kept = try #require(withPolicy.map { ProxyTable($0).backendPolicies?["shop/web:80"] } ?? nil)
        #expect(kept.loadBalancer.algorithm == .roundRobin && kept.loadBalancer.locality == .preferLocal && kept.policy == "shop/p")
        // A TrafficPolicy's locality PreferLocal does the same in the
        // kernel's table (and is the proxy's own).
        let (local, localErrors) = parse(service + "\n---\n" + policy("loadBalancer: {locality: PreferLocal}"))
        let l = try #require(local, "\(localErrors)")
        #expect(ServiceTable(l, node: "n1").entries.values.flatMap { $0.backends.map(\.address.description) } == ["198.18.1.10"])
        #expect(ServiceTable(l, node: "n3").entries.values.flatMap(\.backends).count == 3)
        // internalTrafficPolicy: Local is the stricter, and wins.
        let (both, _) = parse(near.replacingOccurrences(of: "trafficDistribution: PreferSameNode,",
                                                        with: "trafficDistribution: PreferSameNode, internalTrafficPolicy: Local,"))
        #expect(both.map { ServiceTable($0, node: "n3").entries.values.flatMap(\.backends).count } == 0)
        for zone in ["PreferSameZone", "PreferClose"] {
            let (z, zErrors) = parse(service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                                  with: "spec: {trafficDistribution: \(zone), clusterIP: 198.19.0.10,"))
            let zs = try #require(z, "\(zErrors)")
            #expect(zs.services.first?.trafficDistribution?.rawValue == zone)
            // No Node manifests, so no zones: every pod.
            #expect(ServiceTable(zs, node: "n1").entries.values.flatMap(\.backends).count == 3, "\(zone)")
            #expect(ProxyTable(zs).backendPolicies?["shop/web:80"]?.loadBalancer.locality == .preferSameZone, "\(zone)")
            #expect(ProxyTable(zs).zones == nil, "\(zone)")
        }
        let (_, bad) = parse(service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                          with: "spec: {trafficDistribution: Nearest, clusterIP: 198.19.0.10,"))
        #expect(bad == ["tp.yaml:1:spec.trafficDistribution: must be one of PreferSameNode, PreferSameZone, PreferClose, got \"Nearest\" (line 4)"])
    }

    /// Zones come from Node manifests (`topology.kubernetes.io/zone`):
    /// PreferSameZone keeps a node's clients on the ready pods of its
    /// zone's nodes while there are any; a node in no zone prefers nothing.
    @Test func trafficDistributionPreferSameZoneUsesTheNodesZones() throws {
        let zoned = service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                 with: "spec: {trafficDistribution: PreferSameZone, clusterIP: 198.19.0.10,")
        func node(_ name: String, _ labels: String, spec: String = "") -> String {
            "apiVersion: v1\nkind: Node\nmetadata: {name: \(name), labels: {\(labels)}}\n\(spec)"
        }
        let nodes = [node("n1", "topology.kubernetes.io/zone: a"), node("n2", "topology.kubernetes.io/zone: b"),
                     node("n3", "topology.kubernetes.io/zone: a", spec: "spec: {taints: [{key: k, effect: NoSchedule}], unschedulable: true}"),
                     node("n4", "kubernetes.io/hostname: n4")]
        let (state, errors) = parse(([zoned] + nodes).joined(separator: "\n---\n"))
        let s = try #require(state, "\(errors)")
        #expect(s.zone(ofNode: "n3") == "a" && s.zone(ofNode: "n4") == nil && s.zone(ofNode: "n9") == nil)
        func addresses(_ node: String?, _ health: EndpointHealth = .init()) -> [String] {
            ServiceTable(s, health: health, node: node).entries.values.flatMap { $0.backends.map(\.address.description) }.sorted()
        }
        #expect(addresses("n1") == ["198.18.1.10"])
        #expect(addresses("n3") == ["198.18.1.10"], "n3 shares zone a with n1, whose pod it gets")
        #expect(addresses("n2") == ["198.18.2.10", "198.18.2.11"])
        #expect(addresses("n4") == ["198.18.1.10", "198.18.2.10", "198.18.2.11"], "no zone: every pod")
        // Zone a's one pod failing its check: its clients go to zone b's.
        let a = BackendAddress(address: try #require(IPv4Address("198.18.1.10")), port: 8080, transport: .tcp)
        #expect(addresses("n3", EndpointHealth(failing: ["shop/web:80": [a]])) == ["198.18.2.10", "198.18.2.11"])
        // The proxy: the balancer's PreferSameZone and each node's zone.
        let table = ProxyTable(s)
        #expect(table.backendPolicies?["shop/web:80"]?.loadBalancer.locality == .preferSameZone)
        #expect(table.zones == ["n1": "a", "n2": "b", "n3": "a"])
        // A TrafficPolicy's locality PreferSameZone, in the kernel too.
        let (viaPolicy, policyErrors) = parse(([service, policy("loadBalancer: {locality: PreferSameZone}")] + nodes)
            .joined(separator: "\n---\n"))
        let p = try #require(viaPolicy, "\(policyErrors)")
        #expect(ServiceTable(p, node: "n2").entries.values.flatMap(\.backends).count == 2)
        #expect(ProxyTable(p).zones?["n2"] == "b")
        // Bad Node documents: namespaced, an unknown spec field, a duplicate.
        let (_, bad) = parse([node("n1", "a: b").replacingOccurrences(of: "{name: n1,", with: "{name: n1, namespace: x,"),
                              node("n2", "a: b", spec: "spec: {zone: a}"), node("n5", "a: b"), node("n5", "a: c")]
            .joined(separator: "\n---\n"))
        #expect(bad.count == 3, "\(bad)")
        #expect(bad.contains { $0.contains("metadata.namespace: a Node is not namespaced") }, "\(bad)")
        #expect(bad.contains { $0.contains("spec.zone") }, "\(bad)")
        #expect(bad.contains { $0.contains("Node n5 is already defined") }, "\(bad)")
    }

    @Test func sessionAffinityClientIPBecomesASourceHashOnTheProxyUnlessAPolicyChoosesTheBalancer() throws {
        let sticky = service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                  with: "spec: {sessionAffinity: ClientIP, clusterIP: 198.19.0.10,")
        let (state, errors) = parse(sticky)
        let s = try #require(state, "\(errors)")
        let balancer = ProxyTable(s).backendPolicies?["shop/web:80"]?.loadBalancer
        #expect(balancer?.algorithm == .ringHash && balancer?.hashOn == .sourceIP)
        #expect(ServiceTable(s).entries.values.map(\.affinityTimeout) == [10_800])
        // A policy's outlier detection rides along; its own balancer wins.
        let (withOutliers, _) = parse(sticky + "\n---\n" + policy("outlierDetection: {consecutive5xx: 3}"))
        let kept = try #require(withOutliers.map { ProxyTable($0).backendPolicies?["shop/web:80"] } ?? nil)
        #expect(kept.loadBalancer.hashOn == .sourceIP && kept.outlierDetection?.consecutive5xx == 3)
        let (chosen, _) = parse(sticky + "\n---\n" + policy("loadBalancer: {type: RoundRobin}"))
        #expect(chosen.map { ProxyTable($0).backendPolicies?["shop/web:80"]?.loadBalancer.algorithm } == .roundRobin)
    }

    /// A fault abort with Envoy Gateway's grpcStatus: gRPC calls get it,
    /// other requests the HTTP status it maps to.
    @Test func aGRPCStatusAbortParses() throws {
        for (grpc, http) in [(1, 499), (4, 504), (7, 403), (8, 429), (12, 501), (14, 503), (16, 401)] {
            let (state, errors) = parse(service + "\n---\n" + policy("faultInjection: {abort: {grpcStatus: \(grpc), percentage: 100}}"))
            let s = try #require(state, "\(errors)")
            let abort = try #require(s.trafficPolicy(forService: "shop/web")?.faultInjection?.abort)
            #expect(abort.grpcStatus == grpc && abort.httpStatus == http && abort.percentage == 100)
        }
    }

    @Test func everyFeatureParses() throws {
        let (state, errors) = parse(service + "\n---\n" + policy("""
            loadBalancer: {type: RoundRobin, slowStart: {window: 30s, aggression: 2}, locality: PreferLocal}
            healthCheck: {interval: 2s, timeout: 500ms, healthyThreshold: 2, unhealthyThreshold: 3, panicThreshold: 30, http: {path: /ready, expectedStatuses: [200, 204]}}
            outlierDetection: {consecutive5xx: 3, consecutiveGatewayErrors: 2, interval: 5s, baseEjectionTime: 10s, maxEjectionPercent: 50, successRate: {minimumHosts: 3, requestVolume: 20, stdevFactor: 1000}}
            circuitBreaker: {maxConnections: 10, maxPendingRequests: 0, maxRequests: 20, maxRetries: 2}
            rateLimit: {requests: 50, interval: 1s, burst: 60, key: Header, header: X-Tenant}
            faultInjection: {delay: {fixedDelay: 100ms, percentage: 10}, abort: {httpStatus: 503, percentage: 2.5}, routes: [shop/web], sources: [{namespace: shop, serviceAccount: client}]}
            timeout: {tcp: {connectTimeout: 250ms}, http: {connectionIdleTimeout: 0s}}
            """))
        let s = try #require(state, "\(errors)")
        let p = try #require(s.trafficPolicy(forService: "shop/web"))
        #expect(p.loadBalancer.algorithm == .roundRobin && p.loadBalancer.slowStartWindow == .seconds(30))
        #expect(p.loadBalancer.slowStartAggression == 2 && p.loadBalancer.locality == .preferLocal)
        #expect(p.healthCheck?.http?.expects(204) == true && p.healthCheck?.http?.expects(500) == false)
        #expect(p.healthCheck?.panicThreshold == 30 && p.healthCheck?.unhealthyThreshold == 3)
        #expect(p.outlierDetection?.successRate?.requestVolume == 20 && p.outlierDetection?.maxEjectionPercent == 50)
        #expect(p.circuitBreaker?.maxPendingRequests == 0 && p.circuitBreaker?.maxRequests == 20)
        #expect(p.rateLimit?.key == .header("x-tenant") && p.rateLimit?.burst == 60)
        #expect(p.faultInjection?.abort?.percentage == 2.5 && p.faultInjection?.delay?.fixedDelay == .milliseconds(100))
        #expect(p.connectTimeout == .milliseconds(250) && p.connectionIdleTimeout == .zero)
        let f = try #require(p.faultInjection)
        #expect(f.applies(route: "shop/web#0", sourceNamespace: "shop", serviceAccount: "client"))
        #expect(!f.applies(route: "shop/other#0", sourceNamespace: "shop", serviceAccount: "client"))
        #expect(!f.applies(route: "shop/web#0", sourceNamespace: "shop", serviceAccount: "intruder"))
        // The policy reaches the proxy's table: cluster and frontend sides.
        let table = ProxyTable(s)
        #expect(table.backendPolicies?["shop/web:80"]?.loadBalancer.algorithm == .roundRobin)
        // Every backend's check is listed under its address and target
        // port: what a node proxy will run for another node, and all.
        let backends = s.healthChecks().map(\.backend.description).sorted()
        #expect(!backends.isEmpty && Set(table.probes?.keys.map { $0 } ?? []) == Set(backends), "\(String(describing: table.probes))")
        #expect(table.probes?.values.allSatisfy { $0 == p.healthCheck.map { [$0] } } == true)
        #expect(table.frontends["198.19.0.10:80"]?.rateLimit?.requests == 50)
    }

    /// The route table's per-backend timeouts from `timeout.<spec>` set on
    /// the Service `web` and on `alt` (the same pods) as given (nil: no
    /// policy): what `read` takes from the table.
    private static func backendTimeouts(_ spec: (String) -> String, web: String?, alt timeout: String?,
                                        _ read: (ProxyTable) -> [String: Int]?) throws -> [String: Int]? {
        try backendTable(web: web.map { "timeout: " + spec($0) }, alt: timeout.map { "timeout: " + spec($0) }, read)
    }

    /// An HTTPRoute `r` on web's port 80 with `rules` (a YAML list indented
    /// by two spaces, as in a spec's `rules:`).
    private static func webRoute(_ rules: String) -> String {
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
        \(rules)
        """
    }

    /// The proxy's table for `web` and a second Service `alt` over the same
    /// pods, each with a TrafficPolicy of `spec` if given, and `extra`
    /// documents; what `read` takes of it.
    private static func backendTable<T>(web: String?, alt: String?, extra: String? = nil, _ read: (ProxyTable) -> T) throws -> T {
        var text = service + """

            ---
            apiVersion: v1
            kind: Service
            metadata: {name: alt, namespace: shop}
            spec: {clusterIP: 198.19.0.11, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
            """
        if let web { text += "\n---\n" + policy(web) }
        if let alt { text += "\n---\n" + policy(alt, name: "q", target: "alt") }
        if let extra { text += "\n---\n" + extra }
        let (state, errors) = parse(text)
        return read(ProxyTable(try #require(state, "\(errors)")))
    }

    private static func everyBackend(_ ms: Int) -> [String: Int] {
        Dictionary(uniqueKeysWithValues: ["198.18.1.10:8080", "198.18.2.10:8080", "198.18.2.11:8080"].map { ($0, ms) })
    }

    /// `timeout.http.connectionIdleTimeout` reaches the proxy's table by
    /// backend address; a backend of two Services with their own settings
    /// takes the shorter, `0s` (never) the longest; a Service without one
    /// leaves its backends to MeshConfig's.
    @Test func aConnectionIdleTimeoutReachesEveryBackendOfItsServices() throws {
        func table(web: String?, alt: String?) throws -> [String: Int]? {
            try Self.backendTimeouts({ "{http: {connectionIdleTimeout: \($0)}}" }, web: web, alt: alt) { $0.upstreamIdleTimeouts }
        }
        #expect(try table(web: "5s", alt: nil) == Self.everyBackend(5000))
        #expect(try table(web: "5s", alt: "2s") == Self.everyBackend(2000))
        #expect(try table(web: "5s", alt: "0s") == Self.everyBackend(5000))
        #expect(try table(web: "0s", alt: nil) == Self.everyBackend(0))
        #expect(try table(web: nil, alt: nil) == nil)
    }

    /// `timeout.tcp.connectTimeout` reaches the proxy's table by backend
    /// address; a backend of two Services with their own takes the longer.
    @Test func aConnectTimeoutReachesEveryBackendOfItsServicesTheLongerWins() throws {
        func table(web: String?, alt: String?) throws -> [String: Int]? {
            try Self.backendTimeouts({ "{tcp: {connectTimeout: \($0)}}" }, web: web, alt: alt) { $0.connectTimeouts }
        }
        #expect(try table(web: "250ms", alt: nil) == Self.everyBackend(250))
        #expect(try table(web: "250ms", alt: "5s") == Self.everyBackend(5000))
        #expect(try table(web: "1m", alt: "5s") == Self.everyBackend(60000))
        #expect(try table(web: nil, alt: nil) == nil)
    }

    /// `circuitBreaker.maxRequestsPerConnection` and
    /// `timeout.http.maxConnectionDuration` reach the proxy's table by
    /// backend address; a backend of two Services with their own takes the
    /// lower of each; a circuit breaker without it sets none.
    @Test func connectionLifetimesReachEveryBackendTheLowerOfEachWins() throws {
        func table(web: String?, alt: String?) throws -> [String: ProxyTable.ConnectionLifetime]? {
            try Self.backendTable(web: web, alt: alt) { $0.connectionLifetimes }
        }
        func every(_ l: ProxyTable.ConnectionLifetime) -> [String: ProxyTable.ConnectionLifetime] {
            Self.everyBackend(0).mapValues { _ in l }
        }
        #expect(try table(web: "circuitBreaker: {maxRequestsPerConnection: 100}", alt: nil) == every(.init(maxRequests: 100)))
        #expect(try table(web: "timeout: {http: {maxConnectionDuration: 10m}}",
                          alt: "circuitBreaker: {maxRequestsPerConnection: 5}\ntimeout: {http: {maxConnectionDuration: 1m}}")
                    == every(.init(maxRequests: 5, maxMilliseconds: 60_000)))
        #expect(try table(web: "timeout: {http: {maxConnectionDuration: 250ms}}", alt: "timeout: {http: {maxConnectionDuration: 1s}}")
                    == every(.init(maxMilliseconds: 250)))
        #expect(try table(web: "circuitBreaker: {maxRequests: 5}", alt: nil) == nil)
    }

    /// `timeout.http.requestTimeout` bounds the requests to its Service:
    /// the Service's own action where no route is attached, and each rule
    /// of an attached route that sets no `timeouts.request` (a rule's own
    /// wins, its "0s" keeps it off, its backendRequest stays); another
    /// Service's requests, over the same pods, are not bound by it.
    @Test func aRequestTimeoutBoundsEveryRuleOfItsServiceThatSetsNone() throws {
        let route = Self.webRoute("""
              - matches: [{path: {type: PathPrefix, value: /report}}]
                backendRefs: [{name: web, port: 80}]
                timeouts: {request: 30s, backendRequest: 10s}
              - backendRefs: [{name: web, port: 80}]
                timeouts: {backendRequest: 1s}
              - matches: [{path: {type: PathPrefix, value: /stream}}]
                backendRefs: [{name: web, port: 80}]
                timeouts: {request: 0s, backendRequest: 2s}
            """)
        func timeouts(_ policy: String?, route: String? = nil) throws -> [String: [HTTPRoute.Timeouts]] {
            try Self.backendTable(web: policy, alt: nil, extra: route) { table in
                table.frontends.mapValues { $0.actions.map(\.timeouts) }
            }
        }
        let bound = "timeout: {http: {requestTimeout: 5s}}"
        #expect(try timeouts(bound) == ["198.19.0.10:80": [.init(request: .seconds(5))], "198.19.0.11:80": [.init()]])
        #expect(try timeouts(bound, route: route)["198.19.0.10:80"]
                    == [.init(request: .seconds(30), backendRequest: .seconds(10)), .init(request: .seconds(5), backendRequest: .seconds(1)),
                        .init(backendRequest: .seconds(2))], "a rule's 0s keeps the request timeout off")
        #expect(try timeouts(nil, route: route)["198.19.0.10:80"]
                    == [.init(request: .seconds(30), backendRequest: .seconds(10)), .init(backendRequest: .seconds(1)),
                        .init(backendRequest: .seconds(2))])
        #expect(try timeouts("timeout: {http: {requestTimeout: 1500ms}}")["198.19.0.10:80"] == [.init(request: .milliseconds(1500))])
    }

    /// `retry` is the retry policy of every rule of the Service that sets
    /// none (a rule's own wins) and of the Service's own requests.
    @Test func aRetryPolicyGoesToEveryRuleOfItsServiceThatSetsNone() throws {
        let route = Self.webRoute("""
              - matches: [{path: {type: PathPrefix, value: /pay}}]
                backendRefs: [{name: web, port: 80}]
                retry: {codes: [502], attempts: 1}
              - backendRefs: [{name: web, port: 80}]
            """)
        func retries(_ policy: String?, route: String? = nil) throws -> [HTTPRoute.Retry?]? {
            try Self.backendTable(web: policy, alt: nil, extra: route) { $0.frontends["198.19.0.10:80"]?.actions.map(\.retry) }
        }
        let mine = HTTPRoute.Retry(codes: [503, 504], attempts: 3, backoff: .milliseconds(5))
        let policy = "retry: {codes: [503, 504], attempts: 3, backoff: 5ms}"
        #expect(try retries(policy) == [mine])
        #expect(try retries(policy, route: route) == [HTTPRoute.Retry(codes: [502], attempts: 1, backoff: .milliseconds(25)), mine])
        #expect(try retries(nil, route: route) == [HTTPRoute.Retry(codes: [502], attempts: 1, backoff: .milliseconds(25)), nil])
        #expect(try retries("retry: {}") == [HTTPRoute.Retry(codes: [], attempts: 2, backoff: .milliseconds(25))], "the API's defaults")
        #expect(try retries("retry: {grpcStatuses: [UNAVAILABLE, DEADLINE_EXCEEDED]}")?.first??.grpcStatuses == [14, 4])
    }

    /// `healthCheck.grpc`: the gRPC Health Checking Protocol, for a service
    /// name or the server as a whole, named to the node proxy that runs it
    /// for another node by `grpc:` and the name; HTTP by its path, TCP by "".
    @Test func grpcHealthChecksParse() throws {
        func check(_ text: String) throws -> TrafficPolicy.HealthCheck? {
            let (state, errors) = parse(service + "\n---\n" + policy(text))
            return try #require(state, "\(errors)").trafficPolicy(forService: "shop/web")?.healthCheck
        }
        let named = try check("healthCheck: {interval: 1s, grpc: {service: shop.Cart}}")
        #expect(named?.grpc == .init(service: "shop.Cart") && named?.http == nil && named?.probeKey == "grpc:shop.Cart")
        #expect(try check("healthCheck: {grpc: {}}")?.probeKey == "grpc:")
        #expect(try check("healthCheck: {http: {path: /ready}}")?.probeKey == "/ready")
        #expect(try check("healthCheck: {tcp: {}}")?.probeKey == "")
        // Through the proxy's table (JSON) unchanged.
        let decoded = try JSONDecoder().decode(TrafficPolicy.HealthCheck.self, from: JSONEncoder().encode(try #require(named)))
        #expect(decoded == named)
    }

    @Test func badPoliciesAreRejectedWithFileDocumentAndField() {
        let cases: [(String, String)] = [
            ("healthCheck: {interval: -1s}", "tp.yaml:5:spec.healthCheck.interval: must be positive"),
            ("healthCheck: {interval: 0s}", "spec.healthCheck.interval: must be longer than 0s"),
            ("healthCheck: {interval: 1s, timeout: 2s}", "spec.healthCheck.timeout: must not be longer than interval"),
            ("healthCheck: {unhealthyThreshold: 0}", "spec.healthCheck.unhealthyThreshold: must be at least 1"),
            ("healthCheck: {http: {expectedStatuses: [700]}}", "spec.healthCheck.http.expectedStatuses[0]: must be an HTTP status"),
            ("healthCheck: {http: {path: /h}, grpc: {}}", "spec.healthCheck.grpc: a health check is one of http, grpc and tcp, not several"),
            ("healthCheck: {grpc: {}, tcp: {}}", "spec.healthCheck.tcp: a health check is one of http, grpc and tcp, not several"),
            ("healthCheck: {grpc: {service: shop/Cart}}", "spec.healthCheck.grpc.service: must be a gRPC service name such as shop.Cart"),
            ("healthCheck: {grpc: {name: x}}", "spec.healthCheck.grpc.name: unknown field"),
            ("outlierDetection: {maxEjectionPercent: 150}", "spec.outlierDetection.maxEjectionPercent: must be from 0 to 100, got 150"),
            ("outlierDetection: {consecutive5xx: 0}", "spec.outlierDetection: every check is off"),
            ("faultInjection: {abort: {httpStatus: 503, percentage: 101}}", "spec.faultInjection.abort.percentage: must be from 0 to 100"),
            ("faultInjection: {delay: {fixedDelay: 1s, percentage: -5}}", "spec.faultInjection.delay.percentage: must be from 0 to 100"),
            ("faultInjection: {abort: {httpStatus: 42, percentage: 1}}", "spec.faultInjection.abort.httpStatus: must be an HTTP status"),
            ("faultInjection: {abort: {httpStatus: 503, grpcStatus: 14, percentage: 1}}",
             "tp.yaml:5:spec.faultInjection.abort.grpcStatus: give httpStatus or grpcStatus, not both"),
            ("faultInjection: {abort: {grpcStatus: 0, percentage: 1}}",
             "spec.faultInjection.abort.grpcStatus: must be a gRPC status code from 1 (CANCELLED) to 16 (UNAUTHENTICATED), got 0"),
            ("faultInjection: {abort: {grpcStatus: 17, percentage: 1}}", "spec.faultInjection.abort.grpcStatus: must be a gRPC status code"),
            ("faultInjection: {abort: {percentage: 1}}", "spec.faultInjection.abort.httpStatus: required field is missing (or grpcStatus)"),
            ("faultInjection: {}", "spec.faultInjection: give delay, abort or both"),
            ("loadBalancer: {type: Fastest}", "spec.loadBalancer.type: must be one of RoundRobin, LeastRequest, Random, RingHash, Maglev"),
            ("loadBalancer: {type: RingHash}", "spec.loadBalancer.hashOn: RingHash needs hashOn"),
            ("loadBalancer: {type: Maglev, hashOn: {header: x-a, sourceIP: true}}", "spec.loadBalancer.hashOn: give exactly one"),
            ("loadBalancer: {hashOn: {sourceIP: true}}", "spec.loadBalancer.hashOn: applies only to type RingHash or Maglev"),
            ("circuitBreaker: {maxRequests: 0}", "spec.circuitBreaker.maxRequests: must be at least 1, got 0"),
            ("circuitBreaker: {maxRequestsPerConnection: 0}",
             "tp.yaml:5:spec.circuitBreaker.maxRequestsPerConnection: must be at least 1, got 0"),
            ("timeout: {http: {maxConnectionDuration: 0s}}", "spec.timeout.http.maxConnectionDuration: must be longer than 0s"),
            ("timeout: {http: {maxConnectionDuration: -1m}}", "spec.timeout.http.maxConnectionDuration: must be positive"),
            ("timeout: {http: {maxConnectionDuration: forever}}", "spec.timeout.http.maxConnectionDuration"),
            ("rateLimit: {requests: 10, key: Header}", "spec.rateLimit.header: key Header needs the header's name"),
            ("rateLimit: {requests: -3}", "spec.rateLimit.requests: must be at least 1, got -3"),
            ("retries: 3", "spec.retries: unknown field"),
            ("timeout: {http: {connectionIdleTimeout: 500ms}}",
             "tp.yaml:5:spec.timeout.http.connectionIdleTimeout: must be at least 1s (or 0s: never), got \"500ms\""),
            ("timeout: {http: {connectionIdleTimeout: -1s}}", "spec.timeout.http.connectionIdleTimeout: must be at least 1s"),
            ("timeout: {http: {connectionIdleTimeout: 3}}", "spec.timeout.http.connectionIdleTimeout"),
            ("timeout: {http: {requestTimeout: 0s}}", "tp.yaml:5:spec.timeout.http.requestTimeout: must be longer than 0s"),
            ("timeout: {http: {requestTimeout: -5s}}", "spec.timeout.http.requestTimeout: must be positive"),
            ("timeout: {http: {requestTimeout: 5}}", "spec.timeout.http.requestTimeout"),
            ("timeout: {http: {streamTimeout: 1s}}", "spec.timeout.http.streamTimeout: unknown field"),
            ("retry: {attempts: 11}", "tp.yaml:5:spec.retry.attempts: must be 0-10, got 11"),
            ("retry: {codes: [200]}", "spec.retry.codes[0]: a retry code must be 400-599, got 200"),
            ("retry: {backoff: soon}", "spec.retry.backoff"),
            ("retry: {perTryTimeout: 1s}", "spec.retry.perTryTimeout: unknown field"),
            ("retry: {grpcStatuses: [NOT_FOUND]}",
             "spec.retry.grpcStatuses[0]: must be one of CANCELLED, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE, got \"NOT_FOUND\""),
            ("timeout: {tcp: {idleTimeout: 1s}}", "spec.timeout.tcp.idleTimeout: unknown field"),
            ("timeout: {tcp: {connectTimeout: 0s}}", "tp.yaml:5:spec.timeout.tcp.connectTimeout: must be longer than 0s"),
            ("timeout: {tcp: {connectTimeout: -2s}}", "spec.timeout.tcp.connectTimeout: must be positive"),
            ("timeout: {tcp: {connectTimeout: soon}}", "spec.timeout.tcp.connectTimeout"),
            ("timeout: {udp: {}}", "spec.timeout.udp: unknown field"),
        ]
        for (spec, expected) in cases {
            let (state, errors) = parse(service + "\n---\n" + policy(spec))
            #expect(state == nil, "\(spec) was accepted")
            #expect(errors.contains { $0.contains(expected) }, "\(spec): \(errors)")
        }
        let (_, unknown) = parse(service + "\n---\n" + policy("circuitBreaker: {maxRequests: 5}", target: "nowhere"))
        #expect(unknown.contains { $0.contains("tp.yaml:5:spec.targetRefs[0].name: no Service shop/nowhere in this config") }, "\(unknown)")
        let (_, twice) = parse(service + "\n---\n" + policy("circuitBreaker: {maxRequests: 5}") + "\n---\n"
            + policy("circuitBreaker: {maxRequests: 6}", name: "q"))
        #expect(twice.contains { $0.contains("tp.yaml:6:spec.targetRefs[0].name: Service shop/web already has TrafficPolicy shop/p") }, "\(twice)")
    }

    @Test func failingBackendsLeaveBothTablesUnlessTooFewRemain() throws {
        let (state, errors) = parse(service + "\n---\n" + policy("healthCheck: {interval: 1s, panicThreshold: 50}"))
        let s = try #require(state, "\(errors)")
        let a = BackendAddress(address: IPv4Address("198.18.1.10")!, port: 8080, transport: .tcp)
        let b = BackendAddress(address: IPv4Address("198.18.2.10")!, port: 8080, transport: .tcp)
        let c = BackendAddress(address: IPv4Address("198.18.2.11")!, port: 8080, transport: .tcp)
        let frontend = Frontend(vip: IPv4Address("198.19.0.10")!, port: 80, transport: .tcp)
        let one = EndpointHealth(failing: ["shop/web:80": [a]])
        #expect(ServiceTable(s, health: one).entries[frontend]?.backends == [b, c])
        #expect(ProxyTable(s, health: one).clusters["shop/web:80"]?.map(\.address) == ["198.18.2.10", "198.18.2.11"])
        // Two of three failing leaves 33% < 50%: panic, every backend serves.
        let two = EndpointHealth(failing: ["shop/web:80": [a, b]])
        #expect(ServiceTable(s, health: two).entries[frontend]?.backends == [a, b, c])
        #expect(ServiceTable(s, health: two).panic == [frontend])
        // The proxy's ejections reach only ports the kernel alone serves:
        // web's port is HTTP (the proxy balances it), db's is plain TCP.
        let (withDB, more) = parse(service + "\n---\n" + """
            apiVersion: v1
            kind: Service
            metadata: {name: db, namespace: shop}
            spec: {clusterIP: 198.19.0.11, selector: {app: web}, ports: [{name: tcp, port: 5432, targetPort: 8080}]}
            """)
        let d = try #require(withDB, "\(more)")
        let db = Frontend(vip: IPv4Address("198.19.0.11")!, port: 5432, transport: .tcp)
        #expect(ServiceTable(d, health: EndpointHealth(ejected: [c])).entries[frontend]?.backends == [a, b, c])
        #expect(ServiceTable(d, health: EndpointHealth(ejected: [c])).entries[db]?.backends == [a, b])
        #expect(EndpointHealth.usable([1, 2, 3], panicThreshold: 0) { $0 != 1 } == ([1], false))
        #expect(EndpointHealth.usable([1, 2], panicThreshold: 0) { _ in true } == ([1, 2], true))
        // publishNotReadyAddresses: failed checks leave every pod in, in
        // both tables, on TCP and UDP ports; the proxy's ejections still
        // reach a port the kernel alone serves.
        let published = service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                     with: "spec: {publishNotReadyAddresses: true, clusterIP: 198.19.0.10,")
            .replacingOccurrences(of: "ports: [{name: http, port: 80, targetPort: 8080}]",
                                  with: "ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP, targetPort: 8080}]")
        let (pub, pubErrors) = parse(published + "\n---\n" + policy("healthCheck: {interval: 1s}"))
        let p = try #require(pub, "\(pubErrors)")
        #expect(p.services.first?.publishNotReadyAddresses == true)
        let udp = Frontend(vip: IPv4Address("198.19.0.10")!, port: 53, transport: .udp)
        #expect(ServiceTable(p, health: one).entries[frontend]?.backends == [a, b, c])
        #expect(ServiceTable(p, health: one).entries[udp]?.backends.map(\.address) == [a, b, c].map(\.address))
        #expect(ProxyTable(p, health: one).clusters["shop/web:80"]?.count == 3)
        let (_, notBool) = parse(service.replacingOccurrences(of: "spec: {clusterIP: 198.19.0.10,",
                                                              with: "spec: {publishNotReadyAddresses: yes-please, clusterIP: 198.19.0.10,"))
        #expect(notBool.first?.hasPrefix("tp.yaml:1:spec.publishNotReadyAddresses: ") == true, "\(notBool)")
    }

    /// UDP is not probed: a pod failing its check on a TCP port of the
    /// Service leaves the Service's UDP port too, and only that Service's
    /// (another Service's TCP failures, or a failure on an unrelated port
    /// number, say nothing about this one's UDP port). A UDP-only Service
    /// cannot take a health check.
    @Test func aUDPPortFollowsItsPodsChecksOnTheServicesTCPPorts() throws {
        let dns = """
            apiVersion: v1
            kind: Service
            metadata: {name: dns, namespace: shop}
            spec: {clusterIP: 198.19.0.53, selector: {app: web}, ports: [{name: udp, port: 53, protocol: UDP, targetPort: 5353}, {name: tcp, port: 53, targetPort: 5353}]}
            """
        let (state, errors) = parse(service + "\n---\n" + dns + "\n---\n" + policy("healthCheck: {interval: 1s}", target: "dns"))
        let s = try #require(state, "\(errors)")
        func tcp(_ ip: String) -> BackendAddress { BackendAddress(address: IPv4Address(ip)!, port: 5353, transport: .tcp) }
        func udp(_ ip: String) -> BackendAddress { BackendAddress(address: IPv4Address(ip)!, port: 5353, transport: .udp) }
        let udpFrontend = Frontend(vip: IPv4Address("198.19.0.53")!, port: 53, transport: .udp)
        let tcpFrontend = Frontend(vip: IPv4Address("198.19.0.53")!, port: 53, transport: .tcp)
        let failing = EndpointHealth(failing: ["shop/dns:53": [tcp("198.18.2.11")]])
        #expect(ServiceTable(s, health: failing).entries[udpFrontend]?.backends == [udp("198.18.1.10"), udp("198.18.2.10")])
        #expect(ServiceTable(s, health: failing).entries[tcpFrontend]?.backends == [tcp("198.18.1.10"), tcp("198.18.2.10")])
        // Another Service's failures (web:80, same pods) do not reach dns.
        let elsewhere = EndpointHealth(failing: ["shop/web:80": [BackendAddress(address: IPv4Address("198.18.2.11")!, port: 8080, transport: .tcp)]])
        #expect(ServiceTable(s, health: elsewhere).entries[udpFrontend]?.backends.count == 3)
        // The panic threshold holds for the UDP port as for the TCP one.
        let most = EndpointHealth(failing: ["shop/dns:53": [tcp("198.18.2.10"), tcp("198.18.2.11")]])
        #expect(ServiceTable(s, health: most).entries[udpFrontend]?.backends.count == 3)
        #expect(ServiceTable(s, health: most).panic == [udpFrontend, tcpFrontend])

        let udpOnly = dns.replacingOccurrences(of: ", {name: tcp, port: 53, targetPort: 5353}", with: "")
        let (_, refused) = parse(service + "\n---\n" + udpOnly + "\n---\n" + policy("healthCheck: {interval: 1s}", target: "dns"))
        #expect(refused.contains { $0.contains("spec.targetRefs[0].name: Service shop/dns has no TCP port for healthCheck to probe") }, "\(refused)")
        let (fine, _) = parse(service + "\n---\n" + udpOnly + "\n---\n" + policy("circuitBreaker: {maxRequests: 5}", target: "dns"))
        #expect(fine != nil, "a UDP-only Service may take a TrafficPolicy without a health check")
    }
}
