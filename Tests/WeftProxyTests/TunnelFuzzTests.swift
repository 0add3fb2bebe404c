import Foundation
import Glibc
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Testing
@testable import WeftCore
@testable import WeftIdentity
@testable import WeftProxy

/// The tunnel listener under a faulty or hostile peer: another node's
/// proxy, with a valid mesh identity (so past the mutual TLS), that writes
/// HTTP/2 at random into the tunnel: CONNECT streams to pods of the node,
/// to addresses that are not, for sources it may or may not speak for,
/// declaring HTTP/1.1, h2c or nothing, with health-check asks, carrying
/// mangled HTTP/1.1 requests, h2c connections or noise, and resets, window
/// updates, pings, settings and unknown frames between them; a third of the
/// connections also mangled at the frame level (types, flags, stream IDs,
/// lying lengths, frames dropped, doubled or swapped). Each case writes on
/// a fresh TLS connection (cut into 1 to 8 writes), waits 60 ms or, for
/// a quarter of them, 600 ms (past the 400 ms stream idle timeout of
/// TunnelStreamIdleTests.Node), then closes. The rules: the proxy does not
/// crash; whatever it answers begins with its SETTINGS; once every client
/// has gone, every tunnel is closed on the node's side and no pod
/// connection is held; and a well-formed stream is answered afterwards, on
/// the express path and with `--no-express`.
@Suite(.serialized) struct TunnelFuzzTests {
    /// What one tunnel connection did.
    struct Outcome {
        var handshake = true
        var answer: [UInt8] = []
        var closedByProxy = false
    }

    /// Writes `chunks` over a fresh mutual-TLS connection to the tunnel
    /// listener (as fz/far), reads what comes for `wait`, closes.
    static func exchange(_ node: TunnelStreamIdleTests.Node, chunks: [[UInt8]], wait: Duration) -> Outcome {
        var out = Outcome()
        let inbox = TunnelStreamIdleTests.Inbox()
        guard let context = node.client.clientContexts[TunnelStreamIdleTests.source] else {
            out.handshake = false
            return out
        }
        let name = TunnelTLS.serverName(for: TunnelStreamIdleTests.pod)
        let handshake = node.rig.group.next().makePromise(of: Void.self)
        let connected = ClientBootstrap(group: handshake.futureResult.eventLoop)
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: name))
                    try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(handshake))
                    try channel.pipeline.syncOperations.addHandler(TunnelStreamIdleTests.Collect(inbox))
                }
            }
            .connect(host: "127.0.0.1", port: node.tunnel.localAddress?.port ?? 0)
        guard let channel = try? connected.wait(), (try? handshake.futureResult.wait()) != nil else {
            out.handshake = false
            return out
        }
        defer { try? channel.close().wait() }
        for chunk in chunks {
            guard (try? channel.writeAndFlush(ByteBuffer(bytes: chunk)).wait()) != nil else { break }
        }
        let deadline = ContinuousClock.now + wait
        while ContinuousClock.now < deadline, !inbox.snapshot.1 { usleep(5_000) }
        (out.answer, out.closedByProxy) = inbox.snapshot
        return out
    }

    @Test func mangledTunnelsNeitherCrashNorHangTheProxy() throws {
        try Self.fuzz(cases: 600)
    }

    /// The same tunnels, closed under the node's proxy at one of their
    /// first five flushes (the TLS handshake's included), as a write fails
    /// when the peer has reset; and every third of the proxy's connections
    /// to the pods closed at its first write, as when a pod resets at once.
    /// NIO tells the handlers in the middle of what they were doing; once
    /// the clients have gone, nothing is open or held all the same.
    @Test func tunnelsClosedAtAnyWriteHoldNothing() throws {
        try Self.fuzz(cases: 600, closing: true)
    }

    /// `cases` fuzz cases (WEFT_FUZZ_CASES, WEFT_FUZZ_FIRST), on the express
    /// path and with `--no-express`; `closing`: with closes injected.
    static func fuzz(cases defaultCases: Int, closing: Bool = false) throws {
        let environment = ProcessInfo.processInfo.environment
        let cases = environment["WEFT_FUZZ_CASES"].flatMap(Int.init) ?? defaultCases
        let first = environment["WEFT_FUZZ_FIRST"].flatMap(Int.init) ?? 0
        for express in [true, false] {
            let flushes = Atomic<Int>(0), injecting = Atomic<Bool>(closing)
            let node = try TunnelStreamIdleTests.Node(express: express, front: { () -> any ChannelHandler in
                guard injecting.load(ordering: .relaxed) else { return ProxyFuzzTests.CloseAtFlush(Int.max) }
                return ProxyFuzzTests.CloseAtFlush(flushes.add(1, ordering: .relaxed).newValue % 5 + 1)
            })
            defer { node.shutdown() }
            if closing {
                for loop in Array(node.rig.group.makeIterator()) {
                    let proxy = node.rig.proxy
                    try loop.submit {
                        var made = 0
                        proxy.loop(loop).pool.front = {
                            made += 1
                            return ProxyFuzzTests.CloseAtFlush(made % 3 == 0 ? 1 : Int.max)
                        }
                    }.wait()
                }
            }
            let ports = FuzzInput.TunnelPorts(stall: node.stallPort, http1: node.rig.backends[0].localAddress?.port ?? 0,
                                              silentH2: node.silentH2Port)
            let failures = Mutex<[String]>([])
            ProxyFuzzTests.run(first..<cases, workers: 12) { i in
                var rng = LoopRandom(seed: 0x7E11_0000 &+ UInt64(i))
                var frames = FuzzInput.tunnel(ports, &rng)
                if rng.next() % 3 == 0 { frames = FuzzInput.mangle(frames: frames, &rng) }
                let bytes = FuzzInput.serialize(frames, &rng)
                if let dump = environment["WEFT_FUZZ_DUMP"] {
                    _ = FileManager.default.createFile(atPath: "\(dump)/tunnel-\(i).bin", contents: Data(bytes))
                }
                let chunks = FuzzInput.chunks(bytes, &rng)
                let out = Self.exchange(node, chunks: chunks, wait: rng.next() % 4 == 0 ? .milliseconds(600) : .milliseconds(60))
                var fault: String?
                if closing {
                    // (Any answer: the close can come at any write.)
                } else if !out.handshake {
                    fault = "the TLS handshake failed"
                } else if out.answer.count >= 9 && (out.answer[3] != 0x4 || out.answer[4] != 0) {
                    fault = "answered without SETTINGS first"
                }
                if let fault {
                    failures.withLock {
                        $0.append("case \(i) (\(express ? "express" : "--no-express"), \(chunks.count) chunks): \(fault); "
                                  + "sent \(FuzzInput.show(bytes)); got \(FuzzInput.show(out.answer))")
                    }
                }
            }
            for failure in failures.withLock({ $0 }).prefix(20) { Issue.record(Comment(rawValue: failure)) }
            let streams = node.rig.proxy.stats.tunnelStreamsIn.load(ordering: .relaxed)
            // (Closed at a flush, a fifth of them in the handshake: fewer.)
            #expect(streams > (cases - first) / (closing ? 8 : 4), "streams admitted: \(streams) of \(cases - first) connections")

            // Every tunnel its client closed is closed here too, and nothing
            // holds a pod: no request in flight, no stream open to one.
            let deadline = ContinuousClock.now + .seconds(10)
            while ContinuousClock.now < deadline {
                if try node.rig.registry.count == 0 && !node.rig.held().contains(where: { $0 != 0 }) { break }
                usleep(20_000)
            }
            #expect(node.rig.registry.count == 0, "\(node.rig.registry.count) tunnels left open")
            let held = try node.rig.held()
            #expect(held.allSatisfy { $0 == 0 }, "pods still held (requests, streams per loop): \(held)")
            #expect(node.rig.proxy.stats.tunnelsInActive.load(ordering: .relaxed) == 0, "tunnels counted open")

            // And a well-formed stream is answered.
            injecting.store(false, ordering: .relaxed)
            if closing {
                for loop in Array(node.rig.group.makeIterator()) {
                    let proxy = node.rig.proxy
                    try loop.submit { proxy.loop(loop).pool.front = nil }.wait()
                }
            }
            let seen = try node.talk("http1", port: ports.http1, Array("GET / HTTP/1.1\r\nhost: a\r\n\r\n".utf8),
                                     done: { String(decoding: $0, as: UTF8.self).hasSuffix("ok\n") })
            #expect(seen.text.hasPrefix("HTTP/1.1 200"), "\(express ? "express" : "--no-express"): \(FuzzInput.show(seen.bytes))")
        }
    }
}

/// The other end of a tunnel: the source node's proxy opening streams to a
/// faulty or hostile destination node's proxy (a valid mesh identity, so
/// past TLS) that answers at random: HTTP/2 answers as a broken backend's
/// (FuzzInput.h2Response: statuses indexed, literal, missing or not one,
/// bodies, trailers, resets, GOAWAY, pushes, frames of other streams,
/// mangled at the frame level), refusals, SETTINGS and nothing more,
/// silence, or noise; then it closes at once, after 50 ms, or not until the
/// case ends. For each kind of tunnel the source makes (stream channels
/// over Weft's codec, over NIO's, relayed), 600 cases on 12 threads. The
/// rules: no crash; every open gets its outcome within the open timeout
/// (400 ms here) and a second; once the peer has gone, the tunnel and any
/// stream opened on it are closed. `WEFT_FUZZ_SLOW=1` lists as faults the
/// opens that only the timeout ended though the peer answered something
/// (to look at; most are answers cut short or with nothing for the
/// stream, which the timeout is for).
@Suite struct TunnelAnswerFuzzTests {
    /// A destination that answers the first bytes it reads with `answer`,
    /// then closes (`closeAfter`: nil, never, until `close()`).
    final class Peer: Sendable {
        let channel: any Channel
        final class Children: Sendable { let list = Mutex<[any Channel]>([]) }
        private let children = Children()
        var port: Int { channel.localAddress?.port ?? 0 }

        init(group: any EventLoopGroup, tls: NIOSSLContext, answer: [UInt8], closeAfter: TimeAmount?) throws {
            let children = self.children
            channel = try ServerBootstrap(group: group)
                .childChannelInitializer { child in
                    children.list.withLock { $0.append(child) }
                    return child.eventLoop.makeCompletedFuture {
                        try child.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                        try child.pipeline.syncOperations.addHandler(Answer(answer, closeAfter: closeAfter))
                    }
                }
                .bind(host: "127.0.0.1", port: 0).wait()
        }

        func close() {
            try? channel.close().wait()
            for c in children.list.withLock({ $0 }) { try? c.close().wait() }
        }
    }

    final class Answer: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        private let answer: [UInt8]
        private let closeAfter: TimeAmount?
        private var answered = false

        init(_ answer: [UInt8], closeAfter: TimeAmount?) {
            self.answer = answer
            self.closeAfter = closeAfter
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard !answered else { return }
            answered = true
            if !answer.isEmpty { context.writeAndFlush(wrapOutboundOut(ByteBuffer(bytes: answer)), promise: nil) }
            guard let closeAfter else { return }
            context.eventLoop.assumeIsolated().scheduleTask(in: closeAfter) { context.close(promise: nil) }
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }

    static let timeout = TimeAmount.milliseconds(400)

    /// Whether `future` completes within 2 s (waited for off `loop`).
    static func within2s(_ future: EventLoopFuture<Void>, on loop: any EventLoop) -> Bool {
        let done = loop.makePromise(of: Void.self)
        loop.scheduleTask(in: .seconds(2)) { done.fail(ChannelError.connectTimeout(.seconds(2))) }
        future.cascade(to: done)
        return (try? done.futureResult.wait()) != nil
    }

    @Test func mangledAnswersNeitherCrashNorHangTheSource() throws {
        let environment = ProcessInfo.processInfo.environment
        let cases = environment["WEFT_FUZZ_CASES"].flatMap(Int.init) ?? 600
        let first = environment["WEFT_FUZZ_FIRST"].flatMap(Int.init) ?? 0
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { try? group.syncShutdownGracefully() }
        let mesh = try TestMesh()
        let client = try mesh.bundle([try mesh.identity("fz", "far")])
        let server = try mesh.bundle([try mesh.identity("fz", "default")])
        let tls = try #require(server.serverContext)
        let context = try #require(client.clientContexts[TunnelStreamIdleTests.source])
        let route = TunnelRoute(source: TunnelStreamIdleTests.source, destination: TunnelStreamIdleTests.pod,
                                node: IPv4Address("127.0.0.1")!)
        let failures = Mutex<[String]>([])
        let opened = Atomic<Int>(0)
        ProxyFuzzTests.run(first..<cases, workers: 12) { i in
            var rng = LoopRandom(seed: 0xA115_0000 &+ UInt64(i))
            let kind = FuzzInput.pick(TunnelOpenTests.Kind.allCases, &rng)
            let answer: [UInt8]
            switch rng.next() % 20 {
            case 0..<8: answer = FuzzInput.h2Response(stream: 1, &rng)
            case 8..<12:
                // A well-formed 200, some bytes of the pod's, perhaps their end.
                var frames = [FuzzInput.Frame(type: 0x4, flags: 0, stream: 0, payload: []),
                              FuzzInput.Frame(type: 0x1, flags: 0x4, stream: 1, payload: [0x88])]
                if rng.next() % 2 == 0 {
                    frames.append(FuzzInput.Frame(type: 0x0, flags: FuzzInput.pick([0, 1], &rng), stream: 1,
                                                  payload: Array("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".utf8)))
                }
                answer = FuzzInput.serialize(frames, &rng)
            case 12..<15:
                let refusal = [0x08] + FuzzInput.lengthPrefixed(Array("403".utf8)) + FuzzInput.literal("x-weft-reason", "no")
                answer = FuzzInput.serialize([FuzzInput.Frame(type: 0x4, flags: 0, stream: 0, payload: []),
                                              FuzzInput.Frame(type: 0x1, flags: 0x5, stream: 1, payload: refusal)], &rng)
            case 15..<17: answer = FuzzInput.serialize([FuzzInput.Frame(type: 0x4, flags: 0, stream: 0, payload: [])], &rng)
            case 17..<19: answer = []
            default: answer = (0..<FuzzInput.int(1...200, &rng)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            }
            if let dump = environment["WEFT_FUZZ_DUMP"] {
                _ = FileManager.default.createFile(atPath: "\(dump)/answer-\(i).bin", contents: Data(answer))
            }
            let closeAfter: TimeAmount? = FuzzInput.pick([.zero, .zero, .milliseconds(50), nil, nil], &rng)
            let what = "case \(i) (\(kind), closing \(closeAfter.map { "after \($0.nanoseconds / 1_000_000) ms" } ?? "never")): "
                + "answered \(FuzzInput.show(answer))"
            do {
                let peer = try Peer(group: group, tls: tls, answer: answer, closeAfter: closeAfter)
                let loop = group.next()
                let outcome = loop.makePromise(of: Channel?.self)
                let tunnelClosed = loop.makePromise(of: Void.self)
                let start = ContinuousClock.now
                try loop.submit {
                    let c = TunnelConnection(route: route, port: peer.port, context: context, loop: loop, relay: kind == .relayed,
                                             codec: kind != .nio, openTimeout: Self.timeout) { _ in tunnelClosed.succeed() }
                    let headers = [("x-weft-source", "198.18.9.10"), ("x-weft-protocol", "http1")]
                    if kind == .relayed {
                        c.openRelayed(authority: "127.0.0.4:80", headers: headers) { outcome.completeWith($0.map { _ in nil }) }
                    } else {
                        c.openStream(authority: "127.0.0.4:80", headers: headers, initialize: { _ in }) { result in
                            outcome.completeWith(result.map { Optional($0) })
                        }
                    }
                }.wait()
                // The outcome, or nil once the bound has passed without one.
                let bound = loop.makePromise(of: Result<Channel?, any Error>?.self)
                loop.scheduleTask(in: Self.timeout + .seconds(1)) { bound.succeed(nil) }
                outcome.futureResult.whenComplete { bound.succeed($0) }
                let got = try bound.futureResult.wait()
                let seconds = StreamIdleTests.seconds(ContinuousClock.now - start)
                var fault: String?
                switch got {
                case nil:
                    fault = "no outcome after \(seconds) s"
                case .success(let channel)?:
                    opened.add(1, ordering: .relaxed)
                    if let channel { channel.writeAndFlush(ByteBuffer(string: "GET / HTTP/1.1\r\n\r\n"), promise: nil) }
                    peer.close()
                    if let channel, !Self.within2s(channel.closeFuture, on: loop) { fault = "the stream was left open" }
                case .failure(let error)?:
                    if environment["WEFT_FUZZ_SLOW"] != nil, error is TunnelTimedOut, !answer.isEmpty {
                        fault = "timed out (\(seconds) s)"
                    }
                    peer.close()
                }
                // The peer gone, the tunnel closes (2 s at most).
                if fault == nil, !Self.within2s(tunnelClosed.futureResult, on: loop) { fault = "the tunnel was left open" }
                if let fault { failures.withLock { $0.append(what + ": " + fault) } }
            } catch {
                failures.withLock { $0.append(what + ": \(error)") }
            }
        }
        for failure in failures.withLock({ $0 }).prefix(20) { Issue.record(Comment(rawValue: failure)) }
        #expect(opened.load(ordering: .relaxed) > (cases - first) / 10, "opens that succeeded: \(opened.load(ordering: .relaxed))")
    }
}

/// The source end of a tunnel closed under it at one of its first six
/// flushes (the TLS handshake's included), as a write fails when the far
/// node resets: for each kind of tunnel (stream channels over Weft's codec,
/// over NIO's, relayed), to a real destination node (TunnelServer, express
/// and not), 150 opens of a stream that writes a request. The rules: no
/// crash; every open gets its outcome within the open timeout and a
/// second; a stream that opened is closed within 2 s of the tunnel; the
/// tunnel is told closed (its pool forgets it) once its socket is.
@Suite(.serialized) struct TunnelSourceClosingTests {
    @Test func tunnelsClosedUnderTheSourceAtAnyWriteLeaveNothingOpen() throws {
        let cases = ProcessInfo.processInfo.environment["WEFT_FUZZ_CASES"].flatMap(Int.init) ?? 150
        for express in [true, false] {
            let node = try TunnelStreamIdleTests.Node(express: express)
            defer { node.shutdown() }
            let context = try #require(node.client.clientContexts[TunnelStreamIdleTests.source])
            let route = TunnelRoute(source: TunnelStreamIdleTests.source, destination: TunnelStreamIdleTests.pod,
                                    node: IPv4Address("127.0.0.1")!)
            let port = node.tunnel.localAddress?.port ?? 0
            let http1 = node.rig.backends[0].localAddress?.port ?? 0
            let failures = Mutex<[String]>([])
            let opened = Atomic<Int>(0)
            ProxyFuzzTests.run(0..<cases, workers: 12) { i in
                let kind = TunnelOpenTests.Kind.allCases[i % 3]
                let at = i / 3 % 6 + 1
                let what = "\(express ? "express" : "--no-express"), case \(i) (\(kind), closed at flush \(at))"
                let loop = node.rig.group.next()
                let outcome = loop.makePromise(of: Channel?.self)
                let tunnelClosed = loop.makePromise(of: Void.self)
                do {
                    let connection = try loop.submit {
                        let c = TunnelConnection(route: route, port: port, context: context, loop: loop, relay: kind == .relayed,
                                                 codec: kind != .nio, openTimeout: TunnelAnswerFuzzTests.timeout,
                                                 front: { ProxyFuzzTests.CloseAtFlush(at) }) { _ in tunnelClosed.succeed() }
                        let headers = [("x-weft-source", "198.18.9.10"), ("x-weft-protocol", "http1")]
                        if kind == .relayed {
                            c.openRelayed(authority: "127.0.0.1:\(http1)", headers: headers) { outcome.completeWith($0.map { _ in nil }) }
                        } else {
                            c.openStream(authority: "127.0.0.1:\(http1)", headers: headers, initialize: { _ in }) { result in
                                outcome.completeWith(result.map { Optional($0) })
                            }
                        }
                        return NIOLoopBound(c, eventLoop: loop)
                    }.wait()
                    let bound = loop.makePromise(of: Result<Channel?, any Error>?.self)
                    loop.scheduleTask(in: TunnelAnswerFuzzTests.timeout + .seconds(1)) { bound.succeed(nil) }
                    outcome.futureResult.whenComplete { bound.succeed($0) }
                    var fault: String?
                    switch try bound.futureResult.wait() {
                    case nil:
                        fault = "no outcome"
                    case .success(let channel)?:
                        opened.add(1, ordering: .relaxed)
                        if let channel {
                            channel.writeAndFlush(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: pod\r\n\r\n"), promise: nil)
                            usleep(20_000)
                        }
                        // The tunnel closes (at its flush, or here), and its stream with it.
                        try loop.submit { connection.value.close() }.wait()
                        if let channel, !TunnelAnswerFuzzTests.within2s(channel.closeFuture, on: loop) {
                            fault = "the stream was left open"
                        }
                    case .failure?:
                        try loop.submit { connection.value.close() }.wait()
                    }
                    if fault == nil, !TunnelAnswerFuzzTests.within2s(tunnelClosed.futureResult, on: loop) {
                        fault = "the tunnel was not told closed"
                    }
                    if let fault { failures.withLock { $0.append(what + ": " + fault) } }
                } catch {
                    failures.withLock { $0.append(what + ": \(error)") }
                }
            }
            for failure in failures.withLock({ $0 }).prefix(20) { Issue.record(Comment(rawValue: failure)) }
            #expect(opened.load(ordering: .relaxed) > cases / 10, "opens that succeeded: \(opened.load(ordering: .relaxed))")
            // The destination let go of every tunnel and pod as well.
            let deadline = ContinuousClock.now + .seconds(10)
            while ContinuousClock.now < deadline {
                if try node.rig.registry.count == 0 && !node.rig.held().contains(where: { $0 != 0 }) { break }
                usleep(20_000)
            }
            #expect(node.rig.registry.count == 0, "\(node.rig.registry.count) tunnels left open at the destination")
            #expect(try node.rig.held().allSatisfy { $0 == 0 }, "pods still held at the destination")
        }
    }
}

extension FuzzInput {
    /// The pods' ports on the node under test.
    struct TunnelPorts {
        let stall: Int, http1: Int, silentH2: Int
    }

    /// A literal header field (not indexed, new name).
    static func literal(_ name: String, _ value: String) -> [UInt8] {
        [0x00] + lengthPrefixed(Array(name.utf8)) + lengthPrefixed(Array(value.utf8))
    }

    /// A tunnel connection's frames, as another node's proxy (or a broken
    /// or hostile one) might write them.
    static func tunnel(_ ports: TunnelPorts, _ rng: inout LoopRandom) -> [Frame] {
        var frames = [Frame(type: 0xFF, flags: 0, stream: 0, payload: ProtocolDetector.preface)]
        var pairs: [(UInt16, UInt32)] = []
        if rng.next() % 3 == 0 {
            pairs = [pick([(0x1, 0), (0x2, 0), (0x3, 0), (0x3, 1), (0x4, 0), (0x4, 2_147_483_648),
                           (0x5, 16_384), (0x5, 16_777_216), (0x6, 64), (0x99, 7)], &rng)]
        }
        frames.append(Frame(type: 0x4, flags: 0, stream: 0, payload: settings(pairs)))
        var stream: UInt32 = 1
        for _ in 0..<int(1...5, &rng) {
            let target = pick(["127.0.0.4:\(ports.stall)", "127.0.0.4:\(ports.stall)", "127.0.0.1:\(ports.http1)",
                               "127.0.0.1:\(ports.http1)", "127.0.0.4:\(ports.silentH2)", "198.18.9.10:80", "127.0.0.4", "[::1]:80", ""], &rng)
            let declared = pick(["http1", "http1", "h2", nil, "tcp"], &rng)
            var block = literal(":method", pick(["CONNECT", "CONNECT", "CONNECT", "GET"], &rng)) + literal(":authority", target)
            if rng.next() % 6 != 0 { block += literal("x-weft-source", pick(["198.18.9.10", "198.18.9.10", "198.18.9.10", "127.0.0.1", "x"], &rng)) }
            if let declared { block += literal("x-weft-protocol", declared) }
            if rng.next() % 12 == 0 { block += literal(TunnelProbe.header, pick(["/healthz", "", "/" + String(repeating: "p", count: 5_000)], &rng)) }
            var flags: UInt8 = 0x4
            if rng.next() % 8 == 0 { flags |= 0x1 }  // END_STREAM with the CONNECT
            frames += headers(block, flags: flags, stream: stream, splitOneIn: 6, &rng)
            // What the stream carries.
            var carried: [UInt8]
            switch declared {
            case "h2": carried = serialize(rng.next() % 3 == 0 ? mangle(frames: h2(&rng), &rng) : h2(&rng), &rng)
            case "http1": carried = rng.next() % 3 == 0 ? mangle(http1(&rng), &rng) : http1(&rng)
            default: carried = rng.next() % 2 == 0 ? http1(&rng) : (0..<int(0...300, &rng)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            }
            var at = 0
            let pieces = int(1...3, &rng)
            for k in 0..<pieces {
                let end = k == pieces - 1 ? carried.count : min(carried.count, at + int(0...carried.count, &rng))
                let last = k == pieces - 1 && rng.next() % 3 == 0
                frames.append(Frame(type: 0x0, flags: last ? 0x1 : 0, stream: stream, payload: Array(carried[at..<end])))
                at = end
            }
            if let extra = controlFrame(after: stream, &rng) { frames.append(extra) }
            stream += pick([2, 2, 2, 0, 4], &rng)
        }
        if rng.next() % 6 == 0 { frames.append(Frame(type: 0x7, flags: 0, stream: 0, payload: be32(stream) + be32(0))) }
        return frames
    }
}
