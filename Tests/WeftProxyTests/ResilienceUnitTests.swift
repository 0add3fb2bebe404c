import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Synchronization
import Testing
@testable import WeftCore
@testable import WeftProxy

private func endpoints(_ n: Int, node: String = "n1") -> [EndpointKey] {
    (1...n).map { EndpointKey(ProxyTable.Endpoint(address: "198.18.1.\($0)", port: 8080, workload: "t/p\($0)", node: node)) }
}

private func breaker(_ set: (inout TrafficPolicy.CircuitBreaker) -> Void) -> TrafficPolicy.CircuitBreaker {
    var cb = TrafficPolicy.CircuitBreaker()
    set(&cb)
    return cb
}

private func runtime(_ lb: TrafficPolicy.LoadBalancer, _ eps: [EndpointKey], outliers: TrafficPolicy.OutlierDetection? = nil,
                     previous: ClusterRuntime? = nil) -> ClusterRuntime {
    ClusterRuntime(name: "t/s:80", policy: .init(loadBalancer: lb, outlierDetection: outliers, circuitBreaker: nil, policy: "t/s"),
                   endpoints: eps, node: "n1", previous: previous)
}

@Suite struct BalancerUnitTests {
    @Test func slowStartRampsANewBackendUp() throws {
        var lb = TrafficPolicy.LoadBalancer()
        lb.algorithm = .roundRobin
        lb.slowStartWindow = .milliseconds(300)
        let old = runtime(lb, endpoints(4))
        // A fifth backend joins: it starts at 10% of a share.
        let grown = runtime(lb, endpoints(5), previous: old)
        var random = LoopRandom()
        var share = [EndpointKey: Int]()
        for _ in 0..<10_000 { if case .success(let k) = grown.pick(hash: nil, random: &random, excluded: { _ in false }) { share[k, default: 0] += 1 } }
        let newcomer = endpoints(5)[4]
        #expect((share[newcomer] ?? 0) < 500, "a new backend takes well under its 20% at first: \(share)")
        #expect(share.count == 5, "but it takes some")
        // After the window it is a backend like the others.
        usleep(350_000)
        share = [:]
        for _ in 0..<10_000 { if case .success(let k) = grown.pick(hash: nil, random: &random, excluded: { _ in false }) { share[k, default: 0] += 1 } }
        #expect(abs((share[newcomer] ?? 0) - 2000) <= 20, "\(share)")
    }

    @Test func successRateOutliersAreEjectedAtTheEndOfAnInterval() throws {
        var od = TrafficPolicy.OutlierDetection()
        od.consecutive5xx = 0
        od.interval = .milliseconds(100)
        od.baseEjectionTime = .seconds(30)
        od.maxEjectionPercent = 50
        var sr = TrafficPolicy.OutlierDetection.SuccessRate()
        sr.minimumHosts = 5
        sr.requestVolume = 20
        sr.stdevFactor = 1000
        od.successRate = sr
        let eps = endpoints(5)
        let rt = runtime(TrafficPolicy.LoadBalancer(), eps, outliers: od)
        let detector = try #require(rt.outliers)
        for round in 0..<40 {
            for i in 0..<5 {
                // Backend 4 fails every other request; the rest never do.
                let fail = i == 4 && round % 2 == 0
                detector.record(i, fail ? .serverError(500) : .success, runtime: rt)
            }
        }
        let now = NIODeadline.now().uptimeNanoseconds
        #expect(!rt.backends.contains { $0.isEjected(now) }, "nothing before the interval ends")
        usleep(120_000)
        detector.record(0, .success, runtime: rt)   // the first record after the interval sweeps
        let later = NIODeadline.now().uptimeNanoseconds
        #expect(rt.backends.map { $0.isEjected(later) } == [false, false, false, false, true])
        // Ejected backends are skipped by every balancer while others remain.
        var random = LoopRandom()
        for _ in 0..<1000 {
            if case .success(let k) = rt.pick(hash: nil, random: &random, excluded: { _ in false }) { #expect(k != eps[4]) }
        }
    }

    @Test func maxEjectionPercentCapsConsecutiveFailureEjections() throws {
        var od = TrafficPolicy.OutlierDetection()
        od.consecutive5xx = 2
        od.maxEjectionPercent = 25
        let rt = runtime(TrafficPolicy.LoadBalancer(), endpoints(8), outliers: od)
        let detector = try #require(rt.outliers)
        for i in 0..<8 {
            detector.record(i, .localFailure, runtime: rt)
            detector.record(i, .serverError(502), runtime: rt)
        }
        let now = NIODeadline.now().uptimeNanoseconds
        #expect(rt.backends.count(where: { $0.isEjected(now) }) == 2, "25% of 8")
        #expect(detector.ejectionsTotal.load(ordering: .relaxed) == 2)
    }

    /// consecutiveGatewayErrors counts 502, 503, 504 and the proxy's own
    /// failures to get an answer (connect failure, reset, timeout) in a
    /// row, as Envoy's consecutive_gateway_failure: any other answer, a 500
    /// as a success, ends the run.
    @Test func consecutiveGatewayErrorsCountOnlyGatewayFailuresInARow() throws {
        var od = TrafficPolicy.OutlierDetection()
        od.consecutive5xx = 0
        od.consecutiveGatewayErrors = 3
        od.maxEjectionPercent = 100
        let rt = runtime(TrafficPolicy.LoadBalancer(), endpoints(3), outliers: od)
        let detector = try #require(rt.outliers)
        let runs: [[OutlierDetector.Outcome]] = [
            // Two, a 500 ends the run, then 502, a local failure and 503: three in a row.
            [.serverError(503), .serverError(504), .serverError(500), .serverError(502), .localFailure, .serverError(503)],
            // Only 500s: no gateway error at all (and consecutive5xx is off).
            Array(repeating: .serverError(500), count: 6),
            // A success ends the run: two, then one.
            [.serverError(502), .serverError(503), .success, .serverError(504)],
        ]
        let now = NIODeadline.now().uptimeNanoseconds
        for (i, run) in runs.enumerated() {
            for (k, outcome) in run.enumerated() {
                detector.record(i, outcome, runtime: rt)
                let ejected = rt.backends[i].isEjected(NIODeadline.now().uptimeNanoseconds)
                #expect(ejected == (i == 0 && k == run.count - 1), "backend \(i) after outcome \(k): ejected \(ejected)")
            }
        }
        #expect(rt.backends.map { $0.isEjected(now) } == [true, false, false])
        #expect(detector.ejectionsTotal.load(ordering: .relaxed) == 1)
    }

    /// A gRPC status counts as Envoy maps it to HTTP: the backend's own
    /// failures (UNKNOWN, INTERNAL, DATA_LOSS, UNIMPLEMENTED, UNAVAILABLE,
    /// DEADLINE_EXCEEDED) are server errors, the three gateway ones among
    /// them; OK and the caller's errors are not; no status, no outcome.
    @Test func grpcStatusesAreOutcomesAsEnvoyMapsThem() throws {
        func outcome(_ status: String?) -> String {
            var h = HTTPHeaders([("content-type", "application/grpc")])
            if let status { h.add(name: "grpc-status", value: status) }
            switch HTTPProxyHandler.grpcOutcome(h) {
            case nil: return "none"
            case .success?: return "success"
            case .serverError(let code)?: return "\(code)"
            case .localFailure?: return "local"
            }
        }
        #expect(["0", "1", "3", "5", "7", "8", "16"].map(outcome) == Array(repeating: "success", count: 7))
        #expect(["2", "4", "12", "13", "14", "15"].map(outcome) == ["500", "504", "501", "500", "503", "500"])
        #expect(outcome(nil) == "none" && outcome("x") == "none")
        // Three UNAVAILABLEs in a row eject, as three 503s do.
        var od = TrafficPolicy.OutlierDetection()
        od.consecutive5xx = 3
        let rt = runtime(TrafficPolicy.LoadBalancer(), endpoints(2), outliers: od)
        let detector = try #require(rt.outliers)
        let unavailable = try #require(HTTPProxyHandler.grpcOutcome(HTTPHeaders([("grpc-status", "14")])))
        for _ in 0..<3 { detector.record(0, unavailable, runtime: rt) }
        #expect(rt.backends.first?.isEjected(NIODeadline.now().uptimeNanoseconds) == true)
    }

    @Test func anExpressHoldGivesItsSlotBackOnceAndTellsOneOutcome() throws {
        var od = TrafficPolicy.OutlierDetection()
        od.consecutive5xx = 2
        od.maxEjectionPercent = 100
        let eps = endpoints(2)
        let rt = ClusterRuntime(name: "t/s:80", policy: .init(loadBalancer: .init(), outlierDetection: od,
                                                              circuitBreaker: breaker { $0.maxRequests = 1 }, policy: "t/s"),
                                endpoints: eps, node: "n1", previous: nil)
        #expect(rt.reserve(eps[0]) && !rt.reserve(eps[0]), "maxRequests 1: one slot")
        var hold = ClusterRuntime.Hold(rt, 0)
        // An interim response is no outcome; the final one is, once.
        hold.record(status: 100)
        hold.record(status: 503)
        hold.record(.localFailure)
        hold.release()
        hold.release()
        #expect(rt.backends[0].requests.load(ordering: .relaxed) == 0, "the slot came back once")
        let now = NIODeadline.now().uptimeNanoseconds
        #expect(!rt.backends[0].isEjected(now), "one failure told, not two (consecutive5xx 2)")
        // A second exchange's failure makes two in a row.
        #expect(rt.reserve(eps[0]))
        var second = ClusterRuntime.Hold(rt, 0)
        second.record(.localFailure)
        second.release()
        #expect(rt.backends[0].isEjected(NIODeadline.now().uptimeNanoseconds))
        #expect(rt.backends[0].requests.load(ordering: .relaxed) == 0)
    }

    @Test func aCookieHashMintsACookieOnlyForARequestWithoutOne() {
        func runtime(_ hashOn: TrafficPolicy.LoadBalancer.HashKey?) -> ClusterRuntime {
            var lb = TrafficPolicy.LoadBalancer()
            lb.algorithm = .ringHash
            lb.hashOn = hashOn
            return ClusterRuntime(name: "t/s:80", policy: .init(loadBalancer: lb, outlierDetection: nil, circuitBreaker: nil, policy: "t/s"),
                                  endpoints: endpoints(2), node: "n1", previous: nil)
        }
        var random = SystemRandomNumberGenerator()
        let source = IPv4Address("198.18.1.9")!
        let sticky = runtime(.cookie(name: "s", ttl: .seconds(3600)))
        let fields = ["a=1; s=abc", "s=later"]
        let cookie: (String) -> Substring? = { ClusterRuntime.cookie($0, in: fields) }
        #expect(ClusterRuntime.cookie("s", in: fields) == "abc" && ClusterRuntime.cookie("b", in: fields) == nil)
        let carried = sticky.requestKey(header: { _ in nil }, cookie: cookie, source: source, random: &random)
        #expect(carried.hash == ConsistentHash.stableHash("abc".utf8) && carried.setCookie == nil)
        let minted = sticky.requestKey(header: { _ in nil }, cookie: { _ in nil }, source: source, random: &random)
        let value = minted.setCookie.flatMap { $0.split(separator: ";").first }.map { String($0.dropFirst(2)) } ?? ""
        #expect(minted.setCookie == "s=\(value); Path=/; Max-Age=3600; HttpOnly" && !value.isEmpty)
        #expect(minted.hash == ConsistentHash.stableHash(value.utf8), "the minted cookie picks as it will when it comes back")
        // No ttl: nothing minted, the request is spread.
        let session = runtime(.cookie(name: "s", ttl: nil)).requestKey(header: { _ in nil }, cookie: { _ in nil }, source: source, random: &random)
        #expect(session.hash == nil && session.setCookie == nil)
        let byHeader = runtime(.header("x-user")).requestKey(header: { $0 == "x-user" ? "u1" : nil }, cookie: { _ in nil },
                                                           source: source, random: &random)
        #expect(byHeader.hash == ConsistentHash.stableHash("u1".utf8) && byHeader.setCookie == nil)
    }

    @Test func consistentHashesMoveOnlyTheKeysOfABackendThatLeaves() {
        for make in [{ ConsistentHash.Ring($0).owner }, { ConsistentHash.Maglev($0).owner }] as [([String]) -> (UInt64) -> Int] {
            let five = (1...5).map { "198.18.1.\($0):8080" }
            let four = five.filter { $0 != "198.18.1.3:8080" }
            let before = make(five), after = make(four)
            var share = [Int](repeating: 0, count: 5)
            var moved = 0
            for k in 0..<20_000 {
                let h = ConsistentHash.stableHash("user-\(k)".utf8)
                let a = five[before(h)], b = four[after(h)]
                share[before(h)] += 1
                if a != "198.18.1.3:8080" && a != b { moved += 1 }
            }
            print("figure: keys of staying backends moved: \(moved) of 20000")
            #expect(moved < 200, "keys of staying backends moved: \(moved)")
            #expect(share.allSatisfy { $0 > 2_800 && $0 < 5_200 }, "\(share)")
        }
    }

    @Test func tokenBucketAdmitsBurstThenRate() {
        let limit = TrafficPolicy.RateLimit(requests: 10, interval: .seconds(1), burst: 5, key: .route)
        var bucket = TokenBucket(limit, now: 0)
        var admitted = 0
        for _ in 0..<20 where bucket.take(now: 0) == nil { admitted += 1 }
        #expect(admitted == 5)
        #expect(bucket.take(now: 0) == .milliseconds(100), "one token every 100 ms")
        // Two seconds later: 20 tokens' worth, capped at the burst of 5.
        admitted = 0
        for _ in 0..<20 where bucket.take(now: 2_000_000_000) == nil { admitted += 1 }
        #expect(admitted == 5)
    }

    /// rateLimit key SourceIdentity: one bucket per client identity
    /// (namespace/serviceAccount), shared by that identity's pods; a
    /// source that is no pod of the mesh has its address's own. Read from
    /// manifests as `weft proxy` reads them.
    @Test func aSourceIdentityRateLimitSharesABucketPerServiceAccount() throws {
        func pod(_ name: String, _ address: String, _ account: String) -> String {
            """
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: \(name), namespace: fz, labels: {app: client}}
            spec: {node: n1, address: \(address), serviceAccount: \(account)}
            """
        }
        let rig = try ProxyFuzzTests.Rig(manifests: [
            ProxyFuzzTests.trafficPolicy("api", "rateLimit: {requests: 1, interval: 1h, burst: 1, key: SourceIdentity}"),
            pod("c1", "198.18.7.1", "client"), pod("c2", "198.18.7.2", "client"), pod("o", "198.18.7.3", "other"),
        ].joined(separator: "\n---\n"))
        defer { rig.shutdown() }
        let snapshot = rig.proxy.snapshot
        let guardState = try #require(snapshot.guards["\(ProxyFuzzTests.vip):80"])
        #expect(guardState.rateLimit?.key == .sourceIdentity)
        var random = LoopRandom()
        func judge(_ address: String) -> String {
            switch guardState.judge(route: "fz/api#0", source: IPv4Address(address)!, header: { _ in nil }, snapshot: snapshot,
                                    random: &random) {
            case .pass: return "pass"
            case .limited(let key, _): return "limited \(key)"
            default: return "other"
            }
        }
        #expect(judge("198.18.7.1") == "pass")
        #expect(judge("198.18.7.2") == "limited fz/client", "c2 shares c1's identity, and its bucket")
        #expect(judge("198.18.7.3") == "pass", "another identity, another bucket")
        #expect(judge("198.18.9.9") == "pass")
        #expect(judge("198.18.9.9") == "limited 198.18.9.9", "no pod: keyed by its address")
    }

    /// A Service's external address and node port are shipped as aliases
    /// and served with its clusterIP port's frontend, route matchers and
    /// guard, one guard for all: a rate limit holds over every address.
    @Test func aliasesShareTheirFrontendsMatchersAndGuard() throws {
        let text = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec: {type: NodePort, clusterIP: 198.19.0.10, externalIPs: [198.19.5.1], selector: {app: web},
                   ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]}
            ---
            apiVersion: v1
            kind: Node
            metadata: {name: n1}
            status: {addresses: [{type: InternalIP, address: 198.18.0.1}]}
            ---
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: p, namespace: shop}
            spec:
              targetRefs: [{group: "", kind: Service, name: web}]
              rateLimit: {requests: 1, interval: 1h, burst: 1}
            """
        let (resources, errors) = ManifestReader.parse(text, file: "a.yaml")
        let state = try ClusterState.build(resources, parseErrors: errors).get()
        let snapshot = RouteSnapshot(ProxyTable(state, node: "n1"))
        let guardState = try #require(snapshot.guards["198.19.0.10:80"])
        for alias in ["198.19.5.1:80", "198.18.0.1:30080"] {
            #expect(snapshot.guards[alias] === guardState, "\(alias)")
            #expect(snapshot.matchers[alias] != nil && snapshot.table.frontends[alias] == snapshot.table.frontends["198.19.0.10:80"], "\(alias)")
            #expect(snapshot.table.services?[alias]?.name == "web", "\(alias)")
        }
        var random = LoopRandom()
        func judge() -> Bool {
            if case .pass = guardState.judge(route: "shop/web#0", source: IPv4Address(0xC612_010A), header: { _ in nil },
                                             snapshot: snapshot, random: &random) { return true }
            return false
        }
        #expect(judge() && !judge(), "one token an hour, whichever address was dialed")
    }

    @Test func frontendGuardLimitsPerKeyThenInjectsFaultsOnlyForItsSources() {
        var table = ProxyTable()
        table.workloads = ["198.18.1.10": .init(name: "a", namespace: "shop", serviceAccount: "client", node: "n1"),
                           "198.18.1.11": .init(name: "b", namespace: "shop", serviceAccount: "other", node: "n1")]
        let snapshot = RouteSnapshot(table)
        let client = IPv4Address(0xC612_010A), other = IPv4Address(0xC612_010B)  // 198.18.1.10, .11
        var random = LoopRandom()
        var faults = TrafficPolicy.FaultInjection()
        faults.abort = .init(httpStatus: 418, percentage: 100)
        faults.sources = [.init(namespace: "shop", serviceAccount: "client")]
        let limit = TrafficPolicy.RateLimit(requests: 1, interval: .seconds(3600), burst: 2, key: .header("x-tenant"))
        let guardState = FrontendGuard(rateLimit: limit, faults: faults)
        func judge(_ source: IPv4Address, tenant: String) -> FrontendGuard.Decision {
            let headers = HTTPHeaders([("x-tenant", tenant)])
            return guardState.judge(route: "shop/web#0", source: source, header: { headers[canonicalForm: $0].first },
                                    snapshot: snapshot, random: &random)
        }
        // Two tokens for tenant t1 (aborted by the fault, which comes after
        // the limit), the third is limited; tenant t2 has its own bucket.
        for _ in 0..<2 {
            guard case .abort(418, nil) = judge(client, tenant: "t1") else { Issue.record("expected the injected abort"); return }
        }
        guard case .limited("t1", let wait) = judge(client, tenant: "t1") else { Issue.record("expected t1 limited"); return }
        #expect(wait > .seconds(3000) && wait <= .seconds(3600), "one token per hour: \(wait)")
        // Another source is not in the fault's scope: it passes.
        guard case .pass = judge(other, tenant: "t2") else { Issue.record("expected other's request to pass"); return }
        #expect(guardState.limited.load(ordering: .relaxed) == 1 && guardState.aborted.load(ordering: .relaxed) == 2)
        // The 429 either path answers: whole seconds up, never 0.
        let answer = FrontendGuard.limitedAnswer(frontend: "shop/web:http", key: "t1", wait: wait)
        #expect(answer.body == "weft: rate limit of shop/web:http reached for t1\n")
        #expect(answer.retryAfter.0 == "retry-after" && Int(answer.retryAfter.1).map { $0 > 3000 && $0 <= 3600 } == true)
        #expect(FrontendGuard.limitedAnswer(frontend: "f", key: "k", wait: .milliseconds(10)).retryAfter.1 == "1")
        #expect(FrontendGuard.limitedAnswer(frontend: "f", key: "k", wait: .milliseconds(1001)).retryAfter.1 == "2")
    }
}

extension BalancerUnitTests {
    /// A change that leaves the route table as it was moves the proxy to
    /// its generation without compiling anything again: the cluster
    /// runtimes (their balancing and breaking state), the frontend guards
    /// (their token buckets) and the matchers are the same objects, and
    /// the loops see a new snapshot (per-generation caches start over).
    @Test func aNewerGenerationOfTheSameTableSharesEverythingButItsNumber() throws {
        let config = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
            ---
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: a, namespace: shop, labels: {app: web}}
            spec: {node: n1, address: 198.18.1.10}
            ---
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: web, namespace: shop}
            spec:
              targetRefs: [{group: "", kind: Service, name: web}]
              loadBalancer: {type: RoundRobin}
              rateLimit: {requests: 5, interval: 1s}
            """
        let channel = EmbeddedChannel()
        let proxy = try embeddedProxy(node: "n1", address: "198.18.1.1", config: config, on: channel)
        let before = proxy.snapshot
        let installed = proxy.installed.load(ordering: .acquiring)
        let runtime = try #require(before.runtimes["shop/web:80"])
        let guardState = try #require(before.guards["198.19.0.10:80"])
        proxy.advance(to: before.generation + 5)
        let after = proxy.snapshot
        #expect(after !== before && after.generation == before.generation + 5)
        #expect(proxy.installed.load(ordering: .acquiring) == installed + 1)
        #expect(after.runtimes["shop/web:80"] === runtime && after.guards["198.19.0.10:80"] === guardState)
        #expect(after.matchers["198.19.0.10:80"] === before.matchers["198.19.0.10:80"])
        var table = after.table
        table.generation = before.generation
        #expect(table == before.table && after.endpoints == before.endpoints)
        // An older or equal generation changes nothing.
        proxy.advance(to: before.generation + 5)
        proxy.advance(to: before.generation)
        #expect(proxy.snapshot === after && proxy.installed.load(ordering: .acquiring) == installed + 1)
    }
}

extension ConsistentHash.Ring {
    func owner(_ h: UInt64) -> Int { first(h) { _ in true } ?? -1 }
}

extension ConsistentHash.Maglev {
    func owner(_ h: UInt64) -> Int { first(h) { _ in true } ?? -1 }
}
