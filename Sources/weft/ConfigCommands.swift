import ArgumentParser
import Foundation
import WeftCore

struct ValidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "validate", abstract: "Check manifests; print file:doc:field: reason for each problem.")

    @Option(name: .shortAndLong, help: "A manifest file or directory (repeatable).") var file: [String]

    func run() throws {
        // Checking nothing is a mistake (a directory of *.yml.txt, a wrong
        // path), not a valid configuration.
        for path in file where ((try? ManifestSource.files(at: path)) ?? [path]).isEmpty {
            FileHandle.standardError.write(Data("\(path): holds no manifest files (*.yaml, *.yml, *.json)\n".utf8))
            throw ExitCode(1)
        }
        switch ManifestSource.load(paths: file) {
        case .success(let state):
            let grpc = state.httpRoutes.filter { $0.kind == .grpc }.count
            // The first five always, the rest when there are any.
            let more = [(grpc, "GRPCRoute"), (state.l4Routes.count, "TCPRoute/UDPRoute/TLSRoute"),
                        (state.trafficPolicies.count, "TrafficPolicy"), (state.peerAuthentications.count, "PeerAuthentication"),
                        (state.authorizationPolicies.count, "AuthorizationPolicy"), (state.nodes.count, "Node")]
                .filter { $0.0 > 0 }.map { ", \($0.0) \($0.1)(s)" }.joined()
            print("valid: \(state.services.count) Service(s), \(state.workloads.count) Workload(s), \(state.namespaces.count) Namespace(s), \(state.networkPolicies.count) NetworkPolicy(s), \(state.httpRoutes.count - grpc) HTTPRoute(s)" + more)
            for line in TopologyHints.summary(state) { print("  " + line) }
        case .failure(let errors):
            FileHandle.standardError.write(Data((errors.description + "\n").utf8))
            throw ExitCode(1)
        }
    }
}

struct ApplyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apply",
        abstract: "Validate manifests together with --config's, then install them there atomically.",
        discussion: """
            The new files are checked together with everything already in DIR; on any error nothing \
            is written. Files are written beside their destination under a hidden name, synced, \
            then renamed into place, so a watching agent never reads a partial file and sees the \
            whole set within one debounce window. Applies to one directory take turns (a lock on \
            it), so each validates against what the one before it wrote. Prints each object of the \
            files as created, configured or unchanged, and each object a replaced file held that \
            is gone, as deleted; --dry-run prints the same and writes nothing.
            """)

    @Option(name: .shortAndLong, help: "A manifest file or directory.") var file: String
    @Option(help: "The config directory the agents watch.") var config: String
    @Flag(help: "Validate and print what would change; write nothing.") var dryRun = false

    func run() throws {
        let incoming = try ManifestSource.files(at: file)
        guard !incoming.isEmpty else { throw ValidationError("\(file) holds no manifest files") }
        let names = incoming.map { ($0 as NSString).lastPathComponent }
        guard Set(names).count == names.count else { throw ValidationError("two files named alike in \(file)") }
        _ = try ManifestSource.files(at: config)
        // From reading what is there to the last rename, no other apply to
        // this directory runs: two at once would each pass against the set
        // without the other's files, and together could be refused.
        let lock = try Self.lock(config)
        defer { close(lock) }
        let present = try ManifestSource.files(at: config)
        let replacing = { (path: String) in names.contains((path as NSString).lastPathComponent) }
        // Each file read and parsed once, for the check and the report.
        let kept = ManifestSource.read(paths: present.filter { !replacing($0) })
        let new = ManifestSource.read(paths: incoming)
        if case .failure(let errors) = ClusterState.build(kept.resources + new.resources, parseErrors: kept.errors + new.errors) {
            FileHandle.standardError.write(Data((errors.description + "\nnothing applied\n").utf8))
            throw ExitCode(1)
        }
        let replaced = ManifestSource.read(paths: present.filter(replacing))
        let changes = ResourceChange.between(before: Self.objects(kept, replaced), after: Self.objects(kept, new),
                                             written: Self.objects(new))
        for change in changes { print(change) }
        guard !dryRun else {
            print("dry run: nothing written to \(config) (\(ResourceChange.summary(changes)))")
            return
        }
        var staged: [(String, String)] = []
        defer { for (tmp, _) in staged { try? FileManager.default.removeItem(atPath: tmp) } }
        for (source, name) in zip(incoming, names) {
            let tmp = (config as NSString).appendingPathComponent(".weft-apply-\(getpid())-\(name)")
            let data = try Data(contentsOf: URL(fileURLWithPath: source))
            guard FileManager.default.createFile(atPath: tmp, contents: data),
                  let handle = FileHandle(forUpdatingAtPath: tmp) else {
                throw ValidationError("cannot write \(tmp)")
            }
            try handle.synchronize()
            try handle.close()
            staged.append((tmp, (config as NSString).appendingPathComponent(name)))
        }
        for (tmp, destination) in staged where rename(tmp, destination) != 0 {
            throw ValidationError("rename to \(destination): \(String(cString: strerror(errno)))")
        }
        staged = []
        // (The line of the user contract, as it was before the objects were listed.)
        print("applied \(names.count) file(s) to \(config): \(names.joined(separator: ", "))")
    }

    /// The objects of files read, for the report of what changed (files
    /// that validate together, or the directory as it was, which is
    /// reported as far as it reads).
    static func objects(_ sets: (resources: [LocatedResource], errors: [ManifestError])...) -> [Resource] {
        sets.flatMap { $0.resources.map(\.resource) }
    }

    /// An exclusive lock on the directory itself (flock, so a process that
    /// dies lets go at once; no lock file for the agent to see), waited for
    /// up to `patience`. Returns the descriptor that holds it.
    static func lock(_ config: String, patience: Duration = .seconds(30)) throws -> Int32 {
        let fd = open(config, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw ValidationError("cannot open \(config): \(String(cString: strerror(errno)))") }
        let deadline = ContinuousClock.now + patience
        var said = false
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let busy = errno == EWOULDBLOCK
            guard busy, ContinuousClock.now < deadline else {
                close(fd)
                throw ValidationError(busy ? "another weft apply or delete held \(config) for \(patience); nothing done"
                                           : "cannot lock \(config): \(String(cString: strerror(errno)))")
            }
            if !said {
                FileHandle.standardError.write(Data("waiting for another weft apply or delete on \(config)\n".utf8))
                said = true
            }
            usleep(20_000)
        }
        return fd
    }
}

struct DeleteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete",
        abstract: "Remove manifest files from --config, once what is left validates.",
        discussion: """
            The files of DIR named like -f's (as `weft apply -f` installed them; a bare name works \
            too) are removed if the set left is valid: a Service a route still names cannot go \
            before the route. On any error nothing is removed. Takes its turn with `weft apply` \
            (the same lock on DIR). Prints each object the files held as deleted; --dry-run prints \
            the same and removes nothing.
            """)

    @Option(name: .shortAndLong, help: "A manifest file or directory, or a file name in --config (repeatable).") var file: [String]
    @Option(help: "The config directory the agents watch.") var config: String
    @Flag(help: "Validate what would be left and print what would go; remove nothing.") var dryRun = false

    func run() throws {
        let names = file.flatMap { path in
            ((try? ManifestSource.files(at: path)) ?? [path]).map { ($0 as NSString).lastPathComponent }
        }
        guard !names.isEmpty else { throw ValidationError("\(file.joined(separator: ", ")) names no manifest files") }
        _ = try ManifestSource.files(at: config)
        let lock = try ApplyCommand.lock(config)
        defer { close(lock) }
        let present = try ManifestSource.files(at: config)
        let missing = names.filter { name in !present.contains { ($0 as NSString).lastPathComponent == name } }
        guard missing.isEmpty else {
            FileHandle.standardError.write(Data("not in \(config): \(missing.joined(separator: ", "))\nnothing removed\n".utf8))
            throw ExitCode(1)
        }
        let removing = { (path: String) in names.contains((path as NSString).lastPathComponent) }
        // Each file read and parsed once, for the check and the report.
        let left = ManifestSource.read(paths: present.filter { !removing($0) })
        if case .failure(let errors) = ClusterState.build(left.resources, parseErrors: left.errors) {
            FileHandle.standardError.write(Data((errors.description + "\nnothing removed\n").utf8))
            throw ExitCode(1)
        }
        let removed = ManifestSource.read(paths: present.filter(removing))
        let changes = ResourceChange.between(before: ApplyCommand.objects(left, removed), after: ApplyCommand.objects(left),
                                             written: [])
        for change in changes { print(change) }
        guard !dryRun else {
            print("dry run: nothing removed from \(config) (\(ResourceChange.summary(changes)))")
            return
        }
        for name in names where unlink((config as NSString).appendingPathComponent(name)) != 0 {
            throw ValidationError("remove \(name) from \(config): \(String(cString: strerror(errno)))")
        }
        print("removed \(names.count) file(s) from \(config): \(names.joined(separator: ", "))")
    }
}
