extension Duration {
    /// The whole duration in nanoseconds (sub-nanosecond parts dropped),
    /// for NIO's TimeAmount and uptime clocks.
    public var nanoseconds: Int64 {
        let (s, attos) = components
        return s * 1_000_000_000 + attos / 1_000_000_000
    }
}
