import Foundation
import Testing
@testable import WeftCore

private let base = """
    apiVersion: v1
    kind: Service
    metadata: {name: db, namespace: shop}
    spec: {clusterIP: 198.19.0.20, selector: {app: db}, ports: [{name: sql, port: 5432}, {name: dns, port: 53, protocol: UDP}, {name: web, port: 80, appProtocol: http}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: db-v1, namespace: shop}
    spec: {clusterIP: 198.19.0.21, selector: {app: db, track: v1}, ports: [{name: sql, port: 5432}, {name: dns, port: 53, protocol: UDP}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: db-v2, namespace: shop}
    spec: {clusterIP: 198.19.0.22, selector: {app: db, track: v2}, ports: [{name: sql, port: 5432}, {name: dns, port: 53, protocol: UDP}]}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: v1-a, namespace: shop, labels: {app: db, track: v1}}
    spec: {node: n1, address: 198.18.1.20}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: v1-b, namespace: shop, labels: {app: db, track: v1}}
    spec: {node: n2, address: 198.18.2.20}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: v2, namespace: shop, labels: {app: db, track: v2}}
    spec: {node: n1, address: 198.18.1.21}
    """

private func route(_ rules: String, kind: String = "TCPRoute", parent: String = "{group: \"\", kind: Service, name: db}") -> String {
    """
    apiVersion: gateway.networking.k8s.io/v1alpha2
    kind: \(kind)
    metadata: {name: split, namespace: shop}
    spec:
      parentRefs: [\(parent)]
      rules:
    \(rules)
    """
}

private func errors(_ extra: String) -> String {
    let (resources, parse) = ManifestReader.parse(base + "\n---\n" + extra, file: "t.yaml")
    switch ClusterState.build(resources, parseErrors: parse) {
    case .success: return ""
    case .failure(let e): return e.description
    }
}

private func b(_ address: String, _ port: UInt16 = 5432, _ t: TransportProtocol = .tcp) -> BackendAddress {
    BackendAddress(address: IPv4Address(address)!, port: port, transport: t)
}

/// TCPRoute and UDPRoute (GAMMA, experimental channel): weighted splits of a
/// Service's TCP or UDP ports carried out in the kernel's slot table.
@Suite struct L4RouteTests {
    @Test func slotsFollowTheWeights() {
        let v1 = [b("198.18.1.20"), b("198.18.2.20")], v2 = [b("198.18.1.21")]
        // 90/10 over two pods and one: 9 + 9 + 2 slots, exactly 45/45/10.
        let slots = L4Route.slots([(90, v1), (10, v2)])
        let counts = Dictionary(slots.map { ($0, 1) }, uniquingKeysWith: +)
        #expect(slots.count == 20 && counts == [v1[0]: 9, v1[1]: 9, v2[0]: 2], "\(counts)")
        #expect(L4Route.slots([(1, v1), (1, v2)]).count == 4, "1/1 over 2 and 1 pods: 1 + 1 + 2")
        // One weighted group: its backends once each (no split to carry out).
        #expect(L4Route.slots([(100, v1), (0, v2)]) == v1)
        #expect(L4Route.slots([(50, v1), (50, [])]) == v1, "a group with no ready pod gives its share to the others")
        #expect(L4Route.slots([(0, v1), (5, [])]).isEmpty)
        // A pod in two groups gets both shares.
        let both = Dictionary(L4Route.slots([(1, v1), (1, [v1[0]])]).map { ($0, 1) }, uniquingKeysWith: +)
        #expect(both == [v1[0]: 3, v1[1]: 1], "\(both)")
        // Past 1,000 slots: shared by largest remainder, every pod at least one.
        let many = (1...7).map { b("198.18.3.\($0)") }
        let big = L4Route.slots([(999_999, many), (1, v2)])
        let bigCounts = Dictionary(big.map { ($0, 1) }, uniquingKeysWith: +)
        #expect(big.count == 1000 && bigCounts[v2[0]] == 1 && many.allSatisfy { (bigCounts[$0] ?? 0) >= 142 }, "\(bigCounts)")
        let odd = L4Route.slots([(333, v1), (667, v2 + [b("198.18.1.22")])], maxSlots: 1000)
        let oddCounts = Dictionary(odd.map { ($0, 1) }, uniquingKeysWith: +)
        #expect(odd.count == 1000 && abs((oddCounts[v2[0]] ?? 0) - 334) <= 1 && abs((oddCounts[v1[0]] ?? 0) - 166) <= 1, "\(oddCounts)")
    }

    @Test func theKernelTableCarriesTheSplit() throws {
        let tcp = route("  - backendRefs: [{name: db-v1, port: 5432, weight: 90}, {name: db-v2, port: 5432, weight: 10}]")
        let udp = route("  - backendRefs: [{name: db-v1, port: 53, weight: 1}, {name: db-v2, port: 53, weight: 3}]", kind: "UDPRoute",
                        parent: "{group: \"\", kind: Service, name: db, sectionName: dns}").replacingOccurrences(of: "name: split", with: "name: dns")
        let (resources, parse) = ManifestReader.parse(base + "\n---\n" + tcp + "\n---\n" + udp, file: "t.yaml")
        #expect(parse.isEmpty, "\(parse)")
        let state = try ClusterState.build(resources).get()
        #expect(state.l4Routes.map(\.kind) == [.udp, .tcp])
        let table = ServiceTable(state)
        let vip = IPv4Address("198.19.0.20")!
        let tcpEntry = try #require(table.entries[Frontend(vip: vip, port: 5432, transport: .tcp)])
        let counts = Dictionary(tcpEntry.backends.map { ($0, 1) }, uniquingKeysWith: +)
        #expect(counts == [b("198.18.1.20"): 9, b("198.18.2.20"): 9, b("198.18.1.21"): 2], "\(counts)")
        #expect(tcpEntry.name == "shop/db:sql (TCPRoute shop/split)")
        let udpEntry = try #require(table.entries[Frontend(vip: vip, port: 53, transport: .udp)])
        let udpCounts = Dictionary(udpEntry.backends.map { ($0, 1) }, uniquingKeysWith: +)
        #expect(udpCounts == [b("198.18.1.20", 53, .udp): 1, b("198.18.2.20", 53, .udp): 1, b("198.18.1.21", 53, .udp): 6], "\(udpCounts)")
        // The backend Services keep their own tables; the HTTP port is the proxy's.
        #expect(table.entries[Frontend(vip: IPv4Address("198.19.0.21")!, port: 5432, transport: .tcp)]?.backends.count == 2)
        #expect(table.entries[Frontend(vip: vip, port: 80, transport: .tcp)]?.needsProxy == true)
        // A backend failing its check (one of db-v1's two: no panic) takes
        // its slots with it: the split is over the ready pods.
        var health = EndpointHealth()
        health.failing[ProxyTable.clusterName(namespace: "shop", service: "db-v1", port: 5432)] = [b("198.18.2.20")]
        let failed = ServiceTable(state, health: health).entries[Frontend(vip: vip, port: 5432, transport: .tcp)]
        let left = Dictionary((failed?.backends ?? []).map { ($0, 1) }, uniquingKeysWith: +)
        #expect(left == [b("198.18.1.20"): 9, b("198.18.1.21"): 1], "\(left)")
    }

    @Test(arguments: [
        (route("  - backendRefs: [{name: db-v1, port: 5432}]", parent: "{group: \"\", kind: Service, name: db, namespace: other}"),
         "spec.parentRefs[0].namespace", "its parent must be in its own namespace"),
        (route("  - backendRefs: [{name: db-v1, port: 5432}]\n  - backendRefs: [{name: db-v2, port: 5432}]"), "spec.rules", "one rule per TCPRoute"),
        (route("  - backendRefs: []"), "spec.rules[0].backendRefs", "at least one backendRef"),
        (route("  - backendRefs: [{name: db-v1, port: 5432, weight: 0}]"), "spec.rules[0].backendRefs", "every backendRef has weight 0"),
        (route("  - backendRefs: [{name: db-v1, port: 5432, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: db, port: 80}}}]}]"),
         "spec.rules[0].backendRefs[0].filters", "take no filters"),
        (route("  - backendRefs: [{name: nope, port: 5432}]"), "spec.rules[0].backendRefs[0].name", "no Service shop/nope"),
        (route("  - backendRefs: [{name: db-v1, port: 5433}]"), "spec.rules[0].backendRefs[0].port", "has no TCP port 5433"),
        (route("  - backendRefs: [{name: db-v1, port: 5432}]", kind: "UDPRoute"), "spec.rules[0].backendRefs[0].port", "has no UDP port 5432"),
        (route("  - backendRefs: [{name: db-v1, port: 5432}]", parent: "{group: \"\", kind: Service, name: ghost}"),
         "spec.parentRefs[0].name", "no Service shop/ghost"),
        (route("  - backendRefs: [{name: db-v1, port: 5432}]", parent: "{group: \"\", kind: Service, name: db, port: 9}"),
         "spec.parentRefs[0].port", "has no TCP port 9"),
        (route("  - backendRefs: [{name: db-v1, port: 5432}]", parent: "{group: \"\", kind: Service, name: db, port: 80}"),
         "spec.parentRefs[0]", "declares HTTP: the node proxy routes it"),
        (route("  - backendRefs: [\((0..<17).map { _ in "{name: db-v1, port: 5432}" }.joined(separator: ", "))]"),
         "spec.rules[0].backendRefs", "at most 16 entries, got 17"),
        (route("  - name: Main\n    backendRefs: [{name: db-v1, port: 5432}]"), "spec.rules[0].name", "not a valid rule name"),
    ])
    func badRoutesNameTheirField(text: String, field: String, reason: String) {
        let e = errors(text)
        #expect(e.contains("t.yaml:7:\(field)") && e.contains(reason), "\(e)")
    }

    @Test func aPortTakesOneRoute() {
        let two = errors(route("  - backendRefs: [{name: db-v1, port: 5432}]") + "\n---\n"
                         + route("  - backendRefs: [{name: db-v2, port: 5432}]").replacingOccurrences(of: "name: split", with: "name: again"))
        #expect(two.contains("t.yaml:8:spec.parentRefs[0]") && two.contains("shop/db:5432/TCP is already split by TCPRoute shop/split"), "\(two)")
        let http = errors("""
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: web, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: db-v1, port: 5432}]
              rules: [{backendRefs: [{name: db-v1, port: 5432}]}]
            """ + "\n---\n" + route("  - backendRefs: [{name: db-v2, port: 5432}]", parent: "{group: \"\", kind: Service, name: db-v1, port: 5432}"))
        #expect(http.contains("t.yaml:8:spec.parentRefs[0]") && http.contains("already split by HTTPRoute shop/web, which the node proxy carries out"), "\(http)")
    }
}
