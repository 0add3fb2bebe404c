/// Compiles NetworkPolicies into a `PolicyTable`: identities for pods, CIDR
/// classes for ipBlocks, and allow entries keyed the way the kernel looks
/// them up, so a decision never scans rules.
///
/// Keeps its id allocations between runs (ids stay stable while their keys
/// live) and each policy's compiled entries: when the identities, namespace
/// labels and ipBlock regions are unchanged, only changed policies are
/// compiled again.
public struct PolicyCompiler: Sendable {
    public private(set) var identityIDs = StableIDs<IdentityKey>(first: ReservedIdentity.firstPod)
    private var classIDs = StableIDs<Set<NetworkPolicy.IPBlock>>(first: 1)
    var ruleIDs = StableIDs<String>(first: 1)
    /// The mesh's trust domain, for AuthorizationPolicy principals (nil: no
    /// CA, so no principal matches).
    public var trustDomain: String?
    /// The node whose kernel the table is for: its pods are the sources the
    /// kernel knows by identity (AuthorizationPolicy). nil: every node's.
    public var node: String?
    private var cache: [NetworkPolicy: CompiledPolicy] = [:]
    private var cachedUniverse: Universe?

    /// What compiled policies depend on besides themselves.
    struct Universe: Equatable {
        var identities: [IdentityKey: UInt32]
        var namedPorts: [UInt32: [WorkloadPort]]
        var addresses: [UInt32: Set<IPv4Address>]
        var namespaces: [String: [String: String]]
        var classes: [IPv4Prefix: UInt32]
    }

    struct CompiledPolicy {
        var entries: [PolicyEntryKey: UInt32]
        var isolates: [(UInt32, NetworkPolicy.Direction)]
        var rules: [UInt32: RuleRef]
    }

    public init() {}

    /// Reuses the ids found in the kernel after a restart — identities from
    /// weft_endpoints, CIDR classes from weft_cidr_classes — so an agent that
    /// comes back to an unchanged config rewrites nothing.
    public mutating func adopt(endpoints: [IPv4Address: EndpointEntry], cidrClasses: [IPv4Prefix: UInt32] = [:],
                               state: ClusterState) {
        let byAddress = Dictionary(state.workloads.map { ($0.address, $0) }, uniquingKeysWith: { a, _ in a })
        for (address, entry) in endpoints {
            guard let w = byAddress[address] else { continue }
            identityIDs.adopt(IdentityKey(w), entry.identity)
        }
        guard !cidrClasses.isEmpty else { return }
        for (prefix, set) in Self.regions(Self.blocks(state)) where !set.isEmpty {
            if let id = cidrClasses[prefix], id > ReservedIdentity.cidrBase {
                classIDs.adopt(set, id - ReservedIdentity.cidrBase)
            }
        }
    }

    static func blocks(_ state: ClusterState) -> Set<NetworkPolicy.IPBlock> {
        var blocks = authorizationBlocks(state)
        for p in state.networkPolicies {
            for rule in p.ingress + p.egress {
                for case .ipBlock(let b) in rule.peers { blocks.insert(b) }
            }
        }
        return blocks
    }

    /// How many policies the last `compile` actually compiled (the rest came from cache).
    public private(set) var lastCompiledPolicies = 0

    public mutating func compile(_ state: ClusterState) -> PolicyTable {
        var table = PolicyTable()

        // Identities, with the named ports their pods declare.
        var members: [UInt32: [Workload]] = [:]
        let keyOf = state.workloads.map(IdentityKey.init)
        identityIDs.retain(Set(keyOf))
        var idOf: [UInt32] = []
        idOf.reserveCapacity(keyOf.count)
        for (w, key) in zip(state.workloads, keyOf) {
            let id = identityIDs.id(for: key)
            idOf.append(id)
            members[id, default: []].append(w)
            table.identities[id] = key
        }
        // No policy at all: every pod is open, and only the identity cache
        // is written (the common case for Service-only changes at scale).
        if state.networkPolicies.isEmpty && state.authorizationPolicies.isEmpty {
            cache = [:]
            cachedUniverse = nil
            ruleIDs.retain([])
            classIDs.retain([])
            lastCompiledPolicies = 0
            for (w, id) in zip(state.workloads, idOf) { table.endpoints[w.address] = EndpointEntry(identity: id) }
            return table
        }

        // CIDR classes over every ipBlock in every policy, allocated in
        // prefix order so that the same config gives the same ids.
        let regions = Self.regions(Self.blocks(state))
        classIDs.retain(Set(regions.values.filter { !$0.isEmpty }))
        for (prefix, set) in regions.sorted(by: { ($0.key.address, $0.key.length) < ($1.key.address, $1.key.length) }) {
            table.cidrClasses[prefix] = set.isEmpty ? 0 : ReservedIdentity.cidrBase + classIDs.id(for: set)
        }
        var classesOf: [NetworkPolicy.IPBlock: [UInt32]] = [:]
        for (prefix, set) in regions {
            guard let id = table.cidrClasses[prefix], id != 0 else { continue }
            for b in set where !(classesOf[b]?.contains(id) ?? false) { classesOf[b, default: []].append(id) }
        }

        var namespaces: [String: [String: String]] = [:]
        for ns in Set(state.workloads.map(\.metadata.namespace)).union(state.networkPolicies.map(\.metadata.namespace)) {
            namespaces[ns] = state.namespace(ns).labels
        }
        let universe = Universe(identities: identityIDs.ids, namedPorts: members.mapValues { $0.flatMap(\.ports) },
                                addresses: members.mapValues { Set($0.map(\.address)) },
                                namespaces: namespaces, classes: table.cidrClasses)
        if let old = cachedUniverse, old != universe {
            invalidate(from: old, to: universe)
        }
        cachedUniverse = universe
        var classesOfIdentity: [UInt32: Set<UInt32>] = [:]
        for (id, pods) in members {
            classesOfIdentity[id] = Set(pods.compactMap { Self.longestMatch($0.address, table.cidrClasses) }.filter { $0 != 0 })
        }
        let context = Context(identities: table.identities, members: members, namespaces: namespaces,
                              classesOf: classesOf, classesOfIdentity: classesOfIdentity)

        ruleIDs.retain(Set(state.networkPolicies.flatMap { p in
            NetworkPolicy.Direction.allCases.flatMap { d in p.rules(d).indices.map { Self.ruleName(p, d, $0) } }
        } + state.authorizationPolicies.flatMap { p in p.rules.indices.map { "authz/\(p.metadata.qualifiedName)/\($0)" } }))
        var compiledNow = 0
        var fresh: [NetworkPolicy: CompiledPolicy] = [:]
        for policy in state.networkPolicies {
            let compiled: CompiledPolicy
            if let c = cache[policy] {
                compiled = c
            } else {
                compiled = compile(policy, context)
                compiledNow += 1
            }
            fresh[policy] = compiled
            for (key, rule) in compiled.entries {
                if let have = table.entries[key], have <= rule { continue }
                table.entries[key] = rule
            }
            for (id, direction) in compiled.isolates {
                table.isolatedBy[id, default: [:]][direction.rawValue, default: []].append(policy.metadata.qualifiedName)
            }
            table.rules.merge(compiled.rules) { a, _ in a }
        }
        cache = fresh
        lastCompiledPolicies = compiledNow

        var ranges = Set<String>()  // "identity/direction" with range allows
        for key in table.entries.keys where key.isRange && key.kind == .allow {
            ranges.insert("\(key.identity)/\(key.direction.rawValue)")
        }
        for (w, id) in zip(state.workloads, idOf) {
            let by = table.isolatedBy[id]
            table.endpoints[w.address] = EndpointEntry(identity: id, cidrClass: Self.longestMatch(w.address, table.cidrClasses) ?? 0,
                                                       ingressIsolated: by?["Ingress"] != nil,
                                                       egressIsolated: by?["Egress"] != nil,
                                                       ingressRanges: ranges.contains("\(id)/Ingress"),
                                                       egressRanges: ranges.contains("\(id)/Egress"))
        }
        var classBlocks: [UInt32: Set<NetworkPolicy.IPBlock>] = [:]
        for (prefix, set) in regions { if let id = table.cidrClasses[prefix], id != 0 { classBlocks[id] = set } }
        compileAuthorization(state, into: &table, members: members, classBlocks: classBlocks)
        return table
    }

    /// Drops the cached output of every policy that the change from `old`
    /// to `new` can affect: one that selects or names an identity that came,
    /// went or changed (its pods' named ports or addresses), one with
    /// namespaceSelectors when namespace labels changed, one with ipBlocks
    /// when the regions changed. The rest stay compiled.
    private mutating func invalidate(from old: Universe, to new: Universe) {
        let classesChanged = old.classes != new.classes
        let namespacesChanged = old.namespaces != new.namespaces
        let oldByID = Dictionary(old.identities.map { ($0.value, $0.key) }, uniquingKeysWith: { a, _ in a })
        let newByID = Dictionary(new.identities.map { ($0.value, $0.key) }, uniquingKeysWith: { a, _ in a })
        var touched: [IdentityKey] = []
        for id in Set(oldByID.keys).union(newByID.keys)
        where oldByID[id] != newByID[id] || old.namedPorts[id] != new.namedPorts[id] || old.addresses[id] != new.addresses[id] {
            touched += [oldByID[id], newByID[id]].compactMap { $0 }
        }
        cache = cache.filter { policy, _ in
            let rules = policy.ingress + policy.egress
            let hasBlocks = rules.contains { $0.peers.contains { if case .ipBlock = $0 { true } else { false } } }
            let hasNamespaceSelectors = rules.contains {
                $0.peers.contains { if case .pods(_, let ns?) = $0 { _ = ns; return true } else { return false } }
            }
            if classesChanged && hasBlocks { return false }
            if namespacesChanged && hasNamespaceSelectors { return false }
            return !touched.contains { Self.touches(policy, $0, namespaces: new.namespaces) }
        }
    }

    /// Whether `policy`'s compiled entries can mention `key`'s identity.
    static func touches(_ policy: NetworkPolicy, _ key: IdentityKey, namespaces: [String: [String: String]]) -> Bool {
        let ns = policy.metadata.namespace
        if key.namespace == ns && policy.podSelector.matches(key.labels) { return true }
        for rule in policy.egress {
            // Named egress ports toward anyone or an ipBlock expand over every identity.
            let named = rule.ports.contains { if case .name = $0.port { true } else { false } }
            let broad = rule.peers.isEmpty || rule.peers.contains { if case .ipBlock = $0 { true } else { false } }
            if named && broad { return true }
        }
        for rule in policy.ingress + policy.egress {
            for case .pods(let podSelector, let namespaceSelector) in rule.peers {
                let nsOK = namespaceSelector.map { $0.matches(namespaces[key.namespace] ?? Namespace(name: key.namespace).labels) }
                    ?? (key.namespace == ns)
                if nsOK && (podSelector?.matches(key.labels) ?? true) { return true }
            }
        }
        return false
    }

    static func ruleName(_ p: NetworkPolicy, _ d: NetworkPolicy.Direction, _ i: Int) -> String {
        "\(p.metadata.qualifiedName)/\(d.rawValue)/\(i)"
    }

    struct Context {
        var identities: [UInt32: IdentityKey]
        var members: [UInt32: [Workload]]
        var namespaces: [String: [String: String]]
        var classesOf: [NetworkPolicy.IPBlock: [UInt32]]
        /// Per pod identity, the CIDR classes its pods' addresses fall in.
        var classesOfIdentity: [UInt32: Set<UInt32>]
    }

    private mutating func compile(_ policy: NetworkPolicy, _ c: Context) -> CompiledPolicy {
        var out = CompiledPolicy(entries: [:], isolates: [], rules: [:])
        let ns = policy.metadata.namespace
        let selected = c.identities.filter { $0.value.namespace == ns && policy.podSelector.matches($0.value.labels) }
            .keys.sorted()
        for direction in NetworkPolicy.Direction.allCases where policy.policyTypes.contains(direction) {
            out.isolates += selected.map { ($0, direction) }
            for (index, rule) in policy.rules(direction).enumerated() {
                let ruleID = ruleIDs.id(for: Self.ruleName(policy, direction, index))
                out.rules[ruleID] = RuleRef(policy: policy.metadata.qualifiedName, direction: direction.rawValue, index: index)
                // Peers: identities and CIDR classes, or anyone.
                var peers: [UInt32] = []
                var podPeers: [UInt32] = []
                if rule.peers.isEmpty {
                    peers = [ReservedIdentity.any]
                } else {
                    for peer in rule.peers {
                        switch peer {
                        case .pods(let podSelector, let namespaceSelector):
                            for (id, key) in c.identities {
                                let nsOK = namespaceSelector.map { $0.matches(c.namespaces[key.namespace] ?? [:]) }
                                    ?? (key.namespace == ns)
                                if nsOK && (podSelector?.matches(key.labels) ?? true) { podPeers.append(id) }
                            }
                        case .ipBlock(let block):
                            peers += c.classesOf[block] ?? []
                        }
                    }
                    peers += podPeers
                }
                let uniquePeers = Set(peers)
                for local in selected {
                    for peer in uniquePeers {
                        for (entryPeer, proto, prefix) in allows(rule.ports, direction: direction, local: local,
                                                                  peer: peer, c) {
                            let key = PolicyEntryKey(identity: local, direction: direction, peer: entryPeer, proto: proto,
                                                     portPrefix: prefix)
                            if let have = out.entries[key], have <= ruleID { continue }
                            out.entries[key] = ruleID
                        }
                    }
                }
            }
        }
        return out
    }

    /// The (peer, protocol, port prefix) allows of one rule for one selected
    /// identity and one peer. A named port means the number the destination
    /// pod gives that name: on ingress the selected pod itself, on egress the
    /// peer pod. An egress peer that is not one identity (anyone, or an
    /// ipBlock region) is expanded into the pod identities it covers that
    /// declare the name; an address that is no pod has no named ports.
    private func allows(_ ports: [NetworkPolicy.Port], direction: NetworkPolicy.Direction, local: UInt32, peer: UInt32,
                        _ c: Context) -> [(UInt32, UInt8?, PolicyEntryKey.PortPrefix?)] {
        guard !ports.isEmpty else { return [(peer, nil, nil)] }
        var out: [(UInt32, UInt8?, PolicyEntryKey.PortPrefix?)] = []
        func named(_ owner: UInt32, _ name: String, _ transport: TransportProtocol) -> [UInt16] {
            Set((c.members[owner] ?? []).flatMap(\.ports).filter { $0.name == name && $0.transport == transport }.map(\.port)).sorted()
        }
        for port in ports {
            let proto = port.transport.ipProtocol
            switch port.port {
            case nil:
                out.append((peer, proto, nil))
            case .number(let n)?:
                out += PolicyEntryKey.PortPrefix.cover(n, port.endPort ?? n).map { (peer, proto, $0) }
            case .name(let name)?:
                let owners: [UInt32]
                if direction == .ingress || c.members[peer] != nil {
                    owners = direction == .ingress ? [local] : [peer]
                    for n in owners.flatMap({ named($0, name, port.transport) }) {
                        out.append((peer, proto, .init(port: n, bits: 16)))
                    }
                } else {
                    for (q, classes) in c.classesOfIdentity where peer == ReservedIdentity.any || classes.contains(peer) {
                        for n in named(q, name, port.transport) { out.append((q, proto, .init(port: n, bits: 16))) }
                    }
                }
            }
        }
        return out
    }

    /// The value of the longest prefix holding `address`, as an LPM trie answers.
    public static func longestMatch<V>(_ address: IPv4Address, _ prefixes: [IPv4Prefix: V]) -> V? {
        guard !prefixes.isEmpty else { return nil }
        for length in stride(from: 32, through: 0, by: -1) {
            if let v = prefixes[IPv4Prefix(address: address, length: length)] { return v }
        }
        return nil
    }

    /// Splits the address space by every ipBlock's cidr and excepts. Each
    /// prefix that appears maps to the set of blocks holding the addresses
    /// whose longest matching prefix it is (empty: a hole an `except` cut).
    /// Prefixes nest or are disjoint, so for an address whose longest match
    /// is p, a block holds it exactly when its cidr contains p and none of
    /// its excepts do.
    static func regions(_ blocks: Set<NetworkPolicy.IPBlock>) -> [IPv4Prefix: Set<NetworkPolicy.IPBlock>] {
        var byCIDR: [IPv4Prefix: [NetworkPolicy.IPBlock]] = [:]
        var prefixes = Set<IPv4Prefix>()
        for b in blocks {
            byCIDR[b.cidr, default: []].append(b)
            prefixes.insert(b.cidr)
            prefixes.formUnion(b.except)
        }
        var out: [IPv4Prefix: Set<NetworkPolicy.IPBlock>] = [:]
        for p in prefixes {
            var set = Set<NetworkPolicy.IPBlock>()
            for length in 0...p.length {
                for b in byCIDR[IPv4Prefix(address: p.address, length: length)] ?? []
                where !b.except.contains(where: { $0.length <= p.length && $0.contains(p.address) }) {
                    set.insert(b)
                }
            }
            out[p] = set
        }
        return out
    }
}
