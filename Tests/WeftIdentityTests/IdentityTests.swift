import Crypto
import Foundation
import Testing
import X509
@testable import WeftIdentity

private func openssl(_ args: [String]) -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
    p.arguments = args
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    do { try p.run() } catch { return (-1, "\(error)") }
    let out = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: out, as: UTF8.self))
}

private func temp() -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-id-\(UUID().uuidString.prefix(8))").path
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

struct SpiffeIDTests {
    @Test func parsesOnlyTheNamespaceServiceAccountForm() {
        #expect(SpiffeID(uri: "spiffe://cluster.local/ns/shop/sa/web")
                == SpiffeID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "web"))
        for bad in ["spiffe://cluster.local/ns/shop/sa", "spiffe://cluster.local/ns/shop/sa/web/x", "https://cluster.local/ns/a/sa/b",
                    "spiffe://Cluster.local/ns/a/sa/b", "spiffe:///ns/a/sa/b", "spiffe://d/ns//sa/b", "spiffe://d/ns/a/sa/..",
                    "spiffe://d/sa/a/ns/b", "spiffe://d:8080/ns/a/sa/b"] {
            #expect(SpiffeID(uri: bad) == nil, "\(bad)")
        }
    }

    @Test func nodeIdentitiesAreTheirOwnKind() {
        let node = SpiffeID.node("n2", trustDomain: "cluster.local")
        #expect(node.uri == "spiffe://cluster.local/ns/weft-system/sa/weft-node.n2")
        #expect(SpiffeID(uri: node.uri)?.nodeName == "n2")
        #expect(SpiffeID(trustDomain: "cluster.local", namespace: "weft-system", serviceAccount: "default").nodeName == nil)
        #expect(SpiffeID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "weft-node.n2").nodeName == nil)
    }
}

struct MeshCATests {
    @Test func chainVerifiesWithOpenSSLAndTheLeafCarriesOnlyItsSpiffeID() throws {
        let dir = temp()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let root = try MeshCA.root(trustDomain: "cluster.local")
        try root.write(to: dir + "/root")
        let node = try MeshCA.load(from: dir + "/root").intermediate(node: "n1")
        try node.write(to: dir + "/n1")
        let loaded = try MeshCA.load(from: dir + "/n1")
        #expect(loaded.parents.count == 1 && loaded.root == root.certificate)
        // Keys are written 0600 from the start; certificates 0644.
        let mode = (try FileManager.default.attributesOfItem(atPath: dir + "/n1/ca.key")[.posixPermissions] as? Int) ?? 0
        #expect(mode == 0o600)

        let key = P256.Signing.PrivateKey()
        let id = SpiffeID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "web")
        let leaf = try loaded.issue(id, publicKey: key.publicKey, ttl: 3600)
        try leaf.serializeAsPEM().pemString.write(toFile: dir + "/leaf.crt", atomically: true, encoding: .utf8)
        let (rc, out) = openssl(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", dir + "/root/root.crt",
                                 "-untrusted", dir + "/n1/ca.crt", dir + "/leaf.crt"])
        #expect(rc == 0, "\(out)")
        let (_, text) = openssl(["x509", "-in", dir + "/leaf.crt", "-noout", "-ext", "subjectAltName,basicConstraints,keyUsage"])
        #expect(text.contains("URI:spiffe://cluster.local/ns/shop/sa/web") && text.contains("CA:FALSE"), "\(text)")
        #expect(leaf.notValidAfter.timeIntervalSince(leaf.notValidBefore) <= 3600 + 121)

        // Another mesh's CA does not vouch for it.
        let other = try MeshCA.root(trustDomain: "cluster.local")
        try other.write(to: dir + "/other")
        let (rc2, out2) = openssl(["verify", "-CAfile", dir + "/other/root.crt", "-untrusted", dir + "/n1/ca.crt", dir + "/leaf.crt"])
        #expect(rc2 != 0, "\(out2)")
        // A node CA cannot sign outside its trust domain.
        #expect(throws: IdentityError.self) {
            try loaded.issue(SpiffeID(trustDomain: "evil.example", namespace: "a", serviceAccount: "b"), publicKey: key.publicKey, ttl: 60)
        }
    }

    @Test func loadingNamesTheFileThatIsWrong() throws {
        let dir = temp()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(throws: IdentityError.self) { try MeshCA.load(from: dir) }
        let ca = try MeshCA.root(trustDomain: "td")
        try ca.write(to: dir)
        try "not a key".write(toFile: dir + "/ca.key", atomically: true, encoding: .utf8)
        do {
            _ = try MeshCA.load(from: dir)
            Issue.record("a broken key was accepted")
        } catch let e as IdentityError {
            #expect(e.description.contains("\(dir)/ca.key"), "\(e)")
        }
        // A key that belongs to another certificate.
        try P256.Signing.PrivateKey().pemRepresentation.write(toFile: dir + "/ca.key", atomically: true, encoding: .utf8)
        do {
            _ = try MeshCA.load(from: dir)
            Issue.record("a foreign key was accepted")
        } catch let e as IdentityError {
            #expect(e.description.contains("does not belong"), "\(e)")
        }
    }
}
