import Foundation
import Glibc
import Testing
import WeftCore
@testable import WeftKernel

/// weft_listen_pick against the real kernel: listeners of one SO_REUSEPORT
/// group on loopback take new connections in turn, and one that closes
/// costs no connection.
@Suite(.serialized)
struct ListenerSpreadTests {
    /// A blocking connect to 127.0.0.1:`port`; the client's own port.
    private func connect(port: UInt16) throws -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = port.bigEndian
        sin.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) } }
        try #require(rc == 0, "connect to 127.0.0.1:\(port): errno \(errno)")
        var local = sockaddr_in()
        var size = length
        _ = withUnsafeMutablePointer(to: &local) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &size) } }
        return (fd, UInt16(bigEndian: local.sin_port))
    }

    /// Every connection waiting on `listener` (non-blocking): the clients' ports.
    private func acceptAll(_ listener: Int32) -> [UInt16] {
        var ports: [UInt16] = []
        while true {
            var peer = sockaddr_in()
            var size = socklen_t(MemoryLayout<sockaddr_in>.size)
            let fd = withUnsafeMutablePointer(to: &peer) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(listener, $0, &size) } }
            guard fd >= 0 else { return ports }
            ports.append(UInt16(bigEndian: peer.sin_port))
            close(fd)
        }
    }

    private func port(of fd: Int32) -> UInt16 {
        var sin = sockaddr_in()
        var size = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &size) } }
        return UInt16(bigEndian: sin.sin_port)
    }

    @Test(.enabled(if: Privilege.canRun, Privilege.skipReason))
    func newConnectionsGoToTheListenersInTurn() throws {
        try #require(Privilege.isRoot, "CI=true: this test must run as root")
        let listeners = try ListenerSpread.listen(address: IPv4Address(0x7f00_0001), port: 0, count: 3, backlog: 64)
        var open = Set(listeners)
        defer { for fd in open { close(fd) } }
        #expect(listeners.count == 3)
        let port = port(of: listeners[0])
        #expect(port != 0 && listeners.allSatisfy { self.port(of: $0) == port })
        try ListenerSpread.attach(listeners: listeners)

        // Twelve connections, one after another: listener 0, 1, 2, 0, ...
        var clients: [(fd: Int32, port: UInt16)] = []
        defer { for c in clients { close(c.fd) } }
        for _ in 0..<12 { clients.append(try connect(port: port)) }
        let accepted = listeners.map(acceptAll)
        for (k, client) in clients.enumerated() {
            #expect(accepted[k % 3].contains(client.port), "connection \(k) on listener \(k % 3)")
        }
        #expect(accepted.map(\.count) == [4, 4, 4])

        // A listener that closes leaves its slot empty: its turns go to the
        // kernel's hash over the others, and no connection is refused.
        close(listeners[1])
        open.remove(listeners[1])
        var more: [(fd: Int32, port: UInt16)] = []
        defer { for c in more { close(c.fd) } }
        for _ in 0..<9 { more.append(try connect(port: port)) }
        let after = [acceptAll(listeners[0]), acceptAll(listeners[2])]
        #expect(Set(after.joined()) == Set(more.map(\.port)))
        // Two in three of them still went where their turn said.
        #expect(after[0].count >= 3 && after[1].count >= 3)
    }

    /// The proxy sets no TCP_NODELAY on a connection it accepts: the
    /// kernel gives the new socket its listener's. If it did not, every
    /// response would wait on Nagle's algorithm for the client's ACK.
    @Test func anAcceptedConnectionHasNoDelayFromItsListener() throws {
        let listeners = try ListenerSpread.listen(address: IPv4Address(0x7f00_0001), port: 0, count: 1, backlog: 8)
        defer { for fd in listeners { close(fd) } }
        let listener = try #require(listeners.first)
        let client = try connect(port: port(of: listener))
        defer { close(client.fd) }
        var accepted: Int32 = -1
        for _ in 0..<100 where accepted < 0 {
            accepted = accept(listener, nil, nil)
            if accepted < 0 { usleep(10_000) }
        }
        try #require(accepted >= 0, "accept: errno \(errno)")
        defer { close(accepted) }
        func noDelay(_ fd: Int32) -> Int32 {
            var value: Int32 = -1
            var size = socklen_t(4)
            _ = getsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &value, &size)
            return value
        }
        #expect(noDelay(listener) == 1)
        #expect(noDelay(accepted) == 1)
        // (The client socket, made by hand, has not: the option is the listener's.)
        #expect(noDelay(client.fd) == 0)
    }

    @Test(.enabled(if: Privilege.canRun, Privilege.skipReason))
    func aListenerOutsideTheGroupOrTooManyAreRefused() throws {
        try #require(Privilege.isRoot, "CI=true: this test must run as root")
        // A socket that is not listening cannot go in the array.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        #expect(throws: KernelError.self) { try ListenerSpread.attach(listeners: [fd]) }
        #expect(throws: KernelError.self) { try ListenerSpread.attach(listeners: Array(repeating: fd, count: 65)) }
    }
}
