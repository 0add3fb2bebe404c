import NIOCore
import NIOPosix
import Testing
import WeftCore
@testable import WeftProxy

/// The express paths count a new connection's first exchange in the series
/// its event loop last built a label set for, when it is labelled the same
/// (Express.LoopSeries): never when the client, the Service or any label of
/// the exchange differs.
@Suite struct LoopSeriesTests {
    @Test func aLoopsLastSeriesServesOnlyTheSameClientServiceAndLabels() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        let beA = IPv4Address(0x7f00_0001), beB = IPv4Address(0x7f00_0002)
        let exchanges: [(source: IPv4Address, service: String, status: Int, grpc: Bool)] = [
            (beA, "plain", 200, false), (beA, "plain", 200, false), (beA, "api", 200, false),
            (beB, "plain", 200, false), (beB, "plain", 200, false), (beB, "plain", 503, false),
            (beB, "plain", 200, true), (beA, "plain", 200, false),
        ]
        let eventLoop = rig.group.next()
        try eventLoop.submit {
            let loop = rig.proxy.loop(eventLoop)
            let snapshot = rig.proxy.snapshot
            for e in exchanges {
                // Each the first exchange of a new connection: no LastSeries of its own.
                var last: Express.LastSeries?
                let outcome = Express.Outcome(snapshot: snapshot, service: e.service, serviceNamespace: "fz",
                                              key: EndpointKey(ip: IPv4Address(0x7f00_0003), port: 8080, node: "n1"),
                                              route: "fz/r", grpc: e.grpc, status: e.status, flags: "-", start: .now(),
                                              bytesOut: 0, protocolName: "HTTP/1.1", logged: nil)
                Express.record(outcome, source: e.source, last: &last, loop: loop, proxy: rig.proxy)
                #expect(last != nil)
            }
        }.wait()
        let text = rig.proxy.telemetry.render(stats: rig.proxy.stats, generation: 1)
        let series = text.split(separator: "\n").filter { $0.hasPrefix("weft_requests_total{") }
        func count(_ source: String, _ service: String, code: Int, grpc: Bool = false) -> Int {
            series.filter {
                $0.contains("source_workload=\"\(source)\"") && $0.contains("destination_service=\"\(service).fz.svc\"")
                    && $0.contains("response_code=\"\(code)\"") && $0.contains("request_protocol=\"\(grpc ? "grpc" : "http")\"")
            }
            .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0) { $0 + Int($1) }
        }
        let all = series.joined(separator: "\n")
        #expect(count("be-a", "plain", code: 200) == 3, "\(all)")
        #expect(count("be-b", "plain", code: 200) == 2, "\(all)")
        #expect(count("be-a", "api", code: 200) == 1, "\(all)")
        #expect(count("be-b", "plain", code: 503) == 1, "\(all)")
        #expect(count("be-b", "plain", code: 200, grpc: true) == 1, "\(all)")
    }
}
