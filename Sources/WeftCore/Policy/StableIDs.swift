/// Small integer ids for keys that come and go, stable for as long as a key
/// stays: re-compiling the same config gives the same ids, so the kernel's
/// maps see only real changes. Freed ids are reused lowest first.
public struct StableIDs<Key: Hashable & Sendable>: Sendable {
    public private(set) var ids: [Key: UInt32] = [:]
    private var taken: Set<UInt32> = []
    private var free: [UInt32] = []  // kept sorted descending: popLast() is the lowest
    private var next: UInt32

    public init(first: UInt32) { next = first }

    public func id(of key: Key) -> UInt32? { ids[key] }

    /// The key's id, allocating one if it has none.
    public mutating func id(for key: Key) -> UInt32 {
        if let id = ids[key] { return id }
        let id = free.popLast() ?? { defer { next += 1 }; return next }()
        ids[key] = id
        taken.insert(id)
        return id
    }

    /// Takes over an id found in the kernel (adoption after a restart);
    /// ignored when the key or id is already taken.
    public mutating func adopt(_ key: Key, _ id: UInt32) {
        guard ids[key] == nil, !taken.contains(id) else { return }
        ids[key] = id
        taken.insert(id)
        if id >= next {
            free += (next..<id)
            free.sort(by: >)
            next = id + 1
        } else if let i = free.firstIndex(of: id) {
            free.remove(at: i)
        }
    }

    /// Frees the ids of every key not in `keys`.
    public mutating func retain(_ keys: Set<Key>) {
        var released = false
        for (key, id) in ids where !keys.contains(key) {
            ids[key] = nil
            taken.remove(id)
            free.append(id)
            released = true
        }
        if released { free.sort(by: >) }
    }
}
