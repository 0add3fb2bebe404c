/// A `v1 Service` of type ClusterIP: a virtual address whose ports the kernel
/// load-balances over the Workloads its selector picks. (Type NodePort and
/// LoadBalancer are taken for the same clusterIP, and their external
/// addresses and node ports are served like it for pods of the mesh that
/// dial them; traffic from outside is not the mesh's.)
public struct Service: Hashable, Sendable {
    public var metadata: ObjectMeta
    /// nil for a headless Service (`clusterIP: None`): no virtual address.
    public var clusterIP: IPv4Address?
    /// nil: no selector, so no automatic backends (as in Kubernetes).
    public var selector: [String: String]?
    public var ports: [ServicePort]
    /// `sessionAffinity: ClientIP`: how long, in seconds, a client keeps the
    /// backend it was given since its last new connection (or datagram) to
    /// the port (`sessionAffinityConfig.clientIP.timeoutSeconds`, default
    /// 10800). nil: `None`.
    public var affinityTimeout: UInt32?
    /// `internalTrafficPolicy: Local`: a client is sent only to backends on
    /// its own node (none there: the connection is refused).
    public var nodeLocal: Bool
    /// `trafficDistribution` (Kubernetes 1.31+): a preference, not a limit.
    public var trafficDistribution: TrafficDistribution?

    /// `spec.trafficDistribution`'s values.
    public enum TrafficDistribution: String, Hashable, Sendable, CaseIterable {
        /// A client is sent to the ready backends on its own node while
        /// there are any, else to every ready backend.
        case preferSameNode = "PreferSameNode"
        /// A client is sent to the ready backends on the nodes of its own
        /// node's zone (Node manifests' `topology.kubernetes.io/zone`)
        /// while there are any, else to every ready backend. A client on
        /// a node with no zone: every ready backend, as Kubernetes sets no
        /// hints when nodes carry no zone label.
        case preferSameZone = "PreferSameZone"
        /// The older name of PreferSameZone.
        case preferClose = "PreferClose"
    }

    /// Whether a client's own node's ready backends go first.
    public var prefersSameNode: Bool { trafficDistribution == .preferSameNode }
    /// Whether the ready backends in a client's own zone go first.
    public var prefersSameZone: Bool { trafficDistribution == .preferSameZone || trafficDistribution == .preferClose }
    /// Kubernetes' topology-aware routing: the annotation
    /// `service.kubernetes.io/topology-mode: Auto`, or its older name
    /// `service.kubernetes.io/topology-aware-hints: auto` (any other value
    /// is "disabled", as in Kubernetes). Where it holds (TopologyHints), it
    /// goes before `trafficDistribution`, as Kubernetes has it.
    public var topologyAware: Bool {
        TopologyHints.annotations.contains { metadata.annotations[$0]?.lowercased() == "auto" }
    }
    /// `publishNotReadyAddresses: true`: every selected pod backs the
    /// Service whether or not it is ready, as Kubernetes' endpoints then
    /// list it; here, a pod failing a TrafficPolicy's health check stays a
    /// backend (the proxy's outlier ejections, which Kubernetes has no part
    /// in, still apply).
    public var publishNotReadyAddresses: Bool
    /// Addresses outside the Service range that pods of the mesh may dial
    /// for this Service, served like its clusterIP (as kube-proxy sends
    /// in-cluster traffic for them straight to the endpoints): `externalIPs`,
    /// and for type LoadBalancer `loadBalancerIP` and the load balancer's
    /// `status.loadBalancer.ingress[].ip` (but those with `ipMode: Proxy`,
    /// whose traffic must go through the load balancer). Each with the
    /// field it came from, for errors.
    public var externalAddresses: [ExternalAddress]

    public struct ExternalAddress: Hashable, Sendable {
        public var address: IPv4Address
        public var field: String
        public init(address: IPv4Address, field: String) {
            self.address = address
            self.field = field
        }
    }

    public init(metadata: ObjectMeta, clusterIP: IPv4Address?, selector: [String: String]?, ports: [ServicePort],
                affinityTimeout: UInt32? = nil, nodeLocal: Bool = false, trafficDistribution: TrafficDistribution? = nil,
                publishNotReadyAddresses: Bool = false, externalAddresses: [ExternalAddress] = []) {
        self.metadata = metadata
        self.clusterIP = clusterIP
        self.selector = selector
        self.ports = ports
        self.affinityTimeout = affinityTimeout
        self.nodeLocal = nodeLocal
        self.trafficDistribution = trafficDistribution
        self.publishNotReadyAddresses = publishNotReadyAddresses
        self.externalAddresses = externalAddresses
    }

    /// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
    public static let defaultAffinityTimeout: UInt32 = 10_800
    /// Kubernetes' bounds for it (one day at most).
    public static let affinityTimeouts: ClosedRange<Int> = 1...86_400
}

public struct ServicePort: Hashable, Sendable {
    public var name: String?
    public var port: UInt16
    public var targetPort: TargetPort
    public var transport: TransportProtocol
    public var appProtocol: String?
    /// A NodePort or LoadBalancer Service's node port: pods of the mesh
    /// that dial it on a node's address (Node `status.addresses`) reach the
    /// Service as through its clusterIP.
    public var nodePort: UInt16?

    public init(name: String? = nil, port: UInt16, targetPort: TargetPort? = nil,
                transport: TransportProtocol = .tcp, appProtocol: String? = nil, nodePort: UInt16? = nil) {
        self.name = name
        self.port = port
        self.targetPort = targetPort ?? .number(port)
        self.transport = transport
        self.appProtocol = appProtocol
        self.nodePort = nodePort
    }
}

/// `targetPort`: a number, or the name of a port each backend declares.
public enum TargetPort: Hashable, Sendable, CustomStringConvertible {
    case number(UInt16)
    case name(String)

    public var description: String {
        switch self {
        case .number(let n): "\(n)"
        case .name(let s): s
        }
    }
}

extension Service {
    /// Its fields are read each on its own, so that a bad clusterIP does not
    /// hide a bad port.
    init(spec node: YAMLNode, status: YAMLNode? = nil, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        // Keys a group below reads after its first: known even when the
        // group fails before it reads them (finish() names unknown keys).
        spec.ignore("clusterIPs", "sessionAffinityConfig")
        var found = ErrorList()
        var loadBalancer = false
        var clusterIPType = false
        found.attempt { () throws(ManifestError) in
            switch try spec.string("type") {
            case nil, "ClusterIP"?:
                clusterIPType = true
            case let type? where type == "NodePort" || type == "LoadBalancer":
                // Served for their clusterIP, which is what pods dial, a
                // load balancer's addresses (externalAddresses) and node
                // ports (ClusterState.aliases). Traffic from outside the
                // cluster is not the mesh's to carry: the fields for it are
                // read (and checked where Kubernetes checks them) and
                // change nothing here.
                loadBalancer = type == "LoadBalancer"
                spec.ignore("healthCheckNodePort", "loadBalancerIP", "loadBalancerSourceRanges", "loadBalancerClass",
                            "allocateLoadBalancerNodePorts")
                if let policy = try spec.string("externalTrafficPolicy"), policy != "Cluster", policy != "Local" {
                    throw spec.error("externalTrafficPolicy", "must be Cluster or Local, got \(quoted(policy))")
                }
            case "ExternalName"?:
                throw spec.error("type", "an ExternalName Service is a DNS alias with no address for Weft to serve: leave it out")
            case let other?:
                throw spec.error("type", "must be ClusterIP, NodePort or LoadBalancer, got \(quoted(other))")
            }
        }
        let clusterIP = found.attempt { () throws(ManifestError) in try Self.clusterIP(&spec, at: location) } ?? nil
        let selector = found.attempt { () throws(ManifestError) in
            let selector = try spec.stringMap("selector")
            for (key, value) in selector ?? [:] {
                try Validation.labelKey(key, field: spec.field("selector"), at: location)
                try Validation.labelValue(value, field: "\(spec.field("selector")).\(key)", at: location)
            }
            return selector
        } ?? nil
        let ports = Self.ports(&spec, &found, at: location)
        for (i, port) in ports.enumerated() where clusterIPType && port.nodePort != nil {
            found.append(ManifestError(location, field: "spec.ports[\(i)].nodePort", "may not be used when type is ClusterIP"))
        }
        // Accepted for compatibility with exported manifests; they do not change
        // how a ClusterIP Service is load-balanced here (IPv4 single-stack).
        spec.ignore("ipFamilies", "ipFamilyPolicy")
        let nodeLocal = found.attempt { () throws(ManifestError) in
            switch try spec.string("internalTrafficPolicy") {
            case nil, "Cluster"?: return false
            case "Local"?: return true
            case let other?: throw spec.error("internalTrafficPolicy", "must be Cluster or Local, got \(quoted(other))")
            }
        } ?? false
        let distribution = found.attempt { () throws(ManifestError) in
            try spec.oneOf("trafficDistribution", TrafficDistribution.self)
        } ?? nil
        let notReady = found.attempt { () throws(ManifestError) in try spec.bool("publishNotReadyAddresses") } ?? nil
        let affinityTimeout = found.attempt { () throws(ManifestError) in try Self.affinityTimeout(&spec) } ?? nil
        let external = found.attempt { () throws(ManifestError) in
            try Self.externalAddresses(&spec, status: status, loadBalancer: loadBalancer, at: location)
        } ?? []
        try found.check(finishing: spec)
        self.init(metadata: metadata, clusterIP: clusterIP, selector: selector, ports: ports, affinityTimeout: affinityTimeout,
                  nodeLocal: nodeLocal, trafficDistribution: distribution, publishNotReadyAddresses: notReady ?? false,
                  externalAddresses: external)
    }

    /// `externalIPs`; for a LoadBalancer, `loadBalancerIP` and the status's
    /// ingress addresses. IPv6 addresses are left out (IPv4 single-stack,
    /// as for clusterIPs); anything else that is not an IPv4 address is
    /// refused. The rest of the status is the cluster's and left alone.
    private static func externalAddresses(_ spec: inout FieldReader, status: YAMLNode?, loadBalancer: Bool,
                                          at location: DocumentLocation) throws(ManifestError) -> [ExternalAddress] {
        var found: [ExternalAddress] = []
        func take(_ text: String, _ field: String) throws(ManifestError) {
            if text.contains(":") { return }
            guard let ip = IPv4Address(text) else {
                throw ManifestError(location, field: field, "\(quoted(text)) is not an IP address")
            }
            if !found.contains(where: { $0.address == ip }) { found.append(ExternalAddress(address: ip, field: field)) }
        }
        for (path, node) in try spec.list("externalIPs") ?? [] {
            try take(try FieldReader.string(node, at: location, path: path), path)
        }
        if loadBalancer, let text = try spec.string("loadBalancerIP"), !text.isEmpty {
            try take(text, spec.field("loadBalancerIP"))
        }
        if loadBalancer, let status, case .mapping = status {
            var reader = try FieldReader(status, at: location, path: "status")
            if var balancer = try reader.mapping("loadBalancer") {
                for (path, node) in try balancer.list("ingress") ?? [] {
                    var ingress = try FieldReader(node, at: location, path: path)
                    guard try ingress.string("ipMode") != "Proxy", let ip = try ingress.string("ip") else { continue }
                    try take(ip, ingress.field("ip"))
                }
            }
        }
        return found
    }

    /// `clusterIP` (nil for None), and `clusterIPs` if given, which must say the same.
    private static func clusterIP(_ spec: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> IPv4Address? {
        var clusterIP: IPv4Address?
        let ipText = try spec.string("clusterIP")
        switch ipText {
        case nil:
            throw spec.error("clusterIP", "required field is missing: Weft does not allocate clusterIPs, give one (lab range 198.19.0.0/16) or None")
        case "None"?:
            clusterIP = nil
        case let text?:
            guard let ip = IPv4Address(text) else {
                throw spec.error("clusterIP", "\(quoted(text)) is not an IPv4 address")
            }
            clusterIP = ip
        }
        if let ips = try spec.list("clusterIPs") {
            let texts = try ips.map { (path, node) throws(ManifestError) in
                try FieldReader.string(node, at: location, path: path)
            }
            if texts != [ipText ?? ""] {
                throw spec.error("clusterIPs", "must equal [clusterIP] (IPv4 single-stack only)")
            }
        }
        return clusterIP
    }

    /// `ports`, every bad one's error kept in `found`.
    private static func ports(_ spec: inout FieldReader, _ found: inout ErrorList, at location: DocumentLocation) -> [ServicePort] {
        guard let portNodes = found.attempt({ () throws(ManifestError) in
            guard let nodes = try spec.list("ports"), !nodes.isEmpty else {
                throw spec.error("ports", "a Service needs at least one port")
            }
            return nodes
        }) else { return [] }
        var ports: [ServicePort] = []
        _ = found.each(portNodes) { path, node throws(ManifestError) in
            let port = try ServicePort(node, path: path, at: location)
            if portNodes.count > 1, port.name == nil {
                throw ManifestError(location, field: "\(path).name", "required when a Service has more than one port")
            }
            if let name = port.name, ports.contains(where: { $0.name == name }) {
                throw ManifestError(location, field: "\(path).name", "duplicate port name \(quoted(name))")
            }
            if ports.contains(where: { $0.port == port.port && $0.transport == port.transport }) {
                throw ManifestError(location, field: "\(path).port", "duplicate port \(port.port)/\(port.transport.rawValue)")
            }
            ports.append(port)
        }
        return ports
    }

    /// The ClientIP affinity's timeout in seconds, nil for sessionAffinity None.
    private static func affinityTimeout(_ spec: inout FieldReader) throws(ManifestError) -> UInt32? {
        var affinityTimeout: UInt32?
        switch try spec.string("sessionAffinity") {
        case nil, "None"?:
            if spec.node("sessionAffinityConfig") != nil {
                throw spec.error("sessionAffinityConfig", "must not be set unless sessionAffinity is ClientIP")
            }
        case "ClientIP"?:
            affinityTimeout = Self.defaultAffinityTimeout
            if var config = try spec.mapping("sessionAffinityConfig") {
                if var clientIP = try config.mapping("clientIP") {
                    if let seconds = try clientIP.int("timeoutSeconds") {
                        guard Self.affinityTimeouts.contains(seconds) else {
                            throw clientIP.error("timeoutSeconds", "must be from 1 to 86400 seconds, got \(seconds)")
                        }
                        affinityTimeout = UInt32(seconds)
                    }
                    try clientIP.finish()
                }
                try config.finish()
            }
        case let other?:
            throw spec.error("sessionAffinity", "must be None or ClientIP, got \(quoted(other))")
        }
        return affinityTimeout
    }
}

extension ServicePort {
    /// Its fields are read each on its own, so that one mistake does not
    /// hide the next.
    init(_ node: YAMLNode, path: String, at location: DocumentLocation) throws(ManifestError) {
        var r = try FieldReader(node, at: location, path: path)
        var found = ErrorList()
        let name = found.attempt { () throws(ManifestError) in
            let name = try r.string("name")
            if let name { try Validation.portName(name, field: r.field("name"), at: location) }
            return name
        } ?? nil
        let port: UInt16 = found.attempt { () throws(ManifestError) in
            guard let number = try r.int("port") else { throw r.error("port", "required field is missing") }
            return try Validation.port(number, field: r.field("port"), at: location)
        } ?? 0  // (only when check() below throws)
        let target = found.attempt { () throws(ManifestError) in
            guard let targetNode = r.node("targetPort") else { return TargetPort?.none }
            if targetNode.tagName == .int {
                let n = try FieldReader.int(targetNode, at: location, path: r.field("targetPort"))
                return .number(try Validation.port(n, field: r.field("targetPort"), at: location))
            }
            let s = try FieldReader.string(targetNode, at: location, path: r.field("targetPort"))
            try Validation.portName(s, field: r.field("targetPort"), at: location)
            return .name(s)
        } ?? nil
        let transport = found.attempt { () throws(ManifestError) in
            let transport = try Validation.transportProtocol(try r.string("protocol"), field: r.field("protocol"), at: location)
            if transport == .sctp {
                throw r.error("protocol", "SCTP Services are not load-balanced by Weft; use TCP or UDP")
            }
            return transport
        } ?? .tcp
        let appProtocol = found.attempt { () throws(ManifestError) in
            let appProtocol = try r.string("appProtocol")
            if let appProtocol, !Validation.isQualifiedName(appProtocol) {
                throw r.error("appProtocol", "\(quoted(appProtocol)) is not a valid appProtocol: a name such as http, grpc or kubernetes.io/h2c")
            }
            return appProtocol
        } ?? nil
        let nodePort = found.attempt { () throws(ManifestError) in
            try r.int("nodePort").map { n throws(ManifestError) in try Validation.port(n, field: r.field("nodePort"), at: location) }
        } ?? nil
        try found.check(finishing: r)
        self.init(name: name, port: port, targetPort: target, transport: transport, appProtocol: appProtocol, nodePort: nodePort)
    }
}
