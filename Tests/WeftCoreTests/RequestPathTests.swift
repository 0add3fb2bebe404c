import Testing
@testable import WeftCore

/// RequestPath: the normal form routes and AuthorizationPolicy judge
/// (Istio's default BASE normalization).
@Suite struct RequestPathTests {
    func form(_ path: String, lenient: Bool = false) -> String {
        switch RequestPath.normalize(path[...], lenient: lenient) {
        case .normal: return path
        case .changed(let p): return p
        case .malformed: return "MALFORMED"
        }
    }

    @Test func dotSegmentsGoAsRFC3986Says() {
        // RFC 3986 5.2.4 and 5.4's examples, as paths.
        #expect(form("/a/b/c/./../../g") == "/a/g")
        #expect(form("/mid/content=5/../6") == "/mid/6")
        #expect(form("/a/./b") == "/a/b" && form("/x/../b") == "/b" && form("/../b") == "/b" && form("/a/..") == "/")
        #expect(form("/a/.") == "/a/" && form("/.") == "/" && form("/..") == "/" && form("/a/b/..") == "/a/")
        #expect(form("/a//../b") == "/a/b", "an empty segment is one")
        #expect(form("//a//b") == "//a//b", "slashes are not merged")
        #expect(form("/.well-known/x") == "/.well-known/x" && form("/a/..b/c.") == "/a/..b/c.", "dots within a name stay")
    }

    @Test func escapesOfUnreservedCharactersAreDecodedAndTheRestUpperCased() {
        #expect(form("/%61dmin") == "/admin" && form("/%7Euser/%2d%5f") == "/~user/-_")
        #expect(form("/%2e%2E/admin") == "/admin" && form("/a/%2e/b") == "/a/b", "a decoded dot segment goes too")
        #expect(form("/a%2fb") == "/a%2Fb" && form("/a%2Fb/../c") == "/c", "%2F stays encoded: it is no separator")
        #expect(form("/a%20b") == "/a%20b" && form("/caf%c3%a9") == "/caf%C3%A9")
        #expect(form("/a\\b\\..\\c") == "/a/c", "backslashes are slashes")
        #expect(form("/admin%zz") == "MALFORMED" && form("/a%4") == "MALFORMED" && form("/a%") == "MALFORMED")
        #expect(form("/%zz/../admin", lenient: true) == "/admin" && form("/a%", lenient: true) == "/a%",
                "lenient: the escape as it came, the rest normalized")
    }

    /// MeshConfig proxy.pathNormalization's other modes, as Istio's.
    @Test func theOtherModesAreIstios() {
        func form(_ path: String, _ mode: RequestPath.Mode) -> String {
            if case .changed(let p) = RequestPath.normalize(path[...], mode: mode) { return p }
            return path
        }
        #expect(form("//a//b/", .base) == "//a//b/" && form("//a//b/", .mergeSlashes) == "/a/b/")
        #expect(form("/a/.//../b", .mergeSlashes) == "/a/b" && form("/a%2Fb", .mergeSlashes) == "/a%2Fb")
        // (Dot segments before slashes are merged, as Envoy orders them: the
        // empty segment is the one `..` takes.)
        #expect(form("/a%2fb%5C%5c../c", .decodeAndMergeSlashes) == "/a/b/c" && form("/a%2F..%2Fb", .decodeAndMergeSlashes) == "/b",
                "escaped slashes are separators there")
        #expect(form("/x/../%61//b", .none) == "/x/../%61//b" && RequestPath.isPlain("/x/../a%zz", mode: .none),
                "NONE: the path as sent")
        #expect(RequestPath.normalize("/a%zz"[...], mode: .none) == .normal)
        #expect(!RequestPath.isPlain("/a//b", mode: .mergeSlashes) && RequestPath.isPlain("/a//b", mode: .base))
    }

    @Test func whatIsAlreadyNormalIsLeftAlone() {
        for path in ["/", "/a/b", "/a/b/", "/api/v1/users?x=1", "*", "", "/A%2F", "/%C3%A9"] {
            #expect(RequestPath.normalize(path[...]) == .normal, "\(path)")
        }
        #expect(RequestPath.isPlain("/api/v1/x.json") && !RequestPath.isPlain("/a/.b") && !RequestPath.isPlain("/a%41")
                && !RequestPath.isPlain("/a\\b"))
        #expect(RequestPath.normalize(target: "/a/../b?c=/../%2e") == .changed("/b?c=/../%2e"), "the query is not touched")
        #expect(RequestPath.normalize(target: "/a?%zz") == .normal && RequestPath.normalize(target: "/%zz?a") == .malformed)
    }
}
