import Foundation
import Logging
import Synchronization
import WeftCore

/// OTLP/HTTP span export (JSON encoding, `POST /v1/traces`), off unless
/// MeshConfig `telemetry.tracing` names a collector. The event loops only
/// append a span's JSON to a buffer; a background queue posts the buffer
/// 200 ms after the first span waiting, so a slow or absent collector never
/// holds a request and a proxy with nothing to send never wakes for it. At
/// most 20,000 spans wait; past that, spans are dropped and counted.
final class SpanExporter: Sendable {
    enum Value {
        case string(String)
        case int(Int)
    }

    private struct Pending {
        var spans: [String] = []
        var target: ProxyTable.TracingTarget?
        var dropped = 0
        var exported = 0
        var failedPosts = 0
        /// A flush is due (scheduled by the first span after the last one).
        var scheduled = false
    }

    private let state = Mutex(Pending())
    private let queue = DispatchQueue(label: "weft.proxy.spans")
    private let node: String
    private let logger: Logger
    private static let maxPending = 20_000

    init(node: String, logger: Logger) {
        self.node = node
        self.logger = logger
    }

    var counts: (exported: Int, dropped: Int, failedPosts: Int) {
        state.withLock { ($0.exported, $0.dropped, $0.failedPosts) }
    }

    /// One finished request as an OTLP span (kind CLIENT: the proxy calls
    /// the backend on the pod's behalf).
    func export(to target: ProxyTable.TracingTarget, span: TraceContext.Span, name: String, start: timespec,
                durationNanos: Int64, attributes: [(String, Value)], error: Bool) {
        let startNanos = Int64(start.tv_sec) * 1_000_000_000 + Int64(start.tv_nsec)
        var json = "{\"traceId\":\"\(span.traceID)\",\"spanId\":\"\(span.spanID)\""
        if let parent = span.parentID { json += ",\"parentSpanId\":\"\(parent)\"" }
        json += ",\"name\":\(Self.quote(name)),\"kind\":3"
        json += ",\"startTimeUnixNano\":\"\(startNanos)\",\"endTimeUnixNano\":\"\(startNanos + durationNanos)\""
        json += ",\"attributes\":[" + attributes.map { key, value in
            switch value {
            case .string(let s): "{\"key\":\(Self.quote(key)),\"value\":{\"stringValue\":\(Self.quote(s))}}"
            case .int(let i): "{\"key\":\(Self.quote(key)),\"value\":{\"intValue\":\"\(i)\"}}"
            }
        }.joined(separator: ",") + "]"
        json += ",\"status\":{\"code\":\(error ? 2 : 1)}}"
        let schedule = state.withLock { s -> Bool in
            if s.target != target {
                s.spans.removeAll()  // the collector changed: what was for the old one is not sent
                s.target = target
            }
            guard s.spans.count < Self.maxPending else { s.dropped += 1; return false }
            s.spans.append(json)
            defer { s.scheduled = true }
            return !s.scheduled
        }
        if schedule { queue.asyncAfter(deadline: .now() + .milliseconds(200)) { [weak self] in self?.flush() } }
    }

    private func flush() {
        let (spans, target) = state.withLock { s -> ([String], ProxyTable.TracingTarget?) in
            let out = (s.spans, s.target)
            s.spans.removeAll(keepingCapacity: true)
            s.scheduled = false
            return out
        }
        guard let target, !spans.isEmpty else { return }
        let body = "{\"resourceSpans\":[{\"resource\":{\"attributes\":["
            + "{\"key\":\"service.name\",\"value\":{\"stringValue\":\"weft-proxy\"}},"
            + "{\"key\":\"weft.node\",\"value\":{\"stringValue\":\(Self.quote(node))}}]},"
            + "\"scopeSpans\":[{\"scope\":{\"name\":\"weft\"},\"spans\":[" + spans.joined(separator: ",") + "]}]}]}"
        let ok = Self.post(host: target.host, port: target.port, path: "/v1/traces", body: body)
        state.withLock { s in
            if ok { s.exported += spans.count } else { s.failedPosts += 1; s.dropped += spans.count }
        }
        if !ok { logger.warning("OTLP export to \(target.host):\(target.port) failed; \(spans.count) span(s) dropped") }
    }

    /// One HTTP/1.1 POST with a 2 s timeout; true on a 2xx answer.
    static func post(host: String, port: UInt16, path: String, body: String) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        guard let ip = IPv4Address(host) else { return false }
        addr.sin_addr.s_addr = ip.networkOrder
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
        guard connected else { return false }
        let request = Array(("POST \(path) HTTP/1.1\r\nHost: \(host):\(port)\r\nContent-Type: application/json\r\n"
            + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body).utf8)
        var sent = 0
        while sent < request.count {
            let n = request.withUnsafeBytes { send(fd, $0.baseAddress! + sent, request.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            sent += n
        }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, 512, 0) }
        guard n > 12 else { return false }
        let status = String(decoding: buffer[9..<12], as: UTF8.self)
        return status.hasPrefix("2")
    }

    static func quote(_ s: String) -> String { JSONLine.quoted(s) }
}
