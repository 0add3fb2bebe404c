/// What the agent knows about backends beyond the manifests: which fail
/// their Service's active health check (TrafficPolicy healthCheck, probed by
/// the agent) and which the node proxy's outlier detection has ejected.
/// Both the kernel's service maps and the proxy's route table are computed
/// from the manifests *and* this, so a backend leaves both together.
public struct EndpointHealth: Hashable, Sendable {
    /// Backends failing the active health check, by cluster ("namespace/service:port").
    public var failing: [String: Set<BackendAddress>]
    /// Backends the node proxy has ejected, whatever Service it saw them in:
    /// the kernel stops sending L4-only connections to them too.
    public var ejected: Set<BackendAddress>

    public init(failing: [String: Set<BackendAddress>] = [:], ejected: Set<BackendAddress> = []) {
        self.failing = failing
        self.ejected = ejected
    }

    public static let defaultPanicThreshold = 50.0

    /// The backends to use out of `all`: those not excluded, unless fewer
    /// than `panicThreshold` percent would remain. Then every backend is
    /// used, as Envoy's panic mode does: when most backends look unhealthy
    /// the checks are more likely wrong than the backends, and spreading
    /// load over all of them beats crushing the few left (or refusing
    /// everything). A threshold of 0 only panics when none is left.
    public static func usable<T>(_ all: [T], panicThreshold: Double, excluded: (T) -> Bool) -> (backends: [T], panic: Bool) {
        guard !all.isEmpty else { return (all, false) }
        let kept = all.filter { !excluded($0) }
        if kept.count == all.count { return (all, false) }
        let percent = Double(kept.count) * 100 / Double(all.count)
        if kept.isEmpty || percent < panicThreshold { return (all, true) }
        return (kept, false)
    }
}
