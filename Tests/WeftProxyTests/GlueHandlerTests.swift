import NIOCore
import NIOEmbedded
import Testing
@testable import WeftProxy

/// GlueHandler joining two channels when one of them has already closed:
/// the pair ends, whichever side is glued first, instead of holding the
/// open channel until its own peer closes.
@Suite struct GlueHandlerTests {
    /// An open channel, and one closed whose close NIO has not finished
    /// (its handlers not yet removed: glue can still be added).
    static func channels() throws -> (open: EmbeddedChannel, closed: EmbeddedChannel) {
        let loop = EmbeddedEventLoop()
        let open = EmbeddedChannel(loop: loop), closed = EmbeddedChannel(loop: loop)
        for c in [open, closed] { try c.connect(to: SocketAddress(ipAddress: "198.18.1.10", port: 8080)).wait() }
        closed.close(promise: nil)
        return (open, closed)
    }

    @Test(arguments: [true, false])
    func glueOnAChannelThatClosedMeanwhileEndsThePair(closedFirst: Bool) throws {
        let (open, closed) = try Self.channels()
        defer { _ = try? open.finish() }
        #expect(!closed.isActive && open.isActive)
        let (a, b) = GlueHandler.pair()
        var finished: (Int, Int)?
        a.onFinish = { finished = ($0, $1) }
        if closedFirst {
            try closed.pipeline.syncOperations.addHandler(a)
            try open.pipeline.syncOperations.addHandler(b)
        } else {
            try open.pipeline.syncOperations.addHandler(b)
            try closed.pipeline.syncOperations.addHandler(a)
        }
        open.embeddedEventLoop.run()
        #expect(!open.isActive, "the open side was left open")
        #expect(finished != nil, "the pair never finished")
    }

    /// Both open: glued and held, bytes go across.
    @Test func glueOnTwoOpenChannelsCarriesBytes() throws {
        let loop = EmbeddedEventLoop()
        let x = EmbeddedChannel(loop: loop), y = EmbeddedChannel(loop: loop)
        for c in [x, y] { try c.connect(to: SocketAddress(ipAddress: "198.18.1.10", port: 8080)).wait() }
        defer { _ = try? x.finish(); _ = try? y.finish() }
        let (a, b) = GlueHandler.pair()
        try x.pipeline.syncOperations.addHandler(a)
        try y.pipeline.syncOperations.addHandler(b)
        try x.writeInbound(x.allocator.buffer(string: "hello"))
        x.pipeline.fireChannelReadComplete()
        loop.run()
        #expect(try y.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } == "hello")
        #expect(x.isActive && y.isActive)
    }
}
