/// A Kubernetes `LabelSelector` (metav1): matchLabels and matchExpressions,
/// all of which must hold. The empty selector matches everything.
public struct LabelSelector: Hashable, Sendable {
    public enum Operator: String, Hashable, Sendable {
        case `in` = "In", notIn = "NotIn", exists = "Exists", doesNotExist = "DoesNotExist"
    }

    public struct Requirement: Hashable, Sendable {
        public var key: String
        public var op: Operator
        public var values: [String]

        public init(key: String, op: Operator, values: [String] = []) {
            self.key = key
            self.op = op
            self.values = values
        }

        func matches(_ labels: [String: String]) -> Bool {
            switch op {
            case .in: labels[key].map(values.contains) ?? false
            case .notIn: labels[key].map { !values.contains($0) } ?? true
            case .exists: labels[key] != nil
            case .doesNotExist: labels[key] == nil
            }
        }
    }

    public var matchLabels: [String: String]
    public var matchExpressions: [Requirement]

    public init(matchLabels: [String: String] = [:], matchExpressions: [Requirement] = []) {
        self.matchLabels = matchLabels
        self.matchExpressions = matchExpressions
    }

    public static let everything = LabelSelector()

    public var isEmpty: Bool { matchLabels.isEmpty && matchExpressions.isEmpty }

    public func matches(_ labels: [String: String]) -> Bool {
        matchLabels.allSatisfy { labels[$0.key] == $0.value } && matchExpressions.allSatisfy { $0.matches(labels) }
    }

    /// `app=web,tier in (a,b)`, as kubectl prints selectors; `{}` for everything.
    public var description: String {
        guard !isEmpty else { return "{}" }
        var parts = matchLabels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        for r in matchExpressions {
            switch r.op {
            case .in: parts.append("\(r.key) in (\(r.values.joined(separator: ",")))")
            case .notIn: parts.append("\(r.key) notin (\(r.values.joined(separator: ",")))")
            case .exists: parts.append(r.key)
            case .doesNotExist: parts.append("!\(r.key)")
            }
        }
        return parts.joined(separator: ",")
    }
}

extension LabelSelector {
    init(reading node: YAMLNode, at location: DocumentLocation, path: String) throws(ManifestError) {
        var r = try FieldReader(node, at: location, path: path)
        // Labels and each expression are read on their own, so that one
        // mistake does not hide the next.
        var found = ErrorList()
        let labels: [String: String] = found.attempt { () throws(ManifestError) in
            let labels = try r.stringMap("matchLabels") ?? [:]
            for (key, value) in labels {
                try Validation.labelKey(key, field: r.field("matchLabels"), at: location)
                try Validation.labelValue(value, field: "\(r.field("matchLabels")).\(key)", at: location)
            }
            return labels
        } ?? [:]
        let requirements = found.each(&r, "matchExpressions") { itemPath, item throws(ManifestError) in
            var e = try FieldReader(item, at: location, path: itemPath)
            // Key, operator and every value on its own; whether values fit
            // the operator is checked once both read clean.
            var inner = ErrorList()
            let key = inner.attempt { () throws(ManifestError) in
                let key = try e.requiredString("key")
                try Validation.labelKey(key, field: itemPath, at: location)
                return key
            }
            let op = inner.attempt { () throws(ManifestError) in
                let opText = try e.requiredString("operator")
                guard let op = Operator(rawValue: opText) else {
                    throw e.error("operator", "operator must be In, NotIn, Exists or DoesNotExist, got \(quoted(opText))")
                }
                return op
            }
            let values = inner.each(&e, "values") { valuePath, valueNode throws(ManifestError) in
                let value = try FieldReader.string(valueNode, at: location, path: valuePath)
                try Validation.labelValue(value, field: valuePath, at: location)
                return value
            }
            try inner.check(finishing: e)
            guard let key, let op else { throw e.error("operator", "required field is missing") }
            let needsValues = op == .in || op == .notIn
            if needsValues && values.isEmpty {
                throw e.error("values", "must not be empty for operator \(op.rawValue)")
            }
            if !needsValues && !values.isEmpty {
                throw e.error("values", "must be empty for operator \(op.rawValue)")
            }
            return Requirement(key: key, op: op, values: values)
        }
        try found.check(finishing: r)
        self.init(matchLabels: labels, matchExpressions: requirements)
    }
}

extension FieldReader {
    /// An optional `selector`: absent or empty means none (every pod of the
    /// namespace), as for PeerAuthentication and AuthorizationPolicy.
    mutating func optionalSelector(_ key: String = "selector") throws(ManifestError) -> LabelSelector? {
        guard let node = node(key) else { return nil }
        let selector = try LabelSelector(reading: node, at: location, path: field(key))
        return selector.isEmpty ? nil : selector
    }
}
