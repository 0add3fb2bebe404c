import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing
import WeftCore
@testable import WeftProxy

/// The full HTTP/1.1 path's server side (HTTP1ServerPipeline) on an embedded
/// channel, with MeshConfig's head limit at 1 KiB, so heads are read whole up
/// to 2 KiB: what the decoder or HeadBytes refuses is answered 431 (400 for
/// what cannot be parsed) after the response in progress, the connection
/// half-closes, drops what still comes and closes after Express.linger.
@Suite struct HTTP1ServerPipelineTests {
    /// Stands for HTTPProxyHandler: takes requests, answers when told.
    final class Server: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        var heads: [String] = []
        var bodyBytes = 0
        var context: ChannelHandlerContext?
        var lastWrite: EventLoopFuture<Void>?

        func handlerAdded(context: ChannelHandlerContext) { self.context = context }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch Self.unwrapInboundIn(data) {
            case .head(let head): heads.append(head.uri)
            case .body(let body): bodyBytes += body.readableBytes
            case .end: break
            }
        }

        func answer() {
            guard let context else { return }
            let head = HTTPResponseHead(version: .http1_1, status: .ok, headers: ["content-length": "2"])
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: "ok")))), promise: nil)
            lastWrite = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        }
    }

    /// EmbeddedChannel takes any close as a full one: this one records a
    /// half-close as a socket would take it.
    final class HalfClose: ChannelOutboundHandler {
        typealias OutboundIn = Any
        var outputClosed = false

        func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
            guard mode == .output else { return context.close(mode: mode, promise: promise) }
            outputClosed = true
            promise?.succeed(())
        }
    }

    struct Connection {
        let channel = EmbeddedChannel()
        let server = Server()
        let halfClose = HalfClose()
        let proxy: ProxyContext

        init() throws {
            let mesh = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {proxy: {maxRequestHeaderSize: 1Ki}}"
            proxy = try embeddedProxy(node: "n1", address: "198.18.1.1", config: mesh, on: channel)
            try channel.pipeline.syncOperations.addHandler(halfClose)
            try HTTP1ServerPipeline.add(to: channel.pipeline.syncOperations, proxy: proxy, then: server)
            try channel.connect(to: SocketAddress(ipAddress: "198.18.1.10", port: 40000)).wait()
        }

        func send(_ text: String) throws {
            try channel.writeInbound(channel.allocator.buffer(string: text))
            channel.embeddedEventLoop.run()
        }

        func answers() throws -> String {
            var out = ""
            while let item = try channel.readOutbound(as: IOData.self) {
                if case .byteBuffer(let b) = item { out += String(buffer: b) }
            }
            return out
        }

        var refused: Int { proxy.stats.headsTooLarge.load(ordering: .relaxed) }
    }

    static func request(_ path: String = "/", field: Int = 0) -> String {
        "GET \(path) HTTP/1.1\r\nhost: web\r\n" + (field > 0 ? "x-big: " + String(repeating: "a", count: field) + "\r\n" : "") + "\r\n"
    }

    @Test func aHeadUpToTwiceTheLimitIsReadWhole() throws {
        let c = try Connection()
        try c.send(Self.request("/a", field: 1500))  // over 1 KiB: HTTPProxyHandler's to answer
        #expect(c.server.heads == ["/a"])
        #expect(try c.answers() == "" && c.channel.isActive && c.refused == 0)
    }

    @Test func aPipelinedHeadPastTwiceTheLimitIsAnsweredAfterTheResponseInProgress() throws {
        let c = try Connection()
        try c.send(Self.request("/a") + Self.request("/b", field: 3000))
        #expect(c.server.heads == ["/a"])
        #expect(try c.answers() == "", "nothing may go before /a's response")
        c.server.answer()
        c.channel.embeddedEventLoop.run()
        let out = try c.answers()
        #expect(out.hasPrefix("HTTP/1.1 200 OK\r\n"), "\(out)")
        let refusal = out.range(of: "HTTP/1.1 431 Request Header Fields Too Large\r\n")
        #expect(refusal != nil && out.contains("connection: close\r\n")
                && out.hasSuffix("weft: the request head is larger than 1 KiB (MeshConfig spec.proxy.maxRequestHeaderSize)\n"),
                "\(out)")
        #expect(c.refused == 1 && c.halfClose.outputClosed)
        // Lingering: what the client still sends is read and dropped; the
        // server's own writes go nowhere; the close comes after the linger.
        try c.send(Self.request("/c"))
        #expect(c.server.heads == ["/a"])
        c.server.answer()
        c.channel.embeddedEventLoop.run()
        #expect(try c.answers() == "")
        #expect(c.channel.isActive)
        c.channel.embeddedEventLoop.advanceTime(by: Express.linger)
        #expect(!c.channel.isActive)
    }

    @Test func aRequestLineGrowingPastTwiceTheLimitIsRefusedAsItComes() throws {
        let c = try Connection()
        try c.send("GET /" + String(repeating: "a", count: 1500))
        #expect(try c.answers() == "")
        try c.send(String(repeating: "a", count: 1000))  // 2,505 bytes of a head: past 2 KiB
        let out = try c.answers()
        #expect(out.hasPrefix("HTTP/1.1 431 ") && c.refused == 1 && c.server.heads.isEmpty, "\(out)")
    }

    /// HTTP1ServerPipeline.linger, as HTTPProxyHandler ends a connection
    /// after a `Connection: close` response or a 408: the output shut once
    /// the response is out, what the client still sends (a body's rest, a
    /// request pipelined behind) dropped, closed after Express.linger or at
    /// the client's EOF, whichever comes first.
    @Test func theHandlersLingeringCloseShutsTheOutputDropsWhatFollowsAndCloses() throws {
        for eof in [false, true] {
            let c = try Connection()
            try c.send("POST /a HTTP/1.1\r\nhost: web\r\nconnection: close\r\ncontent-length: 100000\r\n\r\n" + String(repeating: "b", count: 1000))
            #expect(c.server.heads == ["/a"] && c.server.bodyBytes == 1000)
            c.server.answer()
            let context = try #require(c.server.context)
            c.server.lastWrite?.assumeIsolated().whenComplete { _ in HTTP1ServerPipeline.linger(context) }
            c.channel.embeddedEventLoop.run()
            #expect(try c.answers().hasPrefix("HTTP/1.1 200 OK\r\n"))
            #expect(c.halfClose.outputClosed && c.channel.isActive)
            try c.send(String(repeating: "b", count: 5000) + Self.request("/b"))
            #expect(c.server.heads == ["/a"] && c.server.bodyBytes == 1000 && c.channel.isActive, "dropped while lingering")
            c.channel.expectLingerEnds(atEOF: eof)
        }
    }

    @Test func aHeadNIOCannotParseIsAnswered400NamingTheFault() throws {
        let c = try Connection()
        try c.send("GET / HTTP/1.1\r\nhost: web\r\nno colon here\r\n\r\n")
        let out = try c.answers()
        #expect(out.hasPrefix("HTTP/1.1 400 Bad Request\r\n") && out.contains("connection: close\r\n")
                && out.contains("weft: the request is not valid HTTP/1.1 ("), "\(out)")
        #expect(c.refused == 0 && c.server.heads.isEmpty && c.halfClose.outputClosed && c.channel.isActive)
    }
}

extension EmbeddedChannel {
    /// A lingering connection's end (RFC 9112's staged close): closed at
    /// the peer's EOF (`atEOF`), or after Express.linger and not before.
    func expectLingerEnds(atEOF eof: Bool, sourceLocation: SourceLocation = #_sourceLocation) {
        if eof {
            pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            embeddedEventLoop.run()
            #expect(!isActive, "not closed at the peer's EOF", sourceLocation: sourceLocation)
        } else {
            embeddedEventLoop.advanceTime(by: Express.linger - .milliseconds(1))
            #expect(isActive, "closed before the linger's end", sourceLocation: sourceLocation)
            embeddedEventLoop.advanceTime(by: .milliseconds(1))
            #expect(!isActive, "not closed after the linger", sourceLocation: sourceLocation)
        }
    }
}
