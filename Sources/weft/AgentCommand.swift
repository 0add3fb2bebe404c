import ArgumentParser
import Foundation
import Logging
import WeftAgent
import WeftKernel

struct AgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent", abstract: "Run the node daemon: load the eBPF datapath and keep it in step with --config.")

    @Option(help: "Directory of manifests (the cluster's desired state).") var config: String?
    @Option(help: "This node's name.") var node: String
    @Option(help: "cgroup v2 directory whose subtree holds this node's pods (default: the whole host).") var cgroup: String?
    @Option(name: .customLong("metrics-addr"), help: "Address for /metrics and /status.") var metricsAddr = "127.0.0.1:15020"
    @Option(name: .customLong("pin-dir"), help: "bpffs directory for pins (default /sys/fs/bpf/weft/<node>).") var pinDir: String?
    @Option(name: .customLong("proxy-address"), help: "Where the node proxy listens for captured L7 connections: an address of this node its pods reach, auto, or none (no proxy).") var proxyAddress = "auto"
    @Option(name: .customLong("proxy-port"), help: "The proxy's outbound capture port.") var proxyPort: UInt16 = 15001
    @Option(name: .customLong("proxy-threads"), help: "The proxy's event loop threads, 1-256 (default: one per core).") var proxyThreads: Int?
    @Flag(name: .customLong("proxy-pin-threads"), help: "Bind each of the proxy's event loops to one CPU of those the agent may use, in order.") var proxyPinThreads = false
    @Option(name: .customLong("access-log"), help: "Where the proxy writes access log lines when MeshConfig turns them on: a file (rotated to .1 at 64 MiB) or - (default /run/weft/<node>/access.log).") var accessLog: String?
    @Option(name: .customLong("socket-shortcut"), help: "The same-node socket shortcut (sockops + sk_msg): on (after a start-up probe) or off.") var socketShortcut = "on"
    @Option(help: "This node's CA directory (weft ca node): turns on workload identities and mTLS tunnels between nodes.") var ca: String?
    @Option(name: .customLong("cert-ttl"), help: "Lifetime of workload certificates, e.g. 24h, 90m (renewed at half).") var certTTL = "24h"
    @Flag(help: "Detach the datapath: remove this node's pinned programs and maps, then exit.") var uninstall = false

    func run() throws {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "weft.agent")
        logger.logLevel = ProcessInfo.processInfo.environment["WEFT_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .info
        if uninstall {
            // Not from under a running agent, which would go on writing
            // the maps it holds and restart the proxy.
            guard !AgentLock.held(runDirectory: AgentConfiguration.runDirectory(node: node)) else {
                FileHandle.standardError.write(Data(
                    "weft agent: the agent for node \(node) is running; stop it first (systemctl stop weft-agent), then uninstall\n".utf8))
                throw ExitCode(2)
            }
            let dir = pinDir ?? Datapath.defaultPinDirectory(node: node)
            // The proxy goes with the datapath: it drains and exits, and
            // the files the agent wrote for it (keys included) go too.
            let left = ProxyRunDirectory.remove(node: node)
            if !left.isEmpty {
                print("left in \(AgentConfiguration.runDirectory(node: node)): \(left.joined(separator: ", "))")
            }
            try Datapath.uninstall(pinDirectory: dir)
            print("removed \(dir): programs detached, maps released")
            return
        }
        guard let config else { throw ValidationError("--config is required") }
        var configuration = AgentConfiguration(configDirectory: config, node: node)
        configuration.cgroupPath = cgroup
        configuration.metricsAddress = metricsAddr
        configuration.pinDirectory = pinDir
        configuration.proxyAddress = proxyAddress
        guard proxyPort != 0 else { throw ValidationError("--proxy-port must be 1-65535") }
        configuration.proxyPort = proxyPort
        try checkProxyThreads(proxyThreads, flag: "--proxy-threads")
        configuration.proxyThreads = proxyThreads
        configuration.proxyPinThreads = proxyPinThreads
        if let accessLog, accessLog.isEmpty { throw ValidationError("--access-log must be a path or -") }
        configuration.accessLog = accessLog
        guard ["on", "off"].contains(socketShortcut) else {
            throw ValidationError("--socket-shortcut must be on or off, got \(socketShortcut)")
        }
        configuration.socketShortcut = socketShortcut == "on"
        configuration.caDirectory = ca
        guard let ttl = parseDuration(certTTL), ttl >= 10 else {
            throw ValidationError("--cert-ttl must be a duration of at least 10s (e.g. 24h, 90m), got \(certTTL)")
        }
        configuration.certificateTTL = ttl
        do {
            try Agent.run(configuration, logger: logger)
        } catch let error as PreflightError {
            FileHandle.standardError.write(Data("weft agent: \(error)\n".utf8))
            throw ExitCode(2)
        }
    }
}

/// The proxy's event loop count, as `weft proxy --threads`, `weft agent
/// --proxy-threads` and `weft lab up --proxy-threads` take it (nil: one per core).
func checkProxyThreads(_ threads: Int?, flag: String) throws {
    if let threads, !(1...256).contains(threads) {
        throw ValidationError("\(flag) must be 1-256, got \(threads)")
    }
}

/// "24h", "90m", "30s", "1h30m": seconds.
func parseDuration(_ text: String) -> TimeInterval? {
    var total = 0.0, digits = ""
    for c in text {
        if c.isASCII && c.isNumber { digits.append(c); continue }
        guard let n = Double(digits) else { return nil }
        switch c {
        case "h": total += n * 3600
        case "m": total += n * 60
        case "s": total += n
        case "d": total += n * 86400
        default: return nil
        }
        digits = ""
    }
    return digits.isEmpty && total > 0 ? total : nil
}
