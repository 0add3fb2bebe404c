import NIOCore
import NIOHPACK
import NIOHTTP1
import WeftCore
import WeftIdentity
import WeftStatus

/// Health checks of pods that take only mutual TLS (PeerAuthentication
/// STRICT, or under an AuthorizationPolicy) on another node. A node's
/// address has no identity, so the agent's plaintext probe would be dropped
/// or refused while the pod is well. Instead the agent asks its own proxy
/// (`GET /probe` on proxy.sock); the proxy opens a tunnel stream with the
/// node's identity (`spiffe://D/ns/weft-system/sa/weft-node.NODE`) to the
/// pod's node, whose proxy runs the check against its pod — a check that
/// its own table lists for that pod and port, and nothing else — and
/// answers 200 when it passed, or 503 with why.
enum TunnelProbe {
    /// The header that makes a CONNECT a health check: the HTTP path, or
    /// empty for a TCP check.
    static let header = "x-weft-probe"

    typealias Answer = (status: HTTPResponseStatus, headers: [(String, String)], body: String)

    // MARK: the asking side (this node's agent -> this proxy -> the pod's node)

    /// `/probe?node=N&target=IP:PORT[&path=P]` from the agent. 200: the
    /// check passed; 503: it failed, or the pod's node cannot be reached
    /// (or is not who it should be); anything else: no verdict (this proxy
    /// could not ask, or the far one would not run that check).
    static func relay(_ proxy: ProxyContext, uri: String, loop: any EventLoop) -> EventLoopFuture<Answer> {
        func answer(_ status: HTTPResponseStatus, _ body: String) -> EventLoopFuture<Answer> {
            loop.makeSucceededFuture((status, [], body + "\n"))
        }
        guard let query = HealthProbe.query(uri), let node = query["node"], let targetText = query["target"],
              let colon = targetText.lastIndex(of: ":"), let ip = IPv4Address(targetText[..<colon]),
              let port = UInt16(targetText[targetText.index(after: colon)...]) else {
            return answer(.badRequest, "expected /probe?node=NODE&target=IP:PORT[&path=PATH]")
        }
        let snapshot = proxy.snapshot
        guard let identities = proxy.identities, snapshot.table.tunnel != nil else {
            return answer(HTTPResponseStatus(statusCode: 425, reasonPhrase: "Too Early"), "no tunnels (yet): no identities from the agent")
        }
        guard let pod = snapshot.workloadsByIP[ip.value], pod.node == node else {
            return answer(.notFound, "\(ip) is not a pod of node \(node) in table generation \(snapshot.generation)")
        }
        guard node != proxy.configuration.node else {
            return answer(.badRequest, "\(ip) is a pod of this node: probe it directly")
        }
        let source = SpiffeID.node(proxy.configuration.node, trustDomain: identities.trustDomain)
        guard identities.clientContexts[source] != nil else {
            return answer(HTTPResponseStatus(statusCode: 425, reasonPhrase: "Too Early"), "no certificate for \(source) yet")
        }
        guard let hop = NextHop.toward(ip) else {
            return answer(.badGateway, "no route toward \(ip)'s node")
        }
        let route = TunnelRoute(source: source, destination: SpiffeID.node(node, trustDomain: identities.trustDomain), node: hop)
        let promise = loop.makePromise(of: Answer.self)
        proxy.stats.probesRelayed.add(1, ordering: .relaxed)
        proxy.loop(loop).pool.tunnels.stream(route, to: EndpointKey(ip: ip, port: port, node: node), source: ip,
                                            identities: identities, extraHeaders: [(header, query["path"] ?? "")],
                                            initialize: { _ in }) { result in
            switch result {
            case .success(let stream):
                stream.close(promise: nil)
                promise.succeed((.ok, [], "passed\n"))
            case .failure(let error as TunnelRefused) where error.status == 503:
                promise.succeed((.serviceUnavailable, [], error.reason + "\n"))
            case .failure(let error as TunnelRefused) where error.status != 0:
                // The far proxy would not run it (its table does not know
                // the pod or the check yet): no verdict on the pod.
                promise.succeed((.conflict, [], "\(node)'s proxy refused (\(error.status)): \(error.reason)\n"))
            case .failure(let error):
                promise.succeed((.serviceUnavailable, [], "tunnel to \(node): \(error)\n"))
            }
        }
        return promise.futureResult
    }

    // MARK: the answering side (the pod's node)

    /// A CONNECT stream carrying `x-weft-probe` from `peer`, for `target`
    /// (already known to be a pod of this node): nil when the peer may
    /// ask and the check is one the table lists (`run` then runs it), or
    /// the refusal.
    static func check(_ proxy: ProxyContext, snapshot: RouteSnapshot, peer: SpiffeID, target: IPv4Address, port: UInt16,
                      path: String) -> Result<TrafficPolicy.HealthCheck, TunnelRefused> {
        guard peer.nodeName != nil, peer.trustDomain == proxy.identities?.trustDomain else {
            return .failure(TunnelRefused(status: 403, reason: "\(peer) is not a node of this mesh: only nodes run health checks"))
        }
        // (The check's probeKey: an HTTP path, grpc:SERVICE, or "" for TCP.)
        guard let check = snapshot.table.probes?["\(target):\(port)"]?.first(where: { $0.probeKey == path }) else {
            let what = path.isEmpty ? "TCP" : path.hasPrefix("grpc:") ? "gRPC health of \"\(path.dropFirst(5))\"" : "HTTP GET \(path)"
            return .failure(TunnelRefused(status: 403, reason: "no TrafficPolicy health check of \(target):\(port) is \(what)"))
        }
        return .success(check)
    }

    /// Runs `check` against the pod; 200 if it passed, else 503 and why.
    static func run(_ check: TrafficPolicy.HealthCheck, target: IPv4Address, port: UInt16,
                    on loop: any EventLoop) -> EventLoopFuture<Result<Int, TunnelRefused>> {
        let timeout = TimeAmount.nanoseconds(check.timeout.nanoseconds)
        if let grpc = check.grpc {
            return HealthProbe.grpc(on: loop, host: target.description, port: Int(port), service: grpc.service, timeout: timeout)
                .map { serving -> Result<Int, TunnelRefused> in
                    serving == HealthProbe.ServingStatus.serving ? .success(200)
                        : .failure(TunnelRefused(status: 503, reason: "gRPC health \(HealthProbe.ServingStatus.name(serving))"))
                }
                .recover { .failure(TunnelRefused(status: 503, reason: "\($0)")) }
        }
        return HealthProbe.run(on: loop, host: target.description, port: Int(port), path: check.http?.path, timeout: timeout)
            .map { status -> Result<Int, TunnelRefused> in
                if let http = check.http, !http.expects(status) {
                    return .failure(TunnelRefused(status: 503, reason: "HTTP \(status)"))
                }
                return .success(status)
            }
            .recover { .failure(TunnelRefused(status: 503, reason: "\($0)")) }
    }
}
