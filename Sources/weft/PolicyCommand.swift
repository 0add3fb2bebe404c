import ArgumentParser
import Foundation
import WeftCore
import WeftKernel

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy", abstract: "Ask the kernel's policy maps what they decide.",
        subcommands: [Check.self])

    /// `weft policy check`: the verdict for one connection, walked over the
    /// pinned maps exactly as the kernel walks them (bpf/lib/policy.h), and
    /// the policy rule that decided. Exit status 0 means allow, 3 deny.
    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Would a connection be allowed? Names the policy and rule that decided (exit 0 allow, 3 deny).")

        @Option(help: "Source: a pod as namespace/name, or an IP address.") var from: String
        @Option(help: "Destination: a pod as namespace/name, or an IP address.") var to: String
        @Option(help: "Destination port.") var port: Int
        @Option(help: "tcp, udp or sctp.") var proto = "tcp"
        @Option(help: "Node whose maps to read (default: the source pod's node, else any).") var node: String?
        @Option(name: .shortAndLong, help: "Output: text or json.") var output = "text"

        func run() throws {
            guard (1...65535).contains(port) else { throw ValidationError("--port must be 1-65535, got \(port)") }
            guard let transport = TransportProtocol(rawValue: proto.uppercased()) else {
                throw ValidationError("--proto must be tcp, udp or sctp, got \(proto)")
            }
            let candidates = try nodes(nil)
            guard let status = candidates.lazy.compactMap({ try? agentStatus(node: $0).get() }).first else {
                throw ValidationError("no agent is reachable on this machine")
            }
            let pods = Dictionary(status.workloads.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
            func endpoint(_ text: String, _ flag: String) throws -> (name: String, address: IPv4Address, node: String?) {
                if let ip = IPv4Address(text) {
                    let pod = status.workloads.first { $0.address == text }
                    return (pod?.name ?? text, ip, pod?.node)
                }
                guard let pod = pods[text], let ip = IPv4Address(pod.address) else {
                    throw ValidationError("--\(flag) \(text): no such pod (use namespace/name as `weft get workloads` shows) and not an IPv4 address")
                }
                return (pod.name, ip, pod.node)
            }
            let src = try endpoint(from, "from"), dst = try endpoint(to, "to")
            // Egress is judged on the client's node, ingress on the
            // destination's (which alone knows its own addresses), each from
            // that node's pinned maps when they are on this machine.
            func pinned(_ n: String?) -> String? { n.flatMap { candidates.contains($0) ? $0 : nil } }
            let egressNode = node ?? pinned(src.node) ?? status.node
            let ingressNode = node ?? pinned(dst.node) ?? egressNode
            var opened: [String: PolicyMaps] = [:]
            func maps(_ n: String) throws -> PolicyMaps {
                if let m = opened[n] { return m }
                let m = try PolicyMaps(pinDirectory: Datapath.defaultPinDirectory(node: n))
                opened[n] = m
                return m
            }
            let names = status.policyNames

            func judge(_ direction: NetworkPolicy.Direction, local: (name: String, address: IPv4Address, node: String?),
                       peer: IPv4Address, isMeshSource: Bool) throws -> (allowed: Bool, why: String) {
                let maps = try maps(direction == .egress ? egressNode : ingressNode)
                if local.address == peer || peer.value >> 24 == 127 {
                    return (true, "a pod's traffic to itself is always allowed")
                }
                guard let ep = try maps.endpoint(local.address) else {
                    return (true, "\(local.name) is not a mesh pod: no \(direction.rawValue.lowercased()) policy applies")
                }
                if direction == .egress && !isMeshSource {
                    return (true, "not judged")
                }
                guard ep.isolated(direction) else {
                    return (true, "\(local.name) is not isolated for \(direction.rawValue.lowercased()) (no policy with \(direction.rawValue) selects it)")
                }
                let p = try maps.peer(peer)
                if p.identity == ReservedIdentity.host {
                    return (true, "\(peer) is an address of \(local.name)'s own node: always allowed")
                }
                if let rule = try maps.allowingRule(local: ep, direction: direction, peer: p,
                                                    proto: transport.ipProtocol, port: UInt16(port)) {
                    let ref = names.rules["\(rule)"]?.description ?? "rule \(rule)"
                    return (true, "allowed by \(ref)")
                }
                let by = (names.isolatedBy["\(ep.identity)"]?[direction.rawValue] ?? []).joined(separator: ", ")
                return (false, "denied: \(local.name) is isolated for \(direction.rawValue.lowercased()) by \(by.isEmpty ? "a policy" : by), and no rule allows this peer, port and protocol")
            }
            let srcIsMesh = try maps(egressNode).endpoint(src.address) != nil && src.node != nil
            let egress = try judge(.egress, local: src, peer: dst.address, isMeshSource: srcIsMesh)
            let ingress = try judge(.ingress, local: dst, peer: src.address, isMeshSource: srcIsMesh)
            // AuthorizationPolicy, as the destination's kernel judges a
            // plaintext TCP flow (what comes through a tunnel, its proxy judges).
            var authz: (allowed: Bool, why: String)?
            let tunnelled = try srcIsMesh && src.node != dst.node && maps(egressNode).endpoint(dst.address)?.tunnel == true
            if transport == .tcp, tunnelled, try maps(ingressNode).endpoint(dst.address)?.authz == true {
                authz = (true, "through the mTLS tunnel: node \(dst.node ?? ingressNode)'s proxy decides, on the source's certificate (not judged here)")
            } else if transport == .tcp, let ep = try maps(ingressNode).endpoint(dst.address), ep.authz {
                let (ok, rule) = try maps(ingressNode).authorization(local: ep, source: src.address, port: UInt16(port))
                let by = rule.flatMap { names.rules["\($0)"].map { "\($0)" } } ?? (rule == 0 ? "no ALLOW policy applies" : nil)
                authz = (ok, ok ? "allowed" + (by.map { " by \($0)" } ?? "")
                         : "denied" + (by.map { " by DENY \($0)" } ?? ": no ALLOW rule matches this source and port"))
            }
            let allowed = egress.allowed && ingress.allowed && (authz?.allowed ?? true)
            let target = "\(src.name) -> \(dst.name):\(port)/\(transport.rawValue)"
            if output == "json" {
                let obj: [String: Any] = ["allowed": allowed, "from": src.name, "to": dst.name, "port": port,
                                          "protocol": transport.rawValue, "egressNode": egressNode, "ingressNode": ingressNode,
                                          "egress": egress.why, "ingress": ingress.why, "authorization": authz?.why ?? "no AuthorizationPolicy applies"]
                let data = try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys])
                print(String(decoding: data, as: UTF8.self))
            } else {
                print("\(allowed ? "ALLOW" : "DENY")  \(target)  (egress from node \(egressNode)'s maps, ingress from node \(ingressNode)'s)")
                print("  egress:  \(egress.why)")
                print("  ingress: \(ingress.why)")
                if let authz { print("  authorization: " + (tunnelled ? authz.why : "(plaintext TCP, in node \(ingressNode)'s kernel) \(authz.why)")) }
            }
            if !allowed { throw ExitCode(3) }
        }
    }
}
