@testable import WeftCore

/// Manifests in `text`, as file `file`, built into a cluster state: the
/// state, or every error as `file:doc:field: reason`.
func buildState(_ text: String, file: String) -> (ClusterState?, [String]) {
    let (resources, errors) = ManifestReader.parse(text, file: file)
    switch ClusterState.build(resources, parseErrors: errors) {
    case .success(let s): return (s, [])
    case .failure(let e): return (nil, e.errors.map(\.description))
    }
}
