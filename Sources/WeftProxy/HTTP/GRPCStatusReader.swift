/// Finds the `grpc-status` of a response whose trailers the proxy passes on
/// as bytes, not as fields: the trailer section of a chunked HTTP/1.1 body
/// (`trailerLines`, fed with `trailer`), or the trailer frame of a gRPC-Web
/// body (`web`, `webText` for application/grpc-web-text, whose body is
/// base64; fed with `body`). gRPC-Web (github.com/grpc/grpc, doc/PROTOCOL-
/// WEB.md) frames its messages as gRPC does, a flag byte and a 32-bit
/// length before each, and sends its trailers last in the body, in a frame
/// whose flag has its top bit set, as HTTP/1-style lines ("grpc-status:
/// 0\r\n"). Only the trailer block is kept (at most `limit` bytes); the
/// messages are counted past. Made only for responses of gRPC calls.
struct GRPCStatusReader {
    enum Source {
        case trailerLines, web, webText
    }

    static let limit = 4_096

    private let source: Source
    /// The trailer block's bytes so far.
    private var block: [UInt8] = []
    /// The gRPC-Web frame's prefix read so far (5 bytes), and how much of
    /// its payload is still to come.
    private var prefix: UInt64 = 0
    private var prefixCount = 0
    private var remaining = 0
    private var inTrailer = false
    /// grpc-web-text: 6-bit groups not yet a whole byte.
    private var bits: UInt32 = 0
    private var bitCount = 0
    /// The body broke the framing (or the trailer block was over the limit).
    private var broken = false

    init(_ source: Source) {
        self.source = source
    }

    /// A reader for a response of `contentType`, if it is gRPC-Web's.
    static func reading(contentType: some StringProtocol) -> GRPCStatusReader? {
        guard contentType.hasPrefix("application/grpc-web") else { return nil }
        return GRPCStatusReader(contentType.hasPrefix("application/grpc-web-text") ? .webText : .web)
    }

    /// The body's bytes (after any chunked framing), as they go by.
    mutating func body(_ p: UnsafeRawBufferPointer) {
        guard !broken else { return }
        switch source {
        case .trailerLines: return
        case .web: frames(p)
        case .webText: decode(p)
        }
    }

    /// Bytes of a chunked body's trailer lines ("name: value\r\n").
    mutating func trailer(_ p: UnsafeRawBufferPointer) {
        guard !broken, source == .trailerLines else { return }
        keep(p)
    }

    /// The `grpc-status` value of the trailer block, as sent (nil: none
    /// came, or the body was not gRPC-Web).
    var status: String? {
        guard !broken, !block.isEmpty else { return nil }
        return Self.field("grpc-status", in: block)
    }

    private mutating func keep(_ p: UnsafeRawBufferPointer) {
        guard block.count + p.count <= Self.limit else {
            broken = true
            return
        }
        block.append(contentsOf: p)
    }

    /// gRPC-Web frames: messages skipped, the trailer frame's payload kept.
    private mutating func frames(_ p: UnsafeRawBufferPointer) {
        var i = 0
        while i < p.count && !broken {
            if prefixCount < 5 {
                prefix = prefix << 8 | UInt64(p[i])
                prefixCount += 1
                i += 1
                guard prefixCount == 5 else { continue }
                let flags = UInt8(truncatingIfNeeded: prefix >> 32)
                remaining = Int(prefix & 0xFFFF_FFFF)
                if flags & 0x80 != 0 {
                    // A second trailer frame: not gRPC-Web as specified.
                    if !block.isEmpty { broken = true }
                    inTrailer = true
                }
                if remaining == 0 { endFrame() }
                continue
            }
            let n = min(remaining, p.count - i)
            if inTrailer { keep(UnsafeRawBufferPointer(rebasing: p[i..<i + n])) }
            remaining -= n
            i += n
            if remaining == 0 { endFrame() }
        }
    }

    private mutating func endFrame() {
        prefix = 0
        prefixCount = 0
        inTrailer = false
    }

    /// grpc-web-text: base64 (each frame perhaps encoded on its own, so
    /// padding may come mid-body), decoded into frames().
    private mutating func decode(_ p: UnsafeRawBufferPointer) {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 192) { out in
            var n = 0
            var i = 0
            while i < p.count {
                let c = p[i]
                i += 1
                if c == UInt8(ascii: "=") {
                    bits = 0  // a quantum's end: what is left is padding
                    bitCount = 0
                    continue
                }
                guard let v = Self.sextet(c) else {
                    broken = true
                    return
                }
                bits = bits << 6 | UInt32(v)
                bitCount += 6
                if bitCount >= 8 {
                    bitCount -= 8
                    out[n] = UInt8(truncatingIfNeeded: bits >> UInt32(bitCount))
                    bits &= (1 << UInt32(bitCount)) - 1
                    n += 1
                }
                if n == out.count {
                    frames(UnsafeRawBufferPointer(UnsafeMutableBufferPointer(rebasing: out[0..<n])))
                    n = 0
                    if broken { return }
                }
            }
            if n > 0 { frames(UnsafeRawBufferPointer(UnsafeMutableBufferPointer(rebasing: out[0..<n]))) }
        }
    }

    private static func sextet(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): c - UInt8(ascii: "A")
        case UInt8(ascii: "a")...UInt8(ascii: "z"): c - UInt8(ascii: "a") + 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0") + 52
        case UInt8(ascii: "+"): 62
        case UInt8(ascii: "/"): 63
        default: nil
        }
    }

    private static func lower(_ c: UInt8) -> UInt8 {
        c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z") ? c | 0x20 : c
    }

    /// The value of field `name` (lower case) in "name: value" lines,
    /// without the spaces around it.
    static func field(_ name: String, in block: [UInt8]) -> String? {
        let wanted = Array(name.utf8)
        var start = 0
        while start < block.count {
            var end = start
            while end < block.count && block[end] != 10 { end += 1 }
            var line = block[start..<end]
            if line.last == 13 { line = line.dropLast() }
            start = end + 1
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon - line.startIndex == wanted.count,
                  zip(line[..<colon], wanted).allSatisfy({ lower($0) == $1 }) else { continue }
            var value = line[(colon + 1)...]
            while let f = value.first, f == 32 || f == 9 { value = value.dropFirst() }
            while let l = value.last, l == 32 || l == 9 { value = value.dropLast() }
            return String(decoding: value, as: UTF8.self)
        }
        return nil
    }
}
