/// `weft.dev/v1alpha1 AuthorizationPolicy`, shaped like Istio's security
/// API: who may reach the workloads a selector picks, and with what.
///
/// ```yaml
/// apiVersion: weft.dev/v1alpha1
/// kind: AuthorizationPolicy
/// metadata: {name: api-readers, namespace: shop}
/// spec:
///   selector: {matchLabels: {app: api}}   # absent: the whole namespace (weft-system: the mesh)
///   action: ALLOW                         # ALLOW (default) | DENY | AUDIT
///   rules:
///   - from:
///     - source:
///         principals: ["cluster.local/ns/shop/sa/web"]   # or namespaces, ipBlocks, and not- forms
///     to:
///     - operation: {methods: ["GET"], paths: ["/api/*"], ports: ["8080"]}
///     when:
///     - key: request.headers[x-tenant]
///       values: ["blue"]
/// ```
///
/// A rule matches when one of its sources, one of its operations and all
/// of its conditions match (an absent list matches anything). Strings match
/// exactly, by prefix (`abc*`), by suffix (`*abc`), or as `*` (any value
/// that is present). Decisions (see `AuthorizationSet.evaluate`): a DENY
/// match denies; otherwise, when ALLOW policies apply, one must match;
/// AUDIT marks without deciding.
public struct AuthorizationPolicy: Hashable, Sendable {
    public enum Action: String, Hashable, Sendable, CaseIterable, Codable {
        case allow = "ALLOW", deny = "DENY", audit = "AUDIT"
    }

    public var metadata: ObjectMeta
    public var selector: LabelSelector?
    public var action: Action
    /// nil: no `rules` field (an ALLOW policy then allows nothing).
    public var rules: [Rule]

    public init(metadata: ObjectMeta, selector: LabelSelector? = nil, action: Action = .allow, rules: [Rule] = []) {
        self.metadata = metadata
        self.selector = selector
        self.action = action
        self.rules = rules
    }

    public struct Rule: Hashable, Sendable, Codable {
        public var from: [Source]
        public var to: [Operation]
        public var when: [Condition]

        public init(from: [Source] = [], to: [Operation] = [], when: [Condition] = []) {
            self.from = from
            self.to = to
            self.when = when
        }

        /// Whether some part of the rule can be judged only on an HTTP request.
        public var needsHTTP: Bool { to.contains(where: \.needsHTTP) || when.contains { $0.key.isHTTP } }
    }

    public struct Source: Hashable, Sendable, Codable {
        /// SPIFFE IDs without the `spiffe://` scheme: `TRUST-DOMAIN/ns/NS/sa/SA`.
        public var principals: [String]? = nil
        public var notPrincipals: [String]? = nil
        public var namespaces: [String]? = nil
        public var notNamespaces: [String]? = nil
        public var ipBlocks: [String]? = nil
        public var notIpBlocks: [String]? = nil

        public init(principals: [String]? = nil, notPrincipals: [String]? = nil, namespaces: [String]? = nil,
                    notNamespaces: [String]? = nil, ipBlocks: [String]? = nil, notIpBlocks: [String]? = nil) {
            self.principals = principals
            self.notPrincipals = notPrincipals
            self.namespaces = namespaces
            self.notNamespaces = notNamespaces
            self.ipBlocks = ipBlocks
            self.notIpBlocks = notIpBlocks
        }
    }

    public struct Operation: Hashable, Sendable, Codable {
        public var hosts: [String]? = nil
        public var notHosts: [String]? = nil
        public var ports: [UInt16]? = nil
        public var notPorts: [UInt16]? = nil
        public var methods: [String]? = nil
        public var notMethods: [String]? = nil
        public var paths: [String]? = nil
        public var notPaths: [String]? = nil

        public init(hosts: [String]? = nil, notHosts: [String]? = nil, ports: [UInt16]? = nil, notPorts: [UInt16]? = nil,
                    methods: [String]? = nil, notMethods: [String]? = nil, paths: [String]? = nil, notPaths: [String]? = nil) {
            self.hosts = hosts
            self.notHosts = notHosts
            self.ports = ports
            self.notPorts = notPorts
            self.methods = methods
            self.notMethods = notMethods
            self.paths = paths
            self.notPaths = notPaths
        }

        public var needsHTTP: Bool {
            hosts != nil || notHosts != nil || methods != nil || notMethods != nil || paths != nil || notPaths != nil
        }
    }

    public struct Condition: Hashable, Sendable, Codable {
        public enum Key: Hashable, Sendable, Codable, CustomStringConvertible {
            /// `request.headers[NAME]`, NAME lowercased.
            case header(String)
            case sourceIP, sourceNamespace, sourcePrincipal, destinationPort

            public var isHTTP: Bool { if case .header = self { true } else { false } }

            public init?(_ text: String) {
                switch text {
                case "source.ip": self = .sourceIP
                case "source.namespace": self = .sourceNamespace
                case "source.principal": self = .sourcePrincipal
                case "destination.port": self = .destinationPort
                default:
                    let prefix = "request.headers[", suffix = "]"
                    guard text.hasPrefix(prefix), text.hasSuffix(suffix), text.count > prefix.count + suffix.count else { return nil }
                    let name = text.dropFirst(prefix.count).dropLast(suffix.count)
                    guard name.utf8.allSatisfy(Self.isTokenByte) else { return nil }
                    self = .header(name.lowercased())
                }
            }

            static func isTokenByte(_ b: UInt8) -> Bool {
                (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a) || "!#$%&'*+-.^_`|~".utf8.contains(b)
            }

            public var description: String {
                switch self {
                case .header(let n): "request.headers[\(n)]"
                case .sourceIP: "source.ip"
                case .sourceNamespace: "source.namespace"
                case .sourcePrincipal: "source.principal"
                case .destinationPort: "destination.port"
                }
            }
        }

        public var key: Key
        public var values: [String]?
        public var notValues: [String]?

        public init(key: Key, values: [String]? = nil, notValues: [String]? = nil) {
            self.key = key
            self.values = values
            self.notValues = notValues
        }
    }

    public var needsHTTP: Bool { rules.contains(where: \.needsHTTP) }

    /// Whether the policy applies to `workload`: same namespace (or the
    /// mesh's root namespace) and the selector, if any, matching its labels.
    public func applies(to workload: Workload) -> Bool {
        let ns = metadata.namespace
        guard ns == workload.metadata.namespace || ns == PeerAuthentication.rootNamespace else { return false }
        return selector?.matches(workload.metadata.labels) ?? true
    }
}

// MARK: - Reading

extension AuthorizationPolicy {
    init(spec node: YAMLNode, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        // Each field is read on its own, so that one mistake does not hide
        // the next.
        var found = ErrorList()
        let selector = found.attempt { () throws(ManifestError) in try spec.optionalSelector() } ?? nil
        let action = found.attempt { () throws(ManifestError) in
            guard let text = try spec.string("action") else { return Action.allow }
            guard let a = Action(rawValue: text) else {
                throw spec.error("action", "must be one of ALLOW, DENY, AUDIT, got \(quoted(text))")
            }
            return a
        } ?? .allow
        for key in spec.keys where ["provider", "targetRef", "targetRefs"].contains(key) {
            spec.ignore(key)
            found.append(spec.error(key, "not supported: Weft enforces policies itself, on the workloads a selector picks"))
        }
        let rules = found.each(&spec, "rules") { path, ruleNode throws(ManifestError) in try Self.rule(ruleNode, at: location, path: path) }
        try found.check(finishing: spec)
        self.init(metadata: metadata, selector: selector, action: action, rules: rules)
    }

    private static func rule(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) -> Rule {
        var r = try FieldReader(node, at: location, path: path)
        var rule = Rule()
        var found = ErrorList()
        rule.from = found.each(&r, "from") { p, n throws(ManifestError) in
            var wrapper = try FieldReader(n, at: location, path: p)
            guard let s = try wrapper.mapping("source") else { throw wrapper.error("source", "required field is missing") }
            try wrapper.finish()
            return try source(s)
        }
        rule.to = found.each(&r, "to") { p, n throws(ManifestError) in
            var wrapper = try FieldReader(n, at: location, path: p)
            guard let o = try wrapper.mapping("operation") else { throw wrapper.error("operation", "required field is missing") }
            try wrapper.finish()
            return try operation(o)
        }
        rule.when = found.each(&r, "when") { p, n throws(ManifestError) in try condition(n, at: location, path: p) }
        try found.check(finishing: r)
        return rule
    }

    private static func source(_ reader: FieldReader) throws(ManifestError) -> Source {
        var r = reader
        var s = Source()
        // Each field, and each of its items, on its own.
        var found = ErrorList()
        s.principals = found.attempt { () throws(ManifestError) in try patterns(&r, "principals", principal: true) } ?? nil
        s.notPrincipals = found.attempt { () throws(ManifestError) in try patterns(&r, "notPrincipals", principal: true) } ?? nil
        s.namespaces = found.attempt { () throws(ManifestError) in try patterns(&r, "namespaces") } ?? nil
        s.notNamespaces = found.attempt { () throws(ManifestError) in try patterns(&r, "notNamespaces") } ?? nil
        s.ipBlocks = found.attempt { () throws(ManifestError) in try blocks(&r, "ipBlocks") } ?? nil
        s.notIpBlocks = found.attempt { () throws(ManifestError) in try blocks(&r, "notIpBlocks") } ?? nil
        for key in ["requestPrincipals", "remoteIpBlocks"] where r.keys.contains(key) {
            r.ignore(key)
            found.append(r.error(key, "not supported: Weft authenticates peers, not end users"))
        }
        try found.check(finishing: r)
        if s == Source() { throw ManifestError(reader.location, field: reader.path, "a source needs at least one field") }
        return s
    }

    private static func operation(_ reader: FieldReader) throws(ManifestError) -> Operation {
        var r = reader
        var o = Operation()
        var found = ErrorList()
        o.hosts = found.attempt { () throws(ManifestError) in try patterns(&r, "hosts") } ?? nil
        o.notHosts = found.attempt { () throws(ManifestError) in try patterns(&r, "notHosts") } ?? nil
        o.ports = found.attempt { () throws(ManifestError) in try ports(&r, "ports") } ?? nil
        o.notPorts = found.attempt { () throws(ManifestError) in try ports(&r, "notPorts") } ?? nil
        o.methods = found.attempt { () throws(ManifestError) in try patterns(&r, "methods") } ?? nil
        o.notMethods = found.attempt { () throws(ManifestError) in try patterns(&r, "notMethods") } ?? nil
        o.paths = found.attempt { () throws(ManifestError) in try patterns(&r, "paths", path: true) } ?? nil
        o.notPaths = found.attempt { () throws(ManifestError) in try patterns(&r, "notPaths", path: true) } ?? nil
        try found.check(finishing: r)
        if o == Operation() { throw ManifestError(reader.location, field: reader.path, "an operation needs at least one field") }
        return o
    }

    private static func condition(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) -> Condition {
        var r = try FieldReader(node, at: location, path: path)
        let text = try r.requiredString("key")
        guard let key = Condition.Key(text) else {
            throw r.error("key", "unsupported key \(quoted(text)) (supported: request.headers[NAME], source.ip, source.namespace, "
                + "source.principal, destination.port)")
        }
        var c = Condition(key: key)
        var found = ErrorList()
        for field in ["values", "notValues"] {
            let read = found.attempt { () throws(ManifestError) -> [String]? in
                switch key {
                case .sourceIP: try blocks(&r, field)
                case .destinationPort: try ports(&r, field)?.map(String.init)
                default: try patterns(&r, field, principal: key == .sourcePrincipal)
                }
            } ?? nil
            if field == "values" { c.values = read } else { c.notValues = read }
        }
        try found.check(finishing: r)
        if c.values == nil && c.notValues == nil { throw r.error("values", "a condition needs values or notValues") }
        return c
    }

    /// A list of match strings: exact, `prefix*`, `*suffix` or `*`.
    private static func patterns(_ r: inout FieldReader, _ key: String, principal: Bool = false,
                                 path: Bool = false) throws(ManifestError) -> [String]? {
        guard let items = try r.list(key) else { return nil }
        guard !items.isEmpty else { throw r.error(key, "must not be empty (leave the field out to match anything)") }
        var found = ErrorList()
        let location = r.location
        let out = found.each(items) { p, n throws(ManifestError) in
            var s = try FieldReader.string(n, at: location, path: p)
            if principal && s.hasPrefix("spiffe://") { s.removeFirst("spiffe://".count) }
            guard !s.isEmpty else { throw ManifestError(location, field: p, "must not be empty") }
            let stars = s.filter { $0 == "*" }.count
            if stars > 1 || (stars == 1 && s.first != "*" && s.last != "*") {
                throw ManifestError(location, field: p, "\(quoted(s)): a wildcard may only be the first or the last character")
            }
            if path && s.first != "/" && s.first != "*" {
                throw ManifestError(location, field: p, "\(quoted(s)): a path starts with / (or is a * pattern)")
            }
            return s
        }
        try found.check()
        return out
    }

    private static func blocks(_ r: inout FieldReader, _ key: String) throws(ManifestError) -> [String]? {
        guard let items = try r.list(key) else { return nil }
        guard !items.isEmpty else { throw r.error(key, "must not be empty (leave the field out to match anything)") }
        var found = ErrorList()
        let location = r.location
        let out = found.each(items) { p, n throws(ManifestError) in
            let s = try FieldReader.string(n, at: location, path: p)
            guard let prefix = AuthorizationSet.prefix(s) else {
                throw ManifestError(location, field: p, "\(quoted(s)) is not an IPv4 address or CIDR (with no host bits set)")
            }
            return prefix.description
        }
        try found.check()
        return out
    }

    private static func ports(_ r: inout FieldReader, _ key: String) throws(ManifestError) -> [UInt16]? {
        guard let items = try r.list(key) else { return nil }
        guard !items.isEmpty else { throw r.error(key, "must not be empty (leave the field out to match anything)") }
        var found = ErrorList()
        let location = r.location
        let out = found.each(items) { p, n throws(ManifestError) in
            // Istio writes ports as strings; a YAML number is accepted too.
            let text: String
            if case .scalar(let scalar) = n { text = scalar.string } else { text = "" }
            guard let port = Int(text), (1...65535).contains(port) else {
                throw ManifestError(location, field: p, "\(quoted(text)) is not a port number (1-65535)")
            }
            return UInt16(port)
        }
        try found.check()
        return out
    }
}

extension ClusterState {
    /// The AuthorizationPolicies that apply to `workload`, by namespace and name.
    public func authorizationPolicies(for workload: Workload) -> [AuthorizationPolicy] {
        authorizationPolicies.filter { $0.applies(to: workload) }
    }
}

extension ClusterState {
    /// Whether the agent of `node` can health-check `workload` with a
    /// plaintext probe from its own address. Not a pod of another node under
    /// STRICT (its kernel drops plaintext from other nodes), nor one an
    /// AuthorizationPolicy judges (a node's address has no identity, so the
    /// probe would be refused): such a probe would fail while the pod is
    /// well, and take it out of every Service. Those pods are checked by
    /// their own node's proxy on the agent's behalf (WeftProxy TunnelProbe).
    public func plaintextProbeable(_ workload: Workload, from node: String) -> Bool {
        if workload.node == node { return true }
        if mtlsMode(workload) == .strict { return false }
        return !authorizationPolicies(for: workload).contains { $0.action != .audit }
    }
}
