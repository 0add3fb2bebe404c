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
    /// What an endpoint answers later (it waits on I/O): nil for paths it
    /// does not serve, which `Render` answers. Gets the whole request target.
    public typealias Deferred = @Sendable (_ path: String, _ uri: String, _ loop: any EventLoop)
        -> EventLoopFuture<(status: HTTPResponseStatus, headers: [(String, String)], body: String)>?

    private let group: MultiThreadedEventLoopGroup
    private var channels: [Channel] = []

    public init(group: MultiThreadedEventLoopGroup) { self.group = group }

    public func start(host: String?, port: Int, unixSocket: String, deferred: Deferred? = nil, render: @escaping Render) throws {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                // Built on the channel's own event loop, so the handler need not be Sendable.
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(StatusHandler(render: render, deferred: deferred))
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
    private let deferred: StatusServer.Deferred?
    private var head: HTTPRequestHead?

    init(render: @escaping StatusServer.Render, deferred: StatusServer.Deferred?) {
        self.render = render
        self.deferred = deferred
    }

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
            if head.method == .GET, let later = deferred?(path, head.uri, context.eventLoop) {
                later.hop(to: context.eventLoop).assumeIsolated().whenComplete { result in
                    switch result {
                    case .success(let r): self.respond(context, head, r.status, "text/plain", r.body, r.headers)
                    case .failure(let error): self.respond(context, head, .internalServerError, "text/plain", "\(error)\n", [])
                    }
                }
                return
            }
            let response = head.method == .GET ? render(path, head.headers.first(name: "accept"))
                : (.methodNotAllowed, "text/plain", "GET only\n")
            respond(context, head, response.status, response.contentType, response.body, [])
        }
    }

    private func respond(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, _ status: HTTPResponseStatus,
                         _ contentType: String, _ body: String, _ extra: [(String, String)]) {
        var buffer = context.channel.allocator.buffer(capacity: body.utf8.count)
        buffer.writeString(body)
        var headers = HTTPHeaders(extra)
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(buffer.readableBytes)")
        let keepAlive = head.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        // Handlers run on their channel's event loop: the completion does too.
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            if !keepAlive { context.close(promise: nil) }
        }
    }
}
