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
        let environment = ProcessInfo.processInfo.environment
        let cases = environment["WEFT_FUZZ_CASES"].flatMap(Int.init) ?? 600
        let first = environment["WEFT_FUZZ_FIRST"].flatMap(Int.init) ?? 0
        for express in [true, false] {
            let node = try TunnelStreamIdleTests.Node(express: express)
            defer { node.shutdown() }
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
                if !out.handshake {
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
            #expect(streams > (cases - first) / 4, "streams admitted: \(streams) of \(cases - first) connections")

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

            // And a well-formed stream is answered.
            let seen = try node.talk("http1", port: ports.http1, Array("GET / HTTP/1.1\r\nhost: a\r\n\r\n".utf8),
                                     done: { String(decoding: $0, as: UTF8.self).hasSuffix("ok\n") })
            #expect(seen.text.hasPrefix("HTTP/1.1 200"), "\(express ? "express" : "--no-express"): \(FuzzInput.show(seen.bytes))")
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
            if rng.next() % 6 == 0, block.count > 4 {
                let cut = int(1...(block.count - 1), &rng)
                frames.append(Frame(type: 0x1, flags: flags & ~0x4, stream: stream, payload: Array(block[..<cut])))
                frames.append(Frame(type: 0x9, flags: 0x4, stream: stream, payload: Array(block[cut...])))
            } else {
                frames.append(Frame(type: 0x1, flags: flags, stream: stream, payload: block))
            }
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
            switch rng.next() % 8 {
            case 0: frames.append(Frame(type: 0x8, flags: 0, stream: pick([0, stream], &rng), payload: be32(pick([1, 65_535, 0x7FFF_FFFF, 0], &rng))))
            case 1: frames.append(Frame(type: 0x6, flags: pick([0, 1], &rng), stream: 0, payload: [UInt8](repeating: 7, count: 8)))
            case 2: frames.append(Frame(type: 0x3, flags: 0, stream: stream, payload: be32(pick([0, 8, 1], &rng))))
            case 3: frames.append(Frame(type: 0x2, flags: 0, stream: pick([stream, stream + 2], &rng), payload: [0, 0, 0, 0, 16]))
            case 4: frames.append(Frame(type: 0x4, flags: pick([0, 1], &rng), stream: 0, payload: settings([(0x4, 0)])))
            case 5: frames.append(Frame(type: pick([0xA, 0xC, 0x10, 0xFE], &rng), flags: 0, stream: stream, payload: [1, 2, 3]))
            default: break
            }
            stream += pick([2, 2, 2, 0, 4], &rng)
        }
        if rng.next() % 6 == 0 { frames.append(Frame(type: 0x7, flags: 0, stream: 0, payload: be32(stream) + be32(0))) }
        return frames
    }
}
