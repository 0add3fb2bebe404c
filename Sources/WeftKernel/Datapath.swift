import CLibbpf
import Foundation
import Glibc
import Logging

/// The node's eBPF datapath: programs attached to the node's cgroup v2
/// subtree through pinned bpf_links, and maps pinned by name, all under
/// /sys/fs/bpf/weft/<node>/.
///
/// `attach` is idempotent. Over an existing pin set it adopts what is there:
/// maps are reused (libbpf's pin-by-name), a link whose program is identical
/// to ours is kept untouched, and one running an older program has it swapped
/// in place with BPF_LINK_UPDATE — the hook is never detached, so no connect()
/// slips past it and no established connection notices.
public struct Datapath: Sendable {
    public enum LinkState: String, Sendable, Codable {
        case attached   // newly attached by this agent
        case adopted    // found pinned, same program: left alone
        case upgraded   // found pinned, older program: replaced atomically
    }

    public struct Program: Sendable, Codable {
        public var name: String
        public var state: LinkState
        public var programID: UInt32
    }

    public let pinDirectory: String
    public let cgroupPath: String
    public let programs: [Program]

    public var mapDirectory: String { Self.mapDirectory(pinDirectory) }
    static func mapDirectory(_ pin: String) -> String { pin + "/maps" }
    static func linkDirectory(_ pin: String) -> String { pin + "/links" }

    public static func defaultPinDirectory(node: String) -> String { "\(Host.bpffsRoot)/weft/\(node)" }

    /// Loads, attaches and pins, or adopts what is already pinned.
    public static func attach(pinDirectory: String, cgroupPath: String, logger: Logger) throws -> Datapath {
        libbpfQuietDebug
        for dir in [pinDirectory, mapDirectory(pinDirectory), linkDirectory(pinDirectory)] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
        let cgroupFD = open(cgroupPath, O_RDONLY | O_DIRECTORY)
        guard cgroupFD >= 0 else { throw KernelError.fromErrno("open cgroup \(cgroupPath)") }
        defer { close(cgroupFD) }
        guard let cgroupID = Host.cgroupID(cgroupPath) else { throw KernelError.fromErrno("stat cgroup \(cgroupPath)") }

        var programs: [Program] = []
        // The shortcut's object is optional and attached apart (Shortcut.swift);
        // the listeners' is the proxy's own (ListenerSpread.swift).
        for embedded in EmbeddedBPFObject.all where embedded.name != Shortcut.objectName && embedded.name != ListenerSpread.objectName {
            programs += try attachObject(embedded, pinDirectory: pinDirectory, cgroupFD: cgroupFD,
                                         cgroupID: cgroupID, logger: logger)
        }
        return Datapath(pinDirectory: pinDirectory, cgroupPath: cgroupPath, programs: programs)
    }

    private static let libbpfQuietDebug: Void = weft_libbpf_quiet_debug()

    private static func attachObject(_ embedded: EmbeddedBPFObject, pinDirectory: String, cgroupFD: Int32,
                                     cgroupID: UInt64, logger: Logger) throws -> [Program] {
        let bytes = embedded.bytes
        guard !bytes.isEmpty else { throw KernelError("decode embedded object \(embedded.name)", errno: EINVAL) }
        guard let object = bytes.withUnsafeBytes({
            weft_object_open_mem($0.baseAddress, $0.count, embedded.name, mapDirectory(pinDirectory))
        }) else { throw KernelError.fromErrno("open eBPF object \(embedded.name)") }
        // Closing the object drops our fds; pinned maps and links stay.
        defer { bpf_object__close(object) }
        let rc = bpf_object__load(object)
        if rc == -EINVAL || rc == -ENOTSUP {
            throw PreflightError("""
                the maps pinned under \(mapDirectory(pinDirectory)) do not match this weft's \
                definitions (made by an incompatible version?); remove them with \
                `weft agent --node NODE --uninstall` and start again
                """)
        }
        try KernelError.check(rc, "load eBPF object \(embedded.name) (the verifier log is above)")

        var out: [Program] = []
        var program = bpf_object__next_program(object, nil)
        while let prog = program {
            defer { program = bpf_object__next_program(object, prog) }
            let name = String(cString: bpf_program__name(prog))
            out.append(try attachPinnedLink(prog, name: name, linkPath: "\(linkDirectory(pinDirectory))/\(name)",
                                            cgroupFD: cgroupFD, cgroupID: cgroupID, logger: logger))
        }
        return out
    }

    /// Attaches `prog` to the cgroup behind a pinned link at `linkPath`, or
    /// adopts the pinned link (same program) or swaps its program in place.
    static func attachPinnedLink(_ prog: OpaquePointer, name: String, linkPath: String, cgroupFD: Int32,
                                 cgroupID: UInt64, logger: Logger) throws -> Program {
        let progFD = bpf_program__fd(prog)
        var newID: UInt32 = 0
        var newTag = [UInt8](repeating: 0, count: 8)
        try KernelError.check(weft_prog_info(progFD, &newID, &newTag), "inspect program \(name)")

        // Only open a pin that is there: libbpf logs a warning for a missing one.
        if FileManager.default.fileExists(atPath: linkPath), let pinned = bpf_link__open(linkPath) {
            defer { bpf_link__disconnect(pinned); bpf_link__destroy(pinned) }
            let linkFD = bpf_link__fd(pinned)
            var progID: UInt32 = 0, linkCgroup: UInt64 = 0, attachType: UInt32 = 0
            try KernelError.check(weft_link_info(linkFD, &progID, &linkCgroup, &attachType), "inspect link \(linkPath)")
            guard linkCgroup == cgroupID else {
                throw PreflightError("the pinned link \(linkPath) is attached to another cgroup (id \(linkCgroup)); this agent was started with --cgroup \(cgroupPath(cgroupFD)). Uninstall the old pin set first.")
            }
            let oldFD = bpf_prog_get_fd_by_id(progID)
            var oldID: UInt32 = 0
            var oldTag = [UInt8](repeating: 0, count: 8)
            if oldFD >= 0 { _ = weft_prog_info(oldFD, &oldID, &oldTag); close(oldFD) }
            if oldFD >= 0 && oldTag == newTag {
                logger.info("adopted pinned link", metadata: ["program": "\(name)", "prog_id": "\(progID)"])
                return Program(name: name, state: .adopted, programID: progID)
            }
            try KernelError.check(weft_link_update(linkFD, progFD), "replace program behind \(linkPath)")
            logger.notice("upgraded pinned link in place", metadata: ["program": "\(name)", "old_prog_id": "\(progID)", "prog_id": "\(newID)"])
            return Program(name: name, state: .upgraded, programID: newID)
        }
        guard let link = bpf_program__attach_cgroup(prog, cgroupFD) else {
            throw KernelError.fromErrno("attach \(name) to cgroup")
        }
        defer { bpf_link__disconnect(link); bpf_link__destroy(link) }
        let pinRC = bpf_link__pin(link, linkPath)
        if pinRC < 0 {
            // Unpinned, the link would vanish with this process: undo it now.
            _ = bpf_link__detach(link)
            try KernelError.check(pinRC, "pin link \(linkPath)")
        }
        logger.info("attached and pinned", metadata: ["program": "\(name)", "prog_id": "\(newID)", "pin": "\(linkPath)"])
        return Program(name: name, state: .attached, programID: newID)
    }

    private static func cgroupPath(_ fd: Int32) -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? "fd \(fd)"
    }

    /// Removes the pin set: links go (so the programs detach) and maps go.
    public static func uninstall(pinDirectory: String) throws {
        guard FileManager.default.fileExists(atPath: pinDirectory) else { return }
        try FileManager.default.removeItem(atPath: pinDirectory)
        let parent = (pinDirectory as NSString).deletingLastPathComponent
        if (parent as NSString).lastPathComponent == "weft",
           (try? FileManager.default.contentsOfDirectory(atPath: parent))?.isEmpty == true {
            try? FileManager.default.removeItem(atPath: parent)
        }
    }
}
