import WeftABI

/// The parts of AuthorizationPolicies that need only identities and ports,
/// compiled into the kernel's policy maps (weft_abi.h, WEFT_DIR_AUTHZ_*).
///
/// The kernel judges what reaches a pod without passing a proxy: plaintext
/// from a pod of the same node, whose identity the node attests, and
/// plaintext from elsewhere, known only by its address. So a peer here is
/// a pod identity (for sources on the pod's own node) or a CIDR class or
/// WORLD (for the rest: no principal, no namespace). What the kernel cannot
/// see is judged the safe way: an ALLOW rule that reads HTTP matches
/// nothing in the kernel, a DENY rule's HTTP parts are ignored (it denies
/// on the rest), as Istio's ztunnel does. Where one identity's pods differ
/// on an ipBlock, ALLOW takes the identity only if all of them are inside,
/// DENY if any is.
extension PolicyCompiler {
    struct AuthzPeer {
        var id: UInt32
        var principal: String?
        var namespace: String?
        /// A pod identity's addresses.
        var addresses: [IPv4Address] = []
        /// A CIDR class's blocks (its addresses are in exactly these).
        var blocks: Set<NetworkPolicy.IPBlock>?
    }

    /// Every ipBlock an AuthorizationPolicy names, as a block without
    /// excepts, so that CIDR classes split the address space along them.
    static func authorizationBlocks(_ state: ClusterState) -> Set<NetworkPolicy.IPBlock> {
        var out = Set<NetworkPolicy.IPBlock>()
        func add(_ list: [String]?) {
            for s in list ?? [] { if let p = AuthorizationSet.prefix(s) { out.insert(NetworkPolicy.IPBlock(cidr: p, except: [])) } }
        }
        for p in state.authorizationPolicies {
            for rule in p.rules {
                for s in rule.from {
                    add(s.ipBlocks)
                    add(s.notIpBlocks)
                }
                for c in rule.when where c.key == .sourceIP {
                    add(c.values)
                    add(c.notValues)
                }
            }
        }
        return out
    }

    mutating func compileAuthorization(_ state: ClusterState, into table: inout PolicyTable, members: [UInt32: [Workload]],
                                       classBlocks: [UInt32: Set<NetworkPolicy.IPBlock>]) {
        guard !state.authorizationPolicies.isEmpty else { return }
        var peers: [AuthzPeer] = []
        for (id, pods) in members.sorted(by: { $0.key < $1.key }) {
            // Only this node's pods are known by identity in its kernel.
            let here = pods.filter { node == nil || $0.node == node }
            guard let w = here.first else { continue }
            let principal = trustDomain.map { "\($0)/ns/\(w.metadata.namespace)/sa/\(w.serviceAccount)" }
            peers.append(AuthzPeer(id: id, principal: principal, namespace: w.metadata.namespace, addresses: here.map(\.address)))
        }
        peers.append(AuthzPeer(id: ReservedIdentity.world, blocks: []))
        for (id, blocks) in classBlocks.sorted(by: { $0.key < $1.key }) { peers.append(AuthzPeer(id: id, blocks: blocks)) }

        for (id, pods) in members {
            guard let w = pods.first else { continue }
            let applied = state.authorizationPolicies(for: w).filter { $0.action != .audit }
            guard !applied.isEmpty else { continue }
            for pod in pods { table.endpoints[pod.address]?.authz = true }
            var hasAllow = false
            for policy in applied {
                let deny = policy.action == .deny
                if !deny { hasAllow = true }
                for (index, rule) in policy.rules.enumerated() {
                    guard let ports = Self.kernelPorts(rule, deny: deny) else { continue }
                    let name = "authz/\(policy.metadata.qualifiedName)/\(index)"
                    let ruleID = ruleIDs.id(for: name)
                    table.rules[ruleID] = RuleRef(policy: policy.metadata.qualifiedName, direction: RuleRef.authorization, index: index)
                    let sourceConditions = rule.when.filter { !$0.key.isHTTP && $0.key != .destinationPort }
                    let matched: [UInt32] = rule.from.isEmpty && sourceConditions.isEmpty ? [ReservedIdentity.any]
                        : peers.filter { Self.matches(rule.from, sourceConditions, $0, deny: deny) }.map(\.id)
                    let prefixes: [PolicyEntryKey.PortPrefix?] = ports.isEmpty ? [nil]
                        : ports.flatMap { PolicyEntryKey.PortPrefix.cover($0.lowerBound, $0.upperBound) }
                    for peer in matched {
                        for prefix in prefixes {
                            let key = PolicyEntryKey(identity: id, direction: .ingress, peer: peer, proto: 6, portPrefix: prefix,
                                                     kind: deny ? .authzDeny : .authzAllow)
                            if let have = table.entries[key], have <= ruleID { continue }
                            table.entries[key] = ruleID
                        }
                    }
                }
            }
            if !hasAllow {
                table.entries[PolicyEntryKey(identity: id, direction: .ingress, peer: ReservedIdentity.any, proto: 6,
                                             kind: .authzAllow)] = 0
            }
        }
    }

    /// The destination ports a rule can match in the kernel: [] for any
    /// port, nil for none (an ALLOW rule that needs HTTP).
    static func kernelPorts(_ rule: AuthorizationPolicy.Rule, deny: Bool) -> [ClosedRange<UInt16>]? {
        if !deny && rule.when.contains(where: { $0.key.isHTTP }) { return nil }
        let full: [ClosedRange<UInt16>] = [1...65535]
        var ranges: [ClosedRange<UInt16>]?  // nil: any
        if !rule.to.isEmpty {
            let ops = deny ? rule.to : rule.to.filter { !$0.needsHTTP }
            guard !ops.isEmpty else { return nil }
            var union: [ClosedRange<UInt16>] = []
            for op in ops {
                var r = op.ports.map { $0.map { $0...$0 } } ?? full
                if let not = op.notPorts { r = subtract(r, not) }
                union += r
            }
            ranges = normalize(union)
        }
        for c in rule.when where c.key == .destinationPort {
            var r = ranges ?? full
            if let values = c.values?.compactMap(UInt16.init) { r = normalize(r.flatMap { range in values.filter(range.contains).map { $0...$0 } }) }
            if let not = c.notValues?.compactMap(UInt16.init) { r = subtract(r, not) }
            ranges = r
        }
        guard let ranges else { return [] }
        // Nothing left (say, ports minus the same notPorts): the rule never matches.
        return ranges.isEmpty ? nil : (ranges == full ? [] : ranges)
    }

    static func subtract(_ ranges: [ClosedRange<UInt16>], _ ports: [UInt16]) -> [ClosedRange<UInt16>] {
        var out = ranges
        for p in Set(ports) {
            out = out.flatMap { r -> [ClosedRange<UInt16>] in
                guard r.contains(p) else { return [r] }
                var pieces: [ClosedRange<UInt16>] = []
                if p > r.lowerBound { pieces.append(r.lowerBound...(p - 1)) }
                if p < r.upperBound { pieces.append((p + 1)...r.upperBound) }
                return pieces
            }
        }
        return normalize(out)
    }

    static func normalize(_ ranges: [ClosedRange<UInt16>]) -> [ClosedRange<UInt16>] {
        var out: [ClosedRange<UInt16>] = []
        for r in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = out.last, UInt32(r.lowerBound) <= UInt32(last.upperBound) + 1 {
                out[out.count - 1] = last.lowerBound...max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    /// Whether a rule's sources and source conditions match a peer. A pod
    /// identity is judged address by address; where its pods differ, `deny`
    /// errs towards matching (a DENY denies more), else towards not.
    static func matches(_ from: [AuthorizationPolicy.Source], _ conditions: [AuthorizationPolicy.Condition], _ p: AuthzPeer,
                        deny: Bool) -> Bool {
        func at(_ place: Place) -> Bool {
            (from.isEmpty || from.contains { matches($0, p, place) }) && conditions.allSatisfy { matches($0, p, place) }
        }
        if let blocks = p.blocks { return at(.blocks(blocks)) }
        let each = p.addresses.map { at(.address($0)) }
        return deny ? each.contains(true) : (!each.isEmpty && each.allSatisfy { $0 })
    }

    /// Where a peer's connection comes from: one pod's address, or a CIDR
    /// class (all of whose addresses lie in exactly its blocks).
    enum Place {
        case address(IPv4Address)
        case blocks(Set<NetworkPolicy.IPBlock>)

        func within(_ prefix: IPv4Prefix) -> Bool {
            switch self {
            case .address(let a): prefix.contains(a)
            case .blocks(let b): b.contains(NetworkPolicy.IPBlock(cidr: prefix, except: []))
            }
        }
    }

    static func matches(_ s: AuthorizationPolicy.Source, _ p: AuthzPeer, _ place: Place) -> Bool {
        AuthorizationSet.field(s.principals, s.notPrincipals, p.principal, AuthorizationSet.matchAny)
            && AuthorizationSet.field(s.namespaces, s.notNamespaces, p.namespace, AuthorizationSet.matchAny)
            && addresses(s.ipBlocks, s.notIpBlocks, place)
    }

    static func matches(_ c: AuthorizationPolicy.Condition, _ p: AuthzPeer, _ place: Place) -> Bool {
        switch c.key {
        case .sourceIP: addresses(c.values, c.notValues, place)
        case .sourceNamespace: AuthorizationSet.field(c.values, c.notValues, p.namespace, AuthorizationSet.matchAny)
        case .sourcePrincipal: AuthorizationSet.field(c.values, c.notValues, p.principal, AuthorizationSet.matchAny)
        case .header, .destinationPort: true
        }
    }

    static func addresses(_ yes: [String]?, _ no: [String]?, _ place: Place) -> Bool {
        if let yes, !yes.compactMap(AuthorizationSet.prefix).contains(where: place.within) { return false }
        if let no, no.compactMap(AuthorizationSet.prefix).contains(where: place.within) { return false }
        return true
    }
}
