import Foundation
import Glibc
import NIOCore
import NIOHPACK
import Testing
@testable import WeftCore
@testable import WeftProxy

/// MeshConfig `proxy.http2MaxConcurrentStreams` (1000 by default): what the
/// proxy's SETTINGS offer an h2c client, on the express path and on NIO's
/// (`--no-express`), and that many streams held open at once on one
/// connection are all served (gRPC's clients hold a call past the offered
/// limit until another ends: with NIO's 100, the 101st long-lived stream
/// through the proxy waited for good). Past a lower configured limit a
/// stream is refused (RST_STREAM REFUSED_STREAM, which a client may retry).
@Suite(.serialized) struct HTTP2ClientStreamsTests {
    /// What one client connection saw: the proxy's SETTINGS_MAX_CONCURRENT_STREAMS,
    /// the :status of each stream answered, the streams reset.
    struct Seen {
        var offered: Int?
        var statuses: [UInt32: String] = [:]
        var resets: [UInt32: UInt32] = [:]
        var goAway = false
    }

    /// Opens `streams` streams on one h2c connection to `port` (POST to
    /// `plain`, bodies not ended), waits `hold`, ends them all, reads for
    /// 5 s or until every stream is answered or reset.
    static func run(port: Int, streams: Int, hold: Duration = .milliseconds(300), authority: String = "plain.fz") throws -> Seen {
        let fd = try #require(ProxyFuzzTests.dial(port))
        defer { close(fd) }
        var rng = LoopRandom(seed: 7)
        typealias Frame = FuzzInput.Frame
        let ids = (0..<streams).map { UInt32(2 * $0 + 1) }
        let block: [UInt8] = [0x83, 0x86, 0x84, 0x41] + FuzzInput.lengthPrefixed(Array(authority.utf8))
        send(fd, FuzzInput.serialize([Frame(type: 0xFF, flags: 0, stream: 0, payload: ProtocolDetector.preface),
                                      Frame(type: 0x4, flags: 0, stream: 0, payload: [])], &rng))
        var seen = Seen()
        var inbox: [UInt8] = []
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator())
        func read(for duration: Duration, until done: (Seen) -> Bool) {
            let deadline = ContinuousClock.now + duration
            var buffer = [UInt8](repeating: 0, count: 65_536)
            var timeout = timeval(tv_sec: 0, tv_usec: 50_000)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            while ContinuousClock.now < deadline, !done(seen) {
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n == 0 { return }
                if n > 0 { inbox += buffer[0..<n] }
                while inbox.count >= 9 {
                    let length = Int(inbox[0]) << 16 | Int(inbox[1]) << 8 | Int(inbox[2])
                    guard inbox.count >= 9 + length else { break }
                    let type = inbox[3], flags = inbox[4]
                    let stream = FuzzInput.be32(Array(inbox[5..<9])) & 0x7FFF_FFFF
                    let payload = Array(inbox[9..<9 + length])
                    inbox.removeFirst(9 + length)
                    switch type {
                    case 0x4 where flags & 0x1 == 0:
                        for i in stride(from: 0, to: payload.count - 5, by: 6) where payload[i] == 0 && payload[i + 1] == 3 {
                            seen.offered = Int(FuzzInput.be32(Array(payload[i + 2..<i + 6])))
                        }
                    case 0x1:
                        var b = ByteBuffer(bytes: payload)
                        if let status = (try? decoder.decodeHeaders(from: &b))?.first(name: ":status") { seen.statuses[stream] = status }
                    case 0x3:
                        seen.resets[stream] = FuzzInput.be32(payload)
                    case 0x7:
                        seen.goAway = true
                    default:
                        break
                    }
                }
            }
        }
        // As a client does: the proxy's SETTINGS acknowledged (from then
        // on its limit holds), then the streams.
        read(for: .seconds(2)) { $0.offered != nil }
        send(fd, FuzzInput.serialize([Frame(type: 0x4, flags: 0x1, stream: 0, payload: [])]
                                     + ids.map { Frame(type: 0x1, flags: 0x4, stream: $0, payload: block) }, &rng))
        read(for: hold) { _ in false }
        // Every body ends: an empty DATA frame with END_STREAM each.
        send(fd, FuzzInput.serialize(ids.map { Frame(type: 0x0, flags: 0x1, stream: $0, payload: []) }, &rng))
        // (A GOAWAY may stand for the stream that brought it.)
        read(for: .seconds(5)) { $0.statuses.count + $0.resets.count + ($0.goAway ? 1 : 0) >= streams }
        return seen
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { return }
            sent += n
        }
    }

    @Test(arguments: [true, false])
    func moreThanAHundredStreamsOnOneConnectionAreServed(express: Bool) throws {
        let rig = try ProxyFuzzTests.Rig(configure: { $0.express = express })
        defer { rig.shutdown() }
        let seen = try Self.run(port: rig.port(2), streams: 150)
        #expect(seen.offered == 1000)
        #expect(seen.resets.isEmpty && !seen.goAway, "\(seen.resets)")
        #expect(seen.statuses.count == 150 && seen.statuses.values.allSatisfy { $0 == "200" },
                "\(seen.statuses.count) answered: \(Set(seen.statuses.values))")
    }

    @Test(arguments: [true, false])
    func streamsPastAConfiguredLimitAreRefused(express: Bool) throws {
        let rig = try ProxyFuzzTests.Rig(table: { $0.http2MaxConcurrentStreams = 8 }, configure: { $0.express = express })
        defer { rig.shutdown() }
        let seen = try Self.run(port: rig.port(2), streams: 12)
        #expect(seen.offered == 8)
        #expect(seen.statuses.count == 8 && seen.statuses.values.allSatisfy { $0 == "200" }, "\(seen.statuses)")
        // The 9th to 12th refused (NIO's handler answers the 9th with a
        // GOAWAY, PROTOCOL_ERROR, that lets the first 8 finish).
        #expect(Set(seen.resets.keys).isSubset(of: [17, 19, 21, 23]) && seen.resets.count >= (express ? 4 : 3)
                && seen.resets.values.allSatisfy { $0 == 0x7 }, "REFUSED_STREAM: \(seen.resets)")
    }
}
