/// `weft.dev/v1alpha1 MeshConfig`: mesh-wide switches that no standard
/// resource covers. At most one per cluster; without one, the defaults hold.
///
/// ```yaml
/// apiVersion: weft.dev/v1alpha1
/// kind: MeshConfig
/// metadata: {name: mesh}
/// spec:
///   socketShortcut:
///     enabled: true            # default true (the agent's --socket-shortcut off wins)
///     podReceivers: Annotated  # Annotated (default) | All | None
///     splice: true             # default true: opaque TCP the proxy relays between two
///                              # shortcut sockets may skip the proxy (docs/shortcut.md)
///   accessLog:
///     enabled: false           # default false: JSON lines from the node proxies
///     namespaces: [shop]       # source namespaces to log; absent or empty: all
///   telemetry:
///     connectionCounters: true # the kernel's TCP connection and UDP exchange counters (weft_l4_*)
///     requestMetrics: true     # the proxies' per-request series (weft_requests_total, ...)
///     tracing:                 # OTLP/HTTP (JSON) span export from the proxies; off without it
///       otlpEndpoint: http://198.18.1.50:4318
///       samplingPercent: 100   # new traces sampled; an incoming traceparent's flag is kept
///   proxy:
///     idleTimeout: 1h          # default 1h: an HTTP connection to a node proxy with no
///                              # request in flight that long is closed; "0s": never
///     requestHeaderTimeout: 60s # default 60s: a request head not whole that long after
///                              # its first byte gets 408 and the connection closes (an
///                              # HTTP/2 header block: GOAWAY and the close); a connection
///                              # to the tunnel port with its TLS handshake not done that
///                              # long after its accept is closed; "0s": never
///     streamIdleTimeout: 5m    # default 5m: a request in flight on which no byte moves
///                              # (from its backend, or of its request from the client)
///                              # that long is ended: 504 (408 while the request is still
///                              # being read) or, once its response began, cut; "0s": never
///     upstreamIdleTimeout: 3s  # default 3s: a connection to a backend kept for the next
///                              # request, with none in flight that long, is closed (shorter
///                              # than servers' keep-alive, which a reuse would race; a
///                              # TrafficPolicy's timeout.http.connectionIdleTimeout
///                              # overrides it for its Services); "0s": never
///     tunnelIdleTimeout: 5m    # default 5m: a tunnel to another node's proxy that carried
///                              # nothing for that long (no opaque stream, no exchange in
///                              # flight, no byte read) is closed; the next stream makes a
///                              # new one; the delivering node closes one with no stream
///                              # open for twice this, whatever its source does; "0s": never
///     maxRequestHeaderSize: 64Ki # default 64Ki, from 1Ki to 64Ki (bytes, or NKi): a larger
///                              # request head is answered 431 (docs/proxy.md)
///     http2MaxConcurrentStreams: 1000  # default 1000, from 1 to 2147483647: the streams an
///                              # HTTP/2 client may have open at once on a connection to the
///                              # proxy (its SETTINGS_MAX_CONCURRENT_STREAMS)
///     pathNormalization: {normalization: BASE}  # as Istio's: BASE (default: RFC 3986,
///                              # `/x/../a` is `/a`, `%61` is `a`), MERGE_SLASHES (also `//`
///                              # is `/`), DECODE_AND_MERGE_SLASHES (also `%2F` is `/`), or NONE
///                              # (the path as sent: a rule can be dodged by spelling)
///     tcpKeepalive:            # TCP keepalive on both sockets of an opaque stream (TCP
///       time: 60s              # passthrough, upgraded connections) and on tunnels between
///       interval: 10s          # nodes: the first probe after this long without a packet,
///       probes: 6              # then one each interval; after `probes` unanswered the
///                              # stream (the tunnel, and all it carries) closes. "0s": off
///   policy:
///     udpIdleTimeout: 60s      # default 60s, from 1s to 24h: an allowed UDP exchange
///                              # idle this long is forgotten, and its next datagram is
///                              # judged as new under the policy then in force (docs/policy.md)
/// ```
public struct MeshConfig: Hashable, Sendable {
    public var metadata: ObjectMeta
    public var socketShortcut = SocketShortcut()
    public var accessLog = AccessLog()
    public var telemetry = Telemetry()
    public var proxy = Proxy()
    public var policy = Policy()

    /// The kernel's NetworkPolicy state (docs/policy.md, "UDP").
    public struct Policy: Hashable, Sendable {
        /// How long an allowed UDP exchange (a socket and a peer) is
        /// remembered after its last datagram: while remembered, replies and
        /// later datagrams pass without a verdict, even after a policy
        /// change that would deny them. A minute, as Cilium's lifetime for
        /// non-TCP flows; Linux conntrack keeps an answered UDP flow two.
        public var udpIdleTimeout: Duration = .seconds(60)
        public static let udpIdleTimeouts = Duration.seconds(1)...Duration.seconds(86400)
        public init() {}
    }

    /// The node proxies' client connections (docs/proxy.md, "Idle
    /// connections").
    public struct Proxy: Hashable, Sendable {
        /// How long an HTTP connection may sit with no request in flight
        /// and nothing read before the proxy closes it; nil: never. An
        /// hour, as Envoy's idle_timeout: longer than the keep-alive of
        /// common client pools, so the proxy is seldom the one to close a
        /// connection a client is about to reuse.
        public var idleTimeout: Duration? = .seconds(3600)
        /// How long an HTTP/1.1 request head may take to arrive whole, from
        /// its first byte; nil: no limit. A minute, as nginx's
        /// client_header_timeout: a shared node proxy must not hold a
        /// connection (and its buffer) for a pod that trickles a head a
        /// byte at a time, which the idle timeout never sees as idle. It
        /// also bounds the TLS handshake of a connection to the tunnel
        /// port (nginx's ssl_handshake_timeout, a minute too).
        public var requestHeaderTimeout: Duration? = .seconds(60)
        /// How long a request in flight may go with no byte moving on it:
        /// none from its backend, none of its request from the client
        /// while that is still being read; nil: no limit. Five minutes, as
        /// Envoy's stream_idle_timeout: without a route timeout, a backend
        /// that never answers, or a client that never reads the response
        /// (which stops the proxy reading the backend), would hold the
        /// request and a backend connection for as long as the client
        /// stays. Long-lived streams (gRPC server streams, server-sent
        /// events) must send something within it.
        public var streamIdleTimeout: Duration? = .seconds(300)
        /// How long a connection to a backend that the proxy keeps for the
        /// next request (HTTP/1.1 idle between exchanges, HTTP/2 with no
        /// stream open; a tunnel stream kept the same way) may wait unused
        /// before the proxy closes it; nil: never. Three seconds, as
        /// Linkerd's proxies: shorter than the keep-alive of most servers
        /// (Node.js and Apache close an idle connection after 5 s; gunicorn,
        /// after 2 s, needs a shorter setting), which a pool that
        /// keeps connections longer races: a request written as the server
        /// closes is lost, and one that is not safe to send again (a POST)
        /// is answered 502.
        public var upstreamIdleTimeout: Duration? = .seconds(3)
        /// How long a tunnel to another node's proxy may go unused before
        /// its source closes it; nil: never. Unused: no opaque stream in
        /// it, no HTTP exchange in flight (HTTP streams kept idle for the
        /// next exchange do not count), no stream being opened and
        /// nothing read from it. Five minutes, as ztunnel's
        /// pool_unused_release_timeout: a node proxy makes one tunnel per
        /// (source identity, destination identity, node) it ever sends to,
        /// and without this kept every one, and its TLS state at both
        /// ends, for as long as both nodes ran. The delivering node closes
        /// a tunnel with no stream open for twice this, whatever its
        /// source does (a Weft source goes first).
        public var tunnelIdleTimeout: Duration? = .seconds(300)
        /// The largest request head the proxy takes, in bytes: an HTTP/1.1
        /// head as it comes (request line, fields, the blank line), an
        /// HTTP/2 one as RFC 9113 sizes a header list (each field's name
        /// and value and 32). A larger one is answered 431. 64 KiB, about
        /// Envoy's 60 KiB, and no more: the express path reads a head
        /// whole into a buffer of that size, and NIO's HTTP/1.1 decoder
        /// stops at 80 KiB.
        public var maxRequestHeaderSize = Self.headerSizes.upperBound
        public static let headerSizes = 1024...65536
        /// The SETTINGS_MAX_CONCURRENT_STREAMS the proxy offers its HTTP/2
        /// clients. 1000: above the servers' own (Go's 250, hyper's 200,
        /// nginx's 128, NIO's 100; gRPC's C core and Java none), so that
        /// the proxy is not the tighter limit a client meets (its gRPC
        /// library would hold the 101st long-lived stream for good), and
        /// bounded, so that the request bodies one connection can have in
        /// the proxy's buffers (a stream window, 64 KiB, each) stay bounded.
        public var http2MaxConcurrentStreams = 1000
        public static let http2Streams = 1...2_147_483_647
        /// TCP keepalive on opaque streams; nil: off. HTTP connections have
        /// the idle timeout; an opaque stream has no such end, and one whose
        /// peer vanished without a FIN (its pod's network gone) would be
        /// held for good, with its partner connection.
        public var tcpKeepalive: TCPKeepalive? = TCPKeepalive()
        /// How request paths are put in normal form before routes and
        /// AuthorizationPolicy judge them and the backend gets them
        /// (RequestPath): Istio's `pathNormalization.normalization`, BASE
        /// by default as there.
        public var pathNormalization = RequestPath.Mode.base
        public init() {}
    }

    /// As Istio's DestinationRule `connectionPool.tcp.tcpKeepalive`; the
    /// defaults close a stream whose peer is gone within two minutes of
    /// silence, at one probe a minute on a live idle one.
    public struct TCPKeepalive: Hashable, Sendable {
        public var time: Duration = .seconds(60)
        public var interval: Duration = .seconds(10)
        public var probes = 6
        public init() {}
    }

    /// Metric collection switches (docs/observability.md): both on by default.
    public struct Telemetry: Hashable, Sendable {
        public var connectionCounters = true
        public var requestMetrics = true
        public var tracing: Tracing?
        public init() {}
    }

    /// Where the proxies send spans: an OTLP/HTTP collector (JSON encoding,
    /// POST <endpoint>/v1/traces), by IPv4 address and port.
    public struct Tracing: Hashable, Sendable {
        public var host: IPv4Address
        public var port: UInt16
        public var samplingPercent: Double = 100
        public init(host: IPv4Address, port: UInt16) {
            self.host = host
            self.port = port
        }
    }

    /// The node proxies' access logs (docs/observability.md): one JSON line
    /// per request and per TCP connection they handle, for requests from
    /// pods of `namespaces` (all when empty).
    public struct AccessLog: Hashable, Sendable {
        public var enabled = false
        public var namespaces: [String] = []
        public init() {}
    }

    /// The same-node socket shortcut (docs/shortcut.md). Bytes are only ever
    /// redirected into sockets whose reader is known to use read()/recv():
    /// the node proxy always, and pods as `podReceivers` says.
    public struct SocketShortcut: Hashable, Sendable {
        public enum PodReceivers: String, Hashable, Sendable, CaseIterable {
            /// Pods whose Workload carries `weft.dev/socket-shortcut: receive`.
            case annotated = "Annotated"
            /// Every local pod: the operator vouches that none reads a socket
            /// with splice() or sendfile().
            case all = "All"
            /// No pod: only the hops into the node proxy are shortened.
            case none = "None"
        }
        public var enabled = true
        public var podReceivers = PodReceivers.annotated
        /// Opaque TCP the node proxy joins between two sockets of the
        /// shortcut may be moved past the proxy by the kernel.
        public var splice = true
        public init() {}
    }

    /// The Workload annotation that makes a pod a shortcut receiver under
    /// `podReceivers: Annotated` ("receive"), or never one ("off").
    public static let receiverAnnotation = "weft.dev/socket-shortcut"

    public init(metadata: ObjectMeta) { self.metadata = metadata }

    /// Whether redirected bytes may be delivered into this pod's sockets.
    public func receives(_ workload: Workload) -> Bool {
        let annotation = workload.metadata.annotations[Self.receiverAnnotation]
        if annotation == "off" { return false }
        switch socketShortcut.podReceivers {
        case .all: return true
        case .none: return false
        case .annotated: return annotation == "receive"
        }
    }
}

extension MeshConfig {
    init(spec node: YAMLNode, metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        self.init(metadata: metadata)
        var spec = try FieldReader(node, at: location, path: "spec")
        // Each section is read on its own, so that a mistake in one does
        // not hide another's.
        var found = ErrorList()
        found.section(&spec, "socketShortcut") { shortcut throws(ManifestError) in
            var inner = ErrorList()
            inner.set(&socketShortcut, \.enabled) { () throws(ManifestError) in try shortcut.bool("enabled") }
            inner.set(&socketShortcut, \.splice) { () throws(ManifestError) in try shortcut.bool("splice") }
            inner.set(&socketShortcut, \.podReceivers) { () throws(ManifestError) in
                try shortcut.oneOf("podReceivers", SocketShortcut.PodReceivers.self)
            }
            try inner.check(finishing: shortcut)
        }
        found.section(&spec, "accessLog") { log throws(ManifestError) in
            var inner = ErrorList()
            inner.set(&accessLog, \.enabled) { () throws(ManifestError) in try log.bool("enabled") }
            accessLog.namespaces += inner.each(&log, "namespaces") { path, item throws(ManifestError) in
                let name = try FieldReader.string(item, at: location, path: path)
                guard Self.isDNSLabel(name) else {
                    throw ManifestError(location, field: path, "\(quoted(name)) is not a namespace name (a DNS label: a-z, 0-9 and -, at most 63)")
                }
                return name
            }
            try inner.check(finishing: log)
        }
        found.section(&spec, "telemetry") { t throws(ManifestError) in
            var inner = ErrorList()
            inner.set(&telemetry, \.connectionCounters) { () throws(ManifestError) in try t.bool("connectionCounters") }
            inner.set(&telemetry, \.requestMetrics) { () throws(ManifestError) in try t.bool("requestMetrics") }
            inner.section(&t, "tracing") { tr throws(ManifestError) in telemetry.tracing = try Self.tracing(&tr) }
            try inner.check(finishing: t)
        }
        found.section(&spec, "proxy") { p throws(ManifestError) in try Self.proxy(&p, into: &proxy, at: location) }
        found.section(&spec, "policy") { p throws(ManifestError) in
            var inner = ErrorList()
            inner.attempt { () throws(ManifestError) in
                guard let text = try p.string("udpIdleTimeout") else { return }
                let d = try HTTPRoute.duration(text, field: "spec.policy.udpIdleTimeout", at: location) ?? .zero
                guard Policy.udpIdleTimeouts.contains(d) else {
                    throw p.error("udpIdleTimeout", "must be from 1s to 24h, got \(quoted(text))")
                }
                policy.udpIdleTimeout = d
            }
            try inner.check(finishing: p)
        }
        try found.check(finishing: spec)
    }

    /// `telemetry.tracing`: the collector and the share of requests traced.
    static func tracing(_ tr: inout FieldReader) throws(ManifestError) -> Tracing {
        var found = ErrorList()
        let endpoint = found.attempt { () throws(ManifestError) in
            let url = try tr.requiredString("otlpEndpoint")
            guard let endpoint = Self.parseEndpoint(url) else {
                throw tr.error("otlpEndpoint", "must be http://IPV4:PORT (an OTLP/HTTP collector), got \(quoted(url))")
            }
            return endpoint
        }
        let sampling = found.attempt { () throws(ManifestError) -> Double? in
            guard let p = tr.node("samplingPercent") else { return nil }
            guard let v = Self.percent(p), (0...100).contains(v) else {
                throw tr.error("samplingPercent", "must be a number from 0 to 100")
            }
            return v
        } ?? nil
        try found.check(finishing: tr)
        var tracing = Tracing(host: endpoint?.0 ?? IPv4Address(0), port: endpoint?.1 ?? 0)
        if let sampling { tracing.samplingPercent = sampling }
        return tracing
    }

    /// `proxy`: the node proxy's timeouts and limits, each field on its own.
    static func proxy(_ p: inout FieldReader, into proxy: inout Proxy, at location: DocumentLocation) throws(ManifestError) {
        var found = ErrorList()
        for key in ["idleTimeout", "requestHeaderTimeout", "streamIdleTimeout", "tunnelIdleTimeout", "upstreamIdleTimeout"] {
            found.attempt { () throws(ManifestError) in
                guard let text = try p.string(key) else { return }
                let timeout = try HTTPRoute.duration(text, field: "spec.proxy.\(key)", at: location)
                if let timeout, timeout < .seconds(1) {
                    throw p.error(key, "must be at least 1s (or 0s: never), got \(quoted(text))")
                }
                switch key {
                case "idleTimeout": proxy.idleTimeout = timeout
                case "requestHeaderTimeout": proxy.requestHeaderTimeout = timeout
                case "streamIdleTimeout": proxy.streamIdleTimeout = timeout
                case "tunnelIdleTimeout": proxy.tunnelIdleTimeout = timeout
                default: proxy.upstreamIdleTimeout = timeout
                }
            }
        }
        found.attempt { () throws(ManifestError) in
            guard let node = p.node("maxRequestHeaderSize") else { return }
            guard let size = Self.byteSize(node), Proxy.headerSizes.contains(size) else {
                throw p.error("maxRequestHeaderSize",
                              "must be a size from 1Ki to 64Ki (bytes, or a number and Ki), got \(Self.shown(node))")
            }
            proxy.maxRequestHeaderSize = size
        }
        found.attempt { () throws(ManifestError) in
            guard let n = try p.int("http2MaxConcurrentStreams") else { return }
            guard Proxy.http2Streams.contains(n) else {
                throw p.error("http2MaxConcurrentStreams", "must be from 1 to 2147483647, got \(n)")
            }
            proxy.http2MaxConcurrentStreams = n
        }
        found.section(&p, "pathNormalization") { n throws(ManifestError) in
            var inner = ErrorList()
            inner.set(&proxy, \.pathNormalization) { () throws(ManifestError) in try n.oneOf("normalization", RequestPath.Mode.self) }
            try inner.check(finishing: n)
        }
        found.section(&p, "tcpKeepalive") { k throws(ManifestError) in
            proxy.tcpKeepalive = try Self.tcpKeepalive(&k, at: location)
        }
        try found.check(finishing: p)
    }

    /// `proxy.tcpKeepalive`; nil: `time: 0s`, off.
    static func tcpKeepalive(_ k: inout FieldReader, at location: DocumentLocation) throws(ManifestError) -> TCPKeepalive? {
        var keepalive = MeshConfig.TCPKeepalive()
        var off = false
        var found = ErrorList()
        // Whole seconds from 1 s to 32767 s: what TCP_KEEPIDLE and TCP_KEEPINTVL take.
        for key in ["time", "interval"] {
            found.attempt { () throws(ManifestError) in
                guard let text = try k.string(key) else { return }
                let d = try HTTPRoute.duration(text, field: "spec.proxy.tcpKeepalive.\(key)", at: location) ?? .zero
                if key == "time" && d == .zero {
                    off = true
                    return
                }
                guard d >= .seconds(1), d <= .seconds(32767), d == .seconds(d.components.seconds) else {
                    throw k.error(key, "must be whole seconds from 1s to 32767s\(key == "time" ? " (or 0s: off)" : ""), got \(quoted(text))")
                }
                if key == "time" { keepalive.time = d } else { keepalive.interval = d }
            }
        }
        found.attempt { () throws(ManifestError) in
            guard let n = try k.int("probes") else { return }
            guard (1...127).contains(n) else { throw k.error("probes", "must be from 1 to 127, got \(n)") }
            keepalive.probes = n
        }
        try found.check(finishing: k)
        return off ? nil : keepalive
    }
}

extension MeshConfig {
    static func parseEndpoint(_ url: String) -> (IPv4Address, UInt16)? {
        guard url.hasPrefix("http://") else { return nil }
        var rest = url.dropFirst("http://".count)
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let ip = IPv4Address(parts[0]), let port = UInt16(parts[1]), port != 0 else { return nil }
        return (ip, port)
    }

    /// Bytes as a whole number or a Kubernetes quantity in Ki ("16Ki").
    static func byteSize(_ node: YAMLNode) -> Int? {
        guard case .scalar(let s) = node else { return nil }
        if node.tagName == .int { return Int(s.string) }
        guard s.string.hasSuffix("Ki"), let n = Int(s.string.dropLast(2)), n >= 0 else { return nil }
        return n.multipliedReportingOverflow(by: 1024).overflow ? nil : n * 1024
    }

    /// A scalar as written, anything else by its kind.
    static func shown(_ node: YAMLNode) -> String {
        if case .scalar(let s) = node { return quoted(s.string) }
        return FieldReader.describe(node)
    }

    static func percent(_ node: YAMLNode) -> Double? {
        guard case .scalar(let s) = node, node.tagName == .int || node.tagName == .float else { return nil }
        return Double(s.string)
    }

    static func isDNSLabel(_ s: String) -> Bool {
        let u = Array(s.utf8)
        guard (1...63).contains(u.count), u.first != UInt8(ascii: "-"), u.last != UInt8(ascii: "-") else { return false }
        return u.allSatisfy { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "-") }
    }
}

extension Workload {
    /// Checks the shortcut annotation's value, wherever a Workload is read.
    static func checkShortcutAnnotation(_ metadata: ObjectMeta, at location: DocumentLocation) throws(ManifestError) {
        guard let value = metadata.annotations[MeshConfig.receiverAnnotation] else { return }
        guard value == "receive" || value == "off" else {
            throw ManifestError(location, field: "metadata.annotations.\(MeshConfig.receiverAnnotation)",
                                "must be \"receive\" or \"off\", got \(quoted(value))")
        }
    }
}
