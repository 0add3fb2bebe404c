/// A `gateway.networking.k8s.io/v1alpha2 TCPRoute` or `UDPRoute` bound to a
/// Service the mesh way (GAMMA): its one rule's weighted backendRefs split
/// the connections (TCP) or datagrams and connected UDP sockets (UDP) sent
/// to the parent Service's ports of that protocol. Weft carries it out in
/// the kernel, with no proxy: the parent port's backend slots are filled
/// with the backends' pods in proportion to the weights (ServiceTable), and
/// connect() (sendmsg() for unconnected UDP) draws one slot as it draws
/// one for any Service.
///
/// A `TLSRoute` (`gateway.networking.k8s.io/v1`, or `v1alpha2`) is the same
/// shape with `hostnames`: TLS passthrough by SNI. The kernel cannot read a
/// ClientHello, so its parent ports go to the node proxy, which reads the
/// server name the client sends, picks the route whose hostnames match it
/// (ProxyTable.SNIMatch) and splits the connection by weight among that
/// route's backends, passing the encrypted bytes through untouched.
///
/// A TLSRoute whose parent is a Service of another namespace is a consumer
/// route (GAMMA, GEP-1294): it routes only the clients in the route's own
/// namespace, who are routed by their namespace's TLSRoutes of that port
/// instead of the Service's own (ProxyTable.Consumers). The proxy tells
/// clients apart; the kernel's table is one for every client, so a TCPRoute
/// or UDPRoute in another namespace than its parent is refused by name, as
/// is more than one rule (rules have no matches to choose between them).
public struct L4Route: Hashable, Sendable {
    public enum Kind: String, Hashable, Sendable {
        case tcp = "TCPRoute", udp = "UDPRoute", tls = "TLSRoute"

        public var transport: TransportProtocol { self == .udp ? .udp : .tcp }
    }

    public var metadata: ObjectMeta
    public var kind: Kind
    public var parentRefs: [HTTPRoute.ParentRef]
    /// The rule's backendRefs (no filters: TCPRoute and UDPRoute have none).
    public var backendRefs: [HTTPRoute.BackendRef]
    /// A TLSRoute's SNI names, lowercase, each exact or a wildcard
    /// (`*.example.com`: any name ending in `.example.com`, one label or
    /// more before it); empty: every ClientHello, with a name or without.
    public var hostnames: [String] = []

    /// Whether the route attaches to this port of its parent Service.
    public func selects(_ p: ServicePort) -> Bool {
        parentRefs.contains { parent in
            p.transport == kind.transport && (parent.port == nil || parent.port == p.port)
                && (parent.sectionName == nil || parent.sectionName == p.name)
        }
    }

    /// `hostnamesRequired`: TLSRoute v1 (the standard channel) needs at
    /// least one; v1alpha2 may leave them out.
    init(spec node: YAMLNode, metadata: ObjectMeta, kind: Kind, hostnamesRequired: Bool = false,
         at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        // Parents, hostnames and the rule are read each on its own, so that
        // one mistake does not hide the next.
        var found = ErrorList()
        parentRefs = found.attempt { () throws(ManifestError) in
            let parents = try HTTPRoute.parents(&spec, kind: kind.rawValue, metadata: metadata, at: location)
            for (i, parent) in parents.enumerated() where parent.namespace != metadata.namespace && kind != .tls {
                throw ManifestError(location, field: "spec.parentRefs[\(i)].namespace",
                                    "a \(kind.rawValue) is carried out in the kernel, for every client of the Service: its parent must be in its own namespace \(metadata.namespace) (a consumer route needs a per-client table; a TLSRoute, which the node proxy carries out, may be one), got \(parent.namespace)")
            }
            return parents
        } ?? []
        if kind == .tls {
            hostnames = found.attempt { () throws(ManifestError) in
                let names = try Self.hostnames(&spec, at: location)
                if names.isEmpty && hostnamesRequired {
                    throw spec.error("hostnames", "a TLSRoute (gateway.networking.k8s.io/v1) needs at least one hostname: the SNI names it routes")
                }
                return names
            } ?? []
        }
        backendRefs = found.attempt { () throws(ManifestError) in try Self.rule(&spec, kind: kind, at: location) } ?? []
        try found.check(finishing: spec)
        self.metadata = metadata
        self.kind = kind
    }

    /// The one rule's backendRefs; its name, each backendRef and unknown
    /// fields are checked each on its own.
    private static func rule(_ spec: inout FieldReader, kind: Kind, at location: DocumentLocation) throws(ManifestError) -> [HTTPRoute.BackendRef] {
        guard let rules = try spec.list("rules"), !rules.isEmpty else {
            throw spec.error("rules", "a \(kind.rawValue) needs one rule with backendRefs")
        }
        guard rules.count == 1, let (path, ruleNode) = rules.first else {
            throw spec.error("rules", "Weft takes one rule per \(kind.rawValue) (its rules have no matches to choose between them), got \(rules.count)")
        }
        var rule = try FieldReader(ruleNode, at: location, path: path)
        var found = ErrorList()
        _ = found.attempt { () throws(ManifestError) in try HTTPRoute.ruleName(&rule, at: location) }
        let refs = found.each(&rule, "backendRefs", maxItems: 16) { p, n throws(ManifestError) in
            let ref = try HTTPRoute.BackendRef(n, path: p, at: location)
            if !ref.filters.isEmpty {
                throw ManifestError(location, field: "\(p).filters", "a \(kind.rawValue)'s backendRefs take no filters")
            }
            return ref
        }
        try found.check(finishing: rule)
        guard !refs.isEmpty else { throw rule.error("backendRefs", "a \(kind.rawValue) rule needs at least one backendRef") }
        guard refs.contains(where: { $0.weight > 0 }) else {
            throw rule.error("backendRefs", "every backendRef has weight 0: the route would send nothing anywhere")
        }
        return refs
    }

    /// A Gateway API Hostname as a TLSRoute takes it: RFC 1123, lowercase,
    /// at most 253 characters, labels of 1-63; a leading `*.` label is a
    /// wildcard; no IP address (RFC 6066: SNI carries no address).
    /// A route's `spec.hostnames` (TLSRoute, HTTPRoute), checked as the
    /// Gateway API's schema checks them: at most 16, each a Hostname.
    /// Repeats are dropped.
    static func hostnames(_ spec: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> [String] {
        guard let list = try spec.list("hostnames") else { return [] }
        guard list.count <= 16 else { throw spec.error("hostnames", "at most 16 hostnames, got \(list.count)") }
        var found = ErrorList()
        var names: [String] = []
        for name in found.each(list, { p, n throws(ManifestError) in
            let name = try FieldReader.string(n, at: location, path: p)
            try checkHostname(name, field: p, at: location)
            return name
        }) where !names.contains(name) { names.append(name) }
        try found.check()
        return names
    }

    static func checkHostname(_ name: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        let rest = name.hasPrefix("*.") ? String(name.dropFirst(2)) : name
        let labels = rest.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard name.utf8.count <= 253, Validation.dnsSubdomain(rest), labels.allSatisfy({ $0.count <= 63 }) else {
            throw ManifestError(location, field: field,
                                "\(quoted(name)) is not a hostname: use lowercase letters, digits, '-' and '.', labels of 1-63 characters, optionally \"*.\" first for a wildcard")
        }
        if labels.count == 4, labels.allSatisfy({ $0.allSatisfy { $0 >= 0x30 && $0 <= 0x39 } }) {
            throw ManifestError(location, field: field, "\(quoted(name)) is an IP address: a route's hostname names a host, never an address (RFC 6066 for SNI; the Gateway API's Hostname)")
        }
    }

    /// Whether a TLSRoute hostname matches the server name a client sent.
    public static func hostname(_ pattern: String, matches serverName: String) -> Bool {
        guard pattern.hasPrefix("*.") else { return pattern == serverName }
        let suffix = pattern.utf8.dropFirst(1) // ".example.com"
        return serverName.utf8.count > suffix.count && serverName.utf8.suffix(suffix.count).elementsEqual(suffix)
    }

    /// The slots of a port the route splits: each group's backends (the
    /// ready pods of one backendRef's Service port) in proportion to its
    /// weight, shared evenly among them. Exact when that takes at most
    /// `maxSlots` slots (each backend gets weight x L / n slots, L the
    /// least common multiple of the groups' sizes, all divided by their
    /// greatest common divisor); otherwise `maxSlots` slots shared by
    /// largest remainder, each backend of a weighted group at least one.
    /// A group with no ready backend gets none: its share goes to the
    /// others. A backend in two groups gets both shares.
    public static func slots(_ groups: [(weight: UInt32, backends: [BackendAddress])], maxSlots: Int = 1000) -> [BackendAddress] {
        let live = groups.filter { $0.weight > 0 && !$0.backends.isEmpty }
        guard live.count > 1 else { return live.first?.backends ?? [] }
        func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }
        var l = 1
        for g in live {
            l = l / gcd(l, g.backends.count) * g.backends.count
            if l > maxSlots { break }
        }
        var counts = live.map { l <= maxSlots ? Int($0.weight) * (l / $0.backends.count) : 0 }
        let divisor = counts.reduce(0, gcd)
        if divisor > 0 { counts = counts.map { $0 / divisor } }
        let exact = zip(live, counts).reduce(0) { $0 + $1.0.backends.count * $1.1 }
        if l <= maxSlots, exact > 0, exact <= maxSlots {
            return zip(live, counts).flatMap { g, c in g.backends.flatMap { Array(repeating: $0, count: c) } }
        }
        // Largest remainder over maxSlots.
        let total = live.reduce(0.0) { $0 + Double($1.weight) }
        var shares: [(backend: BackendAddress, whole: Int, rest: Double)] = []
        for g in live {
            let each = Double(g.weight) / total / Double(g.backends.count) * Double(maxSlots)
            for b in g.backends { shares.append((b, max(1, Int(each)), each - Double(Int(each)))) }
        }
        var left = maxSlots - shares.reduce(0) { $0 + $1.whole }
        for i in shares.indices.sorted(by: { shares[$0].rest > shares[$1].rest }) where left > 0 {
            shares[i].whole += 1
            left -= 1
        }
        return shares.flatMap { Array(repeating: $0.backend, count: $0.whole) }
    }
}
