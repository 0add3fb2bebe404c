import Foundation
import Testing
@testable import WeftCore
@testable import WeftProxy

/// TrafficPolicy `circuitBreaker.maxRetries`: retries in progress for the
/// cluster, as Envoy's max_retries. A request takes a place from its first
/// retry until it finishes; one that would retry past the limit is answered
/// with its last answer instead (counted an overflow, flag UO), and the
/// place comes back when the retrying request ends.
@Suite(.serialized) struct RetryBreakerTests {
    @Test func retriesPastMaxRetriesAreAnsweredWithTheirLastAnswer() throws {
        // The stalling backend's `/fail`: a 503 after 300 ms. The Service's
        // retry (its route rule sets none): on 503, once.
        let rig = try ProxyFuzzTests.Rig(manifests: ProxyFuzzTests.trafficPolicy("stall-full", """
            circuitBreaker: {maxRetries: 1}
              retry: {codes: [503], attempts: 1, backoff: 1ms}
            """))
        defer { rig.shutdown() }
        let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, full: true)
        defer { close() }
        let seenBefore = StallingBackend.failed.load(ordering: .relaxed)
        // Four at once: all four 503s come together; one of them retries
        // (its place held until it ends, 300 ms on), the other three may not.
        let burst = (0..<4).map { ConnectionWaitTests.Asked(ports[$0 % 2], "/fail") }.map { $0.wait() }
        #expect(burst.allSatisfy { $0.status.hasPrefix("HTTP/1.1 503") }, "\(burst.map(\.status))")
        #expect(rig.proxy.stats.overflows.load(ordering: .relaxed) == 3, "three retries refused")
        #expect(rig.proxy.stats.retries.load(ordering: .relaxed) == 1, "one retried")
        #expect(StallingBackend.failed.load(ordering: .relaxed) - seenBefore == 5, "the backend saw 4 requests and 1 retry")
        let slowest = burst.map(\.seconds).max() ?? 0, quickest = burst.map(\.seconds).min() ?? 0
        #expect(quickest < 0.55 && slowest >= 0.58, "answered after \(burst.map(\.seconds)) s")
        // The place came back: the next request retries.
        let next = ConnectionWaitTests.Asked(ports[0], "/fail").wait()
        #expect(next.status.hasPrefix("HTTP/1.1 503") && next.seconds >= 0.58, "\(next.status) after \(next.seconds) s")
        #expect(rig.proxy.stats.retries.load(ordering: .relaxed) == 2)
        #expect(rig.proxy.stats.overflows.load(ordering: .relaxed) == 3)
        try rig.settle()
    }
}
