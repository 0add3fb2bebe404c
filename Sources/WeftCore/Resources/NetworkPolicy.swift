/// A `networking.k8s.io/v1 NetworkPolicy`, read with the API server's own
/// validation and defaulting, so a policy means here what it means on
/// Kubernetes:
/// - podSelector picks the Workloads (in the policy's namespace) it isolates;
/// - policyTypes defaults to Ingress, plus Egress when `egress` has rules;
/// - a rule with no peers allows every source/destination, one with no ports
///   every port and protocol; rules and policies only ever add allows.
public struct NetworkPolicy: Hashable, Sendable {
    public enum Direction: String, Hashable, Sendable, CaseIterable, Comparable {
        case ingress = "Ingress", egress = "Egress"

        public static func < (a: Self, b: Self) -> Bool { a == .ingress && b == .egress }
        /// The field a direction's rules live in.
        public var field: String { self == .ingress ? "ingress" : "egress" }
    }

    public var metadata: ObjectMeta
    public var podSelector: LabelSelector
    public var policyTypes: Set<Direction>
    public var ingress: [Rule]
    public var egress: [Rule]

    public init(metadata: ObjectMeta, podSelector: LabelSelector = .everything,
                policyTypes: Set<Direction>? = nil, ingress: [Rule] = [], egress: [Rule] = []) {
        self.metadata = metadata
        self.podSelector = podSelector
        self.policyTypes = policyTypes ?? (egress.isEmpty ? [.ingress] : [.ingress, .egress])
        self.ingress = ingress
        self.egress = egress
    }

    public func rules(_ direction: Direction) -> [Rule] { direction == .ingress ? ingress : egress }

    /// One ingress (`from`) or egress (`to`) rule.
    public struct Rule: Hashable, Sendable {
        /// Empty: every peer, pods and outside addresses alike.
        public var peers: [Peer]
        /// Empty: every port of every protocol.
        public var ports: [Port]

        public init(peers: [Peer] = [], ports: [Port] = []) {
            self.peers = peers
            self.ports = ports
        }
    }

    public enum Peer: Hashable, Sendable {
        /// podSelector and/or namespaceSelector. nil namespaceSelector: the
        /// policy's own namespace; nil podSelector: every pod of the chosen
        /// namespaces.
        case pods(podSelector: LabelSelector?, namespaceSelector: LabelSelector?)
        case ipBlock(IPBlock)
    }

    public struct IPBlock: Hashable, Sendable {
        public var cidr: IPv4Prefix
        public var except: [IPv4Prefix]

        public init(cidr: IPv4Prefix, except: [IPv4Prefix] = []) {
            self.cidr = cidr
            self.except = except
        }

        public func contains(_ address: IPv4Address) -> Bool {
            cidr.contains(address) && !except.contains { $0.contains(address) }
        }
    }

    public enum PortValue: Hashable, Sendable {
        case number(UInt16)
        case name(String)
    }

    public struct Port: Hashable, Sendable {
        public var transport: TransportProtocol
        /// nil: every port of `transport`.
        public var port: PortValue?
        /// With a numeric port: the last port of the range port...endPort.
        public var endPort: UInt16?

        public init(transport: TransportProtocol = .tcp, port: PortValue? = nil, endPort: UInt16? = nil) {
            self.transport = transport
            self.port = port
            self.endPort = endPort
        }
    }
}

extension NetworkPolicy {
    init(spec node: YAMLNode, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        // Each field is read on its own, so that one mistake does not hide
        // the next.
        var found = ErrorList()
        // podSelector is required by the API (an empty one selects every pod).
        let podSelector = found.attempt { () throws(ManifestError) in
            try LabelSelector(reading: try spec.required("podSelector"), at: location, path: spec.field("podSelector"))
        } ?? .everything  // (only when check() below throws)
        let policyTypes = found.attempt { () throws(ManifestError) in try Self.policyTypes(&spec, at: location) } ?? nil
        let ingress = found.attempt { () throws(ManifestError) in try Self.rules(&spec, "ingress", peerKey: "from", at: location) } ?? []
        let egress = found.attempt { () throws(ManifestError) in try Self.rules(&spec, "egress", peerKey: "to", at: location) } ?? []
        try found.check(finishing: spec)
        self.init(metadata: metadata, podSelector: podSelector, policyTypes: policyTypes,
                  ingress: ingress, egress: egress)
    }

    /// `policyTypes`, nil when absent or empty (defaulted as the API server does).
    private static func policyTypes(_ spec: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> Set<Direction>? {
        guard let types = try spec.list("policyTypes") else { return nil }
        var set = Set<Direction>()
        for (path, typeNode) in types {
            let text = try FieldReader.string(typeNode, at: location, path: path)
            guard let direction = Direction(rawValue: text) else {
                throw ManifestError(location, field: path, "policyTypes entries must be Ingress or Egress, got \(quoted(text))",
                                    line: typeNode.line)
            }
            guard set.insert(direction).inserted else {
                throw ManifestError(location, field: path, "duplicate policy type \(text)", line: typeNode.line)
            }
        }
        return set.isEmpty ? nil : set
    }

    private static func rules(_ spec: inout FieldReader, _ key: String, peerKey: String,
                              at location: DocumentLocation) throws(ManifestError) -> [Rule] {
        var found = ErrorList()
        let rules = found.each(&spec, key) { rulePath, ruleNode throws(ManifestError) in
            var r = try FieldReader(ruleNode, at: location, path: rulePath)
            var inRule = ErrorList()
            let peers = inRule.each(&r, peerKey) { p, n throws(ManifestError) in try peer(n, at: location, path: p) }
            let ports = inRule.each(&r, "ports") { p, n throws(ManifestError) in try port(n, at: location, path: p) }
            try inRule.check(finishing: r)
            return Rule(peers: peers, ports: ports)
        }
        try found.check()
        return rules
    }

    private static func peer(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) -> Peer {
        var p = try FieldReader(node, at: location, path: path)
        let podNode = p.node("podSelector")
        let nsNode = p.node("namespaceSelector")
        let blockNode = p.node("ipBlock")
        try p.finish()
        if let blockNode {
            guard podNode == nil, nsNode == nil else {
                throw ManifestError(location, field: "\(path).ipBlock",
                                    "may not be combined with podSelector or namespaceSelector in one peer", line: blockNode.line)
            }
            return .ipBlock(try ipBlock(blockNode, at: location, path: "\(path).ipBlock"))
        }
        guard podNode != nil || nsNode != nil else {
            throw ManifestError(location, field: path, "must specify a peer: podSelector, namespaceSelector or ipBlock",
                                line: node.line)
        }
        let pods = try podNode.map { n throws(ManifestError) in try LabelSelector(reading: n, at: location, path: "\(path).podSelector") }
        let namespaces = try nsNode.map { n throws(ManifestError) in try LabelSelector(reading: n, at: location, path: "\(path).namespaceSelector") }
        return .pods(podSelector: pods, namespaceSelector: namespaces)
    }

    /// Parses a CIDR the way the API server does: host bits may be set and
    /// are ignored (10.0.0.1/8 means 10.0.0.0/8).
    private static func prefix(_ text: String, at location: DocumentLocation, path: String, line: Int?) throws(ManifestError) -> IPv4Prefix {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let address = IPv4Address(parts[0]), !parts[1].isEmpty,
              parts[1].allSatisfy({ $0.isASCII && $0.isNumber }), let length = Int(parts[1]), (0...32).contains(length) else {
            throw ManifestError(location, field: path, "\(quoted(text)) is not an IPv4 CIDR such as 10.0.0.0/8", line: line)
        }
        return IPv4Prefix(address: address, length: length)
    }

    private static func ipBlock(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) -> IPBlock {
        var b = try FieldReader(node, at: location, path: path)
        // The cidr and every except on its own; an except is checked
        // against the cidr only when the cidr reads clean.
        var found = ErrorList()
        let cidr = found.attempt { () throws(ManifestError) in
            try prefix(try b.requiredString("cidr"), at: location, path: b.field("cidr"), line: node.line)
        }
        let except = found.each(&b, "except") { exceptPath, exceptNode throws(ManifestError) in
            let text = try FieldReader.string(exceptNode, at: location, path: exceptPath)
            let e = try prefix(text, at: location, path: exceptPath, line: exceptNode.line)
            if let cidr, !(e.length > cidr.length && cidr.contains(e.address)) {
                throw ManifestError(location, field: exceptPath, "\(text) must be a strict subset of cidr \(cidr)",
                                    line: exceptNode.line)
            }
            return e
        }
        try found.check(finishing: b)
        guard let cidr else { throw b.error("cidr", "required field is missing") }
        return IPBlock(cidr: cidr, except: except)
    }

    private static func port(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) -> Port {
        var p = try FieldReader(node, at: location, path: path)
        let transport = try Validation.transportProtocol(try p.string("protocol"), field: p.field("protocol"), at: location)
        var value: PortValue?
        if let portNode = p.node("port") {
            if let n = portNode.coreInt {
                value = .number(try Validation.port(n, field: p.field("port"), at: location))
            } else {
                let name = try FieldReader.string(portNode, at: location, path: p.field("port"))
                try Validation.portName(name, field: p.field("port"), at: location)
                value = .name(name)
            }
        }
        var endPort: UInt16?
        if let end = try p.int("endPort") {
            guard case .number(let start) = value else {
                throw p.error("endPort", "may only be set with a numeric port")
            }
            let e = try Validation.port(end, field: p.field("endPort"), at: location)
            guard e >= start else { throw p.error("endPort", "must be at least port (\(start)), got \(e)") }
            endPort = e
        }
        try p.finish()
        return Port(transport: transport, port: value, endPort: endPort)
    }
}
