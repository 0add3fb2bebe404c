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
    /// The unix socket's path and the file it was bound as: removed on
    /// stop only while the path still names that file.
    private var unixFile: (path: String, device: UInt, inode: UInt)?

    public init(group: MultiThreadedEventLoopGroup) { self.group = group }

    /// `listening`: a TCP socket already listening (`listenTCP`), served
    /// instead of binding `host`:`port` now.
    public func start(host: String?, port: Int, listening: Int32? = nil, unixSocket: String, deferred: Deferred? = nil,
                      render: @escaping Render) throws {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                // Built on the channel's own event loop, so the handler need not be Sendable.
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(StatusHandler(render: render, deferred: deferred))
                }
            }
        if let listening {
            channels.append(try bootstrap.withBoundSocket(listening).wait())
        } else if let host {
            channels.append(try bootstrap.bind(host: host, port: port).wait())
        }
        let (fd, file) = try Self.listen(unixSocket)
        do {
            channels.append(try bootstrap.withBoundSocket(fd).wait())
        } catch {
            close(fd)
            unlink(unixSocket)
            throw error
        }
        unixFile = file
    }

    /// Closes the listeners, and removes the unix socket unless a successor
    /// has put its own there (a proxy's rolling restart: the new proxy
    /// binds the path while the old one drains).
    public func stop() {
        for channel in channels { try? channel.close().wait() }
        if let file = unixFile, let now = Self.identity(of: file.path), now == (file.device, file.inode) {
            unlink(file.path)
        }
        unixFile = nil
    }

    /// A TCP socket listening on `host`:`port` now, to be served by `start`
    /// later: a daemon learns that its address is taken (or not its to
    /// take) before it does anything else.
    public static func listenTCP(host: String, port: Int) throws -> Int32 {
        let address = try SocketAddress.makeAddressResolvingHost(host, port: port)
        let fd = socket(address.protocol.rawValue, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw StatusServerError("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = address.withSockAddr { bind(fd, $0, socklen_t($1)) }
        guard bound == 0, Glibc.listen(fd, 128) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw StatusServerError("cannot listen: \(reason)")
        }
        return fd
    }

    /// A listening unix socket at `path`, mode 0600, put there in one
    /// rename so the path never goes missing while a predecessor serves
    /// it. NIO removes a path it bound itself when it closes it, whoever
    /// owns the path by then; it leaves a socket it was handed alone.
    private static func listen(_ path: String) throws -> (Int32, (path: String, device: UInt, inode: UInt)) {
        let temp = (path as NSString).deletingLastPathComponent + "/.\((path as NSString).lastPathComponent).\(getpid())"
        func failure(_ call: String) -> StatusServerError {
            StatusServerError("\(call) \(temp): \(String(cString: strerror(errno)))")
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(temp.utf8)  // longer than path
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw StatusServerError("socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw failure("socket") }
        unlink(temp)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, chmod(temp, 0o600) == 0, Glibc.listen(fd, 128) == 0, let identity = identity(of: temp),
              rename(temp, path) == 0 else {
            let error = failure("listening on")
            close(fd)
            unlink(temp)
            throw error
        }
        return (fd, (path, identity.0, identity.1))
    }

    private static func identity(of path: String) -> (UInt, UInt)? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return (UInt(info.st_dev), UInt(info.st_ino))
    }
}

public struct StatusServerError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
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
