import Foundation
import Testing

// AuthorizationPolicy end to end in a 3-node lab with the mesh CA: what
// every client actually got (curl over HTTP/1.1 and HTTP/2, grpcio, raw
// TCP) against what an independent reference (Tools/authzref.py, written
// from Istio's semantics) says. The API pod is on n2: clients on n1 reach
// it through the tunnel (its proxy decides: per request, or per stream),
// clients on n2 through their own proxy (HTTP) or directly (TCP: the
// kernel decides).

private let ns = "authz"
private let l7 = "python3 \(LabHarness.l7Server)"

private func pod(_ name: String, namespace: String = ns, sa: String, node: String, address: String, app: String,
                 command: String = "sleep infinity") -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: \(name), namespace: \(namespace), labels: {app: \(app)}, annotations: {lab.weft.dev/command: "\(command)"}}
    spec: {serviceAccount: \(sa), node: \(node), address: \(address)}
    """
}

private struct Client {
    var name: String
    var namespace: String
    var sa: String
    var address: String
    var ref: String { "\(namespace)/\(name)" }
    var principal: String { "cluster.local/ns/\(namespace)/sa/\(sa)" }
}

private let clients = [
    Client(name: "web", namespace: ns, sa: "web", address: "198.18.1.10"),
    Client(name: "other", namespace: ns, sa: "default", address: "198.18.1.11"),
    Client(name: "batch", namespace: "ops", sa: "runner", address: "198.18.1.20"),
    Client(name: "web-local", namespace: ns, sa: "web", address: "198.18.2.11"),
    Client(name: "batch-local", namespace: "ops", sa: "runner", address: "198.18.2.21"),
]

private let pods = ([
    pod("api", sa: "api", node: "n2", address: "198.18.2.10", app: "api", command: "\(l7) 8080 & exec \(l7) 9000 --tcp-banner"),
    pod("grpc", sa: "grpc", node: "n2", address: "198.18.2.60", app: "grpc", command: "/usr/bin/python3 \(LabHarness.grpcTool) serve 8080"),
] + clients.map { c in
    pod(c.name, namespace: c.namespace, sa: c.sa, node: c.address.hasPrefix("198.18.1.") ? "n1" : "n2", address: c.address,
        app: c.name.replacingOccurrences(of: "-local", with: ""))
}).joined(separator: "\n---\n")

private let services = """
    apiVersion: v1
    kind: Service
    metadata: {name: api, namespace: \(ns)}
    spec: {clusterIP: 198.19.6.10, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: api-tcp, namespace: \(ns)}
    spec: {clusterIP: 198.19.6.11, selector: {app: api}, ports: [{name: tcp, port: 9000, targetPort: 9000}]}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: grpc, namespace: \(ns)}
    spec: {clusterIP: 198.19.6.60, selector: {app: grpc}, ports: [{name: rpc, port: 80, targetPort: 8080, appProtocol: grpc}]}
    """

private let allowPolicy = """
    apiVersion: weft.dev/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: api-allow, namespace: \(ns)}
    spec:
      selector: {matchLabels: {app: api}}
      rules:
      - from: [{source: {principals: ["cluster.local/ns/\(ns)/sa/web"]}}]
        to: [{operation: {methods: [GET], paths: ["/public/*", /health]}}]
      - from: [{source: {namespaces: [ops]}}]
        to: [{operation: {methods: [GET, POST], paths: ["/ops/*"]}}]
      - from: [{source: {principals: ["*/sa/web"]}}]
        to: [{operation: {ports: ["9000"]}}]
    ---
    apiVersion: weft.dev/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: grpc-allow, namespace: \(ns)}
    spec:
      selector: {matchLabels: {app: grpc}}
      rules:
      - from: [{source: {principals: ["spiffe://cluster.local/ns/\(ns)/sa/web"]}}]
        to: [{operation: {paths: [/weft.Echo/Say, /weft.Echo/Count, /weft.Echo/Chat]}}]
    """

private let denyPolicy = """
    apiVersion: weft.dev/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: api-deny, namespace: \(ns)}
    spec:
      selector: {matchLabels: {app: api}}
      action: DENY
      rules:
      - from: [{source: {namespaces: [ops]}}]
        to: [{operation: {paths: ["/ops/admin*"]}}]
      - to: [{operation: {ports: ["8080"], paths: [/public/secret]}}]
    """

private let requests: [(method: String, path: String)] = [
    ("GET", "/public/a"), ("GET", "/public/secret"), ("POST", "/public/a"), ("GET", "/ops/x"), ("POST", "/ops/x"),
    ("GET", "/ops/admin"), ("DELETE", "/ops/x"), ("GET", "/health"), ("GET", "/private"), ("GET", "/public/a?q=1"),
]

private let reference = LabHarness.packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/authzref.py").path

/// The reference's decisions for `asks` against the policies in `yaml`.
private func referenceDecisions(_ yaml: String, _ asks: [[String: Any]]) throws -> [Bool] {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-authzref-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let policies = dir.appendingPathComponent("policies.yaml"), input = dir.appendingPathComponent("requests.json")
    try yaml.write(to: policies, atomically: true, encoding: .utf8)
    try JSONSerialization.data(withJSONObject: asks).write(to: input)
    let out = try LabHarness.shell(raw: ["sh", "-c", "/usr/bin/python3 \(reference) \(policies.path) < \(input.path)"])
    return try #require(try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [Bool], "reference said: \(out)")
}

private func ask(_ c: Client, port: Int, _ http: (String, String)?) -> [String: Any] {
    var r: [String: Any] = ["target": ["namespace": ns, "labels": ["app": "api"]], "principal": c.principal,
                            "namespace": c.namespace, "ip": c.address, "port": port, "http": NSNull()]
    if let (method, path) = http { r["http"] = ["method": method, "path": path, "host": "198.19.6.10", "headers": [String: String]()] }
    return r
}

/// Status codes for `requests` from one client, in order.
private func httpCodes(_ c: Client) throws -> [String] {
    let script = requests.map { "curl -s -o /dev/null -m 5 -w '%{http_code}\\n' -X \($0.method) 'http://198.19.6.10\($0.path)'" }
        .joined(separator: "; ")
    let r = try LabHarness.run(["lab", "exec", c.ref, "--", "sh", "-c", script])
    return r.output.split(separator: "\n").map(String.init).filter { $0.count == 3 }
}

/// Connects to the L4 Service and reads the banner: "allowed", or how it failed.
private func tcpOutcome(_ c: Client) throws -> String {
    let py = """
        import socket
        try:
            s = socket.create_connection(("198.19.6.11", 9000), timeout=4)
            s.settimeout(4)
            data = s.recv(100)
            print("allowed" if data.startswith(b"hello from") else "closed")
        except PermissionError:
            print("eperm")
        except ConnectionResetError:
            print("reset")
        except Exception as e:
            print("error " + type(e).__name__)
        """
    let r = try LabHarness.run(["lab", "exec", c.ref, "--", "/usr/bin/python3", "-c", py])
    return r.output.split(separator: "\n").last.map(String.init) ?? r.output
}

private func waitForServers() throws {
    for _ in 0..<200 {
        let ok = ["198.18.2.10:8080", "198.18.2.10:9000", "198.18.2.60:8080"].allSatisfy { target in
            (try? LabHarness.shell(raw: ["ip", "netns", "exec", "weft-n2", "sh", "-c",
                                          "timeout 1 bash -c '</dev/tcp/\(target.replacingOccurrences(of: ":", with: "/"))' && echo up"]))?
                .contains("up") == true
        }
        if ok { return }
        usleep(50_000)
    }
    throw HarnessError("the lab's servers never answered")
}

private func proxyStats(_ node: String) throws -> String {
    try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/\(node)/proxy.sock", "http://proxy/stats"])
}

private func counter(_ text: String, _ prefix: String, containing: String = "") -> Int {
    text.split(separator: "\n").filter { $0.hasPrefix(prefix) && (containing.isEmpty || $0.contains(containing)) }
        .compactMap { Double($0.split(separator: " ").last ?? "") }.reduce(0) { $0 + Int($1) }
}

@Suite(.serialized, .enabled(if: LabHarness.canRun, LabHarness.skipReason))
struct AuthorizationEndToEnd {
    @Test func everyClientGetsWhatTheReferenceDecides() throws {
        let lab = try LabHarness(files: ["pods.yaml": pods, "services.yaml": services, "allow.yaml": allowPolicy, "deny.yaml": denyPolicy],
                                 nodes: 3)
        defer { lab.down() }
        try waitForServers()

        // HTTP/1.1, every client and request, against the reference.
        var asks: [[String: Any]] = []
        for c in clients { for r in requests { asks.append(ask(c, port: 8080, (r.method, r.path))) } }
        for c in clients { asks.append(ask(c, port: 9000, nil)) }
        let expected = try referenceDecisions(allowPolicy + "\n---\n" + denyPolicy, asks)
        var i = 0
        var allowedSeen = 0, deniedSeen = 0, allowedFromN1 = 0
        let streamsBefore = counter(try proxyStats("n1"), "weft_proxy_tunnel_streams_out_total")
        let deliveredBefore = counter(try proxyStats("n2"), "weft_proxy_tunnel_requests_express_total")
        for c in clients {
            let codes = try httpCodes(c)
            #expect(codes.count == requests.count, "\(c.name): \(codes)")
            for (r, code) in zip(requests, codes) {
                let want = expected[i] ? "200" : "403"
                #expect(code == want, "\(c.name) \(r.method) \(r.path): got \(code), the reference says \(want)")
                if code == "200" { allowedSeen += 1 } else { deniedSeen += 1 }
                if code == "200" && c.address.hasPrefix("198.18.1.") { allowedFromN1 += 1 }
                i += 1
            }
        }
        #expect(allowedSeen >= 8 && deniedSeen >= 20, "the table exercises both outcomes: \(allowedSeen) allowed, \(deniedSeen) denied")
        // The n1 clients' requests share kept-alive tunnel streams (one per
        // client and backend), except where the far proxy refused a stream.
        let n1Requests = clients.filter { $0.address.hasPrefix("198.18.1.") }.count * requests.count
        let streams = counter(try proxyStats("n1"), "weft_proxy_tunnel_streams_out_total") - streamsBefore
        #expect(streams > 0 && streams < n1Requests, "\(streams) tunnel streams for \(n1Requests) requests from n1")
        // n2 judged those on streams it took on its express path (HTTP/1.1
        // to the pod as the source proxy wrote it): every allowed one, and
        // the denied ones of clients some request of which may be allowed.
        let delivered = counter(try proxyStats("n2"), "weft_proxy_tunnel_requests_express_total") - deliveredBefore
        #expect(delivered >= allowedFromN1 && allowedFromN1 > 0 && delivered <= n1Requests,
                "\(delivered) requests judged on n2's express path; \(allowedFromN1) allowed of \(n1Requests) from n1")

        // Raw TCP to the L4 Service: refused across nodes by the far proxy
        // (a reset), on the same node by the kernel (EPERM at connect).
        var tcp: [String: String] = [:]
        for c in clients {
            let outcome = try tcpOutcome(c)
            tcp[c.name] = outcome
            #expect((outcome == "allowed") == expected[i], "\(c.name) TCP: \(outcome), the reference says \(expected[i] ? "allowed" : "denied")")
            i += 1
        }
        #expect(tcp["other"] == "reset", "a stream the far proxy refuses reaches the client as a reset: \(tcp)")
        #expect(tcp["batch-local"] == "eperm", "the kernel fails a same-node connect at once: \(tcp)")

        // The 403 says why; HTTP/2 from the client is judged the same.
        let body = try LabHarness.run(["lab", "exec", "\(ns)/web", "--", "curl", "-s", "-m", "5", "--http2-prior-knowledge",
                                       "-w", "\\n%{http_code} %{http_version}", "http://198.19.6.10/private"])
        #expect(body.output.contains("RBAC: access denied") && body.output.contains("ALLOW policies \(ns)/api-allow")
                && body.output.hasSuffix("403 2"), "\(body.output)")
        let ok = try LabHarness.run(["lab", "exec", "\(ns)/web", "--", "curl", "-s", "-m", "5", "--http2-prior-knowledge",
                                     "-o", "/dev/null", "-w", "%{http_code}", "http://198.19.6.10/public/a"])
        #expect(ok.output == "200", "\(ok.output)")

        // No spelling of a path dodges a rule: the DENY of /public/secret
        // holds for every way of writing it (curl --path-as-is sends them as
        // written), from n1 through the tunnel and from n2 on its own node,
        // over HTTP/1.1 and HTTP/2; the pod is sent the normal form.
        for client in ["web", "web-local"] {
            for extra in [[], ["--http2-prior-knowledge"]] {
                for spelling in ["/public/./secret", "/public/x/../secret", "/public/%73ecret", "/public/%2e/secret", "/x/..%2Fpublic/secret"] {
                    let r = try LabHarness.run(["lab", "exec", "\(ns)/\(client)", "--", "curl", "-s", "-m", "5", "--path-as-is", "-o", "/dev/null",
                                                "-w", "%{http_code}"] + extra + ["http://198.19.6.10\(spelling)"])
                    // (..%2F is no dot segment: %2F stays encoded, so that
                    // path is /x/..%2Fpublic/secret, which no ALLOW rule names.)
                    #expect(r.output == "403", "\(client) \(extra) \(spelling): \(r.output)")
                }
                let seen = try LabHarness.run(["lab", "exec", "\(ns)/\(client)", "--", "curl", "-s", "-m", "5", "--path-as-is"] + extra
                                              + ["http://198.19.6.10/public/x/.././%61?q=%2e"]).output
                #expect(seen.contains("\"path\": \"/public/a?q=%2e\""), "\(client) \(extra): the pod saw \(seen.prefix(300))")
            }
        }
        let malformed = try LabHarness.run(["lab", "exec", "\(ns)/web", "--", "curl", "-s", "-m", "5", "--path-as-is",
                                            "-w", "\n%{http_code}", "http://198.19.6.10/public/%zz"]).output
        #expect(malformed.hasSuffix("400") && malformed.contains("malformed percent-encoding"), "\(malformed)")
        // MeshConfig proxy.pathNormalization, live: MERGE_SLASHES makes
        // //public//a the allowed /public/a (under BASE no ALLOW rule names
        // it: 403); NONE judges and sends the path as it came.
        func pathMode(_ mode: String) throws {
            let before = try lab.generations(["n1", "n2", "n3"])
            try lab.write("mesh.yaml", """
                apiVersion: weft.dev/v1alpha1
                kind: MeshConfig
                metadata: {name: mesh}
                spec: {proxy: {pathNormalization: {normalization: \(mode)}}}
                """)
            try lab.waitForGeneration(after: before)
            usleep(300_000)  // the proxies reload their tables after the agents' generation
        }
        func fetch(_ path: String) throws -> String {
            try LabHarness.run(["lab", "exec", "\(ns)/web", "--", "curl", "-s", "-m", "5", "--path-as-is", "-w", "\n%{http_code}",
                                "http://198.19.6.10\(path)"]).output
        }
        let slashesUnderBase = try fetch("//public//a")
        #expect(slashesUnderBase.hasSuffix("403"), "\(slashesUnderBase)")
        try pathMode("MERGE_SLASHES")
        let merged = try fetch("//public//a")
        #expect(merged.hasSuffix("200") && merged.contains("\"path\": \"/public/a\""), "\(merged)")
        #expect(try fetch("//public/./secret").hasSuffix("403"))
        try pathMode("NONE")
        let raw = try fetch("/public/x/../a")
        #expect(raw.hasSuffix("200") && raw.contains("\"path\": \"/public/x/../a\""), "NONE: the path as sent: \(raw)")
        try pathMode("BASE")

        // gRPC (HTTP/2 to the pod, inspected at n2): methods by path.
        let grpcWeb = try LabHarness.run(["lab", "exec", "\(ns)/web", "--", "/usr/bin/python3", LabHarness.grpcTool, "call", "198.19.6.60", "80"])
        // (The refusal is a gRPC status with the reason: GRPCLocalAnswer.)
        #expect(grpcWeb.status == 0 && grpcWeb.output.contains("grpc:hi-9")
                && grpcWeb.output.contains("\"fail\": \"PERMISSION_DENIED weft: RBAC: access denied"),
                "Say/Count/Chat allowed, Fail denied: \(grpcWeb.output)")
        let grpcOther = try LabHarness.run(["lab", "exec", "\(ns)/other", "--", "/usr/bin/python3", LabHarness.grpcTool, "call", "198.19.6.60", "80"])
        #expect(grpcOther.status != 0 && grpcOther.output.contains("PERMISSION_DENIED"), "\(grpcOther.output)")

        // Counted where decided.
        let n2Proxy = try proxyStats("n2")
        #expect(counter(n2Proxy, "weft_proxy_authz_denied_total") >= 10 && counter(n2Proxy, "weft_proxy_authz_allowed_total") >= 5, "\(n2Proxy)")
        let n2Agent = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n2/agent.sock", "http://agent/metrics"])
        #expect(counter(n2Agent, "weft_policy_drops_total{", containing: "authorization_denied") >= 1, "the kernel's drop is counted")

        // Live: without the DENY policy, the secret is the web principal's.
        let generations = try lab.generations(["n1", "n2", "n3"])
        try lab.write("deny.yaml", "")
        try lab.waitForGeneration(after: generations)
        let secret = try LabHarness.run(["lab", "exec", "\(ns)/web", "--", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                                         "http://198.19.6.10/public/secret"])
        let afterwards = try referenceDecisions(allowPolicy, [ask(clients[0], port: 8080, ("GET", "/public/secret"))])
        #expect(afterwards == [true] && secret.output == "200", "after the DENY policy went: \(secret.output)")
    }
}
