import Glibc
import NIOCore
import WeftCore

/// What the two express paths (ExpressHTTP1Handler for HTTP/1.1 clients,
/// ExpressHTTP2Handler for h2c clients) share: how a request is routed and
/// given a backend, the headers the proxy adds, the HTTP/1.1 connections to
/// backends, and what is recorded when an exchange ends. Each piece is the
/// full path's own rule, applied to requests read in place.
enum Express {
    /// An HTTP/1.1 keep-alive connection idle when the proxy begins to drain
    /// stays open this long for a request already on its way, which is
    /// answered with `Connection: close`; then it closes. Closing it at once
    /// would race a busy client's next request (it would see the connection
    /// close under it, unanswered), as HAProxy's close-spread-time and
    /// Envoy's drain period avoid too.
    static let drainIdleGrace = TimeAmount.seconds(1)
    /// How long a connection whose request head was refused (408, 431)
    /// reads and drops what its client still sends before it closes.
    static let linger = TimeAmount.seconds(2)

    /// What a connection on an express path keeps of its frontend's routing
    /// for one snapshot, so that a request costs no lookup by name: the
    /// matcher, the retry budget, and whether the express path serves the
    /// frontend at all (ExpressHTTP1Handler.serves). Used on one event loop
    /// only; a loop's new connections to the frontend its last one came to
    /// share it (`current`).
    final class Routing {
        let snapshot: RouteSnapshot
        let frontendKey: String
        let matcher: RouteMatcher?
        let budget: LoopState.BudgetBox?
        let serves: Bool
        /// The request side of the frontend's TrafficPolicy (rate limit,
        /// fault injection), if it has one.
        let guardState: FrontendGuard?

        private init(snapshot: RouteSnapshot, frontendKey: String, source: IPv4Address?, loop: LoopState) {
            self.snapshot = snapshot
            self.frontendKey = frontendKey
            matcher = snapshot.matcher(frontendKey, source: source)
            budget = matcher.map { loop.budget($0.frontend.name) }
            serves = ExpressHTTP1Handler.serves(snapshot, frontendKey: frontendKey)
            guardState = snapshot.guards.isEmpty ? nil : snapshot.guards[frontendKey]
        }

        /// The endpoints of the cluster a request here went to last (most
        /// routes have one backend): its lookup by name, a String hashed,
        /// made once per connection and snapshot.
        private var lastCluster: String?
        private var lastEndpoints: [EndpointKey]?

        func endpoints(_ cluster: String) -> [EndpointKey]? {
            if let lastCluster, lastCluster == cluster { return lastEndpoints }
            lastCluster = cluster
            lastEndpoints = snapshot.endpoints[cluster]
            return lastEndpoints
        }

        /// `previous` while the proxy's snapshot is the one it was made
        /// for; a new one otherwise. `source`: the connection's client (its
        /// namespace may have consumer routes of the frontend). A new
        /// connection to the frontend the loop's last one came to (clients
        /// of a Service do that connection after connection) takes that
        /// one's, unless the snapshot has consumer routes, which make the
        /// routing the client's own: four lookups by name fewer.
        static func current(_ previous: Routing?, frontendKey: String, source: IPv4Address?, loop: LoopState,
                            proxy: ProxyContext) -> Routing {
            let snapshot = loop.snapshot(proxy)
            if let previous, previous.snapshot === snapshot { return previous }
            let shared = snapshot.consumerMatchers.isEmpty
            if shared, let last = loop.lastRouting, last.snapshot === snapshot, last.frontendKey == frontendKey {
                return last
            }
            let routing = Routing(snapshot: snapshot, frontendKey: frontendKey, source: source, loop: loop)
            if shared { loop.lastRouting = routing }
            return routing
        }
    }

    /// A request the express path takes: its route and backend, and the
    /// tunnel to the backend's node when it is on another one.
    struct Target {
        var route: String
        /// The backend of the route's split drawn (its cluster's name).
        var cluster: String
        var key: EndpointKey
        /// The backend's pool state on this loop (in-flight count, idle connections).
        var state: UpstreamPool.EndpointState
        var tunnel: TunnelChoice?
        /// With a TrafficPolicy on the backend's Service: the request's slot
        /// and outcome, given back and told when the exchange ends.
        var hold: ClusterRuntime.Hold?
        /// A cookie hash's cookie minted for a request without one: the
        /// response carries it (Set-Cookie), as on the full path.
        var setCookie: String?
        /// A persistent session (sessionPersistence): what the response does
        /// to it, and its field (Set-Cookie, or the rule's header) when it
        /// begins or renews one.
        var session: StickySession.Answer?
        /// A delay injected by the Service's TrafficPolicy: the request
        /// waits this long before it is sent. Its backend's request slot
        /// (`hold`) is given back for the wait, as the full path picks the
        /// backend only after it: a delayed request counts against no
        /// circuit breaker and no least-request choice while it waits.
        var delay: Duration?
    }

    /// What the express path did for a request it chose a backend for
    /// (Target) and then hands to the full path: the full path goes on
    /// from there, as if it had done it, rather than starting over. Its
    /// split's draw stands (`cluster`); the Service's TrafficPolicy was
    /// judged once (a rate limit's token taken, a fault drawn) and is not
    /// judged again; and a connect that failed is the full path's first
    /// attempt (`failedConnect`), so that the full path tries another
    /// backend, or answers 503 at once when it would not try again (one
    /// backend): a connect timeout costs one timeout, not two.
    struct Handed {
        var cluster: String
        /// An injected delay drawn: served, or still to be served (handed
        /// over during the wait: the full path waits it out from the start).
        enum Delay { case none, served, pending(Duration) }
        var delay = Delay.none
        struct FailedConnect {
            var key: EndpointKey
            /// (A TunnelRefused 403: the backend's node refused the stream
            /// by policy; the full path answers 403, as for its own.)
            var error: any Error
        }
        var failedConnect: FailedConnect?
    }

    /// What Express.target decides for a request.
    enum Choice {
        case forward(Target)
        /// Answered in place, as the full path answers it: over its
        /// Service's rate limit (429), or an injected abort.
        case answered(LocalAnswer)
        case handOver
    }

    /// An answer of the proxy's own to a request it judged (TrafficPolicy).
    struct LocalAnswer {
        var route: String
        var service: String?
        var serviceNamespace: String?
        var status: Int
        var body: String
        /// Fields after the proxy's own (Retry-After).
        var extra: [(String, String)]
        /// The response flag: RL (rate limit) or FI (fault abort).
        var flags: String
        /// The gRPC status a gRPC call gets (a fault abort's grpcStatus);
        /// nil: the one `status` maps to (GRPCLocalAnswer).
        var grpcStatus: Int? = nil
    }

    /// An exchange's response flags, with DI in front when an injected
    /// delay held it (as the full path records it: "DI", "DI,UC").
    static func flags(_ flags: String, delayed: Bool) -> String {
        guard delayed else { return flags }
        return flags == "-" ? "DI" : "DI," + flags
    }
    /// Routes `request` as the full path does and picks its backend;
    /// `handOver` when the request needs the full path (filters, retries,
    /// timeouts, a non-HTTP/1.1 upstream,
    /// AuthorizationPolicy on the pod, no backend the pod may reach, every
    /// one at its circuit breaker's maxRequests: the full path then
    /// answers). `header` gives a field's first value, for a policy that
    /// hashes on one or a rate limit keyed by one; `cookie` a cookie's
    /// value, for a cookie hash (a request without it gets one minted:
    /// Target.setCookie). A Service's rate limit and fault injection are
    /// judged last, once the request would be forwarded, so that no
    /// request the full path then takes is judged twice (`answered`: the
    /// caller answers, on either path; a delay: Target.delay).
    static func target(_ request: RouteMatcher.Request, matcher: RouteMatcher, routing: Routing,
                       loop: LoopState, proxy: ProxyContext, source: IPv4Address,
                       header: (String) -> Substring?, cookie: (String) -> Substring?) -> Choice {
        let snapshot = routing.snapshot
        // A path that is not plain is normalized on the full path (RequestPath).
        guard RequestPath.isPlain(request.path, mode: snapshot.table.pathNormalization ?? .base) else { return .handOver }
        guard let (action, match) = matcher.route(request), action.filters.isEmpty, action.retry == nil,
              action.timeouts.request == nil, action.timeouts.backendRequest == nil else { return .handOver }
        // A persistent session's backend comes first, whatever the weights.
        var session = action.session.map { rule in
            StickySession(rule: rule, value: rule.kind == .cookie ? cookie(rule.name) : header(rule.name), match: match,
                          now: StickySession.now())
        }
        let pinned = session?.pin(action.backends) { routing.endpoints($0) }
        guard let cluster = pinned ?? HTTPProxyHandler.pickCluster(action.backends, using: &loop.random),
              cluster.filters.isEmpty, cluster.upstreamProtocol == .http1,
              let endpoints = routing.endpoints(cluster.cluster), !endpoints.isEmpty else { return .handOver }
        // A backend the pod may reach (the full path says why when none is).
        let key: EndpointKey
        var hold: ClusterRuntime.Hold?
        var setCookie: String?
        let runtime = snapshot.runtimes.isEmpty ? nil : snapshot.runtimes[cluster.cluster]
        if let claimed = session?.claim(among: endpoints, runtime: runtime, loop: loop, proxy: proxy,
                                        generation: snapshot.generation, source: source) {
            (key, hold) = claimed
        } else if let runtime {
            let hash: UInt64?
            (hash, setCookie) = runtime.requestKey(header: header, cookie: cookie, source: source, random: &loop.random)
            guard case .picked(let picked) = loop.pick(runtime, hash: hash, proxy: proxy, generation: snapshot.generation,
                                                       source: source),
                  let index = runtime.index[picked] else { return .handOver }
            key = picked
            hold = ClusterRuntime.Hold(runtime, index)
        } else {
            guard let picked = loop.pickReachable(endpoints, proxy: proxy, generation: snapshot.generation, source: source) else {
                return .handOver
            }
            key = picked
        }
        guard snapshot.authorization.isEmpty || snapshot.authorization[key.ip.value] == nil else {
            hold?.release()
            return .handOver
        }
        let state = loop.pool.state(key)
        let tunnel = loop.tunnel(proxy, to: key, from: source, snapshot: snapshot)
        // circuitBreaker.maxConnections and maxPendingRequests bite where a
        // new connection is needed: the full path answers 503 (flag UO).
        if let h = hold, h.runtime.connectionLimit(h.backend, idle: { hasIdle(state, tunnel: tunnel) }) != nil {
            hold?.release()
            return .handOver
        }
        // The TrafficPolicy last, once nothing is left that would hand the
        // request over: the full path would judge it again (a second token,
        // a second draw). A request answered here gives its backend back.
        var delay: Duration?
        if let guardState = routing.guardState {
            func answer(_ status: Int, _ body: String, _ extra: [(String, String)], _ flags: String, _ grpc: Int? = nil) -> Choice {
                hold?.release()
                return .answered(LocalAnswer(route: action.name, service: matcher.frontend.service,
                                             serviceNamespace: matcher.frontend.namespace, status: status, body: body,
                                             extra: extra, flags: flags, grpcStatus: grpc))
            }
            switch guardState.judge(route: action.name, source: source, header: header, snapshot: snapshot, random: &loop.random) {
            case .pass:
                break
            case .limited(let limitKey, let wait):
                proxy.stats.rateLimited.add(1, ordering: .relaxed)
                let limited = FrontendGuard.limitedAnswer(frontend: matcher.frontend.name, key: limitKey, wait: wait)
                return answer(429, limited.body, [limited.retryAfter], "RL")
            case .abort(let status, let grpc):
                proxy.stats.faultsAborted.add(1, ordering: .relaxed)
                return answer(status, HTTPProxyHandler.faultAbortBody, [], "FI", grpc)
            case .delay(let d):
                proxy.stats.faultsDelayed.add(1, ordering: .relaxed)
                hold?.release()
                delay = d
            }
        }
        return .forward(Target(route: action.name, cluster: cluster.cluster, key: key, state: state, tunnel: tunnel, hold: hold, setCookie: setCookie,
                               session: session?.response(endpoint: key, now: StickySession.now()), delay: delay))
    }

    /// After an injected delay (Target.delay): takes the backend's request
    /// slot again and checks its connection limits as `target` did before
    /// the wait (other requests may have taken the room meanwhile). false,
    /// with nothing held, when the full path must take the request over
    /// (it picks another backend or answers 503).
    static func resume(_ hold: inout ClusterRuntime.Hold?, state: UpstreamPool.EndpointState, tunnel: TunnelChoice?) -> Bool {
        guard var h = hold else { return true }
        defer { hold = h }
        guard h.resume() else { return false }
        if h.runtime.connectionLimit(h.backend, idle: { hasIdle(state, tunnel: tunnel) }) != nil {
            h.release()
            return false
        }
        return true
    }

    /// Whether `idleUpstream` would find a connection (none is taken).
    static func hasIdle(_ state: UpstreamPool.EndpointState, tunnel: TunnelChoice?) -> Bool {
        if let source = tunnel?.source.value { return state.expressTunnelIdle[source]?.contains { $0.isActive } ?? false }
        return state.express.contains { $0.isActive }
    }

    /// The header lines the proxy adds to every request of one client
    /// connection that do not change from request to request
    /// (X-Forwarded-For, X-Forwarded-Proto, Forwarded, Via), made once per
    /// connection, with and without X-Forwarded-Proto.
    struct ConnectionHeaders {
        /// "x-forwarded-for: C\r\nx-forwarded-proto: http\r\nforwarded:
        /// for=C;proto=http\r\nvia: 1.1 V", made once per connection in one
        /// allocation (interpolated, it took ten).
        let withProto: [UInt8]
        /// Where "\r\nx-forwarded-proto: http" is in `withProto`: a request
        /// that names its own proto gets the lines around it.
        let protoLine: Range<Int>

        init(client: String, via: String) {
            var bytes: [UInt8] = []
            bytes.reserveCapacity(2 * client.utf8.count + via.utf8.count + 90)
            bytes.append(contentsOf: "x-forwarded-for: ".utf8)
            bytes.append(contentsOf: client.utf8)
            let start = bytes.count
            bytes.append(contentsOf: "\r\nx-forwarded-proto: http".utf8)
            protoLine = start..<bytes.count
            bytes.append(contentsOf: "\r\nforwarded: for=".utf8)
            bytes.append(contentsOf: client.utf8)
            bytes.append(contentsOf: ";proto=http\r\nvia: 1.1 ".utf8)
            bytes.append(contentsOf: via.utf8)
            withProto = bytes
        }

        /// The lines for a request: without x-forwarded-proto when it
        /// carries its own.
        func write(into out: inout ByteBuffer, hasProto: Bool) {
            guard hasProto else {
                out.writeBytes(withProto)
                return
            }
            withProto.withUnsafeBytes { b in
                out.writeBytes(UnsafeRawBufferPointer(rebasing: b[..<protoLine.lowerBound]))
                out.writeBytes(UnsafeRawBufferPointer(rebasing: b[protoLine.upperBound...]))
            }
        }
    }

    /// Writes the header lines the proxy adds to a request (as
    /// HTTPProxyHandler.prepareUpstreamHeaders does) and the blank line that
    /// ends the head; the ids are written straight into `out`. With `keep`
    /// (access logs are on), returns the request id it made, if any, and
    /// the span, read back from what was written.
    /// The access log's view of a request the proxy answers itself (over a
    /// rate limit): the ids it would have carried, as the full path logs
    /// them; nil when access logs are off. `first` gives a field's first
    /// value as it came.
    static func answeredLocally(_ snapshot: RouteSnapshot, method: String, path: String, bytesIn: Int, hasProto: Bool,
                                hasRequestID: Bool, fixed: ConnectionHeaders, allocator: ByteBufferAllocator, loop: LoopState,
                                first: (String) -> String?) -> Logged? {
        guard snapshot.table.accessLog != nil else { return nil }
        var scratch = allocator.buffer(capacity: 256)
        let (requestID, span) = writeProxyHeaders(&scratch, fixed, hasProto: hasProto, hasRequestID: hasRequestID,
                                                  keep: true, loop: loop)
        guard let span else { return nil }
        return Logged(wallStart: AccessLog.now(), method: method, path: path, authority: first("host"),
                      userAgent: first("user-agent"), requestID: requestID ?? first("x-request-id"), span: span, bytesIn: bytesIn)
    }

    static func writeProxyHeaders(_ out: inout ByteBuffer, _ fixed: ConnectionHeaders, hasProto: Bool,
                                  hasRequestID: Bool, keep: Bool, loop: LoopState)
        -> (requestID: String?, span: TraceContext.Span?) {
        fixed.write(into: &out, hasProto: hasProto)
        // The rest in one write: "\r\nx-request-id: " + 36, "\r\ntraceparent: " + 55, "\r\n\r\n".
        let id = hasRequestID ? nil : Optional(HTTPProxyHandler.requestIDBits(using: &loop.random))
        let trace = TraceContext.freshIDs(random: &loop.random)
        let idAt = out.writerIndex + 16, traceAt = out.writerIndex + (id == nil ? 0 : 52) + 15
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: 52 + 70 + 4) { b in
            var i = 0
            func put(_ s: StaticString) {
                UnsafeMutableRawBufferPointer(rebasing: b[i...]).copyMemory(from: UnsafeRawBufferPointer(start: s.utf8Start,
                                                                                                         count: s.utf8CodeUnitCount))
                i += s.utf8CodeUnitCount
            }
            if let (a, z) = id {
                put("\r\nx-request-id: ")
                i += HTTPProxyHandler.writeRequestID(a, z, into: UnsafeMutableRawBufferPointer(rebasing: b[i...]))
            }
            put("\r\ntraceparent: ")
            i += TraceContext.write(trace: trace.trace, traceText: nil, span: trace.span, flags: 1,
                                    into: UnsafeMutableRawBufferPointer(rebasing: b[i...]))
            put("\r\n\r\n")
            return i
        }
        guard keep else { return (nil, nil) }
        let requestID = id == nil ? nil : out.getString(at: idAt, length: 36)
        return (requestID, out.getString(at: traceAt, length: 55).map { TraceContext.Span(header: $0, parentID: nil) })
    }

    static func isIdempotent(_ method: String) -> Bool {
        switch method {
        case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE": return true
        default: return false
        }
    }

    /// An idle express connection to `key` from this loop's pool, marked
    /// reused; nil when there is none (then `connectUpstream`). The common
    /// case, answered with no callback.
    /// (One past its TrafficPolicy's maxConnectionDuration, `lifetimes`
    /// of the request's snapshot, is closed and passed over.)
    static func idleUpstream(from state: UpstreamPool.EndpointState, tunnel: TunnelChoice?, key: EndpointKey,
                             lifetimes: [EndpointKey: UpstreamLifetime]) -> ExpressUpstream? {
        let lifetime = lifetimes.isEmpty ? nil : lifetimes[key]
        if let source = tunnel?.source.value {
            while let idle = state.expressTunnelIdle[source]?.popLast() {
                if UpstreamPool.usable(idle, lifetime) {
                    idle.reused = true
                    return idle
                }
            }
            return nil
        }
        while let idle = state.express.popLast() {
            if UpstreamPool.usable(idle, lifetime) {
                idle.reused = true
                return idle
            }
        }
        return nil
    }

    /// A new express connection to `key`, for when `idleUpstream` has none:
    /// with a `tunnel`, a CONNECT stream of the tunnel to the backend's node
    /// that carries HTTP/1.1 (`x-weft-protocol: http1`: the destination
    /// reads it request by request). The caller counts a failure.
    /// `counters` (a TrafficPolicy cluster's backend) counts a connection of
    /// its own while it is being made and while it is open, for the circuit
    /// breaker, as the full path's pool counts its own (a tunnel stream
    /// too: it is the source's connection to the backend, kept as one).
    static func connectUpstream(to key: EndpointKey, tunnel: TunnelChoice?, counters: ClusterRuntime.Backend?, loop: LoopState,
                                _ done: @escaping (Result<ExpressUpstream, any Error>) -> Void) {
        let opened = loop.pool.connecting(key, counters)
        if let tunnel {
            let source = tunnel.source.value
            loop.pool.tunnels.stream(tunnel.route, to: key, source: tunnel.source, identities: tunnel.identities, http: "http1",
                                     initialize: { stream in
                try stream.pipeline.syncOperations.addHandler(ExpressUpstream(tunnelSource: source))
            }) { result in
                opened(try? result.get())
                switch result {
                case .success(let stream):
                    guard let upstream = try? stream.pipeline.syncOperations.handler(type: ExpressUpstream.self) else {
                        stream.close(promise: nil)
                        return done(.failure(ChannelError.ioOnClosedChannel))
                    }
                    done(.success(upstream))
                case .failure(let error):
                    done(.failure(error))
                }
            }
            return
        }
        loop.pool.bootstrap(for: key)
            .channelInitializer { channel in
                loop.pool.initialize(channel) { try $0.addHandler(ExpressUpstream()) }
            }
            .connect(key)
            .assumeIsolated()
            .whenComplete { result in
                opened(try? result.get())
                switch result {
                case .success(let channel):
                    guard let upstream = try? channel.pipeline.syncOperations.handler(type: ExpressUpstream.self) else {
                        channel.close(promise: nil)
                        return done(.failure(ChannelError.ioOnClosedChannel))
                    }
                    loop.pool.recordSuccess(key)
                    done(.success(upstream))
                case .failure(let error):
                    done(.failure(error))
                }
            }
    }

    /// A connect that failed: the endpoint's ejection count, the counters,
    /// and a debug line.
    /// Whether a failed connect is the backend's node refusing the tunnel
    /// stream by policy (403): final, and no fault of the backend's (not
    /// counted as a connect failure, nor told to the outlier detector).
    static func refusedByPolicy(_ error: any Error) -> Bool {
        (error as? TunnelRefused)?.status == 403
    }

    static func countConnectFailure(_ key: EndpointKey, _ error: any Error, snapshot: RouteSnapshot, frontendKey: String,
                                    loop: LoopState, proxy: ProxyContext) {
        loop.pool.recordConnectFailure(key)
        proxy.stats.upstreamConnectFailures.add(1, ordering: .relaxed)
        loop.countEvent("connect_failure", proxy: proxy, snapshot: snapshot, frontendKey: frontendKey)
        proxy.logger.debug("upstream connect failed", metadata: ["endpoint": "\(key)", "error": "\(error)"])
    }

    /// Whether a tunnelled response says the backend's node could not reach
    /// the pod (`x-weft-refused`): a refused connect, not the pod's answer.
    static func isRefusal(_ p: UnsafeRawBufferPointer, _ fields: [HTTP1Wire.Field]) -> Bool {
        fields.contains { HTTP1Wire.equals(p, $0.name, "x-weft-refused") }
    }

    /// A backend that closed or reset its connection under a request.
    static func countReset(snapshot: RouteSnapshot, frontendKey: String, loop: LoopState?, proxy: ProxyContext) {
        proxy.stats.upstreamResets.add(1, ordering: .relaxed)
        loop?.countEvent("reset", proxy: proxy, snapshot: snapshot, frontendKey: frontendKey)
    }

    /// A connection whose exchange is over: back to the idle list when the
    /// backend keeps it open and the list has room, closed otherwise.
    static func release(_ upstream: ExpressUpstream, to idle: UpstreamPool.EndpointState, key: EndpointKey, reusable: Bool,
                        snapshot: RouteSnapshot, proxy: ProxyContext, pool: UpstreamPool) {
        upstream.owner = nil
        upstream.resume()
        // (Spent by its Service's TrafficPolicy lifetime: closed.)
        let reusable = reusable && !UpstreamPool.spent(upstream, key: key, snapshot.lifetimes)
        let limit = proxy.configuration.maxIdlePerBackend
        if let source = upstream.tunnelSource {
            if reusable && upstream.isActive && pool.keeps(tunnelStream: upstream.channel) && !idle.wanted
                && idle.expressTunnelIdle[source, default: []].count < limit {
                upstream.keptSweeps = 0
                idle.expressTunnelIdle[source, default: []].append(upstream)
                pool.kept()
            } else {
                upstream.close()
            }
        } else if reusable && upstream.isActive && idle.express.count < limit && !idle.wanted {
            upstream.keptSweeps = 0
            idle.express.append(upstream)
            pool.kept()
        } else {
            // (Also where full-path requests wait for a connection to the
            // backend at its maxConnections, on any loop: the room is theirs.)
            upstream.close()
        }
    }

    /// How a response's body is delimited, as it goes by.
    enum Framing {
        /// The head is not through yet.
        case head
        case length(Int)
        case chunked(ChunkedFramer)
        /// Until the backend closes (no Content-Length, not chunked).
        case close
    }

    /// What a backend's response head says of its body and its connection.
    struct ResponseBody {
        var framing: Framing
        /// The backend closes the connection after this response.
        var close: Bool
        /// The body comes chunked.
        var chunked: Bool
        /// The values of Connection lines: the fields they name are hop-by-hop too.
        var named: ConnectionLines
    }

    /// The values of a head's Connection lines. Nearly every response has
    /// one ("keep-alive"), rarely more: the first is kept inline, so
    /// reading a head allocates no array for it.
    struct ConnectionLines {
        private var first: Range<Int>?
        private var more: [Range<Int>] = []

        var isEmpty: Bool { first == nil }

        mutating func append(_ value: Range<Int>) {
            if first == nil { first = value } else { more.append(value) }
        }

        /// Whether one of the lines lists the field name `p[name]`.
        func lists(_ p: UnsafeRawBufferPointer, name: Range<Int>) -> Bool {
            guard let first else { return false }
            return HTTP1Wire.listContains(p, first, name: name) || more.contains { HTTP1Wire.listContains(p, $0, name: name) }
        }
    }

    /// Reads the framing of a parsed response head (RFC 9112, section 6.3);
    /// nil when it contradicts itself.
    static func responseBody(_ p: UnsafeRawBufferPointer, _ status: HTTP1Wire.StatusLine, _ fields: [HTTP1Wire.Field],
                             isHEAD: Bool) -> ResponseBody? {
        var contentLength: Int?, chunked = false, coded = false, close = status.minor == 0, keepAlive = false
        var named = ConnectionLines()
        for f in fields {
            // By length first: most fields are none of these three.
            switch f.name.count {
            case 14 where HTTP1Wire.equals(p, f.name, "content-length"):
                guard let v = HTTP1Wire.decimal(p, f.value), contentLength == nil || contentLength == v else { return nil }
                contentLength = v
            case 17 where HTTP1Wire.equals(p, f.name, "transfer-encoding"):
                coded = true
                chunked = HTTP1Wire.lastElement(p, f.value, is: "chunked")
            case 10 where HTTP1Wire.equals(p, f.name, "connection"):
                // The common line, "keep-alive" alone: nothing more to read.
                if HTTP1Wire.equals(p, f.value, "keep-alive") {
                    keepAlive = true
                    continue
                }
                if HTTP1Wire.listContains(p, f.value, "close") { close = true }
                let lineKeepAlive = HTTP1Wire.listContains(p, f.value, "keep-alive")
                if lineKeepAlive { keepAlive = true }
                // ("keep-alive" alone names a field that is hop-by-hop anyway.)
                if !(lineKeepAlive && HTTP1Wire.count(p, f.value) == 1) { named.append(f.value) }
            default:
                break
            }
        }
        if status.minor == 0 && keepAlive { close = false }
        let framing: Framing
        if isHEAD || status.code < 200 || status.code == 204 || status.code == 304 {
            framing = .length(0)
        } else if coded {
            framing = chunked ? .chunked(ChunkedFramer()) : .close
        } else if let contentLength {
            framing = .length(contentLength)
        } else {
            framing = .close
        }
        return ResponseBody(framing: framing, close: close, chunked: chunked, named: named)
    }

    /// Fields that describe one connection, not the message (RFC 9110,
    /// section 7.6.1), and proxy credentials: never passed on.
    static func isHopByHop(_ p: UnsafeRawBufferPointer, _ n: Range<Int>) -> Bool {
        switch n.count {
        case 2: return HTTP1Wire.equals(p, n, "te")
        case 7: return HTTP1Wire.equals(p, n, "upgrade") || HTTP1Wire.equals(p, n, "trailer")
        case 10: return HTTP1Wire.equals(p, n, "connection") || HTTP1Wire.equals(p, n, "keep-alive")
        case 16: return HTTP1Wire.equals(p, n, "proxy-connection")
        case 17: return HTTP1Wire.equals(p, n, "transfer-encoding")
        case 18: return HTTP1Wire.equals(p, n, "proxy-authenticate")
        case 19: return HTTP1Wire.equals(p, n, "proxy-authorization")
        default: return false
        }
    }

    /// A request's access log fields, taken while its head is at hand.
    struct Logged {
        var wallStart: timespec
        var method: String
        var path: String
        var authority: String?
        var userAgent: String?
        var requestID: String?
        var span: TraceContext.Span
        var bytesIn: Int
    }

    /// A gRPC call's final response head, as read: the `grpc-status` it
    /// carries (a trailers-only answer); else, for a 2xx gRPC response,
    /// that the outlier detector waits for the status, and where it comes
    /// from: a gRPC-Web body's trailer frame, or (`trailerLines`: a chunked
    /// body read as it is) its trailer lines.
    static func grpcHead(_ p: UnsafeRawBufferPointer, _ fields: [HTTP1Wire.Field], code: Int, trailerLines: Bool)
        -> (status: String?, pending: Bool, reader: GRPCStatusReader?) {
        var type: String?
        for f in fields {
            if HTTP1Wire.equals(p, f.name, "grpc-status") {
                return (String(decoding: UnsafeRawBufferPointer(rebasing: p[f.value]), as: UTF8.self), false, nil)
            } else if HTTP1Wire.equals(p, f.name, "content-type") {
                type = String(decoding: UnsafeRawBufferPointer(rebasing: p[f.value]), as: UTF8.self)
            }
        }
        guard code < 300, let type, type.hasPrefix("application/grpc") else { return (nil, false, nil) }
        return (nil, true, GRPCStatusReader.reading(contentType: type) ?? (trailerLines ? GRPCStatusReader(.trailerLines) : nil))
    }

    /// One ended exchange, as the metrics and the access log see it.
    struct Outcome {
        var snapshot: RouteSnapshot
        var service: String?
        var serviceNamespace: String?
        /// nil: the proxy answered (a rate limit).
        var key: EndpointKey?
        var route: String
        var grpc: Bool
        var status: Int
        var flags: String
        var start: NIODeadline
        var bytesOut: Int
        var protocolName: String
        var logged: Logged?
        /// A gRPC call's status as the backend sent it (the response head's,
        /// its trailers', a gRPC-Web body's trailer frame's); `web`: the call
        /// is gRPC-Web's (GRPCStatus.reported).
        var grpcStatus: String? = nil
        var web = false

        /// The call's `grpc_response_status` ("" for plain HTTP).
        var grpcLabel: String {
            grpc ? GRPCStatus.reported(grpcStatus.map { Substring($0) }, httpCode: status, web: web) : ""
        }
    }

    /// The request series an event loop last built a label set for, and
    /// the client and Service it was for, which a connection's own
    /// LastSeries leaves out (they are the connection's): a new
    /// connection's first exchange like it needs no label set built and
    /// hashed either.
    struct LoopSeries {
        let source: IPv4Address
        let service: String?
        let serviceNamespace: String?
        let last: LastSeries
    }

    /// The request series a connection's last exchange was counted in, and
    /// what chose it: a client's requests on one connection mostly share
    /// every label, and then need no label set built and hashed.
    struct LastSeries {
        let snapshot: RouteSnapshot
        let key: EndpointKey?
        let route: String
        let grpc: Bool
        let status: Int
        let flags: String
        let grpcLabel: String
        let series: ProxyTelemetry.RequestSeries

        /// The series, if `o` (whose gRPC status label is `grpcLabel`) is
        /// counted in it.
        func series(for o: Outcome, grpcLabel: String) -> ProxyTelemetry.RequestSeries? {
            snapshot === o.snapshot && key == o.key && status == o.status && grpc == o.grpc && route == o.route
                && flags == o.flags && self.grpcLabel == grpcLabel ? series : nil
        }
    }

    /// Records an ended exchange: the request series, and the access log
    /// line when logs are on for the source's namespace. `last` is the
    /// connection's LastSeries (the source is the connection's too).
    static func record(_ o: Outcome, source: IPv4Address, last: inout LastSeries?, loop: LoopState, proxy: ProxyContext) {
        let metrics = o.snapshot.table.requestMetrics != false
        guard metrics || o.logged != nil else { return }
        let elapsed = NIODeadline.now() - o.start
        var labelled: PeerLabels?
        let grpcLabel = o.grpcLabel
        if metrics {
            let series: ProxyTelemetry.RequestSeries
            // (Asked in place: `if let last` copied it, five retains and
            // releases a request.)
            if let hit = last?.series(for: o, grpcLabel: grpcLabel) {
                series = hit
            } else if let shared = loop.lastSeries, shared.source == source, shared.service == o.service,
                      shared.serviceNamespace == o.serviceNamespace, let hit = shared.last.series(for: o, grpcLabel: grpcLabel) {
                // A new connection's first exchange, labelled as the loop's
                // last one (the same client and Service, as connection after
                // connection of one client is).
                series = hit
                last = shared.last
            } else {
                let p = PeerLabels(snapshot: o.snapshot, source: source, service: o.service,
                                   serviceNamespace: o.serviceNamespace, upstream: o.key)
                labelled = p
                let labels = RequestLabels(peers: p, route: o.route, requestProtocol: o.grpc ? "grpc" : "http",
                                           responseCode: o.status, responseFlags: o.flags, grpcResponseStatus: grpcLabel)
                series = loop.telemetry.request(labels, proxy.telemetry)
                let made = LastSeries(snapshot: o.snapshot, key: o.key, route: o.route, grpc: o.grpc, status: o.status,
                                      flags: o.flags, grpcLabel: grpcLabel, series: series)
                last = made
                loop.lastSeries = LoopSeries(source: source, service: o.service, serviceNamespace: o.serviceNamespace, last: made)
            }
            series.count.increment()
            series.duration.record(nanoseconds: elapsed.nanoseconds)
        }
        guard let logged = o.logged else { return }
        let peers = labelled ?? PeerLabels(snapshot: o.snapshot, source: source, service: o.service,
                                           serviceNamespace: o.serviceNamespace, upstream: o.key)
        if AccessLog.covers(o.snapshot.table.accessLog, namespace: peers.sourceNamespace) {
            proxy.accessLog.append(HTTPLogLine(
                start: logged.wallStart, protocolName: o.protocolName, method: logged.method, path: logged.path,
                authority: logged.authority, code: o.status, flags: o.flags, elapsedNanos: elapsed.nanoseconds,
                bytesIn: logged.bytesIn, bytesOut: o.bytesOut, attempts: o.key == nil ? 0 : 1, route: o.route, source: source,
                peers: peers, upstream: o.key, requestID: logged.requestID, span: logged.span,
                userAgent: logged.userAgent, grpcStatus: o.grpc ? grpcLabel : nil).render())
        }
    }
}

extension Express.Outcome {
    /// An answer of the proxy's own, as it goes out: to a gRPC call
    /// (`grpcType`, its content-type), a 200 with the gRPC status
    /// (GRPCLocalAnswer).
    init(answered local: Express.LocalAnswer, snapshot: RouteSnapshot, grpcType: String?, protocolName: String,
         logged: Express.Logged?) {
        self.init(snapshot: snapshot, service: local.service, serviceNamespace: local.serviceNamespace, key: nil,
                  route: local.route, grpc: grpcType != nil, status: local.status, flags: local.flags,
                  start: NIODeadline.now(), bytesOut: 0, protocolName: protocolName, logged: logged)
        if let type = GRPCLocalAnswer.contentType(grpcType, status: local.status) {
            status = 200
            grpcStatus = GRPCLocalAnswer.fields(httpCode: local.status, body: local.body, grpcStatus: local.grpcStatus).first?.1
            web = type.hasPrefix("application/grpc-web")
        }
    }
}
