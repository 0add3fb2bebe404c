/// What a change to a config directory does to the objects its manifests
/// define, object by object, as `weft apply` and `weft delete` report it
/// (kubectl's created / configured / unchanged, and deleted): an object is
/// known by kind, namespace and name, and "configured" when anything read
/// from its document differs (spec, labels, annotations), however the file
/// around it was laid out.
public struct ResourceChange: Hashable, Sendable, CustomStringConvertible {
    public enum Action: String, Sendable, CaseIterable {
        case created, configured, unchanged, deleted
    }

    public var kind: String
    /// `namespace/name`, or the name alone for a cluster-scoped object.
    public var name: String
    public var action: Action

    public var description: String { "\(kind) \(name) \(action.rawValue)" }

    struct Key: Hashable {
        var kind: String
        var namespace: String
        var name: String

        init(_ resource: Resource) {
            kind = resource.kind
            namespace = resource.metadata.namespace
            name = resource.metadata.name
        }
    }

    init(_ key: Key, _ action: Action) {
        kind = key.kind
        name = key.namespace.isEmpty ? key.name : "\(key.namespace)/\(key.name)"
        self.action = action
    }

    /// The objects of `written` (the files being applied, in their order)
    /// as created, configured or unchanged against `before` (every object
    /// the directory held), then the objects `before` held that `after`
    /// (the directory as it would be) no longer does, as deleted, in kind
    /// and name order. An object `after` changed that `written` does not
    /// hold cannot happen with whole files, and is reported as configured.
    /// A name a set defines twice (a directory that no longer validates)
    /// counts by its first definition.
    public static func between(before: [Resource], after: [Resource], written: [Resource]) -> [ResourceChange] {
        func byKey(_ resources: [Resource]) -> [Key: Resource] {
            Dictionary(resources.map { (Key($0), $0) }, uniquingKeysWith: { first, _ in first })
        }
        let old = byKey(before)
        let new = byKey(after)
        var changes: [ResourceChange] = []
        var listed = Set<Key>()
        for resource in written {
            let key = Key(resource)
            guard listed.insert(key).inserted, let now = new[key] else { continue }
            let action: Action = old[key] == nil ? .created : old[key] == now ? .unchanged : .configured
            changes.append(ResourceChange(key, action))
        }
        let order = { (a: Key, b: Key) in (a.kind, a.namespace, a.name) < (b.kind, b.namespace, b.name) }
        for key in new.keys.sorted(by: order) where !listed.contains(key) && old[key] != new[key] {
            changes.append(ResourceChange(key, old[key] == nil ? .created : .configured))
        }
        for key in old.keys.sorted(by: order) where new[key] == nil {
            changes.append(ResourceChange(key, .deleted))
        }
        return changes
    }

    /// "1 created, 2 configured, 0 unchanged, 1 deleted": every action, in
    /// that order.
    public static func summary(_ changes: [ResourceChange]) -> String {
        Action.allCases.map { action in "\(changes.count { $0.action == action }) \(action.rawValue)" }
            .joined(separator: ", ")
    }
}
