/// Where a manifest value came from: a file and the 1-based index of the YAML
/// document in it.
public struct DocumentLocation: Hashable, Sendable, CustomStringConvertible {
    public var file: String
    public var document: Int

    public init(file: String, document: Int) {
        self.file = file
        self.document = document
    }

    public var description: String { "\(file):\(document)" }
}

/// One problem with one field of one document, printed as
/// `file:doc:field: reason` — the form `weft validate`, the agent's log and
/// `weft status` all use.
public struct ManifestError: Error, Hashable, Sendable, CustomStringConvertible {
    public var location: DocumentLocation
    /// Dotted path into the document, e.g. `spec.ports[1].targetPort`; empty
    /// when the problem is the document as a whole.
    public var field: String
    public var reason: String
    /// Line in the file, when the YAML parser gave one.
    public var line: Int?

    public init(_ location: DocumentLocation, field: String, _ reason: String, line: Int? = nil) {
        self.location = location
        self.field = field
        self.reason = reason
        self.line = line
    }

    public var description: String {
        let lineNote = line.map { " (line \($0))" } ?? ""
        return "\(location.file):\(location.document):\(field.isEmpty ? "-" : field): \(reason)\(lineNote)"
    }
}

/// Every problem found in a set of manifests. A set with any error is refused
/// whole.
public struct ManifestErrors: Error, Sendable, CustomStringConvertible {
    public var errors: [ManifestError]

    public init(_ errors: [ManifestError]) { self.errors = errors }

    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
