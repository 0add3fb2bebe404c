import Foundation
import Testing

/// `weft validate` and `weft apply` through the real binary; no root needed.
@Suite struct ConfigCommandTests {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-apply-\(UUID().uuidString.prefix(8))").path

    func file(_ name: String, _ text: String) throws -> String {
        let path = "\(dir)/\(name)"
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    static let service = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop}
        spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{port: 80}]}
        """

    @Test func applyValidatesAgainstTheWholeConfigAndWritesNothingOnError() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config"
        _ = try file("config/services.yaml", Self.service)
        // Same clusterIP under another name: refused with file:doc:field, nothing written.
        let clash = try file("incoming/other.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: api,"))
        let refused = try LabHarness.run(["apply", "-f", clash, "--config", config])
        #expect(refused.status == 1)
        #expect(refused.output.contains("other.yaml:1:spec.clusterIP: clusterIP 198.19.0.10 is already used by Service shop/web"), "\(refused.output)")
        #expect(refused.output.contains("nothing applied"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: config) == ["services.yaml"])

        let good = try file("incoming/api.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: api,")
                                .replacingOccurrences(of: "198.19.0.10", with: "198.19.0.11"))
        let applied = try LabHarness.run(["apply", "-f", good, "--config", config])
        #expect(applied.status == 0, "\(applied.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config).sorted() == ["api.yaml", "services.yaml"])
        let validate = try LabHarness.run(["validate", "-f", config])
        #expect(validate.status == 0)
        #expect(validate.output.contains("valid: 2 Service(s), 0 Workload(s)"))
    }

    @Test func validateListsEveryErrorAndExitsNonZero() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let bad = try file("bad.yaml", Self.service.replacingOccurrences(of: "port: 80", with: "port: 99999")
                           + "\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n")
        let r = try LabHarness.run(["validate", "-f", bad])
        #expect(r.status == 1)
        #expect(r.output.contains("bad.yaml:1:spec.ports[0].port: port must be between 1 and 65535, got 99999"), "\(r.output)")
        #expect(r.output.contains("bad.yaml:2:kind: unknown kind \"Pod\""), "\(r.output)")
        let missing = try LabHarness.run(["validate", "-f", "\(dir)/nope"])
        #expect(missing.status == 1)
        #expect(missing.output.contains("no such file or directory"))
    }

    /// Flags are checked before anything is loaded: a bad one exits with
    /// the flag named and nothing made in the kernel.
    @Test func agentRefusesBadProxyThreads() throws {
        for bad in ["0", "257", "-1"] {
            let r = try LabHarness.run(["agent", "--config", "/tmp", "--node", "weft-badflag", "--proxy-threads=\(bad)"])
            #expect(r.status == 64, "\(r.status): \(r.output)")
            #expect(r.output.contains("--proxy-threads must be 1-256, got \(bad)"), "\(r.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/weft-badflag"))
        let lab = try LabHarness.run(["lab", "up", "--config", "/nonexistent/weft-badflag", "--proxy-threads", "0"])
        #expect(lab.status == 64 && lab.output.contains("--proxy-threads must be 1-256, got 0"), "\(lab.output)")
    }

    @Test(.enabled(if: LabHarness.canRun, LabHarness.skipReason))
    func agentRefusesWithOneSentenceWithoutPrivilege() throws {
        try #require(LabHarness.isRoot, "CI=true: must run as root to drop privileges")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        p.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                       LabHarness.weft, "agent", "--config", "/tmp", "--node", "weft-unprivileged"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 2)
        #expect(out == "weft agent: weft agent needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load eBPF programs; run it as root.\n", "\(out)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/weft-unprivileged"))
    }

    /// `weft agent --uninstall` takes the node proxy with the datapath: the
    /// proxy exits, and the files the agent wrote for it (route table, its
    /// generation, the identity bundle with private keys) go with the run
    /// directory; anything else there is left and named.
    @Test(.enabled(if: LabHarness.canRun, LabHarness.skipReason))
    func agentUninstallRemovesTheProxyAndItsRunState() throws {
        try #require(LabHarness.isRoot, "CI=true: must run as root")
        let node = "weft-e2e-uninstall"
        let run = "/run/weft/\(node)"
        let mounts = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
        var cgroup2: String?
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count > 2, fields[2] == "cgroup2" { cgroup2 = String(fields[1]); break }
        }
        let cgroup = try #require(cgroup2, "no cgroup v2 mount") + "/" + node
        let config = try file("agent/web.yaml", """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{name: http, port: 80, appProtocol: http}]}
            """)
        mkdir(cgroup, 0o755)
        let agent = Process()
        agent.executableURL = URL(fileURLWithPath: LabHarness.weft)
        agent.arguments = ["agent", "--config", (config as NSString).deletingLastPathComponent, "--node", node,
                           "--cgroup", cgroup, "--metrics-addr", "127.0.0.1:0"]
        agent.standardOutput = FileHandle.nullDevice
        agent.standardError = FileHandle.nullDevice
        try agent.run()
        defer {
            if agent.isRunning { agent.terminate(); agent.waitUntilExit() }
            _ = try? LabHarness.run(["agent", "--node", node, "--uninstall"])
            try? FileManager.default.removeItem(atPath: run)  // also when the uninstall failed to
            rmdir(cgroup)
            try? FileManager.default.removeItem(atPath: dir)
        }
        var proxyPid: Int32?
        for _ in 0..<100 where proxyPid == nil || !FileManager.default.fileExists(atPath: run + "/proxy-table.json") {
            usleep(50_000)
            proxyPid = (try? String(contentsOfFile: run + "/proxy.pid", encoding: .utf8))
                .flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        let pid = try #require(proxyPid, "no proxy started")
        agent.terminate()
        agent.waitUntilExit()
        // The agent exits alone; its proxy stays until the uninstall.
        #expect(kill(pid, 0) == 0, "the proxy went with the agent")
        // Stand-ins for a bundle the agent would write with a CA, and for a
        // file that is not the agent's.
        try "{}".write(toFile: run + "/identities.json", atomically: false, encoding: .utf8)
        try "kept\n".write(toFile: run + "/notes.txt", atomically: false, encoding: .utf8)
        let first = try LabHarness.run(["agent", "--node", node, "--uninstall"])
        #expect(first.status == 0, "\(first.output)")
        #expect(first.output.contains("left in \(run): notes.txt"), "\(first.output)")
        #expect(kill(pid, 0) != 0, "the proxy still runs after the uninstall")
        let left = (try? FileManager.default.contentsOfDirectory(atPath: run)) ?? []
        #expect(left == ["notes.txt"], "\(left)")
        unlink(run + "/notes.txt")
        let again = try LabHarness.run(["agent", "--node", node, "--uninstall"])
        #expect(!FileManager.default.fileExists(atPath: run), "\(again.output)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/\(node)"))
    }
}
