import Foundation
import Glibc
import Synchronization
import Testing
@testable import WeftCore
@testable import WeftProxy

/// An HTTP/2 backend's RST_STREAM REFUSED_STREAM (a stream past its limit,
/// or load shed), or its GOAWAY whose last processed stream came before
/// the request's (a graceful shutdown): RFC 9113 8.7 has the request
/// unprocessed, so the proxy sends it again, once, whatever its method, as
/// gRPC's clients do; a backend that refuses it again is answered 503.
@Suite(.serialized) struct RefusedStreamTests {
    /// Streams refused so far, per `/refuse/KEY/N` (or `/goaway/KEY/N`)
    /// request: the rig's pods refuse (or go away before) the first N
    /// streams of KEY (over both pods).
    static let refused = Mutex<[String: Int]>([:])

    static func refuses(_ uri: String) -> Bool {
        let parts = uri.split(separator: "/")
        guard parts.count >= 3, let n = Int(parts[2]) else { return false }
        return refused.withLock { seen in
            let key = String(parts[1])
            guard seen[key, default: 0] < n else { return false }
            seen[key, default: 0] += 1
            return true
        }
    }

    /// A POST (not idempotent) through the rig's h2c Service, HTTP/1.1 from
    /// the client: the status line and the body.
    static func post(_ rig: ProxyFuzzTests.Rig, _ path: String) throws -> String {
        let fd = try #require(ProxyFuzzTests.dial(rig.port(1)))
        defer { close(fd) }
        ExpectContinueTests.send(fd, "POST \(path) HTTP/1.1\r\nhost: grpc.fz\r\ncontent-length: 5\r\n\r\nhello")
        return ExpectContinueTests.read(fd, seconds: 4) { $0.hasSuffix("\n") && $0.contains("\r\n\r\n") }
    }

    @Test func aRefusedStreamIsSentAgainOnce() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        let id = UUID().uuidString.prefix(8)
        let retries = rig.proxy.stats.retries.load(ordering: .relaxed)
        // Refused once: answered by the second stream.
        let once = try Self.post(rig, "/refuse/\(id)-a/1")
        #expect(once.hasPrefix("HTTP/1.1 200") && once.hasSuffix("ok\n"), "\(once)")
        #expect(rig.proxy.stats.retries.load(ordering: .relaxed) == retries + 1)
        // Refused every time: one retry, then 503 naming the refusal.
        let always = try Self.post(rig, "/refuse/\(id)-b/1000")
        #expect(always.hasPrefix("HTTP/1.1 503") && always.contains("refused the stream (REFUSED_STREAM)"), "\(always)")
        #expect(Self.refused.withLock { $0["\(id)-b"] } == 2, "sent twice in all")
        #expect(rig.proxy.stats.retries.load(ordering: .relaxed) == retries + 2)
        try rig.settle()
    }

    /// A backend going away (GOAWAY NO_ERROR) before the request's stream:
    /// the request goes again on a new connection, once.
    @Test func aStreamAGoawayLeftOutIsSentAgainOnce() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        let id = UUID().uuidString.prefix(8)
        // A first request opens the connections (so the next is not stream 1).
        #expect(try Self.post(rig, "/warm").hasPrefix("HTTP/1.1 200"))
        let once = try Self.post(rig, "/goaway/\(id)-a/1")
        #expect(once.hasPrefix("HTTP/1.1 200") && once.hasSuffix("ok\n"), "\(once)")
        let always = try Self.post(rig, "/goaway/\(id)-b/1000")
        #expect(always.hasPrefix("HTTP/1.1 503") && always.contains("went away before the stream (GOAWAY)"), "\(always)")
        #expect(Self.refused.withLock { $0["\(id)-b"] } == 2, "sent twice in all")
        try rig.settle()
    }
}
