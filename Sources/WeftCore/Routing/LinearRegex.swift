/// The regular expressions of HTTPRoute matches (path, header and query
/// values, `RegularExpression`), matched in time linear in the input: the
/// pattern becomes a Thompson NFA, and the input is read once with the set
/// of states it may be in, as RE2 (Envoy's engine) does. The node's proxy is
/// shared, and a backtracking engine (Swift's `Regex`) takes time exponential
/// in the input for patterns such as `/(a+)+$`: the 20-byte path
/// `/aaaaaaaaaaaaaaaaaa!` took it 6 s, each byte more doubling it, and any
/// pod could send one.
///
/// The syntax is RE2's core: literals; `.` (anything but a newline);
/// classes `[a-z0-9_]`, `[^/]`, with `\d \w \s` and their negations, also
/// inside classes; `\t \n \r \f \v` and any punctuation escaped; groups
/// `(...)`, `(?:...)`, `(?P<name>...)`, `(?<name>...)` (nothing is captured:
/// a match only says yes or no); `|`; `* + ?` and `{n}`, `{n,}`, `{n,m}` (n,
/// m at most 1,000), greedy or lazy alike; `^` and `$`. What needs
/// backtracking to match - backreferences, lookaround - or is not RE2's is
/// refused by name when the manifest is read. A pattern matches the whole
/// value (Gateway API's full match), by Unicode scalar.
public struct LinearRegex: Sendable {
    /// Instructions of the compiled program.
    enum Op: Sendable {
        /// One scalar in the set, then the next instruction.
        case scalar(ScalarSet)
        /// Both ways, the first preferred (preference does not matter for a
        /// yes-or-no match).
        case split(Int, Int)
        case jump(Int)
        /// Holds only at the start of the input (`^`), or only at its end (`$`).
        case atStart
        case atEnd
        case match
    }

    /// Ranges of scalars, maybe negated.
    struct ScalarSet: Sendable {
        var ranges: [ClosedRange<UInt32>]
        var negated = false

        func contains(_ v: UInt32) -> Bool { ranges.contains { $0.contains(v) } != negated }

        static func of(_ v: UInt32) -> ScalarSet { ScalarSet(ranges: [v...v]) }
        static let digits = ScalarSet(ranges: [48...57])
        static let word = ScalarSet(ranges: [48...57, 65...90, 95...95, 97...122])
        static let space = ScalarSet(ranges: [9...13, 32...32])
        static let notNewline = ScalarSet(ranges: [10...10], negated: true)
    }

    public struct Failure: Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    /// The most instructions a pattern may compile to: bounds the work per
    /// input scalar (a match costs at most this many steps per scalar).
    public static let maxProgram = 2_000
    static let maxRepeat = 1_000

    let program: [Op]

    public init(_ pattern: String) throws(Failure) {
        var parser = Parser(Array(pattern.unicodeScalars))
        let node = try parser.parseAll()
        var code: [Op] = []
        try Self.emit(node, into: &code)
        code.append(.match)
        program = code
    }

    /// Whether the pattern matches all of `text`.
    public func wholeMatch<S: StringProtocol>(_ text: S) -> Bool {
        let n = program.count
        // The states the NFA is in before the next scalar, and after it;
        // `seen` marks a state added for the current position (by the
        // position's number), so each state is taken once per scalar.
        var current: [Int] = []
        var next: [Int] = []
        current.reserveCapacity(n)
        next.reserveCapacity(n)
        var seen = [Int](repeating: -1, count: n)
        var stack: [Int] = []
        let scalars = text.unicodeScalars
        var index = scalars.startIndex
        var position = 0

        func add(_ pc: Int, to list: inout [Int], at position: Int, atEnd: Bool) {
            stack.append(pc)
            while let pc = stack.popLast() {
                guard seen[pc] != position else { continue }
                seen[pc] = position
                switch program[pc] {
                case .jump(let to): stack.append(to)
                case .split(let a, let b):
                    stack.append(b)
                    stack.append(a)
                case .atStart: if position == 0 { stack.append(pc + 1) }
                case .atEnd: if atEnd { stack.append(pc + 1) }
                case .scalar, .match: list.append(pc)
                }
            }
        }

        add(0, to: &current, at: 0, atEnd: index == scalars.endIndex)
        while index != scalars.endIndex {
            if current.isEmpty { return false }
            let v = scalars[index].value
            scalars.formIndex(after: &index)
            position += 1
            let atEnd = index == scalars.endIndex
            for pc in current {
                if case .scalar(let set) = program[pc], set.contains(v) {
                    add(pc + 1, to: &next, at: position, atEnd: atEnd)
                }
            }
            swap(&current, &next)
            next.removeAll(keepingCapacity: true)
        }
        return current.contains { if case .match = program[$0] { true } else { false } }
    }

    // MARK: compiling

    indirect enum Node {
        case empty
        case set(ScalarSet)
        case atStart, atEnd
        case concat([Node])
        case alternation([Node])
        case repeated(Node, min: Int, max: Int?)
    }

    private static func emit(_ node: Node, into code: inout [Op]) throws(Failure) {
        guard code.count <= maxProgram else {
            throw Failure(description: "it compiles to more than \(maxProgram) states (repeat counts multiply)")
        }
        switch node {
        case .empty:
            break
        case .set(let s):
            code.append(.scalar(s))
        case .atStart:
            code.append(.atStart)
        case .atEnd:
            code.append(.atEnd)
        case .concat(let parts):
            for p in parts { try emit(p, into: &code) }
        case .alternation(let branches):
            // split L1, next; L1: a; jump end; next: split L2, ... ; last branch
            var jumps: [Int] = []
            for (i, branch) in branches.enumerated() {
                if i < branches.count - 1 {
                    let split = code.count
                    code.append(.split(split + 1, -1))
                    try emit(branch, into: &code)
                    jumps.append(code.count)
                    code.append(.jump(-1))
                    code[split] = .split(split + 1, code.count)
                } else {
                    try emit(branch, into: &code)
                }
            }
            for j in jumps { code[j] = .jump(code.count) }
        case .repeated(let body, let min, let max):
            for _ in 0..<min { try emit(body, into: &code) }
            if let max {
                // (max - min) optional copies, each skipping to the end.
                var skips: [Int] = []
                for _ in min..<max {
                    skips.append(code.count)
                    code.append(.split(code.count + 1, -1))
                    try emit(body, into: &code)
                }
                for s in skips { code[s] = .split(s + 1, code.count) }
            } else {
                // loop: split body, out; body; jump loop
                let loop = code.count
                code.append(.split(loop + 1, -1))
                try emit(body, into: &code)
                code.append(.jump(loop))
                code[loop] = .split(loop + 1, code.count)
            }
        }
        guard code.count <= maxProgram else {
            throw Failure(description: "it compiles to more than \(maxProgram) states (repeat counts multiply)")
        }
    }

    // MARK: parsing

    private struct Parser {
        let s: [Unicode.Scalar]
        var i = 0
        /// Groups open around the current position: parsing and compiling
        /// recurse on them, so they are bounded (a crash on a manifest
        /// field is not an answer).
        var depth = 0
        static let maxDepth = 100
        init(_ s: [Unicode.Scalar]) { self.s = s }

        func fail(_ what: String) -> Failure { Failure(description: "\(what) at offset \(i)") }
        var atEnd: Bool { i >= s.count }
        func peek(_ k: Int = 0) -> Unicode.Scalar? { i + k < s.count ? s[i + k] : nil }

        mutating func parseAll() throws(Failure) -> Node {
            let node = try alternation()
            if !atEnd { throw fail(peek() == ")" ? "an unmatched ')'" : "an unexpected '\(peek().map(String.init) ?? "")'") }
            return node
        }

        mutating func alternation() throws(Failure) -> Node {
            var branches = [try concatenation()]
            while peek() == "|" {
                i += 1
                branches.append(try concatenation())
            }
            return branches.count == 1 ? branches[0] : .alternation(branches)
        }

        mutating func concatenation() throws(Failure) -> Node {
            var parts: [Node] = []
            while let c = peek(), c != "|", c != ")" {
                parts.append(try repetition())
            }
            return parts.isEmpty ? .empty : parts.count == 1 ? parts[0] : .concat(parts)
        }

        mutating func repetition() throws(Failure) -> Node {
            var node = try atom()
            while let c = peek() {
                var bounds: (Int, Int?)
                switch c {
                case "*": bounds = (0, nil); i += 1
                case "+": bounds = (1, nil); i += 1
                case "?": bounds = (0, 1); i += 1
                case "{":
                    guard let b = try counted() else { return node }  // a literal '{', as RE2 reads it
                    bounds = b
                default:
                    return node
                }
                if case .atStart = node { throw fail("a repeated '^'") }
                if case .atEnd = node { throw fail("a repeated '$'") }
                if peek() == "?" { i += 1 }  // lazy: the same yes or no
                if peek() == "+" { throw fail("a possessive quantifier (not RE2 syntax)") }
                node = .repeated(node, min: bounds.0, max: bounds.1)
            }
            return node
        }

        /// `{n}`, `{n,}`, `{n,m}`; nil (nothing read) if what follows `{`
        /// is not one of them.
        mutating func counted() throws(Failure) -> (Int, Int?)? {
            var j = i + 1
            func number(_ j: inout Int) -> Int? {
                var v = 0, digits = 0
                while j < s.count, (48...57).contains(s[j].value) {
                    v = min(v * 10 + Int(s[j].value - 48), 1_000_000)
                    digits += 1
                    j += 1
                }
                return digits > 0 ? v : nil
            }
            guard let lo = number(&j) else { return nil }
            var hi: Int? = lo
            if j < s.count, s[j] == "," {
                j += 1
                hi = number(&j)
            }
            guard j < s.count, s[j] == "}" else { return nil }
            i = j + 1
            guard lo <= LinearRegex.maxRepeat, (hi ?? 0) <= LinearRegex.maxRepeat else {
                throw fail("a repeat count over \(LinearRegex.maxRepeat)")
            }
            if let hi, hi < lo { throw fail("a repeat {\(lo),\(hi)} whose maximum is below its minimum") }
            return (lo, hi)
        }

        mutating func atom() throws(Failure) -> Node {
            guard let c = peek() else { throw fail("a missing atom") }
            switch c {
            case "(":
                i += 1
                depth += 1
                defer { depth -= 1 }
                guard depth <= Self.maxDepth else { throw fail("groups nested more than \(Self.maxDepth) deep") }
                if peek() == "?" {
                    switch (peek(1), peek(2)) {
                    case (":", _):
                        i += 2
                    case ("=", _), ("!", _), ("<", "="), ("<", "!"):
                        throw fail("a lookaround (it needs backtracking; not RE2 syntax)")
                    case ("P", "<"), ("<", _):
                        // A named group: skip the name.
                        while let d = peek(), d != ">" { i += 1 }
                        guard peek() == ">" else { throw fail("an unterminated group name") }
                        i += 1
                    default:
                        throw fail("a group flag or form that is not supported")
                    }
                }
                let inner = try alternation()
                guard peek() == ")" else { throw fail("a missing ')'") }
                i += 1
                return inner
            case "[":
                return .set(try bracket())
            case ".":
                i += 1
                return .set(.notNewline)
            case "^":
                i += 1
                return .atStart
            case "$":
                i += 1
                return .atEnd
            case "\\":
                i += 1
                return .set(try escape())
            case "*", "+", "?":
                throw fail("a '\(c)' with nothing to repeat")
            default:
                i += 1
                return .set(.of(c.value))
            }
        }

        /// After a backslash.
        mutating func escape() throws(Failure) -> ScalarSet {
            guard let c = peek() else { throw fail("a '\\' at the end") }
            i += 1
            switch c {
            case "d": return .digits
            case "D": return ScalarSet(ranges: ScalarSet.digits.ranges, negated: true)
            case "w": return .word
            case "W": return ScalarSet(ranges: ScalarSet.word.ranges, negated: true)
            case "s": return .space
            case "S": return ScalarSet(ranges: ScalarSet.space.ranges, negated: true)
            case "t": return .of(9)
            case "n": return .of(10)
            case "r": return .of(13)
            case "f": return .of(12)
            case "v": return .of(11)
            case "0"..."9":
                throw fail("a backreference or octal escape (a backreference needs backtracking; not RE2 syntax)")
            case "b", "B", "A", "z", "Z", "G", "K", "p", "P", "x", "u", "Q", "E", "k", "g":
                throw fail("the escape '\\\(c)', which is not supported")
            default:
                guard !(c.properties.isAlphabetic || c.properties.numericType != nil) else {
                    throw fail("the escape '\\\(c)', which is not supported")
                }
                return .of(c.value)
            }
        }

        /// `[...]`, from its '['.
        mutating func bracket() throws(Failure) -> ScalarSet {
            i += 1
            var set = ScalarSet(ranges: [])
            if peek() == "^" {
                set.negated = true
                i += 1
            }
            var first = true
            while true {
                guard let c = peek() else { throw fail("a missing ']'") }
                if c == "]" && !first { i += 1; break }
                first = false
                if c == "[", peek(1) == ":" { throw fail("a POSIX class ([:name:]), which is not supported") }
                var lo: UInt32
                if c == "\\" {
                    i += 1
                    let e = try escape()
                    guard !e.negated, e.ranges.count == 1, e.ranges[0].count == 1 else {
                        // \d \w \s join the class; \D \W \S inside one are refused.
                        if e.negated { throw fail("a negated class escape inside [...], which is not supported") }
                        set.ranges += e.ranges
                        continue
                    }
                    lo = e.ranges[0].lowerBound
                } else {
                    i += 1
                    lo = c.value
                }
                if peek() == "-", let after = peek(1), after != "]" {
                    i += 1
                    var hi: UInt32
                    if after == "\\" {
                        i += 1
                        let e = try escape()
                        guard !e.negated, e.ranges.count == 1, e.ranges[0].count == 1 else { throw fail("a range ending in a class") }
                        hi = e.ranges[0].lowerBound
                    } else {
                        i += 1
                        hi = after.value
                    }
                    guard lo <= hi else { throw fail("a range whose end is below its start") }
                    set.ranges.append(lo...hi)
                } else {
                    set.ranges.append(lo...lo)
                }
            }
            return set
        }
    }
}
