import Foundation
import Testing
@testable import WeftCore

/// How a process's build is told apart from another's: by the executable
/// file it runs (device and inode), which an upgrade in place changes.
@Suite struct BuildTests {
    @Test func aProcessIsKnownByTheFileItRunsAlsoOnceThatFileIsReplaced() throws {
        let me = try #require(Build.executable())
        #expect(Build.executable(of: getpid()) == me)
        let own = Build.ownExecutablePath()
        #expect(!own.replaced && Build.executable(ofPath: own.path) == me, "\(own)")

        // Two runs of one file are one build; a copy of it is another.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-build-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let copy = "\(dir)/sleep"
        try FileManager.default.copyItem(atPath: "/bin/sleep", toPath: copy)
        func start(_ path: String) throws -> Process {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: path)
            p.arguments = ["30"]
            try p.run()
            return p
        }
        let a = try start("/bin/sleep"), b = try start("/bin/sleep"), c = try start(copy)
        defer { for p in [a, b, c] { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        let ids = [a, b, c].map { Build.executable(of: $0.processIdentifier) }
        #expect(ids[0] != nil && ids[0] == ids[1] && ids[2] != nil && ids[2] != ids[0], "\(ids)")
        #expect(ids[0] != me)

        // Replaced as install(1) does (a new file renamed over it): the
        // running process keeps its build, which the path no longer leads to.
        try FileManager.default.copyItem(atPath: "/bin/sleep", toPath: "\(dir)/.new")
        #expect(rename("\(dir)/.new", copy) == 0)
        #expect(Build.executable(of: c.processIdentifier) == ids[2])
        #expect(Build.executable(ofPath: copy) != ids[2])
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(c.processIdentifier)/exe"))?
            .hasSuffix(" (deleted)") == true)
        #expect(Build.executable(of: 999_999_999) == nil)
    }
}
