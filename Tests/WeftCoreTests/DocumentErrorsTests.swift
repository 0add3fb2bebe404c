import Testing
@testable import WeftCore

/// One wrong field does not hide the next: within a document the reader goes
/// on to a list's next item and an item's next field, and lists them all
/// (as an API server lists every invalid field of an object it refuses);
/// the document is still refused whole.
@Suite struct DocumentErrorsTests {
    static let service = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop}
        spec:
          clusterIP: 198.19.0.10
          selector: {app: web}
          ports: [{name: http, port: 80}]
        """

    static func lines(_ yaml: String) -> [String] {
        let r = ManifestReader.parse(yaml, file: "t.yaml")
        return r.errors.map(\.description)
    }

    /// `file:doc:field` of an error line.
    static func field(_ line: String) -> String { line.split(separator: ":").prefix(3).joined(separator: ":") }

    /// `file:doc:field` of each error of `yaml`.
    static func fields(_ yaml: String) -> [String] { lines(yaml).map(field) }

    /// An HTTPRoute on `service` up to its `rules:`, the rules to follow.
    static let routeOnWeb = """
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web, namespace: shop}
        spec:
          parentRefs: [{group: "", kind: Service, name: web, port: 80}]
          rules:

        """

    @Test func everyWrongFieldOfARouteIsListedInDocumentOrder() {
        let route = Self.routeOnWeb + """
              - matches: [{path: {type: RegularExpression, value: "(a"}}, {path: {type: PathPrefix, value: /ok}}, {method: FETCH}]
                backendRefs: [{name: web, port: 80}, {name: web, port: 0, weight: -1}]
              - backendRefs: [{name: web, port: 80}]
                timeout: {request: 1s}
              - filters: [{type: Rewrite}]
                backendRefs: [{name: web, port: 80}]
            """
        let got = Self.lines(Self.service + "\n---\n" + route)
        let fields = got.map(Self.field)
        #expect(fields == [
            "t.yaml:2:spec.rules[0].matches[0].path.value",
            "t.yaml:2:spec.rules[0].matches[2].method",
            "t.yaml:2:spec.rules[0].backendRefs[1].port",
            "t.yaml:2:spec.rules[0].backendRefs[1].weight",
            "t.yaml:2:spec.rules[1].timeout",
            "t.yaml:2:spec.rules[2].filters[0].type",
        ], "\(got.joined(separator: "\n"))")
        #expect(got.count > 4 && got[4].contains("unknown field"))
        #expect(ManifestReader.parse(Self.service + "\n---\n" + route, file: "t.yaml").resources.count == 1,
                "the route is refused whole; the Service stands")
    }

    @Test func everyWrongPartOfAMatchAndAHeaderFilterIsNamed() {
        let route = Self.routeOnWeb + """
              - matches: [{path: {type: Prefix, value: /a}, headers: [{name: "a b", value: x}, {name: ok, value: x}, {name: c, type: Glob, value: x}], queryParams: [{name: q}], method: FETCH}]
                filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: "x y", value: v}, {name: z}], remove: ["a:b"]}}]
                backendRefs: [{name: web, port: 80}]
            """
        let fields = Self.fields(Self.service + "\n---\n" + route)
        #expect(fields == [
            "t.yaml:2:spec.rules[0].matches[0].path.type",
            "t.yaml:2:spec.rules[0].matches[0].headers[0].name",
            "t.yaml:2:spec.rules[0].matches[0].headers[2].type",
            "t.yaml:2:spec.rules[0].matches[0].queryParams[0].value",
            "t.yaml:2:spec.rules[0].matches[0].method",
            "t.yaml:2:spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            "t.yaml:2:spec.rules[0].filters[0].requestHeaderModifier.set[1].value",
            "t.yaml:2:spec.rules[0].filters[0].requestHeaderModifier.remove[0]",
        ], "\(Self.lines(Self.service + "\n---\n" + route).joined(separator: "\n"))")
    }

    @Test func everyBadPortTypoAndPolicyRuleIsNamed() {
        let service = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec:
              clusterIP: 198.19.0.10
              ports: [{name: a, port: 0}, {name: b, port: 80, protocl: TCP, targetPrt: 8080}, {name: c, port: 81}, {name: d, port: 70000}]
            """
        #expect(Self.lines(service) == [
            "t.yaml:1:spec.ports[0].port: port must be between 1 and 65535, got 0",
            "t.yaml:1:spec.ports[1].protocl: unknown field (line 6)",
            "t.yaml:1:spec.ports[1].targetPrt: unknown field (line 6)",
            "t.yaml:1:spec.ports[3].port: port must be between 1 and 65535, got 70000",
        ], "\(Self.lines(service).joined(separator: "\n"))")

        let policy = """
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: p, namespace: shop}
            spec:
              podSelector: {matchLabels: {app: "a b"}, matchExpressions: [{key: tier, operator: Near}, {key: x, operator: In, values: []}]}
              policyTypes: [Sideways]
              ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}], ports: [{port: 99999}]}]
              egress: [{to: [{podSelector: {matchLabels: {"bad key!": x}}}]}]
            """
        let fields = Self.fields(policy)
        #expect(fields == ["t.yaml:1:spec.podSelector.matchLabels.app", "t.yaml:1:spec.podSelector.matchExpressions[0].operator",
                           "t.yaml:1:spec.podSelector.matchExpressions[1].values", "t.yaml:1:spec.policyTypes[0]", "t.yaml:1:spec.ingress[0].from[0].ipBlock.cidr", "t.yaml:1:spec.ingress[0].ports[0].port",
                           "t.yaml:1:spec.egress[0].to[0].podSelector.matchLabels.bad key!"], "\(Self.lines(policy))")

        let authz = """
            apiVersion: weft.dev/v1alpha1
            kind: AuthorizationPolicy
            metadata: {name: a, namespace: shop}
            spec:
              action: MAYBE
              targetRef: {kind: Service, name: web}
              rules:
              - from: [{source: {principal: [x]}}]
                to: [{operation: {methods: []}}]
              - when: [{key: nope, values: [x]}]
            """
        let authzFields = Self.fields(authz)
        #expect(authzFields == ["t.yaml:1:spec.action", "t.yaml:1:spec.targetRef", "t.yaml:1:spec.rules[0].from[0].source.principal", "t.yaml:1:spec.rules[0].to[0].operation.methods",
                                "t.yaml:1:spec.rules[1].when[0].key"], "\(Self.lines(authz))")
    }

    @Test func everyWrongFieldOfAServiceIsNamedAndNoKnownOneCalledUnknown() {
        let service = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec:
              type: NodePort
              clusterIP: 198.19.0.300
              clusterIPs: [198.19.0.300]
              selector: {app: web}
              ports: [{name: http, port: 80, targetPort: -1}]
              internalTrafficPolicy: Nearest
              sessionAffinity: Sticky
              sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}
              clusterIp: 198.19.0.1
            """
        let fields = Self.fields(service)
        #expect(fields == ["t.yaml:1:spec.type", "t.yaml:1:spec.clusterIP", "t.yaml:1:spec.ports[0].targetPort",
                           "t.yaml:1:spec.internalTrafficPolicy", "t.yaml:1:spec.sessionAffinity", "t.yaml:1:spec.clusterIp"],
                "\(Self.lines(service))")
    }

    @Test func everyWrongFieldOfAServicePortIsNamed() {
        let service = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec: {clusterIP: 198.19.0.10, ports: [{name: HTTP, port: 0, targetPort: "no such", protocol: SCTP, appProtocol: "a b"}]}
            """
        #expect(Self.fields(service) == ["t.yaml:1:spec.ports[0].name", "t.yaml:1:spec.ports[0].port", "t.yaml:1:spec.ports[0].targetPort",
                                         "t.yaml:1:spec.ports[0].protocol", "t.yaml:1:spec.ports[0].appProtocol"], "\(Self.lines(service))")
    }

    @Test func aWorkloadsAnnotationErrorStandsBesideItsSpecs() {
        let workload = """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: w, namespace: shop, annotations: {weft.dev/socket-shortcut: maybe}}
            spec: {node: n1, address: 198.18.1.300}
            """
        #expect(Self.fields(workload).count == 2 && Self.fields(workload).last == "t.yaml:1:spec.address", "\(Self.lines(workload))")
    }

    @Test func everyWrongFieldOfAWorkloadIsNamed() {
        let workload = """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: w, namespace: shop}
            spec: {serviceAccount: Web, address: 198.18.1.300, ports: [{port: 0}], cgroup: ../escape, labels: {}}
            """
        let fields = Self.fields(workload)
        #expect(fields == ["t.yaml:1:spec.serviceAccount", "t.yaml:1:spec.node", "t.yaml:1:spec.address",
                           "t.yaml:1:spec.ports[0].port", "t.yaml:1:spec.cgroup", "t.yaml:1:spec.labels"], "\(Self.lines(workload))")
    }

    @Test func everyWrongSectionOfATrafficPolicyIsNamed() {
        let policy = """
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: p, namespace: shop}
            spec:
              targetRefs: [{kind: Deployment, name: web}, {name: web}, {name: web}]
              loadBalancer: {type: Fastest}
              circuitBreaker: {maxConnections: 0}
              timeout: {http: {requestTimeout: -1s}}
              retries: {attempts: 3}
            """
        let fields = Self.fields(policy)
        #expect(fields == ["t.yaml:1:spec.targetRefs[0].kind", "t.yaml:1:spec.targetRefs[2].name",
                           "t.yaml:1:spec.loadBalancer.type", "t.yaml:1:spec.circuitBreaker.maxConnections",
                           "t.yaml:1:spec.timeout.http.requestTimeout", "t.yaml:1:spec.retries"], "\(Self.lines(policy))")
    }

    @Test func everyWrongSectionOfAMeshConfigIsNamed() {
        let mesh = """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh, namespace: weft-system}
            spec:
              socketShortcut: {enabled: maybe}
              accessLog: {namespaces: [Shop]}
              proxy: {idleTimeout: 10ms}
              policy: {udpIdleTimeout: 2d}
              telemtry: {}
            """
        let fields = Self.fields(mesh)
        #expect(fields == ["t.yaml:1:spec.socketShortcut.enabled", "t.yaml:1:spec.accessLog.namespaces[0]",
                           "t.yaml:1:spec.proxy.idleTimeout", "t.yaml:1:spec.policy.udpIdleTimeout", "t.yaml:1:spec.telemtry"],
                "\(Self.lines(mesh))")
    }

    @Test func everyWrongFieldOfAPeerAuthenticationIsNamed() {
        let peer = """
            apiVersion: weft.dev/v1alpha1
            kind: PeerAuthentication
            metadata: {name: p, namespace: shop}
            spec:
              selector: {matchLabels: {"a b": c}}
              mtls: {mode: SOMETIMES}
              portLevelMtls: {8080: {mode: DISABLE}}
            """
        let fields = Self.fields(peer)
        #expect(fields == ["t.yaml:1:spec.selector.matchLabels.a b", "t.yaml:1:spec.mtls.mode", "t.yaml:1:spec.portLevelMtls"],
                "\(Self.lines(peer))")
    }

    @Test func everyWrongFieldOfATLSRouteIsNamed() {
        let route = """
            apiVersion: gateway.networking.k8s.io/v1
            kind: TLSRoute
            metadata: {name: t, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: web, port: 99999}]
              hostnames: [Bad_Name]
              rules: [{name: R, backendRefs: [{name: web, port: 443, filters: [{type: URLRewrite, urlRewrite: {hostname: a}}]}, {name: web}]}]
            """
        let fields = Self.fields(Self.service + "\n---\n" + route)
        #expect(fields == ["t.yaml:2:spec.parentRefs[0].port", "t.yaml:2:spec.hostnames[0]", "t.yaml:2:spec.rules[0].name",
                           "t.yaml:2:spec.rules[0].backendRefs[0].filters", "t.yaml:2:spec.rules[0].backendRefs[1].port"],
                "\(Self.lines(Self.service + "\n---\n" + route))")
    }

    @Test func aBadNameDoesNotHideTheSpecsMistakes() {
        let service = """
            apiVersion: v1
            kind: Service
            metadata: {name: Web_1, namespace: shop, labels: {"x y": z}}
            spec: {clusterIP: 198.19.0.10, ports: [{port: 0}]}
            """
        let fields = Self.fields(service)
        #expect(fields == ["t.yaml:1:metadata.name", "t.yaml:1:spec.ports[0].port"], "\(Self.lines(service))")
        // The document's own fields still come first, and stop it.
        #expect(Self.lines("apiVersion: v1\nkind: Servce\nmetadata: {name: Web_1}\nspec: {}\n").count == 1)
    }

    @Test func aDocumentWrongEverywhereListsFiftyAndCountsTheRest() {
        let ports = (0..<60).map { "{name: p\($0), port: 0}" }.joined(separator: ", ")
        let got = Self.lines("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [\(ports)]\n")
        #expect(got.count == 51, "\(got.count)")
        #expect(got.first?.hasPrefix("t.yaml:1:spec.ports[0].port: port must be between 1 and 65535") == true)
        #expect(got.dropLast().last?.hasPrefix("t.yaml:1:spec.ports[49].port:") == true)
        #expect(got.last == "t.yaml:1:-: 10 more problems in this document not listed", "\(got.last ?? "")")
    }
}
