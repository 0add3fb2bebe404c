import NIOCore
import NIOHPACK
import NIOHTTP2

/// HTTP/2 (RFC 9113), Weft's own, in place of NIOHTTP2Handler: the server
/// side of h2c clients' connections (the express path), and both ends of
/// the mTLS tunnels between nodes that TunnelRelay uses (TunnelHTTP2.codec;
/// the source end as a client, `Role.client`). It speaks to the handlers
/// above it exactly as NIOHTTP2Handler does (frames as `HTTP2Frame`, its
/// stream-created, stream-closed and window events, a promise per frame
/// written), so ExpressHTTP2Handler, TunnelRelay and NIO's stream
/// multiplexer, with the full path on its stream channels, run on it
/// unchanged. What it leaves out is what costs: a per-frame state machine
/// of enums copied on every change, a flow-control buffer every frame goes
/// through, an HPACK encoder that hashes every name it sends. Here a frame
/// is parsed in place from the bytes read, a DATA frame's payload is a
/// slice of them, a stream is one small object in a table, and frames
/// written go straight into one output buffer unless their stream's or the
/// connection's window is shut.
///
/// Header blocks are decoded with NIOHPACK's decoder (its dynamic table and
/// Huffman code). Blocks sent are encoded without the dynamic table (a
/// status of the static table as one byte, every other field a literal
/// never indexed and not Huffman-coded), so no state is shared with the
/// peer's decoder beyond a size of zero, announced in the first block.
///
/// Limits on an h2c connection, as NIOHTTP2Handler's defaults: 100
/// concurrent streams (a stream over that is refused), frames of at most
/// 16,384 bytes, the protocol's initial windows of 65,535 bytes; a
/// tunnel's are TunnelHTTP2's. Header lists of at most the size announced
/// (on an h2c connection twice MeshConfig proxy.maxRequestHeaderSize when
/// it opened: the express path answers a list over the limit and within
/// that 431, HeadLimit); a larger list, or a block over that size in bytes
/// with its CONTINUATIONs, ends the connection.
/// A client that resets more streams than it lets finish is sent GOAWAY
/// (ENHANCE_YOUR_CALM), the "rapid reset" attack; so is one that sends
/// empty DATA frames over and over, a CONTINUATION flood, or PINGs and
/// SETTINGS while it does not read their answers.
final class HTTP2Codec: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = ByteBuffer

    /// What the codec offers its peer, and what it takes from it.
    struct Settings {
        var maxConcurrentStreams = 100
        /// The largest frame the peer may send.
        var maxFrameSize = 16_384
        var maxHeaderListSize = 16_384
        /// Each stream's receive window, announced in SETTINGS.
        var initialWindow = HTTP2Codec.protocolWindow
        /// The connection's receive window, opened to this after the
        /// client's preface and opened again as it is used.
        var connectionWindow = HTTP2Codec.protocolWindow
        /// Resets by the peer beyond the streams it let finish.
        var resetAllowance = 200
        /// Whether the handlers above are told of the send windows, as
        /// NIOHTTP2Handler tells them (NIOHTTP2WindowUpdatedEvent with an
        /// outbound size): when a stream's or the connection's runs out and
        /// when it opens again (TunnelRelay reads the socket only while they
        /// are open), and a change of the peer's initial window as a
        /// NIOHTTP2BulkStreamWindowChangeEvent (which NIO fires for a change
        /// of its own: not for NIO's stream multiplexer, which would take it
        /// for a change of the receive windows). The express path does not
        /// need them.
        var reportsSendWindows = false
        /// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441): the peer may open
        /// a stream with an extended CONNECT (`:protocol`). A client-facing
        /// connection announces it (ExtendedConnect); a tunnel does not.
        var enableConnectProtocol = false

        /// An h2c client's connection: NIOHTTP2Handler's defaults.
        static let h2c = Settings()
    }

    /// Which end of the connection the codec is. A client (a tunnel's
    /// source end, TunnelRelay) sends the preface and opens the streams,
    /// with a HEADERS frame written for a new odd stream ID; the server
    /// opens none (push is off).
    enum Role { case server, client }

    /// The windows every connection and stream start with (RFC 9113, 6.9.2).
    static let protocolWindow = 65_535
    static let protocolFrameSize = 16_384
    static let maxWindow = Int(Int32.max)
    /// Empty DATA frames without END_STREAM in a row.
    static let maxEmptyFrames = 10
    /// Acknowledgements owed while the client does not read.
    static let maxUnreadAnswers = 10_000

    /// One stream, open or half-closed.
    private final class Stream {
        private(set) var id = HTTP2StreamID.rootStream
        /// What we may still send on it, and what the peer may.
        var sendWindow = 0
        var receiveWindow = 0
        /// The peer ended its side (END_STREAM), and we did ours (the
        /// frame with END_STREAM is in the output, not waiting on a window).
        var remoteEnded = false
        var localEnded = false
        /// An END_STREAM frame was written to us, perhaps still waiting.
        var endQueued = false
        /// A client's stream: the response's head came (what follows it
        /// in HEADERS is trailers).
        var headersReceived = false
        /// Frames waiting for a window to open, in order.
        var waiting: [(Outgoing, EventLoopPromise<Void>?)] = []

        init(id: HTTP2StreamID, sendWindow: Int, receiveWindow: Int) {
            reopen(id: id, sendWindow: sendWindow, receiveWindow: receiveWindow)
        }

        /// Every field as a new stream has it (init, and a closed stream's
        /// object taken again: a field added above is set here too).
        func reopen(id: HTTP2StreamID, sendWindow: Int, receiveWindow: Int) {
            self.id = id
            self.sendWindow = sendWindow
            self.receiveWindow = receiveWindow
            remoteEnded = false
            localEnded = false
            endQueued = false
            headersReceived = false
            waiting.removeAll(keepingCapacity: true)
        }
    }

    /// Closed streams' objects, taken again for new streams (an allocation
    /// and a free a request saved): only one nothing else still holds
    /// (isKnownUniquelyReferenced), so no reference kept to a stream that
    /// closed ever sees a new one in its place.
    private var spare: [Stream] = []
    private static let maxSpare = 16

    private func newStream(_ id: HTTP2StreamID) -> Stream {
        if !spare.isEmpty {
            if isKnownUniquelyReferenced(&spare[spare.count - 1]) {
                let stream = spare.removeLast()
                stream.reopen(id: id, sendWindow: peerInitialWindow, receiveWindow: settings.initialWindow)
                return stream
            }
            spare.removeLast()
        }
        return Stream(id: id, sendWindow: peerInitialWindow, receiveWindow: settings.initialWindow)
    }

    private enum ConnectionError: Error {
        case violation(HTTP2ErrorCode, String)
    }

    private var context: ChannelHandlerContext?
    private var decoder: HPACKDecoder
    private var streams = StreamTable<Stream>()
    /// Streams with frames waiting for a window, oldest first.
    private var blocked: [Stream] = []
    /// Bytes read but not yet a whole frame.
    private var partial: ByteBuffer?
    /// A large DATA frame whose payload is still arriving: its stream,
    /// what is still to come, its flags (END_STREAM goes with the last
    /// piece), and whether no piece of it was passed on yet (the first is
    /// checked as a frame: stream state, a header block in progress).
    private var dataPiece: (stream: HTTP2StreamID, remaining: Int, flags: UInt8, first: Bool)?
    private var prefaceRead = false
    private var settingsRead = false
    /// A header block still arriving in CONTINUATION frames.
    private var continuing: (stream: HTTP2StreamID, endStream: Bool, selfDependent: Bool, block: ByteBuffer)?
    /// Since when a header block has waited for the rest of its bytes: a
    /// HEADERS frame or its CONTINUATIONs, the client's preface, or a frame
    /// whose type is not read yet, cut by the end of a read. Started by the
    /// first such read, stopped by one that ends the block (clockHead).
    /// ExpressHTTP2Handler times it on the idle sweeps (timeOutHead).
    private(set) var headClock = HeadClock()
    /// The newest stream opened (by the client, whichever end that is).
    private var lastStreamID = HTTP2StreamID.rootStream
    /// A client's: the server sent GOAWAY; no stream is opened after it.
    private var peerGoneAway = false
    /// Streams above this one are refused: a GOAWAY was sent.
    private var goAwayLastStreamID: HTTP2StreamID?
    private var connectionSendWindow = HTTP2Codec.protocolWindow
    private var connectionReceiveWindow = HTTP2Codec.protocolWindow
    /// The peer's settings that bind what we send.
    private var peerInitialWindow = HTTP2Codec.protocolWindow
    private var peerMaxFrameSize = HTTP2Codec.protocolFrameSize
    /// The next header block starts with a dynamic table size update to 0.
    private var announceTableSize = true
    private var resetAllowance: Int
    private var emptyFrames = 0
    private var unreadAnswers = 0
    /// Bytes to write, and the promises of the frames whose last bytes are in them.
    private var output: ByteBuffer
    private var outputPromises: [EventLoopPromise<Void>] = []
    /// Something was written to the channel since its last flush.
    private var unflushed = false
    private var failed = false
    /// The peer's FIN came: no WINDOW_UPDATE can follow it, so frames that
    /// wait for a window would wait for ever (resetStalled).
    private var peerFinished = false
    private var stalledCheckDue = false

    let settings: Settings
    let role: Role

    init(allocator: ByteBufferAllocator, role: Role = .server, settings: Settings = .h2c) {
        self.settings = settings
        self.role = role
        prefaceRead = role == .client  // a server sends none
        resetAllowance = settings.resetAllowance
        decoder = HPACKDecoder(allocator: allocator, maxDynamicTableSize: HPACKDecoder.maxDynamicTableSize,
                               maxHeaderListSize: settings.maxHeaderListSize)
        output = allocator.buffer(capacity: 4096)
    }

    // MARK: lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { sendPreface(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        sendPreface(context: context)
        context.fireChannelActive()
    }

    private var prefaceSent = false

    /// Our SETTINGS (windows and a frame size the protocol starts with need
    /// no entry). The connection's window opens to its size at the end of
    /// the first read (channelReadComplete), which has the client's preface.
    private func sendPreface(context: ChannelHandlerContext) {
        guard !prefaceSent else { return }
        prefaceSent = true
        if role == .client { output.writeStaticString(Self.preface) }
        var entries: [(UInt16, Int)] = [(0x3, settings.maxConcurrentStreams), (0x6, settings.maxHeaderListSize)]
        if role == .client { entries.append((0x2, 0)) }  // no push
        if settings.initialWindow != Self.protocolWindow { entries.append((0x4, settings.initialWindow)) }
        if settings.maxFrameSize != Self.protocolFrameSize { entries.append((0x5, settings.maxFrameSize)) }
        if settings.enableConnectProtocol { entries.append((0x8, 1)) }
        frameHeader(length: 6 * entries.count, type: 0x4, flags: 0, stream: .rootStream)
        for (key, value) in entries {
            output.writeInteger(key)
            output.writeInteger(UInt32(value))
        }
        writeOutput(context: context)
        context.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        dropAll(error: NIOHTTP2Errors.ioOnClosedConnection())
        context.fireChannelInactive()
    }

    /// The peer's FIN, on a channel that allows half-closure (the proxy's
    /// listeners): no frame comes after it, and HTTP/2 has no half-closed
    /// connection. Streams the peer had not ended never will be: they are
    /// reset (CANCEL), and the handlers above drop them. Those it had ended
    /// (a whole request) are still answered, and the handler above closes
    /// the connection once nothing is left (ExpressHTTP2Handler;
    /// HTTP2ConnectionEnds on NIO's pipeline). The event goes on up.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e, !failed {
            partial = nil
            dataPiece = nil
            continuing = nil
            for stream in streams.values where !stream.remoteEnded {
                streamError(stream.id, .cancel, context: context)
            }
            peerFinished = true
            flush(context: context)
            resetStalled()
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// After the peer's FIN, a stream whose frames wait for a window (it
    /// set them to 0, or let them run out) can never send them: it is
    /// reset (CANCEL) so the handlers above let it go, instead of holding
    /// it, its backend and the connection open for good. Done on the next
    /// turn of the loop, not inside the write that found it blocked.
    private func resetStalled() {
        guard peerFinished, !blocked.isEmpty, !stalledCheckDue, let context else { return }
        stalledCheckDue = true
        context.eventLoop.assumeIsolated().execute { [weak self] in
            guard let self, let context = self.context else { return }
            self.stalledCheckDue = false
            guard !self.failed, !self.blocked.isEmpty else { return }
            for stream in self.blocked { self.streamError(stream.id, .cancel, context: context) }
            self.flush(context: context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        dropAll(error: NIOHTTP2Errors.ioOnClosedConnection())
        self.context = nil
    }

    /// Fails what waits; the multiplexer closes its stream channels itself
    /// when the connection goes inactive.
    private func dropAll(error: Error) {
        let waiting = blocked
        blocked.removeAll()
        streams.removeAll()
        for stream in waiting {
            for (_, promise) in stream.waiting { promise?.fail(error) }
            stream.waiting.removeAll()
        }
        let promises = outputPromises
        outputPromises.removeAll()
        for promise in promises { promise.fail(error) }
    }

    // MARK: reading

    private static let preface: StaticString = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        // Whether a frame ended that left no header block open.
        var progressed = false
        defer { clockHead(progressed: progressed) }
        var bytes = unwrapInboundIn(data)
        if var held = partial {
            partial = nil
            held.writeBuffer(&bytes)
            bytes = held
        }
        do {
            if !prefaceRead {
                let n = Self.preface.utf8CodeUnitCount
                guard bytes.readableBytes >= n else {
                    let seen = bytes.readableBytesView
                    guard seen.elementsEqual(UnsafeRawBufferPointer(start: Self.preface.utf8Start, count: seen.count)) else {
                        throw ConnectionError.violation(.protocolError, "no client preface")
                    }
                    partial = bytes
                    return
                }
                guard bytes.readableBytesView.prefix(n).elementsEqual(UnsafeRawBufferPointer(start: Self.preface.utf8Start, count: n)) else {
                    throw ConnectionError.violation(.protocolError, "no client preface")
                }
                bytes.moveReaderIndex(forwardBy: n)
                prefaceRead = true
                progressed = true
            }
            while true {
                if let piece = dataPiece {
                    // The rest of a large DATA frame, passed on as it comes.
                    guard bytes.readableBytes > 0, let slice = bytes.readSlice(length: min(piece.remaining, bytes.readableBytes)) else { break }
                    let last = slice.readableBytes == piece.remaining
                    dataPiece = last ? nil : (piece.stream, piece.remaining - slice.readableBytes, piece.flags, false)
                    let flags = last ? piece.flags : piece.flags & ~0x1
                    if piece.first {
                        try frame(type: 0x0, flags: flags, stream: piece.stream, payload: slice, context: context)
                    } else {
                        try self.data(flags, piece.stream, slice, context: context)
                    }
                    if failed { return }
                    continue
                }
                guard bytes.readableBytes >= 9 else { break }
                let start = bytes.readerIndex
                guard let length24 = bytes.getInteger(at: start, as: UInt32.self) else { break }
                let length = Int(length24 >> 8)
                let type = UInt8(truncatingIfNeeded: length24)
                guard length <= settings.maxFrameSize else {
                    throw ConnectionError.violation(.frameSizeError, "a frame of \(length) bytes")
                }
                guard let flags = bytes.getInteger(at: start + 4, as: UInt8.self),
                      let rawID = bytes.getInteger(at: start + 5, as: UInt32.self) else { break }
                let id = HTTP2StreamID(Int32(bitPattern: rawID & 0x7FFF_FFFF))
                guard bytes.readableBytes >= 9 + length, let payload = bytes.getSlice(at: start + 9, length: length) else {
                    // A DATA frame over the protocol's frame size (a tunnel's,
                    // up to 1 MiB, arriving a TLS record at a time) is passed on
                    // in pieces as its bytes come, not copied until it is whole.
                    // (Not a padded one: its padding length comes first.)
                    if type == 0x0 && length > Self.protocolFrameSize && flags & 0x8 == 0 {
                        bytes.moveReaderIndex(forwardBy: 9)
                        dataPiece = (id, length, flags, true)
                        continue
                    }
                    break
                }
                bytes.moveReaderIndex(forwardBy: 9 + length)
                try frame(type: type, flags: flags, stream: id, payload: payload, context: context)
                if failed { return }
                if continuing == nil { progressed = true }
            }
            if bytes.readableBytes > 0 {
                bytes.discardReadBytes()
                partial = bytes
            }
        } catch ConnectionError.violation(let code, let what) {
            connectionError(code, what, context: context)
        } catch {
            connectionError(.compressionError, "\(error)", context: context)
        }
    }

    /// After a read: the head clock (HeadClock.afterHTTP2Read). On the hot
    /// path (nothing left over) this is one store.
    private func clockHead(progressed: Bool) {
        headClock.afterHTTP2Read(progressed: progressed, blockOpen: continuing != nil, leftover: partial != nil,
                                 prefaceRead: prefaceRead,
                                 leftoverType: partial.flatMap { $0.getInteger(at: $0.readerIndex + 3, as: UInt8.self) })
    }

    /// MeshConfig proxy.requestHeaderTimeout ran out on the header block the
    /// connection waits for: GOAWAY (ENHANCE_YOUR_CALM, what ran out as its
    /// debug data; the last stream is the last whole request's), then the
    /// connection closes. Whether it did.
    func timeOutHead(_ sweep: IdleSweep) -> Bool {
        guard !failed, headClock.expired(sweep), let context else { return false }
        headClock.stop()
        connectionError(.enhanceYourCalm, "request head timeout", debug: HeadClock.reason(sweep), context: context)
        return true
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        guard !failed else { return }
        // The connection's window, opened again as it is used: the streams'
        // windows bound what each may send.
        if connectionReceiveWindow <= settings.connectionWindow / 2 {
            let increment = settings.connectionWindow - connectionReceiveWindow
            connectionReceiveWindow = settings.connectionWindow
            windowUpdate(.rootStream, increment)
        }
        writeOutput(context: context)
        if unflushed {
            unflushed = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    private func frame(type: UInt8, flags: UInt8, stream id: HTTP2StreamID, payload: ByteBuffer, context: ChannelHandlerContext) throws {
        if let continuing, type != 0x9 || id != continuing.stream {
            throw ConnectionError.violation(.protocolError, "a frame amid a header block")
        }
        if !settingsRead && type != 0x4 {
            throw ConnectionError.violation(.protocolError, "no SETTINGS first")
        }
        switch type {
        case 0x0: try data(flags, id, payload, context: context)
        case 0x1: try headers(flags, id, payload, context: context)
        case 0x2:
            guard id != .rootStream else { throw ConnectionError.violation(.protocolError, "PRIORITY on stream 0") }
            guard payload.readableBytes == 5 else { return streamError(id, .frameSizeError, context: context) }
        case 0x3: try rstStream(id, payload, context: context)
        case 0x4: try settings(flags, id, payload, context: context)
        case 0x5: throw ConnectionError.violation(.protocolError, "PUSH_PROMISE from a client")
        case 0x6: try ping(flags, id, payload, context: context)
        case 0x7:
            guard id == .rootStream else { throw ConnectionError.violation(.protocolError, "GOAWAY on a stream") }
            guard payload.readableBytes >= 8, let last = payload.getInteger(at: payload.readerIndex, as: UInt32.self),
                  let code = payload.getInteger(at: payload.readerIndex + 4, as: UInt32.self) else {
                throw ConnectionError.violation(.frameSizeError, "a short GOAWAY")
            }
            // A client's GOAWAY: it opens no more streams; those open finish.
            // A server's: no stream opens after it, and ours above its last
            // stream ID were not processed (refused: they may go elsewhere).
            let lastProcessed = HTTP2StreamID(Int32(bitPattern: last & 0x7FFF_FFFF))
            deliver(HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: lastProcessed,
                                                                         errorCode: HTTP2ErrorCode(networkCode: Int(code)), opaqueData: nil)),
                    context: context)
            if role == .client {
                peerGoneAway = true
                for stream in streams.values where stream.id > lastProcessed {
                    close(stream, reason: .refusedStream, context: context)
                }
            }
        case 0x8: try windowUpdate(id, payload, context: context)
        case 0x9:
            guard var continuing else { throw ConnectionError.violation(.protocolError, "CONTINUATION without HEADERS") }
            self.continuing = nil
            var more = payload
            // (A client's block is smaller than the list it decodes to:
            // every field in it costs less than the 32 bytes a list
            // counts. This bounds what a connection buffers.)
            guard continuing.block.readableBytes + more.readableBytes <= settings.maxHeaderListSize else {
                throw ConnectionError.violation(.enhanceYourCalm, "a header block over \(settings.maxHeaderListSize) bytes")
            }
            continuing.block.writeBuffer(&more)
            if flags & 0x4 != 0 {
                try headerBlock(id, endStream: continuing.endStream, selfDependent: continuing.selfDependent, block: continuing.block,
                                context: context)
            } else {
                self.continuing = continuing
            }
        default:
            break  // unknown types are ignored (RFC 9113, section 5.5)
        }
    }

    private func data(_ flags: UInt8, _ id: HTTP2StreamID, _ payload: ByteBuffer, context: ChannelHandlerContext) throws {
        guard id != .rootStream else { throw ConnectionError.violation(.protocolError, "DATA on stream 0") }
        let length = payload.readableBytes
        connectionReceiveWindow -= length
        guard connectionReceiveWindow >= 0 else { throw ConnectionError.violation(.flowControlError, "DATA past the connection's window") }
        var body = payload
        if flags & 0x8 != 0 { body = try unpadded(body) }
        guard let stream = streams[id] else {
            if id > lastStreamID { throw ConnectionError.violation(.protocolError, "DATA on an idle stream") }
            return  // a stream that was closed or reset: dropped
        }
        guard !stream.remoteEnded else { return streamError(id, .streamClosed, context: context) }
        // Empty DATA frames that end nothing cost us and carry nothing.
        if body.readableBytes == 0 && flags & 0x1 == 0 {
            emptyFrames += 1
            guard emptyFrames <= Self.maxEmptyFrames else {
                throw ConnectionError.violation(.enhanceYourCalm, "\(emptyFrames) empty DATA frames in a row")
            }
        } else {
            emptyFrames = 0
        }
        stream.receiveWindow -= length
        guard stream.receiveWindow >= 0 else { return streamError(id, .flowControlError, context: context) }
        let end = flags & 0x1 != 0
        if end { stream.remoteEnded = true }
        deliver(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(body), endStream: end))), context: context)
        // What a stream channel reads to open the stream's window again.
        deliver(NIOHTTP2WindowUpdatedEvent(streamID: id, inboundWindowSize: stream.receiveWindow, outboundWindowSize: nil),
                context: context)
        if end { closeIfEnded(stream, context: context) }
    }

    /// A payload without its padding (PADDED flag).
    private func unpadded(_ payload: ByteBuffer) throws -> ByteBuffer {
        var payload = payload
        guard let pad = payload.readInteger(as: UInt8.self), Int(pad) <= payload.readableBytes,
              let body = payload.readSlice(length: payload.readableBytes - Int(pad)) else {
            throw ConnectionError.violation(.protocolError, "padding longer than its frame")
        }
        return body
    }

    private func headers(_ flags: UInt8, _ id: HTTP2StreamID, _ payload: ByteBuffer, context: ChannelHandlerContext) throws {
        guard id != .rootStream else { throw ConnectionError.violation(.protocolError, "HEADERS on stream 0") }
        var block = payload
        if flags & 0x8 != 0 { block = try unpadded(block) }
        var selfDependent = false
        if flags & 0x20 != 0 {
            guard block.readableBytes >= 5, let dependency = block.readInteger(as: UInt32.self) else {
                throw ConnectionError.violation(.frameSizeError, "a short HEADERS priority")
            }
            block.moveReaderIndex(forwardBy: 1)
            selfDependent = Int32(bitPattern: dependency & 0x7FFF_FFFF) == Int32(id)
        }
        let end = flags & 0x1 != 0
        if flags & 0x4 == 0 {
            continuing = (id, end, selfDependent, block)
            return
        }
        try headerBlock(id, endStream: end, selfDependent: selfDependent, block: block, context: context)
    }

    private func headerBlock(_ id: HTTP2StreamID, endStream: Bool, selfDependent: Bool = false, block: ByteBuffer,
                             context: ChannelHandlerContext) throws {
        // Always decoded, also for a stream that is then reset: the
        // client's encoder counts on our table holding what it added.
        var block = block
        let fields = try decoder.decodeHeaders(from: &block)
        if selfDependent {
            // A stream that depends on itself (RFC 9113, section 5.3.1).
            if id > lastStreamID { lastStreamID = id }
            return streamError(id, .protocolError, context: context)
        }
        let frame = HTTP2Frame(streamID: id, payload: .headers(.init(headers: fields, endStream: endStream)))
        if let stream = streams[id] {
            if role == .client && !stream.headersReceived {
                // The response's head (an interim 1xx one may come first).
                guard !stream.remoteEnded else { return streamError(id, .streamClosed, context: context) }
                if fields.first(name: ":status")?.utf8.first != UInt8(ascii: "1") { stream.headersReceived = true }
                stream.remoteEnded = endStream
                deliver(frame, context: context)
                return endStream ? closeIfEnded(stream, context: context) : ()
            }
            // Trailers.
            guard !stream.remoteEnded else { return streamError(id, .streamClosed, context: context) }
            guard endStream else { return streamError(id, .protocolError, context: context) }
            stream.remoteEnded = true
            deliver(frame, context: context)
            return closeIfEnded(stream, context: context)
        }
        if role == .client {
            // Servers open no streams here: one of ours that ended, or a broken peer.
            guard id <= lastStreamID, Int32(id) % 2 == 1 else {
                throw ConnectionError.violation(.protocolError, "HEADERS on stream \(id), which the client did not open")
            }
            return streamError(id, .streamClosed, context: context)
        }
        guard id > lastStreamID else {
            return streamError(id, .streamClosed, context: context)  // closed, or reset by us
        }
        guard Int32(id) % 2 == 1 else { throw ConnectionError.violation(.protocolError, "a stream of even id from a client") }
        lastStreamID = id
        if let goAwayLastStreamID, id > goAwayLastStreamID {
            return streamError(id, .refusedStream, context: context)
        }
        guard streams.count < settings.maxConcurrentStreams else { return streamError(id, .refusedStream, context: context) }
        let stream = newStream(id)
        stream.remoteEnded = endStream
        streams[id] = stream
        deliver(frame, context: context)
        guard streams[id] === stream else { return }  // refused above already
        created(stream, context: context)
    }

    private func rstStream(_ id: HTTP2StreamID, _ payload: ByteBuffer, context: ChannelHandlerContext) throws {
        guard id != .rootStream else { throw ConnectionError.violation(.protocolError, "RST_STREAM on stream 0") }
        guard payload.readableBytes == 4, let code = payload.getInteger(at: payload.readerIndex, as: UInt32.self) else {
            throw ConnectionError.violation(.frameSizeError, "RST_STREAM of \(payload.readableBytes) bytes")
        }
        guard let stream = streams[id] else {
            if id > lastStreamID { throw ConnectionError.violation(.protocolError, "RST_STREAM on an idle stream") }
            return
        }
        resetAllowance -= 1
        guard resetAllowance > 0 else {
            throw ConnectionError.violation(.enhanceYourCalm, "more streams reset than finished")
        }
        let reason = HTTP2ErrorCode(networkCode: Int(code))
        deliver(HTTP2Frame(streamID: id, payload: .rstStream(reason)), context: context)
        close(stream, reason: reason, context: context)
    }

    private func settings(_ flags: UInt8, _ id: HTTP2StreamID, _ payload: ByteBuffer, context: ChannelHandlerContext) throws {
        guard id == .rootStream else { throw ConnectionError.violation(.protocolError, "SETTINGS on a stream") }
        settingsRead = true
        if flags & 0x1 != 0 {
            guard payload.readableBytes == 0 else { throw ConnectionError.violation(.frameSizeError, "a SETTINGS ack with a payload") }
            return
        }
        guard payload.readableBytes % 6 == 0 else { throw ConnectionError.violation(.frameSizeError, "SETTINGS of \(payload.readableBytes) bytes") }
        var payload = payload
        var windowDelta = 0
        while let key = payload.readInteger(as: UInt16.self), let value = payload.readInteger(as: UInt32.self) {
            switch key {
            case 0x1: announceTableSize = true  // the next block says 0 again
            case 0x2: guard value <= 1 else { throw ConnectionError.violation(.protocolError, "SETTINGS_ENABLE_PUSH \(value)") }
            case 0x4:
                guard value <= UInt32(Self.maxWindow) else { throw ConnectionError.violation(.flowControlError, "SETTINGS_INITIAL_WINDOW_SIZE \(value)") }
                windowDelta += Int(value) - peerInitialWindow
                peerInitialWindow = Int(value)
            case 0x5:
                guard value >= 16_384 && value <= 16_777_215 else {
                    throw ConnectionError.violation(.protocolError, "SETTINGS_MAX_FRAME_SIZE \(value)")
                }
                peerMaxFrameSize = Int(value)
            default: break
            }
        }
        try answering(context: context)
        frameHeader(length: 0, type: 0x4, flags: 0x1, stream: .rootStream)
        if windowDelta != 0 {
            if settings.reportsSendWindows { deliver(NIOHTTP2BulkStreamWindowChangeEvent(delta: windowDelta), context: context) }
            for stream in streams.values {
                stream.sendWindow += windowDelta
                guard stream.sendWindow <= Self.maxWindow else {
                    throw ConnectionError.violation(.flowControlError, "a stream window over 2^31-1")
                }
                if stream.sendWindow <= 0 && stream.sendWindow - windowDelta > 0 {
                    reportSendWindow(stream.id, stream.sendWindow, context: context)
                }
            }
            if windowDelta > 0 { sendWaiting(context: context) }
        }
    }

    private func ping(_ flags: UInt8, _ id: HTTP2StreamID, _ payload: ByteBuffer, context: ChannelHandlerContext) throws {
        guard id == .rootStream else { throw ConnectionError.violation(.protocolError, "PING on a stream") }
        guard payload.readableBytes == 8 else { throw ConnectionError.violation(.frameSizeError, "PING of \(payload.readableBytes) bytes") }
        guard flags & 0x1 == 0 else {
            // An answer to a PING of ours (TunnelRelay's drain waits for one).
            let data = HTTP2PingData(withInteger: payload.getInteger(at: payload.readerIndex, as: UInt64.self) ?? 0)
            return deliver(HTTP2Frame(streamID: .rootStream, payload: .ping(data, ack: true)), context: context)
        }
        try answering(context: context)
        frameHeader(length: 8, type: 0x6, flags: 0x1, stream: .rootStream)
        var opaque = payload
        output.writeBuffer(&opaque)
    }

    private func windowUpdate(_ id: HTTP2StreamID, _ payload: ByteBuffer, context: ChannelHandlerContext) throws {
        guard payload.readableBytes == 4, let raw = payload.getInteger(at: payload.readerIndex, as: UInt32.self) else {
            throw ConnectionError.violation(.frameSizeError, "WINDOW_UPDATE of \(payload.readableBytes) bytes")
        }
        let increment = Int(raw & 0x7FFF_FFFF)
        if id == .rootStream {
            guard increment > 0 else { throw ConnectionError.violation(.protocolError, "a WINDOW_UPDATE of 0") }
            let was = connectionSendWindow
            connectionSendWindow += increment
            guard connectionSendWindow <= Self.maxWindow else { throw ConnectionError.violation(.flowControlError, "a window over 2^31-1") }
            if was <= 0 && connectionSendWindow > 0 { reportSendWindow(.rootStream, connectionSendWindow, context: context) }
        } else if let stream = streams[id] {
            guard increment > 0 else { return streamError(id, .protocolError, context: context) }
            let was = stream.sendWindow
            stream.sendWindow += increment
            guard stream.sendWindow <= Self.maxWindow else { return streamError(id, .flowControlError, context: context) }
            if was <= 0 && stream.sendWindow > 0 { reportSendWindow(id, stream.sendWindow, context: context) }
        } else {
            if id > lastStreamID { throw ConnectionError.violation(.protocolError, "WINDOW_UPDATE on an idle stream") }
            return
        }
        sendWaiting(context: context)
    }

    /// A PING or SETTINGS to acknowledge. A client that sends them while
    /// it does not read what we write would pile acknowledgements up in
    /// the proxy: past `maxUnreadAnswers` of them unwritable, it is sent away.
    private func answering(context: ChannelHandlerContext) throws {
        guard !context.channel.isWritable else {
            unreadAnswers = 0
            return
        }
        unreadAnswers += 1
        guard unreadAnswers <= Self.maxUnreadAnswers else {
            throw ConnectionError.violation(.enhanceYourCalm, "\(unreadAnswers) PINGs or SETTINGS unread")
        }
    }

    // MARK: errors

    /// Resets one stream (RST_STREAM) and tells the handlers above it closed.
    private func streamError(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode, context: ChannelHandlerContext) {
        rst(id, code)
        if let stream = streams[id] { close(stream, reason: code, context: context) }
    }

    private func rst(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode) {
        frameHeader(length: 4, type: 0x3, flags: 0, stream: id)
        output.writeInteger(UInt32(code.networkCode))
    }

    /// Ends the connection: GOAWAY with the error, then close.
    private func connectionError(_ code: HTTP2ErrorCode, _ what: String, debug: String? = nil, context: ChannelHandlerContext) {
        guard !failed else { return }
        failed = true
        partial = nil
        goAway(role == .server ? lastStreamID : .rootStream, code, debug: debug)
        writeOutput(context: context)
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
        context.fireErrorCaught(HTTP2ConnectionFailure(code: code, reason: what))
    }

    private func goAway(_ last: HTTP2StreamID, _ code: HTTP2ErrorCode, debug: String? = nil) {
        frameHeader(length: 8 + (debug?.utf8.count ?? 0), type: 0x7, flags: 0, stream: .rootStream)
        output.writeInteger(UInt32(Int32(last)))
        output.writeInteger(UInt32(code.networkCode))
        if let debug { output.writeString(debug) }
        if goAwayLastStreamID.map({ last < $0 }) ?? true { goAwayLastStreamID = last }
    }

    // MARK: streams ending

    /// Closed once both sides have ended it.
    private func closeIfEnded(_ stream: Stream, context: ChannelHandlerContext) {
        if stream.remoteEnded && stream.localEnded {
            resetAllowance = min(resetAllowance + 1, settings.resetAllowance)
            close(stream, reason: nil, context: context)
        }
    }

    private func close(_ stream: Stream, reason: HTTP2ErrorCode?, context: ChannelHandlerContext) {
        guard streams.removeValue(forKey: stream.id) != nil else { return }
        if !stream.waiting.isEmpty {
            let waiting = stream.waiting
            stream.waiting.removeAll()
            blocked.removeAll { $0 === stream }
            let error = NIOHTTP2Errors.streamClosed(streamID: stream.id, errorCode: reason ?? .cancel)
            for (_, promise) in waiting { promise?.fail(error) }
        }
        deliver(StreamClosedEvent(streamID: stream.id, reason: reason), context: context)
        if spare.count < Self.maxSpare { spare.append(stream) }
    }

    // MARK: to the handlers above

    /// The express path, when it sits right above: frames and stream
    /// events go to it by a call, not through the pipeline (a hop, a box
    /// and a cast each); it passes on to the multiplexer what is not its.
    weak var express: ExpressHTTP2Handler?

    private func deliver(_ frame: HTTP2Frame, context: ChannelHandlerContext) {
        if let express { return express.received(frame) }
        context.fireChannelRead(wrapInboundOut(frame))
    }

    private func deliver(_ event: NIOHTTP2StreamCreatedEvent, context: ChannelHandlerContext) {
        if let express { return express.streamCreated(event) }
        context.fireUserInboundEventTriggered(event)
    }

    private func deliver(_ event: StreamClosedEvent, context: ChannelHandlerContext) {
        if let express { return express.streamClosed(event) }
        context.fireUserInboundEventTriggered(event)
    }

    private func deliver(_ event: NIOHTTP2WindowUpdatedEvent, context: ChannelHandlerContext) {
        if let express { return express.windowUpdated(event) }
        context.fireUserInboundEventTriggered(event)
    }

    /// A send window's size, for the handlers above, on connections that
    /// report them (`Settings.reportsSendWindows`): when one runs out, and
    /// when it opens again.
    private func reportSendWindow(_ id: HTTP2StreamID, _ size: Int, context: ChannelHandlerContext) {
        guard settings.reportsSendWindows else { return }
        deliver(NIOHTTP2WindowUpdatedEvent(streamID: id, inboundWindowSize: nil, outboundWindowSize: size), context: context)
    }

    /// A stream opened (by the peer's HEADERS or ours): told above, with its
    /// send window if the peer's initial one leaves it shut.
    private func created(_ stream: Stream, context: ChannelHandlerContext) {
        deliver(NIOHTTP2StreamCreatedEvent(streamID: stream.id, localInitialWindowSize: UInt32(settings.initialWindow),
                                           remoteInitialWindowSize: UInt32(max(0, peerInitialWindow))), context: context)
        if stream.sendWindow <= 0 { reportSendWindow(stream.id, stream.sendWindow, context: context) }
    }

    private func deliver(_ event: NIOHTTP2BulkStreamWindowChangeEvent, context: ChannelHandlerContext) {
        context.fireUserInboundEventTriggered(event)
    }

    // MARK: writing

    /// A frame of a stream, as sent.
    enum Outgoing {
        case headers(HPACKHeaders, endStream: Bool)
        /// A header block already encoded with HPACKLiteral (no dynamic table).
        case block(ByteBuffer, endStream: Bool)
        case data(ByteBuffer, endStream: Bool)

        var endsStream: Bool {
            switch self {
            case .headers(_, let end), .block(_, let end), .data(_, let end): return end
            }
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = unwrapOutboundIn(data)
        guard !failed else {
            promise?.fail(NIOHTTP2Errors.ioOnClosedConnection())
            return
        }
        let id = frame.streamID
        if id == .rootStream {
            switch frame.payload {
            case .goAway(let last, let code, _): goAway(last, code)
            case .windowUpdate(let increment):
                connectionReceiveWindow += increment
                windowUpdate(.rootStream, increment)
            case .ping(let data, let ack):
                frameHeader(length: 8, type: 0x6, flags: ack ? 0x1 : 0, stream: .rootStream)
                output.writeInteger(data.integer)
            default:
                promise?.fail(NIOHTTP2Errors.unsupported(info: "\(frame.payload) on the connection"))
                return
            }
            return keep(promise)
        }
        switch frame.payload {
        case .headers(let h): send(id, .headers(h.headers, endStream: h.endStream), promise: promise)
        case .data(let d):
            guard case .byteBuffer(let bytes) = d.data else {
                promise?.fail(NIOHTTP2Errors.unsupported(info: "a file region"))
                return
            }
            send(id, .data(bytes, endStream: d.endStream), promise: promise)
        case .rstStream(let code): reset(id, code, promise: promise)
        case .windowUpdate(let increment):
            guard let stream = streams[id] else {
                promise?.fail(NIOHTTP2Errors.noSuchStream(streamID: id))
                return
            }
            stream.receiveWindow += increment
            windowUpdate(id, increment)
            keep(promise)
            deliver(NIOHTTP2WindowUpdatedEvent(streamID: id, inboundWindowSize: stream.receiveWindow, outboundWindowSize: nil), context: context)
        case .priority:
            keep(promise)  // not ours to say
        default:
            promise?.fail(NIOHTTP2Errors.unsupported(info: "\(frame.payload) on a stream"))
        }
    }

    /// Sends a frame of a stream (ExpressHTTP2Handler calls this directly;
    /// the multiplexer's frames come through `write`): now, or once the
    /// windows let it, behind what of the stream already waits.
    func send(_ id: HTTP2StreamID, _ frame: Outgoing, promise: EventLoopPromise<Void>?) {
        guard !failed else {
            promise?.fail(NIOHTTP2Errors.ioOnClosedConnection())
            return
        }
        var opened = false
        guard let stream = streams[id] ?? { () -> Stream? in
            opened = true
            return openStream(id, frame, promise: promise)
        }() else { return }
        guard !stream.endQueued else {
            promise?.fail(NIOHTTP2Errors.streamClosed(streamID: id, errorCode: .streamClosed))
            return
        }
        if frame.endsStream { stream.endQueued = true }
        if !stream.waiting.isEmpty {
            stream.waiting.append((frame, promise))
        } else if !emit(stream, frame, promise) {
            blocked.append(stream)  // (emit left what the windows did not take at the front of `waiting`)
            resetStalled()
        }
        if opened, let context, streams[id] === stream {
            created(stream, context: context)
        }
    }

    /// A client's new stream, opened by the HEADERS frame written for it:
    /// the next odd stream ID, and not after the server's GOAWAY. Nil (the
    /// promise failed) for a stream that is not there and cannot be opened.
    private func openStream(_ id: HTTP2StreamID, _ frame: Outgoing, promise: EventLoopPromise<Void>?) -> Stream? {
        let isHeaders: Bool
        switch frame {
        case .headers, .block: isHeaders = true
        case .data: isHeaders = false
        }
        guard role == .client, isHeaders, id > lastStreamID, Int32(id) % 2 == 1 else {
            promise?.fail(NIOHTTP2Errors.noSuchStream(streamID: id))
            return nil
        }
        guard !peerGoneAway else {
            promise?.fail(NIOHTTP2Errors.createdStreamAfterGoaway())
            return nil
        }
        lastStreamID = id
        let stream = newStream(id)
        streams[id] = stream
        return stream
    }

    /// Resets a stream of ours (RST_STREAM) and says it closed.
    func reset(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode, promise: EventLoopPromise<Void>?) {
        guard !failed, let stream = streams[id], let context else {
            promise?.fail(NIOHTTP2Errors.noSuchStream(streamID: id))
            return
        }
        rst(id, code)
        keep(promise)
        close(stream, reason: code, context: context)
    }

    func flush(context: ChannelHandlerContext) {
        writeOutput(context: context)
        unflushed = false
        context.flush()
    }

    /// Sends a stream's frame, as much of DATA as the windows take; false
    /// if some is left, which then waits at the front of `waiting`.
    private func emit(_ stream: Stream, _ frame: Outgoing, _ promise: EventLoopPromise<Void>?) -> Bool {
        switch frame {
        case .headers(let fields, let end):
            headerFrame(stream.id, end) { out in HPACKLiteral.write(fields, into: &out) }
        case .block(var block, let end):
            headerFrame(stream.id, end) { out in out.writeBuffer(&block) }
        case .data(var bytes, let end):
            while true {
                let room = min(connectionSendWindow, stream.sendWindow, peerMaxFrameSize)
                if bytes.readableBytes > room {
                    guard room > 0, var piece = bytes.readSlice(length: room) else {
                        stream.waiting.insert((.data(bytes, endStream: end), promise), at: 0)
                        return false
                    }
                    dataFrame(stream, &piece, end: false)
                    continue
                }
                dataFrame(stream, &bytes, end: end)
                break
            }
        }
        keep(promise)
        if frame.endsStream {
            stream.localEnded = true
            if let context { closeIfEnded(stream, context: context) }
        }
        return true
    }

    /// Sends what waited on windows that opened, oldest first.
    private func sendWaiting(context: ChannelHandlerContext) {
        guard !blocked.isEmpty else { return }
        let queue = blocked
        blocked.removeAll()
        for stream in queue {
            var waiting = stream.waiting
            stream.waiting.removeAll()
            while !waiting.isEmpty {
                let (frame, promise) = waiting.removeFirst()
                if !emit(stream, frame, promise) {
                    stream.waiting.append(contentsOf: waiting)
                    break
                }
            }
            if !stream.waiting.isEmpty { blocked.append(stream) }
        }
    }

    private func dataFrame(_ stream: Stream, _ bytes: inout ByteBuffer, end: Bool) {
        let n = bytes.readableBytes
        connectionSendWindow -= n
        stream.sendWindow -= n
        if settings.reportsSendWindows && n > 0, let context {
            // A window this frame used up (each is told again once it opens).
            if stream.sendWindow <= 0 { reportSendWindow(stream.id, stream.sendWindow, context: context) }
            if connectionSendWindow <= 0 { reportSendWindow(.rootStream, connectionSendWindow, context: context) }
        }
        frameHeader(length: n, type: 0x0, flags: end ? 0x1 : 0, stream: stream.id)
        if n <= 4096 {
            output.writeBuffer(&bytes)
        } else if let context {
            // A large payload goes as it is, after what is before it.
            writeOutput(context: context)
            context.write(wrapOutboundOut(bytes), promise: nil)
            unflushed = true
        }
    }

    /// A HEADERS frame whose block `encode` writes, and CONTINUATIONs if
    /// the block is over the client's frame size.
    private func headerFrame(_ id: HTTP2StreamID, _ endStream: Bool, _ encode: (inout ByteBuffer) -> Void) {
        let start = output.writerIndex
        frameHeader(length: 0, type: 0x1, flags: 0, stream: id)
        if announceTableSize {
            announceTableSize = false
            output.writeInteger(UInt8(0x20))  // dynamic table size update: 0
        }
        encode(&output)
        let length = output.writerIndex - start - 9
        let flags: UInt8 = endStream ? 0x1 : 0
        guard length > peerMaxFrameSize else {
            output.setInteger(UInt32(length) << 8 | 0x1, at: start)
            output.setInteger(flags | 0x4, at: start + 4)
            return
        }
        // Rare: the block split, HEADERS then CONTINUATIONs.
        guard let block = output.getSlice(at: start + 9, length: length) else { return }
        output.moveWriterIndex(to: start)
        var rest = block
        var first = true
        while rest.readableBytes > 0 {
            var piece = rest.readSlice(length: min(rest.readableBytes, peerMaxFrameSize)) ?? ByteBuffer()
            let last = rest.readableBytes == 0
            frameHeader(length: piece.readableBytes, type: first ? 0x1 : 0x9, flags: (first ? flags : 0) | (last ? 0x4 : 0), stream: id)
            output.writeBuffer(&piece)
            first = false
        }
    }

    private func windowUpdate(_ id: HTTP2StreamID, _ increment: Int) {
        frameHeader(length: 4, type: 0x8, flags: 0, stream: id)
        output.writeInteger(UInt32(increment))
    }

    private func frameHeader(length: Int, type: UInt8, flags: UInt8, stream: HTTP2StreamID) {
        let id = UInt32(bitPattern: Int32(stream))
        output.writeWithUnsafeMutableBytes(minimumWritableBytes: 9) { b in
            b[0] = UInt8(truncatingIfNeeded: length >> 16)
            b[1] = UInt8(truncatingIfNeeded: length >> 8)
            b[2] = UInt8(truncatingIfNeeded: length)
            b[3] = type
            b[4] = flags
            b[5] = UInt8(truncatingIfNeeded: id >> 24)
            b[6] = UInt8(truncatingIfNeeded: id >> 16)
            b[7] = UInt8(truncatingIfNeeded: id >> 8)
            b[8] = UInt8(truncatingIfNeeded: id)
            return 9
        }
    }

    /// The promise of a frame whose bytes are all in `output`.
    private func keep(_ promise: EventLoopPromise<Void>?) {
        if let promise { outputPromises.append(promise) }
    }

    /// Hands what is in `output` to the channel (unflushed).
    private func writeOutput(context: ChannelHandlerContext) {
        guard output.readableBytes > 0 || !outputPromises.isEmpty else { return }
        let promise: EventLoopPromise<Void>?
        switch outputPromises.count {
        case 0: promise = nil
        case 1: promise = outputPromises[0]
        default:
            let all = outputPromises
            let first = context.eventLoop.makePromise(of: Void.self)
            first.futureResult.assumeIsolated().whenComplete { result in
                for p in all { p.completeWith(result) }
            }
            promise = first
        }
        outputPromises.removeAll(keepingCapacity: true)
        context.write(wrapOutboundOut(output), promise: promise)
        unflushed = true
        // (Storage the channel still holds is not written over: clear
        // allocates anew unless this buffer is its only holder.)
        output.clear()
    }

    /// Writes and flushes what is held (ExpressHTTP2Handler's flush).
    func flushNow() {
        guard let context else { return }
        flush(context: context)
    }

    /// Closes the connection once what was written to it is out.
    func closeAfterWrites() {
        guard let context else { return }
        writeOutput(context: context)
        context.closeAfterWrites()
    }
}

/// The codec ended a connection whose client broke the protocol.
struct HTTP2ConnectionFailure: Error, CustomStringConvertible {
    let code: HTTP2ErrorCode
    let reason: String
    var description: String { "HTTP/2 connection error \(code): \(reason)" }
}
