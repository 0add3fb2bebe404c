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
