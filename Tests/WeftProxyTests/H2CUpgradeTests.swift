import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP1
import Testing
@testable import WeftProxy

/// The h2c Upgrade's pieces: which requests it takes, the frames the
/// upgrade request becomes (stream 1), and where H2CUpgradeStream puts them
/// in the client's bytes, however the reads cut them. The whole switch runs
/// end to end in ProxyTests (curl --http2, nghttp -u) and MeshTLSTests
/// (--no-express).
@Suite struct H2CUpgradeTests {
    /// What curl --http2 sends.
    static func curlHead(_ extra: [(String, String)] = [], uri: String = "/x?y=1") -> HTTPRequestHead {
        var headers = HTTPHeaders([("Host", "svc.example"), ("User-Agent", "curl/7.88.1"), ("Accept", "*/*"),
                                   ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                                   ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA")])
        headers.add(contentsOf: extra)
        return HTTPRequestHead(version: .http1_1, method: .GET, uri: uri, headers: headers)
    }

    @Test func takesWhatCurlSendsAndDeclinesTheRest() {
        #expect(H2CUpgrade.accepts(Self.curlHead()))
        #expect(H2CUpgrade.accepts(Self.curlHead([("Content-Length", "0")])))
        func without(_ name: String) -> HTTPRequestHead {
            var h = Self.curlHead()
            h.headers.remove(name: name)
            return h
        }
        // A body of a content-length up to a stream's first window (curl --http2 -d).
        #expect(H2CUpgrade.accepts(Self.curlHead([("Content-Length", "2")])))
        #expect(H2CUpgrade.accepts(Self.curlHead([("Content-Length", "65535")])))
        var declined: [(String, HTTPRequestHead)] = [
            ("a body over a stream's first window", Self.curlHead([("Content-Length", "65536")])),
            ("a body far over it", Self.curlHead([("Content-Length", "99999999999999999999999")])),
            ("two lengths", Self.curlHead([("Content-Length", "2"), ("Content-Length", "2")])),
            ("a length not of digits alone", Self.curlHead([("Content-Length", "+2")])),
            ("a body waiting for 100 Continue", Self.curlHead([("Content-Length", "2"), ("Expect", "100-continue")])),
            ("a chunked body", Self.curlHead([("Transfer-Encoding", "chunked")])),
            ("no HTTP2-Settings", without("http2-settings")),
            ("two HTTP2-Settings", Self.curlHead([("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA")])),
            ("empty settings (token68 is one character or more)", Self.curlHead().replacing("http2-settings", "")),
            ("Connection without HTTP2-Settings", Self.curlHead().replacing("connection", "Upgrade")),
            ("Connection without upgrade", Self.curlHead().replacing("connection", "HTTP2-Settings")),
            ("no Host", without("host")),
            ("absolute form", Self.curlHead(uri: "http://svc.example/x")),
            ("settings not base64url", Self.curlHead().replacing("http2-settings", "AAMAAABk+AQCAAAAAAIAAAAA")),
            ("settings padded", Self.curlHead().replacing("http2-settings", "AAMAAABkAAQCAAAAAAIAAA==")),
            ("settings not 6-byte entries", Self.curlHead().replacing("http2-settings", "AAMAAABkAAQC")),
            ("websocket", Self.curlHead().replacing("upgrade", "websocket")),
        ]
        var old = Self.curlHead()
        old.version = .http1_0
        declined.append(("HTTP/1.0", old))
        for (why, head) in declined { #expect(!H2CUpgrade.accepts(head), "\(why)") }
        // Two or three digits end a group of one or two bytes.
        #expect(H2CUpgrade.accepts(Self.curlHead().replacing("http2-settings", "AAMAAABkAAQ")) == false)
        #expect(H2CUpgrade.validSettings("AAMAAABk"))
        #expect(!H2CUpgrade.validSettings("AAMAAAB"))
        #expect(H2CUpgrade.asks(Self.curlHead([("Content-Length", "2")])))
        #expect(!H2CUpgrade.asks(Self.curlHead().replacing("upgrade", "websocket")))
    }

    /// Splits `frames` into (type, flags, stream, payload).
    static func frames(_ bytes: ByteBuffer) -> [(UInt8, UInt8, UInt32, ByteBuffer)] {
        var b = bytes
        var out: [(UInt8, UInt8, UInt32, ByteBuffer)] = []
        while b.readableBytes >= 9, let word = b.readInteger(as: UInt32.self), let flags = b.readInteger(as: UInt8.self),
              let stream = b.readInteger(as: UInt32.self), let payload = b.readSlice(length: Int(word >> 8)) {
            out.append((UInt8(word & 0xFF), flags, stream, payload))
        }
        #expect(b.readableBytes == 0)
        return out
    }

    static func decode(_ block: ByteBuffer) throws -> [[String]] {
        var block = block
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator(), maxDynamicTableSize: 4096, maxHeaderListSize: .max)
        let fields = try decoder.decodeHeaders(from: &block)
        return fields.map { [$0.name, $0.value] }
    }

    @Test func theRequestBecomesStreamOne() throws {
        let head = Self.curlHead([("X-Canary", "yes"), ("Keep-Alive", "5"), ("TE", "trailers"), ("Proxy-Connection", "x")])
        let frames = Self.frames(H2CUpgrade.requestFrames(head, allocator: ByteBufferAllocator()))
        try #require(frames.count == 1)
        let (type, flags, stream, block) = frames[0]
        #expect(type == 0x1 && flags == 0x5 && stream == 1, "HEADERS, END_STREAM | END_HEADERS, stream 1")
        #expect(try Self.decode(block) == [[":method", "GET"], [":scheme", "http"], [":authority", "svc.example"],
                                           [":path", "/x?y=1"], ["user-agent", "curl/7.88.1"], ["accept", "*/*"],
                                           ["x-canary", "yes"], ["te", "trailers"]])
        // TE other than trailers is connection-specific in HTTP/2.
        let te = Self.frames(H2CUpgrade.requestFrames(Self.curlHead([("TE", "gzip")]), allocator: ByteBufferAllocator()))
        #expect(try !Self.decode(te[0].3).contains { $0[0] == "te" })
    }

    @Test func aLargeHeadGoesOnInContinuations() throws {
        let big = String(repeating: "v", count: 40_000)
        let frames = Self.frames(H2CUpgrade.requestFrames(Self.curlHead([("x-big", big)]), allocator: ByteBufferAllocator()))
        #expect(frames.map(\.0) == [0x1, 0x9, 0x9], "HEADERS, CONTINUATION, CONTINUATION")
        #expect(frames.map(\.1) == [0x1, 0x0, 0x4], "END_STREAM on HEADERS, END_HEADERS on the last")
        #expect(frames.allSatisfy { $0.2 == 1 && $0.3.readableBytes <= 16_384 })
        var block = ByteBuffer()
        for f in frames { block.writeImmutableBuffer(f.3) }
        #expect(try Self.decode(block).last == ["x-big", big])
    }

    /// A body goes on after the head as DATA frames of 16,384 bytes at
    /// most, END_STREAM on the last (and not on HEADERS).
    @Test func aBodyFollowsInDataFrames() throws {
        let body = ByteBuffer(bytes: (0..<40_000).map { UInt8(truncatingIfNeeded: $0 * 7) })
        let head = Self.curlHead([("Content-Length", "40000"), ("Content-Type", "application/octet-stream")])
        var post = head
        post.method = .POST
        let frames = Self.frames(H2CUpgrade.requestFrames(post, body: body, allocator: ByteBufferAllocator()))
        #expect(frames.map(\.0) == [0x1, 0x0, 0x0, 0x0], "HEADERS, then DATA x 3")
        #expect(frames.map(\.1) == [0x4, 0x0, 0x0, 0x1], "END_HEADERS alone on HEADERS, END_STREAM on the last DATA")
        #expect(frames.map { $0.3.readableBytes }.dropFirst() == [16_384, 16_384, 7_232])
        #expect(frames.allSatisfy { $0.2 == 1 })
        var data = ByteBuffer()
        for f in frames.dropFirst() { data.writeImmutableBuffer(f.3) }
        #expect(data == body)
        #expect(try Self.decode(frames[0].3).contains(["content-length", "40000"]))
        #expect(try Self.decode(frames[0].3).first == [":method", "POST"])
        // An empty body is none: END_STREAM on HEADERS, no DATA.
        let empty = Self.frames(H2CUpgrade.requestFrames(head, body: ByteBuffer(), allocator: ByteBufferAllocator()))
        #expect(empty.map(\.0) == [0x1] && empty.map(\.1) == [0x5])
    }

    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    /// The client's bytes after the 101: preface, SETTINGS (two entries),
    /// WINDOW_UPDATE, and a HEADERS of stream 3 (a made-up payload).
    static let client: [UInt8] = preface
        + [0, 0, 12, 0x4, 0, 0, 0, 0, 0] + [0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0]
        + [0, 0, 4, 0x8, 0, 0, 0, 0, 0] + [0, 0x0F, 0, 1]
        + [0, 0, 3, 0x1, 0x5, 0, 0, 0, 3] + [0x82, 0x86, 0x84]
    static let settingsEnd = preface.count + 9 + 12

    /// Feeds `pieces` through an H2CUpgradeStream (the first `held` of them
    /// before start) and returns every byte it passed on.
    static func run(_ pieces: [[UInt8]], held: Int = 0, request: [UInt8]) throws -> [UInt8] {
        let channel = EmbeddedChannel()
        let stream = H2CUpgradeStream(request: ByteBuffer(bytes: request))
        try channel.pipeline.syncOperations.addHandler(stream)
        for (i, piece) in pieces.enumerated() {
            if i == held { stream.start() }
            try channel.writeInbound(ByteBuffer(bytes: piece))
        }
        if pieces.count <= held { stream.start() }
        var out: [UInt8] = []
        while let b = try channel.readInbound(as: ByteBuffer.self) { out += b.readableBytesView }
        _ = try channel.finish()
        return out
    }

    @Test func theRequestGoesRightAfterTheClientsSettingsWhereverTheReadsEnd() throws {
        let request: [UInt8] = [0, 0, 1, 0x1, 0x5, 0, 0, 0, 1, 0x82]
        let want = Array(Self.client[..<Self.settingsEnd]) + request + Array(Self.client[Self.settingsEnd...])
        #expect(try Self.run([Self.client], request: request) == want)
        // Cut in two at every byte, and a byte at a time.
        for cut in 1..<Self.client.count {
            let pieces = [Array(Self.client[..<cut]), Array(Self.client[cut...])]
            #expect(try Self.run(pieces, request: request) == want, "cut at \(cut)")
            #expect(try Self.run(pieces, held: 1, request: request) == want, "cut at \(cut), the first piece held")
        }
        #expect(try Self.run(Self.client.map { [$0] }, request: request) == want)
        // Everything read before the HTTP/2 handlers were there waits for them.
        #expect(try Self.run([Self.client], held: 1, request: request) == want)
    }

    /// Records the quiesce event and where in the bytes it came.
    final class Tail: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        var bytes: [UInt8] = []
        var quiescedAt: Int?
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { bytes += Self.unwrapInboundIn(data).readableBytesView }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if event is ChannelShouldQuiesceEvent { quiescedAt = bytes.count }
        }
    }

    @Test func aDrainBeforeStreamOneIsInIsPassedOnAfterIt() throws {
        let request: [UInt8] = [0, 0, 1, 0x1, 0x5, 0, 0, 0, 1, 0x82]
        let channel = EmbeddedChannel()
        let stream = H2CUpgradeStream(request: ByteBuffer(bytes: request))
        let tail = Tail()
        try channel.pipeline.syncOperations.addHandlers([stream, tail])
        stream.start()
        try channel.writeInbound(ByteBuffer(bytes: Self.client[..<10]))
        channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        #expect(tail.quiescedAt == nil, "held until stream 1 is in")
        try channel.writeInbound(ByteBuffer(bytes: Self.client[10...]))
        #expect(tail.quiescedAt == Self.client.count + request.count)
        // Once it has left, events pass straight on.
        tail.quiescedAt = nil
        channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        #expect(tail.quiescedAt == Self.client.count + request.count)
        _ = try channel.finish()
    }

    @Test func aConnectionThatDoesNotBeginWithSettingsPassesAsItCame() throws {
        // HEADERS first: the codec refuses the connection, nothing is added.
        let bad = Self.preface + [0, 0, 3, 0x1, 0x5, 0, 0, 0, 3, 0x82, 0x86, 0x84]
        #expect(try Self.run([bad], request: [1, 2, 3]) == bad)
        #expect(try Self.run(bad.map { [$0] }, request: [1, 2, 3]) == bad)
    }
}

private extension HTTPRequestHead {
    func replacing(_ name: String, _ value: String) -> HTTPRequestHead {
        var h = self
        h.headers.replaceOrAdd(name: name, value: value)
        return h
    }
}
