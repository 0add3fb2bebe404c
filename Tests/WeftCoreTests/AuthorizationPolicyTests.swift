import Testing
@testable import WeftCore

private let pods = """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: api, namespace: shop, labels: {app: api}}
    spec: {node: n1, address: 198.18.1.10, serviceAccount: api}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: web, namespace: shop, labels: {app: web}}
    spec: {node: n1, address: 198.18.1.11, serviceAccount: web}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: web2, namespace: shop, labels: {app: web}}
    spec: {node: n2, address: 198.18.2.11, serviceAccount: web}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: batch, namespace: ops, labels: {app: batch}}
    spec: {node: n1, address: 198.18.1.20, serviceAccount: runner}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: probe, namespace: ops, labels: {app: probe}}
    spec: {node: n2, address: 198.18.2.20}
    """

private func policy(_ spec: String, name: String = "p", namespace: String = "shop") -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: \(name), namespace: \(namespace)}
    spec:
    \(spec.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
    """
}

private func parse(_ text: String) -> (ClusterState?, [String]) { buildState(text, file: "authz.yaml") }

private func request(_ principal: String?, ns: String?, ip: String = "198.18.1.11", port: UInt16 = 8080,
                     _ method: String? = nil, _ path: String = "/", host: String? = nil,
                     headers: [(String, String)] = []) -> AuthorizationRequest {
    AuthorizationRequest(principal: principal, namespace: ns, sourceIP: IPv4Address(ip)!, port: port,
                         http: method.map { .init(method: $0, path: path, host: host, headers: headers) })
}

struct AuthorizationPolicyTests {
    @Test func everyFieldParses() throws {
        let (state, errors) = parse(pods + "\n---\n" + policy("""
            selector: {matchLabels: {app: api}}
            action: DENY
            rules:
            - from:
              - source: {principals: ["spiffe://weft.test/ns/shop/sa/web", "*/sa/admin"], notNamespaces: [kube-system], ipBlocks: [198.18.0.0/16, 198.19.0.1], notIpBlocks: [198.18.9.0/24]}
              - source: {notPrincipals: ["*"], namespaces: ["ops*"]}
              to:
              - operation: {hosts: ["API.shop*"], notHosts: [evil], ports: ["8080", 9090], notPorts: ["22"], methods: [GET, HEAD], notMethods: [DELETE], paths: ["/v1/*", "*.json", /exact], notPaths: [/v1/admin*]}
              when:
              - key: request.headers[X-Tenant]
                values: [blue]
                notValues: [red]
              - {key: source.ip, values: [198.18.1.0/24]}
              - {key: source.namespace, notValues: [ops]}
              - {key: source.principal, values: ["*"]}
              - {key: destination.port, values: ["8080"]}
            """))
        let s = try #require(state, "\(errors)")
        let p = try #require(s.authorizationPolicies.first)
        #expect(p.action == .deny && p.rules.count == 1 && p.needsHTTP)
        let r = p.rules[0]
        #expect(r.from[0].principals == ["weft.test/ns/shop/sa/web", "*/sa/admin"], "the spiffe:// scheme is dropped")
        #expect(r.from[0].ipBlocks == ["198.18.0.0/16", "198.19.0.1/32"])
        #expect(r.to[0].ports == [8080, 9090] && r.to[0].notPorts == [22])
        #expect(r.when[0].key == .header("x-tenant") && r.when.count == 5)
        let api = try #require(s.workloads.first { $0.metadata.name == "api" })
        let web = try #require(s.workloads.first { $0.metadata.name == "web" })
        #expect(s.authorizationPolicies(for: api).count == 1 && s.authorizationPolicies(for: web).isEmpty)
    }

    @Test func badPoliciesAreRefusedWithFileDocumentAndField() {
        let cases: [(String, String)] = [
            ("action: MAYBE", "spec.action"),
            ("rules: [{from: [{source: {principals: [\"a*b\"]}}]}]", "spec.rules[0].from[0].source.principals[0]"),
            ("rules: [{from: [{source: {ipBlocks: [\"198.18.0.1/16\"]}}]}]", "spec.rules[0].from[0].source.ipBlocks[0]"),
            ("rules: [{from: [{source: {}}]}]", "spec.rules[0].from[0].source"),
            ("rules: [{from: [{principals: [a]}]}]", "spec.rules[0].from[0].source: required"),
            ("rules: [{to: [{operation: {ports: [\"http\"]}}]}]", "spec.rules[0].to[0].operation.ports[0]"),
            ("rules: [{to: [{operation: {ports: [70000]}}]}]", "spec.rules[0].to[0].operation.ports[0]"),
            ("rules: [{to: [{operation: {paths: [api]}}]}]", "spec.rules[0].to[0].operation.paths[0]"),
            ("rules: [{to: [{operation: {methods: []}}]}]", "spec.rules[0].to[0].operation.methods"),
            ("rules: [{when: [{key: \"request.auth.claims[iss]\", values: [x]}]}]", "spec.rules[0].when[0].key"),
            ("rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0].values"),
            ("rules: [{when: [{key: source.ip, values: [nope]}]}]", "spec.rules[0].when[0].values[0]"),
            ("rules: [{from: [{source: {requestPrincipals: [x]}}]}]", "spec.rules[0].from[0].source.requestPrincipals"),
            ("rules: [{unknown: 1}]", "spec.rules[0].unknown"),
            ("provider: {name: ext}", "spec.provider"),
            ("selector: {matchLabels: {\"bad key!\": x}}", "spec.selector"),
        ]
        for (spec, field) in cases {
            let (state, errors) = parse(policy(spec))
            #expect(state == nil, "accepted: \(spec)")
            #expect(errors.contains { $0.hasPrefix("authz.yaml:1:\(field)") }, "\(spec) -> \(errors)")
        }
    }

    @Test func decisionsFollowIstio() throws {
        let (state, errors) = parse(pods + "\n---\n" + policy("""
            selector: {matchLabels: {app: api}}
            rules:
            - from: [{source: {principals: ["weft.test/ns/shop/sa/web"]}}]
              to: [{operation: {methods: [GET], paths: ["/public/*", "*.css", /health]}}]
            - from: [{source: {namespaces: ["ops"]}}]
              to: [{operation: {ports: ["9090"]}}]
            - to: [{operation: {hosts: ["api.shop"], methods: [POST]}}]
              when: [{key: "request.headers[x-tenant]", values: [blue], notValues: [red]}]
            """, name: "allow") + "\n---\n" + policy("""
            selector: {matchLabels: {app: api}}
            action: DENY
            rules:
            - to: [{operation: {ports: ["8080"], paths: ["/public/secret"]}}]
            - from: [{source: {ipBlocks: [198.18.2.0/24], notPrincipals: ["*/sa/web"]}}]
            """, name: "deny") + "\n---\n" + policy("""
            action: AUDIT
            rules: [{to: [{operation: {methods: [DELETE]}}]}]
            """, name: "audit"))
        let s = try #require(state, "\(errors)")
        let api = try #require(s.workloads.first { $0.metadata.name == "api" })
        let set = AuthorizationSet(s.authorizationPolicies(for: api))
        let web = "weft.test/ns/shop/sa/web"
        func allowed(_ r: AuthorizationRequest) -> Bool { set.evaluate(r).allowed }

        #expect(allowed(request(web, ns: "shop", "GET", "/public/index.html")))
        #expect(allowed(request(web, ns: "shop", "GET", "/static/site.css")))
        #expect(allowed(request(web, ns: "shop", "GET", "/health")))
        #expect(!allowed(request(web, ns: "shop", "GET", "/healthz")), "exact path")
        #expect(!allowed(request(web, ns: "shop", "POST", "/public/x")), "method")
        #expect(!allowed(request("weft.test/ns/shop/sa/api", ns: "shop", "GET", "/public/x")), "other principal")
        #expect(!allowed(request(nil, ns: nil, "GET", "/public/x")), "no principal: plaintext")
        #expect(!allowed(request(web, ns: "shop", "GET", "/public/secret")), "DENY wins over ALLOW")
        let d = set.evaluate(request(web, ns: "shop", "GET", "/public/secret"))
        #expect(d.reason.contains("shop/deny rules[0]"))
        #expect(allowed(request(nil, ns: "ops", port: 9090)), "namespace and port, over TCP")
        #expect(!allowed(request(nil, ns: "ops", port: 9091)))
        #expect(allowed(request(web, ns: "shop", ip: "198.18.2.11", "GET", "/public/x")), "the ipBlock DENY spares the web principal")
        #expect(!allowed(request("weft.test/ns/ops/sa/default", ns: "ops", ip: "198.18.2.20", port: 9090)),
                "ipBlock DENY with notPrincipals")
        #expect(allowed(request(nil, ns: nil, "POST", "/", host: "API.shop:8080", headers: [("x-tenant", "blue")])),
                "host without case and port, header condition")
        #expect(!allowed(request(nil, ns: nil, "POST", "/", host: "api.shop", headers: [("x-tenant", "blue"), ("x-tenant", "red")])),
                "notValues")
        #expect(!allowed(request(nil, ns: nil, "POST", "/", host: "api.shop")), "header missing")
        // TCP: HTTP-only parts never match in ALLOW, always in DENY.
        #expect(!allowed(request(web, ns: "shop")), "ALLOW rules that read HTTP do not match TCP")
        #expect(set.couldAllowHTTP(request(web, ns: "shop")), "but an HTTP request might be allowed")
        #expect(set.couldAllowHTTP(request("weft.test/ns/shop/sa/api", ns: "shop")), "rule 2 (any source, by host and method) could allow anyone")
        #expect(set.evaluate(request(web, ns: "shop", "DELETE", "/x")).audited == ["shop/audit rules[0]"])

        // No ALLOW policy: allowed unless denied; an ALLOW policy with no rules: nothing allowed.
        let denyOnly = AuthorizationSet(s.authorizationPolicies.filter { $0.action == .deny })
        #expect(denyOnly.evaluate(request(nil, ns: nil, port: 1)).allowed)
        let (empty, _) = parse(pods + "\n---\n" + policy("selector: {matchLabels: {app: api}}"))
        let none = AuthorizationSet(try #require(empty).authorizationPolicies)
        #expect(!none.evaluate(request(web, ns: "shop", "GET", "/")).allowed)
        // A DENY policy's HTTP parts count as matching on TCP.
        let tcpDeny = AuthorizationSet(s.authorizationPolicies.filter { $0.metadata.name == "deny" })
        #expect(!tcpDeny.evaluate(request(web, ns: "shop")).allowed, "DENY of /public/secret on 8080 denies TCP to 8080 outright")
    }

    @Test func meshWidePoliciesLiveInWeftSystem() throws {
        let (state, errors) = parse(pods + "\n---\n" + policy("""
            action: DENY
            rules: [{from: [{source: {namespaces: [ops]}}]}]
            """, namespace: "weft-system") + "\n---\n" + policy("rules: [{}]", name: "ops-only", namespace: "ops"))
        let s = try #require(state, "\(errors)")
        #expect(s.workloads.allSatisfy { !s.authorizationPolicies(for: $0).isEmpty })
        let web = try #require(s.workloads.first { $0.metadata.name == "web" })
        #expect(s.authorizationPolicies(for: web).map(\.metadata.name) == ["p"])
    }

    @Test func agentsProbeOtherNodesPodsOnlyWhenPlaintextCanReachThem() throws {
        let (state, errors) = parse(pods + "\n---\n" + policy("""
            selector: {matchLabels: {app: api}}
            rules: [{from: [{source: {namespaces: [shop]}}]}]
            """) + "\n---\n" + policy("""
            action: AUDIT
            rules: [{}]
            """, name: "audit", namespace: "ops") + """

            ---
            apiVersion: weft.dev/v1alpha1
            kind: PeerAuthentication
            metadata: {name: strict, namespace: shop}
            spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}
            """)
        let s = try #require(state, "\(errors)")
        func probeable(_ name: String, from node: String) throws -> Bool {
            s.plaintextProbeable(try #require(s.workloads.first { $0.metadata.name == name }), from: node)
        }
        #expect(try probeable("api", from: "n1"), "its own node's agent probes it")
        #expect(try !probeable("api", from: "n2"), "an AuthorizationPolicy would refuse another node's address")
        #expect(try !probeable("web", from: "n2"), "STRICT drops plaintext from another node")
        #expect(try probeable("web2", from: "n2") && !probeable("web2", from: "n1"))
        #expect(try probeable("probe", from: "n1"), "an AUDIT policy decides nothing")
    }

    /// The kernel's entries, walked the way authz_verdict does, against the
    /// evaluator on the same TCP connection: where nothing forces the
    /// compiler to approximate (one pod per identity), they must agree.
    @Test func kernelEntriesAgreeWithTheEvaluator() throws {
        var rng = SplitMix(seed: 7)
        let sourcesParts: [String] = [
            "principals: [\"weft.test/ns/shop/sa/web\"]", "notPrincipals: [\"*/sa/web\"]", "namespaces: [ops]",
            "notNamespaces: [shop]", "ipBlocks: [198.18.2.0/24]", "notIpBlocks: [198.18.1.0/25]", "principals: [\"*\"]",
            "ipBlocks: [203.0.113.0/24]",
        ]
        let operations = ["ports: [\"8080\"]", "notPorts: [\"8080\", \"22\"]", "methods: [GET]", "ports: [\"9090\"], paths: [/x]"]
        let whens = ["{key: source.namespace, values: [ops]}", "{key: destination.port, notValues: [\"9090\"]}",
                     "{key: \"request.headers[x]\", values: [y]}", "{key: source.ip, notValues: [198.18.2.0/24]}"]
        for round in 0..<60 {
            var docs = [pods]
            for i in 0..<(1 + rng.below(3)) {
                var rules: [String] = []
                for _ in 0..<rng.below(3) {
                    var parts: [String] = []
                    if rng.below(3) > 0 { parts.append("from: [{source: {\(rng.pick(sourcesParts))}}]") }
                    if rng.below(2) > 0 { parts.append("to: [{operation: {\(rng.pick(operations))}}]") }
                    if rng.below(3) == 0 { parts.append("when: [\(rng.pick(whens))]") }
                    rules.append("{\(parts.joined(separator: ", "))}")
                }
                let action = rng.pick(["ALLOW", "DENY", "AUDIT"])
                let selector = rng.pick(["", "selector: {matchLabels: {app: api}}\n", "selector: {matchLabels: {app: batch}}\n"])
                let ns = rng.pick(["shop", "ops", "weft-system"])
                docs.append(policy("\(selector)action: \(action)\nrules: [\(rules.joined(separator: ", "))]", name: "p\(i)",
                                   namespace: ns))
            }
            let (state, errors) = parse(docs.joined(separator: "\n---\n"))
            let s = try #require(state, "round \(round): \(errors)")
            var compiler = PolicyCompiler()
            compiler.trustDomain = "weft.test"
            compiler.node = "n1"
            let table = compiler.compile(s)
            let sources: [(IPv4Address, Workload?)] = s.workloads.map { ($0.address, $0) }
                + [(IPv4Address("203.0.113.5")!, nil), (IPv4Address("192.0.2.1")!, nil)]
            for dst in s.workloads where dst.node == "n1" {
                let set = AuthorizationSet(s.authorizationPolicies(for: dst))
                for (address, src) in sources where address != dst.address {
                    for port: UInt16 in [22, 8080, 9090, 443] {
                        let local = src?.node == "n1"
                        let expected = set.evaluate(AuthorizationRequest(
                            principal: local ? src.map { "weft.test/ns/\($0.metadata.namespace)/sa/\($0.serviceAccount)" } : nil,
                            namespace: local ? src?.metadata.namespace : nil, sourceIP: address, port: port)).allowed
                        let got = Self.kernelAllows(table, dst: dst.address, src: address, local: local, port: port)
                        #expect(got == expected, "round \(round): \(src?.metadata.name ?? "\(address)") -> \(dst.metadata.name):\(port)\n\(docs.dropFirst().joined(separator: "\n---\n"))")
                    }
                }
            }
        }
    }

    /// authz_verdict (bpf/lib/policy.h) over a compiled table.
    static func kernelAllows(_ t: PolicyTable, dst: IPv4Address, src: IPv4Address, local: Bool, port: UInt16) -> Bool {
        guard let d = t.endpoints[dst], d.authz else { return true }
        let peer: UInt32
        if let s = t.endpoints[src] {
            peer = local ? s.identity : (s.cidrClass != 0 ? s.cidrClass : ReservedIdentity.world)
        } else {
            let c = PolicyCompiler.longestMatch(src, t.cidrClasses) ?? 0
            peer = c != 0 ? c : ReservedIdentity.world
        }
        func hit(_ kind: PolicyEntryKey.Kind, _ p: UInt32) -> Bool {
            t.entries.keys.contains { k in
                k.identity == d.identity && k.kind == kind && k.peer == p
                    && (k.proto == nil || (k.proto == 6 && (k.portPrefix?.range.contains(port) ?? true)))
            }
        }
        if hit(.authzDeny, peer) || hit(.authzDeny, ReservedIdentity.any) { return false }
        return hit(.authzAllow, peer) || hit(.authzAllow, ReservedIdentity.any)
    }
}

extension SplitMix {
    mutating func pick<T>(_ xs: [T]) -> T { xs[below(xs.count)] }
}
