import Foundation
import Testing
@testable import WeftCore

private let base = """
    apiVersion: v1
    kind: Service
    metadata: {name: rpc, namespace: shop}
    spec:
      clusterIP: 198.19.0.20
      selector: {app: rpc}
      ports: [{name: grpc, port: 80, targetPort: 8080}, {name: http-admin, port: 81, targetPort: 8081}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: rpc-canary, namespace: shop}
    spec:
      clusterIP: 198.19.0.21
      selector: {app: rpc-canary}
      ports: [{name: rpc, port: 80, targetPort: 8080}]
    """

/// The GRPCRoute `g` on Service `rpc` with `rules` (a YAML list indented by
/// two spaces), after the two Services (document 3 of g.yaml).
private func grpcRoute(_ rules: String, name: String = "g") -> String {
    """
    apiVersion: gateway.networking.k8s.io/v1
    kind: GRPCRoute
    metadata: {name: \(name), namespace: shop}
    spec:
      parentRefs: [{group: "", kind: Service, name: rpc, port: 80}]
      rules:
    \(rules)
    """
}

private func read(_ text: String) -> Result<ClusterState, ManifestErrors> {
    let (resources, errors) = ManifestReader.parse(base + "\n---\n" + text, file: "g.yaml")
    return ClusterState.build(resources, parseErrors: errors)
}

private func call(_ path: String, _ headers: [String: String] = [:]) -> RouteMatcher.Request {
    RouteMatcher.Request(method: "POST", path: Substring(path), query: nil, header: { headers[$0].map { [$0] } ?? [] })
}

@Suite struct GRPCRouteTests {
    /// A method match is a match on the call's path; rules go by GRPCRoute
    /// precedence: the longer service, then the longer method, then more
    /// header matches (a service-only match outranks a method-only one,
    /// which HTTPRoute's order, regular expressions before prefixes, would
    /// not); a call no rule matches gets no route (404).
    @Test func methodMatchesRouteByGRPCPrecedence() throws {
        let state = try read(grpcRoute("""
              - name: method-only
                matches: [{method: {method: Get}}]
                backendRefs: [{name: rpc-canary, port: 80}]
              - name: service
                matches: [{method: {service: shop.Catalog}}]
                backendRefs: [{name: rpc, port: 80}]
              - name: both
                matches: [{method: {service: shop.Catalog, method: List}}]
                backendRefs: [{name: rpc-canary, port: 80}]
              - name: canary
                matches: [{method: {service: shop.Catalog}, headers: [{name: x-track, value: canary}]}]
                backendRefs: [{name: rpc-canary, port: 80}]
              - name: regex
                matches: [{method: {type: RegularExpression, service: "shop\\\\.Cart.*", method: "Add|Remove"}}]
                backendRefs: [{name: rpc, port: 80}]
            """)).get()
        let table = ProxyTable(state)
        let frontend = try #require(table.frontends["198.19.0.20:80"])
        let matcher = RouteMatcher(frontend)
        func rule(_ r: RouteMatcher.Request) -> String? { matcher.route(r)?.action.name.split(separator: "#").last.map(String.init) }
        #expect(rule(call("/shop.Catalog/List")) == "both")
        #expect(rule(call("/shop.Catalog/Get")) == "service", "the longer service wins over a method-only match")
        #expect(rule(call("/shop.Catalog/Get", ["x-track": "canary"])) == "canary", "same service: more header matches win")
        #expect(rule(call("/shop.Orders/Get")) == "method-only")
        #expect(rule(call("/shop.CartV2/Add")) == "regex")
        #expect(rule(call("/shop.CartV2/Empty")) == nil, "no rule matches: 404")
        #expect(rule(call("/shop.Catalogue/List")) == nil, "a service match is the whole service name")
        // The conversion, as the table carries it to the proxy.
        let paths = frontend.matches.map(\.match.path)
        #expect(paths.contains(.exact("/shop.Catalog/List")) && paths.contains(.prefix("/shop.Catalog"))
                && paths.contains(.regularExpression("/[^/]+/Get")) && paths.contains(.regularExpression("/(shop\\.Cart.*)/(Add|Remove)")),
                "\(paths)")
        let decoded = try JSONDecoder().decode(ProxyTable.self, from: JSONEncoder().encode(table))
        #expect(decoded.frontends["198.19.0.20:80"]?.matches == frontend.matches)
    }

    /// One route type per Service port, GRPCRoute first (GEP-1294): an
    /// HTTPRoute on the port a GRPCRoute has is left out of the table and
    /// reported; on another port of the Service it stays.
    @Test func aGRPCRouteDisplacesHTTPRoutesOnItsPortOnly() throws {
        let state = try read(grpcRoute("  - backendRefs: [{name: rpc-canary, port: 80}]") + """

            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: g, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: rpc}]
              rules: [{backendRefs: [{name: rpc, port: 81}]}]
            """).get()
        #expect(state.httpRoutes.map(\.kind) == [.grpc, .http], "a GRPCRoute and an HTTPRoute may share a name")
        let table = ProxyTable(state)
        #expect(table.frontends["198.19.0.20:80"]?.actions.map(\.name) == ["shop/g#0"])
        #expect(table.frontends["198.19.0.20:80"]?.actions.first?.backends.map(\.cluster) == ["shop/rpc-canary:80"])
        #expect(table.frontends["198.19.0.20:81"]?.actions.first?.backends.map(\.cluster) == ["shop/rpc:81"])
        #expect(ProxyTable.conflictedRoutes(state) == ["HTTPRoute shop/g": ["shop/rpc:80"]])
        // A GRPCRoute's backend (rpc-canary: port named rpc, no
        // appProtocol) is spoken to over HTTP/2 though its port declares
        // nothing; an HTTPRoute's is not.
        #expect(table.frontends["198.19.0.20:80"]?.actions.first?.backends.map(\.upstreamProtocol) == [.http2])
        #expect(table.frontends["198.19.0.20:81"]?.actions.first?.backends.map(\.upstreamProtocol) == [.http1])
    }

    /// A Service parent's `sectionName` is one of its ports by name (the
    /// Gateway API's meaning for a Service), for either route kind; with
    /// `port`, the port must have both; a name the Service lacks is refused.
    @Test func sectionNameSelectsAServicePortByName() throws {
        let state = try read("""
            apiVersion: gateway.networking.k8s.io/v1
            kind: GRPCRoute
            metadata: {name: rpc, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: rpc, sectionName: grpc}]
              rules: [{backendRefs: [{name: rpc-canary, port: 80}]}]
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: admin, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: rpc, sectionName: http-admin, port: 81}]
              rules: [{backendRefs: [{name: rpc, port: 81}]}]
            """).get()
        let table = ProxyTable(state)
        #expect(table.frontends["198.19.0.20:80"]?.actions.map(\.name) == ["shop/rpc#0"])
        #expect(table.frontends["198.19.0.20:81"]?.actions.map(\.name) == ["shop/admin#0"])
        #expect(ProxyTable.conflictedRoutes(state).isEmpty, "on different ports they do not meet")
        for (parent, expected) in [
            ("{group: \"\", kind: Service, name: rpc, sectionName: metrics}",
             "g.yaml:3:spec.parentRefs[0].sectionName: Service shop/rpc has no TCP port named metrics"),
            ("{group: \"\", kind: Service, name: rpc, sectionName: grpc, port: 81}",
             "spec.parentRefs[0].sectionName: Service shop/rpc has no TCP port named grpc that is port 81"),
            ("{group: \"\", kind: Service, name: rpc, sectionName: Bad_Name}", "spec.parentRefs[0].sectionName: \"Bad_Name\" is not a valid port name"),
        ] {
            let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: x, namespace: shop}\nspec:\n  parentRefs: [\(parent)]"
            guard case .failure(let e) = read(route) else {
                Issue.record("accepted: \(parent)")
                continue
            }
            #expect(e.errors.map(\.description).joined(separator: "\n").contains(expected), "\(parent): \(e)")
        }
    }

    @Test func badGRPCRoutesAreRejectedWithFileDocumentAndField() {
        let cases: [(String, String)] = [
            ("  - matches: [{method: {service: \"shop catalog\"}}]", "g.yaml:3:spec.rules[0].matches[0].method.service: not a gRPC service name"),
            ("  - matches: [{method: {service: shop..Catalog}}]", "spec.rules[0].matches[0].method.service: not a gRPC service name"),
            ("  - matches: [{method: {method: Get-All}}]", "spec.rules[0].matches[0].method.method: not a gRPC method name"),
            ("  - matches: [{method: {type: Exact}}]", "spec.rules[0].matches[0].method: give service, method or both"),
            ("  - matches: [{method: {type: Prefix, service: shop.Catalog}}]", "spec.rules[0].matches[0].method.type: must be Exact or RegularExpression"),
            ("  - matches: [{method: {type: RegularExpression, method: \"(\"}}]", "spec.rules[0].matches[0].method.method: not a valid regular expression"),
            ("  - matches: [{path: {value: /x}}]", "spec.rules[0].matches[0].path: unknown field"),
            ("  - filters: [{type: URLRewrite, urlRewrite: {hostname: a.example}}]",
             "spec.rules[0].filters[0].type: a GRPCRoute takes RequestHeaderModifier, ResponseHeaderModifier and RequestMirror filters"),
            ("  - backendRefs: [{name: rpc, port: 80, filters: [{type: URLRewrite, urlRewrite: {hostname: a.example}}]}]",
             "spec.rules[0].backendRefs[0].filters[0].type: a GRPCRoute takes"),
            ("  - timeouts: {request: 1s}", "spec.rules[0].timeouts: unknown field"),
            ("  - backendRefs: [{name: nowhere, port: 80}]", "spec.rules[0].backendRefs[0].name: no Service shop/nowhere"),
            ("  - matches: [{method: {type: RegularExpression, service: \"\(String(repeating: "s", count: 1025))\"}}]",
             "spec.rules[0].matches[0].method.service: at most 1024 characters, got 1025"),
            ("  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}, {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: c, value: d}]}}]",
             "spec.rules[0].filters[1].type: a second RequestHeaderModifier filter"),
            ("  - name: one\n  - name: one", "spec.rules[1].name: \"one\" names another rule of this route already"),
        ]
        for (rules, expected) in cases {
            guard case .failure(let e) = read(grpcRoute(rules)) else {
                Issue.record("accepted: \(rules)")
                continue
            }
            let text = e.errors.map(\.description).joined(separator: "\n")
            #expect(text.contains(expected), "\(rules): \(text)")
        }
        guard case .failure(let e) = read("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec: {rules: []}") else {
            Issue.record("a GRPCRoute without parentRefs was accepted")
            return
        }
        #expect(e.errors.map(\.description).joined().contains("spec.parentRefs: a mesh GRPCRoute needs at least one parentRef"), "\(e)")
    }
}
