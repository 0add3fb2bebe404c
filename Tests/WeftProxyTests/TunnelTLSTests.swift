import Crypto
import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import NIOSSL
import Synchronization
import Testing
@testable import WeftCore
@testable import WeftIdentity
@testable import WeftProxy

/// A mesh CA (root and one node's intermediate) issuing workload identities.
struct TestMesh {
    let root: MeshCA
    let node: MeshCA

    init() throws {
        root = try MeshCA.root(trustDomain: "cluster.local")
        node = try root.intermediate(node: "n1")
    }

    func identity(_ ns: String, _ sa: String, ca: MeshCA? = nil, notBefore: Date = Date(), ttl: TimeInterval = 3600) throws
        -> IdentityBundle.WorkloadIdentity {
        let issuer = ca ?? node
        let id = SpiffeID(trustDomain: issuer.trustDomain, namespace: ns, serviceAccount: sa)
        let key = P256.Signing.PrivateKey()
        let cert = try issuer.issue(id, publicKey: key.publicKey, ttl: ttl, now: notBefore)
        let chain = try [cert, issuer.certificate].map { try $0.serializeAsPEM().pemString }.joined(separator: "\n")
        return .init(id: id.uri, chain: chain, key: key.pemRepresentation, notBefore: cert.notValidBefore.timeIntervalSince1970,
                     notAfter: cert.notValidAfter.timeIntervalSince1970)
    }

    func bundle(_ workloads: [IdentityBundle.WorkloadIdentity]) throws -> TunnelIdentities {
        try TunnelIdentities(IdentityBundle(trustDomain: "cluster.local", root: try root.certificate.serializeAsPEM().pemString,
                                            workloads: workloads))
    }
}

final class Seen: Sendable {
    private let list = Mutex<[String]>([])
    func withLock<R>(_ body: (inout [String]) -> R) -> R { list.withLock { body(&$0) } }
}

/// A TLS server on 127.0.0.1 with the tunnel's server settings; reports
/// the peer identity of each handshake that completed.
private func server(_ context: NIOSSLContext, group: EventLoopGroup, seen: Seen) throws -> Channel {
    try ServerBootstrap(group: group)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                let tls = NIOSSLServerHandler(context: context)
                try channel.pipeline.syncOperations.addHandler(tls)
                let done = channel.eventLoop.makePromise(of: Void.self)
                try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(done))
                done.futureResult.assumeIsolated().whenSuccess {
                    let peer = tls.peerCertificate.flatMap(TunnelTLS.identity(of:))
                    seen.withLock { $0.append(peer?.uri ?? "none") }
                }
                // HTTP/2 that answers every CONNECT with 200, as a node proxy would.
                _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(mode: .server, connectionConfiguration: .init(), streamConfiguration: .init()) { stream in
                    stream.eventLoop.makeCompletedFuture { try stream.pipeline.syncOperations.addHandler(Answer200()) }
                }
            }
        }
        .bind(host: "127.0.0.1", port: 0).wait()
}

private func dial(_ client: TunnelIdentities, as source: SpiffeID, expecting destination: SpiffeID, port: Int,
                  loop: EventLoop) throws -> Result<Void, any Error> {
    let route = TunnelRoute(source: source, destination: destination, node: IPv4Address("127.0.0.1")!)
    let promise = loop.makePromise(of: Void.self)
    try loop.submit {
        let context = client.clientContexts[source]!
        let connection = TunnelConnection(route: route, port: port, context: context, loop: loop) { _ in }
        connection.openStream(authority: "198.18.1.2:80", headers: [("x-weft-source", "198.18.1.10")], initialize: { _ in }) { result in
            switch result {
            case .success: promise.succeed()
            case .failure(let e): promise.fail(e)
            }
            connection.close()
        }
    }.wait()
    // Never wait forever: a dial that neither connects nor fails in 5 s fails.
    loop.scheduleTask(in: .seconds(5)) { promise.fail(ChannelError.connectTimeout(.seconds(5))) }
    do {
        try promise.futureResult.wait()
        return .success(())
    } catch {
        return .failure(error)
    }
}

private final class Answer200: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .headers = unwrapInboundIn(data) {
            context.writeAndFlush(wrapOutboundOut(.headers(.init(headers: HPACKHeaders([(":status", "200")])))), promise: nil)
        }
    }
}

/// The tunnel's TLS on loopback, both ends real (BoringSSL): who may open a
/// tunnel and whom the client accepts.
@Suite struct TunnelTLSTests {
    @Test func onlyMeshIdentitiesOpenTunnelsAndTheServerMustBeWhoIsExpected() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let mesh = try TestMesh()
        let web = SpiffeID(uri: "spiffe://cluster.local/ns/shop/sa/web")!
        let client = SpiffeID(uri: "spiffe://cluster.local/ns/shop/sa/client")!
        let seen = Seen()
        let serverIDs = try mesh.bundle([try mesh.identity("shop", "web")])
        let listener = try server(try #require(serverIDs.serverContext), group: group, seen: seen)
        defer { try? listener.close().wait() }
        let port = try #require(listener.localAddress?.port)

        // TLS 1.3: a client is done with its handshake before the server has
        // checked the client's certificate, so acceptance is read off the
        // server (which records only handshakes it completed).
        func accepted(within seconds: Double = 1) -> Int {
            let end = Date().addingTimeInterval(seconds)
            var n = seen.withLock { $0.count }
            while Date() < end { usleep(10_000); n = seen.withLock { $0.count } }
            return n
        }
        // The mesh's own client: accepted both ways, and the server knows who it is.
        let good = try mesh.bundle([try mesh.identity("shop", "client")])
        #expect(throws: Never.self) { try dial(good, as: client, expecting: web, port: port, loop: group.next()).get() }
        #expect(accepted() == 1 && seen.withLock { $0 } == [client.uri])

        // Asked for an identity it does not hold, an honest server refuses
        // the handshake; an impostor with a valid mesh certificate of
        // another identity is refused by the client after it.
        let db = SpiffeID(uri: "spiffe://cluster.local/ns/shop/sa/db")!
        #expect(throws: (any Error).self) { try dial(good, as: client, expecting: db, port: port, loop: group.next()).get() }
        #expect(accepted(within: 0.3) == 1)
        let webCredential = try #require(serverIDs.credentials[web])
        let impostor = try server(try NIOSSLContext(configuration: TunnelTLS.server(default: webCredential, roots: serverIDs.roots) { _ in webCredential }),
                                  group: group, seen: seen)
        defer { try? impostor.close().wait() }
        let wrong = try dial(good, as: client, expecting: db, port: try #require(impostor.localAddress?.port), loop: group.next())
        #expect(throws: TunnelRefused.self) { try wrong.get() }
        #expect(accepted() == 2, "the impostor's own handshake completed; the client then refused it")

        // A client certificate from another CA, or an expired one: the
        // server completes no handshake.
        let stranger = try MeshCA.root(trustDomain: "cluster.local").intermediate(node: "x")
        let foreign = try TunnelIdentities(IdentityBundle(
            trustDomain: "cluster.local", root: try mesh.root.certificate.serializeAsPEM().pemString,
            workloads: [try mesh.identity("shop", "client", ca: stranger)]))
        _ = try dial(foreign, as: client, expecting: web, port: port, loop: group.next())
        let expired = try mesh.bundle([try mesh.identity("shop", "client", notBefore: Date().addingTimeInterval(-7200), ttl: 3600)])
        _ = try dial(expired, as: client, expecting: web, port: port, loop: group.next())
        #expect(accepted() == 2, "a foreign or expired client certificate was accepted: \(seen.withLock { $0 })")
    }
}
