import CLibbpf
import Foundation
import Glibc
import Logging
import Synchronization
import WeftABI
import WeftCore

/// The same-node socket shortcut (bpf/programs/accel.bpf.c, rules in
/// weft_abi.h): an optional part of the datapath. It is attached apart from
/// the rest so that a kernel refusing it (no SOCKHASH, a verifier that
/// rejects the program) costs the shortcut and nothing else.
public enum Shortcut {
    static let objectName = "accel"
    static let podProgram = "weft_accel_sockops"
    static let proxyProgram = "weft_accel_sockops_proxy"
    static let messageProgram = "weft_accel_msg"

    public struct Attachment: Sendable {
        public var programs: [Datapath.Program]
        /// Whether the proxy's own cgroup got the program that marks its
        /// sockets as receivers (not when it shares the pods' cgroup tree).
        public var proxyCovered: Bool
    }

    /// Loads the shortcut's programs and maps (pinned next to the rest) and
    /// attaches them: sk_msg to the SOCKHASH first, so that no socket enters
    /// the map without its verdict program, then sockops to the pods' cgroup
    /// and, if given, to the proxy's.
    public static func attach(pinDirectory: String, podCgroup: String, proxyCgroup: String?,
                              logger: Logger) throws -> Attachment {
        guard let embedded = EmbeddedBPFObject.all.first(where: { $0.name == objectName }) else {
            throw KernelError("find the embedded shortcut object", errno: ENOENT)
        }
        let bytes = embedded.bytes
        guard let object = bytes.withUnsafeBytes({
            weft_object_open_mem($0.baseAddress, $0.count, objectName, Datapath.mapDirectory(pinDirectory))
        }) else { throw KernelError.fromErrno("open eBPF object \(objectName)") }
        defer { bpf_object__close(object) }
        try KernelError.check(bpf_object__load(object), "load the shortcut's programs (the verifier log is above)")

        func program(_ name: String) throws -> OpaquePointer {
            guard let p = bpf_object__find_program_by_name(object, name) else {
                throw KernelError("find program \(name)", errno: ENOENT)
            }
            return p
        }
        let socks = bpf_object__find_map_fd_by_name(object, WEFT_MAP_ACCEL_SOCKS)
        try KernelError.check(socks, "find map \(WEFT_MAP_ACCEL_SOCKS)")
        let message = try program(messageProgram)
        // Not a link on this libbpf: the map holds the program. Attaching
        // again replaces it for sockets added from now on.
        try KernelError.check(bpf_prog_attach(bpf_program__fd(message), socks, BPF_SK_MSG_VERDICT, 0),
                              "attach \(messageProgram) to \(WEFT_MAP_ACCEL_SOCKS)")
        var programs = [Datapath.Program(name: messageProgram, state: .attached,
                                         programID: programID(bpf_program__fd(message)))]

        let links = Datapath.linkDirectory(pinDirectory)
        programs.append(try attachToCgroup(try program(podProgram), name: podProgram, path: podCgroup,
                                           linkPath: "\(links)/\(podProgram)", logger: logger))
        var proxyCovered = false
        if let proxyCgroup {
            programs.append(try attachToCgroup(try program(proxyProgram), name: proxyProgram, path: proxyCgroup,
                                               linkPath: "\(links)/\(proxyProgram)", logger: logger))
            proxyCovered = true
        }
        return Attachment(programs: programs, proxyCovered: proxyCovered)
    }

    private static func attachToCgroup(_ prog: OpaquePointer, name: String, path: String, linkPath: String,
                                       logger: Logger) throws -> Datapath.Program {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw KernelError.fromErrno("open cgroup \(path)") }
        defer { close(fd) }
        guard let id = Host.cgroupID(path) else { throw KernelError.fromErrno("stat cgroup \(path)") }
        return try Datapath.attachPinnedLink(prog, name: name, linkPath: linkPath, cgroupFD: fd, cgroupID: id, logger: logger)
    }

    private static func programID(_ fd: Int32) -> UInt32 {
        var id: UInt32 = 0
        var tag = [UInt8](repeating: 0, count: 8)
        _ = weft_prog_info(fd, &id, &tag)
        return id
    }

    /// Where the node proxy runs: the cgroup this process (the agent, whose
    /// child the proxy is) belongs to. nil when that is the root cgroup or
    /// inside the pods' tree, where the pods' program already sees it and a
    /// second program would mark pods as receivers.
    public static func proxyCgroup(cgroupMount: String, podCgroup: String) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("0::") }) else { return nil }
        let relative = String(line.dropFirst(3))
        guard relative != "/" else { return nil }
        let path = cgroupMount + relative
        if path == podCgroup || path.hasPrefix(podCgroup.hasSuffix("/") ? podCgroup : podCgroup + "/") { return nil }
        return path
    }
}

/// The shortcut's maps: the switch, the table of this node's mesh
/// addresses, and the counters. The SOCKHASH itself is the kernel's.
public final class ShortcutMaps: Sendable {
    let config: BPFMap<UInt32, weft_accel_config>
    let local: BPFMap<weft_accel_addr, UInt32>
    let peers: BPFMap<weft_accel_key, weft_accel_peer>
    let socks: BPFMap<weft_accel_key, UInt64>
    let state: BPFMap<Int32, weft_accel_sock>
    let stats: PerCPUCounters

    /// How many redirected, unread bytes a receiver may hold at least (its
    /// rcvbuf if larger) before its sender falls back to TCP.
    public static let defaultQueueFloor: UInt32 = 4 << 20

    public init(pinDirectory: String) throws(KernelError) {
        let dir = Datapath.mapDirectory(pinDirectory)
        config = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_CONFIG)")
        local = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_LOCAL)")
        peers = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_PEERS)")
        socks = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_SOCKS)")
        state = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_STATE)")
        stats = try PerCPUCounters(pinned: "\(dir)/\(WEFT_MAP_ACCEL_STATS)")
    }

    /// The switch; `splice` lets directions the proxy relays byte for byte
    /// skip it (weft_abi.h, "Splice"), and means nothing while off.
    public func setEnabled(_ enabled: Bool, splice: Bool = true,
                           queueFloor: UInt32 = ShortcutMaps.defaultQueueFloor) throws(KernelError) {
        var value = weft_accel_config()
        value.flags = enabled ? UInt32(WEFT_ACCEL_F_ENABLED) | (splice ? UInt32(WEFT_ACCEL_F_SPLICE) : 0) : 0
        value.queue_floor = queueFloor
        try config.update(0, value)
    }

    /// (enabled, splice) as the kernel has them.
    public func switches() throws(KernelError) -> (enabled: Bool, splice: Bool) {
        guard let v = try config.lookup(0) else { return (false, false) }
        return (v.flags & UInt32(WEFT_ACCEL_F_ENABLED) != 0, v.flags & UInt32(WEFT_ACCEL_F_SPLICE) != 0)
    }

    public struct LocalAddress: Hashable, Sendable {
        public var address: IPv4Address
        public var receives: Bool
        public var proxy: Bool
        public init(address: IPv4Address, receives: Bool, proxy: Bool) {
            self.address = address
            self.receives = receives
            self.proxy = proxy
        }
    }

    /// Makes the address table exactly `addresses`: new and changed entries
    /// written, stale ones deleted. Returns the number of writes.
    @discardableResult
    public func setLocal(_ addresses: [LocalAddress]) throws(KernelError) -> Int {
        var want: [IPv4Address: UInt32] = [:]
        for a in addresses {
            var flags = UInt32(a.proxy ? WEFT_ACCEL_LOCAL_PROXY : WEFT_ACCEL_LOCAL_POD)
            if a.receives { flags |= UInt32(WEFT_ACCEL_LOCAL_RECEIVE) }
            want[a.address, default: 0] |= flags
        }
        // The table this process last wrote whole: the same again needs no
        // look at the kernel (one lookup per local pod, then every key).
        // Forgotten before writing, so a write that fails part-way is
        // checked entry by entry next time.
        if lastLocal.withLock({ $0 }) == want { return 0 }
        lastLocal.withLock { $0 = nil }
        var writes = 0
        for (address, flags) in want where try local.lookup(Self.key(address)) != flags {
            try local.update(Self.key(address), flags)
            writes += 1
        }
        for key in try local.keys() {
            let mapped = key.addr.0 == 0 && key.addr.1 == 0 && key.addr.2 == UInt32(0xffff).bigEndian
            if mapped, want[IPv4Address(networkOrder: key.addr.3)] != nil { continue }
            try local.delete(key)
            writes += 1
        }
        lastLocal.withLock { $0 = want }
        return writes
    }
    private let lastLocal = Mutex<[IPv4Address: UInt32]?>(nil)

    static func key(_ a: IPv4Address) -> weft_accel_addr {
        var k = weft_accel_addr()
        k.addr = (0, 0, UInt32(0xffff).bigEndian, a.networkOrder)
        return k
    }

    /// Sockets on the shortcut now (each end of a connection counts once).
    public func sockets() throws(KernelError) -> Int { try peers.count() }
    public var capacity: Int { peers.capacity }

    /// Every counter of enum weft_accel_event, by the name metrics use.
    public func counters() throws(KernelError) -> [(name: String, value: UInt64)] {
        try Self.eventNames.enumerated().map { i, name throws(KernelError) in (name, try stats.sum(UInt32(i))) }
    }

    public static let eventNames = [
        "socket_added", "socket_add_failed", "socket_removed", "flow_redirected", "flow_tcp_no_peer",
        "flow_tcp_disabled", "fallback_switched_off", "fallback_receiver_queue_full", "messages_redirected",
        "bytes_redirected", "messages_tcp", "bytes_tcp", "flow_tcp_not_receiver", "probe_redirected",
        "resumed_after_queue_full", "messages_spliced", "bytes_spliced", "splice_wait",
        "socket_receive_only",
    ]

    /// Checks, with two loopback sockets of its own, that the kernel really
    /// moves bytes the shortcut's way: both enter the SOCKHASH, the sender
    /// is marked for the probe (so neither the switch nor the address table
    /// matter), and 4 bytes must arrive through the redirect. nil when it
    /// works, else what failed.
    public func probe() -> String? {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { return "socket: \(String(cString: strerror(errno)))" }
        defer { close(listener) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bind(listener, sa, len) == 0 && listen(listener, 1) == 0 && getsockname(listener, sa, &len) == 0
            }
        }
        guard ok else { return "loopback listener: \(String(cString: strerror(errno)))" }
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard client >= 0 else { return "socket: \(String(cString: strerror(errno)))" }
        defer { close(client) }
        let connected = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, len) == 0 }
        }
        guard connected else { return "loopback connect: \(String(cString: strerror(errno)))" }
        let server = accept(listener, nil, nil)
        guard server >= 0 else { return "accept: \(String(cString: strerror(errno)))" }
        defer { close(server) }
        var clientAddr = sockaddr_in()
        var clientLen = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &clientAddr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(client, $0, &clientLen) }
        }
        let loopback = Self.key(IPv4Address(networkOrder: addr.sin_addr.s_addr))
        let serverPort = UInt16(bigEndian: addr.sin_port), clientPort = UInt16(bigEndian: clientAddr.sin_port)
        var serverKey = weft_accel_key(), clientKey = weft_accel_key()
        serverKey.local = loopback.addr; serverKey.remote = loopback.addr
        serverKey.local_port = serverPort; serverKey.remote_port = clientPort
        clientKey.local = loopback.addr; clientKey.remote = loopback.addr
        clientKey.local_port = clientPort; clientKey.remote_port = serverPort

        var serverFD = UInt64(server), clientFD = UInt64(client)
        var rc = bpf_map_update_elem(socks.fd, &serverKey, &serverFD, UInt64(BPF_NOEXIST))
        if rc == 0 { rc = bpf_map_update_elem(socks.fd, &clientKey, &clientFD, UInt64(BPF_NOEXIST)) }
        guard rc == 0 else { return "add sockets to \(WEFT_MAP_ACCEL_SOCKS): \(String(cString: strerror(-rc)))" }
        var fdKey = client
        var mark = weft_accel_sock()
        mark.mode = UInt32(WEFT_ACCEL_PROBE)
        rc = bpf_map_update_elem(state.fd, &fdKey, &mark, UInt64(BPF_ANY))
        guard rc == 0 else { return "mark the probe socket: \(String(cString: strerror(-rc)))" }

        let index = UInt32(WEFT_ACCEL_PROBE_REDIRECTED.rawValue)
        let before = (try? stats.sum(index)) ?? 0
        let payload: [UInt8] = Array("weft".utf8)
        guard write(client, payload, payload.count) == payload.count else {
            return "write on a shortcut socket: \(String(cString: strerror(errno)))"
        }
        var pfd = pollfd(fd: server, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 1000) == 1 else { return "the redirected bytes did not arrive within 1 s" }
        var buffer = [UInt8](repeating: 0, count: 16)
        let n = read(server, &buffer, buffer.count)
        guard n == payload.count, Array(buffer[0..<n]) == payload else {
            return "the peer read \(n) bytes, not the 4 sent"
        }
        guard ((try? stats.sum(index)) ?? 0) > before else {
            return "the bytes arrived by TCP, not through the sk_msg redirect"
        }
        return nil
    }
}
