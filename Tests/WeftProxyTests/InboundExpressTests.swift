import Logging
import NIOCore
import NIOEmbedded
import Testing
import WeftCore
@testable import WeftProxy

/// The destination end's express path for the HTTP/1.1 another node's proxy
/// wrote into a tunnel stream (ExpressHTTP1Handler, delivering), on an
/// embedded stream: AuthorizationPolicy judges each request as it comes, the
/// answers keep the requests' order and the connection lives as they say,
/// and what the express path does not take goes to InboundHTTP behind NIO's
/// codec. (An allowed request goes to the pod over a socket; the end-to-end
/// authorization test covers those.)
@Suite struct InboundExpressTests {
    static let config = """
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: api, namespace: shop, labels: {app: api}}
        spec: {node: n2, address: 198.18.2.10, serviceAccount: api}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: web, namespace: shop, labels: {app: web}}
        spec: {node: n1, address: 198.18.1.10, serviceAccount: web}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: AuthorizationPolicy
        metadata: {name: api-allow, namespace: shop}
        spec:
          selector: {matchLabels: {app: api}}
          rules:
          - to: [{operation: {paths: [/only-this]}}]
        """

    struct Stream {
        let channel = EmbeddedChannel()
        let proxy: ProxyContext
        /// Records a half-close as the tunnel stream takes it (END_STREAM).
        let halfClose = HTTP1ServerPipelineTests.HalfClose()

        init() throws {
            proxy = try embeddedProxy(node: "n2", address: "198.18.2.1", config: Self.config, on: channel)
            try channel.pipeline.syncOperations.addHandler(halfClose)
            let who = AuthorizationRequest(principal: "cluster.local/ns/shop/sa/web", namespace: "shop",
                                           sourceIP: IPv4Address("198.18.1.10")!, port: 8080)
            let pod = EndpointKey(ip: IPv4Address("198.18.2.10")!, port: 8080, node: "n2")
            try channel.pipeline.syncOperations.addHandler(ExpressHTTP1Handler(proxy: proxy, delivering: who, to: pod))
            try channel.connect(to: SocketAddress(ipAddress: "198.18.2.10", port: 8080)).wait()
        }

        static let config = InboundExpressTests.config

        func send(_ text: String) throws {
            try channel.writeInbound(channel.allocator.buffer(string: text))
            channel.embeddedEventLoop.run()
        }

        /// Everything written back so far, as text.
        func answers() throws -> String {
            var out = ""
            // (ByteBuffers from the express path, IOData from NIO's encoder.)
            while let item = try channel.readOutbound(as: Any.self) {
                if let b = item as? ByteBuffer { out += String(buffer: b) }
                if case .byteBuffer(let b)? = item as? IOData { out += String(buffer: b) }
            }
            return out
        }

        var judged: Int { proxy.stats.tunnelRequestsExpress.load(ordering: .relaxed) }
    }

    /// Two requests in one read, then a third: each denied with the reason,
    /// in order, on a connection that stays open.
    @Test func deniedRequestsAreAnsweredInOrderAndTheStreamStaysOpen() throws {
        let s = try Stream()
        defer { _ = try? s.channel.finish() }
        try s.send("GET /a HTTP/1.1\r\nhost: api\r\nx-forwarded-for: 198.18.1.10\r\n\r\n"
                   + "POST /b HTTP/1.1\r\nhost: api\r\ncontent-length: 5\r\n\r\nhello")
        try s.send("HEAD /c HTTP/1.1\r\nhost: api\r\n\r\n")
        let out = try s.answers()
        // (A body ends with "\n", so the next status line follows it directly.)
        #expect(out.components(separatedBy: "HTTP/1.1 ").count == 4 && out.hasPrefix("HTTP/1.1 403 Forbidden\r\n"), "\(out)")
        #expect(out.components(separatedBy: "HTTP/1.1 403 Forbidden\r\n").count == 4, "\(out)")
        #expect(out.contains("x-weft-authz: denied") && out.contains("RBAC: access denied"), "\(out)")
        // Two bodies, not three: HEAD is answered without one.
        #expect(out.components(separatedBy: "RBAC: access denied").count == 3, "\(out)")
        #expect(!out.contains("connection: close"), "\(out)")
        #expect(s.channel.isActive)
        #expect(s.judged == 3)
    }

    /// A request that asks to close: its answer says so and the stream
    /// ends with RFC 9112's staged close (output ended behind the answer,
    /// what follows dropped, closed after Express.linger).
    @Test func aRequestThatClosesIsAnsweredThenTheStreamCloses() throws {
        let s = try Stream()
        defer { _ = try? s.channel.finish() }
        try s.send("GET /a HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        let out = try s.answers()
        #expect(out.hasPrefix("HTTP/1.1 403 Forbidden\r\n") && out.contains("connection: close\r\n"), "\(out)")
        #expect(s.halfClose.outputClosed && s.channel.isActive)
        try s.send("GET /b HTTP/1.1\r\nhost: api\r\n\r\n")
        #expect(try s.answers().isEmpty && s.judged == 1, "dropped while lingering")
        s.channel.embeddedEventLoop.advanceTime(by: Express.linger)
        #expect(!s.channel.isActive)
    }

    /// On the full path too (InboundHTTP), a request that asks to close
    /// gets RFC 9112's staged close: its answer, then the stream's output
    /// ended (END_STREAM behind the answer), what the source still sends
    /// read and dropped, and the stream closed after Express.linger or at
    /// the source's end, whichever comes first.
    @Test func theFullPathEndsAStreamWithAStagedClose() throws {
        for sourceEnds in [false, true] {
            let s = try Stream()
            defer { _ = try? s.channel.finish() }
            try s.send("POST /b HTTP/1.1\r\nhost: api\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            let out = try s.answers()
            #expect(out.hasPrefix("HTTP/1.1 403 Forbidden\r\n") && out.contains("connection: close\r\n"), "\(out)")
            #expect((try? s.channel.pipeline.syncOperations.handler(type: InboundHTTP.self)) != nil, "InboundHTTP answered")
            #expect(s.halfClose.outputClosed && s.channel.isActive, "output ended, not closed")
            try s.send("GET /c HTTP/1.1\r\nhost: api\r\n\r\n")
            #expect(try s.answers().isEmpty && s.channel.isActive, "dropped while lingering")
            s.channel.expectLingerEnds(atEOF: sourceEnds)
        }
    }

    /// A request half read waits for the rest (no answer yet); a chunked one
    /// goes to InboundHTTP behind NIO's codec, which judges it the same.
    @Test func aPartialRequestWaitsAndAChunkedOneGoesToTheFullPath() throws {
        let s = try Stream()
        defer { _ = try? s.channel.finish() }
        try s.send("GET /a HTTP/1.1\r\nhost: ap")
        #expect(try s.answers().isEmpty)
        try s.send("i\r\n\r\n")
        #expect(try s.answers().hasPrefix("HTTP/1.1 403 Forbidden\r\n"))
        try s.send("POST /b HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        let out = try s.answers()
        #expect(out.hasPrefix("HTTP/1.1 403 Forbidden\r\n") && out.contains("x-weft-authz: denied"), "\(out)")
        #expect(s.judged == 1, "the chunked request was judged on the full path")
        #expect((try? s.channel.pipeline.syncOperations.handler(type: InboundHTTP.self)) != nil, "InboundHTTP took over")
        #expect(s.channel.isActive)
    }
}
