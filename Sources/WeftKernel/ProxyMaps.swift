import WeftABI
import WeftCore

/// What connect4 captured for the node proxy: the Service address the pod
/// dialed and which pod it was (by its cgroup, not by the packet).
public struct CapturedOrigin: Sendable, Hashable {
    public var vip: IPv4Address
    public var port: UInt16
    public var serviceID: UInt32
    public var source: IPv4Address
    /// To a pod on another node, through the tunnel: `vip`/`port` name the
    /// pod itself (the kernel chose it), not a Service.
    public var tunnel = false
    /// Through the tunnel to a pod the kernel chose for a Service: the
    /// clusterIP and port the client dialed ("vip:port"; nil when it
    /// dialed the pod), for the Service its metrics name.
    public var dialed: String?

    public init(vip: IPv4Address, port: UInt16, serviceID: UInt32, source: IPv4Address, tunnel: Bool = false, dialed: String? = nil) {
        self.vip = vip
        self.port = port
        self.serviceID = serviceID
        self.source = source
        self.tunnel = tunnel
        self.dialed = dialed
    }
}

/// The two capture maps (see weft_abi.h, "L7 capture"): where the proxy
/// listens, written by the agent, and the per-connection origins sockops
/// writes and the proxy takes.
public final class ProxyMaps: Sendable {
    let config: BPFMap<UInt32, weft_proxy_config>
    let origins: BPFMap<weft_proxy_origin_key, weft_proxy_origin>

    public init(pinDirectory: String) throws(KernelError) {
        let dir = Datapath.mapDirectory(pinDirectory)
        config = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_PROXY_CONFIG)")
        origins = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_PROXY_ORIGINS)")
    }

    /// Points capture at the proxy's listener, or turns it off (nil): L7
    /// Service ports are then balanced in the kernel like any other.
    public func setListener(_ listener: (address: IPv4Address, port: UInt16)?) throws(KernelError) {
        var value = weft_proxy_config()
        if let listener {
            value.addr = listener.address.networkOrder
            value.port = listener.port.bigEndian
        }
        try config.update(0, value)
    }

    public func listener() throws(KernelError) -> (address: IPv4Address, port: UInt16)? {
        guard let v = try config.lookup(0), v.addr != 0 else { return nil }
        return (IPv4Address(networkOrder: v.addr), UInt16(bigEndian: v.port))
    }

    /// The origin of the connection accepted from `client`, removed from the
    /// map: each entry is read once, by the accept that owns it.
    public func take(client: IPv4Address, port: UInt16) throws(KernelError) -> CapturedOrigin? {
        var key = weft_proxy_origin_key()
        key.client_addr = client.networkOrder
        key.client_port = port.bigEndian
        guard let v = try origins.take(key) else { return nil }
        return CapturedOrigin(vip: IPv4Address(networkOrder: v.vip), port: UInt16(bigEndian: v.port),
                              serviceID: v.service_id, source: IPv4Address(networkOrder: v.source),
                              tunnel: v.flags & UInt16(WEFT_ORIGIN_F_TUNNEL) != 0,
                              dialed: v.dialed == 0 ? nil : "\(IPv4Address(networkOrder: v.dialed)):\(UInt16(bigEndian: v.dialed_port))")
    }

    /// Origins written but never taken (the proxy was down when they came).
    public func pendingOrigins() throws(KernelError) -> Int { try origins.count() }
}
