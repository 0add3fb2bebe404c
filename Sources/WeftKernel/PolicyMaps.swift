import CLibbpf
import Glibc
import WeftABI
import WeftCore

/// The policy maps (weft_abi.h, "L4 policy"), read and written in WeftCore's
/// terms. An allow goes to the hash weft_policy, or — a port range — to the
/// trie weft_policy_ranges. `allowingRule` walks them exactly as
/// bpf/lib/policy.h does, so `weft policy check` answers from what the kernel
/// enforces, not from a second reading of the manifests.
public final class PolicyMaps: Sendable {
    public let endpoints: BPFMap<UInt32, weft_endpoint>
    public let cgroups: BPFMap<UInt64, weft_cgroup_endpoint>
    public let cidrClasses: BPFMap<weft_cidr_key, weft_cidr_class>
    public let policy: BPFMap<weft_policy_key, weft_policy_value>
    public let ranges: BPFMap<weft_policy_range_key, weft_policy_value>
    public let drops: BPFMap<weft_drop_key, UInt64>
    private let config: BPFMap<UInt32, weft_policy_config>
    private let cpus: Int

    public init(pinDirectory: String) throws(KernelError) {
        let dir = Datapath.mapDirectory(pinDirectory)
        endpoints = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ENDPOINTS)")
        cgroups = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_CGROUPS)")
        cidrClasses = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_CIDR_CLASSES)")
        policy = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_POLICY)")
        ranges = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_POLICY_RANGES)")
        drops = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_POLICY_DROPS)")
        config = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_POLICY_CONFIG)")
        cpus = max(Int(libbpf_num_possible_cpus()), 1)
    }

    /// How long the kernel remembers an allowed UDP exchange after its last
    /// datagram (MeshConfig policy.udpIdleTimeout).
    public func udpIdleTimeout() throws(KernelError) -> Duration {
        let ns = (try config.lookup(0))?.udp_idle_ns ?? 0
        return .nanoseconds(Int64(clamping: ns == 0 ? UInt64(WEFT_UDP_IDLE_DEFAULT_NS) : ns))
    }

    /// Sets it for every exchange from now on, remembered ones included;
    /// returns whether it changed.
    @discardableResult
    public func setUDPIdleTimeout(_ timeout: Duration) throws(KernelError) -> Bool {
        guard try udpIdleTimeout() != timeout else { return false }
        let ns = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
        try config.update(0, weft_policy_config(udp_idle_ns: UInt64(max(ns, 1))))
        return true
    }

    // MARK: encoding, in one place

    static func direction(_ k: PolicyEntryKey) -> UInt8 {
        switch k.kind {
        case .allow: UInt8(k.direction == .ingress ? WEFT_DIR_INGRESS.rawValue : WEFT_DIR_EGRESS.rawValue)
        case .authzAllow: UInt8(WEFT_DIR_AUTHZ_ALLOW.rawValue)
        case .authzDeny: UInt8(WEFT_DIR_AUTHZ_DENY.rawValue)
        }
    }

    static func direction(_ raw: UInt8) -> (NetworkPolicy.Direction, PolicyEntryKey.Kind) {
        switch UInt32(raw) {
        case WEFT_DIR_EGRESS.rawValue: (.egress, .allow)
        case WEFT_DIR_AUTHZ_ALLOW.rawValue: (.ingress, .authzAllow)
        case WEFT_DIR_AUTHZ_DENY.rawValue: (.ingress, .authzDeny)
        default: (.ingress, .allow)
        }
    }

    /// A non-range allow as its hash key (protocol 0: any; port 0: any).
    static func encode(_ k: PolicyEntryKey) -> weft_policy_key {
        var key = weft_policy_key()
        key.identity = k.identity
        key.peer = k.peer
        key.direction = direction(k)
        key.proto = k.proto ?? 0
        key.port = (k.portPrefix?.port ?? 0).bigEndian
        return key
    }

    static func decode(_ key: weft_policy_key) -> PolicyEntryKey {
        let (d, kind) = direction(key.direction)
        return PolicyEntryKey(identity: key.identity, direction: d, peer: key.peer,
                              proto: key.proto == 0 ? nil : key.proto,
                              portPrefix: key.port == 0 ? nil : .init(port: UInt16(bigEndian: key.port), bits: 16), kind: kind)
    }

    static func encodeRange(_ k: PolicyEntryKey) -> weft_policy_range_key {
        var key = weft_policy_range_key()
        key.prefixlen = k.prefixLength
        key.identity = k.identity.bigEndian
        key.direction = direction(k)
        key.peer = k.peer.bigEndian
        key.proto = k.proto ?? 0
        key.port = (k.portPrefix?.port ?? 0).bigEndian
        return key
    }

    static func decodeRange(_ key: weft_policy_range_key) -> PolicyEntryKey? {
        let anyPort = UInt32(WEFT_POLICY_PREFIX_ANY_PORT)
        guard (anyPort + 1...anyPort + 15).contains(key.prefixlen) else { return nil }
        let (d, kind) = direction(key.direction)
        return PolicyEntryKey(identity: UInt32(bigEndian: key.identity), direction: d,
                              peer: UInt32(bigEndian: key.peer), proto: key.proto,
                              portPrefix: .init(port: UInt16(bigEndian: key.port), bits: UInt8(key.prefixlen - anyPort)), kind: kind)
    }

    static func encode(_ p: IPv4Prefix) -> weft_cidr_key {
        var key = weft_cidr_key()
        key.prefixlen = UInt32(p.length)
        key.addr = p.address.networkOrder
        return key
    }

    static func encode(_ e: EndpointEntry) -> weft_endpoint {
        var v = weft_endpoint()
        v.identity = e.identity
        v.cidr_class = e.cidrClass
        v.flags = e.flags
        return v
    }

    // MARK: reading and writing

    /// What the kernel holds now.
    public func snapshot() throws(KernelError) -> PolicyMapContents {
        var c = PolicyMapContents()
        for (addr, ep) in try endpoints.entries() {
            c.endpoints[IPv4Address(networkOrder: addr)] = EndpointEntry(identity: ep.identity, cidrClass: ep.cidr_class, flags: ep.flags)
        }
        for (id, cg) in try cgroups.entries() { c.cgroups[id] = IPv4Address(networkOrder: cg.addr) }
        for (key, value) in try cidrClasses.entries() {
            c.cidrClasses[IPv4Prefix(address: IPv4Address(networkOrder: key.addr), length: Int(key.prefixlen))] = value.id
        }
        for (key, value) in try policy.entries() { c.entries[Self.decode(key)] = value.rule_id }
        for (key, value) in try ranges.entries() {
            if let k = Self.decodeRange(key) { c.entries[k] = value.rule_id }
        }
        return c
    }

    /// Carries out a plan: allows before the regions that lead to them,
    /// both before the pods that use them; removals in the reverse order.
    /// (LPM tries have no batch update: one call per entry there.)
    public func apply(_ plan: PolicyMapPlan) throws(KernelError) {
        var keys: [weft_policy_key] = [], values: [weft_policy_value] = []
        for (k, rule) in plan.putEntries {
            var v = weft_policy_value()
            v.rule_id = rule
            if k.isRange {
                try ranges.update(Self.encodeRange(k), v)
            } else {
                keys.append(Self.encode(k))
                values.append(v)
            }
        }
        if !keys.isEmpty { try policy.updateBatch(keys, values) }
        for (p, id) in plan.putCIDR {
            var v = weft_cidr_class()
            v.id = id
            try cidrClasses.update(Self.encode(p), v)
        }
        if !plan.putEndpoints.isEmpty {
            try endpoints.updateBatch(plan.putEndpoints.map { $0.0.networkOrder }, plan.putEndpoints.map { Self.encode($0.1) })
        }
        for (id, addr) in plan.putCgroups {
            var v = weft_cgroup_endpoint()
            v.addr = addr.networkOrder
            try cgroups.update(id, v)
        }
        for id in plan.deleteCgroups { try cgroups.delete(id) }
        for addr in plan.deleteEndpoints { try endpoints.delete(addr.networkOrder) }
        for p in plan.deleteCIDR { try cidrClasses.delete(Self.encode(p)) }
        for k in plan.deleteEntries {
            if k.isRange { try ranges.delete(Self.encodeRange(k)) } else { try policy.delete(Self.encode(k)) }
        }
    }

    // MARK: deciding, as bpf/lib/policy.h does

    public struct Peer: Sendable {
        public var identity: UInt32
        public var cidrClass: UInt32
    }

    public func endpoint(_ address: IPv4Address) throws(KernelError) -> EndpointEntry? {
        try endpoints.lookup(address.networkOrder).map { EndpointEntry(identity: $0.identity, cidrClass: $0.cidr_class, flags: $0.flags) }
    }

    public func peer(_ address: IPv4Address) throws(KernelError) -> Peer {
        if let ep = try endpoint(address) { return Peer(identity: ep.identity, cidrClass: ep.cidrClass) }
        var key = weft_cidr_key()
        key.prefixlen = 32
        key.addr = address.networkOrder
        let cls = try cidrClasses.lookup(key)
        return Peer(identity: ReservedIdentity.world, cidrClass: cls?.id ?? 0)
    }

    /// The rule id that allows, or nil: per peer (identity, CIDR class, any
    /// peer), the exact port, any port of the protocol, any protocol, then
    /// the range trie when the identity has ranges in that direction.
    public func allowingRule(local: EndpointEntry, direction: NetworkPolicy.Direction, peer: Peer,
                             proto: UInt8, port: UInt16) throws(KernelError) -> UInt32? {
        let hasRanges = direction == .ingress ? local.ingressRanges : local.egressRanges
        let peers = [peer.identity] + (peer.cidrClass != 0 ? [peer.cidrClass] : []) + [ReservedIdentity.any]
        return try firstRule(identity: local.identity, direction: direction, kind: .allow, peers: peers, proto: proto, port: port,
                             ranges: hasRanges)
    }

    /// policy_allows_peer in bpf/lib/policy.h, over `peers` in order: the
    /// rule id of the first entry of `kind` that matches.
    private func firstRule(identity: UInt32, direction: NetworkPolicy.Direction, kind: PolicyEntryKey.Kind, peers: [UInt32],
                           proto: UInt8, port: UInt16, ranges hasRanges: Bool) throws(KernelError) -> UInt32? {
        for p in peers {
            let exact = PolicyEntryKey(identity: identity, direction: direction, peer: p, proto: proto,
                                       portPrefix: .init(port: port, bits: 16), kind: kind)
            let probes: [PolicyEntryKey] = [
                exact,
                .init(identity: identity, direction: direction, peer: p, proto: proto, kind: kind),
                .init(identity: identity, direction: direction, peer: p, kind: kind),
            ]
            for k in probes {
                if let v = try policy.lookup(Self.encode(k)) { return v.rule_id }
            }
            if hasRanges {
                var key = Self.encodeRange(exact)
                key.prefixlen = UInt32(WEFT_POLICY_PREFIX_FULL)
                if let v = try ranges.lookup(key) { return v.rule_id }
            }
        }
        return nil
    }

    /// authz_verdict in bpf/lib/policy.h: whether a new plaintext TCP flow
    /// from `source` to the pod `local` (flagged for AuthorizationPolicy)
    /// passes, and the rule that decided (a DENY's, or an ALLOW's; nil when
    /// no ALLOW matched, or the node's own address passed).
    public func authorization(local: EndpointEntry, source: IPv4Address, port: UInt16) throws(KernelError) -> (allowed: Bool, rule: UInt32?) {
        guard local.authz else { return (true, nil) }
        let src = try endpoint(source)
        if src?.identity == ReservedIdentity.host { return (true, nil) }
        var peer = ReservedIdentity.world
        if let src {
            peer = src.local ? src.identity : (src.cidrClass != 0 ? src.cidrClass : ReservedIdentity.world)
        } else {
            let cls = try self.peer(source).cidrClass
            if cls != 0 { peer = cls }
        }
        for (kind, allowed) in [(PolicyEntryKey.Kind.authzDeny, false), (.authzAllow, true)] {
            if let rule = try firstRule(identity: local.identity, direction: .ingress, kind: kind, peers: [peer, ReservedIdentity.any],
                                        proto: 6, port: port, ranges: true) {
                return (allowed, rule)
            }
        }
        return (false, nil)
    }

    /// What connect4 would decide for `source` (a local pod's address)
    /// connecting to `destination`: its egress policy, then the
    /// destination's ingress policy (policy_connect_verdict in
    /// bpf/lib/policy.h). The node proxy asks this before it connects on a
    /// pod's behalf, so that a captured connection gets no more than the pod
    /// would have got by itself. Returns nil to allow, or the drop reason.
    ///
    /// `via`: the connection will really come from this address of the
    /// node (the proxy's own socket) and reach a pod on another node, whose
    /// ingress hook sees that address, not the pod's. It must admit it too,
    /// or the SYN would be dropped there and the connect would hang.
    public func connectVerdict(source: IPv4Address, destination: IPv4Address, port: UInt16,
                               proto: UInt8 = 6, via: IPv4Address? = nil) throws(KernelError) -> weft_drop_reason? {
        if destination == source || destination.value >> 24 == 127 { return nil }
        guard let src = try endpoint(source) else { return nil }
        let dst = try endpoint(destination)
        if src.isolated(.egress) {
            let peer: Peer
            if let dst { peer = Peer(identity: dst.identity, cidrClass: dst.cidrClass) } else { peer = try self.peer(destination) }
            if peer.identity != ReservedIdentity.host,
               try allowingRule(local: src, direction: .egress, peer: peer, proto: proto, port: port) == nil {
                return WEFT_DROP_EGRESS
            }
        }
        if let dst, dst.isolated(.ingress) {
            let peer = Peer(identity: src.identity, cidrClass: src.cidrClass)
            if try allowingRule(local: dst, direction: .ingress, peer: peer, proto: proto, port: port) == nil {
                return WEFT_DROP_INGRESS_AT_SOURCE
            }
            if let via {
                // On the other node this address is no pod and not its host.
                var key = weft_cidr_key()
                key.prefixlen = 32
                key.addr = via.networkOrder
                let node = Peer(identity: ReservedIdentity.world, cidrClass: try cidrClasses.lookup(key)?.id ?? 0)
                if try allowingRule(local: dst, direction: .ingress, peer: node, proto: proto, port: port) == nil {
                    return WEFT_DROP_INGRESS
                }
            }
        }
        return nil
    }

    /// Drop counters summed over CPUs.
    public func dropCounts() throws(KernelError) -> [(key: weft_drop_key, count: UInt64)] {
        var out: [(weft_drop_key, UInt64)] = []
        for key in try drops.keys() {
            // A key the LRU evicted between the walk and the read is skipped.
            if let sum = try perCPUSum(fd: drops.fd, key: key, cpus: cpus, path: drops.path) { out.append((key, sum)) }
        }
        return out
    }
}
