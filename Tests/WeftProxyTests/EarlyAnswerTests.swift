import Foundation
import Glibc
import NIOCore
import Testing
@testable import WeftCore
@testable import WeftProxy

/// RFC 9113 8.1: a server may answer before the request is all sent, then
/// ask the client to stop sending it "without error": RST_STREAM NO_ERROR
/// after the response's END_STREAM. An HTTP/2 client whose upload the
/// backend answered early (`/early`: at its head, as a server refusing an
/// upload does) gets the whole response, then that reset, on the express
/// path (`api-b`, no route), the full path (`api`, a route with filters)
/// and the full path to an HTTP/2 upstream (`grpc`), rather than a stream
/// left half open that it would go on filling; so does one the proxy
/// answers itself; with the express path on (Weft's HTTP/2 codec) and off
/// (NIO's).
@Suite(.serialized) struct EarlyAnswerTests {
    @Test(arguments: [true, false])
    func anEarlyAnswerToAnOpenStreamEndsItWithNoError(express: Bool) throws {
        let rig = try ProxyFuzzTests.Rig(configure: { $0.express = express })
        defer { rig.shutdown() }
        for (what, vip) in ConnectionLifetimeTests.ways {
            let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: vip)
            defer { close() }
            let seen = StreamIdleTests.talk(ports[0], StreamIdleTests.http2("/early", body: (1 << 20, 1000))) {
                StreamIdleTests.reset($0) != nil
            }
            let frames = StreamIdleTests.frames(seen.bytes).filter { $0.stream == 1 }
            let ended = frames.firstIndex { ($0.type == 0x0 || $0.type == 0x1) && $0.flags & 0x1 != 0 }
            let reset = frames.firstIndex { $0.type == 0x3 }
            #expect(FuzzInput.h2Status(seen.bytes) == "200" && StreamIdleTests.data(seen.bytes) == "ok\n",
                    "\(what): \(FuzzInput.show(seen.bytes))")
            #expect(StreamIdleTests.reset(seen.bytes) == 0, "\(what): RST_STREAM \(String(describing: StreamIdleTests.reset(seen.bytes)))")
            #expect(ended != nil && reset != nil && ended! < reset!, "\(what): the reset follows the response's end: \(frames.map(\.type))")
            try rig.settle()
        }
        // The proxy's own answer to an open stream (a RequestRedirect's 301).
        let (ports, close) = try ConnectionWaitTests.pinnedPorts(rig, vip: ProxyFuzzTests.vip)
        defer { close() }
        let seen = StreamIdleTests.talk(ports[0], StreamIdleTests.http2("/old/x", body: (1 << 20, 1000))) {
            StreamIdleTests.reset($0) != nil
        }
        #expect(FuzzInput.h2Status(seen.bytes) == "301" && StreamIdleTests.reset(seen.bytes) == 0,
                "a local answer: \(FuzzInput.show(seen.bytes))")
    }
}
