import NIOCore
import NIOEmbedded

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
