import CLibbpf
import WeftABI
import WeftCore

/// The service and backend maps, read and written in WeftCore's terms. The
/// conversion to and from the ABI structs happens here and nowhere else.
public final class ServiceMaps: Sendable {
    public let services: BPFMap<weft_service_key, weft_service_value>
    public let backends: BPFMap<UInt32, weft_backend>
    public let lbStats: PerCPUCounters
    /// The nodes' addresses, where node ports are dialed (ServiceTable.nodeAddresses).
    public let nodeAddresses: BPFMap<UInt32, UInt32>

    public init(pinDirectory: String) throws(KernelError) {
        let dir = Datapath.mapDirectory(pinDirectory)
        services = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_SERVICES)")
        backends = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_BACKENDS)")
        lbStats = try PerCPUCounters(pinned: "\(dir)/\(WEFT_MAP_LB_STATS)")
        nodeAddresses = try BPFMap(pinned: "\(dir)/\(WEFT_MAP_NODE_ADDRS)")
    }

    /// Makes weft_node_addrs hold `addresses` and nothing else; returns the
    /// writes it took (none when it held them already).
    @discardableResult
    public func setNodeAddresses(_ addresses: [IPv4Address]) throws(KernelError) -> Int {
        let want = Set(addresses.map(\.networkOrder))
        let have = Set(try nodeAddresses.entries().map(\.key))
        for gone in have.subtracting(want) { _ = try nodeAddresses.delete(gone) }
        for new in want.subtracting(have) { try nodeAddresses.update(new, 1) }
        return have.symmetricDifference(want).count
    }

    /// What the kernel holds now. Entries that do not decode (a protocol we
    /// never write) are returned as they are so a plan deletes them.
    public func snapshot() throws(KernelError) -> ServiceMapSnapshot {
        var snapshot = ServiceMapSnapshot()
        for (key, value) in try services.entries() {
            guard let k = Self.decode(key) else { continue }
            snapshot.slots[k] = .init(backendID: value.backend_id, serviceID: value.service_id,
                                      count: value.count, flags: value.flags)
        }
        for (id, backend) in try backends.entries() {
            guard let transport = TransportProtocol(ipProtocol: backend.proto) else { continue }
            snapshot.backends[id] = BackendAddress(address: IPv4Address(networkOrder: backend.addr),
                                                   port: UInt16(bigEndian: backend.port), transport: transport)
        }
        return snapshot
    }

    /// Carries out a plan's writes in order. Runs of puts to one map go in a
    /// single batch call (210,000 writes: one syscall per run instead of one
    /// per entry). Stops at the first failure and reports it; the next
    /// reconcile starts from what the kernel then holds.
    public func apply(_ writes: [ServiceMapWrite]) throws(KernelError) {
        var i = writes.startIndex
        while i < writes.endIndex {
            switch writes[i] {
            case .putBackend:
                var keys: [UInt32] = [], values: [weft_backend] = []
                while i < writes.endIndex, case .putBackend(let id, let address) = writes[i] {
                    var b = weft_backend()
                    b.addr = address.address.networkOrder
                    b.port = address.port.bigEndian
                    b.proto = address.transport.ipProtocol
                    keys.append(id)
                    values.append(b)
                    i += 1
                }
                try backends.updateBatch(keys, values)
            case .putSlot:
                var keys: [weft_service_key] = [], values: [weft_service_value] = []
                while i < writes.endIndex, case .putSlot(let key, let value) = writes[i] {
                    var v = weft_service_value()
                    v.backend_id = value.backendID
                    v.service_id = value.serviceID
                    v.count = value.count
                    v.flags = value.flags
                    keys.append(Self.encode(key))
                    values.append(v)
                    i += 1
                }
                try services.updateBatch(keys, values)
            case .deleteSlot(let key):
                try services.delete(Self.encode(key))
                i += 1
            case .deleteBackend(let id):
                try backends.delete(id)
                i += 1
            }
        }
    }

    static func encode(_ key: ServiceMapSnapshot.SlotKey) -> weft_service_key {
        var k = weft_service_key()
        k.vip = key.frontend.vip.networkOrder
        k.port = key.frontend.port.bigEndian
        k.proto = key.frontend.transport.ipProtocol
        k.slot = key.slot
        return k
    }

    static func decode(_ key: weft_service_key) -> ServiceMapSnapshot.SlotKey? {
        guard let transport = TransportProtocol(ipProtocol: key.proto) else { return nil }
        return .init(Frontend(vip: IPv4Address(networkOrder: key.vip), port: UInt16(bigEndian: key.port),
                              transport: transport), slot: key.slot)
    }

    /// The connect-time load balancer's event counters, by name.
    public func lbEvents() throws(KernelError) -> [(name: String, value: UInt64)] {
        let names: [(weft_lb_event, String)] = [
            (WEFT_LB_TRANSLATED, "translated"), (WEFT_LB_NO_BACKEND, "no_backend"),
            (WEFT_LB_SLOT_MISSING, "slot_missing"), (WEFT_LB_BACKEND_MISSING, "backend_missing"),
            (WEFT_LB_PEER_RESTORED, "peer_restored"),
            (WEFT_LB_PROXY_CAPTURED, "proxy_captured"),
            (WEFT_LB_PROXY_ORIGIN, "proxy_origin_recorded"),
            (WEFT_LB_AFFINITY_KEPT, "affinity_kept"), (WEFT_LB_AFFINITY_NEW, "affinity_new"),
        ]
        return try names.map { (event, name) throws(KernelError) in (name, try lbStats.sum(event.rawValue)) }
    }
}
