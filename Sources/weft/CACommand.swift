import ArgumentParser
import Foundation
import Crypto
import WeftIdentity

/// `weft ca`: the mesh's certificate authority, kept offline from the nodes.
struct CACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca", abstract: "Make the mesh root CA and each node's intermediate CA.",
        subcommands: [Init.self, Node.self, Issue.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a root CA (ECDSA P-256) for a trust domain: DIR/ca.crt, DIR/ca.key (0600), DIR/root.crt.")
        @Option(name: .customLong("trust-domain"), help: "The SPIFFE trust domain, e.g. cluster.local.") var trustDomain: String
        @Option(help: "Directory to write (created 0700; an existing CA there is not overwritten).") var out: String

        func run() throws {
            guard SpiffeID.isTrustDomain(trustDomain) else {
                throw ValidationError("--trust-domain \(trustDomain): a trust domain holds only a-z, 0-9, '.', '-' and '_'")
            }
            guard !FileManager.default.fileExists(atPath: out + "/" + MeshCA.keyFile) else {
                throw ValidationError("\(out)/\(MeshCA.keyFile) exists: refusing to overwrite a CA")
            }
            let ca = try MeshCA.root(trustDomain: trustDomain)
            try ca.write(to: out)
            print("root CA for spiffe://\(trustDomain) written to \(out) (key \(out)/\(MeshCA.keyFile), mode 0600)")
        }
    }

    struct Node: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a node's intermediate CA from the root: give the node's agent only this directory (--ca).")
        @Option(help: "The root CA directory (weft ca init).") var ca: String
        @Option(help: "The node's name.") var node: String
        @Option(help: "Directory to write.") var out: String

        func run() throws {
            let root: MeshCA
            do { root = try MeshCA.load(from: ca) } catch let e as IdentityError { throw ValidationError(e.description) }
            let intermediate = try root.intermediate(node: node)
            try intermediate.write(to: out)
            print("node CA for \(node) written to \(out), signed by \(ca)")
        }
    }

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue one workload certificate by hand (for checks and tests): OUT.crt (leaf, then the CA) and OUT.key (0600).")
        @Option(help: "A CA directory (a node's, or the root).") var ca: String
        @Option(help: "The SPIFFE ID, spiffe://TRUST-DOMAIN/ns/NS/sa/SA.") var id: String
        @Option(help: "Path prefix of the files to write.") var out: String
        @Option(help: "Lifetime, e.g. 1h.") var ttl = "1h"
        @Option(help: "Move the validity window this far into the past (e.g. 2h with --ttl 1h: already expired).") var backdate = "0s"

        func run() throws {
            guard let spiffe = SpiffeID(uri: id) else { throw ValidationError("--id \(id) is not spiffe://TRUST-DOMAIN/ns/NS/sa/SA") }
            guard let lifetime = parseDuration(ttl) else { throw ValidationError("--ttl \(ttl) is not a duration") }
            let back = backdate == "0s" ? 0 : (parseDuration(backdate) ?? -1)
            guard back >= 0 else { throw ValidationError("--backdate \(backdate) is not a duration") }
            let authority: MeshCA
            do { authority = try MeshCA.load(from: ca) } catch let e as IdentityError { throw ValidationError(e.description) }
            let key = P256.Signing.PrivateKey()
            let cert = try authority.issue(spiffe, publicKey: key.publicKey, ttl: lifetime, now: Date().addingTimeInterval(-back))
            let chain = try ([cert, authority.certificate]).map { try $0.serializeAsPEM().pemString }.joined(separator: "\n") + "\n"
            try MeshCA.writeFile(out + ".key", key.pemRepresentation + "\n", mode: 0o600)
            try MeshCA.writeFile(out + ".crt", chain, mode: 0o644)
            print("\(spiffe) valid \(cert.notValidBefore) to \(cert.notValidAfter): \(out).crt, \(out).key")
        }
    }
}
