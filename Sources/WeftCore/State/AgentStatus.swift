/// What an agent reports about itself on /status: the config generation in
/// force, the errors of the last rejected change, the datapath's programs, and
/// the names behind the kernel's service ids. `weft status` and `weft get`
/// read it; the kernel's own view comes from the pinned maps.
public struct AgentStatus: Codable, Sendable {
    public struct ProgramStatus: Codable, Sendable {
        public var name: String
        public var state: String
        public var programID: UInt32
        public init(name: String, state: String, programID: UInt32) {
            self.name = name
            self.state = state
            self.programID = programID
        }
    }

    public struct ServiceName: Codable, Sendable {
        public var frontend: String
        public var name: String
        public init(frontend: String, name: String) {
            self.frontend = frontend
            self.name = name
        }
    }

    public struct WorkloadStatus: Codable, Sendable {
        public var name: String
        public var node: String
        public var address: String
        public var serviceAccount: String
        public var labels: [String: String]
        public init(name: String, node: String, address: String, serviceAccount: String, labels: [String: String]) {
            self.name = name
            self.node = node
            self.address = address
            self.serviceAccount = serviceAccount
            self.labels = labels
        }
    }

    public struct PolicyStatus: Codable, Sendable {
        public var name: String
        public var podSelector: String
        public var policyTypes: [String]
        public var selectedPods: [String]
        public var ingressRules: Int
        public var egressRules: Int
        public init(name: String, podSelector: String, policyTypes: [String], selectedPods: [String],
                    ingressRules: Int, egressRules: Int) {
            self.name = name
            self.podSelector = podSelector
            self.policyTypes = policyTypes
            self.selectedPods = selectedPods
            self.ingressRules = ingressRules
            self.egressRules = egressRules
        }
    }

    /// The names behind the policy maps' numbers, for `weft policy check`.
    public struct PolicyNames: Codable, Sendable {
        /// rule id -> which policy rule it is
        public var rules: [String: RuleRef] = [:]
        /// identity id -> namespace{labels}
        public var identities: [String: String] = [:]
        /// identity id -> direction -> policies that isolate it
        public var isolatedBy: [String: [String: [String]]] = [:]
        public init() {}
    }

    public var node: String
    public var pid: Int32
    /// The agent's release (`Build.version`); nil from an agent before 0.1.0.
    public var version: String?
    public var configDirectory: String
    public var cgroup: String
    public var pinDirectory: String
    /// Increments each time a new valid config is put in force.
    public var generation: Int
    /// Unix time the current generation went in force.
    public var appliedAt: Double
    /// `file:doc:field: reason` lines of the last change that was refused;
    /// empty when the files on disk are the ones in force.
    public var configErrors: [String]
    public var programs: [ProgramStatus]
    public var services: [ServiceName]
    public var workloads: [WorkloadStatus]
    public var policies: [PolicyStatus]
    public var policyNames: PolicyNames
    /// Local pods whose cgroup does not exist (yet): their connects are not
    /// judged at the source until it does; the agent retries every second.
    public var missingCgroups: [String]
    /// Map writes the last reconcile made, and how long it took.
    public var lastWrites: Int
    public var lastReconcileSeconds: Double
    /// Milliseconds per phase of the last reconcile that put a config in
    /// force: load (read, parse, validate), table, plan, write, status.
    public var lastReconcilePhases: [String: Double]
    /// The node proxy, when this agent runs one.
    public var proxy: ProxyStatus?
    /// The same-node socket shortcut; nil from agents that predate it.
    public var shortcut: ShortcutStatus?

    public struct ShortcutStatus: Codable, Sendable {
        /// "on", "off" or "unavailable".
        public var state: String
        public var reason: String?
        public var podReceivers: String?
        /// Local pods whose sockets may be given redirected bytes.
        public var receivers: [String] = []
        public var proxyReceives = false
        /// Whether opaque TCP the proxy relays may be spliced past it.
        public var splice: Bool?
        public var programs: [ProgramStatus] = []
        /// Sockets on the shortcut when the status was read.
        public var sockets: Int?
        public var events: [String: UInt64]?
        public init(state: String, reason: String?) {
            self.state = state
            self.reason = reason
        }
    }
    /// HTTPRoutes in force: name, parents, rule count.
    public var routes: [RouteStatus] = []
    /// Workload identities this node's agent issued certificates for.
    public var identities: [IdentityStatus]?
    public var trustDomain: String?

    public struct IdentityStatus: Codable, Sendable, Equatable {
        public var id: String
        public var notBefore: Double
        public var notAfter: Double
        public init(id: String, notBefore: Double, notAfter: Double) {
            self.id = id
            self.notBefore = notBefore
            self.notAfter = notAfter
        }
    }

    /// Backend health (TrafficPolicy healthCheck and outlier ejections).
    public var health: HealthStatus?
    /// This node's zone (its Node manifest's `topology.kubernetes.io/zone`),
    /// for PreferSameZone; nil: in no zone.
    public var zone: String?

    public struct HealthStatus: Codable, Sendable, Equatable {
        /// Backends failing their active health check, "cluster backend".
        public var failing: [String] = []
        /// Backends the node proxy's outlier detection has ejected.
        public var ejected: [String] = []
        /// Service ports using every backend because too few are healthy.
        public var panic: [String] = []
        public var probes = 0
        public var probeFailures = 0
        public init() {}
    }

    public struct ProxyStatus: Codable, Sendable {
        public var pid: Int32?
        public var listen: String
        public var restarts: Int
        /// The route-table generation the proxy last reported.
        public var generation: UInt64?
        /// Service ports (vip:port) captured to the proxy.
        public var frontends: [String]
        /// Whether the proxy runs the agent's own executable (false: another
        /// build, such as the one before an upgrade in place, adopted by a
        /// new agent; nil: not known).
        public var sameBuild: Bool?
        public init(pid: Int32?, listen: String, restarts: Int, generation: UInt64?, frontends: [String]) {
            self.pid = pid
            self.listen = listen
            self.restarts = restarts
            self.generation = generation
            self.frontends = frontends
        }
    }

    public struct RouteStatus: Codable, Sendable {
        public var name: String
        public var parents: [String]
        public var rules: Int
        public var backends: [String]
        /// "HTTPRoute", "GRPCRoute", "TCPRoute", "UDPRoute" or "TLSRoute"
        /// (nil: an agent from before GRPCRoute).
        public var kind: String?
        /// Service ports ("namespace/service:port") where a GRPCRoute
        /// displaces this HTTPRoute (GEP-1294); nil: none.
        public var conflicted: [String]?
        /// A TLSRoute's SNI hostnames (nil: another kind, or none: any name).
        public var hostnames: [String]?
        public init(name: String, parents: [String], rules: Int, backends: [String], kind: String? = nil,
                    conflicted: [String]? = nil, hostnames: [String]? = nil) {
            self.name = name
            self.parents = parents
            self.rules = rules
            self.backends = backends
            self.kind = kind
            self.conflicted = conflicted
            self.hostnames = hostnames
        }
    }

    public init(node: String, pid: Int32, configDirectory: String, cgroup: String, pinDirectory: String) {
        self.node = node
        self.pid = pid
        self.configDirectory = configDirectory
        self.cgroup = cgroup
        self.pinDirectory = pinDirectory
        version = Build.version
        generation = 0
        appliedAt = 0
        configErrors = []
        programs = []
        services = []
        workloads = []
        policies = []
        policyNames = PolicyNames()
        missingCgroups = []
        lastWrites = 0
        lastReconcileSeconds = 0
        lastReconcilePhases = [:]
    }
}
