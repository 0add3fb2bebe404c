import Yams

/// A strict, path-tracking view of one YAML mapping. Every read names the
/// field it reads, so an error can say exactly which one is wrong; `finish()`
/// rejects any key nobody read, which is how unknown fields become errors.
struct FieldReader {
    let location: DocumentLocation
    let path: String
    private let pairs: [(key: String, value: Node, line: Int?)]
    /// Which pairs a reader asked for, by index (mappings here are small:
    /// a linear scan beats hashing every key).
    private var read: [Bool]

    init(_ node: Node, at location: DocumentLocation, path: String) throws(ManifestError) {
        self.location = location
        self.path = path
        guard case .mapping(let mapping) = node else {
            throw ManifestError(location, field: path, "expected a mapping, got \(Self.describe(node))",
                                line: node.mark?.line)
        }
        var pairs: [(key: String, value: Node, line: Int?)] = []
        pairs.reserveCapacity(mapping.count)
        for (key, value) in mapping {
            guard case .scalar(let scalar) = key else {
                throw ManifestError(location, field: path, "mapping keys must be strings", line: key.mark?.line)
            }
            guard !pairs.contains(where: { $0.key == scalar.string }) else {
                throw ManifestError(location, field: Self.join(path, scalar.string), "duplicate key",
                                    line: key.mark?.line)
            }
            pairs.append((scalar.string, value, key.mark?.line))
        }
        self.pairs = pairs
        self.read = Array(repeating: false, count: pairs.count)
    }

    static func join(_ path: String, _ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    static func describe(_ node: Node) -> String {
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
    mutating func node(_ key: String) -> Node? {
        guard let i = pairs.firstIndex(where: { $0.key == key }) else { return nil }
        read[i] = true
        let node = pairs[i].value
        if case .scalar = node, node.tagName == .null { return nil }
        return node
    }

    mutating func required(_ key: String) throws(ManifestError) -> Node {
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

    mutating func int(_ key: String) throws(ManifestError) -> Int? {
        guard let node = node(key) else { return nil }
        return try Self.int(node, at: location, path: field(key))
    }

    mutating func mapping(_ key: String) throws(ManifestError) -> FieldReader? {
        guard let node = node(key) else { return nil }
        return try FieldReader(node, at: location, path: field(key))
    }

    mutating func list(_ key: String) throws(ManifestError) -> [(path: String, node: Node)]? {
        guard let node = node(key) else { return nil }
        guard case .sequence(let sequence) = node else {
            throw error(key, "expected a list, got \(Self.describe(node))")
        }
        return sequence.enumerated().map { ("\(field(key))[\($0.offset)]", $0.element) }
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

    /// Fails on the first key that no reader asked for.
    func finish() throws(ManifestError) {
        if let i = read.firstIndex(of: false) { throw error(pairs[i].key, "unknown field") }
    }

    static func string(_ node: Node, at location: DocumentLocation, path: String) throws(ManifestError) -> String {
        guard case .scalar(let scalar) = node, node.tagName == .str else {
            throw ManifestError(location, field: path, "expected a string, got \(describe(node))",
                                line: node.mark?.line)
        }
        return scalar.string
    }

    static func int(_ node: Node, at location: DocumentLocation, path: String) throws(ManifestError) -> Int {
        guard let value = node.coreInt else {
            throw ManifestError(location, field: path, "expected an integer, got \(describe(node))",
                                line: node.mark?.line)
        }
        return value
    }
}

extension Node {
    /// The node's YAML type under the YAML 1.2 core schema (what Kubernetes
    /// reads): quoted and block scalars are strings; plain scalars are null,
    /// bool, int or float when they spell one. Decided here directly rather
    /// than through Yams' regex resolver, which dominated parse time (2 s for
    /// 20,000 documents).
    var tagName: Tag.Name {
        switch self {
        case .mapping: return .map
        case .sequence: return .seq
        case .alias: return .str
        case .scalar(let scalar):
            if let explicit = Optional(scalar.tag.rawValue), explicit.hasPrefix("tag:yaml.org,2002:") {
                return Tag.Name(rawValue: explicit)
            }
            guard scalar.style == .plain || scalar.style == .any else { return .str }
            return Self.coreSchemaType(scalar.string)
        }
    }

    /// The integer value of a plain decimal scalar (the only form manifests use).
    var coreInt: Int? {
        guard case .scalar(let scalar) = self, tagName == .int else { return nil }
        return Int(scalar.string.hasPrefix("+") ? String(scalar.string.dropFirst()) : scalar.string)
    }

    static func coreSchemaType(_ s: String) -> Tag.Name {
        switch s {
        case "", "~", "null", "Null", "NULL": return .null
        case "true", "True", "TRUE", "false", "False", "FALSE": return .bool
        default: break
        }
        let utf8 = s.utf8
        guard let first = utf8.first else { return .str }
        let isDigit = { (c: UInt8) in c >= 48 && c <= 57 }
        let body = (first == 43 || first == 45) ? utf8.dropFirst() : utf8[...]  // + or -
        if !body.isEmpty && body.allSatisfy(isDigit) { return .int }
        if first == 46 || first == 43 || first == 45 || isDigit(first) {  // . + - digit: maybe a float
            if Double(s) != nil { return .float }
            if s.hasPrefix("0x") || s.hasPrefix("0o") { return .int }
        }
        if [".inf", ".Inf", ".INF", "-.inf", "+.inf", ".nan", ".NaN", ".NAN"].contains(s) { return .float }
        return .str
    }
}
