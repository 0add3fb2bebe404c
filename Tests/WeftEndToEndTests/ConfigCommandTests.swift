import Foundation
import Testing

/// `weft validate` and `weft apply` through the real binary; no root needed.
@Suite struct ConfigCommandTests {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("weft-apply-\(UUID().uuidString.prefix(8))").path

    func file(_ name: String, _ text: String) throws -> String {
        let path = "\(dir)/\(name)"
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    static let service = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop}
        spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{port: 80}]}
        """

    /// `weft proxy` (and the agent, the same way) raises its soft limit on
    /// open files to the hard one as it starts: systemd starts services at
    /// 1024, which a node's connections pass. Here under 512 of 4096 (then
    /// it stops: no pinned maps at the path given).
    @Test func theProxyRaisesItsOpenFileLimit() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/prlimit")
        process.arguments = ["--nofile=512:4096", LabHarness.weft, "proxy", "--node", "weft-limit", "--listen", "127.0.0.1:15999",
                             "--pin-dir", "\(dir)/no-pins", "--run-dir", "\(dir)/run"]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = out
        try process.run()
        process.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(text.contains("open files: at most 4096 (raised from 512)"), "\(text)")
        #expect(process.terminationStatus == 2, "\(text)")
    }

    @Test func applyValidatesAgainstTheWholeConfigAndWritesNothingOnError() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config"
        _ = try file("config/services.yaml", Self.service)
        // Same clusterIP under another name: refused with file:doc:field, nothing written.
        let clash = try file("incoming/other.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: api,"))
        let refused = try LabHarness.run(["apply", "-f", clash, "--config", config])
        #expect(refused.status == 1)
        #expect(refused.output.contains("other.yaml:1:spec.clusterIP: clusterIP 198.19.0.10 is already used by Service shop/web"), "\(refused.output)")
        #expect(refused.output.contains("nothing applied"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: config) == ["services.yaml"])

        let good = try file("incoming/api.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: api,")
                                .replacingOccurrences(of: "198.19.0.10", with: "198.19.0.11"))
        let applied = try LabHarness.run(["apply", "-f", good, "--config", config])
        #expect(applied.status == 0, "\(applied.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config).sorted() == ["api.yaml", "services.yaml"])
        let validate = try LabHarness.run(["validate", "-f", config])
        #expect(validate.status == 0)
        #expect(validate.output.contains("valid: 2 Service(s), 0 Workload(s)"))
    }

    /// Two applies to one directory take turns: the second waits for the
    /// first (here, the test holding the lock as an apply would) and then
    /// validates against what it wrote, so two changes that pass alone but
    /// clash together are never both written.
    @Test func appliesToOneConfigTakeTurnsAndEachValidatesWhatTheOtherWrote() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config"
        _ = try file("config/services.yaml", Self.service)
        let api = try file("incoming/api.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: api,")
                               .replacingOccurrences(of: "198.19.0.10", with: "198.19.0.11"))
        let held = open(config, O_RDONLY | O_DIRECTORY)
        try #require(held >= 0 && flock(held, LOCK_EX) == 0)
        let apply = Process()
        apply.executableURL = URL(fileURLWithPath: LabHarness.weft)
        apply.arguments = ["apply", "-f", api, "--config", config]
        let out = Pipe()
        apply.standardOutput = out
        apply.standardError = out
        try apply.run()
        usleep(400_000)
        #expect(apply.isRunning, "it did not wait for the lock")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config) == ["services.yaml"])
        // What the other apply wrote meanwhile: the same clusterIP.
        _ = try file("config/other.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: other,")
                         .replacingOccurrences(of: "198.19.0.10", with: "198.19.0.11"))
        close(held)
        apply.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(apply.terminationStatus == 1, "\(text)")
        #expect(text.contains("waiting for another weft apply or delete on \(config)"), "\(text)")
        #expect(text.contains("api.yaml:1:spec.clusterIP: clusterIP 198.19.0.11 is already used by Service shop/other"), "\(text)")
        #expect(text.contains("nothing applied"), "\(text)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config).sorted() == ["other.yaml", "services.yaml"])
    }

    /// `weft apply` and `weft delete` say what they do object by object
    /// (created, configured, unchanged; deleted for what a replaced or
    /// removed file held), and with `--dry-run` say the same and write
    /// nothing.
    @Test func applyAndDeleteReportEachObjectAndDryRunWritesNothing() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config"
        let api = Self.service.replacingOccurrences(of: "name: web,", with: "name: api,")
            .replacingOccurrences(of: "198.19.0.10", with: "198.19.0.11")
        let original = Self.service + "\n---\n" + api
        _ = try file("config/services.yaml", original)
        // The same file name: web's port changed, api gone, cart new.
        let cart = Self.service.replacingOccurrences(of: "name: web,", with: "name: cart,")
            .replacingOccurrences(of: "198.19.0.10", with: "198.19.0.12")
        let changed = try file("incoming/services.yaml",
                               Self.service.replacingOccurrences(of: "port: 80", with: "port: 81") + "\n---\n" + cart)
        let dry = try LabHarness.run(["apply", "--dry-run", "-f", changed, "--config", config])
        #expect(dry.status == 0, "\(dry.output)")
        #expect(dry.output.contains("""
            Service shop/web configured
            Service shop/cart created
            Service shop/api deleted
            dry run: nothing written to \(config) (1 created, 1 configured, 0 unchanged, 1 deleted)
            """), "\(dry.output)")
        #expect(try String(contentsOfFile: "\(config)/services.yaml", encoding: .utf8) == original)

        let applied = try LabHarness.run(["apply", "-f", changed, "--config", config])
        #expect(applied.status == 0, "\(applied.output)")
        #expect(applied.output.hasSuffix("Service shop/web configured\nService shop/cart created\nService shop/api deleted\n"
                                         + "applied 1 file(s) to \(config): services.yaml\n"), "\(applied.output)")
        let again = try LabHarness.run(["apply", "-f", changed, "--config", config])
        #expect(again.output.contains("Service shop/web unchanged\nService shop/cart unchanged\napplied"), "\(again.output)")

        let dryDelete = try LabHarness.run(["delete", "--dry-run", "-f", "services.yaml", "--config", config])
        #expect(dryDelete.status == 0, "\(dryDelete.output)")
        #expect(dryDelete.output.contains("""
            Service shop/cart deleted
            Service shop/web deleted
            dry run: nothing removed from \(config) (0 created, 0 configured, 0 unchanged, 2 deleted)
            """), "\(dryDelete.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config) == ["services.yaml"])
        // A dry run is refused as the real one would be.
        let bad = try file("incoming/bad.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: dup,"))
        let refused = try LabHarness.run(["apply", "--dry-run", "-f", bad, "--config", config])
        #expect(refused.status == 1 && refused.output.contains("nothing applied"), "\(refused.output)")
        let deleted = try LabHarness.run(["delete", "-f", "services.yaml", "--config", config])
        #expect(deleted.output == "Service shop/cart deleted\nService shop/web deleted\nremoved 1 file(s) from \(config): services.yaml\n",
                "\(deleted.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config).isEmpty)
    }

    /// `weft delete` removes files only when the set left validates: a
    /// Service a route still names stays until the route goes.
    @Test func deleteRemovesFilesOnlyWhenWhatIsLeftIsValid() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = "\(dir)/config"
        _ = try file("config/services.yaml", Self.service)
        _ = try file("config/route.yaml", """
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: web, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: web, port: 80}]
              rules: [{backendRefs: [{name: web, port: 80}]}]
            """)
        let refused = try LabHarness.run(["delete", "-f", "services.yaml", "--config", config])
        #expect(refused.status == 1, "\(refused.output)")
        #expect(refused.output.contains("route.yaml:1:spec.parentRefs[0].name: no Service shop/web in this config"), "\(refused.output)")
        #expect(refused.output.contains("nothing removed"))
        let absent = try LabHarness.run(["delete", "-f", "services.yaml", "-f", "gone.yaml", "--config", config])
        #expect(absent.status == 1 && absent.output.contains("not in \(config): gone.yaml"), "\(absent.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config).sorted() == ["route.yaml", "services.yaml"])

        // The route first (by the path it was applied from), then the Service.
        let route = try file("incoming/route.yaml", "")
        let first = try LabHarness.run(["delete", "-f", route, "--config", config])
        #expect(first.status == 0, "\(first.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config) == ["services.yaml"])
        let second = try LabHarness.run(["delete", "-f", "services.yaml", "--config", config])
        #expect(second.status == 0 && second.output.contains("removed 1 file(s)"), "\(second.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: config).isEmpty)
    }

    /// A path that holds no manifest (a wrong directory, files named
    /// *.yaml.txt) is an error, not a valid empty set; a valid set is
    /// counted by kind, every kind it has.
    @Test func validateRefusesNothingAndCountsEveryKind() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try file("empty/notes.yaml.txt", Self.service)
        let nothing = try LabHarness.run(["validate", "-f", "\(dir)/empty"])
        #expect(nothing.status == 1)
        #expect(nothing.output.contains("\(dir)/empty: holds no manifest files (*.yaml, *.yml, *.json)"), "\(nothing.output)")
        let policy = try file("set/policy.yaml", Self.service + """

            ---
            apiVersion: weft.dev/v1alpha1
            kind: TrafficPolicy
            metadata: {name: web, namespace: shop}
            spec: {targetRefs: [{name: web}], loadBalancer: {type: RoundRobin}}
            ---
            apiVersion: v1
            kind: Node
            metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}
            """)
        let counted = try LabHarness.run(["validate", "-f", policy])
        #expect(counted.status == 0, "\(counted.output)")
        #expect(counted.output.contains("valid: 1 Service(s), 0 Workload(s), 0 Namespace(s), 0 NetworkPolicy(s), 0 HTTPRoute(s), 1 TrafficPolicy(s), 1 Node(s)"),
                "\(counted.output)")
    }

    /// `weft route check` over a table made from manifests: the rule, the
    /// split's shares and endpoints, the routes a client's namespace sees
    /// (a consumer route's), a GRPCRoute's method match, 404 with exit 3,
    /// JSON, and a destination the proxy does not handle named as such.
    @Test func routeCheckSaysWhereARequestGoes() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = try file("routes/all.yaml", """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: web-v2, namespace: shop}
            spec: {clusterIP: 198.19.0.11, selector: {app: web, track: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: db, namespace: shop}
            spec: {clusterIP: 198.19.0.12, selector: {app: db}, ports: [{port: 5432}]}
            ---
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: w1, namespace: shop, labels: {app: web}}
            spec: {node: n1, address: 198.18.1.20}
            ---
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: w2, namespace: shop, labels: {app: web, track: v2}}
            spec: {node: n2, address: 198.18.2.20}
            ---
            apiVersion: weft.dev/v1alpha1
            kind: Workload
            metadata: {name: app, namespace: front}
            spec: {node: n1, address: 198.18.1.30}
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: split, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: web}]
              rules:
              - backendRefs: [{name: web, port: 80, weight: 3}, {name: web-v2, port: 80, weight: 1}]
                timeouts: {request: 1500ms}
                sessionPersistence: {sessionName: cart, absoluteTimeout: 1h}
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: HTTPRoute
            metadata: {name: pinned, namespace: front}
            spec:
              parentRefs: [{group: "", kind: Service, namespace: shop, name: web}]
              rules:
              - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: x-team, value: front}]}]
                backendRefs: [{name: web-v2, namespace: shop, port: 80}]
            ---
            apiVersion: gateway.networking.k8s.io/v1
            kind: GRPCRoute
            metadata: {name: rpc, namespace: shop}
            spec:
              parentRefs: [{group: "", kind: Service, name: web-v2}]
              rules:
              - matches: [{method: {service: shop.Catalog, method: List}}]
                backendRefs: [{name: web, port: 80}]
                sessionPersistence: {type: Header, idleTimeout: 10m}
            """)
        func check(_ args: [String]) throws -> (status: Int32, output: String) {
            let r = try LabHarness.run(["route", "check", "-f", config] + args)
            return (r.status, r.output)
        }
        let producer = try check(["--to", "shop/web", "--from", "shop/w1", "--path", "/v2/x"])
        #expect(producer.status == 0, "\(producer.output)")
        #expect(producer.output.contains("rule:     shop/split#0") && producer.output.contains("the Service's own routes"), "\(producer.output)")
        #expect(producer.output.contains("shop/web:80 weight 3 (75.0%): 198.18.1.20:8080 (n1), 198.18.2.20:8080 (n2)")
                && producer.output.contains("shop/web-v2:80 weight 1 (25.0%): 198.18.2.20:8080 (n2)")
                && producer.output.contains("timeouts: request 1500ms")
                && producer.output.contains("session:  cookie cart, absoluteTimeout 3600s (a client's session"), "\(producer.output)")
        let consumer = try check(["--to", "198.19.0.10:80", "--from", "front/app", "--path", "/v2/x", "-H", "X-Team: front"])
        #expect(consumer.status == 0 && consumer.output.contains("rule:     front/pinned#0")
                && consumer.output.contains("the consumer routes of namespace front")
                && consumer.output.contains("match:    PathPrefix /v2, header x-team = front"), "\(consumer.output)")
        // The path as the proxy reads it: in normal form (/x/../v2 is /v2).
        let spelled = try check(["--to", "198.19.0.10:80", "--from", "front/app", "--path", "/x/../%76%32/y", "-H", "X-Team: front"])
        #expect(spelled.status == 0 && spelled.output.contains("/x/../%76%32/y (as /v2/y)")
                && spelled.output.contains("rule:     front/pinned#0"), "\(spelled.output)")
        // Without --from: the Service's own routes, and who is routed otherwise.
        let anyone = try check(["--to", "shop/web", "--path", "/v2/x"])
        #expect(anyone.status == 0 && anyone.output.contains("rule:     shop/split#0")
                && anyone.output.contains("the Service's own routes (namespace front routes its own clients by consumer routes"),
                "\(anyone.output)")
        let malformed = try check(["--to", "shop/web", "--path", "/a%zz"])
        #expect(malformed.status != 0 && malformed.output.contains("malformed percent-encoding"), "\(malformed.output)")
        let unmatched = try check(["--to", "shop/web", "--from", "front/app", "--path", "/v2/x"])
        #expect(unmatched.status == 3 && unmatched.output.contains("none matches: the proxy answers 404"), "\(unmatched.output)")
        let grpc = try check(["--to", "shop/web-v2:80", "--method", "POST", "--path", "/shop.Catalog/List", "-o", "json"])
        let json = try JSONSerialization.jsonObject(with: Data(grpc.output.utf8)) as? [String: Any]
        #expect(grpc.status == 0 && json?["rule"] as? String == "shop/rpc#0" && json?["match"] as? String == "gRPC shop.Catalog/List",
                "\(grpc.output)")
        // (A rule's own header name when it gives none: no two rules share one.)
        let session = json?["session"] as? String ?? ""
        #expect(session.hasPrefix("header x-weft-session-") && session.hasSuffix(", idleTimeout 600s"), "\(grpc.output)")
        #expect(!(consumer.output.contains("session:")), "\(consumer.output)")
        // A port the kernel alone serves: its slots as the kernel has them.
        let l4 = try check(["--to", "shop/db"])
        #expect(l4.status == 0 && l4.output.contains("connect:  shop/db:5432 (198.19.0.12:5432/TCP)")
                && l4.output.contains("the kernel alone") && l4.output.contains("backends: none: connect() fails at once"), "\(l4.output)")
        let nothing = try check(["--to", "shop/nope"])
        #expect(nothing.status != 0 && nothing.output.contains("--to shop/nope: no Service port by that name or address"), "\(nothing.output)")
        let nobody = try check(["--to", "shop/web", "--from", "shop/ghost"])
        #expect(nobody.status != 0 && nobody.output.contains("--from shop/ghost: no such pod"), "\(nobody.output)")
    }

    @Test func validateListsEveryErrorAndExitsNonZero() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let bad = try file("bad.yaml", Self.service.replacingOccurrences(of: "port: 80", with: "port: 99999")
                           + "\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}\n")
        let r = try LabHarness.run(["validate", "-f", bad])
        #expect(r.status == 1)
        #expect(r.output.contains("bad.yaml:1:spec.ports[0].port: port must be between 1 and 65535, got 99999"), "\(r.output)")
        #expect(r.output.contains("bad.yaml:2:kind: unknown kind \"Pod\""), "\(r.output)")
        let missing = try LabHarness.run(["validate", "-f", "\(dir)/nope"])
        #expect(missing.status == 1)
        #expect(missing.output.contains("no such file or directory"))
    }

    /// deploy/systemd/weft-agent.service, as systemd would take it: no
    /// warning from `systemd-analyze verify` (the binary's path pointed at
    /// this build), only the agent signalled on stop (the proxy, its child
    /// in the unit's cgroup, must outlive it to be adopted), and its
    /// command line, the host name and an extra flag filled in as systemd
    /// would, one the agent takes: it runs to the agent's own first refusal
    /// (a --cgroup outside the cgroup v2 mount; as non-root, the root check),
    /// never to a usage error, and leaves nothing in the kernel.
    @Test func theSystemdUnitIsValidAndRunsACommandTheAgentTakes() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let unitPath = LabHarness.packageRoot.appendingPathComponent("deploy/systemd/weft-agent.service").path
        let unit = try String(contentsOfFile: unitPath, encoding: .utf8)
        let settings = unit.split(separator: "\n").filter { !$0.hasPrefix("#") && $0.contains("=") }
        func value(_ key: String) -> [String] {
            settings.filter { $0.hasPrefix("\(key)=") }.map { String($0.dropFirst(key.count + 1)) }
        }
        #expect(value("KillMode") == ["process"])
        #expect(value("Restart") == ["always"])
        #expect(value("ExecReload") == ["/bin/kill -HUP $MAINPID"])
        let execStart = try #require(value("ExecStart").first)
        let installed = "/usr/local/bin/weft"
        #expect(execStart.hasPrefix(installed + " agent "), "\(execStart)")

        // systemd-analyze checks the unit's syntax and that ExecStart's
        // program exists; here, this build's.
        let copy = try file("weft-agent.service", unit.replacingOccurrences(of: installed, with: LabHarness.weft))
        let verify = try LabHarness.execute("/usr/bin/systemd-analyze", ["verify", copy])
        #expect(verify.status == 0 && verify.output.isEmpty, "\(verify.status): \(verify.output)")

        // %l: the short host name; $WEFT_AGENT_ARGS: the defaults file's flags.
        let defaults = try String(contentsOfFile: LabHarness.packageRoot.appendingPathComponent("deploy/weft-agent.default").path,
                                  encoding: .utf8)
        #expect(defaults.contains("\nWEFT_AGENT_ARGS=\"\""), "\(defaults)")
        let node = "weft-deploy-\(getpid())"
        let extra = ["--cgroup", "/weft-deploy-not-a-cgroup"]
        let args = execStart.split(separator: " ").dropFirst().flatMap { word -> [String] in
            switch word {
            case "%l": [node]
            case "$WEFT_AGENT_ARGS": extra
            default: [String(word)]
            }
        }
        let run = try LabHarness.execute(LabHarness.weft, args)
        #expect(run.status == 2, "\(run.status): \(run.output)")
        #expect(!run.output.contains("Error:") && !run.output.contains("Usage:"), "\(run.output)")
        let refusal = LabHarness.isRoot ? "weft agent: --cgroup /weft-deploy-not-a-cgroup is not inside the cgroup v2 mount"
                                        : "weft agent: weft agent needs root"
        #expect(run.output.contains(refusal), "\(run.output)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/\(node)"))
        #expect(!FileManager.default.fileExists(atPath: "/run/weft/\(node)"))
    }

    /// Flags are checked before anything is loaded: a bad one exits with
    /// the flag named and nothing made in the kernel.
    @Test func agentRefusesBadProxyThreads() throws {
        for bad in ["0", "257", "-1"] {
            let r = try LabHarness.run(["agent", "--config", "/tmp", "--node", "weft-badflag", "--proxy-threads=\(bad)"])
            #expect(r.status == 64, "\(r.status): \(r.output)")
            #expect(r.output.contains("--proxy-threads must be 1-256, got \(bad)"), "\(r.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/weft-badflag"))
        let lab = try LabHarness.run(["lab", "up", "--config", "/nonexistent/weft-badflag", "--proxy-threads", "0"])
        #expect(lab.status == 64 && lab.output.contains("--proxy-threads must be 1-256, got 0"), "\(lab.output)")
    }

    @Test(.enabled(if: LabHarness.canRun, LabHarness.skipReason))
    func agentRefusesWithOneSentenceWithoutPrivilege() throws {
        try #require(LabHarness.isRoot, "CI=true: must run as root to drop privileges")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        p.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                       LabHarness.weft, "agent", "--config", "/tmp", "--node", "weft-unprivileged"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 2)
        #expect(out == "weft agent: weft agent needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load eBPF programs; run it as root.\n", "\(out)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/weft-unprivileged"))
    }

    /// `weft agent --uninstall` takes the node proxy with the datapath: the
    /// proxy exits, and the files the agent wrote for it (route table, its
    /// generation, the identity bundle with private keys) go with the run
    /// directory; anything else there is left and named.
    /// `weft agent` for `node` on `config`, in `cgroup` (made here), its
    /// output dropped; stop it with `stopAgent`.
    static func startAgent(node: String, config: String, cgroup: String, _ extra: [String] = []) throws -> Process {
        mkdir(cgroup, 0o755)
        let agent = Process()
        agent.executableURL = URL(fileURLWithPath: LabHarness.weft)
        agent.arguments = ["agent", "--config", config, "--node", node, "--cgroup", cgroup, "--metrics-addr", "127.0.0.1:0"] + extra
        agent.standardOutput = FileHandle.nullDevice
        agent.standardError = FileHandle.nullDevice
        try agent.run()
        return agent
    }

    /// Stops a `startAgent` agent, uninstalls its node and removes its cgroup.
    static func stopAgent(_ agent: Process, node: String, cgroup: String) {
        if agent.isRunning { agent.terminate(); agent.waitUntilExit() }
        _ = try? LabHarness.run(["agent", "--node", node, "--uninstall"])
        rmdir(cgroup)
    }

    /// A cgroup of a test's own, `name` under the cgroup v2 mount (made by the test).
    static func cgroup(_ name: String) throws -> String {
        let mounts = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
        let mount = mounts.split(separator: "\n").map { $0.split(separator: " ") }.first { $0.count > 2 && $0[2] == "cgroup2" }
        return try #require(mount.map { String($0[1]) }, "no cgroup v2 mount") + "/" + name
    }

    /// --config written as "DIR/.": the path's last part is the directory
    /// itself, which has no parent of its own to watch (a second watch on
    /// it would replace the first's events); a change in it still applies.
    @Test(.enabled(if: LabHarness.canRun, LabHarness.skipReason))
    func aConfigPathEndingInDotIsWatched() throws {
        try #require(LabHarness.isRoot, "CI=true: must run as root")
        let node = "weft-e2e-dotconfig"
        let cgroup = try Self.cgroup(node)
        let config = (try file("agent/web.yaml", Self.service) as NSString).deletingLastPathComponent
        let agent = try Self.startAgent(node: node, config: config + "/.", cgroup: cgroup, ["--proxy-address", "none"])
        defer {
            Self.stopAgent(agent, node: node, cgroup: cgroup)
            try? FileManager.default.removeItem(atPath: dir)
        }
        func generation() -> Int? { (try? LabHarness.agent(node, "/status"))?.json?["generation"] as? Int }
        var before: Int?
        for _ in 0..<100 where before == nil {
            usleep(50_000)
            before = generation()
        }
        let first = try #require(before, "the agent never answered")
        _ = try file("agent/api.yaml", Self.service.replacingOccurrences(of: "name: web,", with: "name: api,")
                         .replacingOccurrences(of: "198.19.0.10", with: "198.19.0.11"))
        var after = first
        for _ in 0..<40 where after == first {
            usleep(50_000)
            after = generation() ?? first
        }
        #expect(after > first, "generation \(first) -> \(after)")
    }

    /// An agent whose --metrics-addr is taken stops before it touches the
    /// kernel, saying so, rather than after loading, attaching and writing
    /// the maps and starting a proxy. (Its own empty cgroup, and a time
    /// limit, in case it did not.)
    @Test(.enabled(if: LabHarness.canRun, LabHarness.skipReason))
    func anAgentWhoseMetricsAddressIsTakenStopsBeforeTheKernel() throws {
        try #require(LabHarness.isRoot, "CI=true: must run as root")
        let node = "weft-e2e-metrics"
        let cgroup = try Self.cgroup(node)
        let config = try file("agent/web.yaml", Self.service)
        let taken = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: 0, sin_addr: in_addr(s_addr: UInt32(0x7f00_0001).bigEndian),
                                  sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let listening = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(taken, $0, length) == 0 && listen(taken, 1) == 0 && getsockname(taken, $0, &length) == 0
            }
        }
        try #require(listening)
        let port = UInt16(bigEndian: address.sin_port)
        mkdir(cgroup, 0o755)
        defer {
            close(taken)
            _ = try? LabHarness.run(["agent", "--node", node, "--uninstall"])
            rmdir(cgroup)
            try? FileManager.default.removeItem(atPath: dir)
        }
        let r = try LabHarness.execute("/usr/bin/timeout", ["10", LabHarness.weft, "agent", "--config", (config as NSString).deletingLastPathComponent,
                                                            "--node", node, "--cgroup", cgroup, "--metrics-addr", "127.0.0.1:\(port)",
                                                            "--proxy-address", "none"])
        #expect(r.status == 2, "\(r.output)")
        #expect(r.output.contains("weft agent: --metrics-addr 127.0.0.1:\(port): cannot listen: Address already in use"), "\(r.output)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/\(node)"))
        #expect(!FileManager.default.fileExists(atPath: "/run/weft/\(node)"))
    }

    @Test(.enabled(if: LabHarness.canRun, LabHarness.skipReason))
    func agentUninstallRemovesTheProxyAndItsRunState() throws {
        try #require(LabHarness.isRoot, "CI=true: must run as root")
        let node = "weft-e2e-uninstall"
        let run = "/run/weft/\(node)"
        let cgroup = try Self.cgroup(node)
        let config = try file("agent/web.yaml", """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{name: http, port: 80, appProtocol: http}]}
            """)
        let agent = try Self.startAgent(node: node, config: (config as NSString).deletingLastPathComponent, cgroup: cgroup)
        defer {
            Self.stopAgent(agent, node: node, cgroup: cgroup)
            try? FileManager.default.removeItem(atPath: run)  // also when the uninstall failed to
            try? FileManager.default.removeItem(atPath: dir)
        }
        var proxyPid: Int32?
        for _ in 0..<100 where proxyPid == nil || !FileManager.default.fileExists(atPath: run + "/proxy-table.json") {
            usleep(50_000)
            proxyPid = (try? String(contentsOfFile: run + "/proxy.pid", encoding: .utf8))
                .flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        let pid = try #require(proxyPid, "no proxy started")
        agent.terminate()
        agent.waitUntilExit()
        // The agent exits alone; its proxy stays until the uninstall.
        #expect(kill(pid, 0) == 0, "the proxy went with the agent")
        // Stand-ins for a bundle the agent would write with a CA, and for a
        // file that is not the agent's.
        try "{}".write(toFile: run + "/identities.json", atomically: false, encoding: .utf8)
        try "kept\n".write(toFile: run + "/notes.txt", atomically: false, encoding: .utf8)
        let first = try LabHarness.run(["agent", "--node", node, "--uninstall"])
        #expect(first.status == 0, "\(first.output)")
        #expect(first.output.contains("left in \(run): notes.txt"), "\(first.output)")
        #expect(kill(pid, 0) != 0, "the proxy still runs after the uninstall")
        let left = (try? FileManager.default.contentsOfDirectory(atPath: run)) ?? []
        #expect(left == ["notes.txt"], "\(left)")
        unlink(run + "/notes.txt")
        let again = try LabHarness.run(["agent", "--node", node, "--uninstall"])
        #expect(!FileManager.default.fileExists(atPath: run), "\(again.output)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/bpf/weft/\(node)"))
    }
}
