import NIOCore
import NIOHTTP1
import NIOPosix

/// One active health check, as the agent runs it against a backend (and a
/// node proxy runs it against a pod of its node for another node's agent):
/// a TCP connect, or one HTTP/1.1 GET whose status is the result.
public enum HealthProbe {
    /// Succeeds with the HTTP status, or 0 for a TCP probe that connected;
    /// fails when the backend cannot be reached or does not answer in time.
    public static func run(on loop: any EventLoop, host: String, port: Int, path: String?,
                           timeout: TimeAmount) -> EventLoopFuture<Int> {
        let bootstrap = ClientBootstrap(group: loop).connectTimeout(timeout)
        guard let path else {
            return bootstrap.connect(literal: host, port: port).map { channel in
                channel.close(promise: nil)
                return 0
            }
        }
        return get(bootstrap.connect(literal: host, port: port), on: loop, path: path, host: "\(host):\(port)", timeout: timeout)
    }

    /// The same check run by this node's proxy through the mutual-TLS tunnel
    /// to `node`'s proxy, which runs it against its pod and judges the
    /// answer by the check in its own table. Succeeds when that proxy says
    /// the backend passed (with the status it saw, 0 for TCP); fails with
    /// its reason when it failed or cannot be reached, and with
    /// `ProbeFailed.unknown` when this node's proxy could not ask (not up,
    /// no certificate yet, a table that does not know the pod yet): that
    /// says nothing about the pod.
    public static func throughProxy(on loop: any EventLoop, socket: String, node: String, host: String, port: Int,
                                    path: String?, timeout: TimeAmount) -> EventLoopFuture<Int> {
        var query = "/probe?node=\(percentEncoded(node))&target=\(percentEncoded("\(host):\(port)"))"
        if let path { query += "&path=\(percentEncoded(path))" }
        let connected = ClientBootstrap(group: loop).connectTimeout(timeout).connect(unixDomainSocketPath: socket)
            .flatMapErrorThrowing { throw ProbeFailed(description: "the node proxy is not answering: \($0)", unknown: true) }
        // The far proxy applies the check's own timeout; the tunnel's
        // handshake and round trip come on top of it.
        return exchange(connected, on: loop, path: query, host: "proxy", timeout: timeout + .seconds(2)).flatMapThrowing { answer in
            switch answer.status {
            case 200: return Int(answer.probeStatus ?? "") ?? 0
            case 503: throw ProbeFailed(description: answer.body.isEmpty ? "HTTP 503" : answer.body, unknown: false)
            default: throw ProbeFailed(description: "the node proxy could not ask (\(answer.status)): \(answer.body)", unknown: true)
            }
        }
    }

    public struct ProbeFailed: Error, CustomStringConvertible {
        public var description: String
        /// The check could not be run: no verdict on the backend.
        public var unknown = false
    }

    private static func get(_ connected: EventLoopFuture<any Channel>, on loop: any EventLoop, path: String, host: String,
                            timeout: TimeAmount) -> EventLoopFuture<Int> {
        exchange(connected, on: loop, path: path, host: host, timeout: timeout).map(\.status)
    }

    private struct Answer {
        var status: Int
        var probeStatus: String?
        var body: String
    }

    /// One GET with `connection: close`; the answer's status, its
    /// `x-weft-probe-status` and its body (up to 4 KiB).
    private static func exchange(_ connected: EventLoopFuture<any Channel>, on loop: any EventLoop, path: String, host: String,
                                 timeout: TimeAmount) -> EventLoopFuture<Answer> {
        let answer = loop.makePromise(of: Answer.self)
        let deadline = loop.scheduleTask(in: timeout) { answer.fail(ChannelError.connectTimeout(timeout)) }
        connected.whenComplete { result in
            switch result {
            case .success(let channel):
                channel.eventLoop.execute {
                    do {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(AnswerReader(answer))
                    } catch {
                        answer.fail(error)
                        channel.close(promise: nil)
                        return
                    }
                    var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path)
                    head.headers.add(name: "host", value: host)
                    head.headers.add(name: "user-agent", value: "weft-health/1")
                    head.headers.add(name: "connection", value: "close")
                    channel.write(HTTPClientRequestPart.head(head), promise: nil)
                    channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                    answer.futureResult.whenComplete { _ in channel.close(promise: nil) }
                }
            case .failure(let error):
                answer.fail(error)
            }
        }
        answer.futureResult.whenComplete { _ in deadline.cancel() }
        return answer.futureResult
    }

    /// RFC 3986 unreserved characters stay; every other byte is %XX.
    public static func percentEncoded(_ s: String) -> String {
        var out = ""
        for c in s.utf8 {
            switch c {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "/"), UInt8(ascii: ":"):
                out.unicodeScalars.append(Unicode.Scalar(c))
            default:
                let hex = Array("0123456789ABCDEF".utf8)
                out += "%" + String(decoding: [hex[Int(c >> 4)], hex[Int(c & 0xF)]], as: UTF8.self)
            }
        }
        return out
    }

    /// The query of a request target as a dictionary (percent-decoded;
    /// nil when an escape is malformed).
    public static func query(_ uri: String) -> [String: String]? {
        guard let q = uri.split(separator: "?", maxSplits: 1).dropFirst().first else { return [:] }
        var out: [String: String] = [:]
        for pair in q.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let key = percentDecoded(kv[0]), let value = percentDecoded(kv.count > 1 ? kv[1] : "") else { return nil }
            out[key] = value
        }
        return out
    }

    static func percentDecoded(_ s: Substring) -> String? {
        var bytes: [UInt8] = []
        var it = s.utf8.makeIterator()
        while let c = it.next() {
            if c == UInt8(ascii: "%") {
                guard let h = it.next(), let l = it.next(), let hi = hexValue(h), let lo = hexValue(l) else { return nil }
                bytes.append(hi << 4 | lo)
            } else {
                bytes.append(c == UInt8(ascii: "+") ? UInt8(ascii: " ") : c)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// Reads one response into `promise`, which fails if the connection (or
    /// stream) ends or errs first; a promise already kept stays as it is.
    /// The probes' readers say what they make of the response.
    class PromisedAnswer<Value>: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<Value>

        init(_ promise: EventLoopPromise<Value>) { self.promise = promise }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

        func channelInactive(context: ChannelHandlerContext) {
            promise.fail(ChannelError.eof)
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            promise.fail(error)
            context.close(promise: nil)
        }
    }

    /// Takes the first response's status, `x-weft-probe-status` and body.
    private final class AnswerReader: PromisedAnswer<Answer> {
        private var answer: Answer?

        override func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                answer = Answer(status: Int(head.status.code), probeStatus: head.headers.first(name: "x-weft-probe-status"), body: "")
            case .body(var buffer):
                if let a = answer, a.body.utf8.count < 4096 {
                    answer?.body += buffer.readString(length: min(buffer.readableBytes, 4096 - a.body.utf8.count)) ?? ""
                }
            case .end:
                if var a = answer {
                    a.body = String(a.body.trimmingSuffix { $0 == "\n" })
                    promise.succeed(a)
                }
            }
        }
    }
}

private extension String {
    func trimmingSuffix(while drop: (Character) -> Bool) -> Substring {
        var s = self[...]
        while let last = s.last, drop(last) { s = s.dropLast() }
        return s
    }
}

extension ClientBootstrap {
    /// An address literal (what a probe's backend, a pod, a backend and a
    /// node always are) connected to as it is, with the bootstrap's connect
    /// timeout. NIO's `connect(host:port:)` takes even a literal through
    /// getaddrinfo on a dispatch queue and a Happy Eyeballs state machine:
    /// a hop to another thread and back per connect, which was about a
    /// quarter of the node proxy's CPU per new TLS-routed connection (390
    /// against 285 µs, `scripts/bench tls`). A host name still goes that way.
    public func connect(literal host: String, port: Int) -> EventLoopFuture<Channel> {
        guard let address = try? SocketAddress(ipAddress: host, port: port) else { return connect(host: host, port: port) }
        return connect(to: address)
    }
}
