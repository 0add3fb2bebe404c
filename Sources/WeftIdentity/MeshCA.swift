import Crypto
import Foundation
import Glibc
import SwiftASN1
import X509

/// A certificate authority of the mesh: a certificate and its P-256 key.
/// `weft ca init` makes the root; `weft ca node` derives one intermediate
/// per node from it, and a node's agent holds only its own intermediate, so
/// a stolen node key mints nothing the other nodes' CAs have not signed,
/// and one node's CA can be replaced without touching the others.
public struct MeshCA: Sendable {
    public let certificate: Certificate
    public let key: P256.Signing.PrivateKey
    /// The chain above this CA, nearest first, root last (empty for the root).
    public let parents: [Certificate]
    public let trustDomain: String

    public init(certificate: Certificate, key: P256.Signing.PrivateKey, parents: [Certificate], trustDomain: String) {
        self.certificate = certificate
        self.key = key
        self.parents = parents
        self.trustDomain = trustDomain
    }

    public var root: Certificate { parents.last ?? certificate }

    /// A new root: ECDSA P-256, CA:true, 10 years, its name saying the trust domain.
    public static func root(trustDomain: String, validity: TimeInterval = 10 * 365 * 86_400, now: Date = Date()) throws -> MeshCA {
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName {
            OrganizationName("weft")
            CommonName("weft mesh root CA \(trustDomain)")
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-300), notValidAfter: now.addingTimeInterval(validity),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 1))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: .init(key.publicKey))
            },
            issuerPrivateKey: .init(key))
        return MeshCA(certificate: certificate, key: key, parents: [], trustDomain: trustDomain)
    }

    /// A node's intermediate: CA with path length 0 (it signs leaves only),
    /// name-constrained to the trust domain's SPIFFE URIs.
    public func intermediate(node: String, validity: TimeInterval = 365 * 86_400, now: Date = Date()) throws -> MeshCA {
        let key = P256.Signing.PrivateKey()
        let subject = try DistinguishedName {
            OrganizationName("weft")
            CommonName("weft node CA \(node)")
        }
        let parent = self.certificate
        let authorityKey = try? parent.extensions.subjectKeyIdentifier?.keyIdentifier
        let issued = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-300), notValidAfter: min(now.addingTimeInterval(validity), parent.notValidAfter),
            issuer: parent.subject, subject: subject, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                Critical(NameConstraints(permittedURIDomains: [trustDomain]))
                SubjectKeyIdentifier(hash: .init(key.publicKey))
                AuthorityKeyIdentifier(keyIdentifier: authorityKey)
            },
            issuerPrivateKey: .init(self.key))
        return MeshCA(certificate: issued, key: key, parents: [parent] + parents, trustDomain: trustDomain)
    }

    /// A workload's leaf: the SPIFFE ID as its only URI SAN, for TLS client
    /// and server use, valid from a few minutes ago (clock skew) for `ttl`.
    public func issue(_ id: SpiffeID, publicKey: P256.Signing.PublicKey, ttl: TimeInterval, now: Date = Date()) throws -> Certificate {
        guard id.trustDomain == trustDomain else { throw IdentityError("\(id) is not in trust domain \(trustDomain)") }
        let authorityKey = try? certificate.extensions.subjectKeyIdentifier?.keyIdentifier
        return try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(publicKey),
            notValidBefore: now.addingTimeInterval(-120), notValidAfter: min(now.addingTimeInterval(ttl), certificate.notValidAfter),
            issuer: certificate.subject, subject: try DistinguishedName { OrganizationName("weft") },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true, keyEncipherment: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                Critical(SubjectAlternativeNames([.uniformResourceIdentifier(id.uri)]))
                AuthorityKeyIdentifier(keyIdentifier: authorityKey)
            },
            issuerPrivateKey: .init(key))
    }
}

/// Files of a CA directory: `ca.crt` (PEM, this CA then its parents), `ca.key`
/// (PEM, mode 0600), `root.crt`, `trust-domain`.
extension MeshCA {
    public static let certFile = "ca.crt", keyFile = "ca.key", rootFile = "root.crt", domainFile = "trust-domain"

    public func write(to directory: String) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let chain = try ([certificate] + parents).map { try $0.serializeAsPEM().pemString }.joined(separator: "\n") + "\n"
        try Self.writeFile(directory + "/" + Self.keyFile, key.pemRepresentation + "\n", mode: 0o600)
        try Self.writeFile(directory + "/" + Self.certFile, chain, mode: 0o644)
        try Self.writeFile(directory + "/" + Self.rootFile, try root.serializeAsPEM().pemString + "\n", mode: 0o644)
        try Self.writeFile(directory + "/" + Self.domainFile, trustDomain + "\n", mode: 0o644)
    }

    /// Reads a CA directory; the errors name the file and what is wrong.
    public static func load(from directory: String) throws -> MeshCA {
        func read(_ name: String) throws -> String {
            do { return try String(contentsOfFile: directory + "/" + name, encoding: .utf8) } catch {
                throw IdentityError("\(directory)/\(name): cannot be read (\(error.localizedDescription))")
            }
        }
        let domain = try read(domainFile).trimmingCharacters(in: .whitespacesAndNewlines)
        guard SpiffeID.isTrustDomain(domain) else { throw IdentityError("\(directory)/\(domainFile): \"\(domain)\" is not a trust domain") }
        let chain = try certificates(pem: try read(certFile), file: directory + "/" + certFile)
        guard let first = chain.first else { throw IdentityError("\(directory)/\(certFile): holds no certificate") }
        let key: P256.Signing.PrivateKey
        do { key = try P256.Signing.PrivateKey(pemRepresentation: try read(keyFile)) } catch let e as IdentityError { throw e } catch {
            throw IdentityError("\(directory)/\(keyFile): not a PEM P-256 private key (\(error))")
        }
        guard Certificate.PublicKey(key.publicKey) == first.publicKey else {
            throw IdentityError("\(directory)/\(keyFile): does not belong to the first certificate of \(certFile)")
        }
        return MeshCA(certificate: first, key: key, parents: Array(chain.dropFirst()), trustDomain: domain)
    }

    public static func certificates(pem: String, file: String) throws -> [Certificate] {
        do {
            return try PEMDocument.parseMultiple(pemString: pem).map { try Certificate(pemDocument: $0) }
        } catch {
            throw IdentityError("\(file): not PEM certificates (\(error))")
        }
    }

    public static func writeFile(_ path: String, _ text: String, mode: Int) throws {
        // Created with its final mode (O_EXCL, then renamed into place), so
        // a key is never readable by others, not even for a moment.
        let tmp = path + ".tmp"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode_t(mode))
        guard fd >= 0 else { throw IdentityError("\(path): cannot be written (\(String(cString: strerror(errno))))") }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        guard written == bytes.count, rename(tmp, path) == 0 else { throw IdentityError("\(path): cannot be written") }
    }
}

public struct IdentityError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
