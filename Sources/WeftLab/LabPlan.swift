import Foundation
import WeftCore

/// What a lab will create, computed from the manifests before anything is
/// touched: nodes with their pod subnets, pods with their namespaces and
/// cgroups. Every name carries the `weft` prefix.
///
/// Addressing: node k's pods live in 198.18.S.0/24 (S taken from its pods'
/// addresses, or the lowest free one), with the node's bridge at 198.18.S.1;
/// nodes meet on a fabric bridge as 198.18.0.S and route each other's pod
/// subnets. Nothing has a route off the machine.
public struct LabPlan: Codable, Sendable {
    public struct Node: Codable, Sendable {
        public var name: String
        public var subnet: UInt8          // S in 198.18.S.0/24
        public var netns: String
        public var cgroup: String         // the node's pod cgroup (the agent's --cgroup)
        public var agentCgroup: String
        public var agentPid: Int32?
        public var gateway: String { "198.18.\(subnet).1" }
        public var fabricAddress: String { "198.18.0.\(subnet)" }
    }

    public struct Pod: Codable, Sendable {
        public var name: String           // namespace/name
        public var node: String
        public var address: String
        public var netns: String
        public var hostVeth: String
        public var cgroup: String
        public var command: String?
        public var pid: Int32?
    }

    public var configDirectory: String
    public var cgroupRoot: String
    public var nodes: [Node]
    public var pods: [Pod]
    /// The agents' --cert-ttl (nil: their default).
    public var certTTL: String?
    /// Agents without a CA: no identities, no tunnels (plaintext between nodes).
    public var noMTLS: Bool?
    /// The agents' --proxy-threads (nil: their default, one per core).
    public var proxyThreads: Int?
    /// The agents' --proxy-pin-threads (nil: off).
    public var proxyPinThreads: Bool?

    public static let fabricNetns = "weft-fabric"
    public static let commandAnnotation = "lab.weft.dev/command"
    static let labPrefix = IPv4Prefix(address: IPv4Address(198 << 24 | 18 << 16), length: 16)

    public static func make(state: ClusterState, configDirectory: String, nodeCount: Int,
                            cgroupMount: String) throws(LabError) -> LabPlan {
        let cgroupRoot = "\(cgroupMount)/weft-lab"
        var nodeNames = (1...max(nodeCount, 1)).map { "n\($0)" }
        for w in state.workloads where !nodeNames.contains(w.node) { nodeNames.append(w.node) }

        // Each node's subnet comes from its pods; they must agree.
        var subnets: [String: UInt8] = [:]
        for w in state.workloads {
            let o = w.address.octets
            guard labPrefix.contains(w.address), o.2 != 0, o.3 > 1, o.3 < 255 else {
                throw LabError("Workload \(w.metadata.qualifiedName): address \(w.address) is outside the lab's pod range 198.18.1.2-198.18.254.254 (198.18.S.1 is node S's gateway)")
            }
            if let s = subnets[w.node], s != o.2 {
                throw LabError("Workload \(w.metadata.qualifiedName): node \(w.node) already has pods in 198.18.\(s).0/24; a lab node has one /24")
            }
            if let owner = subnets.first(where: { $0.value == o.2 && $0.key != w.node }) {
                throw LabError("Workload \(w.metadata.qualifiedName): 198.18.\(o.2).0/24 already belongs to node \(owner.key)")
            }
            subnets[w.node] = o.2
        }
        var free = (1...254).map(UInt8.init).filter { !subnets.values.contains($0) }.makeIterator()
        var nodes: [Node] = []
        for name in nodeNames {
            guard let subnet = subnets[name] ?? free.next() else { throw LabError("out of lab subnets") }
            nodes.append(Node(name: name, subnet: subnet, netns: "weft-\(name)", cgroup: "\(cgroupRoot)/\(name)",
                              agentCgroup: "\(cgroupMount)/weft-lab-agents/\(name)"))
        }
        var pods: [Pod] = []
        for (i, w) in state.workloads.enumerated() {
            let nodeCgroup = "\(cgroupRoot)/\(w.node)"
            let cgroup = w.cgroupPath.hasPrefix("/") ? w.cgroupPath : "\(nodeCgroup)/\(w.cgroupPath)"
            guard cgroup.hasPrefix(nodeCgroup + "/") else {
                throw LabError("Workload \(w.metadata.qualifiedName): cgroup \(cgroup) is not under its lab node's cgroup \(nodeCgroup); use a relative path")
            }
            pods.append(Pod(name: w.metadata.qualifiedName, node: w.node, address: w.address.description,
                            netns: "weft-pod-\(w.metadata.namespace)-\(w.metadata.name)", hostVeth: "weftp\(i)",
                            cgroup: cgroup, command: w.metadata.annotations[commandAnnotation]))
        }
        return LabPlan(configDirectory: configDirectory, cgroupRoot: cgroupRoot, nodes: nodes, pods: pods)
    }

    /// The iproute2 batches that build the network, in order: (netns to run
    /// in, or nil for the current one; lines of `ip -batch`).
    func networkBatches() -> [(netns: String?, lines: [String])] {
        var root = ["netns add \(Self.fabricNetns)"]
        root += nodes.map { "netns add \($0.netns)" }
        root += pods.map { "netns add \($0.netns)" }
        root += nodes.map { "link add weftf\($0.subnet) netns \(Self.fabricNetns) type veth peer name weftup0 netns \($0.netns)" }
        root += pods.compactMap { pod in
            nodes.first { $0.name == pod.node }.map {
                "link add \(pod.hostVeth) netns \($0.netns) type veth peer name weft0 netns \(pod.netns)"
            }
        }
        var batches: [(String?, [String])] = [(nil, root)]
        var fabric = ["link set lo up", "link add weftfab0 type bridge", "link set weftfab0 up"]
        fabric += nodes.map { "link set weftf\($0.subnet) master weftfab0 up" }
        batches.append((Self.fabricNetns, fabric))
        for node in nodes {
            var lines = ["link set lo up", "addr add \(node.fabricAddress)/24 dev weftup0", "link set weftup0 up",
                         "link add weftbr0 type bridge", "addr add \(node.gateway)/24 dev weftbr0", "link set weftbr0 up"]
            lines += nodes.filter { $0.name != node.name }.map { "route add 198.18.\($0.subnet).0/24 via \($0.fabricAddress)" }
            lines += pods.filter { $0.node == node.name }.map { "link set \($0.hostVeth) master weftbr0 up" }
            batches.append((node.netns, lines))
        }
        for pod in pods {
            guard let node = nodes.first(where: { $0.name == pod.node }) else { continue }
            batches.append((pod.netns, ["link set lo up", "addr add \(pod.address)/24 dev weft0", "link set weft0 up",
                                        "route add default via \(node.gateway)"]))
        }
        return batches
    }
}

public struct LabError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
