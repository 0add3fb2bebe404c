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
              type: NodePorts
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

    @Test func everyWrongFieldInsideATrafficPolicysSectionsIsNamed() {
        let policy = """
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: p, namespace: shop}
            spec:
              targetRefs: [{kind: Deployment, name: "", namespace: other, extra: 1}]
              loadBalancer: {type: RingHash, hashOn: {header: "a b", cookie: {name: "", ttl: soon, path: /}}, locality: Near}
              healthCheck: {interval: 1s, timeout: 2s, healthyThreshold: 0, panicThreshold: 120, http: {path: x, expectedStatuses: [200, 99, 700]}, grpc: {service: "a b"}}
              outlierDetection: {consecutive5xx: -1, interval: 0s, successRate: {minimumHosts: 0, stdevFactor: 0}}
              circuitBreaker: {maxConnections: 0, maxPendingRequests: -1, maxRequests: x, maxRetries: 1, maxRequestsPerConnection: 0}
              rateLimit: {requests: 0, interval: -1s, burst: 0, key: Caller, header: "a:b"}
              faultInjection: {delay: {fixedDelay: 0s, percentage: 200}, abort: {httpStatus: 100, percentage: x}, routes: [shop/a, bad, "a/b/c"], sources: [{serviceAccount: x}, {namespace: shop, who: me}]}
              retry: {codes: [503, 200, x, 600], attempts: 11, backoff: soon, grpcStatuses: [UNAVAILABLE, OK]}
              timeout: {tcp: {connectTimeout: 0s, idle: 1s}, http: {connectionIdleTimeout: 10ms, maxConnectionDuration: -1s, requestTimeout: x}}
            """
        let fields = Self.fields(policy)
        #expect(fields == [
            "t.yaml:1:spec.targetRefs[0].kind", "t.yaml:1:spec.targetRefs[0].name",
            "t.yaml:1:spec.targetRefs[0].namespace", "t.yaml:1:spec.targetRefs[0].extra",
            "t.yaml:1:spec.loadBalancer.hashOn.header", "t.yaml:1:spec.loadBalancer.hashOn.cookie.name",
            "t.yaml:1:spec.loadBalancer.hashOn.cookie.ttl", "t.yaml:1:spec.loadBalancer.hashOn.cookie.path",
            "t.yaml:1:spec.loadBalancer.locality",
            "t.yaml:1:spec.healthCheck.timeout", "t.yaml:1:spec.healthCheck.healthyThreshold",
            "t.yaml:1:spec.healthCheck.panicThreshold", "t.yaml:1:spec.healthCheck.http.path",
            "t.yaml:1:spec.healthCheck.http.expectedStatuses[1]", "t.yaml:1:spec.healthCheck.http.expectedStatuses[2]",
            "t.yaml:1:spec.healthCheck.grpc.service", "t.yaml:1:spec.healthCheck.grpc",
            "t.yaml:1:spec.outlierDetection.consecutive5xx", "t.yaml:1:spec.outlierDetection.interval",
            "t.yaml:1:spec.outlierDetection.successRate.minimumHosts", "t.yaml:1:spec.outlierDetection.successRate.stdevFactor",
            "t.yaml:1:spec.circuitBreaker.maxConnections", "t.yaml:1:spec.circuitBreaker.maxPendingRequests",
            "t.yaml:1:spec.circuitBreaker.maxRequests", "t.yaml:1:spec.circuitBreaker.maxRequestsPerConnection",
            "t.yaml:1:spec.rateLimit.requests", "t.yaml:1:spec.rateLimit.interval", "t.yaml:1:spec.rateLimit.burst",
            "t.yaml:1:spec.rateLimit.key", "t.yaml:1:spec.rateLimit.header",
            "t.yaml:1:spec.faultInjection.delay.fixedDelay", "t.yaml:1:spec.faultInjection.delay.percentage",
            "t.yaml:1:spec.faultInjection.abort.httpStatus", "t.yaml:1:spec.faultInjection.abort.percentage",
            "t.yaml:1:spec.faultInjection.routes[1]", "t.yaml:1:spec.faultInjection.routes[2]",
            "t.yaml:1:spec.faultInjection.sources[0].namespace", "t.yaml:1:spec.faultInjection.sources[1].who",
            "t.yaml:1:spec.retry.grpcStatuses[1]", "t.yaml:1:spec.retry.codes[1]", "t.yaml:1:spec.retry.codes[2]",
            "t.yaml:1:spec.retry.codes[3]", "t.yaml:1:spec.retry.attempts", "t.yaml:1:spec.retry.backoff",
            "t.yaml:1:spec.timeout.tcp.connectTimeout", "t.yaml:1:spec.timeout.tcp.idle",
            "t.yaml:1:spec.timeout.http.connectionIdleTimeout", "t.yaml:1:spec.timeout.http.maxConnectionDuration",
            "t.yaml:1:spec.timeout.http.requestTimeout",
        ], "\(Self.lines(policy).joined(separator: "\n"))")
    }

    @Test func aSectionsJoinedChecksWaitForItsFieldsToReadClean() {
        // A wrong type says nothing of whether hashOn fits; a wrong interval
        // nothing of the timeout's length; a wrong key nothing of header.
        let policy = """
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: p, namespace: shop}
            spec:
              targetRefs: [{name: web}]
              loadBalancer: {type: Fastest, hashOn: {sourceIP: true}, slowStart: {window: 1s}}
              healthCheck: {interval: soon, timeout: 10s}
              rateLimit: {requests: 10, key: Caller, header: x-user}
            """
        #expect(Self.fields(policy) == ["t.yaml:1:spec.loadBalancer.type", "t.yaml:1:spec.healthCheck.interval",
                                        "t.yaml:1:spec.rateLimit.key"], "\(Self.lines(policy))")
        // Read clean, the joined checks speak.
        let joined = """
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: p, namespace: shop}
            spec:
              targetRefs: [{name: web}]
              loadBalancer: {type: RoundRobin, hashOn: {sourceIP: true}}
              healthCheck: {interval: 1s, timeout: 10s, http: {}, tcp: {}}
              rateLimit: {requests: 10, header: x-user}
              faultInjection: {routes: [shop/web]}
            """
        let lines = Self.lines(joined)
        #expect(lines.map(Self.field) == ["t.yaml:1:spec.loadBalancer.hashOn", "t.yaml:1:spec.healthCheck.timeout",
                                          "t.yaml:1:spec.healthCheck.tcp", "t.yaml:1:spec.rateLimit.header",
                                          "t.yaml:1:spec.faultInjection"], "\(lines)")
        #expect(lines.count == 5 && lines[3].contains("applies only to key Header") && lines[4].contains("give delay, abort or both"))
    }

    @Test func everyWrongFieldOfARouteRulesRetryIsNamed() {
        let route = Self.routeOnWeb + """
              - backendRefs: [{name: web, port: 80}]
                retry: {codes: [500, 302, x], attempts: -1, backoff: 1x, grpcStatuses: [UNAVAILABLE]}
            """
        #expect(Self.fields(Self.service + "\n---\n" + route) == [
            "t.yaml:2:spec.rules[0].retry.codes[1]", "t.yaml:2:spec.rules[0].retry.codes[2]",
            "t.yaml:2:spec.rules[0].retry.attempts", "t.yaml:2:spec.rules[0].retry.backoff",
            "t.yaml:2:spec.rules[0].retry.grpcStatuses",
        ], "\(Self.lines(Self.service + "\n---\n" + route))")
    }

    @Test func everyWrongFieldInsideAMeshConfigsSectionsIsNamed() {
        let mesh = """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh, namespace: weft-system}
            spec:
              socketShortcut: {enabled: maybe, splice: 1, podReceivers: Some}
              accessLog: {enabled: true, namespaces: [Shop, ok, "a b"]}
              telemetry: {connectionCounters: 1, requestMetrics: true, tracing: {otlpEndpoint: "grpc://x", samplingPercent: 101}}
              proxy: {idleTimeout: 10ms, streamIdleTimeout: x, maxRequestHeaderSize: 1Mi, http2MaxConcurrentStreams: 0, pathNormalization: {normalization: Wild}, tcpKeepalive: {time: 1ms, interval: 40000s, probes: 200}}
              policy: {udpIdleTimeout: 2d, idle: 1s}
            """
        let fields = Self.fields(mesh)
        #expect(fields == [
            "t.yaml:1:spec.socketShortcut.enabled", "t.yaml:1:spec.socketShortcut.splice",
            "t.yaml:1:spec.socketShortcut.podReceivers",
            "t.yaml:1:spec.accessLog.namespaces[0]", "t.yaml:1:spec.accessLog.namespaces[2]",
            "t.yaml:1:spec.telemetry.connectionCounters", "t.yaml:1:spec.telemetry.tracing.otlpEndpoint",
            "t.yaml:1:spec.telemetry.tracing.samplingPercent",
            "t.yaml:1:spec.proxy.idleTimeout", "t.yaml:1:spec.proxy.streamIdleTimeout",
            "t.yaml:1:spec.proxy.maxRequestHeaderSize", "t.yaml:1:spec.proxy.http2MaxConcurrentStreams",
            "t.yaml:1:spec.proxy.pathNormalization.normalization", "t.yaml:1:spec.proxy.tcpKeepalive.time",
            "t.yaml:1:spec.proxy.tcpKeepalive.interval", "t.yaml:1:spec.proxy.tcpKeepalive.probes",
            "t.yaml:1:spec.policy.udpIdleTimeout", "t.yaml:1:spec.policy.idle",
        ], "\(Self.lines(mesh).joined(separator: "\n"))")
    }

    @Test func everyItemOfAValueListAndEachFieldAroundItIsNamed() {
        let route = """
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: web, namespace: shop}
            spec:
              parentRefs: [{kind: Gateway, name: "", port: 0, sectionName: "A B"}, {group: "", kind: Service, name: web, namespace: "Bad NS"}]
              hostnames: [ok.example, "1.2.3.4", "a..b"]
              rules: [{backendRefs: [{name: web, port: 80}]}]
            """
        #expect(Self.fields(route) == [
            "t.yaml:1:spec.parentRefs[0].kind", "t.yaml:1:spec.parentRefs[0].name", "t.yaml:1:spec.parentRefs[0].port",
            "t.yaml:1:spec.parentRefs[0].sectionName", "t.yaml:1:spec.parentRefs[1].namespace",
            "t.yaml:1:spec.hostnames[1]", "t.yaml:1:spec.hostnames[2]",
        ], "\(Self.lines(route).joined(separator: "\n"))")

        let policy = """
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: p, namespace: shop}
            spec:
              podSelector: {matchExpressions: [{key: "bad key!", operator: In, values: [ok, "a b", "-x"], extra: 1}]}
              ingress:
              - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 11.0.0.0/16, 10.2.0.0/40, 10.0.0.0/8]}}, {ipBlock: {cidr: nope, except: [nope]}}]
            """
        #expect(Self.fields(policy) == [
            "t.yaml:1:spec.podSelector.matchExpressions[0].bad key!", "t.yaml:1:spec.podSelector.matchExpressions[0].values[1]",
            "t.yaml:1:spec.podSelector.matchExpressions[0].values[2]", "t.yaml:1:spec.podSelector.matchExpressions[0].extra",
            "t.yaml:1:spec.ingress[0].from[0].ipBlock.except[1]", "t.yaml:1:spec.ingress[0].from[0].ipBlock.except[2]",
            "t.yaml:1:spec.ingress[0].from[0].ipBlock.except[3]",
            "t.yaml:1:spec.ingress[1].from[1].ipBlock.cidr", "t.yaml:1:spec.ingress[1].from[1].ipBlock.except[0]",
        ].map { $0.replacingOccurrences(of: "ingress[1]", with: "ingress[0]") }, "\(Self.lines(policy).joined(separator: "\n"))")

        let authz = """
            apiVersion: weft.dev/v1alpha1
            kind: AuthorizationPolicy
            metadata: {name: a, namespace: shop}
            spec:
              selector: {matchLabels: {app: web}}
              rules:
              - from: [{source: {principals: ["", "a*b*"], ipBlocks: [10.0.0.1/8, 10.0.0.0/8, x], requestPrincipals: [u]}}]
                to: [{operation: {ports: ["0", "80", "http"], paths: [api, /ok], methods: []}}]
                when: [{key: source.ip, values: [x], notValues: [10.0.0.0/33]}]
            """
        #expect(Self.fields(authz) == [
            "t.yaml:1:spec.rules[0].from[0].source.principals[0]", "t.yaml:1:spec.rules[0].from[0].source.principals[1]",
            "t.yaml:1:spec.rules[0].from[0].source.ipBlocks[0]", "t.yaml:1:spec.rules[0].from[0].source.ipBlocks[2]",
            "t.yaml:1:spec.rules[0].from[0].source.requestPrincipals",
            "t.yaml:1:spec.rules[0].to[0].operation.ports[0]", "t.yaml:1:spec.rules[0].to[0].operation.ports[2]",
            "t.yaml:1:spec.rules[0].to[0].operation.methods", "t.yaml:1:spec.rules[0].to[0].operation.paths[0]",
            "t.yaml:1:spec.rules[0].when[0].values[0]", "t.yaml:1:spec.rules[0].when[0].notValues[0]",
        ], "\(Self.lines(authz).joined(separator: "\n"))")
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
