import Foundation
import Testing
@testable import WeftCore
@testable import WeftProxy

/// A gRPC call the proxy answers itself gets a gRPC status with the reason
/// as its message (GRPCLocalAnswer), on the express paths and the full
/// path, to HTTP/1.1 and h2c clients, gRPC and gRPC-Web; a plain HTTP
/// request still gets the HTTP status and a text body.
@Suite(.serialized) struct GRPCLocalAnswerTests {
    /// curl's view of one POST: every header and trailer line it printed
    /// (lowercased names), and the body. (No body sent: an answer given
    /// before a body comes is followed by RST_STREAM NO_ERROR on HTTP/2, as
    /// RFC 9113 8.1 allows, and curl, still sending, may call that an error
    /// and drop the head from its dump.)
    static func call(port: Int, path: String = "/weft.Echo/Say", contentType: String?, http2: Bool) throws -> (lines: [String], body: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        process.arguments = ["-sS", "-D", "/dev/stderr", "--max-time", "5", http2 ? "--http2-prior-knowledge" : "--http1.1",
                             "-X", "POST", "-H", "content-length: 0", "http://127.0.0.1:\(port)\(path)"]
            + (contentType.map { ["-H", "content-type: \($0)"] } ?? [])
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let body = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let head = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        let lines = head.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).map { line -> String in
            guard let colon = line.firstIndex(of: ":") else { return String(line) }
            return line[..<colon].lowercased() + line[colon...]
        }
        return (lines, body)
    }

    static func field(_ name: String, _ lines: [String]) -> String? {
        lines.first { $0.hasPrefix(name + ": ") }.map { String($0.dropFirst(name.count + 2)) }
    }

    @Test func theProxysOwnAnswersToGRPCCallsAreGRPCStatuses() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: [
            ProxyFuzzTests.trafficPolicy("plain", "faultInjection: {abort: {httpStatus: 503, percentage: 100}}"),
            ProxyFuzzTests.trafficPolicy("api", "faultInjection: {abort: {httpStatus: 403, percentage: 100}}"),
            ProxyFuzzTests.trafficPolicy("stall-full", "timeout: {http: {requestTimeout: 300ms}}"),
        ].joined(separator: "\n---\n"))
        defer { rig.shutdown() }
        let stallFull = try #require(rig.stallListeners.last?.localAddress?.port)
        // (port, path, what the proxy answers, the gRPC status wanted, a word of its message)
        let cases: [(String, Int, String, String, String)] = [
            ("express, fault abort 503", rig.port(2), "/weft.Echo/Say", "14", "fault"),
            ("full path, fault abort 403", rig.port(0), "/weft.Echo/Say", "7", "fault"),
            ("full path, request timeout", stallFull, "/silent", "4", "300ms"),
        ]
        for (what, port, path, status, word) in cases {
            for http2 in [false, true] {
                for type in ["application/grpc", "application/grpc+proto", "application/grpc-web+proto", "application/grpc-web-text"] {
                    let (lines, body) = try Self.call(port: port, path: path, contentType: type, http2: http2)
                    let context = "\(what), \(type), http2 \(http2): \(lines) \(body)"
                    #expect(lines.first?.hasPrefix(http2 ? "HTTP/2 200" : "HTTP/1.1 200") == true, "\(context)")
                    #expect(Self.field("content-type", lines) == type, "\(context)")
                    #expect(Self.field("grpc-status", lines) == status, "\(context)")
                    let message = Self.field("grpc-message", lines) ?? ""
                    #expect(message.hasPrefix("weft") && message.contains(word) && !message.contains("\n"), "\(context)")
                    #expect(body.isEmpty, "\(context)")
                    // Where the status is: the head (trailers-only) but to an
                    // HTTP/2 gRPC client on the full path, in trailers there
                    // (after an empty line that ends the head).
                    let blank = lines.firstIndex { $0.isEmpty || $0 == "\r" } ?? lines.count
                    let statusLine = lines.firstIndex { $0.hasPrefix("grpc-status: ") } ?? 0
                    let inTrailers = http2 && port != rig.port(2) && !type.hasPrefix("application/grpc-web")
                    #expect((statusLine > blank) == inTrailers, "\(context)")
                }
            }
            // Not a gRPC call: the HTTP status and its text.
            let (lines, body) = try Self.call(port: port, path: path, contentType: nil, http2: false)
            #expect(lines.first?.hasPrefix("HTTP/1.1 200") == false && Self.field("grpc-status", lines) == nil && body.hasPrefix("weft"),
                    "\(what), plain HTTP: \(lines) \(body)")
        }
        // Counted as sent: a 200 whose gRPC status is the proxy's.
        let text = rig.proxy.telemetry.render(stats: rig.proxy.stats, generation: 1)
        let series = text.split(separator: "\n").filter { $0.hasPrefix("weft_requests_total{") && $0.contains("request_protocol=\"grpc\"") }
        for (service, status, n) in [("plain", "14", 8), ("api", "7", 8), ("stall-full", "4", 8)] {
            let counted = series.filter { $0.contains("destination_service=\"\(service).fz.svc\"") && $0.contains("response_code=\"200\"")
                && $0.contains("grpc_response_status=\"\(status)\"") }
                .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0) { $0 + Int($1) }
            #expect(counted == n, "\(service): \(series.joined(separator: "\n"))")
        }
    }

    /// The express paths' answers in place of a backend's (here MeshConfig
    /// streamIdleTimeout's, a 504) are gRPC statuses to a gRPC call too.
    @Test func theExpressPathsAnswersInPlaceOfABackendAreGRPCStatuses() throws {
        let rig = try ProxyFuzzTests.Rig(table: { $0.streamIdleTimeoutMilliseconds = 300 })
        defer { rig.shutdown() }
        let stall = try #require(rig.stallListeners.first?.localAddress?.port)
        for http2 in [false, true] {
            for type in ["application/grpc", "application/grpc-web+proto"] {
                let (lines, body) = try Self.call(port: stall, path: "/silent", contentType: type, http2: http2)
                let context = "\(type), http2 \(http2): \(lines) \(body)"
                #expect(lines.first?.hasPrefix(http2 ? "HTTP/2 200" : "HTTP/1.1 200") == true, "\(context)")
                #expect(Self.field("content-type", lines) == GRPCLocalAnswer.expressType(web: type.contains("web")), "\(context)")
                #expect(Self.field("grpc-status", lines) == "4", "\(context)")
                #expect(Self.field("grpc-message", lines)?.hasPrefix("weft: nothing moved") == true && body.isEmpty, "\(context)")
            }
            let (lines, body) = try Self.call(port: stall, path: "/silent", contentType: nil, http2: http2)
            #expect(lines.first?.contains(" 504") == true && body.hasPrefix("weft: nothing moved"), "plain HTTP: \(lines) \(body)")
        }
        let proxy = rig.proxy
        let express = Array(rig.group.makeIterator()).reduce(0) { $0 + proxy.loop($1).counters.answered.load(ordering: .relaxed) }
        #expect(express == 6, "all answered on the express paths")
    }

    /// A fault abort's grpcStatus (Envoy Gateway's): a gRPC call gets that
    /// status on both paths, a plain request the HTTP status it maps to.
    @Test func aFaultAbortsGRPCStatusIsTheCallsStatus() throws {
        let rig = try ProxyFuzzTests.Rig(manifests: [
            ProxyFuzzTests.trafficPolicy("plain", "faultInjection: {abort: {grpcStatus: 8, percentage: 100}}"),
            ProxyFuzzTests.trafficPolicy("api", "faultInjection: {abort: {grpcStatus: 16, percentage: 100}}"),
        ].joined(separator: "\n---\n"))
        defer { rig.shutdown() }
        for (port, grpc, http) in [(rig.port(2), "8", "429"), (rig.port(0), "16", "401")] {
            for http2 in [false, true] {
                for type in ["application/grpc", "application/grpc-web-text"] {
                    let (lines, _) = try Self.call(port: port, contentType: type, http2: http2)
                    #expect(lines.first?.contains(" 200") == true && Self.field("grpc-status", lines) == grpc
                            && Self.field("grpc-message", lines)?.contains("fault injected") == true, "\(port) \(type) \(http2): \(lines)")
                }
                let (lines, body) = try Self.call(port: port, contentType: nil, http2: http2)
                #expect(lines.first?.contains(" \(http)") == true && body.contains("fault injected"), "plain: \(lines) \(body)")
            }
        }
    }

    @Test func statusesAndMessages() {
        let expected: [(Int, String)] = [(400, "13"), (401, "16"), (403, "7"), (404, "12"), (429, "14"), (502, "14"), (503, "14"),
                                         (504, "4"), (500, "2"), (431, "2"), (508, "2")]
        for (code, status) in expected {
            #expect(GRPCLocalAnswer.fields(httpCode: code, body: "x\n").first?.1 == status, "\(code)")
        }
        #expect(GRPCLocalAnswer.fields(httpCode: 503, body: "weft: 100% é\tgone\r\n").last?.1 == "weft: 100%25 %C3%A9%09gone")
        #expect(GRPCLocalAnswer.contentType("application/grpc", status: 301) == nil, "not an error: as it is")
        #expect(GRPCLocalAnswer.contentType("application/json", status: 503) == nil)
        #expect(GRPCLocalAnswer.contentType(nil, status: 503) == nil)
        #expect(GRPCLocalAnswer.contentType("application/grpc-web-text+proto", status: 503) == "application/grpc-web-text+proto")
    }
}
