import Foundation
import NIOCore
import Synchronization
import Testing
@testable import WeftProxy

/// What a backend's sockets read, kept per connection: a tap in front of
/// its HTTP decoder.
final class RawLog: Sendable {
    private let connections = Mutex<[Int: [UInt8]]>([:])
    private let serial = Atomic<Int>(0)

    /// What was read since the last `take`, one entry a connection.
    func take() -> [[UInt8]] {
        connections.withLock { all in
            defer { all.removeAll() }
            return all.keys.sorted().compactMap { all[$0] }
        }
    }

    final class Tap: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer
        private let log: RawLog
        private let id: Int

        init(_ log: RawLog) {
            self.log = log
            id = log.serial.add(1, ordering: .relaxed).newValue
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = unwrapInboundIn(data).readableBytesView
            log.connections.withLock { $0[id, default: []] += bytes }
            context.fireChannelRead(data)
        }
    }
}

/// Request smuggling (RFC 9112 6.1, 6.3 and 11.2): a client's message
/// whose framing two parsers could read two ways (Content-Length beside
/// Transfer-Encoding, two lengths, an obfuscated coding, a folded line, a
/// bare LF, a coding on HTTP/1.0) must never reach a backend as it came,
/// or a backend that reads it the other way would take what follows for a
/// request of its own, one no client is answered for and no policy or
/// route ever saw. Whatever the proxy does with such a message (a 400, or
/// the message framed anew), every byte a backend reads must be requests
/// framed one way only, and the backend must see no more requests than the
/// client is answered.
@Suite struct SmugglingTests {
    /// Each is followed by the client's FIN. "/hidden" is what a backend
    /// that framed it the other way would take for a request.
    static let hidden = "GET /hidden HTTP/1.1\r\nhost: a\r\n\r\n"
    static let vectors: [(name: String, text: String)] = [
        ("CL.TE", "POST /s HTTP/1.1\r\nhost: a\r\ncontent-length: \(5 + hidden.utf8.count)\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n\(hidden)"),
        ("TE.CL", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n5c\r\n\(hidden)\(String(repeating: "x", count: 92 - hidden.utf8.count))\r\n0\r\n\r\n"),
        ("two lengths", "POST /s HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\ncontent-length: \(hidden.utf8.count)\r\n\r\n\(hidden)"),
        ("a length list", "POST /s HTTP/1.1\r\nhost: a\r\ncontent-length: 0, \(hidden.utf8.count)\r\n\r\n\(hidden)"),
        ("a signed length", "POST /s HTTP/1.1\r\nhost: a\r\ncontent-length: +\(hidden.utf8.count)\r\n\r\n\(hidden)"),
        ("an unknown coding", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: xchunked\r\ncontent-length: 0\r\n\r\n\(hidden)"),
        ("chunked not last", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n\(hidden)"),
        ("two coding fields", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntransfer-encoding: x\r\n\r\n0\r\n\r\n\(hidden)"),
        ("a space before the colon", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding : chunked\r\ncontent-length: 0\r\n\r\n0\r\n\r\n\(hidden)"),
        ("a folded coding", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding:\r\n chunked\r\ncontent-length: 0\r\n\r\n0\r\n\r\n\(hidden)"),
        ("bare LFs", "POST /s HTTP/1.1\nhost: a\ncontent-length: 0\ntransfer-encoding: chunked\n\n0\n\n\(hidden)"),
        ("a coding on HTTP/1.0", "POST /s HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n0\r\n\r\n\(hidden)"),
        ("a chunk size with 0x", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0x0\r\n\r\n\(hidden)"),
        ("a chunk size overflowing", "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\n\(hidden)\r\n0\r\n\r\n"),
        ("a NUL in a field", "POST /s HTTP/1.1\r\nhost: a\r\nx-a: b\u{0}\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n\(hidden)"),
        ("a length on a GET", "GET /s HTTP/1.1\r\nhost: a\r\ncontent-length: \(hidden.utf8.count)\r\n\r\n\(hidden)"),
    ]

    /// The whole requests in one connection's bytes, read the strict way,
    /// and what a parser could frame another way, if anything (where the
    /// reading stops). A message cut short at the end (a client that sent
    /// less than it declared) is not smuggling: not counted.
    static func strictRequests(_ bytes: [UInt8]) -> (requests: Int, problem: String?) {
        var requests = 0
        var rest = bytes[...]
        while !rest.isEmpty {
            let outcome: (consumed: Int?, problem: String?) = rest.withUnsafeBytes { p in
                guard let length = HTTP1Wire.headLength(p) else { return (nil, nil) }
                var fields: [HTTP1Wire.Field] = []
                guard HTTP1Wire.parseRequest(p, length: length, fields: &fields) != nil else {
                    return (nil, "a head no strict parser takes: \(String(decoding: p[0..<length], as: UTF8.self).debugDescription)")
                }
                var lengths: [Int?] = [], codings: [String] = []
                for f in fields {
                    if HTTP1Wire.equals(p, f.name, "content-length") { lengths.append(HTTP1Wire.decimal(p, f.value)) }
                    if HTTP1Wire.equals(p, f.name, "transfer-encoding") { codings.append(String(decoding: p[f.value], as: UTF8.self)) }
                }
                guard lengths.count + codings.count <= 1, lengths.allSatisfy({ $0 != nil }), codings.allSatisfy({ $0.lowercased() == "chunked" }) else {
                    return (nil, "framing two parsers could read two ways: lengths \(lengths), codings \(codings)")
                }
                let body = UnsafeRawBufferPointer(rebasing: p[length...])
                if let declared = lengths.first ?? nil {
                    return (declared <= body.count ? length + declared : nil, nil)
                }
                guard !codings.isEmpty else { return (length, nil) }
                var framer = ChunkedFramer()
                guard let used = framer.consume(body) else { return (nil, "a broken chunked body") }
                return (framer.isDone ? length + used : nil, nil)
            }
            guard let consumed = outcome.consumed else { return (requests, outcome.problem) }
            requests += 1
            rest = rest.dropFirst(consumed)
        }
        return (requests, nil)
    }

    /// What the backend's sockets read since the last look: its whole
    /// requests, and an issue for each connection whose bytes a parser
    /// could frame another way.
    static func backendRequests(_ rig: ProxyFuzzTests.Rig, vector: String) -> Int {
        rig.http1Log.take().reduce(0) { count, bytes in
            let read = strictRequests(bytes)
            #expect(read.problem == nil, "\(vector): reached the backend: \(read.problem ?? "")")
            return count + read.requests
        }
    }

    /// Status lines the client was sent.
    static func answers(_ bytes: [UInt8]) -> Int {
        let text = String(decoding: bytes, as: UTF8.self)
        return text.split(separator: "\n").filter { $0.hasPrefix("HTTP/1.1 ") || $0.hasPrefix("HTTP/1.0 ") }.count
    }

    @Test(arguments: [true, false])
    func ambiguousFramingNeverReachesABackend(express: Bool) throws {
        let rig = try ProxyFuzzTests.Rig(configure: { $0.express = express })
        defer { rig.shutdown() }
        // The Service with routes (port 0) and the one without (port 2),
        // both to the HTTP/1.1 backend.
        for port in [rig.port(0), rig.port(2)] {
            for (name, text) in Self.vectors {
                _ = rig.http1Log.take()
                let out = ProxyFuzzTests.exchange(port: port, chunks: [Array(text.utf8)], pauses: [false], shut: true, wait: .seconds(4))
                try rig.settle()
                let answered = Self.answers(out.answer)
                let seen = Self.backendRequests(rig, vector: name)
                #expect(seen <= answered, "\(name): the backend saw \(seen) requests, the client was answered \(answered): \(String(decoding: out.answer, as: UTF8.self).prefix(300))")
                #expect(out.closedByProxy || answered > 0, "\(name): neither answered nor closed")
                // What Weft does with each, as it stands: NIO's decoder
                // refuses them all with a 400 and the connection closes; a
                // GET's body by its length is a body like any other.
                let status = String(decoding: out.answer.prefix(12), as: UTF8.self)
                if name == "a length on a GET" {
                    #expect(status == "HTTP/1.1 200" && seen == 1, "\(name): \(status), \(seen) seen")
                } else {
                    #expect(status == "HTTP/1.1 400" && seen == 0 && out.closedByProxy, "\(name): \(status), \(seen) seen")
                }
            }
            // And the plain forms still go through: a body by length, one
            // chunked, a pipelined pair.
            _ = rig.http1Log.take()
            let plain = "POST /s HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"
                + "POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + Self.hidden
            let out = ProxyFuzzTests.exchange(port: port, chunks: [Array(plain.utf8)], pauses: [false], shut: true, wait: .seconds(4))
            try rig.settle()
            let seen = Self.backendRequests(rig, vector: "plain")
            #expect(Self.answers(out.answer) == 3 && seen == 3, "\(seen) seen: \(String(decoding: out.answer, as: UTF8.self).prefix(400))")
        }
    }

    /// The reading above, on bytes whose framing is known: the vectors as
    /// a client sends them are what it must catch.
    @Test func theStrictReadingTellsFramingApart() {
        for (name, text) in Self.vectors where name != "a length on a GET" {
            let read = Self.strictRequests(Array(text.utf8))
            #expect(read.problem != nil, "\(name): read as \(read.requests) plain request(s)")
        }
        #expect(Self.strictRequests(Array(Self.vectors[0].text.utf8)).problem?.hasPrefix("framing two parsers") == true)
        #expect(Self.strictRequests(Array(Self.vectors[9].text.utf8)).problem?.hasPrefix("a head no strict parser takes") == true)
        let plain = Self.strictRequests(Array(("POST /s HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" + Self.hidden).utf8))
        #expect(plain.requests == 2 && plain.problem == nil)
        #expect(Self.strictRequests(Array("POST /s HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc".utf8)) == (0, nil))
        #expect(Self.answers(Array("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\nHTTP/1.1 400 Bad Request\r\n\r\n".utf8)) == 2)
    }
}
