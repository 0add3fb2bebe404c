import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing
@testable import WeftProxy

/// HTTP2Fields stands in for NIOHTTP2Handler's header-block validation on
/// the express path's connections. NIO's own check is the reference here: a
/// client that checks nothing sends random blocks to a server NIOHTTP2Handler
/// that checks them (requests and trailers), and that server sends random
/// response blocks; what NIO lets through, and only that, HTTP2Fields must
/// call valid.
@Suite struct HTTP2FieldTests {
    /// A client NIOHTTP2Handler that checks nothing and a server one that
    /// checks every block, joined byte for byte.
    private struct Pair {
        let link = EmbeddedLink()
        var client: EmbeddedChannel { link.client }
        var server: EmbeddedChannel { link.server }

        init() throws {
            try link.client.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client, headerBlockValidation: .disabled,
                                                                               contentLengthValidation: .disabled))
            // (Announcing extended CONNECT, as the proxy's client-facing
            // connections do: RFC 8441's `:protocol`.)
            let settings = nioDefaultSettings + [HTTP2Setting(parameter: .enableConnectProtocol, value: 1)]
            try link.server.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: settings))
            try link.connect()
        }

        func shuttle() { link.shuttle() }

        /// Whether the server passed a HEADERS frame of `stream` up its pipeline.
        func serverGotHeaders(on stream: HTTP2StreamID) -> Int {
            var count = 0
            while let frame = try? server.readInbound(as: HTTP2Frame.self) {
                if frame.streamID == stream, case .headers = frame.payload { count += 1 }
            }
            return count
        }

        func finish() { link.finish() }
    }

    // (No upper-case spelling of a name HPACK's tables hold, as "User-Agent":
    // the client's encoder would send it as the table's lower-case name.)
    private static let names = [":path", ":method", ":scheme", ":authority", ":status", ":protocol", ":bogus", ":Bogus", ":",
                                "te", "connection", "keep-alive", "upgrade", "proxy-connection", "transfer-encoding",
                                "x-a", "accept", "cookie", "X-Upper", "x a", "x\u{7f}", "é", "", "x_y", "^`|~!#$%&'*+-.",
                                "x:y", "x\"y", "0"]
    private static let values = ["", "trailers", "CONNECT", "GET", "/", "/p q", "a\u{0}b", "a\rb", "a\nb", "ok",
                                 " padded ", "\u{7f}", "é", "x\ty", "http", "200", "a long value that goes past eight bytes",
                                 "a long value with a\rCR past eight", "0123456789abcdef\n", "Trailers"]
    /// Content-Length as NIO reads it: lists, blanks, signs, junk.
    private static let lengths = ["0", "0, 0", " 0 ", "5", "5, 5", "5,6", " 7\t", ",", "", "+5", "-1", "-0", "5x", "99999999999999999999",
                                  ",5,,5,", "05", "6"]

    /// A block: often a plausible start (the pseudo-headers a `kind` needs,
    /// in random order, some left out), then random fields.
    private static func block(_ kind: HTTP2Fields.Block, _ rng: inout LoopRandom) -> HPACKHeaders {
        var fields: [(String, String)] = []
        if rng.next() % 4 != 0 {
            switch kind {
            case .request:
                let method = rng.next() % 5 == 0 ? "CONNECT" : "GET"
                var start = [(":method", method), (":scheme", "http"), (":path", "/x"), (":authority", "a.b")]
                // RFC 8441's pseudo-header: on a CONNECT often, now and then elsewhere.
                if rng.next() % (method == "CONNECT" ? 2 : 12) == 0 { start.append((":protocol", "websocket")) }
                start.shuffle(using: &rng)
                fields = start.filter { _ in rng.next() % 6 != 0 }
            case .response:
                fields = [(":status", "200")]
            case .trailers:
                break
            }
        }
        for _ in 0..<Int(rng.next() % 4) {
            let name = names[Int(rng.next() % UInt64(names.count))]
            let value = values[Int(rng.next() % UInt64(values.count))]
            // A field at a random place (a pseudo-header after a regular one too).
            fields.insert((name, value), at: Int(rng.next() % UInt64(fields.count + 1)))
        }
        // Often one or two content-length fields, last (where they are not
        // out of place).
        for _ in 0..<[0, 0, 0, 1, 1, 2][Int(rng.next() % 6)] {
            fields.append(("content-length", lengths[Int(rng.next() % UInt64(lengths.count))]))
        }
        return HPACKHeaders(fields)
    }

    /// RFC 8441's extended CONNECT, which the random blocks above seldom
    /// make whole: `:protocol` on a CONNECT with `:scheme` and `:path`
    /// (`:authority` or not) is taken, anywhere else refused, by both.
    @Test func extendedConnectBlocksAgreeWithNIO() throws {
        let base = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"), (":path", "/ws"), (":authority", "a.b")]
        let cases: [(String, [(String, String)])] = [
            ("whole", base),
            ("no :authority", base.filter { $0.0 != ":authority" }),
            ("fields after", base + [("sec-websocket-version", "13"), ("origin", "http://a.b")]),
            ("no :path", base.filter { $0.0 != ":path" }),
            ("no :scheme", base.filter { $0.0 != ":scheme" }),
            ("on a GET", [(":method", "GET")] + base.dropFirst()),
            ("twice", base + [(":protocol", "websocket")]),
            ("after a field", base.filter { $0.0 != ":protocol" } + [("x-a", "b"), (":protocol", "websocket")]),
            ("empty", base.map { $0.0 == ":protocol" ? ($0.0, "") : $0 }),
            ("a plain CONNECT", [(":method", "CONNECT"), (":authority", "a.b:443")]),
        ]
        var taken = 0
        for (name, fields) in cases {
            let pair = try Pair()
            defer { pair.finish() }
            let block = HPACKHeaders(fields)
            pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: block))), promise: nil)
            pair.shuttle()
            let nio = pair.serverGotHeaders(on: 1) == 1
            var declared: Int?
            let ours = HTTP2Fields.valid(block, .request, contentLength: &declared, extendedConnect: true)
            #expect(ours == nio, "\(name): NIO says \(nio), HTTP2Fields \(ours)")
            // Where extended CONNECT is not announced (a tunnel), none is.
            if fields.contains(where: { $0.0 == ":protocol" }) {
                #expect(!HTTP2Fields.valid(block, .request, contentLength: &declared), "\(name)")
            }
            if nio { taken += 1 }
        }
        // (An empty `:protocol` passes both, as any pseudo-header value
        // may be empty but `:path`'s; ExtendedConnect.Stream takes only a
        // token, and leaves the rest to the full path's 405 for a CONNECT.)
        #expect(taken == 5, "whole, no :authority, fields after, empty and a plain CONNECT: \(taken)")
    }

    @Test func http2FieldChecksAgreeWithNIO() throws {
        var rng = LoopRandom(seed: 0x4832)  // the same blocks on every run
        var verdicts: [HTTP2Fields.Block: [Bool: Int]] = [:]
        for round in 0..<3_000 {
            let kind: HTTP2Fields.Block = [.request, .response, .trailers][round % 3]
            let block = Self.block(kind, &rng)
            let pair = try Pair()
            defer { pair.finish() }
            let stream = HTTP2StreamID(1)
            let request = HPACKHeaders([(":method", "POST"), (":scheme", "http"), (":path", "/"), (":authority", "a")])
            let ends = rng.next() % 2 == 0  // a request that ends with its block, or one whose body follows
            let nio: Bool
            switch kind {
            case .request:
                pair.client.writeAndFlush(HTTP2Frame(streamID: stream, payload: .headers(.init(headers: block, endStream: ends))),
                                          promise: nil)
                pair.shuttle()
                nio = pair.serverGotHeaders(on: stream) == 1
            case .trailers:
                pair.client.writeAndFlush(HTTP2Frame(streamID: stream, payload: .headers(.init(headers: request))), promise: nil)
                pair.client.writeAndFlush(HTTP2Frame(streamID: stream, payload: .headers(.init(headers: block, endStream: true))),
                                          promise: nil)
                pair.shuttle()
                nio = pair.serverGotHeaders(on: stream) == 2
            case .response:
                pair.client.writeAndFlush(HTTP2Frame(streamID: stream, payload: .headers(.init(headers: request, endStream: true))),
                                          promise: nil)
                pair.shuttle()
                _ = pair.serverGotHeaders(on: stream)
                let sent = pair.server.eventLoop.makePromise(of: Void.self)
                pair.server.writeAndFlush(HTTP2Frame(streamID: stream, payload: .headers(.init(headers: block))), promise: sent)
                pair.shuttle()
                nio = (try? sent.futureResult.wait()) != nil
            }
            // (A request that ends with its block may not declare a body.)
            var declared: Int?
            let ours = HTTP2Fields.valid(block, kind, contentLength: &declared, extendedConnect: true)
                && !(kind == .request && ends && (declared ?? 0) != 0)
            #expect(ours == nio, "\(kind) block \(Array(block.map { "\($0.name): \($0.value)" })): NIO says \(nio), HTTP2Fields \(ours)")
            verdicts[kind, default: [:]][nio, default: 0] += 1
        }
        // Both verdicts were reached for every kind, often enough to mean something.
        for kind in [HTTP2Fields.Block.request, .response, .trailers] {
            #expect((verdicts[kind]?[true] ?? 0) >= 50 && (verdicts[kind]?[false] ?? 0) >= 50, "\(kind): \(verdicts[kind] ?? [:])")
        }
    }

    /// DeclaredBody against NIO's content-length check: a request declaring
    /// a length, then DATA frames of random sizes, ended by the last one,
    /// by trailers, or not at all. NIO resets the stream where DeclaredBody
    /// refuses a frame, and only there.
    @Test func declaredBodiesAreHeldAsNIOHoldsThem() throws {
        var rng = LoopRandom(seed: 0xB0D7)  // the same streams on every run
        var verdicts: [Bool: Int] = [:]
        for round in 0..<600 {
            let pair = try Pair()
            defer { pair.finish() }
            let stream = HTTP2StreamID(1)
            let length = Int(rng.next() % 12)
            let request = HPACKHeaders([(":method", "POST"), (":scheme", "http"), (":path", "/"), (":authority", "a"),
                                        ("content-length", String(length))])
            var frames: [HTTP2Frame.FramePayload] = [.headers(.init(headers: request))]
            // (Never two empty frames in a row: NIO ends the connection for
            // that, a verdict of its own.)
            var sizes: [Int] = []
            for _ in 0..<Int(rng.next() % 4) { sizes.append(Int(rng.next() % 8) + (sizes.last == 0 ? 1 : 0)) }
            let ending = rng.next() % 3  // 0: the last DATA frame, 1: trailers, 2: not ended
            for (i, n) in sizes.enumerated() {
                let last = i == sizes.count - 1 && ending == 0
                frames.append(.data(.init(data: .byteBuffer(ByteBuffer(repeating: 120, count: n)), endStream: last)))
            }
            if ending == 1 || (ending == 0 && sizes.isEmpty) {
                frames.append(.headers(.init(headers: HPACKHeaders([("x-t", "1")]), endStream: true)))
            }
            var body = DeclaredBody(length: length)
            var ours = true
            for frame in frames.dropFirst() where ours { ours = body.hold(frame) }
            for frame in frames {
                pair.client.writeAndFlush(HTTP2Frame(streamID: stream, payload: frame), promise: nil)
            }
            pair.shuttle()
            _ = pair.serverGotHeaders(on: stream)
            var reset = false
            while let frame = try? pair.client.readInbound(as: HTTP2Frame.self) {
                if frame.streamID == stream, case .rstStream = frame.payload { reset = true }
            }
            #expect(ours == !reset, "round \(round): content-length \(length), DATA \(sizes), ending \(ending): NIO reset \(reset)")
            verdicts[!reset, default: 0] += 1
        }
        #expect((verdicts[true] ?? 0) >= 100 && (verdicts[false] ?? 0) >= 100, "\(verdicts)")
    }

    @Test func theFullPathsOutgoingBlocksAreChecked() throws {
        let channel = EmbeddedChannel(handler: HTTP2FieldCheck())
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let good = HPACKHeaders([(":status", "200"), ("x-a", "b")])
        try channel.writeOutbound(HTTP2Frame.FramePayload.headers(.init(headers: good)))
        #expect(try channel.readOutbound(as: HTTP2Frame.FramePayload.self) != nil)
        let trailers = HPACKHeaders([("grpc-status", "0")])
        try channel.writeOutbound(HTTP2Frame.FramePayload.headers(.init(headers: trailers, endStream: true)))
        #expect(try channel.readOutbound(as: HTTP2Frame.FramePayload.self) != nil)
        let bad = HPACKHeaders([(":status", "200"), ("x-a", "b\r\nx-injected: yes")])
        #expect(throws: MalformedFieldBlock.self) {
            try channel.writeOutbound(HTTP2Frame.FramePayload.headers(.init(headers: bad)))
        }
        #expect(try channel.readOutbound(as: HTTP2Frame.FramePayload.self) == nil, "a malformed block went out")
        #expect(!channel.isActive, "the stream was not reset")
    }
}
