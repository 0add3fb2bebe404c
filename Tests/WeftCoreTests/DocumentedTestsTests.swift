import Foundation
import Testing

/// The README and docs/ back their claims by naming tests (`Suite`,
/// `testName`). Every name they give must still be a test, suite, file or
/// target of Tests/ (or a name of Sources/ the text explains), so that a
/// renamed or deleted test cannot leave a claim standing on nothing.
@Suite struct DocumentedTestsTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Every Swift file's text under `folder` of the repository.
    static func swiftText(under folder: String) -> String {
        let base = root.appendingPathComponent(folder)
        guard let walk = FileManager.default.enumerator(at: base, includingPropertiesForKeys: nil) else { return "" }
        var text = ""
        for case let url as URL in walk where url.pathExtension == "swift" {
            text += (try? String(contentsOf: url, encoding: .utf8)) ?? ""
            text += "\n"
        }
        return text
    }

    /// Names declared (func, struct, class, enum, and in Sources also
    /// properties and cases) in `text`.
    static func declared(in text: String, members: Bool) -> Set<String> {
        let kinds = members ? "func|struct|class|enum|actor|var|let|case" : "func|struct|class|enum|actor"
        return Set(matches(of: "(?:\(kinds))\\s+([A-Za-z_][A-Za-z0-9_]*)", in: text))
    }

    static func matches(of pattern: String, in text: String) -> [String] {
        guard let regex = try? NSRegularExpression(pattern: pattern) else { return [] }
        let ns = text as NSString
        return regex.matches(in: text, range: NSRange(location: 0, length: ns.length)).map { ns.substring(with: $0.range(at: 1)) }
    }

    /// What a document names in code spans that reads as a test: a
    /// lowerCamelCase name of four words or more (`tunnelsToANodeThatVanished…`),
    /// or a name ending in Tests; `Suite.test` gives both.
    static func testNames(in markdown: String) -> Set<String> {
        var names: Set<String> = []
        for span in matches(of: "`([^`\\n]+)`", in: markdown) {
            for piece in span.split(whereSeparator: { " ,()/:".contains($0) }).flatMap({ $0.split(separator: ".") }) {
                let word = String(piece)
                if matches(of: "^([a-z][a-z0-9]*(?:[A-Z][a-z0-9]*){3,})$", in: word).count == 1
                    || matches(of: "^([A-Z][A-Za-z0-9]*Tests)$", in: word).count == 1 {
                    names.insert(word)
                }
            }
        }
        return names
    }

    @Test func everyTestTheDocsNameExists() throws {
        let tests = Self.swiftText(under: "Tests")
        try #require(!tests.isEmpty, "no Tests/ under \(Self.root.path)")
        var known = Self.declared(in: tests, members: false)
            .union(Self.declared(in: Self.swiftText(under: "Sources"), members: true))
        // Test targets and test files are named too (WeftProxyTests, NetworkPolicyTests.swift).
        let testsDir = Self.root.appendingPathComponent("Tests")
        for target in try FileManager.default.contentsOfDirectory(atPath: testsDir.path) {
            known.insert(target)
            let files = (try? FileManager.default.contentsOfDirectory(atPath: testsDir.appendingPathComponent(target).path)) ?? []
            for file in files where file.hasSuffix(".swift") { known.insert(String(file.dropLast(6))) }
        }
        let docsDir = Self.root.appendingPathComponent("docs")
        let docs = ["README.md", "deploy/README.md", "Sources/WeftProxy/README.md"]
            + (try FileManager.default.contentsOfDirectory(atPath: docsDir.path))
            .filter { $0.hasSuffix(".md") }.sorted().map { "docs/" + $0 }
        var named = 0
        for doc in docs {
            let text = try String(contentsOf: Self.root.appendingPathComponent(doc), encoding: .utf8)
            let names = Self.testNames(in: text)
            named += names.count
            let missing = names.subtracting(known).sorted()
            #expect(missing.isEmpty, "\(doc) names what no test, suite or source declares: \(missing)")
        }
        // The README alone names a hundred or so; none found means the
        // reading above broke, not that all is well.
        #expect(named > 100, "only \(named) test names found in the docs")
    }

    @Test func theReadingFindsTestNamesAndNothingElse() {
        let names = Self.testNames(in: "run `scripts/test`; see `MeshTLSTests.tunnelsToANodeThatVanishedAreClosedByKeepalive` and `ListenerSpreadTests`, `weft_proxy_tunnel_listeners`, `CI=true`, `aLoneWord`")
        #expect(names == ["MeshTLSTests", "tunnelsToANodeThatVanishedAreClosedByKeepalive", "ListenerSpreadTests"])
    }
}
