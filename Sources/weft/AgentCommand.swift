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
    @Flag(help: "Detach the datapath: remove this node's pinned programs and maps, then exit.") var uninstall = false

    func run() throws {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "weft.agent")
        logger.logLevel = ProcessInfo.processInfo.environment["WEFT_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .info
        if uninstall {
            let dir = pinDir ?? Datapath.defaultPinDirectory(node: node)
            try Datapath.uninstall(pinDirectory: dir)
            print("removed \(dir): programs detached, maps released")
            return
        }
        guard let config else { throw ValidationError("--config is required") }
        var configuration = AgentConfiguration(configDirectory: config, node: node)
        configuration.cgroupPath = cgroup
        configuration.metricsAddress = metricsAddr
        configuration.pinDirectory = pinDir
        do {
            try Agent.run(configuration, logger: logger)
        } catch let error as PreflightError {
            FileHandle.standardError.write(Data("weft agent: \(error)\n".utf8))
            throw ExitCode(2)
        }
    }
}
