import NIOCore
import NIOHTTP1

/// RequestMirror: a copy of a request sent to another Service, its response
/// read and dropped. Mirrors never delay, fail or change the real exchange.
final class MirrorExchange: UpstreamSink {
    private var upstream: UpstreamHandler?
    private var keepSelf: MirrorExchange?

    static func send(head: HTTPRequestHead, body: [ByteBuffer], to key: EndpointKey, pool: UpstreamPool) {
        let exchange = MirrorExchange()
        exchange.keepSelf = exchange
        var head = head
        if let host = head.headers.first(name: "host") { head.headers.replaceOrAdd(name: "host", value: host + "-shadow") }
        pool.acquire(key, protocol: .http1) { result in
            guard case .success(let upstream) = result else {
                exchange.keepSelf = nil
                return
            }
            exchange.upstream = upstream
            upstream.onResponseEnd = { [weak upstream] reusable in
                if let upstream { pool.release(upstream, to: key, reusable: reusable) }
            }
            upstream.begin(sink: exchange, keepAlive: true)
            upstream.send(.head(head), flush: false)
            for b in body { upstream.send(.body(.byteBuffer(b)), flush: false) }
            upstream.send(.end(nil), flush: true)
        }
    }

    func upstreamResponse(_ part: HTTPClientResponsePart) {
        if case .end = part { keepSelf = nil }
    }

    func upstreamFailed(_ error: any Error, responded: Bool) { keepSelf = nil }
    func upstreamWritabilityChanged(_ writable: Bool) {}
    func upstreamReadComplete() {}
}
