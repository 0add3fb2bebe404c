import Foundation
import Glibc
import NIOCore
import Testing
@testable import WeftProxy

/// `Expect: 100-continue` on the full path (the express path hands such a
/// request over), over real sockets (the fuzz rig: `api`, whose route sends
/// it down the full path, on NIO's HTTP/1.1 backend): the proxy answers
/// `100 Continue` itself, as soon as the request goes to a backend, so a client that waits
/// for it (curl, for any upload over 1 MiB) sends its body without waiting
/// out its own timeout (curl's 1 s); the final answer follows on the same
/// connection. An HTTP/1.0 request is not sent a 1xx.
@Suite(.serialized) struct ExpectContinueTests {
    /// Bytes read from `fd` until `done` holds of them or `seconds` pass.
    static func read(_ fd: Int32, seconds: Double, until done: (String) -> Bool) -> String {
        var got: [UInt8] = [], buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline, !done(String(decoding: got, as: UTF8.self)) {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 { got += buffer[0..<n] } else if n == 0 { break }
        }
        return String(decoding: got, as: UTF8.self)
    }

    static func send(_ fd: Int32, _ text: String) {
        _ = Array(text.utf8).withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    @Test func aClientThatExpectsContinueIsToldAtOnce() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        let fd = try #require(ProxyFuzzTests.dial(rig.port(0)))
        defer { close(fd) }
        for i in 0..<2 {
            let start = Date()
            Self.send(fd, "POST /upload HTTP/1.1\r\nhost: api.fz\r\ncontent-length: 5\r\nExpect: 100-Continue\r\n\r\n")
            let interim = Self.read(fd, seconds: 2) { $0.contains("\r\n\r\n") }
            let took = Date().timeIntervalSince(start)
            #expect(interim == "HTTP/1.1 100 Continue\r\n\r\n" && took < 0.5, "request \(i): \(interim) after \(took) s")
            Self.send(fd, "hello")
            let final = Self.read(fd, seconds: 2) { $0.hasSuffix("ok\n") }
            #expect(final.hasPrefix("HTTP/1.1 200") && final.hasSuffix("ok\n"), "request \(i): \(final)")
        }
        // HTTP/1.0: no 1xx; the final answer once the body has come.
        let old = try #require(ProxyFuzzTests.dial(rig.port(0)))
        defer { close(old) }
        Self.send(old, "POST /upload HTTP/1.0\r\nhost: api.fz\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        let nothing = Self.read(old, seconds: 0.3) { !$0.isEmpty }
        #expect(nothing.isEmpty, "\(nothing)")
        Self.send(old, "hello")
        let answer = Self.read(old, seconds: 2) { $0.hasSuffix("ok\n") }
        #expect(answer.hasPrefix("HTTP/1.0 200"), "\(answer)")
    }

    /// A request the proxy answers itself (a RequestRedirect's 301, a
    /// malformed path's 400) is answered before its body is asked for: no
    /// 100, so the client sends no body, and `connection: close`, since the
    /// client may send the body or not and the connection can carry no
    /// other request in step. The 100 is sent only to a request going to
    /// a backend.
    @Test func aRequestTheProxyAnswersItselfIsNotToldToSendItsBody() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        for (path, status) in [("/old/x", "301"), ("/a%zz", "400")] {
            let fd = try #require(ProxyFuzzTests.dial(rig.port(0)))
            defer { close(fd) }
            Self.send(fd, "POST \(path) HTTP/1.1\r\nhost: api.fz\r\ncontent-length: 5000000\r\nexpect: 100-continue\r\n\r\n")
            let answer = Self.read(fd, seconds: 2) { $0.contains("\r\n\r\n") }
            #expect(answer.hasPrefix("HTTP/1.1 \(status)") && !answer.contains("100 Continue")
                    && answer.lowercased().contains("connection: close"), "\(path): \(answer)")
        }
    }

    /// A client that resets its connection as soon as it has sent the head
    /// (the 100's write fails, and the connection closes while the proxy
    /// is still starting the attempt): nothing stays held, neither the
    /// backend's in-flight count nor a connection (a write that closed the
    /// channel under the attempt once left the count up, seen by the fuzz
    /// test in CI).
    @Test func aClientThatResetsWhileToldToGoOnLeavesNothingHeld() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        for i in 0..<300 {
            let fd = try #require(ProxyFuzzTests.dial(rig.port(i % 3)))
            var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
            Self.send(fd, "POST /upload HTTP/1.1\r\nhost: api.fz\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
            if i % 2 == 1 { usleep(UInt32(i % 7) * 100) }
            close(fd)
        }
        try rig.settle()
        #expect(rig.proxy.stats.activeConnections.load(ordering: .relaxed) == 0, "connections left open")
        let held = try rig.held()
        #expect(held.allSatisfy { $0 == 0 }, "backends still held (requests, streams per loop): \(held)")
    }

    /// Pipelined behind a request the proxy answers itself (a redirect),
    /// a request to a backend that never answers; the answer's write fails
    /// and closes the connection (as a client's reset makes it: NIO tells
    /// the handlers it is gone during the write, and the request behind is
    /// read after). Whatever the request behind began is ended when the
    /// handlers leave the closed pipeline, on either path: no timeout
    /// sweeps a closed connection, and its backend would stay held.
    @Test func aRequestReadAfterItsConnectionClosedHoldsNothing() throws {
        let redirect = ["stall", "stall-full"].map { name in """
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: \(name)-go, namespace: fz}
            spec:
              parentRefs: [{group: "", kind: Service, name: \(name), port: 80}]
              rules:
              - matches: [{path: {type: Exact, value: /go}}]
                filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /gone}, statusCode: 302}}]
            """ }.joined(separator: "\n---\n")
        let rig = try ProxyFuzzTests.Rig(manifests: redirect, front: { ProxyFuzzTests.CloseAtFlush(1) })
        defer { rig.shutdown() }
        for full in [false, true] {
            for _ in 0..<10 {
                let fd = try #require(ProxyFuzzTests.dial(rig.stallPort(full: full)))
                defer { close(fd) }
                Self.send(fd, "GET /go HTTP/1.1\r\nhost: a\r\n\r\nGET /wait HTTP/1.1\r\nhost: a\r\n\r\n")
                let answer = Self.read(fd, seconds: 2) { _ in false }
                #expect(answer.isEmpty, "the connection closed as the answer was written: \(answer)")
            }
        }
        try rig.settle()
        #expect(rig.proxy.stats.activeConnections.load(ordering: .relaxed) == 0, "connections left open")
        let held = try rig.held()
        #expect(held.allSatisfy { $0 == 0 }, "backends still held (requests, streams per loop): \(held)")
        let redirects = rig.proxy.stats.all.first { $0.0 == "responses_3xx" }?.1
        #expect(redirects == 20, "each connection's redirect was made: \(redirects ?? 0)")
    }
}
