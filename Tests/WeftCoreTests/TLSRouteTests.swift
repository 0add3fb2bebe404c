import Foundation
import Testing
@testable import WeftCore

private let services = """
    apiVersion: v1
    kind: Service
    metadata: {name: tls, namespace: shop}
    spec: {clusterIP: 198.19.0.30, selector: {app: tls}, ports: [{name: https, port: 443}, {name: web, port: 80, appProtocol: http}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: tls-a, namespace: shop}
    spec: {clusterIP: 198.19.0.31, selector: {app: tls, track: a}, ports: [{name: https, port: 443, targetPort: 8443}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: tls-b, namespace: shop}
    spec: {clusterIP: 198.19.0.32, selector: {app: tls, track: b}, ports: [{name: https, port: 443, targetPort: 8443}]}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: a, namespace: shop, labels: {app: tls, track: a}}
    spec: {node: n1, address: 198.18.1.30}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: b, namespace: shop, labels: {app: tls, track: b}}
    spec: {node: n2, address: 198.18.2.30}
    """

private func tlsRoute(_ name: String, hostnames: String?, backends: String = "[{name: tls-a, port: 443}]",
                      parent: String = "{group: \"\", kind: Service, name: tls}", version: String = "v1",
                      namespace: String = "shop") -> String {
    """
    apiVersion: gateway.networking.k8s.io/\(version)
    kind: TLSRoute
    metadata: {name: \(name), namespace: \(namespace)}
    spec:
      parentRefs: [\(parent)]
    \(hostnames.map { "  hostnames: \($0)\n" } ?? "")  rules:
      - backendRefs: \(backends)
    """
}

private func build(_ extra: [String]) -> Result<ClusterState, ManifestErrors> {
    let (resources, parse) = ManifestReader.parse(([services] + extra).joined(separator: "\n---\n"), file: "t.yaml")
    return ClusterState.build(resources, parseErrors: parse)
}

private func errors(_ extra: String...) -> String {
    switch build(extra) {
    case .success: return ""
    case .failure(let e): return e.description
    }
}

/// TLSRoute (Gateway API, standard channel since v1.5; v1alpha2 read too):
/// TLS passthrough by SNI on a Service port, carried out by the node proxy.
@Suite struct TLSRouteTests {
    @Test func hostnamesMatchExactlyOrByWildcardSuffix() {
        #expect(L4Route.hostname("a.example.com", matches: "a.example.com"))
        #expect(!L4Route.hostname("a.example.com", matches: "b.example.com"))
        #expect(L4Route.hostname("*.example.com", matches: "a.example.com"))
        #expect(L4Route.hostname("*.example.com", matches: "x.a.example.com"), "a wildcard covers one label or more")
        #expect(!L4Route.hostname("*.example.com", matches: "example.com"), "but not the bare suffix")
        #expect(!L4Route.hostname("*.example.com", matches: "aexample.com"))
        let any = ProxyTable.SNIMatch(hostname: nil, action: 0)
        #expect(any.matches(nil) && any.matches("x.y"))
        #expect(!ProxyTable.SNIMatch(hostname: "*.y", action: 0).matches(nil), "a ClientHello with no name matches only a route with no hostnames")
    }

    @Test func thePortGoesToTheProxyWithItsRoutesInPrecedenceOrder() throws {
        let state = try build([
            tlsRoute("wild", hostnames: "[\"*.example.com\", \"*.shop.example.com\"]", backends: "[{name: tls-b, port: 443}]"),
            tlsRoute("exact", hostnames: "[a.example.com]",
                     backends: "[{name: tls-a, port: 443, weight: 90}, {name: tls-b, port: 443, weight: 10}]"),
            tlsRoute("rest", hostnames: nil, backends: "[{name: tls-a, port: 443}]", version: "v1alpha2"),
        ]).get()
        #expect(state.l4Routes.map(\.kind) == [.tls, .tls, .tls])
        // The kernel sends the port to the proxy (the L7 flag), its slots untouched.
        let kernel = ServiceTable(state)
        let entry = try #require(kernel.entries[Frontend(vip: IPv4Address("198.19.0.30")!, port: 443, transport: .tcp)])
        #expect(entry.needsProxy && entry.backends.count == 2 && entry.name == "shop/tls:https", "\(entry)")
        #expect(kernel.entries[Frontend(vip: IPv4Address("198.19.0.31")!, port: 443, transport: .tcp)]?.needsProxy == false,
                "a backend Service the route sends to keeps the kernel path")
        #expect(ProxyTable.l7Ports(state).contains("shop/tls:443"))
        let table = ProxyTable(state)
        let frontend = try #require(table.frontends["198.19.0.30:443"])
        let sni = try #require(frontend.sni)
        // Exact names, then wildcards longest first, then the route with none.
        #expect(sni.map(\.hostname) == ["a.example.com", "*.shop.example.com", "*.example.com", nil], "\(sni)")
        #expect(sni.map { frontend.actions[$0.action].name } == ["shop/exact", "shop/wild", "shop/wild", "shop/rest"])
        let split = frontend.actions[sni[0].action].backends
        #expect(split.map(\.cluster) == ["shop/tls-a:443", "shop/tls-b:443"] && split.map(\.weight) == [90, 10])
        #expect(table.clusters["shop/tls-a:443"]?.map(\.address) == ["198.18.1.30"])
        #expect(table.clusters["shop/tls-b:443"]?.map { "\($0.address):\($0.port)" } == ["198.18.2.30:8443"])
        #expect(frontend.matches.isEmpty && frontend.fallback == nil, "no HTTP routing on a TLS port")
        // The HTTP port beside it stays HTTP.
        #expect(table.frontends["198.19.0.30:80"]?.sni == nil && table.frontends["198.19.0.30:80"]?.fallback != nil)
    }

    /// GAMMA consumer routes (GEP-1294): a TLSRoute in another namespace
    /// than its parent Service routes that namespace's clients only, in
    /// place of the Service's own TLSRoutes; other clients keep those, or,
    /// where the Service has none, reach the Service itself.
    @Test func consumerTLSRoutesRouteOnlyTheirOwnNamespacesClients() throws {
        let consumer = tlsRoute("mine", hostnames: "[a.example.com]", backends: "[{name: tls-b, namespace: shop, port: 443}]",
                                parent: "{group: \"\", kind: Service, name: tls, namespace: shop}", namespace: "lab")
        // Only a consumer route: the port goes to the proxy for every client.
        let alone = try build([consumer]).get()
        #expect(ProxyTable.l7Ports(alone).contains("shop/tls:443"))
        let entry = try #require(ServiceTable(alone).entries[Frontend(vip: IPv4Address("198.19.0.30")!, port: 443, transport: .tcp)])
        #expect(entry.needsProxy, "\(entry)")
        let frontend = try #require(ProxyTable(alone).frontends["198.19.0.30:443"])
        #expect(frontend.sni == [] && frontend.actions.isEmpty && frontend.cluster == "shop/tls:443",
                "no route of the Service's own: other clients go to the Service itself")
        let lab = try #require(frontend.consumers?["lab"]).applied(to: frontend)
        #expect(lab.sni?.map(\.hostname) == ["a.example.com"])
        #expect(lab.sniAction("a.example.com").map { $0.backends.map(\.cluster) } == ["shop/tls-b:443"])
        #expect(lab.sniAction("b.example.com") == nil, "a name the namespace's routes do not have is closed for its clients")

        // Beside the Service's own routes: those still route everyone else.
        let both = try build([consumer, tlsRoute("own", hostnames: "[\"*.example.com\"]")]).get()
        let shared = try #require(ProxyTable(both).frontends["198.19.0.30:443"])
        #expect(shared.sni?.map(\.hostname) == ["*.example.com"])
        #expect(shared.sniAction("a.example.com")?.name == "shop/own")
        let labView = try #require(shared.consumers?["lab"]).applied(to: shared)
        #expect(labView.sniAction("a.example.com")?.name == "lab/mine")
        #expect(labView.sniAction("z.example.com") == nil, "the consumer routes replace the Service's own for their namespace")
    }

    @Test(arguments: [
        (tlsRoute("r", hostnames: nil), "spec.hostnames", "needs at least one hostname"),
        (tlsRoute("r", hostnames: "[]"), "spec.hostnames", "needs at least one hostname"),
        (tlsRoute("r", hostnames: "[A.example.com]"), "spec.hostnames[0]", "is not a hostname"),
        (tlsRoute("r", hostnames: "[\"a.*.example.com\"]"), "spec.hostnames[0]", "is not a hostname"),
        (tlsRoute("r", hostnames: "[\"example.com:443\"]"), "spec.hostnames[0]", "is not a hostname"),
        (tlsRoute("r", hostnames: "[10.0.0.1]"), "spec.hostnames[0]", "is an IP address"),
        (tlsRoute("r", hostnames: "[a.example.com]", backends: "[{name: tls-a, port: 443, weight: -1}]"),
         "spec.rules[0].backendRefs[0].weight", "must be 0-1000000"),
        (tlsRoute("r", hostnames: "[a.example.com]", backends: "[{name: tls-a, port: 444}]"),
         "spec.rules[0].backendRefs[0].port", "has no TCP port 444"),
        (tlsRoute("r", hostnames: "[a.example.com]", parent: "{group: \"\", kind: Service, name: ghost}"),
         "spec.parentRefs[0].name", "no Service shop/ghost"),
        (tlsRoute("r", hostnames: "[a.example.com]", parent: "{group: \"\", kind: Service, name: tls, port: 80}"),
         "spec.parentRefs[0]", "declares HTTP: the node proxy routes it"),
        (tlsRoute("r", hostnames: "[a.example.com]", parent: "{group: \"\", kind: Service, name: tls, namespace: other}"),
         "spec.parentRefs[0].name", "no Service other/tls"),
    ])
    func badRoutesNameTheirField(text: String, field: String, reason: String) {
        let e = errors(text)
        #expect(e.contains("t.yaml:6:\(field)") && e.contains(reason), "\(e)")
    }

    @Test func tooManyHostnamesAndTwoRulesAreRefused() {
        let many = "[" + (1...17).map { "h\($0).example.com" }.joined(separator: ", ") + "]"
        #expect(errors(tlsRoute("r", hostnames: many)).contains("at most 16 hostnames"))
        let two = tlsRoute("r", hostnames: "[a.example.com]") + "\n  - backendRefs: [{name: tls-b, port: 443}]"
        #expect(errors(two).contains("one rule per TLSRoute"), "\(errors(two))")
    }

    @Test func tlsRoutesShareAPortButNotWithATCPRouteOrAnHTTPRoute() {
        // Two TLSRoutes on one port: their hostnames tell them apart.
        #expect(errors(tlsRoute("one", hostnames: "[a.example.com]"), tlsRoute("two", hostnames: "[b.example.com]")) == "")
        let tcp = """
            apiVersion: gateway.networking.k8s.io/v1alpha2
            kind: TCPRoute
            metadata: {name: raw, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: tls, port: 443}]
              rules: [{backendRefs: [{name: tls-a, port: 443}]}]
            """
        let mixed = errors(tlsRoute("one", hostnames: "[a.example.com]"), tcp)
        #expect(mixed.contains("already split by TLSRoute shop/one") && mixed.contains("TLSRoutes or one TCPRoute, never both"), "\(mixed)")
        let http = """
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: web, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: tls, port: 443}]
              rules: [{backendRefs: [{name: tls-a, port: 443}]}]
            """
        let both = errors(http, tlsRoute("one", hostnames: "[a.example.com]", parent: "{group: \"\", kind: Service, name: tls, port: 443}"))
        #expect(both.contains("already split by HTTPRoute shop/web"), "\(both)")
        // Naming no port, a TLSRoute takes the ports the proxy does not serve as HTTP.
        let implicit = try? build([http, tlsRoute("one", hostnames: "[a.example.com]")]).get()
        #expect(implicit == nil, "the HTTPRoute holds 443, the only port left: nothing to route")
    }
}
