import WeftABI

/// Identity: one per distinct (namespace, label set) among the Workloads.
/// Pods with the same labels but different service accounts are different
/// identities: AuthorizationPolicy tells them apart by principal.
public struct IdentityKey: Hashable, Sendable, CustomStringConvertible {
    public var namespace: String
    public var labels: [String: String]
    public var serviceAccount: String

    public init(namespace: String, labels: [String: String], serviceAccount: String = "default") {
        self.namespace = namespace
        self.labels = labels
        self.serviceAccount = serviceAccount
    }

    public init(_ w: Workload) {
        self.init(namespace: w.metadata.namespace, labels: w.metadata.labels, serviceAccount: w.serviceAccount)
    }

    public var description: String {
        let l = labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
        return "\(namespace){\(l)}" + (serviceAccount == "default" ? "" : " sa=\(serviceAccount)")
    }
}

/// Reserved identities, as the kernel reads them (weft_abi.h).
public enum ReservedIdentity {
    public static let any = UInt32(WEFT_ID_ANY)
    public static let world = UInt32(WEFT_ID_WORLD)
    public static let host = UInt32(WEFT_ID_HOST)
    public static let firstPod = UInt32(WEFT_ID_FIRST_POD)
    public static let cidrBase = UInt32(WEFT_ID_CIDR_BASE)
}

/// One allow in the kernel's policy maps: the local identity a policy
/// selects may exchange traffic with `peer` in `direction`, for `proto`
/// (nil: any) and the ports under `portPrefix` (nil: any).
public struct PolicyEntryKey: Hashable, Sendable {
    /// What an entry says: a NetworkPolicy allow (in `direction`), or an
    /// AuthorizationPolicy allow or deny (ingress only).
    public enum Kind: Hashable, Sendable { case allow, authzAllow, authzDeny }

    public var identity: UInt32
    public var kind: Kind = .allow
    public var direction: NetworkPolicy.Direction
    public var peer: UInt32
    public var proto: UInt8?
    /// A port and how many of its leading bits must match (1...16).
    public var portPrefix: PortPrefix?

    public struct PortPrefix: Hashable, Sendable {
        public var port: UInt16
        public var bits: UInt8

        public init(port: UInt16, bits: UInt8) {
            self.bits = bits
            self.port = bits == 0 ? 0 : port & ~UInt16(0) << (16 - UInt16(bits))
        }

        public var range: ClosedRange<UInt16> { port...(port | (bits >= 16 ? 0 : ~UInt16(0) >> UInt16(bits))) }

        /// The fewest aligned prefixes that cover first...last exactly
        /// (at most 30 for any range of 16-bit ports).
        public static func cover(_ first: UInt16, _ last: UInt16) -> [PortPrefix] {
            var out: [PortPrefix] = []
            var start = UInt32(first)
            let end = UInt32(last)
            while start <= end {
                // Largest aligned block starting at `start` that stays within `end`.
                var size: UInt32 = start == 0 ? 1 << 16 : start & (~start &+ 1)
                while start + size - 1 > end { size >>= 1 }
                out.append(PortPrefix(port: UInt16(start), bits: UInt8(16 - size.trailingZeroBitCount)))
                start += size
            }
            return out
        }
    }

    public init(identity: UInt32, direction: NetworkPolicy.Direction, peer: UInt32, proto: UInt8? = nil,
                portPrefix: PortPrefix? = nil, kind: Kind = .allow) {
        self.identity = identity
        self.kind = kind
        self.direction = direction
        self.peer = peer
        self.proto = proto
        self.portPrefix = proto == nil ? nil : portPrefix
    }

    /// A port range that needs the range trie (weft_policy_ranges); every
    /// other allow is an exact-match hash entry in weft_policy.
    public var isRange: Bool { (portPrefix?.bits).map { $0 < 16 } ?? false }

    /// Bits the range trie compares (weft_policy_range_key.prefixlen); only
    /// range allows (`isRange`) go there, and they always name a protocol.
    public var prefixLength: UInt32 { UInt32(WEFT_POLICY_PREFIX_ANY_PORT) + UInt32(portPrefix?.bits ?? 0) }
}

/// One pod's row in weft_endpoints.
public struct EndpointEntry: Hashable, Sendable {
    public var identity: UInt32
    /// The CIDR class of the pod's address (0: none), precomputed so that
    /// the kernel needs no LPM lookup for pod peers.
    public var cidrClass: UInt32
    public var ingressIsolated: Bool
    public var egressIsolated: Bool
    /// Whether the identity has port-range allows in each direction (the
    /// kernel consults the range trie only then).
    public var ingressRanges: Bool
    public var egressRanges: Bool
    /// Node-specific marks, set by the agent (not by the policy compiler):
    /// a pod on another node reached through the mTLS tunnel; a pod of
    /// this node under STRICT mTLS; a pod of this node.
    public var tunnel = false
    public var strict = false
    public var local = false
    /// AuthorizationPolicy applies: set by the policy compiler.
    public var authz = false

    public init(identity: UInt32, cidrClass: UInt32 = 0, ingressIsolated: Bool = false, egressIsolated: Bool = false,
                ingressRanges: Bool = false, egressRanges: Bool = false) {
        self.identity = identity
        self.cidrClass = cidrClass
        self.ingressIsolated = ingressIsolated
        self.egressIsolated = egressIsolated
        self.ingressRanges = ingressRanges
        self.egressRanges = egressRanges
    }

    public func isolated(_ direction: NetworkPolicy.Direction) -> Bool {
        direction == .ingress ? ingressIsolated : egressIsolated
    }

    public var flags: UInt8 {
        (ingressIsolated ? UInt8(WEFT_EP_F_INGRESS_ISOLATED) : 0) | (egressIsolated ? UInt8(WEFT_EP_F_EGRESS_ISOLATED) : 0)
            | (ingressRanges ? UInt8(WEFT_EP_F_INGRESS_RANGES) : 0) | (egressRanges ? UInt8(WEFT_EP_F_EGRESS_RANGES) : 0)
            | (tunnel ? UInt8(WEFT_EP_F_TUNNEL) : 0) | (strict ? UInt8(WEFT_EP_F_MTLS_STRICT) : 0) | (local ? UInt8(WEFT_EP_F_LOCAL) : 0)
            | (authz ? UInt8(WEFT_EP_F_AUTHZ) : 0)
    }

    public init(identity: UInt32, cidrClass: UInt32, flags: UInt8) {
        self.init(identity: identity, cidrClass: cidrClass, ingressIsolated: flags & UInt8(WEFT_EP_F_INGRESS_ISOLATED) != 0,
                  egressIsolated: flags & UInt8(WEFT_EP_F_EGRESS_ISOLATED) != 0,
                  ingressRanges: flags & UInt8(WEFT_EP_F_INGRESS_RANGES) != 0,
                  egressRanges: flags & UInt8(WEFT_EP_F_EGRESS_RANGES) != 0)
        tunnel = flags & UInt8(WEFT_EP_F_TUNNEL) != 0
        strict = flags & UInt8(WEFT_EP_F_MTLS_STRICT) != 0
        local = flags & UInt8(WEFT_EP_F_LOCAL) != 0
        authz = flags & UInt8(WEFT_EP_F_AUTHZ) != 0
    }
}

/// Names a compiled rule: which policy, which direction, which rule.
public struct RuleRef: Hashable, Sendable, Codable, CustomStringConvertible {
    public var policy: String      // namespace/name
    public var direction: String   // Ingress / Egress
    public var index: Int

    public var description: String {
        direction == Self.authorization ? "AuthorizationPolicy \(policy) spec.rules[\(index)]"
            : "NetworkPolicy \(policy) spec.\(direction.lowercased())[\(index)]"
    }

    /// `direction` of a rule that is an AuthorizationPolicy's.
    public static let authorization = "Authorization"
}

/// The compiled form of every NetworkPolicy: exactly what the policy maps
/// hold (apart from weft_cgroups, which is per node).
public struct PolicyTable: Hashable, Sendable {
    public var endpoints: [IPv4Address: EndpointEntry] = [:]
    /// ipBlock regions: prefix -> CIDR class id (0: a hole cut by `except`).
    public var cidrClasses: [IPv4Prefix: UInt32] = [:]
    /// Allow entries -> the id of the rule that produced them (lowest wins).
    public var entries: [PolicyEntryKey: UInt32] = [:]

    // Names for people; not in the kernel.
    public var rules: [UInt32: RuleRef] = [:]
    public var identities: [UInt32: IdentityKey] = [:]
    /// Per identity and direction: the policies that isolate it.
    public var isolatedBy: [UInt32: [String: [String]]] = [:]

    public init() {}
}
