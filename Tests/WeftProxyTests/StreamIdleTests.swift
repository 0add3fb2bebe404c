import Foundation
import Glibc
import NIOCore
import NIOHPACK
import NIOPosix
import Synchronization
import Testing
import WeftCore
@testable import WeftKernel
@testable import WeftProxy

/// MeshConfig `proxy.streamIdleTimeout` on the proxy's whole captured-
/// connection path (ProxyFuzzTests.Rig: real sockets, the idle sweep as in
/// `weft proxy`), on both express paths and on the full path (a route with
/// a filter), from HTTP/1.1 and h2c clients, against a backend that stalls
/// on purpose (StallingBackend). The timeout is 400 ms here (the table's
/// milliseconds; MeshConfig takes 1 s at least), so the sweep runs every
/// 100 ms and a request ends 400 to 500 ms after the last byte moved on it.
@Suite(.serialized) struct StreamIdleTests {
    static let timeout = 400

    /// The four ways in: HTTP/1.1 or h2c, express path or full path.
    enum Way: CaseIterable, CustomStringConvertible {
        case http1Express, http1Full, http2Express, http2Full
        var http2: Bool { self == .http2Express || self == .http2Full }
        var full: Bool { self == .http1Full || self == .http2Full }
        var description: String { "\(http2 ? "h2c" : "HTTP/1.1") \(full ? "full" : "express") path" }
    }

    static func rig() throws -> ProxyFuzzTests.Rig {
        try ProxyFuzzTests.Rig { $0.streamIdleTimeoutMilliseconds = timeout }
    }

    static func stalls(_ rig: ProxyFuzzTests.Rig) -> Int { rig.proxy.stats.streamIdleTimeouts.load(ordering: .relaxed) }

    /// What a client saw.
    struct Seen {
        var bytes: [UInt8] = []
        var closed = false
        /// From the request's last byte sent to when `done` first held (or
        /// the connection closed); nil if neither happened in time.
        var after: Double?
        var text: String { String(decoding: bytes, as: UTF8.self) }
    }

    /// Sends `request` (then, if given, `more` after `pause`), reads until
    /// the proxy closes, or `done` holds of what was read (then 300 ms more,
    /// for frames behind it), or 4 s pass. `readAfter`: read nothing for
    /// that long first, with a small receive buffer (a client that does not
    /// read).
    static func talk(_ port: Int, _ request: [UInt8], readAfter: Double = 0,
                     done: ([UInt8]) -> Bool = { _ in false }) -> Seen {
        var seen = Seen()
        guard let fd = ProxyFuzzTests.dial(port, receiveBuffer: readAfter > 0 ? 4096 : nil) else { return seen }
        defer { close(fd) }
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        let start = ContinuousClock.now
        if readAfter > 0 { usleep(UInt32(readAfter * 1_000_000)) }
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var deadline = start + .seconds(4)
        while ContinuousClock.now < deadline {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 {
                seen.bytes += buffer[0..<n]
                if seen.after == nil, done(seen.bytes) {
                    seen.after = Self.seconds(ContinuousClock.now - start)
                    deadline = min(deadline, ContinuousClock.now + .milliseconds(300))
                }
                continue
            }
            if n == 0 {
                seen.closed = true
                if seen.after == nil { seen.after = Self.seconds(ContinuousClock.now - start) }
                break
            }
            if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { continue }
            break
        }
        return seen
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    // MARK: requests

    static func http1(_ path: String, body: (declared: Int, sent: Int)? = nil) -> [UInt8] {
        var text = "\(body == nil ? "GET" : "POST") \(path) HTTP/1.1\r\nhost: stall.fz\r\nconnection: close\r\n"
        if let body { text += "content-length: \(body.declared)\r\n\r\n" + String(repeating: "b", count: body.sent) } else { text += "\r\n" }
        return Array(text.utf8)
    }

    /// The preface, an empty SETTINGS and stream 1's request (with a body
    /// declared and begun, its stream left open, when `body` is given).
    static func http2(_ path: String, body: (declared: Int, sent: Int)? = nil) -> [UInt8] {
        var block: [UInt8] = [body == nil ? 0x82 : 0x83, 0x86]  // GET or POST, http
        block += [0x44] + FuzzInput.lengthPrefixed(Array(path.utf8))
        block += [0x41] + FuzzInput.lengthPrefixed(Array("stall.fz".utf8))
        if let body {
            block += [0x00] + FuzzInput.lengthPrefixed(Array("content-length".utf8))
                + FuzzInput.lengthPrefixed(Array(String(body.declared).utf8))
        }
        var frames = [FuzzInput.Frame(type: 0xFF, flags: 0, stream: 0, payload: ProtocolDetector.preface),
                      FuzzInput.Frame(type: 0x4, flags: 0, stream: 0, payload: []),
                      FuzzInput.Frame(type: 0x1, flags: body == nil ? 0x5 : 0x4, stream: 1, payload: block)]
        if let body { frames.append(FuzzInput.Frame(type: 0x0, flags: 0, stream: 1, payload: Array(repeating: 0x62, count: body.sent))) }
        var rng = LoopRandom(seed: 1)
        return FuzzInput.serialize(frames, &rng)
    }

    static func request(_ way: Way, _ path: String, body: (declared: Int, sent: Int)? = nil) -> [UInt8] {
        way.http2 ? http2(path, body: body) : http1(path, body: body)
    }

    // MARK: HTTP/2 answers

    struct Frame {
        let type: UInt8, flags: UInt8, stream: UInt32
        let payload: [UInt8]
    }

    static func frames(_ bytes: [UInt8]) -> [Frame] {
        var out: [Frame] = []
        var i = 0
        while i + 9 <= bytes.count {
            let length = Int(bytes[i]) << 16 | Int(bytes[i + 1]) << 8 | Int(bytes[i + 2])
            guard i + 9 + length <= bytes.count else { break }
            let stream = UInt32(bytes[i + 5] & 0x7F) << 24 | UInt32(bytes[i + 6]) << 16 | UInt32(bytes[i + 7]) << 8 | UInt32(bytes[i + 8])
            out.append(Frame(type: bytes[i + 3], flags: bytes[i + 4], stream: stream, payload: Array(bytes[(i + 9)..<(i + 9 + length)])))
            i += 9 + length
        }
        return out
    }

    /// Stream 1's DATA, as text.
    static func data(_ bytes: [UInt8]) -> String {
        String(decoding: frames(bytes).filter { $0.type == 0x0 && $0.stream == 1 }.flatMap(\.payload), as: UTF8.self)
    }

    /// Stream 1's RST_STREAM code, if it was reset.
    static func reset(_ bytes: [UInt8]) -> UInt32? {
        guard let f = frames(bytes).first(where: { $0.type == 0x3 && $0.stream == 1 }), f.payload.count == 4 else { return nil }
        return FuzzInput.be32(f.payload)
    }

    /// Stream 1 is over: ended by a frame with END_STREAM, or reset.
    static func streamOver(_ bytes: [UInt8]) -> Bool {
        frames(bytes).contains { $0.stream == 1 && ($0.type == 0x3 || (($0.type == 0x0 || $0.type == 0x1) && $0.flags & 0x1 != 0)) }
    }

    /// Whatever the answer's protocol: the response's status.
    static func status(_ way: Way, _ seen: Seen) -> String? {
        if way.http2 { return FuzzInput.h2Status(seen.bytes) }
        guard seen.text.hasPrefix("HTTP/1.1 ") else { return nil }
        return String(seen.text.dropFirst(9).prefix(3))
    }

    static func body(_ way: Way, _ seen: Seen) -> String {
        if way.http2 { return data(seen.bytes) }
        guard let end = seen.text.range(of: "\r\n\r\n") else { return "" }
        return String(seen.text[end.upperBound...])
    }

    static func expectNothingHeld(_ rig: ProxyFuzzTests.Rig, _ what: String) throws {
        try rig.settle()
        let held = try rig.held()
        #expect(held.allSatisfy { $0 == 0 }, "\(what): requests in flight and streams per loop: \(held)")
        #expect(rig.proxy.stats.activeConnections.load(ordering: .relaxed) == 0, "\(what): connections left open")
    }

    static let reason = "weft: nothing moved on the request for 400ms (MeshConfig spec.proxy.streamIdleTimeout)\n"

    // MARK: tests

    /// A backend that takes the request and never answers: 504 naming the
    /// setting, a timeout after the request went out, not before; the
    /// backend connection closed, nothing left counted against it.
    @Test func aBackendThatNeverAnswersGets504() throws {
        let rig = try Self.rig()
        defer { rig.shutdown() }
        for way in Way.allCases {
            let before = Self.stalls(rig)
            let seen = Self.talk(rig.stallPort(full: way.full), Self.request(way, "/silent"), done: Self.streamOver)
            #expect(Self.status(way, seen) == "504", "\(way): \(FuzzInput.show(seen.bytes))")
            #expect(Self.body(way, seen) == Self.reason, "\(way)")
            let after = seen.after ?? 99
            #expect(after >= 0.38 && after < 3, "\(way): answered \(after) s after the request")
            #expect(Self.stalls(rig) - before == 1, "\(way)")
            try Self.expectNothingHeld(rig, "\(way)")
        }
    }

    /// TrafficPolicy `timeout.http.requestTimeout` (300 ms) on both of the
    /// stalling backend's Services, read from YAML as `weft proxy` reads
    /// it: a request nothing answers gets 504 naming the timeout once it
    /// runs out, long before the stream idle timeout (five minutes here),
    /// on every way in (the express paths hand such a request over); the
    /// backend connection is let go.
    @Test func aServicesRequestTimeoutAnswers504() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: """
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: bounded, namespace: fz}
            spec:
              targetRefs: [{group: "", kind: Service, name: stall}, {group: "", kind: Service, name: stall-full}]
              timeout: {http: {requestTimeout: 300ms}}
            """)
        defer { rig.shutdown() }
        for way in Way.allCases {
            let before = rig.proxy.stats.timeouts.load(ordering: .relaxed)
            let seen = Self.talk(rig.stallPort(full: way.full), Self.request(way, "/silent"), done: Self.streamOver)
            #expect(Self.status(way, seen) == "504", "\(way): \(FuzzInput.show(seen.bytes))")
            #expect(Self.body(way, seen) == "weft: request timed out after 300ms\n", "\(way)")
            let after = seen.after ?? 99
            #expect(after >= 0.28 && after < 0.6, "\(way): answered \(after) s after the request")
            #expect(rig.proxy.stats.timeouts.load(ordering: .relaxed) - before == 1, "\(way)")
            try Self.expectNothingHeld(rig, "\(way)")
        }
    }

    /// A response that stops part-way: the client sees it broken (HTTP/1.1:
    /// the connection closed short of the declared length; HTTP/2: the
    /// stream reset, CANCEL), and the backend connection is let go.
    @Test func aResponseThatStopsPartWayIsCut() throws {
        let rig = try Self.rig()
        defer { rig.shutdown() }
        for way in Way.allCases {
            let before = Self.stalls(rig)
            let seen = Self.talk(rig.stallPort(full: way.full), Self.request(way, "/half"), done: Self.streamOver)
            #expect(Self.status(way, seen) == "200", "\(way): \(FuzzInput.show(seen.bytes))")
            #expect(Self.body(way, seen) == "partial", "\(way)")
            if way.http2 {
                #expect(Self.reset(seen.bytes) == 0x8, "\(way): \(FuzzInput.show(seen.bytes))")
            } else {
                #expect(seen.closed, "\(way)")
            }
            let after = seen.after ?? 99
            #expect(after >= 0.38 && after < 3, "\(way): cut \(after) s after the request")
            #expect(Self.stalls(rig) - before == 1, "\(way)")
            try Self.expectNothingHeld(rig, "\(way)")
        }
    }

    /// A response that comes slowly but never stops for the timeout (a byte
    /// every 150 ms, 1.2 s in all, three timeouts) is answered whole.
    @Test func slowButSteadyResponsesAreAnsweredWhole() throws {
        let rig = try Self.rig()
        defer { rig.shutdown() }
        for way in Way.allCases {
            let seen = Self.talk(rig.stallPort(full: way.full), Self.request(way, "/trickle"), done: Self.streamOver)
            #expect(Self.status(way, seen) == "200", "\(way): \(FuzzInput.show(seen.bytes))")
            #expect(Self.body(way, seen) == "abcdefgh", "\(way)")
            if way.http2 { #expect(Self.reset(seen.bytes) == nil, "\(way)") }
        }
        #expect(Self.stalls(rig) == 0)
        try Self.expectNothingHeld(rig, "trickled")
    }

    /// A request whose body stops coming (100 bytes declared, 10 sent):
    /// 408 naming the setting, and the rest is not waited for (HTTP/1.1:
    /// the connection ends; HTTP/2: RST_STREAM after the answer). On the
    /// express paths no backend saw it yet; on the full path its backend
    /// connection is closed.
    @Test func aRequestBodyThatStopsComingGets408() throws {
        let rig = try Self.rig()
        defer { rig.shutdown() }
        for way in Way.allCases {
            let before = Self.stalls(rig)
            let seen = Self.talk(rig.stallPort(full: way.full), Self.request(way, "/silent", body: (100, 10)),
                                 done: Self.streamOver)
            #expect(Self.status(way, seen) == "408", "\(way): \(FuzzInput.show(seen.bytes))")
            #expect(Self.body(way, seen) == Self.reason, "\(way)")
            if way.http2 {
                #expect(Self.reset(seen.bytes) != nil, "\(way): \(FuzzInput.show(seen.bytes))")
            } else {
                #expect(seen.closed, "\(way)")
            }
            let after = seen.after ?? 99
            #expect(after >= 0.38 && after < 3, "\(way): answered \(after) s after the request")
            #expect(Self.stalls(rig) - before == 1, "\(way)")
            try Self.expectNothingHeld(rig, "\(way)")
        }
    }

    /// A client that never reads its (16 MiB) response stops the proxy
    /// reading the backend; nothing moves, and after the timeout the
    /// response is cut and the backend connection let go, instead of both
    /// being held for as long as the client stays.
    @Test func aClientThatStopsReadingLetsItsBackendGo() throws {
        let rig = try Self.rig()
        defer { rig.shutdown() }
        for way in Way.allCases {
            let before = Self.stalls(rig)
            let seen = Self.talk(rig.stallPort(full: way.full), Self.request(way, "/big"), readAfter: 1.5,
                                 done: Self.streamOver)
            #expect(Self.status(way, seen) == "200", "\(way): \(FuzzInput.show(seen.bytes))")
            #expect(seen.bytes.count < StallingBackend.big, "\(way): \(seen.bytes.count) bytes")
            if way.http2 {
                #expect(Self.reset(seen.bytes) == 0x8, "\(way)")
            } else {
                #expect(seen.closed, "\(way)")
            }
            #expect(Self.stalls(rig) - before == 1, "\(way)")
            try Self.expectNothingHeld(rig, "\(way)")
        }
    }

    /// A client that reads nothing at all (a 4 KiB receive buffer, the
    /// proxy's socket buffer full behind it) of a response it opened every
    /// window for: the stall cuts the request, and what the proxy still has
    /// to write (the reset, then GOAWAY) can never go out, so the
    /// connection's gentle close (once its writes are out) would wait for
    /// good. A whole idle timeout after that close began, it is closed at
    /// once: nothing is held while the client stays connected.
    @Test func aClientThatReadsNothingAtAllIsClosed() throws {
        let rig = try ProxyFuzzTests.Rig { $0.streamIdleTimeoutMilliseconds = Self.timeout; $0.idleTimeoutMilliseconds = 300 }
        defer { rig.shutdown() }
        // Every window opened (SETTINGS_INITIAL_WINDOW_SIZE, the connection's by WINDOW_UPDATE).
        let open: UInt32 = 0x7FFF_FFFF
        var rng = LoopRandom(seed: 1)
        let windows = FuzzInput.serialize([
            FuzzInput.Frame(type: 0x4, flags: 0, stream: 0, payload: FuzzInput.settings([(0x4, open)])),
            FuzzInput.Frame(type: 0x8, flags: 0, stream: 0, payload: FuzzInput.be32(open - 65_535)),
        ], &rng)
        for way in Way.allCases {
            let before = Self.stalls(rig)
            var request = Self.request(way, "/big")
            if way.http2 { request.insert(contentsOf: windows, at: ProtocolDetector.preface.count) }
            let fd = try #require(ProxyFuzzTests.dial(rig.stallPort(full: way.full), receiveBuffer: 4096))
            defer { close(fd) }
            _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            // The stall (0.4-0.5 s), then two idle timeouts (0.3-0.4 s each), and slack.
            let deadline = ContinuousClock.now + .seconds(5)
            while Self.stalls(rig) == before && ContinuousClock.now < deadline { usleep(20_000) }
            #expect(Self.stalls(rig) - before == 1, "\(way)")
            while rig.proxy.stats.activeConnections.load(ordering: .relaxed) > 0 && ContinuousClock.now < deadline {
                usleep(20_000)
            }
            #expect(rig.proxy.stats.activeConnections.load(ordering: .relaxed) == 0, "\(way): the connection is still open")
            #expect(try rig.held().allSatisfy { $0 == 0 }, "\(way)")
        }
    }

    /// An upload to a backend that reads none of it (`/deaf`): the proxy
    /// reads the body only as fast as the backend takes it, so what the
    /// client gets to send stops at what the sockets on the way hold, and
    /// the body does not pile up in the proxy. (The stream idle timeout is
    /// off here, so that only the backpressure stops it.) Then, with the
    /// timeout, the same upload is answered 504: it is the backend that
    /// stopped taking it, not the client sending it.
    /// So does the node that delivers a tunnel's request to its pod
    /// (InboundHTTP, which takes what its express path hands over).
    @Test func uploadsGoAtTheirBackendsPace() throws {
        let declared = 512 * 1024 * 1024
        for (timeout, inbound) in [(0, false), (0, true), (Self.timeout, false)] {
            let rig = try ProxyFuzzTests.Rig { $0.streamIdleTimeoutMilliseconds = timeout }
            defer { rig.shutdown() }
            let port = inbound ? rig.inboundListener.localAddress?.port ?? 0 : rig.stallPort(full: false)
            let fd = try #require(ProxyFuzzTests.dial(port))
            defer { close(fd) }
            let head = Array("POST /deaf HTTP/1.1\r\nhost: stall.fz\r\ncontent-length: \(declared)\r\n\r\n".utf8)
            _ = head.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            let chunk = [UInt8](repeating: 0x62, count: 65_536)
            var sent = 0
            var lastProgress = ContinuousClock.now
            while sent < declared && ContinuousClock.now - lastProgress < .milliseconds(1_500) {
                let n = chunk.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                if n > 0 {
                    sent += n
                    lastProgress = ContinuousClock.now
                } else if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                    usleep(5_000)
                } else {
                    break
                }
            }
            if timeout == 0 {
                // Socket buffers on loopback grow to a few MiB each; the
                // proxy itself holds about a read and NIO's write watermark.
                #expect(sent < 48 * 1024 * 1024,
                        "\(inbound ? "delivering" : "captured"): the client sent \(sent / 1024 / 1024) MiB of \(declared / 1024 / 1024) to a backend that reads nothing")
            } else {
                var answer = [UInt8](repeating: 0, count: 4096)
                var tv = timeval(tv_sec: 3, tv_usec: 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
                let n = answer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                let text = n > 0 ? String(decoding: answer[0..<n], as: UTF8.self) : ""
                #expect(text.hasPrefix("HTTP/1.1 504"), "\(text)")
            }
        }
    }

    /// The same over h2c (a body past the first window goes to the full
    /// path): a client that keeps to HTTP/2's flow control gets to send
    /// only what the windows the proxy opens allow, and the proxy opens
    /// them only as the backend takes the body (NIO's stream channel
    /// updates the window as frames are read, and reading waits).
    @Test func h2cUploadsGoAtTheirBackendsPace() throws {
        let rig = try ProxyFuzzTests.Rig { $0.streamIdleTimeoutMilliseconds = 0 }
        defer { rig.shutdown() }
        let declared = 512 * 1024 * 1024
        let fd = try #require(ProxyFuzzTests.dial(rig.stallPort(full: false)))
        defer { close(fd) }
        func write(_ bytes: [UInt8]) -> Bool {
            var at = 0
            while at < bytes.count {
                let n = bytes[at...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                guard n > 0 else { return false }
                at += n
            }
            return true
        }
        try #require(write(Self.http2("/deaf", body: (declared, 0)).dropLast(9)))  // (no DATA frame yet)
        var windows = (connection: 65_535, stream: 65_535)
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var sent = 0
        var reset = false
        var lastProgress = ContinuousClock.now
        while sent < declared, !reset, ContinuousClock.now - lastProgress < .milliseconds(1_500) {
            // What the proxy says: its SETTINGS (acknowledged), window updates, a reset.
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0 { pending += buffer[0..<n] }
            if n == 0 { break }
            var used = 0
            for f in Self.frames(pending) {
                used += 9 + f.payload.count
                switch f.type {
                case 0x4 where f.flags & 0x1 == 0:
                    for i in stride(from: 0, to: f.payload.count - 5, by: 6) where f.payload[i] == 0 && f.payload[i + 1] == 0x4 {
                        windows.stream += Int(FuzzInput.be32(Array(f.payload[(i + 2)..<(i + 6)]))) - 65_535
                    }
                    _ = write([0, 0, 0, 0x4, 0x1, 0, 0, 0, 0])
                case 0x8 where f.payload.count == 4:
                    let increment = Int(FuzzInput.be32(f.payload) & 0x7FFF_FFFF)
                    if f.stream == 0 { windows.connection += increment } else if f.stream == 1 { windows.stream += increment }
                case 0x3 where f.stream == 1, 0x7:
                    reset = true
                default:
                    break
                }
            }
            pending.removeFirst(used)
            let size = min(16_384, windows.connection, windows.stream, declared - sent)
            if size > 0 {
                let frame = [UInt8(size >> 16), UInt8((size >> 8) & 0xFF), UInt8(size & 0xFF), 0x0, 0x0] + FuzzInput.be32(UInt32(1))
                    + [UInt8](repeating: 0x62, count: size)
                guard write(frame) else { break }
                sent += size
                windows.connection -= size
                windows.stream -= size
                lastProgress = ContinuousClock.now
            } else {
                usleep(5_000)
            }
        }
        #expect(!reset, "the stream was reset")
        #expect(sent > 65_535, "no window was opened past the first: \(sent) bytes")
        #expect(sent < 48 * 1024 * 1024, "the client sent \(sent / 1024 / 1024) MiB of \(declared / 1024 / 1024) to a backend that reads nothing")
    }

    /// A response as fast as the backend can write it (`/flood`, 512 MiB)
    /// to a client that reads none of it: the proxy reads the backend only
    /// as fast as the client takes the response, so what the backend gets
    /// to write stops at what the sockets on the way hold. Every way in, and
    /// the node that delivers a tunnel's request to its pod (InboundHTTP).
    @Test func downloadsGoAtTheirClientsPace() throws {
        let rig = try ProxyFuzzTests.Rig { $0.streamIdleTimeoutMilliseconds = 0 }
        defer { rig.shutdown() }
        var windows: [UInt8] = []
        var rng = LoopRandom(seed: 1)
        let open: UInt32 = 0x7FFF_FFFF
        windows = FuzzInput.serialize([
            FuzzInput.Frame(type: 0x4, flags: 0, stream: 0, payload: FuzzInput.settings([(0x4, open)])),
            FuzzInput.Frame(type: 0x8, flags: 0, stream: 0, payload: FuzzInput.be32(open - 65_535)),
        ], &rng)
        let ways: [(String, Int, [UInt8])] = Way.allCases.map { way in
            var request = Self.request(way, "/flood")
            if way.http2 { request.insert(contentsOf: windows, at: ProtocolDetector.preface.count) }
            return ("\(way)", rig.stallPort(full: way.full), request)
        } + [("delivering", rig.inboundListener.localAddress?.port ?? 0, Self.http1("/flood"))]
        for (name, port, request) in ways {
            let before = StallingBackend.flooded.load(ordering: .relaxed)
            let fd = try #require(ProxyFuzzTests.dial(port, receiveBuffer: 4096))
            defer { close(fd) }
            _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            // Until the backend writes no more for half a second (2 s at least, 20 at most).
            let start = ContinuousClock.now
            var last = before, lastChange = start
            while ContinuousClock.now - start < .seconds(20) {
                usleep(50_000)
                let now = StallingBackend.flooded.load(ordering: .relaxed)
                if now != last { (last, lastChange) = (now, ContinuousClock.now) }
                if ContinuousClock.now - start > .seconds(2) && ContinuousClock.now - lastChange > .milliseconds(500) { break }
            }
            let written = last - before
            #expect(written > 0 && written < 48 * 1024 * 1024,
                    "\(name): the backend wrote \(written / 1024 / 1024) MiB of \(StallingBackend.flood / 1024 / 1024) to a client that reads nothing")
        }
    }

    /// RequestMirror's copies to a backend that never answers them: nobody
    /// waits on a copy's answer, so each lasts the stream idle timeout at
    /// most (as a whole; a route's request timeout when it has one), then
    /// its connection closes. Held for good before, one per copy.
    @Test func mirrorCopiesThatAreNeverAnsweredAreLetGo() throws {
        let rig = try Self.rig()
        defer { rig.shutdown() }
        let before = StallingBackend.shadowsOpen.load(ordering: .relaxed)
        let seen = StallingBackend.shadowsSeen.load(ordering: .relaxed)
        for i in 0..<5 {
            let seen = Self.talk(rig.stallPort(full: true), Self.http1("/mirrored/\(i)"), done: { _ in false })
            #expect(seen.text.hasPrefix("HTTP/1.1 200") && seen.text.hasSuffix("ok\n"), "\(seen.text)")
        }
        #expect(rig.proxy.stats.mirrored.load(ordering: .relaxed) == 5)
        let deadline = ContinuousClock.now + .seconds(4)
        while StallingBackend.shadowsSeen.load(ordering: .relaxed) - seen < 5 && ContinuousClock.now < deadline { usleep(10_000) }
        #expect(StallingBackend.shadowsSeen.load(ordering: .relaxed) - seen == 5, "the copies did not reach the mirror")
        while StallingBackend.shadowsOpen.load(ordering: .relaxed) > before && ContinuousClock.now < deadline { usleep(20_000) }
        #expect(StallingBackend.shadowsOpen.load(ordering: .relaxed) == before, "mirror copies still held")
        try Self.expectNothingHeld(rig, "mirrored")
    }

    /// `0s` (0 in the table): never. A client that sent its request and
    /// closed its socket while the backend stays silent cannot be told from
    /// one that half-closed and waits for the answer: without the timeout
    /// the request and its backend connection are held for good. A table
    /// with the timeout, installed while it is held, ends it.
    @Test func zeroTurnsTheTimeoutOff() throws {
        let rig = try ProxyFuzzTests.Rig { $0.streamIdleTimeoutMilliseconds = 0; $0.idleTimeoutMilliseconds = 200 }
        defer { rig.shutdown() }
        let seen = Self.talk(rig.stallPort(full: false), Self.http1("/silent"))
        #expect(seen.bytes.isEmpty && !seen.closed, "\(FuzzInput.show(seen.bytes))")
        usleep(1_000_000)
        #expect(try rig.held().reduce(0, +) == 1, "the request is held after its client left")
        #expect(rig.proxy.stats.activeConnections.load(ordering: .relaxed) == 1)
        #expect(Self.stalls(rig) == 0)
        var table = rig.proxy.snapshot.table
        table.streamIdleTimeoutMilliseconds = Self.timeout
        rig.proxy.install(table)
        try Self.expectNothingHeld(rig, "after the timeout came in")
        #expect(Self.stalls(rig) == 1)
    }
}

/// An HTTP/1.1 backend that stalls on purpose, by the request's path:
/// `/silent` never answers; `/deaf` never answers and reads nothing more
/// (a backend that does not take the request's body); `/half` sends a head declaring 100 bytes and 7
/// of them ("partial"), then nothing; `/trickle` declares 8 and sends one
/// each 150 ms; `/big` sends `big` bytes at once (into NIO's buffer);
/// `/flood` sends `flood` bytes as fast as its socket takes them; any
/// other path is answered 200 "ok". Request bodies are not read. A
/// mirror's copy (its host ends in "-shadow") is never answered.
final class StallingBackend: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    static let big = 16 * 1024 * 1024
    static let flood = 512 * 1024 * 1024
    /// Bytes of `/flood` bodies written to the socket (or NIO's buffer,
    /// which holds a watermark's worth at most), over every connection.
    static let flooded = Atomic<Int>(0)
    private var pending = ByteBuffer()
    /// A `/flood` body's bytes written so far, while it is being written.
    private var flooding: Int?

    /// Writes while the socket takes more (and resumes when it does).
    private func flood(_ context: ChannelHandlerContext) {
        guard var done = flooding else { return }
        let chunk = context.channel.allocator.buffer(repeating: 0x7A, count: 65_536)
        while context.channel.isWritable && done < Self.flood {
            context.write(wrapOutboundOut(chunk), promise: nil)
            done += chunk.readableBytes
            Self.flooded.add(chunk.readableBytes, ordering: .relaxed)
        }
        context.flush()
        flooding = done < Self.flood ? done : nil
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { flood(context) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        pending.writeBuffer(&bytes)
        while let end = pending.readableBytesView.firstRange(of: Array("\r\n\r\n".utf8)) {
            let head = pending.readString(length: end.upperBound - pending.readerIndex) ?? ""
            if head.lowercased().contains("-shadow\r\n") {
                // A mirror's copy (RequestMirror's host): never answered.
                if !shadow { Self.shadowsOpen.add(1, ordering: .relaxed) }
                shadow = true
                Self.shadowsSeen.add(1, ordering: .relaxed)
                continue
            }
            let path = head.split(separator: " ").dropFirst().first.map(String.init) ?? "/"
            answer(path, context: context)
        }
    }

    /// Requests for `/fail` seen, over every connection.
    static let failed = Atomic<Int>(0)

    /// Connections open that carried a mirror's copy; copies seen.
    static let shadowsOpen = Atomic<Int>(0)
    static let shadowsSeen = Atomic<Int>(0)
    private var shadow = false

    func channelInactive(context: ChannelHandlerContext) {
        if shadow { Self.shadowsOpen.subtract(1, ordering: .relaxed) }
        context.fireChannelInactive()
    }

    private func write(_ text: String, _ context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(string: text)), promise: nil)
    }

    private func answer(_ path: String, context: ChannelHandlerContext) {
        switch path {
        case "/silent":
            break
        case "/deaf":
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        case "/flood":
            write("HTTP/1.1 200 OK\r\ncontent-length: \(Self.flood)\r\n\r\n", context)
            flooding = 0
            flood(context)
        case "/half":
            write("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial", context)
        case "/slow":
            // A whole answer, 600 ms late.
            context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(600)) {
                guard context.channel.isActive else { return }
                self.write("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nslow\n", context)
            }
        case "/fail":
            // A 503, 300 ms late (counted: RetryBreakerTests).
            Self.failed.add(1, ordering: .relaxed)
            context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(300)) {
                guard context.channel.isActive else { return }
                self.write("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nfail\n", context)
            }
        case "/trickle":
            write("HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n", context)
            trickle(Array("abcdefgh"), context: context)
        case "/big":
            write("HTTP/1.1 200 OK\r\ncontent-length: \(Self.big)\r\n\r\n", context)
            let chunk = context.channel.allocator.buffer(repeating: 0x7A, count: 65_536)
            for _ in 0..<(Self.big / 65_536) { context.write(wrapOutboundOut(chunk), promise: nil) }
            context.flush()
        default:
            write("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n", context)
        }
    }

    private func trickle(_ rest: [Character], context: ChannelHandlerContext) {
        guard let first = rest.first else { return }
        context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(150)) {
            guard context.channel.isActive else { return }
            self.write(String(first), context)
            self.trickle(Array(rest.dropFirst()), context: context)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}
