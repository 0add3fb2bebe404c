import NIOCore
import WeftKernel

/// One direction of an opaque TCP connection the kernel may splice past the
/// proxy (weft_abi.h, "Splice"). The proxy keeps relaying whatever reaches
/// it; it only reports, after each write to the far side completes, how
/// many bytes of the direction it has passed on. The sender's sk_msg
/// program compares that with what the sender sent, and goes around the
/// proxy only when the two agree. Used on one event loop only.
final class SpliceLeg {
    private let maps: SpliceMaps
    private let path: SpliceMaps.Path
    private var total: UInt64 = 0
    private var armed = false
    private var broken = false

    init(maps: SpliceMaps, path: SpliceMaps.Path) {
        self.maps = maps
        self.path = path
    }

    /// Writes the entry: the proxy has dealt with `base` bytes of the
    /// direction before the writes reported here (an upgraded connection's
    /// HTTP bytes; none for opaque TCP). False if the kernel would not take
    /// it, or a socket has closed meanwhile (the direction then simply
    /// stays on the proxy). Writes reported before it count from then on.
    @discardableResult
    func arm(base: UInt64 = 0) -> Bool {
        guard !broken else { return false }
        total += base
        do {
            try maps.arm(path, forwarded: total)
            armed = true
            return true
        } catch {
            broken = true
            return false
        }
    }

    /// A promise for a write of `count` bytes of this direction that
    /// reports them once the write has completed.
    func reporting(_ count: Int, on eventLoop: any EventLoop) -> EventLoopPromise<Void> {
        let written = eventLoop.makePromise(of: Void.self)
        written.futureResult.assumeIsolated().whenSuccess { self.forwarded(count) }
        return written
    }

    /// `count` more bytes of this direction are in the far socket now.
    private func forwarded(_ count: Int) {
        guard !broken else { return }
        total += UInt64(count)
        guard armed else { return }
        do {
            try maps.arm(path, forwarded: total)
        } catch {
            // A count the kernel no longer sees only keeps this direction
            // on the proxy; take the entry away so it cannot go stale.
            broken = true
            maps.finish(path.proxySide)
        }
    }

    /// No more reports: a socket of the connection has closed.
    func stop() { broken = true }

    /// Removes the entry; the bytes that went around the proxy.
    func finish() -> Int {
        broken = true
        return Int(maps.finish(path.proxySide))
    }

    /// Both directions of a connection joined by the proxy, armed, or nil
    /// when the kernel could splice neither (not both ends on the
    /// shortcut, a peer that is not a receiver, no shortcut on this node).
    static func legs(maps: SpliceMaps?, downstream: Channel, upstream: Channel) -> (SpliceLeg?, SpliceLeg?) {
        let (toServer, toClient) = unarmed(maps: maps, downstream: downstream, upstream: upstream)
        return (toServer.flatMap { $0.arm() ? $0 : nil }, toClient.flatMap { $0.arm() ? $0 : nil })
    }

    /// The same, not armed yet (Upgrade arms them once the HTTP handlers
    /// have left and it knows how many bytes they took).
    static func unarmed(maps: SpliceMaps?, downstream: Channel, upstream: Channel) -> (SpliceLeg?, SpliceLeg?) {
        guard let maps, let d = socket(downstream), let u = socket(upstream) else { return (nil, nil) }
        let client = d.peer, server = u.peer
        return (maps.path(d, target: server, via: u).map { SpliceLeg(maps: maps, path: $0) },
                maps.path(u, target: client, via: d).map { SpliceLeg(maps: maps, path: $0) })
    }

    private static func socket(_ channel: Channel) -> SpliceMaps.Socket? {
        guard let local = channel.localAddress.flatMap(end), let remote = channel.remoteAddress.flatMap(end) else { return nil }
        return SpliceMaps.Socket(local: local, remote: remote)
    }

    private static func end(_ address: SocketAddress) -> (address: [UInt8], port: UInt16)? {
        switch address {
        case .v4(let a):
            let raw = withUnsafeBytes(of: a.address.sin_addr.s_addr) { Array($0) }
            return (SpliceMaps.Socket.mapped(ipv4: raw), UInt16(bigEndian: a.address.sin_port))
        case .v6(let a):
            let raw = withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
            return (raw, UInt16(bigEndian: a.address.sin6_port))
        case .unixDomainSocket:
            return nil
        }
    }
}

/// Counts the bytes a connection reads, from its first on. After an HTTP
/// Upgrade the proxy joins the two connections byte for byte, and the
/// kernel may then splice them past it (Upgrade.join); to arm that it must
/// tell how many of each peer's bytes it has dealt with, the HTTP ones
/// included. Put in front of a client's HTTP/1 connection on the full path
/// (the express path counts for itself until it hands over) and of a
/// pooled connection to a pod of this node (the full path's; the express
/// path's own are never upgraded), only while splicing is on; `maps` is
/// what arming will use.
final class ReadTally: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    let maps: SpliceMaps
    private(set) var count: UInt64

    /// `already`: bytes read before the tally was put in (by the express
    /// path, which counts its own).
    init(maps: SpliceMaps, already: UInt64 = 0) {
        self.maps = maps
        count = already
    }

    /// A tally for a client's connection that could be spliced: from a pod
    /// of this node (not through a tunnel), while splicing is on.
    static func spliceable(_ origin: CapturedOrigin, proxy: ProxyContext, already: UInt64 = 0) -> ReadTally? {
        guard !origin.tunnel, let maps = proxy.splice(under: proxy.snapshot) else { return nil }
        return ReadTally(maps: maps, already: already)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        count &+= UInt64(unwrapInboundIn(data).readableBytes)
        context.fireChannelRead(data)
    }

    /// The tally of `channel`'s pipeline, if it has one.
    static func of(_ channel: any Channel) -> ReadTally? {
        try? channel.pipeline.syncOperations.handler(type: ReadTally.self)
    }
}
