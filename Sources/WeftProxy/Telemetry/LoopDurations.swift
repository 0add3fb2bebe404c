import Prometheus
import Synchronization

/// Request durations recorded on one event loop, per label set: a count per
/// bucket (not cumulative) and the sum, each set under a lock that only its
/// loop and a scrape take. Recording is a search of 15 bounds and one
/// uncontended lock; swift-prometheus's histogram compared and counted every
/// cumulative bucket under its lock, about 660 user-space instructions a
/// request, most of what the request series cost the express path
/// (docs/benchmarks.md, "Telemetry cost"). The loops' counts are added up
/// when the exposition is written (`render`), in swift-prometheus's format.
final class LoopDurations: Sendable {
    /// Bucket bounds in nanoseconds (ProxyTelemetry.buckets); a series
    /// counts one bucket more, +Inf, past the last.
    static let bounds: [Int64] = ProxyTelemetry.buckets.map {
        $0.components.seconds * 1_000_000_000 + $0.components.attoseconds / 1_000_000_000
    }

    /// One label set's durations on this loop.
    final class Series: Sendable {
        /// The label pairs as the exposition writes them (`prerender`).
        let labels: [UInt8]
        private let bounds: [Int64]
        fileprivate let counts: Mutex<Counts>

        fileprivate init(labels: [UInt8]) {
            self.labels = labels
            bounds = LoopDurations.bounds
            counts = Mutex(Counts(buckets: [Int](repeating: 0, count: bounds.count + 1)))
        }

        /// One duration: counted in the first bucket whose bound it is not
        /// over (the last: +Inf), and added to the sum.
        func record(nanoseconds: Int64) {
            var i = 0
            while i < bounds.count && nanoseconds > bounds[i] { i += 1 }
            counts.withLock { c in
                c.buckets[i] &+= 1
                c.sum &+= nanoseconds
            }
        }
    }

    fileprivate struct Counts {
        var buckets: [Int]
        var sum: Int64 = 0
    }

    private let table = Mutex<[[UInt8]: Series]>([:])

    /// The series of these labels on this loop, made the first time.
    func series(_ labels: [(String, String)]) -> Series {
        let key = Self.prerender(labels)
        return table.withLock { table in
            if let s = table[key] { return s }
            let s = Series(labels: key)
            table[key] = s
            return s
        }
    }

    /// `name="value"` pairs joined by commas, the value's backslash, double
    /// quote and line feed escaped: as swift-prometheus writes labels.
    static func prerender(_ labels: [(String, String)]) -> [UInt8] {
        var out: [UInt8] = []
        for (i, (name, value)) in labels.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out.append(contentsOf: name.utf8)
            out.append(contentsOf: "=\"".utf8)
            for byte in value.utf8 {
                switch byte {
                case UInt8(ascii: "\\"): out.append(contentsOf: "\\\\".utf8)
                case UInt8(ascii: "\""): out.append(contentsOf: "\\\"".utf8)
                case UInt8(ascii: "\n"): out.append(contentsOf: "\\n".utf8)
                default: out.append(byte)
                }
            }
            out.append(UInt8(ascii: "\""))
        }
        return out
    }

    /// The family `name` (a histogram) in the exposition format: each label
    /// set once, the loops' counts added, buckets cumulative, as
    /// swift-prometheus writes a histogram. Empty while nothing is recorded.
    static func render(_ loops: [LoopDurations], name: String, help: String) -> String {
        var totals: [[UInt8]: Counts] = [:]
        var order: [[UInt8]] = []
        for loop in loops {
            for series in loop.table.withLock({ Array($0.values) }) {
                let c = series.counts.withLock { $0 }
                if var t = totals[series.labels] {
                    for i in t.buckets.indices { t.buckets[i] &+= c.buckets[i] }
                    t.sum &+= c.sum
                    totals[series.labels] = t
                } else {
                    totals[series.labels] = c
                    order.append(series.labels)
                }
            }
        }
        guard !order.isEmpty else { return "" }
        let les = ProxyTelemetry.buckets.map { Array($0.bucketRepresentation.utf8) }
        let family = Array(name.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(order.count * (les.count + 3) * (family.count + (order.first?.count ?? 0) + 32))
        out.append(contentsOf: "# HELP \(name) \(help)\n# TYPE \(name) histogram\n".utf8)
        for labels in order {
            guard let t = totals[labels] else { continue }
            func line(_ suffix: String, _ le: [UInt8]?, _ value: String) {
                out.append(contentsOf: family)
                out.append(contentsOf: suffix.utf8)
                out.append(UInt8(ascii: "{"))
                out.append(contentsOf: labels)
                if let le {
                    out.append(contentsOf: ",le=\"".utf8)
                    out.append(contentsOf: le)
                    out.append(UInt8(ascii: "\""))
                }
                out.append(contentsOf: "} ".utf8)
                out.append(contentsOf: value.utf8)
                out.append(UInt8(ascii: "\n"))
            }
            var cumulative = 0
            for (i, le) in les.enumerated() {
                cumulative &+= t.buckets[i]
                line("_bucket", le, String(cumulative))
            }
            let count = cumulative &+ t.buckets[les.count]
            line("_bucket", Array("+Inf".utf8), String(count))
            line("_sum", nil, Duration.nanoseconds(t.sum).bucketRepresentation)
            line("_count", nil, String(count))
        }
        return String(decoding: out, as: UTF8.self)
    }
}
