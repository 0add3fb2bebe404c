import NIOCore
import NIOHPACK
import NIOHTTP2

/// The checks RFC 9113 (sections 8.2 and 8.3) asks of an HTTP/2 field block,
/// as NIOHTTP2Handler's header-block validation makes them, on the bytes:
///
/// - names are lower-case tokens (`!#$%&'*+-.^_`|~`, digits, a-z);
/// - values hold no NUL, CR or LF; pseudo-header values no SP, control
///   byte or DEL either (`:path` becomes an HTTP/1.1 request line);
/// - pseudo-headers come first, are known, appear once, and a block has the
///   ones it must: a request `:method`, `:scheme` and `:path` (a CONNECT
///   `:method` and `:authority` only), a response `:status`, trailers none;
///   `:path` is not empty; `:protocol` only where the connection announced
///   extended CONNECT (`extendedConnect`, RFC 8441 section 4), on a CONNECT,
///   which then needs `:scheme` and `:path` as any other request;
/// - no connection-specific field (`connection`, `keep-alive`,
///   `proxy-connection`, `transfer-encoding`, `upgrade`); in a request `te`
///   is `trailers` or absent;
/// - in a request or response, `content-length` as NIO's content-length
///   check reads it: every element of every such field (comma-separated,
///   SP/HTAB trimmed, empty ones skipped) the same text, a decimal number
///   (Swift's `Int(_:radix:)`, a sign allowed) not below zero; a 304's is
///   not read. The length comes back for the stream's body to be held to
///   (`DeclaredBody`).
///
/// Why not NIO's own: its validator spends about a thousand instructions per
/// field (a generic walk of every name and value, Substring comparisons),
/// a sixth of the express path's HTTP/2 instructions per request, and its
/// content-length check another 2,300 per response it sends (docs/proxy.md,
/// "Where the CPU goes"). Where ExpressHTTP2Handler runs it sees every frame
/// first, so NIO's checks are turned off on those connections and this one
/// checks every request and trailer block of every stream (the full path's
/// too) and holds each request body to its length, and `HTTP2FieldCheck`
/// every block the full path sends.
/// `HTTP2FieldTests.http2FieldChecksAgreeWithNIO` holds the two to the same
/// verdict on 3,000 random blocks, and `declaredBodiesAreHeldAsNIOHoldsThem`
/// DeclaredBody to its verdict on 600 random bodies.
enum HTTP2Fields {
    enum Block { case request, response, trailers }

    /// Whether `headers` is a well-formed block of kind `block`.
    static func valid(_ headers: HPACKHeaders, _ block: Block) -> Bool {
        var length: Int?
        return valid(headers, block, contentLength: &length)
    }

    /// Whether `headers` is a well-formed block of kind `block`; if so,
    /// `contentLength` is the length a request or response declares (nil
    /// when it declares none). `extendedConnect`: this end announced
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL, so a request may carry `:protocol`.
    static func valid(_ headers: HPACKHeaders, _ block: Block, contentLength: inout Int?,
                      extendedConnect: Bool = false) -> Bool {
        var seen: UInt8 = 0  // pseudo-headers, bits as in `pseudo`
        var regular = false
        var connect = false
        var notModified = false
        var length: Substring?  // the first content-length element
        contentLength = nil
        for (name, value, _) in headers {
            let n = name.utf8
            guard let first = n.first else { return false }
            if first == UInt8(ascii: ":") {
                guard !regular, let bit = pseudo(name), bit & allowed(block, extendedConnect) != 0, seen & bit == 0,
                      pseudoValue(value) else { return false }
                seen |= bit
                if bit == Pseudo.method { connect = value.utf8.count == 7 && value == "CONNECT" }
                if bit == Pseudo.status { notModified = value.utf8.count == 3 && value == "304" }
                if bit == Pseudo.path && value.utf8.isEmpty { return false }
                continue
            }
            regular = true
            guard tokenName(n), fieldValue(value) else { return false }
            switch n.count {
            case 2 where name == "te":
                if block == .request && value != "trailers" { return false }
            case 7 where name == "upgrade", 10 where name == "connection" || name == "keep-alive",
                 16 where name == "proxy-connection", 17 where name == "transfer-encoding":
                return false
            case 14 where name == "content-length" && block != .trailers && !notModified:
                guard sameElements(value, &length) else { return false }
            default:
                break
            }
        }
        if let length {
            guard let n = Int(length, radix: 10), n >= 0 else { return false }
            contentLength = n
        }
        let mandatory = Pseudo.method | Pseudo.scheme | Pseudo.path
        switch block {
        case .request where seen & Pseudo.protocol != 0:
            return connect && seen & mandatory == mandatory  // an extended CONNECT
        case .request where connect:
            return seen == Pseudo.method | Pseudo.authority
        case .request:
            return seen & mandatory == mandatory
        case .response:
            return seen == Pseudo.status
        case .trailers:
            return seen == 0
        }
    }

    /// Whether every element of the list `value` (split at commas, SP and
    /// HTAB trimmed, empty ones skipped) is the same text as `first`, which
    /// the first element found becomes.
    private static func sameElements(_ value: String, _ first: inout Substring?) -> Bool {
        func blank(_ c: UInt8) -> Bool { c == 32 || c == 9 }
        for element in value.utf8.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false) {
            guard let a = element.firstIndex(where: { !blank($0) }), let z = element.lastIndex(where: { !blank($0) }) else { continue }
            let text = Substring(element[a...z])
            if let first {
                guard text == first else { return false }
            } else {
                first = text
            }
        }
        return true
    }

    private enum Pseudo {
        static let path: UInt8 = 1, method: UInt8 = 2, scheme: UInt8 = 4, authority: UInt8 = 8, status: UInt8 = 16
        static let `protocol`: UInt8 = 32
    }

    private static func allowed(_ block: Block, _ extendedConnect: Bool) -> UInt8 {
        switch block {
        case .request:
            return Pseudo.path | Pseudo.method | Pseudo.scheme | Pseudo.authority | (extendedConnect ? Pseudo.protocol : 0)
        case .response: return Pseudo.status
        case .trailers: return 0
        }
    }

    private static func pseudo(_ name: String) -> UInt8? {
        // By length first: a String comparison that fails is a call into
        // the runtime; one that succeeds on the same short text is not.
        switch name.utf8.count {
        case 5 where name == ":path": return Pseudo.path
        case 7 where name == ":method": return Pseudo.method
        case 7 where name == ":scheme": return Pseudo.scheme
        case 7 where name == ":status": return Pseudo.status
        case 9 where name == ":protocol": return Pseudo.protocol
        case 10 where name == ":authority": return Pseudo.authority
        default: return nil  // unknown, or not a token
        }
    }

    /// An RFC 9110 token (HTTP1Wire.isToken) with no upper case.
    static func tokenName(_ n: String.UTF8View) -> Bool {
        func ok(_ c: UInt8) -> Bool { HTTP1Wire.isToken(c) && !(65...90).contains(c) }
        if let r = n.withContiguousStorageIfAvailable({ p in p.allSatisfy(ok) }) { return r }
        return n.allSatisfy(ok)
    }

    /// No NUL, LF or CR.
    static func fieldValue(_ value: String) -> Bool {
        func ok(_ c: UInt8) -> Bool { c != 0 && c != 10 && c != 13 }
        if let r = value.utf8.withContiguousStorageIfAvailable({ p in
            guard let base = p.baseAddress else { return true }
            var i = 0
            while i + 8 <= p.count {
                let w = UnsafeRawPointer(base).loadUnaligned(fromByteOffset: i, as: UInt64.self)
                if SWAR.zeroBytes(w) | SWAR.zeroBytes(w ^ SWAR.repeated(10)) | SWAR.zeroBytes(w ^ SWAR.repeated(13)) != 0 {
                    return false
                }
                i += 8
            }
            while i < p.count {
                guard ok(p[i]) else { return false }
                i += 1
            }
            return true
        }) { return r }
        return value.utf8.allSatisfy(ok)
    }

    /// No byte at or below SP, and no DEL.
    static func pseudoValue(_ value: String) -> Bool {
        func ok(_ c: UInt8) -> Bool { c > 32 && c != 127 }
        if let r = value.utf8.withContiguousStorageIfAvailable({ p in p.allSatisfy(ok) }) { return r }
        return value.utf8.allSatisfy(ok)
    }
}

/// A request body held to the length its block declared, as NIO's
/// content-length check holds it (off where ExpressHTTP2Handler runs): no
/// more bytes than declared, and all of them by the stream's end. A stream
/// that breaks it is reset with PROTOCOL_ERROR (RFC 9113, section 8.1.1).
struct DeclaredBody {
    /// Bytes still due.
    private(set) var due: Int

    init(length: Int) { due = length }

    /// `count` more bytes came; false if that is more than declared.
    mutating func received(_ count: Int) -> Bool {
        guard count <= due else { return false }
        due -= count
        return true
    }

    /// Whether the stream may end here.
    var complete: Bool { due == 0 }

    /// Holds the stream's next frame to the body: false if the body is
    /// then longer than declared, or ends short.
    mutating func hold(_ payload: HTTP2Frame.FramePayload) -> Bool {
        switch payload {
        case .data(let d):
            return received(d.data.readableBytes) && (!d.endStream || complete)
        case .headers(let h):
            return !h.endStream || complete
        default:
            return true
        }
    }
}

/// A field block broke RFC 9113: one the proxy would send on an HTTP/2
/// stream (a backend's field the full path passed on, say), or one a
/// tunnel's far end answered with.
struct MalformedFieldBlock: Error, CustomStringConvertible {
    var description: String { "an HTTP/2 field block is malformed" }
}

/// On a full-path stream channel of a connection whose NIOHTTP2Handler does
/// not validate (ExpressHTTP2Handler checks what comes in): checks what goes
/// out. A malformed response or trailer block is not sent; its write fails
/// and the stream is reset, as NIO's own check would have it.
final class HTTP2FieldCheck: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .headers(let h) = unwrapOutboundIn(data) {
            let block: HTTP2Fields.Block = h.headers.first?.name == ":status" ? .response : .trailers
            guard HTTP2Fields.valid(h.headers, block) else {
                promise?.fail(MalformedFieldBlock())
                context.close(promise: nil)
                return
            }
        }
        context.write(data, promise: promise)
    }
}
