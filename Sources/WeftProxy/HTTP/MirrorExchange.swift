import NIOCore
import NIOHTTP1

/// RequestMirror: a copy of a request sent to another Service, its response
/// read and dropped. Mirrors never delay, fail or change the real exchange.
/// A copy lasts `limit` at most (the route's request timeout, or else
/// MeshConfig proxy.streamIdleTimeout, as a whole): nobody waits on its
/// answer, so a mirror backend that never gives one would otherwise hold
/// a connection (and this object) for every copy sent to it, for good.
final class MirrorExchange: UpstreamSink {
    private var upstream: UpstreamHandler?
    private var keepSelf: MirrorExchange?
    private var timer: Scheduled<Void>?

    /// A copy to a pod on another node goes through the mutual-TLS tunnel
    /// to that node (`tunnel`), as the request itself would: a stream of
    /// the source pod's, judged by the destination's policy.
    static func send(head: HTTPRequestHead, body: [ByteBuffer], to key: EndpointKey, tunnel: TunnelChoice?, pool: UpstreamPool,
                     limit: TimeAmount?, on loop: any EventLoop) {
        let exchange = MirrorExchange()
        exchange.keepSelf = exchange
        var head = head
        if let host = head.headers.first(name: "host") { head.headers.replaceOrAdd(name: "host", value: host + "-shadow") }
        if let limit {
            exchange.timer = loop.assumeIsolated().scheduleTask(in: limit) { exchange.abandon() }
        }
        pool.acquire(key, protocol: .http1, tunnel: tunnel) { result in
            guard case .success(let upstream) = result, exchange.keepSelf != nil else {
                if case .success(let upstream) = result { upstream.close() }
                exchange.done()
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

    /// Over: the timer stopped, the cycle that kept it alive broken.
    private func done() {
        timer?.cancel()
        timer = nil
        upstream = nil
        keepSelf = nil
    }

    /// The limit passed with no answer: its connection closed.
    private func abandon() {
        timer = nil
        upstream?.close()
        done()
    }

    func upstreamResponse(_ part: HTTPClientResponsePart) {
        if case .end = part { done() }
    }

    func upstreamFailed(_ error: any Error, responded: Bool) { done() }
    func upstreamWritabilityChanged(_ writable: Bool) {}
    func upstreamReadComplete() {}
}
