import Foundation
import Glibc
import Logging
import Testing
import WeftABI
import WeftCore
@testable import WeftKernel

/// The loader against the real kernel: attach to a scratch cgroup, write a
/// plan, read it back, attach again and see it adopted, uninstall.
@Suite(.serialized)
struct DatapathTests {
    @Test(.enabled(if: Privilege.canRun, Privilege.skipReason))
    func attachWriteReadBackAdoptUninstall() throws {
        try #require(Privilege.isRoot, "CI=true: this test must run as root")
        try Host.ensureBPFFS()
        let mount = try #require(Host.cgroup2Mount())
        let cgroup = "\(mount)/weft-test-kernel-\(getpid())"
        let pins = "\(Host.bpffsRoot)/weft/test-kernel-\(getpid())"
        try FileManager.default.createDirectory(atPath: cgroup, withIntermediateDirectories: true)
        defer {
            try? Datapath.uninstall(pinDirectory: pins)
            rmdir(cgroup)
        }
        let logger = Logger(label: "test")
        let first = try Datapath.attach(pinDirectory: pins, cgroupPath: cgroup, logger: logger)
        #expect(Set(first.programs.map(\.name)) == ["weft_connect4", "weft_getpeername4", "weft_ingress", "weft_recvmsg4", "weft_sendmsg4", "weft_sockops", "weft_connect6", "weft_getpeername6", "weft_recvmsg6"])
        #expect(first.programs.allSatisfy { $0.state == .attached })

        let maps = try ServiceMaps(pinDirectory: pins)
        let vip = IPv4Address("198.19.7.7")!
        let f = Frontend(vip: vip, port: 80, transport: .tcp)
        let b = BackendAddress(address: IPv4Address("198.18.7.2")!, port: 8080, transport: .tcp)
        let desired = ServiceTable(entries: [f: .init(name: "t/t:80", backends: [b], needsProxy: false)])
        let (target, writes) = ServiceMapPlanner.plan(desired: desired, current: try maps.snapshot())
        try maps.apply(writes)
        #expect(try maps.snapshot() == target)

        // A second attach over the pins adopts everything and keeps the table.
        let second = try Datapath.attach(pinDirectory: pins, cgroupPath: cgroup, logger: logger)
        #expect(second.programs.allSatisfy { $0.state == .adopted })
        #expect(second.programs.map(\.programID).sorted() == first.programs.map(\.programID).sorted())
        #expect(try ServiceMaps(pinDirectory: pins).snapshot() == target)

        // The proxy takes a connection's origin once, in one system call
        // (lookup and delete): a second take finds nothing.
        let proxyMaps = try ProxyMaps(pinDirectory: pins)
        var key = weft_proxy_origin_key()
        key.client_addr = IPv4Address("198.18.7.3")!.networkOrder
        key.client_port = UInt16(40_000).bigEndian
        var origin = weft_proxy_origin()
        origin.vip = vip.networkOrder
        origin.port = UInt16(80).bigEndian
        origin.source = IPv4Address("198.18.7.3")!.networkOrder
        try proxyMaps.origins.update(key, origin)
        let taken = try proxyMaps.take(client: IPv4Address("198.18.7.3")!, port: 40_000)
        #expect(taken?.vip == vip && taken?.port == 80 && taken?.source == IPv4Address("198.18.7.3")!)
        #expect(try proxyMaps.take(client: IPv4Address("198.18.7.3")!, port: 40_000) == nil)
        #expect(try proxyMaps.pendingOrigins() == 0)

        try Datapath.uninstall(pinDirectory: pins)
        #expect(!FileManager.default.fileExists(atPath: pins))
    }

    @Test func cgroupMountIsFoundOnUnifiedAndHybridHosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
        #expect(Host.cgroup2Mount(mounts: hybrid) == "/sys/fs/cgroup/unified")
        #expect(Host.cgroup2Mount(mounts: "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == "/sys/fs/cgroup")
        #expect(Host.cgroup2Mount(mounts: "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n") == nil)
    }
}
