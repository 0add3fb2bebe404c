/// Picks the route action for a request on one frontend: the first entry, in
/// precedence order, whose path, method, headers and query all match.
/// Regular expressions are compiled once per table, not per request, and
/// matched in linear time (LinearRegex).
public final class RouteMatcher: Sendable {
    public let frontend: ProxyTable.Frontend
    private let compiled: [CompiledMatch]
    /// Whether any match looks at headers: when none does, a caller need
    /// not give `Request.header` anything to look in.
    public let readsHeaders: Bool

    public struct Request {
        public var method: String
        /// The path without the query string.
        public var path: Substring
        public var query: Substring?
        /// Header lookup by lowercase name (all values, in order).
        public var header: (String) -> [String]

        public init(method: String, path: Substring, query: Substring?, header: @escaping (String) -> [String]) {
            self.method = method
            self.path = path
            self.query = query
            self.header = header
        }
    }

    private struct CompiledMatch {
        var entry: ProxyTable.RouteMatchEntry
        var pathRegex: LinearRegex?
        var headerRegexes: [LinearRegex?]
        var queryRegexes: [LinearRegex?]
    }

    public init(_ frontend: ProxyTable.Frontend) {
        self.frontend = frontend
        compiled = frontend.matches.map { entry in
            var pathRegex: LinearRegex?
            if case .regularExpression(let p) = entry.match.path { pathRegex = try? LinearRegex(p) }
            return CompiledMatch(entry: entry, pathRegex: pathRegex,
                                 headerRegexes: entry.match.headers.map { $0.isRegularExpression ? try? LinearRegex($0.value) : nil },
                                 queryRegexes: entry.match.queryParams.map { $0.isRegularExpression ? try? LinearRegex($0.value) : nil })
        }
        readsHeaders = frontend.matches.contains { !$0.match.headers.isEmpty }
    }

    /// The chosen action and the match that chose it, or nil: no route matches (404).
    public func route(_ request: Request) -> (action: ProxyTable.RouteAction, match: HTTPRoute.Match?)? {
        var queryItems: [(Substring, Substring)]?
        for c in compiled where matches(c, request, &queryItems) {
            return (frontend.actions[c.entry.action], c.entry.match)
        }
        return frontend.fallback.map { (frontend.actions[$0], nil) }
    }

    private func matches(_ c: CompiledMatch, _ r: Request, _ queryItems: inout [(Substring, Substring)]?) -> Bool {
        let m = c.entry.match
        if let method = m.method, method != r.method { return false }
        switch m.path {
        case .exact(let p):
            guard r.path == p else { return false }
        case .prefix(let p):
            guard Self.pathHasPrefix(r.path, p) else { return false }
        case .regularExpression:
            guard let regex = c.pathRegex, regex.wholeMatch(r.path) else { return false }
        }
        for (i, h) in m.headers.enumerated() {
            // Several values of one header are matched as the comma-joined
            // value (RFC 9110 section 5.3).
            let values = r.header(h.name)
            guard !values.isEmpty else { return false }
            let value = values.count == 1 ? values[0] : values.joined(separator: ",")
            if let regex = c.headerRegexes[i] {
                guard regex.wholeMatch(value) else { return false }
            } else if value != h.value {
                return false
            }
        }
        if !m.queryParams.isEmpty {
            if queryItems == nil { queryItems = Self.parseQuery(r.query) }
            for (i, q) in m.queryParams.enumerated() {
                // The first value of a repeated parameter counts (Gateway API).
                guard let value = queryItems?.first(where: { $0.0 == q.name })?.1 else { return false }
                if let regex = c.queryRegexes[i] {
                    guard regex.wholeMatch(value) else { return false }
                } else if value != q.value {
                    return false
                }
            }
        }
        return true
    }

    /// Gateway API PathPrefix: element-wise, so "/foo" matches "/foo" and
    /// "/foo/bar" but not "/foobar".
    public static func pathHasPrefix(_ path: Substring, _ prefix: String) -> Bool {
        if prefix == "/" { return true }
        guard path.hasPrefix(prefix) else { return false }
        let rest = path.dropFirst(prefix.count)
        return rest.isEmpty || rest.first == "/"
    }

    static func parseQuery(_ query: Substring?) -> [(Substring, Substring)] {
        guard let query, !query.isEmpty else { return [] }
        return query.split(separator: "&").map { pair in
            if let eq = pair.firstIndex(of: "=") {
                return (pair[..<eq], pair[pair.index(after: eq)...])
            }
            return (pair, "")
        }
    }

    /// The path after a URLRewrite / RequestRedirect path modifier.
    public static func rewrite(path: Substring, with modifier: HTTPRoute.PathModifier, match: HTTPRoute.Match?) -> String {
        switch modifier {
        case .replaceFullPath(let p):
            return p
        case .replacePrefixMatch(let replacement):
            guard let match, case .prefix(let prefix) = match.path else { return String(path) }
            let rest = prefix == "/" ? path.dropFirst() : path.dropFirst(prefix.count)
            if replacement == "/" {
                return rest.hasPrefix("/") ? String(rest) : "/" + rest
            }
            if rest.isEmpty { return replacement }
            let base = replacement.hasSuffix("/") ? String(replacement.dropLast()) : replacement
            return rest.hasPrefix("/") ? base + rest : base + "/" + rest
        }
    }
}
