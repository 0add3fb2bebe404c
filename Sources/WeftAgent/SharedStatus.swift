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
    }

    private let mutex: Mutex<State>

    init(_ initial: AgentStatus) { mutex = Mutex(State(status: initial)) }

    func withLock<T>(_ body: (inout AgentStatus) -> T) -> T { mutex.withLock { body(&$0.status) } }

    /// Records the config in force (copy-on-write: no copy is made here).
    func setInForce(table: ServiceTable, config: ClusterState) {
        mutex.withLock {
            $0.table = table
            $0.config = config
        }
    }

    /// The status with its service and workload lists filled in.
    func full() -> AgentStatus {
        let (status, table, config) = mutex.withLock { ($0.status, $0.table, $0.config) }
        var s = status
        s.services = (table?.entries ?? [:]).sorted { $0.key < $1.key }
            .map { AgentStatus.ServiceName(frontend: $0.key.description, name: $0.value.name) }
        s.workloads = (config?.workloads ?? []).map {
            AgentStatus.WorkloadStatus(name: $0.metadata.qualifiedName, node: $0.node, address: $0.address.description,
                                       serviceAccount: $0.serviceAccount, labels: $0.metadata.labels)
        }
        return s
    }
}
