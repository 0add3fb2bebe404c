import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import WeftCore
import WeftIdentity

/// The destination end of a tunnel, at the frame level, for the streams
/// that are plain TCP to a pod of this node (TunnelInbound.Admission.tcp:
/// most of them). It sits between NIOHTTP2Handler and the stream
/// multiplexer and sees every frame first, as ExpressHTTP2Handler does for
/// h2c clients: such a stream's DATA frames are written to the pod's socket
/// as they come and the pod's bytes go back as DATA frames, with no stream
/// channel, no codec and no glue between them (~3,700 instructions of
/// window events alone per request at this end went to the stream channel).
/// Every other stream (a refusal, a health check, HTTP the source proxy
/// wrote, TCP whose first bytes decide under policies that read HTTP) goes
/// on to the multiplexer and TunnelInbound, untouched.
///
/// What the stream channel and GlueHandler did, this does per stream:
/// - flow control: a stream's window (TunnelHTTP2's initial 1 MiB) is given
///   back once half of it was written to the pod while the pod's socket can
///   take more, so a slow pod slows the sender instead of filling memory;
///   the connection's window (4 MiB) is reopened as data arrives, as the
///   multiplexer did (it gets no connection window events from here).
/// - backpressure the other way: the pod is read only while the tunnel can
///   take writes and the stream's and connection's send windows are open.
/// - ends: END_STREAM half-closes the pod's output after the bytes before
///   it; the pod's FIN is END_STREAM; a pod that closes whole ends the
///   stream (END_STREAM, then RST_STREAM if the peer still sends, once the
///   END_STREAM is out: nothing queued behind it is lost); a reset either
///   way resets the other side.
final class TunnelRelay: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    static let streamWindow = TunnelHTTP2.streamWindow
    static let connectionWindow = TunnelHTTP2.connectionWindow

    private let proxy: ProxyContext
    private var context: ChannelHandlerContext?
    private var loop: LoopState?
    private var peer: SpiffeID?
    private var peerRead = false
    private var streams: [HTTP2StreamID: Stream] = [:]
    private var lastStreamID = HTTP2StreamID.rootStream
    /// Streams with bytes written to their pod since the last flush.
    private var unflushed: [Stream] = []
    /// Frames written to the tunnel since its last flush.
    private var tunnelDirty = false
    private var writable = true
    /// The connection's send window, as NIOHTTP2Handler last told.
    private var sendWindow = Int.max

    init(proxy: ProxyContext) { self.proxy = proxy }

    /// One stream relayed to a pod; the handler of the pod's channel.
    fileprivate final class Stream: ChannelDuplexHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer

        let id: HTTP2StreamID
        /// Nil once the stream closed (or the tunnel did).
        var relay: TunnelRelay?
        var pod: ChannelHandlerContext?
        /// Bytes that came before the pod answered.
        var early: [ByteBuffer] = []
        /// The peer's END_STREAM came.
        var inputEnded = false
        /// Our END_STREAM, once written: a reset waits for it.
        var ended: EventLoopFuture<Void>?
        /// Bytes taken from the stream's window and not given back yet.
        var ungranted = 0
        var sendWindow = Int.max
        var pendingRead = false
        var failed = false
        var dirty = false

        init(id: HTTP2StreamID, relay: TunnelRelay) {
            self.id = id
            self.relay = relay
        }

        func handlerAdded(context: ChannelHandlerContext) { pod = context }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            relay?.podRead(self, Self.unwrapInboundIn(data))
        }

        func channelReadComplete(context: ChannelHandlerContext) { relay?.flushTunnel() }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let e = event as? ChannelEvent, case .inputClosed = e { relay?.podEnded(self) }
            context.fireUserInboundEventTriggered(event)
        }

        func read(context: ChannelHandlerContext) {
            if relay?.mayRead(self) ?? true {
                context.read()
            } else {
                pendingRead = true
            }
        }

        func channelWritabilityChanged(context: ChannelHandlerContext) {
            if context.channel.isWritable { relay?.grant(self, flush: true) }
            context.fireChannelWritabilityChanged()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            failed = true
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            relay?.podClosed(self)
            context.fireChannelInactive()
        }

        /// The peer ended the stream: the pod's output ends after what was
        /// written to it (a full close if it cannot be half-closed).
        func endPodOutput() {
            guard let pod else { return }
            pod.closeOutputAfterWrites { ended in if !ended { pod.close(promise: nil) } }
        }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        loop = proxy.loop(context.eventLoop)
        writable = context.channel.isWritable
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        for stream in Array(streams.values) { detach(stream, reset: true) }
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        for stream in Array(streams.values) { detach(stream, reset: true) }
        context.fireChannelInactive()
    }

    // MARK: frames from the peer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        let id = frame.streamID
        if let stream = streams[id] { return received(frame.payload, on: stream) }
        if case .headers(let h) = frame.payload, id > lastStreamID {
            lastStreamID = id
            if !h.endStream, let stream = take(id, h.headers, context: context) {
                streams[id] = stream
                return
            }
        }
        context.fireChannelRead(data)
    }

    private func received(_ payload: HTTP2Frame.FramePayload, on stream: Stream) {
        switch payload {
        case .data(let d):
            guard case .byteBuffer(let bytes) = d.data else { return reset(stream) }
            stream.ungranted += bytes.readableBytes + (d.paddingBytes.map { $0 + 1 } ?? 0)
            if bytes.readableBytes > 0 {
                if let pod = stream.pod {
                    pod.write(NIOAny(bytes), promise: nil)
                    if !stream.dirty {
                        stream.dirty = true
                        unflushed.append(stream)
                    }
                } else {
                    stream.early.append(bytes)
                }
            }
            if d.endStream { peerEnded(stream) }
        case .headers(let h):
            if h.endStream { peerEnded(stream) }  // trailers carry nothing for a pod
        case .rstStream:
            stream.inputEnded = true  // the stream-closed event detaches it
        default:
            break  // WINDOW_UPDATE and PRIORITY are NIOHTTP2Handler's
        }
    }

    /// The pod's output ends behind the bytes written to it, flushed or not.
    private func peerEnded(_ stream: Stream) {
        stream.inputEnded = true
        stream.endPodOutput()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !unflushed.isEmpty {
            let flushed = unflushed
            unflushed.removeAll(keepingCapacity: true)
            for stream in flushed {
                stream.dirty = false
                stream.pod?.flush()
                grant(stream, flush: false)
            }
        }
        flushTunnel()
        context.fireChannelReadComplete()
    }

    /// Gives the stream's window back once half of it went to the pod, if
    /// the pod's socket takes more now.
    fileprivate func grant(_ stream: Stream, flush: Bool) {
        guard stream.relay != nil, !stream.inputEnded, stream.ungranted >= Self.streamWindow / 2,
              let pod = stream.pod, pod.channel.isWritable, let context else { return }
        let frame = HTTP2Frame(streamID: stream.id, payload: .windowUpdate(windowSizeIncrement: stream.ungranted))
        stream.ungranted = 0
        context.write(wrapOutboundOut(frame), promise: nil)
        tunnelDirty = true
        if flush { flushTunnel() }
    }

    // MARK: a new stream

    /// Takes a CONNECT stream that is plain TCP to a pod of this node, and
    /// connects to the pod; nil for every other stream.
    private func take(_ id: HTTP2StreamID, _ headers: HPACKHeaders, context: ChannelHandlerContext) -> Stream? {
        guard let loop else { return nil }
        if !peerRead {
            peerRead = true
            peer = TunnelInbound.peer(of: context.channel)
        }
        guard case .tcp(let key, let decision) = TunnelInbound.admit(proxy, headers: headers, peer: peer, loop: loop) else {
            return nil
        }
        proxy.stats.tunnelStreamsIn.add(1, ordering: .relaxed)
        proxy.stats.tunnelStreamsRelayed.add(1, ordering: .relaxed)
        if let decision { Authorize.record(proxy, decision, target: key.description) }
        let stream = Stream(id: id, relay: self)
        ClientBootstrap(group: context.eventLoop)
            .connectTimeout(.seconds(2))
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelOption(ChannelOptions.recvAllocator, value: TunnelHTTP2.recvAllocator)
            .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .connect(host: key.address, port: Int(key.port))
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .failure(let error):
                    guard stream.relay != nil else { return }
                    refuse(stream, 502, "cannot connect to \(key): \(error)")
                case .success(let pod):
                    guard stream.relay != nil, (try? pod.pipeline.syncOperations.addHandler(stream)) != nil else {
                        return pod.close(promise: nil)
                    }
                    answer(stream)
                }
            }
        return stream
    }

    /// The pod answered: 200 to the peer, then what the stream said so far.
    private func answer(_ stream: Stream) {
        guard let context, let pod = stream.pod else { return }
        let ok = HTTP2Frame(streamID: stream.id, payload: .headers(.init(headers: HPACKHeaders([(":status", "200")]))))
        context.write(wrapOutboundOut(ok), promise: nil)
        tunnelDirty = true
        flushTunnel()
        let early = stream.early
        stream.early = []
        for bytes in early { pod.write(NIOAny(bytes), promise: nil) }
        pod.flush()
        if stream.inputEnded { stream.endPodOutput() } else { grant(stream, flush: true) }
    }

    private func refuse(_ stream: Stream, _ status: Int, _ reason: String) {
        guard let context else { return }
        let headers = TunnelInbound.refusal(proxy, status, reason)
        context.write(wrapOutboundOut(HTTP2Frame(streamID: stream.id, payload: .headers(.init(headers: headers, endStream: true)))),
                      promise: nil)
        reset(stream)
    }

    /// RST_STREAM(CANCEL): the stream-closed event that follows detaches it.
    private func reset(_ stream: Stream) {
        guard let context, stream.relay != nil else { return }
        context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: stream.id, payload: .rstStream(.cancel))), promise: nil)
    }

    // MARK: the pod's side

    fileprivate func podRead(_ stream: Stream, _ bytes: ByteBuffer) {
        guard let context else { return }
        context.write(wrapOutboundOut(HTTP2Frame(streamID: stream.id, payload: .data(.init(data: .byteBuffer(bytes))))), promise: nil)
        tunnelDirty = true
    }

    fileprivate func flushTunnel() {
        guard tunnelDirty, let context else { return }
        tunnelDirty = false
        context.flush()
    }

    /// The pod's FIN: END_STREAM, behind the DATA before it.
    fileprivate func podEnded(_ stream: Stream) {
        guard let context, stream.ended == nil else { return }
        let written = context.eventLoop.makePromise(of: Void.self)
        stream.ended = written.futureResult
        let end = HTTP2Frame(streamID: stream.id, payload: .data(.init(data: .byteBuffer(context.channel.allocator.buffer(capacity: 0)),
                                                                         endStream: true)))
        context.write(wrapOutboundOut(end), promise: written)
        tunnelDirty = true
        flushTunnel()
    }

    /// The pod's connection closed: reset at once if it failed; else the
    /// stream ends, and is reset once that END_STREAM is out if the peer
    /// has not ended its side by then.
    fileprivate func podClosed(_ stream: Stream) {
        guard stream.relay != nil else { return }
        if stream.failed { return reset(stream) }
        podEnded(stream)
        stream.ended?.assumeIsolated().whenComplete { [self] _ in
            if !stream.inputEnded { reset(stream) }  // else both ends are done: the stream closed
        }
    }

    fileprivate func mayRead(_ stream: Stream) -> Bool {
        writable && sendWindow > 0 && stream.sendWindow > 0
    }

    private func resume(_ stream: Stream) {
        guard stream.pendingRead, mayRead(stream) else { return }
        stream.pendingRead = false
        stream.pod?.read()
    }

    /// The stream closed in NIOHTTP2Handler: both ends sent END_STREAM (the
    /// pod's output ends after its bytes, and its input had ended), or it
    /// was reset (the pod is closed at once).
    private func detach(_ stream: Stream, reset: Bool) {
        streams[stream.id] = nil
        stream.relay = nil
        stream.early = []
        guard let pod = stream.pod else { return }
        if reset { pod.close(promise: nil) } else { pod.closeAfterWrites() }
    }

    // MARK: events

    /// Events of relayed streams stop here; the connection's window events
    /// too (this handler keeps that window open). Most frequent first; each
    /// `as?` is a runtime cast.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        let type = Swift.type(of: event)
        if type == NIOHTTP2WindowUpdatedEvent.self, let updated = event as? NIOHTTP2WindowUpdatedEvent {
            if updated.streamID == .rootStream {
                if let size = updated.inboundWindowSize, size <= Self.connectionWindow / 2 {
                    let frame = HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: Self.connectionWindow - size))
                    context.writeAndFlush(wrapOutboundOut(frame), promise: nil)
                }
                if let size = updated.outboundWindowSize {
                    let reopened = sendWindow <= 0 && size > 0
                    sendWindow = size
                    if reopened { resumeAll() }
                }
                return
            }
            if let stream = streams[updated.streamID] {
                if let size = updated.outboundWindowSize {
                    stream.sendWindow = size
                    if size > 0 { resume(stream) }
                }
                return
            }
        } else if type == StreamClosedEvent.self, let closed = event as? StreamClosedEvent {
            if let stream = streams[closed.streamID] { return detach(stream, reset: closed.reason != nil) }
        } else if type == NIOHTTP2StreamCreatedEvent.self, let created = event as? NIOHTTP2StreamCreatedEvent {
            if streams[created.streamID] != nil { return }
        } else if let bulk = event as? NIOHTTP2BulkStreamWindowChangeEvent {
            for stream in streams.values where stream.sendWindow != Int.max { stream.sendWindow += bulk.delta }
            resumeAll()
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func resumeAll() {
        for stream in streams.values { resume(stream) }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        if writable { resumeAll() }
        context.fireChannelWritabilityChanged()
    }
}
