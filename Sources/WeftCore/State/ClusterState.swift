/// A whole, validated set of manifests: what the cluster should look like.
/// Built only through `ClusterState.build`, which checks the documents against
/// each other (duplicate names, clusterIPs, addresses); a set with any error
/// yields no state at all, so nothing is ever half-applied.
public struct ClusterState: Hashable, Sendable {
    public private(set) var services: [Service]
    public private(set) var workloads: [Workload]
    /// Namespaces with a manifest; others exist implicitly (see `namespace(_:)`).
    public private(set) var namespaces: [String: Namespace]
    /// Nodes with a manifest, by name: their zones.
    public private(set) var nodes: [String: Node] = [:]
    public private(set) var networkPolicies: [NetworkPolicy]
    /// HTTPRoutes and GRPCRoutes (`kind`), by namespace and name.
    public private(set) var httpRoutes: [HTTPRoute]
    /// TCPRoutes and UDPRoutes (the kernel carries them out: ServiceTable).
    public private(set) var l4Routes: [L4Route] = []
    public private(set) var trafficPolicies: [TrafficPolicy]
    public private(set) var peerAuthentications: [PeerAuthentication]
    public private(set) var authorizationPolicies: [AuthorizationPolicy]
    /// The cluster's MeshConfig, or the defaults when there is none.
    public private(set) var meshConfig: MeshConfig

    public init() {
        meshConfig = MeshConfig(metadata: ObjectMeta(name: "default", namespace: ""))
        httpRoutes = []
        trafficPolicies = []
        peerAuthentications = []
        authorizationPolicies = []
        services = []
        workloads = []
        namespaces = [:]
        networkPolicies = []
    }

    /// The addresses and ports, besides its clusterIP and port, that pods
    /// of the mesh may dial for a Service port and that are served as it
    /// is: each external address with the port, and each node's address
    /// (nodeAddresses) with its node port, or, `nodesAsOne`, the node port
    /// once under WEFT_NODE_PORT_VIP, 0.0.0.0 (the kernel's and the proxy's
    /// tables: one entry whatever node is dialed); a node port only when
    /// some Node manifest gives an address.
    public func aliases(of service: Service, _ port: ServicePort, nodesAsOne: Bool = false) -> [(address: IPv4Address, port: UInt16)] {
        var out = service.externalAddresses.map { ($0.address, port.port) }
        // (No node address: a node port nowhere to be dialed.)
        if let nodePort = port.nodePort, case let addresses = nodeAddresses, !addresses.isEmpty {
            for address in nodesAsOne ? [Self.nodePortVIP] : addresses { out.append((address, nodePort)) }
        }
        return out
    }

    /// Where a node port is kept whatever node's address is dialed
    /// (WEFT_NODE_PORT_VIP).
    public static let nodePortVIP = IPv4Address(UInt32(0))

    /// Every node's addresses (Node status.addresses), once each, in order.
    public var nodeAddresses: [IPv4Address] { Set(nodes.values.flatMap(\.addresses)).sorted() }

    /// A node's zone (Node.zone): nil without a manifest or a zone label.
    public func zone(ofNode name: String) -> String? { nodes.isEmpty ? nil : nodes[name]?.zone }

    /// A namespace's labels: its manifest's, or only the standard name label.
    public func namespace(_ name: String) -> Namespace { namespaces[name] ?? Namespace(name: name) }

    public static func build(_ resources: [LocatedResource]) -> Result<ClusterState, ManifestErrors> {
        build(chunks: [resources])
    }

    /// The same over resources in several arrays (one per file, as
    /// ManifestCache keeps them), taken in order without joining them into
    /// one: 20,000 resources copied and freed again on every reconcile.
    static func build(chunks: [[LocatedResource]]) -> Result<ClusterState, ManifestErrors> {
        let resources = chunks.joined()
        let count = chunks.reduce(0) { $0 + $1.count }
        var state = ClusterState()
        var errors: [ManifestError] = []
        struct Name: Hashable {
            var kind: String
            var namespace: String
            var name: String
        }
        var names: [Name: DocumentLocation] = [:]
        var clusterIPs: [IPv4Address: (String, DocumentLocation)] = [:]
        var addresses: [IPv4Address: (String, DocumentLocation)] = [:]
        var externalFrontends: [Frontend: (String, DocumentLocation)] = [:]
        var externalAt: [IPv4Address: (String, DocumentLocation, String)] = [:]
        var nodePorts: [String: (String, DocumentLocation)] = [:]
        var meshConfigAt: DocumentLocation?
        // (Sized once: growing these through 20,000 documents rehashed them
        // a dozen times on every reconcile.)
        names.reserveCapacity(count)
        clusterIPs.reserveCapacity(count)
        addresses.reserveCapacity(count)
        for chunk in chunks { for located in chunk {
            let resource = located.resource
            let key = Name(kind: resource.kind, namespace: resource.metadata.namespace, name: resource.metadata.name)
            if let first = names[key] {
                // (Cluster-scoped kinds, Namespace and Node, by name alone.)
                let shown = key.namespace.isEmpty ? key.name : resource.metadata.qualifiedName
                errors.append(ManifestError(located.location, field: "metadata.name",
                                            "\(resource.kind) \(shown) is already defined at \(first)"))
                continue
            }
            names[key] = located.location
            switch resource {
            case .service(let service):
                if let ip = service.clusterIP {
                    if let (other, at) = clusterIPs[ip] {
                        errors.append(ManifestError(located.location, field: "spec.clusterIP",
                                                    "clusterIP \(ip) is already used by Service \(other) at \(at)"))
                        continue
                    }
                    clusterIPs[ip] = (service.metadata.qualifiedName, located.location)
                }
                // An external address serves one Service per port (Services
                // may share an address on different ports, as load
                // balancers let them).
                var taken = false
                for external in service.externalAddresses {
                    for port in service.ports {
                        let key = Frontend(vip: external.address, port: port.port, transport: port.transport)
                        if let (other, at) = externalFrontends[key] {
                            errors.append(ManifestError(located.location, field: external.field,
                                                        "\(key) is already served for Service \(other) at \(at)"))
                            taken = true
                        }
                    }
                }
                // A node port is one Service's on every node.
                for (i, port) in service.ports.enumerated() {
                    guard let nodePort = port.nodePort else { continue }
                    let key = "\(nodePort)/\(port.transport.rawValue)"
                    if let (other, at) = nodePorts[key] {
                        errors.append(ManifestError(located.location, field: "spec.ports[\(i)].nodePort",
                                                    "node port \(key) is already allocated to Service \(other) at \(at)"))
                        taken = true
                    }
                }
                if taken { continue }
                for port in service.ports {
                    if let nodePort = port.nodePort {
                        nodePorts["\(nodePort)/\(port.transport.rawValue)"] = (service.metadata.qualifiedName, located.location)
                    }
                }
                for external in service.externalAddresses {
                    externalAt[external.address] = externalAt[external.address] ?? (service.metadata.qualifiedName, located.location, external.field)
                    for port in service.ports {
                        externalFrontends[Frontend(vip: external.address, port: port.port, transport: port.transport)] =
                            (service.metadata.qualifiedName, located.location)
                    }
                }
                state.services.append(service)
            case .workload(let workload):
                if let (other, at) = addresses[workload.address] {
                    errors.append(ManifestError(located.location, field: "spec.address",
                                                "address \(workload.address) is already used by Workload \(other) at \(at)"))
                    continue
                }
                addresses[workload.address] = (workload.metadata.qualifiedName, located.location)
                state.workloads.append(workload)
            case .namespace(let namespace, _):
                state.namespaces[namespace.name] = namespace
            case .node(let node, _):
                state.nodes[node.name] = node
            case .networkPolicy(let policy):
                state.networkPolicies.append(policy)
            case .httpRoute(let route), .grpcRoute(let route):
                state.httpRoutes.append(route)
            case .l4Route(let route):
                state.l4Routes.append(route)
            case .trafficPolicy(let policy):
                state.trafficPolicies.append(policy)
            case .peerAuthentication(let policy):
                state.peerAuthentications.append(policy)
            case .authorizationPolicy(let policy):
                state.authorizationPolicies.append(policy)
            case .meshConfig(let config):
                if let first = meshConfigAt {
                    errors.append(ManifestError(located.location, field: "metadata.name",
                                                "a cluster has one MeshConfig; another is defined at \(first)"))
                    continue
                }
                meshConfigAt = located.location
                state.meshConfig = config
            }
        } }
        if !state.httpRoutes.isEmpty { errors += checkRouteReferences(resources) }
        if !state.l4Routes.isEmpty { errors += checkL4Routes(resources) }
        if !state.trafficPolicies.isEmpty { errors += checkTrafficPolicyTargets(resources) }
        // A Workload address may not be a Service clusterIP: connect() would be
        // load-balanced away from the pod.
        for w in state.workloads {
            if let (svc, _) = clusterIPs[w.address], let (_, at) = addresses[w.address] {
                errors.append(ManifestError(at, field: "spec.address",
                                            "address \(w.address) is the clusterIP of Service \(svc)"))
            }
            if let (svc, _, field) = externalAt[w.address], let (_, at) = addresses[w.address] {
                errors.append(ManifestError(at, field: "spec.address",
                                            "address \(w.address) is an external address of Service \(svc) (its \(field))"))
            }
        }
        // Nor may an external address be a clusterIP.
        for (ip, (_, at, field)) in externalAt.sorted(by: { $0.key < $1.key }) {
            if let (other, _) = clusterIPs[ip] {
                errors.append(ManifestError(at, field: field, "\(ip) is the clusterIP of Service \(other)"))
            }
        }
        guard errors.isEmpty else { return .failure(ManifestErrors(errors)) }
        state.services.sort { ($0.metadata.namespace, $0.metadata.name) < ($1.metadata.namespace, $1.metadata.name) }
        state.workloads.sort { ($0.metadata.namespace, $0.metadata.name) < ($1.metadata.namespace, $1.metadata.name) }
        state.httpRoutes.sort {
            ($0.metadata.namespace, $0.metadata.name, $0.kind.rawValue) < ($1.metadata.namespace, $1.metadata.name, $1.kind.rawValue)
        }
        state.l4Routes.sort { ($0.metadata.namespace, $0.metadata.name) < ($1.metadata.namespace, $1.metadata.name) }
        state.peerAuthentications.sort { ($0.metadata.namespace, $0.metadata.name) < ($1.metadata.namespace, $1.metadata.name) }
        state.authorizationPolicies.sort { ($0.metadata.namespace, $0.metadata.name) < ($1.metadata.namespace, $1.metadata.name) }
        state.trafficPolicies.sort { ($0.metadata.namespace, $0.metadata.name) < ($1.metadata.namespace, $1.metadata.name) }
        state.networkPolicies.sort { ($0.metadata.namespace, $0.metadata.name) < ($1.metadata.namespace, $1.metadata.name) }
        return .success(state)
    }

    /// Validates parsed resources as a set, together with the errors their
    /// parsing already found: a state only when there are none at all.
    public static func build(_ resources: [LocatedResource], parseErrors: [ManifestError])
        -> Result<ClusterState, ManifestErrors>
    {
        build(chunks: [resources], parseErrors: parseErrors)
    }

    static func build(chunks: [[LocatedResource]], parseErrors: [ManifestError]) -> Result<ClusterState, ManifestErrors> {
        switch build(chunks: chunks) {
        case .success(let state):
            return parseErrors.isEmpty ? .success(state) : .failure(ManifestErrors(parseErrors))
        case .failure(let more):
            return .failure(ManifestErrors(parseErrors + more.errors))
        }
    }

    /// The Workloads a Service selects: same namespace, every selector label
    /// matching. A Service with no selector (or an empty one) selects nothing,
    /// as in Kubernetes, where its endpoints would be managed by hand.
    public func backends(of service: Service) -> [Workload] {
        guard let selector = service.selector, !selector.isEmpty else { return [] }
        return workloads.filter { w in
            w.metadata.namespace == service.metadata.namespace
                && selector.allSatisfy { w.metadata.labels[$0.key] == $0.value }
        }
    }
}

extension ClusterState {
    /// The TrafficPolicy attached to a Service ("namespace/name"), if any.
    public func trafficPolicy(forService qualifiedName: String) -> TrafficPolicy? {
        trafficPolicies.first { p in p.targets.contains { "\(p.metadata.namespace)/\($0)" == qualifiedName } }
    }

    /// A TrafficPolicy must target Services that exist, and a Service takes
    /// at most one: two would leave which one wins to file order.
    static func checkTrafficPolicyTargets(_ resources: some Sequence<LocatedResource>) -> [ManifestError] {
        // Each Service by name: whether it has a TCP port.
        var services: [String: Bool] = [:]
        for located in resources {
            if case .service(let s) = located.resource {
                services[s.metadata.qualifiedName] = s.ports.contains { $0.transport == .tcp }
            }
        }
        var errors: [ManifestError] = []
        var owner: [String: (String, DocumentLocation)] = [:]
        for located in resources {
            guard case .trafficPolicy(let policy) = located.resource else { continue }
            for (i, target) in policy.targets.enumerated() {
                let name = "\(policy.metadata.namespace)/\(target)"
                let field = "spec.targetRefs[\(i)].name"
                guard let hasTCP = services[name] else {
                    errors.append(ManifestError(located.location, field: field, "no Service \(name) in this config"))
                    continue
                }
                // Checks are TCP (or HTTP over it); a UDP port takes its
                // pod's result from the Service's TCP ports.
                if policy.healthCheck != nil, !hasTCP {
                    errors.append(ManifestError(located.location, field: field,
                                                "Service \(name) has no TCP port for healthCheck to probe (a UDP port follows its pod's checks on the Service's TCP ports)"))
                    continue
                }
                if let (other, at) = owner[name] {
                    errors.append(ManifestError(located.location, field: field,
                                                "Service \(name) already has TrafficPolicy \(other) (at \(at)); a Service takes one"))
                    continue
                }
                owner[name] = (policy.metadata.qualifiedName, located.location)
            }
        }
        return errors
    }

    /// A route's parentRef's Service, when it exists and has a clusterIP to
    /// route; else nil, and the error naming `field`.
    static func parentService(_ parent: HTTPRoute.ParentRef, field: String, _ services: [String: Service],
                              _ location: DocumentLocation, _ errors: inout [ManifestError]) -> Service? {
        let name = "\(parent.namespace)/\(parent.name)"
        guard let service = services[name] else {
            errors.append(ManifestError(location, field: field + ".name", "no Service \(name) in this config"))
            return nil
        }
        guard service.clusterIP != nil else {
            errors.append(ManifestError(location, field: field + ".name", "Service \(name) is headless: there is no clusterIP to route"))
            return nil
        }
        return service
    }

    /// An HTTPRoute may name only Services (and ports) that exist: a route
    /// that points nowhere is refused with the rest of its set, so it cannot
    /// silently send traffic into a 500.
    static func checkRouteReferences(_ resources: some Sequence<LocatedResource>) -> [ManifestError] {
        var services: [String: Service] = [:]
        for located in resources {
            if case .service(let s) = located.resource { services[s.metadata.qualifiedName] = s }
        }
        var errors: [ManifestError] = []
        for located in resources {
            let route: HTTPRoute
            switch located.resource {
            case .httpRoute(let r), .grpcRoute(let r): route = r
            default: continue
            }
            let ns = route.metadata.namespace
            for (i, parent) in route.parentRefs.enumerated() {
                let field = "spec.parentRefs[\(i)]"
                guard let service = parentService(parent, field: field, services, located.location, &errors) else { continue }
                if let port = parent.port, !service.ports.contains(where: { $0.port == port && $0.transport == .tcp }) {
                    errors.append(ManifestError(located.location, field: field + ".port",
                                                "Service \(parent.namespace)/\(parent.name) has no TCP port \(port)"))
                } else if let section = parent.sectionName, !service.ports.contains(where: parent.selects) {
                    errors.append(ManifestError(located.location, field: field + ".sectionName",
                                                "Service \(parent.namespace)/\(parent.name) has no TCP port named \(section)"
                                                    + (parent.port.map { " that is port \($0)" } ?? "")))
                }
            }
            for (r, rule) in route.rules.enumerated() {
                var refs: [(String, String, String, UInt16)] = rule.backendRefs.enumerated().map {
                    ("spec.rules[\(r)].backendRefs[\($0.offset)]", $0.element.namespace ?? ns, $0.element.name, $0.element.port)
                }
                for (f, filter) in rule.filters.enumerated() {
                    if case .requestMirror(let m) = filter {
                        refs.append(("spec.rules[\(r)].filters[\(f)].requestMirror.backendRef", m.namespace ?? ns, m.name, m.port))
                    }
                }
                for (field, namespace, name, port) in refs {
                    guard let service = services["\(namespace)/\(name)"] else {
                        errors.append(ManifestError(located.location, field: field + ".name", "no Service \(namespace)/\(name) in this config"))
                        continue
                    }
                    if !service.ports.contains(where: { $0.port == port && $0.transport == .tcp }) {
                        errors.append(ManifestError(located.location, field: field + ".port",
                                                    "Service \(namespace)/\(name) has no TCP port \(port)"))
                    }
                }
            }
        }
        return errors
    }

    /// A TCPRoute, UDPRoute or TLSRoute may name only Services and ports
    /// of its protocol that exist; its parent ports may not declare HTTP
    /// (the node proxy routes those: an HTTPRoute's job); and a Service
    /// port takes one TCPRoute or UDPRoute, or which one splits it would be
    /// left to file order, or any number of TLSRoutes (their hostnames tell
    /// them apart), never both kinds.
    static func checkL4Routes(_ resources: some Sequence<LocatedResource>) -> [ManifestError] {
        var services: [String: Service] = [:]
        for located in resources {
            if case .service(let s) = located.resource { services[s.metadata.qualifiedName] = s }
        }
        var errors: [ManifestError] = []
        var owners: [String: (name: String, at: DocumentLocation, tls: Bool)] = [:]
        // Of those, the ports an HTTPRoute or GRPCRoute holds (the proxy's).
        var proxied: Set<String> = []
        // Ports an HTTPRoute or GRPCRoute attaches to: the node proxy's.
        for located in resources {
            switch located.resource {
            case .httpRoute(let r), .grpcRoute(let r):
                for parent in r.parentRefs {
                    guard let service = services["\(parent.namespace)/\(parent.name)"] else { continue }
                    for p in service.ports where parent.selects(p) {
                        let key = "\(service.metadata.qualifiedName):\(p.port)/TCP"
                        owners[key] = ("\(r.kind.rawValue) \(r.metadata.qualifiedName), which the node proxy carries out,", located.location, false)
                        proxied.insert(key)
                    }
                }
            default:
                continue
            }
        }
        for located in resources {
            guard case .l4Route(let route) = located.resource else { continue }
            let ns = route.metadata.namespace
            let proto = route.kind.transport.rawValue
            for (i, parent) in route.parentRefs.enumerated() {
                let field = "spec.parentRefs[\(i)]"
                guard let service = parentService(parent, field: field, services, located.location, &errors) else { continue }
                let selected = service.ports.filter { p in
                    p.transport == route.kind.transport && (parent.port == nil || parent.port == p.port)
                        && (parent.sectionName == nil || parent.sectionName == p.name)
                }
                guard !selected.isEmpty else {
                    let which = [parent.port.map { " \($0)" }, parent.sectionName.map { " named \($0)" }].compactMap { $0 }.joined()
                    let key = parent.port != nil ? ".port" : parent.sectionName != nil ? ".sectionName" : ".name"
                    errors.append(ManifestError(located.location, field: field + key,
                                                "Service \(service.metadata.qualifiedName) has no \(proto) port\(which)"))
                    continue
                }
                // A parentRef naming no port takes the ports the node proxy
                // does not serve; one naming a port the proxy serves is refused.
                let explicit = parent.port != nil || parent.sectionName != nil
                var taken = 0
                for p in selected {
                    let key = "\(service.metadata.qualifiedName):\(p.port)/\(proto)"
                    if route.kind != .udp, let declared = ProxyTable.declaredProtocol(p) {
                        if explicit {
                            errors.append(ManifestError(located.location, field: field,
                                                        "port \(p.port) of Service \(service.metadata.qualifiedName) declares \(declared == .http2 ? "HTTP/2" : "HTTP"): the node proxy routes it, by HTTPRoute or GRPCRoute"))
                        }
                        continue
                    }
                    if proxied.contains(key) && !explicit { continue }
                    taken += 1
                    if let owner = owners[key] {
                        if owner.tls && route.kind == .tls { continue }
                        let rule = route.kind == .tls || owner.tls ? "TLSRoutes or one TCPRoute, never both" : "one \(route.kind.rawValue)"
                        errors.append(ManifestError(located.location, field: field,
                                                    "\(key) is already split by \(owner.name) (at \(owner.at)); a Service port takes \(rule)"))
                        continue
                    }
                    owners[key] = ("\(route.kind.rawValue) \(route.metadata.qualifiedName)", located.location, route.kind == .tls)
                }
                if taken == 0 && !explicit {
                    errors.append(ManifestError(located.location, field: field + ".name",
                                                "every \(proto) port of Service \(service.metadata.qualifiedName) is the node proxy's (HTTP): nothing for a \(route.kind.rawValue) to split"))
                }
            }
            for (b, ref) in route.backendRefs.enumerated() {
                let field = "spec.rules[0].backendRefs[\(b)]"
                let namespace = ref.namespace ?? ns
                guard let service = services["\(namespace)/\(ref.name)"] else {
                    errors.append(ManifestError(located.location, field: field + ".name", "no Service \(namespace)/\(ref.name) in this config"))
                    continue
                }
                if service.clusterIP == nil {
                    errors.append(ManifestError(located.location, field: field + ".name",
                                                "Service \(service.metadata.qualifiedName) is headless: it has no port table to take backends from"))
                } else if !service.ports.contains(where: { $0.port == ref.port && $0.transport == route.kind.transport }) {
                    errors.append(ManifestError(located.location, field: field + ".port",
                                                "Service \(service.metadata.qualifiedName) has no \(proto) port \(ref.port)"))
                }
            }
        }
        return errors
    }
}
