import Testing
@testable import WeftCore

private func policy(_ spec: String, name: String = "p", ns: String = "prod") -> String {
    """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: \(name), namespace: \(ns)}
    spec:
    \(spec.split(separator: "\n", omittingEmptySubsequences: false).map { "  " + $0 }.joined(separator: "\n"))
    """
}

private func firstError(_ yaml: String) -> String? {
    ManifestReader.parse(yaml, file: "np.yaml").errors.first?.description
}

private func parsedPolicy(_ yaml: String) throws -> NetworkPolicy {
    let r = ManifestReader.parse(yaml, file: "np.yaml")
    #expect(r.errors.isEmpty, "\(r.errors)")
    guard case .networkPolicy(let p) = try #require(r.resources.first).resource else { throw PolicyTestError() }
    return p
}

struct PolicyTestError: Error {}

@Suite struct NetworkPolicyParsing {
    @Test(arguments: [
        ("podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/33}}]",
         "np.yaml:1:spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0/33\" is not an IPv4 CIDR such as 10.0.0.0/8"),
        ("podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]",
         "np.yaml:1:spec.ingress[0].from[0].ipBlock.except[0]: 11.0.0.0/16 must be a strict subset of cidr 10.0.0.0/8"),
        ("podSelector: {}\ningress:\n- ports: [{port: 70000}]",
         "np.yaml:1:spec.ingress[0].ports[0].port: port must be between 1 and 65535, got 70000"),
        ("podSelector: {}\negress:\n- ports: [{port: 9000, endPort: 8000}]",
         "np.yaml:1:spec.egress[0].ports[0].endPort: must be at least port (9000), got 8000"),
        ("podSelector: {}\negress:\n- ports: [{port: http, endPort: 8000}]",
         "np.yaml:1:spec.egress[0].ports[0].endPort: may only be set with a numeric port"),
        ("podSelector: {}\ningress:\n- from: [{}]",
         "np.yaml:1:spec.ingress[0].from[0]: must specify a peer: podSelector, namespaceSelector or ipBlock"),
        ("podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]",
         "np.yaml:1:spec.ingress[0].from[0].ipBlock: may not be combined with podSelector or namespaceSelector in one peer"),
        ("podSelector: {}\ningress:\n- fromm: []",
         "np.yaml:1:spec.ingress[0].fromm: unknown field"),
        ("podSelector: {}\npolicyTypes: [Inbound]",
         "np.yaml:1:spec.policyTypes[0]: policyTypes entries must be Ingress or Egress, got \"Inbound\""),
        ("podSelector: {matchExpressions: [{key: app, operator: In}]}",
         "np.yaml:1:spec.podSelector.matchExpressions[0].values: must not be empty for operator In"),
        ("podSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}",
         "np.yaml:1:spec.podSelector.matchExpressions[0].values: must be empty for operator Exists"),
        ("podSelector: {}\ningress:\n- ports: [{protocol: ICMP}]",
         "np.yaml:1:spec.ingress[0].ports[0].protocol: protocol must be TCP, UDP or SCTP, got \"ICMP\""),
        ("ingress: []",
         "np.yaml:1:spec.podSelector: required field is missing"),
    ])
    func rejectsBadInputNamingTheField(spec: String, expected: String) {
        let error = firstError(policy(spec))
        #expect(error?.hasPrefix(expected) == true, "got \(error ?? "no error")")
    }

    @Test func policyTypesDefaultAsTheAPIServerDoes() throws {
        #expect(try parsedPolicy(policy("podSelector: {}")).policyTypes == [.ingress])
        #expect(try parsedPolicy(policy("podSelector: {}\negress: []")).policyTypes == [.ingress])
        #expect(try parsedPolicy(policy("podSelector: {}\negress: [{}]")).policyTypes == [.ingress, .egress])
        #expect(try parsedPolicy(policy("podSelector: {}\npolicyTypes: [Egress]")).policyTypes == [.egress])
    }

    @Test func readsPeersPortsAndRanges() throws {
        let p = try parsedPolicy(policy("""
            podSelector: {matchLabels: {app: db}}
            ingress:
            - from:
              - {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: api}}}
              - {ipBlock: {cidr: 10.1.2.3/8, except: [10.9.0.0/16]}}
              ports: [{port: 5432}, {protocol: UDP, port: 8000, endPort: 8100}, {port: metrics}]
            """))
        let rule = try #require(p.ingress.first)
        #expect(rule.peers.count == 2)
        #expect(rule.peers[1] == .ipBlock(.init(cidr: IPv4Prefix("10.0.0.0/8")!, except: [IPv4Prefix("10.9.0.0/16")!])))
        #expect(rule.ports == [.init(transport: .tcp, port: .number(5432)),
                               .init(transport: .udp, port: .number(8000), endPort: 8100),
                               .init(transport: .tcp, port: .name("metrics"))])
    }

    @Test func namespacesCarryTheStandardNameLabel() throws {
        let r = ManifestReader.parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {env: prod}}\n", file: "ns.yaml")
        #expect(r.errors.isEmpty)
        guard case .namespace(let ns, _) = try #require(r.resources.first).resource else { throw PolicyTestError() }
        #expect(ns.labels == ["env": "prod", "kubernetes.io/metadata.name": "prod"])
        #expect(ClusterState().namespace("other").labels == ["kubernetes.io/metadata.name": "other"])
        let bad = ManifestReader.parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, namespace: x}\n", file: "ns.yaml")
        #expect(bad.errors.first?.description.hasPrefix("ns.yaml:1:metadata.namespace: a Namespace is not namespaced") == true)
    }
}

@Suite struct PortPrefixes {
    @Test func coverIsExactAndSmall() {
        var rng = SplitMix(seed: 7)
        var cases: [(UInt16, UInt16)] = [(0, 65535), (1, 65535), (80, 80), (8000, 8100), (1024, 65535), (65535, 65535)]
        for _ in 0..<300 {
            let a = UInt16(truncatingIfNeeded: rng.next()), b = UInt16(truncatingIfNeeded: rng.next())
            cases.append((min(a, b), max(a, b)))
        }
        for (first, last) in cases {
            let cover = PolicyEntryKey.PortPrefix.cover(first, last)
            #expect(cover.count <= 30)
            var total = 0
            var previousEnd: Int = Int(first) - 1
            for p in cover {
                #expect(Int(p.range.lowerBound) == previousEnd + 1, "gap or overlap in \(first)...\(last)")
                previousEnd = Int(p.range.upperBound)
                total += p.range.count
            }
            #expect(previousEnd == Int(last))
            #expect(total == Int(last) - Int(first) + 1)
        }
    }
}

/// A small deterministic generator for randomized tests.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}
