import Foundation
import WeftKernel

/// Everything `weft agent` is told on its command line, with defaults made
/// explicit.
public struct AgentConfiguration: Sendable {
    /// Directory of manifests: the cluster's desired state, the same on every node.
    public var configDirectory: String
    /// This node's name; Workloads with `spec.node` equal to it are local.
    public var node: String
    /// cgroup v2 directory whose subtree is this node's pods. Default: the
    /// root of the cgroup v2 mount (the whole host).
    public var cgroupPath: String?
    /// Host:port for /metrics and /status. Default 127.0.0.1:15020.
    public var metricsAddress: String = "127.0.0.1:15020"
    /// bpffs directory for this node's pins. Default /sys/fs/bpf/weft/<node>.
    public var pinDirectory: String?
    /// Directory for the agent's unix status socket. Default /run/weft/<node>.
    public var runDirectory: String?
    /// Quiet period after a file event before the directory is re-read, so a
    /// multi-file `weft apply` lands as one change.
    public var debounce: Duration = .milliseconds(10)
    /// Where the node proxy listens for captured connections: an address of
    /// this node that its pods can reach, "auto" (the first non-loopback
    /// IPv4 address of the agent's network namespace), or "none" (no proxy:
    /// L7 Service ports are balanced in the kernel like the rest).
    public var proxyAddress = "auto"
    public var proxyPort: UInt16 = 15001
    /// The proxy's event loops (`weft proxy --threads`); nil: one per core.
    /// Each loop serves the connections it accepted, and their backends',
    /// start to end, so this is how many cores the proxy can use.
    public var proxyThreads: Int?
    /// Each of the proxy's event loops bound to one CPU (`weft proxy
    /// --pin-threads`).
    public var proxyPinThreads = false
    /// Where the proxy writes access log lines when MeshConfig turns them
    /// on (a file, or "-" for its stdout); nil: <run directory>/access.log.
    public var accessLog: String?
    /// The same-node socket shortcut: on (after a start-up probe proves the
    /// kernel does it) unless false; MeshConfig can still turn it off.
    public var socketShortcut = true
    /// This node's CA directory (`weft ca node`): with it, the agent issues
    /// every local identity a certificate and the proxy tunnels traffic to
    /// other nodes over mutual TLS. Without it, no identity, no tunnel.
    public var caDirectory: String?
    /// Lifetime of the workload certificates it issues (renewed at half).
    public var certificateTTL: TimeInterval = 24 * 3600
    /// The port node proxies accept tunnels on (HBONE's).
    public var tunnelPort: UInt16 = 15008

    public init(configDirectory: String, node: String) {
        self.configDirectory = configDirectory
        self.node = node
    }

    public var resolvedPinDirectory: String { pinDirectory ?? Datapath.defaultPinDirectory(node: node) }
    public var resolvedRunDirectory: String { runDirectory ?? Self.runDirectory(node: node) }
    public static func runDirectory(node: String) -> String { "/run/weft/\(node)" }
    public static func statusSocket(runDirectory: String) -> String { runDirectory + "/agent.sock" }
}
