import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
import WeftCore
@testable import WeftProxy

/// The proxy's listeners (ProxyServer.listen, for the capture port and the
/// tunnel port alike): one per event loop, each serving its connections on
/// its own loop; dealt out in turn by weft_listen_pick where the kernel
/// takes it, and by the kernel's hash, with a warning, where it does not.
@Suite(.serialized)
struct ProxyListenersTests {
    /// Log lines kept for the test to read.
    final class KeptLog: LogHandler, @unchecked Sendable {
        let lines = NIOLockedValueBox<[String]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            lines.withLockedValue { $0.append("\(event.level): \(event.message)") }
        }
    }

    /// Answers each connection with the index of the loop that serves it, and closes.
    final class SayLoop: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let index: UInt8
        init(_ index: Int) { self.index = UInt8(index) }
        func channelActive(context: ChannelHandlerContext) {
            var buffer = context.channel.allocator.buffer(capacity: 1)
            buffer.writeInteger(index)
            context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }

    /// `count` loops listening on 127.0.0.1; `connections` clients one
    /// after another, each the index of the loop that answered it.
    private func serve(loops count: Int, connections: Int) throws -> (answers: [Int], inTurn: Bool, log: [String]) {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: count)
        defer { try? group.syncShutdownGracefully() }
        var loops: [any EventLoop] = []
        for loop in group.makeIterator() { loops.append(loop) }
        let kept = KeptLog()
        let logger = Logger(label: "listeners") { _ in kept }
        let (channels, inTurn) = try ProxyServer.listen(address: IPv4Address(0x7f00_0001), port: 0, loops: loops, bootstrap: { loop in
            let index = loops.firstIndex { $0 === loop } ?? 255
            return ServerBootstrap(group: loop, childGroup: loop).childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // A connection is served by its listener's own loop.
                    try channel.pipeline.syncOperations.addHandler(SayLoop(channel.eventLoop === loop ? index : 254))
                }
            }
        }, logger: logger)
        defer { for c in channels { try? c.close().wait() } }
        #expect(channels.count == count)
        let port = try #require(channels.first?.localAddress?.port)
        #expect(channels.allSatisfy { $0.localAddress?.port == port })
        var answers: [Int] = []
        for _ in 0..<connections {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            try #require(fd >= 0)
            defer { close(fd) }
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = UInt16(port).bigEndian
            sin.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
            let rc = withUnsafePointer(to: &sin) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            try #require(rc == 0, "connect: errno \(errno)")
            var byte: UInt8 = 0
            try #require(read(fd, &byte, 1) == 1, "no answer: errno \(errno)")
            answers.append(Int(byte))
        }
        return (answers, inTurn, kept.lines.withLockedValue { $0 })
    }

    @Test(.enabled(if: geteuid() == 0 || ProcessInfo.processInfo.environment["CI"] == "true",
                   "needs root for eBPF (run as root; under CI=true this fails instead of skipping)"))
    func eachLoopServesItsListenersConnectionsInTurn() throws {
        try #require(geteuid() == 0, "CI=true: this test must run as root")
        let served = try serve(loops: 3, connections: 12)
        #expect(served.inTurn, "\(served.log)")
        #expect(served.answers == Array(repeating: [0, 1, 2], count: 4).flatMap { $0 })
        #expect(served.log.isEmpty, "\(served.log)")
    }

    /// More loops than weft_listen_socks holds (WEFT_MAX_LISTENERS): the
    /// kernel refuses nothing, the proxy does not attach the program and
    /// serves on the kernel's hash of each connection's addresses, saying so.
    /// (Without root the attach fails the same way, at loading the program.)
    @Test func tooManyLoopsToDealOutServeOnTheKernelsHashWithAWarning() throws {
        let served = try serve(loops: 65, connections: 40)
        #expect(!served.inTurn)
        #expect(served.answers.count == 40 && served.answers.allSatisfy { $0 < 65 }, "\(served.answers)")
        // The hash, not a turn: not every connection on the next loop.
        #expect(Set(served.answers).count > 1, "\(served.answers)")
        #expect(served.log.contains { $0.hasPrefix("warning:") && $0.contains("cannot attach weft_listen_pick") }, "\(served.log)")
    }
}
