/// A strict, path-tracking view of one YAML mapping. Every read names the
/// field it reads, so an error can say exactly which one is wrong; `finish()`
/// rejects any key nobody read, which is how unknown fields become errors.
struct FieldReader {
    let location: DocumentLocation
    let path: String
    private let pairs: [(key: String, value: YAMLNode, line: Int?)]
    /// Which pairs a reader asked for, by index (mappings here are small:
    /// a linear scan beats hashing every key).
    private var read: [Bool]

    init(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) {
        self.location = location
        self.path = path
        guard case .mapping(let mapping, _) = node else {
            throw ManifestError(location, field: path, "expected a mapping, got \(Self.describe(node))",
                                line: node.line)
        }
        var pairs: [(key: String, value: YAMLNode, line: Int?)] = []
        pairs.reserveCapacity(mapping.count)
        for (key, value) in mapping {
            guard case .scalar(let scalar) = key else {
                throw ManifestError(location, field: path, "mapping keys must be strings", line: key.line)
            }
            guard !pairs.contains(where: { $0.key == scalar.string }) else {
                throw ManifestError(location, field: Self.join(path, scalar.string), "duplicate key",
                                    line: key.line)
            }
            pairs.append((scalar.string, value, key.line))
        }
        self.pairs = pairs
        self.read = Array(repeating: false, count: pairs.count)
    }

    static func join(_ path: String, _ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    static func describe(_ node: YAMLNode) -> String {
        switch node {
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        case .scalar:
            switch node.tagName {
            case .int: return "a number"
            case .float: return "a number"
            case .bool: return "a boolean"
            case .null: return "null"
            default: return "a string"
            }
        }
    }

    func field(_ key: String) -> String { Self.join(path, key) }

    func error(_ key: String, _ reason: String) -> ManifestError {
        let line = pairs.first { $0.key == key }?.line
        return ManifestError(location, field: field(key), reason, line: line)
    }

    /// The raw node for `key`, marking it read. A YAML null counts as absent.
    mutating func node(_ key: String) -> YAMLNode? {
        guard let i = pairs.firstIndex(where: { $0.key == key }) else { return nil }
        read[i] = true
        let node = pairs[i].value
        if case .scalar = node, node.tagName == .null { return nil }
        return node
    }

    mutating func required(_ key: String) throws(ManifestError) -> YAMLNode {
        guard let node = node(key) else { throw error(key, "required field is missing") }
        return node
    }

    mutating func string(_ key: String) throws(ManifestError) -> String? {
        guard let node = node(key) else { return nil }
        return try Self.string(node, at: location, path: field(key))
    }

    mutating func requiredString(_ key: String) throws(ManifestError) -> String {
        guard let value = try string(key) else { throw error(key, "required field is missing") }
        guard !value.isEmpty else { throw error(key, "must not be empty") }
        return value
    }

    /// A string naming one of `E`'s cases by its raw value.
    mutating func oneOf<E: CaseIterable & RawRepresentable>(_ key: String, _: E.Type) throws(ManifestError) -> E?
        where E.RawValue == String {
        guard let text = try string(key) else { return nil }
        guard let value = E(rawValue: text) else {
            throw error(key, "must be one of \(E.allCases.map(\.rawValue).joined(separator: ", ")), got \(quoted(text))")
        }
        return value
    }

    mutating func int(_ key: String) throws(ManifestError) -> Int? {
        guard let node = node(key) else { return nil }
        return try Self.int(node, at: location, path: field(key))
    }

    mutating func bool(_ key: String) throws(ManifestError) -> Bool? {
        guard let node = node(key) else { return nil }
        guard case .scalar(let scalar) = node, node.tagName == .bool else {
            throw error(key, "expected true or false, got \(Self.describe(node))")
        }
        return ["true", "True", "TRUE", "yes", "Yes", "on", "On"].contains(scalar.string)
    }

    mutating func mapping(_ key: String) throws(ManifestError) -> FieldReader? {
        guard let node = node(key) else { return nil }
        return try FieldReader(node, at: location, path: field(key))
    }

    mutating func list(_ key: String) throws(ManifestError) -> [(path: String, node: YAMLNode)]? {
        guard let node = node(key) else { return nil }
        guard case .sequence(let sequence, _) = node else {
            throw error(key, "expected a list, got \(Self.describe(node))")
        }
        return sequence.enumerated().map { ("\(field(key))[\($0.offset)]", $0.element) }
    }

    /// `list(key)`, refused over `maxItems` entries (a limit of the API's
    /// own schema, which a Kubernetes API server would enforce).
    mutating func list(_ key: String, maxItems: Int) throws(ManifestError) -> [(path: String, node: YAMLNode)]? {
        guard let items = try list(key) else { return nil }
        guard items.count <= maxItems else { throw error(key, "at most \(maxItems) entries, got \(items.count)") }
        return items
    }

    /// A `map[string]string`, as labels, annotations and selectors are.
    mutating func stringMap(_ key: String) throws(ManifestError) -> [String: String]? {
        guard let node = node(key) else { return nil }
        let map = try FieldReader(node, at: location, path: field(key))
        var out: [String: String] = [:]
        for pair in map.pairs {
            out[pair.key] = try Self.string(pair.value, at: location, path: map.field(pair.key))
        }
        return out
    }

    /// Keys present in the mapping, in document order.
    var keys: [String] { pairs.map(\.key) }

    /// Marks a field as known without reading it (accepted and ignored).
    mutating func ignore(_ keys: String...) {
        for (i, pair) in pairs.enumerated() where keys.contains(pair.key) { read[i] = true }
    }

    /// Fails on the keys that no reader asked for, naming each.
    func finish() throws(ManifestError) {
        guard read.contains(false) else { return }
        var found = ErrorList()
        for (i, pair) in pairs.enumerated() where !read[i] { found.append(error(pair.key, "unknown field")) }
        try found.check()
    }

    static func string(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) -> String {
        guard case .scalar(let scalar) = node, node.tagName == .str else {
            throw ManifestError(location, field: path, "expected a string, got \(describe(node))",
                                line: node.line)
        }
        return scalar.string
    }

    static func int(_ node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) -> Int {
        guard let value = node.coreInt else {
            throw ManifestError(location, field: path, "expected an integer, got \(describe(node))",
                                line: node.line)
        }
        return value
    }
}

/// The errors found so far in one document, so that one wrong field does not
/// hide the next: a reader goes on to a list's next item, or to an item's
/// next field where the two do not depend on each other, and `check()` throws
/// them together (the first, with the others as its `further`), as an API
/// server lists every invalid field of an object it refuses. Checks that join
/// fields together come after `check()`, on fields read whole; a mapping read
/// field by field ends with `check(finishing:)`. A group that
/// reads several keys of one reader marks the later ones known first
/// (`ignore`), or a failure before it reads them would have `finish()` call
/// them unknown.
struct ErrorList {
    private(set) var errors: [ManifestError] = []

    mutating func append(_ error: ManifestError) { errors.append(contentsOf: error.all) }

    /// `body`'s value, or nil with its error kept.
    mutating func attempt<T>(_ body: () throws(ManifestError) -> T) -> T? {
        do { return try body() } catch {
            append(error)
            return nil
        }
    }

    /// `body`'s value, when it gives one, written to `target`'s `field`
    /// (left as it was when absent); its error kept.
    mutating func set<Root, Value>(_ target: inout Root, _ field: WritableKeyPath<Root, Value>,
                                   _ body: () throws(ManifestError) -> Value?) {
        if let value = attempt(body) ?? nil { target[keyPath: field] = value }
    }

    /// Every item of a list read by `read`; an item that fails is left out
    /// and its error kept.
    mutating func each<T>(_ items: [(path: String, node: YAMLNode)]?,
                          _ read: (_ path: String, _ node: YAMLNode) throws(ManifestError) -> T) -> [T] {
        var out: [T] = []
        for (path, node) in items ?? [] {
            if let value = attempt({ () throws(ManifestError) in try read(path, node) }) { out.append(value) }
        }
        return out
    }

    /// `reader.list(key, maxItems:)`, each item read by `read` as `each` does.
    mutating func each<T>(_ reader: inout FieldReader, _ key: String, maxItems: Int = .max,
                          _ read: (_ path: String, _ node: YAMLNode) throws(ManifestError) -> T) -> [T] {
        let items = attempt { () throws(ManifestError) in try reader.list(key, maxItems: maxItems) } ?? nil
        return each(items, read)
    }

    /// `read` on the mapping under `key`, if there is one; its error kept.
    mutating func section(_ reader: inout FieldReader, _ key: String,
                          _ read: (inout FieldReader) throws(ManifestError) -> Void) {
        attempt { () throws(ManifestError) in
            guard var section = try reader.mapping(key) else { return }
            try read(&section)
        }
    }

    /// The mapping `reader` read finished (each field nobody read named as
    /// unknown), then `check()`: how a mapping read field by field ends.
    mutating func check(finishing reader: FieldReader) throws(ManifestError) {
        attempt { () throws(ManifestError) in try reader.finish() }
        try check()
    }

    /// Throws the errors kept, if any: the first, carrying the rest.
    func check() throws(ManifestError) {
        guard var first = errors.first else { return }
        first.further = Array(errors.dropFirst())
        throw first
    }
}
