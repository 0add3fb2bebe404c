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
    /// Further problems found in the same document after this one, where
    /// its reader could go on past it (the next item of a list, the next
    /// field of an item; `ErrorList`). Not part of `description`:
    /// `ManifestReader` lists each on a line of its own (`listed`).
    public var further: [ManifestError] = []

    /// A reason longer than `maxReason` characters (a value pasted into
    /// the wrong field, say) keeps its start and its end, where the
    /// explanation is: an error names the problem, it does not echo a
    /// megabyte back.
    public init(_ location: DocumentLocation, field: String, _ reason: String, line: Int? = nil) {
        self.location = location
        self.field = field
        self.reason = elided(reason, keeping: Self.maxReason)
        self.line = line
    }

    public static let maxReason = 1_000

    /// This error and every further one, flat, in the order they were found.
    public var all: [ManifestError] {
        guard !further.isEmpty else { return [self] }
        var first = self
        first.further = []
        return [first] + further.flatMap(\.all)
    }

    /// A document's errors listed at most; past it one more line says how
    /// many were left out (a generated file can be wrong everywhere).
    public static let maxPerDocument = 50

    /// `all`, cut to `maxPerDocument` lines and a last one counting the rest.
    public var listed: [ManifestError] {
        let all = self.all
        guard all.count > Self.maxPerDocument else { return all }
        return Array(all.prefix(Self.maxPerDocument))
            + [ManifestError(location, field: "", "\(all.count - Self.maxPerDocument) more problems in this document not listed")]
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

/// `value` in double quotes, as error messages show what a manifest said;
/// one over 200 characters shows its first 160 and its length instead.
func quoted(_ value: some StringProtocol) -> String {
    let count = value.count
    guard count > 200 else { return "\"\(value)\"" }
    return "\"\(value.prefix(160))…\" (\(count) characters)"
}

/// `text` itself, or its first and last parts with what lies between
/// left out, so that it is at most about `keeping` characters.
func elided(_ text: String, keeping: Int) -> String {
    let count = text.count
    guard count > keeping else { return text }
    let tail = keeping / 2, head = keeping - tail
    return "\(text.prefix(head))…[\(count - head - tail) characters left out]…\(text.suffix(tail))"
}
