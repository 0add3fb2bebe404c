import NIOHPACK
import NIOHTTP1

/// MeshConfig `proxy.maxRequestHeaderSize`: a request head larger than it
/// is answered 431 Request Header Fields Too Large, with the reason in the
/// body, and goes to no backend (docs/proxy.md, "Request head size").
///
/// - HTTP/1.1, express path: the head as read, from the request line to
///   the blank line; a head not whole once that many bytes are read is
///   answered then. The connection closes after the answer (the rest of
///   the head is not read: the client's next request would start in it).
/// - HTTP/1.1, full path: the head NIO's decoder parsed, counted as it is
///   written (request line, each field and its CRLF, the blank line); the
///   connection goes on. Past twice the limit (a field, the fields
///   together, or a head still not whole once that much is read) the head
///   is not read on: the 431, and the connection closes (HTTP1ServerPipeline).
/// - HTTP/2: the header list as RFC 9113 sizes it (each field's name and
///   value and 32). The stream is answered 431 (and reset with NO_ERROR
///   if its body is still coming); the connection goes on. The codec
///   announces twice the limit as SETTINGS_MAX_HEADER_LIST_SIZE, and a
///   list, or a block in bytes, over that ends the connection (HTTP2Codec):
///   a client that heeds the setting fails a larger request itself, and
///   one between the limit and twice it gets the 431 and its reason.
enum HeadLimit {
    /// Why the head was refused, naming the setting.
    static func reason(_ limit: Int) -> String {
        let size = limit % 1024 == 0 ? "\(limit / 1024) KiB" : "\(limit) bytes"
        return "weft: the request head is larger than \(size) (MeshConfig spec.proxy.maxRequestHeaderSize)"
    }

    /// The 431 body.
    static func body(_ limit: Int) -> String { reason(limit) + "\n" }

    /// An HTTP/2 header list's size (RFC 9113, section 6.5.2).
    static func listSize(_ headers: HPACKHeaders) -> Int {
        var size = 0
        for (name, value, _) in headers { size += name.utf8.count + value.utf8.count + 32 }
        return size
    }

    /// An HTTP/1.1 head's size as written.
    static func size(_ head: HTTPRequestHead) -> Int {
        var size = head.method.rawValue.utf8.count + head.uri.utf8.count + "  HTTP/1.1\r\n\r\n".utf8.count
        for (name, value) in head.headers { size += name.utf8.count + value.utf8.count + ": \r\n".utf8.count }
        return size
    }
}
