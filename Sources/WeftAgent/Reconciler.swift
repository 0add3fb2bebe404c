import Foundation
import Logging
import Synchronization
import WeftStatus
import WeftCore
import WeftKernel

/// The one path from config to kernel: read the manifests, validate the set
/// whole, compute the desired service table, diff it against what the maps
/// hold, write the difference in a safe order. A refused set changes nothing.
final class Reconciler {
    private let configuration: AgentConfiguration
    private let maps: ServiceMaps
    private let policyMaps: PolicyMaps
    /// The node's pod cgroup (the agent's --cgroup); Workload cgroups are relative to it.
    private let nodeCgroup: String
    private var compiler = PolicyCompiler()
    /// What the kernel's policy maps hold, as of the last successful write.
    private var appliedPolicy: PolicyMapContents
    private var identitiesAdopted = false
    /// What the last policy compile read, and what it gave: a change that
    /// touches only Services (the common case) compiles nothing.
    private var lastPolicyInputs: (workloads: [Workload], policies: [NetworkPolicy], namespaces: [String: Namespace],
                                   authorization: [AuthorizationPolicy])?
    private var lastPolicyTable = PolicyTable()
    /// HTTPRoutes a GRPCRoute displaced, as last logged (logged on change).
    private var loggedConflicts: [String: [String]] = [:]
    /// Local pods whose cgroup directory is missing; see AgentStatus.missingCgroups.
    private(set) var missingCgroups: [String] = []
    private let cache = ManifestCache()
    private let logger: Logger
    let status: SharedStatus
    /// What the kernel's service maps hold, as of the last successful write.
    private var applied: ServiceMapIndex
    /// The table those maps were planned from; nil forces a full plan.
    private var lastTable: ServiceTable?
    private var inForce: ClusterState?
    var inForceState: ClusterState? { inForce }
    /// Set when a write failed part-way: the next pass re-reads the kernel.
    private var kernelUncertain = false

    /// The node proxy, if this agent runs one.
    private let proxy: ProxySupervisor?
    private let shortcut: ShortcutController
    /// The kernel's connection counters and their switch.
    private let flows: FlowMaps?
    /// Active health checks; their verdicts and the proxy's ejections
    /// shape both the kernel's service maps and the proxy's table.
    let healthChecker: HealthChecker?
    /// Workload certificates for this node's identities (with --ca).
    let identities: IdentityIssuer?
    /// Backends the proxy reports ejected (see pollEjections).
    private var ejected: Set<BackendAddress> = []
    private var lastHealth = EndpointHealth()
    /// Whether any TrafficPolicy asks for outlier detection: then the agent
    /// asks the proxy for its ejections every second.
    private(set) var wantsEjections = false

    init(configuration: AgentConfiguration, maps: ServiceMaps, policyMaps: PolicyMaps, nodeCgroup: String,
         status: SharedStatus, proxy: ProxySupervisor?, shortcut: ShortcutController, flows: FlowMaps? = nil,
         healthChecker: HealthChecker? = nil, identities: IdentityIssuer? = nil, logger: Logger) throws {
        self.configuration = configuration
        self.identities = identities
        self.healthChecker = healthChecker
        self.flows = flows
        self.proxy = proxy
        self.shortcut = shortcut
        self.maps = maps
        self.policyMaps = policyMaps
        self.nodeCgroup = nodeCgroup
        self.appliedPolicy = try policyMaps.snapshot()
        self.status = status
        self.logger = logger
        // Adopt: start from what the pinned maps hold (a previous agent's
        // work), so an unchanged config writes nothing.
        self.applied = ServiceMapIndex(try maps.snapshot())
    }

    /// Entries currently in the service and backend maps.
    var mapFill: MapFill {
        MapFill(services: applied.snapshot.slots.count, backends: applied.snapshot.backends.count,
                endpoints: appliedPolicy.endpoints.count, cgroups: appliedPolicy.cgroups.count,
                cidrClasses: appliedPolicy.cidrClasses.count,
                policyEntries: appliedPolicy.entries.keys.count { !$0.isRange },
                policyRanges: appliedPolicy.entries.keys.count { $0.isRange })
    }

    /// Looks again for the local pods' cgroups that were missing, and writes
    /// only weft_cgroups if some appeared — not a whole reconcile, which at
    /// 10,000 Services would cost a third of a second every second.
    func refreshCgroups() {
        guard !missingCgroups.isEmpty, let state = inForce, !kernelUncertain else { return }
        let (cgroups, missing) = localCgroups(state)
        guard missing != missingCgroups else { return }
        var desired = appliedPolicy
        desired.cgroups = cgroups
        do {
            try policyMaps.apply(PolicyMapPlan(from: appliedPolicy, to: desired))
            appliedPolicy = desired
            missingCgroups = missing
            status.withLock { $0.missingCgroups = missing }
            logger.info("pod cgroups appeared", metadata: ["still_missing": "\(missing.count)"])
        } catch {
            kernelUncertain = true
            logger.error("writing weft_cgroups failed: \(error); the next reconcile starts from the kernel's state")
        }
    }

    /// The cgroup id of every local pod whose cgroup exists (the kernel's
    /// bpf_get_current_cgroup_id() is the directory's inode number).
    /// Relative paths are looked up from the node cgroup's directory, held
    /// open for the pass: with thousands of local pods, walking the whole
    /// path from / for each was most of the reconcile's time.
    private func localCgroups(_ state: ClusterState) -> (ids: [UInt64: IPv4Address], missing: [String]) {
        var ids: [UInt64: IPv4Address] = [:]
        var missing: [String] = []
        let base = Host.CgroupDirectory(nodeCgroup)
        for w in state.workloads where w.node == configuration.node {
            let path = w.cgroupPath
            let id = path.hasPrefix("/") ? Host.cgroupID(path) : base.cgroupID(path)
            if let id { ids[id] = w.address } else { missing.append(w.metadata.qualifiedName) }
        }
        return (ids, missing)
    }

    enum Outcome {
        /// The config set is in force (possibly with nothing to write).
        case inForce
        /// The config set was refused; the previous one stays. Wait for the next file change.
        case refused
        /// Writing the maps failed; retry from the kernel's state.
        case kernelFailed
    }

    /// The proxy's pid, restarts and captured frontends, for /status.
    func publishProxyStatus() {
        guard let proxy else { return }
        let generation = try? proxy.reportedGeneration()
        let frontends = (proxy.lastTable?.frontends.keys).map { Array($0).sorted() } ?? []
        // Whether it runs this agent's executable (an adopted proxy may run
        // the build before an upgrade); unknown under a profiling wrapper.
        let sameBuild = proxy.current.flatMap { current in
            ProxySupervisor.wrapper == nil ? Build.executable(of: current.pid).map { $0 == Build.executable() } : nil
        }
        status.withLock {
            $0.proxy = AgentStatus.ProxyStatus(pid: proxy.current?.pid, listen: "\(proxy.listen.address):\(proxy.listen.port)",
                                               restarts: proxy.restarts, generation: generation ?? nil, frontends: frontends)
            $0.proxy?.sameBuild = sameBuild
        }
    }

    @discardableResult
    func reconcile() -> Outcome {
        let start = ContinuousClock.now
        var phases: [(String, ContinuousClock.Instant)] = [("start", start)]
        func mark(_ name: String) { phases.append((name, .now)) }
        let state: ClusterState
        switch cache.load(directory: configuration.configDirectory) {
        case .failure(let errors):
            for error in errors.errors { logger.error("config refused: \(error)") }
            logger.error("config refused: \(errors.errors.count) error(s); generation \(status.withLock { $0.generation }) stays in force")
            status.withLock { $0.configErrors = errors.errors.map(\.description) }
            return .refused
        case .success(let s):
            state = s
        }
        do {
            if kernelUncertain {
                applied = ServiceMapIndex(try maps.snapshot())
                appliedPolicy = try policyMaps.snapshot()
                lastTable = nil
                kernelUncertain = false
            }
            mark("load")
            // Policy before services: a new pod is isolated before any
            // Service can send it traffic.
            if !identitiesAdopted {
                compiler.adopt(endpoints: appliedPolicy.endpoints, cidrClasses: appliedPolicy.cidrClasses, state: state)
                identitiesAdopted = true
            }
            let policyTable: PolicyTable
            compiler.trustDomain = identities?.trustDomain
            compiler.node = configuration.node
            if let last = lastPolicyInputs, last.workloads == state.workloads,
               last.policies == state.networkPolicies, last.namespaces == state.namespaces,
               last.authorization == state.authorizationPolicies {
                policyTable = lastPolicyTable
            } else {
                policyTable = compiler.compile(state)
                lastPolicyInputs = (state.workloads, state.networkPolicies, state.namespaces, state.authorizationPolicies)
                lastPolicyTable = policyTable
            }
            let (cgroups, missing) = localCgroups(state)
            if missing != missingCgroups, !missing.isEmpty {
                logger.warning("pod cgroups missing; their connects are judged only at the destination until they appear",
                               metadata: ["pods": "\(missing.joined(separator: ", "))"])
            }
            missingCgroups = missing
            var desiredPolicy = PolicyMapContents(policyTable, cgroups: cgroups, hostAddresses: Host.localIPv4Addresses())
            desiredPolicy.markMTLS(state, node: configuration.node, tunnels: identities != nil && proxy != nil)
            let policyPlan = PolicyMapPlan(from: appliedPolicy, to: desiredPolicy)
            mark("policy")
            do {
                try policyMaps.apply(policyPlan)
            } catch {
                kernelUncertain = true
                throw error
            }
            appliedPolicy = desiredPolicy
            if try policyMaps.setUDPIdleTimeout(state.meshConfig.policy.udpIdleTimeout) {
                logger.notice("UDP exchanges are forgotten after \(state.meshConfig.policy.udpIdleTimeout) idle")
            }
            mark("policy-write")
            let shortcutWrites = try shortcut.apply(state, node: configuration.node, proxyAddress: proxy?.listen.address)
            status.withLock { $0.shortcut = shortcut.status }
            if try flows?.setCounting(state.meshConfig.telemetry.connectionCounters) == true {
                logger.notice("connection counters switched \(state.meshConfig.telemetry.connectionCounters ? "on" : "off")")
            }
            issueIdentities(state)
            healthChecker?.update(HealthChecker.targets(state, node: configuration.node, tunnels: identities != nil && proxy != nil))
            wantsEjections = proxy != nil && state.trafficPolicies.contains { $0.outlierDetection != nil }
            if !wantsEjections { ejected = [] }
            let health = EndpointHealth(failing: healthChecker?.failing ?? [:], ejected: ejected)
            let table = ServiceTable(state, health: health, node: configuration.node)
            mark("table")
            let changed = inForce != state || health != lastHealth
            let generation = UInt64(status.withLock { changed || $0.generation == 0 ? $0.generation + 1 : $0.generation })
            // The proxy learns a frontend before the kernel captures it, and
            // forgets one only after the kernel stopped: until the service
            // maps are written it gets the union of old and new frontends.
            var proxyTable: ProxyTable?
            // A generation-only hand-over (the table as the proxy has it)
            // carries nothing the kernel's new entries depend on: it is
            // confirmed after the map writes, off the path to them.
            var confirmAfterWrites = false
            if let proxy {
                var desired = ProxyTable(state, generation: generation, health: health, node: configuration.node)
                if identities != nil {
                    desired.tunnel = .init(plaintext: Set(state.workloads.filter {
                        $0.node != configuration.node && state.mtlsMode($0) == .disable
                    }.map(\.address.description)))
                }
                var union = desired
                for (key, old) in proxy.lastTable?.frontends ?? [:] where union.frontends[key] == nil {
                    union.frontends[key] = old
                    for action in old.actions {
                        for b in action.backends where union.clusters[b.cluster] == nil {
                            union.clusters[b.cluster] = proxy.lastTable?.clusters[b.cluster]
                        }
                    }
                    if union.clusters[old.cluster] == nil { union.clusters[old.cluster] = proxy.lastTable?.clusters[old.cluster] }
                }
                mark("proxy-table")
                switch proxy.install(union) {
                case .none: break
                case .generation: confirmAfterWrites = true
                case .table:
                    if !proxy.waitForGeneration(generation) {
                        logger.warning("the proxy has not confirmed route table generation \(generation) within 500 ms")
                    }
                }
                proxyTable = desired
                mark("proxy")
            }
            // Only frontends whose backends changed are planned; the first pass
            // (adoption) compares everything against what the kernel holds.
            // Planned in place: if a write then fails, the next pass rebuilds
            // the index from the kernel (kernelUncertain), so nothing is lost.
            let writes = ServiceMapPlanner.plan(desired: table, index: &applied,
                                                only: lastTable.map { table.changedFrontends(since: $0) })
            mark("plan")
            do {
                try maps.apply(writes)
                // (Where node ports are dialed: a few entries, read each time.)
                try maps.setNodeAddresses(table.nodeAddresses)
                mark("write")
                if confirmAfterWrites, let proxy {
                    if !proxy.waitForGeneration(generation) {
                        logger.warning("the proxy has not confirmed route table generation \(generation) within 500 ms")
                    }
                    mark("proxy-confirm")
                }
            } catch {
                kernelUncertain = true
                throw error
            }
            lastTable = table
            if let proxy, let proxyTable {
                proxy.install(proxyTable)  // (the frontends the kernel no longer captures leave)
            }
            let seconds = (ContinuousClock.now - start).seconds
            inForce = state
            lastHealth = health
            publishHealth(health, table: table, state: state)
            status.withLock { s in
                if changed || s.generation == 0 {
                    s.generation += 1
                    s.appliedAt = Date().timeIntervalSince1970
                }
                s.configErrors = []
                s.lastWrites = writes.count + policyPlan.count + shortcutWrites
                s.missingCgroups = missing
                s.lastReconcileSeconds = seconds
            }
            status.setInForce(table: table, config: state, policy: policyTable)
            let conflicted = state.httpRoutes.contains { $0.kind == .grpc } ? ProxyTable.conflictedRoutes(state) : [:]
            if conflicted != loggedConflicts {
                for (route, ports) in conflicted.sorted(by: { $0.key < $1.key }) {
                    logger.warning("\(route) is ignored on \(ports.joined(separator: ", ")): a GRPCRoute attaches there (one route type per Service port, GRPCRoute first)")
                }
                loggedConflicts = conflicted
            }
            status.withLock { s in
                s.routes = state.httpRoutes.map { r in
                    AgentStatus.RouteStatus(
                        name: r.metadata.qualifiedName,
                        parents: r.parentRefs.map(\.description),
                        rules: r.rules.count,
                        backends: r.rules.flatMap { $0.backendRefs.map(\.shown) },
                        kind: r.kind.rawValue,
                        conflicted: conflicted["\(r.kind.rawValue) \(r.metadata.qualifiedName)"])
                } + state.l4Routes.map { r in
                    AgentStatus.RouteStatus(
                        name: r.metadata.qualifiedName, parents: r.parentRefs.map(\.description), rules: 1,
                        backends: r.backendRefs.map(\.shown),
                        kind: r.kind.rawValue, hostnames: r.hostnames.isEmpty ? nil : r.hostnames)
                }
            }
            publishProxyStatus()
            mark("status")
            let phaseMillis = Dictionary(uniqueKeysWithValues: zip(phases.dropFirst(), phases).map {
                ($0.0.0, ($0.0.1 - $0.1.1).seconds * 1000)
            })
            status.withLock { $0.lastReconcilePhases = phaseMillis }
            logger.debug("reconcile phases", metadata: Logger.Metadata(uniqueKeysWithValues: phaseMillis.map {
                ($0.key, .string(String(format: "%.1fms", $0.value)))
            }))
            if !writes.isEmpty || !policyPlan.isEmpty || changed {
                logger.info("config in force", metadata: [
                    "generation": "\(status.withLock { $0.generation })", "services": "\(state.services.count)",
                    "workloads": "\(state.workloads.count)", "policies": "\(state.networkPolicies.count)",
                    "policy_entries": "\(policyTable.entries.count)", "map_writes": "\(writes.count + policyPlan.count)",
                    "seconds": "\(String(format: "%.4f", seconds))",
                ])
            }
            return .inForce
        } catch {
            logger.error("writing the service or policy maps failed: \(error); will retry from the kernel's state")
            status.withLock { $0.configErrors = ["kernel: \(error)"] }
            return .kernelFailed
        }
    }
}

extension Reconciler {
    /// Certificates for the identities of this node's pods: new ones for
    /// new identities, renewals past half-life; the proxy is told.
    func issueIdentities(_ state: ClusterState? = nil) {
        guard let identities, let state = state ?? inForceState else { return }
        do {
            if try identities.update(identities.localIdentities(state, node: configuration.node)) {
                proxy?.installIdentities(identities.bundle)
            }
        } catch {
            logger.error("issuing workload certificates failed: \(error)")
        }
        status.withLock {
            $0.identities = identities.summary
            $0.trustDomain = identities.trustDomain
        }
    }

    /// Asks the proxy which backends its outlier detection has ejected;
    /// true when that changed (the caller then reconciles).
    func pollEjections() -> Bool {
        guard wantsEjections, let proxy else { return false }
        guard let text = try? UnixHTTP.get(socket: proxy.runDirectory + "/proxy.sock",
                                           path: "/ejections", timeoutSeconds: 1) else { return false }
        var now: Set<BackendAddress> = []
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":")
            guard parts.count == 2, let ip = IPv4Address(parts[0]), let port = UInt16(parts[1]) else { continue }
            now.insert(BackendAddress(address: ip, port: port, transport: .tcp))
        }
        guard now != ejected else { return false }
        logger.notice("proxy ejections changed", metadata: ["ejected": "\(now.map(\.description).sorted())"])
        ejected = now
        return true
    }

    fileprivate func publishHealth(_ health: EndpointHealth, table: ServiceTable, state: ClusterState) {
        guard healthChecker != nil || !health.ejected.isEmpty || !state.trafficPolicies.isEmpty else {
            status.withLock { $0.health = nil }
            return
        }
        var h = AgentStatus.HealthStatus()
        h.failing = health.failing.flatMap { c in c.value.map { "\(c.key) \($0)" } }.sorted()
        h.ejected = health.ejected.map(\.description).sorted()
        h.panic = table.panic.compactMap { table.entries[$0]?.name }.sorted()
        let totals = healthChecker?.totals ?? (probes: 0, failures: 0)
        h.probes = totals.probes
        h.probeFailures = totals.failures
        status.withLock { $0.health = h }
    }
}

struct MapFill: Sendable {
    var services = 0, backends = 0, endpoints = 0, cgroups = 0, cidrClasses = 0, policyEntries = 0, policyRanges = 0
}

extension Duration {
    var seconds: Double {
        let (s, attos) = components
        return Double(s) + Double(attos) / 1e18
    }
}

extension HTTPRoute.BackendRef {
    /// As `weft get routes` lists a backendRef: "[namespace/]name:port weight N".
    var shown: String { "\(namespace.map { "\($0)/" } ?? "")\(name):\(port) weight \(weight)" }
}
