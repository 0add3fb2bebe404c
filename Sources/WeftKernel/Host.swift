import Foundation
import Glibc
import Logging
import WeftCore

/// Facts about the host the datapath depends on, read from /proc and /sys.
public enum Host {
    /// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on unified
    /// hosts, /sys/fs/cgroup/unified on hybrid ones. nil without cgroup v2.
    public static func cgroup2Mount(mounts: String? = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) -> String? {
        mountPoints(ofType: "cgroup2", in: mounts ?? "").first
    }

    public static func mountPoints(ofType type: String, in mounts: String) -> [String] {
        mounts.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count >= 3, fields[2] == type else { return nil }
            // /proc/mounts escapes spaces as \040.
            return fields[1].replacingOccurrences(of: "\\040", with: " ")
        }
    }

    public static let bpffsRoot = "/sys/fs/bpf"

    /// The open-file limit (RLIMIT_NOFILE) before and after raising the
    /// soft one to the hard one.
    public struct OpenFileLimit: Equatable, Sendable {
        public var before: Int
        public var now: Int

        /// For the log: "open files: at most N (raised from M)".
        public var summary: String {
            "open files: at most \(now)" + (before < now ? " (raised from \(before))" : "")
        }
    }

    /// raiseOpenFileLimit(), and the outcome in `logger`'s log.
    @discardableResult
    public static func raiseOpenFileLimit(logger: Logger) -> OpenFileLimit? {
        guard let files = raiseOpenFileLimit() else {
            logger.warning("open files: the limit could not be read or raised")
            return nil
        }
        logger.info("\(files.summary)")
        return files
    }

    /// Raises this process's soft limit on open files to its hard limit,
    /// as Go's runtime and Istio's ztunnel do at start: the node proxy holds
    /// two sockets for every connection of every pod of the node (and the
    /// agent a probe's each), and systemd starts services with a soft
    /// limit of 1024 (the hard one 524288), which a busy node passes; then
    /// accepts and connects fail with EMFILE. nil if the limit cannot be
    /// read or set.
    public static func raiseOpenFileLimit() -> OpenFileLimit? {
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        var limit = rlimit()
        guard getrlimit(resource, &limit) == 0 else { return nil }
        let before = limit.rlim_cur
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            guard setrlimit(resource, &limit) == 0 else { return nil }
        }
        func count(_ v: rlim_t) -> Int { v > rlim_t(Int.max) ? Int.max : Int(v) }  // (RLIM_INFINITY: all ones)
        return OpenFileLimit(before: count(before), now: count(limit.rlim_cur))
    }

    /// Mounts bpffs at /sys/fs/bpf when nothing of type bpf is mounted there.
    public static func ensureBPFFS() throws(PreflightError) {
        let mounts = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
        if mountPoints(ofType: "bpf", in: mounts).contains(bpffsRoot) { return }
        if mount("bpf", bpffsRoot, "bpf", 0, nil) != 0 {
            throw PreflightError("bpffs is not mounted at \(bpffsRoot) and mounting it failed: \(String(cString: strerror(errno)))")
        }
    }

    /// The cgroup id the kernel reports for a cgroup v2 directory: its inode.
    public static func cgroupID(_ path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_ino)
    }

    /// A cgroup directory held open to look up the ids of cgroups
    /// below it by relative path, without walking from / for each.
    public final class CgroupDirectory {
        private let fd: Int32
        private let path: String

        public init(_ path: String) {
            self.path = path
            fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        }

        deinit { if fd >= 0 { close(fd) } }

        /// The id of the cgroup at `relative` below this one; nil when
        /// there is none (or the directory could not be opened).
        public func cgroupID(_ relative: String) -> UInt64? {
            guard fd >= 0 else { return Host.cgroupID(path + "/" + relative) }
            var st = stat()
            guard fstatat(fd, relative, &st, 0) == 0 else { return nil }
            return UInt64(st.st_ino)
        }
    }

    /// Effective capabilities of this process, from /proc/self/status.
    static func effectiveCapabilities() -> UInt64 {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let value = UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16)
        else { return 0 }
        return value
    }

    static let capNetAdmin: UInt64 = 12, capSysAdmin: UInt64 = 21, capBPF: UInt64 = 39

    /// Refuses, with one sentence, a host the agent cannot work on.
    public static func preflight() throws(PreflightError) {
        let caps = effectiveCapabilities()
        func has(_ cap: UInt64) -> Bool { caps & (1 << cap) != 0 }
        guard (has(capBPF) || has(capSysAdmin)) && has(capNetAdmin) && (has(capSysAdmin) || geteuid() == 0) else {
            throw PreflightError("weft agent needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load eBPF programs; run it as root.")
        }
        guard cgroup2Mount() != nil else {
            throw PreflightError("no cgroup v2 hierarchy is mounted (see /proc/mounts); weft attaches its programs to cgroup v2, so mount one (e.g. at /sys/fs/cgroup/unified).")
        }
        guard FileManager.default.fileExists(atPath: "/sys/kernel/btf/vmlinux") else {
            throw PreflightError("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); weft needs a kernel built with CONFIG_DEBUG_INFO_BTF=y.")
        }
    }

    /// This node's own IPv4 addresses (the network namespace the agent runs
    /// in), loopback excluded: traffic between a pod and its node is always
    /// allowed by NetworkPolicy.
    public static func localIPv4Addresses() -> [IPv4Address] {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return [] }
        defer { freeifaddrs(head) }
        var out: [IPv4Address] = []
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = cursor {
            defer { cursor = entry.pointee.ifa_next }
            guard let sa = entry.pointee.ifa_addr, sa.pointee.sa_family == sa_family_t(AF_INET) else { continue }
            let address = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                IPv4Address(networkOrder: $0.pointee.sin_addr.s_addr)
            }
            if address.value >> 24 != 127 { out.append(address) }
        }
        return out
    }
}
