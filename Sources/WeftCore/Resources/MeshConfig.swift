/// `weft.dev/v1alpha1 MeshConfig`: mesh-wide switches that no standard
/// resource covers. At most one per cluster; without one, the defaults hold.
///
/// ```yaml
/// apiVersion: weft.dev/v1alpha1
/// kind: MeshConfig
/// metadata: {name: mesh}
/// spec:
///   socketShortcut:
///     enabled: true            # default true (the agent's --socket-shortcut off wins)
///     podReceivers: Annotated  # Annotated (default) | All | None
/// ```
public struct MeshConfig: Hashable, Sendable {
    public var metadata: ObjectMeta
    public var socketShortcut = SocketShortcut()

    /// The same-node socket shortcut (docs/shortcut.md). Bytes are only ever
    /// redirected into sockets whose reader is known to use read()/recv():
    /// the node proxy always, and pods as `podReceivers` says.
    public struct SocketShortcut: Hashable, Sendable {
        public enum PodReceivers: String, Hashable, Sendable, CaseIterable {
            /// Pods whose Workload carries `weft.dev/socket-shortcut: receive`.
            case annotated = "Annotated"
            /// Every local pod: the operator vouches that none reads a socket
            /// with splice() or sendfile().
            case all = "All"
            /// No pod: only the hops into the node proxy are shortened.
            case none = "None"
        }
        public var enabled = true
        public var podReceivers = PodReceivers.annotated
        public init() {}
    }

    /// The Workload annotation that makes a pod a shortcut receiver under
    /// `podReceivers: Annotated` ("receive"), or never one ("off").
    public static let receiverAnnotation = "weft.dev/socket-shortcut"

    public init(metadata: ObjectMeta) { self.metadata = metadata }

    /// Whether redirected bytes may be delivered into this pod's sockets.
    public func receives(_ workload: Workload) -> Bool {
        let annotation = workload.metadata.annotations[Self.receiverAnnotation]
        if annotation == "off" { return false }
        switch socketShortcut.podReceivers {
        case .all: return true
        case .none: return false
        case .annotated: return annotation == "receive"
        }
    }
}

extension MeshConfig {
    init(spec node: YAMLNode, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        self.init(metadata: metadata)
        var spec = try FieldReader(node, at: location, path: "spec")
        if var shortcut = try spec.mapping("socketShortcut") {
            if let enabled = try shortcut.bool("enabled") { socketShortcut.enabled = enabled }
            if let receivers = try shortcut.string("podReceivers") {
                guard let value = SocketShortcut.PodReceivers(rawValue: receivers) else {
                    throw shortcut.error("podReceivers", "must be one of \(SocketShortcut.PodReceivers.allCases.map(\.rawValue).joined(separator: ", ")), got \"\(receivers)\"")
                }
                socketShortcut.podReceivers = value
            }
            try shortcut.finish()
        }
        try spec.finish()
    }
}

extension Workload {
    /// Checks the shortcut annotation's value, wherever a Workload is read.
    static func checkShortcutAnnotation(_ metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        guard let value = metadata.annotations[MeshConfig.receiverAnnotation] else { return }
        guard value == "receive" || value == "off" else {
            throw ManifestError(location, field: "metadata.annotations.\(MeshConfig.receiverAnnotation)",
                                "must be \"receive\" or \"off\", got \"\(value)\"")
        }
    }
}
