/// What an authorization decision is made on. `principal` and `namespace`
/// are known only for an authenticated peer (an mTLS tunnel, or a pod of the
/// deciding node, which the node itself attests); `http` only once an HTTP
/// request has been read.
public struct AuthorizationRequest: Sendable {
    public struct HTTP: Sendable {
        public var method: String
        /// The request target's path, without the query.
        public var path: String
        public var host: String?
        /// Lowercased names.
        public var headers: [(name: String, value: String)]

        public init(method: String, path: String, host: String?, headers: [(name: String, value: String)]) {
            self.method = method
            self.path = path
            self.host = host
            self.headers = headers
        }
    }

    public var principal: String?
    public var namespace: String?
    public var sourceIP: IPv4Address
    public var port: UInt16
    public var http: HTTP?

    public init(principal: String?, namespace: String?, sourceIP: IPv4Address, port: UInt16, http: HTTP? = nil) {
        self.principal = principal
        self.namespace = namespace
        self.sourceIP = sourceIP
        self.port = port
        self.http = http
    }
}

public struct AuthorizationDecision: Sendable, Equatable {
    public var allowed: Bool
    /// Which policy and rule decided, for the 403 body and the logs.
    public var reason: String
    /// AUDIT policies that matched.
    public var audited: [String]
}

/// The AuthorizationPolicies that apply to one pod, in the form the proxy
/// holds (`ProxyTable.authorization`) and decides with.
public struct AuthorizationSet: Hashable, Sendable, Codable {
    public struct Entry: Hashable, Sendable, Codable {
        /// namespace/name
        public var name: String
        public var action: AuthorizationPolicy.Action
        public var rules: [AuthorizationPolicy.Rule]
    }

    public var policies: [Entry]

    public init(_ policies: [AuthorizationPolicy]) {
        self.policies = policies.map { Entry(name: $0.metadata.qualifiedName, action: $0.action, rules: $0.rules) }
    }

    /// Whether some decision needs the HTTP request (else one decision per
    /// connection is final).
    public var needsHTTP: Bool { policies.contains { $0.rules.contains(where: \.needsHTTP) } }

    /// DENY first: any match denies. Then, if any ALLOW policy applies, one
    /// of its rules must match. Without an HTTP request (a TCP connection),
    /// HTTP-only parts of a rule are judged the safe way, as Istio does: an
    /// ALLOW rule that has them matches nothing, a DENY rule matches on its
    /// other parts alone.
    public func evaluate(_ request: AuthorizationRequest) -> AuthorizationDecision {
        decide(request, unknownHTTPDenies: true)
    }

    /// Whether some HTTP request on this connection could be allowed: the
    /// decision with HTTP-only parts judged the other way round (an ALLOW
    /// rule's as matching, a DENY rule's as not). When not even that allows,
    /// the connection can be refused before any request is read.
    public func couldAllowHTTP(_ request: AuthorizationRequest) -> Bool {
        decide(request, unknownHTTPDenies: false).allowed
    }

    func decide(_ request: AuthorizationRequest, unknownHTTPDenies: Bool) -> AuthorizationDecision {
        var audited: [String] = []
        for p in policies where p.action == .audit {
            if let i = p.rules.firstIndex(where: { Self.matches($0, request, lenient: true) }) {
                audited.append("\(p.name) rules[\(i)]")
            }
        }
        for p in policies where p.action == .deny {
            if let i = p.rules.firstIndex(where: { Self.matches($0, request, lenient: unknownHTTPDenies) }) {
                return AuthorizationDecision(allowed: false, reason: "denied by DENY policy \(p.name) rules[\(i)]", audited: audited)
            }
        }
        let allows = policies.filter { $0.action == .allow }
        guard !allows.isEmpty else { return AuthorizationDecision(allowed: true, reason: "no ALLOW policy applies", audited: audited) }
        for p in allows {
            if let i = p.rules.firstIndex(where: { Self.matches($0, request, lenient: !unknownHTTPDenies) }) {
                return AuthorizationDecision(allowed: true, reason: "allowed by \(p.name) rules[\(i)]", audited: audited)
            }
        }
        let names = allows.map(\.name).joined(separator: ", ")
        return AuthorizationDecision(allowed: false, reason: "matches no rule of the ALLOW policies \(names)", audited: audited)
    }

    /// `lenient`: how an HTTP-only part is judged when there is no HTTP
    /// request: as matching (DENY, AUDIT) or as failing (ALLOW).
    static func matches(_ rule: AuthorizationPolicy.Rule, _ r: AuthorizationRequest, lenient: Bool) -> Bool {
        if !rule.from.isEmpty && !rule.from.contains(where: { matches($0, r) }) { return false }
        if !rule.to.isEmpty && !rule.to.contains(where: { matches($0, r, lenient: lenient) }) { return false }
        for c in rule.when where !matches(c, r, lenient: lenient) { return false }
        return true
    }

    static func matches(_ s: AuthorizationPolicy.Source, _ r: AuthorizationRequest) -> Bool {
        field(s.principals, s.notPrincipals, r.principal, matchAny)
            && field(s.namespaces, s.notNamespaces, r.namespace, matchAny)
            && field(s.ipBlocks, s.notIpBlocks, r.sourceIP, inBlocks)
    }

    static func matches(_ o: AuthorizationPolicy.Operation, _ r: AuthorizationRequest, lenient: Bool) -> Bool {
        if let ports = o.ports, !ports.contains(r.port) { return false }
        if let ports = o.notPorts, ports.contains(r.port) { return false }
        guard o.needsHTTP else { return true }
        guard let http = r.http else { return lenient }
        return field(o.methods, o.notMethods, http.method, matchAny)
            && field(o.paths, o.notPaths, http.path, matchAny)
            && field(o.hosts, o.notHosts, http.host, matchHost)
    }

    static func matches(_ c: AuthorizationPolicy.Condition, _ r: AuthorizationRequest, lenient: Bool) -> Bool {
        switch c.key {
        case .header(let name):
            guard let http = r.http else { return lenient }
            let values = http.headers.filter { $0.name == name }.map(\.value)
            if let want = c.values, !values.contains(where: { matchAny(want, $0) }) { return false }
            if let not = c.notValues, values.contains(where: { matchAny(not, $0) }) { return false }
            return true
        case .sourceIP: return field(c.values, c.notValues, r.sourceIP, inBlocks)
        case .sourceNamespace: return field(c.values, c.notValues, r.namespace, matchAny)
        case .sourcePrincipal: return field(c.values, c.notValues, r.principal, matchAny)
        case .destinationPort: return field(c.values, c.notValues, String(r.port), matchAny)
        }
    }

    /// A field and its not- form: the value must match one of `yes` (when
    /// given; an absent value matches none) and none of `no` (an absent value
    /// matches none, so passes).
    static func field<Value>(_ yes: [String]?, _ no: [String]?, _ value: Value?, _ match: ([String], Value) -> Bool) -> Bool {
        if let yes {
            guard let value, match(yes, value) else { return false }
        }
        if let no, let value, match(no, value) { return false }
        return true
    }

    static func matchAny(_ patterns: [String], _ value: String) -> Bool {
        patterns.contains { matchOne($0, value) }
    }

    static func matchOne(_ pattern: String, _ value: String) -> Bool {
        if pattern == "*" { return !value.isEmpty }
        if pattern.hasPrefix("*") { return value.hasSuffix(pattern.dropFirst()) }
        if pattern.hasSuffix("*") { return value.hasPrefix(pattern.dropLast()) }
        return value == pattern
    }

    /// Hosts compare without case, with or without the request's port.
    static func matchHost(_ patterns: [String], _ value: String) -> Bool {
        let host = value.lowercased()
        var bare = host
        if let colon = host.lastIndex(of: ":"), host[host.index(after: colon)...].allSatisfy(\.isNumber) {
            bare = String(host[..<colon])
        }
        return patterns.contains { p in
            let lower = p.lowercased()
            return matchOne(lower, host) || matchOne(lower, bare)
        }
    }

    static func inBlocks(_ blocks: [String], _ ip: IPv4Address) -> Bool {
        blocks.contains { prefix($0)?.contains(ip) ?? false }
    }

    /// A CIDR, or one address as a /32.
    public static func prefix(_ text: String) -> IPv4Prefix? {
        if let p = IPv4Prefix(text) { return p }
        return IPv4Address(text).map { IPv4Prefix(address: $0, length: 32) }
    }
}
