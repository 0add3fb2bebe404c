import Glibc
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import WeftCore

/// Active health checks (TrafficPolicy healthCheck), run by each node's
/// agent against every backend of the Services it is told about, the way
/// each Envoy checks its own clusters. A TCP probe is a connect; an HTTP
/// probe is one GET whose status must be an expected one. A backend turns
/// failing after `unhealthyThreshold` failed probes in a row and passing
/// after `healthyThreshold` good ones; a backend starts out passing, so an
/// agent restart never blackholes a Service while its first probes run.
///
/// Probes run on one NIO event loop, which owns all probe state; the agent's
/// control thread reads the failing set through a Mutex and is woken through
/// an eventfd when it changes.
final class HealthChecker: Sendable {
    struct Target: Hashable, Sendable {
        var cluster: String
        var backend: BackendAddress
        var check: TrafficPolicy.HealthCheck
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
    /// Readable when the failing set changed (the agent polls it).
    let fd: Int32
    private let writeFD: Int32
    private let failingSet = Mutex<[String: Set<BackendAddress>]>([:])
    private let counts = Mutex<(probes: Int, failures: Int)>((0, 0))
    /// Loop-confined: every access is on `loop`.
    private nonisolated(unsafe) var probes: [Target: Probe] = [:]

    init(loop: any EventLoop, logger: Logger) throws(AgentError) {
        self.loop = loop
        self.logger = logger
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
        let done: (Bool, String) -> Void = { [self] ok, detail in
            guard !probe.stopped else { return }
            record(probe, ok: ok, detail: detail)
            // The next probe an interval after this one started, with a
            // little jitter so probes of many backends do not line up.
            let interval = check.interval.nanoseconds
            let jitter = Int64.random(in: 0...max(interval / 20, 1))
            let next = max(started + .nanoseconds(interval + jitter) - .now(), .nanoseconds(0))
            probe.timer = loop.assumeIsolated().scheduleTask(in: next) { [self] in run(probe) }
        }
        let timeout = TimeAmount.nanoseconds(check.timeout.nanoseconds)
        let address = probe.target.backend
        let bootstrap = ClientBootstrap(group: loop).connectTimeout(timeout)
        guard let http = check.http else {
            bootstrap.connect(host: address.address.description, port: Int(address.port)).assumeIsolated().whenComplete { result in
                switch result {
                case .success(let channel):
                    channel.close(promise: nil)
                    done(true, "connected")
                case .failure(let error):
                    done(false, "\(error)")
                }
            }
            return
        }
        let answer = loop.makePromise(of: HTTPResponseStatus.self)
        let deadline = loop.scheduleTask(in: timeout) { answer.fail(ChannelError.connectTimeout(timeout)) }
        bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(StatusReader(answer))
                }
            }
            .connect(host: address.address.description, port: Int(address.port))
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: http.path)
                    head.headers.add(name: "host", value: address.description)
                    head.headers.add(name: "user-agent", value: "weft-health/1")
                    head.headers.add(name: "connection", value: "close")
                    channel.write(HTTPClientRequestPart.head(head), promise: nil)
                    channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                    answer.futureResult.whenComplete { _ in channel.close(promise: nil) }
                case .failure(let error):
                    answer.fail(error)
                }
            }
        answer.futureResult.assumeIsolated().whenComplete { result in
            deadline.cancel()
            switch result {
            case .success(let status): done(http.expects(Int(status.code)), "HTTP \(status.code)")
            case .failure(let error): done(false, "\(error)")
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
    /// Every backend of a Service with a health check that `node`'s agent
    /// can probe (see `ClusterState.plaintextProbeable`).
    static func targets(_ state: ClusterState, node: String) -> Set<Target> {
        var out: Set<Target> = []
        for policy in state.trafficPolicies {
            guard let check = policy.healthCheck else { continue }
            for name in policy.targets {
                guard let service = state.services.first(where: {
                    $0.metadata.namespace == policy.metadata.namespace && $0.metadata.name == name
                }) else { continue }
                for port in service.ports where port.transport == .tcp {
                    let cluster = ProxyTable.clusterName(namespace: service.metadata.namespace, service: name, port: port.port)
                    for w in state.backends(of: service) where state.plaintextProbeable(w, from: node) {
                        guard let target = w.resolve(port.targetPort, transport: .tcp) else { continue }
                        out.insert(Target(cluster: cluster, backend: BackendAddress(address: w.address, port: target, transport: .tcp),
                                          check: check))
                    }
                }
            }
        }
        return out
    }
}

/// Takes the status of the first response head, then is done.
private final class StatusReader: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    private let promise: EventLoopPromise<HTTPResponseStatus>

    init(_ promise: EventLoopPromise<HTTPResponseStatus>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data) { promise.succeed(head.status) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(ChannelError.eof)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
