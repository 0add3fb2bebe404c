import Synchronization
import WeftCore

/// The agent's status, written by the control thread and read by the status
/// server's threads.
final class SharedStatus: Sendable {
    private let mutex: Mutex<AgentStatus>

    init(_ initial: AgentStatus) { mutex = Mutex(initial) }

    func withLock<T>(_ body: (inout AgentStatus) -> T) -> T { mutex.withLock { body(&$0) } }
}
