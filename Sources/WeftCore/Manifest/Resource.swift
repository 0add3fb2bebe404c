import Yams

/// One parsed, individually valid manifest document.
public enum Resource: Hashable, Sendable {
    case service(Service)
    case workload(Workload)

    public var kind: String {
        switch self {
        case .service: "Service"
        case .workload: "Workload"
        }
    }

    public var metadata: ObjectMeta {
        switch self {
        case .service(let s): s.metadata
        case .workload(let w): w.metadata
        }
    }

    /// The kinds Weft reads, by apiVersion and kind.
    static let known: [String: Set<String>] = [
        "v1": ["Service"],
        "weft.dev/v1alpha1": ["Workload"],
    ]

    init(document node: Node, at location: DocumentLocation) throws(ManifestError) {
        var doc = try FieldReader(node, at: location, path: "")
        let apiVersion = try doc.requiredString("apiVersion")
        let kind = try doc.requiredString("kind")
        guard let kinds = Self.known[apiVersion] else {
            throw doc.error("apiVersion", "unknown apiVersion \"\(apiVersion)\" (known: \(Self.known.keys.sorted().joined(separator: ", ")))")
        }
        guard kinds.contains(kind) else {
            throw doc.error("kind", "unknown kind \"\(kind)\" for \(apiVersion) (known: \(kinds.sorted().joined(separator: ", ")))")
        }
        guard let metaReader = try doc.mapping("metadata") else {
            throw doc.error("metadata", "required field is missing")
        }
        let metadata = try ObjectMeta(reading: metaReader)
        let spec = try doc.required("spec")
        doc.ignore("status")
        try doc.finish()
        switch kind {
        case "Service": self = .service(try Service(spec: spec, metadata: metadata, at: location))
        default: self = .workload(try Workload(spec: spec, metadata: metadata, at: location))
        }
    }
}

/// A resource with the document it came from.
public struct LocatedResource: Hashable, Sendable {
    public var resource: Resource
    public var location: DocumentLocation
}

/// Reads YAML files into resources. Collects every error it can find rather
/// than stopping at the first, so one `weft validate` run lists them all.
public enum ManifestReader {
    /// Parses one file's text. `file` is only used in locations.
    public static func parse(_ text: String, file: String) -> (resources: [LocatedResource], errors: [ManifestError]) {
        var resources: [LocatedResource] = []
        var errors: [ManifestError] = []
        let parser: Parser
        do {
            parser = try Parser(yaml: text, resolver: .basic)
        } catch {
            return ([], [ManifestError(DocumentLocation(file: file, document: 1), field: "", "not valid YAML: \(error)")])
        }
        var index = 0
        while true {
            index += 1
            let location = DocumentLocation(file: file, document: index)
            let root: Node?
            do {
                root = try parser.nextRoot()
            } catch {
                errors.append(ManifestError(location, field: "", "not valid YAML: \(error)"))
                break
            }
            guard let root else { break }
            // An empty document (a stray `---`) is allowed and skipped.
            if case .scalar = root, root.tagName == .null { continue }
            do {
                resources.append(LocatedResource(resource: try Resource(document: root, at: location), location: location))
            } catch {
                errors.append(error)
            }
        }
        return (resources, errors)
    }
}
