import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOPosix
import Prometheus
import Testing
@testable import WeftCore
@testable import WeftProxy
import WeftStatus

@Suite struct ProtocolDetectionTests {
    private func classify(_ s: String) -> ProtocolDetector.Verdict {
        ProtocolDetector.classify(ByteBuffer(string: s).readableBytesView)
    }

    @Test func requestLinesPrefacesAndOpaqueBytes() {
        #expect(classify("GET / HTTP/1.1\r\n") == .http1)
        #expect(classify("DELETE /x") == .http1)
        #expect(classify("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == .http2)
        #expect(classify("PRI * HTTP/2.0\r\n") == .undecided, "a preface prefix waits for more")
        #expect(classify("GE") == .undecided)
        #expect(classify("\u{16}\u{03}\u{01}") == .tcp, "TLS ClientHello is opaque")
        #expect(classify("SSH-2.0-OpenSSH") == .tcp)
        #expect(classify(" GET") == .tcp)
        #expect(classify("ABCDEFGHIJKLMNOPQRSTUVWXYZ") == .tcp, "no method is that long")
    }
}

@Suite struct HeaderRulesTests {
    @Test func hopByHopHeadersAndThoseNamedInConnectionAreStripped() {
        var rng = SystemRandomNumberGenerator()
        var h = HTTPHeaders([("connection", "keep-alive, x-secret"), ("x-secret", "1"), ("keep-alive", "5"),
                             ("transfer-encoding", "chunked"), ("te", "trailers"), ("x-keep", "yes"),
                             ("upgrade", "websocket")])
        HTTPProxyHandler.prepareUpstreamHeaders(&h, client: IPv4Address("198.18.1.10")!, via: "weft-n1", keepUpgrade: false, random: &rng)
        #expect(h["x-secret"].isEmpty && h["keep-alive"].isEmpty && h["transfer-encoding"].isEmpty)
        #expect(h["connection"].isEmpty && h["upgrade"].isEmpty)
        #expect(h["te"] == ["trailers"], "gRPC's te: trailers survives")
        #expect(h["x-keep"] == ["yes"])
        #expect(h["x-forwarded-for"] == ["198.18.1.10"])
        #expect(h["via"] == ["1.1 weft-n1"])
        #expect(h["x-request-id"].first?.count == 36)
    }

    @Test func hopByHopStrippingIgnoresCaseAndSpacing() {
        // The common response: one Connection header, removed by name.
        var one = HTTPHeaders([("Content-Type", "text/plain"), ("CONNECTION", "Keep-Alive"), ("Content-Length", "3")])
        HTTPProxyHandler.stripHopByHop(&one, keepUpgrade: false)
        #expect(one.map(\.name) == ["Content-Type", "Content-Length"])
        // Several hop-by-hop names, and a header named in Connection with
        // odd case and optional whitespace around the tokens.
        var many = HTTPHeaders([("Connection", "close,\t X-Secret ,"), ("x-SECRET", "1"), ("Keep-Alive", "5"),
                                ("X-Secretive", "kept"), ("Proxy-Connection", "keep-alive"), ("x-keep", "yes")])
        HTTPProxyHandler.stripHopByHop(&many, keepUpgrade: false)
        #expect(many.map(\.name) == ["X-Secretive", "x-keep"])
        var none = HTTPHeaders([("x-a", "1")])
        HTTPProxyHandler.stripHopByHop(&none, keepUpgrade: false)
        #expect(none.map(\.name) == ["x-a"])
        #expect("Content-LENGTH".asciiCaseInsensitiveEquals("content-length"))
        #expect(!"content-lengt".asciiCaseInsensitiveEquals("content-length"))
        #expect(!"a@".asciiCaseInsensitiveEquals("a`"), "only letters fold")
    }

    @Test func forwardedForAppendsAndUpgradeIsKeptWhenAsked() {
        var rng = SystemRandomNumberGenerator()
        var h = HTTPHeaders([("x-forwarded-for", "10.0.0.1"), ("connection", "Upgrade"), ("upgrade", "websocket"),
                             ("x-request-id", "given")])
        HTTPProxyHandler.prepareUpstreamHeaders(&h, client: IPv4Address("198.18.1.10")!, via: "weft-n1", keepUpgrade: true, random: &rng)
        #expect(h["x-forwarded-for"] == ["10.0.0.1, 198.18.1.10"])
        #expect(h["upgrade"] == ["websocket"] && h["connection"] == ["upgrade"])
        #expect(h["x-request-id"] == ["given"])
    }

    @Test func requestIDsAreUUIDv4Shaped() {
        var rng = LoopRandom()
        let ids = Set((0..<100).map { _ in HTTPProxyHandler.requestID(using: &rng) })
        #expect(ids.count == 100)
        for id in ids {
            let parts = id.split(separator: "-")
            #expect(parts.map(\.count) == [8, 4, 4, 4, 12])
            #expect(parts[2].first == "4")
        }
    }

    @Test func requestTargetsSplitIntoPathAndQuery() {
        for (target, path, query) in [("/a?b=c", "/a", "b=c" as String?), ("/", "/", nil), ("/x?", "/x", ""),
                                      ("http://svc.ns:8080/y?z=1&w", "/y", "z=1&w"), ("http://svc", "http://svc", nil),
                                      ("/caf\u{e9}/\u{1F600}?q=\u{fc}", "/caf\u{e9}/\u{1F600}", "q=\u{fc}"), ("/a?b?c", "/a", "b?c")] {
            let (p, q) = HTTPProxyHandler.splitTarget(target)
            #expect(String(p) == path, "\(target)")
            #expect(q.map(String.init) == query, "\(target)")
        }
    }

    @Test func theExpressPathsHeadersAndTheIdsItKeepsForTheLog() throws {
        let loop = EmbeddedEventLoop()
        let configuration = ProxyConfiguration(node: "n1", listenAddress: IPv4Address("198.18.1.1")!, pinDirectory: "/nonexistent",
                                               runDirectory: "/nonexistent")
        let state = LoopState(pool: UpstreamPool(eventLoop: loop, configuration: configuration), counters: ProxyStats().makeLoopCounters())
        let fixed = Express.ConnectionHeaders(client: "198.18.1.10", via: "weft-n1")
        for (hasProto, hasID) in [(false, false), (true, true), (false, true)] {
            var out = ByteBuffer()
            let (id, span) = Express.writeProxyHeaders(&out, fixed, hasProto: hasProto, hasRequestID: hasID, keep: true, loop: state)
            let text = out.readString(length: out.readableBytes) ?? ""
            var lines = text.components(separatedBy: "\r\n")
            #expect(lines.suffix(2) == ["", ""], "the head ends: \(text.debugDescription)")
            lines.removeLast(2)
            let expected = ["x-forwarded-for: 198.18.1.10"] + (hasProto ? [] : ["x-forwarded-proto: http"])
                + ["forwarded: for=198.18.1.10;proto=http", "via: 1.1 weft-n1"]
                + (hasID ? [] : ["x-request-id: \(id ?? "?")"]) + ["traceparent: \(span?.header ?? "?")"]
            #expect(lines == expected)
            #expect(hasID == (id == nil) && (id.map { $0.split(separator: "-").map(\.count) == [8, 4, 4, 4, 12] } ?? true))
            #expect(span.map { TraceContext.parse($0.header) != nil && $0.sampled } == true)
            var quiet = ByteBuffer()
            let none = Express.writeProxyHeaders(&quiet, fixed, hasProto: hasProto, hasRequestID: hasID, keep: false, loop: state)
            #expect(none.requestID == nil && none.span == nil && quiet.readableBytes == text.utf8.count)
        }
        try loop.syncShutdownGracefully()
    }

    @Test func headScratchWritesOverItsStorageOnlyOnceNothingElseHoldsIt() {
        var scratch = LoopState.Scratch()
        // (Told apart by capacity: kept storage keeps the 4 KiB it was
        // first given; new storage has the few bytes asked for.)
        /// A head written and handed on, as the express paths do; `held`
        /// keeps a copy, as NIO's pending write does until it is out.
        func head(_ text: String, asking: Int = 16, held: inout [ByteBuffer]) -> Int {
            var buffer = scratch.take(capacity: asking)
            buffer.writeString(text)
            held.append(buffer)
            scratch.giveBack(buffer)
            return buffer.capacity
        }
        var pending: [ByteBuffer] = []
        #expect(head("first head", asking: 4096, held: &pending) >= 4096)
        // The first is not written out yet: the second gets storage of its
        // own, and the first's bytes stay as they were.
        #expect(head("second head", held: &pending) < 4096)
        #expect(pending.map { String(buffer: $0) } == ["first head", "second head"])
        // Written out: the next head is written over the kept storage.
        pending.removeAll()
        #expect(head("third", asking: 4096, held: &pending) >= 4096)
        pending.removeAll()
        #expect(head("fourth", held: &pending) >= 4096)
        pending.removeAll()
        // Storage grown past the limit is not kept.
        #expect(head("fifth", asking: LoopState.Scratch.largest + 1, held: &pending) > LoopState.Scratch.largest)
        pending.removeAll()
        #expect(head("sixth", held: &pending) < 4096)
    }

    @Test func idsWrittenInPlaceAreTheSameAsTheirStrings() {
        // Known bits, known text: the express paths write these straight into the request.
        var out = ByteBuffer()
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: 36) {
            HTTPProxyHandler.writeRequestID(0x0123_4567_89ab_4def, 0x8edc_ba98_7654_3210, into: $0)
        }
        #expect(out.readString(length: out.readableBytes) == "01234567-89ab-4def-8edc-ba9876543210")
        out.clear()
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: 55) {
            TraceContext.write(trace: (0x4bf9_2f35_77b3_4da6, 0x0a3c_e929_d0e0_4736), traceText: nil, span: 0x00f0_67aa_0ba9_02b7,
                               flags: 1, into: $0)
        }
        #expect(out.readString(length: out.readableBytes) == "00-4bf92f3577b34da60a3ce929d0e04736-00f067aa0ba902b7-01")
        // The String forms come from the same writers: one draw each way agrees.
        var a = LoopRandom(), b = a
        let (hi, lo) = HTTPProxyHandler.requestIDBits(using: &b)
        let text = HTTPProxyHandler.requestID(using: &a)
        out.clear()
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: 36) { HTTPProxyHandler.writeRequestID(hi, lo, into: $0) }
        #expect(out.readString(length: out.readableBytes) == text)
        var c = LoopRandom(), d = c
        let span = TraceContext.fresh(random: &c, samplingPercent: nil)
        let ids = TraceContext.freshIDs(random: &d)
        #expect(span.header == TraceContext.header(trace: ids.trace, traceText: nil, span: ids.span, flags: 1))
        #expect(TraceContext.parse(span.header) != nil)
    }
}

@Suite struct RetryBudgetTests {
    @Test func retriesAreCappedAtTwentyPercentPlusTenASecond() {
        var budget = RetryBudget()
        var granted = 0
        // 1,000 requests in one second, each wanting a retry.
        for _ in 0..<1000 {
            budget.recordRequest(now: 100)
            if budget.withdraw(now: 100) { granted += 1 }
        }
        // 0.2 x 1000 + 10/s x 10 s window.
        #expect(granted >= 290 && granted <= 300, "\(granted)")
    }

    @Test func theWindowSlides() {
        var budget = RetryBudget()
        for _ in 0..<1000 { budget.recordRequest(now: 0); _ = budget.withdraw(now: 0) }
        let spent = budget.withdraw(now: 5)
        #expect(!spent, "spent within the window")
        let refilled = budget.withdraw(now: 11)
        #expect(refilled, "the old second has left the window")
    }
}

@Suite struct TelemetryTests {
    @Test func traceparentKeepsTheTraceAndStartsANewSpan() {
        var rng = SystemRandomNumberGenerator()
        var h = HTTPHeaders([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("tracestate", "a=1")])
        let span = TraceContext.propagate(&h, random: &rng)
        #expect(span.traceID == "4bf92f3577b34da6a3ce929d0e0e4736" && span.parentID == "00f067aa0ba902b7")
        #expect(h.first(name: "traceparent") == "00-4bf92f3577b34da6a3ce929d0e0e4736-\(span.spanID)-01")
        #expect(span.spanID.count == 16 && span.spanID != "00f067aa0ba902b7")
        #expect(h.first(name: "tracestate") == "a=1")
    }

    @Test func invalidOrMissingTraceparentStartsATrace() {
        var rng = SystemRandomNumberGenerator()
        for bad in [nil, "00-00000000000000000000000000000000-00f067aa0ba902b7-01",   // zero trace id
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",      // zero parent
                    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",      // upper case
                    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",      // version ff
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",    // v00 with more
                    "00-4bf92f35-00f067aa0ba902b7-01", "garbage"] {
            var h = HTTPHeaders(bad.map { [("traceparent", $0), ("tracestate", "a=1")] } ?? [])
            let span = TraceContext.propagate(&h, random: &rng)
            #expect(span.parentID == nil, "\(String(describing: bad))")
            let parts = (h.first(name: "traceparent") ?? "").split(separator: "-")
            #expect(parts.count == 4 && parts[1] == span.traceID && parts[1].count == 32 && parts[2] == span.spanID && parts[3] == "01")
            #expect(TraceContext.parse(h.first(name: "traceparent") ?? "") != nil)
            #expect(h[canonicalForm: "tracestate"].isEmpty, "tracestate goes with an invalid parent")
        }
        // A later version with extra fields is accepted (the spec's forward compatibility).
        #expect(TraceContext.parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra") != nil)
    }

    @Test func samplingDecidesNewTracesAndKeepsTheCallers() {
        var rng = SystemRandomNumberGenerator()
        var none = HTTPHeaders()
        #expect(!TraceContext.propagate(&none, random: &rng, samplingPercent: 0).sampled)
        #expect(none.first(name: "traceparent")?.hasSuffix("-00") == true)
        var all = HTTPHeaders()
        #expect(TraceContext.propagate(&all, random: &rng, samplingPercent: 100).sampled)
        var sampled = 0
        for _ in 0..<2000 {
            var h = HTTPHeaders()
            if TraceContext.propagate(&h, random: &rng, samplingPercent: 25).sampled { sampled += 1 }
        }
        #expect((400...600).contains(sampled), "25% of 2,000: \(sampled)")
        var caller = HTTPHeaders([("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")])
        #expect(!TraceContext.propagate(&caller, random: &rng, samplingPercent: 100).sampled, "the caller said no")
        #expect(caller.first(name: "traceparent")?.hasSuffix("-00") == true)
    }

    @Test func labelValuesPastTheCapBecomeOverflow() {
        let cap = LabelCap(limit: 3)
        #expect((1...3).map { cap.admit("port", "\($0)") } == ["1", "2", "3"])
        #expect((4...60_000).allSatisfy { cap.admit("port", "\($0)") == LabelCap.overflow })
        #expect(cap.admit("port", "2") == "2", "values already seen keep their series")
        #expect(cap.admit("other", "x") == "x", "each label has its own cap")
    }

    @Test func aScanOfManyValuesKeepsTheSeriesBounded() {
        let telemetry = ProxyTelemetry(labelLimit: 10)
        var loop = LoopTelemetry()
        let snapshot = RouteSnapshot(ProxyTable())
        for code in 100..<1000 {
            let peers = PeerLabels(snapshot: snapshot, source: IPv4Address(0x0A00_0001), service: nil, serviceNamespace: nil, upstream: nil)
            loop.request(RequestLabels(peers: peers, route: "r\(code)", requestProtocol: "http", responseCode: code, responseFlags: "-"),
                         telemetry).count.increment()
        }
        let text = telemetry.render(stats: ProxyStats(), generation: 1)
        let series = text.split(separator: "\n").filter { $0.hasPrefix("weft_requests_total{") }
        #expect(series.count == 11, "10 codes, then one overflow series")
        #expect(series.contains { $0.contains("response_code=\"overflow\"") && $0.hasSuffix(" 890") })
    }

    /// Durations recorded by two loops (each in its own LoopDurations) read
    /// as if one swift-prometheus histogram had recorded them all, label
    /// escapes included.
    @Test func theLoopsDurationHistogramsAddUp() {
        let telemetry = ProxyTelemetry(labelLimit: 100, loops: 2)
        let reference = PrometheusCollectorRegistry()
        var loops = [LoopTelemetry(), LoopTelemetry()]
        loops[1].shard = 1
        let snapshot = RouteSnapshot(ProxyTable())
        var rng = SystemRandomNumberGenerator()
        for i in 0..<2_000 {
            let peers = PeerLabels(snapshot: snapshot, source: IPv4Address(0x0A00_0001), service: nil, serviceNamespace: nil, upstream: nil)
            // Route names with a quote, a backslash and a line break; some series on one loop only.
            let route = ["a", "b\"q\\", "c\nd", "only-one"][i % 4]
            let labels = RequestLabels(peers: peers, route: route, requestProtocol: "http", responseCode: 200 + i % 3, responseFlags: "-")
            // Some exactly on a bucket's bound (counted in it), most anywhere.
            let nanos = i % 25 == 0 ? LoopDurations.bounds[(i / 25) % LoopDurations.bounds.count]
                : Int64.random(in: 1_000...40_000_000_000, using: &rng)
            let loop = route == "only-one" ? 1 : (i / 4) % 2
            loops[loop].request(labels, telemetry).duration.record(nanoseconds: nanos)
            reference.makeDurationHistogram(
                descriptor: .init(namespace: "weft", metricName: "request_duration", unitName: "seconds",
                                  helpText: "Time from a request's head to the end of its response, as the node proxy saw it."),
                labels: telemetry.requestLabelPairs(labels), buckets: ProxyTelemetry.buckets).record(.nanoseconds(nanos))
        }
        func samples(_ text: String) -> [String: Double] {
            var out: [String: Double] = [:]
            for line in text.split(separator: "\n") where line.hasPrefix("weft_request_duration_seconds") {
                guard let space = line.lastIndex(of: " ") else { continue }
                #expect(out[String(line[..<space])] == nil, "one line per series: \(line)")
                out[String(line[..<space])] = Double(line[line.index(after: space)...])
            }
            #expect(text.components(separatedBy: "# TYPE weft_request_duration_seconds histogram").count == 2)
            #expect(text.components(separatedBy: "# HELP weft_request_duration_seconds Time from").count == 2)
            return out
        }
        let merged = samples(telemetry.render(stats: ProxyStats(), generation: 1))
        let wanted = samples(reference.emitToString())
        #expect(wanted.count == 12 * 18, "12 label sets: 15 buckets, +Inf, sum and count each")
        #expect(Set(merged.keys) == Set(wanted.keys))
        for (key, value) in wanted {
            let got = merged[key] ?? -1
            #expect(abs(got - value) <= 1e-6 * max(1, abs(value)), "\(key): \(got) vs \(value)")
        }
        #expect(wanted.keys.contains { $0.contains("route=\"b\\\"q\\\\\"") }, "escaped as swift-prometheus does")
    }

    /// grpc_response_status as Envoy reports it for Istio: the status the
    /// backend sent, else the HTTP status as gRPC's clients map it.
    @Test func grpcResponseStatusIsTheSentOneOrTheMappedHTTPStatus() {
        #expect(GRPCStatus.reported("0", httpCode: 200) == "0" && GRPCStatus.reported("14", httpCode: 200) == "14")
        #expect(GRPCStatus.reported("7", httpCode: 503) == "7", "a sent status wins over the HTTP status")
        #expect(GRPCStatus.reported("abc", httpCode: 200) == "2" && GRPCStatus.reported("12345", httpCode: 200) == "2",
                "a status that is not one is UNKNOWN")
        let mapped = [200, 400, 401, 403, 404, 429, 500, 502, 503, 504].map { GRPCStatus.reported(nil, httpCode: $0) }
        #expect(mapped == ["2", "13", "16", "7", "12", "14", "2", "14", "14", "14"])
        #expect(GRPCStatus.reported(nil, httpCode: 0) == "", "no response: no status")
        #expect(GRPCStatus.reported(nil, httpCode: 200, web: true) == "" && GRPCStatus.reported(nil, httpCode: 503, web: true) == "14",
                "gRPC-Web's trailers are in its body")
        let telemetry = ProxyTelemetry(labelLimit: 10)
        let peers = PeerLabels(snapshot: RouteSnapshot(ProxyTable()), source: IPv4Address(0x0A00_0001), service: nil,
                               serviceNamespace: nil, upstream: nil)
        let pairs = telemetry.requestLabelPairs(RequestLabels(peers: peers, route: "-", requestProtocol: "grpc", responseCode: 200,
                                                              responseFlags: "-", grpcResponseStatus: "14"))
        #expect(pairs.contains { $0 == ("grpc_response_status", "14") })
        var line = HTTPLogLine(start: timespec(), protocolName: "HTTP/2", method: "POST", path: "/a.B/C", authority: nil, code: 200,
                               flags: "-", elapsedNanos: 0, bytesIn: 0, bytesOut: 0, attempts: 1, route: "-",
                               source: IPv4Address(0x0A00_0001), peers: peers, upstream: nil, requestID: nil, span: nil, userAgent: nil,
                               grpcStatus: "14")
        #expect(line.render().contains("\"grpc_status\":\"14\""))
        line.grpcStatus = nil
        #expect(!line.render().contains("grpc_status"), "plain HTTP has no gRPC status")
    }

    @Test func accessLogLinesAreJSONWithEscapes() throws {
        var line = JSONLine()
        line.add("path", "/a\"b\\c\n\u{1}é")
        line.add("code", 200)
        line.add("missing", nil as String?)
        line.add("ms", milliseconds: 1.5)
        let text = line.finish()
        let object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(object["path"] as? String == "/a\"b\\c\n\u{1}é")
        #expect(object["code"] as? Int == 200 && object["missing"] == nil && object["ms"] as? Double == 1.5)
    }
}

@Suite struct ProbeQueryTests {
    @Test func probeQueriesSurviveEncodingAndBadEscapesAreRefused() {
        let path = "/health z?a=1&b=%/ü"
        let uri = "/probe?node=n2&target=\(HealthProbe.percentEncoded("198.18.2.20:8080"))&path=\(HealthProbe.percentEncoded(path))"
        #expect(!uri.dropFirst("/probe?".count).contains(" ") && uri.split(separator: "&").count == 3)
        let q = HealthProbe.query(uri)
        #expect(q == ["node": "n2", "target": "198.18.2.20:8080", "path": path])
        #expect(HealthProbe.query("/probe?path=%G1") == nil)
        #expect(HealthProbe.query("/probe?path=%4") == nil)
        #expect(HealthProbe.query("/probe") == [:])
    }
}

@Suite struct LoopPinningTests {
    @Test func eachLoopIsBoundToOneCPUInOrderRoundAgain() throws {
        let allowed = try LoopPinning.allowedCPUs()
        #expect(!allowed.isEmpty && allowed == allowed.sorted())
        // One more loop than CPUs: the last goes round to the first CPU.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: allowed.count + 1)
        defer { try? group.syncShutdownGracefully() }
        let loops = Array(group.makeIterator())
        let chosen = try LoopPinning.pin(loops, to: allowed)
        #expect(chosen == allowed + [allowed[0]])
        for (loop, cpu) in zip(loops, chosen) {
            #expect(try loop.submit { try LoopPinning.allowedCPUs() }.wait() == [cpu])
        }
        // The caller's thread is left as it was.
        #expect(try LoopPinning.allowedCPUs() == allowed)
        // A CPU the thread may not use is refused by name.
        let other = try #require(loops.first)
        #expect(throws: LoopPinning.Failure.self) { try LoopPinning.pin([other], to: [Int32(4096)]) }
    }
}
