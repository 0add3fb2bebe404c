import Foundation
import Testing
@testable import WeftCore

/// A Service's external addresses (externalIPs; a LoadBalancer's
/// loadBalancerIP and status ingress addresses): served like its clusterIP
/// for the pods that dial them, as kube-proxy serves in-cluster traffic to
/// them.
struct ExternalAddressTests {
    private static let manifests = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop}
        spec:
          type: LoadBalancer
          clusterIP: 198.19.0.10
          selector: {app: web}
          ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}, {name: tcp, port: 9000}]
          externalIPs: [198.19.5.1, "2001:db8::1"]
          loadBalancerIP: 198.19.5.2
          externalTrafficPolicy: Local
        status:
          loadBalancer:
            ingress: [{ip: 198.19.5.3, ports: [{port: 80, protocol: TCP}]}, {ip: 198.19.5.4, ipMode: Proxy}, {hostname: lb.example}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: plain, namespace: shop}
        spec: {type: NodePort, clusterIP: 198.19.0.11, loadBalancerIP: 198.19.5.9, selector: {app: web}, ports: [{name: tcp, port: 9000}]}
        ---
        apiVersion: weft.dev/v1alpha1
        kind: Workload
        metadata: {name: a, namespace: shop, labels: {app: web}}
        spec: {node: n1, address: 198.18.1.10}
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n1}
        status: {addresses: [{type: InternalIP, address: 198.18.0.1}, {type: Hostname, address: n1}, {type: InternalIP, address: "fd00::1"}]}
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: n2}
        status: {addresses: [{type: InternalIP, address: 198.18.0.2}, {type: ExternalIP, address: 198.19.6.2}]}
        """

    private func parse(_ text: String) -> (ClusterState?, [String]) { buildState(text, file: "lb.yaml") }

    @Test func externalAndLoadBalancerAddressesAreServedLikeTheClusterIP() throws {
        let (state, errors) = parse(Self.manifests)
        let s = try #require(state, "\(errors)")
        let web = try #require(s.services.first { $0.metadata.name == "web" })
        #expect(web.externalAddresses.map(\.address.description) == ["198.19.5.1", "198.19.5.2", "198.19.5.3"])
        #expect(web.externalAddresses.map(\.field) == ["spec.externalIPs[0]", "spec.loadBalancerIP",
                                                        "status.loadBalancer.ingress[0].ip"])
        #expect(s.services.first { $0.metadata.name == "plain" }?.externalAddresses == [], "loadBalancerIP only on a LoadBalancer")
        // The kernel: every external address and port, the clusterIP's backends.
        let table = ServiceTable(s, node: "n1")
        let shown = Set(table.entries.keys.map(\.description))
        for ip in ["198.19.0.10", "198.19.5.1", "198.19.5.2", "198.19.5.3"] {
            for port in ["80", "9000"] {
                let key = "\(ip):\(port)/TCP"
                #expect(shown.contains(key), "\(key)")
                #expect(table.entries.first { $0.key.description == key }?.value.backends.map(\.address.description) == ["198.18.1.10"])
            }
        }
        #expect(!shown.contains { $0.hasPrefix("198.19.5.4:") || $0.hasPrefix("198.19.5.9:") }, "\(shown)")
        // The node port: one entry, under 0.0.0.0, for its port only, and
        // every node's addresses, where it is dialed.
        #expect(s.nodes["n2"]?.addresses.map(\.description) == ["198.18.0.2", "198.19.6.2"])
        #expect(table.entries.first { $0.key.description == "0.0.0.0:30080/TCP" }?.value.backends.map(\.address.description) == ["198.18.1.10"])
        #expect(table.entries.first { $0.key.description == "0.0.0.0:30080/TCP" }?.value.name == "shop/web:http (node port)")
        #expect(table.nodeAddresses.map(\.description) == ["198.18.0.1", "198.18.0.2", "198.19.6.2"])
        #expect(!shown.contains { $0.hasPrefix("198.18.0.") } && shown.filter { $0.hasPrefix("0.0.0.0:") }.count == 1, "\(shown)")
        #expect(ServiceTable(try #require(parse(Self.manifests.replacingOccurrences(of: ", nodePort: 30080}", with: "}")).0)).nodeAddresses == [],
                "no node port: no node addresses")
        // The proxy: the HTTP port's frontend under each address, and the
        // Service's name for every address's ports.
        let proxy = ProxyTable(s, node: "n1").expandingAliases()
        let shipped = ProxyTable(s, node: "n1")
        #expect(shipped.frontendAliases?["0.0.0.0:30080"] == "198.19.0.10:80" && shipped.frontendAliases?["198.19.5.1:80"] == "198.19.0.10:80",
                "shipped as aliases, a node port once")
        #expect(shipped.nodeAddresses == ["198.18.0.1", "198.18.0.2", "198.19.6.2"])
        #expect(shipped.frontends["198.18.0.2:30080"] == nil && shipped.frontendAliases?["198.18.0.2:30080"] == nil, "not as copies")
        #expect(shipped.resolvedAliases()["198.19.6.2:30080"] == "198.19.0.10:80")
        let frontend = try #require(proxy.frontends["198.19.0.10:80"])
        for ip in ["198.19.5.1", "198.19.5.2", "198.19.5.3"] {
            #expect(proxy.frontends["\(ip):80"] == frontend, "\(ip)")
            #expect(proxy.services?["\(ip):9000"]?.name == "web", "\(ip)")
        }
        #expect(proxy.frontends["198.19.5.4:80"] == nil)
        #expect(proxy.frontends["198.18.0.2:30080"] == frontend && proxy.services?["198.18.0.1:30080"]?.name == "web")
    }

    @Test func badOrTakenExternalAddressesAreRefused() throws {
        func errors(_ text: String) -> [String] { parse(text).1 }
        let bad = errors(Self.manifests.replacingOccurrences(of: "externalIPs: [198.19.5.1,", with: "externalIPs: [nope,"))
        #expect(bad == ["lb.yaml:1:spec.externalIPs[0]: \"nope\" is not an IP address"], "\(bad)")
        let badStatus = errors(Self.manifests.replacingOccurrences(of: "{ip: 198.19.5.3,", with: "{ip: 198.19.5.300,"))
        #expect(badStatus == ["lb.yaml:1:status.loadBalancer.ingress[0].ip: \"198.19.5.300\" is not an IP address"], "\(badStatus)")
        // Another Service's clusterIP.
        let clash = errors(Self.manifests.replacingOccurrences(of: "externalIPs: [198.19.5.1,", with: "externalIPs: [198.19.0.11,"))
        #expect(clash == ["lb.yaml:1:spec.externalIPs[0]: 198.19.0.11 is the clusterIP of Service shop/plain"], "\(clash)")
        // Two Services on one address and port; on other ports, allowed.
        let other = """

            ---
            apiVersion: v1
            kind: Service
            metadata: {name: other, namespace: shop}
            spec: {clusterIP: 198.19.0.12, externalIPs: [198.19.5.1], selector: {app: web}, ports: [{name: tcp, port: PORT}]}
            """
        let shared = errors(Self.manifests + other.replacingOccurrences(of: "PORT", with: "9000"))
        #expect(shared.count == 1 && shared.first?.hasPrefix("lb.yaml:6:spec.externalIPs[0]: 198.19.5.1:9000/TCP is already served for Service shop/web at lb.yaml:1") == true,
                "\(shared)")
        #expect(errors(Self.manifests + other.replacingOccurrences(of: "PORT", with: "9001")) == [])
        // Node ports: not on a ClusterIP Service, one Service's each, a
        // node address that is an IP address.
        let clusterIPType = errors(Self.manifests.replacingOccurrences(of: "{name: tcp, port: 9000}]}", with: "{name: tcp, port: 9000, nodePort: 30900}]}")
            .replacingOccurrences(of: "type: NodePort, clusterIP: 198.19.0.11, loadBalancerIP: 198.19.5.9,", with: "clusterIP: 198.19.0.11,"))
        #expect(clusterIPType == ["lb.yaml:2:spec.ports[0].nodePort: may not be used when type is ClusterIP"], "\(clusterIPType)")
        let twice = errors(Self.manifests.replacingOccurrences(of: "{name: tcp, port: 9000}]}", with: "{name: tcp, port: 9000, nodePort: 30080}]}"))
        #expect(twice.count == 1 && twice.first?.hasPrefix("lb.yaml:2:spec.ports[0].nodePort: node port 30080/TCP is already allocated to Service shop/web at lb.yaml:1") == true,
                "\(twice)")
        let badNode = errors(Self.manifests.replacingOccurrences(of: "address: 198.18.0.2}", with: "address: 198.18.0.256}"))
        #expect(badNode == ["lb.yaml:5:status.addresses[0].address: \"198.18.0.256\" is not an IP address"], "\(badNode)")
        // A pod's own address.
        let pod = errors(Self.manifests.replacingOccurrences(of: "externalIPs: [198.19.5.1,", with: "externalIPs: [198.18.1.10,"))
        #expect(pod == ["lb.yaml:3:spec.address: address 198.18.1.10 is an external address of Service shop/web (its spec.externalIPs[0])"], "\(pod)")
    }
}
