import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOHPACK
import NIOHTTP2
import Testing
@testable import WeftProxy

/// What a tunnel stream's codec sends for writes, empty writes and the end
/// of its output. (That END_STREAM leaves only after the stream's DATA is
/// NIO's flow-control buffer's doing; MeshTLSTests checks every byte across
/// a real tunnel.)
@Suite struct TunnelStreamCodecTests {
    private func frames(_ channel: EmbeddedChannel) throws -> [(bytes: String, end: Bool)] {
        var out: [(String, Bool)] = []
        while let payload = try channel.readOutbound(as: HTTP2Frame.FramePayload.self) {
            guard case .data(let data) = payload, case .byteBuffer(let buffer) = data.data else {
                Issue.record("not a DATA frame: \(payload)")
                continue
            }
            out.append((String(buffer: buffer), data.endStream))
        }
        return out
    }

    @Test func endingTheOutputSendsEndStreamOnceAndWaitsForIt() throws {
        let channel = EmbeddedChannel(handler: TunnelStreamCodec(.server))
        defer { _ = try? channel.finish() }
        let before = channel.eventLoop.makePromise(of: Void.self)
        // Nothing written yet: an empty write has nothing to wait for and sends nothing.
        channel.write(ByteBuffer(), promise: before)
        #expect(try before.futureResult.wait() == ())
        try channel.writeOutbound(ByteBuffer(string: "abc"))
        let ended = channel.eventLoop.makePromise(of: Void.self)
        channel.pipeline.triggerUserOutboundEvent(EndOutputAfterWrites(), promise: ended)
        try ended.futureResult.wait()
        // Again, a barrier and a half-close after it: no frame more, each done.
        let again = channel.eventLoop.makePromise(of: Void.self)
        channel.pipeline.triggerUserOutboundEvent(EndOutputAfterWrites(), promise: again)
        let barrier = channel.eventLoop.makePromise(of: Void.self)
        channel.writeAndFlush(ByteBuffer(), promise: barrier)
        let half = channel.close(mode: .output)
        try again.futureResult.wait()
        try barrier.futureResult.wait()
        try half.wait()
        let sent = try frames(channel)
        #expect(sent.map(\.bytes) == ["abc", ""] && sent.map(\.end) == [false, true], "\(sent)")
    }

    /// A client stream whose CONNECT was never answered: a half-close asked
    /// for meanwhile is held, and fails when the stream closes (a promise
    /// left hanging would leave the glue waiting for ever).
    @Test func aHalfCloseHeldBeforeTheAnswerFailsWhenTheStreamCloses() throws {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(TunnelStreamCodec(.client(authority: "198.18.2.20:8080", headers: [])))
        channel.pipeline.fireChannelActive()
        let connect = try channel.readOutbound(as: HTTP2Frame.FramePayload.self)
        guard case .headers(let h) = connect else {
            Issue.record("no CONNECT: \(String(describing: connect))")
            return
        }
        #expect(h.headers.first(name: ":method") == "CONNECT")
        let ended = channel.eventLoop.makePromise(of: Void.self)
        channel.pipeline.triggerUserOutboundEvent(EndOutputAfterWrites(), promise: ended)
        var outcome: Result<Void, Error>?
        ended.futureResult.assumeIsolated().whenComplete { outcome = $0 }
        #expect(outcome == nil, "ended before the stream was answered")
        #expect(try channel.readOutbound(as: HTTP2Frame.FramePayload.self) == nil, "a frame went out before the answer")
        _ = try? channel.finish()
        guard case .failure = outcome else {
            Issue.record("the held half-close did not fail with the stream: \(String(describing: outcome))")
            return
        }
    }

    /// The far proxy's answer to the CONNECT, or trailers after it, that
    /// break RFC 9113 fail the stream (the codec below does not check them).
    @Test func aMalformedAnswerOrTrailerFailsTheClientStream() throws {
        for (blocks, opened) in [([[":status": "200", "Bad Name": "1"]] as [HPACKHeaders], false),
                                 ([[":status": "200"], [":status": "200"]], true)] {
            let channel = EmbeddedChannel()
            defer { _ = try? channel.finish() }
            let codec = TunnelStreamCodec(.client(authority: "198.18.2.20:8080", headers: []))
            try channel.pipeline.syncOperations.addHandler(codec)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            var outcome: Result<Void, Error>?
            codec.ready?.futureResult.assumeIsolated().whenComplete { outcome = $0 }
            for headers in blocks {
                _ = try? channel.writeInbound(HTTP2Frame.FramePayload.headers(.init(headers: headers)))
            }
            #expect(!channel.isActive, "\(blocks)")
            switch outcome {
            case .success?: #expect(opened, "\(blocks)")
            case .failure(let error)?: #expect(!opened && error is MalformedFieldBlock, "\(blocks)")
            case nil: Issue.record("not answered: \(blocks)")
            }
        }
    }

    /// NIO's HTTP encoders write an empty buffer for an `.end` sent with a
    /// promise. On a kept-alive tunnel stream that must not end the stream:
    /// the next response has to follow on it.
    @Test func anEmptyWriteFromAnHTTPEncoderKeepsTheStreamOpen() throws {
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        try channel.pipeline.syncOperations.addHandler(TunnelStreamCodec(.server))
        try channel.pipeline.syncOperations.addHandler(HTTPResponseEncoder())
        for body in ["one", "two"] {
            var head = HTTPResponseHead(version: .http1_1, status: .ok)
            head.headers.add(name: "content-length", value: "3")
            channel.write(HTTPServerResponsePart.head(head), promise: nil)
            channel.write(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(string: body))), promise: nil)
            let done = channel.eventLoop.makePromise(of: Void.self)
            channel.writeAndFlush(HTTPServerResponsePart.end(nil), promise: done)
            try done.futureResult.wait()
        }
        let sent = try frames(channel)
        #expect(!sent.contains { $0.end }, "an encoder's empty write ended the stream: \(sent)")
        let text = sent.map(\.bytes).joined()
        #expect(text.hasSuffix("one") == false && text.contains("\r\n\r\none") && text.hasSuffix("\r\n\r\ntwo"), "\(text)")
    }
}
