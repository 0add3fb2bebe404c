// weft-proxy-floor: not part of Weft. The least CPU an HTTP/1.1 keep-alive
// reverse proxy on SwiftNIO can spend per request, as a reference for
// `scripts/bench proxy-profile` (docs/proxy.md, "Where the CPU goes").
//
// It does what the benchmark's HAProxy does and no more: one handler per
// channel, heads found and framed in place in the bytes read (no HTTP codec,
// no typed messages), X-Forwarded-For and a request id added, the response
// forwarded as read, one upstream connection per client connection on the
// same event loop. Framing is Content-Length only (the benchmark's nginx
// answers so); anything else closes the connection.
//
//   weft-proxy-floor LISTEN_ADDRESS LISTEN_PORT BACKEND_ADDRESS BACKEND_PORT [THREADS]
import Glibc
import NIOCore
import NIOPosix

/// Where "\r\n\r\n" ends in `bytes`, if it is there.
func headLength(_ bytes: UnsafeRawBufferPointer) -> Int? {
    var i = 3
    while i < bytes.count {
        switch bytes[i] {
        case 10:
            if bytes[i - 1] == 13 && bytes[i - 2] == 10 && bytes[i - 3] == 13 { return i + 1 }
            i += 1
        case 13: i += 1
        default: i += 2  // a match ending at i + 1 needs a CR here
        }
    }
    return nil
}

/// The Content-Length of a head (0 without one); nil if the message is
/// framed otherwise (chunked), which this proxy does not do.
func bodyLength(_ bytes: UnsafeRawBufferPointer, head: Int) -> Int? {
    let name = Array("content-length:".utf8), chunked = Array("transfer-encoding:".utf8)
    func field(at i: Int, _ key: [UInt8]) -> Bool {
        guard head - i > key.count else { return false }
        for k in 0..<key.count where bytes[i + k] | 0x20 != key[k] | 0x20 { return false }
        return true
    }
    var i = 1
    while i < head {
        if bytes[i - 1] == 10 {
            if field(at: i, chunked) { return nil }
            if field(at: i, name) {
                var j = i + name.count, value = 0
                while j < head && bytes[j] == 32 { j += 1 }
                while j < head, bytes[j] >= 48, bytes[j] <= 57 { value = value * 10 + Int(bytes[j] - 48); j += 1 }
                return value
            }
        }
        i += 1
    }
    return 0
}

/// The backend side: forwards what it reads to the client and counts the
/// response's bytes to know when it is complete.
final class BackendSide: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    unowned let client: ClientSide
    private var head = ByteBuffer()
    private var remaining = -1  // bytes of body still to come; -1 while reading a head

    init(client: ClientSide) { self.client = client }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = Self.unwrapInboundIn(data)
        client.forward(bytes)
        while bytes.readableBytes > 0 {
            if remaining < 0 {
                head.writeBuffer(&bytes)
                let framing = head.withUnsafeReadableBytes { p in headLength(p).map { ($0, bodyLength(p, head: $0)) } }
                guard let (length, body) = framing else { return }
                guard let body else { return client.close() }
                let extra = head.readableBytes - length
                head.clear()
                guard extra <= body else { return client.close() }  // more than one response: none was asked for
                remaining = body - extra
            } else {
                let n = min(remaining, bytes.readableBytes)
                bytes.moveReaderIndex(forwardBy: n)
                remaining -= n
                if bytes.readableBytes > 0 { return client.close() }
            }
            if remaining == 0 {
                remaining = -1
                client.responseDone()
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) { client.flush() }
    func channelInactive(context: ChannelHandlerContext) { client.close() }
}

/// The client side: one request at a time to the backend, with the two
/// headers added in the copy of the head it sends.
final class ClientSide: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let backend: SocketAddress
    private var context: ChannelHandlerContext?
    private var upstream: Channel?
    private var pending = ByteBuffer()
    private var inFlight = false
    private var forwardedFor = ""
    private var sequence: UInt64 = 0

    init(backend: SocketAddress) { self.backend = backend }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        forwardedFor = "X-Forwarded-For: \(context.channel.remoteAddress?.ipAddress ?? "unknown")\r\nX-Request-ID: "
        let side = NIOLoopBound(BackendSide(client: self), eventLoop: context.eventLoop)
        ClientBootstrap(group: context.eventLoop)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(side.value) }
            }
            .connect(to: backend).assumeIsolated().whenComplete { result in
                switch result {
                case .success(let channel):
                    self.upstream = channel
                    self.send()
                case .failure:
                    context.close(promise: nil)
                }
            }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = Self.unwrapInboundIn(data)
        pending.writeBuffer(&bytes)
        send()
    }

    func channelInactive(context: ChannelHandlerContext) {
        upstream?.close(promise: nil)
        self.context = nil
    }

    /// Sends the next complete request, if there is one and none is out.
    private func send() {
        guard !inFlight, let upstream, let context else { return }
        let framing = pending.withUnsafeReadableBytes { p in headLength(p).map { ($0, bodyLength(p, head: $0)) } }
        guard let (length, body) = framing else { return }
        guard let body else { return close() }
        guard pending.readableBytes >= length + body else { return }
        sequence &+= 1
        var out = context.channel.allocator.buffer(capacity: length + body + forwardedFor.utf8.count + 24)
        out.writeImmutableBuffer(pending.getSlice(at: pending.readerIndex, length: length - 2)!)
        out.writeString(forwardedFor)
        out.writeString(String(sequence, radix: 16))
        out.writeImmutableBuffer(pending.getSlice(at: pending.readerIndex + length - 4, length: 4 + body)!)
        pending.moveReaderIndex(forwardBy: length + body)
        pending.discardReadBytes()
        inFlight = true
        upstream.writeAndFlush(out, promise: nil)
    }

    func forward(_ bytes: ByteBuffer) { context?.write(Self.wrapOutboundOut(bytes), promise: nil) }
    func flush() { context?.flush() }
    func close() { context?.close(promise: nil) }
    func responseDone() {
        inFlight = false
        send()
    }
}

let arguments = CommandLine.arguments
guard arguments.count >= 5, let port = Int(arguments[2]), let backendPort = Int(arguments[4]) else {
    let usage = "usage: weft-proxy-floor LISTEN_ADDRESS LISTEN_PORT BACKEND_ADDRESS BACKEND_PORT [THREADS]\n"
    _ = usage.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
    exit(2)
}
let backend = try SocketAddress(ipAddress: arguments[3], port: backendPort)
let group = MultiThreadedEventLoopGroup(numberOfThreads: arguments.count > 5 ? Int(arguments[5]) ?? 2 : 2)
let server = try ServerBootstrap(group: group)
    .serverChannelOption(ChannelOptions.backlog, value: 1024)
    .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
    .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
    .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ClientSide(backend: backend)) }
    }
    .bind(host: arguments[1], port: port).wait()
try server.closeFuture.wait()
