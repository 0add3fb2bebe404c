import Glibc
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import WeftCore
import WeftStatus

/// Active health checks (TrafficPolicy healthCheck), run by each node's
/// agent against every backend of the Services it is told about, the way
/// each Envoy checks its own clusters. A TCP probe is a connect; an HTTP
/// probe is one GET whose status must be an expected one. A backend turns
/// failing after `unhealthyThreshold` failed probes in a row and passing
/// after `healthyThreshold` good ones; a backend starts out passing, so an
/// agent restart never blackholes a Service while its first probes run.
/// After a failure of a passing backend, the probes that would confirm it
/// come faster (interval / unhealthyThreshold): failover within two
/// intervals whatever the threshold.
///
/// Probes run on one NIO event loop, which owns all probe state; the agent's
/// control thread reads the failing set through a Mutex and is woken through
/// an eventfd when it changes.
final class HealthChecker: Sendable {
    struct Target: Hashable, Sendable {
        var cluster: String
        var backend: BackendAddress
        var check: TrafficPolicy.HealthCheck
        /// Probed by this node's proxy through the tunnel to the proxy of
        /// this node, which runs the check (nil: probed from here).
        var via: String?
    }

    private final class Probe {
        let target: Target
        var failures = 0
        var successes = 0
        var failing = false
        var timer: Scheduled<Void>?
        var stopped = false
        init(_ target: Target) { self.target = target }
    }

    private let loop: any EventLoop
    private let logger: Logger
    /// The node proxy's status socket: probes through tunnels go there.
    private let proxySocket: String?
    /// Readable when the failing set changed (the agent polls it).
    let fd: Int32
    private let writeFD: Int32
    private let failingSet = Mutex<[String: Set<BackendAddress>]>([:])
    private let counts = Mutex<(probes: Int, failures: Int)>((0, 0))
    /// Loop-confined: every access is on `loop`.
    private nonisolated(unsafe) var probes: [Target: Probe] = [:]

    init(loop: any EventLoop, logger: Logger, proxySocket: String? = nil) throws(AgentError) {
        self.loop = loop
        self.logger = logger
        self.proxySocket = proxySocket
        (fd, writeFD) = try SignalPipe.nonBlockingPipe()
    }

    deinit {
        close(fd)
        close(writeFD)
    }

    /// Backends failing their checks now, by cluster.
    var failing: [String: Set<BackendAddress>] { failingSet.withLock { $0 } }
    var totals: (probes: Int, failures: Int) { counts.withLock { $0 } }

    /// Clears the wake-up (the agent read the news).
    func drain() {
        var bytes = [UInt8](repeating: 0, count: 64)
        while read(fd, &bytes, bytes.count) > 0 {}
    }

    /// The probes to run from now on. Unchanged targets keep their state
    /// and schedule; a changed check (interval, path...) starts afresh.
    func update(_ targets: Set<Target>) {
        loop.execute { [self] in
            // On the loop from here on.
            for (target, probe) in probes where !targets.contains(target) {
                probe.stopped = true
                probe.timer?.cancel()
                probes[target] = nil
            }
            for target in targets where probes[target] == nil {
                let probe = Probe(target)
                probes[target] = probe
                // Spread the first probes over the interval.
                let first = Int64.random(in: 0...max(target.check.interval.nanoseconds / 4, 1))
                probe.timer = loop.assumeIsolated().scheduleTask(in: .nanoseconds(first)) { [self] in run(probe) }
            }
            publish()
        }
    }

    private func run(_ probe: Probe) {
        guard !probe.stopped else { return }
        let check = probe.target.check
        let started = NIODeadline.now()
        let done: (Bool?, String) -> Void = { [self] ok, detail in
            guard !probe.stopped else { return }
            if let ok { record(probe, ok: ok, detail: detail) }
            // The next probe an interval after this one started, with a
            // little jitter so probes of many backends do not line up.
            var interval = check.interval.nanoseconds
            var jitter = Int64.random(in: 0...max(interval / 20, 1))
            if !probe.failing, probe.failures > 0 {
                // Confirming a failure: the probes that complete the streak
                // come at interval / unhealthyThreshold, so a backend that
                // died (refused or failing probes) is out within two
                // intervals of its death whatever the threshold: the first
                // failed probe at most an interval after it, the rest
                // within the next.
                interval /= Int64(max(check.unhealthyThreshold, 1))
                jitter = 0
            }
            let next = max(started + .nanoseconds(interval + jitter) - .now(), .nanoseconds(0))
            probe.timer = loop.assumeIsolated().scheduleTask(in: next) { [self] in run(probe) }
        }
        let timeout = TimeAmount.nanoseconds(check.timeout.nanoseconds)
        let address = probe.target.backend
        let result: EventLoopFuture<Int>
        if let node = probe.target.via {
            guard let proxySocket else { return done(nil, "no proxy to probe through") }
            let key = check.probeKey
            result = HealthProbe.throughProxy(on: loop, socket: proxySocket, node: node, host: address.address.description,
                                              port: Int(address.port), path: key.isEmpty ? nil : key, timeout: timeout)
        } else if let grpc = check.grpc {
            result = HealthProbe.grpc(on: loop, host: address.address.description, port: Int(address.port),
                                      service: grpc.service, timeout: timeout)
        } else {
            result = HealthProbe.run(on: loop, host: address.address.description, port: Int(address.port),
                                     path: check.http?.path, timeout: timeout)
        }
        result.assumeIsolated().whenComplete { outcome in
            switch outcome {
            case .success where probe.target.via != nil:
                done(true, "passed at \(probe.target.via ?? "")")
            case .success(let serving) where check.grpc != nil:
                done(serving == HealthProbe.ServingStatus.serving, HealthProbe.ServingStatus.name(serving))
            case .success(let status) where check.http == nil:
                done(true, status == 0 ? "connected" : "HTTP \(status)")
            case .success(let status):
                done(check.http?.expects(status) ?? true, "HTTP \(status)")
            case .failure(let error as HealthProbe.ProbeFailed) where error.unknown:
                // No verdict: the next probe as scheduled, the streak kept.
                done(nil, error.description)
            case .failure(let error):
                done(false, "\(error)")
            }
        }
    }

    private func record(_ probe: Probe, ok: Bool, detail: String) {
        counts.withLock {
            $0.probes += 1
            if !ok { $0.failures += 1 }
        }
        let check = probe.target.check
        if ok {
            probe.failures = 0
            probe.successes += 1
            if probe.failing && probe.successes >= check.healthyThreshold {
                probe.failing = false
                logger.notice("backend passes its health check again", metadata: [
                    "cluster": "\(probe.target.cluster)", "backend": "\(probe.target.backend)", "probe": "\(detail)"])
                publish()
            }
        } else {
            probe.successes = 0
            probe.failures += 1
            if !probe.failing && probe.failures >= check.unhealthyThreshold {
                probe.failing = true
                // A probe that times out is often a NetworkPolicy isolating
                // the pod: probes come from the nodes' addresses.
                let hint = detail.contains("imeout") || detail.contains("imedOut")
                    ? "; if a NetworkPolicy isolates the pod, it must admit the nodes' addresses on this port" : ""
                logger.warning("backend fails its health check\(hint)", metadata: [
                    "cluster": "\(probe.target.cluster)", "backend": "\(probe.target.backend)", "probe": "\(detail)"])
                publish()
            }
        }
    }

    /// Copies the failing set out of the loop and wakes the agent if it changed.
    private func publish() {
        var now: [String: Set<BackendAddress>] = [:]
        for probe in probes.values where probe.failing {
            now[probe.target.cluster, default: []].insert(probe.target.backend)
        }
        let changed = failingSet.withLock { old in
            defer { old = now }
            return old != now
        }
        if changed {
            var one: UInt8 = 1
            _ = write(writeFD, &one, 1)
        }
    }

    /// What to probe for a desired state: every TCP port of every Service
    /// whose TrafficPolicy has a healthCheck, at each selected backend.
    /// A backend this agent cannot probe in plaintext from its own address
    /// (see `ClusterState.plaintextProbeable`) is probed through the proxy
    /// of the node it runs on, over the mutual-TLS tunnel, when the mesh
    /// has a CA (`tunnels`); without one it is left to its own node.
    static func targets(_ state: ClusterState, node: String, tunnels: Bool) -> Set<Target> {
        var out: Set<Target> = []
        for probe in state.healthChecks() {
            var target = Target(cluster: probe.cluster, backend: probe.backend, check: probe.check)
            if !state.plaintextProbeable(probe.workload, from: node) {
                guard tunnels else { continue }
                target.via = probe.workload.node
            }
            out.insert(target)
        }
        return out
    }
}
