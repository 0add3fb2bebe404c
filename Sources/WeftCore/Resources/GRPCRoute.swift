/// A `gateway.networking.k8s.io/v1 GRPCRoute` bound to a Service the mesh way
/// (GAMMA), read into the HTTPRoute model the proxy routes by. A gRPC call is
/// an HTTP/2 POST to `/<service>/<method>`, so a method match is a match on
/// the request's path:
///
/// | GRPCRoute method match | path match |
/// |---|---|
/// | Exact, service and method | Exact `/service/method` |
/// | Exact, service only | PathPrefix `/service` (every method of it) |
/// | Exact, method only | RegularExpression `/[^/]+/method` |
/// | RegularExpression | RegularExpression `/(service)/(method)`, `[^/]+` for the one not given |
///
/// Header matches, the RequestHeaderModifier, ResponseHeaderModifier and
/// RequestMirror filters, weighted backendRefs (in any namespace), producer
/// and consumer routes are the HTTPRoute's; its backends are spoken to over
/// HTTP/2 whatever their Service ports declare (gRPC needs it). Rules are ordered by GRPCRoute
/// precedence (the longer service, then the longer method, then more
/// header matches), not HTTPRoute's. GRPCRoute has no timeouts or retry in
/// the Standard channel; a TrafficPolicy's `timeout.http.requestTimeout`
/// bounds its calls, and its `retry.grpcStatuses` retries them. Where a GRPCRoute and an HTTPRoute attach to the same
/// Service port, the GRPCRoute applies and the HTTPRoutes there are ignored
/// (GEP-1294, "Route types"). The route itself is read by
/// `HTTPRoute(spec:metadata:kind:at:)` with `.grpc`.
extension HTTPRoute.Rule {
    init(grpc node: YAMLNode, path: String, at location: DocumentLocation) throws(ManifestError) {
        var r = try FieldReader(node, at: location, path: path)
        var found = ErrorList()
        name = found.attempt { () throws(ManifestError) in try HTTPRoute.ruleName(&r, at: location) } ?? nil
        matches = found.each(&r, "matches", maxItems: 64) { p, n throws(ManifestError) in try HTTPRoute.Match(grpc: n, path: p, at: location) }
        filters = found.attempt { () throws(ManifestError) in
            let filters = try HTTPRoute.Filter.list(&r, at: location)
            try Self.grpcFilters(filters, field: "\(path).filters", at: location)
            return filters
        } ?? []
        backendRefs = found.each(&r, "backendRefs", maxItems: 16) { p, n throws(ManifestError) in
            let ref = try HTTPRoute.BackendRef(n, path: p, at: location)
            try Self.grpcFilters(ref.filters, field: "\(p).filters", at: location)
            return ref
        }
        timeouts = HTTPRoute.Timeouts()
        retry = nil
        sessionPersistence = Self.sessionPersistence(&r, &found, at: location)
        try found.check(finishing: r)
        if matches.isEmpty { matches = [.everything] }
    }

    /// GRPCRoute's filters are the header modifiers and RequestMirror.
    static func grpcFilters(_ filters: [HTTPRoute.Filter], field: String, at location: DocumentLocation) throws(ManifestError) {
        for (i, filter) in filters.enumerated() {
            switch filter {
            case .requestHeaderModifier, .responseHeaderModifier, .requestMirror: continue
            case .requestRedirect, .urlRewrite:
                throw ManifestError(location, field: "\(field)[\(i)].type",
                                    "a GRPCRoute takes RequestHeaderModifier, ResponseHeaderModifier and RequestMirror filters")
            }
        }
    }
}

extension HTTPRoute.Match {
    /// gRPC's names, as GRPCRoute validates an Exact match's: a service is
    /// dot-separated identifiers (a leading dot allowed), a method one
    /// identifier.
    static func isGRPCIdentifier(_ s: Substring) -> Bool {
        guard let first = s.utf8.first, first == UInt8(ascii: "_") || ((first | 0x20) >= 0x61 && (first | 0x20) <= 0x7a) else { return false }
        return s.utf8.allSatisfy { c in
            c == UInt8(ascii: "_") || (c >= 0x30 && c <= 0x39) || ((c | 0x20) >= 0x61 && (c | 0x20) <= 0x7a)
        }
    }

    static func isGRPCService(_ s: String) -> Bool {
        let body = s.hasPrefix(".") ? s.dropFirst() : Substring(s)
        return !body.isEmpty && body.split(separator: ".", omittingEmptySubsequences: false).allSatisfy(isGRPCIdentifier)
    }

    init(grpc node: YAMLNode, path: String, at location: DocumentLocation) throws(ManifestError) {
        var r = try FieldReader(node, at: location, path: path)
        self.path = .prefix("/")
        queryParams = []
        method = nil
        if var m = try r.mapping("method") {
            let type = try m.string("type") ?? "Exact"
            let service = try m.string("service").flatMap { $0.isEmpty ? nil : $0 }
            let method = try m.string("method").flatMap { $0.isEmpty ? nil : $0 }
            guard service != nil || method != nil else {
                throw ManifestError(location, field: "\(path).method", "give service, method or both")
            }
            if let service { try Validation.maxLength(service, 1024, field: m.field("service"), at: location) }
            if let method { try Validation.maxLength(method, 1024, field: m.field("method"), at: location) }
            switch type {
            case "Exact":
                if let service, !Self.isGRPCService(service) {
                    throw m.error("service", "not a gRPC service name (e.g. helloworld.Greeter), got \(quoted(service))")
                }
                if let method, !Self.isGRPCIdentifier(Substring(method)) {
                    throw m.error("method", "not a gRPC method name (e.g. SayHello), got \(quoted(method))")
                }
                switch (service, method) {
                case (let s?, let m?): self.path = .exact("/\(s)/\(m)")
                case (let s?, nil): self.path = .prefix("/\(s)")
                case (nil, let m?): self.path = .regularExpression("/[^/]+/\(m)")
                case (nil, nil): break
                }
            case "RegularExpression":
                if let service { try HTTPRoute.checkRegex(service, field: m.field("service"), at: location) }
                if let method { try HTTPRoute.checkRegex(method, field: m.field("method"), at: location) }
                self.path = .regularExpression("/(\(service ?? "[^/]+"))/(\(method ?? "[^/]+"))")
            default:
                throw m.error("type", "must be Exact or RegularExpression, got \(quoted(type))")
            }
            try m.finish()
            grpc = HTTPRoute.GRPCMethod(service: service ?? "", method: method ?? "")
        }
        headers = try HTTPRoute.ValueMatch.list(&r, "headers", header: true, at: location)
        try r.finish()
    }
}
