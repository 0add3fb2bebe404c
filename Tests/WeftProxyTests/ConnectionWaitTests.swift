import Foundation
import Glibc
import NIOCore
import NIOPosix
import Testing
@testable import WeftCore
@testable import WeftKernel
@testable import WeftProxy

/// TrafficPolicy `circuitBreaker.maxConnections` queues, as Envoy does: a
/// request that would need a connection past the limit waits (counted
/// pending, up to maxPendingRequests) for one to come free, on the proxy's
/// whole captured path over real sockets (the fuzz rig's proxy, two event
/// loops, its stalling backend's Services: `stall` on the express path,
/// `stall-full` on the full path). Each test's listeners hand their
/// connections to one chosen loop, so that a request and the next meet on
/// the same loop or on two.
@Suite(.serialized) struct ConnectionWaitTests {
    /// The rig with a circuit breaker on the stalling backend's Services
    /// (and `connectTimeout` ms for connects to it, if given).
    static func rig(connections: Int, pending: Int? = nil, connectTimeout: Int? = nil,
                    manifests: String = "") throws -> ProxyFuzzTests.Rig {
        var breaker = TrafficPolicy.CircuitBreaker()
        breaker.maxConnections = connections
        breaker.maxPendingRequests = pending
        return try ProxyFuzzTests.Rig(manifests: manifests) { table in
            var policies = table.backendPolicies ?? [:]
            for (name, endpoints) in table.clusters where endpoints.contains(where: { $0.address == "127.0.0.4" }) {
                policies[name] = ProxyTable.BackendPolicy(loadBalancer: TrafficPolicy.LoadBalancer(), outlierDetection: nil,
                                                          circuitBreaker: breaker, policy: "fz/breaker")
                if let ms = connectTimeout, let e = endpoints.first { table.connectTimeouts = ["\(e.address):\(e.port)": ms] }
            }
            table.backendPolicies = policies
        }
    }

    /// Listeners for the stalling backend's Service (`full`: stall-full)
    /// whose connections go to the rig's loop 0 and loop 1: their ports.
    static func pinnedPorts(_ rig: ProxyFuzzTests.Rig, full: Bool) throws -> (ports: [Int], close: () -> Void) {
        try pinnedPorts(rig, vip: full ? ProxyFuzzTests.stallFullVIP : ProxyFuzzTests.stallVIP)
    }

    /// Listeners for the rig's Service at `vip` (port 80) whose
    /// connections go to the rig's loop 0 and loop 1: their ports.
    static func pinnedPorts(_ rig: ProxyFuzzTests.Rig, vip: String) throws -> (ports: [Int], close: () -> Void) {
        let origin = CapturedOrigin(vip: IPv4Address(vip)!, port: 80, serviceID: 1, source: IPv4Address("127.0.0.1")!)
        let proxy = rig.proxy
        var listeners: [any Channel] = []
        for loop in Array(rig.group.makeIterator()) {
            listeners.append(try ServerBootstrap(group: loop, childGroup: loop)
                .childChannelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
                .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try ProxyServer.adopt(channel, origin: origin, proxy: proxy) }
                }
                .bind(host: "127.0.0.1", port: 0).wait())
        }
        return (listeners.map { $0.localAddress?.port ?? 0 }, { for l in listeners { try? l.close().wait() } })
    }

    /// A GET of `path` on a client connection of its own, on a thread:
    /// what came back and the seconds it took, once it is answered.
    final class Asked: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private(set) var text = ""
        private(set) var seconds = 0.0
        var status: String { text.split(separator: "\r\n").first.map(String.init) ?? "" }
        var ok: Bool { status.hasPrefix("HTTP/1.1 200") }

        init(_ port: Int, _ path: String) {
            Thread.detachNewThread { [self] in
                let start = ContinuousClock.now
                let seen = StreamIdleTests.talk(port, Array("GET \(path) HTTP/1.1\r\nhost: stall.fz\r\nconnection: close\r\n\r\n".utf8))
                text = seen.text
                seconds = StreamIdleTests.seconds(ContinuousClock.now - start)
                done.signal()
            }
        }

        @discardableResult
        func wait() -> Self {
            done.wait()
            return self
        }
    }

    /// maxConnections 1: while a slow request (600 ms) holds the one
    /// connection, the next waits for it and is answered once it is free,
    /// on the same loop (the connection handed over, or closed for it) and
    /// on the other (told by the loop it closed on), both paths.
    @Test func aRequestPastMaxConnectionsWaitsForOne() throws {
        let rig = try Self.rig(connections: 1)
        defer { rig.shutdown() }
        for full in [false, true] {
            let (ports, close) = try Self.pinnedPorts(rig, full: full)
            defer { close() }
            for other in [0, 1] {
                let waitsBefore = rig.proxy.stats.connectionWaits.load(ordering: .relaxed)
                let slow = Asked(ports[0], "/slow")
                usleep(150_000)
                let next = Asked(ports[other], "/").wait()
                let what = "\(full ? "full" : "express") path, \(other == 0 ? "same loop" : "other loop")"
                #expect(next.ok && (0.3...1.2).contains(next.seconds), "\(what): \(next.status) after \(next.seconds) s")
                #expect(slow.wait().ok, "\(what): the slow one \(slow.status)")
                #expect(rig.proxy.stats.connectionWaits.load(ordering: .relaxed) - waitsBefore == 1, "\(what): one waited")
                try rig.settle()
            }
        }
        #expect(rig.proxy.stats.overflows.load(ordering: .relaxed) == 0)
    }

    /// A burst of requests that come before any connection to the backend
    /// is made opens maxConnections (2) and no more: a connection counts
    /// from its connect's start, so those behind it wait, and each is
    /// answered in turn. Both paths, the burst on one event loop (across
    /// loops the check and the count are a few instructions apart, as in
    /// Envoy's resource manager).
    @Test func aBurstOpensNoMoreThanMaxConnections() throws {
        for full in [false, true] {
            // (A rig each: no connection kept from before.)
            let rig = try Self.rig(connections: 2)
            defer { rig.shutdown() }
            let (ports, close) = try Self.pinnedPorts(rig, full: full)
            defer { close() }
            let waitsBefore = rig.proxy.stats.connectionWaits.load(ordering: .relaxed)
            let what = full ? "full path" : "express path"
            let asked = (0..<6).map { _ in Asked(ports[0], "/slow") }
            // (Before the first answer, 600 ms on: later, the backend may
            // see a connection the proxy closed for a waiting request as
            // open still, beside the one opened in its place.)
            usleep(400_000)
            let most = rig.stalled.most.load(ordering: .relaxed)
            // What /metrics says meanwhile: the two connections, the four
            // requests waiting for one.
            let metrics = ProxyServer.resilienceMetrics(rig.proxy.snapshot).split(separator: "\n")
            let cluster = "{cluster=\"fz/\(full ? "stall-full" : "stall"):80\""
            let gauges = metrics.filter { $0.hasPrefix("weft_backend_connections" + cluster) || $0.hasPrefix("weft_backend_pending_requests" + cluster) }
            #expect(gauges.count == 2 && gauges[0].hasSuffix(" 2") && gauges[1].hasSuffix(" 4"), "\(what): \(gauges)")
            let burst = asked.map { $0.wait() }
            let answered = burst.filter(\.ok).count
            #expect(answered == 6, "\(what): \(burst.map(\.status))")
            #expect(most == 2, "\(what): \(most) connections open at once")
            #expect(rig.proxy.stats.connectionWaits.load(ordering: .relaxed) - waitsBefore >= 4, "\(what): those past the two waited")
            #expect(rig.proxy.stats.overflows.load(ordering: .relaxed) == 0)
        }
    }

    /// A connection kept idle on one loop is the backend's one allowed: a
    /// request on the other loop has it closed and opens its own at once,
    /// rather than waiting out the connect timeout (the idle timeout, 3 s,
    /// is longer), both paths.
    @Test func aConnectionKeptIdleOnAnotherLoopMakesRoom() throws {
        let rig = try Self.rig(connections: 1)
        defer { rig.shutdown() }
        for full in [false, true] {
            let (ports, close) = try Self.pinnedPorts(rig, full: full)
            defer { close() }
            let first = Asked(ports[0], "/").wait()
            let next = Asked(ports[1], "/").wait()
            let what = full ? "full path" : "express path"
            #expect(first.ok && next.ok && next.seconds < 1.5, "\(what): \(next.status) after \(next.seconds) s")
            try rig.settle()
        }
        #expect(rig.proxy.stats.upstreamIdleClosed.load(ordering: .relaxed) == 0, "closed for the waiter, not by the idle sweep")
    }

    /// maxPendingRequests bounds the waiting: with one allowed, of two
    /// requests past maxConnections one waits and one is shed (503 naming
    /// both limits); and a request waits no longer than its backend's
    /// connect timeout (300 ms here), then is shed (503 saying so).
    @Test func waitingIsBoundedByMaxPendingRequestsAndTheConnectTimeout() throws {
        let rig = try Self.rig(connections: 1, pending: 1)
        defer { rig.shutdown() }
        let (ports, close) = try Self.pinnedPorts(rig, full: true)
        defer { close() }
        let slow = Asked(ports[0], "/slow")
        usleep(150_000)
        let answers = [Asked(ports[1], "/"), Asked(ports[0], "/")].map { $0.wait() }
        #expect(answers.filter(\.ok).count == 1
                    && answers.contains { $0.text.contains("at its circuit breaker's maxConnections and maxPendingRequests") },
                "\(answers.map(\.text))")
        #expect(slow.wait().ok)
        #expect(rig.proxy.stats.overflows.load(ordering: .relaxed) == 1)
        try rig.settle()

        let timed = try Self.rig(connections: 1, connectTimeout: 300)
        defer { timed.shutdown() }
        let (timedPorts, closeTimed) = try Self.pinnedPorts(timed, full: true)
        defer { closeTimed() }
        let held = Asked(timedPorts[0], "/slow")
        usleep(150_000)
        let shed = Asked(timedPorts[1], "/").wait()
        #expect(shed.status.hasPrefix("HTTP/1.1 503") && (0.28...1.0).contains(shed.seconds)
                    && shed.text.contains("no connection to it came free in 300ms"), "\(shed.text) after \(shed.seconds) s")
        #expect(held.wait().ok)
    }

    /// A request with a timeout of its own (here the Service's
    /// requestTimeout, 2 s) waits for a connection past the connect timeout
    /// (300 ms), as Envoy's pending requests do, and is answered when the
    /// slow request (600 ms) lets the connection go. (Its timeout ends the
    /// wait as it ends any attempt: endAttempt cancels it.)
    @Test func aRequestWithATimeoutWaitsUntilItRatherThanTheConnectTimeout() throws {
        let policy = """
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: stall-full, namespace: fz}
            spec:
              targetRefs: [{group: "", kind: Service, name: stall-full}]
              timeout: {http: {requestTimeout: 2s}}
            """
        let rig = try Self.rig(connections: 1, connectTimeout: 300, manifests: policy)
        defer { rig.shutdown() }
        let (ports, close) = try Self.pinnedPorts(rig, full: true)
        defer { close() }
        let held = Asked(ports[0], "/slow")
        usleep(150_000)
        let waited = Asked(ports[1], "/").wait()
        #expect(waited.ok && (0.35...1.5).contains(waited.seconds), "\(waited.text) after \(waited.seconds) s")
        #expect(held.wait().ok)
        #expect(rig.proxy.stats.overflows.load(ordering: .relaxed) == 0, "nothing shed by the breaker")
    }
}
