import CWeftSys
import Foundation
import Glibc
import Logging
import WeftCore
import WeftIdentity
import WeftKernel
import WeftStatus

/// Starts `weft proxy`, restarts it when it dies, hands it route tables,
/// and replaces it without dropping a request (rolling restart).
///
/// The proxy is a separate process so that an L7 bug cannot take the
/// datapath's control loop down with it, and it outlives the agent as the
/// pinned programs do: an agent that restarts adopts the running proxy
/// (found by its pid file) instead of starting a second one. Exits are
/// watched with pidfds, which work for adopted processes too.
final class ProxySupervisor {
    struct Instance {
        var pid: pid_t
        var pidfd: Int32
        var started: ContinuousClock.Instant
        var process: Process?
    }

    let node: String
    let listen: (address: IPv4Address, port: UInt16)
    let pinDirectory: String
    let runDirectory: String
    private let logger: Logger
    private(set) var current: Instance?
    /// Proxies told to drain; watched until they exit.
    private var draining: [Instance] = []
    private(set) var restarts = 0
    private var nextStart: ContinuousClock.Instant?
    private var backoff: Duration = .zero
    private(set) var lastTable: ProxyTable?

    private let accessLog: String?
    private let threads: Int?
    private let pinThreads: Bool

    init(node: String, listen: (address: IPv4Address, port: UInt16), pinDirectory: String, runDirectory: String,
         accessLog: String? = nil, threads: Int? = nil, pinThreads: Bool = false, logger: Logger) {
        self.node = node
        self.accessLog = accessLog
        self.threads = threads
        self.pinThreads = pinThreads
        self.listen = listen
        self.pinDirectory = pinDirectory
        self.runDirectory = runDirectory
        self.logger = logger
    }

    /// WEFT_PROXY_WRAPPER: an executable the proxy is started through, for profiling.
    static var wrapper: String? {
        guard let w = ProcessInfo.processInfo.environment["WEFT_PROXY_WRAPPER"], !w.isEmpty else { return nil }
        return w
    }

    var tableFile: String { runDirectory + "/proxy-table.json" }
    var pidFile: String { runDirectory + "/proxy.pid" }
    var statusSocket: String { runDirectory + "/proxy.sock" }

    /// fds for the agent's poll loop: readable when a proxy exits.
    var pollFDs: [Int32] { (current.map { [$0.pidfd] } ?? []) + draining.map(\.pidfd) }

    /// Milliseconds until a pending restart is due, if one is.
    var timeoutMillis: Int32? {
        guard let nextStart else { return nil }
        return max(0, Int32((nextStart - .now).seconds * 1000))
    }

    /// Adopts the proxy a previous agent left running, or starts one.
    func start() {
        Self.migrateAcceptQueues(logger: logger)
        if let pid = readPidFile(), Self.isProxy(pid, node: node) {
            let fd = weft_pidfd_open(pid)
            if fd >= 0 {
                current = Instance(pid: pid, pidfd: fd, started: .now, process: nil)
                logger.notice("adopted running proxy", metadata: ["pid": "\(pid)"])
                signal(SIGHUP)
                return
            }
        }
        spawn()
    }

    /// A restarted proxy's new listeners join the old one's SO_REUSEPORT
    /// group; when the old ones close to drain, connections still in their
    /// accept queues would be reset. With tcp_migrate_req (Linux 5.14, per
    /// network namespace) the kernel hands them to the listeners left.
    static func migrateAcceptQueues(logger: Logger) {
        let path = "/proc/sys/net/ipv4/tcp_migrate_req"
        guard FileManager.default.fileExists(atPath: path) else {
            return logger.info("no \(path): a proxy restart may reset connections not yet accepted")
        }
        do {
            try "1\n".write(toFile: path, atomically: false, encoding: .utf8)
        } catch {
            logger.warning("cannot set \(path): \(error); a proxy restart may reset connections not yet accepted")
        }
    }

    private func spawn() {
        nextStart = nil
        let process = Process()
        // The agent's own build, also once its file was replaced by an
        // upgrade in place (the proxy reads the table this agent writes):
        // the new build runs once the agent is restarted.
        let (executable, replaced) = Build.ownExecutablePath()
        if replaced {
            logger.warning("this agent's executable was replaced since it started; the proxy starts from the agent's own build (restart the agent to run the new one)")
        }
        let arguments = ["proxy", "--node", node, "--listen", "\(listen.address):\(listen.port)",
                         "--pin-dir", pinDirectory, "--run-dir", runDirectory] + (accessLog.map { ["--access-log", $0] } ?? [])
            + (threads.map { ["--threads", "\($0)"] } ?? []) + (pinThreads ? ["--pin-threads"] : [])
        if let wrapper = Self.wrapper {
            // A tool to run the proxy under (scripts/profile_proxy.py: callgrind),
            // given the proxy's executable and arguments; it must exec it, so
            // that its pid is the proxy's.
            process.executableURL = URL(fileURLWithPath: wrapper)
            process.arguments = [executable] + arguments
        } else {
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = arguments
        }
        do {
            try process.run()
        } catch {
            logger.error("cannot start weft proxy: \(error)")
            scheduleRestart()
            return
        }
        let pid = process.processIdentifier
        let fd = weft_pidfd_open(pid)
        guard fd >= 0 else {
            logger.error("proxy \(pid) exited at once")
            scheduleRestart()
            return
        }
        current = Instance(pid: pid, pidfd: fd, started: .now, process: process)
        try? "\(pid)\n".write(toFile: pidFile, atomically: true, encoding: .utf8)
        logger.notice("proxy started", metadata: ["pid": "\(pid)", "listen": "\(listen.address):\(listen.port)"])
    }

    private func scheduleRestart() {
        // Crash loops back off from 100 ms to 5 s; a proxy that ran for a
        // while is restarted at once.
        backoff = backoff == .zero ? .milliseconds(100) : min(backoff * 2, .seconds(5))
        nextStart = .now + backoff
    }

    /// Call when poll() says one of pollFDs is readable, or a restart is due.
    func service(readable: Set<Int32>) {
        if let c = current, readable.contains(c.pidfd) {
            close(c.pidfd)
            current = nil
            restarts += 1
            let ranFor = ContinuousClock.now - c.started
            logger.error("proxy exited; restarting", metadata: ["pid": "\(c.pid)", "ran_seconds": "\(Int(ranFor.seconds))"])
            if ranFor > .seconds(10) { backoff = .zero; spawn() } else { scheduleRestart() }
        }
        draining.removeAll { d in
            guard readable.contains(d.pidfd) else { return false }
            close(d.pidfd)
            logger.info("drained proxy exited", metadata: ["pid": "\(d.pid)"])
            return true
        }
        if let nextStart, nextStart <= .now { spawn() }
    }

    /// What `install` handed the proxy.
    enum Handover {
        /// Nothing: the proxy has this table and generation (or the write failed, which is logged).
        case none
        /// Only a newer generation of the table it has.
        case generation
        /// The whole table.
        case table
    }

    /// Writes the route table where the proxy reads it and tells the proxy;
    /// one comparison with the table it has decides how much.
    @discardableResult
    func install(_ table: ProxyTable) -> Handover {
        do {
            if let last = lastTable, table.sameContent(as: last) {
                guard table.generation > last.generation else { return .none }
                // Only the generation moved: the proxy keeps the table it
                // read and takes this generation (ProxyTable.generationFileName).
                let file = runDirectory + "/" + ProxyTable.generationFileName
                let temp = runDirectory + "/." + ProxyTable.generationFileName + ".tmp"
                try "\(table.generation)\n".write(toFile: temp, atomically: false, encoding: .utf8)
                guard rename(temp, file) == 0 else { throw AgentError("rename \(temp): \(String(cString: strerror(errno)))") }
                lastTable = table
                signal(SIGHUP)
                return .generation
            }
            let data = try JSONEncoder().encode(table)
            let temp = runDirectory + "/.proxy-table.json.tmp"
            try data.write(to: URL(fileURLWithPath: temp))
            // A whole table carries its own generation; a generation file
            // left from before (an agent restarted counts from 1 again)
            // must not override it.
            unlink(runDirectory + "/" + ProxyTable.generationFileName)
            guard rename(temp, tableFile) == 0 else { throw AgentError("rename \(temp): \(String(cString: strerror(errno)))") }
            lastTable = table
            signal(SIGHUP)
            return .table
        } catch {
            logger.error("cannot write the proxy's route table: \(error)")
            return .none
        }
    }

    /// Writes the identity bundle (mode 0600) where the proxy reads it and
    /// tells the proxy, which reads it with the route table.
    func installIdentities(_ bundle: IdentityBundle) {
        do {
            let data = try JSONEncoder().encode(bundle)
            let path = runDirectory + "/" + IdentityBundle.fileName
            let temp = runDirectory + "/." + IdentityBundle.fileName + ".tmp"
            unlink(temp)
            let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw AgentError("open \(temp): \(String(cString: strerror(errno)))") }
            let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
            guard written == data.count else { throw AgentError("write \(temp): short write") }
            guard rename(temp, path) == 0 else { throw AgentError("rename \(temp): \(String(cString: strerror(errno)))") }
            signal(SIGHUP)
        } catch {
            logger.error("cannot write the proxy's identities: \(error)")
        }
    }

    /// Waits (briefly) until the proxy reports `generation` in force, so
    /// that capture is switched on only for frontends the proxy knows.
    func waitForGeneration(_ generation: UInt64, timeout: Duration = .milliseconds(500)) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let g = try? reportedGeneration(), g >= generation { return true }
            usleep(2_000)
        }
        return false
    }

    func reportedGeneration() throws -> UInt64? {
        let text = try UnixHTTP.get(socket: statusSocket, path: "/generation")
        return text.split(separator: " ").first.flatMap { UInt64($0) }
    }

    /// Starts a successor, waits until it serves, then drains the old one:
    /// the successor binds the same port (SO_REUSEPORT) before the old
    /// listeners close, and net.ipv4.tcp_migrate_req moves connections still
    /// in the old accept queues over, so no connect() is refused.
    func rollingRestart() {
        guard let old = current else { spawn(); return }
        current = nil
        spawn()
        guard let new = current else {
            current = old
            return
        }
        let deadline = ContinuousClock.now + .seconds(5)
        var ready = false
        while ContinuousClock.now < deadline {
            if let text = try? UnixHTTP.get(socket: statusSocket, path: "/generation"),
               text.split(separator: " ").dropFirst(2).first.map({ Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }) == new.pid {
                ready = true
                break
            }
            usleep(5_000)
        }
        if !ready { logger.warning("new proxy \(new.pid) not ready after 5 s; draining the old one anyway") }
        kill(old.pid, SIGTERM)
        draining.append(old)
        logger.notice("rolling restart", metadata: ["old_pid": "\(old.pid)", "new_pid": "\(new.pid)"])
    }

    /// Stops the proxy for good (agent --uninstall).
    func stop() {
        if let c = current { kill(c.pid, SIGTERM) }
    }

    private func signal(_ sig: Int32) {
        if let c = current { kill(c.pid, sig) }
    }

    private func readPidFile() -> pid_t? {
        (try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// Is `pid` a `weft proxy --node <node>`? (A pid file can outlive
    /// its process, and pids are reused.)
    static func isProxy(_ pid: pid_t, node: String) -> Bool {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let args = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        guard args.count > 3, args[1] == "proxy", let i = args.firstIndex(of: "--node"), i + 1 < args.count else { return false }
        return args[i + 1] == node
    }
}

/// The node proxy's run directory, as `weft agent --uninstall` leaves it.
public enum ProxyRunDirectory {
    /// `weft agent --uninstall`: the node's proxy drains and exits (up to
    /// `drain`), and what the agent wrote for it goes: the route table, its
    /// generation, the identity bundle (private keys), then the run
    /// directory, unless something else is left in it (returned: the names
    /// of what is, such as an access log).
    public static func remove(node: String, drain: Duration = .seconds(5)) -> [String] {
        let run = AgentConfiguration.runDirectory(node: node)
        let pidFile = run + "/proxy.pid"
        if let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
           let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), ProxySupervisor.isProxy(pid, node: node) {
            kill(pid, SIGTERM)
            let deadline = ContinuousClock.now + drain
            while kill(pid, 0) == 0, ContinuousClock.now < deadline { usleep(20_000) }
        }
        for name in ["proxy.pid", "proxy-table.json", ".proxy-table.json.tmp", ProxyTable.generationFileName,
                     "." + ProxyTable.generationFileName + ".tmp", IdentityBundle.fileName, "." + IdentityBundle.fileName + ".tmp"] {
            unlink(run + "/" + name)
        }
        if rmdir(run) == 0 || errno == ENOENT {
            rmdir((run as NSString).deletingLastPathComponent)  // /run/weft, if no other node's
            return []
        }
        return ((try? FileManager.default.contentsOfDirectory(atPath: run)) ?? []).sorted()
    }
}
