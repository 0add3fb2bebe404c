import Prometheus
import Synchronization
import WeftABI
import WeftCore
import WeftKernel

/// The agent's /metrics: its own health (config generation and errors, map
/// fill against capacity, programs attached) and the kernel load balancer's
/// per-CPU counters, read from the pinned map at scrape time.
final class AgentMetrics: Sendable {
    private let registry = PrometheusCollectorRegistry()
    private let maps: ServiceMaps
    private let status: SharedStatus
    private let fill: @Sendable () -> (services: Int, backends: Int)
    /// Last value seen per kernel counter: Prometheus counters only go up by
    /// deltas, and the kernel's are monotonic, so each scrape adds the delta.
    private let seen = Mutex<[String: UInt64]>([:])

    init(maps: ServiceMaps, status: SharedStatus, fill: @escaping @Sendable () -> (services: Int, backends: Int)) {
        self.maps = maps
        self.status = status
        self.fill = fill
    }

    func render() -> String {
        let s = status.withLock { $0 }
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "config_generation", unitName: "", helpText: "Config generation in force; increments on every accepted change."))
            .set(Double(s.generation))
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "config_errors", unitName: "", helpText: "Errors in the last refused config change (0: the files on disk are in force)."))
            .set(Double(s.configErrors.count))
        registry.makeGauge(descriptor: .init(namespace: "weft", metricName: "config_last_reconcile", unitName: "seconds", helpText: "Duration of the last reconcile pass."))
            .set(s.lastReconcileSeconds)
        let (services, backends) = fill()
        for (map, used, capacity) in [(WEFT_MAP_SERVICES, services, Int(WEFT_MAX_SERVICE_SLOTS)),
                                      (WEFT_MAP_BACKENDS, backends, Int(WEFT_MAX_BACKENDS))] {
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
                    let last = seen[name] ?? 0
                    let delta = value >= last ? value - last : value  // map was recreated
                    seen[name] = value
                    registry.makeCounter(descriptor: .init(namespace: "weft", metricName: "lb_events", unitName: "total", helpText: "Outcomes of the in-kernel connect() load balancer, from its per-CPU map."), labels: [("event", name)])
                        .increment(by: Int64(clamping: delta))
                }
            }
        }
        return registry.emitToString()
    }
}
