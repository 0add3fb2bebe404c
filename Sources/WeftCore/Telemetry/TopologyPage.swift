import Foundation

/// The service topology seen from traffic, for `weft graph`: as text, and as
/// a standalone HTML page with an inline SVG (no script, no server, no
/// network: a browser opens the file as it is).
public enum TopologyPage {
    /// Colours the page uses (the browser test looks for them).
    public static let sourceFill = "#0969da"
    public static let serviceFill = "#1a7f37"
    public static let healthyEdge = "#57606a"
    public static let failingEdge = "#cf222e"

    public static func text(_ edges: [TrafficView.Edge]) -> String {
        guard !edges.isEmpty else { return "no traffic seen yet\n" }
        var rows = [["SOURCE", "", "DESTINATION", "REQUESTS", "SUCCESS", "RPS", "TCP", "UDP", "FAILED"]]
        for e in edges {
            rows.append([e.source, "->", e.destination, format(e.requests),
                         e.successRate.map { String(format: "%.1f%%", $0 * 100) } ?? "-",
                         e.rps.map { String(format: "%.1f", $0) } ?? "-", format(e.tcpConnections), format(e.udpExchanges),
                         format(e.connectionFailures)])
        }
        let widths = rows[0].indices.map { i in rows.map { $0[i].count }.max() ?? 0 }
        return rows.map { row in
            row.enumerated().map { i, c in i == row.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
                .joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }

    static func format(_ v: Double) -> String { v == v.rounded() ? String(Int(v)) : String(format: "%.1f", v) }

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(c)
            }
        }
        return out
    }

    public static func html(_ edges: [TrafficView.Edge], title: String) -> String {
        let sources = Array(Set(edges.map(\.source))).sorted()
        let destinations = Array(Set(edges.map(\.destination))).sorted()
        let boxW = 240.0, boxH = 40.0, gap = 80.0, left = 40.0, right = 620.0, top = 90.0
        let height = top + Double(max(sources.count, destinations.count, 1)) * gap + 40
        func y(_ i: Int, of n: Int) -> Double {
            let column = Double(n) * gap
            let total = Double(max(sources.count, destinations.count, 1)) * gap
            return top + (total - column) / 2 + Double(i) * gap
        }
        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(right + boxW + 40))" height="\(Int(height))" \
            font-family="DejaVu Sans, Arial, sans-serif" font-size="13">
            <rect width="100%" height="100%" fill="#ffffff"/>
            <text x="\(left)" y="36" font-size="20" font-weight="bold" fill="#1f2328">\(escape(title))</text>
            <text x="\(left)" y="60" fill="#57606a">workloads (left) call Services (right); edge label: requests, success rate, TCP connections, UDP exchanges, failed connects</text>

            """
        var sourceY: [String: Double] = [:], destY: [String: Double] = [:]
        for (i, s) in sources.enumerated() { sourceY[s] = y(i, of: sources.count) }
        for (i, d) in destinations.enumerated() { destY[d] = y(i, of: destinations.count) }
        let maxRequests = max(edges.map(\.requests).max() ?? 1, 1)
        for e in edges {
            guard let y1 = sourceY[e.source].map({ $0 + boxH / 2 }), let y2 = destY[e.destination].map({ $0 + boxH / 2 }) else { continue }
            let x1 = left + boxW, x2 = right
            let failing = (e.successRate ?? 1) < 0.95 || (e.connectionSuccessRate ?? 1) < 0.95
            let width = 2 + 6 * e.requests / maxRequests
            let label = [e.requests > 0 ? "\(format(e.requests)) req, \(String(format: "%.1f%%", (e.successRate ?? 0) * 100)) ok" : nil,
                         e.tcpConnections > 0 ? "\(format(e.tcpConnections)) tcp" : nil,
                         e.udpExchanges > 0 ? "\(format(e.udpExchanges)) udp" : nil,
                         e.connectionFailures > 0 ? "\(format(e.connectionFailures)) failed" : nil].compactMap { $0 }.joined(separator: ", ")
            svg += """
                <path d="M\(x1),\(y1) C\((x1 + x2) / 2),\(y1) \((x1 + x2) / 2),\(y2) \(x2),\(y2)" fill="none" \
                stroke="\(failing ? failingEdge : healthyEdge)" stroke-width="\(String(format: "%.1f", width))"/>
                <text x="\((x1 + x2) / 2)" y="\((y1 + y2) / 2 - 8)" text-anchor="middle" fill="\(failing ? failingEdge : "#1f2328")">\(escape(label))</text>

                """
        }
        for (name, y) in sourceY.sorted(by: { $0.key < $1.key }) {
            svg += box(x: left, y: y, w: boxW, h: boxH, fill: sourceFill, label: name)
        }
        for (name, y) in destY.sorted(by: { $0.key < $1.key }) {
            svg += box(x: right, y: y, w: boxW, h: boxH, fill: serviceFill, label: name)
        }
        svg += "</svg>\n"
        return """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>\(escape(title))</title>
            <style>body{margin:0;background:#fff}</style></head>
            <body>
            \(svg)</body></html>

            """
    }

    static func box(x: Double, y: Double, w: Double, h: Double, fill: String, label: String) -> String {
        """
        <rect x="\(x)" y="\(y)" width="\(w)" height="\(h)" rx="8" fill="\(fill)"/>
        <text x="\(x + w / 2)" y="\(y + h / 2 + 5)" text-anchor="middle" fill="#ffffff" font-weight="bold">\(escape(label))</text>

        """
    }
}
