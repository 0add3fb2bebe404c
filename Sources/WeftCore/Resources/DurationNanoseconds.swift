extension Duration {
    /// The whole duration in nanoseconds (sub-nanosecond parts dropped),
    /// for NIO's TimeAmount and uptime clocks.
    public var nanoseconds: Int64 {
        let (s, attos) = components
        return s * 1_000_000_000 + attos / 1_000_000_000
    }

    /// As a manifest writes it (a Gateway API duration, to the
    /// millisecond): "1m", "30s", "400ms".
    public var manifestText: String {
        let ms = nanoseconds / 1_000_000
        if ms % 60_000 == 0 && ms > 0 { return "\(ms / 60_000)m" }
        return ms % 1000 == 0 ? "\(ms / 1000)s" : "\(ms)ms"
    }
}
