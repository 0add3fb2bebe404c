/// A `v1 Node`: here only its zone matters (the `topology.kubernetes.io/zone`
/// label, as kubelet and cloud providers set it), for Services'
/// `trafficDistribution: PreferSameZone` and TrafficPolicy locality
/// `PreferSameZone`, and, for topology-aware routing (TopologyHints), its
/// allocatable CPU and whether it is a control-plane node. A node with no manifest, or no zone label, is in no
/// zone: a client there is sent to every ready backend, as Kubernetes sets
/// no hints when nodes carry no zone. A node is the name Workloads give in
/// `spec.node` and the agent is started with.
public struct Node: Hashable, Sendable {
    public var name: String
    public var labels: [String: String]
    /// `status.allocatable.cpu` in thousandths of a core, if the manifest
    /// gives it: a zone's share of the endpoints under topology-aware
    /// routing (TopologyHints) follows its share of these.
    public var allocatableMilliCPU: Int?
    /// Its IPv4 addresses from `status.addresses` (types InternalIP and
    /// ExternalIP), where pods of the mesh may dial a Service's node port.
    public var addresses: [IPv4Address] = []

    /// The well-known zone label.
    public static let zoneLabel = "topology.kubernetes.io/zone"
    /// Labels of control-plane nodes, whose cores topology-aware routing
    /// leaves out (as Kubernetes' EndpointSlice controller does).
    public static let controlPlaneLabels = ["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"]

    /// The node's zone; nil when it has none (no label, or an empty one).
    public var zone: String? { labels[Self.zoneLabel].flatMap { $0.isEmpty ? nil : $0 } }
    public var isControlPlane: Bool { Self.controlPlaneLabels.contains { labels[$0] != nil } }

    public init(name: String, labels: [String: String] = [:], allocatableMilliCPU: Int? = nil) {
        self.name = name
        self.labels = labels
        self.allocatableMilliCPU = allocatableMilliCPU
    }
}

extension Node {
    /// The spec fields a Node exported from a cluster carries, taken and
    /// left alone (they are kubelet's and the scheduler's business).
    static let ignoredSpec = ["podCIDR", "podCIDRs", "providerID", "taints", "unschedulable", "configSource", "externalID"]

    init(spec node: YAMLNode?, status: YAMLNode?, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        if let node {
            var spec = try FieldReader(node, at: location, path: "spec")
            for field in Self.ignoredSpec { spec.ignore(field) }
            try spec.finish()
        }
        // Of the status (kubelet's report), only the allocatable CPU is
        // read; the rest is left alone.
        var cpu: Int?
        var addresses: [IPv4Address] = []
        if let status, case .mapping = status {
            var reader = try FieldReader(status, at: location, path: "status")
            for (path, item) in try reader.list("addresses") ?? [] {
                var address = try FieldReader(item, at: location, path: path)
                guard let type = try address.string("type"), type == "InternalIP" || type == "ExternalIP",
                      let text = try address.string("address"), !text.contains(":") else { continue }
                guard let ip = IPv4Address(text) else {
                    throw ManifestError(location, field: address.field("address"), "\(quoted(text)) is not an IP address")
                }
                if !addresses.contains(ip) { addresses.append(ip) }
            }
            if var allocatable = try reader.mapping("allocatable"), let quantity = allocatable.node("cpu") {
                // (A scalar as written: 4, 0.5 and "3500m" alike.)
                guard case .scalar(let scalar) = quantity, let milli = Self.milliCPU(scalar.string) else {
                    throw ManifestError(location, field: "status.allocatable.cpu",
                                        "not a CPU quantity (such as 4, 0.5 or 3500m): \(FieldReader.describe(quantity))")
                }
                cpu = milli
            }
        }
        self.init(name: metadata.name, labels: metadata.labels, allocatableMilliCPU: cpu)
        self.addresses = addresses
    }

    /// A Kubernetes CPU quantity in thousandths of a core: whole or
    /// decimal cores ("4", "1.5") or thousandths ("3500m"); nil otherwise.
    static func milliCPU(_ text: String) -> Int? {
        if text.hasSuffix("m") {
            guard let m = Int(text.dropLast()), m >= 0, text.dropLast().allSatisfy(\.isASCIIDigit) else { return nil }
            return m
        }
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), parts.allSatisfy({ !$0.isEmpty && $0.allSatisfy(\.isASCIIDigit) }),
              parts[0].count <= 9, let whole = Int(parts[0]) else { return nil }
        let fraction = parts.count == 2 ? String(parts[1].prefix(3)).padding(toLength: 3, withPad: "0", startingAt: 0) : "000"
        return whole * 1000 + (Int(fraction) ?? 0)
    }
}

private extension Character {
    var isASCIIDigit: Bool { isASCII && isNumber }
}
