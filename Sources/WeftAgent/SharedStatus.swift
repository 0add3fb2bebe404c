import Synchronization
import WeftCore

/// The agent's status, written by the control thread and read by the status
/// server's threads. The per-service and per-workload lists are derived from
/// the config in force only when someone asks (/status), not on every
/// reconcile: at 10,000 Services they cost more than the reconcile's plan.
final class SharedStatus: Sendable {
    private struct State: Sendable {
        var status: AgentStatus
        var table: ServiceTable?
        var config: ClusterState?
        var policy: PolicyTable?
    }

    private let mutex: Mutex<State>

    init(_ initial: AgentStatus) { mutex = Mutex(State(status: initial)) }

    func withLock<T>(_ body: (inout AgentStatus) -> T) -> T { mutex.withLock { body(&$0.status) } }

    /// Records the config in force (copy-on-write: no copy is made here).
    func setInForce(table: ServiceTable, config: ClusterState, policy: PolicyTable) {
        mutex.withLock {
            $0.table = table
            $0.config = config
            $0.policy = policy
        }
    }

    /// Identity id -> `namespace{labels}`, for metrics labels.
    func identityNames() -> [UInt32: IdentityKey] { mutex.withLock { $0.policy?.identities ?? [:] } }

    /// Names for the kernel's flow counters: workloads by address and
    /// Services by (clusterIP, port) and by the other addresses and ports
    /// served as it (ClusterState.aliases), from the config in force.
    func flowNames() -> (workloads: [UInt32: (namespace: String, name: String)], services: [UInt64: (namespace: String, name: String)]) {
        guard let config = mutex.withLock({ $0.config }) else { return ([:], [:]) }
        var workloads: [UInt32: (String, String)] = [:]
        for w in config.workloads { workloads[w.address.value] = (w.metadata.namespace, w.metadata.name) }
        var services: [UInt64: (String, String)] = [:]
        for s in config.services {
            guard let vip = s.clusterIP else { continue }
            for p in s.ports {
                services[UInt64(vip.value) << 16 | UInt64(p.port)] = (s.metadata.namespace, s.metadata.name)
                for (address, port) in config.aliases(of: s, p) {
                    services[UInt64(address.value) << 16 | UInt64(port)] = (s.metadata.namespace, s.metadata.name)
                }
            }
        }
        return (workloads, services)
    }

    /// The status with its service and workload lists filled in.
    func full() -> AgentStatus {
        let (status, table, config, policy) = mutex.withLock { ($0.status, $0.table, $0.config, $0.policy) }
        var s = status
        s.services = (table?.entries ?? [:]).sorted { $0.key < $1.key }
            .map { AgentStatus.ServiceName(frontend: $0.key.description, name: $0.value.name) }
        s.zone = config?.zone(ofNode: s.node)
        s.workloads = (config?.workloads ?? []).map {
            AgentStatus.WorkloadStatus(name: $0.metadata.qualifiedName, node: $0.node, address: $0.address.description,
                                       serviceAccount: $0.serviceAccount, labels: $0.metadata.labels)
        }
        if let config, let policy {
            s.policies = config.networkPolicies.map { p in
                let selected = config.workloads.filter {
                    $0.metadata.namespace == p.metadata.namespace && p.podSelector.matches($0.metadata.labels)
                }
                return AgentStatus.PolicyStatus(
                    name: p.metadata.qualifiedName, podSelector: p.podSelector.description,
                    policyTypes: p.policyTypes.sorted().map(\.rawValue), selectedPods: selected.map(\.metadata.qualifiedName),
                    ingressRules: p.ingress.count, egressRules: p.egress.count)
            }
            s.policyNames.rules = Dictionary(uniqueKeysWithValues: policy.rules.map { ("\($0.key)", $0.value) })
            s.policyNames.identities = Dictionary(uniqueKeysWithValues: policy.identities.map { ("\($0.key)", $0.value.description) })
            s.policyNames.isolatedBy = Dictionary(uniqueKeysWithValues: policy.isolatedBy.map { ("\($0.key)", $0.value) })
        }
        return s
    }
}
