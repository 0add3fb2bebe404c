/// A `weft.dev/v1alpha1 Workload`: one pod as Weft sees it, with what the
/// CNI and kubelet would have given it on Kubernetes — node, address, cgroup —
/// plus the labels and serviceAccount that make it a backend and an identity.
public struct Workload: Hashable, Sendable {
    public var metadata: ObjectMeta
    public var serviceAccount: String
    public var node: String
    public var address: IPv4Address
    public var ports: [WorkloadPort]
    /// The pod's cgroup v2 directory: absolute, or relative to its node's
    /// cgroup (the agent's --cgroup). nil: the lab's default, `<namespace>-<name>`.
    public var cgroup: String?

    public init(metadata: ObjectMeta, serviceAccount: String = "default", node: String,
                address: IPv4Address, ports: [WorkloadPort] = [], cgroup: String? = nil) {
        self.metadata = metadata
        self.serviceAccount = serviceAccount
        self.node = node
        self.address = address
        self.ports = ports
        self.cgroup = cgroup
    }

    /// The port a Service's targetPort reaches on this workload, if any.
    public func resolve(_ target: TargetPort, transport: TransportProtocol) -> UInt16? {
        switch target {
        case .number(let n): n
        case .name(let name): ports.first { $0.name == name && $0.transport == transport }?.port
        }
    }

    /// The cgroup directory relative to the node's cgroup, as the lab lays it out.
    public var cgroupPath: String { cgroup ?? "\(metadata.namespace)-\(metadata.name)" }
}

public struct WorkloadPort: Hashable, Sendable {
    public var name: String?
    public var port: UInt16
    public var transport: TransportProtocol

    public init(name: String? = nil, port: UInt16, transport: TransportProtocol = .tcp) {
        self.name = name
        self.port = port
        self.transport = transport
    }
}

extension Workload {
    init(spec node: YAMLNode, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        // Each field is read on its own, so that one mistake does not hide
        // the next.
        var found = ErrorList()
        let serviceAccount = found.attempt { () throws(ManifestError) in
            let name = try spec.string("serviceAccount") ?? "default"
            try Validation.dnsLabel(name, field: spec.field("serviceAccount"), at: location)
            return name
        } ?? "default"
        let nodeName = found.attempt { () throws(ManifestError) in
            let name = try spec.requiredString("node")
            try Validation.dnsLabel(name, field: spec.field("node"), at: location)
            return name
        } ?? ""
        let address = found.attempt { () throws(ManifestError) in
            let text = try spec.requiredString("address")
            guard let address = IPv4Address(text) else { throw spec.error("address", "\(quoted(text)) is not an IPv4 address") }
            return address
        } ?? IPv4Address(0)  // (only when check() below throws)
        var ports: [WorkloadPort] = []
        _ = found.each(&spec, "ports") { path, portNode throws(ManifestError) in
            var r = try FieldReader(portNode, at: location, path: path)
            let name = try r.string("name")
            if let name { try Validation.portName(name, field: r.field("name"), at: location) }
            guard let number = try r.int("port") else { throw r.error("port", "required field is missing") }
            let port = try Validation.port(number, field: r.field("port"), at: location)
            let transport = try Validation.transportProtocol(try r.string("protocol"), field: r.field("protocol"), at: location)
            try r.finish()
            if let name, ports.contains(where: { $0.name == name }) {
                throw ManifestError(location, field: "\(path).name", "duplicate port name \(quoted(name))")
            }
            ports.append(WorkloadPort(name: name, port: port, transport: transport))
        }
        let cgroup = found.attempt { () throws(ManifestError) in
            let cgroup = try spec.string("cgroup")
            if let cgroup {
                let parts = cgroup.split(separator: "/")
                if cgroup.isEmpty || parts.contains("..") || parts.contains(".") {
                    throw spec.error("cgroup", "\(quoted(cgroup)) is not a usable cgroup path (no '.' or '..' parts)")
                }
            }
            return cgroup
        } ?? nil
        try found.check(finishing: spec)
        self.init(metadata: metadata, serviceAccount: serviceAccount, node: nodeName, address: address,
                  ports: ports, cgroup: cgroup)
    }
}
