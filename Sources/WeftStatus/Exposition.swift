/// The two text formats a Prometheus scraper may ask for. swift-prometheus
/// writes the Prometheus text format (0.0.4); a scraper that asks for
/// OpenMetrics (`Accept: application/openmetrics-text`) gets the same
/// families in OpenMetrics 1.0: counter families named without their
/// `_total` suffix, and the closing `# EOF`.
public enum Exposition {
    public static let prometheusContentType = "text/plain; version=0.0.4; charset=utf-8"
    public static let openMetricsContentType = "application/openmetrics-text; version=1.0.0; charset=utf-8"

    public static func wantsOpenMetrics(_ accept: String?) -> Bool {
        accept?.lowercased().contains("application/openmetrics-text") ?? false
    }

    /// Prometheus text (as swift-prometheus writes it) to OpenMetrics text.
    public static func openMetrics(_ text: String) -> String {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: true)
        var counters = Set<Substring>()
        for line in lines where line.hasPrefix("# TYPE ") {
            let parts = line.split(separator: " ", maxSplits: 3)
            if parts.count == 4, parts[3] == "counter" { counters.insert(parts[2]) }
        }
        var out = ""
        out.reserveCapacity(text.utf8.count + 16)
        for line in lines {
            if line.hasPrefix("# HELP ") || line.hasPrefix("# TYPE ") {
                var parts = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
                if parts.count >= 3, counters.contains(parts[2]), parts[2].hasSuffix("_total") {
                    parts[2] = parts[2].dropLast("_total".count)
                }
                if parts.count == 4, parts[1] == "TYPE", parts[3] == "untyped" { parts[3] = "unknown" }
                out += parts.joined(separator: " ")
            } else if line.hasPrefix("#") {
                continue  // other comments have no place in OpenMetrics
            } else {
                out += line
            }
            out += "\n"
        }
        return out + "# EOF\n"
    }
}
