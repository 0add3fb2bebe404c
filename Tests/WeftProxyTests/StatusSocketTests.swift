import Foundation
import NIOPosix
import Testing
import WeftStatus

/// A proxy's rolling restart puts a new status server on the path the old
/// one still serves; the old one stopping must not take the path with it.
@Suite struct StatusSocketTests {
    @Test func aSuccessorKeepsThePathWhenThePredecessorStops() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("weft-status-\(getpid())-\(UUID().uuidString.prefix(6))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/proxy.sock"
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        func server(_ name: String) throws -> StatusServer {
            let s = StatusServer(group: group)
            try s.start(host: nil, port: 0, unixSocket: path) { _, _ in (.ok, "text/plain", name) }
            return s
        }

        let old = try server("old")
        #expect(try UnixHTTP.get(socket: path, path: "/") == "old")
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK)
        #expect(info.st_mode & 0o777 == 0o600, "only root may ask")

        let new = try server("new")
        #expect(try UnixHTTP.get(socket: path, path: "/") == "new")
        old.stop()
        #expect(try UnixHTTP.get(socket: path, path: "/") == "new", "the old server's stop left the path to the new one")

        new.stop()
        #expect(!FileManager.default.fileExists(atPath: path), "the last server removes its socket")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty, "no temporary file is left")
    }
}
