import ArgumentParser
import Foundation
import WeftIdentity

/// `weft ca`: the mesh's certificate authority, kept offline from the nodes.
struct CACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca", abstract: "Make the mesh root CA and each node's intermediate CA.",
        subcommands: [Init.self, Node.self])

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
}
