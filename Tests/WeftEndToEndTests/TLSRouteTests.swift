import Foundation
import Testing

// TLSRoute end to end: a client pod's TLS connections to a Service port
// that TLSRoutes route are captured to the node proxy, which reads the
// ClientHello's server name and passes the encrypted bytes, untouched, to a
// backend of the matching route (across nodes through the mutual-TLS
// tunnel). Real TLS servers (Tools/labtool.py tls-server) say which pod
// answered and which server name they saw.

private let ns = "tr"
private let vip = "198.19.6.10"
private let backends: [(name: String, node: String, address: String)] = [
    ("tls-a", "n1", "198.18.1.41"), ("tls-b", "n2", "198.18.2.42"), ("tls-c", "n2", "198.18.2.43"),
]

private func tlsRoute(_ name: String, _ hostnames: String, _ refs: String) -> String {
    """
    apiVersion: gateway.networking.k8s.io/v1
    kind: TLSRoute
    metadata: {name: \(name), namespace: \(ns)}
    spec:
      parentRefs: [{group: "", kind: Service, name: tls}]
      hostnames: \(hostnames)
      rules: [{backendRefs: \(refs)}]
    """
}

private let routes = [
    tlsRoute("exact", "[a.tls.example]", "[{name: tls-a, port: 443}]"),
    tlsRoute("split", "[split.tls.example]", "[{name: tls-a, port: 443, weight: 3}, {name: tls-b, port: 443, weight: 1}]"),
    tlsRoute("wild", "[\"*.wild.example\"]", "[{name: tls-c, port: 443}]"),
].joined(separator: "\n---\n")

private func service(_ name: String, ip: String, selector: String) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: \(ns)}
    spec: {clusterIP: \(ip), selector: \(selector), ports: [{name: https, port: 443, targetPort: https}]}
    """
}

/// `labtool.py tls-tally` from the client pod: answers by pod, errors by kind, SNI mismatches.
private func tally(_ lab: LabHarness, _ host: String, _ port: Int, _ n: Int, sni: String?, from pod: String = "client")
    throws -> (pods: [String: Int], errors: [String: Int], mismatched: Int) {
    let r = try lab.tool(in: pod, ["tls-tally", host, "\(port)", "\(n)", sni ?? "-"])
    return (r["pods"] as? [String: Int] ?? [:], r["errors"] as? [String: Int] ?? [:], r["mismatched"] as? Int ?? -1)
}

/// A TLS server pod (labtool.py tls-server: its answer names the pod and the SNI it saw).
private func serverPod(_ b: (name: String, node: String, address: String)) -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: \(b.name), namespace: \(ns), labels: {app: tls, one: \(b.name)}, annotations: {lab.weft.dev/command: "python3 \(LabHarness.tool) tls-server 8443 \(b.name)"}}
    spec: {serviceAccount: \(b.name), node: \(b.node), address: \(b.address), ports: [{name: https, port: 8443}]}
    """
}

/// The Service `tls` over every server, and one Service per server.
private func services(_ servers: some Collection<(name: String, node: String, address: String)>) -> String {
    ([service("tls", ip: vip, selector: "{app: tls}")]
        + servers.enumerated().map { service($1.name, ip: "198.19.6.\(11 + $0)", selector: "{one: \($1.name)}") })
        .joined(separator: "\n---\n")
}

/// The servers make their certificates first: waits until each answers on its own address.
private func waitUntilServing(_ lab: LabHarness, _ servers: some Collection<(name: String, node: String, address: String)>,
                              from pod: String = "client") throws {
    for b in servers {
        var up = false
        for _ in 0..<300 where !up {
            up = try tally(lab, b.address, 8443, 1, sni: "probe", from: pod).pods == [b.name: 1]
            if !up { usleep(100_000) }
        }
        try #require(up, "\(b.name) never answered")
    }
}

@Suite(.serialized, .enabled(if: LabHarness.canRun, LabHarness.skipReason))
struct TLSRoutePassthroughTests {
    @Test func tlsConnectionsAreRoutedByServerNameAndPassedThroughUntouched() throws {
        let pods = [
            """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: client, namespace: \(ns), annotations: {lab.weft.dev/command: "sleep infinity"}}
            spec: {serviceAccount: client, node: n1, address: 198.18.1.10}
            """,
        ] + backends.map(serverPod)
        let mesh = """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh}
            spec: {accessLog: {enabled: true, namespaces: [\(ns)]}}
            """
        let lab = try LabHarness(files: ["pods.yaml": pods.joined(separator: "\n---\n"), "mesh.yaml": mesh,
                                         "services.yaml": services(backends), "routes.yaml": routes])
        defer { lab.down() }
        try waitUntilServing(lab, backends)
        let routedBefore = try LabHarness.proxyStat("n1", "tls_routed_total"), refusedBefore = try LabHarness.proxyStat("n1", "tls_refused_total")

        // An exact name, on this node; a wildcard, across nodes (one label or more before the suffix).
        let exact = try tally(lab, vip, 443, 30, sni: "a.tls.example")
        #expect(exact.pods == ["tls-a": 30] && exact.errors.isEmpty && exact.mismatched == 0, "\(exact)")
        // The access log names the server name and the route of each.
        var logged: [String] = []
        for _ in 0..<50 where logged.count < 30 {
            usleep(100_000)
            logged = ((try? String(contentsOfFile: "/run/weft/n1/access.log", encoding: .utf8)) ?? "").split(separator: "\n")
                .map(String.init).filter { $0.contains("\"requested_server_name\":\"a.tls.example\"") }
        }
        #expect(logged.count == 30 && logged.allSatisfy { $0.contains("\"kind\":\"tcp\"") && $0.contains("\"route\":\"tr/exact\"")
                                                           && $0.contains("\"upstream_host\":\"198.18.1.41:8443\"") },
                "\(logged.count) lines: \(logged.first ?? "none")")
        let wild = try tally(lab, vip, 443, 20, sni: "x.wild.example")
        #expect(wild.pods == ["tls-c": 20] && wild.errors.isEmpty && wild.mismatched == 0, "\(wild)")
        let deep = try tally(lab, vip, 443, 10, sni: "Deep.X.wild.example")
        #expect(deep.pods == ["tls-c": 10] && deep.errors.isEmpty, "names are matched without case: \(deep)")
        // A 3:1 split over 400 connections: 300 expected, 3.5 standard deviations (30) either way.
        let split = try tally(lab, vip, 443, 400, sni: "split.tls.example")
        let a = split.pods["tls-a"] ?? 0, b = split.pods["tls-b"] ?? 0
        #expect(a + b == 400 && (270...330).contains(a) && split.errors.isEmpty && split.mismatched == 0, "\(split)")

        // A ClientHello that comes in pieces of 64 bytes, 20 ms apart, is
        // gathered across reads; a connection that says nothing is closed
        // when the detect timeout (500 ms) passes, with nothing sent back.
        let pieces = try lab.tool(in: "client", ["tls-pieces", vip, "443", "x.wild.example", "64"])
        let answer = pieces["answer"] as? [String: Any]
        #expect(answer?["pod"] as? String == "tls-c" && answer?["sni"] as? String == "x.wild.example"
                    && (pieces["hello_bytes"] as? Int ?? 0) > 128, "\(pieces)")
        let silentFor = pieces["silent_closed_after"] as? Double ?? -1
        #expect((0.4...3).contains(silentFor) && (pieces["silent_got"] as? String)?.isEmpty == true, "\(pieces)")

        // No route's name, no name at all, no TLS: closed, no server reached.
        let stranger = try tally(lab, vip, 443, 10, sni: "other.example")
        #expect(stranger.pods.isEmpty && stranger.errors.values.reduce(0, +) == 10, "\(stranger)")
        let nameless = try tally(lab, vip, 443, 5, sni: nil)
        #expect(nameless.pods.isEmpty && nameless.errors.values.reduce(0, +) == 5, "\(nameless)")
        let plain = try lab.tool(in: "client", ["tally", vip, "443", "5"])
        #expect((plain["counts"] as? [String: Int])?.isEmpty == true && (plain["errors"] as? [String])?.count == 5, "\(plain)")
        #expect(try LabHarness.proxyStat("n1", "tls_routed_total") - routedBefore == 461)
        #expect(try LabHarness.proxyStat("n1", "tls_refused_total") - refusedBefore == 21)

        // weft route check shows the route a name takes, and none for a stranger.
        let check = try LabHarness.run(["route", "check", "--node", "n1", "--to", "\(ns)/tls:443", "--sni", "split.tls.example"])
        #expect(check.status == 0 && check.output.contains("TLSRoute tr/split") && check.output.contains("tr/tls-b:443 weight 1 (25.0%)")
                    && check.output.contains("198.18.2.42:8443 (n2)"), "\(check.output)")
        let none = try LabHarness.run(["route", "check", "--node", "n1", "--to", "\(ns)/tls:443", "--sni", "other.example"])
        #expect(none.status == 3 && none.output.contains("closes the connection"), "\(none.output)")

        let listed = try LabHarness.run(["get", "routes", "--node", "n1"])
        #expect(listed.output.contains("TLSRoute") && listed.output.contains("tr/tls for *.wild.example"), "\(listed.output)")

        // A changed route is in force for the next connection.
        let generations = try lab.generations(["n1"])
        try lab.write("routes.yaml", routes.replacingOccurrences(of: "[{name: tls-a, port: 443}]", with: "[{name: tls-b, port: 443}]"))
        try lab.waitForGeneration(after: generations)
        var moved = try tally(lab, vip, 443, 10, sni: "a.tls.example")
        for _ in 0..<50 where moved.pods != ["tls-b": 10] {
            usleep(100_000) // the proxy reloads its table after the agent's generation
            moved = try tally(lab, vip, 443, 10, sni: "a.tls.example")
        }
        #expect(moved.pods == ["tls-b": 10] && moved.errors.isEmpty, "\(moved)")
    }

    /// GAMMA consumer routes: a TLSRoute in namespace tc whose parent is
    /// tr's Service routes tc's clients only. tr's own clients reach the
    /// Service itself while tr has no TLSRoute of its own, and by tr's
    /// routes once it has one, which tc's clients then still do not see.
    @Test func consumerTLSRoutesRouteOnlyTheirOwnNamespacesClients() throws {
        let pods = [("tr", "client", "198.18.1.10"), ("tc", "client", "198.18.1.11")].map { pod in
            """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: \(pod.1), namespace: \(pod.0), annotations: {lab.weft.dev/command: "sleep infinity"}}
            spec: {serviceAccount: client, node: n1, address: \(pod.2)}
            """
        } + backends.prefix(2).map(serverPod)
        let consumer = """
            apiVersion: gateway.networking.k8s.io/v1
            kind: TLSRoute
            metadata: {name: mine, namespace: tc}
            spec:
              parentRefs: [{group: "", kind: Service, name: tls, namespace: \(ns)}]
              hostnames: [a.tls.example]
              rules: [{backendRefs: [{name: tls-b, namespace: \(ns), port: 443}]}]
            """
        let lab = try LabHarness(files: ["pods.yaml": pods.joined(separator: "\n---\n"),
                                         "services.yaml": services(backends.prefix(2)), "routes.yaml": consumer])
        defer { lab.down() }
        let mine = "tc/client", theirs = "\(ns)/client"
        try waitUntilServing(lab, backends.prefix(2), from: theirs)
        func fromPod(_ pod: String, _ n: Int, sni: String?) throws -> (pods: [String: Int], errors: [String: Int]) {
            let r = try tally(lab, vip, 443, n, sni: sni, from: pod)
            return (r.pods, r.errors)
        }
        let routedBefore = try LabHarness.proxyStat("n1", "tls_routed_total"), passedBefore = try LabHarness.proxyStat("n1", "tcp_passthrough_total")

        // Only tc's route: tc's clients by it, a name it lacks closed for them;
        // tr's clients to the Service itself, both pods, whatever the name.
        let routed = try fromPod(mine, 20, sni: "a.tls.example")
        #expect(routed.pods == ["tls-b": 20] && routed.errors.isEmpty, "\(routed)")
        let unnamed = try fromPod(mine, 5, sni: "b.tls.example")
        #expect(unnamed.pods.isEmpty && unnamed.errors.values.reduce(0, +) == 5, "\(unnamed)")
        let own = try fromPod(theirs, 40, sni: "a.tls.example")
        #expect((own.pods["tls-a"] ?? 0) > 0 && (own.pods["tls-b"] ?? 0) > 0 && own.pods.values.reduce(0, +) == 40 && own.errors.isEmpty,
                "\(own)")
        #expect(try LabHarness.proxyStat("n1", "tls_routed_total") - routedBefore == 20)
        #expect(try LabHarness.proxyStat("n1", "tcp_passthrough_total") - passedBefore == 40)
        let check = try LabHarness.run(["route", "check", "--node", "n1", "--to", "\(ns)/tls:443", "--sni", "a.tls.example", "--from", mine])
        #expect(check.status == 0 && check.output.contains("consumer routes of namespace tc") && check.output.contains("TLSRoute tc/mine"),
                "\(check.output)")
        let other = try LabHarness.run(["route", "check", "--node", "n1", "--to", "\(ns)/tls:443", "--sni", "a.tls.example", "--from", theirs])
        #expect(other.status == 0 && other.output.contains("TCP passthrough to the Service itself"), "\(other.output)")
        let listed = try LabHarness.run(["get", "routes", "--node", "n1"])
        #expect(listed.output.contains("tc/mine (consumer)") && listed.output.contains("tr/tls for a.tls.example"), "\(listed.output)")
        let anyone = try LabHarness.run(["route", "check", "--node", "n1", "--to", "\(ns)/tls:443", "--sni", "a.tls.example"])
        #expect(anyone.status == 0 && anyone.output.contains("TCP passthrough to the Service itself")
                    && anyone.output.contains("namespace tc routes its own clients by consumer routes"), "\(anyone.output)")

        // tr's own route for every name under tls.example: tr's clients by
        // it now; tc's still by theirs alone.
        let generations = try lab.generations(["n1"])
        try lab.write("routes.yaml", consumer + "\n---\n" + tlsRoute("own", "[\"*.tls.example\"]", "[{name: tls-a, port: 443}]"))
        try lab.waitForGeneration(after: generations)
        var now = try fromPod(theirs, 10, sni: "a.tls.example")
        for _ in 0..<50 where now.pods != ["tls-a": 10] {
            usleep(100_000) // the proxy reloads its table after the agent's generation
            now = try fromPod(theirs, 10, sni: "a.tls.example")
        }
        #expect(now.pods == ["tls-a": 10] && now.errors.isEmpty, "\(now)")
        let still = try fromPod(mine, 10, sni: "a.tls.example")
        #expect(still.pods == ["tls-b": 10] && still.errors.isEmpty, "\(still)")
        let notTheirs = try fromPod(mine, 5, sni: "b.tls.example")
        #expect(notTheirs.pods.isEmpty && notTheirs.errors.values.reduce(0, +) == 5,
                "tr's wildcard is not tc's: its clients keep their own routes only: \(notTheirs)")
    }
}
