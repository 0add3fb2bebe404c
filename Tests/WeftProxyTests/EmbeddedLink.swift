import Logging
import NIOCore
import NIOEmbedded
import WeftCore
@testable import WeftProxy

/// Two embedded channels joined byte for byte: an HTTP/2 client handler on
/// one, the server side under test on the other.
struct EmbeddedLink {
    let client = EmbeddedChannel(), server = EmbeddedChannel()

    /// Both connected (their handlers added first), then the prefaces moved.
    func connect() throws {
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
        try client.connect(to: address).wait()
        try server.connect(to: address).wait()
        shuttle()
    }

    /// Moves bytes both ways until neither side has more to say. (An error
    /// a side raises on what it read is the test's verdict, not a failure.)
    func shuttle() {
        var moved = true
        while moved {
            moved = false
            for (from, to) in [(client, server), (server, client)] {
                while let bytes = try? from.readOutbound(as: ByteBuffer.self) {
                    moved = true
                    _ = try? to.writeInbound(bytes)
                }
            }
        }
    }

    func finish() {
        _ = try? client.finish()
        _ = try? server.finish()
    }
}

/// A proxy context on one embedded channel's loop, with the table built
/// from `config` (YAML, as the agent reads it) installed.
func embeddedProxy(node: String, address: String, config: String, on channel: EmbeddedChannel) throws -> ProxyContext {
    let configuration = ProxyConfiguration(node: node, listenAddress: IPv4Address(address)!,
                                           pinDirectory: "/nonexistent", runDirectory: "/nonexistent")
    let proxy = ProxyContext(configuration: configuration, logger: Logger(label: "test"), origins: nil, policy: nil,
                             eventLoops: [channel.embeddedEventLoop])
    let (resources, errors) = ManifestReader.parse(config, file: "test.yaml")
    guard case .success(let state) = ClusterState.build(resources, parseErrors: errors) else {
        throw EmbeddedProxyConfigError()
    }
    proxy.install(ProxyTable(state))
    return proxy
}

struct EmbeddedProxyConfigError: Error, CustomStringConvertible {
    var description: String { "the test's config does not build" }
}
