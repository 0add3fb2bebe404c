/// Kubernetes' topology-aware routing (`service.kubernetes.io/topology-mode:
/// Auto`), as its EndpointSlice controller gives hints and kube-proxy reads
/// them: each ready endpoint is given to one zone, so that every zone gets
/// a share of the endpoints in proportion to its share of the nodes' CPU
/// cores, its own endpoints first; a client is then sent to the endpoints
/// given to its node's zone. Unlike PreferSameZone, a zone with few
/// endpoints is lent some of another zone's, and a zone with many keeps
/// only its share, so no endpoint takes much more than its part of the
/// load.
///
/// As in Kubernetes, there are no hints (every client is sent to every
/// ready endpoint) where they could not keep the load even: fewer than two
/// zones; an endpoint on a node in no zone, or in a zone with no cores
/// counted; or too few endpoints for every zone to get at least its share
/// divided by 1.2 (the controller's 20% overload threshold), such as 2
/// endpoints for 3 zones, or 4 for 3 equal ones.
public enum TopologyHints {
    /// The annotation and its older name (Kubernetes 1.21 to 1.26).
    public static let annotations = ["service.kubernetes.io/topology-mode", "service.kubernetes.io/topology-aware-hints"]
    /// Kubernetes' overload threshold: a zone may get no fewer endpoints
    /// than its share divided by 1 + this.
    static let overloadThreshold = 0.2

    /// Why a Service gets no hints, in Kubernetes' words where it has them.
    public enum Refusal: Error, Hashable, Sendable, CustomStringConvertible {
        case fewerThanTwoZones
        case endpointInNoZone(IPv4Address)
        case insufficientEndpoints(Int)
        case overloaded(zone: String)

        public var description: String {
            switch self {
            case .fewerThanTwoZones: "nodes in fewer than 2 zones"
            case .endpointInNoZone(let a): "endpoint \(a) is on a node in no zone, or in one with no cores counted"
            case .insufficientEndpoints(let n): "insufficient number of endpoints (\(n)), impossible to safely allocate proportionally"
            case .overloaded(let zone): "zone \(zone) would get too few endpoints for its share"
            }
        }
    }

    /// Each zone's share of the cores of the nodes in a zone (control-plane
    /// nodes left out; a node whose manifest gives no allocatable CPU counts
    /// one core, as the design of Kubernetes' controller has it).
    public static func zoneShares(_ nodes: [String: Node]) -> [String: Double] {
        var cores: [String: Int] = [:]
        for node in nodes.values where !node.isControlPlane {
            guard let zone = node.zone else { continue }
            cores[zone, default: 0] += node.allocatableMilliCPU ?? 1000
        }
        let total = cores.values.reduce(0, +)
        guard total > 0 else { return [:] }
        return cores.filter { $0.value > 0 }.mapValues { Double($0) / Double(total) }
    }

    /// The zone each endpoint is given to, or why none is. `endpoints`:
    /// the ready endpoints' addresses with their zones.
    public static func assign(_ endpoints: [(address: IPv4Address, zone: String?)],
                              shares: [String: Double]) -> Result<[IPv4Address: String], Refusal> {
        guard shares.count >= 2 else { return .failure(.fewerThanTwoZones) }
        var byZone: [String: [IPv4Address]] = [:]
        var seen = Set<IPv4Address>()
        for e in endpoints where seen.insert(e.address).inserted {
            guard let zone = e.zone, shares[zone] != nil else { return .failure(.endpointInNoZone(e.address)) }
            byZone[zone, default: []].append(e.address)
        }
        let n = seen.count
        let zones = shares.keys.sorted()
        // Each zone's least (its share less the threshold, rounded up) and
        // its target: the shares rounded to whole endpoints, the largest
        // remainders rounded up, so that the targets add up to n.
        let desired = zones.map { shares[$0, default: 0] * Double(n) }
        let least = desired.map { Int(($0 / (1 + overloadThreshold)).rounded(.up)) }
        guard least.reduce(0, +) <= n, !least.contains(0) else { return .failure(.insufficientEndpoints(n)) }
        var target = desired.map { Int($0.rounded(.down)) }
        let order = zones.indices.sorted { (desired[$0] - Double(target[$0]), zones[$1]) > (desired[$1] - Double(target[$1]), zones[$0]) }
        for i in order.prefix(n - target.reduce(0, +)) { target[i] += 1 }
        if let short = zones.indices.first(where: { target[$0] < least[$0] }) { return .failure(.overloaded(zone: zones[short])) }
        // Every zone keeps its own endpoints up to its target (the lowest
        // addresses); the rest go, lowest first, to the zones short of
        // theirs, in the zones' order.
        var hints: [IPv4Address: String] = [:]
        var spare: [IPv4Address] = []
        for (i, zone) in zones.enumerated() {
            let own = (byZone[zone] ?? []).sorted()
            for a in own.prefix(target[i]) { hints[a] = zone }
            spare += own.dropFirst(target[i])
        }
        spare.sort(by: >)
        for (i, zone) in zones.enumerated() {
            var have = byZone[zone].map { min($0.count, target[i]) } ?? 0
            while have < target[i], let a = spare.popLast() {
                hints[a] = zone
                have += 1
            }
        }
        return .success(hints)
    }

    /// The hints for one Service port's ready endpoints, given the node
    /// each is on, in `state`'s zones.
    public static func assign(_ endpoints: [(address: IPv4Address, node: String)],
                              in state: ClusterState) -> Result<[IPv4Address: String], Refusal> {
        assign(endpoints.map { ($0.address, state.zone(ofNode: $0.node)) }, shares: zoneShares(state.nodes))
    }
}

extension TopologyHints {
    /// For `weft validate`: each topology-aware Service, with every pod it
    /// selects taken as ready, and the hints that gives or why there are
    /// none ("shop/api: zone a 2 (1 of b's), zone b 1").
    public static func summary(_ state: ClusterState) -> [String] {
        // A value Kubernetes takes as off but that is neither Auto nor an
        // off word is most likely a slip of the pen: said, not refused.
        let slips = state.services.compactMap { service -> String? in
            guard let (name, value) = annotations.lazy.compactMap({ n in service.metadata.annotations[n].map { (n, $0) } }).first,
                  !["auto", "disabled", "none", ""].contains(value.lowercased()) else { return nil }
            return "\(service.metadata.qualifiedName): \(name): \(quoted(value)) is not Auto: topology-aware routing is off"
        }
        let aware = state.services.filter(\.topologyAware)
        guard !aware.isEmpty else { return slips }
        let index = SelectorIndex(state.workloads)
        let shares = zoneShares(state.nodes)
        return aware.map { service in
            let pods = index.select(namespace: service.metadata.namespace, selector: service.selector)
            let zoneOf = Dictionary(pods.map { ($0.address, state.zone(ofNode: $0.node)) }) { a, _ in a }
            switch assign(pods.map { ($0.address, zoneOf[$0.address] ?? nil) }, shares: shares) {
            case .failure(let why):
                return "\(service.metadata.qualifiedName): topology-aware routing has no hints (\(why)): every client is sent to every ready pod"
            case .success(let hints):
                let zones = Dictionary(grouping: hints, by: \.value).sorted { $0.key < $1.key }.map { zone, given in
                    let lent = Dictionary(grouping: given.compactMap { zoneOf[$0.key] ?? nil }.filter { $0 != zone }, by: { $0 })
                        .sorted { $0.key < $1.key }.map { "\($0.value.count) of \($0.key)'s" }
                    return "zone \(zone) \(given.count)" + (lent.isEmpty ? "" : " (\(lent.joined(separator: ", ")))")
                }
                return "\(service.metadata.qualifiedName): topology-aware routing: " + zones.joined(separator: ", ")
            }
        } + slips
    }
}
