import Glibc
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing
@testable import WeftProxy

/// HTTP2Codec, Weft's HTTP/2 server side, against NIO's client
/// (NIOHTTP2Handler, which checks what it receives) joined byte for byte,
/// and against raw frames a client that breaks the protocol would send.
@Suite struct HTTP2CodecTests {
    /// Collects what the codec passes up: frames and stream events.
    final class Above: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame
        var frames: [HTTP2Frame] = []
        var created: [HTTP2StreamID] = []
        var closed: [(HTTP2StreamID, HTTP2ErrorCode?)] = []
        var windows: [(HTTP2StreamID, Int?)] = []
        /// Send windows told (outbound sizes), and bulk changes of them.
        var sendWindows: [(HTTP2StreamID, Int)] = []
        var bulkChanges: [Int] = []
        var inputClosed = false

        func channelRead(context: ChannelHandlerContext, data: NIOAny) { frames.append(unwrapInboundIn(data)) }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            switch event {
            case let e as NIOHTTP2StreamCreatedEvent: created.append(e.streamID)
            case let e as StreamClosedEvent: closed.append((e.streamID, e.reason))
            case let e as NIOHTTP2WindowUpdatedEvent:
                if let outbound = e.outboundWindowSize { sendWindows.append((e.streamID, outbound)) }
                if e.inboundWindowSize != nil || e.outboundWindowSize == nil { windows.append((e.streamID, e.inboundWindowSize)) }
            case let e as NIOHTTP2BulkStreamWindowChangeEvent: bulkChanges.append(e.delta)
            case let e as ChannelEvent where e == .inputClosed: inputClosed = true
            default: break
            }
        }

        func take() -> [HTTP2Frame] {
            defer { frames.removeAll() }
            return frames
        }
    }

    /// A NIO client and the codec, joined.
    struct Pair {
        let link = EmbeddedLink()
        var client: EmbeddedChannel { link.client }
        var server: EmbeddedChannel { link.server }
        let above = Above()

        init(clientSettings: HTTP2Settings = nioDefaultSettings, codec: HTTP2Codec.Settings = .h2c) throws {
            try link.client.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client, initialSettings: clientSettings))
            try link.server.pipeline.syncOperations.addHandler(HTTP2Codec(allocator: link.server.allocator, settings: codec))
            try link.server.pipeline.syncOperations.addHandler(above)
            try link.connect()
        }

        func shuttle() { link.shuttle() }

        /// Frames the client's NIOHTTP2Handler passed up (it checked them).
        func clientFrames() -> [HTTP2Frame] {
            var frames: [HTTP2Frame] = []
            while let frame = try? client.readInbound(as: HTTP2Frame.self) { frames.append(frame) }
            return frames
        }

        func request(_ id: HTTP2StreamID, _ headers: HPACKHeaders, end: Bool = true) throws {
            try client.writeAndFlush(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers, endStream: end)))).wait()
            shuttle()
        }

        func finish() { link.finish() }
    }

    static func pairs(_ h: HPACKHeaders) -> [String] { h.map { "\($0.name)=\($0.value)" } }

    static func dataSizes(_ frames: [HTTP2Frame]) -> [Int] {
        frames.compactMap { frame -> Int? in
            guard case .data(let d) = frame.payload else { return nil }
            return d.data.readableBytes
        }
    }

    static let get: HPACKHeaders = [":method": "GET", ":scheme": "http", ":path": "/a?b=c", ":authority": "svc.example",
                                    "user-agent": "test/1.0", "accept": "*/*"]

    @Test func requestsComeUpAsSentAndResponsesGoBackWhole() throws {
        let pair = try Pair()
        defer { pair.finish() }
        // NIO's encoder indexes and Huffman-codes: the second request is
        // mostly references to the codec's dynamic table.
        for id in [1, 3] as [HTTP2StreamID] {
            try pair.request(id, Self.get)
            let frames = pair.above.take()
            #expect(frames.count == 1)
            guard case .headers(let h)? = frames.first?.payload else {
                Issue.record("no HEADERS: \(frames)")
                return
            }
            #expect(h.endStream && Self.pairs(h.headers) == Self.pairs(Self.get), "\(h.headers)")
            #expect(pair.above.created.last == id)
        }
        // Responses in every shape the codec encodes: static-table statuses
        // and others, long values (multi-byte lengths), a body over the
        // frame size, a trailer.
        let body = ByteBuffer(repeating: 7, count: 40_000)
        let response: HPACKHeaders = [":status": "200", "content-type": "text/plain", "x-long": String(repeating: "v", count: 300)]
        try pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: response)))).wait()
        try pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(body))))).wait()
        try pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: ["grpc-status": "0"], endStream: true))))
            .wait()
        try pair.server.writeAndFlush(HTTP2Frame(streamID: 3, payload: .headers(.init(headers: [":status": "418", "x": ""], endStream: true))))
            .wait()
        pair.shuttle()
        var heads: [HTTP2StreamID: [HPACKHeaders]] = [:], received = 0
        for frame in pair.clientFrames() {
            switch frame.payload {
            case .headers(let h): heads[frame.streamID, default: []].append(h.headers)
            case .data(let d): received += d.data.readableBytes
            default: break
            }
        }
        let stream1 = heads[HTTP2StreamID(1)] ?? []
        #expect(stream1.map { block in block.map { $0.name } } == [[":status", "content-type", "x-long"], ["grpc-status"]])
        #expect(stream1.first?.first(name: "x-long")?.count == 300)
        #expect(heads[HTTP2StreamID(3)]?.first?.first(name: ":status") == "418")
        #expect(received == 40_000)
        #expect(Set(pair.above.closed.map(\.0)) == [1, 3] && pair.above.closed.allSatisfy { $0.1 == nil })
    }

    /// What HPACKLiteral writes, NIO's decoder reads back as written, for
    /// random fields of every length.
    @Test func literalBlocksDecodeAsWritten() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var fields = HPACKHeaders()
            fields.add(name: ":status", value: String(Int.random(in: 100...599, using: &rng)))
            for _ in 0..<Int.random(in: 0...12, using: &rng) {
                let name = String((0..<Int.random(in: 1...200, using: &rng)).map { _ in "abcdefghijklmnopqrstuvwxyz-0123456789".randomElement(using: &rng)! })
                let value = String((0..<Int.random(in: 0...3_000, using: &rng)).map { _ in Character(UnicodeScalar(UInt8.random(in: 0x20...0x7E, using: &rng))) })
                fields.add(name: name, value: value)
            }
            var block = ByteBuffer()
            HPACKLiteral.write(fields, into: &block)
            var decoder = HPACKDecoder(allocator: ByteBufferAllocator(), maxDynamicTableSize: 4096, maxHeaderListSize: .max)
            let decoded = try decoder.decodeHeaders(from: &block)
            #expect(Self.pairs(decoded) == Self.pairs(fields))
        }
    }

    /// The codec sends no more than the client's windows allow, holds the
    /// rest with its promise, and sends it as the windows open, in order.
    @Test func flowControlHoldsDataUntilTheWindowsOpen() throws {
        var settings = nioDefaultSettings
        settings.append(HTTP2Setting(parameter: .initialWindowSize, value: 1_000))
        let pair = try Pair(clientSettings: settings)
        defer { pair.finish() }
        try pair.request(1, Self.get)
        try pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"])))).wait()
        let first = ByteBuffer(repeating: 1, count: 3_000), second = ByteBuffer(repeating: 2, count: 500)
        let sent1 = pair.server.eventLoop.makePromise(of: Void.self), sent2 = pair.server.eventLoop.makePromise(of: Void.self)
        var done1 = false, done2 = false
        sent1.futureResult.assumeIsolated().whenSuccess { done1 = true }
        sent2.futureResult.assumeIsolated().whenSuccess { done2 = true }
        pair.server.write(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(first)))), promise: sent1)
        pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(second), endStream: true))), promise: sent2)
        pair.shuttle()
        pair.server.embeddedEventLoop.run()
        func bytes(_ frames: [HTTP2Frame]) -> [UInt8] {
            frames.flatMap { f -> [UInt8] in
                guard case .data(let d) = f.payload, case .byteBuffer(let b) = d.data else { return [] }
                return Array(b.readableBytesView)
            }
        }
        var got = bytes(pair.clientFrames())
        #expect(got.count == 1_000 && !done1 && !done2, "the stream's window is 1,000 bytes")
        try pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .windowUpdate(windowSizeIncrement: 10_000))).wait()
        pair.shuttle()
        pair.server.embeddedEventLoop.run()
        got += bytes(pair.clientFrames())
        #expect(got == Array(repeating: 1, count: 3_000) + Array(repeating: 2, count: 500))
        #expect(done1 && done2)
        #expect(pair.above.closed.map(\.0) == [1])
    }

    /// A closed stream's object is taken again for the next stream
    /// (HTTP2Codec.newStream): the next one starts as new all the same,
    /// with the whole send window and neither side ended.
    @Test func aStreamAfterAClosedOneStartsAfresh() throws {
        var settings = nioDefaultSettings
        settings.append(HTTP2Setting(parameter: .initialWindowSize, value: 1_000))
        let pair = try Pair(clientSettings: settings)
        defer { pair.finish() }
        func answer(_ id: HTTP2StreamID) throws -> [Int] {
            try pair.server.writeAndFlush(HTTP2Frame(streamID: id, payload: .headers(.init(headers: [":status": "200"])))).wait()
            let body = ByteBuffer(repeating: 1, count: 1_000)
            pair.server.writeAndFlush(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(body), endStream: true))),
                                      promise: nil)
            pair.shuttle()
            pair.server.embeddedEventLoop.run()
            return Self.dataSizes(pair.clientFrames())
        }
        try pair.request(1, Self.get)
        #expect(try answer(1) == [1_000], "stream 1 takes its whole window")
        #expect(pair.above.closed.map(\.0) == [1])
        _ = pair.above.take()
        // Stream 3: its body comes after its HEADERS (not ended by the
        // stream before it), then the whole window goes again.
        try pair.request(3, [":method": "POST", ":scheme": "http", ":path": "/", ":authority": "a"], end: false)
        try pair.client.writeAndFlush(HTTP2Frame(streamID: 3, payload: .data(.init(data: .byteBuffer(ByteBuffer(string: "hello")),
                                                                                   endStream: true)))).wait()
        pair.shuttle()
        #expect(Self.dataSizes(pair.above.take()) == [5])
        #expect(try answer(3) == [1_000], "stream 3 has a window of its own")
        #expect(pair.above.closed.map(\.0) == [1, 3])
    }

    /// Stream channels open their windows with WINDOW_UPDATE frames; the
    /// codec tells them each window's size as DATA comes and as they do.
    @Test func inboundWindowsAreReportedAndReopened() throws {
        let pair = try Pair()
        defer { pair.finish() }
        try pair.request(1, [":method": "POST", ":scheme": "http", ":path": "/", ":authority": "a"], end: false)
        try pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 0, count: 16_000)))))).wait()
        pair.shuttle()
        #expect(pair.above.windows.last.map { $0.0 == 1 && $0.1 == 65_535 - 16_000 } == true, "\(pair.above.windows)")
        try pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .windowUpdate(windowSizeIncrement: 16_000))).wait()
        #expect(pair.above.windows.last.map { $0.0 == 1 && $0.1 == 65_535 } == true, "\(pair.above.windows)")
        pair.shuttle()
        // The client's handler took the update: 65,535 more bytes go.
        try pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 0, count: 16_384)))))).wait()
        pair.shuttle()
        #expect(Self.dataSizes(pair.above.take()) == [16_000, 16_384])
    }

    /// With a tunnel's settings (TunnelHTTP2.codec) the codec takes
    /// 1 MiB frames, a 1 MiB stream window and a 4 MiB connection window
    /// from the start, and tells the handlers above (TunnelRelay) when a
    /// send window runs out and when it opens again; PING answers and the
    /// peer's GOAWAY come up (the relay's drain waits for the one).
    @Test func tunnelSettingsTakeLargeFramesAndReportSendWindows() throws {
        var client = nioDefaultSettings
        client.append(HTTP2Setting(parameter: .initialWindowSize, value: 1_000))
        let pair = try Pair(clientSettings: client, codec: TunnelHTTP2.codec)
        defer { pair.finish() }
        try pair.request(1, [":method": "CONNECT", ":authority": "198.18.2.20:8080"], end: false)
        for _ in 0..<3 {
            let piece = ByteBuffer(repeating: 9, count: 300_000)
            try pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(piece))))).wait()
        }
        pair.shuttle()
        #expect(Self.dataSizes(pair.above.take()) == [300_000, 300_000, 300_000], "one frame each, all within the windows")
        #expect(!pair.above.windows.contains { $0.0 == .rootStream }, "the connection's window is the codec's own")

        // The peer's stream window is 1,000 bytes: it runs out, and opens.
        try pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"])))).wait()
        let sent = pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: 3_000))))))
        pair.shuttle()
        #expect(pair.above.sendWindows.map(\.0) == [1] && pair.above.sendWindows.last.map { $0.1 <= 0 } == true,
                "\(pair.above.sendWindows)")
        try pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .windowUpdate(windowSizeIncrement: 100_000))).wait()
        pair.shuttle()
        try sent.wait()
        // (Told as it opened: the 2,000 bytes that waited went after.)
        #expect(pair.above.sendWindows.count == 2 && pair.above.sendWindows.last.map { $0.0 == 1 && $0.1 == 100_000 } == true,
                "\(pair.above.sendWindows)")
        #expect(pair.clientFrames().reduce(0) { n, f in
            guard case .data(let d) = f.payload else { return n }
            return n + d.data.readableBytes
        } == 3_000)
        // A new initial window from the peer: a bulk change of every send window.
        try pair.client.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .settings(.settings([
            HTTP2Setting(parameter: .initialWindowSize, value: 5_000)])))).wait()
        pair.shuttle()
        // (The first: the peer's first SETTINGS, 65,535 to 1,000.)
        #expect(pair.above.bulkChanges == [1_000 - 65_535, 4_000])

        try pair.server.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: 7), ack: false))).wait()
        pair.shuttle()
        try pair.client.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: .rootStream, errorCode: .noError,
                                                                                            opaqueData: nil))).wait()
        pair.shuttle()
        let root = pair.above.take().filter { $0.streamID == .rootStream }.map { frame -> String in
            switch frame.payload {
            case .ping(let d, ack: true): return "ping-ack \(d.integer)"
            case .goAway(_, let code, _): return "goaway \(code)"
            default: return "\(frame.payload)"
            }
        }
        #expect(root == ["ping-ack 7", "goaway \(HTTP2ErrorCode.noError)"])
    }

    /// As a tunnel's source end (role client), against NIO's server,
    /// which checks all it receives: the preface, streams opened by the
    /// HEADERS written for them, the server's head and body coming up,
    /// both ends' END_STREAM closing the stream; after the server's GOAWAY,
    /// the streams above its last ID are refused and no stream opens.
    @Test func asAClientItOpensStreamsAndHonoursGoAway() throws {
        let link = EmbeddedLink()
        defer { link.finish() }
        let above = Above()
        try link.client.pipeline.syncOperations.addHandler(HTTP2Codec(allocator: link.client.allocator, role: .client,
                                                                      settings: TunnelHTTP2.codec))
        try link.client.pipeline.syncOperations.addHandler(above)
        try link.server.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, connectionConfiguration: TunnelHTTP2.connection,
                                                                           streamConfiguration: TunnelHTTP2.stream))
        try link.connect()
        func serverFrames() -> [HTTP2Frame] {
            var frames: [HTTP2Frame] = []
            while let frame = try? link.server.readInbound(as: HTTP2Frame.self) {
                if frame.streamID != .rootStream { frames.append(frame) }  // (not SETTINGS, WINDOW_UPDATE)
            }
            return frames
        }
        func open(_ id: HTTP2StreamID) -> EventLoopFuture<Void> {
            link.client.writeAndFlush(HTTP2Frame(streamID: id, payload: .headers(.init(headers: [
                ":method": "CONNECT", ":authority": "198.18.2.20:8080", "x-weft-source": "198.18.1.10"]))))
        }
        try open(1).wait()
        link.shuttle()
        #expect(above.created == [1])
        let connect = serverFrames()
        guard case .headers(let h)? = connect.first?.payload else {
            Issue.record("no CONNECT at the server: \(connect)")
            return
        }
        #expect(connect.first?.streamID == 1 && h.headers.first(name: ":method") == "CONNECT" && !h.endStream)
        #expect(h.headers.first(name: "x-weft-source") == "198.18.1.10")

        // Both ways, frames larger than the protocol's 16 KiB; then both ends end it.
        // (NIO's handler leaves the connection's window to its multiplexer, absent here.)
        try link.server.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: 4 << 20))).wait()
        try link.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"])))).wait()
        link.shuttle()
        try link.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: 300_000))))))
            .wait()
        link.shuttle()
        try link.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 2, count: 200_000)),
                                                                                   endStream: true)))).wait()
        link.shuttle()
        #expect(Self.dataSizes(serverFrames()) == [300_000])
        let got = above.take()
        #expect(got.first.map { frame in
            guard case .headers(let head) = frame.payload else { return false }
            return head.headers.first(name: ":status") == "200"
        } == true, "\(got)")
        #expect(Self.dataSizes(got) == [200_000])
        #expect(above.closed.isEmpty, "closed before the client ended its side")
        try link.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer()), endStream: true)))).wait()
        link.shuttle()
        #expect(above.closed.map(\.0) == [1] && above.closed.first?.1 == nil)

        // GOAWAY naming stream 3: stream 5 was not processed.
        try open(3).wait()
        try open(5).wait()
        link.shuttle()
        _ = serverFrames()
        try link.server.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: 3, errorCode: .noError, opaqueData: nil)))
            .wait()
        link.shuttle()
        #expect(above.take().contains { frame in
            guard case .goAway(let last, _, _) = frame.payload else { return false }
            return last == 3
        })
        #expect(above.closed.map(\.0) == [1, 5] && above.closed.last?.1 == .refusedStream, "\(above.closed)")
        #expect(throws: NIOHTTP2Errors.CreatedStreamAfterGoaway.self) { try open(7).wait() }
        // A stream ID the client may not use: nothing is sent.
        #expect(throws: NIOHTTP2Errors.NoSuchStream.self) { try open(2).wait() }
    }

    /// What a stream channel reads.
    final class StreamAbove: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame.FramePayload
        var payloads: [HTTP2Frame.FramePayload] = []
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { payloads.append(unwrapInboundIn(data)) }
    }

    /// As the source end of a tunnel with stream channels (NIO's
    /// HTTP2StreamMultiplexer right above, TunnelHTTP2.channelCodec),
    /// against NIO's server: streams open in the order they first write,
    /// whatever the order they were made in; a stream channel whose send
    /// window is shut stops being writable once its unsent bytes pass the
    /// channel's high-water mark (a DATA frame's write completes when it
    /// went out), and is writable again when the window opens; answers
    /// reach their channels.
    @Test func asAClientItCarriesNIOsStreamChannels() throws {
        let link = EmbeddedLink()
        defer { link.finish() }
        let codec = HTTP2Codec(allocator: link.client.allocator, role: .client, settings: TunnelHTTP2.channelCodec)
        let mux = HTTP2StreamMultiplexer(mode: .client, channel: link.client, targetWindowSize: TunnelHTTP2.stream.targetWindowSize,
                                         outboundBufferSizeHighWatermark: TunnelHTTP2.stream.outboundBufferSizeHighWatermark,
                                         outboundBufferSizeLowWatermark: TunnelHTTP2.stream.outboundBufferSizeLowWatermark) { $0.close() }
        try link.client.pipeline.syncOperations.addHandler(codec)
        try link.client.pipeline.syncOperations.addHandler(mux)
        var small = nioDefaultSettings
        small.append(HTTP2Setting(parameter: .initialWindowSize, value: 1_000))
        try link.server.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: small))
        try link.connect()
        func serverFrames() -> [HTTP2Frame] {
            var frames: [HTTP2Frame] = []
            while let frame = try? link.server.readInbound(as: HTTP2Frame.self) {
                if frame.streamID != .rootStream { frames.append(frame) }
            }
            return frames
        }
        var channels: [Channel] = [], readers: [StreamAbove] = []
        for _ in 0..<2 {
            let made = mux.createStreamChannel { $0.eventLoop.makeSucceededVoidFuture() }
            link.client.embeddedEventLoop.run()
            let channel = try made.wait()
            let reader = StreamAbove()
            try channel.pipeline.syncOperations.addHandler(reader)
            channels.append(channel)
            readers.append(reader)
        }
        // The second one made writes first: it is stream 1.
        let connect: HPACKHeaders = [":method": "CONNECT", ":authority": "198.18.2.20:8080"]
        for channel in channels.reversed() {
            try channel.writeAndFlush(HTTP2Frame.FramePayload.headers(.init(headers: connect))).wait()
        }
        link.shuttle()
        #expect(serverFrames().map(\.streamID) == [1, 3])

        // 20,000 bytes into a 1,000-byte window: held, and the channel not
        // writable, until the window opens.
        var sent = false
        channels[1].writeAndFlush(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer(repeating: 7, count: 20_000)))))
            .assumeIsolated().whenSuccess { sent = true }
        link.shuttle()
        link.client.embeddedEventLoop.run()
        #expect(!sent && !channels[1].isWritable && channels[0].isWritable)
        #expect(Self.dataSizes(serverFrames()).reduce(0, +) == 1_000)
        try link.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .windowUpdate(windowSizeIncrement: 30_000))).wait()
        link.shuttle()
        link.client.embeddedEventLoop.run()
        #expect(sent && channels[1].isWritable)
        #expect(Self.dataSizes(serverFrames()).reduce(0, +) == 19_000)

        // The server's answer and bytes reach stream 1's channel only.
        try link.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"])))).wait()
        try link.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(repeating: 1, count: 50_000)),
                                                                                   endStream: true)))).wait()
        link.shuttle()
        link.client.embeddedEventLoop.run()
        let got = readers[1].payloads
        #expect(got.count >= 2 && readers[0].payloads.isEmpty)
        if case .headers(let head)? = got.first { #expect(head.headers.first(name: ":status") == "200") } else { Issue.record("\(got)") }
        #expect(got.reduce(0) { n, p in
            guard case .data(let d) = p else { return n }
            return n + d.data.readableBytes
        } == 50_000)
        #expect(link.client.isActive && link.server.isActive)
    }

    @Test func pingsAreAnsweredAndResetsCloseStreams() throws {
        let pair = try Pair()
        defer { pair.finish() }
        try pair.client.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: 42), ack: false))).wait()
        pair.shuttle()
        #expect(pair.clientFrames().contains { frame in
            guard case .ping(let d, ack: true) = frame.payload else { return false }
            return d.integer == 42
        })
        try pair.request(1, Self.get)
        try pair.client.writeAndFlush(HTTP2Frame(streamID: 1, payload: .rstStream(.cancel))).wait()
        pair.shuttle()
        #expect(pair.above.closed.map(\.0) == [1] && pair.above.closed.first?.1 == .cancel)
        // A frame written for it now fails, as NIO's handler fails it.
        let late = pair.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"]))))
        #expect(throws: NIOHTTP2Errors.NoSuchStream.self) { try late.wait() }
    }

    // MARK: raw frames from a client that breaks the protocol

    struct Raw {
        let server = EmbeddedChannel()
        let above = Above()
        let codec: HTTP2Codec
        /// In front of the codec, passing every read on as it came: the
        /// `--no-express` pipeline's head clock, which follows the same
        /// bytes (slowHeaderBlocksRunTheHeadClock holds it to the codec's).
        let watch = HTTP2HeadWatch()

        init(settings: HTTP2Codec.Settings = .h2c) throws {
            codec = HTTP2Codec(allocator: server.allocator, settings: settings)
            try server.pipeline.syncOperations.addHandler(watch)
            try server.pipeline.syncOperations.addHandler(codec)
            try server.pipeline.syncOperations.addHandler(above)
            try server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            var start = ByteBuffer(string: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            Self.frame(&start, type: 0x4, flags: 0, stream: 0, payload: [])
            send(start)
        }

        static func frame(_ b: inout ByteBuffer, type: UInt8, flags: UInt8, stream: UInt32, payload: [UInt8]) {
            b.writeInteger(UInt32(payload.count) << 8 | UInt32(type))
            b.writeInteger(flags)
            b.writeInteger(stream)
            b.writeBytes(payload)
        }

        func send(_ bytes: ByteBuffer) {
            _ = try? server.writeInbound(bytes)
        }

        func send(type: UInt8, flags: UInt8 = 0, stream: UInt32, payload: [UInt8] = []) {
            var b = ByteBuffer()
            Self.frame(&b, type: type, flags: flags, stream: stream, payload: payload)
            send(b)
        }

        /// A request's HEADERS: GET / as a literal block.
        func open(_ stream: UInt32, end: Bool = true) {
            send(type: 0x1, flags: 0x4 | (end ? 0x1 : 0), stream: stream, payload: [0x82, 0x86, 0x84, 0x41, 0x01, 0x61])
        }

        /// Frames the codec wrote: (type, flags, stream, payload).
        func written() -> [(UInt8, UInt8, UInt32, [UInt8])] {
            var all = ByteBuffer()
            while var b = try? server.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&b) }
            var frames: [(UInt8, UInt8, UInt32, [UInt8])] = []
            while let head = all.readInteger(as: UInt32.self), let flags = all.readInteger(as: UInt8.self),
                  let stream = all.readInteger(as: UInt32.self), let payload = all.readBytes(length: Int(head >> 8)) {
                frames.append((UInt8(head & 0xFF), flags, stream, payload))
            }
            return frames
        }

        /// The error code of the GOAWAY written, if one was.
        func goAway() -> UInt32? {
            guard let g = written().first(where: { $0.0 == 0x7 }) else { return nil }
            return g.3[4...7].reduce(0) { $0 << 8 | UInt32($1) }
        }
    }

    /// The peer's FIN (half-closure allowed): streams it had not ended are
    /// reset with CANCEL and closed above; those it had stay open to be
    /// answered; the event goes on up.
    @Test func inputClosedResetsStreamsThePeerHadNotEnded() throws {
        let raw = try Raw()
        _ = raw.written()
        raw.open(1)
        raw.open(3, end: false)
        raw.server.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        let resets = raw.written().filter { $0.0 == 0x3 }
        #expect(resets.map(\.2) == [3] && resets.first?.3 == [0, 0, 0, 8], "\(resets)")
        #expect(raw.above.closed.map(\.0) == [3] && raw.above.closed.first?.1 == .cancel)
        #expect(raw.above.inputClosed)
        // Stream 1 is still answered.
        try raw.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"], endStream: true)))).wait()
        #expect(raw.written().contains { $0.0 == 0x1 && $0.2 == 1 })
        #expect(raw.above.closed.map(\.0) == [3, 1])
        _ = try? raw.server.finish()
    }

    /// A stream whose response waits for a window when the peer's FIN
    /// comes can never send it (no WINDOW_UPDATE can follow a FIN): it is
    /// reset (CANCEL) and closed above, so the handlers let it and the
    /// connection go. (Found by ProxyFuzzTests: a client that set its
    /// windows to 0 and shut its side held a connection for good.)
    @Test func aStreamStalledOnAWindowAfterThePeersFINIsReset() throws {
        let raw = try Raw()
        raw.send(type: 0x4, stream: 0, payload: [0, 4, 0, 0, 0, 0])  // SETTINGS_INITIAL_WINDOW_SIZE 0
        raw.open(1)
        raw.open(3)
        _ = raw.written()
        try raw.server.writeAndFlush(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [":status": "200"])))).wait()
        raw.server.write(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(string: "ok")), endStream: true))),
                         promise: nil)
        raw.server.flush()
        #expect(!raw.written().contains { $0.0 == 0x0 }, "no DATA while the window is 0")
        raw.server.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        raw.server.embeddedEventLoop.run()
        let resets = raw.written().filter { $0.0 == 0x3 }
        #expect(resets.map(\.2) == [1] && resets.first?.3 == [0, 0, 0, 8], "\(resets)")
        #expect(raw.above.closed.contains { $0.0 == 1 && $0.1 == .cancel })
        // Stream 3, answered with no body, is not held back by a window.
        try raw.server.writeAndFlush(HTTP2Frame(streamID: 3, payload: .headers(.init(headers: [":status": "204"], endStream: true)))).wait()
        #expect(raw.written().contains { $0.0 == 0x1 && $0.2 == 3 })
        _ = try? raw.server.finish()
    }

    @Test func protocolErrorsEndTheConnectionWithGoAway() throws {
        let cases: [(String, UInt32, (Raw) -> Void)] = [
            ("a stream of even id", 0x1, { $0.open(2) }),
            ("DATA on an idle stream", 0x1, { $0.send(type: 0x0, stream: 5, payload: [1]) }),
            ("PUSH_PROMISE", 0x1, { $0.send(type: 0x5, flags: 0x4, stream: 1, payload: [0, 0, 0, 2]) }),
            ("a PING of 7 bytes", 0x6, { $0.send(type: 0x6, stream: 0, payload: [0, 0, 0, 0, 0, 0, 0]) }),
            ("a window of 0", 0x1, { $0.send(type: 0x8, stream: 0, payload: [0, 0, 0, 0]) }),
            ("a frame over 16,384 bytes", 0x6, { $0.send(type: 0x0, stream: 1, payload: Array(repeating: 0, count: 16_385)) }),
            ("DATA past the connection's window", 0x3, { raw in
                // (In one read: the codec opens the window again after each.)
                raw.open(1, end: false)
                var b = ByteBuffer()
                for _ in 0..<5 { Raw.frame(&b, type: 0x0, flags: 0, stream: 1, payload: Array(repeating: 0, count: 16_384)) }
                raw.send(b)
            }),
            ("a frame amid a header block", 0x1, { raw in
                raw.send(type: 0x1, flags: 0x1, stream: 1, payload: [0x82])
                raw.send(type: 0x6, stream: 0, payload: Array(repeating: 0, count: 8))
            }),
            ("CONTINUATION without end", 0xB, { raw in
                raw.send(type: 0x1, flags: 0x1, stream: 1, payload: [0x82])
                for _ in 0..<3 { raw.send(type: 0x9, stream: 1, payload: Array(repeating: 0x82, count: 16_000)) }
            }),
            ("a header block HPACK cannot read", 0x9, { $0.send(type: 0x1, flags: 0x5, stream: 1, payload: [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]) }),
        ]
        for (what, code, act) in cases {
            let raw = try Raw()
            _ = raw.written()
            act(raw)
            #expect(raw.goAway() == code, "\(what)")
            #expect(!raw.server.isActive, "\(what): still open")
            _ = try? raw.server.finish()
        }
    }

    /// A tunnel's DATA frame larger than the protocol's frame size is
    /// passed on in pieces as its bytes come (not held and copied until it
    /// is whole): END_STREAM with the last piece, every byte counted
    /// against the windows once. Small frames wait until they are whole.
    @Test func largeDataFramesGoUpInPiecesAsTheyCome() throws {
        let raw = try Raw(settings: TunnelHTTP2.codec)
        _ = raw.written()
        raw.open(1, end: false)
        let payload = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var frame = ByteBuffer()
        Raw.frame(&frame, type: 0x0, flags: 0x1, stream: 1, payload: payload)
        // The header and 30,000 bytes, then 50,000, then the rest.
        for cut in [(0, 9 + 30_000), (9 + 30_000, 50_000), (9 + 80_000, 20_000)] {
            guard let piece = frame.getSlice(at: cut.0, length: cut.1) else { return }
            raw.send(piece)
        }
        let pieces = raw.above.take().compactMap { f -> (Int, Bool, [UInt8])? in
            guard case .data(let d) = f.payload, case .byteBuffer(let b) = d.data else { return nil }
            return (b.readableBytes, d.endStream, Array(b.readableBytesView))
        }
        #expect(pieces.map(\.0) == [30_000, 50_000, 20_000] && pieces.map(\.1) == [false, false, true])
        #expect(pieces.flatMap(\.2) == payload)
        #expect(raw.above.windows.last.map { $0.0 == 1 && $0.1 == TunnelHTTP2.streamWindow - 100_000 } == true)
        // A small frame in two reads comes up whole, once.
        raw.open(3, end: false)
        _ = raw.above.take()
        var small = ByteBuffer()
        Raw.frame(&small, type: 0x0, flags: 0x1, stream: 3, payload: Array(repeating: 5, count: 1_000))
        raw.send(small.getSlice(at: 0, length: 500) ?? ByteBuffer())
        #expect(raw.above.take().isEmpty)
        raw.send(small.getSlice(at: 500, length: 509) ?? ByteBuffer())
        #expect(Self.dataSizes(raw.above.take()) == [1_000])
        _ = try? raw.server.finish()
    }

    /// A stream the codec resets on its HEADERS still has its block
    /// decoded: what the client's encoder added to the table is there for
    /// the next stream.
    @Test func aResetStreamsBlockStillFillsTheTable() throws {
        let raw = try Raw()
        _ = raw.written()
        // Stream 1 depends on itself (PRIORITY flag): reset. Its block adds
        // ":authority: a" to the dynamic table (literal with indexing).
        raw.send(type: 0x1, flags: 0x25, stream: 1, payload: [0, 0, 0, 1, 16, 0x82, 0x86, 0x84, 0x41, 0x01, 0x61])
        // Stream 3 names it by index (62).
        raw.send(type: 0x1, flags: 0x5, stream: 3, payload: [0x82, 0x86, 0x84, 0xBE])
        let written = raw.written()
        #expect(written.contains { $0.0 == 0x3 && $0.2 == 1 && $0.3 == [0, 0, 0, 1] }, "stream 1 reset: \(written)")
        #expect(!written.contains { $0.0 == 0x7 }, "GOAWAY: \(written)")
        let heads = raw.above.take().compactMap { frame -> HPACKHeaders? in
            guard case .headers(let h) = frame.payload else { return nil }
            return h.headers
        }
        #expect(heads.count == 1 && heads.first?.first(name: ":authority") == "a", "\(heads)")
        _ = try? raw.server.finish()
    }

    /// MeshConfig proxy.requestHeaderTimeout on HTTP/2: the head clock runs
    /// from the first read that leaves a header block partly read (a
    /// HEADERS frame cut short, a block continued, a frame header cut before
    /// its type) until a read that ends the block. CONTINUATIONs that do not
    /// end it do not restart it; a DATA frame cut short is a body, not
    /// timed. Run out (on a sweep), the connection gets GOAWAY
    /// (ENHANCE_YOUR_CALM, the last whole request's stream, what ran out as
    /// debug data) and closes. HTTP2HeadWatch (the `--no-express`
    /// pipeline's clock, in front of NIOHTTP2Handler) reads the same bytes
    /// and runs its clock at the same reads.
    @Test func slowHeaderBlocksRunTheHeadClock() throws {
        let raw = try Raw()
        _ = raw.written()
        func since(sourceLocation: SourceLocation = #_sourceLocation) -> NIODeadline? {
            let codec = raw.codec.headClock.since, watch = raw.watch.clock.since
            #expect((codec == nil) == (watch == nil), "codec \(String(describing: codec)), watch \(String(describing: watch))",
                    sourceLocation: sourceLocation)
            return codec
        }
        func headers(_ stream: UInt32, flags: UInt8 = 0x5, _ payload: [UInt8] = [0x82, 0x86, 0x84, 0x41, 0x01, 0x61]) -> ByteBuffer {
            var b = ByteBuffer()
            Raw.frame(&b, type: 0x1, flags: flags, stream: stream, payload: payload)
            return b
        }
        func cut(_ b: ByteBuffer, _ at: Int) -> (ByteBuffer, ByteBuffer) {
            (b.getSlice(at: b.readerIndex, length: at) ?? ByteBuffer(), b.getSlice(at: b.readerIndex + at, length: b.readableBytes - at) ?? ByteBuffer())
        }
        raw.open(1)
        #expect(since() == nil, "a block read whole starts no clock")
        // A HEADERS frame in two reads.
        let (head3, tail3) = cut(headers(3), 11)
        raw.send(head3)
        #expect(since() != nil)
        raw.send(tail3)
        #expect(since() == nil)
        // A frame header cut before its type is timed until its type is read:
        // DATA (of a stream whose request is still open) is not.
        raw.open(5, end: false)
        var data = ByteBuffer()
        Raw.frame(&data, type: 0x0, flags: 0x1, stream: 5, payload: [1, 2, 3, 4])
        let (dataHead, dataTail) = cut(data, 2)
        raw.send(dataHead)
        #expect(since() != nil)
        let (dataMiddle, dataEnd) = cut(dataTail, 9)
        raw.send(dataMiddle)
        #expect(since() == nil, "a DATA frame cut short is not timed")
        raw.send(dataEnd)
        // A block in CONTINUATIONs: the clock runs from the HEADERS frame
        // through CONTINUATIONs that do not end it.
        raw.send(headers(7, flags: 0x1, [0x82]))
        let began = since(), watchBegan = raw.watch.clock.since
        #expect(began != nil)
        usleep(2_000)
        raw.send(type: 0x9, stream: 7, payload: [0x86])
        #expect(since() == began, "a CONTINUATION that does not end the block restarted the clock")
        #expect(raw.watch.clock.since == watchBegan, "a CONTINUATION that does not end the block restarted the watch's clock")
        raw.send(type: 0x9, flags: 0x4, stream: 7, payload: [0x84, 0x41, 0x01, 0x61])
        #expect(since() == nil)
        // A read that ends a block and cuts the next restarts the clock.
        let (head9, tail9) = cut(headers(9), 12)
        raw.send(head9)
        let first = since(), watchFirst = raw.watch.clock.since
        usleep(2_000)
        var next = tail9
        var (head11, _) = cut(headers(11), 12)
        next.writeBuffer(&head11)
        raw.send(next)
        if let first, let now = since(), let watchFirst, let watchNow = raw.watch.clock.since {
            #expect(now > first && watchNow > watchFirst, "the clock was not restarted")
        } else {
            Issue.record("no clock: \(String(describing: first)) \(String(describing: since()))")
        }
        let streams = raw.above.take().compactMap { f -> HTTP2StreamID? in
            guard case .headers = f.payload else { return nil }
            return f.streamID
        }
        #expect(streams == [1, 3, 5, 7, 9])
        // The sweeps: not yet, then run out.
        let start = since() ?? .now()
        _ = raw.written()
        #expect(!raw.codec.timeOutHead(IdleSweep(rounds: .max, now: start + .milliseconds(999), headTimeout: .seconds(1))))
        #expect(!raw.codec.timeOutHead(IdleSweep(rounds: .max, now: start + .seconds(5), headTimeout: nil)))
        #expect(raw.server.isActive)
        #expect(raw.codec.timeOutHead(IdleSweep(rounds: .max, now: start + .seconds(1), headTimeout: .seconds(1))))
        let frames = raw.written()
        let goAway: [UInt8] = frames.first(where: { $0.0 == 0x7 }).map { $0.3 } ?? []
        #expect(goAway.count > 8 && goAway[0..<8] == [0, 0, 0, 9, 0, 0, 0, 0xB], "\(goAway)")
        #expect(String(decoding: goAway.dropFirst(8), as: UTF8.self)
            == "weft: the request head was not received whole within 1s (MeshConfig spec.proxy.requestHeaderTimeout)")
        #expect(!raw.server.isActive)
        _ = try? raw.server.finish()

        // A client preface cut short is timed too, until it is whole.
        let server = EmbeddedChannel()
        let codec = HTTP2Codec(allocator: server.allocator), watch = HTTP2HeadWatch()
        try server.pipeline.syncOperations.addHandler(watch)
        try server.pipeline.syncOperations.addHandler(codec)
        try server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try server.writeInbound(ByteBuffer(string: "PRI * HTTP/2.0\r\n"))
        #expect(codec.headClock.since != nil && watch.clock.since != nil)
        try server.writeInbound(ByteBuffer(string: "\r\nSM\r\n\r\n"))
        #expect(codec.headClock.since == nil && watch.clock.since == nil)
        _ = try? server.finish()
    }

    /// HTTP2HeadWatch on the sweeps: a sweep before the block is late goes
    /// on as it was (HTTP2ConnectionEnds counts it for the idle timeout);
    /// the one that finds it late goes on as `Late`, with the reason, and
    /// only once. A DATA frame longer than a read is followed to its end.
    @Test func theHeadWatchTellsOfALateBlockOnce() throws {
        final class Events: ChannelInboundHandler {
            typealias InboundIn = ByteBuffer
            var seen: [Any] = []
            func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) { seen.append(event) }
        }
        let channel = EmbeddedChannel()
        let watch = HTTP2HeadWatch(), events = Events()
        try channel.pipeline.syncOperations.addHandler(watch)
        try channel.pipeline.syncOperations.addHandler(events)
        var bytes = ByteBuffer(string: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        Raw.frame(&bytes, type: 0x4, flags: 0, stream: 0, payload: [])
        Raw.frame(&bytes, type: 0x0, flags: 0, stream: 1, payload: Array(repeating: 7, count: 3000))
        try channel.writeInbound(bytes.getSlice(at: 0, length: 1000))
        #expect(watch.clock.since == nil, "a DATA frame cut short was timed")
        var rest = bytes.getSlice(at: 1000, length: bytes.readableBytes - 1000) ?? ByteBuffer()
        Raw.frame(&rest, type: 0x1, flags: 0x4, stream: 3, payload: [0x82, 0x86])
        try channel.writeInbound(rest.getSlice(at: 0, length: rest.readableBytes - 1))
        let since = try #require(watch.clock.since, "a HEADERS frame cut short, after the DATA frame's end, was not timed")
        let early = IdleSweep(rounds: .max, now: since + .milliseconds(999), headTimeout: .seconds(1))
        let late = IdleSweep(rounds: .max, now: since + .seconds(1), headTimeout: .seconds(1))
        channel.pipeline.fireUserInboundEventTriggered(early)
        channel.pipeline.fireUserInboundEventTriggered(late)
        channel.pipeline.fireUserInboundEventTriggered(late)
        #expect(events.seen.count == 3)
        #expect((events.seen.first as? IdleSweep)?.now == early.now)
        #expect((events.seen.dropFirst().first as? HTTP2HeadWatch.Late)?.reason
                == "weft: the request head was not received whole within 1s (MeshConfig spec.proxy.requestHeaderTimeout)")
        #expect((events.seen.last as? IdleSweep)?.now == late.now, "a late block was told of twice")
        // Every byte went on as it came.
        var passed = ByteBuffer()
        while var b = try channel.readInbound(as: ByteBuffer.self) { passed.writeBuffer(&b) }
        #expect(passed.readableBytes == 1000 + rest.readableBytes - 1)
        _ = try? channel.finish()
    }

    /// Floods that cost the proxy and carry nothing are sent away
    /// (ENHANCE_YOUR_CALM): empty DATA frames in a row, and PINGs from a
    /// client that does not read their answers.
    @Test func floodsAreSentAway() throws {
        let empty = try Raw()
        empty.open(1, end: false)
        for _ in 0..<10 { empty.send(type: 0x0, stream: 1) }
        empty.send(type: 0x0, stream: 1, payload: [1])  // the count starts again
        for _ in 0..<10 { empty.send(type: 0x0, stream: 1) }
        #expect(empty.goAway() == nil && empty.server.isActive)
        empty.send(type: 0x0, stream: 1)
        #expect(empty.goAway() == 0xB && !empty.server.isActive)
        _ = try? empty.server.finish()

        let pings = try Raw()
        for _ in 0..<20_000 { pings.send(type: 0x6, stream: 0, payload: Array(repeating: 0, count: 8)) }
        #expect(pings.goAway() == nil, "answered while the client reads")
        pings.server.isWritable = false
        for _ in 0..<10_000 { pings.send(type: 0x6, stream: 0, payload: Array(repeating: 0, count: 8)) }
        #expect(pings.server.isActive)
        pings.send(type: 0x6, stream: 0, payload: Array(repeating: 0, count: 8))
        #expect(pings.goAway() == 0xB && !pings.server.isActive)
        _ = try? pings.server.finish()
    }

    /// Over 100 open streams, a new one is refused; a client that resets
    /// streams faster than it lets them finish is sent away ("rapid reset").
    @Test func streamLimitsAndRapidResets() throws {
        let raw = try Raw()
        _ = raw.written()
        for i in 0..<101 { raw.open(UInt32(2 * i + 1)) }
        let refused = raw.written().filter { $0.0 == 0x3 }
        #expect(refused.count == 1 && refused.first?.2 == 201 && refused.first?.3 == [0, 0, 0, 7], "REFUSED_STREAM on the 101st")
        #expect(raw.above.created.count == 100)
        _ = try? raw.server.finish()

        // Streams that finish earn their resets back: 1,000 resets among
        // 1,000 finished streams are fine.
        let fair = try Raw()
        var id: UInt32 = 1
        for _ in 0..<1_000 {
            fair.open(id)
            fair.send(type: 0x3, stream: id, payload: [0, 0, 0, 8])
            fair.open(id + 2)
            try fair.server.writeAndFlush(HTTP2Frame(streamID: HTTP2StreamID(Int32(id + 2)),
                                                     payload: .headers(.init(headers: [":status": "204"], endStream: true)))).wait()
            id += 4
        }
        #expect(fair.goAway() == nil && fair.server.isActive)
        _ = try? fair.server.finish()

        let rapid = try Raw()
        for i in 0..<1_000 {
            rapid.open(UInt32(2 * i + 1))
            rapid.send(type: 0x3, stream: UInt32(2 * i + 1), payload: [0, 0, 0, 8])
        }
        #expect(rapid.goAway() == 0xB && !rapid.server.isActive)
        #expect(rapid.above.created.count < 250)
        _ = try? rapid.server.finish()
    }
}
