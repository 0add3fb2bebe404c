import Testing
@testable import WeftCore

/// LinearRegex, the HTTPRoute regular expressions' matcher: the same yes
/// or no as Swift's backtracking Regex on the syntax they share, in time
/// linear in the input where Regex takes exponential time, and the syntax
/// that needs backtracking refused by name.
@Suite struct LinearRegexTests {
    static func pattern(_ r: inout LoopRandomForTests, depth: Int = 0) -> String {
        var out = ""
        for _ in 0..<(1 + r.below(4)) {
            var atom: String
            if depth < 2 && r.below(4) == 0 {
                let inner = (0..<(1 + r.below(3))).map { _ in pattern(&r, depth: depth + 1) }
                atom = r.pick(["(", "(?:"]) + inner.joined(separator: "|") + ")"
            } else {
                atom = r.pick(["a", "b", "/", "1", ".", "[ab]", "[^a]", "[a-c]", "[/1]", "\\d", "\\w", "\\.", "\\/", "\\D", "[\\d.]"])
            }
            if r.below(3) == 0 { atom += r.pick(["*", "+", "?", "{0,2}", "{2}", "{1,}", "{2,3}", "*?", "+?"]) }
            out += atom
        }
        return out
    }

    @Test func agreesWithSwiftRegexOnTheSyntaxTheyShare() throws {
        var r = LoopRandomForTests(state: 0x9E37_79B9_7F4A_7C15)
        var compared = 0, matched = 0
        for _ in 0..<2_500 {
            var p = Self.pattern(&r)
            if r.below(8) == 0 { p = "^" + p }
            if r.below(8) == 0 { p += "$" }
            let linear = try LinearRegex(p)
            let swift = try Regex(p)
            for _ in 0..<16 {
                let input = String((0..<r.below(9)).map { _ in r.pick(Array("ab/1.c")) })
                let expected = (try? swift.wholeMatch(in: input)) != nil
                #expect(linear.wholeMatch(input) == expected, "\(p) on \"\(input)\"")
                compared += 1
                if expected { matched += 1 }
            }
        }
        // Both answers came up often enough to mean something.
        #expect(matched > compared / 20 && matched < compared - compared / 20, "\(matched) of \(compared)")
    }

    /// Patterns a backtracking engine takes exponential (or high polynomial)
    /// time on, against long inputs: answered. (Swift's Regex took 6 s on
    /// `/(a+)+$` for an 18-byte path, doubling with each byte; these inputs
    /// are 5,000 bytes.)
    @Test func catastrophicPatternsAreAnsweredInLinearTime() throws {
        let long = "/" + String(repeating: "a", count: 5_000)
        for (p, input, expected) in [
            ("/(a+)+$", long + "!", false),
            ("/(a+)+$", long, true),
            ("/(a|aa)*b", long, false),
            ("/(a*)*b", long, false),
            ("/.*a.*a.*a.*a.*a.*b", long, false),
            ("/(a|a?)+", long, true),
            ("/((a{1,4}){1,4}){1,4}c", long, false),
        ] {
            #expect(try LinearRegex(p).wholeMatch(input) == expected, "\(p)")
        }
    }

    @Test func wholeValuesAnchorsAndClasses() throws {
        let items = try LinearRegex("/items/[0-9]+")
        #expect(items.wholeMatch("/items/12"))
        #expect(!items.wholeMatch("/items/12/x"), "a whole match, not a search")
        #expect(!items.wholeMatch("/items/"))
        #expect(try LinearRegex("^/a$").wholeMatch("/a"))
        #expect(try LinearRegex("(?P<v>v[12])|beta").wholeMatch("v2"))
        #expect(try LinearRegex("[^/]+\\.json").wholeMatch("x.json"))
        #expect(try !LinearRegex("[^/]+\\.json").wholeMatch("a/x.json"))
        #expect(try LinearRegex("a{2,3}").wholeMatch("aaa"))
        #expect(try !LinearRegex("a{2,3}").wholeMatch("aaaa"))
        #expect(try LinearRegex("x{").wholeMatch("x{"), "a '{' that opens no count is a literal")
        #expect(try LinearRegex("").wholeMatch(""))
        #expect(try LinearRegex("é+").wholeMatch("éé"))
        #expect(try !LinearRegex(".").wholeMatch("\n"))
    }

    @Test func whatNeedsBacktrackingIsRefusedByName() {
        for (p, reason) in [
            ("(a)\\1", "backreference"),
            ("a(?=b)", "lookaround"),
            ("a(?!b)", "lookaround"),
            ("(?<=a)b", "lookaround"),
            ("a++", "possessive"),
            ("(", "missing ')'"),
            ("a)", "unmatched ')'"),
            ("*a", "nothing to repeat"),
            ("[z-a]", "below its start"),
            ("[ab", "missing ']'"),
            ("a{3,2}", "below its minimum"),
            ("a{1001}", "over 1000"),
            ("(a{1000}){1000}", "more than 2000 states"),
            ("\\bword", "not supported"),
            ("(?i)abc", "not supported"),
            ("[[:alpha:]]", "POSIX"),
            ("a\\", "at the end"),
            (String(repeating: "(", count: 5_000) + "a" + String(repeating: ")", count: 5_000), "nested more than 100 deep"),
        ] {
            do {
                _ = try LinearRegex(p)
                Issue.record("accepted: \(p)")
            } catch {
                #expect(error.description.contains(reason), "\(p): \(error.description)")
            }
        }
    }
}
