import Testing
@testable import WeftCore

/// Kubernetes NetworkPolicy semantics, written out plainly from the API
/// reference with no shared code with the compiler: per connection, walk
/// every policy.
enum ReferenceSemantics {
    struct Endpoint {
        var address: IPv4Address
        var pod: Workload?
    }

    static func allows(_ state: ClusterState, from src: Endpoint, to dst: Endpoint, port: UInt16,
                       proto: TransportProtocol) -> Bool {
        if let pod = src.pod, !directionAllows(state, pod: pod, direction: .egress, peer: dst, port: port, proto: proto,
                                               portOwner: dst.pod) {
            return false
        }
        if let pod = dst.pod, !directionAllows(state, pod: pod, direction: .ingress, peer: src, port: port, proto: proto,
                                               portOwner: dst.pod) {
            return false
        }
        return true
    }

    static func directionAllows(_ state: ClusterState, pod: Workload, direction: NetworkPolicy.Direction, peer: Endpoint,
                                port: UInt16, proto: TransportProtocol, portOwner: Workload?) -> Bool {
        let applying = state.networkPolicies.filter {
            $0.metadata.namespace == pod.metadata.namespace && $0.policyTypes.contains(direction)
                && $0.podSelector.matches(pod.metadata.labels)
        }
        if applying.isEmpty { return true }
        for policy in applying {
            for rule in policy.rules(direction) {
                let peerOK = rule.peers.isEmpty || rule.peers.contains { p in
                    switch p {
                    case .ipBlock(let block):
                        return block.contains(peer.address)
                    case .pods(let podSelector, let namespaceSelector):
                        guard let other = peer.pod else { return false }
                        let nsOK: Bool
                        if let namespaceSelector {
                            nsOK = namespaceSelector.matches(state.namespace(other.metadata.namespace).labels)
                        } else {
                            nsOK = other.metadata.namespace == policy.metadata.namespace
                        }
                        return nsOK && (podSelector?.matches(other.metadata.labels) ?? true)
                    }
                }
                let portOK = rule.ports.isEmpty || rule.ports.contains { p in
                    guard p.transport == proto else { return false }
                    switch p.port {
                    case nil: return true
                    case .number(let n)?: return port >= n && port <= (p.endPort ?? n)
                    case .name(let name)?:
                        return portOwner?.ports.contains { $0.name == name && $0.transport == proto && $0.port == port } ?? false
                    }
                }
                if peerOK && portOK { return true }
            }
        }
        return false
    }
}

/// The kernel's walk (bpf/lib/policy.h) over a compiled table held in
/// dictionaries, with the LPM tries' longest-prefix semantics.
enum CompiledWalk {
    static func allows(_ t: PolicyTable, from src: IPv4Address, srcIsMesh: Bool, to dst: IPv4Address, port: UInt16,
                       proto: TransportProtocol) -> Bool {
        func peer(_ a: IPv4Address) -> (UInt32, UInt32) {
            if let ep = t.endpoints[a] { return (ep.identity, ep.cidrClass) }
            return (ReservedIdentity.world, PolicyCompiler.longestMatch(a, t.cidrClasses) ?? 0)
        }
        // Mirrors the kernel: hash probes (exact port, any port, any
        // protocol), then the range prefixes only if the endpoint says it
        // has ranges in that direction.
        func match(_ ep: EndpointEntry, _ d: NetworkPolicy.Direction, _ p: UInt32) -> Bool {
            let id = ep.identity
            if t.entries[PolicyEntryKey(identity: id, direction: d, peer: p)] != nil { return true }
            if t.entries[PolicyEntryKey(identity: id, direction: d, peer: p, proto: proto.ipProtocol)] != nil { return true }
            if t.entries[PolicyEntryKey(identity: id, direction: d, peer: p, proto: proto.ipProtocol,
                                        portPrefix: .init(port: port, bits: 16))] != nil { return true }
            guard d == .ingress ? ep.ingressRanges : ep.egressRanges else { return false }
            for bits in UInt8(1)...15 {
                let k = PolicyEntryKey(identity: id, direction: d, peer: p, proto: proto.ipProtocol,
                                       portPrefix: .init(port: port, bits: bits))
                if t.entries[k] != nil { return true }
            }
            return false
        }
        func lookup(_ ep: EndpointEntry, _ d: NetworkPolicy.Direction, _ p: (UInt32, UInt32)) -> Bool {
            if p.0 == ReservedIdentity.host { return true }
            return match(ep, d, p.0) || (p.1 != 0 && match(ep, d, p.1)) || match(ep, d, ReservedIdentity.any)
        }
        if srcIsMesh, let s = t.endpoints[src], s.egressIsolated, !lookup(s, .egress, peer(dst)) { return false }
        if let d = t.endpoints[dst], d.ingressIsolated, !lookup(d, .ingress, peer(src)) { return false }
        return true
    }
}

/// Random clusters and policies, within what the compiler claims exactly.
struct PolicyWorld {
    var rng: SplitMix
    let namespaces = ["alpha", "beta", "gamma"]

    mutating func pick<T>(_ xs: [T]) -> T { xs[rng.below(xs.count)] }

    mutating func selector() -> LabelSelector {
        switch rng.below(5) {
        case 0: return .everything
        case 1: return LabelSelector(matchLabels: ["app": pick(["x", "y", "z"])])
        case 2: return LabelSelector(matchExpressions: [.init(key: "tier", op: pick([.in, .notIn]), values: [pick(["fe", "be"])])])
        case 3: return LabelSelector(matchExpressions: [.init(key: "tier", op: pick([.exists, .doesNotExist]))])
        default: return LabelSelector(matchLabels: ["app": pick(["x", "y"]), "tier": pick(["fe", "be"])])
        }
    }

    mutating func nsSelector() -> LabelSelector {
        switch rng.below(3) {
        case 0: return .everything
        case 1: return LabelSelector(matchLabels: ["env": pick(["prod", "dev"])])
        default: return LabelSelector(matchLabels: [Namespace.nameLabel: pick(namespaces)])
        }
    }

    /// Pods with the same namespace and labels declare the same ports, as
    /// replicas of one Deployment do (the compiler resolves named ports per
    /// identity).
    mutating func workloads() -> [Workload] {
        var portsOf: [IdentityKey: [WorkloadPort]] = [:]
        return (0..<9).map { i in
            var labels = ["app": pick(["x", "y", "z"])]
            if rng.below(3) > 0 { labels["tier"] = pick(["fe", "be"]) }
            let namespace = pick(namespaces)
            var ports: [WorkloadPort] = []
            if rng.below(2) == 0 { ports.append(.init(name: "web", port: pick([8080, 8050]))) }
            if rng.below(2) == 0 { ports.append(.init(name: "dns", port: 53, transport: .udp)) }
            let key = IdentityKey(namespace: namespace, labels: labels)
            ports = portsOf[key] ?? ports
            portsOf[key] = ports
            return Workload(metadata: ObjectMeta(name: "p\(i)", namespace: namespace, labels: labels),
                            node: i < 5 ? "n1" : "n2", address: IPv4Address(198 << 24 | 18 << 16 | UInt32(i < 5 ? 1 : 2) << 8 | UInt32(10 + i)),
                            ports: ports)
        }
    }

    mutating func block() -> NetworkPolicy.IPBlock {
        switch rng.below(4) {
        case 0: return .init(cidr: IPv4Prefix("198.18.0.0/16")!, except: [IPv4Prefix("198.18.2.0/24")!])
        case 1: return .init(cidr: IPv4Prefix("198.18.1.0/24")!)
        case 2: return .init(cidr: IPv4Prefix("198.18.1.0/24")!, except: [IPv4Prefix("198.18.1.12/30")!])
        default: return .init(cidr: IPv4Prefix("0.0.0.0/0")!, except: [IPv4Prefix("198.18.0.0/15")!])
        }
    }

    mutating func rule(_ direction: NetworkPolicy.Direction) -> NetworkPolicy.Rule {
        var peers: [NetworkPolicy.Peer] = []
        for _ in 0..<rng.below(3) {
            switch rng.below(4) {
            case 0: peers.append(.pods(podSelector: selector(), namespaceSelector: nil))
            case 1: peers.append(.pods(podSelector: nil, namespaceSelector: nsSelector()))
            case 2: peers.append(.pods(podSelector: selector(), namespaceSelector: nsSelector()))
            default: peers.append(.ipBlock(block()))
            }
        }
        let hasBlock = peers.contains { if case .ipBlock = $0 { true } else { false } }
        var ports: [NetworkPolicy.Port] = []
        for _ in 0..<rng.below(3) {
            switch rng.below(5) {
            case 0: ports.append(.init(transport: .tcp, port: .number(pick([80, 8080]))))
            case 1: ports.append(.init(transport: .tcp, port: .number(8000), endPort: 8100))
            case 2: ports.append(.init(transport: .udp, port: .number(53)))
            case 3: ports.append(.init(transport: pick([.tcp, .udp])))
            default:
                // Named egress ports toward ipBlocks are the one case the
                // compiler approximates (see its documentation); skip it.
                if direction == .ingress || !hasBlock {
                    ports.append(pick([.init(transport: .tcp, port: .name("web")), .init(transport: .udp, port: .name("dns"))]))
                }
            }
        }
        return .init(peers: peers, ports: ports)
    }

    mutating func policy(_ i: Int) -> NetworkPolicy {
        let ingress = (0..<rng.below(3)).map { _ in rule(.ingress) }
        let egress = (0..<rng.below(3)).map { _ in rule(.egress) }
        let types: Set<NetworkPolicy.Direction>? = pick([nil, [.ingress], [.egress], [.ingress, .egress]])
        return NetworkPolicy(metadata: ObjectMeta(name: "np\(i)", namespace: pick(namespaces)), podSelector: selector(),
                             policyTypes: types, ingress: ingress, egress: egress)
    }

    mutating func state(policies: Int) -> ClusterState {
        var resources: [LocatedResource] = []
        let at = DocumentLocation(file: "gen", document: 1)
        resources.append(.init(resource: .namespace(Namespace(name: "alpha", labels: ["env": "prod"]), ObjectMeta(name: "alpha", namespace: "")), location: at))
        resources.append(.init(resource: .namespace(Namespace(name: "beta", labels: ["env": "dev"]), ObjectMeta(name: "beta", namespace: "")), location: at))
        for w in workloads() { resources.append(.init(resource: .workload(w), location: at)) }
        for i in 0..<policies { resources.append(.init(resource: .networkPolicy(policy(i)), location: at)) }
        guard case .success(let s) = ClusterState.build(resources) else { fatalError("generated state invalid") }
        return s
    }
}

@Suite struct PolicyCompilation {
    static let externals = [IPv4Address("10.1.2.3")!, IPv4Address("198.18.9.9")!, IPv4Address("198.18.1.200")!, IPv4Address("198.18.1.201")!]
    static let probes: [(UInt16, TransportProtocol)] = [(80, .tcp), (8080, .tcp), (8050, .tcp), (8100, .tcp), (9999, .tcp), (53, .udp), (80, .udp)]

    static func disagreements(_ state: ClusterState, _ table: PolicyTable) -> [String] {
        var out: [String] = []
        let pods = state.workloads.map { ReferenceSemantics.Endpoint(address: $0.address, pod: $0) }
        let outside = externals.map { ReferenceSemantics.Endpoint(address: $0, pod: nil) }
        for src in pods + outside {
            for dst in pods + outside where src.address != dst.address && (src.pod != nil || dst.pod != nil) {
                for (port, proto) in probes {
                    let want = ReferenceSemantics.allows(state, from: src, to: dst, port: port, proto: proto)
                    let got = CompiledWalk.allows(table, from: src.address, srcIsMesh: src.pod != nil, to: dst.address,
                                                  port: port, proto: proto)
                    if want != got { out.append("\(src.address) -> \(dst.address):\(port)/\(proto.rawValue): reference \(want), compiled \(got)") }
                }
            }
        }
        return out
    }

    @Test func compiledMapsAgreeWithTheReferenceOnRandomClusters() {
        var world = PolicyWorld(rng: SplitMix(seed: 2026))
        var decisions = 0
        for round in 0..<150 {
            let state = world.state(policies: 1 + round % 5)
            var compiler = PolicyCompiler()
            let table = compiler.compile(state)
            let bad = Self.disagreements(state, table)
            #expect(bad.isEmpty, "round \(round): \(bad.prefix(5))\n\(state.networkPolicies)")
            if !bad.isEmpty { return }
            decisions += 1
        }
        #expect(decisions == 150)
    }

    @Test func oneChangedPolicyIsTheOnlyOneCompiledAgain() {
        var world = PolicyWorld(rng: SplitMix(seed: 99))
        let state = world.state(policies: 6)
        var compiler = PolicyCompiler()
        let first = compiler.compile(state)
        #expect(compiler.lastCompiledPolicies == 6)
        _ = compiler.compile(state)
        #expect(compiler.lastCompiledPolicies == 0)

        // Change one policy's ports only (no ipBlock set change).
        var policies = state.networkPolicies
        policies[2].ingress.append(.init(peers: [], ports: [.init(transport: .tcp, port: .number(9999))]))
        var resources = state.workloads.map { LocatedResource(resource: .workload($0), location: .init(file: "g", document: 1)) }
        resources += state.namespaces.values.map { LocatedResource(resource: .namespace($0, ObjectMeta(name: $0.name, namespace: "")), location: .init(file: "g", document: 1)) }
        resources += policies.map { LocatedResource(resource: .networkPolicy($0), location: .init(file: "g", document: 1)) }
        guard case .success(let changed) = ClusterState.build(resources) else { Issue.record("invalid"); return }
        let second = compiler.compile(changed)
        #expect(compiler.lastCompiledPolicies == 1)
        #expect(Self.disagreements(changed, second).isEmpty)
        // Identities keep their ids.
        #expect(first.identities == second.identities)
    }

    /// Random label changes: only the policies that select or name the pod's
    /// old or new identity are compiled again, and the result always agrees
    /// with the reference (so nothing stale was kept).
    @Test func labelChangesRecompileOnlyThePoliciesThatTouchThem() {
        var world = PolicyWorld(rng: SplitMix(seed: 4242))
        var state = world.state(policies: 8)
        var compiler = PolicyCompiler()
        _ = compiler.compile(state)
        var skipped = 0
        for round in 0..<60 {
            var workloads = state.workloads
            let i = world.rng.below(workloads.count)
            workloads[i].metadata.labels["app"] = world.pick(["x", "y", "z", "w"])
            var resources = workloads.map { LocatedResource(resource: .workload($0), location: .init(file: "g", document: 1)) }
            resources += state.namespaces.values.map { LocatedResource(resource: .namespace($0, ObjectMeta(name: $0.name, namespace: "")), location: .init(file: "g", document: 1)) }
            resources += state.networkPolicies.map { LocatedResource(resource: .networkPolicy($0), location: .init(file: "g", document: 1)) }
            guard case .success(let next) = ClusterState.build(resources) else { Issue.record("invalid"); return }
            state = next
            let table = compiler.compile(state)
            skipped += state.networkPolicies.count - compiler.lastCompiledPolicies
            let bad = Self.disagreements(state, table)
            #expect(bad.isEmpty, "round \(round): \(bad.prefix(5))")
            if !bad.isEmpty { return }
        }
        #expect(skipped > 0, "label changes recompiled every policy every time")
    }

    /// A new agent over the pins of an old one (whose ids carry history)
    /// takes the ids back and compiles exactly what the kernel holds.
    @Test func aRestartedCompilerAdoptsIdsAndReproducesTheTable() {
        var world = PolicyWorld(rng: SplitMix(seed: 31337))
        var old = PolicyCompiler()
        for _ in 0..<5 { _ = old.compile(world.state(policies: 6)) }  // history: ids allocated and freed
        let state = world.state(policies: 8)
        let kernel = old.compile(state)
        var fresh = PolicyCompiler()
        fresh.adopt(endpoints: kernel.endpoints, cidrClasses: kernel.cidrClasses, state: state)
        let again = fresh.compile(state)
        #expect(again.endpoints == kernel.endpoints)
        #expect(again.cidrClasses == kernel.cidrClasses)
        // Allow keys are identical; rule ids (names for people only) may be numbered anew.
        #expect(Set(again.entries.keys) == Set(kernel.entries.keys))
    }

    @Test func regionsSplitOverlappingBlocksAndHoles() {
        let wide = NetworkPolicy.IPBlock(cidr: IPv4Prefix("10.0.0.0/8")!, except: [IPv4Prefix("10.1.0.0/16")!])
        let narrow = NetworkPolicy.IPBlock(cidr: IPv4Prefix("10.1.2.0/24")!)
        let regions = PolicyCompiler.regions([wide, narrow])
        #expect(regions[IPv4Prefix("10.0.0.0/8")!] == [wide])
        #expect(regions[IPv4Prefix("10.1.0.0/16")!] == [])          // the hole
        #expect(regions[IPv4Prefix("10.1.2.0/24")!] == [narrow])    // only narrow: wide excepts it
    }
}
