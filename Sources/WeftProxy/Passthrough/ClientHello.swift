import NIOCore
import WeftCore

/// The server name (SNI, RFC 6066) of the TLS ClientHello a client sends
/// first, read without taking part in the handshake: what a TLSRoute
/// routes by. The bytes are only looked at; they go to the backend as they
/// came. A ClientHello may span records (one with large post-quantum key
/// shares can pass 16 KiB): their handshake fragments are joined, up to
/// `maxHandshake` bytes.
enum ClientHello {
    enum Reading: Equatable {
        /// Not all of the ClientHello yet.
        case more
        /// Not a TLS ClientHello (or a malformed one).
        case notTLS
        /// The ClientHello's host name, lowercase, without a trailing dot;
        /// nil when it names none.
        case serverName(String?)
    }

    /// The largest ClientHello read (the message, without record headers).
    static let maxHandshake = 64 * 1024

    static func read(_ bytes: ByteBufferView) -> Reading {
        var handshake: [UInt8] = []
        var i = bytes.startIndex
        while true {
            // A record: type 22 (handshake), version 3.x, 2-byte length.
            let left = bytes.endIndex - i
            if left >= 1, bytes[i] != 22 { return .notTLS }
            if left >= 2, bytes[i + 1] != 3 { return .notTLS }
            guard left >= 5 else { return .more }
            let length = Int(bytes[i + 3]) << 8 | Int(bytes[i + 4])
            // (RFC 8446 5.1: at most 2^14 bytes of plaintext; a zero-length
            // handshake fragment is not allowed.)
            guard length > 0, length <= 1 << 14 else { return .notTLS }
            guard left >= 5 + length else { return .more }
            handshake.append(contentsOf: bytes[(i + 5)..<(i + 5 + length)])
            i += 5 + length
            guard handshake.count >= 4 else { continue }
            guard handshake[0] == 1 else { return .notTLS } // ClientHello
            let size = Int(handshake[1]) << 16 | Int(handshake[2]) << 8 | Int(handshake[3])
            guard size <= maxHandshake else { return .notTLS }
            guard handshake.count >= 4 + size else { continue }
            return parse(handshake[4..<(4 + size)])
        }
    }

    /// The body of a ClientHello (RFC 8446 4.1.2; TLS 1.0-1.2 alike).
    static func parse(_ body: ArraySlice<UInt8>) -> Reading {
        var r = Reader(bytes: body)
        guard r.skip(2 + 32), // legacy_version, random
              let session = r.u8(), r.skip(Int(session)),
              let suites = r.u16(), suites >= 2, suites % 2 == 0, r.skip(Int(suites)),
              let compression = r.u8(), compression >= 1, r.skip(Int(compression)) else { return .notTLS }
        // No extensions at all (TLS 1.0 without any): no name.
        if r.remaining == 0 { return .serverName(nil) }
        guard let total = r.u16(), Int(total) == r.remaining else { return .notTLS }
        var name: String?
        var seen = false
        while r.remaining > 0 {
            guard let type = r.u16(), let length = r.u16(), let data = r.take(Int(length)) else { return .notTLS }
            guard type == 0 else { continue } // server_name
            guard !seen else { return .notTLS } // (RFC 8446 4.2: one of each)
            seen = true
            var list = Reader(bytes: data)
            guard let listLength = list.u16(), Int(listLength) == list.remaining, listLength > 0 else { return .notTLS }
            while list.remaining > 0 {
                guard let kind = list.u8(), let n = list.u16(), let raw = list.take(Int(n)) else { return .notTLS }
                guard kind == 0 else { continue } // host_name; others are ignored (RFC 6066 3)
                guard name == nil, let host = hostName(raw) else { return .notTLS }
                name = host
            }
        }
        return .serverName(name)
    }

    /// A DNS host name as sent: 1-253 printable ASCII bytes, no spaces,
    /// lowercased, one trailing dot dropped.
    static func hostName(_ raw: ArraySlice<UInt8>) -> String? {
        var bytes = Array(raw)
        if bytes.last == UInt8(ascii: ".") { bytes.removeLast() }
        guard (1...253).contains(bytes.count), bytes.allSatisfy({ $0 > 0x20 && $0 < 0x7f }) else { return nil }
        for k in bytes.indices where bytes[k] >= UInt8(ascii: "A") && bytes[k] <= UInt8(ascii: "Z") { bytes[k] += 32 }
        return String(decoding: bytes, as: UTF8.self)
    }

    struct Reader {
        var bytes: ArraySlice<UInt8>
        var remaining: Int { bytes.count }

        mutating func u8() -> UInt8? {
            guard let b = bytes.first else { return nil }
            bytes = bytes.dropFirst()
            return b
        }

        mutating func u16() -> UInt16? {
            guard bytes.count >= 2 else { return nil }
            let v = UInt16(bytes[bytes.startIndex]) << 8 | UInt16(bytes[bytes.startIndex + 1])
            bytes = bytes.dropFirst(2)
            return v
        }

        mutating func take(_ n: Int) -> ArraySlice<UInt8>? {
            guard bytes.count >= n else { return nil }
            defer { bytes = bytes.dropFirst(n) }
            return bytes.prefix(n)
        }

        mutating func skip(_ n: Int) -> Bool { take(n) != nil }
    }
}
