import NIOCore
import NIOHTTP1
import Synchronization
import WeftCore

/// The request-side half of a Service's TrafficPolicy, shared by every event
/// loop: the local rate limit's token buckets and the fault injection
/// settings. Carried across route snapshots while the policy is unchanged,
/// so a table change neither refills nor drains a bucket.
final class FrontendGuard: Sendable {
    let rateLimit: TrafficPolicy.RateLimit?
    let faults: TrafficPolicy.FaultInjection?
    private let buckets = Mutex<[String: TokenBucket]>([:])
    let limited = Atomic<Int>(0)
    let aborted = Atomic<Int>(0)
    let delayed = Atomic<Int>(0)

    init(rateLimit: TrafficPolicy.RateLimit?, faults: TrafficPolicy.FaultInjection?) {
        self.rateLimit = rateLimit
        self.faults = faults
    }

    func sameSettings(_ rateLimit: TrafficPolicy.RateLimit?, _ faults: TrafficPolicy.FaultInjection?) -> Bool {
        self.rateLimit == rateLimit && self.faults == faults
    }

    /// What the request side of the policy does with one request.
    enum Decision {
        case pass
        /// Over the rate limit of `key`; a token is there in `retryAfter`.
        case limited(key: String, retryAfter: Duration)
        /// (`grpc`: the gRPC status a gRPC call gets, if the policy names one.)
        case abort(status: Int, grpc: Int?)
        case delay(Duration)
    }

    /// What a request over the rate limit of `key` is answered (429), on
    /// either path: the body, and Retry-After in whole seconds (at least 1)
    /// until a token is there.
    static func limitedAnswer(frontend: String, key: String, wait: Duration) -> (body: String, retryAfter: (String, String)) {
        let seconds = max(1, Int((Double(wait.nanoseconds) / 1e9).rounded(.up)))
        return ("weft: rate limit of \(frontend) reached for \(key)\n", ("retry-after", String(seconds)))
    }

    /// The rate limit, then the faults, for one request to `route` from
    /// `source`; `header` gives a field's first value (a limit keyed by a
    /// header). Kept out of line (like every per-request TrafficPolicy
    /// entry point) so a CPU profile charges its cost to the policy:
    /// `scripts/bench resilience` measures it that way.
    @inline(never)
    func judge(route: String, source: IPv4Address, header: (String) -> Substring?, snapshot: RouteSnapshot,
               random: inout LoopRandom) -> Decision {
        if let limit = rateLimit {
            let key: String
            switch limit.key {
            case .route: key = route
            case .sourceIdentity: key = snapshot.identities[source.value] ?? source.description
            case .header(let name): key = header(name).map(String.init) ?? "-"
            }
            if let wait = admit(key) {
                limited.add(1, ordering: .relaxed)
                return .limited(key: key, retryAfter: wait)
            }
        }
        guard let faults else { return .pass }
        let workload = snapshot.workloadsByIP[source.value]
        guard faults.applies(route: route, sourceNamespace: workload?.namespace, serviceAccount: workload?.serviceAccount) else {
            return .pass
        }
        if let abort = faults.abort, Double.random(in: 0..<100, using: &random) < abort.percentage {
            aborted.add(1, ordering: .relaxed)
            return .abort(status: abort.httpStatus, grpc: abort.grpcStatus)
        }
        if let d = faults.delay, Double.random(in: 0..<100, using: &random) < d.percentage {
            delayed.add(1, ordering: .relaxed)
            return .delay(d.fixedDelay)
        }
        return .pass
    }

    /// Takes a token for `key`'s bucket. nil: admitted; else how long until
    /// a token is there (for Retry-After).
    func admit(_ key: String) -> Duration? {
        guard let limit = rateLimit else { return nil }
        let now = NIODeadline.now().uptimeNanoseconds
        return buckets.withLock { all in
            // Bound the number of keys (one per header value): a client
            // minting values must not grow the proxy without limit.
            if all.count >= 100_000 && all[key] == nil { all.removeAll(keepingCapacity: true) }
            var bucket = all[key] ?? TokenBucket(limit, now: now)
            let wait = bucket.take(now: now)
            all[key] = bucket
            return wait
        }
    }
}

/// A token bucket: `burst` tokens at most, refilled continuously at
/// `requests` per `interval`.
struct TokenBucket {
    private var tokens: Double
    private var last: UInt64
    private let capacity: Double
    /// Tokens per nanosecond.
    private let rate: Double

    init(_ limit: TrafficPolicy.RateLimit, now: UInt64) {
        capacity = Double(limit.burst)
        tokens = capacity
        last = now
        rate = Double(limit.requests) / Double(limit.interval.nanoseconds)
    }

    mutating func take(now: UInt64) -> Duration? {
        if now > last {
            tokens = min(capacity, tokens + Double(now - last) * rate)
            last = now
        }
        if tokens >= 1 {
            tokens -= 1
            return nil
        }
        return .nanoseconds(Int64(((1 - tokens) / rate).rounded(.up)))
    }
}
