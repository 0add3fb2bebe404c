import Synchronization

/// Caps how many distinct values each label may take, process-wide. Values
/// past the cap are reported as "overflow": a scan of 60,000 ports or a
/// misbehaving client cannot grow the series (or the memory) without bound.
public final class LabelCap: Sendable {
    public static let overflow = "overflow"
    public let limit: Int
    private let seen = Mutex<[String: Set<String>]>([:])

    public init(limit: Int) { self.limit = limit }

    public func admit(_ label: String, _ value: String) -> String {
        seen.withLock { seen in
            if seen[label]?.contains(value) == true { return value }
            if seen[label, default: []].count >= limit { return Self.overflow }
            seen[label, default: []].insert(value)
            return value
        }
    }
}
