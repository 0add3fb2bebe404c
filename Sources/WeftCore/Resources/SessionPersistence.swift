/// An HTTPRoute or GRPCRoute rule's `sessionPersistence` (Gateway API,
/// GEP-1619): once a request of the rule has gone to a backend, the client's
/// next requests of the rule go to that same backend (the pod, not only the
/// Service) for as long as the session lasts and the backend is ready. The
/// proxy keeps no table: the session is a token it gives the client, in a
/// cookie (`type: Cookie`, the default) or a response header (`type:
/// Header`) the client sends back.
///
///     sessionPersistence:
///       sessionName: cart        # cookie or header name (default: one per rule)
///       type: Cookie             # Cookie | Header
///       absoluteTimeout: 1h      # the session ends this long after it began
///       idleTimeout: 10m         # ... or after this long without a request
///       cookieConfig: {lifetimeType: Session}   # Session | Permanent (Max-Age = absoluteTimeout)
public struct SessionPersistence: Hashable, Sendable, Codable {
    public enum Kind: String, Hashable, Sendable, Codable {
        case cookie = "Cookie", header = "Header"
    }

    /// nil: a name made for the rule (ProxyTable.SessionRule).
    public var sessionName: String?
    public var kind: Kind
    public var absoluteTimeout: Duration?
    public var idleTimeout: Duration?
    /// `cookieConfig.lifetimeType: Permanent`: the cookie carries Max-Age
    /// (the absolute timeout); a session cookie (the default) none.
    public var permanent: Bool

    /// The Gateway API's limit on sessionName.
    static let maxNameLength = 128

    init(_ reader: FieldReader, at location: DocumentLocation) throws(ManifestError) {
        var r = reader
        let type = try r.string("type") ?? "Cookie"
        guard let kind = Kind(rawValue: type) else { throw r.error("type", "must be Cookie or Header, got \(quoted(type))") }
        self.kind = kind
        sessionName = try r.string("sessionName")
        if let name = sessionName {
            guard name.utf8.count <= Self.maxNameLength else {
                throw r.error("sessionName", "must be at most \(Self.maxNameLength) characters, got \(name.utf8.count)")
            }
            // A cookie name and a header name are both RFC 9110 tokens.
            try HTTPRoute.headerName(name, field: r.field("sessionName"), at: location)
        }
        func timeout(_ key: String) throws(ManifestError) -> Duration? {
            guard let text = try r.string(key) else { return nil }
            guard let d = try HTTPRoute.duration(text, field: r.field(key), at: location), d >= .seconds(1) else {
                throw r.error(key, "must be at least 1s (a session is timed in whole seconds), got \(quoted(text))")
            }
            return d
        }
        absoluteTimeout = try timeout("absoluteTimeout")
        idleTimeout = try timeout("idleTimeout")
        permanent = false
        if var c = try r.mapping("cookieConfig") {
            let lifetime = try c.string("lifetimeType") ?? "Session"
            switch lifetime {
            case "Session": permanent = false
            case "Permanent": permanent = true
            default: throw c.error("lifetimeType", "must be Session or Permanent, got \(quoted(lifetime))")
            }
            try c.finish()
            if permanent && kind == .header {
                throw r.error("cookieConfig", "applies to type Cookie, not Header")
            }
            if permanent && absoluteTimeout == nil {
                throw ManifestError(location, field: c.field("lifetimeType"),
                                    "Permanent needs absoluteTimeout (the cookie's Max-Age)")
            }
        }
        try r.finish()
    }
}
