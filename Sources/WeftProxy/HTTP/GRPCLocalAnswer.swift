import NIOHPACK

/// A gRPC call the proxy answers itself (no backend ready, a timeout, a
/// circuit breaker or rate limit, a fault abort, a refusal by policy): as
/// Envoy and Linkerd answer one, with a gRPC status and the reason as its
/// message, in an HTTP 200, rather than an HTTP error page that a gRPC
/// library can only report as UNAVAILABLE or UNKNOWN with the reason lost.
/// The status is the HTTP status's as gRPC's clients map one
/// (doc/http-grpc-status-mapping.md: 400 INTERNAL, 401 UNAUTHENTICATED, 403
/// PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503 UNAVAILABLE, any other
/// UNKNOWN), but a 504, the proxy's own timeouts, is DEADLINE_EXCEEDED, as
/// Linkerd's and Envoy's router answer a timed-out call (UNAVAILABLE would
/// tell the client to try again).
enum GRPCLocalAnswer {
    /// The content-type of a request answered so, if `status` is an error
    /// and the request a gRPC or gRPC-Web call; nil for any other.
    static func contentType(_ requestType: String?, status: Int) -> String? {
        guard status >= 400, let requestType, requestType.hasPrefix("application/grpc") else { return nil }
        return requestType
    }

    /// Whether the status goes in the response head (trailers-only, with
    /// END_STREAM on it) rather than in trailers: always for gRPC-Web,
    /// whose clients read no trailers but the body's, and over HTTP/1.1.
    static func inHead(_ type: String, http2: Bool) -> Bool {
        !http2 || type.hasPrefix("application/grpc-web")
    }

    static func status(httpCode: Int) -> Int {
        httpCode == 504 ? 4 : Int(GRPCStatus.reported(nil, httpCode: httpCode)) ?? 2
    }

    /// grpc-status and grpc-message for the proxy's answer `body` with
    /// `httpCode` (or `grpcStatus`, one a fault abort names): the message is the body's text without its line end,
    /// percent-encoded as gRPC's PROTOCOL-HTTP2 asks (every byte outside
    /// 0x20-0x7E, and '%').
    static func fields(httpCode: Int, body: String, grpcStatus: Int? = nil) -> [(String, String)] {
        var message = ""
        for byte in body.utf8.reversed().drop(while: { $0 == 0x0A || $0 == 0x0D }).reversed() {
            if byte >= 0x20 && byte <= 0x7E && byte != 0x25 {
                message.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                message += "%" + (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
            }
        }
        return [("grpc-status", String(grpcStatus ?? status(httpCode: httpCode))), ("grpc-message", message)]
    }

    /// The head of such an answer on an HTTP/1.1 connection, up to its
    /// last field (the caller adds its own and the blank line).
    static func http1Head(contentType: String, httpCode: Int, body: String, grpcStatus: Int? = nil) -> String {
        var head = "HTTP/1.1 200 OK\r\ncontent-type: \(contentType)\r\n"
        for (name, value) in fields(httpCode: httpCode, body: body, grpcStatus: grpcStatus) { head += "\(name): \(value)\r\n" }
        return head + "content-length: 0\r\n"
    }

    /// The head of such an answer on an HTTP/2 stream, trailers-only
    /// (the caller sends it with END_STREAM); `extra` after the proxy's own.
    static func http2Head(contentType: String, httpCode: Int, body: String, grpcStatus: Int? = nil,
                          extra: [(String, String)] = []) -> HPACKHeaders {
        HPACKHeaders([(":status", "200"), ("content-type", contentType)]
                     + fields(httpCode: httpCode, body: body, grpcStatus: grpcStatus) + [("server", "weft")] + extra)
    }

    /// The content-type of the express paths' answer to a call they know
    /// only by flags (gRPC, gRPC-Web).
    static func expressType(web: Bool) -> String { web ? "application/grpc-web" : "application/grpc" }
}
