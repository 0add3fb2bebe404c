import Foundation

/// Parsed documents per file, reused while a file's identity (inode, size,
/// mtime) is unchanged. A config directory holding one huge file and one small
/// edited one re-parses only the small one; validation still runs over the
/// whole set every time, so atomicity does not depend on the cache.
public final class ManifestCache {
    private struct Stamp: Equatable {
        var inode: UInt64
        var size: UInt64
        var mtimeNanos: Int64
    }

    private var parsed: [String: (stamp: Stamp, resources: [LocatedResource], errors: [ManifestError])] = [:]

    public init() {}

    public func load(directory: String) -> Result<ClusterState, ManifestErrors> {
        let files: [String]
        do {
            files = try ManifestSource.files(at: directory)
        } catch let e as ManifestErrors {
            return .failure(e)
        } catch {
            return .failure(ManifestErrors([ManifestError(DocumentLocation(file: directory, document: 0), field: "", "\(error)")]))
        }
        // Each file's resources as the array parsed (not joined into one).
        var resources: [[LocatedResource]] = []
        var errors: [ManifestError] = []
        var seen: Set<String> = []
        for file in files {
            seen.insert(file)
            guard let stamp = Self.stamp(file) else { continue }  // removed meanwhile
            if let cached = parsed[file], cached.stamp == stamp {
                resources.append(cached.resources)
                errors += cached.errors
                continue
            }
            let result = ManifestSource.read(paths: [file])
            parsed[file] = (stamp, result.resources, result.errors)
            resources.append(result.resources)
            errors += result.errors
        }
        parsed = parsed.filter { seen.contains($0.key) }
        return ClusterState.build(chunks: resources, parseErrors: errors)
    }

    private static func stamp(_ file: String) -> Stamp? {
        var st = stat()
        guard stat(file, &st) == 0 else { return nil }
        return Stamp(inode: UInt64(st.st_ino), size: UInt64(st.st_size),
                     mtimeNanos: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
    }
}
