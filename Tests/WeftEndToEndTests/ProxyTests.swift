import Foundation
import Testing

// The node proxy end to end: real clients (curl, Python) in lab pods dial
// Service clusterIPs, connect4 captures the L7 ones to the node proxy, and
// real backends (Tools/l7server.py) answer with what they received.

private let ns = "l7"

private func pod(_ name: String, node: String, address: String, labels: String, args: String = "") -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: \(name), namespace: \(ns), labels: \(labels), annotations: {lab.weft.dev/command: "python3 \(LabHarness.l7Server) 8080 \(args)"}}
    spec: {serviceAccount: \(name), node: \(node), address: \(address), ports: [{name: http, port: 8080}]}
    """
}

private func service(_ name: String, ip: String, selector: String, portName: String = "http",
                     appProtocol: String? = nil) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: \(ns)}
    spec:
      clusterIP: \(ip)
      selector: \(selector)
      ports: [{name: \(portName), port: 80, targetPort: http\(appProtocol.map { ", appProtocol: \($0)" } ?? "")}]
    """
}

private let pods = [
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: client, namespace: \(ns), labels: {app: client}, annotations: {lab.weft.dev/command: "sleep infinity"}}
    spec: {node: n1, address: 198.18.1.10}
    """,
    pod("v1-a", node: "n1", address: "198.18.1.20", labels: "{app: web, version: v1}"),
    pod("v1-b", node: "n2", address: "198.18.2.20", labels: "{app: web, version: v1}"),
    pod("v2", node: "n1", address: "198.18.1.21", labels: "{app: web, version: v2}"),
    // RequestMirror's target, on the other node than the client.
    pod("shadow", node: "n2", address: "198.18.2.21", labels: "{app: shadow}"),
    pod("flaky", node: "n1", address: "198.18.1.30", labels: "{app: retry}", args: "--fail-rate 0.5"),
    pod("steady", node: "n2", address: "198.18.2.30", labels: "{app: retry}"),
    pod("broken", node: "n1", address: "198.18.1.31", labels: "{app: broken}", args: "--fail-rate 1.0"),
    pod("slow", node: "n1", address: "198.18.1.32", labels: "{app: slow}"),
    pod("banner", node: "n1", address: "198.18.1.40", labels: "{app: banner}", args: "--tcp-banner"),
    // Listens on nothing: every connect to it is refused.
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: refuser, namespace: \(ns), labels: {app: refuser}, annotations: {lab.weft.dev/command: "sleep infinity"}}
    spec: {node: n1, address: 198.18.1.33, ports: [{name: http, port: 8080}]}
    """,
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: grpc, namespace: \(ns), labels: {app: grpc}, annotations: {lab.weft.dev/command: "/usr/bin/python3 \(LabHarness.grpcTool) serve 8080"}}
    spec: {serviceAccount: grpc, node: n2, address: 198.18.2.60, ports: [{name: http, port: 8080}]}
    """,
].joined(separator: "\n---\n")

private let allPodAddresses = ["198.18.1.20", "198.18.2.20", "198.18.1.21", "198.18.2.21", "198.18.1.30", "198.18.2.30",
                               "198.18.1.31", "198.18.1.32"]  // the gRPC server is waited for by its test

private let services = [
    service("web", ip: "198.19.1.10", selector: "{app: web}"),
    service("web-v1", ip: "198.19.1.11", selector: "{app: web, version: v1}"),
    service("web-v2", ip: "198.19.1.12", selector: "{app: web, version: v2}"),
    service("shadow", ip: "198.19.1.13", selector: "{app: shadow}"),
    service("retry", ip: "198.19.1.20", selector: "{app: retry}"),
    service("broken", ip: "198.19.1.21", selector: "{app: broken}"),
    service("slow", ip: "198.19.1.22", selector: "{app: slow}"),
    service("banner", ip: "198.19.1.30", selector: "{app: banner}"),
    service("nobody", ip: "198.19.1.40", selector: "{app: nobody}"),
    service("refuser", ip: "198.19.1.23", selector: "{app: refuser}"),
    service("grpc", ip: "198.19.1.60", selector: "{app: grpc}", portName: "rpc", appProtocol: "grpc"),
    // Declares no HTTP: stays on the kernel-only path.
    service("plain", ip: "198.19.1.50", selector: "{app: web, version: v2}", portName: "web"),
].joined(separator: "\n---\n")

private let routes = """
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: web, namespace: \(ns)}
    spec:
      parentRefs: [{group: "", kind: Service, name: web, port: 80}]
      rules:
      - matches: [{headers: [{name: x-canary, value: "yes"}]}]
        backendRefs: [{name: web-v2, port: 80}]
      # Trailing slashes, which the API ignores on a prefix and its replacement.
      - matches: [{path: {type: PathPrefix, value: /api/}, method: GET}]
        filters:
        - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2api/}}}
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: api}], remove: [x-drop-me]}}
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{path: {type: Exact, value: /old}}]
        filters:
        - {type: RequestRedirect, requestRedirect: {hostname: new.example, path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}
      - matches: [{queryParams: [{name: version, value: "2"}]}]
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
        backendRefs: [{name: web-v1, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /mirrored}}]
        filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /}}]
        filters:
        - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-split, value: canary}]}}
        backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: retry, namespace: \(ns)}
    spec:
      parentRefs: [{kind: Service, group: "", name: retry}]
      rules:
      - backendRefs: [{name: retry, port: 80}]
        retry: {codes: [503], attempts: 3, backoff: 5ms}
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: broken, namespace: \(ns)}
    spec:
      parentRefs: [{kind: Service, group: "", name: broken}]
      rules:
      - backendRefs: [{name: broken, port: 80}]
        retry: {codes: [503], attempts: 3, backoff: 1ms}
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: slow, namespace: \(ns)}
    spec:
      parentRefs: [{kind: Service, group: "", name: slow}]
      rules:
      - matches: [{path: {type: PathPrefix, value: /sleep}}]
        timeouts: {request: 300ms}
        backendRefs: [{name: slow, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /backend}}]
        timeouts: {request: 2s, backendRequest: 200ms}
        filters:
        - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /sleep/1000}}}
        backendRefs: [{name: slow, port: 80}]
    """

private func startLab(extra: [String] = [], files: [String: String] = [:], binary: String? = nil) throws -> LabHarness {
    let lab = try LabHarness(files: ["services.yaml": services, "pods.yaml": pods, "routes.yaml": routes].merging(files) { $1 },
                             extra: extra, binary: binary)
    do {
        try waitForBackends(lab)
    } catch {
        lab.down()
        throw error
    }
    return lab
}

/// Backends start asynchronously: wait until each answers on its own address.
private func waitForBackends(_ lab: LabHarness) throws {
    for address in allPodAddresses {
        var ok = false
        for _ in 0..<200 {
            if let r = try? LabHarness.run(["lab", "exec", "client", "--", "curl", "-s", "-o", "/dev/null", "-m", "1",
                                            "http://\(address):8080/__count"]), r.status == 0 { ok = true; break }
            usleep(50_000)
        }
        try #require(ok, "backend \(address) never answered")
    }
}

/// curl in the client pod (or `pod`); returns (status, headers lowercased, body).
private func curl(_ lab: LabHarness, _ url: String, _ extra: [String] = [],
                  from pod: String = "client") throws -> (Int, [String: String], String) {
    let r = try LabHarness.run(["lab", "exec", pod, "--", "curl", "-sS", "-m", "5", "-D", "-", url] + extra)
    var text = Substring(r.output)
    // (The 101 of an h2c Upgrade comes first.)
    while text.hasPrefix("HTTP/1.1 1"), let end = text.range(of: "\r\n\r\n") { text = text[end.upperBound...] }
    guard let split = text.range(of: "\r\n\r\n") else { throw HarnessError("curl \(url): \(text)") }
    let headLines = text[..<split.lowerBound].split(separator: "\r\n")
    let status = Int(headLines.first?.split(separator: " ").dropFirst().first ?? "") ?? 0
    var headers: [String: String] = [:]
    for line in headLines.dropFirst() {
        if let c = line.firstIndex(of: ":") {
            headers[line[..<c].lowercased()] = line[line.index(after: c)...].trimmingCharacters(in: .whitespaces)
        }
    }
    return (status, headers, String(text[split.upperBound...]))
}

/// `grpctool call` from the client pod to the grpc Service, every call
/// carrying `metadata` ("name=value"): its JSON once a run got through (the
/// servers may still be starting), else the output of the last of 50 runs.
private func grpcCall(_ metadata: [String] = []) throws -> [String: Any] {
    var g: [String: Any] = [:]
    for _ in 0..<50 {
        let r = try LabHarness.run(["lab", "exec", "client", "--", "/usr/bin/python3", LabHarness.grpcTool, "call", "198.19.1.60", "80"] + metadata)
        g = (try? JSONSerialization.jsonObject(with: Data((r.output.split(separator: "\n").last ?? "").utf8)) as? [String: Any])
            ?? ["output": String(r.output.suffix(400))]
        if g["say"] != nil { break }
        usleep(100_000)
    }
    return g
}

private func json(_ body: String) -> [String: Any] {
    (try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]) ?? [:]
}

/// Writes the lab's MeshConfig with `spec` and waits until n1's proxy runs with it.
private func applyMeshConfig(_ lab: LabHarness, spec: String) throws {
    let generations = try lab.generations(["n1"])
    try lab.write("mesh.yaml", """
        apiVersion: weft.dev/v1alpha1
        kind: MeshConfig
        metadata: {name: mesh}
        spec: \(spec)
        """)
    try lab.waitForGeneration(after: generations)
    usleep(300_000)  // the proxy reloads its table after the agent's generation
}

/// weft_upstream_events_total for one event and destination Service, from the proxy's /metrics.
private func upstreamEvents(_ node: String, _ event: String, service: String) throws -> Int {
    try series(node, "weft_upstream_events_total", service: service, ["event=\"\(event)\""])
}

/// The sum of a node proxy's series `name` whose labels name `service`
/// (of the lab's namespace) and contain each of `labels`.
private func series(_ node: String, _ name: String, service: String, _ labels: [String]) throws -> Int {
    let text = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/\(node)/proxy.sock", "http://proxy/metrics"])
    let want = "destination_service=\"\(service).\(ns).svc\""
    return text.split(separator: "\n")
        .filter { line in line.hasPrefix("\(name){") && line.contains(want) && labels.allSatisfy { line.contains($0) } }
        .compactMap { Double($0.split(separator: " ").last ?? "") }.reduce(0) { $0 + Int($1) }
}

@Suite(.serialized, .enabled(if: LabHarness.canRun, LabHarness.skipReason))
struct ProxyTests {
    @Test func capturedRequestsAreRoutedSplitAndFiltered() throws {
        let lab = try startLab()
        defer { lab.down() }

        // HTTP/1.1 through the proxy: the backend sees who asked and via whom.
        let (status, headers, body) = try curl(lab, "http://198.19.1.10/hello", [
            "-H", "Connection: keep-alive, x-hop", "-H", "x-hop: secret", "-H", "x-canary: yes"])
        #expect(status == 200, "\(body)")
        let seen = json(body)
        let got = seen["headers"] as? [String: String] ?? [:]
        #expect(seen["pod"] as? String == "v2", "x-canary: yes routes to web-v2: \(seen)")
        #expect(got["x-forwarded-for"] == "198.18.1.10", "\(got)")
        #expect(got["forwarded"] == "for=198.18.1.10;proto=http", "\(got)")
        #expect(got["via"] == "1.1 weft-n1", "\(got)")
        #expect((got["x-request-id"] ?? "").count == 36, "\(got)")
        #expect(got["x-hop"] == nil, "a header named in Connection is hop-by-hop: \(got)")
        #expect(headers["x-pod"] == "v2")

        // HTTP/2 with prior knowledge from the client; HTTP/1.1 to the backend.
        let h2 = try curl(lab, "http://198.19.1.10/h2", ["--http2-prior-knowledge", "-H", "x-canary: yes"])
        #expect(h2.0 == 200, "\(h2)")
        #expect(json(h2.2)["pod"] as? String == "v2")

        // Three pipelined requests in one write: three answers, in order.
        let pipelined = try LabHarness.run(["lab", "exec", "client", "--", "python3", "-c", """
            import socket
            s = socket.create_connection(("198.19.1.10", 80), timeout=5)
            reqs = b"".join(b"GET /p%d HTTP/1.1\\r\\nHost: a\\r\\nx-canary: yes\\r\\n%s\\r\\n" % (i, b"Connection: close\\r\\n" if i == 3 else b"") for i in (1, 2, 3))
            s.sendall(reqs)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            print([p for p in ("/p1", "/p2", "/p3") if p.encode() in data], data.count(b"HTTP/1.1 200"))
            """])
        #expect(pipelined.output.contains("['/p1', '/p2', '/p3'] 3"), "\(pipelined.output)")
        let text = pipelined.output
        if let a = text.range(of: "/p1"), let b = text.range(of: "/p2") { #expect(a.lowerBound < b.lowerBound) }

        // curl --http2 asks for the h2c Upgrade: 101, the request answered
        // over HTTP/2 as stream 1, the next one on the same connection as
        // stream 3; nothing h2c-specific reaches the backend.
        let upgrades = try LabHarness.proxyStat("n1", "h2c_upgrades_total")
        let both = try LabHarness.run(["lab", "exec", "client", "--", "curl", "-sS", "-m", "5", "--http2", "-D", "-",
                                       "-w", "\n[%{http_version} %{num_connects}]\n", "-H", "x-canary: yes",
                                       "http://198.19.1.10/up1", "http://198.19.1.10/up2"]).output
        #expect(both.components(separatedBy: "HTTP/1.1 101 Switching Protocols").count == 2, "\(both)")
        #expect(both.components(separatedBy: "HTTP/2 200").count == 3, "\(both)")
        #expect(both.contains("[2 1]") && both.contains("[2 0]"), "both over HTTP/2, one connection: \(both)")
        // (The bodies, JSON, come without a newline after them.)
        let bodies = both.components(separatedBy: "{\"pod\"").dropFirst().compactMap { chunk in
            chunk.range(of: "}}").map { json("{\"pod\"" + chunk[..<$0.upperBound]) }
        }
        for path in ["/up1", "/up2"] {
            let seen = bodies.first { $0["path"] as? String == path } ?? [:]
            let seenHeaders = seen["headers"] as? [String: String] ?? [:]
            #expect(seen["pod"] as? String == "v2", "\(path): \(both)")
            #expect(seenHeaders["upgrade"] == nil && seenHeaders["http2-settings"] == nil && seenHeaders["connection"] == nil,
                    "\(seenHeaders)")
        }
        #expect(try LabHarness.proxyStat("n1", "h2c_upgrades_total") == upgrades + 1)
        // A head past one frame (stream 1 in HEADERS and CONTINUATIONs), and HEAD.
        let big = String(repeating: "b", count: 40_000)
        let large = try curl(lab, "http://198.19.1.10/up-large", ["--http2", "-H", "x-canary: yes", "-H", "x-big: \(big)"])
        #expect(large.0 == 200 && (json(large.2)["headers"] as? [String: String])?["x-big"] == big, "\(large.0) \(large.2.prefix(300))")
        let head = try curl(lab, "http://198.19.1.10/up-head", ["--http2", "-I", "-H", "x-canary: yes"])
        #expect(head.0 == 200 && !head.2.contains("\"pod\""), "no body: \(head)")
        #expect(try LabHarness.proxyStat("n1", "h2c_upgrades_total") == upgrades + 3)
        // nghttp -u: the same upgrade from nghttp2's client.
        let nghttp = try LabHarness.run(["lab", "exec", "client", "--", "nghttp", "-u", "-v", "-H", "x-canary: yes",
                                         "http://198.19.1.10/nghttp"]).output
        #expect(nghttp.contains("HTTP Upgrade success") && nghttp.contains(":status: 200") && nghttp.contains("\"/nghttp\""),
                "\(nghttp.suffix(1500))")
        // A body (curl --http2 -d) is read whole, then goes on stream 1 as
        // DATA (RFC 7540 3.2): 40,000 bytes, in three frames, whole.
        let upload = try LabHarness.run(["lab", "exec", "client", "--", "sh", "-c", """
            head -c 40000 /dev/urandom > /tmp/weft-h2c-body && sha256sum /tmp/weft-h2c-body && \
            curl -sS -m 5 --http2 -D - -H 'x-canary: yes' -H 'content-type: application/octet-stream' \
              --data-binary @/tmp/weft-h2c-body http://198.19.1.10/up-post; rm -f /tmp/weft-h2c-body
            """]).output
        let sent = String(upload.prefix(64))
        #expect(upload.contains("HTTP/1.1 101 Switching Protocols") && upload.contains("HTTP/2 200"), "\(upload)")
        let posted = upload.range(of: "{\"pod\"").map { json(String(upload[$0.lowerBound...])) } ?? [:]
        #expect(posted["method"] as? String == "POST" && posted["body"] as? Int == 40_000
                && posted["body_sha256"] as? String == sent, "\(upload.suffix(600))")
        #expect(try LabHarness.proxyStat("n1", "h2c_upgrades_total") == upgrades + 5)
        // Declined: an upgrade request with a body it cannot hold to a
        // length (chunked) is answered over HTTP/1.1, and so is a refused
        // WebSocket upgrade; NIO's decoder reads nothing after a request
        // that asks for an upgrade, so each answer says close and the
        // connection ends, where a request sent behind it would hang.
        let declined = try LabHarness.run(["lab", "exec", "client", "--", "python3", "-c", """
            import socket
            out = []
            for up in (b"Connection: Upgrade, HTTP2-Settings\\r\\nUpgrade: h2c\\r\\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n2\\r\\nhi\\r\\n0\\r\\n\\r\\n",
                       b"Connection: Upgrade\\r\\nUpgrade: not-websocket\\r\\nContent-Length: 2\\r\\n\\r\\nhi"):
                s = socket.create_connection(("198.19.1.10", 80), timeout=5)
                s.sendall(b"POST /declined HTTP/1.1\\r\\nHost: a\\r\\nx-canary: yes\\r\\n" + up)
                s.sendall(b"GET /behind HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
                data = b""
                try:
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    out.append("%s %s %s" % (data.split(b"\\r\\n")[0].decode(), b"connection: close" in data.lower(), b"/declined" in data))
                except socket.timeout:
                    out.append("hung: %r" % data[:200])
            print(out)
            """]).output
        #expect(declined.contains("['HTTP/1.1 200 OK True True', 'HTTP/1.1 200 OK True True']"), "\(declined)")

        // Path prefix + method, URL rewrite, request header modifier (the
        // prefix and its replacement written with a trailing "/").
        let api = json(try curl(lab, "http://198.19.1.10/api/items?x=1", ["-H", "x-drop-me: 1"]).2)
        let apiHeaders = api["headers"] as? [String: String] ?? [:]
        #expect(api["pod"] as? String == "v2")
        #expect(api["path"] as? String == "/v2api/items?x=1", "\(api)")
        #expect(apiHeaders["x-route"] == "api" && apiHeaders["x-drop-me"] == nil, "\(apiHeaders)")
        // POST /api does not match the GET-only rule: it falls to the split.
        #expect(try curl(lab, "http://198.19.1.10/api/items", ["-X", "POST", "-d", "x"]).1["x-split"] == "canary")

        // Redirect, answered by the proxy itself.
        let redirect = try curl(lab, "http://198.19.1.10/old?q=1")
        #expect(redirect.0 == 301)
        #expect(redirect.1["location"] == "http://new.example/new?q=1", "\(redirect.1)")

        // Query parameter and regular-expression matches.
        #expect(json(try curl(lab, "http://198.19.1.10/x?version=2").2)["pod"] as? String == "v2")
        for _ in 0..<5 {
            let pod = json(try curl(lab, "http://198.19.1.10/re/42").2)["pod"] as? String
            #expect(pod == "v1-a" || pod == "v1-b", "\(pod ?? "nil")")
        }

        // The canary split: 90/10 over 2,000 requests, within 3 points.
        let split = try lab.tool(in: "client", ["http-load", "198.19.1.10", "80", "2000", "/split"])
        let counts = split["pods"] as? [String: Int] ?? [:]
        #expect((split["errors"] as? [Any])?.isEmpty == true, "\(split)")
        let v2 = Double(counts["v2"] ?? 0) / 2000
        #expect(abs(v2 - 0.10) <= 0.03, "v2 share \(v2): \(counts)")
        #expect((counts["v1-a"] ?? 0) > 0 && (counts["v1-b"] ?? 0) > 0, "both v1 pods, on both nodes: \(counts)")

        // No backend: 503 with a body saying so; no route match: the split catches all here.
        let none = try curl(lab, "http://198.19.1.40/")
        #expect(none.0 == 503 && none.2.contains("no ready backend for l7/nobody:80"), "\(none)")

        // Not declared as HTTP and no route: the kernel balances it, no proxy hop.
        let before = try LabHarness.proxyStat("n1", "requests_total")
        let plain = json(try curl(lab, "http://198.19.1.50/").2)
        #expect(plain["pod"] as? String == "v2")
        #expect((plain["headers"] as? [String: String])?["via"] == nil)
        #expect(try LabHarness.proxyStat("n1", "requests_total") == before)

        // The application still sees the clusterIP as its peer.
        let peer = try lab.tool(in: "client", ["peer", "198.19.1.10", "80"])
        #expect((peer["peer"] as? [Any])?.first as? String == "198.19.1.10")

        // RequestMirror to a Service whose one pod is on n2: each copy
        // reaches it through the tunnel to n2, as requests to n2 go (a
        // connection of its own from the proxy would leave the node in
        // plaintext, or be dropped there), and the client gets web-v2's
        // answers alone.
        func shadowCount() throws -> Int { json(try curl(lab, "http://198.18.2.21:8080/__count").2)["count"] as? Int ?? -1 }
        let shadowBefore = try shadowCount()
        let streamsBefore = try LabHarness.proxyStat("n1", "tunnel_streams_out_total")
        for i in 0..<10 {
            let mirrored = try curl(lab, "http://198.19.1.10/mirrored/\(i)")
            #expect(mirrored.0 == 200 && json(mirrored.2)["pod"] as? String == "v2", "\(mirrored)")
        }
        // (Before anything else goes to n2: the real requests stay on n1.)
        usleep(300_000)
        let copyStreams = try LabHarness.proxyStat("n1", "tunnel_streams_out_total") - streamsBefore
        var copies = try shadowCount() - shadowBefore
        for _ in 0..<40 where copies < 10 {
            usleep(50_000)
            copies = try shadowCount() - shadowBefore
        }
        #expect(copies == 10, "\(copies) copies reached the mirror's pod on n2")
        #expect(copyStreams >= 1, "the copies went through the tunnel (\(copyStreams) streams opened to n2)")

        // weft status names the proxy and what it captures.
        let st = try LabHarness.run(["status", "--node", "n1"])
        #expect(st.output.contains("listening on 198.18.1.1:15001, restarts 0, route table generation 1, 11 captured service port(s)"), "\(st.output)")
        #expect(st.output.contains("proxy_captured="), "\(st.output)")
        let metrics = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/agent.sock", "http://agent/metrics"])
        #expect(metrics.contains("# TYPE weft_proxy_requests_total counter"), "\(metrics)")
        #expect(metrics.split(separator: "\n").contains { $0.hasPrefix("weft_proxy_requests_total ") && (Int($0.split(separator: " ")[1]) ?? 0) >= 2000 })
        let get = try LabHarness.run(["get", "routes", "--node", "n1"])
        #expect(get.output.contains("l7/web") && get.output.contains("web-v2:80 weight 10"), "\(get.output)")
    }

    /// GRPCRoute (GAMMA): on the gRPC Service, calls go by their method and
    /// metadata: weft.Echo/Say carrying `x-track: canary`, and every Chat,
    /// to a second server (grpc-canary), the rest to the Service's own; an
    /// HTTPRoute on the same Service port (which would send Say, by an
    /// Exact path match that outranks the GRPCRoute's catch-all, to an
    /// HTTP/1.1 server) is ignored, and `weft get routes` says so.
    /// grpc-canary's Service declares no protocol: the GRPCRoute's backends
    /// are spoken to over HTTP/2 all the same.
    @Test func grpcRoutesRouteCallsByMethodAndMetadata() throws {
        let routes = """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: grpc-canary, namespace: \(ns), labels: {app: grpc-canary}, annotations: {lab.weft.dev/command: "/usr/bin/python3 \(LabHarness.grpcTool) serve 8080"}}
            spec: {serviceAccount: grpc, node: n1, address: 198.18.1.61, ports: [{name: http, port: 8080}]}
            ---
            \(service("grpc-canary", ip: "198.19.1.61", selector: "{app: grpc-canary}", portName: "rpc"))
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: GRPCRoute
            metadata: {name: grpc, namespace: \(ns)}
            spec:
              parentRefs: [{group: "", kind: Service, name: grpc, port: 80}]
              rules:
              - matches: [{method: {service: weft.Echo, method: Say}, headers: [{name: x-track, value: canary}]}]
                backendRefs: [{name: grpc-canary, port: 80}]
              - matches: [{method: {service: weft.Echo, method: Chat}}, {method: {service: weft.Echo, method: Drop}}]
                backendRefs: [{name: grpc-canary, port: 80}]
              - backendRefs: [{name: grpc, port: 80}]
            ---
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: grpc, namespace: \(ns)}
            spec:
              targetRefs: [{group: "", kind: Service, name: grpc}, {group: "", kind: Service, name: grpc-canary}]
              outlierDetection: {consecutive5xx: 3, interval: 10s, baseEjectionTime: 60s}
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: grpc-as-http, namespace: \(ns)}
            spec:
              parentRefs: [{group: "", kind: Service, name: grpc, port: 80}]
              rules: [{matches: [{path: {type: Exact, value: /weft.Echo/Say}}], backendRefs: [{name: web-v2, port: 80}]}]
            ---
            \(service("grpc-none", ip: "198.19.1.62", selector: "{app: nobody}", portName: "rpc", appProtocol: "grpc"))
            ---
            \(service("grpc-slow", ip: "198.19.1.63", selector: "{app: grpc}", portName: "rpc", appProtocol: "grpc"))
            ---
            \(LabHarness.trafficPolicy("grpc-slow", namespace: ns, "timeout: {http: {requestTimeout: 300ms}}"))
            ---
            \(service("grpc-fault", ip: "198.19.1.64", selector: "{app: grpc}", portName: "rpc", appProtocol: "grpc"))
            ---
            \(LabHarness.trafficPolicy("grpc-fault", namespace: ns, "faultInjection: {abort: {grpcStatus: 8, percentage: 100}}"))
            """
        let lab = try startLab(files: ["grpc-routes.yaml": routes])
        defer { lab.down() }
        let plain = try grpcCall()
        #expect(plain["say"] as? [String] == (0..<10).map { "grpc:hi-\($0)" }, "\(plain)")
        #expect(plain["chat"] as? [String] == ["grpc-canary:a", "grpc-canary:b", "grpc-canary:c"], "\(plain)")
        #expect(plain["count"] as? [String] == ["0", "1", "2", "3", "4"] && plain["count_trailer"] as? String == "grpc", "\(plain)")
        #expect(plain["fail"] as? String == "UNAVAILABLE on purpose", "\(plain)")
        let tagged = try grpcCall(["x-track=canary"])
        #expect(tagged["say"] as? [String] == (0..<10).map { "grpc-canary:hi-\($0)" }, "\(tagged)")
        #expect(tagged["count_trailer"] as? String == "grpc", "the header alone does not match Count: \(tagged)")
        let get = try LabHarness.run(["get", "routes", "--node", "n1"])
        #expect(get.output.contains("GRPCRoute") && get.output.contains("IGNORED on l7/grpc:80"), "\(get.output)")
        // The proxy's own answers reach grpcio as gRPC statuses with the
        // proxy's reason (GRPCLocalAnswer): no pod behind the Service is
        // UNAVAILABLE, the Service's requestTimeout DEADLINE_EXCEEDED (an
        // HTTP 503 or 504 would read as UNAVAILABLE "Received http2 header
        // with status", the reason lost), a fault abort's grpcStatus that
        // status.
        for (ip, method, code, word) in [("198.19.1.62", "Say", "UNAVAILABLE", "grpc-none"),
                                         ("198.19.1.63", "Slow", "DEADLINE_EXCEEDED", "300ms"),
                                         ("198.19.1.64", "Say", "RESOURCE_EXHAUSTED", "fault injected")] {
            let out = try LabHarness.run(["lab", "exec", "client", "--", "/usr/bin/python3", LabHarness.grpcTool, "fail", ip, "80",
                                          "2", method]).output
            // (Its last line: grpcio may log to stderr before it.)
            let last = out.split(separator: "\n").last.map(String.init) ?? ""
            let json = (try? JSONSerialization.jsonObject(with: Data(last.utf8))) as? [String: Any]
            #expect((json?["codes"] as? [String: Int]) == [code: 2], "\(method) to \(ip): \(out)")
            let details = json?["details"] as? [String] ?? []
            #expect(details.count == 1 && details[0].hasPrefix("weft: ") && details[0].contains(word), "\(method) to \(ip): \(out)")
        }
        // A gRPC error is a backend failure to outlier detection though its
        // HTTP status is 200: three UNAVAILABLEs in a row eject the server,
        // whether the status came alone (Fail, to grpc) or in trailers
        // after a message (Drop, to grpc-canary).
        for (method, pod) in [("Fail", "198.18.2.60:8080"), ("Drop", "198.18.1.61:8080")] {
            let failed = try LabHarness.run(["lab", "exec", "client", "--", "/usr/bin/python3", LabHarness.grpcTool, "fail", "198.19.1.60", "80",
                                             "3", method])
            #expect(failed.output.contains("\"UNAVAILABLE\": 3"), "\(method): \(failed.output)")
            let ejections = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/proxy.sock", "http://proxy/ejections"])
            #expect(ejections.contains(pod), "\(method): \(ejections)")
        }
    }

    /// GAMMA consumer routes: a route in namespace l7-app attached to
    /// l7/web routes l7-app's clients only, in place of web's producer
    /// route: every request to web-v2 (a backendRef in l7), on the express
    /// paths (HTTP/1.1 and h2c, a rule without filters) and on the full
    /// path (a rule with a filter); the producer route's redirect and split
    /// are not theirs, and a path no consumer rule matches is 404. A client
    /// in l7 keeps web's own routes.
    @Test func consumerRoutesRouteOnlyTheirNamespacesClients() throws {
        let consumer = """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: app-client, namespace: l7-app, labels: {app: client}, annotations: {lab.weft.dev/command: "sleep infinity"}}
            spec: {node: n1, address: 198.18.1.11}
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: pinned, namespace: l7-app}
            spec:
              parentRefs: [{group: "", kind: Service, namespace: \(ns), name: web, port: 80}]
              rules:
              - matches: [{path: {type: PathPrefix, value: /tagged}}]
                filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-consumer, value: l7-app}]}}]
                backendRefs: [{name: web-v2, namespace: \(ns), port: 80}]
              - matches: [{path: {type: PathPrefix, value: /plain}}, {path: {type: Exact, value: /old}}]
                backendRefs: [{name: web-v2, namespace: \(ns), port: 80}]
            """
        let lab = try startLab(files: ["consumer.yaml": consumer])
        defer { lab.down() }
        var pods: [String: Int] = [:]
        let express = try LabHarness.proxyStat("n1", "express_requests_total")
        for i in 0..<10 {
            for (path, extra) in [("/plain/\(i)", []), ("/plain/h2/\(i)", ["--http2-prior-knowledge"]), ("/tagged/\(i)", [])] {
                let (status, headers, body) = try curl(lab, "http://198.19.1.10\(path)", extra, from: "app-client")
                #expect(status == 200, "\(path): \(body)")
                pods[json(body)["pod"] as? String ?? "?", default: 0] += 1
                #expect(headers["x-split"] == nil, "\(path): the producer route's filter: \(headers)")
                #expect((headers["x-consumer"] == "l7-app") == path.hasPrefix("/tagged"), "\(path): \(headers)")
            }
        }
        #expect(pods == ["v2": 30], "every request of l7-app to web-v2: \(pods)")
        #expect(try LabHarness.proxyStat("n1", "express_requests_total") - express >= 20, "the rule without filters on the express paths")
        for extra in [[], ["--http2-prior-knowledge"]] {
            // The producer's /re/N rule would be served on the express path.
            let re = try curl(lab, "http://198.19.1.10/re/5", extra, from: "app-client")
            #expect(re.0 == 404, "\(extra): the producer's rules are not l7-app's: \(re)")
        }
        let old = try curl(lab, "http://198.19.1.10/old", from: "app-client")
        #expect(old.0 == 200 && json(old.2)["pod"] as? String == "v2", "the producer's redirect is not l7-app's: \(old)")
        let unmatched = try curl(lab, "http://198.19.1.10/elsewhere", from: "app-client")
        #expect(unmatched.0 == 404, "no consumer rule matches, and the producer's are not l7-app's: \(unmatched)")
        // The client in l7: web's own routes.
        var theirs: [String: Int] = [:]
        for i in 0..<20 {
            let (status, headers, body) = try curl(lab, "http://198.19.1.10/plain/\(i)")
            #expect(status == 200 && headers["x-split"] == "canary" && headers["x-consumer"] == nil, "\(headers) \(body)")
            theirs[json(body)["pod"] as? String ?? "?", default: 0] += 1
        }
        #expect((theirs["v1-a"] ?? 0) + (theirs["v1-b"] ?? 0) > 0, "l7's client is split 90/10 as before: \(theirs)")
        let redirect = try curl(lab, "http://198.19.1.10/old")
        #expect(redirect.0 == 301, "\(redirect)")
        // `weft route check` reads the table the agent has in force.
        let check = try LabHarness.run(["route", "check", "--node", "n1", "--to", "l7/web", "--from", "l7-app/app-client", "--path", "/plain/1"])
        #expect(check.status == 0 && check.output.contains("rule:     l7-app/pinned#1")
                && check.output.contains("the consumer routes of namespace l7-app"), "\(check.output)")
    }

    @Test func grpcStreamsAndWebSocketsGoThroughTheProxy() throws {
        let lab = try startLab()
        defer { lab.down() }
        // gRPC over HTTP/2 both ways (the Service says appProtocol: grpc),
        // to a pod on the other node: unary, server stream, bidi stream,
        // an error status, and trailers end to end.
        let g = try grpcCall()
        #expect(g["say"] as? [String] == (0..<10).map { "grpc:hi-\($0)" }, "\(g)")
        #expect(g["say_trailer"] as? String == "grpc", "\(g)")
        #expect(g["count"] as? [String] == ["0", "1", "2", "3", "4"], "\(g)")
        #expect(g["count_code"] as? String == "OK", "\(g)")
        #expect(g["chat"] as? [String] == ["grpc:a", "grpc:b", "grpc:c"], "\(g)")
        #expect(g["fail"] as? String == "UNAVAILABLE on purpose", "\(g)")
        #expect(try LabHarness.proxyStat("n1", "http2_connections_total") >= 1)

        // 150 long-lived streams at once on one channel (watches), across
        // nodes: every one is echoed while all are open (the proxy offers
        // 1000 streams, and opens another connection to the pod past 100;
        // with one, NIO held the 101st until another stream ended).
        let w = try LabHarness.run(["lab", "exec", "client", "--", "/usr/bin/python3", LabHarness.grpcTool,
                                    "watches", "198.19.1.60", "80", "150"])
        let watches = (try? JSONSerialization.jsonObject(with: Data((w.output.split(separator: "\n").last ?? "").utf8))
                       as? [String: Any]) ?? ["output": String(w.output.suffix(400))]
        #expect(watches["echoed"] as? Int == 150 && watches["codes"] as? [String: Int] == ["OK": 150], "\(watches)")

        // WebSocket: the Upgrade goes through, then bytes flow both ways.
        let ws = try lab.tool(in: "client", ["ws-echo", "198.19.1.11", "80", "hello"])
        #expect((ws["status"] as? String ?? "").contains("101"), "\(ws)")
        #expect(ws["accept_ok"] as? Bool == true, "\(ws)")
        let echoes = ws["echoes"] as? [String] ?? []
        #expect(echoes.count == 3 && echoes.allSatisfy { $0.hasPrefix("v1-") && $0.contains(":hello-") }, "\(ws)")
        #expect(try LabHarness.proxyStat("n1", "upgrades_total") >= 1)
        try expectWebSocketsOverHTTP2(lab, in: "client", to: "198.19.1.11")
    }

    @Test func retriesMaskAFlakyBackendAndBudgetsCapAnOutage() throws {
        // retry-plain: the retry Service's pods with no route, retried by
        // its TrafficPolicy's `retry`.
        let lab = try startLab(files: ["retry-policy.yaml": service("retry-plain", ip: "198.19.1.24", selector: "{app: retry}") + """

            ---
            \(LabHarness.trafficPolicy("retry-plain", namespace: ns, "retry: {codes: [503], attempts: 3, backoff: 1ms}"))
            """])
        defer { lab.down() }
        // One backend of two answers 503 half the time: retries (to another
        // endpoint) hide it.
        let r = try lab.tool(in: "client", ["http-load", "198.19.1.20", "80", "1000", "/"])
        let statuses = r["statuses"] as? [String: Int] ?? [:]
        let ok = Double(statuses["200"] ?? 0) / 1000
        #expect(ok >= 0.99, "success \(ok): \(statuses) \(r["errors"] ?? [])")
        let retries = try LabHarness.proxyStat("n1", "retries_total")
        #expect(retries > 0)
        // The same retries, per destination Service, Istio-labelled.
        #expect(try upstreamEvents("n1", "retry", service: "retry") == retries, "every retry so far was the retry Service's")
        // The same pods through a Service with no route: its TrafficPolicy's
        // retry hides the failures the same way (without it, about 1 in 4
        // requests would fail).
        let plain = try lab.tool(in: "client", ["http-load", "198.19.1.24", "80", "1000", "/"])
        let plainStatuses = plain["statuses"] as? [String: Int] ?? [:]
        #expect(Double(plainStatuses["200"] ?? 0) / 1000 >= 0.99, "\(plainStatuses) \(plain["errors"] ?? [])")
        #expect(try upstreamEvents("n1", "retry", service: "retry-plain") > 0)

        // Every backend fails: retries stop at the budget (20% of requests
        // plus 10 a second), so the outage is not multiplied by 4 attempts.
        let n = 600
        let outage = try lab.tool(in: "client", ["http-load", "198.19.1.21", "80", "\(n)", "/"])
        let failed = (outage["statuses"] as? [String: Int])?["503"] ?? 0
        #expect(failed == n, "\(outage)")
        let seenByBackend = json(try curl(lab, "http://198.18.1.31:8080/__count").2)["count"] as? Int ?? -1
        let seconds = outage["seconds"] as? Double ?? 0
        let bound = Int(Double(n) * 1.2 + 10 * max(seconds, 10) + 10)
        #expect(seenByBackend > n && seenByBackend <= bound, "backend saw \(seenByBackend) for \(n) requests (bound \(bound))")
        #expect(try LabHarness.proxyStat("n1", "retries_budget_exhausted_total") > 0)
        // (Per Service: the flaky phases may spend the budget too, now and
        // then: a quarter of their requests want a retry, over its 20%.)
        let exhausted = try upstreamEvents("n1", "retry_budget_exhausted", service: "broken")
        #expect(exhausted > 0)
        let everyExhausted = try exhausted + upstreamEvents("n1", "retry_budget_exhausted", service: "retry")
            + upstreamEvents("n1", "retry_budget_exhausted", service: "retry-plain")
        #expect(try everyExhausted == LabHarness.proxyStat("n1", "retries_budget_exhausted_total"))
        let perService = try upstreamEvents("n1", "retry", service: "broken") + upstreamEvents("n1", "retry", service: "retry")
            + upstreamEvents("n1", "retry", service: "retry-plain")
        #expect(try perService == LabHarness.proxyStat("n1", "retries_total"))
    }

    /// A TrafficPolicy retry naming gRPC statuses: a call answered
    /// UNAVAILABLE alone (trailers-only: nothing was sent back) is tried
    /// again though it is a POST. Maybe fails every other call its server
    /// gets, so without the retry half the calls would fail, with it none
    /// does; a status after a message (Drop) is not retried.
    @Test func grpcCallsAnsweredUnavailableAloneAreRetried() throws {
        let lab = try startLab(files: ["grpc-retry.yaml": LabHarness.trafficPolicy(
            "grpc", namespace: ns, "retry: {attempts: 2, backoff: 1ms, grpcStatuses: [UNAVAILABLE]}")])
        defer { lab.down() }
        let up = try grpcCall()  // (the server is up; its Fail is retried and fails)
        #expect(up["fail"] as? String == "UNAVAILABLE on purpose", "\(up)")
        func calls(_ n: Int, _ method: String) throws -> String {
            try LabHarness.run(["lab", "exec", "client", "--", "/usr/bin/python3", LabHarness.grpcTool, "fail", "198.19.1.60", "80",
                                "\(n)", method]).output
        }
        let before = try upstreamEvents("n1", "retry", service: "grpc")
        let maybe = try calls(20, "Maybe")
        #expect(maybe.contains("{\"OK\": 20}"), "\(maybe)")
        let retried = try upstreamEvents("n1", "retry", service: "grpc") - before
        #expect(retried == 20, "one retry per call: \(retried)")
        let drop = try calls(2, "Drop")
        #expect(drop.contains("{\"UNAVAILABLE\": 2}"), "\(drop)")
        #expect(try upstreamEvents("n1", "retry", service: "grpc") - before == 20, "a status after a message is not retried")
        // Each call counted once, by the status it ended with (Istio's
        // grpc_response_status): the 20 retried calls OK (0); the first
        // call's Fails and the two Drops UNAVAILABLE (14), all with HTTP 200.
        let grpc = ["request_protocol=\"grpc\"", "response_code=\"200\""]
        let ok = try series("n1", "weft_requests_total", service: "grpc", grpc + ["grpc_response_status=\"0\""])
        let unavailable = try series("n1", "weft_requests_total", service: "grpc", grpc + ["grpc_response_status=\"14\""])
        #expect(ok >= 20 && unavailable == 3, "OK \(ok), UNAVAILABLE \(unavailable)")
    }

    @Test func timeoutsAnswer504() throws {
        let lab = try startLab()
        defer { lab.down() }
        let start = Date()
        let slow = try curl(lab, "http://198.19.1.22/sleep/3000")
        let took = Date().timeIntervalSince(start)
        #expect(slow.0 == 504, "\(slow)")
        #expect(took < 2.5, "request timeout 300ms took \(took)s")
        // backendRequest: each attempt gets 200 ms of a 1 s sleep.
        let backend = try curl(lab, "http://198.19.1.22/backend")
        // (It names the backend the last attempt went to.)
        #expect(backend.0 == 504 && backend.2.contains(":8080 did not answer within"), "\(backend)")
        let timeouts = try LabHarness.proxyStat("n1", "timeouts_total")
        let perService = try upstreamEvents("n1", "timeout", service: "slow")
        #expect(timeouts >= 2 && perService == timeouts, "per Service: the same timeouts (\(perService) of \(timeouts))")
    }

    @Test func nonHTTPBytesPassThroughAndServerFirstProtocolsWork() throws {
        let lab = try startLab()
        defer { lab.down() }
        // The banner server speaks first: nothing arrives from the client,
        // the detect timeout passes, and the bytes flow both ways.
        let out = try LabHarness.run(["lab", "exec", "client", "--", "python3", "-c", """
            import socket, time
            s = socket.create_connection(("198.19.1.30", 80), timeout=5)
            banner = s.recv(100)
            s.sendall(b"\\x00\\x01binary\\n")
            time.sleep(0.2)
            echo = s.recv(100)
            print(banner.decode().strip() + "|" + repr(echo))
            """])
        #expect(out.output.contains("hello from banner|b'\\x00\\x01binary\\n'"), "\(out.output)")
        #expect(try LabHarness.proxyStat("n1", "tcp_passthrough_total") >= 1)
    }

    /// HTTP/2 (h2c) streams that need no more than the HTTP/1.1 express
    /// path would do are answered by ExpressHTTP2Handler with no stream
    /// channel: the backend sees the same request and headers, bodies come
    /// back whole however the backend frames them (length, chunks with a
    /// trailer, close), many streams share a connection. Streams with a
    /// request body go to the full path, and so does a stream whose backend
    /// refuses the connection; both are still answered.
    @Test func http2ExpressPathAnswersPlainStreamsAndHandsOverTheRest() throws {
        let lab = try startLab()
        defer { lab.down() }
        let express = try LabHarness.proxyStat("n1", "express_requests_total"), handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        let out = try LabHarness.run(["lab", "exec", "client", "--", "python3", "-c", """
            import hashlib, json, os, subprocess, tempfile
            tmp = tempfile.mkdtemp()
            def h2(path, *extra, host="198.19.1.12"):
                head, body = os.path.join(tmp, "h"), os.path.join(tmp, "b")
                r = subprocess.run(["curl", "-sS", "-m", "10", "--http2-prior-knowledge", "-D", head, "-o", body,
                                    *extra, "http://%s%s" % (host, path)], capture_output=True, text=True)
                lines = open(head).read().splitlines() if os.path.exists(head) else []
                data = open(body, "rb").read() if os.path.exists(body) else b""
                for f in (head, body):
                    if os.path.exists(f): os.remove(f)
                return {"rc": r.returncode, "err": r.stderr[-300:], "status": lines[0] if lines else "",
                        "fields": [l.lower() for l in lines[1:] if l], "len": len(data),
                        "json": json.loads(data) if data[:1] == b"{" else None,
                        "exact": data == bytes(i % 251 for i in range(len(data)))}
            def body(name, size):
                path = os.path.join(tmp, name)
                with open(path, "wb") as f:
                    f.write(bytes(i % 251 for i in range(size)))
                return "@" + path, hashlib.sha256(bytes(i % 251 for i in range(size))).hexdigest()
            mid, mid_sum = body("mid", 60000)
            big, big_sum = body("big", 100000)
            out = {
                "plain": h2("/a?x=1", "-H", "cookie: a=1", "-H", "cookie: b=2", "-H", "x-extra: yes"),
                "single": h2("/s?y=2", "-H", "cookie: c=3", "-H", "x-extra: one", "-H", "user-agent: weft-test"),
                "head": h2("/h", "-I"),
                "bytes": h2("/bytes/300000"),
                "chunked": h2("/chunked/5"),
                "unframed": h2("/unframed"),
                "post": h2("/p", "-d", "hello"),
                "midpost": h2("/m", "--data-binary", mid),
                "bigpost": h2("/g", "--data-binary", big),
                "refused": h2("/r", host="198.19.1.23"),
            }
            load = subprocess.run(["h2load", "-n", "400", "-c", "2", "-m", "8", "http://198.19.1.12/load"],
                                  capture_output=True, text=True)
            out["load"] = [l for l in load.stdout.splitlines() if l.startswith("requests:") or l.startswith("status codes:")]
            out["sums"] = {"midpost": mid_sum, "bigpost": big_sum}
            print(json.dumps(out))
            """])
        let r = json(String(out.output.split(separator: "\n").last ?? ""))
        func get(_ name: String) -> [String: Any] { r[name] as? [String: Any] ?? [:] }
        func ok(_ name: String) -> Bool {
            let c = get(name)
            return c["rc"] as? Int == 0 && (c["status"] as? String)?.hasPrefix("HTTP/2 200") == true
        }
        for name in ["plain", "single", "head", "bytes", "chunked", "unframed", "post", "midpost", "bigpost"] {
            #expect(ok(name), "\(name): \(get(name)) \(out.output.suffix(500))")
        }
        let plain = get("plain")
        let seen = (plain["json"] as? [String: Any])?["headers"] as? [String: String] ?? [:]
        #expect(seen["host"] == "198.19.1.12" && seen["cookie"] == "a=1; b=2" && seen["x-extra"] == "yes", "\(seen)")
        #expect(seen["x-forwarded-for"] == "198.18.1.10" && seen["forwarded"] == "for=198.18.1.10;proto=http", "\(seen)")
        #expect(seen["via"] == "1.1 weft-n1" && seen["x-request-id"]?.count == 36, "\(seen)")
        #expect((plain["json"] as? [String: Any])?["path"] as? String == "/a?x=1", "\(plain)")
        #expect((plain["fields"] as? [String] ?? []).contains("x-pod: v2"), "\(plain)")
        // One cookie: the head is written in one pass (no joining).
        let single = get("single")
        let seenSingle = (single["json"] as? [String: Any])?["headers"] as? [String: String] ?? [:]
        #expect(seenSingle["host"] == "198.19.1.12" && seenSingle["cookie"] == "c=3" && seenSingle["x-extra"] == "one"
                && seenSingle["user-agent"] == "weft-test" && seenSingle["x-forwarded-for"] == "198.18.1.10"
                && seenSingle["via"] == "1.1 weft-n1" && seenSingle["x-request-id"]?.count == 36, "\(seenSingle)")
        #expect((single["json"] as? [String: Any])?["path"] as? String == "/s?y=2", "\(single)")
        let head = get("head")
        #expect((head["fields"] as? [String] ?? []).contains { $0.hasPrefix("content-length: ") }, "HEAD: \(head)")
        #expect(get("bytes")["len"] as? Int == 300_000 && get("bytes")["exact"] as? Bool == true, "\(get("bytes"))")
        let chunked = get("chunked")
        #expect((chunked["json"] as? [String: Any])?["path"] as? String == "/chunked/5", "\(chunked)")
        #expect((chunked["fields"] as? [String] ?? []).contains("x-done: yes"), "the chunked body's trailer: \(chunked)")
        #expect((get("unframed")["json"] as? [String: Any])?["path"] as? String == "/unframed", "\(get("unframed"))")
        #expect((get("post")["json"] as? [String: Any])?["body"] as? Int == 5, "\(get("post"))")
        // Bodies: 60 kB (several DATA frames) within the stream's first
        // window goes express; 100 kB does not fit and is handed over with
        // what came so far. Both arrive whole.
        let sums = r["sums"] as? [String: String] ?? [:]
        for name in ["midpost", "bigpost"] {
            let seen = get(name)["json"] as? [String: Any]
            #expect(seen?["body_sha256"] as? String == sums[name] && sums[name] != nil, "\(name): \(get(name))")
        }
        let refused = get("refused")
        #expect((refused["status"] as? String)?.hasPrefix("HTTP/2 503") == true, "\(refused)")
        let load = (r["load"] as? [String] ?? []).joined(separator: " ")
        #expect(load.contains("400 succeeded") && load.contains("400 2xx"), "\(load)")
        // Plain, head, bytes, chunked, unframed, the two smaller POSTs and
        // the load went express; the 100 kB POST and the refused stream
        // were handed over.
        #expect(try LabHarness.proxyStat("n1", "express_requests_total") - express >= 407, "express requests")
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers >= 2, "hand-overs")

        // The express path writes HTTP/2 fields into HTTP/1.1 bytes: a CR, LF
        // or NUL in a value, a bad name or a bad :path must never reach the
        // backend as a line of its own (request smuggling). Such a stream is
        // refused; the backend sees one request, the good one.
        func count() throws -> Int {
            json(try curl(lab, "http://198.18.1.21:8080/__count").2)["count"] as? Int ?? -1
        }
        let before = try count()
        let good = try lab.tool(in: "client", ["h2-request", "198.19.1.12", "80", "/fine", "x-ok=fine"])
        #expect(good["status"] as? String == "200" && (good["body"] as? String ?? "").contains("\"x-ok\": \"fine\""), "\(good)")
        let smuggled: [[String]] = [
            ["/s", "x-a=1\\r\\nx-injected: yes"], ["/s", "x-a=1\\nx-injected: yes"], ["/s", "x-a=1\\x00b"],
            ["/s", "X-Upper=1"], ["/s", "x-a b=1"], ["/s HTTP/1.1\\r\\nx-injected: yes\\r\\n\\r\\nGET /t", "x-ok=1"],
        ]
        for args in smuggled {
            let r = try lab.tool(in: "client", ["h2-request", "198.19.1.12", "80"] + args)
            #expect(r["status"] as? String != "200" && !(r["body"] as? String ?? "").contains("x-injected"), "\(args): \(r)")
            #expect(!(r["reset"] is NSNull) || !(r["goaway"] is NSNull) || (r["status"] as? String)?.hasPrefix("4") == true,
                    "\(args) was neither refused nor answered 4xx: \(r)")
        }
        #expect(try count() == before + 1, "the backend saw more than the one good request")

        // A body other than its content-length is refused with a reset
        // (PROTOCOL_ERROR), as NIO's own check would (off on these
        // connections): on the express path before anything goes to the
        // backend, and on a stream handed over (`te: trailers` sends it to
        // the full path) before the body does.
        let counted = try count()
        let fine = try lab.tool(in: "client", ["h2-body", "198.19.1.12", "80", "/cl", "2,3", "content-length=5"])
        #expect(fine["status"] as? String == "200", "\(fine)")
        let wrong: [(String, String)] = [("11", "5"), ("3", "5"), ("2,2", "5"), ("", "5"), ("4", "4, 5"), ("5", "+5x"), ("1", "-1")]
        for (chunks, length) in wrong {
            let r = try lab.tool(in: "client", ["h2-body", "198.19.1.12", "80", "/cl", chunks, "content-length=\(length)"])
            #expect(r["reset"] as? Int == 1 && r["status"] is NSNull, "body \(chunks), content-length \(length): \(r)")
        }
        #expect(try count() == counted + 1, "a body other than declared reached the backend")
        for chunks in ["11", "3", "2,4"] {
            let r = try lab.tool(in: "client", ["h2-body", "198.19.1.12", "80", "/cl", chunks, "content-length=5", "te=trailers"])
            #expect(r["reset"] as? Int == 1 && r["status"] is NSNull, "handed over, body \(chunks): \(r)")
        }
        let handed = try lab.tool(in: "client", ["h2-body", "198.19.1.12", "80", "/cl", "5", "content-length=5", "te=trailers"])
        #expect(handed["status"] as? String == "200", "handed over, as declared: \(handed)")
    }

    /// An HTTP/2 client that does not open its windows holds the express
    /// path's backend back (it stops reading it, so the body is not heaped
    /// up in the proxy), and gets every byte once it reads again. A drain
    /// sends GOAWAY at once, lets the stream in flight finish, and closes
    /// the connection as soon as it is answered, not at the drain timeout.
    @Test func http2ExpressPathHoldsBackForSlowReadersAndDrainsWithGoAway() throws {
        let lab = try startLab()
        defer { lab.down() }
        let express = try LabHarness.proxyStat("n1", "express_requests_total"), handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        let size = 64 << 20
        let window = try lab.tool(in: "client", ["h2-window", "198.19.1.12", "80", "/bytes/\(size)", "\(size)", "198.18.1.21", "8080"])
        let shut = window["shut"] as? [String: Any] ?? [:]
        // Held back: the client's 64 KiB window, and what the kernel's socket
        // buffers between the backend and the proxy hold (some MiB), not 64.
        #expect(window["status"] as? String == "200" && (shut["received"] as? Int ?? .max) <= 65_535, "\(window)")
        #expect((shut["sent"] as? Int ?? .max) < 20 << 20 && (shut["sent"] as? Int ?? 0) > 0, "the backend was not held back: \(window)")
        #expect(window["ended"] as? Bool == true && window["length"] as? Int == size && window["exact"] as? Bool == true, "\(window)")
        #expect(window["sent_total"] as? Int == size, "\(window)")
        #expect(try LabHarness.proxyStat("n1", "express_requests_total") - express >= 1, "not on the express path")
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") == handovers, "handed over")

        let inFlight = try lab.startTool(in: "client", ["h2-drain", "198.19.1.12", "80", "/sleep/2000"])
        usleep(500_000)
        let restart = try LabHarness.run(["lab", "restart-proxy", "n1"])
        #expect(restart.status == 0, "\(restart.output)\n\(LabHarness.agentLog("n1"))")
        let drained = try inFlight.finish()
        let goAway = drained["goaway"] as? [String: Any] ?? [:]
        let ended = drained["ended"] as? Double ?? .infinity, closed = drained["closed"] as? Double ?? .infinity
        #expect(goAway["last_stream_id"] as? Int == 1 && goAway["error_code"] as? Int == 0, "\(drained)")
        #expect((goAway["at"] as? Double ?? .infinity) < 1.9, "GOAWAY came only as the stream ended: \(drained)")
        #expect(drained["status"] as? String == "200" && (drained["body"] as? Int ?? 0) > 0 && drained["reset"] is NSNull, "\(drained)")
        #expect(ended >= 2 && closed >= ended && closed - ended < 2, "\(drained)")
    }

    /// A client that half-closes after its request and then reads slowly
    /// still gets every byte of the response before the proxy closes, on
    /// the express path and on the full path (NIO fails writes still queued
    /// when a channel closes: both paths once cut such responses short).
    /// An HTTP/2 client's FIN closes its connection once the streams it
    /// ended are answered; one it had not is reset.
    @Test func halfClosingSlowReadersGetWholeResponses() throws {
        let lab = try startLab()
        defer { lab.down() }
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        let out = try LabHarness.run(["lab", "exec", "client", "--", "python3", "-c", """
            import json, socket, threading, time
            results = {}
            def fetch(size, full):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.settimeout(20)
                s.connect(("198.19.1.12", 80))
                # A preset X-Forwarded-For is handed to the full path.
                extra = b"X-Forwarded-For: 198.18.1.99\\r\\n" if full else b""
                s.sendall(b"GET /bytes/%d HTTP/1.1\\r\\nHost: web-v2\\r\\n%s\\r\\n" % (size, extra))
                time.sleep(1.0)  # the proxy has the whole response by now
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while True:
                    d = s.recv(16384)
                    if not d:
                        break
                    got += d
                    time.sleep(0.001)
                head, _, body = bytes(got).partition(b"\\r\\n\\r\\n")
                ok = head.startswith(b"HTTP/1.1 200") and body == bytes(i % 251 for i in range(size))
                results["%s-%d" % ("full" if full else "express", size)] = {"ok": ok, "len": len(body)}
            threads = [threading.Thread(target=fetch, args=(size, full)) for size in (100000, 200000, 400000) for full in (False, True)]
            for t in threads: t.start()
            for t in threads: t.join()
            print(json.dumps(results))
            """])
        let results = json(String(out.output.split(separator: "\n").last ?? ""))
        #expect(results.count == 6, "\(out.output)")
        for (name, r) in results.sorted(by: { $0.key < $1.key }) {
            #expect((r as? [String: Any])?["ok"] as? Bool == true, "\(name): \(r)")
        }
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers >= 3, "the full path was not taken")
        // The full path's backend connections, paused for those slow readers
        // as their responses ended, went back to the pool: the next requests
        // on them get their answers (they once waited for ever).
        for k in 0..<8 {
            let next = try LabHarness.run(["lab", "exec", "client", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                           "-m", "5", "-H", "X-Forwarded-For: 198.18.1.99", "http://198.19.1.12/bytes/\(1000 + k)"])
            #expect(next.output == "200", "request \(k) after the slow readers: \(next.output)")
        }

        // HTTP/2: a client's FIN ends the connection once what is in flight
        // is answered (it was held open for good, one socket in CLOSE-WAIT
        // per h2load connection); a stream it had not ended is reset (CANCEL).
        let answered = try lab.tool(in: "client", ["h2-half-close", "198.19.1.12", "80", "/sleep/300", "1"])
        let ended = answered["ended"] as? Double ?? .infinity, closed = answered["closed"] as? Double ?? .infinity
        #expect(answered["status"] as? String == "200" && (answered["body"] as? Int ?? 0) > 0 && answered["reset"] is NSNull,
                "\(answered)")
        #expect(ended >= 0.3 && closed >= ended && closed - ended < 2, "not closed once answered: \(answered)")
        let cut = try lab.tool(in: "client", ["h2-half-close", "198.19.1.12", "80", "/sleep/300", "0"])
        #expect(cut["reset"] as? Int == 8 && cut["status"] is NSNull && (cut["closed"] as? Double ?? .infinity) < 2, "\(cut)")
    }

    /// A connection the proxy ends after a response (the client's
    /// `Connection: close`, a local answer, a 408) ends as RFC 9112
    /// (section 9.6) asks, on both paths: the proxy shuts its side once the
    /// response is out, then reads and drops what the client still sends
    /// until the client closes, or for 2 s. Closed at once, it reset a
    /// client still sending: one that sent more after the response got a
    /// reset (on both paths, until 2026-12-03). curl uploading a body that
    /// a local answer does not wait for reads the answer (it did before
    /// too: Linux hands a client the bytes ahead of a reset; a reset can
    /// still cost a client the answer where they arrive together); one that
    /// asked `Expect: 100-continue` gets it before sending any body.
    @Test func connectionsTheProxyEndsEndWithAStagedClose() throws {
        let lab = try startLab()
        defer { lab.down() }
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        for (name, extra) in [("express", [String]()), ("full", ["X-Forwarded-For: 198.18.1.99"])] {
            let r = try lab.tool(in: "client", ["h1-close-send", "198.19.1.12", "80", "/__count"] + extra)
            #expect((r["status"] as? String)?.hasPrefix("HTTP/1.1 200") == true && r["connection"] as? String == "close",
                    "\(name): \(r)")
            #expect(r["send_error"] is NSNull && r["end"] as? String == "eof", "\(name): a reset, not a staged close: \(r)")
        }
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers == 1, "the full path was not taken")
        // No ready backend: answered 503 at the head, 8 MB of body still
        // coming; curl reads the answer. With curl's Expect: 100-continue
        // the 503 comes before the 100 would: the body is never sent.
        let upload = try LabHarness.run(["lab", "exec", "client", "--", "sh", "-c",
                                         "head -c 8000000 /dev/zero | curl -sS -m 10 -o /dev/null -w '%{http_code}' "
                                         + "-H 'Connection: close' -H 'Expect:' --data-binary @- http://198.19.1.40/"])
        #expect(upload.status == 0 && upload.output == "503", "\(upload.status): \(upload.output)")
        let asked = try LabHarness.run(["lab", "exec", "client", "--", "sh", "-c",
                                        "head -c 8000000 /dev/zero | curl -sS -m 10 -o /dev/null -w '%{http_code} %{size_upload}' "
                                        + "--data-binary @- http://198.19.1.40/"])
        #expect(asked.status == 0 && asked.output == "503 0", "\(asked.status): \(asked.output)")
    }

    /// Clients that go away every way a client can (closed, reset, cut
    /// short, before or after their answers; HTTP/1.1, h2c, gRPC,
    /// WebSocket, opaque TCP) leave no connection behind in the proxy: it
    /// once held every h2c connection a client closed, in CLOSE-WAIT, for
    /// good.
    @Test func clientsThatGoAwayLeaveNoConnectionBehind() throws {
        let lab = try startLab()
        defer { lab.down() }
        let churn = try lab.tool(in: "client", ["churn", "198.19.1.11", "198.19.1.30"])
        #expect((churn["h1_kept_alive"] as? String)?.hasPrefix("HTTP/1.1 200") == true && churn["h2_answered"] as? String == "200",
                "\(churn)")
        #expect(churn["tcp_banner"] as? String == "hello from banner" && churn["tcp_echo"] as? String == "\u{0}\u{1}binary", "\(churn)")
        let grpc = try LabHarness.run(["lab", "exec", "client", "--", "/usr/bin/python3", LabHarness.grpcTool, "call", "198.19.1.60", "80"])
        #expect(grpc.status == 0, "\(grpc.output)")
        let ws = try lab.tool(in: "client", ["ws-echo", "198.19.1.11", "80", "bye"])
        #expect((ws["echoes"] as? [String])?.count == 3, "\(ws)")
        // The proxy's client-side sockets (its listener's port), whatever
        // their state, other than the listener: none once the clients are gone.
        var left: [Substring] = [], listening = false
        for _ in 0..<50 {
            let ss = try LabHarness.shell(raw: ["ip", "netns", "exec", "weft-n1", "ss", "-tanpH", "sport = :15001"])
            let held = ss.split(separator: "\n").filter { $0.contains("\"weft\"") }
            listening = held.contains { $0.hasPrefix("LISTEN") }
            left = held.filter { !$0.hasPrefix("LISTEN") }
            if listening && left.isEmpty { break }
            usleep(100_000)
        }
        #expect(listening, "the proxy's listener is not in ss's answer")
        #expect(left.isEmpty, "connections the proxy still holds:\n\(left.joined(separator: "\n"))")
    }

    /// MeshConfig `proxy.idleTimeout`: an HTTP connection with no request in
    /// flight closes that long after its last one, on the express path and
    /// the full path, HTTP/1.1 and HTTP/2 (GOAWAY first); a request that
    /// takes longer than the timeout is answered, not cut.
    @Test func idleConnectionsCloseAfterTheMeshConfigTimeout() throws {
        let lab = try startLab()
        defer { lab.down() }
        try applyMeshConfig(lab, spec: "{proxy: {idleTimeout: 1s}}")
        let closed = try LabHarness.proxyStat("n1", "idle_connections_closed_total")
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        // Concurrently: each waits about a second and a half.
        let runs: [(String, [String])] = [
            ("h1 express", ["h1-idle", "198.19.1.12", "80", "/idle"]),
            // (A preset X-Forwarded-For is handed to the full path.)
            ("h1 full", ["h1-idle", "198.19.1.12", "80", "/idle", "X-Forwarded-For: 198.18.1.99"]),
            ("h1 slow", ["h1-idle", "198.19.1.12", "80", "/sleep/2500"]),
            ("h2", ["h2-drain", "198.19.1.12", "80", "/idle"]),
            ("h2 slow", ["h2-drain", "198.19.1.12", "80", "/sleep/2500"]),
        ]
        let started = try runs.map { ($0.0, try lab.startTool(in: "client", $0.1)) }
        for (name, run) in started {
            let r = try run.finish()
            let h2 = name.hasPrefix("h2")
            let answered = (h2 ? r["ended"] : r["answered"]) as? Double ?? .infinity
            let end = r["closed"] as? Double ?? .infinity
            let ok = h2 ? r["status"] as? String == "200" && r["reset"] is NSNull : (r["status"] as? String)?.hasPrefix("HTTP/1.1 200") == true
            #expect(ok, "\(name): \(r)")
            if name.hasSuffix("slow") { #expect(answered >= 2.5, "\(name): \(r)") }
            // Between one and one and a quarter timeouts after the answer (and some slack for a busy machine).
            #expect(end - answered >= 0.95 && end - answered < 2.5, "\(name): closed \(end - answered) s after the answer: \(r)")
            if h2 {
                let goAway = r["goaway"] as? [String: Any] ?? [:]
                #expect(goAway["last_stream_id"] as? Int == 1 && goAway["error_code"] as? Int == 0, "\(name): \(r)")
            }
        }
        #expect(try LabHarness.proxyStat("n1", "idle_connections_closed_total") - closed == 5)
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers == 1, "the full path was not taken")
    }

    /// MeshConfig `proxy.streamIdleTimeout`, through the agent to the
    /// proxy: a backend that takes a request and says nothing for longer
    /// (l7server's /sleep) gets it answered 504 about a timeout after it
    /// went out, on the express path and the full path, HTTP/1.1 and h2c;
    /// one that answers within the timeout is not cut. (StreamIdleTests
    /// takes every way a request stalls apart on the proxy alone.)
    @Test func requestsOnWhichNothingMovesEndAfterTheMeshConfigTimeout() throws {
        let lab = try startLab()
        defer { lab.down() }
        try applyMeshConfig(lab, spec: "{proxy: {streamIdleTimeout: 1s, idleTimeout: 1s}}")
        let stalled = try LabHarness.proxyStat("n1", "stream_idle_timeouts_total")
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        let runs: [(String, [String])] = [
            ("h1 express", ["h1-idle", "198.19.1.12", "80", "/sleep/4000"]),
            ("h1 full", ["h1-idle", "198.19.1.12", "80", "/sleep/4000", "X-Forwarded-For: 198.18.1.99"]),
            ("h1 in time", ["h1-idle", "198.19.1.12", "80", "/sleep/600"]),
            ("h2", ["h2-drain", "198.19.1.12", "80", "/sleep/4000"]),
        ]
        let started = try runs.map { ($0.0, try lab.startTool(in: "client", $0.1)) }
        for (name, run) in started {
            let r = try run.finish()
            let h2 = name.hasPrefix("h2")
            let answered = (h2 ? r["ended"] : r["answered"]) as? Double ?? .infinity
            let status = h2 ? r["status"] as? String : (r["status"] as? String).map { String($0.dropFirst(9).prefix(3)) }
            if name.hasSuffix("in time") {
                #expect(status == "200" && answered >= 0.6, "\(name): \(r)")
                continue
            }
            #expect(status == "504", "\(name): \(r)")
            // Between one and one and a quarter timeouts after the request
            // went out (and some slack for a busy machine).
            #expect(answered >= 0.95 && answered < 2.5, "\(name): answered \(answered) s after the request: \(r)")
        }
        #expect(try LabHarness.proxyStat("n1", "stream_idle_timeouts_total") - stalled == 3)
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers == 1, "the full path was not taken")
    }

    /// MeshConfig `proxy.requestHeaderTimeout`: an HTTP/1.1 request head
    /// trickled a line at a time (so never idle) and not whole within the
    /// timeout is answered 408 and its connection closed, on the express
    /// path and on the full path (a connection handed to it by a first
    /// request; there also part of a head pipelined behind a request still
    /// being answered, timed from that answer); an HTTP/2 header block so late, trickled a byte at a time
    /// or in CONTINUATION frames each whole, gets GOAWAY (ENHANCE_YOUR_CALM,
    /// the last whole request's stream, the reason as debug data) and the
    /// close. Heads and blocks that end in time, bodies that take longer
    /// than the timeout, and an h2load run on busy connections are answered.
    /// The idle timeout is off here, so the sweeps run for the head timeout
    /// alone.
    @Test func slowRequestHeadsAreCutAfterTheMeshConfigTimeout() throws {
        let lab = try startLab()
        defer { lab.down() }
        try applyMeshConfig(lab, spec: "{proxy: {idleTimeout: 0s, requestHeaderTimeout: 1s}}")
        let timeouts = try LabHarness.proxyStat("n1", "request_header_timeouts_total")
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        // (A preset X-Forwarded-For hands a connection to the full path.)
        let full = "X-Forwarded-For: 198.18.1.99"
        let runs: [(String, [String])] = [
            ("express head", ["h1-slow", "198.19.1.12", "80", "/idle", "200", "head"]),
            ("full head", ["h1-slow", "198.19.1.12", "80", "/idle", "200", "head", full]),
            ("express head in time", ["h1-slow", "198.19.1.12", "80", "/idle", "150", "head:3"]),
            ("express slow body", ["h1-slow", "198.19.1.12", "80", "/idle", "250", "body:8"]),
            ("full slow body", ["h1-slow", "198.19.1.12", "80", "/idle", "250", "body:8", full]),
            // Part of a head pipelined behind a request still being answered,
            // and nothing more: its clock starts as that answer ends.
            ("full head behind", ["h1-behind", "198.19.1.12", "80", "/sleep/1500", full]),
            ("h2 head", ["h2-slow", "198.19.1.12", "80", "/idle", "200", "head"]),
            ("h2 continued head", ["h2-slow", "198.19.1.12", "80", "/idle", "200", "cont", "first"]),
            ("h2 head in time", ["h2-slow", "198.19.1.12", "80", "/idle", "100", "head:4"]),
            ("h2 continued head in time", ["h2-slow", "198.19.1.12", "80", "/idle", "100", "cont:5", "first"]),
        ]
        let started = try runs.map { ($0.0, try lab.startTool(in: "client", $0.1)) }
        // Busy HTTP/2 connections meanwhile (their reads cut header blocks
        // at any byte): none is sent away.
        let load = try LabHarness.run(["lab", "exec", "client", "--", "h2load", "-c", "2", "-m", "16", "-D", "3",
                                       "--rps", "400", "http://198.19.1.12/idle"])
        let requests = load.output.split(separator: "\n").first { $0.hasPrefix("requests:") } ?? ""
        #expect(load.status == 0 && requests.contains(" 0 failed, 0 errored"), "\(load.output.suffix(800))")
        for (name, run) in started {
            let r = try run.finish()
            if name == "full head behind" {
                let answered = r["answered"] as? Double ?? .infinity, closed = r["closed"] as? Double ?? .infinity
                #expect(r["statuses"] as? [String] == ["HTTP/1.1 200 OK", "HTTP/1.1 408 Request Timeout"], "\(name): \(r)")
                #expect(answered >= 1.5 && closed - answered >= 0.95 && closed - answered < 2.5, "\(name): \(r)")
                continue
            }
            let status = r["status"] as? String ?? ""
            let answered = r["answered"] as? Double ?? .infinity
            let cut = !name.hasSuffix("in time") && name.hasSuffix("head")
            if name.hasPrefix("h2") {
                if name.contains("continued") { #expect(r["first"] as? String == "200", "\(name): \(r)") }
                if cut {
                    expectHeadCutByGoAway(r, name, lastStream: name.contains("continued") ? 1 : 0)
                } else {
                    #expect(status == "200" && r["goaway"] is NSNull, "\(name): \(r)")
                }
                continue
            }
            if name.hasPrefix("full") { #expect(r["first"] as? String == "HTTP/1.1 200 OK", "\(name): \(r)") }
            if cut {
                #expect(status == "HTTP/1.1 408 Request Timeout", "\(name): \(r)")
                #expect((r["body"] as? String)?.contains("within 1s (MeshConfig spec.proxy.requestHeaderTimeout)") == true, "\(name): \(r)")
                // Between one and one and a quarter timeouts after the head began (and slack for a busy machine).
                #expect(answered >= 0.95 && answered < 2.5, "\(name): answered after \(answered) s: \(r)")
                #expect((r["closed"] as? Double).map { $0 >= answered } == true, "\(name): not closed after the 408: \(r)")
                #expect(r["sent"] as? Int ?? 0 >= 4, "\(name): the head was not trickled: \(r)")
            } else {
                #expect(status.hasPrefix("HTTP/1.1 200"), "\(name): \(r)")
                if name.hasSuffix("body") { #expect(answered >= 1.9, "\(name): answered before its body was sent: \(r)") }
            }
        }
        #expect(try LabHarness.proxyStat("n1", "request_header_timeouts_total") - timeouts == 5)
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers == 3, "the full path was not taken")
    }

    /// MeshConfig `proxy.maxRequestHeaderSize`: a request head over it is
    /// answered 431 with the reason and reaches no backend, on every path.
    /// HTTP/1.1 on the express path: whole or still coming (answered once
    /// the limit is read), then the connection ends cleanly (the client
    /// reads the answer and the end, no reset); on the full path a head
    /// up to twice the limit is read whole, answered, and the connection
    /// goes on, and one past that (a field, a request line of 100 KB, a
    /// head still coming) is answered 431 and the connection ends the
    /// same clean way, as after a head NIO cannot parse (400, with what it
    /// found wrong, in place of NIO's bare 400). HTTP/2: the
    /// stream gets 431, a body still coming is not waited for, and the
    /// connection goes on; a list over twice the limit ends it.
    @Test func requestHeadsOverTheMeshConfigLimitGet431() throws {
        let lab = try startLab()
        defer { lab.down() }
        try applyMeshConfig(lab, spec: "{proxy: {maxRequestHeaderSize: 8Ki}}")
        let refused = try LabHarness.proxyStat("n1", "request_heads_too_large_total")
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        let out = try LabHarness.run(["lab", "exec", "client", "--", "python3", "-c", """
            import json, socket
            def head(big, extra=b""):
                return b"GET /__count HTTP/1.1\\r\\nHost: web\\r\\n" + extra + b"x-big: " + b"a" * big + b"\\r\\n\\r\\n"
            def response(s, buf):
                while b"\\r\\n\\r\\n" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        return None, buf
                    buf += chunk
                end = buf.index(b"\\r\\n\\r\\n")
                lines = buf[:end].decode().split("\\r\\n")
                headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
                n = int(headers.get("content-length", "0"))
                while len(buf) < end + 4 + n:
                    buf += s.recv(65536)
                return {"status": lines[0], "headers": headers, "body": buf[end + 4:end + 4 + n].decode()}, buf[end + 4 + n:]
            def ending(s):
                try:
                    rest = s.recv(65536)
                    return "eof" if rest == b"" else "more: %r" % rest[:80]
                except ConnectionResetError:
                    return "reset"
                except socket.timeout:
                    return "open"
            def run(*requests):
                s = socket.create_connection(("198.19.1.12", 80), timeout=3)
                out, buf = {"responses": []}, b""
                for raw in requests:
                    s.sendall(raw)
                    r, buf = response(s, buf)
                    out["responses"].append(r)
                    if r is None or r["headers"].get("connection") == "close":
                        out["end"] = ending(s)
                        break
                return out
            full = b"X-Forwarded-For: 198.18.1.99\\r\\n"
            print(json.dumps({
                "express": run(head(9000)),
                "express unfinished": run(b"GET /__count HTTP/1.1\\r\\nHost: web\\r\\nx-big: " + b"a" * 9000),
                "express under": run(head(7000), head(10)),
                # (The first request hands the connection to the full path.)
                "full": run(head(10, full), head(9000, full), head(10, full)),
                # Heads the full path does not read whole (over twice the
                # limit): a field, one still coming, a request line (NIO's
                # decoder bounds no request line: HeadBytes does).
                "full field": run(head(10, full), head(20000, full)),
                "full unfinished": run(head(10, full), b"GET /__count HTTP/1.1\\r\\nHost: web\\r\\nx-big: " + b"a" * 17000),
                "full line": run(head(10, full), b"GET /" + b"a" * 100000 + b" HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n"),
                "full bad": run(head(10, full), b"GET /__count HTTP/1.1\\r\\nHost: web\\r\\nno colon here\\r\\n\\r\\n"),
            }))
            """])
        let h1 = json(String(out.output.split(separator: "\n").last ?? ""))
        #expect(h1.count == 8, "\(out.output)")
        let want: [String: [String]] = ["express": ["431"], "express unfinished": ["431"], "express under": ["200", "200"],
                                        "full": ["200", "431", "200"], "full field": ["200", "431"],
                                        "full unfinished": ["200", "431"], "full line": ["200", "431"],
                                        "full bad": ["200", "400"]]
        for (name, statuses) in want {
            let r = h1[name] as? [String: Any] ?? [:]
            let responses = r["responses"] as? [[String: Any]] ?? []
            #expect(responses.map { ($0["status"] as? String)?.split(separator: " ").dropFirst().first.map(String.init) } == statuses,
                    "\(name): \(r)")
            for response in responses where response["status"] as? String == "HTTP/1.1 431 Request Header Fields Too Large" {
                #expect(response["body"] as? String == "weft: the request head is larger than 8 KiB (MeshConfig spec.proxy.maxRequestHeaderSize)\n",
                        "\(name): \(r)")
            }
            for response in responses where response["status"] as? String == "HTTP/1.1 400 Bad Request" {
                #expect((response["body"] as? String)?.hasPrefix("weft: the request is not valid HTTP/1.1 (") == true,
                        "\(name): \(r)")
            }
            // A head that could not be read whole ends the connection after
            // the answer, cleanly (the proxy reads and drops what follows).
            if statuses.last != "200" && name != "full" {
                let headers = responses.last?["headers"] as? [String: String] ?? [:]
                #expect(headers["connection"] == "close" && r["end"] as? String == "eof", "\(name): \(r)")
            }
        }
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers == 5, "the full path was not taken")

        // HTTP/2, on one connection (frames by hand: curl holds itself to
        // the list size the proxy announces, twice the limit): 431 on the
        // stream, one whose body is still coming reset after it with
        // NO_ERROR; a small request after them is served (the decoder's
        // table is in step); a list over twice the limit ends the
        // connection.
        let h2 = try lab.tool(in: "client", ["h2-heads", "198.19.1.12", "80", "/__count", "9000", "9000:open", "0", "17000"])
        let requests = h2["requests"] as? [[String: Any]] ?? []
        #expect(requests.count == 4, "\(h2)")
        for r in requests.prefix(2) {
            #expect(r["status"] as? String == "431" && r["closed"] as? Bool == false, "\(r)")
            #expect(r["body"] as? String == "weft: the request head is larger than 8 KiB (MeshConfig spec.proxy.maxRequestHeaderSize)\n", "\(r)")
        }
        #expect(requests.first?["reset"] is NSNull && requests.dropFirst().first?["reset"] as? Int == 0, "\(requests)")
        #expect(requests.dropFirst(2).first?["status"] as? String == "200", "\(requests)")
        let last = requests.last ?? [:], goAway = last["goaway"] as? [String: Any] ?? [:]
        #expect(last["status"] is NSNull && last["closed"] as? Bool == true && goAway["last_stream_id"] as? Int == 5, "\(last)")
        #expect(try LabHarness.proxyStat("n1", "request_heads_too_large_total") - refused == 8)
    }

    /// MeshConfig `proxy.tcpKeepalive`: both sockets of an opaque stream
    /// (TCP passthrough, and a WebSocket after its Upgrade) probe a silent
    /// peer, and when the client's network is gone (its link down: no FIN,
    /// no RST ever reaches the proxy) the probes go unanswered and the
    /// proxy closes the streams, their connections to the servers too.
    /// Without keepalive the proxy held the TCP stream, and the server
    /// connection behind it, for good (both ESTAB 8 s after the cut).
    @Test func opaqueStreamsWhosePeerVanishedAreClosedByKeepalive() throws {
        let lab = try startLab()
        defer { lab.down() }
        try applyMeshConfig(lab, spec: "{proxy: {tcpKeepalive: {time: 1s, interval: 1s, probes: 2}}}")
        let tcp = try lab.startTool(in: "client", ["tcp-hold", "198.19.1.30", "80", "10"])
        let ws = try lab.startTool(in: "client", ["ws-echo", "198.19.1.12", "80", "hold", "10"])
        // The proxy's sockets to the client, the banner server and the web
        // pod (v2, on this node): with the keepalive timer, the two streams'.
        func sockets() throws -> (probed: [Substring], client: [Substring]) {
            let ss = try LabHarness.shell(raw: ["ip", "netns", "exec", "weft-n1", "ss", "-tanoH",
                                                "( dst 198.18.1.10 or dst 198.18.1.40 or dst 198.18.1.21 )"])
            let open = ss.split(separator: "\n").filter { $0.hasPrefix("ESTAB") }
            return (open.filter { $0.contains("timer:(keepalive") }, open.filter { $0.contains(" 198.18.1.10:") })
        }
        var held = try sockets()
        for _ in 0..<50 where held.probed.count < 4 {
            usleep(100_000)
            held = try sockets()
        }
        #expect(held.probed.count == 4 && held.client.count == 2,
                "two streams, both sockets of each with the keepalive timer:\n\(held.probed.joined(separator: "\n"))")
        let cut = try LabHarness.run(["lab", "exec", "client", "--", "ip", "link", "set", "weft0", "down"])
        #expect(cut.status == 0, "\(cut.output)")
        // 1 s of silence, then two probes 1 s apart: gone after about 3 s.
        let start = Date()
        for _ in 0..<80 where !(held.probed.isEmpty && held.client.isEmpty) {
            usleep(100_000)
            held = try sockets()
        }
        #expect(held.probed.isEmpty && held.client.isEmpty,
                "the proxy still holds, \(Date().timeIntervalSince(start)) s after the cut:\n\((held.probed + held.client).joined(separator: "\n"))")
        let t = try tcp.finish(), w = try ws.finish()
        #expect(t["banner"] as? String == "hello from banner" && t["open"] as? Bool == true, "\(t)")
        #expect((w["echoes"] as? [String])?.count == 3, "\(w)")
    }

    /// Plain HTTP/1.1 requests take the express path (bytes, no codec): the
    /// backend sees the proxy's headers, pipelined requests are answered in
    /// order, HEAD has no body, Connection: close closes. A chunked request
    /// body is handed to the full path, and still answered.
    /// HTTPRoute sessionPersistence through the real capture: a client's
    /// session cookie keeps it on one pod, on this node or the other one
    /// (through the mTLS tunnel), over HTTP/1.1 and h2c; then the route
    /// switches blue to green (weights 100/0 to 0/100): a client in a
    /// session stays on its blue pod, new ones go green. A Header session
    /// works the same way. The express paths carry all of it.
    @Test func sessionsKeepAClientOnItsPodAcrossNodesAndABlueGreenSwitch() throws {
        func sessions(blue: Int, green: Int) -> String {
            """
            \(service("shop", ip: "198.19.1.70", selector: "{app: web}"))
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: shop, namespace: \(ns)}
            spec:
              parentRefs: [{group: "", kind: Service, name: shop}]
              rules:
              - matches: [{path: {type: PathPrefix, value: /cart}}]
                backendRefs: [{name: web-v1, port: 80, weight: \(blue)}, {name: web-v2, port: 80, weight: \(green)}]
                sessionPersistence: {sessionName: cart, absoluteTimeout: 1h}
              - matches: [{path: {type: PathPrefix, value: /api}}]
                backendRefs: [{name: shop, port: 80}]
                sessionPersistence: {type: Header, sessionName: x-shop-session}
            """
        }
        let lab = try startLab(files: ["sessions.yaml": sessions(blue: 100, green: 0)])
        defer { lab.down() }
        // New sessions until one begins on n2's blue pod (each lands on
        // v1-a or v1-b); every session's 12 requests go to its first pod.
        // The express paths carry them: none is handed over.
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        var remote: String?
        for _ in 0..<24 where remote == nil {
            let run = try lab.load(in: "client", ["cookie", "http://198.19.1.70/cart/items", "12", "cart"])
            let pods = (run["pods"] as? [String: Int]) ?? [:]
            let setCookie = run["set_cookie"] as? String ?? ""
            #expect(pods.count == 1 && pods.values.first == 12 && ["v1-a", "v1-b"].contains(pods.keys.first ?? ""), "\(run)")
            #expect(setCookie.hasPrefix("cart=") && setCookie.hasSuffix("; Path=/cart; HttpOnly"), "\(run)")
            if pods.keys.first == "v1-b" { remote = setCookie.split(separator: ";").first.map(String.init) }
        }
        let jar = try #require(remote, "no session began on v1-b (n2) in 24")
        // The same session over h2c, and as HTTP/1.1 from curl.
        for _ in 0..<4 {
            let h2 = try lab.tool(in: "client", ["h2-request", "198.19.1.70", "80", "/cart/h2", "cookie=\(jar)"])
            #expect(h2["status"] as? String == "200" && h2["x-pod"] as? String == "v1-b" && h2["set-cookie"] == nil, "h2c: \(h2)")
        }
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") == handovers, "a session request left the express path")
        // Blue to green: the session stays on blue, new clients go green.
        let before = try lab.generations()
        try lab.write("sessions.yaml", sessions(blue: 0, green: 100))
        try lab.waitForGeneration(after: before)
        usleep(300_000)  // the proxy reloads its table after the agent's generation
        for _ in 0..<6 {
            let kept = try curl(lab, "http://198.19.1.70/cart/pay", ["-H", "cookie: theme=dark; \(jar)"])
            #expect(kept.0 == 200 && kept.1["x-pod"] == "v1-b" && kept.1["set-cookie"] == nil, "in a session: \(kept.1)")
            let new = try curl(lab, "http://198.19.1.70/cart/pay")
            #expect(new.0 == 200 && new.1["x-pod"] == "v2" && new.1["set-cookie"]?.hasPrefix("cart=") == true, "new: \(new.1)")
        }
        // A Header session: the answer names it, the client sends it back.
        let first = try curl(lab, "http://198.19.1.70/api/a", ["--http2-prior-knowledge"])
        let token = try #require(first.1["x-shop-session"], "\(first.1)")
        for _ in 0..<6 {
            let next = try curl(lab, "http://198.19.1.70/api/b", ["-H", "x-shop-session: \(token)"])
            #expect(next.0 == 200 && next.1["x-pod"] == first.1["x-pod"] && next.1["x-shop-session"] == nil, "\(next.1) after \(first.1)")
        }
    }

    @Test func expressPathForwardsPlainRequestsAndHandsOverTheRest() throws {
        let lab = try startLab()
        defer { lab.down() }
        let express = try LabHarness.proxyStat("n1", "express_requests_total"), handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        let out = try LabHarness.run(["lab", "exec", "client", "--", "python3", "-c", """
            import json, socket
            def read_all(raw):
                s = socket.create_connection(("198.19.1.12", 80), timeout=5)
                s.sendall(raw)
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return data
                    data += chunk
            def exchange(raw, methods):
                data = read_all(raw)
                out, i = [], 0
                for m in methods:
                    end = data.index(b"\\r\\n\\r\\n", i)
                    lines = data[i:end].decode().split("\\r\\n")
                    headers = {}
                    for l in lines[1:]:
                        k, v = l.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                    n = 0 if m == "HEAD" else int(headers.get("content-length", "0"))
                    body = data[end + 4:end + 4 + n]
                    i = end + 4 + n
                    out.append({"status": lines[0], "headers": headers, "body": json.loads(body) if body else None})
                return {"responses": out, "rest": len(data) - i}
            pipelined = exchange(b"GET /a?x=1 HTTP/1.1\\r\\nHost: web-v2\\r\\nConnection: keep-alive\\r\\n\\r\\n"
                                 b"POST /b HTTP/1.1\\r\\nHost: web-v2\\r\\nContent-Length: 5\\r\\n\\r\\nhello"
                                 b"HEAD /c HTTP/1.1\\r\\nHost: web-v2\\r\\n\\r\\n"
                                 b"GET /d HTTP/1.1\\r\\nHost: web-v2\\r\\nConnection: close\\r\\n\\r\\n",
                                 ["GET", "POST", "HEAD", "GET"])
            chunked = exchange(b"POST /e HTTP/1.1\\r\\nHost: web-v2\\r\\nTransfer-Encoding: chunked\\r\\nConnection: close\\r\\n\\r\\n"
                               b"5\\r\\nhello\\r\\n0\\r\\n\\r\\n", ["POST"])
            # Responses framed by chunks (with a trailer) and by the close.
            data = read_all(b"GET /chunked/5 HTTP/1.1\\r\\nHost: web-v2\\r\\n\\r\\nGET /unframed HTTP/1.1\\r\\nHost: web-v2\\r\\n\\r\\n")
            end = data.index(b"\\r\\n\\r\\n")
            first = data[:end].decode().lower()
            i, body = end + 4, b""
            while True:
                e = data.index(b"\\r\\n", i)
                size = int(data[i:e].split(b";")[0], 16)
                i = e + 2
                if size == 0:
                    t = data.index(b"\\r\\n\\r\\n", i - 2)
                    trailer = data[i:t].decode()
                    i = t + 4
                    break
                body += data[i:i + size]
                i += size + 2
            end = data.index(b"\\r\\n\\r\\n", i)
            second = data[i:end].decode().lower()
            framed = {"first": first, "first_body": json.loads(body), "trailer": trailer, "second": second,
                      "second_body": json.loads(data[end + 4:])}
            print(json.dumps({"pipelined": pipelined, "chunked": chunked, "framed": framed}))
            """])
        let result = json(String(out.output.split(separator: "\n").last ?? ""))
        let pipelined = try #require(result["pipelined"] as? [String: Any], "\(out.output)")
        let responses = try #require(pipelined["responses"] as? [[String: Any]])
        #expect(responses.count == 4 && pipelined["rest"] as? Int == 0, "\(pipelined)")
        let bodies = responses.map { $0["body"] as? [String: Any] ?? [:] }
        #expect(responses.allSatisfy { ($0["status"] as? String)?.hasPrefix("HTTP/1.1 200") == true }, "\(responses)")
        #expect(bodies[0]["path"] as? String == "/a?x=1" && bodies[1]["path"] as? String == "/b" && bodies[3]["path"] as? String == "/d",
                "answered in order: \(bodies)")
        #expect(bodies[1]["method"] as? String == "POST" && bodies[1]["body"] as? Int == 5, "\(bodies[1])")
        #expect(responses[2]["body"] is NSNull || responses[2]["body"] == nil, "HEAD: no body")
        let seen = bodies[0]["headers"] as? [String: String] ?? [:]
        #expect(seen["x-forwarded-for"] == "198.18.1.10" && seen["forwarded"] == "for=198.18.1.10;proto=http", "\(seen)")
        #expect(seen["via"] == "1.1 weft-n1" && seen["x-forwarded-proto"] == "http", "\(seen)")
        #expect(seen["x-request-id"]?.count == 36, "\(seen)")
        #expect(seen["traceparent"].map { $0.count == 55 && $0.hasPrefix("00-") } == true, "\(seen)")
        #expect(seen["connection"] == nil && seen["host"] == "web-v2", "hop-by-hop headers stay behind: \(seen)")
        let last = responses[3]["headers"] as? [String: String] ?? [:]
        #expect(last["connection"] == "close", "\(last)")
        let framed = try #require(result["framed"] as? [String: Any], "\(out.output)")
        #expect((framed["first"] as? String)?.contains("transfer-encoding: chunked") == true, "\(framed)")
        #expect((framed["first_body"] as? [String: Any])?["path"] as? String == "/chunked/5" && framed["trailer"] as? String == "x-done: yes",
                "a chunked response goes through whole, its trailer too: \(framed)")
        #expect((framed["second"] as? String)?.contains("connection: close") == true
                && (framed["second_body"] as? [String: Any])?["path"] as? String == "/unframed", "\(framed)")
        #expect(try LabHarness.proxyStat("n1", "express_requests_total") >= express + 6)

        let chunked = try #require(result["chunked"] as? [String: Any])
        let answer = (chunked["responses"] as? [[String: Any]])?.first
        let forwarded = answer?["body"] as? [String: Any] ?? [:]
        #expect((answer?["status"] as? String)?.hasPrefix("HTTP/1.1 200") == true && forwarded["path"] as? String == "/e"
                && (forwarded["headers"] as? [String: String])?["transfer-encoding"] == "chunked",
                "the full path forwarded the chunked body: \(chunked)")
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") == handovers + 1)

        // curl uploads over 1 MiB with Expect: 100-continue and waits up to
        // 1 s for the 100 before sending the body: the proxy says it at
        // once, and the backend gets the body whole, without the Expect.
        let upload = try LabHarness.run(["lab", "exec", "client", "--", "sh", "-c",
                                         "head -c 2097152 /dev/zero | curl -sS -m 5 -w '\\n%{http_code} %{time_total}' "
                                         + "--data-binary @- http://198.19.1.12/upload"]).output
        let tail = upload.split(separator: "\n").last?.split(separator: " ") ?? []
        let uploaded = json(String(upload.split(separator: "\n").dropLast().last ?? ""))
        #expect(tail.first == "200" && (Double(tail.last ?? "") ?? 9) < 0.8 && uploaded["body"] as? Int == 2_097_152
                && (uploaded["headers"] as? [String: String])?["expect"] == nil, "\(upload.suffix(600))")

        // With access logs on, express requests are logged as the full path logs them.
        try applyMeshConfig(lab, spec: "{accessLog: {enabled: true, namespaces: [\(ns)]}}")
        let before = try LabHarness.proxyStat("n1", "express_requests_total")
        let logged = try curl(lab, "http://198.19.1.12/logged?q=1", ["-A", "weft-test/1", "-H", "x-request-id: req-express"])
        let after = try LabHarness.proxyStat("n1", "express_requests_total")
        #expect(logged.0 == 200 && after == before + 1, "\(logged)")
        var line: [String: Any]?
        for _ in 0..<50 where line == nil {
            let text = (try? String(contentsOfFile: "/run/weft/n1/access.log", encoding: .utf8)) ?? ""
            line = text.split(separator: "\n").compactMap { json(String($0)) }.first { $0["request_id"] as? String == "req-express" }
            if line == nil { usleep(50_000) }
        }
        let entry = try #require(line, "no access log line for the express request")
        #expect(entry["method"] as? String == "GET" && entry["path"] as? String == "/logged?q=1" && entry["protocol"] as? String == "HTTP/1.1")
        #expect(entry["authority"] as? String == "198.19.1.12" && entry["user_agent"] as? String == "weft-test/1", "\(entry)")
        #expect(entry["response_code"] as? Int == 200 && entry["response_flags"] as? String == "-" && entry["attempts"] as? Int == 1, "\(entry)")
        #expect(entry["upstream_host"] as? String == "198.18.1.21:8080" && entry["source_workload"] as? String == "client", "\(entry)")
        #expect((entry["bytes_sent"] as? Int ?? 0) == logged.2.utf8.count && (entry["trace_id"] as? String)?.count == 32, "\(entry)")
    }

    /// An upgrade in place, as a package does it: a new file renamed over
    /// the running one (install(1) removes the old file first; the same to
    /// the running processes, which keep the old file, nameless). The old agent, its file gone, still
    /// restarts a crashed proxy (from its own build, which reads the table
    /// it writes); an agent restarted on the new build adopts the old build's
    /// proxy and says so in /status, `weft status` and
    /// `weft_proxy_other_build`; a rolling restart (SIGUSR2) replaces it.
    @Test func anUpgradeInPlaceKeepsServingAndStatusTellsWhichBuildTheProxyRuns() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-upgrade-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let installed = "\(dir)/weft"
        try FileManager.default.copyItem(atPath: LabHarness.weft, toPath: installed)
        let lab = try startLab(binary: installed)
        defer { lab.down() }
        let version = try LabHarness.execute(installed, ["--version"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(version.hasPrefix("weft ") && version.count > 5, "\(version)")

        func proxyBuild() throws -> (same: Bool?, pid: Int32?, version: String?) {
            let json = try LabHarness.agent("n1", "/status").json
            let proxy = json?["proxy"] as? [String: Any]
            return (proxy?["sameBuild"] as? Bool, (proxy?["pid"] as? Int).map(Int32.init), json?["version"] as? String)
        }
        /// Waits for the agent to publish `same` for a proxy other than `notPid`.
        func waitForBuild(_ same: Bool, notPid: Int32?) throws -> Int32? {
            var last = try proxyBuild()
            let until = Date().addingTimeInterval(10)
            while (last.same != same || last.pid == notPid) && Date() < until {
                usleep(100_000)
                last = try proxyBuild()
            }
            #expect(last.same == same && last.pid != notPid, "\(last)\n\(LabHarness.agentLog("n1"))")
            return last.pid
        }
        let first = try waitForBuild(true, notPid: nil)
        #expect(try proxyBuild().version.map { "weft \($0)" } == version)
        #expect(try curl(lab, "http://198.19.1.11/").0 == 200)

        // The upgrade: a new file renamed over the one every process runs.
        try FileManager.default.copyItem(atPath: LabHarness.weft, toPath: "\(dir)/.weft.new")
        #expect(rename("\(dir)/.weft.new", installed) == 0)

        // The proxy crashes: the old agent starts another from its own build.
        let crash = try LabHarness.execute(installed, ["lab", "restart-proxy", "n1", "--kill"])
        #expect(crash.status == 0, "\(crash.output)\n\(LabHarness.agentLog("n1"))")
        let restarted = try waitForBuild(true, notPid: first)
        #expect(LabHarness.agentLog("n1", lines: 200).contains("this agent's executable was replaced since it started"),
                "\(LabHarness.agentLog("n1"))")
        #expect(try curl(lab, "http://198.19.1.11/").0 == 200)

        // The agent restarts on the new build and adopts that proxy.
        let restart = try LabHarness.execute(installed, ["lab", "restart-agent", "n1"])
        #expect(restart.status == 0, "\(restart.output)")
        #expect(try waitForBuild(false, notPid: nil) == restarted)
        #expect(try LabHarness.agent("n1", "/metrics").text.contains("weft_proxy_other_build 1"))
        let shown = try LabHarness.execute(installed, ["status", "--node", "n1"])
        #expect(shown.output.contains("runs another build of weft than this agent"), "\(shown.output)")
        #expect(try curl(lab, "http://198.19.1.11/").0 == 200)

        // A rolling restart brings the proxy onto the agent's build.
        let roll = try LabHarness.execute(installed, ["lab", "restart-proxy", "n1"])
        #expect(roll.status == 0, "\(roll.output)\n\(LabHarness.agentLog("n1"))")
        _ = try waitForBuild(true, notPid: restarted)
        #expect(try LabHarness.agent("n1", "/metrics").text.contains("weft_proxy_other_build 0"))
        #expect(try curl(lab, "http://198.19.1.11/").0 == 200)
    }

    @Test func proxyRestartDrainsWithoutFailingARequestAndACrashFailsFast() throws {
        // Three event loops (the default on this 2-core VM is two), each
        // bound to one CPU (--proxy-pin-threads): every proxy the agent
        // starts, after a restart or a crash too, has them.
        let lab = try startLab(extra: ["--proxy-threads", "3", "--proxy-pin-threads"])
        defer { lab.down() }
        #expect(try proxyEventLoops() == 3)
        try expectLoopsPinned(3)
        try expectListenersInTurn(3)
        // One client alternating fresh and kept-alive connections, and two
        // opening fresh ones back to back, so that connections are being
        // accepted, set up and sent their first request as each drain
        // begins, and one switching each fresh connection to HTTP/2 by the
        // h2c Upgrade (curl --http2); three rolling restarts.
        let loads = try [["http-steady", "198.19.1.11", "80", "6"], ["http-steady", "198.19.1.11", "80", "6", "fresh"],
                         ["http-steady", "198.19.1.11", "80", "6", "fresh"],
                         ["http-steady", "198.19.1.11", "80", "6", "upgrade"]].map { try lab.startTool(in: "client", $0) }
        var restart = (status: Int32(0), output: "")
        for _ in 0..<3 {
            usleep(1_200_000)
            restart = try LabHarness.run(["lab", "restart-proxy", "n1"])
            #expect(restart.status == 0, "\(restart.output)\n\(LabHarness.agentLog("n1"))")
        }
        for (i, load) in loads.enumerated() {
            let result = try load.finish()
            #expect((result["failures"] as? [Any])?.isEmpty == true, "\(result)")
            #expect((result["ok"] as? Int ?? 0) > 50, "\(result)")
            // (A draining proxy declines the upgrade and answers over HTTP/1.1.)
            if i == 3 { #expect((result["upgraded"] as? Int ?? 0) > 50, "\(result)") }
        }
        // Once the old proxy has gone, the new one still answers on the
        // status socket (the old one's exit must not remove the path).
        let pids = restart.output.split(whereSeparator: { !$0.isNumber }).compactMap { Int32($0) }
        let drained = try #require(pids.count >= 2 ? (old: pids[pids.count - 2], new: pids[pids.count - 1]) : nil, "\(restart.output)")
        let exited = "pid=\(drained.old) [WeftAgent] drained proxy exited"
        let waitUntil = Date().addingTimeInterval(10)
        while !LabHarness.agentLog("n1", lines: 200).contains(exited) && Date() < waitUntil { usleep(50_000) }
        #expect(LabHarness.agentLog("n1", lines: 200).contains(exited), "\(LabHarness.agentLog("n1"))")
        let generation = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/proxy.sock", "http://proxy/generation"])
        #expect(generation.split(separator: " ").last.flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) } == drained.new,
                "\(generation)")

        // A crash: the agent starts a new proxy.
        let crash = try LabHarness.run(["lab", "restart-proxy", "n1", "--kill"])
        #expect(crash.status == 0, "\(crash.output)\n\(LabHarness.agentLog("n1"))")
        #expect(try curl(lab, "http://198.19.1.11/").0 == 200)
        #expect(try proxyEventLoops() == 3)
        try expectLoopsPinned(3)
        try expectListenersInTurn(3)
        let status = try LabHarness.run(["status", "--node", "n1"])
        #expect(status.output.contains("restarts 1,"), "\(status.output)")

        // While no proxy runs, captured connects are refused at once, not
        // left hanging: freeze the agent so it cannot restart one, kill the proxy.
        let state = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "/run/weft/lab/state.json"))) as? [String: Any]
        let nodes = state?["nodes"] as? [[String: Any]] ?? []
        let agentPid: Int? = nodes.first { $0["name"] as? String == "n1" }?["agentPid"] as? Int
        let agent = Int32(try #require(agentPid))
        let proxyPid = try #require(Int32(try String(contentsOfFile: "/run/weft/n1/proxy.pid", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)))
        kill(agent, SIGSTOP)
        kill(proxyPid, SIGKILL)
        usleep(100_000)
        let refused = try lab.tool(in: "client", ["refused", "198.19.1.11", "80"])
        kill(agent, SIGCONT)
        #expect(refused["result"] as? String == "ECONNREFUSED", "\(refused)")
        #expect((refused["ms"] as? Double ?? 1e9) < 500, "\(refused)")
        var back = false
        for _ in 0..<100 where !back {
            back = (try? curl(lab, "http://198.19.1.11/").0) == 200
            if !back { usleep(50_000) }
        }
        #expect(back, "no proxy came back: \(LabHarness.agentLog("n1"))")

        // An agent restart adopts the running proxy instead of starting another.
        let pidBefore = try String(contentsOfFile: "/run/weft/n1/proxy.pid", encoding: .utf8)
        let restartAgent = try LabHarness.run(["lab", "restart-agent", "n1"])
        #expect(restartAgent.status == 0, "\(restartAgent.output)")
        #expect(try String(contentsOfFile: "/run/weft/n1/proxy.pid", encoding: .utf8) == pidBefore)
        #expect(LabHarness.agentLog("n1").contains("adopted running proxy"))
        #expect(try curl(lab, "http://198.19.1.11/").0 == 200)

        // Connections made before a drain that send their request only once
        // the drain has begun (within the detection timeout), HTTP/1.1 and
        // h2c: answered, told the connection closes (Connection: close, a
        // GOAWAY), and closed, not kept until the drain times out (10 s).
        // And a kept-alive HTTP/1.1 connection, idle when the drain begins,
        // whose next request is on its way: answered, not closed under it.
        // And a client that ignores `Connection: close` and holds its
        // socket: the drain's staged close takes what it still sends while
        // lingering, closes at the linger's end (a later send is reset),
        // and does not keep the proxy until the drain times out.
        let protos = ["h1", "h2", "h1-kept", "h1-hold"]
        let files = (ready: protos.map { "/tmp/weft-drain-\(getpid())-\($0)-ready" }, go: "/tmp/weft-drain-\(getpid())-go")
        defer { for f in files.ready + [files.go] { try? FileManager.default.removeItem(atPath: f) } }
        let late = try zip(protos, files.ready).map { proto, ready in
            try lab.startTool(in: "client", ["late-request", proto, "198.19.1.11", "80", ready, files.go])
        }
        for _ in 0..<400 where !files.ready.allSatisfy({ FileManager.default.fileExists(atPath: $0) }) { usleep(5_000) }
        #expect(files.ready.allSatisfy { FileManager.default.fileExists(atPath: $0) }, "a late client never connected")
        let current = try #require(Int32(try String(contentsOfFile: "/run/weft/n1/proxy.pid", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)))
        func drainTimeouts() -> Int { LabHarness.agentLog("n1", lines: .max).components(separatedBy: "drain timeout").count - 1 }
        let timeoutsBefore = drainTimeouts()
        kill(current, SIGTERM)
        usleep(100_000)
        _ = FileManager.default.createFile(atPath: files.go, contents: nil)
        let h1 = try late[0].finish(), h2 = try late[1].finish(), kept = try late[2].finish(), held = try late[3].finish()
        #expect(h1["status"] as? Int == 200 && h1["connection"] as? String == "close" && h1["closed"] as? Bool == true, "\(h1)")
        #expect(kept["status"] as? Int == 200 && kept["connection"] as? String == "close" && kept["closed"] as? Bool == true, "\(kept)")
        #expect(h2["status"] as? Int == 200 && h2["goaway"] is [String: Any] && h2["closed"] as? Bool == true
                && (h2["closed_at"] as? Double ?? 99) < 5, "\(h2)")
        #expect(held["status"] as? Int == 200 && held["connection"] as? String == "close" && held["eof"] as? Bool == true
                && (held["during"] as? [Any])?.allSatisfy({ $0 is NSNull }) == true && (held["during"] as? [Any])?.count == 2
                && held["after"] as? String == "reset", "\(held)")
        for _ in 0..<240 where kill(current, 0) == 0 { usleep(50_000) }
        #expect(kill(current, 0) != 0, "the drained proxy has not exited")
        #expect(drainTimeouts() == timeoutsBefore, "\(LabHarness.agentLog("n1"))")
    }
}

/// The node proxy's event loops are bound one per CPU, in order, of the
/// CPUs its process may use (its main thread's set), round again after
/// the last.
private func expectLoopsPinned(_ count: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let pid = try String(contentsOfFile: "/run/weft/n1/proxy.pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
    func cpus(_ task: String) throws -> [Int] {
        let status = try String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") })
        return line.dropFirst("Cpus_allowed_list:".count).trimmingCharacters(in: .whitespaces).split(separator: ",").flatMap { part in
            let ends = part.split(separator: "-").compactMap { Int($0) }
            return ends.count == 2 ? Array(ends[0]...ends[1]) : ends
        }
    }
    let allowed = try cpus(pid)
    var loops: [(Int, [Int])] = []
    for task in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") {
        let comm = ((try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8)) ?? "")
            .trimmingCharacters(in: .whitespacesAndNewlines)
        // NIO names its loop threads NIO-ELT-<group>-#<n>, n from 1 in loop order.
        guard comm.hasPrefix("NIO-ELT-"), let n = comm.split(separator: "#").last.flatMap({ Int($0) }) else { continue }
        loops.append((n, try cpus(task)))
    }
    loops.sort { $0.0 < $1.0 }
    #expect(loops.count == count, sourceLocation: sourceLocation)
    #expect(loops.map(\.1) == (0..<count).map { [allowed[$0 % allowed.count]] }, "allowed \(allowed)", sourceLocation: sourceLocation)
}

/// n1's running proxy listens once per event loop, on the capture port
/// and on the tunnel port, and weft_listen_pick deals new connections out
/// over each port's listeners in turn. (The tunnel listeners open with the
/// first identities the agent writes: waited for, up to 5 s.)
private func expectListenersInTurn(_ count: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
    var stats = ""
    let expected = ["weft_proxy_listeners \(count)\n", "weft_proxy_listeners_in_turn 1\n",
                    "weft_proxy_tunnel_listeners \(count)\n", "weft_proxy_tunnel_listeners_in_turn 1\n"]
    for _ in 0..<100 {
        stats = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/proxy.sock", "http://proxy/stats"])
        if expected.allSatisfy(stats.contains) { break }
        usleep(50_000)
    }
    for line in expected {
        #expect(stats.contains(line), "\(stats)", sourceLocation: sourceLocation)
    }
}

/// The event loop threads of n1's running proxy (SwiftNIO names them NIO-ELT-*).
private func proxyEventLoops() throws -> Int {
    let pid = try String(contentsOfFile: "/run/weft/n1/proxy.pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
    let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")
    return tasks.filter { task in
        ((try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8)) ?? "").hasPrefix("NIO-ELT-")
    }.count
}

@Suite struct HTTPRouteValidationTests {
    /// A change that leaves the proxy's route table as it was (here a
    /// NetworkPolicy: the proxy asks the kernel's maps) moves the proxy to
    /// the new generation without the table being written and read again
    /// whole (ProxyTable.generationFileName), and the proxy's policy
    /// verdicts, cached per generation, follow it both ways.
    @Test func aChangeOutsideTheRouteTableMovesTheProxyWithoutRewritingIt() throws {
        let lab = try LabHarness(files: ["services.yaml": service("web", ip: "198.19.1.10", selector: "{app: web}"),
                                         "pods.yaml": [pods.components(separatedBy: "\n---\n")[0],
                                                       pod("v1-a", node: "n1", address: "198.18.1.20", labels: "{app: web, version: v1}")]
                                            .joined(separator: "\n---\n")])
        defer { lab.down() }
        var ok = false
        for _ in 0..<100 where !ok {
            ok = (try? curl(lab, "http://198.19.1.10/").0) == 200
            if !ok { usleep(50_000) }
        }
        try #require(ok, "the Service never answered")
        func inode() throws -> Int {
            try FileManager.default.attributesOfItem(atPath: "/run/weft/n1/proxy-table.json")[.systemFileNumber] as? Int ?? -1
        }
        func inForce(_ comment: Comment) throws {
            let agent = try lab.generations(["n1"])["n1"] ?? -1
            for _ in 0..<100 {
                let text = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/proxy.sock", "http://proxy/generation"])
                if let g = Int(text.split(separator: " ").first ?? ""), g >= agent { return }
                usleep(10_000)
            }
            Issue.record("\(comment): the proxy never reached generation \(agent)")
        }
        let table = try inode()
        let deny = """
            apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: web-closed, namespace: \(ns)}
            spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress]}
            """
        var before = try lab.generations(["n1"])
        try lab.write("policy.yaml", deny)
        try lab.waitForGeneration(after: before)
        try inForce("after the policy")
        let denied = try curl(lab, "http://198.19.1.10/")
        #expect(denied.0 != 200, "the policy in force denies the pod: \(denied)")
        #expect(try inode() == table, "the route table was rewritten for a change outside it")
        let generationFile = try String(contentsOfFile: "/run/weft/n1/proxy-generation", encoding: .utf8)
        #expect(Int(generationFile.trimmingCharacters(in: .whitespacesAndNewlines)) == (try lab.generations(["n1"])["n1"]))
        before = try lab.generations(["n1"])
        try lab.write("policy.yaml", "# open again\n")
        try lab.waitForGeneration(after: before)
        try inForce("after the policy left")
        #expect(try curl(lab, "http://198.19.1.10/").0 == 200)
    }

    @Test func badRoutesAreRefusedWithFileDocumentAndField() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-routes-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let svc = service("web", ip: "198.19.1.10", selector: "{app: web}")
        let cases: [(String, String)] = [
            ("parentRefs: [{kind: Service, group: \"\", name: missing}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]",
             "spec.parentRefs[0].name: no Service l7/missing"),
            ("parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{backendRefs: [{name: web, port: 80, weight: -1}]}]",
             "spec.rules[0].backendRefs[0].weight"),
            ("parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{matches: [{path: {type: RegularExpression, value: \"/(\"}}], backendRefs: [{name: web, port: 80}]}]",
             "spec.rules[0].matches[0].path.value: not a valid regular expression"),
            ("parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{backendRefs: [{name: web, port: 81}]}]",
             "spec.rules[0].backendRefs[0].port"),
            ("parentRefs: [{kind: Gateway, name: gw}]", "spec.parentRefs[0].kind"),
            ("parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{timeouts: {request: 5x}}]",
             "spec.rules[0].timeouts.request"),
        ]
        for (spec, expected) in cases {
            let file = dir.appendingPathComponent("route.yaml").path
            try (svc + "\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: \(ns)}\nspec:\n  " + spec + "\n")
                .write(toFile: file, atomically: true, encoding: .utf8)
            let r = try LabHarness.run(["validate", "-f", file])
            #expect(r.status != 0, "accepted: \(spec)")
            #expect(r.output.contains("route.yaml:2:\(expected)") || r.output.contains("route.yaml:2: \(expected)")
                    || (r.output.contains("route.yaml:2") && r.output.contains(expected)), "\(expected) not in \(r.output)")
        }
    }
}
