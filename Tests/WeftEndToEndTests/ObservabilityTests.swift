import Foundation
import Testing

// The proxy's telemetry end to end: a known mix of requests and a TCP
// connection from lab pods, then the agent's /metrics (parsed by
// prometheus_client's reference parser), the access log and the headers the
// backend saw must account for exactly those.

private let ns = "obs"

private let files: [String: String] = [
    "pods.yaml": """
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: client, namespace: obs, labels: {app: client}, annotations: {lab.weft.dev/command: "sleep infinity"}}
        spec: {serviceAccount: client, node: n1, address: 198.18.1.10}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: other, namespace: quiet, labels: {app: other}, annotations: {lab.weft.dev/command: "sleep infinity"}}
        spec: {node: n1, address: 198.18.1.11}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: web, namespace: obs, labels: {app: web}, annotations: {lab.weft.dev/command: "python3 \(LabHarness.l7Server) 8080"}}
        spec: {serviceAccount: web, node: n1, address: 198.18.1.20, ports: [{name: http, port: 8080}]}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: banner, namespace: obs, labels: {app: banner}, annotations: {lab.weft.dev/command: "python3 \(LabHarness.l7Server) 8080 --tcp-banner"}}
        spec: {node: n1, address: 198.18.1.40, ports: [{name: http, port: 8080}]}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: collector, namespace: tracing, annotations: {lab.weft.dev/command: "python3 \(LabHarness.otlpCollector) 4318"}}
        spec: {node: n1, address: 198.18.1.50}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: dns, namespace: obs, labels: {app: dns}, annotations: {lab.weft.dev/command: "python3 \(LabHarness.tool) udp-name 5353"}}
        spec: {node: n1, address: 198.18.1.60, ports: [{name: dns, port: 5353, protocol: UDP}]}
        """,
    "services.yaml": """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: obs}
        spec: {clusterIP: 198.19.8.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: nobody, namespace: obs}
        spec: {clusterIP: 198.19.8.11, selector: {app: nobody}, ports: [{name: http, port: 80, targetPort: http}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: banner, namespace: obs}
        spec: {clusterIP: 198.19.8.12, selector: {app: banner}, ports: [{name: http, port: 80, targetPort: http}]}
        ---
        # Kernel-only (no HTTP declared): balanced at connect(), counted by the kernel.
        apiVersion: v1
        kind: Service
        metadata: {name: plain, namespace: obs}
        spec: {clusterIP: 198.19.8.20, selector: {app: web}, ports: [{name: tcp, port: 9000, targetPort: http}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: ghost, namespace: obs}
        spec: {clusterIP: 198.19.8.21, selector: {app: ghost}, ports: [{name: tcp, port: 9000, targetPort: 9000}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: dns, namespace: obs}
        spec: {clusterIP: 198.19.8.30, selector: {app: dns}, ports: [{name: dns, port: 53, targetPort: dns, protocol: UDP}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: mute, namespace: obs}
        spec: {clusterIP: 198.19.8.31, selector: {app: ghost}, ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP}]}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: web, namespace: obs}
        spec:
          parentRefs: [{kind: Service, group: "", name: web}]
          rules:
          - name: api
            matches: [{path: {type: PathPrefix, value: /api}}]
            filters:
            - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
            backendRefs: [{name: web, port: 80}]
        """,
    "mesh.yaml": """
        apiVersion: weft.dev/v1alpha1
        kind: MeshConfig
        metadata: {name: mesh}
        spec:
          accessLog: {enabled: true, namespaces: [obs]}
          telemetry: {tracing: {otlpEndpoint: "http://198.18.1.50:4318", samplingPercent: 100}}
        """,
]

/// Samples of the agent's /metrics, through the reference parser.
private struct Scrape {
    var samples: [(name: String, labels: [String: String], value: Double)] = []
    var families: [String: String] = [:]

    var contentType = ""

    init(openMetrics: Bool = false) throws {
        let accept = openMetrics ? "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5" : "text/plain"
        let response = try LabHarness.shell(raw: ["curl", "-s", "-i", "-H", "Accept: \(accept)", "--unix-socket", "/run/weft/n1/agent.sock",
                                                  "http://agent/metrics"])
        let split = response.range(of: "\r\n\r\n")
        let text = split.map { String(response[$0.upperBound...]) } ?? ""
        for line in response[..<(split?.lowerBound ?? response.startIndex)].split(separator: "\r\n")
        where line.lowercased().hasPrefix("content-type:") {
            contentType = line.dropFirst("content-type:".count).trimmingCharacters(in: .whitespaces)
        }
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("weft-scrape-\(UUID().uuidString.prefix(8)).txt").path
        try text.write(toFile: tmp, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let parsed = try LabHarness.shell(raw: ["sh", "-c", "/usr/bin/python3 \(LabHarness.promParse)\(openMetrics ? " --openmetrics" : "") < \(tmp)"])
        guard let line = parsed.split(separator: "\n").last,
              let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
              let raw = json["samples"] as? [[Any]] else {
            throw HarnessError("the reference parser refused /metrics: \(parsed.suffix(500))\n\(text.prefix(3000))")
        }
        for s in raw {
            guard s.count == 3, let name = s[0] as? String, let labels = s[1] as? [String: String],
                  let value = (s[2] as? NSNumber)?.doubleValue else { continue }
            samples.append((name, labels, value))
        }
        families = json["families"] as? [String: String] ?? [:]
    }

    /// Sum of `name` over samples whose labels include `match`.
    func sum(_ name: String, _ match: [String: String]) -> Double {
        samples.filter { sample in sample.name == name && match.allSatisfy { sample.labels[$0.key] == $0.value } }
            .reduce(0) { $0 + $1.value }
    }
}

private func curl(_ pod: String, _ url: String, _ extra: [String] = []) throws -> (Int, String) {
    let r = try LabHarness.run(["lab", "exec", pod, "--", "curl", "-sS", "-m", "5", "-o", "/dev/stdout", "-w", "\n%{http_code}", url] + extra)
    let code = Int(r.output.split(separator: "\n").last ?? "") ?? 0
    return (code, String(r.output.split(separator: "\n").dropLast().joined(separator: "\n")))
}

/// `count` requests in one curl (one connection, keep-alive); their codes.
private func curlMany(_ pod: String, _ url: String, count: Int) throws -> [Int] {
    let list = FileManager.default.temporaryDirectory.appendingPathComponent("weft-urls-\(UUID().uuidString.prefix(8))").path
    try String(repeating: "url = \"\(url)\"\noutput = \"/dev/null\"\n", count: count).write(toFile: list, atomically: true, encoding: .utf8)
    defer { try? FileManager.default.removeItem(atPath: list) }
    let r = try LabHarness.run(["lab", "exec", pod, "--", "curl", "-s", "-m", "10", "-w", "%{http_code}\n", "-K", list])
    return r.output.split(separator: "\n").compactMap { Int($0) }
}

private func accessLog() -> [[String: Any]] {
    let text = (try? String(contentsOfFile: "/run/weft/n1/access.log", encoding: .utf8)) ?? ""
    return text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
}

@Suite(.serialized, .enabled(if: LabHarness.canRun, LabHarness.skipReason))
struct ObservabilityTests {
    @Test func requestsConnectionsAndTracesAreCountedLoggedAndPropagatedExactly() throws {
        let lab = try LabHarness(files: files, nodes: 1)
        defer { lab.down() }
        for address in ["198.18.1.20", "198.18.1.40", "198.18.1.50"] {
            var ok = false
            for _ in 0..<200 {
                // A connect is enough (the banner server does not speak HTTP).
                if let r = try? LabHarness.run(["lab", "exec", "obs/client", "--", "python3", "-c",
                                                "import socket; socket.create_connection(('\(address)', \(address.hasSuffix(".50") ? 4318 : 8080)), timeout=1)"]),
                   r.status == 0 { ok = true; break }
                usleep(50_000)
            }
            try #require(ok, "backend \(address) never answered")
        }

        // The known mix, from obs/client (logged) and quiet/other (not logged).
        #expect(try curlMany("obs/client", "http://198.19.8.10/api/ok", count: 20) == Array(repeating: 200, count: 20))
        #expect(try curlMany("obs/client", "http://198.19.8.10/api/status/503", count: 7) == Array(repeating: 503, count: 7))
        #expect(try curlMany("obs/client", "http://198.19.8.10/other", count: 5) == Array(repeating: 404, count: 5))
        #expect(try curlMany("obs/client", "http://198.19.8.11/", count: 4) == Array(repeating: 503, count: 4))
        #expect(try curlMany("quiet/other", "http://198.19.8.10/api/ok", count: 3) == Array(repeating: 200, count: 3))

        // Trace context: an incoming traceparent keeps its trace id and gets
        // a new span id; without one the proxy starts a trace.
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736", parent = "00f067aa0ba902b7"
        let (c1, b1) = try curl("obs/client", "http://198.19.8.10/api/traced", [
            "-H", "traceparent: 00-\(trace)-\(parent)-01", "-H", "tracestate: vendor=1", "-H", "x-request-id: req-traced"])
        #expect(c1 == 200)
        let seen1 = (try? JSONSerialization.jsonObject(with: Data(b1.utf8)) as? [String: Any])?["headers"] as? [String: String] ?? [:]
        let tp1 = (seen1["traceparent"] ?? "").split(separator: "-").map(String.init)
        #expect(tp1.count == 4 && tp1[0] == "00" && tp1[1] == trace && tp1[2] != parent && tp1[2].count == 16 && tp1[3] == "01",
                "\(seen1)")
        #expect(seen1["tracestate"] == "vendor=1", "\(seen1)")
        let (c2, b2) = try curl("obs/client", "http://198.19.8.10/api/untraced", ["-H", "x-request-id: req-untraced"])
        #expect(c2 == 200)
        let seen2 = (try? JSONSerialization.jsonObject(with: Data(b2.utf8)) as? [String: Any])?["headers"] as? [String: String] ?? [:]
        let tp2 = (seen2["traceparent"] ?? "").split(separator: "-").map(String.init)
        #expect(tp2.count == 4 && tp2[1].count == 32 && tp2[2].count == 16 && tp2[1] != trace, "\(seen2)")
        // The h2c Upgrade while tracing is on (the express paths stand
        // aside): stream 1 takes the full path, with its trace context.
        let (c4, b4) = try curl("obs/client", "http://198.19.8.10/api/upgraded", ["--http2", "-H", "x-request-id: req-upgraded"])
        #expect(c4 == 200)
        let seen4 = (try? JSONSerialization.jsonObject(with: Data(b4.utf8)) as? [String: Any])?["headers"] as? [String: String] ?? [:]
        #expect((seen4["traceparent"] ?? "").split(separator: "-").count == 4 && seen4["upgrade"] == nil, "\(seen4)")

        // Spans went to the OTLP collector: the traced request's span is the
        // hop the backend saw, child of the caller's span; a caller that
        // said "not sampled" (flags 00) is not exported.
        let unsampledTrace = "0af7651916cd43dd8448eb211c80319c"
        let (c3, _) = try curl("obs/client", "http://198.19.8.10/api/unsampled", [
            "-H", "traceparent: 00-\(unsampledTrace)-b7ad6b7169203331-00"])
        #expect(c3 == 200)
        // A call that says it is gRPC (content-type) answered 200 with no
        // grpc-status (an HTTP/1.1 backend): UNKNOWN, 2, as gRPC's clients
        // read it, on its span, its series and its log line.
        let grpcTrace = "5bf92f3577b34da6a3ce929d0e0e4737"
        let (c5, _) = try curl("obs/client", "http://198.19.8.10/api/weft.Echo/Say", [
            "-X", "POST", "-H", "content-type: application/grpc", "-H", "x-request-id: req-grpc",
            "-H", "traceparent: 00-\(grpcTrace)-b7ad6b7169203331-01", "--data-binary", "x"])
        #expect(c5 == 200)
        var spans: [[String: Any]] = []
        for _ in 0..<50 {
            let r = try LabHarness.run(["lab", "exec", "obs/client", "--", "curl", "-s", "-m", "2", "http://198.18.1.50:4318/spans"])
            spans = (try? JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [[String: Any]]) ?? []
            if spans.contains(where: { $0["traceId"] as? String == trace })
                && spans.contains(where: { $0["traceId"] as? String == tp2.dropFirst().first })
                && spans.contains(where: { $0["traceId"] as? String == grpcTrace }) { break }
            usleep(100_000)
        }
        usleep(500_000)  // one more export period for the unsampled one, were it (wrongly) sent
        let r = try LabHarness.run(["lab", "exec", "obs/client", "--", "curl", "-s", "-m", "2", "http://198.18.1.50:4318/spans"])
        spans = (try? JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [[String: Any]]) ?? spans
        let span = spans.first { $0["traceId"] as? String == trace }
        #expect(span?["spanId"] as? String == tp1.dropFirst(2).first, "\(String(describing: span))")
        #expect(span?["parentSpanId"] as? String == parent)
        #expect(span?["name"] as? String == "GET obs/web#api" && span?["kind"] as? Int == 3)
        let attributes = Dictionary(((span?["attributes"] as? [[String: Any]]) ?? []).compactMap { a -> (String, String)? in
            guard let k = a["key"] as? String, let v = a["value"] as? [String: Any] else { return nil }
            return (k, (v["stringValue"] as? String) ?? (v["intValue"] as? String) ?? "")
        }, uniquingKeysWith: { a, _ in a })
        #expect(attributes["http.response.status_code"] == "200" && attributes["weft.upstream"] == "198.18.1.20:8080", "\(attributes)")
        #expect(attributes["rpc.grpc.status_code"] == nil, "plain HTTP: no gRPC status")
        let grpcSpan = spans.first { $0["traceId"] as? String == grpcTrace }
        let grpcStatus = ((grpcSpan?["attributes"] as? [[String: Any]]) ?? []).first { $0["key"] as? String == "rpc.grpc.status_code" }
        #expect((grpcStatus?["value"] as? [String: Any])?["intValue"] as? String == "2", "\(String(describing: grpcSpan))")
        #expect((span?["resource"] as? [String: [String: String]])?["service.name"]?["stringValue"] == "weft-proxy")
        #expect(spans.contains { $0["traceId"] as? String == tp2.dropFirst().first && $0["parentSpanId"] == nil })
        #expect(!spans.contains { $0["traceId"] as? String == unsampledTrace }, "not sampled: not exported")
        #expect(spans.allSatisfy { ($0["traceId"] as? String)?.count == 32 && ($0["spanId"] as? String)?.count == 16 })

        // One opaque TCP connection (the banner server speaks first).
        let tcp = try LabHarness.run(["lab", "exec", "obs/client", "--", "python3", "-c", """
            import socket, time
            s = socket.create_connection(("198.19.8.12", 80), timeout=5)
            got = s.recv(100)
            s.sendall(b"\\x00\\x01binary\\n")
            time.sleep(0.2)
            got += s.recv(100)
            s.close()
            print(len(got))
            """])
        let tcpReceived = Double(tcp.output.split(separator: "\n").last.flatMap { Int($0) } ?? -1)
        #expect(tcpReceived > 9, "\(tcp.output)")

        // The counters, once the TCP connection's end has been seen.
        var scrape = try Scrape()
        for _ in 0..<100 where scrape.sum("weft_tcp_connections_closed_total", [:]) < 1 {
            usleep(20_000)
            scrape = try Scrape()
        }
        let client = ["source_workload": "client", "source_workload_namespace": ns, "reporter": "source"]
        let web = client.merging(["destination_service": "web.obs.svc", "destination_service_name": "web",
                                  "destination_service_namespace": ns]) { $1 }
        func requests(_ extra: [String: String]) -> Double { scrape.sum("weft_requests_total", web.merging(extra) { $1 }) }
        #expect(requests(["response_code": "200", "route": "obs/web#api", "destination_workload": "web",
                          "destination_workload_namespace": ns, "response_flags": "-", "request_protocol": "http",
                          "grpc_response_status": ""]) == 24)
        #expect(requests(["response_code": "503", "route": "obs/web#api", "response_flags": "-"]) == 7)
        #expect(requests(["response_code": "404", "route": "-", "response_flags": "NR", "destination_workload": "unknown"]) == 5)
        #expect(scrape.sum("weft_requests_total", client.merging(["destination_service_name": "nobody", "response_code": "503",
                                                                   "response_flags": "UH"]) { $1 }) == 4)
        #expect(scrape.sum("weft_requests_total", ["source_workload": "other", "source_workload_namespace": "quiet",
                                                   "response_code": "200"]) == 3)
        #expect(scrape.sum("weft_requests_total", [:]) == 44)
        #expect(scrape.sum("weft_requests_total", web.merging(["request_protocol": "grpc", "grpc_response_status": "2",
                                                               "response_code": "200"]) { $1 }) == 1)
        // The histogram saw every request once, and its buckets are cumulative.
        #expect(scrape.sum("weft_request_duration_seconds_count", [:]) == 44)
        #expect(scrape.sum("weft_request_duration_seconds_count", web.merging(["response_code": "503", "route": "obs/web#api"]) { $1 }) == 7)
        #expect(scrape.sum("weft_request_duration_seconds_bucket", ["le": "+Inf"]) == 44)
        let buckets = scrape.samples.filter { $0.name == "weft_request_duration_seconds_bucket" && $0.labels["response_code"] == "404" }
            .sorted { (Double($0.labels["le"] ?? "") ?? .infinity) < (Double($1.labels["le"] ?? "") ?? .infinity) }
        #expect(!buckets.isEmpty && zip(buckets, buckets.dropFirst()).allSatisfy { $0.value <= $1.value })
        #expect(scrape.families["weft_request_duration_seconds"] == "histogram", "\(scrape.families)")
        #expect(scrape.families["weft_requests"] == "counter" || scrape.families["weft_requests_total"] == "counter")
        let banner = client.merging(["destination_service_name": "banner", "destination_workload": "banner"]) { $1 }
        #expect(scrape.sum("weft_tcp_connections_opened_total", banner) == 1)
        #expect(scrape.sum("weft_tcp_connections_closed_total", banner) == 1)
        #expect(scrape.sum("weft_tcp_sent_bytes_total", banner) == 9)
        #expect(scrape.sum("weft_tcp_received_bytes_total", banner) == tcpReceived)
        // The agent's own series come through the same parser.
        #expect(scrape.sum("weft_config_generation", [:]) >= 1)
        #expect(scrape.contentType.hasPrefix("text/plain; version=0.0.4"), "\(scrape.contentType)")
        // A scraper that asks for OpenMetrics gets it, and the strict
        // OpenMetrics parser reads the same numbers.
        let om = try Scrape(openMetrics: true)
        #expect(om.contentType.hasPrefix("application/openmetrics-text; version=1.0.0"), "\(om.contentType)")
        #expect(om.sum("weft_requests_total", [:]) == 44)
        #expect(om.sum("weft_request_duration_seconds_count", [:]) == 44)
        #expect(om.sum("weft_tcp_sent_bytes_total", banner) == 9)
        #expect(om.samples.count >= scrape.samples.count - 5, "\(om.samples.count) vs \(scrape.samples.count)")

        // The access log: one line per request and connection from obs,
        // none from quiet; written within 100 ms.
        var log = accessLog()
        for _ in 0..<50 where log.count < 43 {
            usleep(50_000)
            log = accessLog()
        }
        let http = log.filter { $0["kind"] as? String == "http" }
        #expect(http.count == 41, "\(log.count) lines")
        let grpcLine = http.first { $0["request_id"] as? String == "req-grpc" }
        #expect(grpcLine?["grpc_status"] as? String == "2" && http.filter { $0["grpc_status"] != nil }.count == 1,
                "\(String(describing: grpcLine))")
        #expect(!log.contains { $0["source_namespace"] as? String == "quiet" })
        let traced = http.first { $0["request_id"] as? String == "req-traced" }
        #expect(traced?["trace_id"] as? String == trace, "\(String(describing: traced))")
        #expect(traced?["parent_span_id"] as? String == parent)
        #expect(traced?["span_id"] as? String == tp1.dropFirst(2).first, "the logged span is the one the backend saw")
        #expect(traced?["upstream_host"] as? String == "198.18.1.20:8080")
        #expect(traced?["source_workload"] as? String == "client" && traced?["route"] as? String == "obs/web#api")
        #expect(traced?["method"] as? String == "GET" && traced?["path"] as? String == "/api/traced")
        #expect((traced?["bytes_sent"] as? Int ?? 0) > 0 && traced?["response_code"] as? Int == 200)
        let untraced = http.first { $0["request_id"] as? String == "req-untraced" }
        #expect(untraced?["trace_id"] as? String == tp2.dropFirst().first && untraced?["parent_span_id"] == nil)
        let upgraded = http.first { $0["request_id"] as? String == "req-upgraded" }
        #expect(upgraded?["protocol"] as? String == "HTTP/2" && upgraded?["path"] as? String == "/api/upgraded",
                "\(String(describing: upgraded))")
        #expect(http.filter { $0["response_flags"] as? String == "UH" }.count == 4)
        #expect(http.filter { $0["response_flags"] as? String == "NR" && $0["response_code"] as? Int == 404 }.count == 5)
        let tcpLines = log.filter { $0["kind"] as? String == "tcp" }
        #expect(tcpLines.count == 1 && tcpLines.first?["bytes_received"] as? Int == 9
                && Double(tcpLines.first?["bytes_sent"] as? Int ?? -1) == tcpReceived, "\(tcpLines)")

        try topologyAndTop(lab)
        try kernelConnectionCounters(lab)
        try switchingTelemetryOff(lab)
    }

    /// MeshConfig telemetry off: new connections and requests are no longer
    /// counted (the access log goes on), and nothing already counted is lost.
    private func switchingTelemetryOff(_ lab: LabHarness) throws {
        let before = try Scrape()
        let plain = ["destination_service": "plain.obs.svc"]
        let web = ["destination_service": "web.obs.svc"]
        func generation() -> Int {
            let text = (try? LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/agent.sock", "http://agent/generation"])) ?? ""
            return Int(text.split(separator: " ").first ?? "") ?? -1
        }
        let g = generation()
        _ = try lab.write("mesh.yaml", """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh}
            spec: {accessLog: {enabled: true, namespaces: [obs]}, telemetry: {connectionCounters: false, requestMetrics: false}}
            """)
        for _ in 0..<200 where generation() <= g { usleep(10_000) }
        usleep(300_000)  // the proxy reloads its table after the agent's generation
        let logged = accessLog().count
        #expect(try curlMany("obs/client", "http://198.19.8.10/api/ok", count: 5) == Array(repeating: 200, count: 5))
        let run = try LabHarness.run(["lab", "exec", "obs/client", "--", "python3", "-c",
                                      "import socket\nfor _ in range(4): socket.create_connection(('198.19.8.20', 9000), timeout=5).close()\n"
                                      + "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nu.settimeout(5)\nu.connect(('198.19.8.30', 53))\n"
                                      + "u.send(b'q')\nu.recv(64)"])
        #expect(run.status == 0, "\(run.output)")
        usleep(300_000)
        let after = try Scrape()
        #expect(after.sum("weft_requests_total", web) == before.sum("weft_requests_total", web), "request metrics off")
        #expect(after.sum("weft_l4_connections_opened_total", plain) == before.sum("weft_l4_connections_opened_total", plain),
                "connection counters off")
        #expect(after.sum("weft_l4_connections_opened_total", plain) == 7, "what was counted stays (the 6 and the one held open)")
        let dns = ["destination_service": "dns.obs.svc"]
        #expect(after.sum("weft_l4_udp_exchanges_opened_total", dns) == before.sum("weft_l4_udp_exchanges_opened_total", dns)
                && after.sum("weft_l4_udp_exchanges_opened_total", dns) == 6, "UDP counters off too")
        #expect(accessLog().count == logged + 5, "the access log does not depend on the metrics switch")
    }

    /// The kernel's per-connection counters: exact for a known set of
    /// connections, and capped per label under a port scan.
    private func kernelConnectionCounters(_ lab: LabHarness) throws {
        let run = try LabHarness.run(["lab", "exec", "obs/client", "--", "python3", "-c", """
            import json, socket
            request = b"GET /ok HTTP/1.1\\r\\nHost: plain\\r\\nConnection: close\\r\\n\\r\\n"
            received = 0
            for _ in range(6):
                s = socket.create_connection(("198.19.8.20", 9000), timeout=5)
                s.sendall(request)
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    received += len(b)
                s.close()
            refused = 0
            for _ in range(3):
                try:
                    socket.create_connection(("198.19.8.21", 9000), timeout=5)
                except ConnectionRefusedError:
                    refused += 1
            scanned = 0
            for port in [1] + list(range(20000, 21200)):
                try:
                    socket.create_connection(("198.18.1.20", port), timeout=5).close()
                except ConnectionRefusedError:
                    scanned += 1
            # UDP: 5 connected sockets to the dns Service; an unconnected
            # socket sending it 4 datagrams (one exchange: the Service has
            # one pod) and another sending 2 straight to the pod (one more);
            # 3 tries at a Service with no backend.
            answered = 0
            for _ in range(5):
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.settimeout(5)
                u.connect(("198.19.8.30", 53))
                u.send(b"q")
                answered += len(u.recv(64)) > 0
                u.close()
            direct = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for s, peer in [(u, ("198.19.8.30", 53))] * 4 + [(direct, ("198.18.1.60", 5353))] * 2:
                s.settimeout(5)
                s.sendto(b"q", peer)
                answered += len(s.recvfrom(64)[0]) > 0
            direct.close()
            udp_refused = 0
            for connected in (False, False, True):
                try:
                    u.connect(("198.19.8.31", 53)) if connected else u.sendto(b"q", ("198.19.8.31", 53))
                except ConnectionRefusedError:
                    udp_refused += 1
            u.close()
            print(json.dumps({"sent": 6 * len(request), "received": received, "refused": refused, "scanned": scanned,
                              "answered": answered, "udp_refused": udp_refused}))
            """])
        let facts = (try? JSONSerialization.jsonObject(with: Data((run.output.split(separator: "\n").last ?? "").utf8)) as? [String: Double]) ?? [:]
        #expect(facts["refused"] == 3 && facts["scanned"] == 1201 && facts["answered"] == 11 && facts["udp_refused"] == 3,
                "\(run.output)")
        var scrape = try Scrape()
        for _ in 0..<50 where scrape.sum("weft_l4_connections_closed_total", ["destination_service_name": "plain"]) < 6 {
            usleep(20_000)
            scrape = try Scrape()
        }
        let plain = ["reporter": "source", "source_workload": "client", "source_workload_namespace": ns,
                     "destination_service": "plain.obs.svc", "destination_workload": "web", "destination_workload_namespace": ns,
                     "destination_port": "9000"]
        #expect(scrape.sum("weft_l4_connections_opened_total", plain) == 6)
        #expect(scrape.sum("weft_l4_connections_closed_total", plain) == 6)
        #expect(scrape.sum("weft_l4_connections_failed_total", plain) == 0)
        #expect(scrape.sum("weft_l4_sent_bytes_total", plain) == facts["sent"], "\(facts)")
        #expect(scrape.sum("weft_l4_received_bytes_total", plain) == facts["received"], "\(facts)")
        #expect(scrape.sum("weft_l4_connections_failed_total", ["destination_service": "ghost.obs.svc", "destination_workload": "none"]) == 3)
        // The scan: every refused connect counted, the ports past the cap
        // (1,000 values per label) folded into "overflow".
        let scan = ["source_workload": "client", "destination_service": "unknown", "destination_workload": "web"]
        // (less the readiness probes above that came before the server listened)
        func scanned(_ s: Scrape?) -> Double? {
            s.map { $0.sum("weft_l4_connections_failed_total", scan)
                - $0.sum("weft_l4_connections_failed_total", scan.merging(["destination_port": "8080"]) { $1 }) }
        }
        #expect(scanned(scrape) == 1201)
        let ports = Set(scrape.samples.filter { $0.name.hasPrefix("weft_l4_") }.compactMap { $0.labels["destination_port"] })
        #expect(ports.count <= 1001 && ports.contains("overflow"), "\(ports.count) port values")
        #expect(scrape.sum("weft_l4_connections_failed_total", scan.merging(["destination_port": "overflow"]) { $1 }) >= 200)
        // UDP exchanges: each connect(), each unconnected socket's first
        // datagram to a peer; refusals for want of a backend. Not in the
        // TCP series.
        let dns = ["source_workload": "client", "destination_service": "dns.obs.svc", "destination_workload": "dns",
                   "destination_port": "53"]
        #expect(scrape.sum("weft_l4_udp_exchanges_opened_total", dns) == 6)
        // (Its port, 5353, may be past the cap the scan filled: "overflow".)
        #expect(scrape.sum("weft_l4_udp_exchanges_opened_total", ["source_workload": "client", "destination_service": "unknown",
                                                                   "destination_workload": "dns"]) == 1)
        #expect(scrape.sum("weft_l4_udp_exchanges_failed_total", ["destination_service": "mute.obs.svc", "destination_workload": "none"]) == 3)
        #expect(scrape.sum("weft_l4_udp_exchanges_failed_total", dns) == 0)
        #expect(scrape.sum("weft_l4_connections_opened_total", ["destination_workload": "dns"]) == 0)
        // (The server's answers continue the exchanges the client began.)
        #expect(scrape.sum("weft_l4_udp_exchanges_opened_total", ["source_workload": "dns"]) == 0)
        // `weft graph` draws the kernel-only Services' edges from these
        // counters (the proxied ones it has from the proxy).
        let graph = try LabHarness.run(["graph", "-o", "json"])
        let edges = (try? JSONSerialization.jsonObject(with: Data(graph.output.utf8)) as? [[String: Any]]) ?? []
        func edge(_ to: String) -> [String: Double] {
            (edges.first { $0["source"] as? String == "obs/client" && $0["destination"] as? String == to } ?? [:])
                .compactMapValues { $0 as? Double }
        }
        #expect(edge("plain.obs.svc")["tcpConnections"] == 6 && edge("plain.obs.svc")["connectionFailures"] == 0, "\(graph.output)")
        #expect(edge("ghost.obs.svc")["connectionFailures"] == 3, "\(graph.output)")
        #expect(edge("dns.obs.svc")["udpExchanges"] == 6 && edge("mute.obs.svc")["connectionFailures"] == 3, "\(graph.output)")
        // (The client's connections to web went to the node proxy: its
        // requests are the edge, not those connections again.)
        #expect((edge("web.obs.svc")["requests"] ?? 0) > 37 && edge("web.obs.svc")["tcpConnections"] == 0, "\(graph.output)")
        // `weft top`: a connection held open to the kernel-only Service is
        // open there (opened less closed: the 6 above ended).
        let held = try lab.startTool(in: "obs/client", ["hold", "198.19.8.20", "9000", "4"])
        usleep(1_000_000)
        let top = try LabHarness.run(["top", "--once", "--interval", "0.5", "-o", "json"])
        _ = try? held.finish()
        let rows = (try? JSONSerialization.jsonObject(with: Data(top.output.utf8)) as? [[String: Any]]) ?? []
        #expect(rows.first { $0["service"] as? String == "plain.obs.svc" }?["tcpOpen"] as? Double == 1, "\(top.output)")
        // Connections captured to the node proxy show as reaching it.
        #expect(scrape.sum("weft_l4_connections_opened_total", ["destination_service": "web.obs.svc", "destination_workload": "node-proxy"]) >= 1)

        // The counters live in pinned maps: a new agent reports the same
        // totals (the series continue, they do not restart from zero).
        let restart = try LabHarness.run(["lab", "restart-agent", "n1"])
        #expect(restart.status == 0, "\(restart.output)")
        var again = try? Scrape()
        for _ in 0..<100 where again == nil || again?.sum("weft_l4_connections_opened_total", plain) == 0 {
            usleep(50_000)
            again = try? Scrape()
        }
        #expect(again?.sum("weft_l4_connections_opened_total", plain) == 7, "the 6 and the one held open")
        #expect(again?.sum("weft_l4_sent_bytes_total", plain) == facts["sent"])
        #expect(again?.sum("weft_l4_udp_exchanges_opened_total", dns) == 6)
        #expect(scanned(again) == 1201)
    }

    /// `weft graph` (text, JSON and an HTML page a headless browser draws)
    /// and `weft top` read the same series.
    private func topologyAndTop(_ lab: LabHarness) throws {
        let graph = try LabHarness.run(["graph", "-o", "json"])
        let edges = (try? JSONSerialization.jsonObject(with: Data(graph.output.utf8)) as? [[String: Any]]) ?? []
        func edge(_ from: String, _ to: String) -> [String: Any]? {
            edges.first { $0["source"] as? String == from && $0["destination"] as? String == to }
        }
        #expect(edges.count == 4, "\(graph.output)")
        #expect(edge("obs/client", "web.obs.svc")?["requests"] as? Double == 37)
        // (7 5xx, and the gRPC call answered 200 with no status: UNKNOWN, a
        // failure as Linkerd counts it.)
        #expect(edge("obs/client", "web.obs.svc")?["failures"] as? Double == 8)
        #expect(edge("obs/client", "nobody.obs.svc")?["failures"] as? Double == 4)
        #expect(edge("quiet/other", "web.obs.svc")?["requests"] as? Double == 3)
        #expect(edge("obs/client", "banner.obs.svc")?["tcpConnections"] as? Double == 1)
        let text = try LabHarness.run(["graph"])
        #expect(text.output.contains("obs/client   ->  nobody.obs.svc  4         0.0%"), "\(text.output)")

        // The page: a headless Chromium draws the workloads (blue), the
        // Services (green), healthy edges (grey) and the failing one (red).
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-graph-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let page = try LabHarness.run(["graph", "--html", "\(dir)/graph.html"])
        #expect(page.status == 0, "\(page.output)")
        let html = (try? String(contentsOfFile: "\(dir)/graph.html", encoding: .utf8)) ?? ""
        #expect(html.contains("<svg") && !html.contains("<script") && html.contains("quiet/other"))
        let shot = try LabHarness.shell(raw: ["sh", "-c", "timeout 60 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars "
            + "--user-data-dir=\(dir)/profile --window-size=1000,500 --screenshot=\(dir)/graph.png file://\(dir)/graph.html 2>&1"])
        #expect(FileManager.default.fileExists(atPath: "\(dir)/graph.png"), "\(shot.suffix(1000))")
        let counts = try LabHarness.shell(["/usr/bin/python3", LabHarness.pixels, "\(dir)/graph.png", "#0969da", "#1a7f37", "#57606a", "#cf222e"])
        let box = 240.0 * 40 * 0.9
        #expect((counts["#0969da"] as? Double ?? 0) >= 2 * box, "two workload boxes: \(counts)")
        #expect((counts["#1a7f37"] as? Double ?? 0) >= 3 * box, "three Service boxes: \(counts)")
        #expect((counts["#57606a"] as? Double ?? 0) >= 500, "healthy edges: \(counts)")
        #expect((counts["#cf222e"] as? Double ?? 0) >= 300, "the failing edge to nobody: \(counts)")

        // weft top over one second of steady load.
        let load = try lab.startTool(in: "obs/client", ["http-steady", "198.19.8.10", "80", "3"])
        usleep(500_000)
        let top = try LabHarness.run(["top", "--once", "--interval", "1", "-o", "json"])
        _ = try? load.finish()
        let rows = (try? JSONSerialization.jsonObject(with: Data(top.output.utf8)) as? [[String: Any]]) ?? []
        let web = rows.first { $0["service"] as? String == "web.obs.svc" }
        #expect((web?["rps"] as? Double ?? 0) > 5, "\(top.output)")
        #expect(web?["successRate"] as? Double == 1.0, "404s are answers, not failures: \(top.output)")
        let p50 = web?["p50Seconds"] as? Double ?? -1, p99 = web?["p99Seconds"] as? Double ?? -1
        #expect(p50 > 0 && p99 >= p50 && p99 < 5, "\(top.output)")
        #expect(!rows.contains { $0["service"] as? String == "nobody.obs.svc" && ($0["requests"] as? Double ?? 0) > 0 },
                "figures cover the interval only")
    }
}
