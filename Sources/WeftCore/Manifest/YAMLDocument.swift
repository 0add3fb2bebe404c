import CYaml

/// A YAML node as manifests need it: scalars keep their text, whether they
/// were plain (only plain scalars can be numbers, booleans or null under the
/// core schema) and any explicit tag; every node keeps its line.
///
/// Why not Yams' `Node`: composing 20,000 documents through Yams spent most of
/// its time building Swift objects around libyaml (tags, marks, resolvers),
/// not parsing. Documents are composed here straight from the event stream of
/// the same libyaml that Yams ships (its CYaml module), about 3x faster.
indirect enum YAMLNode: Sendable {
    case scalar(YAMLScalar)
    case mapping([(key: YAMLNode, value: YAMLNode)], line: Int)
    case sequence([YAMLNode], line: Int)
    /// Anchors and aliases are not used in manifests; an alias is reported as such.
    case alias(line: Int)

    var line: Int? {
        switch self {
        case .scalar(let s): s.line
        case .mapping(_, let line), .sequence(_, let line), .alias(let line): line
        }
    }
}

struct YAMLScalar: Sendable {
    var string: String
    var plain: Bool
    var tag: String?
    var line: Int
}

/// The core-schema type of a node.
enum YAMLType: Sendable {
    case str, int, float, bool, null, map, seq
}

enum YAMLStream {
    struct SyntaxError: Error, CustomStringConvertible {
        var message: String
        var line: Int
        var description: String { message }
    }

    /// Composes each document of `text` in order and hands its root to
    /// `body` (nil for an empty document). Stops at the first syntax error.
    /// Returns how many documents were started, and the error if any.
    static func documents(_ text: String, _ body: (YAMLNode?) -> Void) -> (documents: Int, error: SyntaxError?) {
        var parser = yaml_parser_t()
        guard yaml_parser_initialize(&parser) == 1 else {
            return (0, SyntaxError(message: "libyaml could not initialise", line: 1))
        }
        defer { yaml_parser_delete(&parser) }
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBufferPointer { buffer in
            yaml_parser_set_input_string(&parser, buffer.baseAddress, buffer.count)
            yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING)
            var composer = Composer()
            var documents = 0
            var event = yaml_event_t()
            while true {
                guard yaml_parser_parse(&parser, &event) == 1 else {
                    let problem = parser.problem.map { String(cString: $0) } ?? "syntax error"
                    let context = parser.context.map { " " + String(cString: $0) } ?? ""
                    return (max(documents, 1), SyntaxError(message: "\(problem)\(context)",
                                                          line: Int(parser.problem_mark.line) + 1))
                }
                defer { yaml_event_delete(&event) }
                let line = Int(event.start_mark.line) + 1
                switch event.type {
                case YAML_STREAM_END_EVENT:
                    return (documents, nil)
                case YAML_DOCUMENT_START_EVENT:
                    documents += 1
                    composer = Composer()
                case YAML_DOCUMENT_END_EVENT:
                    body(composer.root)
                case YAML_SCALAR_EVENT:
                    let s = event.data.scalar
                    let text = String(decoding: UnsafeBufferPointer(start: s.value, count: Int(s.length)), as: UTF8.self)
                    composer.complete(.scalar(YAMLScalar(string: text, plain: s.style == YAML_PLAIN_SCALAR_STYLE,
                                                         tag: s.tag.map { String(cString: $0) }, line: line)))
                case YAML_SEQUENCE_START_EVENT:
                    composer.open(mapping: false, line: line)
                case YAML_MAPPING_START_EVENT:
                    composer.open(mapping: true, line: line)
                case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
                    composer.close()
                case YAML_ALIAS_EVENT:
                    composer.complete(.alias(line: line))
                default:
                    break
                }
            }
        }
    }

    /// Builds one document's tree from nested start/end events.
    private struct Composer {
        struct Frame {
            var mapping: Bool
            var line: Int
            var items: [YAMLNode] = []   // sequence items, or keys and values alternating
        }

        var stack: [Frame] = []
        var root: YAMLNode?

        mutating func open(mapping: Bool, line: Int) { stack.append(Frame(mapping: mapping, line: line)) }

        mutating func close() {
            guard let frame = stack.popLast() else { return }
            if frame.mapping {
                var pairs: [(key: YAMLNode, value: YAMLNode)] = []
                pairs.reserveCapacity(frame.items.count / 2)
                var i = 0
                while i + 1 < frame.items.count {
                    pairs.append((frame.items[i], frame.items[i + 1]))
                    i += 2
                }
                complete(.mapping(pairs, line: frame.line))
            } else {
                complete(.sequence(frame.items, line: frame.line))
            }
        }

        mutating func complete(_ node: YAMLNode) {
            if stack.isEmpty { root = node } else { stack[stack.count - 1].items.append(node) }
        }
    }
}

extension YAMLNode {
    /// The node's type under the YAML 1.2 core schema (what Kubernetes reads):
    /// an explicit standard tag wins; quoted and block scalars are strings;
    /// plain scalars are null, bool, int or float when they spell one.
    var tagName: YAMLType {
        switch self {
        case .mapping: return .map
        case .sequence: return .seq
        case .alias: return .str
        case .scalar(let scalar):
            if let tag = scalar.tag, tag.hasPrefix("tag:yaml.org,2002:") {
                switch tag.dropFirst("tag:yaml.org,2002:".count) {
                case "int": return .int
                case "float": return .float
                case "bool": return .bool
                case "null": return .null
                default: return .str
                }
            }
            guard scalar.plain else { return .str }
            return Self.coreSchemaType(scalar.string)
        }
    }

    /// The integer value of a decimal int scalar (the only form manifests use).
    var coreInt: Int? {
        guard case .scalar(let scalar) = self, tagName == .int else { return nil }
        return Int(scalar.string.hasPrefix("+") ? String(scalar.string.dropFirst()) : scalar.string)
    }

    static func coreSchemaType(_ s: String) -> YAMLType {
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
