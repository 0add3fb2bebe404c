import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// Serves a daemon's read-only endpoints over HTTP/1.1, on a TCP address
/// and/or a unix socket (which `weft status` / `weft get` use: it reaches
/// the agent and the proxy whatever network namespace they run in).
/// The agent's:
///   GET /metrics   Prometheus text exposition
///   GET /status    AgentStatus as JSON
///   GET /generation  "<generation> ok|refused", cheap enough to poll
///   GET /healthz   "ok"
public final class StatusServer {
    /// Answers a GET: the path (without query) and the request's Accept header.
    public typealias Render = @Sendable (_ path: String, _ accept: String?) -> (status: HTTPResponseStatus, contentType: String, body: String)

    private let group: MultiThreadedEventLoopGroup
    private var channels: [Channel] = []

    public init(group: MultiThreadedEventLoopGroup) { self.group = group }

    public func start(host: String?, port: Int, unixSocket: String, render: @escaping Render) throws {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                // Built on the channel's own event loop, so the handler need not be Sendable.
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(StatusHandler(render: render))
                }
            }
        if let host { channels.append(try bootstrap.bind(host: host, port: port).wait()) }
        try? FileManager.default.removeItem(atPath: unixSocket)
        channels.append(try bootstrap.bind(unixDomainSocketPath: unixSocket).wait())
        chmod(unixSocket, 0o600)
    }

    public func stop() {
        for channel in channels { try? channel.close().wait() }
    }
}

final class StatusHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let render: StatusServer.Render
    private var head: HTTPRequestHead?

    init(render: @escaping StatusServer.Render) { self.render = render }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
        case .body:
            break
        case .end:
            guard let head else { return }
            self.head = nil
            let path = String(head.uri.split(separator: "?", maxSplits: 1).first ?? "")
            let response = head.method == .GET ? render(path, head.headers.first(name: "accept"))
                : (.methodNotAllowed, "text/plain", "GET only\n")
            var buffer = context.channel.allocator.buffer(capacity: response.body.utf8.count)
            buffer.writeString(response.body)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: response.contentType)
            headers.add(name: "Content-Length", value: "\(buffer.readableBytes)")
            let keepAlive = head.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: response.status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            // Handlers run on their channel's event loop: the completion does too.
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
    }
}
