import Foundation
import Testing
@testable import WeftCore

private func parse(_ yaml: String) -> (resources: [LocatedResource], errors: [ManifestError]) {
    ManifestReader.parse(yaml, file: "t.yaml")
}

private func errorLine(_ yaml: String) -> String? {
    let r = parse(yaml)
    if let e = r.errors.first { return e.description }
    if case .failure(let errors) = ClusterState.build(r.resources) { return errors.errors.first?.description }
    return nil
}

private let service = """
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec:
      clusterIP: 198.19.0.10
      selector: {app: web}
      ports:
      - {name: http, port: 80, targetPort: http, appProtocol: http}
      - {name: dns, port: 53, protocol: UDP}
    """

private func workload(_ name: String, _ address: String, labels: String = "{app: web}", ports: String = "[{name: http, port: 8080}]", ns: String = "shop") -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: \(name), namespace: \(ns), labels: \(labels)}
    spec: {serviceAccount: web, node: n1, address: \(address), ports: \(ports)}
    """
}

@Suite struct ManifestParsing {
    @Test func parsesServiceWithNamedAndDefaultTargetPorts() throws {
        let r = parse(service)
        #expect(r.errors.isEmpty)
        guard case .service(let s) = try #require(r.resources.first).resource else { Issue.record("not a service"); return }
        #expect(s.clusterIP == IPv4Address("198.19.0.10"))
        #expect(s.ports[0].targetPort == .name("http"))
        #expect(s.ports[0].appProtocol == "http")
        #expect(s.ports[1].targetPort == .number(53))
        #expect(s.ports[1].transport == .udp)
        #expect(s.metadata.qualifiedName == "shop/web")
    }

    @Test func sessionAffinityClientIPKeepsItsTimeoutOrKubernetesDefault() throws {
        func affinity(_ spec: String) throws -> UInt32? {
            let r = parse("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.19.0.1\n  ports: [{port: 80}]\n" + spec)
            #expect(r.errors.isEmpty, "\(r.errors)")
            guard case .service(let s) = try #require(r.resources.first).resource else { return nil }
            return s.affinityTimeout
        }
        #expect(try affinity("") == nil)
        #expect(try affinity("  sessionAffinity: None\n") == nil)
        #expect(try affinity("  sessionAffinity: ClientIP\n") == 10_800)
        #expect(try affinity("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n") == 30)
    }

    /// NodePort and LoadBalancer Services (as exported from a cluster) are
    /// served for their clusterIP like a ClusterIP one; their outside-facing
    /// fields are taken and change nothing.
    @Test func nodePortAndLoadBalancerServicesServeTheirClusterIP() throws {
        for type in ["NodePort", "LoadBalancer"] {
            let yaml = service.replacingOccurrences(of: "  clusterIP: 198.19.0.10\n", with: """
                  clusterIP: 198.19.0.10
                  type: \(type)
                  externalTrafficPolicy: Local
                  healthCheckNodePort: 31000
                  allocateLoadBalancerNodePorts: true
                  loadBalancerClass: example.com/lb
                  loadBalancerSourceRanges: [203.0.113.0/24]

                """).replacingOccurrences(of: "appProtocol: http}", with: "appProtocol: http, nodePort: 30080}")
            let r = parse(yaml)
            #expect(r.errors.isEmpty, "\(type): \(r.errors)")
            let state = try #require(try? ClusterState.build(r.resources).get(), "\(type)")
            let plain = try #require(try? ClusterState.build(parse(service).resources).get())
            #expect(state.services.first?.ports.first?.nodePort == 30080)
            var unported = state.services
            for i in unported.indices { for j in unported[i].ports.indices { unported[i].ports[j].nodePort = nil } }
            #expect(unported == plain.services, "\(type) reads as the ClusterIP Service but for its node port")
            // (With no Node manifests, no node address to serve it on: no entry.)
            #expect(ServiceTable(state) == ServiceTable(plain))
        }
    }

    @Test func multiDocumentFilesCountDocumentsFromOne() {
        let r = parse(service + "\n---\n" + workload("w1", "198.18.1.2") + "\n---\n" + workload("w2", "not-an-ip"))
        #expect(r.resources.count == 2)
        #expect(r.errors.map(\.description) == ["t.yaml:3:spec.address: \"not-an-ip\" is not an IPv4 address (line 19)"])
    }

    @Test func emptyDocumentsAreSkipped() {
        let r = parse("---\n" + service + "\n---\n")
        #expect(r.errors.isEmpty)
        #expect(r.resources.count == 1)
    }

    @Test(arguments: [
        ("kind: Srvice", "t.yaml:1:kind: unknown kind \"Srvice\" for v1"),
        ("apiVersion: v2", "t.yaml:1:apiVersion: unknown apiVersion \"v2\""),
        ("  clusterIP: 198.19.0.10\n  colour: blue", "t.yaml:1:spec.colour: unknown field"),
        ("  clusterIP: 198.19.300.1", "t.yaml:1:spec.clusterIP: \"198.19.300.1\" is not an IPv4 address"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: 70000}]", "t.yaml:1:spec.ports[0].port: port must be between 1 and 65535, got 70000"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: \"80\"}]", "t.yaml:1:spec.ports[0].port: expected an integer, got a string"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: 80, targetPort: 0}]", "t.yaml:1:spec.ports[0].targetPort: port must be between 1 and 65535, got 0"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: 80, targetPort: Http_1}]", "t.yaml:1:spec.ports[0].targetPort: \"Http_1\" is not a valid port name"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: 80}, {port: 81}]", "t.yaml:1:spec.ports[0].name: required when a Service has more than one port"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: 80, appProtocol: \"my http\"}]", "t.yaml:1:spec.ports[0].appProtocol: \"my http\" is not a valid appProtocol"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: 80, appProtocol: \"kubernetes.io/\"}]", "t.yaml:1:spec.ports[0].appProtocol: \"kubernetes.io/\" is not a valid appProtocol"),
        ("  clusterIP: 198.19.0.10\n  ports: []", "t.yaml:1:spec.ports: a Service needs at least one port"),
        ("  clusterIP: 198.19.0.10\n  selector: [a]\n  ports: [{port: 80}]", "t.yaml:1:spec.selector: expected a mapping, got a list"),
        ("  clusterIP: 198.19.0.10\n  type: ExternalName\n  ports: [{port: 80}]", "t.yaml:1:spec.type: an ExternalName Service is a DNS alias"),
        ("  clusterIP: 198.19.0.10\n  type: Headless\n  ports: [{port: 80}]", "t.yaml:1:spec.type: must be ClusterIP, NodePort or LoadBalancer, got \"Headless\""),
        ("  clusterIP: 198.19.0.10\n  type: NodePort\n  externalTrafficPolicy: Nearest\n  ports: [{port: 80}]",
         "t.yaml:1:spec.externalTrafficPolicy: must be Cluster or Local, got \"Nearest\""),
        ("  clusterIP: 198.19.0.10\n  externalTrafficPolicy: Local\n  ports: [{port: 80}]", "t.yaml:1:spec.externalTrafficPolicy: unknown field"),
        ("  clusterIP: 198.19.0.10\n  loadBalancerIP: 203.0.113.7\n  ports: [{port: 80}]", "t.yaml:1:spec.loadBalancerIP: unknown field"),
        ("  clusterIP: 198.19.0.10\n  ports: [{port: 80, protocol: ICMP}]", "t.yaml:1:spec.ports[0].protocol: protocol must be TCP, UDP or SCTP"),
        ("  clusterIP: 198.19.0.10\n  internalTrafficPolicy: Node", "t.yaml:1:spec.internalTrafficPolicy: must be Cluster or Local, got \"Node\""),
        ("  clusterIP: 198.19.0.10\n  sessionAffinity: Cookie", "t.yaml:1:spec.sessionAffinity: must be None or ClientIP, got \"Cookie\""),
        ("  clusterIP: 198.19.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
         "t.yaml:1:spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be from 1 to 86400 seconds, got 0"),
        ("  clusterIP: 198.19.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
         "t.yaml:1:spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be from 1 to 86400 seconds, got 86401"),
        ("  clusterIP: 198.19.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeout: 5}}",
         "t.yaml:1:spec.sessionAffinityConfig.clientIP.timeout: unknown field"),
        ("  clusterIP: 198.19.0.10\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
         "t.yaml:1:spec.sessionAffinityConfig: must not be set unless sessionAffinity is ClientIP"),
    ])
    func badServicesNameFileDocumentAndField(patch: String, expected: String) throws {
        var yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n"
        if patch.hasPrefix("kind:") || patch.hasPrefix("apiVersion:") {
            let key = patch.split(separator: ":")[0]
            yaml = yaml.split(separator: "\n").map { $0.hasPrefix(key + ":") ? patch : String($0) }.joined(separator: "\n")
            yaml = yaml.replacingOccurrences(of: "spec:\n  ports: [{port: 80}]", with: "spec:\n  clusterIP: 198.19.0.1\n  ports: [{port: 80}]")
        } else {
            yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n" + patch + "\n"
            if !patch.contains("ports") { yaml += "  ports: [{port: 80}]\n" }
        }
        let line = try #require(errorLine(yaml))
        #expect(line.hasPrefix(expected), "got: \(line)")
    }

    @Test func badMetadataAndLabels() throws {
        #expect(try #require(errorLine(workload("Web_1", "198.18.1.2"))).hasPrefix("t.yaml:1:metadata.name: \"Web_1\" is not a valid name"))
        #expect(try #require(errorLine(workload("w", "198.18.1.2", labels: "{\"bad key!\": x}"))).hasPrefix("t.yaml:1:metadata.labels.bad key!: \"bad key!\" is not a valid label key"))
        #expect(try #require(errorLine(workload("w", "198.18.1.2", labels: "{app: 5}"))).hasPrefix("t.yaml:1:metadata.labels.app: expected a string, got a number"))
        #expect(try #require(errorLine(workload("w", "198.18.1.2", ports: "[{name: a, port: 1}, {name: a, port: 2}]"))).hasPrefix("t.yaml:1:spec.ports[1].name: duplicate port name"))
        // A service account is a DNS label: no pod can take a node's
        // identity (weft-system/weft-node.NODE).
        let node = workload("w", "198.18.1.2").replacingOccurrences(of: "serviceAccount: web", with: "serviceAccount: weft-node.n1")
        #expect(try #require(errorLine(node)).hasPrefix("t.yaml:1:spec.serviceAccount:"), "\(errorLine(node) ?? "")")
    }

    @Test func notYAMLAtAllIsAnErrorNotACrash() {
        let r = parse("apiVersion: v1\nkind: [unclosed\n")
        #expect(r.resources.isEmpty)
        #expect(r.errors.first?.description.hasPrefix("t.yaml:1:-: not valid YAML") == true)
        #expect(parse("- just\n- a list\n").errors.first?.description == "t.yaml:1:-: expected a mapping, got a list (line 1)")
    }

    @Test func aHugeValueIsNamedNotEchoedWhole() throws {
        // A value pasted into the wrong field: the error says where, what is
        // wrong and how long it was, in a line a terminal can show.
        let big = String(repeating: "k", count: 100_000)
        let quotedLine = try #require(errorLine(service.replacingOccurrences(of: "198.19.0.10", with: big)))
        #expect(quotedLine == "t.yaml:1:spec.clusterIP: \"\(String(repeating: "k", count: 160))…\" (100000 characters) is not an IPv4 address (line 5)")
        #expect(try #require(errorLine(service.replacingOccurrences(of: "198.19.0.10", with: "1.2.3"))) == "t.yaml:1:spec.clusterIP: \"1.2.3\" is not an IPv4 address (line 5)")
        // Shown plainly (a reference to what is not there): the start and
        // the end, the explanation with it.
        let route = """
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: r, namespace: shop}
            spec:
              parentRefs: [{kind: Service, group: "", name: \(big), port: 80}]
            """
        let plain = try #require(errorLine(service + "\n---\n" + route))
        #expect(plain.hasPrefix("t.yaml:2:spec.parentRefs[0].name: no Service shop/kkk"), "\(plain.prefix(200))")
        #expect(plain.hasSuffix("kkk in this config"), "\(plain.suffix(200))")
        #expect(plain.contains("…[99031 characters left out]…"), "\(plain.count)")
        #expect(plain.count < 1_100)
    }

    @Test func deepNestingAliasesAndOtherEncodingsAreRefusedByName() throws {
        let deep = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: " + String(repeating: "[", count: 100_000) + "\n"
        #expect(try #require(errorLine(deep)).hasPrefix("t.yaml:1:-: not valid YAML: Maximum nesting level reached"))
        let alias = "apiVersion: v1\nkind: Service\nmetadata: &m {name: a}\nspec: {clusterIP: 198.19.0.9, ports: [{port: 80}], selector: *m}\n"
        #expect(errorLine(alias) == "t.yaml:1:spec.selector: expected a mapping, got an alias (line 4)")
        let path = NSTemporaryDirectory() + "weft-utf16-\(getpid()).yaml"
        defer { unlink(path) }
        #expect(FileManager.default.createFile(atPath: path, contents: "apiVersion: v1\nkind: Service\n".data(using: .utf16)))
        let read = ManifestSource.read(paths: [path])
        #expect(read.resources.isEmpty)
        #expect(read.errors.map(\.description) == ["\(path):0:-: file is not UTF-8"])
    }

    @Test func duplicateClusterIPsNamesAndAddressesAreRefusedWhole() {
        let other = service.replacingOccurrences(of: "name: web,", with: "name: web2,")
        let r = parse(service + "\n---\n" + other + "\n---\n" + workload("a", "198.18.1.2") + "\n---\n" + workload("b", "198.18.1.2")
                      + "\n---\n" + workload("a", "198.18.1.3"))
        guard case .failure(let errors) = ClusterState.build(r.resources) else { Issue.record("accepted"); return }
        let lines = errors.errors.map(\.description)
        #expect(lines.contains("t.yaml:2:spec.clusterIP: clusterIP 198.19.0.10 is already used by Service shop/web at t.yaml:1"))
        #expect(lines.contains("t.yaml:4:spec.address: address 198.18.1.2 is already used by Workload shop/a at t.yaml:3"))
        #expect(lines.contains("t.yaml:5:metadata.name: Workload shop/a is already defined at t.yaml:3"))
    }

    @Test func aWorkloadAtAServiceClusterIPIsRefused() {
        // Wherever the two stand in the set: the Workload's document is named.
        for order in [[service, workload("a", "198.19.0.10")], [workload("a", "198.19.0.10"), service]] {
            let r = parse(order.joined(separator: "\n---\n"))
            guard case .failure(let errors) = ClusterState.build(r.resources) else { Issue.record("accepted"); continue }
            let at = order[0] == service ? 2 : 1
            #expect(errors.errors.map(\.description)
                    == ["t.yaml:\(at):spec.address: address 198.19.0.10 is the clusterIP of Service shop/web"])
        }
    }

    @Test func ipv4ParsingIsStrict() {
        #expect(IPv4Address("198.19.0.10")?.value == 0xC613_000A)
        #expect(IPv4Address("0.0.0.0")?.value == 0)
        #expect(IPv4Address("10.0.100.0")?.value == 0x0A00_6400)
        #expect(IPv4Address("198.19.0.10"[...])?.value == 0xC613_000A)
        for bad in ["198.19.0", "198.19.0.010", "198.19.0.256", "a.b.c.d", "1.2.3.4.5", "", " 1.2.3.4",
                    "1.2.3.", ".1.2.3", "1..2.3", "1.2.3.0004", "1.2.3.00", "00.1.2.3", "1.2.3.4 ", "1.2.3.٣", "1.2.3.-1", "999.1.1.1"] {
            #expect(IPv4Address(bad) == nil, "\(bad)")
        }
        #expect(IPv4Prefix("198.18.0.0/16")?.contains(IPv4Address("198.18.200.1")!) == true)
        #expect(IPv4Prefix("198.18.0.1/16") == nil)
    }

    @Test func ipv4TextRoundTrips() {
        for text in ["0.0.0.0", "255.255.255.255", "198.19.0.10", "10.9.99.100", "1.20.101.9", "100.0.10.1"] {
            #expect(IPv4Address(text)?.description == text)
        }
        // Every octet value, in every position.
        for v in 0...255 {
            let octet = UInt32(v)
            let a = IPv4Address(octet << 24 | octet << 16 | (255 - octet) << 8 | octet)
            #expect(a.description == "\(v).\(v).\(255 - v).\(v)")
            #expect(IPv4Address(a.description) == a)
        }
    }
}

@Suite struct BackendSelection {
    func state(_ docs: [String]) throws -> ClusterState {
        let r = parse(docs.joined(separator: "\n---\n"))
        #expect(r.errors.isEmpty, "\(r.errors)")
        return try ClusterState.build(r.resources).get()
    }

    @Test func selectorMatchesLabelsInTheServicesNamespaceOnly() throws {
        let s = try state([service, workload("a", "198.18.1.2"), workload("b", "198.18.1.3", labels: "{app: web, version: v2}"),
                           workload("c", "198.18.1.4", labels: "{app: api}"), workload("d", "198.18.1.5", ns: "other")])
        let table = ServiceTable(s)
        let http = try #require(table.entries[Frontend(vip: IPv4Address("198.19.0.10")!, port: 80, transport: .tcp)])
        #expect(http.backends.map(\.description) == ["198.18.1.2:8080", "198.18.1.3:8080"])
        #expect(http.name == "shop/web:http")
        #expect(s.backends(of: s.services[0]).map(\.metadata.name) == ["a", "b"])
    }

    @Test func namedTargetPortResolvesPerWorkloadAndSkipsThoseWithoutIt() throws {
        let s = try state([service, workload("a", "198.18.1.2", ports: "[{name: http, port: 8080}]"),
                           workload("b", "198.18.1.3", ports: "[{name: http, port: 9090}]"),
                           workload("c", "198.18.1.4", ports: "[{name: metrics, port: 9100}]")])
        let table = ServiceTable(s)
        let http = try #require(table.entries[Frontend(vip: IPv4Address("198.19.0.10")!, port: 80, transport: .tcp)])
        #expect(http.backends.map(\.description) == ["198.18.1.2:8080", "198.18.1.3:9090"])
        // The UDP port has a numeric targetPort: every selected workload backs it.
        let dns = try #require(table.entries[Frontend(vip: IPv4Address("198.19.0.10")!, port: 53, transport: .udp)])
        #expect(dns.backends.count == 3)
    }

    @Test func emptyOrMissingSelectorAndHeadlessHaveNoBackends() throws {
        let noSelector = service.replacingOccurrences(of: "  selector: {app: web}\n", with: "")
        let headless = service.replacingOccurrences(of: "name: web,", with: "name: h,").replacingOccurrences(of: "198.19.0.10", with: "None")
        let s = try state([noSelector, headless, workload("a", "198.18.1.2")])
        let table = ServiceTable(s)
        #expect(table.entries.count == 2)  // headless has no frontend at all
        #expect(table.entries.values.allSatisfy { $0.backends.isEmpty })
    }
}

@Suite struct ParallelParsing {
    @Test func chunkedParseEqualsWholeParseIncludingErrorsAndLines() {
        var docs: [String] = []
        for i in 0..<400 {
            var doc = workload("w\(i)", "198.18.\(1 + i / 200).\(2 + i % 200)")
            if i == 7 { doc = doc.replacingOccurrences(of: "serviceAccount: web", with: "serviceAccount: Web!") }
            if i == 333 { doc += "\nextra: field" }
            if i == 250 { doc = "--- # a comment after the marker\n" + doc }
            docs.append(doc)
        }
        let text = docs.joined(separator: "\n---\n") + "\n---\n"
        let (whole, _) = ManifestReader.parseWhole(text, file: "big.yaml")
        for chunks in [2, 3, 7] {
            #expect(ManifestReader.split(text, chunks: chunks).count == chunks)
            let chunked = ManifestReader.parseChunked(text, file: "big.yaml", chunks: chunks)
            #expect(chunked.resources == whole.resources)
            #expect(chunked.errors == whole.errors)
        }
        #expect(whole.errors.count == 2)
        // Doc 250 carries its own extra `---`: an empty document counts before it.
        #expect(whole.errors.map(\.location.document) == [8, 335])
    }

    @Test func splitOnlyAtColumnZeroMarkers() {
        let text = "a: |\n  --- not a marker\n  x\n---\nb: 1\n--- \nc: 2\n---x: 3\n"
        let pieces = ManifestReader.split(text, chunks: 10).map { String($0.text) }
        #expect(pieces == ["a: |\n  --- not a marker\n  x\n", "---\nb: 1\n", "--- \nc: 2\n---x: 3\n"])
    }
}

/// What `weft apply` and `weft delete` print: each object by kind and name,
/// created, configured, unchanged or deleted.
@Suite struct ResourceChanges {
    private func objects(_ yaml: String) -> [Resource] { parse(yaml).resources.map(\.resource) }

    @Test func eachObjectOfTheFilesIsReportedAndWhatTheyNoLongerHoldIsDeleted() throws {
        let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n"
        let before = objects([namespace, service, workload("web-1", "198.18.1.10"), workload("web-2", "198.18.1.11")]
                                .joined(separator: "\n---\n"))
        // A file rewritten: web-1 the same (laid out otherwise), the Service's
        // port changed, web-2 gone, web-3 new; the Namespace's label changed
        // in a file of its own.
        let rewritten = objects([
            workload("web-3", "198.18.1.12"),
            """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata:
              namespace: shop
              labels: {app: web}
              name: web-1
            spec: {node: n1, serviceAccount: web, ports: [{port: 8080, name: http}], address: 198.18.1.10}
            """,
            service.replacingOccurrences(of: "port: 80,", with: "port: 81,"),
        ].joined(separator: "\n---\n"))
        let relabelled = objects(namespace.replacingOccurrences(of: "team: a", with: "team: b"))
        try #require(before.count == 4 && rewritten.count == 3 && relabelled.count == 1)
        let after = relabelled + rewritten
        let changes = ResourceChange.between(before: before, after: after, written: rewritten + relabelled)
        #expect(changes.map(\.description) == [
            "Workload shop/web-3 created",
            "Workload shop/web-1 unchanged",
            "Service shop/web configured",
            "Namespace shop configured",
            "Workload shop/web-2 deleted",
        ])
        #expect(ResourceChange.summary(changes) == "1 created, 2 configured, 1 unchanged, 1 deleted")
        // Nothing written, nothing changed: an empty report.
        #expect(ResourceChange.between(before: before, after: before, written: []).isEmpty)
        // Files removed: each of their objects deleted, in kind and name order.
        let removed = ResourceChange.between(before: before, after: Array(before.prefix(1)), written: [])
        #expect(removed.map(\.description) == ["Service shop/web deleted", "Workload shop/web-1 deleted",
                                                "Workload shop/web-2 deleted"])
        // A change to an object outside the files written (which whole files
        // cannot make) is still reported, never hidden as unchanged.
        let elsewhere = ResourceChange.between(before: before, after: relabelled + before.dropFirst(), written: [])
        #expect(elsewhere.map(\.description) == ["Namespace shop configured"])
    }
}
