import Crypto
import Foundation
import NIOSSL
import X509

/// What a node's agent hands its proxy: the trust anchor, and a certificate
/// and key for every identity that has a pod on the node. Written by the
/// agent to a root-only file (mode 0600 in the 0700 run directory), read by
/// the proxy on SIGHUP; keys never appear anywhere else, nor in any log.
public struct IdentityBundle: Codable, Hashable, Sendable {
    public var trustDomain: String
    /// PEM of the mesh root.
    public var root: String
    public var workloads: [WorkloadIdentity]

    public init(trustDomain: String, root: String, workloads: [WorkloadIdentity]) {
        self.trustDomain = trustDomain
        self.root = root
        self.workloads = workloads
    }

    public struct WorkloadIdentity: Codable, Hashable, Sendable {
        /// "spiffe://..."
        public var id: String
        /// PEM: the leaf, then the node CA (the root is not sent).
        public var chain: String
        /// PEM P-256 key.
        public var key: String
        /// Seconds since 1970.
        public var notAfter: Double
        public var notBefore: Double
        public init(id: String, chain: String, key: String, notBefore: Double, notAfter: Double) {
            self.id = id
            self.chain = chain
            self.key = key
            self.notBefore = notBefore
            self.notAfter = notAfter
        }
    }

    public static let fileName = "identities.json"
}

/// The TLS both ends of a tunnel speak: TLS 1.3 only, ALPN h2, the peer's
/// chain verified by BoringSSL against the mesh root (signature, validity
/// period, CA constraints, the node CA's name constraints), and then the
/// peer's SPIFFE ID read from its URI SAN and compared with what the caller
/// expects. Nothing is ever accepted without a certificate.
public enum TunnelTLS {
    public static let alpn = "h2"

    /// The SNI a client sends to ask for `id`'s certificate: the identity
    /// hashed into one DNS label (namespaces and service accounts may hold
    /// dots, so they cannot be spelled out unambiguously).
    public static func serverName(for id: SpiffeID) -> String {
        let digest = SHA256.hash(data: Data(id.uri.utf8))
        return digest.prefix(12).map { String(format: "%02x", $0) }.joined() + ".id.weft"
    }

    /// Parsed, ready-to-use material for one identity.
    public struct Credential: Sendable {
        public let id: SpiffeID
        public let chain: [NIOSSLCertificate]
        public let key: NIOSSLPrivateKey
        public let notAfter: Date
    }

    public static func credentials(_ bundle: IdentityBundle) throws -> (roots: [NIOSSLCertificate], byID: [SpiffeID: Credential]) {
        let roots = try NIOSSLCertificate.fromPEMBytes(Array(bundle.root.utf8))
        var out: [SpiffeID: Credential] = [:]
        for w in bundle.workloads {
            guard let id = SpiffeID(uri: w.id) else { throw IdentityError("identity bundle: \(w.id) is not a SPIFFE ID") }
            out[id] = Credential(id: id, chain: try NIOSSLCertificate.fromPEMBytes(Array(w.chain.utf8)),
                                 key: try NIOSSLPrivateKey(bytes: Array(w.key.utf8), format: .pem),
                                 notAfter: Date(timeIntervalSince1970: w.notAfter))
        }
        return (roots, out)
    }

    /// The client side: presents `source`'s certificate; the server must
    /// prove `destination` (checked after the handshake with `verifyPeer`).
    public static func client(_ source: Credential, roots: [NIOSSLCertificate]) -> TLSConfiguration {
        var c = TLSConfiguration.makeClientConfiguration()
        c.minimumTLSVersion = .tlsv13
        c.certificateChain = source.chain.map { .certificate($0) }
        c.privateKey = .privateKey(source.key)
        c.trustRoots = .certificates(roots)
        // Hostnames mean nothing here; the identity check is the SAN URI.
        c.certificateVerification = .noHostnameVerification
        c.applicationProtocols = [alpn]
        return c
    }

    /// The server side: a client certificate is required; the certificate
    /// presented is the one the client's SNI names (the destination pod's
    /// identity), chosen per handshake from `credentials`.
    public static func server(default fallback: Credential, roots: [NIOSSLCertificate],
                              credentials: @escaping @Sendable (String?) -> Credential?) -> TLSConfiguration {
        var c = TLSConfiguration.makeServerConfiguration(certificateChain: fallback.chain.map { .certificate($0) },
                                                         privateKey: .privateKey(fallback.key))
        c.minimumTLSVersion = .tlsv13
        c.trustRoots = .certificates(roots)
        c.certificateVerification = .noHostnameVerification
        c.applicationProtocols = [alpn]
        c.sslContextCallback = { values, promise in
            guard let credential = credentials(values.serverHostname) else {
                // An identity this node does not serve: refuse the handshake
                // rather than present some other pod's certificate.
                promise.fail(IdentityError("no local identity for server name \(values.serverHostname ?? "(none)")"))
                return
            }
            var o = NIOSSLContextConfigurationOverride()
            o.certificateChain = credential.chain.map { .certificate($0) }
            o.privateKey = .privateKey(credential.key)
            promise.succeed(o)
        }
        return c
    }

    /// The SPIFFE ID of a verified peer certificate (its one URI SAN).
    public static func identity(of certificate: NIOSSLCertificate) -> SpiffeID? {
        guard let der = try? certificate.toDERBytes(), let cert = try? Certificate(derEncoded: der),
              let san = try? cert.extensions.subjectAlternativeNames else { return nil }
        let uris = san.compactMap { name -> String? in
            if case .uniformResourceIdentifier(let u) = name { return u }
            return nil
        }
        guard uris.count == 1 else { return nil }
        return SpiffeID(uri: uris[0])
    }
}
