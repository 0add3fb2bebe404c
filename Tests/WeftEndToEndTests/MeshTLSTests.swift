import Foundation
import Testing

// Zero trust between nodes, end to end in a 3-node lab: the lab's mesh CA
// (a root and one intermediate per node, /run/weft/lab/ca), each agent's
// workload certificates, the proxies' mTLS tunnels, PeerAuthentication in
// the kernel. Real clients (curl, grpcio, Python), real captures (tcpdump
// on the fabric), real TLS peers (openssl s_client, Python ssl + h2).

private let ns = "mtls"

private func pod(_ name: String, sa: String, node: String, address: String, app: String, command: String) -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: \(name), namespace: \(ns), labels: {app: \(app)}, annotations: {lab.weft.dev/command: "\(command)"}}
    spec: {serviceAccount: \(sa), node: \(node), address: \(address), ports: [{name: http, port: 8080}]}
    """
}

private let l7 = "python3 \(LabHarness.l7Server) 8080"
private let streamTool = LabHarness.packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/streamtool.py").path

private let pods = [
    pod("client", sa: "client", node: "n1", address: "198.18.1.10", app: "client", command: "sleep infinity"),
    pod("web-2", sa: "web", node: "n2", address: "198.18.2.20", app: "web", command: l7),
    pod("web-3", sa: "web", node: "n3", address: "198.18.3.20", app: "web", command: l7),
    pod("grpc", sa: "grpc", node: "n2", address: "198.18.2.60", app: "grpc", command: "/usr/bin/python3 \(LabHarness.grpcTool) serve 8080"),
    pod("banner", sa: "banner", node: "n3", address: "198.18.3.40", app: "banner", command: "\(l7) --tcp-banner"),
    pod("plain", sa: "plain", node: "n2", address: "198.18.2.50", app: "plain", command: l7),
    // Byte-stream torture (Tools/streamtool.py) across the tunnel.
    pod("stream", sa: "stream", node: "n2", address: "198.18.2.70", app: "stream", command: "python3 \(streamTool) serve 8080"),
    // Listens on nothing: its node's proxy cannot reach it (x-weft-refused).
    pod("dead", sa: "web", node: "n3", address: "198.18.3.21", app: "dead", command: "sleep infinity"),
].joined(separator: "\n---\n")

private func service(_ name: String, ip: String, app: String, portName: String, appProtocol: String? = nil) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: \(ns)}
    spec: {clusterIP: \(ip), selector: {app: \(app)}, ports: [{name: \(portName), port: 80, targetPort: 8080\(appProtocol.map { ", appProtocol: \($0)" } ?? "")}]}
    """
}

private let services = [
    service("web", ip: "198.19.5.10", app: "web", portName: "http"),
    service("web-tcp", ip: "198.19.5.11", app: "web", portName: "tcp"),
    service("grpc", ip: "198.19.5.60", app: "grpc", portName: "rpc", appProtocol: "grpc"),
    service("banner", ip: "198.19.5.40", app: "banner", portName: "tcp"),
    service("plain", ip: "198.19.5.50", app: "plain", portName: "tcp"),
    service("dead", ip: "198.19.5.13", app: "dead", portName: "http"),
    service("stream", ip: "198.19.5.70", app: "stream", portName: "tcp"),
].joined(separator: "\n---\n")

private func peerAuthentication(_ mode: String) -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: PeerAuthentication
    metadata: {name: default, namespace: weft-system}
    spec: {mtls: {mode: \(mode)}}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: PeerAuthentication
    metadata: {name: plain, namespace: \(ns)}
    spec: {selector: {matchLabels: {app: plain}}, mtls: {mode: DISABLE}}
    """
}

private let tunnelProbe = LabHarness.packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/tunnelprobe.py").path
private let caRoot = "/run/weft/lab/ca"

private func startLab(mode: String, certTTL: String? = nil, environment: [String: String] = [:],
                      files: [String: String] = [:]) throws -> LabHarness {
    let all = ["pods.yaml": pods, "services.yaml": services, "mtls.yaml": peerAuthentication(mode)].merging(files) { $1 }
    let lab = try LabHarness(files: all, nodes: 3, extra: certTTL.map { ["--cert-ttl", $0] } ?? [], environment: environment)
    do {
        for address in ["198.18.2.20", "198.18.3.20", "198.18.2.50"] { try waitForServer(address) }
    } catch {
        lab.down()
        throw error
    }
    return lab
}

/// A backend answering on its own address, asked from its own node (same-node
/// plaintext is allowed under STRICT: it never crosses the fabric).
private func waitForServer(_ address: String) throws {
    let node = "weft-n\(address.split(separator: ".")[2])"
    for _ in 0..<200 {
        // (`shell(raw:)` returns the output whatever the exit status: the
        // status code is what says the server answered.)
        if (try? LabHarness.shell(raw: ["ip", "netns", "exec", node, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                        "-m", "1", "http://\(address):8080/__count"])) == "200",
           (try? LabHarness.run(["lab", "exec", "\(ns)/client", "--", "true"]))?.status == 0 {
            return
        }
        usleep(50_000)
    }
    throw HarnessError("backend \(address) never answered")
}

private func curl(_ args: [String]) throws -> (Int32, String) {
    let r = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "curl", "-sS", "-m", "5"] + args)
    return (r.status, r.output)
}

private func proxyText(_ node: String) throws -> String {
    try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/\(node)/proxy.sock", "http://proxy/stats"])
}

/// A series of the node proxy's /metrics, summed over the label sets that contain every one of `labels`.
private func metric(_ node: String, _ prefix: String, _ labels: [String]) throws -> Int {
    let text = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/\(node)/proxy.sock", "http://proxy/metrics"])
    return text.split(separator: "\n").filter { line in line.hasPrefix(prefix) && labels.allSatisfy { line.contains($0) } }
        .compactMap { Double($0.split(separator: " ").last ?? "") }.reduce(0) { $0 + Int($1) }
}

private func plaintextDrops(_ node: String) throws -> Int {
    let text = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/\(node)/agent.sock", "http://agent/metrics"])
    return text.split(separator: "\n").filter { $0.hasPrefix("weft_policy_drops_total{") && $0.contains("plaintext_to_strict") }
        .compactMap { Int(Double($0.split(separator: " ").last ?? "") ?? -1) }.reduce(0, +)
}

/// Plaintext from node n1 itself (not a pod: nothing captures it) to a pod on n2.
private func plaintextFromNode(_ target: String) throws -> Bool {
    let out = try LabHarness.shell(raw: ["sh", "-c", "ip netns exec weft-n1 curl -s -o /dev/null -w '%{http_code}' -m 2 http://\(target):8080/ || true"])
    return out.hasPrefix("200")
}

@Suite(.serialized, .enabled(if: LabHarness.canRun, LabHarness.skipReason))
struct MeshTLSTests {
    /// With the express paths off (`WEFT_PROXY_EXPRESS=0`, as `--no-express`):
    /// NIOHTTP2Handler under every tunnel, stream channels for plain TCP, and
    /// NIO's HTTP codecs and the full path for HTTP at both ends. The same
    /// cross-node traffic goes through, and nothing takes an express path.
    @Test func withTheExpressPathsOffTunnelsCarryTheSameTraffic() throws {
        let lab = try startLab(mode: "STRICT", environment: ["WEFT_PROXY_EXPRESS": "0"])
        defer { lab.down() }
        for _ in 0..<4 {
            let (rc, out) = try curl(["http://198.19.5.10/no-express-h1"])
            // (The far proxies' logs say why one could not reach its pod.)
            #expect(rc == 0 && out.contains("\"pod\": \"web-"),
                    "\(out)\nn2:\n\(LabHarness.agentLog("n2"))\nn3:\n\(LabHarness.agentLog("n3"))")
        }
        let (rc2, out2) = try curl(["--http2-prior-knowledge", "http://198.19.5.10/no-express-h2"])
        #expect(rc2 == 0 && out2.contains("\"path\": \"/no-express-h2\""), "\(out2)")
        // The h2c Upgrade onto NIOHTTP2Handler: answered as stream 1, the
        // next request on the same connection as stream 3.
        let (rc3, out3) = try curl(["--http2", "-w", "\n[%{http_version} %{num_connects}]\n",
                                    "http://198.19.5.10/no-express-up1", "http://198.19.5.10/no-express-up2"])
        #expect(rc3 == 0 && out3.contains("\"path\": \"/no-express-up1\"") && out3.contains("\"path\": \"/no-express-up2\"")
                && out3.contains("[2 1]") && out3.contains("[2 0]"), "\(out3)")
        // With a body as large as the upgrade takes (a stream's first
        // window, H2CUpgrade.maxBody): stream 1's DATA within the flow
        // control NIOHTTP2Handler holds the client to.
        let (rc4, out4) = try curl(["--http2", "-D", "-", "-H", "content-type: application/octet-stream",
                                    "--data-binary", String(repeating: "w", count: 65_535), "http://198.19.5.10/no-express-post"])
        #expect(rc4 == 0 && out4.contains("HTTP/1.1 101") && out4.contains("HTTP/2 200") && out4.contains("\"body\": 65535,")
                && out4.contains("\"method\": \"POST\""), "\(out4.suffix(800))")
        // WebSocket over HTTP/2 on NIOHTTP2Handler, across the tunnel to
        // the far nodes' pods.
        try expectWebSocketsOverHTTP2(lab, in: "\(ns)/client", to: "198.19.5.10", podPrefix: "web-")
        // An HTTP/2 client's FIN closes its connection (NIOHTTP2Handler
        // alone held it open for good).
        let halfClosed = try lab.tool(in: "\(ns)/client", ["h2-half-close", "198.19.5.10", "80", "/no-express-fin", "0"])
        #expect((halfClosed["closed"] as? Double ?? .infinity) < 5, "\(halfClosed)")
        // MeshConfig proxy.idleTimeout on that pipeline too: GOAWAY naming the
        // last stream, then the close, a second or so after the answer.
        let generations = try lab.generations(["n1", "n2", "n3"])
        try lab.write("mesh.yaml", """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh}
            spec: {proxy: {idleTimeout: 1s}}
            """)
        try lab.waitForGeneration(after: generations)
        usleep(300_000)  // the proxy reloads its table after the agent's generation
        let idle = try lab.tool(in: "\(ns)/client", ["h2-drain", "198.19.5.10", "80", "/no-express-idle"])
        let answered = idle["ended"] as? Double ?? .infinity, closed = idle["closed"] as? Double ?? .infinity
        let goAway = idle["goaway"] as? [String: Any] ?? [:]
        #expect(idle["status"] as? String == "200" && closed - answered >= 0.95 && closed - answered < 2.5, "\(idle)")
        #expect(goAway["last_stream_id"] as? Int == 1 && goAway["error_code"] as? Int == 0, "\(idle)")
        // MeshConfig proxy.requestHeaderTimeout there too (HTTP2HeadWatch in
        // front of NIOHTTP2Handler): a header block trickled a byte at a
        // time, or in CONTINUATIONs each whole behind a first request, gets
        // GOAWAY (ENHANCE_YOUR_CALM) and the close; one that ends in time is
        // answered. (The idle timeout off, so only the head timeout sweeps.)
        let timeouts = try LabHarness.proxyStat("n1", "request_header_timeouts_total")
        let beforeHeads = try lab.generations(["n1", "n2", "n3"])
        try lab.write("mesh.yaml", """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh}
            spec: {proxy: {idleTimeout: 0s, requestHeaderTimeout: 1s}}
            """)
        try lab.waitForGeneration(after: beforeHeads)
        usleep(300_000)
        let slowHeads: [(String, [String])] = [("h2 head", ["200", "head"]), ("h2 continued head", ["200", "cont", "first"]),
                                               ("h2 head in time", ["100", "head:4"])]
        let trickled = try slowHeads.map { ($0.0, try lab.startTool(in: "\(ns)/client", ["h2-slow", "198.19.5.10", "80", "/no-express-slow"] + $0.1)) }
        for (name, run) in trickled {
            let r = try run.finish()
            if name.contains("continued") { #expect(r["first"] as? String == "200", "\(name): \(r)") }
            if name.hasSuffix("in time") {
                #expect(r["status"] as? String == "200" && r["goaway"] is NSNull, "\(name): \(r)")
            } else {
                expectHeadCutByGoAway(r, name, lastStream: name.contains("continued") ? 1 : 0)
            }
        }
        #expect(try LabHarness.proxyStat("n1", "request_header_timeouts_total") - timeouts == 2)
        // A drain of the far proxies lets a tunnel stream in flight finish
        // (NIO's connection management handler once saw no streams there,
        // and closed the tunnel under it).
        let slow = try lab.startTool(in: "\(ns)/client", ["h1-idle", "198.19.5.10", "80", "/sleep/2000"])
        usleep(500_000)
        for node in ["n2", "n3"] {
            let restart = try LabHarness.run(["lab", "restart-proxy", node])
            #expect(restart.status == 0, "\(restart.output)")
        }
        let drained = try slow.finish()
        #expect((drained["status"] as? String)?.hasPrefix("HTTP/1.1 200") == true && (drained["answered"] as? Double ?? 0) >= 2,
                "\(drained)\nn2:\n\(LabHarness.agentLog("n2"))")
        let grpc = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "/usr/bin/python3", LabHarness.grpcTool, "call", "198.19.5.60", "80"])
        #expect(grpc.status == 0 && grpc.output.contains("grpc:hi-0"), "\(grpc.output)")
        for _ in 0..<4 {
            let (rc, out) = try curl(["http://198.19.5.11/no-express-l4"])
            #expect(rc == 0 && out.contains("\"path\": \"/no-express-l4\""), "\(out)")
        }
        let banner = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "python3", "-c", """
            import socket; s = socket.create_connection(("198.19.5.40", 80), timeout=3); hello = s.recv(100); s.sendall(b"no-express\\n"); \
            echo = s.recv(100); print(hello.decode().strip(), "|", echo.decode().strip()); s.close()
            """])
        #expect(banner.output.contains("hello from banner | no-express"), "\(banner.output)")
        // Tunnels were used (a stream per L4 connection, at least), and no express path was.
        let streams = try LabHarness.proxyStat("n1", "tunnel_streams_out_total")
        #expect(streams >= 5, "\(streams) tunnel streams from n1")
        for node in ["n1", "n2", "n3"] {
            for stat in ["express_requests_total", "tunnel_streams_out_relayed_total", "tunnel_streams_in_relayed_total",
                         "tunnel_requests_express_total"] {
                #expect(try LabHarness.proxyStat(node, stat) == 0, "\(node) \(stat)")
            }
        }
    }

    @Test func crossNodeTrafficIsTunnelledAndTheFabricCarriesNoPlaintext() throws {
        let lab = try startLab(mode: "STRICT")
        defer { lab.down() }
        let pcap = "/tmp/weft-e2e-fabric-\(UUID().uuidString.prefix(8)).pcap"
        defer { try? FileManager.default.removeItem(atPath: pcap) }
        let capture = Process()
        capture.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        capture.arguments = ["netns", "exec", "weft-fabric", "tcpdump", "-i", "any", "--immediate-mode", "-U", "-s", "0", "-w", pcap, "tcp"]
        capture.standardOutput = FileHandle.nullDevice
        capture.standardError = FileHandle.nullDevice
        try capture.run()
        // tcpdump blocked on a quiet interface may not see SIGTERM until
        // the next packet: every packet is already on disk (-U), so SIGKILL.
        func stopCapture() {
            guard capture.isRunning else { return }
            kill(capture.processIdentifier, SIGKILL)
            capture.waitUntilExit()
        }
        defer { stopCapture() }
        usleep(500_000)
        let marker = "weft-secret-\(UUID().uuidString.prefix(8))"

        // HTTP/1.1 and HTTP/2 through an L7 Service: every answer comes from n2
        // or n3, on the express path (HTTP/1.1 to the pod in a tunnel stream).
        let express = try LabHarness.proxyStat("n1", "express_requests_total")
        for _ in 0..<6 {
            let (rc, out) = try curl(["http://198.19.5.10/\(marker)-h1"])
            #expect(rc == 0 && out.contains("\"pod\": \"web-"), "\(out)")
        }
        let (rc2, out2) = try curl(["--http2-prior-knowledge", "http://198.19.5.10/\(marker)-h2"])
        #expect(rc2 == 0 && out2.contains("\"path\": \"/\(marker)-h2\""), "\(out2)")
        #expect(try LabHarness.proxyStat("n1", "express_requests_total") - express >= 7, "cross-node requests left the express path")
        // A pod its node cannot reach: the destination says so (x-weft-refused)
        // and the express path hands the request to the full path, which
        // counts a refused connect and answers 503 (no other backend).
        let handovers = try LabHarness.proxyStat("n1", "express_handovers_total")
        let failures = try LabHarness.proxyStat("n1", "upstream_connect_failures_total")
        for extra in [[], ["--http2-prior-knowledge"]] {
            let r = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "curl", "-sS", "-m", "5", "-w", "\n%{http_code}"]
                                       + extra + ["http://198.19.5.13/\(marker)-dead"])
            #expect(r.output.hasSuffix("\n503") && r.output.contains("could not be reached from its node"), "\(extra): \(r.output)")
        }
        #expect(try LabHarness.proxyStat("n1", "express_handovers_total") - handovers >= 2, "the refusals were not handed over")
        #expect(try LabHarness.proxyStat("n1", "upstream_connect_failures_total") - failures >= 2)
        // gRPC (unary and streams, trailers) to n2.
        let grpc = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "/usr/bin/python3", LabHarness.grpcTool, "call", "198.19.5.60", "80"])
        #expect(grpc.status == 0 && grpc.output.contains("grpc:hi-0"), "\(grpc.output)")
        // L4-only Services: the kernel balances, then the connection is carried in the tunnel.
        for _ in 0..<4 {
            let (rc, out) = try curl(["http://198.19.5.11/\(marker)-l4"])
            #expect(rc == 0 && out.contains("\"path\": \"/\(marker)-l4\""), "\(out)")
        }
        // Connections ending by the dozen while others are mid-exchange on
        // the same tunnel connection: their ends (half-closes, closes) must
        // not disturb the streams still running. (An empty DATA frame per
        // ending stream once made NIO's peer tear the whole tunnel down.)
        let ends = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "timeout", "120", "python3", "-c", """
            import json, subprocess
            url = "http://198.19.5.11/\(marker)-ends"
            def requests(text):
                return next((l for l in text.splitlines() if l.startswith("requests:")), "none")
            # (Each bounded: a stuck stream must fail the test, not hang it.)
            long = subprocess.Popen(["timeout", "-s", "KILL", "60", "h2load", "--h1", "-c", "2", "-n", "2000", url],
                                    stdout=subprocess.PIPE, text=True)
            shorts = [requests(subprocess.run(["timeout", "-s", "KILL", "20", "h2load", "--h1", "-c", "10", "-n", "40", url],
                                              capture_output=True, text=True).stdout) for _ in range(4)]
            out, _ = long.communicate()
            print(json.dumps({"long": requests(out), "shorts": shorts}))
            """])
        let endsResult = (try? JSONSerialization.jsonObject(with: Data((ends.output.split(separator: "\n").last ?? "").utf8))) as? [String: Any] ?? [:]
        #expect((endsResult["long"] as? String)?.contains("2000 succeeded") == true, "\(ends.output.suffix(800))")
        #expect((endsResult["shorts"] as? [String])?.allSatisfy { $0.contains("40 succeeded") } == true, "\(ends.output.suffix(800))")
        let banner = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "python3", "-c", """
            import socket; s = socket.create_connection(("198.19.5.40", 80), timeout=3); hello = s.recv(100); s.sendall(b"\(marker)-tcp\\n"); \
            echo = s.recv(100); print(hello.decode().strip(), "|", echo.decode().strip()); s.close()
            """])
        #expect(banner.output.contains("hello from banner | \(marker)-tcp"), "\(banner.output)")
        // n1's TCP series name the Service each tunnelled connection was
        // dialed for, though the kernel chose its pod: none is "unknown".
        let tcpSeries = try metric("n1", "weft_tcp_connections_opened_total{", ["destination_service=\"web-tcp.\(ns).svc\""])
        let bannerSeries = try metric("n1", "weft_tcp_connections_opened_total{", ["destination_service=\"banner.\(ns).svc\""])
        let unnamed = try metric("n1", "weft_tcp_connections_opened_total{", ["destination_service=\"unknown\""])
        #expect(tcpSeries >= 4 && bannerSeries == 1 && unnamed == 0, "web-tcp \(tcpSeries), banner \(bannerSeries), unknown \(unnamed)")
        // Control: a DISABLE pod is spoken to in plaintext, so the capture sees it.
        let (rc3, out3) = try curl(["http://198.19.5.50/\(marker)-plain"])
        #expect(rc3 == 0 && out3.contains("plain"), "\(out3)")

        // Streams n1 opened: one per L4 connection (4 + the banner's), and
        // for the L7 Services at least one each (HTTP/1.1 streams are kept
        // alive per source pod and backend, gRPC nests in one).
        let opened = try LabHarness.proxyStat("n1", "tunnel_streams_out_total")
        #expect(opened >= 7, "\(opened) streams")
        #expect(try LabHarness.proxyStat("n2", "tunnel_streams_in_total") > 0 && LabHarness.proxyStat("n3", "tunnel_streams_in_total") > 0)
        // Every tunnel's handshake is counted and timed, at both ends.
        let dialed = try metric("n1", "weft_tls_handshakes_total{", ["role=\"client\"", "result=\"ok\""])
        let timed = try metric("n1", "weft_tls_handshake_duration_seconds_count{", ["role=\"client\""])
        #expect(dialed >= 2 && timed == dialed, "n1 dialed n2 and n3, and timed every handshake (\(timed) of \(dialed))")
        let taken = try metric("n2", "weft_tls_handshakes_total{", ["role=\"server\"", "result=\"ok\""])
            + metric("n3", "weft_tls_handshakes_total{", ["role=\"server\"", "result=\"ok\""])
        #expect(taken >= dialed, "every handshake n1 completed, n2 and n3 completed too (\(taken) vs \(dialed))")
        usleep(500_000)
        stopCapture()
        let bytes = try Data(contentsOf: URL(fileURLWithPath: pcap))
        let text = String(decoding: bytes, as: UTF8.self)
        #expect(bytes.count > 10_000, "the capture saw the traffic")
        #expect(text.contains("\(marker)-plain"), "the plaintext control is visible on the fabric")
        for kind in ["h1", "h2", "l4", "tcp"] {
            #expect(!text.contains("\(marker)-\(kind)"), "\(kind) crossed the fabric in plaintext")
        }
        #expect(!text.contains("hello from banner") && !text.contains("grpc:hi"), "payloads crossed in plaintext")

        // Every byte of opaque TCP across the tunnel, checked by length and
        // SHA-256 both ways: sizes up to 64 MiB, a server that answers 3 MiB
        // after the client's half-close and then closes (its last bytes must
        // be out before the stream ends: TunnelRelay ends it behind them), a
        // slow reader, a server that sends and closes first to a slow reader,
        // a reset, a paused reader holding the writer back, 1,000 connections
        // at once.
        // Both ends carry plain TCP streams at the frame level (TunnelRelay)
        // and give the rest stream channels: the HTTP n1 wrote for the L7
        // Services (gRPC's pod is on n2) is not relayed.
        let relayedBefore = try LabHarness.proxyStat("n2", "tunnel_streams_in_relayed_total")
        let sentBefore = try LabHarness.proxyStat("n1", "tunnel_streams_out_relayed_total")
        #expect(relayedBefore < (try LabHarness.proxyStat("n2", "tunnel_streams_in_total")), "n2 relayed \(relayedBefore) streams, all it took")
        #expect(sentBefore < (try LabHarness.proxyStat("n1", "tunnel_streams_out_total")), "n1 relayed \(sentBefore) streams, all it opened")
        let streams = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "timeout", "-s", "KILL", "170", "python3", streamTool,
                                          "stress", "198.19.5.70", "80", "--cases", "sizes,half_close,slow_echo,server_first,reset,backpressure,concurrent"])
        let stress = (try? JSONSerialization.jsonObject(with: Data((streams.output.split(separator: "\n").last ?? "").utf8))) as? [String: Any]
        let cases = stress?["cases"] as? [String: [String: Any]] ?? [:]
        #expect(cases.count == 7, "streamtool across the tunnel: \(streams.output.suffix(800))")
        for (name, r) in cases.sorted(by: { $0.key < $1.key }) {
            #expect(r["ok"] as? Bool == true, "across the tunnel, case \(name) failed: \(r)")
        }
        let relayed = try LabHarness.proxyStat("n2", "tunnel_streams_in_relayed_total") - relayedBefore
        let sent = try LabHarness.proxyStat("n1", "tunnel_streams_out_relayed_total") - sentBefore
        #expect(relayed >= 1_000 && sent >= 1_000, "n1 and n2 relayed the stress connections at the frame level (\(sent), \(relayed))")

        // The far proxy dies mid-stream: the relayed connection ends at once
        // (EOF or a reset, not a hang until streamtool's 30 s socket
        // timeout), and the proxy the agent starts again carries new ones.
        let run = try BackgroundRun([LabHarness.weft, "lab", "exec", "\(ns)/client", "--", "timeout", "-s", "KILL", "120",
                                     "python3", streamTool, "stress", "198.19.5.70", "80", "--cases", "long", "--seconds", "6"])
        usleep(1_500_000)
        let crash = try LabHarness.run(["lab", "restart-proxy", "n2", "--kill"])
        #expect(crash.status == 0, "restart-proxy n2 --kill: \(crash.output)")
        let long = (try run.finish()["cases"] as? [String: [String: Any]])?["long"] ?? [:]
        #expect(long["ok"] as? Bool == false, "a stream outlived its far proxy: \(long)")
        #expect(!"\(long)".contains("timed out"), "the stream hung when its far proxy died: \(long)")
        var after: [String: Any] = [:]
        for _ in 0..<40 {
            let r = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "timeout", "-s", "KILL", "60", "python3", streamTool,
                                        "stress", "198.19.5.70", "80", "--cases", "sizes"])
            after = (try? JSONSerialization.jsonObject(with: Data((r.output.split(separator: "\n").last ?? "").utf8))) as? [String: Any] ?? [:]
            if after["ok"] as? Bool == true { break }
            usleep(250_000)
        }
        #expect(after["ok"] as? Bool == true, "after n2's proxy came back: \(after)")
    }

    @Test func proxiesProveTheirPodsIdentityAndRefuseStrangersAndPlaintext() throws {
        let lab = try startLab(mode: "STRICT")
        defer { lab.down() }
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("weft-e2e-tls-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let web = "spiffe://cluster.local/ns/\(ns)/sa/web"
        let sni = (try LabHarness.shell(["/usr/bin/python3", tunnelProbe, "sni", web]))["sni"] as? String ?? ""

        // What n2's proxy presents for web: a chain to the lab root, web's URI SAN.
        let shown = try LabHarness.shell(raw: ["sh", "-c", "ip netns exec weft-n1 openssl s_client -connect 198.18.0.2:15008 -servername \(sni) -alpn h2 -showcerts </dev/null 2>/dev/null"])
        var pems: [String] = []
        var current: [Substring]?
        for line in shown.split(separator: "\n") {
            if line.hasPrefix("-----BEGIN CERTIFICATE") { current = [line] } else if current != nil { current?.append(line) }
            if line.hasPrefix("-----END CERTIFICATE"), let c = current { pems.append(c.joined(separator: "\n") + "\n"); current = nil }
        }
        try #require(pems.count == 2, "leaf and node CA: \(shown.prefix(400))")
        try pems[0].write(toFile: "\(work)/leaf.pem", atomically: true, encoding: .utf8)
        try pems[1].write(toFile: "\(work)/node.pem", atomically: true, encoding: .utf8)
        let verify = try LabHarness.shell(raw: ["sh", "-c", "openssl verify -x509_strict -CAfile \(caRoot)/root/root.crt -untrusted \(work)/node.pem \(work)/leaf.pem 2>&1"])
        #expect(verify.contains("leaf.pem: OK"), "\(verify)")
        let san = try LabHarness.shell(raw: ["openssl", "x509", "-in", "\(work)/leaf.pem", "-noout", "-ext", "subjectAltName"])
        #expect(san.contains("URI:\(web)"), "\(san)")

        // Clients: the mesh's own certificate for the client pod's identity,
        // one from another CA, an expired one, and a valid one of the wrong identity.
        let client = "spiffe://cluster.local/ns/\(ns)/sa/client"
        func issue(_ name: String, ca: String, id: String, extra: [String] = []) throws {
            let r = try LabHarness.run(["ca", "issue", "--ca", ca, "--id", id, "--out", "\(work)/\(name)"] + extra)
            try #require(r.status == 0, "\(r.output)")
        }
        try issue("good", ca: "\(caRoot)/n1", id: client)
        #expect(try LabHarness.run(["ca", "init", "--trust-domain", "cluster.local", "--out", "\(work)/evil"]).status == 0)
        try issue("foreign", ca: "\(work)/evil", id: client)
        try issue("expired", ca: "\(caRoot)/n1", id: client, extra: ["--ttl", "1h", "--backdate", "2h"])
        try issue("intruder", ca: "\(caRoot)/n1", id: "spiffe://cluster.local/ns/\(ns)/sa/intruder")
        func probe(_ name: String) throws -> [String: Any] {
            try LabHarness.shell(["ip", "netns", "exec", "weft-n1", "/usr/bin/python3", tunnelProbe, "connect", "198.18.0.2", "15008", web,
                                  "\(work)/\(name).crt", "\(work)/\(name).key", "\(caRoot)/root/root.crt", "198.18.2.20:8080",
                                  "198.18.1.10", "GET /via-tunnel HTTP/1.0\r\n\r\n"])
        }
        let good = try probe("good")
        #expect(good["status"] as? Int == 200 && (good["echo"] as? String ?? "").contains("/via-tunnel"), "\(good)")
        #expect((good["peer_uri"] as? [String]) == [web], "\(good)")
        let failedBefore = try metric("n2", "weft_tls_handshakes_total{", ["role=\"server\"", "result=\"failed\""])
        for name in ["foreign", "expired"] {
            let r = try probe(name)
            #expect(r["status"] == nil || r["status"] as? Int == 0, "\(name) was let in: \(r)")
        }
        #expect(try metric("n2", "weft_tls_handshakes_total{", ["role=\"server\"", "result=\"failed\""]) >= failedBefore + 2,
                "the two refused handshakes are counted")
        let intruder = try probe("intruder")
        #expect(intruder["status"] as? Int == 403 && (intruder["reason"] as? String ?? "").contains("198.18.1.10 is \(ns)/client"),
                "\(intruder)")
        #expect(try LabHarness.proxyStat("n2", "tunnel_streams_refused_total") >= 1)

        // Plaintext from another node to a STRICT pod: dropped in the kernel.
        let before = try plaintextDrops("n2")
        #expect(try !plaintextFromNode("198.18.2.20"))
        #expect(try plaintextDrops("n2") > before, "counted as plaintext_to_strict")
        // Its node may still reach it (kubelet-style probes), and a DISABLE pod takes plaintext.
        #expect(try LabHarness.shell(raw: ["sh", "-c", "ip netns exec weft-n2 curl -s -o /dev/null -w '%{http_code}' -m 2 http://198.18.2.20:8080/"]) == "200")
        #expect(try plaintextFromNode("198.18.2.50"))
    }

    @Test func permissiveToStrictLiveAndCertificateRotationFailNoRequest() throws {
        let lab = try startLab(mode: "PERMISSIVE", certTTL: "20s")
        defer { lab.down() }
        // PERMISSIVE: plaintext from another node is not dropped by Weft
        // (the kernel counts no plaintext_to_strict drop for it).
        let permissiveDrops = try plaintextDrops("n2")
        var plaintext = false
        for _ in 0..<5 where !plaintext { plaintext = try plaintextFromNode("198.18.2.20") }
        if !plaintext { print("note: plaintext from n1 to 198.18.2.20 did not get through under PERMISSIVE (not a Weft drop if the count below is unchanged)") }
        #expect(try plaintextDrops("n2") == permissiveDrops, "PERMISSIVE dropped plaintext as if STRICT")
        func identities() throws -> [String: Double] {
            let s = try LabHarness.shell(["sh", "-c", "curl -s --unix-socket /run/weft/n1/agent.sock http://agent/status | tr -d '\\n'"])
            var out: [String: Double] = [:]
            for i in s["identities"] as? [[String: Any]] ?? [] { out[i["id"] as? String ?? ""] = i["notAfter"] as? Double }
            return out
        }
        let before = try identities()
        #expect(before.keys.contains("spiffe://cluster.local/ns/\(ns)/sa/client"), "\(before)")

        // Steady traffic through the tunnels for 24 s: L7 and L4, while the
        // mode goes STRICT and the certificates renew (every 10 s).
        let l7 = try lab.startLoad(in: "\(ns)/client", ["watch-http", "http://198.19.5.10/", "24", "-"])
        let l4 = try lab.startLoad(in: "\(ns)/client", ["watch-tcp", "198.19.5.11", "80", "24", "-"])
        usleep(6_000_000)
        let generations = try lab.generations(["n1", "n2", "n3"])
        try lab.write("mtls.yaml", peerAuthentication("STRICT"))
        try lab.waitForGeneration(after: generations)
        let strictDrops = try plaintextDrops("n2")
        #expect(try !plaintextFromNode("198.18.2.20"), "STRICT, live: plaintext from another node is dropped")
        #expect(try plaintextDrops("n2") > strictDrops, "and counted as plaintext_to_strict")
        let h = try l7.finish(), t = try l4.finish()
        #expect((h["errors"] as? [Any])?.isEmpty == true && (h["codes"] as? [String: Int])?["200"] ?? 0 > 100, "\(h)")
        #expect((t["failures"] as? [Any])?.isEmpty == true && (t["pods"] as? [String: Int] ?? [:]).values.reduce(0, +) > 100, "\(t)")
        if (t["failures"] as? [Any])?.isEmpty != true {
            for node in ["n1", "n2", "n3"] {
                print("diag \(node): " + ((try? proxyText(node)) ?? ""))
                print(LabHarness.agentLog(node, lines: 12))
            }
        }
        let after = try identities()
        let client = "spiffe://cluster.local/ns/\(ns)/sa/client"
        #expect((after[client] ?? 0) >= (before[client] ?? 0) + 15, "renewed at least once: \(before[client] ?? 0) -> \(after[client] ?? 0)")
    }

    /// MeshConfig `proxy.tcpKeepalive` on the tunnels' own sockets: a node
    /// that vanishes (its uplink down: no FIN or RST ever reaches the other
    /// nodes) leaves the source node's tunnel to it silent; the probes go
    /// unanswered, the tunnel closes, and with it every stream it carried,
    /// so a client's idle TCP connection through it to a pod there is
    /// closed within seconds. Before (2026-12-05) the tunnel's socket had no
    /// keepalive: the tunnel, the stream and the client's connection were
    /// held for good (the client's own socket to its proxy is answered by
    /// its own node). A second client sends a line just after the cut, so
    /// the tunnel has bytes in flight, which keepalive does not probe (the
    /// kernel retransmits them for some fifteen minutes): TCP_USER_TIMEOUT,
    /// at the same deadline, ends it all the same.
    @Test func tunnelsToANodeThatVanishedAreClosedByKeepalive() throws {
        let mesh = """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh}
            spec: {proxy: {tcpKeepalive: {time: 1s, interval: 1s, probes: 2}}}
            """
        let lab = try startLab(mode: "STRICT", files: ["mesh.yaml": mesh])
        defer { lab.down() }
        let hold = try lab.startTool(in: "\(ns)/client", ["tcp-hold", "198.19.5.40", "80", "10"])
        let late = try lab.startTool(in: "\(ns)/client", ["tcp-hold", "198.19.5.40", "80", "10", "2"])
        // n1's tunnels to n3 (198.18.0.3:15008), with the keepalive timer.
        func tunnels() throws -> [Substring] {
            let ss = try LabHarness.shell(raw: ["ip", "netns", "exec", "weft-n1", "ss", "-tanoH", "( dst 198.18.0.3:15008 )"])
            return ss.split(separator: "\n").filter { $0.hasPrefix("ESTAB") }
        }
        // (While a socket has bytes unacknowledged, as just after the TLS
        // handshake, ss shows its retransmission timer instead: waited out.)
        var open = try tunnels()
        for _ in 0..<50 where open.isEmpty || !open.allSatisfy({ $0.contains("timer:(keepalive") }) {
            usleep(100_000)
            open = try tunnels()
        }
        #expect(!open.isEmpty && open.allSatisfy { $0.contains("timer:(keepalive") }, "n1's tunnels to n3:\n\(open.joined(separator: "\n"))")
        usleep(300_000)  // the banners read through the tunnel
        _ = try LabHarness.shell(raw: ["ip", "netns", "exec", "weft-n3", "ip", "link", "set", "weftup0", "down"])
        // 1 s of silence, then two probes 1 s apart: gone after about 3 s
        // (the user timeout: 3 s after the late line went unanswered).
        let start = Date()
        for _ in 0..<80 where !open.isEmpty {
            usleep(100_000)
            open = try tunnels()
        }
        #expect(open.isEmpty, "n1 still holds, \(Date().timeIntervalSince(start)) s after the cut:\n\(open.joined(separator: "\n"))")
        for (what, run) in [("idle", hold), ("late", late)] {
            let t = try run.finish()
            #expect(t["banner"] as? String == "hello from banner" && t["open"] as? Bool == false,
                    "the \(what) client's connection through the tunnel: \(t)")
        }
    }

    /// MeshConfig `proxy.tunnelIdleTimeout` (1 s here): n1's proxy closes
    /// each tunnel nothing used for that long, HTTP/1.1's and gRPC's once
    /// their streams are only kept idle for the next exchange, and keeps
    /// the tunnel of an opaque TCP connection held open with not a byte
    /// either way (6 s) until that connection ends. The next requests go
    /// on new tunnels. The delivering nodes, which close a tunnel with no
    /// stream open for twice that, never had to: the source went first.
    /// And a connection to n2's tunnel port that never starts its TLS
    /// handshake is closed by n2 after `proxy.requestHeaderTimeout` (1 s).
    @Test func unusedTunnelsAreReleasedAndTunnelsInUseKept() throws {
        let mesh = """
            apiVersion: weft.dev/v1alpha1
            kind: MeshConfig
            metadata: {name: mesh}
            spec: {proxy: {tunnelIdleTimeout: 1s, requestHeaderTimeout: 1s}}
            """
        let lab = try startLab(mode: "STRICT", files: ["mesh.yaml": mesh])
        defer { lab.down() }
        // n1's tunnels to a node (198.18.0.N:15008).
        func tunnels(_ node: Int) throws -> Int {
            let ss = try LabHarness.shell(raw: ["ip", "netns", "exec", "weft-n1", "ss", "-tanH", "( dst 198.18.0.\(node):15008 )"])
            return ss.split(separator: "\n").filter { $0.hasPrefix("ESTAB") }.count
        }
        func grpc() throws -> [String: Any] {
            try BackgroundRun([LabHarness.weft, "lab", "exec", "\(ns)/client", "--", "/usr/bin/python3", LabHarness.grpcTool,
                               "steady", "198.19.5.60", "80", "0.5"]).finish()
        }
        let hold = try lab.startTool(in: "\(ns)/client", ["tcp-hold", "198.19.5.40", "80", "6"])
        let held = Date()
        let g = try grpc()
        #expect((g["failures"] as? [Any])?.isEmpty == true && (g["ok"] as? Int ?? 0) > 0, "\(g)")
        for _ in 0..<4 { #expect(try curl(["http://198.19.5.10/"]).0 == 0) }
        #expect(try tunnels(2) >= 1, "gRPC and HTTP to n2's pods went through no tunnel")
        // Unused for the timeout: closed between 1 and 1.25 s after last use.
        var n2 = try tunnels(2), n3 = try tunnels(3)
        for _ in 0..<40 where n2 > 0 || n3 > 1 {
            usleep(100_000)
            (n2, n3) = (try tunnels(2), try tunnels(3))
        }
        #expect(n2 == 0 && n3 == 1, "n1's tunnels to n2: \(n2), to n3: \(n3) (only the opaque connection's should stay)")
        #expect(try LabHarness.proxyStat("n1", "tunnel_connections_released_total") >= 2)
        #expect(try LabHarness.proxyStat("n1", "tunnel_connections_out_active") == 1 && LabHarness.proxyStat("n2", "tunnel_connections_in_active") == 0,
                "the gauges of tunnels open now disagree with the sockets")
        #expect(Date().timeIntervalSince(held) < 5.5, "checked too late to tell the held tunnel was kept")
        // The held connection ends; then its tunnel is unused too.
        let t = try hold.finish()
        #expect(t["banner"] as? String == "hello from banner" && t["open"] as? Bool == true, "the held connection: \(t)")
        for _ in 0..<40 where n3 > 0 {
            usleep(100_000)
            n3 = try tunnels(3)
        }
        #expect(n3 == 0, "n1 still holds \(n3) tunnels to n3 after the held connection ended")
        usleep(200_000)  // n3's proxy sees the close
        #expect(try LabHarness.proxyStat("n1", "tunnel_connections_out_active") == 0 && LabHarness.proxyStat("n3", "tunnel_connections_in_active") == 0)
        // New requests make new tunnels.
        let opened = try LabHarness.proxyStat("n1", "tunnel_connections_out_total")
        let again = try grpc()
        #expect((again["failures"] as? [Any])?.isEmpty == true && (again["ok"] as? Int ?? 0) > 0, "\(again)")
        #expect(try curl(["http://198.19.5.10/"]).0 == 0)
        #expect(try LabHarness.proxyStat("n1", "tunnel_connections_out_total") > opened)
        #expect(try LabHarness.proxyStat("n2", "tunnel_connections_in_idle_closed_total") == 0
                && LabHarness.proxyStat("n3", "tunnel_connections_in_idle_closed_total") == 0, "a delivering node closed a Weft source's tunnel")

        // Not a TLS client: n2 closes the connection 1 to 1.25 s after taking it.
        let silent = try LabHarness.shell(raw: ["ip", "netns", "exec", "weft-n1", "python3", "-c", """
            import socket, time
            s = socket.create_connection(("198.18.0.2", 15008), timeout=5)
            t = time.monotonic()
            print(s.recv(1) == b"", round(time.monotonic() - t, 2))
            """])
        let words = silent.split(separator: " ")
        let after = Double(words.last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? -1
        #expect(words.first == "True" && after >= 0.9 && after < 2.5, "n2's tunnel port and a client that never said hello: \(silent)")
        #expect(try LabHarness.proxyStat("n2", "tunnel_handshake_timeouts_total") == 1)
        #expect(try metric("n2", "weft_tls_handshakes_total{", ["role=\"server\"", "result=\"failed\""]) >= 1,
                "the cut handshake is not counted as a failed one")
    }

    /// Rolling restarts of the destination nodes' proxies under steady
    /// cross-node traffic, L7 and L4, fail nothing: a draining proxy tells
    /// each tunnel from another node to go away (GOAWAY, PING, GOAWAY) and
    /// closes it once its streams are done; the source opens new streams on
    /// a new tunnel to the proxy that took over, and opens again a stream
    /// the old one did not take.
    @Test func rollingRestartsOfDestinationProxiesFailNoCrossNodeRequest() throws {
        let lab = try startLab(mode: "STRICT")
        defer { lab.down() }
        for url in ["http://198.19.5.10/", "http://198.19.5.11/"] {
            var up = false
            for _ in 0..<100 where !up {
                up = (try? curl([url]))?.0 == 0
                if !up { usleep(50_000) }
            }
            #expect(up, "\(url) never answered")
        }
        let tunnelsBefore = try LabHarness.proxyStat("n1", "tunnel_connections_out_total")
        let l7 = try lab.startLoad(in: "\(ns)/client", ["watch-http", "http://198.19.5.10/", "14", "-"])
        let l4 = try lab.startLoad(in: "\(ns)/client", ["watch-tcp", "198.19.5.11", "80", "14", "-"])
        // gRPC to the pod on n2: HTTP/2 nested in one tunnel stream.
        let grpc = try BackgroundRun([LabHarness.weft, "lab", "exec", "\(ns)/client", "--", "/usr/bin/python3", LabHarness.grpcTool,
                                      "steady", "198.19.5.60", "80", "14"])
        for node in ["n2", "n3", "n2", "n3"] {
            usleep(2_500_000)
            let restart = try LabHarness.run(["lab", "restart-proxy", node])
            #expect(restart.status == 0, "\(restart.output)\n\(LabHarness.agentLog(node))")
        }
        let h = try l7.finish(), t = try l4.finish(), g = try grpc.finish()
        #expect((h["errors"] as? [Any])?.isEmpty == true && (h["codes"] as? [String: Int])?["200"] ?? 0 > 100, "\(h)")
        #expect((t["failures"] as? [Any])?.isEmpty == true && (t["empty"] as? [Any])?.isEmpty == true
                && (t["pods"] as? [String: Int] ?? [:]).values.reduce(0, +) > 100, "\(t)")
        #expect((g["failures"] as? [Any])?.isEmpty == true && (g["ok"] as? Int ?? 0) > 100, "\(g)")
        // Each drain sent the source to new tunnels, and each old proxy
        // exited once its tunnels were done, not at the drain timeout (10 s).
        let tunnelsAfter = try LabHarness.proxyStat("n1", "tunnel_connections_out_total")
        #expect(tunnelsAfter > tunnelsBefore + 4, "\(tunnelsBefore) -> \(tunnelsAfter)")
        func exited(_ node: String) -> Int { LabHarness.agentLog(node, lines: 400).components(separatedBy: "drained proxy exited").count - 1 }
        let waitUntil = Date().addingTimeInterval(5)
        while (exited("n2") < 2 || exited("n3") < 2) && Date() < waitUntil { usleep(50_000) }
        for node in ["n2", "n3"] {
            let log = LabHarness.agentLog(node, lines: 400)
            #expect(exited(node) == 2 && !log.contains("drain timeout"), "\(node): \(log)")
        }
    }
}
