import Testing
import WeftCore
@testable import WeftKernel

/// The proxy builds splice keys from its channels' addresses; the kernel
/// builds them from the socket (sockops) or the sender's view (sk_msg). A
/// key the two spell differently would never match: checked here.
struct SpliceKeyTests {
    @Test func keysAreIPv4MappedWithHostOrderPortsAndTurnAroundForThePeer() throws {
        let client = try #require(IPv4Address("198.18.1.10")), proxy = try #require(IPv4Address("198.18.1.1"))
        let bytes = { (a: IPv4Address) in withUnsafeBytes(of: a.networkOrder) { Array($0) } }
        let d = SpliceMaps.Socket(local: (SpliceMaps.Socket.mapped(ipv4: bytes(proxy)), 15001),
                                  remote: (SpliceMaps.Socket.mapped(ipv4: bytes(client)), 40000))
        // The same address form as the agent's table of local addresses.
        let table = ShortcutMaps.key(proxy)
        #expect(withUnsafeBytes(of: d.key.local) { Array($0) } == withUnsafeBytes(of: table.addr) { Array($0) })
        #expect(withUnsafeBytes(of: d.key.local) { Array($0) } == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 1, 1])
        #expect(d.key.local_port == 15001 && d.key.remote_port == 40000)
        // The client's socket: the same connection seen from the other end.
        let c = d.peer
        #expect(withUnsafeBytes(of: c.key.local) { Array($0) } == withUnsafeBytes(of: d.key.remote) { Array($0) })
        #expect(withUnsafeBytes(of: c.key.remote) { Array($0) } == withUnsafeBytes(of: d.key.local) { Array($0) })
        #expect(c.key.local_port == 40000 && c.key.remote_port == 15001)
        #expect(withUnsafeBytes(of: c.peer.key) { Array($0) } == withUnsafeBytes(of: d.key) { Array($0) })
    }
}
