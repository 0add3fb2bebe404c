import Foundation
import Testing
@testable import WeftCore

/// Topology-aware routing (`service.kubernetes.io/topology-mode: Auto`):
/// the hints Kubernetes' EndpointSlice controller would give, and the
/// kernel's and the proxy's use of them.
struct TopologyHintsTests {
    private func ip(_ text: String) -> IPv4Address { IPv4Address(text) ?? IPv4Address(UInt32(0)) }

    private func endpoints(_ zones: [String?]) -> [(address: IPv4Address, zone: String?)] {
        zones.enumerated().map { (ip("198.18.\($0.offset / 250).\($0.offset % 250 + 1)"), $0.element) }
    }

    private func given(_ result: Result<[IPv4Address: String], TopologyHints.Refusal>) -> [String: Int]? {
        guard case .success(let hints) = result else { return nil }
        return Dictionary(grouping: hints.values, by: { $0 }).mapValues(\.count)
    }

    /// The cases of the design's (KEP-2433) controller table, zones of equal
    /// cores unless said.
    @Test func hintsFollowEachZonesShareOfTheCores() {
        let two = ["a": 0.5, "b": 0.5], three = ["a": 1.0 / 3, "b": 1.0 / 3, "c": 1.0 / 3]
        #expect(TopologyHints.assign(endpoints(["a", "b"]), shares: three) == .failure(.insufficientEndpoints(2)))
        #expect(given(TopologyHints.assign(endpoints(["a", "b", "c"]), shares: three)) == ["a": 1, "b": 1, "c": 1])
        // 4 for 3: two zones would take a third more than their share.
        if case .success = TopologyHints.assign(endpoints(["a", "b", "c", "a"]), shares: three) { Issue.record("4 endpoints, 3 zones: hints") }
        #expect(given(TopologyHints.assign(endpoints(["a", "b", "a", "b"]), shares: two)) == ["a": 2, "b": 2])
        // All 4 in zone a: 2 of them are lent to b, the lowest addresses kept.
        let lent = TopologyHints.assign(endpoints(["a", "a", "a", "a"]), shares: two)
        #expect(lent == .success([ip("198.18.0.1"): "a", ip("198.18.0.2"): "a", ip("198.18.0.3"): "b", ip("198.18.0.4"): "b"]))
        // Zone a with twice the cores: half the endpoints.
        #expect(given(TopologyHints.assign(endpoints(["a", "b", "c", "c"]), shares: ["a": 0.5, "b": 0.25, "c": 0.25]))
                == ["a": 2, "b": 1, "c": 1])
        #expect(TopologyHints.assign(endpoints(["a", "a"]), shares: ["a": 1]) == .failure(.fewerThanTwoZones))
        #expect(TopologyHints.assign(endpoints(["a", nil]), shares: two) == .failure(.endpointInNoZone(ip("198.18.0.2"))))
        #expect(TopologyHints.assign(endpoints(["a", "z"]), shares: two) == .failure(.endpointInNoZone(ip("198.18.0.2"))))
        #expect(TopologyHints.assign([], shares: two) == .failure(.insufficientEndpoints(0)))
        // 400 endpoints, 4 zones of slightly different cores, all in zone d.
        let shares = ["a": 0.24, "b": 0.25, "c": 0.25, "d": 0.26]
        #expect(given(TopologyHints.assign(endpoints(Array(repeating: "d", count: 400)), shares: shares))
                == ["a": 96, "b": 100, "c": 100, "d": 104])
    }

    /// Random zones, cores and endpoints: when there are hints, every
    /// endpoint is given to exactly one zone, each zone gets its share
    /// rounded one way or the other (and never less than it over 1.2), and
    /// as many endpoints as can stay in their own zone do.
    @Test func hintsKeepEveryZoneNearItsShareAndEndpointsAtHome() {
        var rng = SplitMix(seed: 0x7090_1061)  // (seeded: a failure can be run again)
        var hinted = 0
        for _ in 0..<2_000 {
            let zones = (0..<Int.random(in: 1...5, using: &rng)).map { "z\($0)" }
            var cores: [String: Int] = [:]
            for z in zones { cores[z] = Int.random(in: 1...16, using: &rng) }
            let total = Double(cores.values.reduce(0, +))
            let shares = cores.mapValues { Double($0) / total }
            let list = endpoints((0..<Int.random(in: 0...40, using: &rng)).map { _ in zones.randomElement(using: &rng) })
            guard case .success(let hints) = TopologyHints.assign(list, shares: shares) else { continue }
            hinted += 1
            #expect(hints.count == list.count)
            var kept = 0, keepable = 0
            for z in zones {
                let desired = shares[z, default: 0] * Double(list.count)
                let got = hints.values.filter { $0 == z }.count
                #expect(Double(got) >= desired.rounded(.down) && Double(got) <= desired.rounded(.up), "\(z): \(got) of \(desired)")
                #expect(Double(got) >= (desired / 1.2).rounded(.up))
                let own = list.filter { $0.zone == z }
                kept += own.filter { hints[$0.address] == z }.count
                keepable += min(own.count, got)
            }
            #expect(kept == keepable)
        }
        #expect(hinted > 100, "too few cases with hints to tell: \(hinted)")
    }

    private static let manifests = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop, annotations: {service.kubernetes.io/topology-mode: Auto}}
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
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}
        status: {allocatable: {cpu: "2", memory: 8Gi}, capacity: {cpu: "2"}, conditions: [{type: Ready, status: "True"}]}
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n2, labels: {topology.kubernetes.io/zone: b}}
        status: {allocatable: {cpu: 1000m}}
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: cp, labels: {topology.kubernetes.io/zone: c, node-role.kubernetes.io/control-plane: ""}}
        status: {allocatable: {cpu: 64}}
        """

    private func parse(_ text: String) -> (ClusterState?, [String]) { buildState(text, file: "zones.yaml") }

    /// Zone a has 2 of the 3 cores counted (the control-plane node's are
    /// not) but 1 of the 3 pods: one of zone b's is lent to it. The kernel's
    /// table and the proxy's agree; PreferSameZone would keep each zone to
    /// its own pods.
    @Test func theKernelAndTheProxyUseTheHints() throws {
        let (state, errors) = parse(Self.manifests)
        let s = try #require(state, "\(errors)")
        #expect(s.nodes["n1"]?.allocatableMilliCPU == 2000 && s.nodes["n2"]?.allocatableMilliCPU == 1000)
        #expect(TopologyHints.zoneShares(s.nodes) == ["a": 2.0 / 3, "b": 1.0 / 3])
        func addresses(_ node: String?, _ state: ClusterState, _ health: EndpointHealth = .init()) -> [String] {
            ServiceTable(state, health: health, node: node).entries.values.flatMap { $0.backends.map(\.address.description) }.sorted()
        }
        #expect(addresses("n1", s) == ["198.18.1.10", "198.18.2.11"])
        #expect(addresses("n2", s) == ["198.18.2.10"])
        #expect(addresses("n9", s).count == 3, "a node in no zone: every pod")
        for node in ["n1", "n2"] {
            let table = ProxyTable(s, node: node)
            #expect(table.zoneHints?["shop/web:80"] == addresses(node, s), "\(node)")
            #expect(table.backendPolicies?["shop/web:80"]?.loadBalancer.locality == .preferSameZone)
            #expect(table.backendPolicies?["shop/web:80"]?.policy == "service.kubernetes.io/topology-mode: Auto")
            #expect(table.clusters["shop/web:80"]?.count == 3, "the proxy keeps every pod, to fall back on")
        }
        #expect(TopologyHints.summary(s) == ["shop/web: topology-aware routing: zone a 2 (1 of b's), zone b 1"])
        // Pod c failing its check: 2 ready pods cannot be shared 2:1
        // safely, so no hints, and every node gets both.
        let c = BackendAddress(address: ip("198.18.2.11"), port: 8080, transport: .tcp)
        let failing = EndpointHealth(failing: ["shop/web:80": [c]])
        #expect(addresses("n1", s, failing) == ["198.18.1.10", "198.18.2.10"])
        #expect(ProxyTable(s, health: failing, node: "n1").zoneHints == nil)
        // The annotation goes before trafficDistribution; a TrafficPolicy's
        // locality and internalTrafficPolicy Local before the annotation.
        let (both, _) = parse(Self.manifests.replacingOccurrences(of: "spec: {clusterIP:", with: "spec: {trafficDistribution: PreferSameZone, clusterIP:"))
        #expect(both.map { addresses("n1", $0) } == ["198.18.1.10", "198.18.2.11"])
        let (sameNode, _) = parse(Self.manifests.replacingOccurrences(of: "spec: {clusterIP:", with: "spec: {trafficDistribution: PreferSameNode, clusterIP:"))
        #expect(sameNode.map { addresses("n1", $0) } == ["198.18.1.10", "198.18.2.11"])
        #expect(sameNode.map { ProxyTable($0, node: "n1").backendPolicies?["shop/web:80"]?.policy } == "service.kubernetes.io/topology-mode: Auto")
        let (policy, policyErrors) = parse(Self.manifests + """

            ---
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: p, namespace: shop}
            spec:
              targetRefs: [{group: "", kind: Service, name: web}]
              loadBalancer: {locality: PreferSameZone}
            """)
        let p = try #require(policy, "\(policyErrors)")
        #expect(addresses("n1", p) == ["198.18.1.10"])
        #expect(ProxyTable(p, node: "n1").zoneHints == nil)
        let (local, _) = parse(Self.manifests.replacingOccurrences(of: "spec: {clusterIP:", with: "spec: {internalTrafficPolicy: Local, clusterIP:"))
        #expect(local.map { addresses("n1", $0) } == ["198.18.1.10"])
        // The older annotation; any other value is off.
        let (older, _) = parse(Self.manifests.replacingOccurrences(of: "service.kubernetes.io/topology-mode: Auto",
                                                                   with: "service.kubernetes.io/topology-aware-hints: auto"))
        #expect(older.map { addresses("n1", $0) } == ["198.18.1.10", "198.18.2.11"])
        let (off, _) = parse(Self.manifests.replacingOccurrences(of: "topology-mode: Auto", with: "topology-mode: Disabled"))
        #expect(off.map { addresses("n1", $0) }?.count == 3)
        #expect(off.map { TopologyHints.summary($0) } == [])
        let (slip, _) = parse(Self.manifests.replacingOccurrences(of: "topology-mode: Auto", with: "topology-mode: Atuo"))
        #expect(slip.map { addresses("n1", $0) }?.count == 3)
        #expect(slip.map { TopologyHints.summary($0) } == ["shop/web: service.kubernetes.io/topology-mode: \"Atuo\" is not Auto: topology-aware routing is off"])
        // No Node manifests: no zones, so no hints, and the summary says why.
        let (bare, _) = parse(Self.manifests.components(separatedBy: "\n---\napiVersion: v1\nkind: Node").first ?? "")
        #expect(bare.map { addresses("n1", $0) }?.count == 3)
        #expect(bare.map { TopologyHints.summary($0) } == ["shop/web: topology-aware routing has no hints (nodes in fewer than 2 zones): every client is sent to every ready pod"])
    }

    /// A Node's allocatable CPU: cores, decimals or thousandths; anything
    /// else is refused naming the file, document and field.
    @Test func nodeCPUQuantitiesParse() throws {
        for (text, milli) in [("4", 4000), ("\"4\"", 4000), ("0.5", 500), ("\"1.25\"", 1250), ("3500m", 3500), ("\"250m\"", 250)] {
            let (state, errors) = parse("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {allocatable: {cpu: \(text)}}")
            #expect(state?.nodes["n1"]?.allocatableMilliCPU == milli, "\(text): \(errors)")
        }
        for text in ["four", "-1", "1.5m", "\"\"", "[1]", "1e3"] {
            let (_, errors) = parse("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {allocatable: {cpu: \(text)}}")
            #expect(errors.count == 1 && errors.first?.hasPrefix("zones.yaml:1:status.allocatable.cpu: not a CPU quantity") == true,
                    "\(text): \(errors)")
        }
        // The rest of a status is left alone.
        let (state, errors) = parse("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {phase: Running, nodeInfo: {kubeletVersion: v1.31.0}}")
        #expect(state?.nodes["n1"]?.allocatableMilliCPU == nil && errors.isEmpty, "\(errors)")
    }
}


extension SplitMix: RandomNumberGenerator {}
