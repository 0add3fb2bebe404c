import Glibc
import WeftABI

/// The node proxy's side of splicing (weft_abi.h, "Splice"): for an opaque
/// TCP connection it joins between two sockets of the same-node shortcut,
/// the proxy tells the kernel how far it has passed each direction on, and
/// the sender's sk_msg program puts later messages straight into the far
/// end's queue (a receiver), or out of the proxy's socket to it (any other
/// pod), whenever the proxy holds none of that direction's bytes.
public final class SpliceMaps: Sendable {
    let splice: BPFMap<weft_accel_key, weft_accel_splice>
    let spliced: BPFMap<weft_accel_key, UInt64>
    let peers: BPFMap<weft_accel_key, weft_accel_peer>

    /// Fails when the shortcut's maps are not pinned (the agent runs
    /// without the shortcut, or this kernel refused it).
    public init(pinDirectory: String) throws(KernelError) {
        let dir = Datapath.mapDirectory(pinDirectory)
        splice = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_SPLICE)")
        spliced = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_SPLICED)")
        peers = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_ACCEL_PEERS)")
    }

    /// One TCP socket by its two ends, as the shortcut keys it: IPv4 as
    /// IPv4-mapped IPv6, ports in host order.
    public struct Socket: Sendable {
        public var key: weft_accel_key

        /// `local` and `remote` are 16-byte IPv6 addresses (IPv4-mapped for
        /// IPv4) in network order.
        public init(local: (address: [UInt8], port: UInt16), remote: (address: [UInt8], port: UInt16)) {
            var k = weft_accel_key()
            withUnsafeMutableBytes(of: &k.local) { dst in
                for (i, b) in local.address.prefix(16).enumerated() { dst[i] = b }
            }
            withUnsafeMutableBytes(of: &k.remote) { dst in
                for (i, b) in remote.address.prefix(16).enumerated() { dst[i] = b }
            }
            k.local_port = local.port
            k.remote_port = remote.port
            key = k
        }

        init(key: weft_accel_key) { self.key = key }

        /// The socket at the other end of the connection.
        public var peer: Socket {
            var k = key
            k.local = key.remote
            k.remote = key.local
            k.local_port = key.remote_port
            k.remote_port = key.local_port
            return Socket(key: k)
        }

        /// The IPv4-mapped form of an IPv4 address in network byte order.
        public static func mapped(ipv4 bytes: [UInt8]) -> [UInt8] {
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] + bytes.prefix(4)
        }
    }

    /// The sockets of one direction as the kernel knows them: their
    /// cookies pin an entry to these very sockets.
    public struct Path: Sendable {
        public var proxySide: Socket
        public var target: Socket
        public var via: Socket
        var targetCookie: UInt64
        var viaCookie: UInt64
    }

    /// The path for bytes sent to `proxySide` (the proxy's socket the
    /// sender talks to) into `target` past `via` (the proxy's socket joined
    /// to it), if the kernel could splice them: all three are on the
    /// shortcut, and either the target is a receiver (the bytes go into its
    /// queue) or `via` is receive-only (they go out of it by TCP, as the
    /// proxy's own writes do). Otherwise arming would only cost map writes.
    /// The target is looked up first: a socket off the shortcut (a host
    /// process's, say) is decided by one lookup (a system call), not three.
    public func path(_ proxySide: Socket, target: Socket, via: Socket) -> Path? {
        guard let t = (try? peers.lookup(target.key)) ?? nil,
              (try? peers.lookup(proxySide.key)) ?? nil != nil, let v = (try? peers.lookup(via.key)) ?? nil,
              t.flags & UInt32(WEFT_ACCEL_LOCAL_RECEIVE) != 0 || v.flags & UInt32(WEFT_ACCEL_PEER_RX_ONLY) != 0
        else { return nil }
        return Path(proxySide: proxySide, target: target, via: via, targetCookie: t.cookie, viaCookie: v.cookie)
    }

    /// Writes (or rewrites) one direction's entry: the proxy has passed
    /// `forwarded` bytes of it on so far.
    public func arm(_ path: Path, forwarded: UInt64) throws(KernelError) {
        var value = weft_accel_splice()
        value.target = path.target.key
        value.via = path.via.key
        value.forwarded = forwarded
        value.target_cookie = path.targetCookie
        value.via_cookie = path.viaCookie
        try splice.update(path.proxySide.key, value)
    }

    /// Ends one direction: removes its entry and returns the bytes the
    /// kernel spliced past the proxy.
    @discardableResult
    public func finish(_ proxySide: Socket) -> UInt64 {
        _ = try? splice.delete(proxySide.key)
        return ((try? spliced.take(proxySide.key)) ?? nil) ?? 0
    }

    /// Removes every entry: a proxy starting afresh holds no connection
    /// (a previous one's connections, if any still drain, lose nothing:
    /// their directions go back through that proxy, in order).
    public func clear() {
        for key in (try? splice.keys()) ?? [] { _ = try? splice.delete(key) }
        for key in (try? spliced.keys()) ?? [] { _ = try? spliced.delete(key) }
    }
}
