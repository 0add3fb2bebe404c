import ArgumentParser
import Foundation
import WeftCore
import WeftStatus

/// One scrape of every asked-for node's agent (its /metrics carries the
/// proxy's series too), as one set of samples.
private func scrape(_ node: String?) throws -> (MetricSamples, [String]) {
    var all = MetricSamples()
    var reached: [String] = []
    var failures: [String] = []
    for n in try nodes(node) {
        do {
            let text = try UnixHTTP.get(socket: "/run/weft/\(n)/agent.sock", path: "/metrics")
            all.samples += MetricSamples.parse(text).samples
            reached.append(n)
        } catch {
            failures.append("\(n): \(error)")
        }
    }
    guard !reached.isEmpty else {
        throw ValidationError("no agent answered: " + failures.joined(separator: "; "))
    }
    return (all, reached)
}

private func milliseconds(_ s: Double?) -> String { s.map { String(format: "%.1f ms", $0 * 1000) } ?? "-" }

private func percent(_ r: Double?) -> String { r.map { String(format: "%.1f%%", $0 * 100) } ?? "-" }

private func jsonText<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

struct TopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "top",
        abstract: "Live per-Service request rate, success rate, p50/p99 and TCP connections, from the agents' /metrics.")

    @Option(help: "Node to read (default: every node on this machine).") var node: String?
    @Option(help: "Seconds between the two scrapes each figure is taken over.") var interval = 2.0
    @Flag(help: "Print one table (over one interval) and exit.") var once = false
    @Option(name: .shortAndLong, help: "Output: table or json (json implies --once).") var output = "table"

    func validate() throws {
        guard (0.1...3600).contains(interval) else { throw ValidationError("--interval must be 0.1-3600 seconds") }
        guard ["table", "json"].contains(output) else { throw ValidationError("--output must be table or json") }
    }

    func run() throws {
        var (before, _) = try scrape(node)
        var last = Date()
        while true {
            usleep(useconds_t(interval * 1_000_000))
            let (after, reached) = try scrape(node)
            let now = Date()
            let rows = TrafficView.services(before: before, after: after, seconds: now.timeIntervalSince(last))
            if output == "json" {
                print(try jsonText(rows))
                return
            }
            var lines = [["SERVICE", "RPS", "SUCCESS", "P50", "P99", "TCP"]]
            for r in rows {
                lines.append([r.service, String(format: "%.1f", r.rps ?? 0), percent(r.successRate),
                              milliseconds(r.p50Seconds), milliseconds(r.p99Seconds), String(Int(r.tcpOpen))])
            }
            if !once { print("\u{1B}[H\u{1B}[2J", terminator: "") }
            print("weft top — \(reached.joined(separator: ", ")) — over the last \(String(format: "%.1f", now.timeIntervalSince(last))) s")
            print(rows.isEmpty ? "no requests through the node proxies yet" : table(lines))
            if once { return }
            before = after
            last = now
        }
    }
}

struct GraphCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "graph",
        abstract: "The service topology seen from traffic: who calls which Service, how often and how well.")

    @Option(help: "Node to read (default: every node on this machine).") var node: String?
    @Option(help: "Take two scrapes this many seconds apart and show rates (default: totals since the proxies started).") var interval: Double?
    @Option(help: "Also write a standalone HTML page (inline SVG) to this file.") var html: String?
    @Option(name: .shortAndLong, help: "Output: text or json.") var output = "text"

    func validate() throws {
        if let interval, !(0.1...3600).contains(interval) { throw ValidationError("--interval must be 0.1-3600 seconds") }
        guard ["text", "json"].contains(output) else { throw ValidationError("--output must be text or json") }
    }

    func run() throws {
        var before: MetricSamples?
        if let interval {
            before = try scrape(node).0
            usleep(useconds_t(interval * 1_000_000))
        }
        let (after, reached) = try scrape(node)
        let edges = TrafficView.edges(before: before, after: after, seconds: interval)
        if let html {
            let title = "Weft service topology (\(reached.joined(separator: ", ")))"
            do {
                try TopologyPage.html(edges, title: title).write(toFile: html, atomically: true, encoding: .utf8)
            } catch {
                throw ValidationError("cannot write \(html): \(error.localizedDescription)")
            }
        }
        print(output == "json" ? try jsonText(edges) : TopologyPage.text(edges), terminator: output == "json" ? "\n" : "")
    }
}
