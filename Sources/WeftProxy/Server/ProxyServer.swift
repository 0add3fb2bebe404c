import Dispatch
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import WeftCore
import WeftIdentity
import WeftKernel
import WeftStatus

/// `weft proxy`: the node's shared L7 proxy. Started and supervised by
/// `weft agent`, which hands it the route table as a file
/// (<run>/proxy-table.json) and a SIGHUP to read it. SIGTERM drains: the
/// listeners (one per event loop) stop accepting and close (a successor's,
/// bound with SO_REUSEPORT, take the new connections), in-flight requests finish, idle keep-alive
/// connections close (after a short grace), tunnels from other nodes are
/// told to go away, a connection accepted before the drain that has not
/// sent its request yet is answered and then closed, and the process exits
/// when none are left or the drain timeout passes.
public enum ProxyServer {
    /// TrafficPolicy state per cluster: ejections so far, backends out now;
    /// per backend, requests in flight (what maxRequests bounds),
    /// connections open or being made (maxConnections) and requests waiting
    /// for one, connecting or queued (maxPendingRequests), as Envoy's
    /// upstream_rq_active, upstream_cx_active and upstream_rq_pending_active.
    static func resilienceMetrics(_ snapshot: RouteSnapshot) -> String {
        guard !snapshot.runtimes.isEmpty else { return "" }
        let now = NIODeadline.now().uptimeNanoseconds
        var ejections = ["# HELP weft_outlier_ejections_total Backends ejected by outlier detection, by cluster.",
                         "# TYPE weft_outlier_ejections_total counter"]
        var out = ["# HELP weft_backend_ejected Whether outlier detection holds the backend out now.",
                   "# TYPE weft_backend_ejected gauge"]
        var active = ["# HELP weft_backend_active_requests Requests in flight to the backend, from this proxy.",
                      "# TYPE weft_backend_active_requests gauge"]
        var connections = ["# HELP weft_backend_connections Connections from this proxy to the backend, open or being made (what circuitBreaker.maxConnections bounds).",
                           "# TYPE weft_backend_connections gauge"]
        var pending = ["# HELP weft_backend_pending_requests Requests waiting for a connection to the backend, connecting or queued (what circuitBreaker.maxPendingRequests bounds).",
                       "# TYPE weft_backend_pending_requests gauge"]
        for (name, runtime) in snapshot.runtimes.sorted(by: { $0.key < $1.key }) {
            if let o = runtime.outliers {
                ejections.append("weft_outlier_ejections_total{cluster=\"\(name)\"} \(o.ejectionsTotal.load(ordering: .relaxed))")
            }
            for b in runtime.backends {
                let labels = "cluster=\"\(name)\",backend=\"\(b.key)\""
                out.append("weft_backend_ejected{\(labels)} \(b.isEjected(now) ? 1 : 0)")
                active.append("weft_backend_active_requests{\(labels)} \(b.requests.load(ordering: .relaxed))")
                connections.append("weft_backend_connections{\(labels)} \(b.connections.load(ordering: .relaxed))")
                pending.append("weft_backend_pending_requests{\(labels)} \(b.pending.load(ordering: .relaxed))")
            }
        }
        return (ejections + out + active + connections + pending).joined(separator: "\n") + "\n"
    }

    /// A captured connection whose origin is known: counted, and handed
    /// to the protocol detector, which sets up the rest.
    static func adopt(_ channel: any Channel, origin: CapturedOrigin, proxy: ProxyContext) throws {
        proxy.stats.connections.add(1, ordering: .relaxed)
        proxy.stats.activeConnections.add(1, ordering: .relaxed)
        channel.closeFuture.whenComplete { _ in
            proxy.stats.activeConnections.subtract(1, ordering: .relaxed)
        }
        try channel.pipeline.syncOperations.addHandler(ProtocolDetector(proxy: proxy, origin: origin))
    }

    /// Listeners on `address`:`port`, one per event loop (each accepting
    /// for its own loop: a connection is never handed from one thread to
    /// another), and whether weft_listen_pick deals new connections out
    /// over them in turn (ListenerSpread). When the kernel refuses the
    /// program, its hash of each connection's addresses picks the listener:
    /// the proxy serves as before, with a warning. The captured
    /// connections' port and the tunnel port each have theirs.
    static func listen(address: IPv4Address, port: UInt16, loops: [any EventLoop],
                       bootstrap: (any EventLoop) -> ServerBootstrap, logger: Logger) throws -> ([any Channel], Bool) {
        let fds = try ListenerSpread.listen(address: address, port: port, count: loops.count, backlog: 1024)
        var channels: [any Channel] = []
        do {
            for (loop, fd) in zip(loops, fds) {
                channels.append(try bootstrap(loop).withBoundSocket(fd).wait())
            }
        } catch {
            // NIO owns (and closed, on failure) those it took; the rest are ours.
            for fd in fds.dropFirst(channels.count + 1) { close(fd) }
            for c in channels { try? c.close().wait() }
            throw error
        }
        guard fds.count > 1 else { return (channels, false) }
        // Last, once every listener accepts: from here the group's new
        // connections go to these listeners only, none to a predecessor's.
        do {
            try ListenerSpread.attach(listeners: fds)
            return (channels, true)
        } catch {
            logger.warning("the kernel's hash spreads new connections to port \(port) over the \(fds.count) listeners: cannot attach weft_listen_pick: \(error)")
            return (channels, false)
        }
    }

    public static func run(_ configuration: ProxyConfiguration, logger: Logger) throws {
        // The agent sends SIGHUP whenever it writes the route table or the
        // identities, from the moment it has started the proxy: until the
        // handler below is in place, one must not end the process (its
        // default action), and what it announced is read after (reload()).
        signal(SIGHUP, SIG_IGN)
        Host.raiseOpenFileLimit(logger: logger)
        let threads = configuration.threads ?? System.coreCount
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        var loops: [any EventLoop] = []
        for loop in group.makeIterator() { loops.append(loop) }
        var pinned: [Int32]?
        if configuration.pinThreads {
            do {
                pinned = try LoopPinning.pin(loops, to: LoopPinning.allowedCPUs())
            } catch {
                try? group.syncShutdownGracefully()
                throw error
            }
        }
        let origins = try ProxyMaps(pinDirectory: configuration.pinDirectory)
        let policy = try PolicyMaps(pinDirectory: configuration.pinDirectory)
        let proxy = ProxyContext(configuration: configuration, logger: logger, origins: origins, policy: policy,
                                 eventLoops: loops)
        proxy.openSpliceMaps()
        let tableFile = ProxyConfiguration.tableFile(runDirectory: configuration.runDirectory)
        let identityFile = configuration.runDirectory + "/" + IdentityBundle.fileName
        let reloadErrors = Mutex<String?>(nil)
        /// The tunnel port's listeners, once open, and whether they take
        /// new tunnels in turn.
        let tunnelListeners = Mutex<([any Channel], Bool)?>(nil)
        // Every accepted connection, captured or a tunnel from another node,
        // so a drain can reach each of them.
        let connections = ConnectionRegistry()
        /// The agent's identity bundle: new tunnels use it at once; the
        /// tunnel listener opens with the first one.
        func reloadIdentities() {
            guard let data = FileManager.default.contents(atPath: identityFile) else { return }
            do {
                let bundle = try JSONDecoder().decode(IdentityBundle.self, from: data)
                proxy.install(identities: try TunnelIdentities(bundle))
                logger.info("identities installed", metadata: ["trust_domain": "\(bundle.trustDomain)",
                                                               "identities": "\(bundle.workloads.count)"])
                if tunnelListeners.withLock({ $0 }) == nil {
                    let opened = try TunnelServer.start(proxy: proxy, loops: loops, port: configuration.tunnelPort, connections: connections)
                    tunnelListeners.withLock { $0 = opened }
                    logger.notice("tunnel listeners up", metadata: ["port": "\(configuration.tunnelPort)", "listeners": "\(opened.0.count)"])
                }
            } catch {
                logger.error("cannot use the identities in \(identityFile): \(error); the previous ones stay in force")
            }
        }
        /// The table file last read and installed, as stat(2) saw it: a
        /// reload whose table file is unchanged reads only the generation
        /// file (ProxyTable.generationFileName) and moves the snapshot in
        /// force to it, compiling nothing again.
        let lastRead = Mutex<[Int]?>(nil)
        let generationFile = configuration.runDirectory + "/" + ProxyTable.generationFileName
        func writtenGeneration() -> UInt64? {
            (try? String(contentsOfFile: generationFile, encoding: .utf8))
                .flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        func reload() {
            reloadIdentities()
            proxy.openSpliceMaps()
            do {
                var info = stat()
                guard stat(tableFile, &info) == 0 else { throw CocoaError(.fileReadNoSuchFile) }
                // (A rename gives a new inode, which a later file may reuse:
                // size and the nanosecond mtime tell those apart.)
                let key = [Int(info.st_dev), Int(info.st_ino), Int(info.st_size), info.st_mtim.tv_sec, info.st_mtim.tv_nsec]
                if lastRead.withLock({ $0 }) == key {
                    if let newer = writtenGeneration(), newer > proxy.snapshot.generation {
                        proxy.advance(to: newer)
                        logger.info("route table generation advanced", metadata: ["generation": "\(newer)"])
                    }
                    reloadErrors.withLock { $0 = nil }
                    return
                }
                let data = try Data(contentsOf: URL(fileURLWithPath: tableFile))
                var table = try JSONDecoder().decode(ProxyTable.self, from: data)
                if let newer = writtenGeneration(), newer > table.generation {
                    table.generation = newer
                }
                proxy.install(table)
                lastRead.withLock { $0 = key }
                reloadErrors.withLock { $0 = nil }
                logger.info("route table installed", metadata: ["generation": "\(table.generation)",
                                                                "frontends": "\(table.frontends.count)"])
            } catch CocoaError.fileReadNoSuchFile {
                logger.info("no route table yet at \(tableFile)")
            } catch {
                reloadErrors.withLock { $0 = "\(error)" }
                logger.error("cannot read route table \(tableFile): \(error); the previous table stays in force")
            }
        }
        reload()

        // One listener per event loop, each accepting for its own loop (a
        // connection is never handed from one thread to another), all on the
        // listen port through SO_REUSEPORT.
        func bootstrap(_ loop: any EventLoop) -> ServerBootstrap {
            ServerBootstrap(group: loop, childGroup: loop)
            .registering(in: connections)
            .childChannelInitializer { channel in
                channel.eventLoop.settingUp {
                    // (The address as the kernel gave it: no text made and parsed again.)
                    guard case .v4(let remote)? = channel.remoteAddress else {
                        channel.close(promise: nil)
                        return
                    }
                    let client = IPv4Address(networkOrder: remote.address.sin_addr.s_addr)
                    let port = UInt16(bigEndian: remote.address.sin_port)
                    // Who dialed what: written by sockops before the handshake
                    // finished, so it is there now. No entry: the connection was
                    // not captured (someone dialed :15001 directly).
                    guard let origin = try? origins.take(client: client, port: port) else {
                        proxy.stats.noOrigin.add(1, ordering: .relaxed)
                        channel.close(promise: nil)
                        return
                    }
                    // Set here, on the channel's own loop, rather than as the
                    // bootstrap's child options, which NIO applies through a
                    // chain of futures (16 allocations a connection). The
                    // socket has TCP_NODELAY from its listener
                    // (ListenerSpread.listen): NIO's setOption for it would
                    // cost a setsockopt, a getsockname and an address made
                    // as text, for each connection.
                    // A client's FIN is a half-close: TCP streams pass it on, and
                    // HTTP answers what is in flight before closing.
                    try channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                    try adopt(channel, origin: origin, proxy: proxy)
                }
            }
        }
        let (mainListeners, inTurn) = try listen(address: configuration.listenAddress, port: configuration.listenPort, loops: loops,
                                                 bootstrap: bootstrap, logger: logger)
        // Idle HTTP connections close (MeshConfig proxy.idleTimeout).
        connections.sweepIdle(proxy: proxy, on: loops[0])

        let admin = StatusServer(group: group)
        let statusSocket = ProxyConfiguration.statusSocket(runDirectory: configuration.runDirectory)
        try FileManager.default.createDirectory(atPath: configuration.runDirectory, withIntermediateDirectories: true)
        let started = Date()
        // /probe waits on a tunnel: answered when the far proxy has.
        try admin.start(host: nil, port: 0, unixSocket: statusSocket, deferred: { path, uri, loop in
            path == "/probe" ? TunnelProbe.relay(proxy, uri: uri, loop: loop) : nil
        }) { path, _ in
            switch path {
            case "/generation":
                let error = reloadErrors.withLock { $0 }
                return (.ok, "text/plain", "\(proxy.snapshot.generation) \(error == nil ? "ok" : "refused") \(getpid())\n")
            case "/stats":
                var lines = proxy.stats.all.map { "weft_proxy_\($0.0) \($0.1)" }
                lines.append("weft_proxy_table_generation \(proxy.snapshot.generation)")
                lines.append("weft_proxy_listeners \(mainListeners.count)")
                lines.append("weft_proxy_listeners_in_turn \(inTurn ? 1 : 0)")
                let tunnel = tunnelListeners.withLock { $0 }
                lines.append("weft_proxy_tunnel_listeners \(tunnel?.0.count ?? 0)")
                lines.append("weft_proxy_tunnel_listeners_in_turn \(tunnel?.1 == true ? 1 : 0)")
                lines.append("weft_proxy_uptime_seconds \(Int(Date().timeIntervalSince(started)))")
                return (.ok, "text/plain", lines.joined(separator: "\n") + "\n")
            case "/metrics":
                let spans = proxy.spans.counts
                return (.ok, "text/plain; version=0.0.4", proxy.telemetry.render(
                    stats: proxy.stats, generation: proxy.snapshot.generation,
                    extra: [("spans_exported_total", spans.exported), ("spans_dropped_total", spans.dropped),
                            ("access_log_lines_dropped_total", proxy.accessLog.dropped)]) + resilienceMetrics(proxy.snapshot))
            case "/ejections":
                // One "ip:port" per line: backends outlier detection holds out now.
                let list = proxy.snapshot.ejected
                return (.ok, "text/plain", list.isEmpty ? "" : list.joined(separator: "\n") + "\n")
            case "/healthz":
                return (.ok, "text/plain", proxy.draining.load(ordering: .relaxed) ? "draining\n" : "ok\n")
            default:
                return (.notFound, "text/plain", "not found: try /generation, /stats, /metrics, /ejections, /healthz or /probe\n")
            }
        }
        logger.notice("proxy listening", metadata: [
            "listen": "\(configuration.listenAddress):\(configuration.listenPort)", "threads": "\(threads)",
            "listeners": "\(mainListeners.count)\(mainListeners.count == 1 ? "" : inTurn ? " (in turn)" : " (by the kernel's hash)")",
            "cpus": "\(pinned.map { $0.map(String.init).joined(separator: ",") } ?? "any")",
            "status_socket": "\(statusSocket)", "generation": "\(proxy.snapshot.generation)",
        ])

        // Signals arrive on a dispatch queue; the main thread waits for the drain.
        let queue = DispatchQueue(label: "weft.proxy.signals")
        let done = DispatchSemaphore(value: 0)
        var sources: [any DispatchSourceSignal] = []
        var mask = sigset_t()
        sigemptyset(&mask)
        for sig in [SIGHUP, SIGTERM, SIGINT] { sigaddset(&mask, sig) }
        pthread_sigmask(SIG_UNBLOCK, &mask, nil)
        for sig in [SIGHUP, SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            source.setEventHandler {
                if sig == SIGHUP {
                    reload()
                } else if !proxy.draining.exchange(true, ordering: .relaxed) {
                    logger.notice("draining", metadata: ["connections": "\(connections.count)"])
                    done.signal()
                }
            }
            source.resume()
            sources.append(source)
        }
        // Whatever the agent wrote while SIGHUP was ignored (a table, the
        // identities) is taken now; nothing changed, nothing is compiled again.
        queue.sync { reload() }
        done.wait()
        // The listeners (captured connections, tunnels) stop accepting first
        // and close only once every connection they accepted is set up: NIO
        // closes, unread, a connection whose setup ends after its listener
        // has closed. Those the kernel still queues for them then move to
        // the successor's listeners (net.ipv4.tcp_migrate_req, set by the
        // agent). Every connection accepted is in the registry by then
        // (ConnectionRegistry.Accepted) and set up before the quiesce event
        // reaches it (a loop runs its tasks in order): none is left out of
        // the drain, or cut unanswered by the shutdown below. A tunnel from
        // another node drains too: TunnelRelay (NIO's connection management
        // handler without the express path) sends GOAWAY and closes it once
        // its streams are done.
        let listeners = mainListeners + (tunnelListeners.withLock { $0 }?.0 ?? [])
        for l in listeners { _ = try? l.setOption(ChannelOptions.autoRead, value: false).wait() }
        connections.waitUntilSetUp(deadline: Date().addingTimeInterval(2))
        for l in listeners { try? l.close().wait() }
        connections.quiesce()
        // In-flight requests finish; idle connections were told to close.
        let deadline = Date().addingTimeInterval(Double(configuration.drainTimeout.components.seconds))
        while connections.count > 0 && Date() < deadline { usleep(20_000) }
        let left = connections.count
        if left > 0 { logger.warning("drain timeout: closing \(left) connections") }
        connections.closeAll()
        proxy.accessLog.closeFile()
        admin.stop()
        try? group.syncShutdownGracefully()
        _ = sources
        logger.notice("proxy stopped")
    }
}

/// Every accepted connection, so a drain can reach each of them.
final class ConnectionRegistry: Sendable {
    private let channels = Mutex<[ObjectIdentifier: any Channel]>([:])

    /// On the listener: each accepted connection goes into the registry
    /// (and leaves it when it closes) before the listener hands it to its
    /// loop to be set up.
    final class Accepted: ChannelInboundHandler {
        typealias InboundIn = any Channel
        typealias InboundOut = any Channel
        let registry: ConnectionRegistry

        init(_ registry: ConnectionRegistry) { self.registry = registry }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let child = unwrapInboundIn(data)
            registry.add(child)
            child.closeFuture.whenComplete { [registry] _ in registry.remove(child) }
            context.fireChannelRead(data)
        }
    }

    /// Every connection open now.
    var all: [any Channel] { channels.withLock { Array($0.values) } }

    func add(_ c: any Channel) { channels.withLock { $0[ObjectIdentifier(c)] = c } }
    func remove(_ c: any Channel) { _ = channels.withLock { $0.removeValue(forKey: ObjectIdentifier(c)) } }
    var count: Int { channels.withLock { $0.count } }

    /// Waits (polling) until every connection accepted so far is active or
    /// closed, or `deadline` passes.
    func waitUntilSetUp(deadline: Date) {
        while channels.withLock({ $0.values.contains { !$0.isActive } }) && Date() < deadline { usleep(1_000) }
    }

    /// Each connection's handler takes this event: HTTP/1.1 closes once its
    /// current response is out (an idle one after Express.drainIdleGrace),
    /// HTTP/2 sends GOAWAY, a tunnel from another node goes away
    /// (TunnelRelay); opaque TCP runs on until it ends or the drain times out.
    func quiesce() {
        for c in all {
            c.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent() as any Sendable)
        }
    }

    func closeAll() {
        for c in all { c.close(promise: nil) }
    }
}

extension ServerBootstrap {
    /// Each connection the listener accepts is known to the drain from that
    /// moment (ConnectionRegistry.Accepted), before its own loop sets it up.
    func registering(in connections: ConnectionRegistry) -> ServerBootstrap {
        serverChannelInitializer { channel in
            channel.eventLoop.settingUp {
                try channel.pipeline.syncOperations.addHandler(ConnectionRegistry.Accepted(connections))
            }
        }
    }
}

extension EventLoop {
    /// `body` run now, as a channel or stream initializer's work, answered
    /// with the loop's own succeeded future, which NIO keeps: where
    /// `makeCompletedFuture` makes a future for each connection or stream
    /// (and, making and freeing it, looks up the metadata of its Result
    /// and Optional types at run time: about 2,000 instructions each).
    func settingUp(_ body: () throws -> Void) -> EventLoopFuture<Void> {
        do {
            try body()
            return makeSucceededVoidFuture()
        } catch {
            return makeFailedFuture(error)
        }
    }
}
