import Foundation

/// The files a config directory (or a single file) contributes: every
/// `*.yaml`, `*.yml` and `*.json` file directly inside it, in name order,
/// skipping hidden files (editors' and `weft apply`'s temporaries).
public enum ManifestSource {
    public static func files(at path: String) throws -> [String] {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw ManifestErrors([ManifestError(DocumentLocation(file: path, document: 0), field: "",
                                                "no such file or directory")])
        }
        guard isDirectory.boolValue else { return [path] }
        return try FileManager.default.contentsOfDirectory(atPath: path)
            .filter(isManifestName)
            .sorted()
            .map { (path as NSString).appendingPathComponent($0) }
    }

    public static func isManifestName(_ name: String) -> Bool {
        !name.hasPrefix(".") && (name.hasSuffix(".yaml") || name.hasSuffix(".yml") || name.hasSuffix(".json"))
    }

    /// Reads and parses every file; errors from all of them are collected.
    public static func read(paths: [String]) -> (resources: [LocatedResource], errors: [ManifestError]) {
        var resources: [LocatedResource] = []
        var errors: [ManifestError] = []
        for path in paths {
            do {
                let files = try Self.files(at: path)
                for file in files {
                    guard let data = FileManager.default.contents(atPath: file) else {
                        errors.append(ManifestError(DocumentLocation(file: file, document: 0), field: "", "cannot read file"))
                        continue
                    }
                    guard let text = String(data: data, encoding: .utf8) else {
                        errors.append(ManifestError(DocumentLocation(file: file, document: 0), field: "", "file is not UTF-8"))
                        continue
                    }
                    let parsed = ManifestReader.parse(text, file: file)
                    resources += parsed.resources
                    errors += parsed.errors
                }
            } catch let e as ManifestErrors {
                errors += e.errors
            } catch {
                errors.append(ManifestError(DocumentLocation(file: path, document: 0), field: "", "\(error)"))
            }
        }
        return (resources, errors)
    }

    /// Reads, parses and validates as a whole: a state, or every error.
    public static func load(paths: [String]) -> Result<ClusterState, ManifestErrors> {
        let (resources, errors) = read(paths: paths)
        return ClusterState.build(resources, parseErrors: errors)
    }
}
