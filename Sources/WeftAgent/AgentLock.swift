import Foundation
import Glibc
import WeftCore
import WeftKernel
import WeftStatus

/// One agent per node. Two would each load and write the node's pinned maps
/// and both adopt its proxy: the agent holds an exclusive lock on the node's
/// run directory (flock, so the kernel lets go the moment it exits or dies)
/// from before it touches the kernel until it exits, and a second agent, or
/// `weft agent --uninstall`, finds it held and stops there.
public enum AgentLock {
    /// Takes the lock on `runDirectory` (made if missing); the descriptor
    /// that holds it stays open for the agent's life (close-on-exec: the
    /// proxy it starts must not keep it once the agent is gone).
    public static func take(node: String, runDirectory: String) throws(PreflightError) -> Int32 {
        do {
            try FileManager.default.createDirectory(atPath: runDirectory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw PreflightError("cannot make \(runDirectory): \(error)")
        }
        let fd = open(runDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw PreflightError("cannot open \(runDirectory): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            // Which one, if it answers on its status socket yet.
            let status = try? UnixHTTP.get(socket: AgentConfiguration.statusSocket(runDirectory: runDirectory), path: "/status",
                                           timeoutSeconds: 1)
            let pid = status.flatMap { try? JSONDecoder().decode(AgentStatus.self, from: Data($0.utf8)) }.map { ", pid \($0.pid)" } ?? ""
            throw PreflightError("another weft agent runs for node \(node) (it holds \(runDirectory)\(pid)); stop it first")
        }
        return fd
    }

    /// Whether an agent runs for the node now (its run directory locked).
    public static func held(runDirectory: String) -> Bool {
        let fd = open(runDirectory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK
    }
}
