import NIOHTTP2

/// A connection's streams by id, for the few a connection has open at a
/// time (at most 100 on the codec's connections, usually under ten): ids
/// in an array searched from the newest, where a dictionary hashed the id
/// (SipHash, about 150 instructions) on every frame.
struct StreamTable<Value> {
    private var ids: [HTTP2StreamID] = []
    private(set) var values: [Value] = []

    var count: Int { ids.count }
    var isEmpty: Bool { ids.isEmpty }

    private func index(_ id: HTTP2StreamID) -> Int? {
        var i = ids.count - 1
        while i >= 0 {
            if ids[i] == id { return i }
            i -= 1
        }
        return nil
    }

    subscript(id: HTTP2StreamID) -> Value? {
        get { index(id).map { values[$0] } }
        set {
            if let i = index(id) {
                if let newValue { values[i] = newValue } else { remove(at: i) }
            } else if let newValue {
                ids.append(id)
                values.append(newValue)
            }
        }
    }

    @discardableResult
    mutating func removeValue(forKey id: HTTP2StreamID) -> Value? {
        guard let i = index(id) else { return nil }
        let value = values[i]
        remove(at: i)
        return value
    }

    func contains(_ id: HTTP2StreamID) -> Bool { index(id) != nil }

    mutating func removeAll() {
        ids.removeAll()
        values.removeAll()
    }

    /// (Order is kept: the newest stays last, where a search starts.)
    private mutating func remove(at i: Int) {
        ids.remove(at: i)
        values.remove(at: i)
    }
}

/// A set of stream ids, as StreamTable.
struct StreamSet {
    private var table = StreamTable<Void>()

    var isEmpty: Bool { table.isEmpty }
    func contains(_ id: HTTP2StreamID) -> Bool { table.contains(id) }
    mutating func insert(_ id: HTTP2StreamID) { table[id] = () }
    @discardableResult
    mutating func remove(_ id: HTTP2StreamID) -> HTTP2StreamID? { table.removeValue(forKey: id) != nil ? id : nil }
}
