/// The L4 protocol of a port, as Kubernetes spells it.
public enum TransportProtocol: String, Hashable, Sendable, CaseIterable, Comparable {
    case tcp = "TCP"
    case udp = "UDP"
    case sctp = "SCTP"

    /// The IPPROTO_* number the kernel uses.
    public var ipProtocol: UInt8 {
        switch self {
        case .tcp: 6
        case .udp: 17
        case .sctp: 132
        }
    }

    public init?(ipProtocol: UInt8) {
        guard let match = Self.allCases.first(where: { $0.ipProtocol == ipProtocol }) else { return nil }
        self = match
    }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.ipProtocol < rhs.ipProtocol }
}
