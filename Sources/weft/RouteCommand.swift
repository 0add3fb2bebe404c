import ArgumentParser
import Foundation
import WeftCore
import WeftProxy

struct RouteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "route", abstract: "Ask the proxy's route table where a request would go.",
        subcommands: [Check.self])

    /// `weft route check`: the route rule a request would take, matched by
    /// the proxy's own RouteMatcher over the table an agent has in force (or
    /// one made from manifests), with the routes its client's namespace
    /// sees (a GAMMA consumer route's, or the Service's own): the rule, its
    /// filters, backends with their share and endpoints, timeouts and retry.
    /// Exit status 0: routed (or answered by a redirect); 3: no rule matches
    /// (the proxy answers 404). A port the kernel alone serves (no HTTP
    /// declared, no HTTPRoute) is shown as the kernel has it: its slots'
    /// backends, a TCPRoute's or UDPRoute's split with them. A TLSRoute's
    /// port is asked with `--sni` (the server name a ClientHello sends):
    /// the route it matches and its split, exit 3 when none (closed).
    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Which route rule, filters and backends a request gets (exit 0 routed, 3 no route: 404).")

        @Option(help: "Destination: a Service as namespace/name[:port], or clusterIP:port.") var to: String
        @Option(help: "Client: a pod as namespace/name (its namespace's consumer routes apply).") var from: String?
        @Option(help: "Request path, with an optional ?query.") var path = "/"
        @Option(help: "Request method.") var method = "GET"
        @Option(name: .customShort("H"), help: "A request header, \"Name: value\" (repeatable).") var header: [String] = []
        @Option(help: "TLS server name (SNI) a client sends, for a port TLSRoutes route (none: a ClientHello without one).")
        var sni: String?
        @Option(name: .shortAndLong, help: "Make the table from these manifests (file or directory, repeatable) instead of reading an agent's.")
        var file: [String] = []
        @Option(help: "Node whose table to read (default: the first agent on this machine).") var node: String?
        @Option(name: .shortAndLong, help: "Output: text or json.") var output = "text"

        func validate() throws {
            guard path.hasPrefix("/") else { throw ValidationError("--path must start with \"/\", got \(path)") }
            guard ["text", "json"].contains(output) else { throw ValidationError("--output must be text or json, got \(output)") }
            for h in header where !h.contains(":") { throw ValidationError("-H \(h): give \"Name: value\"") }
        }

        func run() throws {
            let (table, kernel) = try loadTable()
            guard let (key, frontend) = try destination(in: table) else { return try reportKernel(kernel()) }
            var routes = frontend
            var scope = "the Service's own routes"
            if let from {
                guard let ref = table.workloads?.values.first(where: { "\($0.namespace)/\($0.name)" == from }) else {
                    throw ValidationError("--from \(from): no such pod (namespace/name, as `weft get workloads` shows)")
                }
                if let consumers = frontend.consumers?[ref.namespace] {
                    routes = consumers.applied(to: frontend)
                    scope = "the consumer routes of namespace \(ref.namespace)"
                }
            } else if let consumers = frontend.consumers, !consumers.isEmpty {
                // Some clients are routed otherwise: say by whom.
                scope += " (namespace\(consumers.count == 1 ? "" : "s") \(consumers.keys.sorted().joined(separator: ", ")) "
                    + "route\(consumers.count == 1 ? "s" : "") its own clients by consumer routes: --from NS/POD shows theirs)"
            }
            if routes.sni != nil { return try reportTLS(key, routes, table, scope: scope) }
            // As the proxy does first: the path in normal form (RequestPath).
            var target = path
            switch RequestPath.normalize(target: path, mode: table.pathNormalization ?? .base) {
            case .normal: break
            case .changed(let normal): target = normal
            case .malformed: throw ValidationError("--path \(path): a malformed percent-encoding (the proxy answers 400)")
            }
            let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            var headers: [String: [String]] = [:]
            for h in header {
                let colon = h.firstIndex(of: ":") ?? h.endIndex
                headers[h[..<colon].trimmingCharacters(in: .whitespaces).lowercased(), default: []]
                    .append(h[h.index(after: colon)...].trimmingCharacters(in: .whitespaces))
            }
            let request = RouteMatcher.Request(method: method.uppercased(), path: parts[0], query: parts.count > 1 ? parts[1] : nil,
                                               header: { headers[$0] ?? [] })
            let what = "\(method.uppercased()) \(target == path ? path : "\(path) (as \(target))")\(sender) to \(key) (\(frontend.name))"
            guard let (action, match) = RouteMatcher(routes).route(request) else {
                report(["request": what, "routes": scope, "rule": NSNull(), "answer": "404: no rule matches"],
                       text: ["request:  \(what)", "routes:   \(scope)", "rule:     none matches: the proxy answers 404"])
                throw ExitCode(3)
            }
            let (total, backendRows, backendJSON) = Self.backends(action, table, empty: "no endpoint ready (503)")
            let filters = (action.filters.map(Self.describe) + action.backends.flatMap { b in b.filters.map { "\(Self.describe($0)) (\(b.cluster) only)" } })
            let timeouts = [action.timeouts.request.map { "request \($0.manifestText)" },
                            action.timeouts.backendRequest.map { "backendRequest \($0.manifestText)" }].compactMap { $0 }
            let retry = action.retry.map {
                "codes \($0.codes.map(String.init).joined(separator: ",")), \($0.attempts) attempts, backoff \($0.backoff.manifestText)"
            }
            var lines = ["request:  \(what)", "routes:   \(scope)", "rule:     \(action.name)",
                         "match:    \(match.map(Self.describe) ?? "none (the Service itself: no route attached)")"]
            if !filters.isEmpty { lines.append("filters:  " + filters.joined(separator: "; ")) }
            lines += backendRows.enumerated().map { ($0.offset == 0 ? "backends: " : "          ") + $0.element }
            let redirects = action.filters.contains { if case .requestRedirect = $0 { true } else { false } }
            if total == 0 && !redirects {
                lines.append("backends: \(action.backends.isEmpty ? "none" : "only weight 0"): the proxy answers 500")
            }
            lines.append("timeouts: " + (timeouts.isEmpty ? "none" : timeouts.joined(separator: ", ")))
            if let retry { lines.append("retry:    " + retry) }
            let session = action.session.map { s in
                ["\(s.kind == .cookie ? "cookie" : "header") \(s.name)",
                 s.absoluteSeconds.map { "absoluteTimeout \($0)s" }, s.idleSeconds.map { "idleTimeout \($0)s" },
                 s.permanent ? "Permanent" : nil].compactMap { $0 }.joined(separator: ", ")
            }
            if let session { lines.append("session:  " + session + " (a client's session goes to its backend first)") }
            report(["request": what, "routes": scope, "rule": action.name, "match": match.map(Self.describe) ?? NSNull(),
                    "filters": filters, "backends": backendJSON, "timeouts": timeouts, "retry": retry ?? NSNull(),
                    "session": session ?? NSNull()], text: lines)
        }

        /// A rule's backends as shown: each with its weight, share and ready endpoints.
        static func backends(_ action: ProxyTable.RouteAction, _ table: ProxyTable, empty: String)
            -> (total: Double, rows: [String], json: [[String: Any]]) {
            backends(action.backends.map { ($0.cluster, $0.weight) }, table, empty: empty)
        }

        static func backends(_ split: [(cluster: String, weight: UInt32)], _ table: ProxyTable, empty: String)
            -> (total: Double, rows: [String], json: [[String: Any]]) {
            let total = split.reduce(0) { $0 + Double($1.weight) }
            var rows: [String] = []
            var json: [[String: Any]] = []
            for b in split {
                let share = total > 0 ? Double(b.weight) / total * 100 : 0
                let endpoints = (table.clusters[b.cluster] ?? []).map { "\($0.address):\($0.port) (\($0.node))" }
                let shown = endpoints.prefix(4).joined(separator: ", ") + (endpoints.count > 4 ? ", +\(endpoints.count - 4) more" : "")
                rows.append("\(b.cluster) weight \(b.weight) (\(String(format: "%.1f", share))%): " + (endpoints.isEmpty ? empty : shown))
                json.append(["cluster": b.cluster, "weight": Int(b.weight), "percent": share, "endpoints": endpoints])
            }
            return (total, rows, json)
        }

        /// " from NS/POD" when --from names the client, for the report's first line.
        private var sender: String { from.map { " from \($0)" } ?? "" }

        /// A TLSRoute's port: the route the server name matches, as the
        /// proxy picks it (ProxyTable.SNIMatch), and its split.
        private func reportTLS(_ key: String, _ frontend: ProxyTable.Frontend, _ table: ProxyTable, scope: String) throws {
            let matches = frontend.sni ?? []
            let name = sni?.lowercased()
            let what = "TLS ClientHello with server name \(name ?? "(none)")\(sender) to \(key) (\(frontend.name))"
            if matches.isEmpty {
                // Only other namespaces' consumer TLSRoutes attach here.
                let (_, rows, json) = Self.backends([(frontend.cluster, 1)], table, empty: "no endpoint ready")
                var lines = ["request:  \(what)", "routes:   \(scope)",
                             "rule:     none (only consumer TLSRoutes of other namespaces attach here)",
                             "path:     TCP passthrough to the Service itself, whatever the client sends"]
                lines += rows.enumerated().map { ($0.offset == 0 ? "backends: " : "          ") + $0.element }
                report(["request": what, "routes": scope, "rule": NSNull(), "path": "tcp-passthrough", "backends": json], text: lines)
                return
            }
            guard let match = matches.first(where: { $0.matches(name) }), frontend.actions.indices.contains(match.action) else {
                report(["request": what, "routes": scope, "rule": NSNull(), "answer": "closed: no TLSRoute hostname matches"],
                       text: ["request:  \(what)", "routes:   \(scope)", "rule:     none matches: the proxy closes the connection"])
                throw ExitCode(3)
            }
            let action = frontend.actions[match.action]
            let (_, rows, json) = Self.backends(action, table, empty: "no endpoint ready")
            var lines = ["request:  \(what)", "routes:   \(scope)", "rule:     TLSRoute \(action.name)",
                         "match:    hostname \(match.hostname ?? "(any: the route names none)")",
                         "path:     TLS passthrough: the encrypted bytes go to the backend untouched"]
            lines += rows.enumerated().map { ($0.offset == 0 ? "backends: " : "          ") + $0.element }
            report(["request": what, "routes": scope, "rule": action.name, "match": match.hostname ?? NSNull(), "path": "tls-passthrough",
                    "backends": json], text: lines)
        }

        private func report(_ json: [String: Any], text: [String]) {
            if output == "json",
               let data = try? JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]) {
                print(String(decoding: data, as: UTF8.self))
            } else {
                print(text.joined(separator: "\n"))
            }
        }

        /// The proxy's route table, and a way to the kernel's Service ports
        /// (asked only for a port the proxy does not serve): made from the
        /// manifests given, or an agent's.
        private func loadTable() throws -> (ProxyTable, () throws -> [KernelPort]) {
            if !file.isEmpty {
                switch ManifestSource.load(paths: file) {
                case .success(let state):
                    return (ProxyTable(state), {
                        // (internalTrafficPolicy Local: the pods of --node, when given.)
                        ServiceTable(state, node: node).entries.sorted { $0.key < $1.key }.map { frontend, entry in
                            KernelPort(frontend: frontend.description, name: entry.name, backends: entry.backends.map(\.description))
                        }
                    })
                case .failure(let errors):
                    FileHandle.standardError.write(Data((errors.description + "\n").utf8))
                    throw ExitCode(1)
                }
            }
            for n in try nodes(node) {
                let path = ProxyConfiguration.tableFile(runDirectory: "/run/weft/\(n)")
                guard let data = FileManager.default.contents(atPath: path) else { continue }
                do {
                    return (try JSONDecoder().decode(ProxyTable.self, from: data), { try kernelPorts(node: n) })
                } catch {
                    throw ValidationError("\(path): not a route table this weft reads: \(error)")
                }
            }
            throw ValidationError("no agent on this machine has a proxy route table (/run/weft/NODE/proxy-table.json); give -f with manifests")
        }

        /// `--to` as "namespace/name" and a port, if it names a Service.
        private var named: (name: String, port: String?) {
            let parts = to.split(separator: ":")
            return parts.count == 2 ? (String(parts[0]), String(parts[1])) : (to, nil)
        }

        /// The proxy's frontend `--to` names: "clusterIP:port" or a
        /// Service's "namespace/name[:port]"; nil when the proxy serves no
        /// such port.
        private func destination(in table: ProxyTable) throws -> (String, ProxyTable.Frontend)? {
            if let f = table.frontends[to] { return (to, f) }
            let (name, port) = named
            let found = table.frontends.filter { key, f in
                "\(f.namespace)/\(f.service ?? "")" == name && (port == nil || key.hasSuffix(":\(port ?? "")"))
            }.sorted { $0.key < $1.key }
            guard let first = found.first else { return nil }
            guard found.count == 1 else { throw Self.ambiguous(to, name, found.map(\.key)) }
            return (first.key, first.value)
        }

        static func ambiguous(_ to: String, _ name: String, _ frontends: [String]) -> ValidationError {
            let ports = frontends.map { String($0.split(separator: ":").last?.split(separator: "/").first ?? "") }
            return ValidationError("--to \(to): the Service has ports \(Array(Set(ports)).sorted().joined(separator: ", ")); give one as \(name):PORT")
        }

        /// A port the kernel alone serves: connect() (a UDP socket's, or
        /// each datagram's sendmsg) draws one of its slots; a TCPRoute's or
        /// UDPRoute's split fills the slots by weight. Both protocols'
        /// frontends, when the port has both.
        private func reportKernel(_ ports: [KernelPort]) throws {
            let (name, port) = named
            func portOf(_ frontend: String) -> String {
                String(frontend.split(separator: "/").first?.split(separator: ":").last ?? "")
            }
            let found = ports.filter { p in
                p.frontend.hasPrefix("\(to)/") || (p.name.hasPrefix("\(name):") && (port == nil || portOf(p.frontend) == port))
            }
            guard !found.isEmpty else {
                throw ValidationError("--to \(to): no Service port by that name or address (namespace/name[:port], or clusterIP:port)")
            }
            guard Set(found.map { portOf($0.frontend) }).count == 1 else { throw Self.ambiguous(to, name, found.map(\.frontend)) }
            var lines: [String] = []
            var json: [[String: Any]] = []
            for p in found {
                // ("namespace/name:port (TCPRoute namespace/route)" when a route splits it.)
                let route = p.name.firstIndex(of: "(").map { String(p.name[p.name.index(after: $0)...].dropLast()) }
                let service = route == nil ? p.name : String(p.name[..<(p.name.firstIndex(of: " ") ?? p.name.endIndex)])
                let udp = p.frontend.lowercased().hasSuffix("/udp")
                lines += ["connect:  \(service) (\(p.frontend))",
                          "path:     the kernel alone (no HTTP declared, no HTTPRoute): "
                          + (udp ? "each datagram's sendmsg(), or a socket's connect(), draws" : "each connect() draws")
                          + " a backend from the slots; the proxy never sees it"]
                if let route { lines.append("route:    \(route) splits the slots by weight") }
                let shown = shownSlots(p.backends)
                lines.append("backends: " + (shown.isEmpty ? "none: connect() fails at once (ECONNREFUSED)" : shown.joined(separator: ", ")))
                json.append(["service": service, "frontend": p.frontend, "path": "kernel", "route": route ?? NSNull(),
                             "slots": p.backends.count, "backends": shown])
            }
            report(["request": "connect() to \(to)", "kernel": json], text: lines)
        }

        static func describe(_ m: HTTPRoute.Match) -> String {
            var parts: [String] = []
            if let g = m.grpc {
                parts.append("gRPC " + (g.service.isEmpty ? "*" : g.service) + "/" + (g.method.isEmpty ? "*" : g.method))
            } else {
                switch m.path {
                case .exact(let p): parts.append("Exact \(p)")
                case .prefix(let p): parts.append("PathPrefix \(p)")
                case .regularExpression(let p): parts.append("RegularExpression \(p)")
                }
            }
            if let method = m.method { parts.append("method \(method)") }
            parts += m.headers.map { "header \($0.name)\($0.isRegularExpression ? " ~ " : " = ")\($0.value)" }
            parts += m.queryParams.map { "query \($0.name)\($0.isRegularExpression ? " ~ " : " = ")\($0.value)" }
            return parts.joined(separator: ", ")
        }

        static func describe(_ f: HTTPRoute.Filter) -> String {
            switch f {
            case .requestHeaderModifier: "RequestHeaderModifier"
            case .responseHeaderModifier: "ResponseHeaderModifier"
            case .requestRedirect(let r): "RequestRedirect \(r.statusCode) (answered by the proxy)"
            case .urlRewrite: "URLRewrite"
            case .requestMirror(let m): "RequestMirror to \(m.namespace.map { "\($0)/" } ?? "")\(m.name):\(m.port) (\(m.percent)%)"
            }
        }
    }
}
