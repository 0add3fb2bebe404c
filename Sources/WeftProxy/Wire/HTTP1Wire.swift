import NIOCore

/// HTTP/1.1 heads read in place, for the express path (ExpressHTTP1Handler):
/// positions into the bytes as they were read, no strings and no typed
/// messages. It accepts only the plain, well-formed form of a message
/// (RFC 9112): anything else makes a parse fail, and the express path then
/// hands the connection to the full HTTP/1 path (NIO's codec), which knows
/// every corner of the protocol and answers 400 where one is due.
enum HTTP1Wire {
    /// One header line: where its name is, and its value without the
    /// spaces around it.
    struct Field {
        var name: Range<Int>
        var value: Range<Int>
    }

    struct RequestLine {
        var method: Range<Int>
        var target: Range<Int>
    }

    struct StatusLine {
        var code: Int
        /// 1 for HTTP/1.1, 0 for HTTP/1.0.
        var minor: Int
    }

    /// The length of the head (through its blank line), if it is all there.
    /// Eight bytes at a time: only a word that holds a LF is looked into.
    static func headLength(_ p: UnsafeRawBufferPointer) -> Int? {
        guard let base = p.baseAddress else { return nil }
        let n = p.count
        func ends(_ j: Int) -> Bool { j >= 3 && p[j - 1] == 13 && p[j - 2] == 10 && p[j - 3] == 13 }
        var i = 0
        while i + 8 <= n {
            var lf = SWAR.zeroBytes(base.loadUnaligned(fromByteOffset: i, as: UInt64.self) ^ SWAR.repeated(10))
            while lf != 0 {
                let j = i + lf.trailingZeroBitCount / 8
                if p[j] == 10 && ends(j) { return j + 1 }
                lf &= lf - 1
            }
            i += 8
        }
        while i < n {
            if p[i] == 10 && ends(i) { return i + 1 }
            i += 1
        }
        return nil
    }

    /// `METHOD SP origin-form SP HTTP/1.1 CRLF` and the header lines of
    /// `p[0..<length]`; nil for any other form (absolute-form targets,
    /// HTTP/1.0, obsolete line folding, bare LFs, bad characters).
    static func parseRequest(_ p: UnsafeRawBufferPointer, length: Int, fields: inout [Field]) -> RequestLine? {
        var i = 0
        while i < length, i < 16, p[i] >= 65, p[i] <= 90 { i += 1 }  // registered methods are upper-case letters
        guard i > 0, i < length, p[i] == 32 else { return nil }
        // CONNECT asks for a tunnel; the full path refuses it (405).
        guard !(i == 7 && exactly(p, at: 0, "CONNECT")) else { return nil }
        let method = 0..<i
        i += 1
        let targetStart = i
        guard i < length, p[i] == UInt8(ascii: "/") else { return nil }
        while i < length, p[i] > 32, p[i] < 127 { i += 1 }
        let target = targetStart..<i
        let version: StaticString = " HTTP/1.1\r\n"
        guard length - i >= version.utf8CodeUnitCount, exactly(p, at: i, version) else { return nil }
        i += version.utf8CodeUnitCount
        guard parseFields(p, from: i, length: length, into: &fields) else { return nil }
        return RequestLine(method: method, target: target)
    }

    /// `HTTP/1.x SP 3DIGIT SP reason CRLF` and the header lines.
    static func parseResponse(_ p: UnsafeRawBufferPointer, length: Int, fields: inout [Field]) -> StatusLine? {
        guard length > 13, exactly(p, at: 0, "HTTP/1.") else { return nil }
        let minor = Int(p[7]) - 48
        guard minor == 0 || minor == 1, p[8] == 32 else { return nil }
        var code = 0
        for k in 9..<12 {
            guard p[k] >= 48, p[k] <= 57 else { return nil }
            code = code * 10 + Int(p[k]) - 48
        }
        guard code >= 100 else { return nil }
        var i = 12
        if p[i] == 32 {
            // The reason phrase: HTAB, SP, VCHAR, obs-text.
            i += 1
            while i < length, p[i] == 9 || p[i] >= 32, p[i] != 127 { i += 1 }
        }
        guard i + 1 < length, p[i] == 13, p[i + 1] == 10 else { return nil }
        guard parseFields(p, from: i + 2, length: length, into: &fields) else { return nil }
        return StatusLine(code: code, minor: minor)
    }

    /// Header lines from `start` to the blank line that ends the head.
    private static func parseFields(_ p: UnsafeRawBufferPointer, from start: Int, length: Int, into fields: inout [Field]) -> Bool {
        fields.removeAll(keepingCapacity: true)
        // Room for a usual head at once: growing from empty took four
        // allocations on each new connection.
        if fields.capacity < 16 { fields.reserveCapacity(16) }
        var i = start
        while i + 1 < length {
            if p[i] == 13 { return p[i + 1] == 10 && i + 2 == length }  // the blank line
            let nameStart = i
            while i < length, isToken(p[i]) { i += 1 }
            guard i > nameStart, i < length, p[i] == UInt8(ascii: ":") else { return false }
            let name = nameStart..<i
            i += 1
            while i < length, p[i] == 32 || p[i] == 9 { i += 1 }
            let valueStart = i
            guard let cr = valueEnd(p, from: i, length: length) else { return false }
            i = cr
            var valueEnd = cr
            while valueEnd > valueStart, p[valueEnd - 1] == 32 || p[valueEnd - 1] == 9 { valueEnd -= 1 }
            guard i + 1 < length, p[i + 1] == 10 else { return false }
            fields.append(Field(name: name, value: valueStart..<valueEnd))
            i += 2
        }
        return false
    }

    /// Whether `literal` is at `offset` of `p`, byte for byte (the caller
    /// made sure it fits).
    static func exactly(_ p: UnsafeRawBufferPointer, at offset: Int, _ literal: StaticString) -> Bool {
        let l = literal.utf8Start
        for k in 0..<literal.utf8CodeUnitCount where p[offset + k] != l[k] { return false }
        return true
    }

    /// Where a field value that starts at `start` ends: the index of its CR
    /// (or `length`); nil at a control character other than HTAB (a bare LF
    /// among them) or DEL. Eight bytes at a time while none is below 0x20
    /// or DEL.
    static func valueEnd(_ p: UnsafeRawBufferPointer, from start: Int, length: Int) -> Int? {
        guard let base = p.baseAddress else { return start }
        var i = start
        while i + 8 <= length {
            let w = base.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            if SWAR.bytesBelow32(w) | SWAR.zeroBytes(w ^ SWAR.repeated(127)) != 0 { break }
            i += 8
        }
        while i < length {
            let c = p[i]
            if c == 13 { return i }
            guard c == 9 || (c >= 32 && c != 127) else { return nil }
            i += 1
        }
        return i
    }

    /// RFC 9110 5.6.2 tchar: DIGIT, ALPHA and !#$%&'*+-.^_`|~, as a bitmap
    /// of the 128 ASCII codes (a test checks it against the list): a field
    /// name is read a byte at a time through this.
    @inline(__always)
    static func isToken(_ c: UInt8) -> Bool {
        let low: UInt64 = 0x03FF_6CFA_0000_0000, high: UInt64 = 0x57FF_FFFF_C7FF_FFFE
        return c < 128 && ((c < 64 ? low : high) >> UInt64(c & 63)) & 1 != 0
    }

    /// Whether `p[range]` is `lower` (ASCII, compared case-insensitively;
    /// `lower` is lower-case).
    static func equals(_ p: UnsafeRawBufferPointer, _ range: Range<Int>, _ lower: StaticString) -> Bool {
        guard range.count == lower.utf8CodeUnitCount else { return false }
        let l = lower.utf8Start
        for k in 0..<range.count {
            if fold(p[range.lowerBound + k]) != l[k] { return false }
        }
        return true
    }

    /// Whether the comma-separated list `p[range]` has `lower` as an element.
    static func listContains(_ p: UnsafeRawBufferPointer, _ range: Range<Int>, _ lower: StaticString) -> Bool {
        var found = false
        elements(p, range) { if equals(p, $0, lower) { found = true } }
        return found
    }

    /// How many elements the comma-separated list `p[range]` has.
    static func count(_ p: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int {
        var n = 0
        elements(p, range) { _ in n += 1 }
        return n
    }

    /// Whether the comma-separated list `p[list]` has `p[name]` as an
    /// element (a header name a Connection header lists).
    static func listContains(_ p: UnsafeRawBufferPointer, _ list: Range<Int>, name: Range<Int>) -> Bool {
        var found = false
        elements(p, list) { e in
            guard e.count == name.count else { return }
            for k in 0..<e.count where fold(p[e.lowerBound + k]) != fold(p[name.lowerBound + k]) { return }
            found = true
        }
        return found
    }

    /// Whether the last element of the list `p[range]` is `lower`
    /// (Transfer-Encoding: chunked must come last).
    static func lastElement(_ p: UnsafeRawBufferPointer, _ range: Range<Int>, is lower: StaticString) -> Bool {
        var last: Range<Int>?
        elements(p, range) { last = $0 }
        return last.map { equals(p, $0, lower) } ?? false
    }

    /// Whether `p[range]` starts with `lower`, case-insensitively.
    static func hasPrefix(_ p: UnsafeRawBufferPointer, _ range: Range<Int>, _ lower: StaticString) -> Bool {
        let n = lower.utf8CodeUnitCount
        return range.count >= n && equals(p, range.lowerBound..<range.lowerBound + n, lower)
    }

    /// The non-empty elements of a comma-separated list, trimmed.
    static func elements(_ p: UnsafeRawBufferPointer, _ range: Range<Int>, _ body: (Range<Int>) -> Void) {
        var start = range.lowerBound
        while start <= range.upperBound {
            var end = start
            while end < range.upperBound, p[end] != UInt8(ascii: ",") { end += 1 }
            var a = start, b = end
            while a < b, p[a] == 32 || p[a] == 9 { a += 1 }
            while b > a, p[b - 1] == 32 || p[b - 1] == 9 { b -= 1 }
            if a < b { body(a..<b) }
            start = end + 1
        }
    }

    /// ASCII upper case folded to lower (field names compared, or written
    /// as HTTP/2 wants them: HPACKLiteral).
    static func fold(_ c: UInt8) -> UInt8 { c >= 65 && c <= 90 ? c | 0x20 : c }

    /// A decimal Content-Length value; nil if it is not one.
    static func decimal(_ p: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int? {
        guard !range.isEmpty, range.count <= 15 else { return nil }
        var v = 0
        for k in range {
            guard p[k] >= 48, p[k] <= 57 else { return nil }
            v = v * 10 + Int(p[k]) - 48
        }
        return v
    }
}

/// Finds where a chunked body (RFC 9112 7.1) ends, as its bytes go by
/// unchanged: chunk sizes, extensions, data, and the trailer section.
struct ChunkedFramer {
    private enum State {
        case size, ext, sizeLF, data, dataCR, dataLF, lineStart, trailer, trailerLF, lastLF, done
    }
    private var state = State.size
    private var size = 0
    private var digits = 0

    var isDone: Bool { state == .done }

    /// How many of `p`'s bytes belong to the body (all of them unless it
    /// ends inside `p`); nil if the framing is broken.
    mutating func consume(_ p: UnsafeRawBufferPointer) -> Int? {
        consume(p, data: { _ in }, trailer: { _ in })
    }

    /// The same, also telling where in `p` the chunks' data lie and the
    /// bytes of trailer lines ("name: value\r\n"), for a client that gets
    /// the body without the chunked framing (an HTTP/2 one).
    mutating func consume(_ p: UnsafeRawBufferPointer, data: (Range<Int>) -> Void, trailer: (Range<Int>) -> Void) -> Int? {
        var i = 0
        while i < p.count && state != .done {
            let c = p[i]
            switch state {
            case .size:
                if let d = Self.hexValue(c) {
                    guard digits < 15 else { return nil }
                    size = size << 4 | d
                    digits += 1
                } else if digits > 0 && (c == UInt8(ascii: ";") || c == 32 || c == 9) {
                    state = .ext
                } else if digits > 0 && c == 13 {
                    state = .sizeLF
                } else {
                    return nil
                }
            case .ext:
                if c == 13 { state = .sizeLF } else if c == 10 { return nil }
            case .sizeLF:
                guard c == 10 else { return nil }
                state = size == 0 ? .lineStart : .data
            case .data:
                let n = min(size, p.count - i)
                if n > 0 { data(i..<i + n) }
                size -= n
                i += n
                if size == 0 { state = .dataCR }
                continue
            case .dataCR:
                guard c == 13 else { return nil }
                state = .dataLF
            case .dataLF:
                guard c == 10 else { return nil }
                state = .size
                digits = 0
            case .lineStart:
                state = c == 13 ? .lastLF : .trailer
                if c != 13 { trailer(i..<i + 1) }
            case .trailer:
                if c == 13 { state = .trailerLF } else if c == 10 { return nil }
                trailer(i..<i + 1)
            case .trailerLF:
                guard c == 10 else { return nil }
                state = .lineStart
                trailer(i..<i + 1)
            case .lastLF:
                guard c == 10 else { return nil }
                state = .done
            case .done:
                break
            }
            i += 1
        }
        return i
    }

    private static func hexValue(_ c: UInt8) -> Int? {
        switch c {
        case 48...57: return Int(c) - 48
        case 65...70: return Int(c) - 55
        case 97...102: return Int(c) - 87
        default: return nil
        }
    }
}

/// Lower-case hex digits written in place, most significant first, every
/// digit of the integer's width (leading zeros kept).
enum Hex {
    static func write<T: FixedWidthInteger & UnsignedInteger>(_ v: T, into out: UnsafeMutableRawBufferPointer, at offset: Int) {
        let digits = T.bitWidth / 4
        var v = v
        var i = offset + digits - 1
        while i >= offset {
            let d = UInt8(truncatingIfNeeded: v & 0xF)
            out[i] = d < 10 ? d + 48 : d + 87
            v >>= 4
            i -= 1
        }
    }
}

/// Copies ranges of a head read in place into the head sent on, ranges
/// that follow each other in one write: the lines a proxy keeps mostly do.
struct RunCopier {
    private var run: Range<Int>?

    /// Keeps `range` of `p` (flushing the run before it when not adjacent).
    mutating func keep(_ range: Range<Int>, of p: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        if let current = run, current.upperBound == range.lowerBound {
            run = current.lowerBound..<range.upperBound
            return
        }
        flush(p, into: &out)
        run = range
    }

    /// Writes what is kept and not yet written.
    mutating func flush(_ p: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        guard let current = run else { return }
        out.writeBytes(UnsafeRawBufferPointer(rebasing: p[current]))
        run = nil
    }
}

extension HTTP1Wire {
    /// A field's whole line, name to CRLF included (its value's range stops
    /// before trailing whitespace).
    static func line(_ p: UnsafeRawBufferPointer, _ f: Field) -> Range<Int> {
        var end = f.value.upperBound
        while p[end] != 13 { end += 1 }
        return f.name.lowerBound..<end + 2
    }
}

/// Byte tests on eight bytes at once. A flagged byte's high bit is set in
/// the result; the lowest flagged byte is always a true match, bytes above
/// it may be false ones (a borrow), so callers check those one by one.
enum SWAR {
    static func repeated(_ b: UInt8) -> UInt64 { UInt64(b) &* 0x0101_0101_0101_0101 }

    /// Bytes that are 0.
    static func zeroBytes(_ w: UInt64) -> UInt64 {
        (w &- 0x0101_0101_0101_0101) & ~w & 0x8080_8080_8080_8080
    }

    /// Bytes below 0x20 (control characters, CR and LF among them).
    static func bytesBelow32(_ w: UInt64) -> UInt64 {
        (w &- 0x2020_2020_2020_2020) & ~w & 0x8080_8080_8080_8080
    }
}
