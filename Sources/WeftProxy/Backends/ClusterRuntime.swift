import Foundation
import NIOCore
import NIOHTTP1
import Synchronization
import WeftCore

/// The shared, live side of one cluster with a TrafficPolicy: per-backend
/// counters every event loop reads (circuit breakers and least-request must
/// see the whole proxy, not one loop), the outlier detector, and the hash
/// table of a consistent-hash balancer. Built with each route snapshot; a
/// backend's counters and ejection carry over from the previous snapshot,
/// so a table change forgets nothing.
final class ClusterRuntime: Sendable {
    /// What every loop may touch about one backend: atomics only.
    final class Backend: Sendable {
        let key: EndpointKey
        let local: Bool
        /// Requests in flight to it, from every loop.
        let requests = Atomic<Int>(0)
        /// Upstream connections to it, open or being made (UpstreamPool.counting).
        let connections = Atomic<Int>(0)
        /// Requests waiting for a new connection to it: connecting, or
        /// queued at maxConnections (`waiting`, UpstreamPool.wait).
        let pending = Atomic<Int>(0)
        let waiting = Atomic<Int>(0)
        /// Connections to it closed while requests waited, not yet taken
        /// by one (one wake per connection closed, over every loop).
        let freed = Atomic<Int>(0)
        /// Ejected until this uptime (ns); 0: not ejected.
        let ejectedUntil = Atomic<UInt64>(0)
        /// When it joined the cluster (uptime ns), for slow start.
        let since: UInt64

        init(key: EndpointKey, local: Bool, since: UInt64) {
            self.key = key
            self.local = local
            self.since = since
        }

        func isEjected(_ now: UInt64) -> Bool { ejectedUntil.load(ordering: .relaxed) > now }
    }

    let name: String
    let policy: ProxyTable.BackendPolicy
    let backends: [Backend]
    let index: [EndpointKey: Int]
    /// Indexes of the backends a client of this node prefers: this
    /// node's (locality PreferLocal), or those in its zone (PreferSameZone).
    let localIndexes: [Int]
    private let ring: ConsistentHash.Ring?
    private let maglev: ConsistentHash.Maglev?
    private let roundRobin = Atomic<Int>(0)
    /// Retries in progress for this cluster (circuitBreaker.maxRetries).
    let retries = Atomic<Int>(0)
    let outliers: OutlierDetector?

    init(name: String, policy: ProxyTable.BackendPolicy, endpoints: [EndpointKey], node: String,
         zones: [String: String]? = nil, hinted: [String]? = nil, previous: ClusterRuntime?) {
        self.name = name
        self.policy = policy
        let now = NIODeadline.now().uptimeNanoseconds
        // A proxy that starts finds its backends already serving: only those
        // that join later ramp up.
        let joined = previous == nil ? 0 : now
        // Near: on this node, or with PreferSameZone in its zone (a node
        // in no zone prefers nothing), or, under topology-aware routing,
        // given to its zone (ProxyTable.zoneHints).
        let zone = policy.loadBalancer.locality == .preferSameZone ? zones?[node] : nil
        let given = hinted.map { Set($0.compactMap(IPv4Address.init)) }
        func near(_ e: EndpointKey) -> Bool {
            if let given { return given.contains(e.ip) }
            return policy.loadBalancer.locality == .preferSameZone ? zone != nil && zones?[e.node] == zone : e.node == node
        }
        var index: [EndpointKey: Int] = [:]
        var backends: [Backend] = []
        for e in endpoints where index[e] == nil {
            index[e] = backends.count
            if let old = previous?.index[e].map({ previous!.backends[$0] }) {
                backends.append(old)
            } else {
                backends.append(Backend(key: e, local: near(e), since: joined))
            }
        }
        self.backends = backends
        self.index = index
        localIndexes = backends.indices.filter { backends[$0].local }
        let names = backends.map(\.key.description)
        switch policy.loadBalancer.algorithm {
        case .ringHash: ring = ConsistentHash.Ring(names); maglev = nil
        case .maglev: maglev = ConsistentHash.Maglev(names); ring = nil
        default: ring = nil; maglev = nil
        }
        outliers = policy.outlierDetection.map { OutlierDetector($0, backends: backends.count, previous: previous?.outliers,
                                                                 previousIndex: previous?.index, keys: backends.map(\.key)) }
    }

    // The per-request entry points below (reserve, connectionLimit, pick,
    // requestHash, OutlierDetector.record) are kept out of line, as is
    // FrontendGuard.judge: a call costs a few nanoseconds, and a CPU profile
    // of the proxy can then charge every sample under them to the policy
    // (`scripts/bench resilience`, "accounting").

    /// Takes one of a backend's request slots (maxRequests) atomically: two
    /// loops that both saw room cannot both take the last slot.
    @inline(never)
    func reserve(_ key: EndpointKey) -> Bool {
        guard let i = index[key] else { return false }
        let old = backends[i].requests.wrappingAdd(1, ordering: .relaxed).oldValue
        if let max = policy.circuitBreaker?.maxRequests, old >= max {
            backends[i].requests.subtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    /// The circuit breaker's limit a new connection to `b` would exceed
    /// (maxConnections, maxPendingRequests), if any. A request that finds
    /// an idle connection (`idle`) opens none, so no limit applies to it.
    @inline(never)
    func connectionLimit(_ b: Backend, idle: () -> Bool) -> String? {
        guard let cb = policy.circuitBreaker, cb.maxConnections != nil || cb.maxPendingRequests != nil, !idle() else { return nil }
        if let max = cb.maxConnections, b.connections.load(ordering: .relaxed) >= max { return "maxConnections" }
        if let max = cb.maxPendingRequests, b.pending.load(ordering: .relaxed) >= max { return "maxPendingRequests" }
        return nil
    }

    /// Takes a place among `b`'s pending requests for a request that finds
    /// it at maxConnections and will wait for a connection, atomically (two
    /// loops that both saw room cannot both take the last place); false
    /// when maxPendingRequests are pending (connecting or waiting) already.
    func reserveWait(_ b: Backend) -> Bool {
        let old = b.pending.wrappingAdd(1, ordering: .relaxed).oldValue
        if let max = policy.circuitBreaker?.maxPendingRequests, old >= max {
            b.pending.subtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    /// A request's hold on the backend it was given: its request slot
    /// (maxRequests, and least-request's count), given back once, and the
    /// one outcome the outlier detector is told. Kept per attempt by the
    /// full path (HTTPProxyHandler's RequestState) and per exchange by the
    /// express paths.
    struct Hold {
        let runtime: ClusterRuntime
        let index: Int
        private var released = false
        private var recorded = false

        init(_ runtime: ClusterRuntime, _ index: Int) {
            self.runtime = runtime
            self.index = index
        }

        var backend: Backend { runtime.backends[index] }

        mutating func release() {
            guard !released else { return }
            released = true
            runtime.backends[index].requests.subtract(1, ordering: .relaxed)
        }

        /// Takes the backend's slot again after a release (an injected
        /// delay's wait); false when the backend is at its maxRequests now.
        mutating func resume() -> Bool {
            guard released else { return true }
            guard runtime.reserve(backend.key) else { return false }
            released = false
            return true
        }

        /// Tells the outlier detector how the request went (once).
        mutating func record(_ outcome: OutlierDetector.Outcome) {
            guard !recorded else { return }
            recorded = true
            runtime.outliers?.record(index, outcome, runtime: runtime)
        }

        /// The outcome of a response with `code` (a 1xx is not one).
        mutating func record(status code: Int) {
            if code >= 200 { record(code >= 500 ? .serverError(code) : .success) }
        }

        /// A final response head's outcome on the express paths: a gRPC
        /// status in it (a trailers-only answer) decides, as the full path
        /// has it; a gRPC call whose status is still to come (`pending`)
        /// is told at its end (`record(grpcEnd:)`); else its `code`.
        mutating func record(head code: Int, grpcStatus: String?, pending: Bool) {
            if let grpc = grpcStatus.flatMap(HTTPProxyHandler.grpcOutcome(status:)) {
                record(grpc)
            } else if !pending {
                record(status: code)
            }
        }

        /// A gRPC call's outcome at its end: the status its trailers gave,
        /// a success without one.
        mutating func record(grpcEnd status: String?) {
            record(status.flatMap(HTTPProxyHandler.grpcOutcome(status:)) ?? .success)
        }
    }

    /// Why no backend could be chosen.
    enum Refusal: Error {
        /// Every candidate is at a circuit-breaker limit.
        case overflow
        case empty
    }

    /// One backend for a request, by the policy's algorithm. `usable`
    /// carries the caller's own exclusions (tried already, policy-denied).
    /// Ejected backends and ones at their request limit are skipped while
    /// any other remains; an all-ejected cluster still gets a backend (the
    /// health-check panic rule, applied to ejections too), but an
    /// all-full one overflows.
    @inline(never)
    func pick(hash: UInt64?, random: inout LoopRandom, excluded: (EndpointKey) -> Bool) -> Result<EndpointKey, Refusal> {
        let n = backends.count
        guard n > 0 else { return .failure(.empty) }
        let now = NIODeadline.now().uptimeNanoseconds
        let maxRequests = policy.circuitBreaker?.maxRequests
        func full(_ b: Backend) -> Bool { maxRequests.map { b.requests.load(ordering: .relaxed) >= $0 } ?? false }
        func open(_ i: Int) -> Bool {
            let b = backends[i]
            return !b.isEjected(now) && !excluded(b.key) && !full(b)
        }
        let localOnly = policy.loadBalancer.locality != .none && !localIndexes.isEmpty
            && localIndexes.contains(where: open)
        let chosen: Int?
        if let hash, let ring {
            chosen = ring.first(hash) { open($0) && (!localOnly || backends[$0].local) }
        } else if let hash, let maglev {
            chosen = maglev.first(hash) { open($0) && (!localOnly || backends[$0].local) }
        } else {
            chosen = pickSpread(localOnly ? localIndexes : nil, now: now, random: &random, open: open)
        }
        if let chosen { return .success(backends[chosen].key) }
        // Nothing open. Full ones stay shut; otherwise take one not excluded
        // (ejected or not): never fail a request without an attempt.
        if backends.allSatisfy({ full($0) || excluded($0.key) }) {
            return backends.contains(where: full) ? .failure(.overflow) : .failure(.empty)
        }
        let start = Int(random.next() % UInt64(n))
        for k in 0..<n {
            let b = backends[(start + k) % n]
            if !excluded(b.key) && !full(b) { return .success(b.key) }
        }
        return .failure(.overflow)
    }

    /// RoundRobin, Random or LeastRequest (two random choices, fewer
    /// requests in flight wins), with slow start thinning new backends.
    private func pickSpread(_ subset: [Int]?, now: UInt64, random: inout LoopRandom, open: (Int) -> Bool) -> Int? {
        // The whole cluster unless a subset is given; no array is built.
        let n = subset?.count ?? backends.count
        guard n > 0 else { return nil }
        func pool(_ k: Int) -> Int { subset.map { $0[k] } ?? k }
        let lb = policy.loadBalancer
        for attempt in 0..<(4 * n + 4) {
            let i: Int
            switch lb.algorithm {
            case .roundRobin:
                i = pool(Int(UInt(bitPattern: roundRobin.wrappingAdd(1, ordering: .relaxed).oldValue) % UInt(n)))
            case .random, .ringHash, .maglev:
                i = pool(Int(random.next() % UInt64(n)))
            case .leastRequest:
                let a = pool(Int(random.next() % UInt64(n)))
                let b = pool(Int(random.next() % UInt64(n)))
                switch (open(a), open(b)) {
                case (true, true):
                    i = backends[a].requests.load(ordering: .relaxed) <= backends[b].requests.load(ordering: .relaxed) ? a : b
                case (false, true): i = b
                default: i = a
                }
            }
            guard open(i) else { continue }
            // Slow start: a backend younger than the window is taken with
            // probability (age/window)^(1/aggression), at least 10%.
            if let window = lb.slowStartWindow, attempt < 2 * n + 2 {
                let w = UInt64(window.nanoseconds)
                let age = now &- backends[i].since
                if backends[i].since != 0, age < w {
                    let share = max(0.1, pow(Double(age) / Double(w), 1 / lb.slowStartAggression))
                    if Double(random.next() >> 11) / Double(1 << 53) >= share { continue }
                }
            }
            return i
        }
        // Unlucky draws: a scan.
        return (0..<n).lazy.map(pool).first(where: open)
    }

    /// The hash of a request's key, or nil when it carries none (then the
    /// request is spread like Random). `header` gives a field's first value
    /// (split at commas, as NIO's `headers[canonicalForm:]`), `cookie` a
    /// cookie's; the express paths read neither from NIO's headers.
    @inline(never)
    func requestHash(header: (String) -> Substring?, cookie: (String) -> Substring?, source: IPv4Address) -> UInt64? {
        switch policy.loadBalancer.hashOn {
        case nil: return nil
        case .header(let name): return header(name).map { ConsistentHash.stableHash($0.utf8) }
        case .cookie(let name, _): return cookie(name).map { ConsistentHash.stableHash($0.utf8) }
        case .sourceIP: return ConsistentHash.mix(UInt64(source.value))
        }
    }

    /// The request's hash as `requestHash` gives it; for a cookie hash with
    /// a ttl and a request without the cookie, a cookie minted for it: its
    /// hash, and the Set-Cookie the response carries, so that the client
    /// sticks from then on. Both paths call this.
    func requestKey(header: (String) -> Substring?, cookie: (String) -> Substring?, source: IPv4Address,
                    random: inout some RandomNumberGenerator) -> (hash: UInt64?, setCookie: String?) {
        if let hash = requestHash(header: header, cookie: cookie, source: source) { return (hash, nil) }
        guard case .cookie(let name, let ttl?) = policy.loadBalancer.hashOn else { return (nil, nil) }
        let value = String(random.next(), radix: 16)
        return (ConsistentHash.stableHash(value.utf8), "\(name)=\(value); Path=/; Max-Age=\(ttl.components.seconds); HttpOnly")
    }

    /// A cookie's value from the Cookie headers (RFC 6265 "name=value; ...").
    static func cookie(_ name: String, in headers: HTTPHeaders) -> Substring? {
        cookie(name, in: headers[canonicalForm: "cookie"])
    }

    /// A cookie's value from Cookie header values.
    static func cookie(_ name: String, in values: some Sequence<some StringProtocol>) -> Substring? {
        for header in values {
            for pair in header.split(separator: ";") {
                guard let eq = pair.firstIndex(of: "=") else { continue }
                if pair[..<eq].trimmingCharacters(in: .whitespaces) == name {
                    return Substring(pair[pair.index(after: eq)...].drop(while: { $0 == " " }))
                }
            }
        }
        return nil
    }
}

/// Passive health in Envoy's manner: consecutive 5xx (any 5xx, connect
/// failures and resets included), consecutive gateway errors (502, 503,
/// 504, connect failures, resets, timeouts), and success-rate outliers per
/// interval eject a backend for baseEjectionTime times the number of times
/// it has been ejected; at most maxEjectionPercent of the cluster is out at
/// once (but always at least one may be). The multiplier decays by one for
/// every interval the backend stays clean.
final class OutlierDetector: Sendable {
    struct Counters {
        var consecutive5xx = 0
        var consecutiveGateway = 0
        var requests = 0
        var successes = 0
        var ejections = 0
        var failedThisInterval = false
    }

    let settings: TrafficPolicy.OutlierDetection
    private let state: Mutex<(counters: [Counters], nextSweep: UInt64)>
    let ejectionsTotal = Atomic<Int>(0)

    init(_ settings: TrafficPolicy.OutlierDetection, backends: Int, previous: OutlierDetector?,
         previousIndex: [EndpointKey: Int]?, keys: [EndpointKey]) {
        self.settings = settings
        var counters = [Counters](repeating: .init(), count: backends)
        var sweep = NIODeadline.now().uptimeNanoseconds + UInt64(settings.interval.nanoseconds)
        if let previous, let previousIndex {
            previous.state.withLock { old in
                for (i, k) in keys.enumerated() {
                    if let j = previousIndex[k], j < old.counters.count { counters[i] = old.counters[j] }
                }
                sweep = old.nextSweep
            }
            ejectionsTotal.store(previous.ejectionsTotal.load(ordering: .relaxed), ordering: .relaxed)
        }
        state = Mutex((counters, sweep))
    }

    enum Outcome {
        case success
        /// An HTTP status >= 500 from the backend.
        case serverError(Int)
        /// The proxy could not get an answer: connect failure, reset, timeout.
        case localFailure
    }

    /// Records one attempt's outcome; ejects the backend when it crosses a threshold.
    @inline(never)
    func record(_ index: Int, _ outcome: Outcome, runtime: ClusterRuntime) {
        let now = NIODeadline.now().uptimeNanoseconds
        var eject = [Int]()
        state.withLock { s in
            guard index < s.counters.count else { return }
            var c = s.counters[index]
            c.requests += 1
            switch outcome {
            case .success:
                c.successes += 1
                c.consecutive5xx = 0
                c.consecutiveGateway = 0
            case .serverError(let code):
                c.failedThisInterval = true
                c.consecutive5xx += 1
                if code == 502 || code == 503 || code == 504 { c.consecutiveGateway += 1 } else { c.consecutiveGateway = 0 }
            case .localFailure:
                c.failedThisInterval = true
                c.consecutive5xx += 1
                c.consecutiveGateway += 1
            }
            if (settings.consecutive5xx > 0 && c.consecutive5xx >= settings.consecutive5xx)
                || (settings.consecutiveGatewayErrors > 0 && c.consecutiveGateway >= settings.consecutiveGatewayErrors) {
                eject.append(index)
                c.consecutive5xx = 0
                c.consecutiveGateway = 0
            }
            s.counters[index] = c
            if now >= s.nextSweep {
                s.nextSweep = now + UInt64(settings.interval.nanoseconds)
                eject += sweep(&s.counters, runtime: runtime, now: now)
            }
            if !eject.isEmpty {
                for i in Set(eject) { ejectLocked(i, counters: &s.counters, runtime: runtime, now: now) }
            }
        }
    }

    /// End of an interval: success-rate outliers, and decay of the
    /// multiplier for backends that stayed clean.
    private func sweep(_ counters: inout [Counters], runtime: ClusterRuntime, now: UInt64) -> [Int] {
        var out: [Int] = []
        if let sr = settings.successRate {
            let eligible = counters.indices.filter { counters[$0].requests >= sr.requestVolume }
            if eligible.count >= sr.minimumHosts {
                let rates = eligible.map { Double(counters[$0].successes) / Double(counters[$0].requests) }
                let mean = rates.reduce(0, +) / Double(rates.count)
                let variance = rates.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(rates.count)
                let threshold = mean - variance.squareRoot() * Double(sr.stdevFactor) / 1000
                for (k, i) in eligible.enumerated() where rates[k] < threshold { out.append(i) }
            }
        }
        for i in counters.indices {
            if !counters[i].failedThisInterval, counters[i].ejections > 0, !runtime.backends[i].isEjected(now) {
                counters[i].ejections -= 1
            }
            counters[i].requests = 0
            counters[i].successes = 0
            counters[i].failedThisInterval = false
        }
        return out
    }

    private func ejectLocked(_ i: Int, counters: inout [Counters], runtime: ClusterRuntime, now: UInt64) {
        let b = runtime.backends[i]
        guard !b.isEjected(now) else { return }
        let out = runtime.backends.count(where: { $0.isEjected(now) })
        let allowed = max(1, Int(Double(runtime.backends.count) * settings.maxEjectionPercent / 100))
        guard out < allowed else { return }
        counters[i].ejections += 1
        let time = UInt64(settings.baseEjectionTime.nanoseconds) * UInt64(counters[i].ejections)
        b.ejectedUntil.store(now + time, ordering: .relaxed)
        ejectionsTotal.add(1, ordering: .relaxed)
    }
}
