import Testing
@testable import WeftProxy

/// The express path's in-place HTTP/1.1 reading: what it accepts, and that
/// it refuses (so the full path takes over) whatever is not the plain form.
@Suite struct HTTP1WireTests {
    private func request(_ text: String) -> (line: HTTP1Wire.RequestLine, fields: [(String, String)])? {
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBytes { p in
            guard let length = HTTP1Wire.headLength(p) else { return nil }
            var fields: [HTTP1Wire.Field] = []
            guard let line = HTTP1Wire.parseRequest(p, length: length, fields: &fields) else { return nil }
            return (line, fields.map { (String(decoding: bytes[$0.name], as: UTF8.self), String(decoding: bytes[$0.value], as: UTF8.self)) })
        }
    }

    private func response(_ text: String) -> HTTP1Wire.StatusLine? {
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBytes { p in
            var fields: [HTTP1Wire.Field] = []
            return HTTP1Wire.headLength(p).flatMap { HTTP1Wire.parseResponse(p, length: $0, fields: &fields) }
        }
    }

    @Test func tokenBytesAreRFC9110s() {
        let tchar = Set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'*+-.^_`|~".utf8)
        for c in 0...255 {
            #expect(HTTP1Wire.isToken(UInt8(c)) == tchar.contains(UInt8(c)), "byte \(c)")
        }
    }

    @Test func headsEndAtTheBlankLine() {
        for (text, length) in [("GET / HTTP/1.1\r\n\r\n", 18), ("GET / HTTP/1.1\r\nA: b\r\n\r\nbody", 24), ("\r\n\r\n", 4)] {
            #expect(Array(text.utf8).withUnsafeBytes { HTTP1Wire.headLength($0) } == length, "\(text.debugDescription)")
        }
        for text in ["GET / HTTP/1.1\r\n", "GET / HTTP/1.1\r\nA: b\r\n\r", "GET / HTTP/1.1\n\n", "\r\n\r"] {
            #expect(Array(text.utf8).withUnsafeBytes { HTTP1Wire.headLength($0) } == nil, "\(text.debugDescription)")
        }
    }

    /// The word-at-a-time scans against plain byte loops (the reference
    /// below, which is what they replaced) on random heads: the same head
    /// end, the same verdict, the same fields. Bytes are drawn mostly from
    /// those the scans care about (CR, LF, HTAB, SP, DEL, other controls,
    /// ':' and bytes above 0x7F) so that every branch is taken.
    @Test func wordAtATimeScansAgreeWithByteLoops() {
        var rng = LoopRandom(seed: 0x5eed)  // the same heads on every run
        let alphabet: [UInt8] = [13, 10, 9, 32, 127, 0, 1, 31, 58, 0x80, 0xFF, 97, 98, 65, 45, 48]
        var fields: [HTTP1Wire.Field] = []
        for round in 0..<20_000 {
            var bytes = Array("GET / HTTP/1.1\r\n".utf8)
            let lines = Int(rng.next() % 6)
            for _ in 0..<lines {
                bytes += Array("X-\(rng.next() % 100): ".utf8)
                let n = Int(rng.next() % 40)
                // Mostly plain text, with a chance of any special byte at any place.
                for _ in 0..<n {
                    bytes.append(rng.next() % 5 == 0 ? alphabet[Int(rng.next() % UInt64(alphabet.count))]
                                                     : UInt8(33 + rng.next() % 90))
                }
                if rng.next() % 10 != 0 { bytes += [13, 10] }
            }
            if rng.next() % 8 != 0 { bytes += [13, 10] }
            bytes.withUnsafeBytes { p in
                #expect(HTTP1Wire.headLength(p) == Self.referenceHeadLength(p), "round \(round): \(bytes)")
                let length = Self.referenceHeadLength(p) ?? p.count
                let parsed = HTTP1Wire.parseRequest(p, length: length, fields: &fields) != nil
                let reference = Self.referenceFields(p, from: 16, length: length)
                #expect(parsed == (reference != nil), "round \(round): \(bytes)")
                if parsed, let reference {
                    #expect(fields.map(\.name) == reference.map(\.name) && fields.map(\.value) == reference.map(\.value),
                            "round \(round): \(bytes)")
                }
            }
        }
    }

    private static func referenceHeadLength(_ p: UnsafeRawBufferPointer) -> Int? {
        guard p.count >= 4 else { return nil }
        for i in 3..<p.count where p[i] == 10 && p[i - 1] == 13 && p[i - 2] == 10 && p[i - 3] == 13 { return i + 1 }
        return nil
    }

    private static func referenceFields(_ p: UnsafeRawBufferPointer, from start: Int, length: Int) -> [HTTP1Wire.Field]? {
        var fields: [HTTP1Wire.Field] = []
        var i = start
        while i + 1 < length {
            if p[i] == 13 { return p[i + 1] == 10 && i + 2 == length ? fields : nil }
            let nameStart = i
            while i < length, HTTP1Wire.isToken(p[i]) { i += 1 }
            guard i > nameStart, i < length, p[i] == 58 else { return nil }
            let name = nameStart..<i
            i += 1
            while i < length, p[i] == 32 || p[i] == 9 { i += 1 }
            let valueStart = i
            var valueEnd = i
            while i < length, p[i] != 13 {
                let c = p[i]
                guard c == 9 || (c >= 32 && c != 127) else { return nil }
                i += 1
                if c != 32 && c != 9 { valueEnd = i }
            }
            guard i + 1 < length, p[i + 1] == 10 else { return nil }
            fields.append(HTTP1Wire.Field(name: name, value: valueStart..<valueEnd))
            i += 2
        }
        return nil
    }

    @Test func thePlainRequestFormIsRead() throws {
        let text = "POST /a/b?x=1 HTTP/1.1\r\nHost: web\r\nContent-Length:  5 \r\nX-Empty:\r\nUser-Agent: t\u{00e9}st\t\r\n\r\n"
        let (line, fields) = try #require(request(text))
        let bytes = Array(text.utf8)
        #expect(String(decoding: bytes[line.method], as: UTF8.self) == "POST")
        #expect(String(decoding: bytes[line.target], as: UTF8.self) == "/a/b?x=1")
        #expect(fields.map(\.0) == ["Host", "Content-Length", "X-Empty", "User-Agent"])
        #expect(fields.map(\.1) == ["web", "5", "", "t\u{00e9}st"], "values without the spaces around them")
    }

    @Test func anythingElseIsLeftToTheFullPath() {
        for text in [
            "GET http://web/ HTTP/1.1\r\n\r\n",          // absolute-form
            "GET / HTTP/1.0\r\n\r\n",                    // HTTP/1.0
            "get / HTTP/1.1\r\n\r\n",                    // not a registered method's spelling
            "GET  / HTTP/1.1\r\n\r\n",                   // two spaces
            "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",      // obsolete line folding
            "GET / HTTP/1.1\r\nA : b\r\n\r\n",           // space before the colon
            "GET / HTTP/1.1\r\nA: b\u{01}\r\n\r\n",      // a control character
            "GET / HTTP/1.1\r\nA: b\nB: c\r\n\r\n",      // a bare LF
            "GET / HTTP/1.1\r\n: b\r\n\r\n",             // no name
            "GET /a b HTTP/1.1\r\n\r\n",                 // a space in the target
            "CONNECT /a HTTP/1.1\r\n\r\n",               // a tunnel asked for (the full path refuses it)
        ] {
            #expect(request(text) == nil, "\(text.debugDescription)")
        }
    }

    @Test func statusLines() {
        #expect(response("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")?.code == 200)
        #expect(response("HTTP/1.1 204\r\n\r\n")?.code == 204, "the reason phrase may be missing")
        #expect(response("HTTP/1.1 404 \r\n\r\n")?.code == 404)
        #expect(response("HTTP/1.0 200 OK\r\n\r\n")?.minor == 0)
        #expect(response("HTTP/1.1 100 Continue\r\n\r\n")?.code == 100)
        for text in ["HTTP/2 200 OK\r\n\r\n", "HTTP/1.1 20 OK\r\n\r\n", "HTTP/1.1 099 X\r\n\r\n", "HTTP/1.1 200 OK\r\nA\r\n\r\n",
                     "ICY 200 OK\r\n\r\n"] {
            #expect(response(text) == nil, "\(text.debugDescription)")
        }
    }

    @Test func listsAndValues() {
        let bytes = Array("keep-alive, Close ,x-a,, TE".utf8)
        bytes.withUnsafeBytes { p in
            let all = 0..<bytes.count
            #expect(HTTP1Wire.listContains(p, all, "close"))
            #expect(HTTP1Wire.listContains(p, all, "te"))
            #expect(!HTTP1Wire.listContains(p, all, "keep"))
            #expect(HTTP1Wire.count(p, all) == 4, "empty elements do not count")
            #expect(HTTP1Wire.lastElement(p, all, is: "te"))
        }
        let numbers = Array("123 12a 1234567890123456".utf8)
        numbers.withUnsafeBytes { p in
            #expect(HTTP1Wire.decimal(p, 0..<3) == 123)
            #expect(HTTP1Wire.decimal(p, 4..<7) == nil)
            #expect(HTTP1Wire.decimal(p, 8..<24) == nil, "too long to be a length")
            #expect(HTTP1Wire.decimal(p, 3..<3) == nil)
        }
    }

    /// Which fields of a response the express paths drop: hop-by-hop ones
    /// and those its Connection lines name. Every line counts; a line of
    /// "keep-alive" alone is not kept (the field it names is hop-by-hop
    /// anyway), and the first line kept needs no array
    /// (Express.ConnectionLines).
    @Test func connectionLinesNameTheirFields() {
        func named(_ head: String) -> [String: Bool] {
            let bytes = Array(head.utf8)
            return bytes.withUnsafeBytes { p in
                var fields: [HTTP1Wire.Field] = []
                guard let length = HTTP1Wire.headLength(p), let status = HTTP1Wire.parseResponse(p, length: length, fields: &fields),
                      let body = Express.responseBody(p, status, fields, isHEAD: false) else { return [:] }
                var out: [String: Bool] = [:]
                for f in fields { out[String(decoding: bytes[f.name], as: UTF8.self)] = Express.isHopByHop(p, f.name) || body.named.lists(p, name: f.name) }
                return out
            }
        }
        #expect(named("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-A: 1\r\nKeep-Alive: 5\r\n\r\n")
                == ["Connection": true, "X-A": false, "Keep-Alive": true])
        #expect(named("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n")
                == ["Connection": true, "X-A": true, "X-B": false], "a second line after keep-alive still counts")
        #expect(named("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, X-B\r\nConnection: x-c\r\nConnection: x-a\r\nx-a: 1\r\nX-B: 2\r\nX-C: 3\r\nX-D: 4\r\n\r\n")
                == ["Connection": true, "x-a": true, "X-B": true, "X-C": true, "X-D": false], "three lines")
        #expect(named("HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n") == ["X-A": false], "no Connection line")
    }

    /// How a response's body ends, and whether its connection can be used
    /// again (RFC 9112 6.3, 9.3): what the express paths read from a head.
    @Test func responseFramingFromTheHead() {
        func framing(_ head: String, isHEAD: Bool = false) -> String? {
            let bytes = Array(head.utf8)
            return bytes.withUnsafeBytes { p in
                var fields: [HTTP1Wire.Field] = []
                guard let length = HTTP1Wire.headLength(p), let status = HTTP1Wire.parseResponse(p, length: length, fields: &fields),
                      let body = Express.responseBody(p, status, fields, isHEAD: isHEAD) else { return nil }
                let how: String
                switch body.framing {
                case .length(let n): how = "length \(n)"
                case .chunked: how = "chunked"
                case .close: how = "close"
                case .head: how = "head"
                }
                return how + (body.close ? ", then close" : "")
            }
        }
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n") == "length 3")
        #expect(framing("HTTP/1.1 200 OK\r\nconnection: Keep-Alive\r\ncontent-length: 3\r\n\r\n") == "length 3", "names and tokens fold")
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n") == "length 3, then close")
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, close\r\n\r\n") == "length 3, then close")
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n")
                == "length 3, then close", "a later line still counts")
        #expect(framing("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n") == "length 3, then close", "HTTP/1.0 closes by default")
        #expect(framing("HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n") == "length 3")
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n") == "length 3")
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n") == nil, "two lengths")
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n") == nil)
        #expect(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n") == "chunked")
        #expect(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n") == "chunked",
                "Transfer-Encoding wins over Content-Length")
        #expect(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n") == "close", "not chunked last: read to the close")
        #expect(framing("HTTP/1.1 200 OK\r\n\r\n") == "close", "neither: read to the close")
        #expect(framing("HTTP/1.1 204 No Content\r\n\r\n") == "length 0")
        #expect(framing("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n") == "length 0")
        #expect(framing("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", isHEAD: true) == "length 0")
    }

    /// A chunked body's end is found however the bytes are cut.
    @Test func chunkedBodiesEndWhereTheyEnd() {
        let body = Array("5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n".utf8)
        let after = Array("HTTP/1.1 200".utf8)
        for cut in [1, 2, 3, 7, 64] {
            var framer = ChunkedFramer()
            var used = 0
            var offset = 0
            let all = body + after
            while !framer.isDone && offset < all.count {
                let piece = Array(all[offset..<min(offset + cut, all.count)])
                let n = piece.withUnsafeBytes { framer.consume($0) }
                guard let n else { Issue.record("refused at \(offset) with pieces of \(cut)"); return }
                used += n
                offset += piece.count
            }
            #expect(framer.isDone && used == body.count, "pieces of \(cut): \(used) of \(body.count)")
        }
        for broken in ["x\r\n", "5\r\nhelloX\r\n", "5\nhello", "0\r\n\r\r"] {
            var framer = ChunkedFramer()
            #expect(Array(broken.utf8).withUnsafeBytes { framer.consume($0) } == nil, "\(broken.debugDescription)")
        }
    }

    /// Unwrapped for an HTTP/2 client, the chunks' data and the trailer
    /// lines come out whole however the bytes are cut.
    @Test func chunkedBodiesUnwrapToTheirDataAndTrailers() {
        let body = Array("5;ext=1\r\nhello\r\nA\r\n0123456789\r\n1\r\n!\r\n0\r\nX-Done: yes\r\nX-Two: 2\r\n\r\n".utf8)
        for cut in [1, 2, 3, 5, 7, 64] {
            var framer = ChunkedFramer()
            var data: [UInt8] = [], trailer: [UInt8] = []
            var offset = 0
            while !framer.isDone && offset < body.count {
                let piece = Array(body[offset..<min(offset + cut, body.count)])
                let n = piece.withUnsafeBytes { p in
                    framer.consume(p, data: { data += p[$0] }, trailer: { trailer += p[$0] })
                }
                guard n != nil else { Issue.record("refused at \(offset) with pieces of \(cut)"); return }
                offset += piece.count
            }
            #expect(framer.isDone)
            #expect(String(decoding: data, as: UTF8.self) == "hello0123456789!", "pieces of \(cut)")
            #expect(String(decoding: trailer, as: UTF8.self) == "X-Done: yes\r\nX-Two: 2\r\n", "pieces of \(cut)")
        }
    }
}

