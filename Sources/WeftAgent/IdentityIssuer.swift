import Crypto
import Foundation
import Logging
import WeftCore
import WeftIdentity
import X509

/// Issues a short-lived certificate for every identity that has a pod on
/// this node, from the node's CA, and renews each at half its life: the
/// proxy reloads the bundle and new tunnels present the new certificate,
/// while tunnels already up keep theirs until they close (a TLS session is
/// not bound to the certificate's lifetime after its handshake).
/// A fresh key per certificate; keys stay in this process and in the one
/// root-only file the proxy reads.
final class IdentityIssuer {
    let ca: MeshCA
    let ttl: TimeInterval
    private let logger: Logger
    private var issued: [SpiffeID: IdentityBundle.WorkloadIdentity] = [:]
    private(set) var issuedTotal = 0

    init(ca: MeshCA, ttl: TimeInterval, logger: Logger) {
        self.ca = ca
        self.ttl = ttl
        self.logger = logger
    }

    var trustDomain: String { ca.trustDomain }

    /// The identities of this node's pods, and the node's own (its proxy
    /// runs health checks through other nodes' proxies with it).
    func localIdentities(_ state: ClusterState, node: String) -> Set<SpiffeID> {
        Set(state.workloads.filter { $0.node == node }.map {
            SpiffeID(trustDomain: ca.trustDomain, namespace: $0.metadata.namespace, serviceAccount: $0.serviceAccount)
        } + [SpiffeID.node(node, trustDomain: ca.trustDomain)])
    }

    /// Issues what is missing or past half its life, drops what no pod uses.
    /// True when the bundle changed.
    func update(_ wanted: Set<SpiffeID>, now: Date = Date()) throws -> Bool {
        var changed = false
        for id in issued.keys where !wanted.contains(id) {
            issued[id] = nil
            changed = true
        }
        for id in wanted {
            if let have = issued[id], now.timeIntervalSince1970 < renewAt(have) { continue }
            let key = P256.Signing.PrivateKey()
            let cert = try ca.issue(id, publicKey: key.publicKey, ttl: ttl, now: now)
            let chain = try ([cert, ca.certificate]).map { try $0.serializeAsPEM().pemString }.joined(separator: "\n") + "\n"
            let renewal = issued[id] != nil
            issued[id] = IdentityBundle.WorkloadIdentity(
                id: id.uri, chain: chain, key: key.pemRepresentation + "\n",
                notBefore: cert.notValidBefore.timeIntervalSince1970, notAfter: cert.notValidAfter.timeIntervalSince1970)
            issuedTotal += 1
            changed = true
            logger.info(renewal ? "certificate renewed" : "certificate issued", metadata: [
                "identity": "\(id)", "not_after": "\(cert.notValidAfter)", "serial": "\(cert.serialNumber)"])
        }
        return changed
    }

    /// Half-life, as Istio renews workload certificates: half the TTL
    /// before expiry. (Not the middle of notBefore..notAfter: notBefore is
    /// backdated for clock skew, which would make a short TTL due at once.)
    private func renewAt(_ w: IdentityBundle.WorkloadIdentity) -> Double { w.notAfter - ttl / 2 }

    /// When the next renewal is due.
    var nextRenewal: Date? { issued.values.map(renewAt).min().map { Date(timeIntervalSince1970: $0) } }

    var bundle: IdentityBundle {
        IdentityBundle(trustDomain: ca.trustDomain, root: (try? ca.root.serializeAsPEM().pemString).map { $0 + "\n" } ?? "",
                       workloads: issued.keys.sorted().compactMap { issued[$0] })
    }

    /// Status: identity and expiry, never key material.
    var summary: [AgentStatus.IdentityStatus] {
        issued.keys.sorted().compactMap { id in
            issued[id].map { AgentStatus.IdentityStatus(id: id.uri, notBefore: $0.notBefore, notAfter: $0.notAfter) }
        }
    }
}
