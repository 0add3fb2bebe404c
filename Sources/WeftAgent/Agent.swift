import Foundation
import Glibc
import Logging
import NIOPosix
import WeftStatus
import Synchronization
import WeftCore
import WeftIdentity
import WeftKernel

/// `weft agent`: the node daemon. Its control work runs on one thread — a
/// poll() loop over the config watcher and the signal pipe — so the
/// reconcile path needs no locks; the status server runs on NIO threads and
/// only reads a Mutex-guarded snapshot and the pinned maps.
public enum Agent {
    public static func run(_ configuration: AgentConfiguration, logger: Logger) throws {
        try Host.preflight()
        try Host.ensureBPFFS()
        // (Said once it is sure to run: a refusal is one sentence. Its
        // proxy inherits the raised limit, and raises its own too.)
        Host.raiseOpenFileLimit(logger: logger)
        guard let cgroupMount = Host.cgroup2Mount() else { throw PreflightError("no cgroup v2 mount") }
        let cgroup = configuration.cgroupPath ?? cgroupMount
        guard cgroup.hasPrefix(cgroupMount) else {
            throw PreflightError("--cgroup \(cgroup) is not inside the cgroup v2 mount \(cgroupMount)")
        }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: cgroup, isDirectory: &isDir), isDir.boolValue else {
            throw PreflightError("--cgroup \(cgroup) does not exist")
        }
        guard FileManager.default.fileExists(atPath: configuration.configDirectory, isDirectory: &isDir), isDir.boolValue else {
            throw PreflightError("--config \(configuration.configDirectory) is not a directory")
        }
        let (host, port) = try parseAddress(configuration.metricsAddress)
        let runDirectory = configuration.resolvedRunDirectory
        let lock = try AgentLock.take(node: configuration.node, runDirectory: runDirectory)
        defer {
            // Without a proxy the run directory held only the status socket
            // (or, when the start failed, nothing): leave nothing behind.
            // With one, the proxy's files stay with the proxy.
            rmdir(runDirectory)
            rmdir((runDirectory as NSString).deletingLastPathComponent)
            close(lock)
        }
        // The metrics address is taken now, before the kernel is touched:
        // one in use stops the agent here, not after its first reconcile.
        let metricsSocket: Int32
        do {
            metricsSocket = try StatusServer.listenTCP(host: host, port: port)
        } catch {
            throw PreflightError("--metrics-addr \(configuration.metricsAddress): \(error)")
        }
        let signals = try SignalPipe([SIGTERM, SIGINT, SIGHUP, SIGUSR2])

        let pinDirectory = configuration.resolvedPinDirectory
        let datapath = try Datapath.attach(pinDirectory: pinDirectory, cgroupPath: cgroup, logger: logger)
        let maps = try ServiceMaps(pinDirectory: pinDirectory)
        let policyMaps = try PolicyMaps(pinDirectory: pinDirectory)
        let proxyMaps = try ProxyMaps(pinDirectory: pinDirectory)
        let shortcut = ShortcutController(configuration: configuration, pinDirectory: pinDirectory, podCgroup: cgroup,
                                          cgroupMount: cgroupMount, logger: logger)
        let shortcutMaps = shortcut.maps
        let supervisor = try proxySupervisor(configuration, pinDirectory: pinDirectory, logger: logger)
        if let supervisor {
            // Connections still queued on a draining proxy's listener move to
            // its successor instead of being reset (Linux 5.14+).
            try? "1\n".write(toFile: "/proc/sys/net/ipv4/tcp_migrate_req", atomically: false, encoding: .utf8)
            supervisor.start()
            // Capture goes on once the proxy answers (or after 2 s: then
            // captured connects are refused at once until it does).
            _ = supervisor.waitForGeneration(0, timeout: .seconds(2))
            try proxyMaps.setListener(supervisor.listen)
        } else {
            try proxyMaps.setListener(nil)
        }

        var initial = AgentStatus(node: configuration.node, pid: getpid(), configDirectory: configuration.configDirectory,
                                  cgroup: cgroup, pinDirectory: pinDirectory)
        initial.programs = datapath.programs.map { .init(name: $0.name, state: $0.state.rawValue, programID: $0.programID) }
        initial.shortcut = shortcut.status
        let status = SharedStatus(initial)
        let flowMaps: FlowMaps?
        do {
            flowMaps = try FlowMaps(pinDirectory: pinDirectory)
        } catch {
            logger.error("connection counters unavailable: \(error)")
            flowMaps = nil
        }
        // Health probes run on their own thread, apart from the control loop.
        let probeGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // Checks of pods that only take mutual TLS go through the node proxy.
        let healthChecker = try HealthChecker(loop: probeGroup.next(), logger: logger,
                                              proxySocket: configuration.resolvedRunDirectory + "/proxy.sock")
        var issuer: IdentityIssuer?
        if let dir = configuration.caDirectory {
            do {
                issuer = IdentityIssuer(ca: try MeshCA.load(from: dir), ttl: configuration.certificateTTL, logger: logger)
            } catch {
                throw PreflightError("--ca: \(error)")
            }
        }
        let reconciler = try Reconciler(configuration: configuration, maps: maps, policyMaps: policyMaps,
                                        nodeCgroup: cgroup, status: status, proxy: supervisor, shortcut: shortcut,
                                        flows: flowMaps, healthChecker: healthChecker, identities: issuer, logger: logger)
        let watcher = try ConfigWatcher(directory: configuration.configDirectory)
        reconciler.reconcile()

        let fill = Mutex(MapFill())
        fill.withLock { $0 = reconciler.mapFill }
        let metrics = AgentMetrics(maps: maps, policyMaps: policyMaps, shortcut: shortcutMaps, flows: flowMaps, status: status,
                                   fill: { fill.withLock { $0 } })
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let server = StatusServer(group: group)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let socketPath = AgentConfiguration.statusSocket(runDirectory: runDirectory)
        try server.start(host: host, port: port, listening: metricsSocket, unixSocket: socketPath) { path, accept in
            switch path {
            case "/metrics":
                let text = metrics.render() + proxyMetrics(runDirectory)
                return Exposition.wantsOpenMetrics(accept)
                    ? (.ok, Exposition.openMetricsContentType, Exposition.openMetrics(text))
                    : (.ok, Exposition.prometheusContentType, text)
            case "/status":
                var full = status.full()
                if full.health != nil {
                    let totals = healthChecker.totals
                    full.health?.probes = totals.probes
                    full.health?.probeFailures = totals.failures
                }
                if let shortcutMaps, full.shortcut != nil {
                    full.shortcut?.sockets = try? shortcutMaps.sockets()
                    full.shortcut?.events = (try? shortcutMaps.counters()).map { Dictionary(uniqueKeysWithValues: $0.map { ($0.name, $0.value) }) }
                }
                let body = (try? encoder.encode(full)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
                return (.ok, "application/json", body + "\n")
            case "/healthz":
                return (.ok, "text/plain", "ok\n")
            case "/generation":
                // Cheap for pollers: the generation in force and whether the
                // files on disk were refused.
                let (generation, errors) = status.withLock { ($0.generation, $0.configErrors.count) }
                return (.ok, "text/plain", "\(generation) \(errors == 0 ? "ok" : "refused")\n")
            default:
                return (.notFound, "text/plain", "not found: try /metrics, /status, /generation or /healthz\n")
            }
        }
        logger.notice("agent running", metadata: [
            "version": "\(Build.version)", "node": "\(configuration.node)", "cgroup": "\(cgroup)", "pins": "\(pinDirectory)",
            "metrics": "\(configuration.metricsAddress)", "status_socket": "\(socketPath)",
        ])

        // The control loop. A file event arms a short debounce; when it
        // expires the directory is re-read whole. A failed map write is
        // retried every second until it succeeds or the files change, and so
        // is a pass that found local pod cgroups missing (a pod's cgroup may
        // be created after its manifest).
        var deadline: ContinuousClock.Instant?
        var retryAfterFailure = false
        var nextEjectionPoll = ContinuousClock.now
        loop: while true {
            // The proxy's pidfds come and go with restarts: rebuilt each turn.
            let proxyFDs = supervisor?.pollFDs ?? []
            var fds = [pollfd(fd: watcher.fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: signals.readFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: healthChecker.fd, events: Int16(POLLIN), revents: 0)]
                + proxyFDs.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let lookForCgroups = !reconciler.missingCgroups.isEmpty
            var timeout: Int32 = retryAfterFailure || lookForCgroups ? 1000 : -1
            if reconciler.wantsEjections {
                let due = max(0, Int32((nextEjectionPoll - .now).seconds * 1000))
                timeout = timeout < 0 ? due : min(timeout, due)
            }
            if let renewal = issuer?.nextRenewal {
                let due = Int32(max(0, min(renewal.timeIntervalSinceNow * 1000 + 1, 3_600_000)))
                timeout = timeout < 0 ? due : min(timeout, due)
            }
            if let deadline {
                let left = deadline - .now
                timeout = max(0, Int32(left.seconds * 1000))
            }
            if let due = supervisor?.timeoutMillis { timeout = timeout < 0 ? due : min(timeout, due) }
            let n = poll(&fds, nfds_t(fds.count), timeout)
            if n < 0 && errno != EINTR { throw AgentError("poll: \(String(cString: strerror(errno)))") }
            if let supervisor {
                let exited = Set(fds.dropFirst(3).filter { $0.revents != 0 }.map(\.fd))
                if !exited.isEmpty || supervisor.timeoutMillis == 0 {
                    supervisor.service(readable: exited)
                    reconciler.publishProxyStatus()
                }
            }
            if fds[1].revents != 0 {
                let signal = signals.take()
                if signal == SIGUSR2 {
                    logger.notice("SIGUSR2: rolling restart of the proxy")
                    supervisor?.rollingRestart()
                    reconciler.publishProxyStatus()
                    continue
                }
                if signal == SIGHUP {
                    // A daemon's reload: read the config again now, for a
                    // change no inotify event told of (a file that is a
                    // symlink to one outside the directory, a network
                    // filesystem).
                    logger.notice("SIGHUP: reading the config again")
                    deadline = .now
                    continue
                }
                logger.notice("signal \(signal): exiting; pinned programs and maps stay in force, and so does the proxy")
                break loop
            }
            // A backend changed health, or the proxy's ejections changed:
            // the same reconcile, with the manifests as they are.
            var healthNews = false
            if fds[2].revents != 0 {
                healthChecker.drain()
                healthNews = true
            }
            if let renewal = issuer?.nextRenewal, renewal.timeIntervalSinceNow <= 0 {
                reconciler.issueIdentities()
            }
            if reconciler.wantsEjections, nextEjectionPoll <= .now {
                nextEjectionPoll = .now + .seconds(1)
                if reconciler.pollEjections() { healthNews = true }
            }
            if healthNews && deadline == nil {
                retryAfterFailure = reconciler.reconcile() == .kernelFailed
                fill.withLock { $0 = reconciler.mapFill }
            }
            if fds[0].revents != 0, watcher.drain() {
                if watcher.lostEvents {
                    logger.notice("config watch: file events were lost (the inotify queue was full); reading the whole config again")
                }
                deadline = .now + configuration.debounce
                continue
            }
            let debounced = deadline.map { $0 <= .now || n == 0 } ?? false
            if n == 0 && lookForCgroups && !debounced && !retryAfterFailure {
                reconciler.refreshCgroups()
                fill.withLock { $0 = reconciler.mapFill }
                continue
            }
            if debounced || (n == 0 && retryAfterFailure) {
                deadline = nil
                retryAfterFailure = reconciler.reconcile() == .kernelFailed
                fill.withLock { $0 = reconciler.mapFill }
            }
        }
        server.stop()
        healthChecker.update([])
        try? probeGroup.syncShutdownGracefully()
        // (server.stop() removed the socket; the run directory goes on the
        // way out, if nothing else is in it.)
        try? group.syncShutdownGracefully()
    }

    /// The proxy's series (its /metrics, swift-prometheus text), so one
    /// scrape of the agent covers the node. Empty when no proxy answers.
    static func proxyMetrics(_ runDirectory: String) -> String {
        (try? UnixHTTP.get(socket: runDirectory + "/proxy.sock", path: "/metrics", timeoutSeconds: 1)) ?? ""
    }

    /// The proxy's listener, from --proxy-address.
    static func proxySupervisor(_ configuration: AgentConfiguration, pinDirectory: String,
                                logger: Logger) throws(PreflightError) -> ProxySupervisor? {
        let address: IPv4Address
        switch configuration.proxyAddress {
        case "none":
            return nil
        case "auto":
            guard let first = Host.localIPv4Addresses().first(where: { $0.value >> 24 != 127 }) else {
                throw PreflightError("--proxy-address auto: this network namespace has no non-loopback IPv4 address; give one or use none")
            }
            address = first
        case let text:
            guard let ip = IPv4Address(text) else { throw PreflightError("--proxy-address \(text) is not an IPv4 address, auto or none") }
            guard Host.localIPv4Addresses().contains(ip) else {
                throw PreflightError("--proxy-address \(text) is not an address of this node")
            }
            address = ip
        }
        return ProxySupervisor(node: configuration.node, listen: (address, configuration.proxyPort),
                               pinDirectory: pinDirectory, runDirectory: configuration.resolvedRunDirectory,
                               accessLog: configuration.accessLog, threads: configuration.proxyThreads,
                               pinThreads: configuration.proxyPinThreads, logger: logger)
    }

    static func parseAddress(_ text: String) throws(PreflightError) -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
              (0...65535).contains(port) else {
            throw PreflightError("--metrics-addr \(text) is not HOST:PORT")
        }
        return (String(text[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port)
    }
}

/// Turns SIGTERM/SIGINT/SIGHUP/SIGUSR2 into a readable fd for the poll loop (the
/// self-pipe trick: write() is async-signal-safe).
final class SignalPipe {
    let readFD: Int32

    init(_ signals: [Int32]) throws(AgentError) {
        (readFD, signalPipeWriteFD) = try Self.nonBlockingPipe()
        // A parent may have blocked some of these (test runners do), and a
        // blocked mask survives exec: unblock them, or they stay pending.
        var mask = sigset_t()
        sigemptyset(&mask)
        for signal in signals { sigaddset(&mask, signal) }
        pthread_sigmask(SIG_UNBLOCK, &mask, nil)
        for signal in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { number in
                var byte = UInt8(truncatingIfNeeded: number)
                _ = write(signalPipeWriteFD, &byte, 1)
            }
            sigaction(signal, &action, nil)
        }
    }

    /// A pipe whose ends are non-blocking and close on exec: (read, write).
    static func nonBlockingPipe() throws(AgentError) -> (Int32, Int32) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw AgentError("pipe: \(String(cString: strerror(errno)))") }
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, O_NONBLOCK)
        }
        return (fds[0], fds[1])
    }

    /// The signal that arrived.
    func take() -> Int32 {
        var byte: UInt8 = 0
        _ = read(readFD, &byte, 1)
        return Int32(byte)
    }
}

/// Written once before any handler is installed; read only by the handler.
nonisolated(unsafe) private var signalPipeWriteFD: Int32 = -1
