import Foundation
import Testing

// The same-node socket shortcut end to end: real sockets in lab pods, every
// byte checked by length and SHA-256 (Tools/streamtool.py), over pod -> pod
// (a kernel-only Service) and pod -> proxy -> pod (an L7 Service carrying
// opaque TCP), with the kernel's own counters proving the shortcut carried
// the bytes.

private let ns = "sc"
private let streamTool = LabHarness.packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/streamtool.py").path

private func workload(_ name: String, address: String, command: String, receiver: Bool) -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: \(name), namespace: \(ns), labels: {app: \(name)}, annotations: {lab.weft.dev/command: "\(command)"\(receiver ? ", weft.dev/socket-shortcut: receive" : "")}}
    spec: {node: n1, address: \(address), ports: [{name: tcp, port: 9000}]}
    """
}

private func service(_ name: String, ip: String, app: String, appProtocol: String? = nil) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: \(ns)}
    spec: {clusterIP: \(ip), selector: {app: \(app)}, ports: [{name: tcp, port: 9000, targetPort: tcp\(appProtocol.map { ", appProtocol: \($0)" } ?? "")}]}
    """
}

private let manifests = [
    workload("client", address: "198.18.1.10", command: "sleep infinity", receiver: true),
    workload("loner", address: "198.18.1.11", command: "sleep infinity", receiver: false),
    workload("sink", address: "198.18.1.20", command: "python3 \(streamTool) serve 9000", receiver: true),
    // Not a receiver: it reads with splice(), which never sees redirected bytes.
    workload("plain", address: "198.18.1.21", command: "python3 \(streamTool) serve 9000", receiver: false),
    service("direct", ip: "198.19.5.10", app: "sink"),
    service("viaproxy", ip: "198.19.5.11", app: "sink", appProtocol: "http"),
    service("plain", ip: "198.19.5.12", app: "plain"),
    service("plainviaproxy", ip: "198.19.5.13", app: "plain", appProtocol: "http"),
].joined(separator: "\n---\n")

private func meshConfig(enabled: Bool, splice: Bool = true) -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: MeshConfig
    metadata: {name: mesh}
    spec: {socketShortcut: {enabled: \(enabled), podReceivers: Annotated, splice: \(splice)}}
    """
}

private let allCases = "sizes,small_writes,writev,sendfile,splice_send,echo,slow_echo,server_first,half_close,reset,backpressure,concurrent"

@Suite(.serialized, .enabled(if: LabHarness.canRun, LabHarness.skipReason))
struct ShortcutTests {
    /// The agent's view of the shortcut: state, sockets on it, counters.
    private func shortcut() throws -> [String: Any] {
        let text = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/agent.sock", "http://agent/status"])
        let status = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        return try #require(status["shortcut"] as? [String: Any], "no shortcut in /status: \(text.prefix(400))")
    }

    /// Entries in the kernel's splice map (one per direction the proxy armed).
    private func spliceEntries() throws -> Int {
        let text = try LabHarness.shell(raw: ["bpftool", "map", "dump", "pinned", "/sys/fs/bpf/weft/n1/maps/weft_accel_splice", "-j"])
        return try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [Any], "bpftool: \(text.prefix(300))").count
    }

    private func events() throws -> [String: Int] {
        let e = try #require(try shortcut()["events"] as? [String: Any])
        return e.compactMapValues { ($0 as? NSNumber)?.intValue }
    }

    /// Bytes of opaque TCP connections the proxy counts, both ways.
    private func proxyTCPBytes() throws -> Int {
        let text = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/proxy.sock", "http://proxy/metrics"])
        var total = 0.0
        for line in text.split(separator: "\n")
        where line.hasPrefix("weft_tcp_sent_bytes_total") || line.hasPrefix("weft_tcp_received_bytes_total") {
            total += line.split(separator: " ").last.flatMap { Double($0) } ?? 0
        }
        return Int(total)
    }

    /// The proxy's byte counters take in the bytes spliced past it (they
    /// are added as each connection ends, so wait a little for the last).
    private func expectProxyCounts(_ spliced: Int, since relayedBefore: Int) throws {
        var relayed = 0
        for _ in 0..<100 {
            relayed = try proxyTCPBytes() - relayedBefore
            if relayed >= spliced { break }
            usleep(50_000)
        }
        #expect(relayed >= spliced, "the proxy's byte counters miss spliced bytes: \(relayed) < \(spliced)")
    }

    /// streamtool's cases run meanwhile, for disturbances mid-flow (a hang
    /// is killed after 120 s); `finish()` gives its JSON line.
    private func backgroundStress(_ target: String, cases: String, seconds: Int, from client: String = "client") throws -> BackgroundRun {
        try BackgroundRun([LabHarness.weft, "lab", "exec", "\(ns)/\(client)", "--", "timeout", "-s", "KILL", "120",
                           "python3", streamTool, "stress", target, "9000", "--cases", cases, "--seconds", "\(seconds)"])
    }

    private func stress(_ lab: LabHarness, _ target: String, cases: String, seconds: Double = 3,
                        from client: String = "client", upgrade: Bool = false) throws -> [String: Any] {
        let r = try LabHarness.run(["lab", "exec", "\(ns)/\(client)", "--", "timeout", "-s", "KILL", "170",
                                    "python3", streamTool, "stress", target, "9000", "--cases", cases,
                                    "--seconds", "\(seconds)"] + (upgrade ? ["--upgrade"] : []))
        guard let line = r.output.split(separator: "\n").last,
              let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw HarnessError("streamtool to \(target) failed (a hang is killed after 170 s): \(r.output.suffix(600))")
        }
        return json
    }

    private func expectAllOK(_ result: [String: Any], _ what: String) {
        let cases = result["cases"] as? [String: [String: Any]] ?? [:]
        #expect(!cases.isEmpty, "\(what): no cases ran")
        for (name, r) in cases.sorted(by: { $0.key < $1.key }) {
            #expect(r["ok"] as? Bool == true, "\(what): case \(name) failed: \(r)")
        }
    }

    private func waitForServers(_ lab: LabHarness) throws {
        for target in ["198.18.1.20", "198.18.1.21"] {
            let r = try LabHarness.run(["lab", "exec", "\(ns)/client", "--", "python3", streamTool, "wait", target, "9000"])
            try #require(r.status == 0, "stream server \(target) never answered: \(r.output)")
        }
    }

    @Test func everyByteArrivesInOrderOverTheShortcutAndConnectionsEnd() throws {
        let lab = try LabHarness(files: ["all.yaml": manifests, "mesh.yaml": meshConfig(enabled: true)], nodes: 1)
        defer { lab.down() }
        try waitForServers(lab)
        let start = try shortcut()
        #expect(start["state"] as? String == "on", "the shortcut is not on after the start-up probe: \(start)")
        #expect(start["proxyReceives"] as? Bool == true)
        #expect(Set(start["receivers"] as? [String] ?? []) == ["sc/client", "sc/sink"])

        // pod -> pod: every case, and the bytes went by the shortcut.
        let e0 = try events()
        expectAllOK(try stress(lab, "198.19.5.10", cases: allCases), "pod -> pod")
        let e1 = try events()
        #expect(e1["flow_redirected", default: 0] - e0["flow_redirected", default: 0] >= 2000,
                "pod -> pod flows did not take the shortcut: \(e1)")
        // (Bulk flows whose reader falls behind move to TCP for a while: not all bytes.)
        #expect(e1["bytes_redirected", default: 0] - e0["bytes_redirected", default: 0] >= 32 << 20)
        // The paused reader pushed its sender back to TCP, and bulk flows came back.
        #expect(e1["fallback_receiver_queue_full", default: 0] > e0["fallback_receiver_queue_full", default: 0])

        // pod -> proxy -> pod, opaque TCP through the proxy: the same. The
        // proxy joins two shortcut sockets byte for byte, so the kernel
        // splices most bytes past it (weft_abi.h, "Splice"); the proxy
        // still counts them as its connections' bytes.
        let relayedBefore = try proxyTCPBytes()
        expectAllOK(try stress(lab, "198.19.5.11", cases: allCases), "pod -> proxy -> pod")
        let e2 = try events()
        #expect(e2["bytes_redirected", default: 0] - e1["bytes_redirected", default: 0] >= 32 << 20,
                "proxy hops did not take the shortcut: \(e2)")
        let spliced = e2["bytes_spliced", default: 0] - e1["bytes_spliced", default: 0]
        #expect(spliced >= 16 << 20, "no bytes were spliced past the proxy: \(e2)")
        #expect(e2["splice_wait", default: 0] > e1["splice_wait", default: 0],
                "no spliced direction ever waited for the proxy (the backpressure case must make it)")
        try expectProxyCounts(spliced, since: relayedBefore)

        // A reader using splice() is not a receiver: its direction stays on
        // TCP (splice would never see redirected bytes), and it gets them all.
        expectAllOK(try stress(lab, "198.19.5.12", cases: "splice_recv,sizes"), "into a splice() reader")
        let e3 = try events()
        #expect(e3["flow_tcp_not_receiver", default: 0] > e2["flow_tcp_not_receiver", default: 0])
        // The client's sockets to that reader can only be given bytes: they
        // sit in the SOCKHASH no sk_msg program is attached to, so their
        // sends are plain TCP's (no message of this phase went through the
        // program to TCP), and the reader's answers were still redirected
        // into them.
        #expect(e3["socket_receive_only", default: 0] > e2["socket_receive_only", default: 0])
        #expect(e3["messages_tcp", default: 0] == e2["messages_tcp", default: 0],
                "sends of receive-only sockets ran the sk_msg program: \(e2) -> \(e3)")
        #expect(e3["messages_redirected", default: 0] > e2["messages_redirected", default: 0],
                "the splice() reader's answers were not redirected into the client's receive-only sockets")

        // Entries leave the map as sockets close (closing handshakes of the
        // last connections can take many seconds when the whole suite runs
        // on two cores: a clean-clone CI saw 2 entries after 500 tries, about
        // 10-15 s, once). The wait, 30 s, stays under the kernel's 60 s FIN_WAIT2 timer, so a side
        // that never closes is still caught.
        var sockets = -1
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            sockets = (try shortcut()["sockets"] as? NSNumber)?.intValue ?? -1
            if sockets == 0 { break }
            usleep(20_000)
        }
        // (On failure: what TCP sockets every lab namespace still has, to
        // tell a connection still open from an entry the map kept.)
        let left = sockets == 0 ? "" : (try? LabHarness.shell(raw: ["sh", "-c", """
            for n in $(ip netns list | awk '{print $1}' | grep '^weft'); do echo "== $n"; ip netns exec "$n" ss -tanoH; done
            """])) ?? ""
        #expect(sockets == 0, "sockets left in the shortcut's map after every connection closed; TCP sockets now:\n\(left)")
        #expect(e3["socket_added", default: 0] == e3["socket_removed", default: 0] + sockets)

        // The metrics say the same.
        let metrics = try LabHarness.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/n1/agent.sock", "http://agent/metrics"])
        #expect(metrics.contains("weft_shortcut_enabled 1"))
        #expect(metrics.contains("weft_shortcut_events_total{event=\"bytes_redirected\"}"))
    }

    /// Neither end is a receiver (the server reads with splice() in one
    /// case): the kernel still takes the bytes past the proxy, out of the
    /// proxy's own socket to the far end by TCP (weft_abi.h, "Splice"), so
    /// each end reads plain TCP.
    @Test func opaqueTCPBetweenPodsThatAreNoReceiversIsSplicedPastTheProxyByTCP() throws {
        let lab = try LabHarness(files: ["all.yaml": manifests, "mesh.yaml": meshConfig(enabled: true)], nodes: 1)
        defer { lab.down() }
        try waitForServers(lab)
        let target = "198.19.5.13"
        let relayedBefore = try proxyTCPBytes()

        // Request and answer, 2,000 times 200 bytes each way: all but the
        // first exchanges skip the proxy in both directions (each direction
        // alone is 400,000 bytes, so over 720,000 spliced takes both).
        let e0 = try events()
        expectAllOK(try stress(lab, target, cases: "pingpong", from: "loner"), "request and answer")
        let e1 = try events()
        #expect(e1["bytes_spliced", default: 0] - e0["bytes_spliced", default: 0] >= 720_000,
                "request and answer were not spliced past the proxy both ways: \(e0) -> \(e1)")

        // Every case, both ends on plain TCP, through the proxy and past it;
        // the splice() reader gets every byte.
        expectAllOK(try stress(lab, target, cases: allCases + ",splice_recv,long", from: "loner"), "no receiver at either end")
        let e2 = try events()
        #expect(e2["bytes_spliced", default: 0] - e1["bytes_spliced", default: 0] >= 1 << 20,
                "the other cases spliced (almost) nothing: \(e1) -> \(e2)")
        let spliced = e2["bytes_spliced", default: 0] - e0["bytes_spliced", default: 0]
        try expectProxyCounts(spliced, since: relayedBefore)

        // The proxy rolled under a spliced stream: the new proxy clears
        // every splice entry as it starts, the old one goes on relaying
        // (arming again as it writes) until the stream ends, in order.
        let e3 = try events()
        let rolling = try backgroundStress(target, cases: "long,pingpong", seconds: 3, from: "loner")
        usleep(1_000_000)
        let roll = try LabHarness.run(["lab", "restart-proxy", "n1"])
        #expect(roll.status == 0, "restart-proxy: \(roll.output)")
        let rolled = try rolling.finish()
        #expect(rolled["ok"] as? Bool == true, "a spliced stream across a proxy roll: \(rolled)")
        #expect(try events()["bytes_spliced", default: 0] > e3["bytes_spliced", default: 0])
    }

    /// `express`: the Upgrade request reaches the express path, which hands
    /// the connection over to the full path, or (`WEFT_PROXY_EXPRESS=0`)
    /// the full path from the first byte; each counts the bytes its own way.
    @Test(arguments: [true, false])
    func upgradedConnectionsBetweenPodsAreSplicedPastTheProxyAfterTheirHTTP(express: Bool) throws {
        let lab = try LabHarness(files: ["all.yaml": manifests, "mesh.yaml": meshConfig(enabled: true)], nodes: 1,
                                 environment: express ? [:] : ["WEFT_PROXY_EXPRESS": "0"])
        defer { lab.down() }
        try waitForServers(lab)
        // Every connection starts as an HTTP/1.1 Upgrade (as a WebSocket
        // does), with the case's first bytes sent right behind the request,
        // before the 101; the proxy routes it as HTTP, then joins the two
        // connections. The first exchange, answered while the proxy holds
        // bytes, goes through it; the rest skip it both ways, counted from
        // each peer's first byte, its HTTP ones included.
        for (target, client, what) in [("198.19.5.13", "loner", "no receiver at either end"),
                                       ("198.19.5.11", "client", "receivers at both ends")] {
            let e0 = try events()
            let up0 = try LabHarness.proxyStat("n1", "upgrades_total")
            let (b0, s0) = (try LabHarness.proxyStat("n1", "upgraded_bytes_total"),
                            try LabHarness.proxyStat("n1", "upgraded_bytes_spliced_total"))
            expectAllOK(try stress(lab, target, cases: "pingpong", from: client, upgrade: true), "upgraded, \(what)")
            let e1 = try events()
            let spliced = e1["bytes_spliced", default: 0] - e0["bytes_spliced", default: 0]
            #expect(spliced >= 720_000, "\(what): request and answer after the Upgrade were not spliced both ways: \(e0) -> \(e1)")
            #expect(try LabHarness.proxyStat("n1", "upgrades_total") == up0 + 1)
            // (The express path hands an Upgrade over; off, it never ran.)
            #expect((try LabHarness.proxyStat("n1", "express_handovers_total") > 0) == express)
            // The proxy's own counts take in what went around it (added as
            // the connection ends).
            var (b1, s1) = (b0, s0)
            for _ in 0..<100 {
                (b1, s1) = (try LabHarness.proxyStat("n1", "upgraded_bytes_total"),
                            try LabHarness.proxyStat("n1", "upgraded_bytes_spliced_total"))
                if s1 - s0 >= spliced { break }
                usleep(50_000)
            }
            #expect(s1 - s0 == spliced && b1 - b0 >= 800_000, "\(what): the proxy counted \(b1 - b0) bytes, \(s1 - s0) spliced; the kernel spliced \(spliced)")

            // Every case over upgraded connections: each byte in order,
            // whichever way it went.
            expectAllOK(try stress(lab, target, cases: allCases + (client == "loner" ? ",splice_recv" : ""), from: client,
                                   upgrade: true), "every case upgraded, \(what)")
            #expect(try events()["bytes_spliced", default: 0] - e1["bytes_spliced", default: 0] >= 1 << 20,
                    "\(what): the other upgraded cases spliced (almost) nothing")
        }

        // Splicing off: the proxy relays upgraded connections itself, and
        // what a client sends behind its request goes on at once, though
        // the client then waits (server_first: the server says nothing
        // until it has read it; those bytes once waited in the proxy for
        // the client's next read).
        let generations = try lab.generations().filter { $0.key == "n1" }
        try lab.write("mesh.yaml", meshConfig(enabled: true, splice: false))
        try lab.waitForGeneration(after: generations)
        let off = try events()
        expectAllOK(try stress(lab, "198.19.5.13", cases: "server_first,pingpong,half_close", from: "loner", upgrade: true),
                    "upgraded, splicing off")
        #expect(try events()["bytes_spliced", default: 0] == off["bytes_spliced", default: 0], "bytes were spliced with splicing off")
    }

    @Test func agentRestartAndSwitchingOffMidStreamLoseNothing() throws {
        let lab = try LabHarness(files: ["all.yaml": manifests, "mesh.yaml": meshConfig(enabled: true)], nodes: 1)
        defer { lab.down() }
        try waitForServers(lab)

        // A paced echo stream (~4 s) over each path while the agent restarts.
        let runs = try ["198.19.5.10", "198.19.5.11"].map { target in
            try backgroundStress(target, cases: "long", seconds: 4)
        }
        usleep(1_000_000)
        let restart = try LabHarness.run(["lab", "restart-agent", "n1"])
        #expect(restart.status == 0, "restart-agent: \(restart.output)")
        for run in runs {
            let out = try run.finish()
            let long = (out["cases"] as? [String: [String: Any]])?["long"]
            #expect(out["ok"] as? Bool == true, "stream across an agent restart: \(long ?? out)")
        }
        #expect(try shortcut()["state"] as? String == "on")

        // Splicing switched off in the middle of a stream through the proxy:
        // spliced directions go back through the proxy, behind the bytes
        // already spliced; then no byte is spliced, the rest still redirected.
        let spliceRun = try backgroundStress("198.19.5.11", cases: "long", seconds: 4)
        usleep(1_500_000)
        // (Armed: an entry each way while splicing is on.)
        #expect(try spliceEntries() >= 2)
        var generations = try lab.generations().filter { $0.key == "n1" }
        try lab.write("mesh.yaml", meshConfig(enabled: true, splice: false))
        try lab.waitForGeneration(after: generations)
        let spliceOut = try spliceRun.finish()
        #expect(spliceOut["ok"] as? Bool == true, "stream across splicing switched off: \(spliceOut)")
        #expect(try shortcut()["splice"] as? Bool == false)
        let noSplice = try events()
        expectAllOK(try stress(lab, "198.19.5.11", cases: "sizes,echo"), "pod -> proxy -> pod, splicing off")
        let noSpliceAfter = try events()
        #expect(noSpliceAfter["bytes_spliced", default: 0] == noSplice["bytes_spliced", default: 0],
                "bytes were spliced with splicing off: \(noSpliceAfter)")
        #expect(noSpliceAfter["bytes_redirected", default: 0] - noSplice["bytes_redirected", default: 0] >= 64 << 20)
        // Nor does the proxy arm a splice for a new connection then (each
        // write of it would cost a report to the kernel for nothing): no
        // entry in the map while a stream runs through it.
        let unarmed = try backgroundStress("198.19.5.11", cases: "long", seconds: 2)
        usleep(1_000_000)
        let armed = try spliceEntries()
        #expect(try unarmed.finish()["ok"] as? Bool == true)
        #expect(armed == 0, "the proxy armed \(armed) splice entries with splicing off")
        generations = try lab.generations().filter { $0.key == "n1" }
        try lab.write("mesh.yaml", meshConfig(enabled: true))
        try lab.waitForGeneration(after: generations)

        // The same while MeshConfig switches the shortcut off: redirected
        // directions move to TCP mid-stream, in order.
        let before = try events()
        let more = try ["198.19.5.10", "198.19.5.11"].map { target in
            try backgroundStress(target, cases: "long", seconds: 4)
        }
        usleep(1_500_000)
        generations = try lab.generations().filter { $0.key == "n1" }
        try lab.write("mesh.yaml", meshConfig(enabled: false))
        try lab.waitForGeneration(after: generations)
        for run in more {
            let out = try run.finish()
            #expect(out["ok"] as? Bool == true, "stream across the switch-off: \(out)")
        }
        let after = try events()
        #expect(after["fallback_switched_off", default: 0] > before["fallback_switched_off", default: 0],
                "no redirected direction noticed the switch: \(after)")
        let state = try shortcut()
        #expect(state["state"] as? String == "off")

        // Off: new connections stay on TCP entirely, and still work.
        expectAllOK(try stress(lab, "198.19.5.10", cases: "sizes,half_close"), "shortcut off")
        // The proxy's own relaying, on plain TCP: a half-close or close from
        // one end reaches the other only after every byte the proxy still
        // holds for it (slow_echo lost up to a megabyte before GlueHandler
        // waited for its writes).
        expectAllOK(try stress(lab, "198.19.5.11", cases: "slow_echo,echo,half_close,reset"), "through the proxy, shortcut off")
        let off = try events()
        #expect(off["flow_redirected", default: 0] == after["flow_redirected", default: 0])
    }
}
