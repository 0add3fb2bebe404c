import Foundation
import Glibc
import Testing

/// Whether tests that need root and BPF can run. Unprivileged runs skip them
/// with this reason; under CI=true a missing privilege fails instead.
enum Privilege {
    static let isRoot = geteuid() == 0
    static let inCI = ProcessInfo.processInfo.environment["CI"] == "true"
    static let canRun = isRoot || inCI
    static let skipReason: Comment = "needs root for eBPF, cgroups and network namespaces (run as root; under CI=true this fails instead of skipping)"
}
