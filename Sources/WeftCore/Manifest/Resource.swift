import Dispatch
import Foundation
import Synchronization

/// One parsed, individually valid manifest document.
public enum Resource: Hashable, Sendable {
    case service(Service)
    case workload(Workload)
    case namespace(Namespace, ObjectMeta)
    case node(Node, ObjectMeta)
    case networkPolicy(NetworkPolicy)
    case httpRoute(HTTPRoute)
    /// A GRPCRoute, read into the HTTPRoute model (`kind` .grpc).
    case grpcRoute(HTTPRoute)
    /// A TCPRoute or UDPRoute (`kind`), carried out in the kernel, or a
    /// TLSRoute, by the node proxy.
    case l4Route(L4Route)
    case meshConfig(MeshConfig)
    case trafficPolicy(TrafficPolicy)
    case peerAuthentication(PeerAuthentication)
    case authorizationPolicy(AuthorizationPolicy)

    public var kind: String {
        switch self {
        case .service: "Service"
        case .workload: "Workload"
        case .namespace: "Namespace"
        case .node: "Node"
        case .networkPolicy: "NetworkPolicy"
        case .httpRoute: "HTTPRoute"
        case .grpcRoute: "GRPCRoute"
        case .l4Route(let r): r.kind.rawValue
        case .meshConfig: "MeshConfig"
        case .trafficPolicy: "TrafficPolicy"
        case .peerAuthentication: "PeerAuthentication"
        case .authorizationPolicy: "AuthorizationPolicy"
        }
    }

    public var metadata: ObjectMeta {
        switch self {
        case .service(let s): s.metadata
        case .workload(let w): w.metadata
        case .namespace(_, let m), .node(_, let m): m
        case .networkPolicy(let p): p.metadata
        case .httpRoute(let r), .grpcRoute(let r): r.metadata
        case .l4Route(let r): r.metadata
        case .meshConfig(let m): m.metadata
        case .trafficPolicy(let p): p.metadata
        case .peerAuthentication(let p): p.metadata
        case .authorizationPolicy(let p): p.metadata
        }
    }

    /// The kinds Weft reads, by apiVersion and kind.
    static let known: [String: Set<String>] = [
        "v1": ["Service", "Namespace", "Node"],
        "networking.k8s.io/v1": ["NetworkPolicy"],
        "weft.dev/v1alpha1": ["Workload", "MeshConfig", "TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy"],
        "gateway.networking.k8s.io/v1": ["HTTPRoute", "GRPCRoute", "TLSRoute"],
        "gateway.networking.k8s.io/v1alpha2": ["TCPRoute", "UDPRoute", "TLSRoute"],
    ]

    init(document node: YAMLNode, at location: DocumentLocation) throws(ManifestError) {
        var doc = try FieldReader(node, at: location, path: "")
        let apiVersion = try doc.requiredString("apiVersion")
        let kind = try doc.requiredString("kind")
        guard let kinds = Self.known[apiVersion] else {
            throw doc.error("apiVersion", "unknown apiVersion \(quoted(apiVersion)) (known: \(Self.known.keys.sorted().joined(separator: ", ")))")
        }
        guard kinds.contains(kind) else {
            throw doc.error("kind", "unknown kind \(quoted(kind)) for \(apiVersion) (known: \(kinds.sorted().joined(separator: ", ")))")
        }
        guard let metaReader = try doc.mapping("metadata") else {
            throw doc.error("metadata", "required field is missing")
        }
        doc.ignore("status")
        // A bad metadata field does not hide the spec's mistakes: the spec is
        // read too, under the name and namespace as written, and the errors
        // of both are listed.
        var found = ErrorList()
        let metadata = found.attempt { () throws(ManifestError) in try ObjectMeta(reading: metaReader) }
            ?? ObjectMeta.asWritten(metaReader)
        let resource = found.attempt { () throws(ManifestError) in
            try Self.read(kind: kind, apiVersion: apiVersion, doc: &doc, metadata: metadata, metaReader: metaReader, at: location)
        }
        try found.check()
        guard let resource else { throw doc.error("spec", "not read") }  // (check() threw already)
        self = resource
    }

    /// The document's spec (and a Namespace's own checks), its metadata read.
    private static func read(kind: String, apiVersion: String, doc: inout FieldReader, metadata: ObjectMeta,
                             metaReader: FieldReader, at location: DocumentLocation) throws(ManifestError) -> Resource {
        var metadata = metadata
        if kind == "Namespace" || kind == "Node" {
            // Cluster-scoped: no metadata.namespace, and spec is optional.
            if metaReader.keys.contains("namespace") {
                throw ManifestError(location, field: "metadata.namespace", "a \(kind) is not namespaced")
            }
            metadata.namespace = ""
            let spec = doc.node("spec")
            let status = doc.node("status")
            try doc.finish()
            if kind == "Node" { return .node(try Node(spec: spec, status: status, metadata: metadata, at: location), metadata) }
            return .namespace(try Namespace(spec: spec, metadata: metadata, at: location), metadata)
        }
        let spec = try doc.required("spec")
        let status = doc.node("status")
        try doc.finish()
        switch kind {
        case "Service": return .service(try Service(spec: spec, status: status, metadata: metadata, at: location))
        case "NetworkPolicy": return .networkPolicy(try NetworkPolicy(spec: spec, metadata: metadata, at: location))
        case "HTTPRoute": return .httpRoute(try HTTPRoute(spec: spec, metadata: metadata, at: location))
        case "GRPCRoute": return .grpcRoute(try HTTPRoute(spec: spec, metadata: metadata, kind: .grpc, at: location))
        case "TCPRoute": return .l4Route(try L4Route(spec: spec, metadata: metadata, kind: .tcp, at: location))
        case "UDPRoute": return .l4Route(try L4Route(spec: spec, metadata: metadata, kind: .udp, at: location))
        case "TLSRoute":
            return .l4Route(try L4Route(spec: spec, metadata: metadata, kind: .tls,
                                        hostnamesRequired: apiVersion == "gateway.networking.k8s.io/v1", at: location))
        case "MeshConfig": return .meshConfig(try MeshConfig(spec: spec, metadata: metadata, at: location))
        case "TrafficPolicy": return .trafficPolicy(try TrafficPolicy(spec: spec, metadata: metadata, at: location))
        case "PeerAuthentication": return .peerAuthentication(try PeerAuthentication(spec: spec, metadata: metadata, at: location))
        case "AuthorizationPolicy":
            return .authorizationPolicy(try AuthorizationPolicy(spec: spec, metadata: metadata, at: location))
        default:
            // The annotation's error beside the spec's, not instead of them.
            var found = ErrorList()
            found.attempt { () throws(ManifestError) in try Workload.checkShortcutAnnotation(metadata, at: location) }
            let workload = found.attempt { () throws(ManifestError) in try Workload(spec: spec, metadata: metadata, at: location) }
            try found.check()
            guard let workload else { throw doc.error("spec", "not read") }  // (check() threw already)
            return .workload(workload)
        }
    }
}

/// A resource with the document it came from.
public struct LocatedResource: Hashable, Sendable {
    public var resource: Resource
    public var location: DocumentLocation
}

/// Reads YAML files into resources. Collects every error it can find rather
/// than stopping at the first, so one `weft validate` run lists them all:
/// every document's, and within a document those its reader found past the
/// first (`ManifestError.further`).
public enum ManifestReader {
    /// Files above this size are split at document markers and parsed on
    /// every core, in 4 pieces per core so that pieces of uneven cost
    /// (Services parse slower per byte than Workloads) balance out.
    static let parallelThreshold = 256 * 1024

    /// Parses one file's text. `file` is only used in locations.
    public static func parse(_ text: String, file: String) -> (resources: [LocatedResource], errors: [ManifestError]) {
        let cores = ProcessInfo.processInfo.activeProcessorCount
        guard text.utf8.count > parallelThreshold, cores > 1 else { return parseWhole(text, file: file).0 }
        return parseChunked(text, file: file, chunks: cores * 4)
    }

    /// Splits `text` into about `chunks` pieces at lines that start a YAML
    /// document (`---` at column 0, then end of line or a blank). Such a line
    /// is a document boundary wherever it stands (YAML 1.2, c-forbidden: no
    /// scalar may contain it), so each piece is a stream of whole documents.
    /// Returns each piece with the line it starts on (0-based).
    static func split(_ text: String, chunks: Int) -> [(text: Substring, firstLine: Int)] {
        let utf8 = text.utf8
        let target = max(utf8.count / max(chunks, 1), 1)
        var pieces: [(Substring, Int)] = []
        var start = text.startIndex
        var startLine = 0
        var line = 0
        var lineStart = text.startIndex
        var i = utf8.startIndex
        while i < utf8.endIndex {
            if utf8[i] == UInt8(ascii: "\n") {
                line += 1
                lineStart = utf8.index(after: i)
                let rest = utf8[lineStart...]
                if utf8.distance(from: start, to: lineStart) >= target, pieces.count < chunks - 1,
                   rest.starts(with: "---".utf8) {
                    let after = rest.dropFirst(3).first
                    if after == nil || after == UInt8(ascii: "\n") || after == UInt8(ascii: " ")
                        || after == UInt8(ascii: "\t") || after == UInt8(ascii: "\r") {
                        pieces.append((text[start..<lineStart], startLine))
                        start = lineStart
                        startLine = line
                    }
                }
            }
            i = utf8.index(after: i)
        }
        pieces.append((text[start...], startLine))
        return pieces
    }

    static func parseChunked(_ text: String, file: String, chunks: Int)
        -> (resources: [LocatedResource], errors: [ManifestError])
    {
        let pieces = split(text, chunks: chunks)
        let results = Mutex<[Int: ((resources: [LocatedResource], errors: [ManifestError]), documents: Int)]>([:])
        DispatchQueue.concurrentPerform(iterations: pieces.count) { i in
            let r = parseWhole(String(pieces[i].text), file: file)
            results.withLock { $0[i] = r }
        }
        var resources: [LocatedResource] = []
        var errors: [ManifestError] = []
        var documentOffset = 0
        let all = results.withLock { $0 }
        for (i, piece) in pieces.enumerated() {
            guard let (r, documents) = all[i] else { continue }
            // Each piece counts its documents from 1: shift by those before it.
            resources += r.resources.map {
                var l = $0
                l.location.document += documentOffset
                return l
            }
            errors += r.errors.map {
                var e = $0
                e.location.document += documentOffset
                e.line = e.line.map { $0 + piece.firstLine }
                return e
            }
            documentOffset += documents
            if r.errors.contains(where: { $0.reason.hasPrefix("not valid YAML") }) { break }
        }
        return (resources, errors)
    }

    /// The whole-text parse; also returns how many documents it walked.
    static func parseWhole(_ text: String, file: String)
        -> ((resources: [LocatedResource], errors: [ManifestError]), Int)
    {
        var resources: [LocatedResource] = []
        var errors: [ManifestError] = []
        var index = 0
        let (documents, syntaxError) = YAMLStream.documents(text) { root in
            index += 1
            let location = DocumentLocation(file: file, document: index)
            // An empty document (a stray `---`) is allowed and skipped.
            guard let root, root.tagName != .null else { return }
            do throws(ManifestError) {
                resources.append(LocatedResource(resource: try Resource(document: root, at: location), location: location))
            } catch {
                errors.append(contentsOf: error.listed)
            }
        }
        if let syntaxError {
            errors.append(ManifestError(DocumentLocation(file: file, document: max(documents, 1)), field: "",
                                        "not valid YAML: \(syntaxError)", line: syntaxError.line))
        }
        return ((resources, errors), documents)
    }
}
