import Glibc
import NIOCore
import NIOHTTP1
import WeftCore
import WeftKernel

/// A route rule's persistent session (`sessionPersistence`, GEP-1619) for
/// one request, on either path (Express.target, HTTPProxyHandler).
///
/// The session is a token the client keeps, in a cookie or a header, that
/// names the backend (pod address and port) it began on, the rule it
/// belongs to, when it began and when it was last used: the proxy keeps no
/// table, so any node's proxy, a restarted one included, honours it. A
/// request with a valid token goes to that backend, whatever the rule's
/// weights say (a backendRef of weight 0 included), as long as the backend
/// is ready, the client may reach it and it is not ejected or at its
/// circuit breaker's maxRequests; otherwise the request is balanced as
/// usual and the response begins a new session. A token only ever picks
/// among the rule's own ready backends, so a forged one gains nothing a
/// client could not get by retrying.
struct StickySession {
    let rule: ProxyTable.SessionRule
    /// The token the request carried, when it is this rule's and neither
    /// timeout has passed.
    let token: Token?
    /// The backend the token names, when it is one of the rule's ready ones.
    var pinned: EndpointKey?
    /// The match the request took: a cookie's Path is made from it, only
    /// when a response carries one.
    let match: HTTPRoute.Match?

    struct Token: Equatable {
        var tag: UInt32
        var ip: UInt32
        var port: UInt16
        /// Wall-clock milliseconds: when the session began, when it was last used.
        var started: UInt64
        var seen: UInt64
    }

    /// `value`: the rule's cookie's or header's value in the request, if any.
    init(rule: ProxyTable.SessionRule, value: Substring?, match: HTTPRoute.Match?, now: UInt64) {
        self.rule = rule
        token = value.flatMap(Self.decode).flatMap { Self.valid($0, rule, now: now) ? $0 : nil }
        self.match = match
    }

    init(rule: ProxyTable.SessionRule, headers: HTTPHeaders, match: HTTPRoute.Match?, now: UInt64) {
        let value: Substring? = switch rule.kind {
        case .cookie: ClusterRuntime.cookie(rule.name, in: headers)
        case .header: headers.first(name: rule.name).map { Substring($0) }
        }
        self.init(rule: rule, value: value, match: match, now: now)
    }

    /// The rule's backend its token names, looked up in the clusters of
    /// `backends` (weight 0 too): the backend and its cluster.
    mutating func pin(_ backends: [ProxyTable.WeightedCluster],
                      endpoints: (String) -> [EndpointKey]?) -> ProxyTable.WeightedCluster? {
        guard let t = token else { return nil }
        for cluster in backends {
            if let key = endpoints(cluster.cluster)?.first(where: { $0.ip.value == t.ip && $0.port == t.port }) {
                pinned = key
                return cluster
            }
        }
        return nil
    }

    static func valid(_ t: Token, _ rule: ProxyTable.SessionRule, now: UInt64) -> Bool {
        guard t.tag == rule.tag, t.started <= t.seen, t.seen <= now + 60_000 else { return false }
        if let limit = rule.absoluteSeconds, now >= t.started &+ limit * 1000 { return false }
        if let limit = rule.idleSeconds, now >= t.seen &+ limit * 1000 { return false }
        return true
    }

    /// What a response does to the session: keeps the client's, begins
    /// one, or moves it to another backend. Counted (`count`) once the
    /// response carrying it is written, not when the request is routed: a
    /// request the express path routes and hands over (its connect failed)
    /// is answered, and counted, once, by the full path.
    enum Outcome {
        case kept, started, moved

        func count(_ stats: ProxyStats) {
            switch self {
            case .kept: stats.sessionsKept.add(1, ordering: .relaxed)
            case .started: stats.sessionsStarted.add(1, ordering: .relaxed)
            case .moved: stats.sessionsMoved.add(1, ordering: .relaxed)
            }
        }
    }

    /// For a request answered by `endpoint`: what it does to the session,
    /// and the field its response carries (a new session when the request
    /// had none or went elsewhere, the same one touched when an idle
    /// timeout needs its last use; nil when the client's token stands as
    /// it is).
    func response(endpoint: EndpointKey, now: UInt64) -> Answer {
        let same = token.map { $0.ip == endpoint.ip.value && $0.port == endpoint.port } ?? false
        return Answer(outcome: same ? .kept : token == nil ? .started : .moved, field: field(endpoint: endpoint, same: same, now: now))
    }

    struct Answer {
        let outcome: Outcome
        let field: (name: String, value: String)?
    }

    private func field(endpoint: EndpointKey, same: Bool, now: UInt64) -> (name: String, value: String)? {
        if same && rule.idleSeconds == nil { return nil }
        let started = same ? token?.started ?? now : now
        let value = Self.encode(Token(tag: rule.tag, ip: endpoint.ip.value, port: endpoint.port, started: started, seen: now))
        switch rule.kind {
        case .header:
            return (rule.name, value)
        case .cookie:
            var cookie = "\(rule.name)=\(value); Path=\(Self.cookiePath(match)); HttpOnly"
            if rule.permanent, let limit = rule.absoluteSeconds {
                let age = now > started ? (now - started) / 1000 : 0
                cookie += "; Max-Age=\(age < limit ? limit - age : 1)"
            }
            return ("set-cookie", cookie)
        }
    }

    /// Five lower-case hex numbers joined by dots: safe in a cookie and a
    /// header value as they are.
    static func encode(_ t: Token) -> String {
        "\(String(t.tag, radix: 16)).\(String(t.ip, radix: 16)).\(String(t.port, radix: 16))."
            + "\(String(t.started, radix: 16)).\(String(t.seen, radix: 16))"
    }

    static func decode(_ text: Substring) -> Token? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 5, parts.allSatisfy({ (1...16).contains($0.count) }),
              let tag = UInt32(parts[0], radix: 16), let ip = UInt32(parts[1], radix: 16),
              let port = UInt16(parts[2], radix: 16), let started = UInt64(parts[3], radix: 16),
              let seen = UInt64(parts[4], radix: 16) else { return nil }
        return Token(tag: tag, ip: ip, port: port, started: started, seen: seen)
    }

    /// GEP-1619's cookie Path for the match the request took: a prefix or
    /// exact path as it is; a regular expression's literal beginning, up to
    /// its last "/" ("/p1/p2/.*/p3" gives "/p1/p2"); "/" for everything
    /// else, and for a path a cookie attribute could not carry.
    static func cookiePath(_ match: HTTPRoute.Match?) -> String {
        let path: Substring
        switch match?.path {
        case .exact(let p)?, .prefix(let p)?:
            path = Substring(p)
        case .regularExpression(let re)?:
            let literal = re.prefix { !"\\.^$*+?()[]{}|".contains($0) }
            path = literal.lastIndex(of: "/").map { literal[..<$0] } ?? ""
        case nil:
            path = "/"
        }
        guard path.hasPrefix("/"), path.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: ";") }) else { return "/" }
        return String(path)
    }

    /// The pinned backend, when it is among `endpoints` and takes the
    /// request: the client may reach it, and under a TrafficPolicy
    /// (`runtime`) it is not ejected and its request slot is free (then
    /// taken: the hold gives it back). Else nil: the request is balanced as
    /// usual, and its response begins a new session. Both paths ask this.
    func claim(among endpoints: [EndpointKey], runtime: ClusterRuntime?, loop: LoopState, proxy: ProxyContext,
               generation: UInt64, source: IPv4Address) -> (key: EndpointKey, hold: ClusterRuntime.Hold?)? {
        guard let key = pinned, endpoints.contains(key),
              loop.allowed(proxy, generation: generation, source: source, destination: key.ip, port: key.port, node: key.node)
        else { return nil }
        guard let runtime else { return (key, nil) }
        guard let i = runtime.index[key], !runtime.backends[i].isEjected(NIODeadline.now().uptimeNanoseconds),
              runtime.reserve(key) else { return nil }
        return (key, ClusterRuntime.Hold(runtime, i))
    }

    /// Wall-clock milliseconds, as tokens count time (they outlive the process).
    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(max(0, ts.tv_sec)) * 1000 + UInt64(max(0, ts.tv_nsec)) / 1_000_000
    }
}
