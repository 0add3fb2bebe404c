import CWeftSys
import Glibc
import NIOCore

/// `--pin-threads`: each event loop bound to one CPU of those the proxy may
/// run on, in order (loop i on the i-th, round again when there are more
/// loops than CPUs).
///
/// Unbound, a burst of requests wakes both loops from the client's CPU, and
/// the scheduler may queue them on that CPU behind the client while another
/// CPU sits idle: it leaves a task that ran there within the last half
/// millisecond where it is. Bound one per CPU, the loops work a burst in
/// parallel (docs/proxy.md, "Event loops bound to CPUs").
enum LoopPinning {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// The CPUs the calling thread may run on (the process's, inherited).
    static func allowedCPUs() throws -> [Int32] {
        var cpus = [Int32](repeating: 0, count: 1024)
        let n = weft_thread_cpus(&cpus, Int32(cpus.count))
        guard n > 0 else { throw Failure(description: "--pin-threads: sched_getaffinity: \(String(cString: strerror(errno)))") }
        return Array(cpus[..<Int(n)])
    }

    /// Binds each loop to its CPU; the CPU of each loop, in loop order.
    static func pin(_ loops: [any EventLoop], to cpus: [Int32]) throws -> [Int32] {
        precondition(!cpus.isEmpty)
        var chosen: [Int32] = []
        for (i, loop) in loops.enumerated() {
            let cpu = cpus[i % cpus.count]
            let error = try loop.submit { weft_pin_thread(cpu) == 0 ? nil : String(cString: strerror(errno)) }.wait()
            if let error { throw Failure(description: "--pin-threads: binding event loop \(i) to CPU \(cpu): \(error)") }
            chosen.append(cpu)
        }
        return chosen
    }
}
