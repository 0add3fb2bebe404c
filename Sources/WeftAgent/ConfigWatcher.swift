import Glibc

/// Watches the config directory with inotify. Any create, write-close, move
/// or delete of a manifest file counts; hidden files (temporaries) do not,
/// except a ConfigMap volume's `..data`; events the kernel dropped from a
/// full queue count as a change to every file.
///
/// It follows the path, not only the directory the path first led to: the
/// path's parent is watched for the path's own name, so a directory moved
/// into its place or a symlink swapped to another (git-sync, a release
/// directory per version) is watched from then on, as is the directory again
/// after it was removed and made anew.
final class ConfigWatcher {
    let fd: Int32
    private let directory: String
    private let name: String
    /// The directory's watch (-1: none, while nothing is at the path).
    private var directoryWatch: Int32 = -1
    private var parentWatch: Int32 = -1
    private var buffer = [UInt8](repeating: 0, count: 64 * 1024)
    /// Whether the last `drain` found events lost to a full queue.
    private(set) var lostEvents = false

    private static let directoryMask = UInt32(IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE
        | IN_DELETE_SELF | IN_MOVE_SELF)
    private static let parentMask = UInt32(IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE)

    init(directory: String) throws(AgentError) {
        let fd = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        guard fd >= 0 else { throw AgentError("inotify_init1: \(String(cString: strerror(errno)))") }
        self.fd = fd
        var path = directory
        while path.count > 1 && path.hasSuffix("/") { path.removeLast() }
        self.directory = path
        let slash = path.lastIndex(of: "/")
        name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let parent = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        directoryWatch = inotify_add_watch(fd, path, Self.directoryMask)
        guard directoryWatch >= 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw AgentError("cannot watch \(directory): \(reason)")
        }
        // (The root has no parent to watch for it; nor does a path whose
        // parent cannot be read: then only the directory is watched. Nor
        // does "." or "..": its "parent" may be the directory itself, and a
        // second watch of one directory would replace the first one's mask.)
        if !name.isEmpty && name != "." && name != ".." && !Self.sameDirectory(parent, path) {
            parentWatch = inotify_add_watch(fd, parent, Self.parentMask)
        }
    }

    deinit { close(fd) }

    /// Drains pending events; true if any concerned a manifest file, or
    /// what the path leads to.
    func drain() -> Bool {
        var relevant = false
        var rearm = false
        lostEvents = false
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { break }
            var offset = 0
            buffer.withUnsafeBytes { raw in
                while offset + MemoryLayout<inotify_event>.size <= n {
                    let event = raw.loadUnaligned(fromByteOffset: offset, as: inotify_event.self)
                    let nameStart = offset + MemoryLayout<inotify_event>.size
                    let nameBytes = raw[nameStart..<(nameStart + Int(event.len))].prefix { $0 != 0 }
                    let name = String(decoding: nameBytes, as: UTF8.self)
                    offset = nameStart + Int(event.len)
                    // Events were lost (the queue was full): any file may
                    // have changed, so the whole directory is read again.
                    if event.mask & UInt32(IN_Q_OVERFLOW) != 0 {
                        relevant = true
                        lostEvents = true
                        continue
                    }
                    if event.wd == parentWatch {
                        // The path itself made, moved or removed.
                        if name == self.name { relevant = true; rearm = true }
                        continue
                    }
                    guard event.wd == directoryWatch else { continue }
                    if event.mask & UInt32(IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED) != 0 {
                        relevant = true
                        rearm = true
                    }
                    // Hidden names are staging files (weft apply's, editors'),
                    // except `..data`: a Kubernetes ConfigMap or Secret
                    // volume publishes an update by renaming a new `..data`
                    // symlink into place, and its visible files, symlinks
                    // through it, are not touched at all.
                    if (!name.hasPrefix(".") && !name.isEmpty) || name == "..data" { relevant = true }
                }
            }
        }
        if rearm { watchPath() }
        return relevant
    }

    private static func sameDirectory(_ a: String, _ b: String) -> Bool {
        var x = stat(), y = stat()
        return stat(a, &x) == 0 && stat(b, &y) == 0 && x.st_dev == y.st_dev && x.st_ino == y.st_ino
    }

    /// Watches whatever directory the path leads to now (inotify gives the
    /// same watch again for the same directory; another replaces it).
    private func watchPath() {
        let watch = inotify_add_watch(fd, directory, Self.directoryMask)
        if watch != directoryWatch, directoryWatch >= 0 { inotify_rm_watch(fd, directoryWatch) }
        directoryWatch = watch
    }
}

public struct AgentError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
