import ArgumentParser
import Foundation
import Logging
import WeftCore
import WeftKernel
import WeftProxy

struct ProxyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Run the node's L7 proxy (normally started and supervised by `weft agent`).")

    @Option(help: "This node's name.") var node: String
    @Option(help: "Outbound capture listener, ADDRESS:PORT (connect4 sends L7 Service traffic here).") var listen: String
    @Option(name: .customLong("pin-dir"), help: "bpffs directory of the node's pins (default /sys/fs/bpf/weft/<node>).") var pinDir: String?
    @Option(name: .customLong("run-dir"), help: "Directory of the route table and status socket (default /run/weft/<node>).") var runDir: String?
    @Option(help: "Event loop threads (default: one per core).") var threads: Int?
    @Flag(name: .customLong("pin-threads"), help: "Bind each event loop to one CPU of those the proxy may use, in order.") var pinThreads = false
    @Option(name: .customLong("drain-timeout"), help: "Seconds in-flight requests get to finish on SIGTERM.") var drainTimeout = 10
    @Option(name: .customLong("access-log"), help: "Access log destination when MeshConfig turns it on: a file (rotated to .1 at 64 MiB) or - for stdout (default <run-dir>/access.log).") var accessLog: String?
    @Option(name: .customLong("label-limit"), help: "Distinct values a metric label may take; the rest count as \"overflow\".") var labelLimit = 1000
    @Option(name: .customLong("detect-timeout-ms"), help: "Milliseconds to wait for a client's first bytes before treating a connection as opaque TCP.") var detectTimeoutMs = 500
    @Flag(inversion: .prefixedNo, help: "HTTP/1.1 requests that need only routing, a backend, headers and metrics take the express path (bytes, no codec); --no-express sends every request through the full path.") var express = true

    func run() throws {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "weft.proxy")
        logger.logLevel = ProcessInfo.processInfo.environment["WEFT_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .info
        guard let colon = listen.lastIndex(of: ":"), let address = IPv4Address(listen[..<colon]),
              let port = UInt16(listen[listen.index(after: colon)...]), port != 0 else {
            throw ValidationError("--listen \(listen) is not IPV4:PORT")
        }
        guard (0...3600).contains(drainTimeout) else { throw ValidationError("--drain-timeout must be 0-3600") }
        guard (1...60_000).contains(detectTimeoutMs) else { throw ValidationError("--detect-timeout-ms must be 1-60000") }
        try checkProxyThreads(threads, flag: "--threads")
        guard (1...1_000_000).contains(labelLimit) else { throw ValidationError("--label-limit must be 1-1000000") }
        if let accessLog, accessLog.isEmpty { throw ValidationError("--access-log must be a path or -") }
        var configuration = ProxyConfiguration(
            node: node, listenAddress: address,
            pinDirectory: pinDir ?? Datapath.defaultPinDirectory(node: node),
            runDirectory: runDir ?? "/run/weft/\(node)")
        configuration.listenPort = port
        configuration.threads = threads
        configuration.pinThreads = pinThreads
        configuration.drainTimeout = .seconds(drainTimeout)
        configuration.detectTimeout = .milliseconds(detectTimeoutMs)
        configuration.accessLogPath = accessLog
        configuration.labelValueLimit = labelLimit
        // Also off when the agent (hence its proxies) runs with WEFT_PROXY_EXPRESS=0.
        configuration.express = express && ProcessInfo.processInfo.environment["WEFT_PROXY_EXPRESS"] != "0"
        do {
            try ProxyServer.run(configuration, logger: logger)
        } catch {
            FileHandle.standardError.write(Data("weft proxy: \(error)\n".utf8))
            throw ExitCode(2)
        }
    }
}
