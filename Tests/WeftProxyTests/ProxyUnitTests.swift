import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing
@testable import WeftCore
@testable import WeftProxy

@Suite struct ProtocolDetectionTests {
    private func classify(_ s: String) -> ProtocolDetector.Verdict {
        ProtocolDetector.classify(ByteBuffer(string: s).readableBytesView)
    }

    @Test func requestLinesPrefacesAndOpaqueBytes() {
        #expect(classify("GET / HTTP/1.1\r\n") == .http1)
        #expect(classify("DELETE /x") == .http1)
        #expect(classify("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == .http2)
        #expect(classify("PRI * HTTP/2.0\r\n") == .undecided, "a preface prefix waits for more")
        #expect(classify("GE") == .undecided)
        #expect(classify("\u{16}\u{03}\u{01}") == .tcp, "TLS ClientHello is opaque")
        #expect(classify("SSH-2.0-OpenSSH") == .tcp)
        #expect(classify(" GET") == .tcp)
        #expect(classify("ABCDEFGHIJKLMNOPQRSTUVWXYZ") == .tcp, "no method is that long")
    }
}

@Suite struct HeaderRulesTests {
    @Test func hopByHopHeadersAndThoseNamedInConnectionAreStripped() {
        var rng = SystemRandomNumberGenerator()
        var h = HTTPHeaders([("connection", "keep-alive, x-secret"), ("x-secret", "1"), ("keep-alive", "5"),
                             ("transfer-encoding", "chunked"), ("te", "trailers"), ("x-keep", "yes"),
                             ("upgrade", "websocket")])
        HTTPProxyHandler.prepareUpstreamHeaders(&h, client: IPv4Address("198.18.1.10")!, via: "weft-n1", keepUpgrade: false, random: &rng)
        #expect(h["x-secret"].isEmpty && h["keep-alive"].isEmpty && h["transfer-encoding"].isEmpty)
        #expect(h["connection"].isEmpty && h["upgrade"].isEmpty)
        #expect(h["te"] == ["trailers"], "gRPC's te: trailers survives")
        #expect(h["x-keep"] == ["yes"])
        #expect(h["x-forwarded-for"] == ["198.18.1.10"])
        #expect(h["via"] == ["1.1 weft-n1"])
        #expect(h["x-request-id"].first?.count == 36)
    }

    @Test func forwardedForAppendsAndUpgradeIsKeptWhenAsked() {
        var rng = SystemRandomNumberGenerator()
        var h = HTTPHeaders([("x-forwarded-for", "10.0.0.1"), ("connection", "Upgrade"), ("upgrade", "websocket"),
                             ("x-request-id", "given")])
        HTTPProxyHandler.prepareUpstreamHeaders(&h, client: IPv4Address("198.18.1.10")!, via: "weft-n1", keepUpgrade: true, random: &rng)
        #expect(h["x-forwarded-for"] == ["10.0.0.1, 198.18.1.10"])
        #expect(h["upgrade"] == ["websocket"] && h["connection"] == ["upgrade"])
        #expect(h["x-request-id"] == ["given"])
    }

    @Test func requestIDsAreUUIDv4Shaped() {
        var rng = LoopRandom()
        let ids = Set((0..<100).map { _ in HTTPProxyHandler.requestID(using: &rng) })
        #expect(ids.count == 100)
        for id in ids {
            let parts = id.split(separator: "-")
            #expect(parts.map(\.count) == [8, 4, 4, 4, 12])
            #expect(parts[2].first == "4")
        }
    }
}

@Suite struct RetryBudgetTests {
    @Test func retriesAreCappedAtTwentyPercentPlusTenASecond() {
        var budget = RetryBudget()
        var granted = 0
        // 1,000 requests in one second, each wanting a retry.
        for _ in 0..<1000 {
            budget.recordRequest(now: 100)
            if budget.withdraw(now: 100) { granted += 1 }
        }
        // 0.2 x 1000 + 10/s x 10 s window.
        #expect(granted >= 290 && granted <= 300, "\(granted)")
    }

    @Test func theWindowSlides() {
        var budget = RetryBudget()
        for _ in 0..<1000 { budget.recordRequest(now: 0); _ = budget.withdraw(now: 0) }
        let spent = budget.withdraw(now: 5)
        #expect(!spent, "spent within the window")
        let refilled = budget.withdraw(now: 11)
        #expect(refilled, "the old second has left the window")
    }
}
