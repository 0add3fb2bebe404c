/// An IPv4 address, held in host byte order. Parsing is strict dotted-quad
/// (no leading zeros, no shorthand), as Kubernetes validates addresses.
public struct IPv4Address: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    /// Dotted-quad text: four decimal octets, no leading zeros. One pass
    /// over the UTF-8 bytes (a route table with 10,000 Workloads parses
    /// tens of thousands of these; splitting into substrings cost ~10x).
    public init?(_ text: some StringProtocol) {
        var value: UInt32 = 0, octet: UInt32 = 0, digits = 0, dots = 0, leadingZero = false
        for byte in text.utf8 {
            if byte == UInt8(ascii: ".") {
                guard digits > 0, dots < 3 else { return nil }
                value = value << 8 | octet
                octet = 0
                digits = 0
                dots += 1
            } else if byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") {
                guard !leadingZero, digits < 3 else { return nil }
                leadingZero = digits == 0 && byte == UInt8(ascii: "0")
                octet = octet * 10 + UInt32(byte - UInt8(ascii: "0"))
                guard octet <= 255 else { return nil }
                digits += 1
                continue
            } else {
                return nil
            }
            leadingZero = false
        }
        guard dots == 3, digits > 0 else { return nil }
        self.value = value << 8 | octet
    }

    /// The address in network byte order, as the kernel stores it.
    public var networkOrder: UInt32 { value.bigEndian }

    public init(networkOrder: UInt32) { self.value = UInt32(bigEndian: networkOrder) }

    public var octets: (UInt8, UInt8, UInt8, UInt8) {
        (UInt8(value >> 24), UInt8(value >> 16 & 0xff), UInt8(value >> 8 & 0xff), UInt8(value & 0xff))
    }

    /// Dotted-quad text, written digit by digit into one small string (it
    /// is made per request in places: interpolating each octet cost about
    /// 1,800 instructions).
    public var description: String {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 15) { out in
            var n = 0
            for shift in stride(from: 24, through: 0, by: -8) {
                let octet = Int(value >> UInt32(shift) & 0xff)
                if shift != 24 { out[n] = UInt8(ascii: "."); n += 1 }
                if octet >= 100 { out[n] = UInt8(48 + octet / 100); n += 1 }
                if octet >= 10 { out[n] = UInt8(48 + octet / 10 % 10); n += 1 }
                out[n] = UInt8(48 + octet % 10); n += 1
            }
            return String(decoding: UnsafeBufferPointer(rebasing: out[..<n]), as: UTF8.self)
        }
    }

    public static func < (lhs: IPv4Address, rhs: IPv4Address) -> Bool { lhs.value < rhs.value }
}

/// An IPv4 prefix such as 198.18.0.0/16.
public struct IPv4Prefix: Hashable, Sendable, CustomStringConvertible {
    public var address: IPv4Address
    public var length: Int

    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let address = IPv4Address(parts[0]),
              parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
              let length = Int(parts[1]), (0...32).contains(length) else { return nil }
        self.init(address: address, length: length)
        guard self.address == address else { return nil }  // host bits set
    }

    public init(address: IPv4Address, length: Int) {
        self.length = length
        self.address = IPv4Address(address.value & Self.mask(length))
    }

    static func mask(_ length: Int) -> UInt32 { length == 0 ? 0 : ~UInt32(0) << (32 - length) }

    public func contains(_ other: IPv4Address) -> Bool {
        other.value & Self.mask(length) == address.value
    }

    public var description: String { "\(address)/\(length)" }
}
