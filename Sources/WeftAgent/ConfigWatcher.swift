import Glibc

/// Watches the config directory with inotify. Any create, write-close, move
/// or delete of a manifest file counts; hidden files (temporaries) do not.
final class ConfigWatcher {
    let fd: Int32
    private var buffer = [UInt8](repeating: 0, count: 64 * 1024)

    init(directory: String) throws(AgentError) {
        let fd = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        guard fd >= 0 else { throw AgentError("inotify_init1: \(String(cString: strerror(errno)))") }
        let mask = UInt32(IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE
            | IN_DELETE_SELF | IN_MOVE_SELF)
        guard inotify_add_watch(fd, directory, mask) >= 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw AgentError("cannot watch \(directory): \(reason)")
        }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Drains pending events; true if any concerned a manifest file.
    func drain() -> Bool {
        var relevant = false
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { return relevant }
            var offset = 0
            buffer.withUnsafeBytes { raw in
                while offset + MemoryLayout<inotify_event>.size <= n {
                    let event = raw.loadUnaligned(fromByteOffset: offset, as: inotify_event.self)
                    let nameStart = offset + MemoryLayout<inotify_event>.size
                    let nameBytes = raw[nameStart..<(nameStart + Int(event.len))].prefix { $0 != 0 }
                    let name = String(decoding: nameBytes, as: UTF8.self)
                    // Hidden names are staging files (weft apply's, editors'),
                    // except `..data`: a Kubernetes ConfigMap or Secret
                    // volume publishes an update by renaming a new `..data`
                    // symlink into place, and its visible files, symlinks
                    // through it, are not touched at all.
                    if event.mask & UInt32(IN_DELETE_SELF | IN_MOVE_SELF) != 0 || (!name.hasPrefix(".") && !name.isEmpty)
                        || name == "..data" {
                        relevant = true
                    }
                    offset = nameStart + Int(event.len)
                }
            }
        }
    }
}

public struct AgentError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
