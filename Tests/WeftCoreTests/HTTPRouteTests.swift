import Foundation
import Testing
@testable import WeftCore

private let base = """
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec:
      clusterIP: 198.19.0.10
      selector: {app: web}
      ports: [{name: http, port: 80, targetPort: 8080}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: canary, namespace: shop}
    spec:
      clusterIP: 198.19.0.11
      selector: {app: canary}
      ports: [{name: tcp-db, port: 80, targetPort: 8080}]
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: db, namespace: shop}
    spec:
      clusterIP: 198.19.0.12
      selector: {app: db}
      ports: [{name: db, port: 5432}]
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: web-1, namespace: shop, labels: {app: web}}
    spec: {node: n1, address: 198.18.1.12}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: canary-1, namespace: shop, labels: {app: canary}}
    spec: {node: n2, address: 198.18.2.12}
    """

private func state(_ routes: String) throws -> ClusterState {
    let (resources, errors) = ManifestReader.parse(base + "\n---\n" + routes, file: "t.yaml")
    #expect(errors.isEmpty, "\(errors)")
    return try ClusterState.build(resources).get()
}

/// One HTTPRoute `r` on Service `web` whose rules are `rules` (a YAML list
/// indented by two spaces).
private func webRoute(_ rules: String) -> String {
    """
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{group: "", kind: Service, name: web}]
      rules:
    \(rules)
    """
}

/// The errors of reading the base Services with `webRoute(rules)` after
/// them (document 6 of t.yaml).
private func routeErrors(_ rules: String) -> [ManifestError] {
    ManifestReader.parse(base + "\n---\n" + webRoute(rules), file: "t.yaml").errors
}

private func request(_ method: String, _ target: String, _ headers: [String: String] = [:]) -> RouteMatcher.Request {
    let parts = target.split(separator: "?", maxSplits: 1)
    return RouteMatcher.Request(method: method, path: parts[0], query: parts.count > 1 ? parts[1] : nil,
                                header: { headers[$0].map { [$0] } ?? [] })
}

@Suite struct HTTPRouteTests {
    @Test func declaredProtocolsAndRoutesDecideWhatTheProxyCaptures() throws {
        let s = try state("""
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: r, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: canary}]
              rules: [{backendRefs: [{name: canary, port: 80}]}]
            """)
        let table = ProxyTable(s)
        // web: port name http. canary: named tcp-db but a route targets it. db: neither.
        #expect(Set(table.frontends.keys) == ["198.19.0.10:80", "198.19.0.11:80"])
        let services = ServiceTable(s)
        #expect(services.entries[Frontend(vip: IPv4Address("198.19.0.10")!, port: 80, transport: .tcp)]?.needsProxy == true)
        #expect(services.entries[Frontend(vip: IPv4Address("198.19.0.12")!, port: 5432, transport: .tcp)]?.needsProxy == false)
        #expect(table.clusters["shop/canary:80"]?.map(\.address) == ["198.18.2.12"])
        #expect(table.clusters["shop/canary:80"]?.first?.node == "n2")
    }

    /// GAMMA consumer routes (GEP-1294): a route in another namespace than
    /// its parent Service's routes that namespace's clients only, in place of
    /// the Service's producer routes (a request none of its rules matches:
    /// 404); its backendRefs and mirrors name their namespace or are in the
    /// route's; two namespaces' consumer routes stay apart; a Service only
    /// a consumer route targets is captured, and every other client gets it
    /// as if no route were attached.
    @Test func consumerRoutesRouteTheirOwnNamespaceOnly() throws {
        let s = try state("""
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: shopper, namespace: front, labels: {app: shopper}}
            spec: {node: n1, address: 198.18.1.40}
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: cache, namespace: front}
            spec: {clusterIP: 198.19.0.20, selector: {app: shopper}, ports: [{name: http, port: 80, targetPort: 8080}]}
            ---
            \(webRoute("""
                  - backendRefs: [{name: web, port: 80, weight: 9}, {name: canary, port: 80, weight: 1}]
                """))
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: mine, namespace: front}
            spec:
              parentRefs: [{group: "", kind: Service, namespace: shop, name: web, port: 80}]
              rules:
              - matches: [{path: {type: PathPrefix, value: /cart}}]
                filters: [{type: RequestMirror, requestMirror: {backendRef: {name: cache, port: 80}}}]
                backendRefs: [{name: canary, namespace: shop, port: 80}]
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: theirs, namespace: back}
            spec:
              parentRefs: [{group: "", kind: Service, namespace: shop, name: web}]
              rules: [{backendRefs: [{name: web, namespace: shop, port: 80}]}]
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: db, namespace: front}
            spec:
              parentRefs: [{group: "", kind: Service, namespace: shop, name: db}]
              rules: [{backendRefs: [{name: db, namespace: shop, port: 5432}]}]
            """)
        let table = ProxyTable(s)
        let web = try #require(table.frontends["198.19.0.10:80"])
        #expect(web.actions.map(\.name) == ["shop/r#0"], "the producer route stays every other client's")
        #expect(web.actions.first?.backends.map(\.cluster) == ["shop/web:80", "shop/canary:80"])
        #expect(Set(web.consumers?.keys ?? [:].keys) == ["front", "back"])
        let front = try #require(web.consumers?["front"])
        #expect(front.actions.map(\.name) == ["front/mine#0"])
        #expect(front.actions.first?.backends.map(\.cluster) == ["shop/canary:80"])
        #expect(front.actions.first?.filters == [.requestMirror(.init(name: "cache", port: 80, percent: 100, namespace: "front"))],
                "a mirror without a namespace is in its route's")
        #expect(table.clusters["front/cache:80"]?.map(\.address) == ["198.18.1.40"])
        let matcher = RouteMatcher(front.applied(to: web))
        #expect(matcher.route(request("GET", "/cart/1"))?.action.name == "front/mine#0")
        #expect(matcher.route(request("GET", "/other")) == nil, "no fallback to the producer routes: 404")
        #expect(web.consumers?["back"]?.actions.first?.backends.map(\.cluster) == ["shop/web:80"])
        // db declares no HTTP and only a consumer route targets it: captured,
        // and a client elsewhere gets the Service itself.
        let db = try #require(table.frontends["198.19.0.12:5432"])
        #expect(db.fallback != nil && db.actions.map(\.name) == ["shop/db"] && db.consumers?.keys.first == "front")
        #expect(ServiceTable(s).entries[Frontend(vip: IPv4Address("198.19.0.12")!, port: 5432, transport: .tcp)]?.needsProxy == true)
        // The table says it the same way after a round trip (the proxy reads JSON).
        let decoded = try JSONDecoder().decode(ProxyTable.self, from: JSONEncoder().encode(table))
        #expect(decoded.frontends["198.19.0.10:80"]?.consumers == web.consumers)
    }

    /// A consumer route's references are checked where they point.
    @Test func consumerRouteReferencesAreChecked() {
        func errors(_ spec: String) -> String {
            let route = """
                apiVersion: gateway.networking.k8s.io/v1
                kind: HTTPRoute
                metadata: {name: mine, namespace: front}
                spec:
                \(spec.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
                """
            let (resources, parseErrors) = ManifestReader.parse(base + "\n---\n" + route, file: "t.yaml")
            guard case .failure(let e) = ClusterState.build(resources, parseErrors: parseErrors) else { return "accepted" }
            return e.errors.map(\.description).joined(separator: "\n")
        }
        let cases: [(String, String)] = [
            ("parentRefs: [{group: \"\", kind: Service, namespace: shop, name: nope}]",
             "t.yaml:6:spec.parentRefs[0].name: no Service shop/nope in this config"),
            ("parentRefs: [{group: \"\", kind: Service, namespace: Shop_1, name: web}]", "t.yaml:6:spec.parentRefs[0].namespace"),
            ("parentRefs: [{group: \"\", kind: Service, namespace: shop, name: web}]\nrules: [{backendRefs: [{name: web, port: 80}]}]",
             "t.yaml:6:spec.rules[0].backendRefs[0].name: no Service front/web in this config"),
            ("parentRefs: [{group: \"\", kind: Service, namespace: shop, name: web}]\nrules: [{backendRefs: [{name: web, namespace: shop, port: 81}]}]",
             "t.yaml:6:spec.rules[0].backendRefs[0].port: Service shop/web has no TCP port 81"),
            ("parentRefs: [{group: \"\", kind: Service, namespace: shop, name: web}]\nrules: [{backendRefs: [{name: web, namespace: \"a b\", port: 80}]}]",
             "t.yaml:6:spec.rules[0].backendRefs[0].namespace"),
            ("parentRefs: [{group: \"\", kind: Service, namespace: shop, name: web}]\nrules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: gone, namespace: shop, port: 80}}}], backendRefs: [{name: web, namespace: shop, port: 80}]}]",
             "t.yaml:6:spec.rules[0].filters[0].requestMirror.backendRef.name: no Service shop/gone in this config"),
        ]
        for (spec, expected) in cases {
            let text = errors(spec)
            #expect(text.contains(expected), "\(spec): \(text)")
        }
        #expect(errors("parentRefs: [{group: \"\", kind: Service, namespace: shop, name: web}]\nrules: [{backendRefs: [{name: web, namespace: shop, port: 80}]}]")
                    == "accepted")
    }

    @Test func precedenceFollowsTheGatewayAPI() throws {
        let s = try state(webRoute("""
              - name: prefix
                matches: [{path: {type: PathPrefix, value: /api}}]
                backendRefs: [{name: web, port: 80}]
              - name: longer
                matches: [{path: {type: PathPrefix, value: /api/v2}}]
                backendRefs: [{name: canary, port: 80}]
              - name: exact
                matches: [{path: {type: Exact, value: /api}}]
                backendRefs: [{name: canary, port: 80}]
              - name: header
                matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-User, value: beta}]}]
                backendRefs: [{name: canary, port: 80}]
              - name: method
                matches: [{path: {type: PathPrefix, value: /api}, method: DELETE}]
                backendRefs: [{name: canary, port: 80}]
              - name: regex
                matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}, queryParams: [{name: v, value: "2"}]}]
                backendRefs: [{name: canary, port: 80}]
            """))
        let table = ProxyTable(s)
        let matcher = RouteMatcher(try #require(table.frontends["198.19.0.10:80"]))
        func rule(_ r: RouteMatcher.Request) -> String? { matcher.route(r)?.action.name.split(separator: "#").last.map(String.init) }
        #expect(rule(request("GET", "/api")) == "exact")
        #expect(rule(request("GET", "/api/v2/x")) == "longer")
        #expect(rule(request("GET", "/api/v1")) == "prefix")
        #expect(rule(request("GET", "/apix")) == nil, "PathPrefix matches whole segments; no fallback when routes exist (404)")
        #expect(rule(request("GET", "/api/v1", ["x-user": "beta"])) == "header")
        #expect(rule(request("DELETE", "/api/v1", ["x-user": "beta"])) == "method", "method outranks headers")
        #expect(rule(request("GET", "/items/12?a=1&v=2")) == "regex")
        #expect(rule(request("GET", "/items/12?v=3")) == nil)
        #expect(rule(request("GET", "/items/x?v=2")) == nil)
    }

    @Test func pathRewritesFollowTheSpec() {
        let prefix = HTTPRoute.Match(path: .prefix("/api"), headers: [], queryParams: [], method: nil)
        #expect(RouteMatcher.rewrite(path: "/api/items", with: .replacePrefixMatch("/v2"), match: prefix) == "/v2/items")
        #expect(RouteMatcher.rewrite(path: "/api", with: .replacePrefixMatch("/v2"), match: prefix) == "/v2")
        #expect(RouteMatcher.rewrite(path: "/api/items", with: .replacePrefixMatch("/"), match: prefix) == "/items")
        #expect(RouteMatcher.rewrite(path: "/anything", with: .replaceFullPath("/fixed"), match: nil) == "/fixed")
    }

    /// The Gateway API's ReplacePrefixMatch table, row by row, with the
    /// prefix and replacement read from a route as a manifest gives them
    /// (a trailing "/" on either, an empty replacement).
    @Test(arguments: [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"), ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"), ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"), ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"), ("/foo/", "/foo", "", "/"), ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"), ("/foo", "/foo", "/", "/"),
    ])
    func replacePrefixMatchAsTheAPIsTableSays(request: String, prefix: String, replacement: String, rewritten: String) throws {
        let parsed = ManifestReader.parse(base + "\n---\n" + webRoute("""
              - matches: [{path: {type: PathPrefix, value: "\(prefix)"}}]
                filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: "\(replacement)"}}}]
                backendRefs: [{name: web, port: 80}]
            """), file: "t.yaml")
        #expect(parsed.errors.isEmpty, "\(parsed.errors)")
        let route = try #require(parsed.resources.compactMap { if case .httpRoute(let r) = $0.resource { r } else { nil } }.first)
        let rule = try #require(route.rules.first)
        guard case .urlRewrite(let w) = try #require(rule.filters.first), let modifier = w.path else {
            Issue.record("no URLRewrite path")
            return
        }
        #expect(RouteMatcher.rewrite(path: Substring(request), with: modifier, match: rule.matches.first) == rewritten)
    }

    @Test func durationsAndBadInput() throws {
        let l = DocumentLocation(file: "f", document: 1)
        #expect(try HTTPRoute.duration("1m30s", field: "x", at: l) == .seconds(90))
        #expect(try HTTPRoute.duration("250ms", field: "x", at: l) == .milliseconds(250))
        #expect(try HTTPRoute.duration("0s", field: "x", at: l) == nil, "0s means no timeout")
        for bad in ["5", "s", "1d", "123456s", "1h1m1s1ms1h", ""] {
            #expect(throws: ManifestError.self) { try HTTPRoute.duration(bad, field: "x", at: l) }
        }
        let errors = routeErrors("""
              - backendRefs: [{name: web, port: 80}]
                retry: {codes: [200], attempts: 2}
            """)
        #expect(errors.first?.description.contains("t.yaml:6:spec.rules[0].retry.codes[0]") == true, "\(errors)")
        // grpcStatuses is a TrafficPolicy's: not a Gateway API route field.
        let grpc = routeErrors("""
              - backendRefs: [{name: web, port: 80}]
                retry: {grpcStatuses: [UNAVAILABLE]}
            """)
        #expect(grpc.first?.description.contains("t.yaml:6:spec.rules[0].retry.grpcStatuses: unknown field") == true, "\(grpc)")
    }
}

@Suite struct HTTPRouteFilterValueTests {
    /// What a filter would put on the wire is checked when the file is read,
    /// not left to fail each request.
    @Test(arguments: [
        ("requestHeaderModifier: {set: [{name: x-a, value: \"a\\r\\nx-b: b\"}]}", "filters[0].requestHeaderModifier.set[0].value", "not a valid header value"),
        ("responseHeaderModifier: {add: [{name: x-a, value: \" padded\"}]}", "filters[0].responseHeaderModifier.add[0].value", "not a valid header value"),
        ("requestHeaderModifier: {add: [{name: x-a, value: \"nul\\0\"}]}", "filters[0].requestHeaderModifier.add[0].value", "not a valid header value"),
        ("urlRewrite: {hostname: \"Bad_Host\"}", "filters[0].urlRewrite.hostname", "not a valid hostname"),
        ("requestRedirect: {hostname: \"a.example/evil\"}", "filters[0].requestRedirect.hostname", "not a valid hostname"),
    ])
    func badFilterValuesNameTheirField(filter: String, field: String, reason: String) throws {
        let type = filter.hasPrefix("requestHeader") ? "RequestHeaderModifier" : filter.hasPrefix("responseHeader") ? "ResponseHeaderModifier"
            : filter.hasPrefix("urlRewrite") ? "URLRewrite" : "RequestRedirect"
        let errors = routeErrors("""
              - filters: [{type: \(type), \(filter)}]
                backendRefs: [{name: web, port: 80}]
            """)
        let text = errors.map(\.description).joined(separator: "\n")
        #expect(text.contains("t.yaml:6:spec.rules[0].\(field)") && text.contains(reason), "\(text)")
    }

    @Test func goodFilterValuesAreKept() throws {
        let (resources, errors) = ManifestReader.parse(webRoute("""
              - filters:
                - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-env, value: "canary\\tv2 (a=b; c)"}], add: [{name: x-empty, value: ""}]}}
                - {type: URLRewrite, urlRewrite: {hostname: api.shop.svc}}
                backendRefs: [{name: web, port: 80}]
            """), file: "t.yaml")
        #expect(errors.isEmpty, "\(errors)")
        guard case .httpRoute(let route) = resources.first?.resource else { Issue.record("no route: \(resources)"); return }
        guard case .requestHeaderModifier(let m) = route.rules.first?.filters.first else { Issue.record("\(route.rules)"); return }
        #expect(m.set.first?.value == "canary\tv2 (a=b; c)" && m.add.first?.value == "")
        guard case .urlRewrite(let rewrite) = route.rules.first?.filters.last else { Issue.record("\(route.rules)"); return }
        #expect(rewrite.hostname == "api.shop.svc")
    }
}

/// What a Kubernetes API server would refuse by the Gateway API's own
/// schema (its list and length limits and its CEL rules), Weft refuses when
/// it reads the file, naming the field: no API server stands in front of it.
@Suite struct HTTPRouteSchemaTests {
    static func many(_ n: Int, _ item: (Int) -> String) -> String { (0..<n).map(item).joined(separator: ", ") }

    @Test(arguments: [
        ("  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}, {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: c, value: d}]}}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].filters[1].type", "a second RequestHeaderModifier filter"),
        ("  - backendRefs: [{name: web, port: 80, filters: [{type: URLRewrite, urlRewrite: {hostname: a}}, {type: URLRewrite, urlRewrite: {hostname: b}}]}]",
         "spec.rules[0].backendRefs[0].filters[1].type", "a second URLRewrite filter"),
        ("  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}, {name: X-A, value: c}]}}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].filters[0].requestHeaderModifier.set[1].name", "\"X-A\" is in set already"),
        ("  - name: one\n    backendRefs: [{name: web, port: 80}]\n  - name: one\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[1].name", "\"one\" names another rule of this route already"),
        ("  - name: Rule_1\n    backendRefs: [{name: web, port: 80}]", "spec.rules[0].name", "not a valid rule name"),
        ("  - matches: [{path: {type: PathPrefix, value: /\(String(repeating: "p", count: 1024))}}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].matches[0].path.value", "at most 1024 characters, got 1025"),
        ("  - matches: [{headers: [{name: x-a, value: \(String(repeating: "v", count: 4097))}]}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].matches[0].headers[0].value", "at most 4096 characters, got 4097"),
        ("  - matches: [{queryParams: [{name: q, value: \(String(repeating: "v", count: 1025))}]}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].matches[0].queryParams[0].value", "at most 1024 characters, got 1025"),
        ("  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: \(String(repeating: "h", count: 257)), value: v}]}}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].filters[0].responseHeaderModifier.add[0].name", "at most 256 characters, got 257"),
        ("  - matches: [{headers: [\(many(17) { "{name: h\($0), value: v}" })]}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].matches[0].headers", "at most 16 entries, got 17"),
        ("  - backendRefs: [\(many(17) { _ in "{name: web, port: 80}" })]", "spec.rules[0].backendRefs", "at most 16 entries, got 17"),
        ("  - matches: [\(many(65) { "{path: {type: Exact, value: /m\($0)}}" })]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].matches", "at most 64 entries, got 65"),
        ((0..<17).map { _ in "  - backendRefs: [{name: web, port: 80}]" }.joined(separator: "\n"), "spec.rules", "at most 16 entries, got 17"),
        ((0..<3).map { r in "  - matches: [\(many(43) { "{path: {type: Exact, value: /r\(r)m\($0)}}" })]\n    backendRefs: [{name: web, port: 80}]" }.joined(separator: "\n"),
         "spec.rules", "at most 128 matches in all the rules together, got 129"),
        ("  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {remove: [x-a, X-A]}}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].filters[0].requestHeaderModifier.remove[1]", "\"X-A\" is in remove already"),
        ("  - matches: [{queryParams: [{name: \"a b\", value: x}]}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].matches[0].queryParams[0].name", "\"a b\" is not a valid query parameter name"),
        ("  - matches: [{path: {type: PathPrefix, value: /a}}, {path: {type: PathPrefix, value: /b}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /c}}}]\n    backendRefs: [{name: web, port: 80}]",
         "spec.rules[0].matches", "ReplacePrefixMatch needs exactly one match, a PathPrefix one; this rule has 2"),
        ("  - matches: [{path: {type: Exact, value: /a}}]\n    backendRefs: [{name: web, port: 80, filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /c}}}]}]",
         "spec.rules[0].matches[0].path", "ReplacePrefixMatch needs a PathPrefix match"),
        ("  - matches: [{path: {type: RegularExpression, value: /a.*}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /c}}}]",
         "spec.rules[0].matches[0].path", "ReplacePrefixMatch needs a PathPrefix match"),
    ])
    func overTheSchemaNamesTheField(rules: String, field: String, reason: String) {
        let text = routeErrors(rules).map(\.description).joined(separator: "\n")
        #expect(text.hasPrefix("t.yaml:6:\(field):") && text.contains(reason), "\(text.prefix(300))")
    }

    /// The API's path rules (CEL on HTTPPathMatch): a path that would
    /// normalize to another, or holds what a path cannot, is refused; a
    /// PathPrefix's trailing "/" is ignored ("/api/" is "/api").
    @Test(arguments: [
        ("/a/./b", "must not contain \"/./\""), ("/a/../b", "must not contain \"/../\""), ("/a/..", "must not end with"),
        ("/a/.", "must not end with"), ("/a%2Fb", "must not contain \"%2F\""), ("/a%2fb", "must not contain \"%2f\""),
        ("/a b", "\" \" is not allowed in a path"), ("/caf\u{e9}", "\"\u{e9}\" is not allowed in a path"), ("/a%zz", "two hex digits"),
        ("/a%4", "two hex digits"), ("/a?b=1", "a query is matched by queryParams"), ("/a#b", "must not contain \"#\""),
        ("/a//b", "must not contain \"//\""), ("a", "must start with"),
    ])
    func pathValuesTheAPIWouldRefuse(value: String, reason: String) {
        for type in ["Exact", "PathPrefix"] {
            let text = routeErrors("  - matches: [{path: {type: \(type), value: \"\(value)\"}}]\n    backendRefs: [{name: web, port: 80}]")
                .map(\.description).joined(separator: "\n")
            #expect(text.hasPrefix("t.yaml:6:spec.rules[0].matches[0].path.value:") && text.contains(reason), "\(type) \(value): \(text)")
        }
    }

    @Test func aPathPrefixsTrailingSlashIsIgnored() throws {
        let parsed = ManifestReader.parse(base + "\n---\n" + webRoute("""
              - matches: [{path: {type: PathPrefix, value: /api/}}, {path: {type: Exact, value: /exact/}}, {path: {type: PathPrefix, value: "/a-z_~!$&'()*+,;=:@%41"}}]
                backendRefs: [{name: web, port: 80}]
            """), file: "t.yaml")
        #expect(parsed.errors.isEmpty, "\(parsed.errors)")
        let route = try #require(parsed.resources.compactMap { if case .httpRoute(let r) = $0.resource { r } else { nil } }.first)
        #expect(route.rules[0].matches.map(\.path) == [.prefix("/api"), .exact("/exact/"), .prefix("/a-z_~!$&'()*+,;=:@%41")])
        #expect(RouteMatcher.pathHasPrefix("/api/items", "/api") && RouteMatcher.pathHasPrefix("/api", "/api")
                && !RouteMatcher.pathHasPrefix("/apix", "/api"))
    }

    @Test func replacePrefixMatchTakesOnePrefixMatchOrTheDefault() throws {
        for rules in [
            "  - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]\n    backendRefs: [{name: web, port: 80}]",
            "  - matches: [{headers: [{name: x-a, value: b}]}]\n    backendRefs: [{name: web, port: 80, filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]}]",
            "  - matches: [{path: {type: PathPrefix, value: /api}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]",
            "  - matches: [{path: {type: Exact, value: /a}}, {path: {type: PathPrefix, value: /b}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /c}}}]\n    backendRefs: [{name: web, port: 80}]",
        ] {
            let errors = routeErrors(rules)
            #expect(errors.isEmpty, "\(rules): \(errors)")
        }
    }

    @Test func hostnamesAreCheckedThoughMeshRoutesIgnoreThem() throws {
        func errors(_ hostnames: String) -> String {
            let route = webRoute("  - backendRefs: [{name: web, port: 80}]")
                .replacingOccurrences(of: "spec:\n", with: "spec:\n  hostnames: \(hostnames)\n")
            return ManifestReader.parse(base + "\n---\n" + route, file: "t.yaml").errors.map(\.description).joined(separator: "\n")
        }
        #expect(errors("[web.shop.svc.cluster.local, \"*.shop.example\"]").isEmpty)
        #expect(errors("[Web_Shop]").hasPrefix("t.yaml:6:spec.hostnames[0]: \"Web_Shop\" is not a hostname"), "\(errors("[Web_Shop]"))")
        #expect(errors("[a.example, 10.0.0.1]").hasPrefix("t.yaml:6:spec.hostnames[1]: \"10.0.0.1\" is an IP address"))
        let seventeen = "[" + Self.many(17) { "h\($0).example" } + "]"
        #expect(errors(seventeen).hasPrefix("t.yaml:6:spec.hostnames: at most 16 hostnames, got 17"), "\(errors(seventeen))")
    }

    @Test func atTheSchemasLimitsARouteIsTaken() throws {
        let rules = """
              - name: all-of-it
                matches: [\(Self.many(64) { "{path: {type: Exact, value: /m\($0)}, headers: [\(Self.many(16) { "{name: h\($0), value: v}" })]}" })]
                filters:
                - {type: RequestHeaderModifier, requestHeaderModifier: {set: [\(Self.many(16) { "{name: s\($0), value: \(String(repeating: "v", count: 4096))}" })]}}
                - {type: RequestMirror, requestMirror: {backendRef: {name: web, port: 80}}}
                - {type: RequestMirror, requestMirror: {backendRef: {name: canary, port: 80}}}
                backendRefs: [\(Self.many(16) { _ in "{name: web, port: 80}" })]
              - name: the-rest
                matches: [\(Self.many(64) { "{path: {type: PathPrefix, value: /\(String(repeating: "p", count: 1000))\($0)}}" })]
                backendRefs: [{name: web, port: 80}]
            """
        let s = try state(webRoute(rules))
        #expect(s.httpRoutes.first?.rules.map(\.matches.count) == [64, 64])
    }
}

/// `sessionPersistence` on a route rule (GEP-1619): read into the rule, made
/// a SessionRule of the proxy's table with a name of the rule's own when it
/// gives none, and every bad value refused naming its field.
@Suite struct SessionPersistenceTests {
    @Test func rulesKeepTheirOwnSessions() throws {
        let s = try state(webRoute("""
              - matches: [{path: {type: PathPrefix, value: /cart}}]
                backendRefs: [{name: web, port: 80, weight: 0}, {name: canary, port: 80}]
                sessionPersistence: {sessionName: cart, absoluteTimeout: 1h, idleTimeout: 90s, cookieConfig: {lifetimeType: Permanent}}
              - matches: [{path: {type: PathPrefix, value: /a}}]
                backendRefs: [{name: web, port: 80}]
                sessionPersistence: {}
              - matches: [{path: {type: PathPrefix, value: /b}}]
                backendRefs: [{name: web, port: 80}]
                sessionPersistence: {type: Header}
              - backendRefs: [{name: web, port: 80}]
            """))
        let table = ProxyTable(s)
        let actions = table.frontends["198.19.0.10:80"]?.actions ?? []
        let sessions = Dictionary(uniqueKeysWithValues: actions.map { ($0.name, $0.session) })
        let cart = try #require(sessions["shop/r#0"] ?? nil)
        #expect(cart.name == "cart" && cart.kind == .cookie && cart.absoluteSeconds == 3600 && cart.idleSeconds == 90 && cart.permanent)
        let a = try #require(sessions["shop/r#1"] ?? nil), b = try #require(sessions["shop/r#2"] ?? nil)
        #expect(a.name.hasPrefix("weft-session-") && a.name.count == 21 && a.kind == .cookie && !a.permanent, "\(a)")
        #expect(b.name.hasPrefix("x-weft-session-") && b.kind == .header && a.tag != b.tag && a.tag != cart.tag, "\(a) \(b)")
        #expect(a.absoluteSeconds == nil && a.idleSeconds == nil)
        #expect(sessions["shop/r#3"] == .some(nil), "a rule without sessionPersistence has none")
        // The same route read again (another node, a restarted agent) gives the same names and tags.
        #expect(ProxyTable(try state(webRoute("""
              - matches: [{path: {type: PathPrefix, value: /cart}}]
                backendRefs: [{name: web, port: 80}]
              - matches: [{path: {type: PathPrefix, value: /a}}]
                backendRefs: [{name: web, port: 80}]
                sessionPersistence: {}
            """))).frontends["198.19.0.10:80"]?.actions.first { $0.name == "shop/r#1" }?.session == a)
    }

    @Test(arguments: [
        ("{type: Sticky}", "sessionPersistence.type", "must be Cookie or Header"),
        ("{sessionName: \"my session\"}", "sessionPersistence.sessionName", "not a valid header name"),
        ("{sessionName: \(String(repeating: "s", count: 129))}", "sessionPersistence.sessionName", "at most 128"),
        ("{absoluteTimeout: 1d}", "sessionPersistence.absoluteTimeout", "not a Gateway API duration"),
        ("{idleTimeout: 500ms}", "sessionPersistence.idleTimeout", "at least 1s"),
        ("{absoluteTimeout: 0s}", "sessionPersistence.absoluteTimeout", "at least 1s"),
        ("{cookieConfig: {lifetimeType: Permanent}}", "sessionPersistence.cookieConfig.lifetimeType", "Permanent needs absoluteTimeout"),
        ("{cookieConfig: {lifetimeType: Forever}}", "sessionPersistence.cookieConfig.lifetimeType", "must be Session or Permanent"),
        ("{type: Header, absoluteTimeout: 1h, cookieConfig: {lifetimeType: Permanent}}", "sessionPersistence.cookieConfig", "applies to type Cookie"),
        ("{sessionName: a, stickiness: true}", "sessionPersistence.stickiness", "unknown field"),
    ])
    func badValuesNameTheirField(value: String, field: String, reason: String) {
        let text = routeErrors("""
              - backendRefs: [{name: web, port: 80}]
                sessionPersistence: \(value)
            """).map(\.description).joined(separator: "\n")
        #expect(text.contains("t.yaml:6:spec.rules[0].\(field)") && text.contains(reason), "\(text)")
    }

    @Test func aRedirectKeepsNoSessionAndGRPCRoutesTakeOne() throws {
        let redirect = routeErrors("""
              - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301, hostname: b.shop}}]
                sessionPersistence: {}
            """).map(\.description).joined(separator: "\n")
        #expect(redirect.contains("t.yaml:6:spec.rules[0].sessionPersistence: a rule with a RequestRedirect"), "\(redirect)")
        let s = try state("""
            apiVersion: gateway.networking.k8s.io/v1
            kind: GRPCRoute
            metadata: {name: g, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: web}]
              rules:
              - backendRefs: [{name: web, port: 80}]
                sessionPersistence: {type: Header, sessionName: x-user-session}
            """)
        let session = ProxyTable(s).frontends["198.19.0.10:80"]?.actions.first?.session
        #expect(session?.name == "x-user-session" && session?.kind == .header, "\(String(describing: session))")
    }
}
