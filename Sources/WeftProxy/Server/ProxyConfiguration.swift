import WeftCore

/// Everything `weft proxy` is told, with the defaults an operator gets.
public struct ProxyConfiguration: Sendable {
    /// This node's name (for Via and logs).
    public var node: String
    /// The outbound capture listener connect4 sends L7 Service traffic to.
    public var listenAddress: IPv4Address
    public var listenPort: UInt16 = 15001
    /// bpffs pin directory of this node's datapath (origins and policy maps).
    public var pinDirectory: String
    /// Where the agent writes the route table (proxy-table.json) and where
    /// the proxy's status socket lives.
    public var runDirectory: String
    /// How long to wait for a client's first bytes before treating the
    /// connection as opaque TCP (server-speaks-first protocols).
    public var detectTimeout: Duration = .milliseconds(500)
    /// On SIGTERM: how long in-flight requests may take to finish.
    public var drainTimeout: Duration = .seconds(10)
    /// Idle upstream HTTP/1.1 connections kept per backend, per event loop.
    public var maxIdlePerBackend = 64
    /// Request bodies up to this size are kept for retries and mirrors;
    /// larger ones stream through and are not retried.
    public var replayBufferLimit = 64 * 1024
    /// Upstream connect timeout.
    public var connectTimeout: Duration = .seconds(2)
    /// Event loop threads (default: one per core).
    public var threads: Int?
    /// Each event loop bound to one CPU (`--pin-threads`, LoopPinning).
    public var pinThreads = false
    /// Where access log lines go when MeshConfig turns them on: a file
    /// (rotated to .1 at 64 MiB), "-" for standard output; default
    /// <runDirectory>/access.log.
    public var accessLogPath: String?
    /// Distinct values a metric label may take before the rest are
    /// reported as "overflow".
    public var labelValueLimit = 1000
    /// Where tunnels from other nodes' proxies arrive (all addresses of the
    /// node), once the agent has handed over identities.
    public var tunnelPort: UInt16 = 15008
    /// HTTP/1.1 requests that need only routing, a backend choice, the
    /// proxy's headers and metrics go through ExpressHTTP1Handler.
    public var express = true

    public init(node: String, listenAddress: IPv4Address, pinDirectory: String, runDirectory: String) {
        self.node = node
        self.listenAddress = listenAddress
        self.pinDirectory = pinDirectory
        self.runDirectory = runDirectory
    }

    public static func tableFile(runDirectory: String) -> String { runDirectory + "/proxy-table.json" }
    public static func statusSocket(runDirectory: String) -> String { runDirectory + "/proxy.sock" }
    public static func pidFile(runDirectory: String) -> String { runDirectory + "/proxy.pid" }
}
