import Foundation

/// Samples of one scrape in the Prometheus text format, as the agents write
/// it (the proxy's series included): what `weft top` and `weft graph` read.
public struct MetricSamples: Sendable {
    public struct Sample: Sendable, Equatable {
        public var name: String
        public var labels: [String: String]
        public var value: Double
    }

    public var samples: [Sample] = []

    public init(_ samples: [Sample] = []) { self.samples = samples }

    /// Parses exposition text; comment lines and lines it cannot read are
    /// skipped (a scrape of several agents is simply concatenated).
    public static func parse(_ text: String) -> MetricSamples {
        var out = MetricSamples()
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) where !line.hasPrefix("#") {
            if let s = parseLine(Substring(line)) { out.samples.append(s) }
        }
        return out
    }

    static func parseLine(_ line: Substring) -> Sample? {
        var labels: [String: String] = [:]
        let name: Substring
        var rest: Substring
        if let brace = line.firstIndex(of: "{") {
            name = line[..<brace]
            rest = line[line.index(after: brace)...]
            // key="value" pairs; values escape \\, \" and \n.
            while true {
                rest = rest.drop { $0 == "," || $0 == " " }
                if rest.first == "}" { rest = rest.dropFirst(); break }
                guard let eq = rest.firstIndex(of: "=") else { return nil }
                let key = String(rest[..<eq])
                rest = rest[rest.index(after: eq)...]
                guard rest.first == "\"" else { return nil }
                rest = rest.dropFirst()
                var value = ""
                var closed = false
                while let c = rest.first {
                    rest = rest.dropFirst()
                    if c == "\\", let next = rest.first {
                        rest = rest.dropFirst()
                        value.append(next == "n" ? "\n" : next)
                    } else if c == "\"" {
                        closed = true
                        break
                    } else {
                        value.append(c)
                    }
                }
                guard closed else { return nil }
                labels[key] = value
            }
        } else {
            guard let space = line.firstIndex(of: " ") else { return nil }
            name = line[..<space]
            rest = line[space...]
        }
        let fields = rest.split(separator: " ")
        guard let first = fields.first, !name.isEmpty else { return nil }
        let value: Double
        switch first {
        case "+Inf": value = .infinity
        case "-Inf": value = -.infinity
        case "NaN": value = .nan
        default:
            guard let v = Double(first) else { return nil }
            value = v
        }
        return Sample(name: String(name), labels: labels, value: value)
    }

    public func named(_ name: String) -> [Sample] { samples.filter { $0.name == name } }
}

/// Per-Service and per-edge traffic from the proxies' series: the numbers
/// Linkerd's viz shows (request rate, success rate, latency quantiles,
/// connections); the edges also from the kernel's connection and UDP
/// exchange counters, for Service ports no proxy serves. With two scrapes
/// the figures cover the time between them; with one, everything since the
/// proxies started (and the kernel's counters were made).
public enum TrafficView {
    public struct ServiceRow: Codable, Sendable, Equatable {
        public var service: String
        public var requests: Double
        /// Requests a second; nil from a single scrape.
        public var rps: Double?
        /// Share of responses that are not failures (isFailure: not 5xx, and
        /// for gRPC calls, status OK; nil without requests).
        public var successRate: Double?
        public var p50Seconds: Double?
        public var p99Seconds: Double?
        /// TCP connections open now: opaque ones through the proxies, and
        /// those the kernel alone balanced to this Service (weft_l4_*).
        public var tcpOpen: Double
    }

    public struct Edge: Codable, Sendable, Equatable, Hashable {
        /// "namespace/workload" of the client.
        public var source: String
        /// The Service's DNS name (`name.namespace.svc`).
        public var destination: String
        public var requests: Double
        public var failures: Double
        public var rps: Double?
        /// TCP connections: opaque ones through the proxies, and those the
        /// kernel alone balanced to a Service port that needs no proxy.
        public var tcpConnections: Double
        /// UDP exchanges the kernel counted (a connect(), or a socket's first
        /// datagram to a backend).
        public var udpExchanges: Double = 0
        /// TCP connects and UDP sends to a Service port that no backend
        /// took (refused for want of one, reset, timed out), as the kernel
        /// counted them.
        public var connectionFailures: Double = 0
        public var successRate: Double? { requests > 0 ? (requests - failures) / requests : nil }
        /// Share of connections and exchanges that did not fail (nil without any).
        public var connectionSuccessRate: Double? {
            let all = tcpConnections + udpExchanges + connectionFailures
            return all > 0 ? (all - connectionFailures) / all : nil
        }
    }

    /// A failure, as Linkerd classifies a response: a gRPC call whose
    /// status is not OK (`grpc_response_status`; its HTTP status is 200
    /// whether it failed or not, the proxy's own answers too), else a 5xx or
    /// no response.
    static func isFailure(_ labels: [String: String]) -> Bool {
        if let grpc = labels["grpc_response_status"], !grpc.isEmpty { return grpc != "0" }
        let code = Int(labels["response_code"] ?? "") ?? 0
        return code >= 500 || code == 0
    }

    /// after - before, per label set of `name` (a counter reset counts from 0).
    static func deltas(_ name: String, before: MetricSamples?, after: MetricSamples) -> [(labels: [String: String], value: Double)] {
        var old: [[String: String]: Double] = [:]
        for s in before?.named(name) ?? [] { old[s.labels, default: 0] += s.value }
        var now: [[String: String]: Double] = [:]
        for s in after.named(name) { now[s.labels, default: 0] += s.value }
        return now.map { labels, value in
            let prior = old[labels] ?? 0
            return (labels, value >= prior ? value - prior : value)
        }
    }

    /// A series of the kernel's counters (weft_l4_*) that is a kernel-only
    /// Service's: a connection it captured to the node proxy is the proxy's
    /// to report (as requests or opaque TCP), and one to a pod's own address
    /// names no Service.
    static func kernelOnly(_ labels: [String: String]) -> Bool {
        labels["destination_workload"] != "node-proxy" && (labels["destination_service"] ?? "unknown") != "unknown"
    }

    public static func services(before: MetricSamples?, after: MetricSamples, seconds: Double?) -> [ServiceRow] {
        var rows: [String: ServiceRow] = [:]
        func row(_ service: String) -> ServiceRow {
            rows[service] ?? ServiceRow(service: service, requests: 0, rps: nil, successRate: nil, p50Seconds: nil,
                                        p99Seconds: nil, tcpOpen: 0)
        }
        var failures: [String: Double] = [:]
        for (labels, value) in deltas("weft_requests_total", before: before, after: after) {
            let service = labels["destination_service"] ?? "unknown"
            var r = row(service)
            r.requests += value
            rows[service] = r
            if isFailure(labels) { failures[service, default: 0] += value }
        }
        var buckets: [String: [Double: Double]] = [:]
        for (labels, value) in deltas("weft_request_duration_seconds_bucket", before: before, after: after) {
            guard let le = labels["le"].flatMap({ $0 == "+Inf" ? Double.infinity : Double($0) }) else { continue }
            buckets[labels["destination_service"] ?? "unknown", default: [:]][le, default: 0] += value
        }
        let opened = deltas("weft_tcp_connections_opened_total", before: nil, after: after)
        let closed = deltas("weft_tcp_connections_closed_total", before: nil, after: after)
        for (labels, value) in opened {
            let service = labels["destination_service"] ?? "unknown"
            var r = row(service)
            r.tcpOpen += value
            rows[service] = r
        }
        for (labels, value) in closed {
            let service = labels["destination_service"] ?? "unknown"
            rows[service]?.tcpOpen -= value
        }
        for (name, sign) in [("weft_l4_connections_opened_total", 1.0), ("weft_l4_connections_closed_total", -1.0)] {
            for (labels, value) in deltas(name, before: nil, after: after) where kernelOnly(labels) {
                let service = labels["destination_service"] ?? "unknown"
                var r = row(service)
                r.tcpOpen += sign * value
                rows[service] = r
            }
        }
        for (service, var r) in rows {
            if let seconds, seconds > 0 { r.rps = r.requests / seconds }
            if r.requests > 0 { r.successRate = (r.requests - (failures[service] ?? 0)) / r.requests }
            let sorted = (buckets[service] ?? [:]).sorted { $0.key < $1.key }.map { (le: $0.key, count: $0.value) }
            r.p50Seconds = quantile(0.5, sorted)
            r.p99Seconds = quantile(0.99, sorted)
            rows[service] = r
        }
        return rows.values.sorted { $0.service < $1.service }
    }

    public static func edges(before: MetricSamples?, after: MetricSamples, seconds: Double?) -> [Edge] {
        struct Key: Hashable { var source: String; var destination: String }
        var edges: [Key: Edge] = [:]
        func key(_ labels: [String: String]) -> Key {
            Key(source: "\(labels["source_workload_namespace"] ?? "unknown")/\(labels["source_workload"] ?? "unknown")",
                destination: labels["destination_service"] ?? "unknown")
        }
        func edge(_ k: Key) -> Edge {
            edges[k] ?? Edge(source: k.source, destination: k.destination, requests: 0, failures: 0, rps: nil, tcpConnections: 0)
        }
        for (labels, value) in deltas("weft_requests_total", before: before, after: after) {
            let k = key(labels)
            var e = edge(k)
            e.requests += value
            if isFailure(labels) { e.failures += value }
            edges[k] = e
        }
        for (labels, value) in deltas("weft_tcp_connections_opened_total", before: before, after: after) {
            let k = key(labels)
            var e = edge(k)
            e.tcpConnections += value
            edges[k] = e
        }
        // The kernel's counters, for the Service ports it serves alone.
        let kernel: [(String, WritableKeyPath<Edge, Double>)] = [
            ("weft_l4_connections_opened_total", \.tcpConnections), ("weft_l4_connections_failed_total", \.connectionFailures),
            ("weft_l4_udp_exchanges_opened_total", \.udpExchanges), ("weft_l4_udp_exchanges_failed_total", \.connectionFailures),
        ]
        for (name, field) in kernel {
            for (labels, value) in deltas(name, before: before, after: after) where kernelOnly(labels) {
                let k = key(labels)
                var e = edge(k)
                e[keyPath: field] += value
                edges[k] = e
            }
        }
        return edges.values.map { e in
            var e = e
            if let seconds, seconds > 0 { e.rps = e.requests / seconds }
            return e
        }.filter { $0.requests > 0 || $0.tcpConnections > 0 || $0.udpExchanges > 0 || $0.connectionFailures > 0 }
            .sorted { ($0.source, $0.destination) < ($1.source, $1.destination) }
    }

    /// Prometheus' histogram_quantile: linear interpolation inside the
    /// bucket the rank falls in; the +Inf bucket answers with the highest
    /// finite bound.
    public static func quantile(_ q: Double, _ buckets: [(le: Double, count: Double)]) -> Double? {
        guard let total = buckets.last?.count, total > 0, buckets.last?.le == .infinity else { return nil }
        let rank = q * total
        var lowerBound = 0.0, lowerCount = 0.0
        for b in buckets {
            if b.count >= rank {
                if b.le == .infinity { return lowerBound }
                let inBucket = b.count - lowerCount
                return inBucket > 0 ? lowerBound + (b.le - lowerBound) * (rank - lowerCount) / inBucket : b.le
            }
            lowerBound = b.le
            lowerCount = b.count
        }
        return lowerBound
    }
}
