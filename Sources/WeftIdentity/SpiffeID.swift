/// A workload identity in SPIFFE form, as Istio spells it for Kubernetes:
/// `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT`. Every pod of a
/// service account shares it; the mesh authenticates and authorizes by it.
public struct SpiffeID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var trustDomain: String
    public var namespace: String
    public var serviceAccount: String

    public init(trustDomain: String, namespace: String, serviceAccount: String) {
        self.trustDomain = trustDomain
        self.namespace = namespace
        self.serviceAccount = serviceAccount
    }

    /// Parses exactly the form above; anything else (other paths, query,
    /// fragment, port, upper-case scheme, empty parts) is not an identity.
    public init?(uri: String) {
        guard uri.hasPrefix("spiffe://") else { return nil }
        let rest = uri.dropFirst("spiffe://".count)
        let parts = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 5, parts[1] == "ns", parts[3] == "sa" else { return nil }
        let domain = String(parts[0]), ns = String(parts[2]), sa = String(parts[4])
        guard Self.isTrustDomain(domain), Self.isSegment(ns), Self.isSegment(sa) else { return nil }
        self.init(trustDomain: domain, namespace: ns, serviceAccount: sa)
    }

    public var uri: String { "spiffe://\(trustDomain)/ns/\(namespace)/sa/\(serviceAccount)" }
    public var description: String { uri }

    /// The principal as Istio's AuthorizationPolicy writes it (no scheme).
    public var principal: String { "\(trustDomain)/ns/\(namespace)/sa/\(serviceAccount)" }

    public static func < (a: SpiffeID, b: SpiffeID) -> Bool { a.uri < b.uri }

    /// A node's own identity, which its proxy presents to ask another node's
    /// proxy to run a health check on its behalf (docs/resilience.md):
    /// `spiffe://D/ns/weft-system/sa/weft-node.NODE`. No pod can hold it: a
    /// Workload's serviceAccount must be a DNS label, which has no '.'.
    public static func node(_ name: String, trustDomain: String) -> SpiffeID {
        SpiffeID(trustDomain: trustDomain, namespace: nodeNamespace, serviceAccount: nodePrefix + name)
    }

    public static let nodeNamespace = "weft-system"
    public static let nodePrefix = "weft-node."

    /// The node this identity stands for, if it is a node identity.
    public var nodeName: String? {
        guard namespace == Self.nodeNamespace, serviceAccount.hasPrefix(Self.nodePrefix) else { return nil }
        let name = String(serviceAccount.dropFirst(Self.nodePrefix.count))
        return name.isEmpty ? nil : name
    }

    /// SPIFFE: lower-case letters, digits, '.', '-', '_'.
    public static func isTrustDomain(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 255 && s.utf8.allSatisfy { c in
            (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) || c == 0x2e || c == 0x2d || c == 0x5f
        }
    }

    static func isSegment(_ s: String) -> Bool {
        !s.isEmpty && s != "." && s != ".." && s.utf8.allSatisfy { c in
            (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39)
                || c == 0x2e || c == 0x2d || c == 0x5f
        }
    }
}
