import Foundation
import Glibc
import WeftCore
import WeftIdentity
import WeftStatus
import WeftKernel

/// `weft lab`: nodes and pods as network namespaces and cgroups on this
/// machine, one `weft agent` per node. One lab at a time; its record lives in
/// /run/weft/lab/state.json, written before anything is created so that
/// `weft lab down` can always find what to remove.
public enum Lab {
    public static let runDirectory = "/run/weft/lab"
    static var statePath: String { "\(runDirectory)/state.json" }
    public static var logDirectory: String { "\(runDirectory)/logs" }

    public static func loadPlan() -> LabPlan? {
        guard let data = FileManager.default.contents(atPath: statePath) else { return nil }
        return try? JSONDecoder().decode(LabPlan.self, from: data)
    }

    static func save(_ plan: LabPlan) throws {
        try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(plan).write(to: URL(fileURLWithPath: statePath), options: .atomic)
    }

    /// Builds the lab, starts pods and agents, waits for the agents to serve.
    public static func up(configDirectory: String, nodes: Int, weftBinary: String, certTTL: String? = nil,
                          mtls: Bool = true, proxyThreads: Int? = nil, proxyPinThreads: Bool = false, say: (String) -> Void) throws -> LabPlan {
        try Host.preflight()
        try Host.ensureBPFFS()
        guard loadPlan() == nil else { throw LabError("a lab is already up; run `weft lab down` first") }
        guard let mount = Host.cgroup2Mount() else { throw LabError("no cgroup v2 mount") }
        let config = URL(fileURLWithPath: configDirectory).standardizedFileURL.path
        let state: ClusterState
        switch ManifestSource.load(paths: [config]) {
        case .success(let s): state = s
        case .failure(let errors): throw LabError("the lab's manifests are invalid:\n\(errors)")
        }
        var plan = try LabPlan.make(state: state, configDirectory: config, nodeCount: nodes, cgroupMount: mount)
        plan.certTTL = certTTL
        plan.noMTLS = mtls ? nil : true
        plan.proxyThreads = proxyThreads
        plan.proxyPinThreads = proxyPinThreads ? true : nil
        try save(plan)
        do {
            for (netns, lines) in plan.networkBatches() {
                let prefix = netns.map { ["-n", $0] } ?? []
                try ProcessRunner.run(["ip"] + prefix + ["-batch", "-"], input: lines.joined(separator: "\n") + "\n")
            }
            for node in plan.nodes {
                try ProcessRunner.run(["ip", "netns", "exec", node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            }
            say("network: fabric + \(plan.nodes.count) node(s) + \(plan.pods.count) pod(s) in 198.18.0.0/16")
            for path in plan.nodes.flatMap({ [$0.cgroup, $0.agentCgroup] }) + plan.pods.map(\.cgroup) {
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            }
            try FileManager.default.createDirectory(atPath: logDirectory, withIntermediateDirectories: true)
            try makeCA(plan)
            for i in plan.nodes.indices {
                let node = plan.nodes[i]
                plan.nodes[i].agentPid = try spawn(
                    weftBinary, netns: node.netns, cgroup: node.agentCgroup, log: "\(logDirectory)/agent-\(node.name).log",
                    command: agentCommand(weftBinary, config: config, node: node, plan: plan),
                    environment: [:], workingDirectory: config)
                try save(plan)
            }
            for node in plan.nodes {
                try waitForAgent(node: node.name, pid: node.agentPid ?? 0)
                say("agent \(node.name): running (pid \(node.agentPid ?? 0)), programs attached to \(node.cgroup)")
            }
            for i in plan.pods.indices {
                let pod = plan.pods[i]
                guard let command = pod.command else { continue }
                let parts = pod.name.split(separator: "/").map(String.init)
                plan.pods[i].pid = try spawn(
                    weftBinary, netns: pod.netns, cgroup: pod.cgroup,
                    log: "\(logDirectory)/pod-\(parts.joined(separator: "-")).log",
                    command: ["/bin/sh", "-c", command],
                    environment: ["WEFT_POD_NAME": parts.last ?? "", "WEFT_POD_NAMESPACE": parts.first ?? "",
                                  "WEFT_POD_IP": pod.address, "WEFT_NODE": pod.node],
                    workingDirectory: config)
                try save(plan)
            }
            say("pods: \(plan.pods.map { "\($0.name)@\($0.node)=\($0.address)" }.joined(separator: ", "))")
        } catch {
            say("lab up failed: \(error); tearing down what was created")
            down(say: { _ in })
            throw error
        }
        return plan
    }

    /// Starts `command` detached, in a netns and cgroup, through
    /// `weft lab run-in` (which joins them and execs).
    static func spawn(_ weft: String, netns: String, cgroup: String, log: String, command: [String],
                      environment: [String: String], workingDirectory: String) throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: weft)
        process.arguments = ["lab", "run-in", "--netns", netns, "--cgroup", cgroup, "--"] + command
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        process.currentDirectoryURL = URL(fileURLWithPath: workingDirectory)
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let handle = FileHandle(forWritingAtPath: log)
        _ = try? handle?.seekToEnd()
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return process.processIdentifier
    }

    /// Stops a node's agent (SIGTERM, or SIGKILL to simulate a crash) and
    /// starts a new one over the same pins, as a restart or upgrade would.
    public static func restartAgent(node name: String, kill9: Bool, weftBinary: String) throws -> (old: Int32, new: Int32) {
        guard var plan = loadPlan() else { throw LabError("no lab is up") }
        guard let i = plan.nodes.firstIndex(where: { $0.name == name }) else { throw LabError("no node \(name) in the lab") }
        let node = plan.nodes[i]
        let old = node.agentPid ?? 0
        if old > 0 {
            kill(old, kill9 ? SIGKILL : SIGTERM)
            for _ in 0..<250 where kill(old, 0) == 0 && !isZombie(old) { usleep(20_000) }
        }
        let new = try spawn(weftBinary, netns: node.netns, cgroup: node.agentCgroup,
                            log: "\(logDirectory)/agent-\(name).log",
                            command: agentCommand(weftBinary, config: plan.configDirectory, node: node, plan: plan),
                            environment: [:], workingDirectory: plan.configDirectory)
        plan.nodes[i].agentPid = new
        try save(plan)
        try waitForAgent(node: name, pid: new)
        return (old, new)
    }

    /// A lab node's agent; its proxy listens on the node's pod gateway,
    /// the address every pod of the node routes through.
    static func agentCommand(_ weft: String, config: String, node: LabPlan.Node, plan: LabPlan) -> [String] {
        [weft, "agent", "--config", config, "--node", node.name, "--cgroup", node.cgroup, "--proxy-address", node.gateway]
            + (plan.noMTLS == true ? [] : ["--ca", caDirectory + "/" + node.name])
            + (plan.certTTL.map { ["--cert-ttl", $0] } ?? [])
            + (plan.proxyThreads.map { ["--proxy-threads", "\($0)"] } ?? [])
            + (plan.proxyPinThreads == true ? ["--proxy-pin-threads"] : [])
    }

    /// The lab's mesh CA: a root for trust domain `cluster.local` and one
    /// intermediate per node (as `weft ca init` and `weft ca node` make
    /// them), under the root-only lab directory; each agent gets its own.
    public static let caDirectory = runDirectory + "/ca"
    public static let trustDomain = "cluster.local"

    static func makeCA(_ plan: LabPlan) throws {
        let rootDirectory = caDirectory + "/root"
        let root: MeshCA
        if let existing = try? MeshCA.load(from: rootDirectory) {
            root = existing
        } else {
            root = try MeshCA.root(trustDomain: trustDomain)
            try root.write(to: rootDirectory)
        }
        for node in plan.nodes where (try? MeshCA.load(from: caDirectory + "/" + node.name)) == nil {
            try root.intermediate(node: node.name).write(to: caDirectory + "/" + node.name)
        }
    }

    /// Replaces a node's proxy: a rolling restart through its agent
    /// (SIGUSR2), or SIGKILL to the proxy itself to simulate a crash (the
    /// agent then starts a new one). Returns the old and the new pid.
    public static func restartProxy(node name: String, kill9: Bool) throws -> (old: Int32, new: Int32) {
        guard let plan = loadPlan() else { throw LabError("no lab is up") }
        guard let node = plan.nodes.first(where: { $0.name == name }), let agent = node.agentPid else {
            throw LabError("no node \(name) in the lab")
        }
        let pidFile = "/run/weft/\(name)/proxy.pid"
        func current() -> Int32? {
            (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        guard let old = current() else { throw LabError("node \(name) runs no proxy (no \(pidFile))") }
        kill(kill9 ? old : agent, kill9 ? SIGKILL : SIGUSR2)
        let deadline = Date().addingTimeInterval(15)
        var seen = "nothing"
        while Date() < deadline {
            // The pid file names the new proxy, and the proxy behind the
            // status socket says it is that one.
            if let new = current(), new != old {
                do {
                    let text = try UnixHTTP.get(socket: "/run/weft/\(name)/proxy.sock", path: "/generation", timeoutSeconds: 1)
                    let answered = text.split(separator: " ").dropFirst(2).first.flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
                    if answered == new { return (old, new) }
                    seen = "pid file \(new), status socket answered \(text.trimmingCharacters(in: .whitespacesAndNewlines).debugDescription)"
                } catch {
                    seen = "pid file \(new), status socket: \(error)"
                }
            } else {
                seen = "pid file still \(current().map(String.init) ?? "absent")"
            }
            usleep(10_000)
        }
        throw LabError("node \(name): no new proxy answered within 15 s; last seen: \(seen) (see \(logDirectory)/agent-\(name).log)")
    }

    static func waitForAgent(node: String, pid: Int32) throws {
        let socket = "/run/weft/\(node)/agent.sock"
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if kill(pid, 0) != 0 {
                let log = (try? String(contentsOfFile: "\(logDirectory)/agent-\(node).log", encoding: .utf8)) ?? ""
                throw LabError("agent \(node) exited during start:\n\(log.suffix(2000))")
            }
            if (try? UnixHTTP.get(socket: socket, path: "/healthz")) != nil { return }
            usleep(20_000)
        }
        throw LabError("agent \(node) did not come up within 30 s (see \(logDirectory)/agent-\(node).log)")
    }

    /// Removes every trace of the lab: processes (by pid, found in the lab's
    /// own cgroups), network namespaces, cgroups, pins. Works from the state
    /// file, and sweeps `weft-` namespaces and lab cgroups even without it.
    public static func down(say: (String) -> Void) {
        let plan = loadPlan()
        let mount = Host.cgroup2Mount() ?? "/sys/fs/cgroup"
        let roots = ["\(mount)/weft-lab", "\(mount)/weft-lab-agents"]
        // Agents first (SIGTERM: they exit leaving pins, which go below), then pods.
        var pids = Set(plan?.nodes.compactMap(\.agentPid) ?? [])
        pids.formUnion(plan?.pods.compactMap(\.pid) ?? [])
        var killed: Set<Int32> = []
        // Rounds: a pod's shell may fork while we kill it, so rescan the lab's
        // cgroups until no process is left in them.
        for _ in 0..<10 {
            for root in roots { pids.formUnion(pidsUnder(root)) }
            pids.subtract(killed.filter { kill($0, 0) != 0 })
            if pids.isEmpty { break }
            terminate(pids)
            killed.formUnion(pids)
            pids = []
        }
        pids = killed
        for root in roots { removeCgroups(root) }
        let netns = ((try? ProcessRunner.run(["ip", "netns", "list"])) ?? "")
            .split(separator: "\n").compactMap { $0.split(separator: " ").first.map(String.init) }
            .filter { $0.hasPrefix("weft-") }
        for name in netns { _ = try? ProcessRunner.run(["ip", "netns", "delete", name]) }
        for node in plan?.nodes ?? [] {
            try? Datapath.uninstall(pinDirectory: Datapath.defaultPinDirectory(node: node.name))
            try? FileManager.default.removeItem(atPath: "/run/weft/\(node.name)")
        }
        try? FileManager.default.removeItem(atPath: runDirectory)
        if (try? FileManager.default.contentsOfDirectory(atPath: "/run/weft"))?.isEmpty == true {
            try? FileManager.default.removeItem(atPath: "/run/weft")
        }
        say("lab down: \(pids.count) process(es), \(netns.count) network namespace(s), cgroups and pins removed")
    }

    static func pidsUnder(_ root: String) -> Set<Int32> {
        var out: Set<Int32> = []
        guard let walker = FileManager.default.enumerator(atPath: root) else { return out }
        var dirs = [root]
        while let sub = walker.nextObject() as? String { dirs.append("\(root)/\(sub)") }
        for dir in dirs where !dir.hasSuffix("cgroup.procs") {
            let procs = (try? String(contentsOfFile: "\(dir)/cgroup.procs", encoding: .utf8)) ?? ""
            out.formUnion(procs.split(separator: "\n").compactMap { Int32($0) })
        }
        return out
    }

    static func terminate(_ pids: Set<Int32>) {
        for pid in pids { kill(pid, SIGTERM) }
        let deadline = Date().addingTimeInterval(3)
        var alive = pids
        while !alive.isEmpty && Date() < deadline {
            for pid in alive { _ = waitpid(pid, nil, WNOHANG) }
            alive = alive.filter { kill($0, 0) == 0 && !isZombie($0) }
            if !alive.isEmpty { usleep(20_000) }
        }
        for pid in alive { kill(pid, SIGKILL) }
        for pid in alive { _ = waitpid(pid, nil, WNOHANG) }
    }

    static func isZombie(_ pid: Int32) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return true }
        return stat[stat.index(close, offsetBy: 2)] == "Z"
    }

    /// rmdir bottom-up (a cgroup directory is removed with rmdir, not unlink),
    /// retrying while killed processes finish leaving it.
    static func removeCgroups(_ root: String) {
        for _ in 0..<250 {
            guard FileManager.default.fileExists(atPath: root) else { return }
            var dirs: [String] = [root]
            if let walker = FileManager.default.enumerator(atPath: root) {
                while let sub = walker.nextObject() as? String {
                    var isDir: ObjCBool = false
                    if FileManager.default.fileExists(atPath: "\(root)/\(sub)", isDirectory: &isDir), isDir.boolValue {
                        dirs.append("\(root)/\(sub)")
                    }
                }
            }
            for dir in dirs.sorted(by: { $0.count > $1.count }) { rmdir(dir) }
            if FileManager.default.fileExists(atPath: root) { usleep(20_000) }
        }
    }
}
