import Foundation
import Glibc

/// Which build of weft a process runs: the release version, and the
/// executable file itself, so an agent can tell whether the proxy it adopted
/// (or a process it checks) runs the same build, for instance after the
/// binary was upgraded in place under a running proxy.
public enum Build {
    /// The release this source tree is (`weft --version`, /status,
    /// `weft_build_info`).
    public static let version = "0.1.0"

    /// The executable a process runs, by device and inode (what
    /// `/proc/PID/exe` leads to, also once the file was replaced or removed).
    public struct Executable: Equatable, Sendable {
        public var device: UInt64
        public var inode: UInt64
    }

    /// `pid`'s executable (nil: this process's); nil when it cannot be read
    /// (no such process, or another user's without privilege).
    public static func executable(of pid: Int32? = nil) -> Executable? {
        executable(ofPath: "/proc/\(pid.map(String.init) ?? "self")/exe")
    }

    /// A path that starts this process's own build again: where its
    /// executable is, or, once that file was replaced or removed (an
    /// upgrade in place), `/proc/self/exe`, which still leads to the file
    /// it runs. `replaced` says which.
    public static func ownExecutablePath() -> (path: String, replaced: Bool) {
        guard let path = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") else {
            return (CommandLine.arguments.first ?? "/proc/self/exe", false)
        }
        // The kernel marks a removed file so; a file renamed over it has
        // another inode than the one this process runs.
        if path.hasSuffix(" (deleted)") || executable(ofPath: path) != executable() {
            return ("/proc/self/exe", true)
        }
        return (path, false)
    }

    /// The file at `path` (following links).
    static func executable(ofPath path: String) -> Executable? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return Executable(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }
}
