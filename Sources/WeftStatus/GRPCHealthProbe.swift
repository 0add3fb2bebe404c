import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOPosix

/// The gRPC Health Checking Protocol as a probe: one unary call of
/// `grpc.health.v1.Health/Check` over h2c (prior knowledge, as gRPC servers
/// speak cleartext), the way Kubernetes' gRPC probe and Envoy's gRPC health
/// checker ask. The messages are two protobuf fields, written and read here
/// without a protobuf library: the request's `string service = 1`, the
/// answer's `ServingStatus status = 1` (a varint).
extension HealthProbe {
    /// `HealthCheckResponse.ServingStatus` values.
    public enum ServingStatus {
        public static let serving = 1

        public static func name(_ value: Int) -> String {
            switch value {
            case 0: "UNKNOWN"
            case 1: "SERVING"
            case 2: "NOT_SERVING"
            case 3: "SERVICE_UNKNOWN"
            default: "status \(value)"
            }
        }
    }

    /// Succeeds with the serving status the server reports for `service`
    /// ("" for the server as a whole); fails when it cannot be reached,
    /// does not answer within `timeout`, or ends the call with a gRPC error
    /// (a server without the health service answers UNIMPLEMENTED).
    public static func grpc(on loop: any EventLoop, host: String, port: Int, service: String,
                            timeout: TimeAmount) -> EventLoopFuture<Int> {
        let answer = loop.makePromise(of: Int.self)
        let deadline = loop.scheduleTask(in: timeout) { answer.fail(ChannelError.connectTimeout(timeout)) }
        answer.futureResult.whenComplete { _ in deadline.cancel() }
        ClientBootstrap(group: loop).connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
                        mode: .client, connectionConfiguration: .init(), streamConfiguration: .init()
                    ) { stream in stream.close() }
                }
            }
            .connect(literal: host, port: port)
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    answer.fail(error)
                case .success(let channel):
                    answer.futureResult.whenComplete { _ in channel.close(promise: nil) }
                    channel.eventLoop.execute {
                        call(on: channel, authority: "\(host):\(port)", service: service, answer: answer)
                    }
                }
            }
        return answer.futureResult
    }

    private static func call(on channel: any Channel, authority: String, service: String, answer: EventLoopPromise<Int>) {
        let multiplexer: NIOHTTP2Handler.StreamMultiplexer
        do {
            multiplexer = try channel.pipeline.syncOperations.handler(type: NIOHTTP2Handler.self).syncMultiplexer()
        } catch {
            return answer.fail(error)
        }
        multiplexer.createStreamChannel { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.pipeline.syncOperations.addHandler(HTTP2FramePayloadToHTTP1ClientCodec(httpProtocol: .http))
                try stream.pipeline.syncOperations.addHandler(CallReader(answer))
            }
        }
        .whenComplete { result in
            switch result {
            case .failure(let error):
                answer.fail(error)
            case .success(let stream):
                var head = HTTPRequestHead(version: .http2, method: .POST, uri: "/grpc.health.v1.Health/Check")
                head.headers.add(name: "host", value: authority)
                head.headers.add(name: "content-type", value: "application/grpc")
                head.headers.add(name: "te", value: "trailers")
                head.headers.add(name: "user-agent", value: "weft-health/1")
                stream.write(HTTPClientRequestPart.head(head), promise: nil)
                stream.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: request(service)))), promise: nil)
                stream.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            }
        }
    }

    /// A length-prefixed gRPC message holding `HealthCheckRequest{service}`.
    static func request(_ service: String) -> [UInt8] {
        var message: [UInt8] = []
        if !service.isEmpty {
            message.append(0x0A)  // field 1, length-delimited
            appendVarint(&message, UInt64(service.utf8.count))
            message += service.utf8
        }
        var framed: [UInt8] = [0]  // not compressed
        let n = UInt32(message.count)
        framed += [UInt8(n >> 24), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)]
        return framed + message
    }

    private static func appendVarint(_ out: inout [UInt8], _ value: UInt64) {
        var v = value
        while v >= 0x80 {
            out.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    /// The serving status in a length-prefixed `HealthCheckResponse`
    /// (UNKNOWN, 0, when the field is absent, as protobuf defaults it);
    /// nil when the bytes are not one such message.
    static func servingStatus(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 5, bytes[0] == 0 else { return nil }  // (a compressed answer is not asked for)
        let length = Int(bytes[1]) << 24 | Int(bytes[2]) << 16 | Int(bytes[3]) << 8 | Int(bytes[4])
        guard bytes.count == 5 + length else { return nil }
        var i = 5, status = 0
        func varint() -> UInt64? {
            var value: UInt64 = 0, shift: UInt64 = 0
            while i < bytes.count, shift < 64 {
                let b = bytes[i]
                i += 1
                value |= UInt64(b & 0x7F) << shift
                if b & 0x80 == 0 { return value }
                shift += 7
            }
            return nil
        }
        while i < bytes.count {
            guard let key = varint() else { return nil }
            switch key & 7 {
            case 0:
                guard let v = varint() else { return nil }
                if key >> 3 == 1 { status = Int(truncatingIfNeeded: v) }
            case 1: i += 8
            case 2:
                guard let n = varint(), n <= UInt64(bytes.count - i) else { return nil }
                i += Int(n)
            case 5: i += 4
            default: return nil
            }
            guard i <= bytes.count else { return nil }
        }
        return status
    }

    public struct GRPCCallFailed: Error, CustomStringConvertible {
        public var description: String
    }

    /// Reads the call's answer: its status (HTTP, then gRPC's, in the head
    /// of a trailers-only answer or in the trailers) and its message.
    private final class CallReader: PromisedAnswer<Int> {
        private var body: [UInt8] = []
        private var grpcStatus: String?
        private var grpcMessage: String?

        override func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                guard head.status == .ok else {
                    return promise.fail(GRPCCallFailed(description: "HTTP \(head.status.code)"))
                }
                take(head.headers)
            case .body(let buffer):
                if body.count < 4096 { body += buffer.readableBytesView.prefix(4096 - body.count) }
            case .end(let trailers):
                if let trailers { take(trailers) }
                guard let status = grpcStatus else {
                    return promise.fail(GRPCCallFailed(description: "no grpc-status in the answer"))
                }
                guard status == "0" else {
                    let detail = grpcMessage.map { ": \($0)" } ?? ""
                    return promise.fail(GRPCCallFailed(description: "grpc-status \(status)\(detail)"))
                }
                guard let serving = HealthProbe.servingStatus(body) else {
                    return promise.fail(GRPCCallFailed(description: "the answer is not a HealthCheckResponse"))
                }
                promise.succeed(serving)
            }
        }

        private func take(_ headers: HTTPHeaders) {
            if let s = headers.first(name: "grpc-status") { grpcStatus = s }
            if let m = headers.first(name: "grpc-message") { grpcMessage = String(m.prefix(200)) }
        }
    }
}
