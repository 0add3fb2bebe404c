import Testing
@testable import WeftCore

private func workload(_ name: String, _ annotation: String?) -> String {
    """
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: \(name), namespace: shop\(annotation.map { ", annotations: {weft.dev/socket-shortcut: \"\($0)\"}" } ?? "")}
    spec: {node: n1, address: 198.18.1.\(10 + name.count)}
    """
}

private func parse(_ text: String) -> (ClusterState?, [String]) { buildState(text, file: "m.yaml") }

struct MeshConfigTests {
    @Test func receiversFollowPodReceiversAndTheAnnotation() throws {
        let pods = [workload("a", "receive"), workload("bb", nil), workload("ccc", "off")].joined(separator: "\n---\n")
        func receivers(_ mesh: String?) throws -> [String] {
            let (state, errors) = parse(pods + (mesh.map { "\n---\n" + $0 } ?? ""))
            let s = try #require(state, "\(errors)")
            return s.workloads.filter { s.meshConfig.receives($0) }.map(\.metadata.name).sorted()
        }
        // No MeshConfig: on, annotated pods only.
        #expect(try receivers(nil) == ["a"])
        let (defaults, _) = parse(pods)
        #expect(defaults?.meshConfig.socketShortcut.enabled == true)
        #expect(defaults?.meshConfig.socketShortcut.splice == true)
        let noSplice = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {socketShortcut: {splice: false}}"
        #expect(parse(pods + "\n---\n" + noSplice).0?.meshConfig.socketShortcut.splice == false)
        let all = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {socketShortcut: {podReceivers: All}}"
        #expect(try receivers(all) == ["a", "bb"])          // "off" always wins
        let none = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {socketShortcut: {enabled: false, podReceivers: None}}"
        #expect(try receivers(none) == [])
        #expect(parse(pods + "\n---\n" + none).0?.meshConfig.socketShortcut.enabled == false)
    }

    @Test func badMeshConfigsAreRejectedWithFileDocumentAndField() {
        let header = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        let cases: [(String, String)] = [
            (header + "spec: {socketShortcut: {podReceivers: Some}}", "m.yaml:1:spec.socketShortcut.podReceivers: must be one of Annotated, All, None"),
            (header + "spec: {socketShortcut: {enabled: maybe}}", "m.yaml:1:spec.socketShortcut.enabled: expected true or false"),
            (header + "spec: {socketShortcut: {splice: 1}}", "m.yaml:1:spec.socketShortcut.splice: expected true or false"),
            (header + "spec: {socketShortcut: {turbo: true}}", "m.yaml:1:spec.socketShortcut.turbo: unknown field"),
            (header + "spec: {}\n---\n" + header.replacingOccurrences(of: "mesh", with: "other") + "spec: {}",
             "m.yaml:2:metadata.name: a cluster has one MeshConfig; another is defined at m.yaml:1"),
            (header + "spec: {accessLog: {namespaces: [Shop]}}", "m.yaml:1:spec.accessLog.namespaces[0]: \"Shop\" is not a namespace name"),
            (header + "spec: {accessLog: {namespaces: shop}}", "m.yaml:1:spec.accessLog.namespaces: expected a list"),
            (header + "spec: {accessLog: {enabled: 1}}", "m.yaml:1:spec.accessLog.enabled: expected true or false"),
            (header + "spec: {accessLog: {format: text}}", "m.yaml:1:spec.accessLog.format: unknown field"),
            (header + "spec: {telemetry: {requestMetrics: no-thanks}}", "m.yaml:1:spec.telemetry.requestMetrics: expected true or false"),
            (header + "spec: {telemetry: {sampling: 1}}", "m.yaml:1:spec.telemetry.sampling: unknown field"),
            (header + "spec: {telemetry: {tracing: {otlpEndpoint: \"collector:4318\"}}}", "m.yaml:1:spec.telemetry.tracing.otlpEndpoint: must be http://IPV4:PORT"),
            (header + "spec: {telemetry: {tracing: {otlpEndpoint: \"http://10.0.0.1:0\"}}}", "m.yaml:1:spec.telemetry.tracing.otlpEndpoint: must be http://IPV4:PORT"),
            (header + "spec: {telemetry: {tracing: {otlpEndpoint: \"http://10.0.0.1:4318\", samplingPercent: 101}}}", "m.yaml:1:spec.telemetry.tracing.samplingPercent: must be a number from 0 to 100"),
            (header + "spec: {telemetry: {tracing: {samplingPercent: 5}}}", "m.yaml:1:spec.telemetry.tracing.otlpEndpoint: required field is missing"),
            (workload("x", "sometimes"), "m.yaml:1:metadata.annotations.weft.dev/socket-shortcut: must be \"receive\" or \"off\""),
            (header + "spec: {proxy: {idleTimeout: 500ms}}", "m.yaml:1:spec.proxy.idleTimeout: must be at least 1s (or 0s: never)"),
            (header + "spec: {proxy: {idleTimeout: an hour}}", "m.yaml:1:spec.proxy.idleTimeout: \"an hour\" is not a Gateway API duration"),
            (header + "spec: {proxy: {idleTimeout: 60}}", "m.yaml:1:spec.proxy.idleTimeout: expected a string, got a number"),
            (header + "spec: {proxy: {requestHeaderTimeout: 100ms}}", "m.yaml:1:spec.proxy.requestHeaderTimeout: must be at least 1s (or 0s: never)"),
            (header + "spec: {proxy: {requestHeaderTimeout: [1s]}}", "m.yaml:1:spec.proxy.requestHeaderTimeout: expected a string"),
            (header + "spec: {proxy: {streamIdleTimeout: 999ms}}", "m.yaml:1:spec.proxy.streamIdleTimeout: must be at least 1s (or 0s: never), got \"999ms\""),
            (header + "spec: {proxy: {streamIdleTimeout: forever}}", "m.yaml:1:spec.proxy.streamIdleTimeout: \"forever\" is not a Gateway API duration"),
            (header + "spec: {proxy: {tunnelIdleTimeout: 200ms}}", "m.yaml:1:spec.proxy.tunnelIdleTimeout: must be at least 1s (or 0s: never), got \"200ms\""),
            (header + "spec: {proxy: {tunnelIdleTimeout: 5}}", "m.yaml:1:spec.proxy.tunnelIdleTimeout: expected a string, got a number"),
            (header + "spec: {proxy: {upstreamIdleTimeout: 10ms}}", "m.yaml:1:spec.proxy.upstreamIdleTimeout: must be at least 1s (or 0s: never), got \"10ms\""),
            (header + "spec: {proxy: {tcpKeepalive: {time: 500ms}}}", "m.yaml:1:spec.proxy.tcpKeepalive.time: must be whole seconds from 1s to 32767s (or 0s: off), got \"500ms\""),
            (header + "spec: {proxy: {tcpKeepalive: {time: 10h}}}", "m.yaml:1:spec.proxy.tcpKeepalive.time: must be whole seconds from 1s to 32767s"),
            (header + "spec: {proxy: {tcpKeepalive: {interval: 0s}}}", "m.yaml:1:spec.proxy.tcpKeepalive.interval: must be whole seconds from 1s to 32767s, got \"0s\""),
            (header + "spec: {proxy: {tcpKeepalive: {interval: 1500ms}}}", "m.yaml:1:spec.proxy.tcpKeepalive.interval: must be whole seconds"),
            (header + "spec: {proxy: {tcpKeepalive: {probes: 0}}}", "m.yaml:1:spec.proxy.tcpKeepalive.probes: must be from 1 to 127, got 0"),
            (header + "spec: {proxy: {tcpKeepalive: {count: 3}}}", "m.yaml:1:spec.proxy.tcpKeepalive.count: unknown field"),
            (header + "spec: {proxy: {keepAlive: 1m}}", "m.yaml:1:spec.proxy.keepAlive: unknown field"),
            (header + "spec: {proxy: {pathNormalization: {normalization: LOOSE}}}", "m.yaml:1:spec.proxy.pathNormalization.normalization: must be one of NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES, got \"LOOSE\""),
            (header + "spec: {proxy: {pathNormalization: {mode: BASE}}}", "m.yaml:1:spec.proxy.pathNormalization.mode: unknown field"),
            (header + "spec: {proxy: {http2MaxConcurrentStreams: 0}}", "m.yaml:1:spec.proxy.http2MaxConcurrentStreams: must be from 1 to 2147483647, got 0"),
            (header + "spec: {proxy: {http2MaxConcurrentStreams: 2147483648}}", "m.yaml:1:spec.proxy.http2MaxConcurrentStreams: must be from 1 to 2147483647, got 2147483648"),
            (header + "spec: {proxy: {http2MaxConcurrentStreams: many}}", "m.yaml:1:spec.proxy.http2MaxConcurrentStreams: expected an integer"),
            (header + "spec: {proxy: {maxRequestHeaderSize: 512}}", "m.yaml:1:spec.proxy.maxRequestHeaderSize: must be a size from 1Ki to 64Ki (bytes, or a number and Ki), got \"512\""),
            (header + "spec: {proxy: {maxRequestHeaderSize: 65Ki}}", "m.yaml:1:spec.proxy.maxRequestHeaderSize: must be a size from 1Ki to 64Ki"),
            (header + "spec: {proxy: {maxRequestHeaderSize: 8KB}}", "m.yaml:1:spec.proxy.maxRequestHeaderSize: must be a size from 1Ki to 64Ki (bytes, or a number and Ki), got \"8KB\""),
            (header + "spec: {proxy: {maxRequestHeaderSize: [8Ki]}}", "m.yaml:1:spec.proxy.maxRequestHeaderSize: must be a size from 1Ki to 64Ki (bytes, or a number and Ki), got a list"),
            (header + "spec: {policy: {udpIdleTimeout: 0s}}", "m.yaml:1:spec.policy.udpIdleTimeout: must be from 1s to 24h, got \"0s\""),
            (header + "spec: {policy: {udpIdleTimeout: 500ms}}", "m.yaml:1:spec.policy.udpIdleTimeout: must be from 1s to 24h, got \"500ms\""),
            (header + "spec: {policy: {udpIdleTimeout: 25h}}", "m.yaml:1:spec.policy.udpIdleTimeout: must be from 1s to 24h"),
            (header + "spec: {policy: {udpIdleTimeout: soon}}", "m.yaml:1:spec.policy.udpIdleTimeout: \"soon\" is not a Gateway API duration"),
            (header + "spec: {policy: {udpIdleTimeout: 30}}", "m.yaml:1:spec.policy.udpIdleTimeout: expected a string, got a number"),
            (header + "spec: {policy: {tcpIdleTimeout: 1m}}", "m.yaml:1:spec.policy.tcpIdleTimeout: unknown field"),
        ]
        for (text, want) in cases {
            let (state, errors) = parse(text)
            #expect(state == nil)
            #expect(errors.contains { $0.hasPrefix(want) }, "want \(want), got \(errors)")
        }
    }

    @Test func udpIdleTimeoutDefaultsToAMinute() throws {
        let header = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        let pod = workload("a", nil)
        #expect(try #require(parse(pod).0).meshConfig.policy.udpIdleTimeout == .seconds(60))
        let short = try #require(parse(pod + "\n---\n" + header + "spec: {policy: {udpIdleTimeout: 1500ms}}").0)
        #expect(short.meshConfig.policy.udpIdleTimeout == .milliseconds(1500))
        let day = try #require(parse(pod + "\n---\n" + header + "spec: {policy: {udpIdleTimeout: 24h}}").0)
        #expect(day.meshConfig.policy.udpIdleTimeout == .seconds(86400))
    }

    @Test func accessLogScopeReachesTheProxyTable() throws {
        let header = "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        let pod = workload("a", nil)
        let off = try #require(parse(pod).0)
        #expect(ProxyTable(off).accessLog == nil, "off by default")
        #expect(ProxyTable(off).workloads?["198.18.1.11"] == .init(name: "a", namespace: "shop", serviceAccount: "default", node: "n1"))
        let all = try #require(parse(pod + "\n---\n" + header + "spec: {accessLog: {enabled: true}}").0)
        #expect(ProxyTable(all).accessLog == .init(namespaces: []))
        let some = try #require(parse(pod + "\n---\n" + header + "spec: {accessLog: {enabled: true, namespaces: [web, shop]}}").0)
        #expect(ProxyTable(some).accessLog == .init(namespaces: ["shop", "web"]))
        #expect(ProxyTable(off).requestMetrics == nil, "request metrics on by default")
        let quiet = try #require(parse(pod + "\n---\n" + header + "spec: {telemetry: {requestMetrics: false, connectionCounters: false}}").0)
        #expect(ProxyTable(quiet).requestMetrics == false && quiet.meshConfig.telemetry.connectionCounters == false)
        #expect(ProxyTable(off).tracing == nil, "no span export by default")
        let traced = try #require(parse(pod + "\n---\n" + header + "spec: {telemetry: {tracing: {otlpEndpoint: \"http://10.0.0.9:4318/\", samplingPercent: 12.5}}}").0)
        #expect(ProxyTable(traced).tracing == .init(host: "10.0.0.9", port: 4318, samplingPercent: 12.5))
        // Splicing: on unless MeshConfig switches it, or the shortcut, off.
        #expect(ProxyTable(off).spliceOff == nil)
        let noSplice = try #require(parse(pod + "\n---\n" + header + "spec: {socketShortcut: {splice: false}}").0)
        #expect(ProxyTable(noSplice).spliceOff == true)
        let noShortcut = try #require(parse(pod + "\n---\n" + header + "spec: {socketShortcut: {enabled: false}}").0)
        #expect(ProxyTable(noShortcut).spliceOff == true)
        // proxy.idleTimeout: absent from the table by default (the proxy's
        // default, an hour, holds), in milliseconds otherwise, 0 for never.
        #expect(ProxyTable(off).idleTimeoutMilliseconds == nil && off.meshConfig.proxy.idleTimeout == .seconds(3600))
        let idle = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {idleTimeout: 1m30s}}").0)
        #expect(ProxyTable(idle).idleTimeoutMilliseconds == 90_000)
        let never = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {idleTimeout: 0s}}").0)
        #expect(ProxyTable(never).idleTimeoutMilliseconds == 0)
        // proxy.requestHeaderTimeout likewise (a minute by default), and
        // each of the two apart from the other.
        #expect(ProxyTable(off).requestHeaderTimeoutMilliseconds == nil && off.meshConfig.proxy.requestHeaderTimeout == .seconds(60))
        #expect(ProxyTable(idle).requestHeaderTimeoutMilliseconds == nil)
        let head = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {requestHeaderTimeout: 10s}}").0)
        #expect(ProxyTable(head).requestHeaderTimeoutMilliseconds == 10_000 && ProxyTable(head).idleTimeoutMilliseconds == nil)
        let unlimited = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {requestHeaderTimeout: 0s, idleTimeout: 2m}}").0)
        #expect(ProxyTable(unlimited).requestHeaderTimeoutMilliseconds == 0 && ProxyTable(unlimited).idleTimeoutMilliseconds == 120_000)
        // proxy.streamIdleTimeout likewise (five minutes by default).
        #expect(ProxyTable(off).streamIdleTimeoutMilliseconds == nil && off.meshConfig.proxy.streamIdleTimeout == .seconds(300))
        #expect(ProxyTable(idle).streamIdleTimeoutMilliseconds == nil)
        let stalled = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {streamIdleTimeout: 30s}}").0)
        #expect(ProxyTable(stalled).streamIdleTimeoutMilliseconds == 30_000 && ProxyTable(stalled).idleTimeoutMilliseconds == nil)
        let streams = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {streamIdleTimeout: 0s}}").0)
        #expect(ProxyTable(streams).streamIdleTimeoutMilliseconds == 0 && streams.meshConfig.proxy.streamIdleTimeout == nil)
        // proxy.upstreamIdleTimeout likewise (three seconds by default).
        #expect(ProxyTable(off).upstreamIdleTimeoutMilliseconds == nil && off.meshConfig.proxy.upstreamIdleTimeout == .seconds(3))
        let upstream = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {upstreamIdleTimeout: 1m}}").0)
        #expect(ProxyTable(upstream).upstreamIdleTimeoutMilliseconds == 60_000 && ProxyTable(upstream).tunnelIdleTimeoutMilliseconds == nil)
        let forever = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {upstreamIdleTimeout: 0s}}").0)
        #expect(ProxyTable(forever).upstreamIdleTimeoutMilliseconds == 0 && forever.meshConfig.proxy.upstreamIdleTimeout == nil)
        // proxy.tunnelIdleTimeout likewise (five minutes by default).
        #expect(ProxyTable(off).tunnelIdleTimeoutMilliseconds == nil && off.meshConfig.proxy.tunnelIdleTimeout == .seconds(300))
        let tunnels = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {tunnelIdleTimeout: 90s}}").0)
        #expect(ProxyTable(tunnels).tunnelIdleTimeoutMilliseconds == 90_000 && ProxyTable(tunnels).streamIdleTimeoutMilliseconds == nil)
        let kept = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {tunnelIdleTimeout: 0s}}").0)
        #expect(ProxyTable(kept).tunnelIdleTimeoutMilliseconds == 0 && kept.meshConfig.proxy.tunnelIdleTimeout == nil)
        // proxy.maxRequestHeaderSize: 64 KiB by default (absent from the
        // table), in bytes otherwise, given as bytes or in Ki.
        #expect(ProxyTable(off).maxRequestHeaderSize == nil && off.meshConfig.proxy.maxRequestHeaderSize == 65536)
        // proxy.pathNormalization: BASE by default (absent from the table).
        #expect(ProxyTable(off).pathNormalization == nil && off.meshConfig.proxy.pathNormalization == .base)
        let merging = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {pathNormalization: {normalization: MERGE_SLASHES}}}").0)
        #expect(ProxyTable(merging).pathNormalization == .mergeSlashes)
        let small = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {maxRequestHeaderSize: 8Ki}}").0)
        #expect(ProxyTable(small).maxRequestHeaderSize == 8192)
        let bytes = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {maxRequestHeaderSize: 20000}}").0)
        #expect(ProxyTable(bytes).maxRequestHeaderSize == 20000)
        // proxy.http2MaxConcurrentStreams: 1000 by default (absent from the table).
        #expect(ProxyTable(off).http2MaxConcurrentStreams == nil && off.meshConfig.proxy.http2MaxConcurrentStreams == 1000)
        let fewStreams = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {http2MaxConcurrentStreams: 64}}").0)
        #expect(ProxyTable(fewStreams).http2MaxConcurrentStreams == 64)
        // proxy.tcpKeepalive: the default (60 s, 10 s, 6) is absent from
        // the table; otherwise in seconds, what was not given defaulted;
        // time 0s is off.
        #expect(ProxyTable(off).tcpKeepalive == nil && off.meshConfig.proxy.tcpKeepalive == MeshConfig.TCPKeepalive())
        let probing = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {tcpKeepalive: {time: 1m30s, probes: 3}}}").0)
        #expect(ProxyTable(probing).tcpKeepalive.map { [$0.time, $0.interval, $0.probes] } == [90, 10, 3])
        let silent = try #require(parse(pod + "\n---\n" + header + "spec: {proxy: {tcpKeepalive: {time: 0s}}}").0)
        #expect(silent.meshConfig.proxy.tcpKeepalive == nil && ProxyTable(silent).tcpKeepalive?.time == 0)
    }
}
