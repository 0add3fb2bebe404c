import NIOCore
import NIOEmbedded
import NIOSSL
import Testing
@testable import WeftProxy

/// The ClientHello a real TLS client (BoringSSL, through NIOSSL) sends
/// first, naming `serverName` (nil: none).
private func realHello(_ serverName: String?) throws -> [UInt8] {
    let channel = EmbeddedChannel()
    defer { _ = try? channel.finish() }
    var configuration = TLSConfiguration.makeClientConfiguration()
    configuration.certificateVerification = .none
    let context = try NIOSSLContext(configuration: configuration)
    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: serverName))
    try channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 443)).wait()
    var out: [UInt8] = []
    while let buffer = try channel.readOutbound(as: ByteBuffer.self) { out += buffer.readableBytesView }
    return out
}

private func read(_ bytes: [UInt8]) -> ClientHello.Reading {
    ClientHello.read(ByteBuffer(bytes: bytes).readableBytesView)
}

/// A ClientHello's handshake message cut into records of `size` bytes.
private func recut(_ hello: [UInt8], into size: Int) -> [UInt8] {
    let message = hello.dropFirst(5)
    var out: [UInt8] = []
    var i = message.startIndex
    while i < message.endIndex {
        let piece = message[i..<min(i + size, message.endIndex)]
        out += [22, 3, 1, UInt8(piece.count >> 8), UInt8(piece.count & 0xff)] + piece
        i += size
    }
    return out
}

/// A minimal ClientHello naming `names` (each a server_name entry of type
/// host_name), with `extra` extensions before it.
private func handmade(_ names: [String], extra: [UInt8] = []) -> [UInt8] {
    func u16(_ n: Int) -> [UInt8] { [UInt8(n >> 8), UInt8(n & 0xff)] }
    var list: [UInt8] = []
    for n in names { list += [0] + u16(n.utf8.count) + Array(n.utf8) }
    let sni = names.isEmpty ? [] : u16(0) + u16(list.count + 2) + u16(list.count) + list
    let extensions = extra + sni
    let body: [UInt8] = [3, 3] + Array(repeating: 7, count: 32) + [0] + u16(2) + [0x13, 0x01] + [1, 0] + u16(extensions.count) + extensions
    let message: [UInt8] = [1, 0] + u16(body.count) + body
    return [22, 3, 1] + u16(message.count) + message
}

@Suite struct ClientHelloTests {
    @Test func aRealClientHelloNamesItsServer() throws {
        let hello = try realHello("a.example.com")
        #expect(read(hello) == .serverName("a.example.com"))
        #expect(read(try realHello(nil)) == .serverName(nil), "a client that sends no SNI")
        // Bytes after the ClientHello (none yet from a real client) change nothing.
        #expect(read(hello + [23, 3, 3, 0, 1, 0]) == .serverName("a.example.com"))
    }

    @Test func everyPrefixAsksForMoreAndRecordsAreJoined() throws {
        let hello = try realHello("svc.shop.example.com")
        for n in 0..<hello.count {
            #expect(read(Array(hello.prefix(n))) == .more, "prefix of \(n) of \(hello.count) bytes")
        }
        for size in [1, 3, 100, 1000] {
            let cut = recut(hello, into: size)
            #expect(read(cut) == .serverName("svc.shop.example.com"), "records of \(size) bytes")
            #expect(read(Array(cut.dropLast())) == .more)
        }
    }

    @Test func namesAreLowercasedAndOtherNameTypesIgnored() {
        #expect(read(handmade(["API.Example.COM."])) == .serverName("api.example.com"))
        #expect(read(handmade([])) == .serverName(nil))
        // An unknown extension before server_name is skipped.
        #expect(read(handmade(["b.example"], extra: [0xfe, 0x0d, 0, 3, 1, 2, 3])) == .serverName("b.example"))
        // A server_name list with an entry of another type first: skipped.
        var other = handmade(["c.example"])
        let at = other.count - "c.example".utf8.count - 3
        other.insert(contentsOf: [9, 0, 1, 0x41], at: at)
        // (Lengths: the entry list, the extension, the extensions, the message, the record.)
        func bump(_ i: Int, by n: Int) { let v = (Int(other[i]) << 8 | Int(other[i + 1])) + n; other[i] = UInt8(v >> 8); other[i + 1] = UInt8(v & 0xff) }
        bump(at - 2, by: 4); bump(at - 4, by: 4); bump(at - 8, by: 4); bump(7, by: 4); bump(3, by: 4)
        #expect(read(other) == .serverName("c.example"))
    }

    @Test func whatIsNoClientHelloIsTold() {
        #expect(read(Array("GET / HTTP/1.1\r\n\r\n".utf8)) == .notTLS)
        #expect(read(Array("PRI * HTTP/2.0\r\n".utf8)) == .notTLS)
        #expect(read([22]) == .more)
        #expect(read([22, 2]) == .notTLS, "SSL 2 or garbage")
        #expect(read([22, 3, 1, 0, 0]) == .notTLS, "an empty record")
        #expect(read([22, 3, 1, 0x50, 0]) == .notTLS, "a record over 2^14")
        #expect(read([21, 3, 3, 0, 2, 2, 40]) == .notTLS, "an alert")
        var serverHello = handmade(["x"])
        serverHello[5] = 2
        #expect(read(serverHello) == .notTLS, "a handshake message that is not a ClientHello")
        #expect(read(handmade(["a.example", "b.example"])) == .notTLS, "two host names")
        #expect(read(handmade(["a b"])) == .notTLS, "a name with a space")
        var short = handmade(["a.example"])
        short[5 + 4 + 2 + 32] = 0xff // a session id of 255 bytes runs off the end
        #expect(read(short) == .notTLS)
        #expect(read([22, 3, 1, 0, 4, 1, 0x00, 0xff, 0xff]) == .more, "a ClientHello of 64 KiB is waited for")
        #expect(read([22, 3, 1, 0, 4, 1, 0x01, 0x00, 0x01]) == .notTLS, "one declared over 64 KiB is refused")
    }

    @Test func mangledHellosNeverCrash() throws {
        let hello = try realHello("fuzz.example.com")
        var random = SystemRandomNumberGenerator()
        for _ in 0..<3000 {
            var bytes = hello
            for _ in 0..<Int.random(in: 1...6, using: &random) {
                bytes[Int.random(in: 0..<bytes.count, using: &random)] = UInt8.random(in: 0...255, using: &random)
            }
            if Bool.random(using: &random) { bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &random))) }
            switch read(bytes) {
            case .more, .notTLS, .serverName: break
            }
        }
    }
}
