import ArgumentParser
import Foundation
import WeftCore
import WeftStatus
import WeftKernel
import WeftLab

/// The nodes whose pins exist on this machine, or the one asked for.
func nodes(_ node: String?) throws -> [String] {
    if let node { return [node] }
    let found = ((try? FileManager.default.contentsOfDirectory(atPath: "\(Host.bpffsRoot)/weft")) ?? []).sorted()
    guard !found.isEmpty else { throw ValidationError("no weft datapath is pinned under \(Host.bpffsRoot)/weft; is an agent running?") }
    return found
}

func agentStatus(node: String) -> Result<AgentStatus, UnixHTTP.Failure> {
    Result { () throws(UnixHTTP.Failure) -> String in
        try UnixHTTP.get(socket: "/run/weft/\(node)/agent.sock", path: "/status")
    }.flatMap { body in
        (try? JSONDecoder().decode(AgentStatus.self, from: Data(body.utf8))).map(Result.success)
            ?? .failure(UnixHTTP.Failure(description: "agent sent an unreadable status"))
    }
}

/// A frontend's slots as shown: each backend once, with "xN/total" when a
/// TCPRoute's or UDPRoute's split gives it N of the slots.
func shownSlots(_ backends: [String]) -> [String] {
    var order: [String] = []
    var slots: [String: Int] = [:]
    for b in backends {
        if slots[b] == nil { order.append(b) }
        slots[b, default: 0] += 1
    }
    return order.map { b in slots[b, default: 1] > 1 ? "\(b) x\(slots[b, default: 1])/\(backends.count)" : b }
}

/// A Service port as the kernel serves it: its frontend ("vip:port/proto"),
/// the agent's name for it ("namespace/name:port", a split's route after
/// it) and its slots' backends.
struct KernelPort {
    var frontend: String
    var name: String
    var backends: [String]
}

/// The Service ports in `node`'s pinned maps, named by its agent.
func kernelPorts(node: String) throws -> [KernelPort] {
    let snapshot = try ServiceMaps(pinDirectory: Datapath.defaultPinDirectory(node: node)).snapshot()
    let status = try agentStatus(node: node).get()
    let names = Dictionary(status.services.map { ($0.frontend, $0.name) }, uniquingKeysWith: { a, _ in a })
    return snapshot.frontends.map { f in
        KernelPort(frontend: f.frontend.description, name: names[f.frontend.description] ?? "?",
                   backends: f.backends.map { $0?.description ?? "(missing)" })
    }
}

func table(_ rows: [[String]]) -> String {
    guard let header = rows.first else { return "" }
    let widths = header.indices.map { i in rows.map { $0.count > i ? $0[i].count : 0 }.max() ?? 0 }
    return rows.map { row in
        row.enumerated().map { i, cell in i == row.count - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  ")
    }.joined(separator: "\n")
}

struct GetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get", abstract: "Show what is in force: services (from the pinned maps), workloads, policies, routes or nodes.")

    enum Kind: String, ExpressibleByArgument, CaseIterable { case services, workloads, policies, routes, nodes }

    @Argument(help: "services | workloads | policies | routes | nodes") var kind: Kind
    @Option(help: "Node to read (default: every node pinned on this machine).") var node: String?
    @Option(name: .shortAndLong, help: "Output: table or json.") var output = "table"

    func run() throws {
        var json: [[String: Any]] = []
        var rows: [[String]] = []
        for node in try nodes(node) {
            let maps = try ServiceMaps(pinDirectory: Datapath.defaultPinDirectory(node: node))
            let snapshot = try maps.snapshot()
            let status = try? agentStatus(node: node).get()
            switch kind {
            case .services:
                let names = Dictionary((status?.services ?? []).map { ($0.frontend, $0.name) }, uniquingKeysWith: { a, _ in a })
                if rows.isEmpty { rows.append(["NODE", "SERVICE", "FRONTEND", "BACKENDS"]) }
                for f in snapshot.frontends {
                    let backends = f.backends.map { $0?.description ?? "(missing)" }
                    let name = names[f.frontend.description] ?? (status == nil ? "? (agent unreachable)" : "? (not in agent's config)")
                    let frontend = f.frontend.description + (f.affinityTimeout.map { " (ClientIP affinity \($0)s)" } ?? "")
                    let shown = shownSlots(backends)
                    rows.append([node, name, frontend, backends.isEmpty ? "none (connect fails: ECONNREFUSED)" : shown.joined(separator: ", ")])
                    var entry: [String: Any] = ["node": node, "service": name, "frontend": f.frontend.description,
                                                "serviceID": f.serviceID, "backends": backends]
                    if let seconds = f.affinityTimeout { entry["sessionAffinityTimeoutSeconds"] = Int(seconds) }
                    json.append(entry)
                }
            case .workloads:
                guard let status else { throw ValidationError("workloads come from the agent, and agent \(node) is not reachable") }
                let inKernel = Set(snapshot.backends.values.map(\.address.description))
                if rows.isEmpty { rows.append(["NODE", "WORKLOAD", "ON", "ADDRESS", "SERVICEACCOUNT", "BACKEND-IN-KERNEL", "LABELS"]) }
                for w in status.workloads {
                    let labels = w.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
                    rows.append([node, w.name, w.node, w.address, w.serviceAccount, inKernel.contains(w.address) ? "yes" : "no", labels])
                    json.append(["node": node, "workload": w.name, "on": w.node, "address": w.address,
                                 "serviceAccount": w.serviceAccount, "backendInKernel": inKernel.contains(w.address), "labels": w.labels])
                }
            case .policies:
                guard let status else { throw ValidationError("policies come from the agent, and agent \(node) is not reachable") }
                let kernel = try PolicyMaps(pinDirectory: Datapath.defaultPinDirectory(node: node)).snapshot()
                var entriesByRule: [String: Int] = [:]
                for rule in kernel.entries.values { entriesByRule["\(rule)", default: 0] += 1 }
                if rows.isEmpty { rows.append(["NODE", "POLICY", "POD-SELECTOR", "TYPES", "SELECTS", "RULES", "KERNEL-ENTRIES"]) }
                for p in status.policies {
                    let ruleIDs = status.policyNames.rules.filter { $0.value.policy == p.name }.map(\.key)
                    let entries = ruleIDs.reduce(0) { $0 + (entriesByRule[$1] ?? 0) }
                    rows.append([node, p.name, p.podSelector, p.policyTypes.joined(separator: ","),
                                 p.selectedPods.isEmpty ? "(no pods)" : p.selectedPods.joined(separator: ","),
                                 "\(p.ingressRules) in, \(p.egressRules) out", "\(entries)"])
                    json.append(["node": node, "policy": p.name, "podSelector": p.podSelector, "policyTypes": p.policyTypes,
                                 "selectedPods": p.selectedPods, "ingressRules": p.ingressRules, "egressRules": p.egressRules,
                                 "kernelEntries": entries])
                }
                if output != "json" && !status.policies.isEmpty {
                    rows.append(["", "", "", "", "", "kernel total:", "\(kernel.entries.count) allow(s), \(kernel.endpoints.count) endpoint(s), \(kernel.cidrClasses.count) ipBlock region(s)"])
                }
            case .nodes:
                // Each node with an agent here: its zone (PreferSameZone) and its pods.
                if rows.isEmpty { rows.append(["NODE", "AGENT", "ZONE", "WORKLOADS"]) }
                let on = status.map { s in s.workloads.filter { $0.node == node }.count }
                rows.append([node, status.map { "running, pid \($0.pid)" } ?? "not reachable", status?.zone ?? "-",
                             on.map { "\($0)" } ?? "?"])
                var entry: [String: Any] = ["node": node, "agent": status != nil]
                if let zone = status?.zone { entry["zone"] = zone }
                if let on { entry["workloads"] = on }
                json.append(entry)
            case .routes:
                guard let status else { throw ValidationError("routes come from the agent, and agent \(node) is not reachable") }
                if rows.isEmpty { rows.append(["NODE", "KIND", "ROUTE", "PARENTS", "RULES", "BACKENDS"]) }
                for r in status.routes {
                    let kind = r.kind ?? "HTTPRoute"
                    let ignored = r.conflicted.map { " (IGNORED on \($0.joined(separator: ",")): a GRPCRoute attaches there)" } ?? ""
                    // (A TLSRoute's server names follow its parents: "ns/svc for a.example,*.b.example".)
                    let names = r.hostnames.map { " for " + $0.joined(separator: ",") } ?? ""
                    // A parent in another namespace: a consumer route, for its own namespace's clients (GEP-1294).
                    let home = r.name.split(separator: "/").first.map(String.init) ?? ""
                    let consumer = r.parents.contains { !$0.hasPrefix(home + "/") }
                    rows.append([node, kind, r.name + (consumer ? " (consumer)" : ""), r.parents.joined(separator: ",") + names, "\(r.rules)",
                                 r.backends.joined(separator: ", ") + ignored])
                    json.append(["node": node, "kind": kind, "route": r.name, "parents": r.parents, "rules": r.rules, "backends": r.backends,
                                 "conflicted": r.conflicted ?? [], "hostnames": r.hostnames ?? [], "consumer": consumer])
                }
            }
        }
        if output == "json" {
            let data = try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(rows.count <= 1 ? "no \(kind.rawValue) in force" : table(rows))
        }
    }
}

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show each agent's config generation, errors, programs and map fill.")

    @Option(help: "Node to read (default: every node pinned on this machine).") var node: String?

    func run() throws {
        var healthy = true
        for node in try nodes(node) {
            let pins = Datapath.defaultPinDirectory(node: node)
            let maps = try? ServiceMaps(pinDirectory: pins)
            let snapshot = try? maps?.snapshot()
            print("node \(node)")
            print("  pins:       \(pins)")
            if let snapshot {
                print("  kernel:     \(snapshot.frontends.count) service port(s), \(snapshot.backends.count) backend(s) in the pinned maps")
            }
            if let events = try? maps?.lbEvents() {
                print("  lb events:  " + events.map { "\($0.name)=\($0.value)" }.joined(separator: " "))
            }
            switch agentStatus(node: node) {
            case .failure(let error):
                healthy = false
                print("  agent:      NOT RUNNING (\(error)); the pinned datapath stays in force")
            case .success(let s):
                print("  agent:      running, pid \(s.pid), version \(s.version ?? "unknown"), config \(s.configDirectory), cgroup \(s.cgroup)")
                let when = Date(timeIntervalSince1970: s.appliedAt).formatted(.iso8601)
                print("  generation: \(s.generation), in force since \(when); last reconcile \(s.lastWrites) map write(s) in \(String(format: "%.1f", s.lastReconcileSeconds * 1000)) ms")
                if !s.lastReconcilePhases.isEmpty {
                    let order = ["load", "policy", "policy-write", "table", "plan", "write", "status"]
                    print("  phases:     " + order.compactMap { k in s.lastReconcilePhases[k].map { "\(k) \(String(format: "%.1f", $0)) ms" } }
                        .joined(separator: ", "))
                }
                print("  zone:       " + (s.zone.map { "\($0) (its Node manifest's topology.kubernetes.io/zone)" }
                    ?? "none (no Node manifest with a zone label): PreferSameZone prefers nothing here"))
                if let p = s.proxy {
                    let gen = p.generation.map { "\($0)" } ?? "unknown"
                    print("  proxy:      \(p.pid.map { "pid \($0)" } ?? "NOT RUNNING"), listening on \(p.listen), restarts \(p.restarts), route table generation \(gen), \(p.frontends.count) captured service port(s)")
                    if p.sameBuild == false {
                        print("              runs another build of weft than this agent (one from before an upgrade): replace it with SIGUSR2 to the agent (a rolling restart)")
                    }
                } else {
                    print("  proxy:      none (--proxy-address none): every Service port is balanced in the kernel")
                }
                if let sc = s.shortcut {
                    var line = "  shortcut:   \(sc.state)"
                    if let reason = sc.reason { line += " (\(reason))" }
                    if sc.state == "on" {
                        let redirected = sc.events?["bytes_redirected"] ?? 0
                        let spliced = sc.events?["bytes_spliced"] ?? 0
                        line += ": \(sc.sockets ?? 0) socket(s) on it, \(redirected) bytes redirected"
                            + (sc.splice == false ? " (splicing past the proxy off)" : " (\(spliced) spliced past the proxy)")
                            + "; receivers: "
                            + (sc.proxyReceives ? "the proxy" : "not the proxy")
                            + ", \(sc.receivers.count) pod(s) (podReceivers \(sc.podReceivers ?? "Annotated"))"
                    }
                    print(line)
                }
                if let ids = s.identities {
                    let soonest = ids.map(\.notAfter).min().map { Date(timeIntervalSince1970: $0) }
                    print("  identity:   trust domain \(s.trustDomain ?? "?"), \(ids.count) certificate(s)"
                          + (soonest.map { ", next expiry \(ISO8601DateFormatter().string(from: $0)) (renewed at half-life)" } ?? ""))
                } else {
                    print("  identity:   none (no --ca): traffic between nodes is not tunnelled")
                }
                if let h = s.health {
                    var line = "  health:     \(h.probes) probe(s), \(h.probeFailures) failed; failing: "
                    line += h.failing.isEmpty ? "none" : h.failing.joined(separator: ", ")
                    if !h.ejected.isEmpty { line += "; ejected by the proxy: " + h.ejected.joined(separator: ", ") }
                    if !h.panic.isEmpty { line += "; PANIC (every backend used): " + h.panic.joined(separator: ", ") }
                    print(line)
                }
                print("  programs:   " + s.programs.map { "\($0.name) (\($0.state), id \($0.programID))" }.joined(separator: ", "))
                if s.configErrors.isEmpty {
                    print("  config:     ok")
                } else {
                    healthy = false
                    print("  config:     REFUSED, generation \(s.generation) stays in force:")
                    for e in s.configErrors { print("    \(e)") }
                }
            }
        }
        if !healthy { throw ExitCode(1) }
    }
}
