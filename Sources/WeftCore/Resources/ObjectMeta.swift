/// The parts of Kubernetes `metadata` that Weft reads. Server-set fields
/// (uid, resourceVersion, ...) are accepted so exported manifests apply as
/// they are, and ignored.
public struct ObjectMeta: Hashable, Sendable {
    public var name: String
    public var namespace: String
    public var labels: [String: String]
    public var annotations: [String: String]

    public init(name: String, namespace: String = "default", labels: [String: String] = [:],
                annotations: [String: String] = [:]) {
        self.name = name
        self.namespace = namespace
        self.labels = labels
        self.annotations = annotations
    }

    /// `namespace/name`, the way kubectl prints a namespaced object.
    public var qualifiedName: String { "\(namespace)/\(name)" }

    static let serverSetFields = ["uid", "resourceVersion", "generation", "creationTimestamp",
                                  "managedFields", "ownerReferences", "finalizers", "generateName"]

    /// The name and namespace as a document wrote them, whatever they are:
    /// what its spec is read under when its metadata has an error, so that
    /// the spec's errors are found too (the document is refused either way).
    static func asWritten(_ reader: FieldReader) -> ObjectMeta {
        var r = reader
        let name = (try? r.string("name")) ?? ""
        let namespace = (try? r.string("namespace")) ?? "default"
        return ObjectMeta(name: name, namespace: namespace)
    }

    init(reading reader: FieldReader) throws(ManifestError) {
        var r = reader
        let name = try r.requiredString("name")
        try Validation.dnsLabel(name, field: r.field("name"), at: r.location)
        let namespace = try r.string("namespace") ?? "default"
        try Validation.dnsLabel(namespace, field: r.field("namespace"), at: r.location)
        let labels = try r.stringMap("labels") ?? [:]
        for (key, value) in labels {
            try Validation.labelKey(key, field: r.field("labels"), at: r.location)
            try Validation.labelValue(value, field: "\(r.field("labels")).\(key)", at: r.location)
        }
        let annotations = try r.stringMap("annotations") ?? [:]
        for key in Self.serverSetFields { r.ignore(key) }
        try r.finish()
        self.init(name: name, namespace: namespace, labels: labels, annotations: annotations)
    }
}
