/// A Service port as the kernel keys it: clusterIP, port, protocol.
public struct Frontend: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var vip: IPv4Address
    public var port: UInt16
    public var transport: TransportProtocol

    public init(vip: IPv4Address, port: UInt16, transport: TransportProtocol) {
        self.vip = vip
        self.port = port
        self.transport = transport
    }

    public var description: String { "\(vip):\(port)/\(transport.rawValue)" }

    public static func < (a: Frontend, b: Frontend) -> Bool {
        (a.vip, a.port, a.transport.ipProtocol) < (b.vip, b.port, b.transport.ipProtocol)
    }
}

/// Where a connection is sent: a pod address and the resolved targetPort.
public struct BackendAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var address: IPv4Address
    public var port: UInt16
    public var transport: TransportProtocol

    public init(address: IPv4Address, port: UInt16, transport: TransportProtocol) {
        self.address = address
        self.port = port
        self.transport = transport
    }

    public var description: String { "\(address):\(port)" }

    public static func < (a: BackendAddress, b: BackendAddress) -> Bool {
        (a.address, a.port, a.transport.ipProtocol) < (b.address, b.port, b.transport.ipProtocol)
    }
}

/// The desired service table: every Service port with a clusterIP, and the
/// backends the kernel should choose from for it.
public struct ServiceTable: Hashable, Sendable {
    public struct Entry: Hashable, Sendable {
        /// `namespace/name:port`, for people.
        public var name: String
        public var backends: [BackendAddress]
        /// Set when the port needs the node proxy (see ProxyTable.l7Ports).
        public var needsProxy: Bool
        /// `sessionAffinity: ClientIP`'s timeout in seconds; 0: none.
        public var affinityTimeout: UInt32

        public init(name: String, backends: [BackendAddress], needsProxy: Bool, affinityTimeout: UInt32 = 0) {
            self.name = name
            self.backends = backends
            self.needsProxy = needsProxy
            self.affinityTimeout = affinityTimeout
        }
    }

    public var entries: [Frontend: Entry]
    /// Frontends using every backend because too few passed their checks
    /// (EndpointHealth.usable's panic mode).
    public var panic: Set<Frontend> = []
    /// The nodes' addresses, where a pod may dial a node port (its entry is
    /// under ClusterState.nodePortVIP): weft_node_addrs. Empty without
    /// node ports.
    public var nodeAddresses: [IPv4Address] = []

    public init(entries: [Frontend: Entry] = [:]) { self.entries = entries }

    /// Backends come in Workload order (namespace, name); they are unique
    /// because ClusterState refuses two Workloads with one address.
    ///
    /// Kubernetes' endpoints rules: a selected Workload backs a Service port
    /// when it resolves the port's targetPort (a named targetPort is looked up
    /// per Workload, so replicas may listen on different numbers). On `node`,
    /// a Service with `internalTrafficPolicy: Local` has only that node's
    /// Workloads, and one with `trafficDistribution: PreferSameNode` (or a
    /// TrafficPolicy's `locality: PreferLocal`) only that node's while any
    /// of them is ready (nil: every node's, as a table for no node in
    /// particular).
    public init(_ state: ClusterState, health: EndpointHealth = .init(), node: String? = nil) {
        var entries: [Frontend: Entry] = [:]
        entries.reserveCapacity(state.services.count)
        var panic: Set<Frontend> = []
        let index = SelectorIndex(state.workloads)
        let l7 = state.httpRoutes.isEmpty && !state.l4Routes.contains(where: { $0.kind == .tls })
            && !state.services.contains(where: { $0.ports.contains { ProxyTable.declaredProtocol($0) != nil } })
            ? [] : ProxyTable.l7Ports(state)
        let workloads = state.workloads
        // Services whose TrafficPolicy has locality PreferLocal or
        // PreferSameZone: it holds for the ports the kernel serves as well
        // as the proxy's.
        var preferLocal = Set<String>(), preferZone = Set<String>()
        for p in state.trafficPolicies where p.loadBalancer.locality != .none {
            for target in p.targets {
                if p.loadBalancer.locality == .preferLocal {
                    preferLocal.insert("\(p.metadata.namespace)/\(target)")
                } else {
                    preferZone.insert("\(p.metadata.namespace)/\(target)")
                }
            }
        }
        // This node's zone, for PreferSameZone (none: no preference).
        let zone = node.flatMap { state.zone(ofNode: $0) }
        for service in state.services {
            guard let vip = service.clusterIP else { continue }
            var selected = index.selectIndices(namespace: service.metadata.namespace, selector: service.selector)
            if service.nodeLocal, let node { selected = selected.filter { workloads[$0].node == node } }
            // Failed checks, as failed readiness probes, leave the endpoints
            // unless the Service publishes pods that are not ready.
            let checks = service.publishNotReadyAddresses ? [:] : health.failing
            // UDP (and SCTP) is not probed: a pod failing its check on any
            // of the Service's TCP ports leaves its other ports too (as a
            // failed readiness probe takes a pod out of every port's endpoints).
            var failingPods: Set<IPv4Address>?
            if !checks.isEmpty, service.ports.contains(where: { $0.transport != .tcp }) {
                var pods = Set<IPv4Address>()
                for port in service.ports where port.transport == .tcp {
                    let cluster = ProxyTable.clusterName(namespace: service.metadata.namespace, service: service.metadata.name, port: port.port)
                    for b in checks[cluster] ?? [] where b.transport == .tcp { pods.insert(b.address) }
                }
                if !pods.isEmpty { failingPods = pods }
            }
            for port in service.ports {
                var backends = selected.compactMap { i -> BackendAddress? in
                    guard let target = workloads[i].resolve(port.targetPort, transport: port.transport) else { return nil }
                    return BackendAddress(address: workloads[i].address, port: target, transport: port.transport)
                }
                let label = port.name.map { ":\($0)" } ?? ":\(port.port)"
                // (The cluster name is made only when something is keyed by it.)
                let cluster = l7.isEmpty && checks.isEmpty
                    ? "" : ProxyTable.clusterName(namespace: service.metadata.namespace, service: service.metadata.name, port: port.port)
                let needsProxy = !l7.isEmpty && l7.contains(cluster) && port.transport == .tcp
                // Health: failing backends leave; so do the proxy's
                // ejections, for ports the kernel alone serves.
                let failing = checks.isEmpty || port.transport != .tcp ? nil : checks[cluster]
                let failingPod = port.transport != .tcp ? failingPods : nil
                if failing != nil || failingPod != nil || (!needsProxy && !health.ejected.isEmpty) {
                    let threshold = state.trafficPolicy(forService: service.metadata.qualifiedName)?.healthCheck?.panicThreshold
                        ?? EndpointHealth.defaultPanicThreshold
                    let usable = EndpointHealth.usable(backends, panicThreshold: threshold) { b in
                        (failing?.contains(b) ?? false) || (failingPod?.contains(b.address) ?? false)
                            || (!needsProxy && health.ejected.contains(b))
                    }
                    backends = usable.backends
                    if usable.panic { panic.insert(Frontend(vip: vip, port: port.port, transport: port.transport)) }
                }
                // Which of the ready backends this node's clients prefer
                // (internalTrafficPolicy Local has chosen already): a
                // TrafficPolicy's locality, else the topology annotation,
                // else trafficDistribution (Kubernetes puts the annotation
                // first).
                // (The name is made only when a policy set is there to ask.)
                let policyNear = !preferLocal.isEmpty && preferLocal.contains(service.metadata.qualifiedName)
                let policyZone = !policyNear && !preferZone.isEmpty && preferZone.contains(service.metadata.qualifiedName)
                let hinted = !policyNear && !policyZone && service.topologyAware
                if let node, !service.nodeLocal, policyNear || (!policyZone && !hinted && service.prefersSameNode) {
                    // (Of the ready ones: a node whose pods all fail their
                    // checks sends its clients to the other nodes' pods.)
                    let own = Set(selected.lazy.filter { workloads[$0].node == node }.map { workloads[$0].address })
                    let near = backends.filter { own.contains($0.address) }
                    if !near.isEmpty { backends = near }
                } else if let zone, !service.nodeLocal, policyZone || (!hinted && service.prefersSameZone) {
                    // The same, over the nodes of this node's zone.
                    let own = Set(selected.lazy.filter { state.zone(ofNode: workloads[$0].node) == zone }.map { workloads[$0].address })
                    let near = backends.filter { own.contains($0.address) }
                    if !near.isEmpty { backends = near }
                } else if let zone, !service.nodeLocal, hinted {
                    // Topology-aware routing: the ready backends given to
                    // this zone (none given to it, or no hints: every one).
                    let nodes = Dictionary(selected.map { (workloads[$0].address, workloads[$0].node) }) { a, _ in a }
                    if case .success(let hints) = TopologyHints.assign(backends.map { ($0.address, nodes[$0.address] ?? "") }, in: state) {
                        let near = backends.filter { hints[$0.address] == zone }
                        if !near.isEmpty { backends = near }
                    }
                }
                entries[Frontend(vip: vip, port: port.port, transport: port.transport)] =
                    Entry(name: service.metadata.qualifiedName + label, backends: backends, needsProxy: needsProxy,
                          affinityTimeout: service.affinityTimeout ?? 0)
            }
        }
        if !state.l4Routes.isEmpty { Self.split(&entries, by: state) }
        // A Service's external addresses (externalIPs, a load balancer's)
        // and node ports are served as its clusterIP is, for the pods that
        // dial them (ClusterState.aliases): a node port once, under
        // 0.0.0.0, looked up when a node's address is dialed (nodeAddresses).
        var nodePorts = false
        for service in state.services where !service.externalAddresses.isEmpty || service.ports.contains(where: { $0.nodePort != nil }) {
            guard let vip = service.clusterIP else { continue }
            for port in service.ports {
                let frontend = Frontend(vip: vip, port: port.port, transport: port.transport)
                guard let entry = entries[frontend] else { continue }
                nodePorts = nodePorts || port.nodePort != nil
                for (address, aliasPort) in state.aliases(of: service, port, nodesAsOne: true) {
                    let alias = Frontend(vip: address, port: aliasPort, transport: port.transport)
                    var named = entry
                    named.name += service.externalAddresses.contains { $0.address == address } && aliasPort == port.port
                        ? " (external address)" : " (node port)"
                    entries[alias] = named
                    if panic.contains(frontend) { panic.insert(alias) }
                }
            }
        }
        self.entries = entries
        self.panic = panic
        nodeAddresses = nodePorts ? state.nodeAddresses : []
    }

    /// TCPRoutes and UDPRoutes: each parent port's slots become its route's
    /// backends' (their Services' ready backends, as computed above), in
    /// proportion to the weights (L4Route.slots). A port the node proxy
    /// serves is left to it; a split with no ready backend at all leaves
    /// the port with none (connect fails at once, as for an empty Service).
    static func split(_ entries: inout [Frontend: Entry], by state: ClusterState) {
        let own = entries
        var services: [String: Service] = [:]
        for s in state.services { services[s.metadata.qualifiedName] = s }
        // (A TLSRoute's ports are the node proxy's: needsProxy.)
        for route in state.l4Routes where route.kind != .tls {
            let ns = route.metadata.namespace
            let groups = route.backendRefs.map { ref -> (weight: UInt32, backends: [BackendAddress]) in
                let frontend = services["\(ref.namespace ?? ns)/\(ref.name)"]?.clusterIP
                    .map { Frontend(vip: $0, port: ref.port, transport: route.kind.transport) }
                return (ref.weight, frontend.flatMap { own[$0]?.backends } ?? [])
            }
            let slots = L4Route.slots(groups)
            for parent in route.parentRefs {
                guard let service = services["\(parent.namespace)/\(parent.name)"], let vip = service.clusterIP else { continue }
                for p in service.ports where p.transport == route.kind.transport
                    && (parent.port == nil || parent.port == p.port) && (parent.sectionName == nil || parent.sectionName == p.name) {
                    let frontend = Frontend(vip: vip, port: p.port, transport: p.transport)
                    guard var entry = entries[frontend], !entry.needsProxy else { continue }
                    entry.backends = slots
                    entry.name += " (\(route.kind.rawValue) \(route.metadata.qualifiedName))"
                    entries[frontend] = entry
                }
            }
        }
    }
}

/// Workloads indexed by namespace and `key=value` label, so a selector costs
/// the size of its smallest matching label set rather than a scan of every
/// workload (10,000 Services over 100,000 Workloads stays linear).
struct SelectorIndex {
    private struct Label: Hashable {
        var key: String
        var value: String
    }

    private var byLabel: [String: [Label: [Int]]] = [:]
    private let workloads: [Workload]

    init(_ workloads: [Workload]) {
        self.workloads = workloads
        for (i, w) in workloads.enumerated() {
            for (key, value) in w.metadata.labels {
                byLabel[w.metadata.namespace, default: [:]][Label(key: key, value: value), default: []].append(i)
            }
        }
    }

    /// Same answer as ClusterState.backends(of:), in selector-index time.
    func select(namespace: String, selector: [String: String]?) -> [Workload] {
        selectIndices(namespace: namespace, selector: selector).map { workloads[$0] }
    }

    /// The positions in the indexed array of the Workloads `select` gives,
    /// in the same order: no Workload is copied (with 10,000 Services of 10
    /// backends each, copying them cost the agent milliseconds per change).
    func selectIndices(namespace: String, selector: [String: String]?) -> [Int] {
        guard let selector, !selector.isEmpty, let labels = byLabel[namespace] else { return [] }
        var smallest: [Int]?
        for (key, value) in selector {
            guard let list = labels[Label(key: key, value: value)] else { return [] }
            if list.count < (smallest?.count ?? Int.max) { smallest = list }
        }
        guard let smallest else { return [] }
        if selector.count == 1 { return smallest }
        return smallest.filter { i in
            selector.allSatisfy { workloads[i].metadata.labels[$0.key] == $0.value }
        }
    }
}
