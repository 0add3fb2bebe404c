/// Everything the policy maps hold on one node: the cluster-wide compiled
/// table plus what is this node's own: its pod cgroups (cgroup id -> pod
/// address) and its addresses (in weft_endpoints as the host identity).
public struct PolicyMapContents: Hashable, Sendable {
    public var endpoints: [IPv4Address: EndpointEntry] = [:]
    public var cgroups: [UInt64: IPv4Address] = [:]
    public var cidrClasses: [IPv4Prefix: UInt32] = [:]
    public var entries: [PolicyEntryKey: UInt32] = [:]

    public init() {}

    public init(_ table: PolicyTable, cgroups: [UInt64: IPv4Address], hostAddresses: [IPv4Address] = []) {
        endpoints = table.endpoints
        // A pod's address wins over a host address (they should never meet).
        for address in hostAddresses where endpoints[address] == nil {
            endpoints[address] = EndpointEntry(identity: ReservedIdentity.host)
        }
        cidrClasses = table.cidrClasses
        entries = table.entries
        self.cgroups = cgroups
    }

    /// This node's mTLS marks on the pod entries: its own pods (and which
    /// of them are STRICT), and the pods elsewhere that its pods reach
    /// through the tunnel (when `tunnels`: this node has identities).
    public mutating func markMTLS(_ state: ClusterState, node: String, tunnels: Bool) {
        for w in state.workloads {
            guard var e = endpoints[w.address] else { continue }
            let mode = state.mtlsMode(w)
            e.local = w.node == node
            e.strict = e.local && mode == .strict
            e.tunnel = !e.local && tunnels && mode != .disable
            endpoints[w.address] = e
        }
    }
}

/// The writes that turn one `PolicyMapContents` into another, in an order
/// that never denies what both the old and the new policy allow: regions and
/// allows are added before pods start to depend on them (a pod's identity or
/// isolation changes only once its new allows are in), and removed only
/// after no pod refers to them.
public struct PolicyMapPlan: Sendable {
    public var putCIDR: [(IPv4Prefix, UInt32)] = []
    public var putEntries: [(PolicyEntryKey, UInt32)] = []
    public var putEndpoints: [(IPv4Address, EndpointEntry)] = []
    public var putCgroups: [(UInt64, IPv4Address)] = []
    public var deleteCgroups: [UInt64] = []
    public var deleteEndpoints: [IPv4Address] = []
    public var deleteEntries: [PolicyEntryKey] = []
    public var deleteCIDR: [IPv4Prefix] = []

    public var count: Int {
        putCIDR.count + putEntries.count + putEndpoints.count + putCgroups.count + deleteCgroups.count
            + deleteEndpoints.count + deleteEntries.count + deleteCIDR.count
    }

    public var isEmpty: Bool { count == 0 }

    public init() {}

    public init(from current: PolicyMapContents, to desired: PolicyMapContents) {
        putCIDR = Self.puts(current.cidrClasses, desired.cidrClasses)
        putEntries = Self.puts(current.entries, desired.entries)
        putEndpoints = Self.puts(current.endpoints, desired.endpoints)
        putCgroups = Self.puts(current.cgroups, desired.cgroups)
        deleteCgroups = current.cgroups.keys.filter { desired.cgroups[$0] == nil }
        deleteEndpoints = current.endpoints.keys.filter { desired.endpoints[$0] == nil }
        deleteEntries = current.entries.keys.filter { desired.entries[$0] == nil }
        deleteCIDR = current.cidrClasses.keys.filter { desired.cidrClasses[$0] == nil }
    }

    private static func puts<K: Hashable, V: Equatable>(_ current: [K: V], _ desired: [K: V]) -> [(K, V)] {
        desired.compactMap { key, value in current[key] == value ? nil : (key, value) }
    }
}
