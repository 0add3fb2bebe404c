import CLibbpf
import Glibc
import WeftABI
import WeftCore

/// The kernel's connection counters (weft_flows): per (client pod,
/// destination, dialed address and port, TCP or UDP), summed over CPUs when
/// read.
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
        /// A UDP exchange's counters (opened and failed only), not a TCP
        /// connection's.
        public var udp: Bool
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

    /// Every flow's counters, read in batches of 4,096 keys (one syscall
    /// each rather than two per key); key by key where the kernel has no
    /// batch lookup for this map type.
    public func read() throws(KernelError) -> [Flow] {
        var out: [Flow] = []
        let batch = 4096
        var keys = [weft_flow_key](repeating: zeroed(), count: batch)
        var values = [weft_flow_stats](repeating: zeroed(), count: batch * cpus)
        var token = [UInt8](repeating: 0, count: 16), next = [UInt8](repeating: 0, count: 16)
        var first = true
        while true {
            var count = UInt32(batch)
            let rc = keys.withUnsafeMutableBytes { k in
                values.withUnsafeMutableBytes { v in
                    token.withUnsafeMutableBytes { t in
                        next.withUnsafeMutableBytes { n in
                            bpf_map_lookup_batch(flows.fd, first ? nil : t.baseAddress, n.baseAddress, k.baseAddress,
                                                 v.baseAddress, &count, nil)
                        }
                    }
                }
            }
            if rc != 0 && rc != -ENOENT {
                if first && (rc == -EINVAL || rc == -EOPNOTSUPP || rc == -ENOTSUP) { return try readEach() }
                try KernelError.check(rc, "batch-read flow counters \(flows.path)")
            }
            for i in 0..<Int(count) { out.append(flow(keys[i], values[(i * cpus)..<((i + 1) * cpus)])) }
            if rc == -ENOENT || count == 0 { return out }
            token = next
            first = false
        }
    }

    private func readEach() throws(KernelError) -> [Flow] {
        var out: [Flow] = []
        var values = [weft_flow_stats](repeating: zeroed(), count: cpus)
        for key in try flows.keys() {
            var k = key
            let rc = values.withUnsafeMutableBytes { bpf_map_lookup_elem(flows.fd, &k, $0.baseAddress) }
            if rc == -ENOENT { continue }  // evicted during the walk
            try KernelError.check(rc, "read per-CPU flow counters \(flows.path)")
            out.append(flow(key, values[...]))
        }
        return out
    }

    private func flow(_ key: weft_flow_key, _ perCPU: ArraySlice<weft_flow_stats>) -> Flow {
        var f = Flow(source: IPv4Address(networkOrder: key.src_addr),
                     destination: key.dst_addr == 0 ? nil : IPv4Address(networkOrder: key.dst_addr),
                     vip: key.vip == 0 ? nil : IPv4Address(networkOrder: key.vip), port: UInt16(bigEndian: key.port),
                     udp: key.proto == UInt8(IPPROTO_UDP), opened: 0, failed: 0, closed: 0, bytesSent: 0, bytesReceived: 0)
        for v in perCPU {
            f.opened &+= v.opened
            f.failed &+= v.failed
            f.closed &+= v.closed
            f.bytesSent &+= v.bytes_sent
            f.bytesReceived &+= v.bytes_received
        }
        return f
    }
}
