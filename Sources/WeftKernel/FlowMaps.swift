import CLibbpf
import Glibc
import WeftABI
import WeftCore

/// The kernel's connection counters (weft_flows): per (client pod,
/// destination, dialed address and port), summed over CPUs when read.
public final class FlowMaps: @unchecked Sendable {
    // @unchecked: immutable after init; the kernel serialises map operations.
    public let flows: BPFMap<weft_flow_key, weft_flow_stats>
    private let config: BPFMap<UInt32, UInt32>
    private let cpus: Int

    public struct Flow: Sendable {
        public var source: IPv4Address
        /// nil when the connect reached no one (no backend).
        public var destination: IPv4Address?
        /// The clusterIP dialed; nil for a direct connection.
        public var vip: IPv4Address?
        public var port: UInt16
        public var opened: UInt64
        public var failed: UInt64
        public var closed: UInt64
        public var bytesSent: UInt64
        public var bytesReceived: UInt64
    }

    public init(pinDirectory: String) throws(KernelError) {
        flows = try BPFMap(pinned: "\(Datapath.mapDirectory(pinDirectory))/\(WEFT_MAP_FLOWS)")
        config = try BPFMap(pinned: "\(Datapath.mapDirectory(pinDirectory))/\(WEFT_MAP_TELEMETRY_CONFIG)")
        cpus = max(Int(libbpf_num_possible_cpus()), 1)
    }

    /// Is the kernel counting connections (MeshConfig telemetry.connectionCounters)?
    public func isCounting() throws(KernelError) -> Bool {
        ((try config.lookup(0)) ?? 0) & UInt32(WEFT_TELEMETRY_F_NO_FLOWS) == 0
    }

    /// Turns the counting on or off for new connections; returns whether it changed.
    @discardableResult
    public func setCounting(_ on: Bool) throws(KernelError) -> Bool {
        guard try isCounting() != on else { return false }
        try config.update(0, on ? 0 : UInt32(WEFT_TELEMETRY_F_NO_FLOWS))
        return true
    }

    public var capacity: Int { flows.capacity }

    /// Every flow's counters. A key the LRU evicts during the walk is skipped.
    public func read() throws(KernelError) -> [Flow] {
        var out: [Flow] = []
        var values = [weft_flow_stats](repeating: zeroed(), count: cpus)
        for key in try flows.keys() {
            var k = key
            let rc = values.withUnsafeMutableBytes { bpf_map_lookup_elem(flows.fd, &k, $0.baseAddress) }
            if rc == -ENOENT { continue }
            try KernelError.check(rc, "read per-CPU flow counters \(flows.path)")
            var f = Flow(source: IPv4Address(networkOrder: key.src_addr),
                         destination: key.dst_addr == 0 ? nil : IPv4Address(networkOrder: key.dst_addr),
                         vip: key.vip == 0 ? nil : IPv4Address(networkOrder: key.vip), port: UInt16(bigEndian: key.port),
                         opened: 0, failed: 0, closed: 0, bytesSent: 0, bytesReceived: 0)
            for v in values {
                f.opened &+= v.opened
                f.failed &+= v.failed
                f.closed &+= v.closed
                f.bytesSent &+= v.bytes_sent
                f.bytesReceived &+= v.bytes_received
            }
            out.append(f)
        }
        return out
    }
}
