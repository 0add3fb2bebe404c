import Foundation
import Glibc
import NIOCore
import NIOPosix
import Testing
@testable import WeftStatus

/// The gRPC Health Checking Protocol probe (HealthProbe.grpc) against a
/// real grpcio server on loopback (Tests/WeftEndToEndTests/Tools/grpctool.py,
/// whose Health/Check is the protocol's, its messages written by hand), and
/// against servers that are not one.
@Suite(.serialized) struct GRPCHealthProbeTests {
    static let tool = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("WeftEndToEndTests/Tools/grpctool.py").path

    /// A free TCP port on loopback (bound, read, let go).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p in
                bind(fd, p, length) == 0 && getsockname(fd, p, &length) == 0
            }
        }
        guard bound else { throw POSIXError(.EADDRNOTAVAIL) }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    static func python(_ args: [String]) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = [tool] + args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return p
    }

    static func probe(_ group: any EventLoopGroup, port: Int, service: String) -> Result<Int, any Error> {
        Result { try HealthProbe.grpc(on: group.next(), host: "127.0.0.1", port: port, service: service, timeout: .seconds(2)).wait() }
    }

    @Test func messagesAreTheProtocols() {
        #expect(HealthProbe.request("") == [0, 0, 0, 0, 0])
        #expect(HealthProbe.request("a.B") == [0, 0, 0, 0, 5, 0x0A, 3] + Array("a.B".utf8))
        #expect(HealthProbe.servingStatus([0, 0, 0, 0, 2, 0x08, 1]) == 1)
        #expect(HealthProbe.servingStatus([0, 0, 0, 0, 2, 0x08, 2]) == 2)
        #expect(HealthProbe.servingStatus([0, 0, 0, 0, 0]) == 0, "an empty message: UNKNOWN, protobuf's default")
        // An unknown field before the status is skipped.
        #expect(HealthProbe.servingStatus([0, 0, 0, 0, 6, 0x12, 2, 0x41, 0x42, 0x08, 1]) == 1)
        #expect(HealthProbe.servingStatus([0, 0, 0, 0, 3, 0x08, 1]) == nil, "a length that lies")
        #expect(HealthProbe.servingStatus([1, 0, 0, 0, 2, 0x08, 1]) == nil, "compressed")
        #expect(HealthProbe.servingStatus([0, 0, 0, 0, 2, 0x08, 0x80]) == nil, "a varint cut short")
    }

    @Test func aGRPCServerAnswersItsServingStatus() throws {
        let port = try Self.freePort()
        let server = try Self.python(["serve", "\(port)"])
        defer {
            // (grpcio's server does not end on SIGTERM.)
            kill(server.processIdentifier, SIGKILL)
            server.waitUntilExit()
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        var first = Self.probe(group, port: port, service: "")
        for _ in 0..<100 where (try? first.get()) == nil {
            usleep(50_000)
            first = Self.probe(group, port: port, service: "")
        }
        #expect((try? first.get()) == HealthProbe.ServingStatus.serving, "\(first)")
        #expect((try? Self.probe(group, port: port, service: "weft.Echo").get()) == 1)
        let set = try Self.python(["sethealth", "127.0.0.1", "\(port)", "weft.Echo=NOT_SERVING"])
        set.waitUntilExit()
        #expect((try? Self.probe(group, port: port, service: "weft.Echo").get()) == 2)
        #expect((try? Self.probe(group, port: port, service: "").get()) == 1, "the server as a whole still serves")
        // A service the server does not know: NOT_FOUND, a failed call.
        switch Self.probe(group, port: port, service: "shop.Cart") {
        case .success(let v): Issue.record("an unknown service answered \(v)")
        case .failure(let e): #expect("\(e)".contains("grpc-status 5"), "\(e)")
        }
    }

    /// Not a gRPC server: an HTTP/1.1 one (NIO's server answers the h2
    /// preface as a bad request and closes), and nothing listening.
    @Test func whatIsNotAGRPCServerFails() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let http1 = try ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? http1.close().wait() }
        let start = Date()
        if case .success(let v) = Self.probe(group, port: http1.localAddress?.port ?? 0, service: "") {
            Issue.record("an HTTP/1.1 server answered \(v)")
        }
        #expect(Date().timeIntervalSince(start) < 2.5, "failed within the timeout")
        if case .success(let v) = Self.probe(group, port: try Self.freePort(), service: "") {
            Issue.record("nothing listening answered \(v)")
        }
    }
}
