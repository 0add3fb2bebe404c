import Foundation
import Glibc
import NIOCore
import Testing
@testable import WeftCore
@testable import WeftKernel
@testable import WeftProxy

/// HTTPRoute `sessionPersistence` (GEP-1619) on the proxy's whole captured
/// path over real sockets (the fuzz rig's proxy and its two pods, 127.0.0.1
/// and 127.0.0.2, which say which of them answered in `x-addr`), on the
/// express path (a rule with a session and nothing else) and the full path
/// (one with a filter too).
@Suite(.serialized) struct StickySessionTests {
    static let vip = "198.19.250.14"

    /// The rig's Services plus `sticky` (both pods), `api-a` (pod a only)
    /// and a route on `sticky` with a rule per kind of session; `/w` splits
    /// between api-a and api-b by the weights given.
    static func manifests(weightA: Int = 100, weightB: Int = 0) -> String {
        """
        \(ProxyFuzzTests.service("sticky", vip, selector: "{app: be}"))
        ---
        \(ProxyFuzzTests.service("api-a", "198.19.250.15", selector: "{app: be, track: a}"))
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: sticky, namespace: fz}
        spec:
          parentRefs: [{group: "", kind: Service, name: sticky, port: 80}]
          rules:
          - matches: [{path: {type: PathPrefix, value: /a}}]
            backendRefs: [{name: sticky, port: 80}]
            sessionPersistence: {sessionName: s-a}
          - matches: [{path: {type: PathPrefix, value: /b}}]
            backendRefs: [{name: sticky, port: 80}]
            sessionPersistence: {}
          - matches: [{path: {type: PathPrefix, value: /f}}]
            backendRefs: [{name: sticky, port: 80}]
            filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-route, value: full}]}}]
            sessionPersistence: {sessionName: s-f}
          - matches: [{path: {type: PathPrefix, value: /h}}]
            backendRefs: [{name: sticky, port: 80}]
            sessionPersistence: {type: Header, sessionName: x-session}
          - matches: [{path: {type: PathPrefix, value: /p}}]
            backendRefs: [{name: sticky, port: 80}]
            sessionPersistence: {sessionName: s-p, absoluteTimeout: 2s, cookieConfig: {lifetimeType: Permanent}}
          - matches: [{path: {type: PathPrefix, value: /idle}}]
            backendRefs: [{name: sticky, port: 80}]
            sessionPersistence: {sessionName: s-i, idleTimeout: 1s}
          - matches: [{path: {type: RegularExpression, value: "/re/v[0-9]+/.*"}}]
            backendRefs: [{name: sticky, port: 80}]
            sessionPersistence: {sessionName: s-re}
          - matches: [{path: {type: PathPrefix, value: /w}}]
            backendRefs: [{name: api-a, port: 80, weight: \(weightA)}, {name: api-b, port: 80, weight: \(weightB)}]
            sessionPersistence: {sessionName: s-w}
          - backendRefs: [{name: sticky, port: 80}]
        """
    }

    /// One answer: its status line and fields (names in lower case).
    struct Answer {
        var status = ""
        var fields: [String: String] = [:]
        var addr: String { fields["x-addr"] ?? "-" }
        /// A Set-Cookie's `name=value` part.
        var cookie: String? { fields["set-cookie"].flatMap { $0.split(separator: ";").first.map(String.init) } }
    }

    static func get(_ port: Int, _ path: String, _ extra: [String] = []) -> Answer {
        let head = (["GET \(path) HTTP/1.1", "host: sticky.fz"] + extra + ["connection: close", "", ""]).joined(separator: "\r\n")
        let text = StreamIdleTests.talk(port, Array(head.utf8)).text
        var answer = Answer()
        let lines = text.split(separator: "\r\n", omittingEmptySubsequences: false)
        answer.status = lines.first.map(String.init) ?? ""
        for line in lines.dropFirst() {
            if line.isEmpty { break }
            guard let colon = line.firstIndex(of: ":") else { continue }
            answer.fields[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return answer
    }

    /// Puts a table made from the rig's manifests and `manifests` in force
    /// (`change` edits it first), as the agent's next generation would.
    static func install(_ rig: ProxyFuzzTests.Rig, _ manifests: String, change: (inout ProxyTable) -> Void = { _ in }) throws {
        let ports = rig.backends.map { $0.localAddress?.port ?? 0 }
        let text = ProxyFuzzTests.config(http1: ports[0], http2: ports[1], wild: ports[2], wildH2: ports[3], stall: ports[4])
            + "\n---\n" + manifests
        let (resources, errors) = ManifestReader.parse(text, file: "fuzz.yaml")
        #expect(errors.isEmpty, "\(errors)")
        var table = ProxyTable(try ClusterState.build(resources, parseErrors: errors).get())
        change(&table)
        rig.proxy.install(table)
    }

    /// The first request gets a session cookie (a session cookie: no
    /// Max-Age; Path the rule's prefix), and every request that sends it
    /// back goes to the same pod, on either event loop; without it they
    /// spread over both. The express path took none of them.
    @Test func aSessionKeepsItsClientOnOnePod() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: Self.manifests())
        defer { rig.shutdown() }
        let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: Self.vip)
        defer { close() }
        var spread: Set<String> = []
        for i in 0..<40 {
            let plain = Self.get(ports[i % 2], "/plain")
            #expect(plain.status.hasPrefix("HTTP/1.1 200") && plain.fields["set-cookie"] == nil, "\(plain)")
            spread.insert(plain.addr)
        }
        #expect(spread == ["127.0.0.1", "127.0.0.2"], "requests without a session spread: \(spread)")
        // /a on the express path, /f (a rule with a filter) on the full path.
        for round in 0..<6 {
            let (prefix, name) = round % 2 == 0 ? ("/a", "s-a") : ("/f", "s-f")
            let first = Self.get(ports[round % 2], "\(prefix)/cart")
            let setCookie = first.fields["set-cookie"] ?? ""
            #expect(first.status.hasPrefix("HTTP/1.1 200") && setCookie.hasPrefix("\(name)=")
                    && setCookie.hasSuffix("; Path=\(prefix); HttpOnly") && !setCookie.contains("Max-Age"), "\(first)")
            guard let cookie = first.cookie else { continue }
            var seen: Set<String> = []
            for i in 0..<25 {
                let next = Self.get(ports[i % 2], "\(prefix)/item/\(i)", ["cookie: theme=dark; \(cookie)"])
                #expect(next.status.hasPrefix("HTTP/1.1 200") && next.fields["set-cookie"] == nil, "\(next)")
                seen.insert(next.addr)
            }
            #expect(seen == [first.addr], "session \(round) (\(prefix)) began on \(first.addr), then went to \(seen)")
        }
        // A regular expression's rule: the cookie's Path is its literal part up to its last "/".
        #expect(Self.get(ports[0], "/re/v2/x").fields["set-cookie"]?.hasSuffix("; Path=/re; HttpOnly") == true)
        // Counted: 7 sessions begun (6 rounds and the regex rule's), 150 requests kept in theirs.
        let stats = rig.proxy.stats
        let counted = [stats.sessionsStarted.load(ordering: .relaxed), stats.sessionsKept.load(ordering: .relaxed),
                       stats.sessionsMoved.load(ordering: .relaxed)]
        #expect(counted == [7, 150, 0], "started, kept, moved: \(counted)")
        // Only /f's 3 x 26 requests, each on a connection of its own, left the express path.
        #expect(rig.proxy.stats.expressHandovers.load(ordering: .relaxed) == 78, "the express path carries sessions; filters take the full path")
    }

    /// A rule's session is its own: another rule's token, one naming a pod
    /// outside the rule's backends, and garbage all begin a new session
    /// (no error); a Header session goes in and out as a header; a
    /// Permanent cookie carries Max-Age; an absolute and an idle timeout end
    /// sessions (the idle one lives while it is used: each answer renews it).
    @Test func sessionsAreTheirRulesOwnAndEndOnTime() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: Self.manifests())
        defer { rig.shutdown() }
        let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: Self.vip)
        defer { close() }
        let a = Self.get(ports[0], "/a/")
        let tokenA = a.cookie?.split(separator: "=").last.map(String.init) ?? ""
        let bName = Self.get(ports[0], "/b/").cookie?.split(separator: "=").first.map(String.init) ?? ""
        #expect(bName.hasPrefix("weft-session-"), "a rule without a sessionName gets its own: \(bName)")
        let borrowed = Self.get(ports[0], "/b/", ["cookie: \(bName)=\(tokenA)"])
        #expect(borrowed.cookie?.hasPrefix("\(bName)=") == true && borrowed.cookie != "\(bName)=\(tokenA)", "\(borrowed)")
        // A token naming the stalling pod (not a backend of the rule), and junk.
        guard var forged = StickySession.decode(Substring(tokenA)) else { Issue.record("token \(tokenA)"); return }
        forged.ip = IPv4Address("127.0.0.4")!.value
        for junk in [StickySession.encode(forged), "", "zz", "1.2.3", String(repeating: "f", count: 400), "ffffffff.1.2.3.4.5"] {
            let r = Self.get(ports[1], "/a/", ["cookie: s-a=\(junk)"])
            #expect(r.status.hasPrefix("HTTP/1.1 200") && ["127.0.0.1", "127.0.0.2"].contains(r.addr)
                    && r.cookie?.hasPrefix("s-a=") == true, "\(junk): \(r)")
        }

        let h = Self.get(ports[0], "/h/")
        let session = h.fields["x-session"] ?? ""
        #expect(!session.isEmpty && h.fields["set-cookie"] == nil, "\(h)")
        for i in 0..<10 {
            let r = Self.get(ports[i % 2], "/h/", ["x-session: \(session)"])
            #expect(r.addr == h.addr && r.fields["x-session"] == nil, "header session: \(r) after \(h)")
        }

        let p = Self.get(ports[0], "/p/")
        #expect(p.fields["set-cookie"]?.hasSuffix("; Path=/p; HttpOnly; Max-Age=2") == true, "\(p)")
        let pCookie = p.cookie ?? ""
        #expect(Self.get(ports[1], "/p/", ["cookie: \(pCookie)"]).fields["set-cookie"] == nil)
        usleep(2_100_000)
        let expired = Self.get(ports[1], "/p/", ["cookie: \(pCookie)"])
        #expect(expired.cookie?.hasPrefix("s-p=") == true && expired.cookie != pCookie, "past absoluteTimeout: \(expired)")

        var idle = Self.get(ports[0], "/idle/")
        let began = idle.cookie.flatMap { StickySession.decode(Substring($0.dropFirst(4))) }
        for i in 0..<4 {
            usleep(400_000)
            guard let cookie = idle.cookie else { break }
            let next = Self.get(ports[i % 2], "/idle/", ["cookie: \(cookie)"])
            let token = next.cookie.flatMap { StickySession.decode(Substring($0.dropFirst(4))) }
            #expect(next.addr == idle.addr && token?.started == began?.started && token?.ip == began?.ip,
                    "renewed while used (\(i)): \(next) after \(idle)")
            idle = next.cookie == nil ? idle : next
        }
        usleep(1_200_000)
        let lapsed = Self.get(ports[0], "/idle/", ["cookie: \(idle.cookie ?? "")"])
        let fresh = lapsed.cookie.flatMap { StickySession.decode(Substring($0.dropFirst(4))) }
        #expect(fresh != nil && fresh?.started != began?.started, "past idleTimeout a new session begins: \(lapsed)")
    }

    /// A session outlives a change of weights, to weight 0 included (the
    /// blue-green switch: clients in a session stay, new ones go to the
    /// other side), and moves when its pod leaves: the request goes to a
    /// ready one and its answer carries the new session.
    @Test func aSessionOutlivesTheSplitAndMovesWhenItsPodLeaves() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: Self.manifests(weightA: 100, weightB: 0))
        defer { rig.shutdown() }
        let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: Self.vip)
        defer { close() }
        let first = Self.get(ports[0], "/w/")
        #expect(first.addr == "127.0.0.1" && first.cookie?.hasPrefix("s-w=") == true, "\(first)")
        let cookie = first.cookie ?? ""
        try Self.install(rig, Self.manifests(weightA: 0, weightB: 100))
        for i in 0..<10 {
            let kept = Self.get(ports[i % 2], "/w/", ["cookie: \(cookie)"])
            let new = Self.get(ports[i % 2], "/w/")
            #expect(kept.addr == "127.0.0.1" && kept.fields["set-cookie"] == nil, "the session stays on api-a at weight 0: \(kept)")
            #expect(new.addr == "127.0.0.2" && new.cookie?.hasPrefix("s-w=") == true, "a new client goes by the weights: \(new)")
        }
        // Pod a leaves the sticky Service's endpoints (its check failed, say).
        let a = Self.get(ports[0], "/a/", ["cookie: s-a=x"])
        let onA = a.addr == "127.0.0.1" ? a : Self.firstOn("127.0.0.1", ports[0])
        try Self.install(rig, Self.manifests()) { table in
            let name = ProxyTable.clusterName(namespace: "fz", service: "sticky", port: 80)
            table.clusters[name]?.removeAll { $0.address == "127.0.0.1" }
        }
        let moved = Self.get(ports[1], "/a/", ["cookie: \(onA.cookie ?? "")"])
        #expect(moved.status.hasPrefix("HTTP/1.1 200") && moved.addr == "127.0.0.2" && moved.cookie?.hasPrefix("s-a=") == true
                && moved.cookie != onA.cookie, "\(moved)")
        let after = Self.get(ports[0], "/a/", ["cookie: \(moved.cookie ?? "")"])
        #expect(after.addr == "127.0.0.2" && after.fields["set-cookie"] == nil, "\(after)")
        #expect(rig.proxy.stats.sessionsMoved.load(ordering: .relaxed) == 1, "one session moved off the pod that left")
    }

    /// A session whose pod refuses connections: the express path routes the
    /// request to it, its connect fails and it hands the request over; the
    /// full path sends it to the other pod, and its answer moves the
    /// session. Each request is counted once, as moved (the express path
    /// counted its routing too, once, as kept).
    @Test func aSessionWhosePodRefusesMovesAndIsCountedOnce() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: Self.manifests())
        defer { rig.shutdown() }
        let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: Self.vip)
        defer { close() }
        // A port nothing listens on: bound, then let go.
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(probe, $0, length); return getsockname(probe, $0, &length) }
        }
        Glibc.close(probe)
        let dead = UInt16(bigEndian: address.sin_port)
        let begun = try #require(Self.get(ports[0], "/a/").cookie)
        var token = try #require(StickySession.decode(begun.dropFirst("s-a=".count)))
        try Self.install(rig, Self.manifests()) { table in
            let name = ProxyTable.clusterName(namespace: "fz", service: "sticky", port: 80)
            for i in table.clusters[name]?.indices ?? 0..<0 where table.clusters[name]?[i].address == "127.0.0.1" {
                table.clusters[name]?[i].port = dead
            }
        }
        token.ip = IPv4Address("127.0.0.1")!.value
        token.port = dead
        token.seen = StickySession.now()
        let stats = rig.proxy.stats
        func counted() -> [Int] {
            [stats.sessionsStarted.load(ordering: .relaxed), stats.sessionsKept.load(ordering: .relaxed),
             stats.sessionsMoved.load(ordering: .relaxed), stats.expressHandovers.load(ordering: .relaxed)]
        }
        let before = counted()
        for i in 0..<4 {
            let moved = Self.get(ports[i % 2], "/a/", ["cookie: s-a=\(StickySession.encode(token))"])
            #expect(moved.status.hasPrefix("HTTP/1.1 200") && moved.addr == "127.0.0.2" && moved.cookie?.hasPrefix("s-a=") == true,
                    "\(moved)")
        }
        let after = counted()
        #expect(zip(after, before).map { $0 - $1 } == [0, 0, 4, 4], "started, kept, moved, express hand-overs: \(before) -> \(after)")
    }

    /// A session begun on pod 127.0.0.1 (new sessions until one lands there).
    static func firstOn(_ addr: String, _ port: Int) -> Answer {
        for _ in 0..<64 {
            let r = get(port, "/a/")
            if r.addr == addr { return r }
        }
        return Answer()
    }
}
