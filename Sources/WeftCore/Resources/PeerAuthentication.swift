/// `weft.dev/v1alpha1 PeerAuthentication`, shaped like Istio's: which
/// traffic a pod accepts, by mutual-TLS mode.
///
/// ```yaml
/// apiVersion: weft.dev/v1alpha1
/// kind: PeerAuthentication
/// metadata: {name: default, namespace: weft-system}   # mesh-wide: in weft-system, no selector
/// spec:
///   selector: {matchLabels: {app: web}}   # absent: the whole namespace
///   mtls: {mode: STRICT}                  # STRICT | PERMISSIVE | DISABLE
/// ```
///
/// STRICT: the pod accepts new TCP connections from other nodes only
/// through an mTLS tunnel (plaintext from another node is dropped in the
/// kernel). PERMISSIVE (the default): both. DISABLE: other nodes send to it
/// in plaintext, never through a tunnel. A workload-selector policy wins
/// over its namespace's, which wins over the mesh-wide one.
public struct PeerAuthentication: Hashable, Sendable {
    public enum Mode: String, Hashable, Sendable, CaseIterable, Codable {
        case strict = "STRICT", permissive = "PERMISSIVE", disable = "DISABLE"
    }

    /// The namespace whose selector-less policy applies to the whole mesh.
    public static let rootNamespace = "weft-system"

    public var metadata: ObjectMeta
    public var selector: LabelSelector?
    public var mode: Mode

    public init(metadata: ObjectMeta, selector: LabelSelector?, mode: Mode) {
        self.metadata = metadata
        self.selector = selector
        self.mode = mode
    }
}

extension PeerAuthentication {
    init(spec node: YAMLNode, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        var spec = try FieldReader(node, at: location, path: "spec")
        // Each field is read on its own, so that one mistake does not hide
        // the next.
        var found = ErrorList()
        let selector = found.attempt { () throws(ManifestError) in try spec.optionalSelector() } ?? nil
        let mode = found.attempt { () throws(ManifestError) in
            guard var mtls = try spec.mapping("mtls") else { throw spec.error("mtls", "required field is missing") }
            let text = try mtls.requiredString("mode")
            guard let mode = Mode(rawValue: text) else {
                throw mtls.error("mode", "must be one of STRICT, PERMISSIVE, DISABLE, got \(quoted(text))")
            }
            try mtls.finish()
            return mode
        } ?? .strict  // (only when check() below throws)
        spec.ignore("portLevelMtls")
        if spec.keys.contains("portLevelMtls") {
            found.append(spec.error("portLevelMtls", "not supported: set the mode per workload with a selector"))
        }
        try found.check(finishing: spec)
        self.init(metadata: metadata, selector: selector, mode: mode)
    }
}

extension ClusterState {
    /// A workload's mTLS mode: its own (selector) policy, else its
    /// namespace's, else the mesh-wide one, else PERMISSIVE. Among several
    /// at one level, the first by name.
    public func mtlsMode(_ workload: Workload) -> PeerAuthentication.Mode {
        let ns = workload.metadata.namespace
        if let p = peerAuthentications.first(where: { $0.metadata.namespace == ns && ($0.selector?.matches(workload.metadata.labels) ?? false) }) {
            return p.mode
        }
        if let p = peerAuthentications.first(where: { $0.metadata.namespace == ns && $0.selector == nil }) { return p.mode }
        if let p = peerAuthentications.first(where: { $0.metadata.namespace == PeerAuthentication.rootNamespace && $0.selector == nil }) {
            return p.mode
        }
        return .permissive
    }
}
