import NIOCore
import NIOHPACK

/// HPACK (RFC 7541) as the codec sends it: no dynamic table; a status of
/// the static table as one byte; every other field a literal never
/// indexed, not Huffman-coded (section 6.2.3). Written straight into the
/// bytes, one capacity check per block or field.
enum HPACKLiteral {
    /// The most bytes one field takes: its flags byte, two lengths of at
    /// most 5 bytes, the name and the value.
    static func bound(name: Int, value: Int) -> Int { name + value + 11 }

    /// `:status`; `i` moves past what was written (at most 5 bytes).
    static func status(_ code: Int, into b: UnsafeMutableRawBufferPointer, at i: inout Int) {
        switch code {
        case 200: b[i] = 0x88
        case 204: b[i] = 0x89
        case 206: b[i] = 0x8A
        case 304: b[i] = 0x8B
        case 400: b[i] = 0x8C
        case 404: b[i] = 0x8D
        case 500: b[i] = 0x8E
        default:
            // Never indexed, name: static entry 8; three digits.
            b[i] = 0x18
            b[i + 1] = 3
            b[i + 2] = UInt8(ascii: "0") + UInt8(truncatingIfNeeded: code / 100 % 10)
            b[i + 3] = UInt8(ascii: "0") + UInt8(truncatingIfNeeded: code / 10 % 10)
            b[i + 4] = UInt8(ascii: "0") + UInt8(truncatingIfNeeded: code % 10)
            i += 5
            return
        }
        i += 1
    }

    /// One field, its name lower-cased as it is copied if `lowercase`.
    static func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer, lowercase: Bool,
                      into b: UnsafeMutableRawBufferPointer, at i: inout Int) {
        b[i] = 0x10  // never indexed, new name
        i += 1
        integer(name.count, into: b, at: &i)
        if lowercase {
            for c in name {
                b[i] = HTTP1Wire.fold(c)
                i += 1
            }
        } else {
            UnsafeMutableRawBufferPointer(rebasing: b[i..<(i + name.count)]).copyMemory(from: name)
            i += name.count
        }
        integer(value.count, into: b, at: &i)
        UnsafeMutableRawBufferPointer(rebasing: b[i..<(i + value.count)]).copyMemory(from: value)
        i += value.count
    }

    /// A string length, 7-bit prefix, no Huffman flag.
    static func integer(_ value: Int, into b: UnsafeMutableRawBufferPointer, at i: inout Int) {
        if value < 127 {
            b[i] = UInt8(value)
            i += 1
            return
        }
        b[i] = 127
        i += 1
        var rest = value - 127
        while rest >= 128 {
            b[i] = UInt8(truncatingIfNeeded: rest & 0x7F | 0x80)
            i += 1
            rest >>= 7
        }
        b[i] = UInt8(rest)
        i += 1
    }

    /// A whole field list (the full path's frames, the proxy's own answers).
    static func write(_ fields: HPACKHeaders, into out: inout ByteBuffer) {
        var size = 0
        for (name, value, _) in fields { size += bound(name: name.utf8.count, value: value.utf8.count) }
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { b in
            var i = 0
            for (name, value, _) in fields {
                if name == ":status", value.utf8.count == 3, let code = Int(value) {
                    status(code, into: b, at: &i)
                    continue
                }
                var name = name, value = value
                name.withUTF8 { n in
                    value.withUTF8 { v in
                        field(name: UnsafeRawBufferPointer(n), value: UnsafeRawBufferPointer(v), lowercase: false, into: b, at: &i)
                    }
                }
            }
            return i
        }
    }
}
