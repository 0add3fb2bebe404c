import Foundation
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization
import WeftCore

/// Who a request or TCP connection was between, in the label names
/// operators know from Istio's standard metrics.
struct PeerLabels: Hashable {
    var sourceWorkload: String
    var sourceNamespace: String
    var destinationServiceName: String
    var destinationServiceNamespace: String
    var destinationWorkload: String
    var destinationWorkloadNamespace: String

    static let unknown = "unknown"

    init(snapshot: RouteSnapshot, source: IPv4Address, service: String?, serviceNamespace: String?, upstream: EndpointKey?) {
        let src = snapshot.workloadsByIP[source.value]
        sourceWorkload = src?.name ?? Self.unknown
        sourceNamespace = src?.namespace ?? Self.unknown
        destinationServiceName = service ?? Self.unknown
        destinationServiceNamespace = serviceNamespace ?? Self.unknown
        let dst = upstream.flatMap { snapshot.workloadsByIP[$0.ip.value] }
        destinationWorkload = dst?.name ?? Self.unknown
        destinationWorkloadNamespace = dst?.namespace ?? Self.unknown
    }

    /// Istio's destination_service: the Service's DNS name.
    var destinationService: String {
        destinationServiceName == Self.unknown ? Self.unknown : "\(destinationServiceName).\(destinationServiceNamespace).svc"
    }
}

/// One finished HTTP request's labels (the key of its series).
struct RequestLabels: Hashable {
    var peers: PeerLabels
    var route: String
    var requestProtocol: String
    var responseCode: Int
    var responseFlags: String
    /// A gRPC call's status (GRPCStatus.reported); "" for plain HTTP.
    var grpcResponseStatus: String = ""
}

/// The gRPC status a call ended with, as Istio's `grpc_response_status`
/// reports it (Envoy's `Grpc::Common::getGrpcStatus`): the one the backend
/// sent (in the trailers, or the head of a trailers-only answer); without
/// one, the HTTP status mapped as gRPC's own clients map it
/// (doc/http-grpc-status-mapping.md: 400 INTERNAL, 401 UNAUTHENTICATED, 403
/// PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, any
/// other UNKNOWN, a 200 without a status too); "" when no response came.
/// gRPC-Web (`web`) sends its trailers in the body (GRPCStatusReader finds
/// the status there): a 200 with none, no trailer frame, is "" there.
enum GRPCStatus {
    static func reported(_ sent: Substring?, httpCode: Int, web: Bool = false) -> String {
        if let sent, !sent.isEmpty, sent.utf8.count <= 3, sent.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
            return String(sent)
        }
        if sent != nil { return "2" }  // a status that is not one: UNKNOWN
        switch httpCode {
        case 0: return ""
        case 200 where web: return ""
        case 400: return "13"
        case 401: return "16"
        case 403: return "7"
        case 404: return "12"
        case 429, 502, 503, 504: return "14"
        default: return "2"
        }
    }
}

/// The proxy's Prometheus series, built with swift-prometheus: requests and
/// their durations per (source, destination, route, code), TCP connections
/// and bytes per (source, destination), and the proxy's own counters.
/// Recording goes through a per-event-loop cache of series handles, so the
/// registry's lock is taken only the first time a label set is seen.
///
/// Request durations are recorded per event loop (`loopDurations`,
/// LoopDurations): one histogram shared by the loops made a loop wait on the
/// other's lock (a futex sleep, in the middle of a burst of responses) a few
/// times in a thousand requests. The loops' counts are added together when
/// the exposition is written.
final class ProxyTelemetry: Sendable {
    let registry = PrometheusCollectorRegistry()
    let loopDurations: [LoopDurations]
    let cap: LabelCap
    /// Request duration buckets, in seconds: 0.5 ms to 30 s.
    static let buckets: [Duration] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        .map { .nanoseconds(Int64($0 * 1e9)) }
    /// Last value of each ProxyStats counter put into the registry.
    private let seen = Mutex<[String: Int]>([:])

    init(labelLimit: Int, loops: Int = 1) {
        cap = LabelCap(limit: labelLimit)
        loopDurations = (0..<max(1, loops)).map { _ in LoopDurations() }
    }

    final class RequestSeries {
        let count: Counter
        let duration: LoopDurations.Series
        init(count: Counter, duration: LoopDurations.Series) {
            self.count = count
            self.duration = duration
        }
    }

    final class TCPSeries {
        let opened: Counter
        let closed: Counter
        let sent: Counter
        let received: Counter
        init(opened: Counter, closed: Counter, sent: Counter, received: Counter) {
            self.opened = opened
            self.closed = closed
            self.sent = sent
            self.received = received
        }
    }

    private func peerLabels(_ p: PeerLabels) -> [(String, String)] {
        [("reporter", "source"),
         ("source_workload", cap.admit("source_workload", p.sourceWorkload)),
         ("source_workload_namespace", cap.admit("source_workload_namespace", p.sourceNamespace)),
         ("destination_service", cap.admit("destination_service", p.destinationService)),
         ("destination_service_name", cap.admit("destination_service_name", p.destinationServiceName)),
         ("destination_service_namespace", cap.admit("destination_service_namespace", p.destinationServiceNamespace)),
         ("destination_workload", cap.admit("destination_workload", p.destinationWorkload)),
         ("destination_workload_namespace", cap.admit("destination_workload_namespace", p.destinationWorkloadNamespace))]
    }

    /// The label pairs of `l`'s series, values past the cap folded.
    func requestLabelPairs(_ l: RequestLabels) -> [(String, String)] {
        peerLabels(l.peers) + [
            ("route", cap.admit("route", l.route)),
            ("request_protocol", l.requestProtocol),
            ("response_code", cap.admit("response_code", String(l.responseCode))),
            ("response_flags", cap.admit("response_flags", l.responseFlags)),
            ("grpc_response_status", cap.admit("grpc_response_status", l.grpcResponseStatus)),
        ]
    }

    /// The series of `l`, its durations in loop `shard`'s LoopDurations.
    func makeRequestSeries(_ l: RequestLabels, shard: Int = 0) -> RequestSeries {
        let labels = requestLabelPairs(l)
        return RequestSeries(
            count: registry.makeCounter(descriptor: .init(namespace: "weft", metricName: "requests", unitName: "total",
                                                          helpText: "HTTP requests the node proxy handled, by source, destination, route and response."),
                                        labels: labels),
            duration: loopDurations[shard % loopDurations.count].series(labels))
    }

    func makeTCPSeries(_ p: PeerLabels) -> TCPSeries {
        let labels = peerLabels(p)
        func counter(_ name: String, _ help: String) -> Counter {
            registry.makeCounter(descriptor: .init(namespace: "weft", metricName: name, unitName: "total", helpText: help), labels: labels)
        }
        return TCPSeries(
            opened: counter("tcp_connections_opened", "Opaque TCP connections the node proxy joined to a backend."),
            closed: counter("tcp_connections_closed", "Opaque TCP connections the node proxy saw end."),
            sent: counter("tcp_sent_bytes", "Bytes of opaque TCP connections sent by the source to the destination."),
            received: counter("tcp_received_bytes", "Bytes of opaque TCP connections sent by the destination to the source."))
    }

    /// What happened on the way to a Service's backends, for one event kind.
    struct ServiceEvent: Hashable {
        var serviceName: String
        var serviceNamespace: String
        var event: String
    }

    /// `weft_upstream_events_total`: retries, timeouts, connect failures,
    /// resets and circuit-breaker overflows, per destination Service.
    func makeServiceEventCounter(_ e: ServiceEvent) -> Counter {
        let service = e.serviceName == PeerLabels.unknown ? PeerLabels.unknown : "\(e.serviceName).\(e.serviceNamespace).svc"
        return registry.makeCounter(
            descriptor: .init(namespace: "weft", metricName: "upstream_events", unitName: "total",
                              helpText: "Retries, timeouts, upstream connect failures, upstream resets and circuit-breaker overflows, by destination Service."),
            labels: [("reporter", "source"),
                     ("destination_service", cap.admit("destination_service", service)),
                     ("destination_service_name", cap.admit("destination_service_name", e.serviceName)),
                     ("destination_service_namespace", cap.admit("destination_service_namespace", e.serviceNamespace)),
                     ("event", e.event)])
    }

    /// One TLS handshake of a tunnel: `role` client (this proxy dialed) or
    /// server (another node's proxy did), from TCP connect or accept to
    /// the handshake's end.
    func handshake(role: String, ok: Bool, duration: TimeAmount) {
        registry.makeCounter(descriptor: .init(namespace: "weft", metricName: "tls_handshakes", unitName: "total",
                                               helpText: "TLS handshakes of mTLS tunnels, by role and result."),
                             labels: [("role", role), ("result", ok ? "ok" : "failed")]).increment()
        guard ok else { return }
        registry.makeDurationHistogram(descriptor: .init(namespace: "weft", metricName: "tls_handshake_duration", unitName: "seconds",
                                                         helpText: "Time from TCP connect (or accept) to the end of a tunnel's TLS handshake."),
                                       labels: [("role", role)], buckets: Self.buckets).record(.nanoseconds(duration.nanoseconds))
    }

    /// The exposition text, with the proxy's own counters brought up to date.
    func render(stats: ProxyStats, generation: UInt64, extra: [(String, Int)] = []) -> String {
        seen.withLock { seen in
            for (name, value) in stats.all + extra {
                let gauge = name.hasSuffix("_active")
                if gauge {
                    registry.makeGauge(descriptor: .init(namespace: "weft_proxy", metricName: name, unitName: "", helpText: "Connections open now.")).set(Double(value))
                    continue
                }
                let delta = value - (seen[name] ?? 0)
                seen[name] = value
                if name.hasPrefix("responses_") {
                    registry.makeCounter(descriptor: .init(namespace: "weft_proxy", metricName: "responses", unitName: "total", helpText: "Responses the node proxy sent, by status class."),
                                         labels: [("code_class", String(name.dropFirst("responses_".count)))])
                        .increment(by: Int64(max(delta, 0)))
                    continue
                }
                guard name.hasSuffix("_total") else { continue }
                let base = String(name.dropLast("_total".count))
                registry.makeCounter(descriptor: .init(namespace: "weft_proxy", metricName: base, unitName: "total", helpText: "The node proxy's \(base.replacingOccurrences(of: "_", with: " ")) count."))
                    .increment(by: Int64(max(delta, 0)))
            }
        }
        registry.makeGauge(descriptor: .init(namespace: "weft_proxy", metricName: "table_generation", unitName: "", helpText: "Route table generation the proxy has in force."))
            .set(Double(generation))
        return registry.emitToString() + LoopDurations.render(loopDurations, name: "weft_request_duration_seconds",
                                                              help: "Time from a request's head to the end of its response, as the node proxy saw it.")
    }
}

/// The per-event-loop side of telemetry: series handles by label set.
/// Only used on its loop.
struct LoopTelemetry {
    /// This loop's request durations (ProxyTelemetry.loopDurations).
    var shard = 0
    private var requests: [RequestLabels: ProxyTelemetry.RequestSeries] = [:]
    private var tcp: [PeerLabels: ProxyTelemetry.TCPSeries] = [:]
    private var events: [ProxyTelemetry.ServiceEvent: Counter] = [:]
    /// Bounds the caches: the registry keeps the series, so a cleared cache
    /// only costs a lookup under the registry's lock.
    private static let limit = 4096

    mutating func request(_ labels: RequestLabels, _ telemetry: ProxyTelemetry) -> ProxyTelemetry.RequestSeries {
        if let s = requests[labels] { return s }
        if requests.count >= Self.limit { requests.removeAll(keepingCapacity: true) }
        let s = telemetry.makeRequestSeries(labels, shard: shard)
        requests[labels] = s
        return s
    }

    mutating func event(_ e: ProxyTelemetry.ServiceEvent, _ telemetry: ProxyTelemetry) -> Counter {
        if let c = events[e] { return c }
        if events.count >= Self.limit { events.removeAll(keepingCapacity: true) }
        let c = telemetry.makeServiceEventCounter(e)
        events[e] = c
        return c
    }

    mutating func tcp(_ labels: PeerLabels, _ telemetry: ProxyTelemetry) -> ProxyTelemetry.TCPSeries {
        if let s = tcp[labels] { return s }
        if tcp.count >= Self.limit { tcp.removeAll(keepingCapacity: true) }
        let s = telemetry.makeTCPSeries(labels)
        tcp[labels] = s
        return s
    }
}

/// W3C Trace Context (https://www.w3.org/TR/trace-context/): the proxy is a
/// hop. A valid incoming `traceparent` keeps its trace id and flags and gets
/// a new parent id (this hop's span); an absent or invalid one is replaced
/// by a new trace. `tracestate` passes through untouched.
enum TraceContext {
    struct Span {
        /// The traceparent this hop sent upstream: `00-<trace>-<span>-<flags>`,
        /// built in one buffer (this runs for every request); the ids are
        /// cut out of it only when a log line or a span needs them.
        var header: String
        /// The caller's span id, when the request came with one.
        var parentID: String?
        /// The trace's sampled flag: the caller's, or this hop's decision.
        var sampled = true

        var traceID: String { String(header.utf8.dropFirst(3).prefix(32))! }
        var spanID: String { String(header.utf8.dropFirst(36).prefix(16))! }
    }

    /// `00-` + 32 hex of trace + `-` + 16 hex of span + `-` + 2 hex of flags.
    static func header(trace: (UInt64, UInt64)?, traceText: Substring.UTF8View?, span: UInt64, flags: UInt8) -> String {
        String(unsafeUninitializedCapacity: 55) { b in
            write(trace: trace, traceText: traceText, span: span, flags: flags, into: UnsafeMutableRawBufferPointer(b))
        }
    }

    /// Writes a traceparent value (`header`'s 55 bytes) at the start of `b`
    /// and returns 55; the express paths write it straight into the
    /// request they send, with no string made.
    static func write(trace: (UInt64, UInt64)?, traceText: Substring.UTF8View?, span: UInt64, flags: UInt8,
                      into b: UnsafeMutableRawBufferPointer) -> Int {
        precondition(b.count >= 55)
        b[0] = UInt8(ascii: "0"); b[1] = UInt8(ascii: "0"); b[2] = UInt8(ascii: "-")
        if let traceText {
            var i = 3
            for c in traceText.prefix(32) { b[i] = c; i += 1 }
        } else if let (hi, lo) = trace {
            Hex.write(hi, into: b, at: 3)
            Hex.write(lo, into: b, at: 19)
        }
        b[35] = UInt8(ascii: "-")
        Hex.write(span, into: b, at: 36)
        b[52] = UInt8(ascii: "-")
        Hex.write(flags, into: b, at: 53)
        return 55
    }

    /// A new trace's ids, as `fresh` draws them (sampled, this hop the root).
    static func freshIDs<R: RandomNumberGenerator>(spanID: UInt64? = nil, random: inout R) -> (trace: (UInt64, UInt64), span: UInt64) {
        var spanID = spanID ?? random.next()
        if spanID == 0 { spanID = 1 }
        let hi = random.next()
        var lo = random.next()
        if hi == 0 && lo == 0 { lo = 1 }  // an all-zero trace id is invalid
        return ((hi, lo), spanID)
    }

    /// `samplingPercent` decides the sampled flag of a trace this hop
    /// starts (nil: sampled); a caller's decision is kept as it came.
    static func propagate<R: RandomNumberGenerator>(_ headers: inout HTTPHeaders, random: inout R,
                                                    samplingPercent: Double? = nil) -> Span {
        var spanID = random.next()
        if spanID == 0 { spanID = 1 }
        let incoming = headers.first(name: "traceparent")
        if let incoming, let (trace, parent, flags) = parse(incoming) {
            let f = UInt8(flags, radix: 16) ?? 0
            let value = header(trace: nil, traceText: Substring(trace).utf8, span: spanID, flags: f)
            headers.replaceOrAdd(name: "traceparent", value: value)
            return Span(header: value, parentID: parent, sampled: f & 1 == 1)
        }
        let span = fresh(spanID: spanID, random: &random, samplingPercent: samplingPercent)
        headers.replaceOrAdd(name: "traceparent", value: span.header)
        if incoming != nil { headers.remove(name: "tracestate") }  // it belonged to the invalid parent
        return span
    }

    /// A new trace, this hop its root.
    static func fresh<R: RandomNumberGenerator>(spanID: UInt64? = nil, random: inout R, samplingPercent: Double?) -> Span {
        let ids = freshIDs(spanID: spanID, random: &random)
        let sampled = samplingPercent.map { Double(random.next() % 10_000) < $0 * 100 } ?? true
        let value = header(trace: ids.trace, traceText: nil, span: ids.span, flags: sampled ? 1 : 0)
        return Span(header: value, parentID: nil, sampled: sampled)
    }

    /// (trace id, parent id, flags) of a valid version-00 (or later)
    /// traceparent, lower-case hex only, ids not all zero.
    static func parse(_ value: String) -> (String, String, String)? {
        let parts = value.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 4, parts[0].count == 2, parts[1].count == 32, parts[2].count == 16, parts[3].count == 2,
              parts[0] != "ff", parts.prefix(4).allSatisfy({ $0.utf8.allSatisfy(isLowerHex) }) else { return nil }
        if parts[0] == "00" && parts.count != 4 { return nil }
        guard parts[1].contains(where: { $0 != "0" }), parts[2].contains(where: { $0 != "0" }) else { return nil }
        return (String(parts[1]), String(parts[2]), String(parts[3]))
    }

    private static func isLowerHex(_ c: UInt8) -> Bool {
        (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains(c)
    }

    static func hex(_ v: UInt64, digits: Int) -> String {
        let s = String(v, radix: 16)
        return s.count >= digits ? s : String(repeating: "0", count: digits - s.count) + s
    }
}

/// The access log: JSON lines, appended from the event loops into one
/// buffer and written by a background queue 100 ms after the first line
/// waiting (or at 256 KiB), so a request never waits on the disk and an
/// idle proxy (or one not logging) never wakes for it. The file is rotated to `.1` at
/// `rotateBytes`. "-" writes to standard output.
final class AccessLog: Sendable {
    let path: String
    private let rotateBytes: Int
    private let state = Mutex<(buffer: [UInt8], fd: Int32, size: Int, dropped: Int, scheduled: Bool)>(([], -1, 0, 0, false))
    private let queue = DispatchQueue(label: "weft.proxy.access-log")
    private static let flushAt = 256 * 1024
    private static let maxBuffered = 16 * 1024 * 1024

    init(path: String, rotateBytes: Int = 64 * 1024 * 1024) {
        self.path = path
        self.rotateBytes = rotateBytes
    }

    func append(_ line: String) {
        let (wake, schedule) = state.withLock { s -> (Bool, Bool) in
            // A disk that cannot keep up loses lines (counted), not memory.
            guard s.buffer.count < Self.maxBuffered else { s.dropped += 1; return (false, false) }
            s.buffer.append(contentsOf: line.utf8)
            s.buffer.append(UInt8(ascii: "\n"))
            let schedule = !s.scheduled
            s.scheduled = true
            return (s.buffer.count >= Self.flushAt, schedule)
        }
        if wake { queue.async { [weak self] in self?.flush() } }
        if schedule { queue.asyncAfter(deadline: .now() + .milliseconds(100)) { [weak self] in self?.flush() } }
    }

    var dropped: Int { state.withLock { $0.dropped } }

    /// Writes what is buffered. Also called on drain, before exit.
    func flush() {
        var (data, fd, size) = state.withLock { s -> ([UInt8], Int32, Int) in
            let d = s.buffer
            s.buffer.removeAll(keepingCapacity: true)
            s.scheduled = false
            return (d, s.fd, s.size)
        }
        guard !data.isEmpty else { return }
        if path == "-" {
            fd = 1
        } else if fd < 0 || size >= rotateBytes {
            if fd >= 0 {
                Glibc.close(fd)
                rename(path, path + ".1")
            }
            fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
            var st = stat()
            size = fd >= 0 && fstat(fd, &st) == 0 ? Int(st.st_size) : 0
        }
        guard fd >= 0 else {
            state.withLock { $0.dropped += data.count > 0 ? 1 : 0 }
            return
        }
        var offset = 0
        while offset < data.count {
            let n = data.withUnsafeBytes { write(fd, $0.baseAddress! + offset, data.count - offset) }
            if n <= 0 { if errno == EINTR { continue }; break }
            offset += n
        }
        size += offset
        data.removeAll()
        state.withLock { s in
            if path != "-" { s.fd = fd }
            s.size = size
        }
    }

    func closeFile() {
        queue.sync { flush() }
        state.withLock { s in
            if s.fd >= 0 { Glibc.close(s.fd) }
            s.fd = -1
        }
    }
}

/// Builds one JSON object per line without an encoder per request: keys
/// are fixed ASCII, values escaped per RFC 8259.
struct JSONLine {
    private(set) var text = "{"

    mutating func add(_ key: String, _ value: String?) {
        guard let value else { return }
        separator(key)
        Self.quote(value, into: &text)
    }

    /// `value` as a JSON string literal, quotes included.
    static func quoted(_ value: String) -> String {
        var out = ""
        quote(value, into: &out)
        return out
    }

    static func quote(_ value: String, into text: inout String) {
        text.append("\"")
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": text.append("\\\"")
            case "\\": text.append("\\\\")
            case "\n": text.append("\\n")
            case "\r": text.append("\\r")
            case "\t": text.append("\\t")
            case _ where scalar.value < 0x20:
                text.append("\\u00" + TraceContext.hex(UInt64(scalar.value), digits: 2))
            default: text.unicodeScalars.append(scalar)
            }
        }
        text.append("\"")
    }

    mutating func add(_ key: String, _ value: Int) {
        separator(key)
        text.append(String(value))
    }

    mutating func add(_ key: String, milliseconds value: Double) {
        separator(key)
        text.append(String(format: "%.3f", value))
    }

    private mutating func separator(_ key: String) {
        if text.count > 1 { text.append(",") }
        text.append("\"\(key)\":")
    }

    mutating func finish() -> String {
        text.append("}")
        return text
    }
}

/// One HTTP request's access log line (docs/observability.md), as both the
/// full path and the express path write it.
struct HTTPLogLine {
    var start: timespec
    var protocolName: String
    var method: String
    var path: String
    var authority: String?
    var code: Int
    var flags: String
    var elapsedNanos: Int64
    var bytesIn: Int
    var bytesOut: Int
    var attempts: Int
    var route: String
    var source: IPv4Address
    var peers: PeerLabels
    var upstream: EndpointKey?
    var requestID: String?
    var span: TraceContext.Span?
    var userAgent: String?
    /// A gRPC call's status (GRPCStatus.reported); nil for plain HTTP.
    var grpcStatus: String?

    func render() -> String {
        var line = JSONLine()
        line.add("start_time", AccessLog.timestamp(start))
        line.add("kind", "http")
        line.add("protocol", protocolName)
        line.add("method", method)
        line.add("path", path)
        line.add("authority", authority)
        line.add("response_code", code)
        line.add("response_flags", flags)
        line.add("grpc_status", grpcStatus)
        line.add("duration_ms", milliseconds: Double(elapsedNanos) / 1e6)
        line.add("bytes_received", bytesIn)
        line.add("bytes_sent", bytesOut)
        line.add("attempts", attempts)
        line.add("route", route)
        line.add("source_address", source.description)
        line.add("source_workload", peers.sourceWorkload)
        line.add("source_namespace", peers.sourceNamespace)
        line.add("destination_service", peers.destinationService)
        line.add("upstream_host", upstream?.description)
        line.add("destination_workload", peers.destinationWorkload)
        line.add("destination_namespace", peers.destinationWorkloadNamespace)
        line.add("request_id", requestID)
        line.add("trace_id", span?.traceID)
        line.add("span_id", span?.spanID)
        line.add("parent_span_id", span?.parentID)
        line.add("user_agent", userAgent)
        return line.finish()
    }
}

extension AccessLog {
    /// RFC 3339 UTC with milliseconds, from a wall-clock time.
    static func timestamp(_ t: timespec) -> String {
        var seconds = t.tv_sec
        var tm = tm()
        gmtime_r(&seconds, &tm)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", Int(tm.tm_year) + 1900, Int(tm.tm_mon) + 1, Int(tm.tm_mday),
                      Int(tm.tm_hour), Int(tm.tm_min), Int(tm.tm_sec), Int(t.tv_nsec / 1_000_000))
    }

    static func now() -> timespec {
        var t = timespec()
        clock_gettime(CLOCK_REALTIME, &t)
        return t
    }

    /// Does the scope log requests from pods of `namespace`?
    static func covers(_ scope: ProxyTable.AccessLogScope?, namespace: String) -> Bool {
        guard let scope else { return false }
        return scope.namespaces.isEmpty || scope.namespaces.contains(namespace)
    }
}
