import CLibbpf
import Glibc
import WeftABI
import WeftCore

/// The node proxy's listening sockets, one per event loop, and who takes a
/// new connection among them (bpf/programs/listen.bpf.c): each loop accepts
/// its own connections, none is handed from the accepting thread to
/// another, and weft_listen_pick deals them out in turn.
public enum ListenerSpread {
    static let objectName = "listen"
    static let programName = "weft_listen_pick"

    /// `count` TCP sockets listening on `address`:`port`, all in one
    /// SO_REUSEPORT group (port 0: the first one's port, as the kernel
    /// chose it). Non-blocking and close-on-exec; the caller owns them.
    /// TCP_NODELAY is set on each: a connection accepted from it has it
    /// already (the kernel copies the listener's options into the new
    /// socket), so no accepted connection needs a setsockopt for it.
    public static func listen(address: IPv4Address, port: UInt16, count: Int, backlog: Int32) throws(KernelError) -> [Int32] {
        var fds: [Int32] = []
        var bound = port
        do throws(KernelError) {
            for _ in 0..<max(count, 1) {
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { throw KernelError.fromErrno("open a listening socket") }
                fds.append(fd)
                var one: Int32 = 1
                for option in [SO_REUSEADDR, SO_REUSEPORT] where setsockopt(fd, SOL_SOCKET, option, &one, 4) != 0 {
                    throw KernelError.fromErrno("set SO_REUSEADDR / SO_REUSEPORT on a listening socket")
                }
                guard setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4) == 0 else {
                    throw KernelError.fromErrno("set TCP_NODELAY on a listening socket")
                }
                var sin = sockaddr_in()
                sin.sin_family = sa_family_t(AF_INET)
                sin.sin_port = bound.bigEndian
                sin.sin_addr.s_addr = address.value.bigEndian
                let length = socklen_t(MemoryLayout<sockaddr_in>.size)
                let rc = withUnsafePointer(to: &sin) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
                }
                guard rc == 0 else { throw KernelError.fromErrno("bind \(address):\(bound)") }
                guard Glibc.listen(fd, backlog) == 0 else { throw KernelError.fromErrno("listen on \(address):\(bound)") }
                if bound == 0 {
                    var got = sockaddr_in()
                    var size = length
                    let named = withUnsafeMutablePointer(to: &got) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &size) }
                    }
                    guard named == 0 else { throw KernelError.fromErrno("read the port of \(address):0") }
                    bound = UInt16(bigEndian: got.sin_port)
                }
            }
        } catch {
            for fd in fds { close(fd) }
            throw error
        }
        return fds
    }

    /// Loads weft_listen_pick, puts `listeners` (sockets of one SO_REUSEPORT
    /// group, listening) in its array in this order and attaches it to
    /// their group, replacing the program the group had (a predecessor's,
    /// whose listeners it then no longer picks). The group holds the
    /// program and the program its maps: no fd of them stays open here, and
    /// a listener that closes leaves the array by itself.
    public static func attach(listeners: [Int32]) throws(KernelError) {
        guard let first = listeners.first else { return }
        guard listeners.count <= Int(WEFT_MAX_LISTENERS) else {
            throw KernelError("spread connections over \(listeners.count) listeners (at most \(WEFT_MAX_LISTENERS))", errno: E2BIG)
        }
        guard let embedded = EmbeddedBPFObject.all.first(where: { $0.name == objectName }) else {
            throw KernelError("find the embedded listener object", errno: ENOENT)
        }
        let bytes = embedded.bytes
        guard let object = bytes.withUnsafeBytes({ weft_object_open_mem($0.baseAddress, $0.count, objectName, nil) }) else {
            throw KernelError.fromErrno("open eBPF object \(objectName)")
        }
        defer { bpf_object__close(object) }
        try KernelError.check(bpf_object__load(object), "load \(programName) (the verifier log is above)")
        let socks = bpf_object__find_map_fd_by_name(object, WEFT_MAP_LISTEN_SOCKS)
        try KernelError.check(socks, "find map \(WEFT_MAP_LISTEN_SOCKS)")
        let turn = bpf_object__find_map_fd_by_name(object, WEFT_MAP_LISTEN_TURN)
        try KernelError.check(turn, "find map \(WEFT_MAP_LISTEN_TURN)")
        guard let program = bpf_object__find_program_by_name(object, programName) else {
            throw KernelError("find program \(programName)", errno: ENOENT)
        }
        for (slot, fd) in listeners.enumerated() {
            var key = UInt32(slot), value = UInt64(fd)
            try KernelError.check(bpf_map_update_elem(socks, &key, &value, UInt64(BPF_ANY)),
                                  "put listener \(slot) in \(WEFT_MAP_LISTEN_SOCKS)")
        }
        var zero: UInt32 = 0
        var state = weft_listen_turn(listeners: UInt32(listeners.count), next: 0)
        try KernelError.check(bpf_map_update_elem(turn, &zero, &state, UInt64(BPF_ANY)), "set \(WEFT_MAP_LISTEN_TURN)")
        var progFD = bpf_program__fd(program)
        guard setsockopt(first, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, &progFD, 4) == 0 else {
            throw KernelError.fromErrno("attach \(programName) to the listeners (SO_ATTACH_REUSEPORT_EBPF)")
        }
    }
}
