/// A `gateway.networking.k8s.io/v1 HTTPRoute` bound to a Service the mesh way
/// (GAMMA): its parentRef is the Service whose traffic it routes, and it acts
/// on every connection a pod makes to that Service's clusterIP.
///
/// Weft reads the Standard channel's fields plus `retry` (GEP-1731); what it
/// does not implement is refused by name rather than silently ignored.
public struct HTTPRoute: Hashable, Sendable {
    public var metadata: ObjectMeta
    public var parentRefs: [ParentRef]
    public var rules: [Rule]
    /// What the document was: an HTTPRoute, or a GRPCRoute read into this
    /// model (GRPCRoute.swift).
    public var kind = Kind.http

    public enum Kind: String, Hashable, Sendable {
        case http = "HTTPRoute", grpc = "GRPCRoute"
    }

    /// The Service (and optionally one of its ports) a route attaches to.
    /// In the route's namespace it is a producer route, for every client of
    /// the Service; in another, a consumer route (GAMMA), for the clients in
    /// the route's namespace only, which it routes instead of the Service's
    /// producer routes.
    public struct ParentRef: Hashable, Sendable {
        public var namespace: String
        public var name: String
        /// nil: every port of the Service.
        public var port: UInt16?
        /// `sectionName`: a Service port's name (nil: any); with `port`,
        /// the port must have both.
        public var sectionName: String? = nil

        /// Whether the route attaches to this port of its Service.
        public func selects(_ p: ServicePort) -> Bool {
            p.transport == .tcp && (port == nil || port == p.port) && (sectionName == nil || sectionName == p.name)
        }

        /// "namespace/name", then ":port" and "/sectionName" as given.
        public var description: String {
            "\(namespace)/\(name)" + (port.map { ":\($0)" } ?? "") + (sectionName.map { "/\($0)" } ?? "")
        }
    }

    public struct Rule: Hashable, Sendable, Codable {
        public var name: String?
        /// Never empty: a rule without matches matches every request (PathPrefix "/").
        public var matches: [Match]
        public var filters: [Filter]
        public var backendRefs: [BackendRef]
        public var timeouts: Timeouts
        public var retry: Retry?
        public var sessionPersistence: SessionPersistence? = nil
    }

    public struct Match: Hashable, Sendable, Codable {
        public var path: PathMatch
        public var headers: [ValueMatch]
        public var queryParams: [ValueMatch]
        public var method: String?
        /// A GRPCRoute's method match, which `path` carries out; kept for
        /// GRPCRoute precedence (the longer service, then method, wins).
        public var grpc: GRPCMethod? = nil
    }

    public struct GRPCMethod: Hashable, Sendable, Codable {
        public var service: String
        public var method: String
    }

    public enum PathMatch: Hashable, Sendable, Codable {
        case exact(String)
        case prefix(String)
        case regularExpression(String)
    }

    /// A header or query parameter match. Header names compare without case.
    public struct ValueMatch: Hashable, Sendable, Codable {
        public var name: String
        public var value: String
        public var isRegularExpression: Bool
    }

    public struct BackendRef: Hashable, Sendable, Codable {
        public var name: String
        public var port: UInt16
        public var weight: UInt32
        /// Filters that apply only to requests sent to this backend.
        public var filters: [Filter]
        /// The Service's namespace; nil: the route's. A mesh route may send
        /// to any namespace without a ReferenceGrant (GEP-1294: it reaches
        /// nothing its clients could not dial; their policies still apply).
        public var namespace: String?
    }

    public enum Filter: Hashable, Sendable, Codable {
        case requestHeaderModifier(HeaderModifier)
        case responseHeaderModifier(HeaderModifier)
        case requestRedirect(Redirect)
        case urlRewrite(URLRewrite)
        case requestMirror(Mirror)
    }

    public struct HeaderModifier: Hashable, Sendable, Codable {
        public var set: [Header] = []
        public var add: [Header] = []
        public var remove: [String] = []
    }

    public struct Header: Hashable, Sendable, Codable {
        public var name: String
        public var value: String
    }

    public enum PathModifier: Hashable, Sendable, Codable {
        case replaceFullPath(String)
        case replacePrefixMatch(String)
    }

    public struct Redirect: Hashable, Sendable, Codable {
        public var scheme: String?
        public var hostname: String?
        public var path: PathModifier?
        public var port: UInt16?
        public var statusCode: Int
    }

    public struct URLRewrite: Hashable, Sendable, Codable {
        public var hostname: String?
        public var path: PathModifier?
    }

    public struct Mirror: Hashable, Sendable, Codable {
        public var name: String
        public var port: UInt16
        /// Share of requests mirrored, in percent (0...100).
        public var percent: Double
        /// The Service's namespace; nil: the route's (the proxy's table
        /// always has it filled in).
        public var namespace: String?
    }

    /// Gateway API durations; nil means no limit.
    public struct Timeouts: Hashable, Sendable, Codable {
        /// The whole request as the client sees it, retries included. In a
        /// route rule, zero: turned off ("0s"); the proxy's table has nil
        /// for that (ProxyTable: a TrafficPolicy's bound fills in only nil).
        public var request: Duration?
        /// One attempt to one backend.
        public var backendRequest: Duration?
    }

    public struct Retry: Hashable, Sendable, Codable {
        /// Response codes that cause a retry; connect failures and resets always do.
        public var codes: [Int]
        /// Retries after the first attempt.
        public var attempts: Int
        /// Wait before the first retry, doubled each time (with jitter).
        public var backoff: Duration
        /// gRPC statuses that cause a retry when a call's answer is that
        /// status alone (trailers-only: no message was sent back), gRPC's
        /// own retry rule, for any call whose request was kept whole; a
        /// TrafficPolicy's only (Gateway API routes have no such field).
        public var grpcStatuses: [Int]? = nil
    }
}

extension HTTPRoute {
    static let defaultRetryAttempts = 2
    static let defaultRetryBackoff = Duration.milliseconds(25)

    /// An HTTPRoute's spec, or a GRPCRoute's (`kind` .grpc: its rules are
    /// read by `Rule(grpc:)`, GRPCRoute.swift).
    init(spec node: YAMLNode, metadata: ObjectMeta, kind: Kind = .http, at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        var found = ErrorList()
        let parents = found.attempt { () throws(ManifestError) in
            try Self.parents(&spec, kind: kind.rawValue, metadata: metadata, at: location)
        } ?? []
        // GAMMA: hostnames do not apply to mesh routes; they are checked as
        // the API's schema checks them, and otherwise left alone.
        _ = found.attempt { () throws(ManifestError) in try L4Route.hostnames(&spec, at: location) }
        var named: Set<String> = []
        var rules = found.each(&spec, "rules", maxItems: 16) { path, node throws(ManifestError) in
            let rule = kind == .grpc ? try Rule(grpc: node, path: path, at: location) : try Rule(node, path: path, at: location)
            // A TrafficPolicy names a rule as namespace/route#rule.
            if let name = rule.name, !named.insert(name).inserted {
                throw ManifestError(location, field: "\(path).name", "\(quoted(name)) names another rule of this route already")
            }
            return rule
        }
        try found.check(finishing: spec)
        let matches = rules.reduce(0) { $0 + $1.matches.count }
        guard matches <= 128 else {
            throw spec.error("rules", "at most 128 matches in all the rules together, got \(matches)")
        }
        if rules.isEmpty {
            // The API's default: one rule matching everything, no backends.
            rules = [Rule(name: nil, matches: [.everything],
                          filters: [], backendRefs: [], timeouts: Timeouts(), retry: nil)]
        }
        self.init(metadata: metadata, parentRefs: parents, rules: rules, kind: kind)
    }
}

extension HTTPRoute {
    /// `spec.parentRefs`: Services, in the route's namespace (a producer
    /// route) or another (a consumer route).
    static func parents(_ spec: inout FieldReader, kind: String, metadata: ObjectMeta,
                        at location: DocumentLocation) throws(ManifestError) -> [ParentRef] {
        guard let parentNodes = try spec.list("parentRefs", maxItems: 32), !parentNodes.isEmpty else {
            throw spec.error("parentRefs", "a mesh \(kind) needs at least one parentRef (a Service)")
        }
        // Every parentRef and each of its fields on its own.
        var found = ErrorList()
        let parents = found.each(parentNodes) { path, node throws(ManifestError) in
            var r = try FieldReader(node, at: location, path: path)
            var inner = ErrorList()
            inner.attempt { () throws(ManifestError) in
                let group = try r.string("group") ?? "gateway.networking.k8s.io"
                let kind = try r.string("kind") ?? "Gateway"
                guard (group == "" || group == "core"), kind == "Service" else {
                    throw ManifestError(location, field: "\(path).kind",
                                        "Weft routes mesh traffic: a parentRef must be a Service (group \"\", kind Service), got \(group.isEmpty ? "core" : group)/\(kind)")
                }
            }
            let name = inner.attempt { () throws(ManifestError) in try r.requiredString("name") }
            // A Service in another namespace: a consumer route (GAMMA), for
            // this namespace's clients only.
            let namespace = inner.attempt { () throws(ManifestError) in
                let namespace = try r.string("namespace") ?? metadata.namespace
                try Validation.dnsLabel(namespace, field: r.field("namespace"), at: location)
                return namespace
            }
            let port = inner.attempt { () throws(ManifestError) in
                try r.int("port").map { (p: Int) throws(ManifestError) in try Validation.port(p, field: r.field("port"), at: location) }
            } ?? nil
            // For a Service, the Gateway API's sectionName is a port's name.
            let section = inner.attempt { () throws(ManifestError) in
                let section = try r.string("sectionName")
                if let section { try Validation.portName(section, field: r.field("sectionName"), at: location) }
                return section
            } ?? nil
            try inner.check(finishing: r)
            return ParentRef(namespace: namespace ?? metadata.namespace, name: name ?? "", port: port, sectionName: section)
        }
        try found.check()
        return parents
    }
}

extension HTTPRoute.Rule {
    init(_ node: YAMLNode, path: String, at location: DocumentLocation) throws(ManifestError) {
        var r = try FieldReader(node, at: location, path: path)
        var found = ErrorList()
        name = found.attempt { () throws(ManifestError) in try HTTPRoute.ruleName(&r, at: location) } ?? nil
        matches = found.each(&r, "matches", maxItems: 64) { p, n throws(ManifestError) in try HTTPRoute.Match(n, path: p, at: location) }
        filters = found.attempt { () throws(ManifestError) in try HTTPRoute.Filter.list(&r, at: location) } ?? []
        backendRefs = found.each(&r, "backendRefs", maxItems: 16) { p, n throws(ManifestError) in try HTTPRoute.BackendRef(n, path: p, at: location) }
        timeouts = found.attempt { () throws(ManifestError) in try HTTPRoute.Timeouts(&r, rule: path, at: location) } ?? HTTPRoute.Timeouts()
        retry = found.attempt { () throws(ManifestError) in
            try r.mapping("retry").map { t throws(ManifestError) in try HTTPRoute.Retry(t, at: location) }
        } ?? nil
        sessionPersistence = Self.sessionPersistence(&r, &found, at: location)
        try found.check(finishing: r)
        if matches.isEmpty { matches = [.everything] }
        let redirects = filters.filter { if case .requestRedirect = $0 { true } else { false } }.count
        let rewrites = filters.filter { if case .urlRewrite = $0 { true } else { false } }.count
        if redirects > 0 && rewrites > 0 {
            throw ManifestError(location, field: "\(path).filters", "RequestRedirect and URLRewrite cannot be used together")
        }
        if redirects > 0 && sessionPersistence != nil {
            throw ManifestError(location, field: "\(path).sessionPersistence", "a rule with a RequestRedirect filter sends no request upstream to keep a session with")
        }
        if redirects > 0 && !backendRefs.isEmpty {
            throw ManifestError(location, field: "\(path).backendRefs", "a rule with a RequestRedirect filter sends no request upstream; remove its backendRefs")
        }
        // The Gateway API's rule, for the rule's filters and its
        // backendRefs' alike: ReplacePrefixMatch replaces the prefix that
        // matched, so a rule that uses it has exactly one match, a PathPrefix
        // one (none means PathPrefix "/").
        let replacesPrefix = (filters + backendRefs.flatMap(\.filters)).contains { $0.replacesPrefixMatch }
        if replacesPrefix, matches.count != 1 {
            throw ManifestError(location, field: "\(path).matches",
                                "ReplacePrefixMatch needs exactly one match, a PathPrefix one; this rule has \(matches.count) (give each prefix a rule of its own)")
        }
        if replacesPrefix, let match = matches.first, !match.path.isPrefix {
            throw ManifestError(location, field: "\(path).matches[0].path", "ReplacePrefixMatch needs a PathPrefix match")
        }
    }
}

extension HTTPRoute.Rule {
    /// A rule's `sessionPersistence` (HTTPRoute's and GRPCRoute's), its
    /// error kept in `found`.
    static func sessionPersistence(_ r: inout FieldReader, _ found: inout ErrorList,
                                   at location: DocumentLocation) -> SessionPersistence? {
        found.attempt { () throws(ManifestError) in
            try r.mapping("sessionPersistence").map { s throws(ManifestError) in try SessionPersistence(s, at: location) }
        } ?? nil
    }
}

extension HTTPRoute.Match {
    /// The match of a rule that gives none: every request (PathPrefix "/").
    static let everything = Self(path: .prefix("/"), headers: [], queryParams: [], method: nil)
}

extension HTTPRoute.Timeouts {
    /// A rule's `timeouts`, none if it has none.
    init(_ r: inout FieldReader, rule path: String, at location: DocumentLocation) throws(ManifestError) {
        self.init()
        guard var t = try r.mapping("timeouts") else { return }
        // "0s" turns the request timeout off (Gateway API); kept as zero
        // so that a Service's TrafficPolicy requestTimeout does not
        // fill it in (ProxyTable takes zero for none).
        request = try t.string("request").map { s throws(ManifestError) in
            try HTTPRoute.duration(s, field: t.field("request"), at: location) ?? .zero
        }
        backendRequest = try t.string("backendRequest").map { s throws(ManifestError) in try HTTPRoute.duration(s, field: t.field("backendRequest"), at: location) } ?? nil
        try t.finish()
        if let request, request > .zero, let backendRequest, backendRequest > request {
            throw ManifestError(location, field: "\(path).timeouts.backendRequest",
                                "must not be longer than timeouts.request (\(backendRequest) > \(request))")
        }
    }
}

extension HTTPRoute.Retry {
    /// The gRPC statuses a retry may name (Envoy's retry_on for gRPC).
    static let retryableGRPC: [String: Int] = ["CANCELLED": 1, "DEADLINE_EXCEEDED": 4, "RESOURCE_EXHAUSTED": 8,
                                               "INTERNAL": 13, "UNAVAILABLE": 14]

    /// `retry: {codes, attempts, backoff}`, an HTTPRoute rule's (GEP-1731)
    /// or a TrafficPolicy's (`grpc`: with `grpcStatuses` by name).
    init(_ reader: FieldReader, grpc: Bool = false, at location: DocumentLocation) throws(ManifestError) {
        var t = reader
        // Every status, code and field on its own, so one mistake does not
        // hide the next.
        var found = ErrorList()
        if grpc, t.keys.contains("grpcStatuses") {
            grpcStatuses = found.each(&t, "grpcStatuses") { p, n throws(ManifestError) in
                let name = try FieldReader.string(n, at: location, path: p)
                guard let status = Self.retryableGRPC[name] else {
                    throw ManifestError(location, field: p, "must be one of \(Self.retryableGRPC.keys.sorted().joined(separator: ", ")), got \(quoted(name))")
                }
                return status
            }
        }
        codes = found.each(&t, "codes") { p, n throws(ManifestError) in
            let code = try FieldReader.int(n, at: location, path: p)
            guard (400...599).contains(code) else {
                throw ManifestError(location, field: p, "a retry code must be 400-599, got \(code)")
            }
            return code
        }
        attempts = found.attempt { () throws(ManifestError) in
            let attempts = try t.int("attempts") ?? HTTPRoute.defaultRetryAttempts
            guard (0...10).contains(attempts) else { throw t.error("attempts", "must be 0-10, got \(attempts)") }
            return attempts
        } ?? HTTPRoute.defaultRetryAttempts
        let backoff = found.attempt { () throws(ManifestError) in
            try t.string("backoff").map { s throws(ManifestError) in try HTTPRoute.duration(s, field: t.field("backoff"), at: location) } ?? nil
        } ?? nil
        self.backoff = backoff ?? HTTPRoute.defaultRetryBackoff
        try found.check(finishing: t)
    }
}

extension HTTPRoute.PathMatch {
    var isPrefix: Bool { if case .prefix = self { true } else { false } }
}

extension HTTPRoute.Match {
    static let methods: Set<String> = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]

    init(_ node: YAMLNode, path: String, at location: DocumentLocation) throws(ManifestError) {
        var r = try FieldReader(node, at: location, path: path)
        // Path, headers, query parameters and method are read each on its
        // own, so that one mistake does not hide the next.
        var found = ErrorList()
        self.path = found.attempt { () throws(ManifestError) in try Self.path(&r) } ?? .prefix("/")
        headers = found.attempt { () throws(ManifestError) in
            try HTTPRoute.ValueMatch.list(&r, "headers", header: true, at: location)
        } ?? []
        queryParams = found.attempt { () throws(ManifestError) in
            try HTTPRoute.ValueMatch.list(&r, "queryParams", header: false, at: location)
        } ?? []
        method = found.attempt { () throws(ManifestError) in
            let method = try r.string("method")
            if let m = method, !Self.methods.contains(m) {
                throw r.error("method", "must be one of \(Self.methods.sorted().joined(separator: ", ")), got \(quoted(m))")
            }
            return method
        } ?? nil
        try found.check(finishing: r)
    }

    /// An Exact or PathPrefix value as the Gateway API's schema takes it: an
    /// absolute path of RFC 3986 path characters and %-escapes, with no
    /// empty, "." or ".." segment and no escaped "/" (paths that normalize
    /// to another are refused, not matched by surprise).
    static func checkPathValue(_ value: String, _ p: FieldReader) throws(ManifestError) {
        guard value.hasPrefix("/") else { throw p.error("value", "must start with \"/\"") }
        if value.contains("?") { throw p.error("value", "must not contain \"?\" (a query is matched by queryParams)") }
        for part in ["//", "/./", "/../", "%2f", "%2F", "#"] where value.contains(part) {
            throw p.error("value", "must not contain \(quoted(part))")
        }
        if value.hasSuffix("/.") || value.hasSuffix("/..") { throw p.error("value", "must not end with \"/.\" or \"/..\"") }
        let scalars = Array(value.unicodeScalars)
        var i = 0
        while i < scalars.count {
            if scalars[i] == "%" {
                guard i + 2 < scalars.count, scalars[i + 1].properties.isASCIIHexDigit,
                      scalars[i + 2].properties.isASCIIHexDigit else {
                    throw p.error("value", "\"%\" must begin an escape of two hex digits")
                }
                i += 3
                continue
            }
            guard Self.pathCharacters.contains(scalars[i]) else {
                throw p.error("value", "\(quoted(String(scalars[i]))) is not allowed in a path (escape it as %XX)")
            }
            i += 1
        }
    }

    /// RFC 3986 pchar and "/", as the Gateway API's path pattern lists them.
    static let pathCharacters = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/._~!$&'()*+,;=:@".unicodeScalars)

    /// A match's `path`, PathPrefix "/" when it gives none.
    private static func path(_ r: inout FieldReader) throws(ManifestError) -> HTTPRoute.PathMatch {
        let location = r.location
        var path = HTTPRoute.PathMatch.prefix("/")
        if var p = try r.mapping("path") {
            let type = try p.string("type") ?? "PathPrefix"
            let value = try p.string("value") ?? "/"
            try Validation.maxLength(value, 1024, field: p.field("value"), at: location)
            switch type {
            case "Exact", "PathPrefix":
                try Self.checkPathValue(value, p)
                // "When specified, a trailing `/` is ignored" (PathPrefix):
                // "/api/" is "/api".
                let prefix = value.count > 1 && value.hasSuffix("/") ? String(value.dropLast()) : value
                path = type == "Exact" ? .exact(value) : .prefix(prefix)
            case "RegularExpression":
                try HTTPRoute.checkRegex(value, field: p.field("value"), at: location)
                path = .regularExpression(value)
            default:
                throw p.error("type", "must be Exact, PathPrefix or RegularExpression, got \(quoted(type))")
            }
            try p.finish()
        }
        return path
    }
}

extension HTTPRoute.ValueMatch {
    static func list(_ r: inout FieldReader, _ key: String, header: Bool, at location: DocumentLocation) throws(ManifestError) -> [Self] {
        guard let list = try r.list(key, maxItems: 16) else { return [] }
        var out: [Self] = []
        var found = ErrorList()
        _ = found.each(list) { path, node throws(ManifestError) in
            var m = try FieldReader(node, at: location, path: path)
            let type = try m.string("type") ?? "Exact"
            let name = try m.requiredString("name")
            guard let value = try m.string("value") else { throw m.error("value", "required field is missing") }
            // A query parameter's name is the same token as a header's
            // (the API's HTTPQueryParamMatch.name is an HTTPHeaderName).
            try HTTPRoute.headerName(name, field: m.field("name"), at: location,
                                     what: header ? "header name" : "query parameter name")
            try Validation.maxLength(name, 256, field: m.field("name"), at: location)
            try Validation.maxLength(value, header ? 4096 : 1024, field: m.field("value"), at: location)
            switch type {
            case "Exact": break
            case "RegularExpression": try HTTPRoute.checkRegex(value, field: m.field("value"), at: location)
            default: throw m.error("type", "must be Exact or RegularExpression, got \(quoted(type))")
            }
            try m.finish()
            let folded = header ? name.lowercased() : name
            if out.contains(where: { $0.name == folded }) {
                throw ManifestError(location, field: "\(path).name", "\(quoted(name)) is matched twice in one match")
            }
            out.append(Self(name: folded, value: value, isRegularExpression: type == "RegularExpression"))
        }
        try found.check()
        return out
    }
}

extension HTTPRoute.BackendRef {
    init(_ node: YAMLNode, path: String, at location: DocumentLocation) throws(ManifestError) {
        var r = try FieldReader(node, at: location, path: path)
        // Its fields are read each on its own, so that one mistake does not
        // hide the next (group with kind, which it qualifies).
        r.ignore("kind")
        var found = ErrorList()
        found.attempt { () throws(ManifestError) in
            let group = try r.string("group") ?? ""
            let kind = try r.string("kind") ?? "Service"
            guard group == "" || group == "core", kind == "Service" else {
                throw r.error("kind", "a backendRef must be a Service, got \(group.isEmpty ? "core" : group)/\(kind)")
            }
        }
        name = found.attempt { () throws(ManifestError) in try r.requiredString("name") } ?? ""
        namespace = found.attempt { () throws(ManifestError) in
            let namespace = try r.string("namespace")
            if let namespace { try Validation.dnsLabel(namespace, field: r.field("namespace"), at: location) }
            return namespace
        } ?? nil
        port = found.attempt { () throws(ManifestError) in
            guard let p = try r.int("port") else { throw r.error("port", "required for a Service backendRef") }
            return try Validation.port(p, field: r.field("port"), at: location)
        } ?? 0
        weight = found.attempt { () throws(ManifestError) in
            let w = try r.int("weight") ?? 1
            guard (0...1_000_000).contains(w) else { throw r.error("weight", "must be 0-1000000, got \(w)") }
            return UInt32(w)
        } ?? 0
        filters = found.attempt { () throws(ManifestError) in
            let filters = try HTTPRoute.Filter.list(&r, at: location)
            for f in filters {
                if case .requestRedirect = f { throw r.error("filters", "RequestRedirect is a rule filter, not a backendRef filter") }
            }
            return filters
        } ?? []
        try found.check(finishing: r)
    }
}

extension HTTPRoute.Filter {
    /// A URLRewrite or RequestRedirect that replaces the matched prefix.
    var replacesPrefixMatch: Bool {
        switch self {
        case .urlRewrite(let w): if case .replacePrefixMatch = w.path { true } else { false }
        case .requestRedirect(let w): if case .replacePrefixMatch = w.path { true } else { false }
        default: false
        }
    }

    static func list(_ r: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> [Self] {
        guard let list = try r.list("filters", maxItems: 16) else { return [] }
        var out: [Self] = []
        var seen: Set<String> = []
        var found = ErrorList()
        _ = found.each(list) { path, node throws(ManifestError) in
            var f = try FieldReader(node, at: location, path: path)
            let type = try f.requiredString("type")
            // Only RequestMirror may come twice (the API's rule: a second
            // header modifier, redirect or rewrite would contradict the first).
            if type != "RequestMirror", !seen.insert(type).inserted {
                throw f.error("type", "a second \(type) filter in one list: give it once")
            }
            func body(_ key: String) throws(ManifestError) -> FieldReader {
                guard let m = try f.mapping(key) else { throw f.error(key, "required when type is \(type)") }
                return m
            }
            switch type {
            case "RequestHeaderModifier":
                out.append(.requestHeaderModifier(try HTTPRoute.HeaderModifier(try body("requestHeaderModifier"), at: location)))
            case "ResponseHeaderModifier":
                out.append(.responseHeaderModifier(try HTTPRoute.HeaderModifier(try body("responseHeaderModifier"), at: location)))
            case "RequestRedirect":
                var b = try body("requestRedirect")
                let scheme = try b.string("scheme")
                if let s = scheme, s != "http", s != "https" { throw b.error("scheme", "must be http or https") }
                let hostname = try HTTPRoute.hostname(&b, at: location)
                let path = try HTTPRoute.PathModifier.read(&b, at: location)
                let port = try b.int("port").map { p throws(ManifestError) in try Validation.port(p, field: b.field("port"), at: location) }
                let code = try b.int("statusCode") ?? 302
                guard code == 301 || code == 302 else { throw b.error("statusCode", "must be 301 or 302, got \(code)") }
                try b.finish()
                out.append(.requestRedirect(.init(scheme: scheme, hostname: hostname, path: path, port: port, statusCode: code)))
            case "URLRewrite":
                var b = try body("urlRewrite")
                let hostname = try HTTPRoute.hostname(&b, at: location)
                let path = try HTTPRoute.PathModifier.read(&b, at: location)
                try b.finish()
                out.append(.urlRewrite(.init(hostname: hostname, path: path)))
            case "RequestMirror":
                var b = try body("requestMirror")
                guard var ref = try b.mapping("backendRef") else { throw b.error("backendRef", "required field is missing") }
                let kind = try ref.string("kind") ?? "Service"
                guard kind == "Service" else { throw ref.error("kind", "must be Service") }
                ref.ignore("group")
                let name = try ref.requiredString("name")
                let namespace = try ref.string("namespace")
                if let namespace { try Validation.dnsLabel(namespace, field: ref.field("namespace"), at: location) }
                guard let p = try ref.int("port") else { throw ref.error("port", "required for a Service backendRef") }
                let port = try Validation.port(p, field: ref.field("port"), at: location)
                try ref.finish()
                var percent = 100.0
                if let pc = try b.int("percent") {
                    guard (0...100).contains(pc) else { throw b.error("percent", "must be 0-100") }
                    percent = Double(pc)
                }
                if var fr = try b.mapping("fraction") {
                    guard let num = try fr.int("numerator") else { throw fr.error("numerator", "required field is missing") }
                    let den = try fr.int("denominator") ?? 100
                    guard den > 0, (0...den).contains(num) else { throw fr.error("numerator", "must be 0...denominator (\(den))") }
                    try fr.finish()
                    percent = 100.0 * Double(num) / Double(den)
                }
                try b.finish()
                out.append(.requestMirror(.init(name: name, port: port, percent: percent, namespace: namespace)))
            case "ExtensionRef", "CORS", "ExternalAuth":
                throw f.error("type", "\(type) is not supported by Weft")
            default:
                throw f.error("type", "unknown filter type \(quoted(type)) (known: RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)")
            }
            try f.finish()
        }
        try found.check()
        return out
    }
}

extension HTTPRoute.HeaderModifier {
    init(_ reader: FieldReader, at location: DocumentLocation) throws(ManifestError) {
        var r = reader
        var found = ErrorList()
        for key in ["set", "add"] {
            var headers: [HTTPRoute.Header] = []
            _ = found.each(&r, key, maxItems: 16) { path, node throws(ManifestError) in
                var h = try FieldReader(node, at: location, path: path)
                let name = try h.requiredString("name")
                try HTTPRoute.headerName(name, field: h.field("name"), at: location)
                try Validation.maxLength(name, 256, field: h.field("name"), at: location)
                guard let value = try h.string("value") else { throw h.error("value", "required field is missing") }
                try HTTPRoute.headerValue(value, field: h.field("value"), at: location)
                try Validation.maxLength(value, 4096, field: h.field("value"), at: location)
                try h.finish()
                if headers.contains(where: { $0.name.lowercased() == name.lowercased() }) {
                    throw h.error("name", "\(quoted(name)) is in \(key) already")
                }
                headers.append(.init(name: name, value: value))
            }
            if key == "set" { set = headers } else { add = headers }
        }
        var removed: [String] = []
        _ = found.each(&r, "remove", maxItems: 16) { path, node throws(ManifestError) in
            let name = try FieldReader.string(node, at: location, path: path)
            try HTTPRoute.headerName(name, field: path, at: location)
            try Validation.maxLength(name, 256, field: path, at: location)
            if removed.contains(where: { $0.lowercased() == name.lowercased() }) {
                throw ManifestError(location, field: path, "\(quoted(name)) is in remove already")
            }
            removed.append(name)
        }
        remove = removed
        try found.check(finishing: r)
    }
}

extension HTTPRoute.PathModifier {
    static func read(_ r: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> Self? {
        guard var p = try r.mapping("path") else { return nil }
        let type = try p.requiredString("type")
        let out: Self
        switch type {
        case "ReplaceFullPath":
            guard let v = try p.string("replaceFullPath"), v.hasPrefix("/") else { throw p.error("replaceFullPath", "required, and must start with \"/\"") }
            try Validation.maxLength(v, 1024, field: p.field("replaceFullPath"), at: r.location)
            out = .replaceFullPath(v)
        case "ReplacePrefixMatch":
            // The API's table takes an empty replacement: the prefix removed,
            // as "/" removes it.
            guard let v = try p.string("replacePrefixMatch"), v.isEmpty || v.hasPrefix("/") else {
                throw p.error("replacePrefixMatch", "required, and must be empty or start with \"/\"")
            }
            try Validation.maxLength(v, 1024, field: p.field("replacePrefixMatch"), at: r.location)
            out = .replacePrefixMatch(v.isEmpty ? "/" : v)
        default:
            throw p.error("type", "must be ReplaceFullPath or ReplacePrefixMatch, got \(quoted(type))")
        }
        try p.finish()
        return out
    }
}

extension HTTPRoute {
    /// Gateway API duration: 1-4 groups of up to 5 digits and a unit
    /// (h, m, s, ms), e.g. "1h30m", "500ms". "0s" means no limit.
    static func duration(_ text: String, field: String, at location: DocumentLocation) throws(ManifestError) -> Duration? {
        var total = Duration.zero
        var digits = ""
        var groups = 0
        var chars = Array(text)
        guard !chars.isEmpty else { throw ManifestError(location, field: field, "empty duration") }
        var i = 0
        func fail() -> ManifestError {
            ManifestError(location, field: field, "\(quoted(text)) is not a Gateway API duration (e.g. 500ms, 10s, 1m30s)")
        }
        while i < chars.count {
            let c = chars[i]
            if c.isASCII, c.isNumber {
                digits.append(c)
                i += 1
                continue
            }
            guard !digits.isEmpty, digits.count <= 5, let n = Int64(digits) else { throw fail() }
            if c == "m", i + 1 < chars.count, chars[i + 1] == "s" {
                total += .milliseconds(n)
                i += 2
            } else {
                switch c {
                case "h": total += .seconds(n * 3600)
                case "m": total += .seconds(n * 60)
                case "s": total += .seconds(n)
                default: throw fail()
                }
                i += 1
            }
            digits = ""
            groups += 1
        }
        chars.removeAll()
        guard digits.isEmpty, (1...4).contains(groups) else { throw fail() }
        return total == .zero ? nil : total
    }

    static func checkRegex(_ pattern: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        do {
            _ = try LinearRegex(pattern)
        } catch {
            throw ManifestError(location, field: field, "not a valid regular expression: \(quoted(pattern)) (\(error); RE2 syntax, matched in linear time: docs/proxy.md)")
        }
    }

    /// A rule's `name` (the API's SectionName: a lower-case DNS name), by
    /// which a TrafficPolicy may target it.
    static func ruleName(_ r: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> String? {
        guard let name = try r.string("name") else { return nil }
        guard Validation.dnsSubdomain(name) else {
            throw r.error("name", "\(quoted(name)) is not a valid rule name (lower-case DNS name, RFC 1123)")
        }
        return name
    }

    /// RFC 7230 token.
    static func headerName(_ name: String, field: String, at location: DocumentLocation,
                           what: String = "header name") throws(ManifestError) {
        let ok = !name.isEmpty && name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a)
                || "!#$%&'*+-.^_`|~".utf8.contains(c)
        }
        guard ok else { throw ManifestError(location, field: field, "\(quoted(name)) is not a valid \(what)") }
    }

    /// A filter's `hostname`: a precise DNS name (RFC 1123 subdomain, lower
    /// case), as the Gateway API's PreciseHostname. It becomes a Host header
    /// or a Location.
    static func hostname(_ r: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> String? {
        guard let name = try r.string("hostname") else { return nil }
        guard Validation.dnsSubdomain(name) else {
            throw r.error("hostname", "\(String(reflecting: name)) is not a valid hostname (lower-case DNS name, RFC 1123)")
        }
        return name
    }

    /// A field value as RFC 9110 5.5 has it: visible characters, spaces and
    /// tabs inside, nothing at either end, and never CR, LF or NUL (which
    /// would split or end the header on the wire).
    static func headerValue(_ value: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        let bytes = value.utf8
        let ok = bytes.allSatisfy { c in c == 0x09 || (c >= 0x20 && c != 0x7f) }
            && !(bytes.first.map { $0 == 0x20 || $0 == 0x09 } ?? false)
            && !(bytes.last.map { $0 == 0x20 || $0 == 0x09 } ?? false)
        guard ok else {
            throw ManifestError(location, field: field, "\(String(reflecting: value)) is not a valid header value "
                + "(no control characters, and no space or tab at either end)")
        }
    }
}
