import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import WeftCore
import WeftIdentity

/// Plain TCP carried by a tunnel at the frame level: each CONNECT stream is
/// joined to a TCP socket with no stream channel, no codec and no glue
/// between them (NIO's stream channel cost each end ~3,700 instructions of
/// window events alone per request). It sits right after the HTTP/2 codec
/// (Weft's HTTP2Codec, which speaks to it as NIOHTTP2Handler would).
///
/// - As the destination end (`server`) it sees every frame of a tunnel from
///   another node first, as ExpressHTTP2Handler does for h2c clients, and
///   takes the streams that are plain TCP to a pod of this node
///   (TunnelInbound.Admission.tcp: most of them); it connects to the pod.
///   Every other stream (a refusal, a health check, HTTP the source proxy
///   wrote, TCP whose first bytes decide under policies that read HTTP)
///   goes on to the stream multiplexer behind it and TunnelInbound,
///   untouched.
/// - As the source end (`client`) it has a tunnel connection to itself and
///   opens a stream per captured TCP connection (TCPPassthrough); the HTTP
///   the proxy writes through tunnels, and health checks, use connections
///   with stream channels (TunnelPool keeps both kinds).
///
/// What the stream channel, TunnelStreamCodec and GlueHandler did, this
/// does per stream:
/// - flow control: a stream's window (TunnelHTTP2's initial 1 MiB) is given
///   back once half of it was written to the socket while the socket takes
///   more, so a slow reader slows the sender instead of filling memory; the
///   connection's window (4 MiB) is reopened as data arrives by the codec
///   itself.
/// - backpressure the other way: the socket is read only while the tunnel
///   can take writes and the stream's and connection's send windows are open.
/// - ends: END_STREAM half-closes the socket's output after the bytes
///   before it; the socket's FIN is END_STREAM; a socket that closes whole
///   ends the stream (END_STREAM, then RST_STREAM if the peer still sends,
///   once the END_STREAM is out: nothing queued behind it is lost); a reset
///   either way resets the other side.
///
/// The destination end also drains its tunnel when the proxy does
/// (ChannelShouldQuiesceEvent), for every stream of it, relayed or not: a
/// GOAWAY naming the highest stream ID and a PING; once the PING comes back,
/// every stream the source opened before it saw that GOAWAY has arrived, so
/// a second GOAWAY names the last one, and the connection closes when no
/// stream is open. The source opens new streams on a new tunnel (to the
/// proxy that took over the port) meanwhile. What is still open at the
/// proxy's drain timeout is cut then.
final class TunnelRelay: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame
    typealias InboundOut = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    enum Role {
        /// The destination end: takes plain TCP streams for local pods.
        case server(ProxyContext)
        /// The source end: opens streams (`open`).
        case client
    }

    private let role: Role
    private var context: ChannelHandlerContext?
    private var loop: LoopState?
    private var peer: SpiffeID?
    private var peerRead = false
    private var streams: [HTTP2StreamID: Stream] = [:]
    private var lastStreamID = HTTP2StreamID.rootStream
    /// The client end's next stream.
    private var nextStreamID: Int32 = 1
    /// Streams with bytes written to their socket since the last flush.
    private var unflushed: [Stream] = []
    /// Frames written to the tunnel since its last flush.
    private var tunnelDirty = false
    private var writable = true
    /// The connection's send window, as the codec last told.
    private var sendWindow = Int.max
    /// Streams open on the connection, relayed or not: by ID, since the
    /// codec reports a stream reset while its HEADERS were being read
    /// (refused, malformed) closed but never created.
    private var openStreams = Set<HTTP2StreamID>()
    private enum Drain { case none, announced, final }
    private var drain = Drain.none
    /// The destination end's sweeps in a row with no stream open
    /// (IdleSweep.tunnelRounds).
    private var idle = IdleCount()
    static let drainPing = HTTP2PingData(withInteger: 0x7765_6674_6472_6e20)  // "weftdrn "

    init(_ role: Role) { self.role = role }

    /// The peer said GOAWAY: it takes no new stream.
    private var goneAway = false

    /// Whether the client end can open another stream: not after a GOAWAY,
    /// nor near the end of the stream IDs (they are not reused).
    var canOpen: Bool { context != nil && !goneAway && nextStreamID < Int32.max - 2 }

    /// Whether any stream is relayed or open on the connection now.
    var carriesStreams: Bool { !streams.isEmpty || !openStreams.isEmpty }

    /// One stream relayed to a TCP socket; the handler of the socket's channel.
    final class Stream: ChannelDuplexHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer

        let id: HTTP2StreamID
        /// Nil once the stream closed (or the tunnel did).
        fileprivate var relay: TunnelRelay?
        fileprivate var socket: ChannelHandlerContext?
        /// Bytes the peer sent before the socket was there.
        fileprivate var early: [ByteBuffer] = []
        /// The peer's END_STREAM came.
        fileprivate var inputEnded = false
        /// Our END_STREAM, once written: a reset waits for it.
        fileprivate var ended: EventLoopFuture<Void>?
        /// Bytes taken from the stream's window and not given back yet.
        fileprivate var ungranted = 0
        fileprivate var sendWindow = Int.max
        fileprivate var pendingRead = false
        fileprivate var failed = false
        fileprivate var dirty = false
        /// Client end: told of the peer's answer to the CONNECT.
        fileprivate var answered: ((Result<Stream, any Error>) -> Void)?
        /// Bytes read from the socket (sent on the stream) and written to it.
        private(set) var bytesSent = 0
        private(set) var bytesReceived = 0
        /// Called once, when the socket's channel closes, with those counts.
        var onFinish: ((_ sent: Int, _ received: Int) -> Void)?

        fileprivate init(id: HTTP2StreamID, relay: TunnelRelay) {
            self.id = id
            self.relay = relay
        }

        func handlerAdded(context: ChannelHandlerContext) {
            socket = context
            relay?.attached(self)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            send(Self.unwrapInboundIn(data))
        }

        func channelReadComplete(context: ChannelHandlerContext) { relay?.flushTunnelSoon() }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let e = event as? ChannelEvent, case .inputClosed = e { endOutput() }
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
            relay?.socketClosed(self)
            if let done = onFinish {
                onFinish = nil
                done(bytesSent, bytesReceived)
            }
            context.fireChannelInactive()
        }

        /// Bytes for the peer, as a DATA frame (the tunnel is flushed when
        /// the socket's read completes, or by `endOutput`).
        func send(_ bytes: ByteBuffer) {
            bytesSent += bytes.readableBytes
            relay?.write(self, bytes)
        }

        /// The socket's end: END_STREAM, behind the DATA before it.
        func endOutput() { relay?.end(self) }

        /// Sends what `send` wrote.
        func flushTunnel() { relay?.flushTunnel() }

        /// Given up on before a socket took it: reset.
        func cancel() { relay?.reset(self) }

        fileprivate func deliver(_ bytes: ByteBuffer) {
            bytesReceived += bytes.readableBytes
            socket?.write(NIOAny(bytes), promise: nil)
        }

        /// The peer ended the stream: the socket's output ends after what
        /// was written to it (a full close if it cannot be half-closed).
        fileprivate func endSocketOutput() {
            guard let socket else { return }
            socket.closeOutputAfterWrites { ended in if !ended { socket.close(promise: nil) } }
        }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if case .server(let proxy) = role { loop = proxy.loop(context.eventLoop) }
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
        if case .headers(let h) = frame.payload, !wellFormed(h.headers, on: id) { return malformed(id, context: context) }
        if let stream = streams[id] { return received(frame.payload, on: stream) }
        if case .goAway = frame.payload { goneAway = true }
        if drain == .announced, case .ping(let ping, ack: true) = frame.payload, ping == Self.drainPing {
            // Every stream opened before the source saw the first GOAWAY is here.
            drain = .final
            context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .goAway(
                lastStreamID: lastStreamID, errorCode: .noError, opaqueData: nil))), promise: nil)
            if openStreams.isEmpty { closeDrained(context) }
            return
        }
        if case .server(let proxy) = role, case .headers(let h) = frame.payload, id > lastStreamID {
            lastStreamID = id
            if !h.endStream, let stream = take(id, h.headers, proxy: proxy, context: context) {
                streams[id] = stream
                return
            }
        }
        context.fireChannelRead(data)
    }

    /// RFC 9113's rules for a field block (HTTP2Fields), as NIOHTTP2Handler
    /// held the tunnel's peer to them: the codec checks none. The
    /// destination end reads a CONNECT for every new stream, trailers
    /// after; the source end the answer to its CONNECT, trailers after.
    private func wellFormed(_ headers: HPACKHeaders, on id: HTTP2StreamID) -> Bool {
        let block: HTTP2Fields.Block
        switch role {
        case .server: block = id > lastStreamID ? .request : .trailers
        case .client: block = streams[id]?.answered != nil ? .response : .trailers
        }
        return HTTP2Fields.valid(headers, block)
    }

    /// A malformed block: its stream is reset (PROTOCOL_ERROR), relayed or
    /// not (a stream channel's closes with it), and the block goes nowhere.
    private func malformed(_ id: HTTP2StreamID, context: ChannelHandlerContext) {
        if case .server(let proxy) = role {
            lastStreamID = max(lastStreamID, id)
            proxy.stats.tunnelRefused.add(1, ordering: .relaxed)
            proxy.logger.info("tunnel stream reset", metadata: ["stream": "\(id)", "reason": "a malformed field block"])
        }
        if let stream = streams[id] { return reset(stream, .protocolError) }
        context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .rstStream(.protocolError))), promise: nil)
    }

    private func received(_ payload: HTTP2Frame.FramePayload, on stream: Stream) {
        switch payload {
        case .data(let d):
            guard case .byteBuffer(let bytes) = d.data else { return reset(stream) }
            stream.ungranted += bytes.readableBytes + (d.paddingBytes.map { $0 + 1 } ?? 0)
            if bytes.readableBytes > 0 {
                if stream.socket != nil {
                    stream.deliver(bytes)
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
            if let answered = stream.answered {
                // The client end: the peer's answer to the CONNECT.
                stream.answered = nil
                let status = h.headers.first(name: ":status") ?? ""
                guard status.hasPrefix("2") else {
                    let reason = h.headers.first(name: "x-weft-reason") ?? "status \(status)"
                    reset(stream)
                    return answered(.failure(TunnelRefused(status: Int(status) ?? 0, reason: reason)))
                }
                answered(.success(stream))
            }
            if h.endStream { peerEnded(stream) }  // trailers carry nothing for a socket
        case .rstStream:
            stream.inputEnded = true  // the stream-closed event detaches it
        default:
            break  // WINDOW_UPDATE and PRIORITY are the codec's
        }
    }

    /// The socket's output ends behind the bytes written to it, flushed or not.
    private func peerEnded(_ stream: Stream) {
        stream.inputEnded = true
        stream.endSocketOutput()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !unflushed.isEmpty {
            let flushed = unflushed
            unflushed.removeAll(keepingCapacity: true)
            for stream in flushed {
                stream.dirty = false
                stream.socket?.flush()
                grant(stream, flush: false)
            }
        }
        flushTunnel()
        context.fireChannelReadComplete()
    }

    /// Gives the stream's window back once half of it went to the socket,
    /// if the socket takes more now.
    fileprivate func grant(_ stream: Stream, flush: Bool) {
        guard stream.relay != nil, !stream.inputEnded, stream.ungranted >= TunnelHTTP2.streamWindow / 2,
              let socket = stream.socket, socket.channel.isWritable, let context else { return }
        let frame = HTTP2Frame(streamID: stream.id, payload: .windowUpdate(windowSizeIncrement: stream.ungranted))
        stream.ungranted = 0
        context.write(wrapOutboundOut(frame), promise: nil)
        tunnelDirty = true
        if flush { flushTunnel() }
    }

    // MARK: a new stream

    /// The destination end: takes a CONNECT stream that is plain TCP to a
    /// pod of this node, and connects to the pod; nil for every other stream.
    private func take(_ id: HTTP2StreamID, _ headers: HPACKHeaders, proxy: ProxyContext, context: ChannelHandlerContext) -> Stream? {
        guard let loop else { return nil }
        if !peerRead {
            peerRead = true
            peer = TunnelInbound.peer(of: context.channel)
        }
        guard case .tcp(let key, let decision) = TunnelInbound.admit(proxy, headers: headers, peer: peer, loop: loop) else {
            return nil
        }
        proxy.stats.tunnelStreamsIn.add(1, ordering: .relaxed)
        proxy.stats.tunnelStreamsInRelayed.add(1, ordering: .relaxed)
        if let decision { Authorize.record(proxy, decision, target: key.description) }
        let stream = Stream(id: id, relay: self)
        TunnelInbound.connect(to: key, on: context.eventLoop, timeout: loop.pool.connectTimeout(for: key))
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .failure(let error):
                    guard stream.relay != nil else { return }
                    refuse(stream, 502, "cannot connect to \(key): \(error)", proxy: proxy)
                case .success(let pod):
                    // Adding the handler answers the CONNECT (`attached`).
                    guard stream.relay != nil, (try? pod.pipeline.syncOperations.addHandler(stream)) != nil else {
                        return pod.close(promise: nil)
                    }
                }
            }
        return stream
    }

    /// The client end: a CONNECT stream for `authority`. `answered` gets
    /// the stream once the far end said 2xx (add it to the socket's
    /// pipeline then), or why not: a refusal (`TunnelRefused`), or the
    /// tunnel closing first.
    func open(authority: String, headers extra: [(String, String)], _ answered: @escaping (Result<Stream, any Error>) -> Void) {
        guard case .client = role, let context else { return answered(.failure(ChannelError.ioOnClosedChannel)) }
        guard canOpen else { return answered(.failure(TunnelNotOpened())) }
        let id = HTTP2StreamID(nextStreamID)
        nextStreamID += 2
        let stream = Stream(id: id, relay: self)
        stream.answered = answered
        streams[id] = stream
        var headers = HPACKHeaders([(":method", "CONNECT"), (":authority", authority)])
        for (n, v) in extra { headers.add(name: n, value: v) }
        let sent = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers)))), promise: sent)
        sent.futureResult.assumeIsolated().whenFailure { [self] _ in
            // Not opened (a GOAWAY came first, say): nothing to reset.
            guard let answered = stream.answered else { return }
            stream.answered = nil
            streams[id] = nil
            stream.relay = nil
            answered(.failure(TunnelNotOpened()))
        }
    }

    /// The socket is there: the destination end answers the CONNECT; then
    /// what the peer sent so far goes to the socket.
    private func attached(_ stream: Stream) {
        guard let context, let socket = stream.socket else { return }
        if case .server = role {
            let ok = HTTP2Frame(streamID: stream.id, payload: .headers(.init(headers: HPACKHeaders([(":status", "200")]))))
            context.write(wrapOutboundOut(ok), promise: nil)
            tunnelDirty = true
            flushTunnel()
        }
        let early = stream.early
        stream.early = []
        for bytes in early { stream.deliver(bytes) }
        if !early.isEmpty { socket.flush() }
        if stream.inputEnded { stream.endSocketOutput() } else { grant(stream, flush: true) }
    }

    private func refuse(_ stream: Stream, _ status: Int, _ reason: String, proxy: ProxyContext) {
        guard let context else { return }
        let headers = TunnelInbound.refusal(proxy, status, reason)
        context.write(wrapOutboundOut(HTTP2Frame(streamID: stream.id, payload: .headers(.init(headers: headers, endStream: true)))),
                      promise: nil)
        reset(stream)
    }

    /// RST_STREAM (CANCEL unless told): the stream-closed event that follows detaches it.
    private func reset(_ stream: Stream, _ code: HTTP2ErrorCode = .cancel) {
        guard let context, stream.relay != nil else { return }
        context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: stream.id, payload: .rstStream(code))), promise: nil)
    }

    // MARK: the socket's side

    fileprivate func write(_ stream: Stream, _ bytes: ByteBuffer) {
        guard let context else { return }
        context.write(wrapOutboundOut(HTTP2Frame(streamID: stream.id, payload: .data(.init(data: .byteBuffer(bytes))))), promise: nil)
        tunnelDirty = true
    }

    fileprivate func flushTunnel() {
        guard tunnelDirty, let context else { return }
        tunnelDirty = false
        context.flush()
    }

    private var flushScheduled = false

    /// Flushes once the event loop has handled every socket that is ready
    /// now: what many pod connections sent in one wake-up (a burst of
    /// requests) leaves in one TLS record and one write, not one each.
    fileprivate func flushTunnelSoon() {
        guard tunnelDirty, !flushScheduled, let context else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { [self] in
            flushScheduled = false
            flushTunnel()
        }
    }

    fileprivate func end(_ stream: Stream) {
        guard let context, stream.ended == nil else { return }
        let written = context.eventLoop.makePromise(of: Void.self)
        stream.ended = written.futureResult
        let end = HTTP2Frame(streamID: stream.id, payload: .data(.init(data: .byteBuffer(context.channel.allocator.buffer(capacity: 0)),
                                                                         endStream: true)))
        context.write(wrapOutboundOut(end), promise: written)
        tunnelDirty = true
        flushTunnel()
    }

    /// The socket's connection closed: reset at once if it failed; else the
    /// stream ends, and is reset once that END_STREAM is out if the peer
    /// has not ended its side by then.
    fileprivate func socketClosed(_ stream: Stream) {
        guard stream.relay != nil else { return }
        if stream.failed { return reset(stream) }
        end(stream)
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
        stream.socket?.read()
    }

    /// The stream closed in the codec: both ends sent END_STREAM (the
    /// socket's output ends after its bytes, and its input had ended), or
    /// it was reset, or the tunnel closed (the socket is closed at once).
    /// `refused`: the peer did not process the stream (REFUSED_STREAM, or
    /// above the last stream ID of its GOAWAY): one not yet answered was
    /// never opened, and may be opened again elsewhere.
    private func detach(_ stream: Stream, reset: Bool, refused: Bool = false) {
        streams[stream.id] = nil
        stream.relay = nil
        stream.early = []
        if let answered = stream.answered {
            stream.answered = nil
            answered(.failure(refused ? TunnelNotOpened() : ChannelError.ioOnClosedChannel))
        }
        guard let socket = stream.socket else { return }
        if reset { socket.close(promise: nil) } else { socket.closeAfterWrites() }
    }

    // MARK: events

    /// Events of relayed streams stop here; the connection's send-window
    /// events too (they gate every stream's reads). Most frequent first;
    /// each `as?` is a runtime cast.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        let type = Swift.type(of: event)
        if type == NIOHTTP2WindowUpdatedEvent.self, let updated = unbox(event, as: NIOHTTP2WindowUpdatedEvent.self) {
            if updated.streamID == .rootStream {
                // (The connection's receive window is the codec's: it keeps it open.)
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
        } else if type == StreamClosedEvent.self, let closed = unbox(event, as: StreamClosedEvent.self) {
            if openStreams.remove(closed.streamID) != nil, drain == .final, openStreams.isEmpty { closeDrained(context) }
            if let stream = streams[closed.streamID] { return detach(stream, reset: closed.reason != nil, refused: closed.reason == .refusedStream) }
        } else if type == NIOHTTP2StreamCreatedEvent.self, let created = unbox(event, as: NIOHTTP2StreamCreatedEvent.self) {
            openStreams.insert(created.streamID)
            idle.reset()
            if streams[created.streamID] != nil { return }
        } else if type == ChannelShouldQuiesceEvent.self {
            if case .server = role { startDrain(context) }
        } else if case .server(let proxy) = role, let sweep = event as? IdleSweep {
            // A tunnel from another node with no stream open for twice the
            // source's unused timeout: drained as at the proxy's own drain
            // (once more that long with no stream, closed at once: a peer
            // that never answers the PING).
            switch idle.judge(rounds: sweep.tunnelRounds, busy: !openStreams.isEmpty) {
            case .close where drain == .none:
                proxy.stats.tunnelsInIdleClosed.add(1, ordering: .relaxed)
                startDrain(context)
            case .overdue:
                context.close(promise: nil)
            case .close, .stay:
                break
            }
        } else if let bulk = event as? NIOHTTP2BulkStreamWindowChangeEvent {
            // The peer's initial window (the codec's meaning, not NIO's: the
            // multiplexer behind must not take it for its receive windows).
            for stream in streams.values where stream.sendWindow != Int.max { stream.sendWindow += bulk.delta }
            resumeAll()
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// The destination end's drain: a GOAWAY naming the highest stream ID
    /// and the PING whose answer ends it (`channelRead`).
    private func startDrain(_ context: ChannelHandlerContext) {
        guard drain == .none else { return }
        drain = .announced
        context.write(wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .goAway(
            lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .ping(Self.drainPing, ack: false))),
                              promise: nil)
    }

    /// Closes a drained connection on the loop's next turn: the frame that
    /// closed its last stream is written but not yet flushed by
    /// the codec when the stream-closed event comes.
    private func closeDrained(_ context: ChannelHandlerContext) {
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.eventLoop.execute { bound.value.close(promise: nil) }
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
