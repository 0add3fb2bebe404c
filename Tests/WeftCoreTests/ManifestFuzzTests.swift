import Foundation
import Testing
@testable import WeftCore

/// The demo's manifests (and a few of what it has no example of), damaged at random, through everything the agent
/// does with a set before it writes a map: read, checked as a whole, the
/// policy compiled, the service table made and planned into map writes,
/// the proxy's route table made (its JSON read back as it
/// was written) and its routes compiled. Bad input must never crash: each
/// set is either taken or refused with errors that name file, document and
/// field.
@Suite struct ManifestFuzzTests {
    static let demo: [(String, String)] = {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let dir = root.appendingPathComponent("examples/demo")
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).filter { $0.hasSuffix(".yaml") }.sorted()
        return names.compactMap { name in (try? String(contentsOf: dir.appendingPathComponent(name), encoding: .utf8)).map { (name, $0) } }
    }()

    /// What the demo has no example of: a GRPCRoute, a consumer route
    /// (in namespace lab, on shop's Service) with backendRefs named by
    /// namespace and a session, and a TCPRoute.
    static let routes = """
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata: {name: checkout-rpc, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: checkout, port: 80}]
          rules:
          - matches: [{method: {service: shop.Checkout, method: Pay}, headers: [{name: x-track, value: canary}]}]
            filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api-v2, port: 80}}}]
            backendRefs: [{name: api-v2, port: 80, weight: 1}]
          - matches: [{method: {type: RegularExpression, service: "shop[.].*"}}, {method: {method: Refund}}]
            backendRefs: [{name: checkout, port: 80}]
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: scanner-view, namespace: lab}
        spec:
          parentRefs: [{group: "", kind: Service, namespace: shop, name: api, port: 80}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /scan}}]
            backendRefs: [{name: api-v1, namespace: shop, port: 80}]
            sessionPersistence:
              sessionName: scan
              type: Cookie
              absoluteTimeout: 1h
              idleTimeout: 10m
              cookieConfig: {lifetimeType: Permanent}
        ---
        apiVersion: gateway.networking.k8s.io/v1alpha2
        kind: TCPRoute
        metadata: {name: web-split, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:
          - backendRefs: [{name: web, port: 80, weight: 9}, {name: checkout, port: 80, weight: 1}]
        """

    /// Nodes with zones, cores and addresses, and a topology-aware
    /// LoadBalancer Service with external addresses and a node port.
    static let zones = """
        apiVersion: v1
        kind: Node
        metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}
        status:
          allocatable: {cpu: 3500m}
          addresses: [{type: InternalIP, address: 198.18.0.1}, {type: Hostname, address: n1}]
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n2, labels: {topology.kubernetes.io/zone: b}}
        status: {allocatable: {cpu: "2"}, addresses: [{type: InternalIP, address: 198.18.0.2}]}
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: zoned
          namespace: shop
          annotations: {service.kubernetes.io/topology-mode: Auto}
        spec:
          type: LoadBalancer
          clusterIP: 198.19.0.90
          externalIPs: [198.19.90.1]
          loadBalancerIP: 198.19.90.2
          selector: {app: web}
          ports:
          - {name: http, port: 80, targetPort: 8080, nodePort: 30090}
          - {name: udp, port: 53, protocol: UDP, nodePort: 30053}
        status:
          loadBalancer:
            ingress:
            - {ip: 198.19.90.3, ipMode: VIP}
        """

    static let seeds = demo + [("fuzz-routes.yaml", routes), ("fuzz-zones.yaml", zones)]

    /// Values a field may be given by mistake or on purpose.
    static let values = [
        "-1", "0", "65536", "99999999999999999999", "1e400", "0x10", "1.5", "true", "null", "~", "\"\"", "[]", "{}",
        "[a, b]", "{a: 1}", "é", "198.19.0.256", "10.0.0.0/33", "::1", "0s", "-5s", "9999999999h", "1ms", "5x",
        "\"(\"", "\"(a+)+$\"", "\"[z-a]\"", "TCP", "UDP", "SCTP", "ICMP", "http", "h2c", "kubernetes.io/h2c", "grpc",
        "*", "&a x", "*a", "Cookie", "Header", "Permanent", "Session", "TCPRoute", "UDPRoute", "v1alpha2", "!!binary aGk=", "'", "\"", "\"\\u0000\"", String(repeating: "x", count: 300),
        "-2147483649", "4294967296", "\"1/2\"", "/", "/..", "ALL", "Exact", "PathPrefix", "RegularExpression",
    ]

    static func damage(_ text: String, _ rng: inout LoopRandomForTests) -> String {
        var lines = text.components(separatedBy: "\n")
        for _ in 0..<(1 + rng.below(3)) {
            guard !lines.isEmpty else { break }
            let at = rng.below(lines.count)
            switch rng.below(7) {
            case 0, 1, 2:
                // A value replaced: after the last ": " of the line, or an item's "- ".
                var line = lines[at]
                if let colon = line.range(of: ": ", options: .backwards) {
                    line = String(line[..<colon.upperBound]) + rng.pick(values)
                } else if let dash = line.range(of: "- ") {
                    line = String(line[..<dash.upperBound]) + rng.pick(values)
                }
                lines[at] = line
            case 3: lines.remove(at: at)
            case 4: lines.insert(lines[at], at: at)
            case 5: lines[at] = String(repeating: " ", count: rng.below(6)) + lines[at].drop { $0 == " " }
            default:
                var bytes = Array(lines[at].utf8)
                let pos = bytes.isEmpty ? 0 : rng.below(bytes.count)
                bytes.insert(contentsOf: Array(rng.pick([":", "-", "{", "}", "[", "]", "#", ",", " ", "\t", "'", "\"", "&", "*", "!"]).utf8), at: pos)
                lines[at] = String(decoding: bytes, as: UTF8.self)
            }
        }
        return lines.joined(separator: "\n")
    }

    /// The state `files` (name, text) make, or their refusal.
    static func build(_ files: [(String, String)]) -> Result<ClusterState, ManifestErrors> {
        var resources: [LocatedResource] = []
        var errors: [ManifestError] = []
        for (name, text) in files {
            let parsed = ManifestReader.parse(text, file: name)
            resources += parsed.resources
            errors += parsed.errors
        }
        return ClusterState.build(resources, parseErrors: errors)
    }

    @Test func damagedManifestsAreTakenOrRefusedByFieldNeverACrash() throws {
        try #require(Self.demo.count >= 4, "the demo's manifests (examples/demo/*.yaml)")
        try #require((try? Self.build(Self.seeds).get()) != nil, "the seeds are taken as they are")
        var rng = LoopRandomForTests(state: 0xC0F1_6000_0000_0001)
        var taken = 0, refused = 0
        let sets = ProcessInfo.processInfo.environment["WEFT_FUZZ_CASES"].flatMap(Int.init) ?? 1_000
        for _ in 0..<sets {
            let damaged = rng.below(Self.seeds.count)
            var files = Self.seeds
            files[damaged].1 = Self.damage(files[damaged].1, &rng)
            switch Self.build(files) {
            case .failure(let refusal):
                refused += 1
                #expect(!refusal.errors.isEmpty)
                for e in refusal.errors {
                    #expect(Self.seeds.contains { $0.0 == e.location.file } && e.location.document >= 1 && !e.reason.isEmpty, "\(e)")
                }
            case .success(let state):
                taken += 1
                var compiler = PolicyCompiler()
                _ = compiler.compile(state)
                // The kernel's service table (TCPRoute splits included) and its map plan.
                // (On node n1, whose zone topology-aware routing reads.)
                let services = ServiceTable(state, node: "n1")
                let plan = ServiceMapPlanner.plan(desired: services, current: .init())
                #expect(plan.target.frontends.count == services.entries.count)
                let table = ProxyTable(state, node: "n1")
                _ = TopologyHints.summary(state)
                let back = try JSONDecoder().decode(ProxyTable.self, from: JSONEncoder().encode(table))
                #expect(back == table, "the route table's JSON reads back as written")
                for frontend in table.frontends.values {
                    for f in [frontend] + (frontend.consumers?.values.map { $0.applied(to: frontend) } ?? []) {
                        for path in ["/aaaaaaaaaaaaaaaaaaaaaaaaaaaa!", "/shop.Checkout/Pay"] {
                            _ = RouteMatcher(f).route(.init(method: "GET", path: Substring(path), query: "a=1", header: { _ in ["x"] }))
                        }
                    }
                }
            }
        }
        // Both outcomes came up often enough to mean something.
        #expect(taken > 100 && refused > 100, "taken \(taken), refused \(refused)")
    }
}

/// xorshift: the same sequence on every run (damage here, patterns and
/// inputs in LinearRegexTests).
struct LoopRandomForTests {
    var state: UInt64
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    mutating func pick<T>(_ items: [T]) -> T { items[below(items.count)] }
}
