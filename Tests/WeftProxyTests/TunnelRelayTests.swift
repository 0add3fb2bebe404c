import Logging
import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing
import WeftCore
@testable import WeftProxy

/// TunnelRelay as a tunnel's destination end, behind Weft's codec, against
/// NIO's client with its own checks of what it sends turned off (a
/// compromised node's proxy could send anything). No TLS here, so no peer
/// identity: every well-formed CONNECT is refused by TunnelInbound and goes
/// on to the stream multiplexer's place (`Above`), as in the proxy.
@Suite struct TunnelRelayTests {
    struct Destination {
        let link = EmbeddedLink()
        let above = HTTP2CodecTests.Above()

        init() throws {
            let configuration = ProxyConfiguration(node: "n2", listenAddress: IPv4Address("198.18.2.1")!,
                                                   pinDirectory: "/nonexistent", runDirectory: "/nonexistent")
            let proxy = ProxyContext(configuration: configuration, logger: Logger(label: "test"), origins: nil, policy: nil,
                                     eventLoops: [link.server.embeddedEventLoop])
            try link.client.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client, headerBlockValidation: .disabled,
                                                                               contentLengthValidation: .disabled))
            let server = link.server.pipeline.syncOperations
            try server.addHandler(HTTP2Codec(allocator: link.server.allocator, settings: TunnelHTTP2.codec))
            try server.addHandler(TunnelRelay(.server(proxy)))
            try server.addHandler(above)
            try link.connect()
        }

        func send(_ id: HTTP2StreamID, _ headers: HPACKHeaders, end: Bool = false) throws {
            try link.client.writeAndFlush(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers, endStream: end)))).wait()
            link.shuttle()
        }

        /// The resets the client received, by stream.
        func resets() -> [HTTP2StreamID: HTTP2ErrorCode] {
            var got: [HTTP2StreamID: HTTP2ErrorCode] = [:]
            while let frame = try? link.client.readInbound(as: HTTP2Frame.self) {
                if case .rstStream(let code) = frame.payload { got[frame.streamID] = code }
            }
            return got
        }

        /// The streams whose HEADERS went on past the relay.
        func passed() -> [HTTP2StreamID] {
            above.take().compactMap { frame in
                if case .headers = frame.payload { return frame.streamID }
                return nil
            }
        }
    }

    static let connect: HPACKHeaders = [":method": "CONNECT", ":authority": "198.18.2.20:8080", "x-weft-source": "198.18.1.10"]

    /// A field block that breaks RFC 9113 resets its stream (PROTOCOL_ERROR)
    /// and goes no further, opening or trailing; well-formed ones on the
    /// same connection go on, and the connection stays up.
    @Test func malformedFieldBlocksResetTheirStreamOnly() throws {
        let d = try Destination()
        defer { d.link.finish() }
        let malformed: [HPACKHeaders] = [
            [":method": "CONNECT", ":authority": "198.18.2.20:8080", "X-Upper": "1"],  // (NIO's HPACK encoder reuses a name case-blind)
            [":method": "CONNECT", ":authority": "198.18.2.20:8080", "x-weft-source": "198.18.1.10\r\nx: y"],
            [":method": "CONNECT", ":authority": "198.18.2.20:8080", ":method": "CONNECT"],  // twice
            ["x-weft-source": "198.18.1.10", ":method": "CONNECT", ":authority": "198.18.2.20:8080"],  // pseudo last
            [":method": "CONNECT", ":authority": "198.18.2.20:8080", "connection": "close"],
            [":method": "CONNECT"],  // no :authority
        ]
        var id: HTTP2StreamID = 1
        for headers in malformed {
            try d.send(id, headers)
            #expect(d.resets() == [id: .protocolError], "\(headers)")
            #expect(d.passed().isEmpty, "\(headers)")
            id = id.advanced(by: 2)
        }
        // A well-formed CONNECT goes on; so do its trailers; malformed ones do not.
        try d.send(id, Self.connect)
        #expect(d.passed() == [id])
        try d.send(id, ["x-weft-done": "1"], end: true)
        #expect(d.passed() == [id] && d.resets().isEmpty)
        id = id.advanced(by: 2)
        try d.send(id, Self.connect)
        #expect(d.passed() == [id])
        try d.send(id, [":status": "200"], end: true)  // no pseudo-header in trailers
        #expect(d.resets() == [id: .protocolError])
        #expect(d.passed().isEmpty)
        #expect(d.link.server.isActive && d.link.client.isActive)
    }

    /// A drain (the proxy quiescing) closes the tunnel once no stream is
    /// open, counting right past streams reset as they opened (a malformed
    /// CONNECT here; a refused one in the proxy), which the codec reports
    /// closed but never created: the open stream keeps the connection up
    /// until it ends.
    @Test func aDrainWaitsForOpenStreamsPastOnesResetAsTheyOpened() throws {
        let d = try Destination()
        defer { d.link.finish() }
        try d.send(1, [":method": "CONNECT", ":authority": "198.18.2.20:8080", "connection": "close"])
        #expect(d.resets() == [1: .protocolError])
        try d.send(3, Self.connect)
        #expect(d.passed() == [3])
        d.link.server.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        d.link.shuttle()  // GOAWAY and PING out, NIO's client answers the PING
        d.link.server.embeddedEventLoop.run()
        #expect(d.link.server.isActive, "closed with stream 3 open")
        // Stream 3 ends both ways: nothing is open, the connection closes.
        try d.link.server.writeAndFlush(HTTP2Frame(streamID: 3, payload: .headers(.init(headers: [":status": "200"], endStream: true)))).wait()
        try d.send(3, ["x-weft-done": "1"], end: true)
        d.link.server.embeddedEventLoop.run()
        #expect(!d.link.server.isActive, "still open with no stream")
    }

    /// As the source end: an answer to its CONNECT that breaks RFC 9113
    /// fails the open and resets the stream (PROTOCOL_ERROR); a well-formed
    /// one opens it.
    @Test func aMalformedAnswerFailsTheOpen() throws {
        let link = EmbeddedLink()
        defer { link.finish() }
        let relay = TunnelRelay(.client)
        try link.client.pipeline.syncOperations.addHandler(HTTP2Codec(allocator: link.client.allocator, role: .client,
                                                                      settings: TunnelHTTP2.codec))
        try link.client.pipeline.syncOperations.addHandler(relay)
        try link.server.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, headerBlockValidation: .disabled,
                                                                           contentLengthValidation: .disabled))
        try link.connect()
        var outcomes: [HTTP2StreamID: String] = [:]
        var resets: [HTTP2StreamID: HTTP2ErrorCode] = [:]
        for answer: HPACKHeaders in [[":status": "200", "Bad Name": "1"], [":status": "200"]] {
            relay.open(authority: "198.18.2.20:8080", headers: [("x-weft-source", "198.18.1.10")]) { result in
                switch result {
                case .success(let stream): outcomes[stream.id] = "opened"
                case .failure(let error): outcomes[HTTP2StreamID(outcomes.count * 2 + 1)] = "failed: \(error)"
                }
            }
            link.shuttle()
            var opened: HTTP2StreamID?
            while let frame = try? link.server.readInbound(as: HTTP2Frame.self) {
                if case .headers = frame.payload { opened = frame.streamID }
                if case .rstStream(let code) = frame.payload { resets[frame.streamID] = code }
            }
            guard let id = opened else {
                Issue.record("no CONNECT reached the server")
                return
            }
            try link.server.writeAndFlush(HTTP2Frame(streamID: id, payload: .headers(.init(headers: answer)))).wait()
            link.shuttle()
        }
        while let frame = try? link.server.readInbound(as: HTTP2Frame.self) {
            if case .rstStream(let code) = frame.payload { resets[frame.streamID] = code }
        }
        #expect(resets == [1: .protocolError])
        #expect(outcomes[1]?.hasPrefix("failed") == true && outcomes[3] == "opened", "\(outcomes)")
    }
}
