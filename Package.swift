// swift-tools-version:6.1
import PackageDescription

// Layout, kernel side first:
//   bpf/                 C eBPF programs (one file per attach point) and their headers;
//                        bpf/include/weft_abi.h is the only definition of kernel/user structs.
//   Plugins/BPFCompiler  runs clang -target bpf on every build and embeds the objects.
//   Sources/CLibbpf      Debian's libbpf, plus the few C inline helpers Swift needs.
//   Sources/WeftCore     manifests, validation, desired state, map plans: pure Swift.
//   Sources/WeftKernel   libbpf loader, pins, typed map wrappers: the only raw pointers.
//   Sources/WeftCore/Routing  HTTPRoutes compiled into the proxy's table: where a request is routed.
//   Sources/WeftIdentity SPIFFE identities, the mesh CA, certificates and TLS settings.
//   Sources/WeftProxy    the node's L7 proxy (SwiftNIO): capture listener, HTTP/1.1, HTTP/2,
//                        gRPC, TCP passthrough, upstream pools, retries, timeouts.
//   Sources/WeftStatus   the small HTTP server both daemons answer /status and /metrics with,
//                        and the active health probes (TCP, HTTP, gRPC).
//   Sources/WeftAgent    the node daemon: config watch, reconcile loop, proxy supervision.
//   Sources/WeftLab      the network-namespace sandbox the demo, tests and benches run in.
//   Sources/weft         the one executable: argument parsing only.
let swiftSettings: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "weft",
    platforms: [.macOS(.v15)],
    products: [.executable(name: "weft", targets: ["weft"])],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-nio-http2", from: "1.35.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.1.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.0"),
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.7.0"),
    ],
    targets: [
        .plugin(name: "BPFCompiler", capability: .buildTool(), path: "Plugins/BPFCompiler"),
        .systemLibrary(name: "CLibbpf", path: "Sources/CLibbpf", pkgConfig: "libbpf",
                       providers: [.apt(["libbpf-dev"])]),
        // The kernel/user ABI header, straight from bpf/include, as a C module.
        .target(name: "WeftABI", path: "bpf",
                exclude: ["lib", "programs", "compile.sh"],
                sources: ["abi"],
                publicHeadersPath: "include"),
        .target(name: "CWeftSys", path: "Sources/CWeftSys"),
        // WeftCore composes manifests from libyaml's events through Yams'
        // CYaml module (the libyaml that Yams ships): see YAMLDocument.swift.
        .target(name: "WeftCore",
                dependencies: ["WeftABI", .product(name: "Yams", package: "Yams")],
                swiftSettings: swiftSettings),
        .target(name: "WeftKernel",
                dependencies: ["CLibbpf", "WeftABI", "WeftCore",
                               .product(name: "Logging", package: "swift-log")],
                swiftSettings: swiftSettings,
                plugins: ["BPFCompiler"]),
        .target(name: "WeftStatus",
                dependencies: [.product(name: "NIOCore", package: "swift-nio"),
                               .product(name: "NIOPosix", package: "swift-nio"),
                               .product(name: "NIOHTTP1", package: "swift-nio"),
                               .product(name: "NIOHTTP2", package: "swift-nio-http2")],
                swiftSettings: swiftSettings),
        // Workload identity: SPIFFE IDs, the mesh CA, leaf issuance and the
        // TLS settings both ends of a tunnel use.
        .target(name: "WeftIdentity",
                dependencies: [.product(name: "X509", package: "swift-certificates"),
                               .product(name: "Crypto", package: "swift-crypto"),
                               .product(name: "SwiftASN1", package: "swift-asn1"),
                               .product(name: "NIOSSL", package: "swift-nio-ssl")],
                swiftSettings: swiftSettings),
        .target(name: "WeftProxy",
                dependencies: ["WeftCore", "WeftKernel", "WeftStatus", "WeftIdentity", "CWeftSys",
                               .product(name: "Crypto", package: "swift-crypto"),
                               .product(name: "NIOSSL", package: "swift-nio-ssl"),
                               .product(name: "Logging", package: "swift-log"),
                               .product(name: "NIOCore", package: "swift-nio"),
                               .product(name: "NIOPosix", package: "swift-nio"),
                               .product(name: "NIOHTTP1", package: "swift-nio"),
                               .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                               .product(name: "NIOHPACK", package: "swift-nio-http2"),
                               .product(name: "NIOTLS", package: "swift-nio"),
                               .product(name: "Prometheus", package: "swift-prometheus")],
                exclude: ["README.md"],
                // The request path is single-threaded per event loop: the
                // runtime exclusivity checks cost ~2% of its CPU for nothing.
                swiftSettings: swiftSettings + [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]),
        .target(name: "WeftAgent",
                dependencies: ["WeftCore", "WeftKernel", "WeftStatus", "CWeftSys", "WeftIdentity",
                               .product(name: "Logging", package: "swift-log"),
                               .product(name: "NIOCore", package: "swift-nio"),
                               .product(name: "NIOPosix", package: "swift-nio"),
                               .product(name: "NIOHTTP1", package: "swift-nio"),
                               .product(name: "Prometheus", package: "swift-prometheus")],
                swiftSettings: swiftSettings),
        .target(name: "WeftLab",
                dependencies: ["WeftCore", "WeftKernel", "CWeftSys", "WeftStatus", "WeftIdentity",
                               .product(name: "Logging", package: "swift-log")],
                swiftSettings: swiftSettings),
        // Not Weft: a reference point for scripts/bench proxy-profile, the
        // least an HTTP/1.1 proxy on SwiftNIO spends per request.
        .executableTarget(name: "weft-proxy-floor",
                          dependencies: [.product(name: "NIOCore", package: "swift-nio"),
                                         .product(name: "NIOPosix", package: "swift-nio")],
                          path: "Benchmarks/ProxyFloor",
                          swiftSettings: swiftSettings),
        .executableTarget(name: "weft",
                          dependencies: ["WeftCore", "WeftKernel", "WeftAgent", "WeftProxy", "WeftLab", "WeftStatus", "WeftIdentity",
                                         .product(name: "Crypto", package: "swift-crypto"),
                                         .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                         .product(name: "Logging", package: "swift-log")],
                          swiftSettings: swiftSettings),
        .testTarget(name: "WeftCoreTests", dependencies: ["WeftCore"], swiftSettings: swiftSettings),
        .testTarget(name: "WeftIdentityTests", dependencies: ["WeftIdentity",
                                                             .product(name: "X509", package: "swift-certificates"),
                                                             .product(name: "Crypto", package: "swift-crypto")],
                    swiftSettings: swiftSettings),
        .testTarget(name: "WeftProxyTests", dependencies: ["WeftProxy", "WeftCore", "WeftIdentity", "WeftStatus",
                                                          .product(name: "NIOSSL", package: "swift-nio-ssl"),
                                                          .product(name: "NIOPosix", package: "swift-nio"),
                                                          .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                                                          .product(name: "NIOHPACK", package: "swift-nio-http2"),
                                                          .product(name: "Crypto", package: "swift-crypto"),
                                                          .product(name: "NIOCore", package: "swift-nio"),
                                                          .product(name: "NIOEmbedded", package: "swift-nio"),
                                                          .product(name: "NIOHTTP1", package: "swift-nio"),
                                                          .product(name: "Prometheus", package: "swift-prometheus")],
                    swiftSettings: swiftSettings),
        .testTarget(name: "WeftKernelTests", dependencies: ["WeftKernel", "WeftCore"], swiftSettings: swiftSettings),
        .testTarget(name: "WeftEndToEndTests", dependencies: ["WeftCore"], exclude: ["Tools"], swiftSettings: swiftSettings),
    ]
)
