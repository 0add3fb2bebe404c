import Foundation
import Testing
@testable import WeftCore

struct TrafficViewTests {
    @Test func parsesTheTextFormatWithEscapesAndSpecialValues() {
        let text = """
            # HELP weft_requests_total x
            # TYPE weft_requests_total counter
            weft_requests_total{destination_service="a.ns.svc",route="r \\"q\\" \\\\ \\n",response_code="200"} 7
            weft_request_duration_seconds_bucket{le="+Inf"} +Inf
            plain 3.5 1700000000000
            broken{a="unterminated} 1
            """
        let s = MetricSamples.parse(text).samples
        #expect(s.count == 3)
        #expect(s[0] == .init(name: "weft_requests_total", labels: ["destination_service": "a.ns.svc", "route": "r \"q\" \\ \n", "response_code": "200"], value: 7))
        #expect(s[1].value == .infinity && s[1].labels["le"] == "+Inf")
        #expect(s[2] == .init(name: "plain", labels: [:], value: 3.5))
    }

    @Test func quantilesInterpolateLikePrometheus() {
        // 100 observations: 50 under 10 ms, 40 more under 100 ms, 10 more under 1 s.
        let b: [(le: Double, count: Double)] = [(0.01, 50), (0.1, 90), (1, 100), (.infinity, 100)]
        #expect(TrafficView.quantile(0.5, b) == 0.01)
        #expect(abs((TrafficView.quantile(0.7, b) ?? 0) - 0.055) < 1e-9)
        #expect(abs((TrafficView.quantile(0.99, b) ?? 0) - 0.91) < 1e-9)
        #expect(TrafficView.quantile(0.99, [(0.1, 0), (.infinity, 5)]) == 0.1, "+Inf answers the highest finite bound")
        #expect(TrafficView.quantile(0.5, [(0.1, 0), (.infinity, 0)]) == nil)
    }

    private func sample(_ name: String, _ labels: [String: String], _ v: Double) -> MetricSamples.Sample {
        .init(name: name, labels: labels, value: v)
    }

    @Test func servicesAndEdgesAreDeltasBetweenScrapes() {
        let ok = ["source_workload": "c", "source_workload_namespace": "ns", "destination_service": "web.ns.svc", "response_code": "200"]
        var bad = ok
        bad["response_code"] = "503"
        var nf = ok
        nf["response_code"] = "404"
        let before = MetricSamples([sample("weft_requests_total", ok, 10), sample("weft_requests_total", bad, 1)])
        let after = MetricSamples([sample("weft_requests_total", ok, 40), sample("weft_requests_total", bad, 6),
                                   sample("weft_requests_total", nf, 4),
                                   sample("weft_tcp_connections_opened_total", ok, 3),
                                   sample("weft_tcp_connections_closed_total", ok, 1)])
        let rows = TrafficView.services(before: before, after: after, seconds: 2)
        #expect(rows.count == 1)
        #expect(rows[0].requests == 39 && rows[0].rps == 19.5)
        #expect(abs((rows[0].successRate ?? 0) - 34.0 / 39) < 1e-9, "only 5xx fail")
        #expect(rows[0].tcpOpen == 2)
        let edges = TrafficView.edges(before: nil, after: after, seconds: nil)
        #expect(edges == [.init(source: "ns/c", destination: "web.ns.svc", requests: 50, failures: 6, rps: nil, tcpConnections: 3)])
        // A counter that went down (the proxy restarted) counts from zero.
        let reset = TrafficView.services(before: after, after: MetricSamples([sample("weft_requests_total", ok, 5)]), seconds: 1)
        #expect(reset.first?.requests == 5)
    }

    /// The kernel's counters make edges to the Service ports it serves
    /// alone: not for connections it captured to the node proxy (the
    /// proxy reports those), nor to a pod's own address (no Service).
    @Test func kernelCountedConnectionsAndUDPExchangesMakeEdges() {
        func l4(_ name: String, service: String, workload: String, _ v: Double) -> MetricSamples.Sample {
            sample(name, ["source_workload": "c", "source_workload_namespace": "ns", "destination_service": service,
                          "destination_workload": workload], v)
        }
        let after = MetricSamples([
            l4("weft_l4_connections_opened_total", service: "db.ns.svc", workload: "db", 6),
            l4("weft_l4_connections_failed_total", service: "db.ns.svc", workload: "db", 1),
            l4("weft_l4_connections_failed_total", service: "gone.ns.svc", workload: "none", 3),
            l4("weft_l4_udp_exchanges_opened_total", service: "dns.ns.svc", workload: "dns", 40),
            l4("weft_l4_udp_exchanges_failed_total", service: "dns.ns.svc", workload: "none", 1),
            l4("weft_l4_connections_opened_total", service: "web.ns.svc", workload: "node-proxy", 9),
            l4("weft_l4_connections_opened_total", service: "unknown", workload: "db", 5),
        ])
        let before = MetricSamples([l4("weft_l4_udp_exchanges_opened_total", service: "dns.ns.svc", workload: "dns", 10)])
        let edges = TrafficView.edges(before: before, after: after, seconds: 1)
        #expect(edges.map(\.destination) == ["db.ns.svc", "dns.ns.svc", "gone.ns.svc"], "\(edges)")
        #expect(edges[0].tcpConnections == 6 && edges[0].connectionFailures == 1 && edges[0].requests == 0 && edges[0].successRate == nil)
        #expect(edges[1].udpExchanges == 30 && edges[1].connectionFailures == 1)
        #expect(edges[2].connectionFailures == 3 && edges[2].connectionSuccessRate == 0)
        let html = TopologyPage.html(edges, title: "t")
        #expect(html.contains("6 tcp, 1 failed") && html.contains("30 udp, 1 failed"), "\(html)")
        #expect(html.components(separatedBy: "stroke=\"\(TopologyPage.failingEdge)\"").count == 3, "db (1 of 7) and gone fail, dns (1 of 31) not")
        #expect(TopologyPage.text(edges).contains("ns/c    ->  gone.ns.svc  0         -        0.0  0    0    3"), "\(TopologyPage.text(edges))")
        // weft top: the kernel-only Service's connections open now (6
        // opened, 4 of them closed); the captured ones are the proxy's.
        let top = TrafficView.services(before: nil, after: MetricSamples(after.samples + [
            l4("weft_l4_connections_closed_total", service: "db.ns.svc", workload: "db", 4),
            l4("weft_l4_connections_closed_total", service: "web.ns.svc", workload: "node-proxy", 2),
        ]), seconds: nil)
        #expect(top.first { $0.service == "db.ns.svc" }?.tcpOpen == 2 && !top.contains { $0.service == "web.ns.svc" }, "\(top)")
    }

    /// gRPC calls fail by their status, as Linkerd counts them: a 200 whose
    /// grpc_response_status is not 0 (the proxy's own answers to a call are
    /// 200s too); an OK call, or a 404 to plain HTTP, does not.
    @Test func grpcCallsFailByTheirStatus() {
        let base = ["source_workload": "c", "source_workload_namespace": "ns", "destination_service": "rpc.ns.svc",
                    "response_code": "200", "request_protocol": "grpc"]
        func with(_ status: String, code: String = "200") -> [String: String] {
            var l = base
            l["grpc_response_status"] = status
            l["response_code"] = code
            return l
        }
        let after = MetricSamples([sample("weft_requests_total", with("0"), 6), sample("weft_requests_total", with("14"), 2),
                                   sample("weft_requests_total", with("5"), 1), sample("weft_requests_total", with("4"), 1),
                                   sample("weft_requests_total", with("", code: "404"), 2)])
        let rows = TrafficView.services(before: nil, after: after, seconds: nil)
        #expect(rows.first?.requests == 12)
        #expect(abs((rows.first?.successRate ?? 0) - 8.0 / 12) < 1e-9, "\(rows)")
        #expect(TrafficView.edges(before: nil, after: after, seconds: nil).first?.failures == 4)
    }

    @Test func thePageEscapesNamesAndColoursFailingEdges() {
        let edges = [TrafficView.Edge(source: "ns/<script>", destination: "a.ns.svc", requests: 10, failures: 5, rps: nil, tcpConnections: 0)]
        let html = TopologyPage.html(edges, title: "t & t")
        #expect(html.contains("ns/&lt;script&gt;") && !html.contains("<script>"))
        #expect(html.contains("t &amp; t"))
        #expect(html.contains("stroke=\"\(TopologyPage.failingEdge)\""))
        #expect(TopologyPage.text([]).hasPrefix("no traffic"))
    }
}
