/// A `v1 Node`: here only its zone matters (the `topology.kubernetes.io/zone`
/// label, as kubelet and cloud providers set it), for Services'
/// `trafficDistribution: PreferSameZone` and TrafficPolicy locality
/// `PreferSameZone`. A node with no manifest, or no zone label, is in no
/// zone: a client there is sent to every ready backend, as Kubernetes sets
/// no hints when nodes carry no zone. A node is the name Workloads give in
/// `spec.node` and the agent is started with.
public struct Node: Hashable, Sendable {
    public var name: String
    public var labels: [String: String]

    /// The well-known zone label.
    public static let zoneLabel = "topology.kubernetes.io/zone"

    /// The node's zone; nil when it has none (no label, or an empty one).
    public var zone: String? { labels[Self.zoneLabel].flatMap { $0.isEmpty ? nil : $0 } }

    public init(name: String, labels: [String: String] = [:]) {
        self.name = name
        self.labels = labels
    }
}

extension Node {
    /// The spec fields a Node exported from a cluster carries, taken and
    /// left alone (they are kubelet's and the scheduler's business).
    static let ignoredSpec = ["podCIDR", "podCIDRs", "providerID", "taints", "unschedulable", "configSource", "externalID"]

    init(spec node: YAMLNode?, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        if let node {
            var spec = try FieldReader(node, at: location, path: "spec")
            for field in Self.ignoredSpec { spec.ignore(field) }
            try spec.finish()
        }
        self.init(name: metadata.name, labels: metadata.labels)
    }
}
