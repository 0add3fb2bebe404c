import ArgumentParser
import Foundation
import WeftLab

struct LabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab", abstract: "A sandbox of nodes and pods in network namespaces, one agent per node.",
        subcommands: [Up.self, Down.self, Exec.self, Show.self, RestartAgent.self, RestartProxy.self, RunIn.self])

    struct Up: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create nodes and the pods of --config's Workloads; start an agent per node.")
        @Option(help: "Manifest directory; its Workloads become pods, and the agents watch it.") var config: String
        @Option(help: "Nodes to create (n1..nN), besides those Workloads name.") var nodes = 2
        @Option(name: .customLong("cert-ttl"), help: "The agents' workload certificate lifetime (e.g. 20s to watch rotation).") var certTTL: String?
        @Flag(name: .customLong("no-mtls"), help: "Start the agents without a CA: no identities, plaintext between nodes.") var noMTLS = false
        @Option(name: .customLong("proxy-threads"), help: "The agents' --proxy-threads: each node proxy's event loops (default: one per core).") var proxyThreads: Int?
        @Flag(name: .customLong("proxy-pin-threads"), help: "The agents' --proxy-pin-threads: each event loop of a node proxy bound to one CPU.") var proxyPinThreads = false

        func run() throws {
            let weft = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
            if let certTTL, parseDuration(certTTL) == nil { throw ValidationError("--cert-ttl \(certTTL) is not a duration") }
            try checkProxyThreads(proxyThreads, flag: "--proxy-threads")
            _ = try Lab.up(configDirectory: config, nodes: nodes, weftBinary: weft, certTTL: certTTL, mtls: !noMTLS,
                           proxyThreads: proxyThreads, proxyPinThreads: proxyPinThreads) { print("lab: \($0)") }
            print("lab: up. Try `weft lab exec POD -- curl ...`, `weft get services`, `weft status`; `weft lab down` removes it all.")
        }
    }

    struct Down: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove every trace of the lab, also after a crash.")
        func run() throws { Lab.down { print($0) } }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "List the lab's nodes and pods.")
        func run() throws {
            guard let plan = Lab.loadPlan() else { print("no lab is up"); return }
            for n in plan.nodes {
                print("node \(n.name): netns \(n.netns), pods 198.18.\(n.subnet).0/24, agent pid \(n.agentPid.map(String.init) ?? "-")")
            }
            for p in plan.pods {
                print("pod \(p.name) on \(p.node): \(p.address), netns \(p.netns), pid \(p.pid.map(String.init) ?? "-")")
            }
        }
    }

    struct Exec: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run a command inside a pod (its netns and cgroup).")
        @Argument(help: "Pod: NAME or NAMESPACE/NAME.") var pod: String
        @Argument(parsing: .postTerminator, help: "The command, after --.") var command: [String]

        func run() throws {
            guard let plan = Lab.loadPlan() else { throw ValidationError("no lab is up") }
            let matches = plan.pods.filter { $0.name == pod || $0.name.hasSuffix("/\(pod)") }
            guard matches.count == 1, let target = matches.first else {
                throw ValidationError(matches.isEmpty ? "no pod \(pod) in the lab" : "\(pod) is ambiguous; use NAMESPACE/NAME")
            }
            try PodEntry.enter(netns: target.netns, cgroup: target.cgroup, detach: false)
            throw PodEntry.exec(command)
        }
    }

    struct RestartAgent: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "restart-agent", abstract: "Stop a node's agent and start a new one over the same pins.")
        @Argument(help: "Node name.") var node: String
        @Flag(help: "SIGKILL instead of SIGTERM: a crash, not a shutdown.") var kill = false

        func run() throws {
            let weft = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
            let (old, new) = try Lab.restartAgent(node: node, kill9: kill, weftBinary: weft)
            print("agent \(node): pid \(old) \(kill ? "killed" : "stopped"), pid \(new) running")
        }
    }

    struct RestartProxy: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "restart-proxy",
            abstract: "Replace a node's proxy: a rolling restart (no request fails), or --kill to crash it.")
        @Argument(help: "Node name.") var node: String
        @Flag(help: "SIGKILL the proxy: a crash; its agent starts a new one.") var kill = false

        func run() throws {
            let (old, new) = try Lab.restartProxy(node: node, kill9: kill)
            print("proxy \(node): pid \(old) \(kill ? "killed" : "drained"), pid \(new) serving")
        }
    }

    struct RunIn: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "run-in", abstract: "Internal: exec a command in a netns and cgroup.", shouldDisplay: false)
        @Option var netns: String
        @Option var cgroup: String
        @Argument(parsing: .postTerminator) var command: [String]

        func run() throws {
            try PodEntry.enter(netns: netns, cgroup: cgroup, detach: true)
            throw PodEntry.exec(command)
        }
    }
}
