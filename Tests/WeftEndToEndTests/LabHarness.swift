import Foundation
import Glibc
import Testing

/// Drives the real `weft` binary and a real lab. Every test gets a fresh lab
/// from its own manifests and tears it down afterwards, pass or fail.
struct LabHarness {
    static let isRoot = geteuid() == 0
    static let inCI = ProcessInfo.processInfo.environment["CI"] == "true"
    static let canRun = isRoot || inCI
    static let skipReason: Comment = "end-to-end tests need root (network namespaces, cgroups, eBPF); under CI=true this fails instead of skipping"

    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()
    static let tool = packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/labtool.py").path
    static let echoServer = packageRoot.appendingPathComponent("examples/demo/echo_server.py").path
    static let grpcTool = packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/grpctool.py").path

    /// A TrafficPolicy named as the Service it targets, its spec's lines
    /// after the targetRefs.
    static func trafficPolicy(_ name: String, namespace: String, _ spec: String) -> String {
        """
        apiVersion: weft.dev/v1alpha1
        kind: TrafficPolicy
        metadata: {name: \(name), namespace: \(namespace)}
        spec:
          targetRefs: [{group: "", kind: Service, name: \(name)}]
        \(spec.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
        """
    }
    static let l7Server = packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/l7server.py").path
    static let promParse = packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/promparse.py").path
    static let pixels = packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/pixels.py").path
    static let loadTool = packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/loadtool.py").path
    static let otlpCollector = packageRoot.appendingPathComponent("Tests/WeftEndToEndTests/Tools/otlpcollector.py").path

    /// The `weft` built next to the test bundle.
    static var weft: String {
        let here = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        for candidate in [here.appendingPathComponent("weft").path,
                          here.deletingLastPathComponent().appendingPathComponent("weft").path,
                          packageRoot.appendingPathComponent(".build/debug/weft").path]
        where FileManager.default.isExecutableFile(atPath: candidate) {
            return candidate
        }
        return "weft"
    }

    let config: String
    /// With `linkedConfig`: the symlink the agents are given as --config, to `config`.
    let configLink: String?

    /// One lab exists at a time on a machine; suites in different files run
    /// in parallel, so each test holds this from `init` to `down()`.
    private static let labLock = NSLock()

    /// Writes `files` into a new config directory and brings a lab up on it;
    /// `environment` is added to `weft lab up`'s (its agents and proxies
    /// inherit it); `binary`: the weft that runs it (and its agents), if not
    /// this build's; `linkedConfig`: --config is a symlink to the directory.
    init(files: [String: String], nodes: Int = 2, extra: [String] = [], environment: [String: String] = [:],
         binary: String? = nil, linkedConfig: Bool = false) throws {
        try #require(Self.isRoot, "CI=true: end-to-end tests must run as root")
        Self.labLock.lock()
        do {
            try self.init(locked: files, nodes: nodes, extra: extra, environment: environment, binary: binary ?? Self.weft,
                          linkedConfig: linkedConfig)
        } catch {
            Self.labLock.unlock()
            throw error
        }
    }

    private init(locked files: [String: String], nodes: Int, extra: [String], environment: [String: String],
                 binary: String, linkedConfig: Bool) throws {
        config = FileManager.default.temporaryDirectory.appendingPathComponent("weft-e2e-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: config, withIntermediateDirectories: true)
        configLink = linkedConfig ? config + ".link" : nil
        if let configLink { try FileManager.default.createSymbolicLink(atPath: configLink, withDestinationPath: config) }
        for (name, text) in files { try write(name, text) }
        _ = try? Self.run(["lab", "down"])
        let up = try Self.execute(binary, ["lab", "up", "--config", configLink ?? config, "--nodes", "\(nodes)"] + extra, environment: environment)
        guard up.status == 0 else {
            _ = try? Self.run(["lab", "down"])
            try? FileManager.default.removeItem(atPath: config)
            if let configLink { try? FileManager.default.removeItem(atPath: configLink) }
            throw HarnessError("lab up failed: \(up.output)")
        }
    }

    /// A node agent's answer on its status socket (/status, /metrics, ...):
    /// the text, and the text as a JSON object when it is one.
    static func agent(_ node: String, _ path: String) throws -> (text: String, json: [String: Any]?) {
        let text = try shell(raw: ["curl", "-sS", "-m", "5", "--unix-socket", "/run/weft/\(node)/agent.sock", "http://agent\(path)"])
        return (text, (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any])
    }

    /// The last lines of a node agent's log (with its proxy's), for failure messages.
    static func agentLog(_ node: String, lines: Int = 30) -> String {
        let text = (try? String(contentsOfFile: "/run/weft/lab/logs/agent-\(node).log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(lines).joined(separator: "\n")
    }

    /// Tears the lab down; `afterwards` runs before another test may start one.
    func down(_ afterwards: () -> Void = {}) {
        _ = try? Self.run(["lab", "down"])
        try? FileManager.default.removeItem(atPath: config)
        if let configLink { try? FileManager.default.removeItem(atPath: configLink) }
        afterwards()
        Self.labLock.unlock()
    }

    /// Replaces a config file atomically (write + rename), as editors and
    /// `weft apply` do; returns the wall-clock time of the rename.
    @discardableResult
    func write(_ name: String, _ text: String) throws -> Double {
        let tmp = "\(config)/.\(name).tmp"
        try text.write(toFile: tmp, atomically: false, encoding: .utf8)
        guard rename(tmp, "\(config)/\(name)") == 0 else { throw HarnessError("rename \(name)") }
        return Date().timeIntervalSince1970
    }

    /// Runs labtool.py in a pod and decodes its JSON line.
    func tool(in pod: String, _ args: [String]) throws -> [String: Any] { try python(Self.tool, in: pod, args) }

    /// Runs loadtool.py in a pod and decodes its JSON line.
    func load(in pod: String, _ args: [String]) throws -> [String: Any] { try python(Self.loadTool, in: pod, args) }

    /// Runs a Python tool in a pod; its last output line is JSON.
    private func python(_ script: String, in pod: String, _ args: [String]) throws -> [String: Any] {
        let r = try Self.run(["lab", "exec", pod, "--", "/usr/bin/python3", script] + args)
        guard r.status == 0, let line = r.output.split(separator: "\n").last,
              let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw HarnessError("\((script as NSString).lastPathComponent) \(args) in \(pod) failed: \(r.output)")
        }
        return json
    }

    /// Starts loadtool.py in a pod in the background.
    func startLoad(in pod: String, _ args: [String]) throws -> BackgroundRun {
        try BackgroundRun([Self.weft, "lab", "exec", pod, "--", "/usr/bin/python3", Self.loadTool] + args)
    }

    /// Starts labtool.py in a pod in the background.
    func startTool(in pod: String, _ args: [String]) throws -> BackgroundRun {
        try BackgroundRun([Self.weft, "lab", "exec", pod, "--", "/usr/bin/python3", Self.tool] + args)
    }

    /// Runs a command (not weft) and decodes its last line as JSON.
    static func shell(_ argv: [String]) throws -> [String: Any] {
        let out = try shell(raw: argv)
        guard let line = out.split(separator: "\n").last,
              let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw HarnessError("\(argv) failed: \(out)")
        }
        return json
    }

    /// Runs a command (not weft) and returns its output.
    static func shell(raw argv: [String]) throws -> String {
        try execute("/usr/bin/env", argv).output
    }

    /// One of a node proxy's /stats counters (`weft_proxy_<name>`), -1 when absent.
    static func proxyStat(_ node: String, _ name: String) throws -> Int {
        let text = try shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/\(node)/proxy.sock", "http://proxy/stats"])
        return text.split(separator: "\n").first { $0.hasPrefix("weft_proxy_\(name) ") }
            .flatMap { Int($0.split(separator: " ").last ?? "") } ?? -1
    }

    /// Each node agent's config generation, from its status socket.
    func generations(_ nodes: [String] = ["n1", "n2"]) throws -> [String: Int] {
        var out: [String: Int] = [:]
        for node in nodes {
            let text = try Self.shell(raw: ["curl", "-s", "--unix-socket", "/run/weft/\(node)/agent.sock", "http://agent/generation"])
            out[node] = Int(text.split(separator: " ").first ?? "") ?? -1
        }
        return out
    }

    /// Waits until every agent has put a newer generation in force.
    func waitForGeneration(after before: [String: Int]) throws {
        for _ in 0..<200 {
            let now = try generations(Array(before.keys))
            if before.allSatisfy({ (now[$0.key] ?? -1) > $0.value }) { return }
            usleep(10_000)
        }
        throw HarnessError("agents did not apply the change (generations \(before) -> \(try generations()))")
    }

    @discardableResult
    static func run(_ args: [String]) throws -> (status: Int32, output: String) {
        try execute(weft, args)
    }

    /// Runs a program to completion: its exit status and its output and errors together.
    static func execute(_ program: String, _ args: [String], environment: [String: String] = [:])
        throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        if !environment.isEmpty {
            p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Leftovers a test must never leave.
    static func leftovers() -> [String] {
        var out: [String] = []
        let netns = ((try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "")
            .split(separator: "\n").filter { $0.contains("/run/netns/weft") }
        out += netns.map(String.init)
        if let pins = try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/bpf/weft"), !pins.isEmpty {
            out += pins.filter { !$0.hasPrefix("test-kernel-") }.map { "/sys/fs/bpf/weft/\($0)" }
        }
        return out
    }
}

struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// A process running while the test does other things; `finish()` waits and
/// returns its output.
final class BackgroundRun: @unchecked Sendable {
    let process = Process()
    let pipe = Pipe()
    private var data = Data()
    private let reader: Thread

    init(_ argv: [String]) throws {
        process.executableURL = URL(fileURLWithPath: argv[0])
        process.arguments = Array(argv.dropFirst())
        process.standardOutput = pipe
        process.standardError = pipe
        let handle = pipe.fileHandleForReading
        let box = DataBox()
        reader = Thread { box.data = handle.readDataToEndOfFile() }
        self.box = box
        try process.run()
        reader.start()
    }

    private let box: DataBox
    private final class DataBox: @unchecked Sendable { var data = Data() }

    func finish() throws -> [String: Any] {
        process.waitUntilExit()
        while !reader.isFinished { usleep(5_000) }
        let text = String(decoding: box.data, as: UTF8.self)
        guard let line = text.split(separator: "\n").last,
              let json = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw HarnessError("background tool failed: \(text)")
        }
        return json
    }
}

/// What labtool's `h2-slow` saw of a header block the proxy cut after a
/// MeshConfig `requestHeaderTimeout` of 1s: GOAWAY (ENHANCE_YOUR_CALM, the
/// last whole request's stream, the reason as debug data) between one and
/// one and a quarter timeouts after the block began (and slack for a busy
/// machine), then the close, the block trickled meanwhile.
func expectHeadCutByGoAway(_ r: [String: Any], _ name: String, lastStream: Int,
                           sourceLocation: SourceLocation = #_sourceLocation) {
    let goAway = r["goaway"] as? [String: Any] ?? [:]
    #expect(goAway["error_code"] as? Int == 0xB, "\(name): \(r)", sourceLocation: sourceLocation)
    #expect(goAway["last_stream_id"] as? Int == lastStream, "\(name): \(r)", sourceLocation: sourceLocation)
    #expect((goAway["debug"] as? String)?.hasSuffix("within 1s (MeshConfig spec.proxy.requestHeaderTimeout)") == true,
            "\(name): \(r)", sourceLocation: sourceLocation)
    let at = goAway["at"] as? Double ?? .infinity
    #expect(at >= 0.95 && at < 2.5, "\(name): GOAWAY after \(at) s: \(r)", sourceLocation: sourceLocation)
    #expect((r["closed"] as? Double).map { $0 >= at } == true, "\(name): not closed after GOAWAY: \(r)", sourceLocation: sourceLocation)
    #expect(r["sent"] as? Int ?? 0 >= 4, "\(name): the block was not trickled: \(r)", sourceLocation: sourceLocation)
}

/// WebSocket over HTTP/2 (RFC 8441, ExtendedConnect) from `pod` to the
/// WebSocket echo behind `service` port 80 (l7server.py): labtool's
/// `h2-ws-echo` finds extended CONNECT announced, gets each of two
/// WebSockets opened on one h2c connection (200, the backend's fields but
/// none of the HTTP/1.1 handshake's), three frames echoed by a pod of
/// `podPrefix` and the close answered on each, the stream ended, and a GET
/// on a third stream answered meanwhile; the proxy of `node` counts both
/// upgrades, and each as the 200 its client got.
func expectWebSocketsOverHTTP2(_ lab: LabHarness, in pod: String, to service: String, node: String = "n1",
                               podPrefix: String = "v1-", sourceLocation: SourceLocation = #_sourceLocation) throws {
    let before = try LabHarness.proxyStat(node, "upgrades_total")
    let informational = try LabHarness.proxyStat(node, "responses_1xx")
    let r = try lab.tool(in: pod, ["h2-ws-echo", service, "80", "hi", "2"])
    #expect(r["announced"] as? Bool == true, "\(r)", sourceLocation: sourceLocation)
    #expect(r["get_status"] as? String == "200" && r["get_path"] as? String == "/beside-websockets", "\(r)",
            sourceLocation: sourceLocation)
    let streams = r["streams"] as? [[String: Any]] ?? []
    #expect(streams.count == 2, "\(r)", sourceLocation: sourceLocation)
    for stream in streams {
        let headers = stream["headers"] as? [String: String] ?? [:]
        let pod = headers["x-pod"] ?? ""
        #expect(stream["status"] as? String == "200" && pod.hasPrefix(podPrefix), "\(stream)", sourceLocation: sourceLocation)
        #expect(headers["sec-websocket-accept"] == nil && headers["upgrade"] == nil && headers["connection"] == nil,
                "\(stream)", sourceLocation: sourceLocation)
        let echoes = stream["echoes"] as? [String] ?? []
        #expect(echoes.count == 3 && echoes.allSatisfy { $0.hasPrefix("\(pod):hi-") }, "\(stream)", sourceLocation: sourceLocation)
        #expect(stream["close"] is String && stream["ended"] as? Bool == true, "\(stream)", sourceLocation: sourceLocation)
    }
    #expect(try LabHarness.proxyStat(node, "upgrades_total") - before == 2, sourceLocation: sourceLocation)
    // Counted with the status the client got (200), not the backend's 101.
    #expect(try LabHarness.proxyStat(node, "responses_1xx") == informational, sourceLocation: sourceLocation)
}
