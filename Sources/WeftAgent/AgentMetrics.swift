import Prometheus
import Synchronization
import WeftABI
import WeftCore
import WeftKernel

/// The agent's /metrics: its own health (config generation and errors, map
/// fill against capacity, programs attached), the kernel load balancer's
/// per-CPU counters and the policy drop counters, read from the pinned maps
/// at scrape time.
final class AgentMetrics: Sendable {
    private let registry = PrometheusCollectorRegistry()
    private let maps: ServiceMaps
    private let policyMaps: PolicyMaps
    private let shortcut: ShortcutMaps?
    private let flows: FlowMaps?
    private let cap: LabelCap
    private let status: SharedStatus
    private let fill: @Sendable () -> MapFill
    /// Last value seen per kernel counter: Prometheus counters only go up by
    /// deltas, and the kernel's are monotonic, so each scrape adds the delta.
    private let seen = Mutex<[String: UInt64]>([:])
    private let flowState = Mutex(FlowState())

    init(maps: ServiceMaps, policyMaps: PolicyMaps, shortcut: ShortcutMaps?, flows: FlowMaps?, labelLimit: Int = 1000,
         status: SharedStatus, fill: @escaping @Sendable () -> MapFill) {
        self.maps = maps
        self.flows = flows
        self.cap = LabelCap(limit: labelLimit)
        self.shortcut = shortcut
        self.policyMaps = policyMaps
        self.status = status
        self.fill = fill
    }

    /// How much a kernel counter grew since the last scrape. The kernel's
    /// counters only go up, so a smaller value means the map (or key) was
    /// made anew and counts from zero.
    static func delta(from last: UInt64, to value: UInt64) -> Int64 {
        Int64(clamping: value >= last ? value - last : value)
    }

    /// `delta` for the counter `id`, remembering `value` for the next scrape.
    static func advance(_ seen: inout [String: UInt64], _ id: String, _ value: UInt64) -> Int64 {
        defer { seen[id] = value }
        return delta(from: seen[id] ?? 0, to: value)
    }

    static let dropReasons: [Int: String] = [
        Int(WEFT_DROP_EGRESS.rawValue): "egress_denied",
        Int(WEFT_DROP_INGRESS_AT_SOURCE.rawValue): "ingress_denied_at_source",
        Int(WEFT_DROP_INGRESS.rawValue): "ingress_denied",
        Int(WEFT_DROP_PLAINTEXT.rawValue): "plaintext_to_strict",
        Int(WEFT_DROP_AUTHZ.rawValue): "authorization_denied",
    ]

    func render() -> String {
        let s = status.withLock { $0 }
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "build_info", unitName: "", helpText: "1, labelled with the agent's release."),
                           labels: [("version", Build.version)])
            .set(1.0)
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "proxy_other_build", unitName: "", helpText: "1 when the node proxy runs another executable than the agent (one from before an upgrade in place; SIGUSR2 to the agent replaces it)."))
            .set(s.proxy?.sameBuild == false ? 1.0 : 0.0)
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "config_generation", unitName: "", helpText: "Config generation in force; increments on every accepted change."))
            .set(Double(s.generation))
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "config_errors", unitName: "", helpText: "Errors in the last refused config change (0: the files on disk are in force)."))
            .set(Double(s.configErrors.count))
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "config_last_reconcile", unitName: "seconds", helpText: "Duration of the last reconcile pass."))
            .set(s.lastReconcileSeconds)
        let f = fill()
        for (map, used, capacity) in [(WEFT_MAP_SERVICES, f.services, Int(WEFT_MAX_SERVICE_SLOTS)),
                                      (WEFT_MAP_BACKENDS, f.backends, Int(WEFT_MAX_BACKENDS)),
                                      (WEFT_MAP_ENDPOINTS, f.endpoints, Int(WEFT_MAX_ENDPOINTS)),
                                      (WEFT_MAP_CGROUPS, f.cgroups, Int(WEFT_MAX_LOCAL_CGROUPS)),
                                      (WEFT_MAP_CIDR_CLASSES, f.cidrClasses, Int(WEFT_MAX_CIDR_CLASSES)),
                                      (WEFT_MAP_POLICY, f.policyEntries, Int(WEFT_MAX_POLICY_ENTRIES)),
                                      (WEFT_MAP_POLICY_RANGES, f.policyRanges, Int(WEFT_MAX_POLICY_RANGES))] {
            registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "map_entries", unitName: "", helpText: "Entries in a BPF map."), labels: [("map", map)])
                .set(Double(used))
            registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "map_capacity", unitName: "", helpText: "max_entries of a BPF map."), labels: [("map", map)])
                .set(Double(capacity))
        }
        for program in s.programs {
            registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "program_attached", unitName: "", helpText: "1 for each eBPF program attached to the node's cgroup."), labels: [("program", program.name), ("state", program.state)]).set(1.0)
        }
        if let events = try? maps.lbEvents() {
            seen.withLock { seen in
                for (name, value) in events {
                    let delta = Self.advance(&seen, name, value)
                    registry.makeCounter(descriptor: .init(namespace: "weft", metricName: "lb_events", unitName: "total", helpText: "Outcomes of the in-kernel connect() load balancer, from its per-CPU map."), labels: [("event", name)])
                        .increment(by: delta)
                }
            }
        }
        let switches = try? shortcut?.switches()
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "shortcut_enabled", unitName: "", helpText: "1 when the same-node socket shortcut is on."))
            .set(switches?.enabled == true ? 1.0 : 0.0)
        if let shortcut {
            registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "shortcut_splice_enabled", unitName: "", helpText: "1 when opaque TCP the node proxy relays between shortcut sockets may be spliced past it."))
                .set(switches?.splice == true ? 1.0 : 0.0)
            registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "shortcut_sockets", unitName: "", helpText: "Sockets on the same-node shortcut now (each end counts once)."))
                .set(Double((try? shortcut.sockets()) ?? 0))
            registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "map_capacity", unitName: "", helpText: "max_entries of a BPF map."), labels: [("map", WEFT_MAP_ACCEL_PEERS)])
                .set(Double(shortcut.capacity))
            if let events = try? shortcut.counters() {
                seen.withLock { seen in
                    for (name, value) in events {
                        let delta = Self.advance(&seen, "shortcut/\(name)", value)
                        registry.makeCounter(descriptor: .init(namespace: "weft", metricName: "shortcut_events", unitName: "total", helpText: "What the same-node socket shortcut's programs did, from their per-CPU map."), labels: [("event", name)])
                            .increment(by: delta)
                    }
                }
            }
        }
        if let drops = try? policyMaps.dropCounts() {
            let names = status.identityNames()
            func name(_ id: UInt32) -> (String, String) {
                if id == ReservedIdentity.world { return ("", "world") }
                if id >= ReservedIdentity.cidrBase { return ("", "cidr") }
                guard let key = names[id] else { return ("", "identity-\(id)") }
                return (key.namespace, key.description)
            }
            seen.withLock { seen in
                for (key, value) in drops {
                    let reason = Self.dropReasons[Int(key.reason)] ?? "unknown"
                    let (srcNS, src) = name(key.src_identity), (dstNS, dst) = name(key.dst_identity)
                    let proto = TransportProtocol(ipProtocol: key.proto)?.rawValue ?? "\(key.proto)"
                    let port = "\(UInt16(bigEndian: key.port))"
                    let delta = Self.advance(&seen, "drop/\(key.src_identity)/\(key.dst_identity)/\(port)/\(proto)/\(reason)", value)
                    registry.makeCounter(descriptor: .init(namespace: "weft", metricName: "policy_drops", unitName: "total", helpText: "Connections and packets NetworkPolicy denied, by identities, destination port and reason, from the kernel's per-CPU map."),
                                         labels: [("source_namespace", srcNS), ("source_identity", src), ("destination_namespace", dstNS),
                                                  ("destination_identity", dst), ("destination_port", port), ("protocol", proto), ("reason", reason)])
                        .increment(by: delta)
                }
            }
        }
        renderFlows(proxyAddress: s.proxy.flatMap { IPv4Address($0.listen.split(separator: ":").first.map(String.init) ?? "") },
                    generation: Int(s.generation))
        return registry.emitToString()
    }

    /// The kernel's per-connection counters by (source workload, destination
    /// Service and workload, port), with Istio's label names. Every label is
    /// capped (`overflow` past the limit, busiest flows first), and counters
    /// of keys the kernel's LRU evicted are forgotten here too, so neither
    /// grows without bound. The counter handles of a flow are kept between
    /// scrapes (until the config changes its names), so a scrape of 10,000
    /// flows does not look 50,000 series up in the registry.
    private func renderFlows(proxyAddress: IPv4Address?, generation: Int) {
        guard let flows, let unsorted = try? flows.read() else { return }
        // Busiest first: when a label's cap is reached, the values of the
        // flows that carry the most connections are the ones that keep their
        // own series (also for a new agent, whose cap starts empty).
        let all = unsorted.sorted { ($0.opened + $0.failed + $0.closed) > ($1.opened + $1.failed + $1.closed) }
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "map_entries", unitName: "", helpText: "Entries in a BPF map."), labels: [("map", WEFT_MAP_FLOWS)])
            .set(Double(all.count))
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "map_capacity", unitName: "", helpText: "max_entries of a BPF map."), labels: [("map", WEFT_MAP_FLOWS)])
            .set(Double(flows.capacity))
        flowState.withLock { state in
            if state.generation != generation {
                state.series.removeAll(keepingCapacity: true)
                state.generation = generation
            }
            var names: (workloads: [UInt32: (namespace: String, name: String)], services: [UInt64: (namespace: String, name: String)])?
            var live = Set<FlowID>()
            live.reserveCapacity(all.count)
            for f in all {
                let id = FlowID(source: f.source.value, destination: f.destination?.value ?? 0, vip: f.vip?.value ?? 0, port: f.port,
                                udp: f.udp)
                live.insert(id)
                let counters: [Counter]
                if let cached = state.series[id] {
                    counters = cached
                } else {
                    if names == nil { names = status.flowNames() }
                    counters = makeFlowCounters(f, names: names!, proxyAddress: proxyAddress)
                    state.series[id] = counters
                }
                let now = f.udp ? [f.opened, f.failed] : [f.opened, f.failed, f.closed, f.bytesSent, f.bytesReceived]
                let last = state.last[id] ?? Array(repeating: 0, count: now.count)
                for i in now.indices {
                    // A value below the last one: the key was evicted and came back.
                    let delta = Self.delta(from: last[i], to: now[i])
                    if delta > 0 { counters[i].increment(by: delta) }
                }
                state.last[id] = now
            }
            // Keys the kernel evicted: forget them (they start again at 0).
            if state.last.count > live.count {
                state.last = state.last.filter { live.contains($0.key) }
                state.series = state.series.filter { live.contains($0.key) }
            }
        }
    }

    private func makeFlowCounters(_ f: FlowMaps.Flow, names: (workloads: [UInt32: (namespace: String, name: String)], services: [UInt64: (namespace: String, name: String)]),
                                  proxyAddress: IPv4Address?) -> [Counter] {
        let src = names.workloads[f.source.value]
        let service = f.vip.flatMap { names.services[UInt64($0.value) << 16 | UInt64(f.port)] }
        let dstWorkload: (String, String)
        if let d = f.destination, let w = names.workloads[d.value] { dstWorkload = (w.namespace, w.name) }
        else if f.destination != nil && f.destination == proxyAddress { dstWorkload = ("", "node-proxy") }
        else { dstWorkload = ("", f.destination == nil ? "none" : "unknown") }
        let labels: [(String, String)] = [
            ("reporter", "source"),
            ("source_workload", cap.admit("source_workload", src?.name ?? "unknown")),
            ("source_workload_namespace", cap.admit("source_workload_namespace", src?.namespace ?? "unknown")),
            ("destination_service", cap.admit("destination_service", service.map { "\($0.name).\($0.namespace).svc" } ?? "unknown")),
            ("destination_service_name", cap.admit("destination_service_name", service?.name ?? "unknown")),
            ("destination_service_namespace", cap.admit("destination_service_namespace", service?.namespace ?? "unknown")),
            ("destination_workload", cap.admit("destination_workload", dstWorkload.1)),
            ("destination_workload_namespace", cap.admit("destination_workload_namespace", dstWorkload.0)),
            ("destination_port", cap.admit("destination_port", String(f.port))),
        ]
        return (f.udp ? Self.udpFlowMetrics : Self.flowMetrics).map { metric, help in
            registry.makeCounter(descriptor: .init(namespace: "weft", metricName: metric, unitName: "total", helpText: help), labels: labels)
        }
    }

    static let flowMetrics: [(String, String)] = [
        ("l4_connections_opened", "TCP connections pods opened (handshake completed), from the kernel's per-CPU map."),
        ("l4_connections_failed", "TCP connects of pods that never completed (refused, reset, timed out, no backend)."),
        ("l4_connections_closed", "Established TCP connections of pods that ended."),
        ("l4_sent_bytes", "Bytes pods sent on TCP connections, counted when they close (shortcut-redirected bytes excluded)."),
        ("l4_received_bytes", "Bytes pods received on TCP connections, counted when they close (shortcut-redirected bytes excluded)."),
    ]

    /// A UDP exchange: a UDP socket's connect(), or the first datagram an
    /// unconnected socket sends to a peer (again after policy.udpIdleTimeout
    /// idle). UDP has no handshake and no close to count.
    static let udpFlowMetrics: [(String, String)] = [
        ("l4_udp_exchanges_opened", "UDP exchanges pods began (a connect(), or a socket's first datagram to a peer), from the kernel's per-CPU map."),
        ("l4_udp_exchanges_failed", "UDP connects and sends of pods refused for want of a backend."),
    ]

    struct FlowID: Hashable {
        var source: UInt32
        var destination: UInt32
        var vip: UInt32
        var port: UInt16
        var udp: Bool
    }

    struct FlowState {
        var generation = -1
        var series: [FlowID: [Counter]] = [:]
        var last: [FlowID: [UInt64]] = [:]
    }
}
