import Foundation
import NIOCore
import NIOHTTP1
import Testing
@testable import WeftCore
@testable import WeftProxy

/// A gRPC call's `grpc_response_status` (and access log `grpc_status`)
/// wherever its status comes: the response head (trailers-only), HTTP/1.1
/// chunked trailers, or a gRPC-Web body's trailer frame (binary, or base64
/// in grpc-web-text), on the express paths (HTTP/1.1 and h2c clients)
/// and the full path alike; GRPCStatusReader on its own, fed a byte at a
/// time.
@Suite(.serialized) struct GRPCStatusTests {
    /// A gRPC(-Web) frame: flag byte, 32-bit length, payload.
    static func frame(_ flags: UInt8, _ payload: [UInt8]) -> [UInt8] {
        let n = UInt32(payload.count)
        return [flags, UInt8(n >> 24), UInt8((n >> 16) & 0xFF), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)] + payload
    }

    static func webBody(status: String) -> [UInt8] {
        frame(0, Array("hello".utf8)) + frame(0x80, Array("grpc-status: \(status)\r\ngrpc-message: done\r\n".utf8))
    }

    /// What the rig's HTTP/1.1 backend answers a request for
    /// `/grpc/KIND/STATUS`: `web` a gRPC-Web body with its length, `web-
    /// chunked` the same chunked in three writes cut mid-frame, `text`
    /// grpc-web-text (each frame encoded apart: padding mid-body), `only`
    /// trailers-only (the status in the head), `trailers` application/grpc
    /// with the status in chunked trailers, `none` gRPC-Web without a
    /// trailer frame, `unavailable` a 503 with no status.
    static func answer(_ uri: String) -> [HTTPServerResponsePart] {
        let parts = uri.split(separator: "/")
        let kind = parts.count > 1 ? String(parts[1]) : "", status = parts.count > 2 ? String(parts[2]) : "0"
        var headers = HTTPHeaders()
        var body: [[UInt8]] = []
        var trailers: HTTPHeaders?
        var code = HTTPResponseStatus.ok
        switch kind {
        case "web", "web-chunked":
            headers.add(name: "content-type", value: "application/grpc-web+proto")
            let whole = webBody(status: status)
            if kind == "web" {
                headers.add(name: "content-length", value: "\(whole.count)")
                body = [whole]
            } else {
                body = [Array(whole[0..<3]), Array(whole[3..<14]), Array(whole[14...])]
            }
        case "text":
            headers.add(name: "content-type", value: "application/grpc-web-text+proto")
            let text = Data(frame(0, Array("hello!".utf8))).base64EncodedString()
                + Data(frame(0x80, Array("GRPC-Status:\t\(status) \r\n".utf8))).base64EncodedString()
            #expect(text.dropLast(2).contains("="), "padding mid-body")
            let bytes = Array(text.utf8)
            body = [Array(bytes[0..<5]), Array(bytes[5..<17]), Array(bytes[17...])]
        case "only":
            headers.add(name: "content-type", value: "application/grpc-web+proto")
            headers.add(name: "grpc-status", value: status)
            headers.add(name: "content-length", value: "0")
        case "trailers":
            headers.add(name: "content-type", value: "application/grpc")
            body = [frame(0, Array("hi".utf8))]
            trailers = HTTPHeaders([("grpc-status", status), ("grpc-message", "x")])
        case "none":
            headers.add(name: "content-type", value: "application/grpc-web+proto")
            let data = frame(0, Array("hello".utf8))
            headers.add(name: "content-length", value: "\(data.count)")
            body = [data]
        default:
            code = .serviceUnavailable
            headers.add(name: "content-length", value: "0")
        }
        return [.head(HTTPResponseHead(version: .http1_1, status: code, headers: headers))]
            + body.map { .body(.byteBuffer(ByteBuffer(bytes: $0))) } + [.end(trailers)]
    }

    /// Each kind, the status it sends and the grpc_response_status wanted.
    static let calls: [(kind: String, status: String, label: String, web: Bool)] = [
        ("web", "3", "3", true), ("web-chunked", "4", "4", true), ("text", "5", "5", true), ("only", "7", "7", true),
        ("trailers", "9", "9", false), ("none", "0", "", true), ("unavailable", "0", "14", true),
    ]

    /// curl (HTTP/1.1, or h2c with prior knowledge) to the rig's listener
    /// `port`: the status code.
    static func curl(port: Int, path: String, web: Bool, http2: Bool) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        process.arguments = ["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                             http2 ? "--http2-prior-knowledge" : "--http1.1",
                             "-H", "content-type: \(web ? "application/grpc-web+proto" : "application/grpc")",
                             "--data-binary", "x", "http://127.0.0.1:\(port)\(path)"]
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        process.waitUntilExit()
        return String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    }

    @Test func everyWayAStatusComesIsCounted() throws {
        let rig = try ProxyFuzzTests.Rig()
        defer { rig.shutdown() }
        // `plain` has no route (the express paths), `api`'s default rule
        // has filters, a timeout and a retry (the full path).
        for (port, http2) in [(rig.port(2), false), (rig.port(2), true), (rig.port(0), false), (rig.port(0), true)] {
            for call in Self.calls {
                let code = try Self.curl(port: port, path: "/grpc/\(call.kind)/\(call.status)", web: call.web, http2: http2)
                #expect(code == (call.kind == "unavailable" ? "503" : "200"), "\(call.kind), http2 \(http2)")
            }
        }
        let text = rig.proxy.telemetry.render(stats: rig.proxy.stats, generation: 1)
        let series = text.split(separator: "\n").filter { $0.hasPrefix("weft_requests_total{") }
        func count(_ service: String, _ label: String) -> Int {
            series.filter { $0.contains("destination_service=\"\(service).fz.svc\"") && $0.contains("request_protocol=\"grpc\"")
                && $0.contains("grpc_response_status=\"\(label)\"") }
                .compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }.reduce(0) { $0 + Int($1) }
        }
        for call in Self.calls {
            // HTTP/1.1 and h2c each: express (plain) and full path (api).
            #expect(count("plain", call.label) == 2, "express, \(call.kind): \(series.joined(separator: "\n"))")
            #expect(count("api", call.label) == 2, "full path, \(call.kind)")
        }
    }

    /// The outlier detector hears a gRPC call's status on the express
    /// paths as on the full path: UNAVAILABLE (14) in a gRPC-Web trailer
    /// frame or chunked trailers is a server error, and two in a row from
    /// a pod eject it; OK (0) is a success. Before, the express paths told
    /// the detector the 200 head, a success, whatever status followed.
    @Test func aStatusInTheTrailersIsTheOutlierDetectorsOutcome() throws {
        let policy = ProxyFuzzTests.trafficPolicy(
            "plain", "outlierDetection: {consecutive5xx: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}")
        for (kind, web) in [("web", true), ("web-chunked", true), ("text", true), ("trailers", false)] {
            for http2 in [false, true] {
                let rig = try ProxyFuzzTests.Rig(manifests: policy)
                defer { rig.shutdown() }
                let runtime = try #require(rig.proxy.snapshot.runtimes.values.first { $0.outliers != nil })
                let detector = try #require(runtime.outliers)
                for _ in 0..<6 {
                    #expect(try Self.curl(port: rig.port(2), path: "/grpc/\(kind)/0", web: web, http2: http2) == "200")
                }
                #expect(detector.ejectionsTotal.load(ordering: .relaxed) == 0, "\(kind), http2 \(http2): OK is no failure")
                // Both pods, two UNAVAILABLEs each (least request spreads them).
                for _ in 0..<8 {
                    _ = try Self.curl(port: rig.port(2), path: "/grpc/\(kind)/14", web: web, http2: http2)
                }
                #expect(detector.ejectionsTotal.load(ordering: .relaxed) >= 1, "\(kind), http2 \(http2): UNAVAILABLE ejects")
            }
        }
    }

    @Test func theReaderFindsTheStatusHoweverTheBytesAreCut() {
        func read(_ source: GRPCStatusReader.Source, _ bytes: [UInt8], trailer: Bool = false, cut: Int) -> String? {
            var reader = GRPCStatusReader(source)
            var i = 0
            while i < bytes.count {
                let piece = Array(bytes[i..<min(bytes.count, i + cut)])
                piece.withUnsafeBytes { trailer ? reader.trailer($0) : reader.body($0) }
                i += cut
            }
            return reader.status
        }
        let web = Self.webBody(status: "14")
        let text = Array((Data(Self.frame(0, [1, 2, 3, 4])).base64EncodedString()
                          + Data(Self.frame(0x80, Array("grpc-message: m\r\ngrpc-status:  8  \r\n".utf8))).base64EncodedString()).utf8)
        // (Padding mid-body, and a piece that ends with it.)
        let ends = Array((Data(Self.frame(0x80, Array("grpc-status: 61".utf8))).base64EncodedString()).utf8)
        #expect(ends.last == UInt8(ascii: "="))
        #expect(read(.webText, ends, cut: ends.count) == "61")
        for cut in [1, 2, 3, 5, 7, 64] {
            #expect(read(.web, web, cut: cut) == "14", "cut \(cut)")
            #expect(read(.webText, text, cut: cut) == "8", "cut \(cut)")
            #expect(read(.trailerLines, Array("x-a: 1\r\nGrpc-Status: 2\r\n".utf8), trailer: true, cut: cut) == "2")
        }
        #expect(read(.web, Self.frame(0, [9, 9]), cut: 3) == nil, "no trailer frame")
        #expect(read(.web, Self.frame(0x80, Array("grpc-message: x\r\n".utf8)), cut: 3) == nil, "no status in it")
        #expect(read(.web, web + Self.frame(0x80, Array("grpc-status: 1\r\n".utf8)), cut: 9) == nil, "two trailer frames")
        #expect(read(.web, Self.frame(0x80, Array(repeating: 0x61, count: 5_000)), cut: 999) == nil, "over the limit")
        #expect(read(.webText, Array("AAAA*AAA".utf8), cut: 3) == nil, "not base64")
        #expect(read(.trailerLines, web, cut: 4) == nil && read(.web, web, trailer: true, cut: 4) == nil,
                "each source reads what it is fed for")
        #expect(GRPCStatusReader.reading(contentType: "application/grpc") == nil)
        // Noise, and valid bodies mangled, cut at random: no crash, and a
        // status only from a trailer block (at most the limit).
        var rng = LoopRandom(seed: 0x6E5)
        for i in 0..<3_000 {
            var bytes = i % 2 == 0 ? web : text
            for _ in 0..<FuzzInput.int(0...4, &rng) where !bytes.isEmpty {
                bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
            }
            if i % 3 == 0 { bytes = (0..<FuzzInput.int(0...300, &rng)).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
            let source = FuzzInput.pick([GRPCStatusReader.Source.web, .webText, .trailerLines], &rng)
            let status = read(source, bytes, trailer: source == .trailerLines, cut: FuzzInput.int(1...40, &rng))
            #expect((status?.utf8.count ?? 0) <= GRPCStatusReader.limit)
        }
        #expect(GRPCStatusReader.field("grpc-status", in: Array("grpc-statusx: 1\r\ngrpc-status:0".utf8)) == "0")
    }
}
