/// A `v1 Namespace`: here only its labels matter, for NetworkPolicy
/// namespaceSelectors. A namespace that Workloads use without a manifest
/// exists implicitly, with only the label Kubernetes always sets.
public struct Namespace: Hashable, Sendable {
    public var name: String
    public var labels: [String: String]

    /// The label the API server puts on every namespace (Kubernetes 1.22+).
    public static let nameLabel = "kubernetes.io/metadata.name"

    public init(name: String, labels: [String: String] = [:]) {
        self.name = name
        var labels = labels
        labels[Self.nameLabel] = name
        self.labels = labels
    }
}

extension Namespace {
    init(spec node: YAMLNode?, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        if let node {
            var spec = try FieldReader(node, at: location, path: "spec")
            spec.ignore("finalizers")
            try spec.finish()
        }
        if let given = metadata.labels[Self.nameLabel], given != metadata.name {
            throw ManifestError(location, field: "metadata.labels.\(Self.nameLabel)",
                                "must equal the namespace's name \(quoted(metadata.name)), got \(quoted(given))")
        }
        self.init(name: metadata.name, labels: metadata.labels)
    }
}
