import Foundation
import CWeftSys
import Glibc

/// Runs helper commands (iproute2, sysctl) and reports failures with their
/// output, so a lab step that fails says which command and why.
enum ProcessRunner {
    @discardableResult
    static func run(_ arguments: [String], input: String? = nil) throws(LabError) -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let out = Pipe()
        process.standardOutput = out
        process.standardError = out
        let inPipe = Pipe()
        if input != nil { process.standardInput = inPipe }
        do { try process.run() } catch { throw LabError("cannot run \(arguments.joined(separator: " ")): \(error)") }
        if let input {
            inPipe.fileHandleForWriting.write(Data(input.utf8))
            try? inPipe.fileHandleForWriting.close()
        }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw LabError("`\(arguments.joined(separator: " "))` failed (exit \(process.terminationStatus)): \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return text
    }
}

/// Entering a pod: join its cgroup, then its network namespace, then exec.
/// Used by `weft lab exec` and to start pods and agents, so a process is in
/// its cgroup before its first syscall in the pod.
public enum PodEntry {
    public static func enter(netns: String, cgroup: String?, detach: Bool) throws(LabError) {
        if let cgroup {
            let procs = "\(cgroup)/cgroup.procs"
            guard let handle = FileHandle(forWritingAtPath: procs) else {
                throw LabError("cannot open \(procs): is the lab up?")
            }
            handle.write(Data("\(getpid())\n".utf8))
            try? handle.close()
        }
        let fd = open("/run/netns/\(netns)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw LabError("no network namespace \(netns): is the lab up?") }
        defer { close(fd) }
        guard weft_setns_net(fd) == 0 else {
            throw LabError("setns \(netns): \(String(cString: strerror(errno)))")
        }
        if detach { _ = setsid() }
    }

    /// Replaces this process with `command`; returns only on failure.
    public static func exec(_ command: [String]) -> LabError {
        guard let first = command.first else { return LabError("no command given") }
        var argv: [UnsafeMutablePointer<CChar>?] = command.map { strdup($0) }
        argv.append(nil)
        execvp(first, &argv)
        return LabError("cannot run \(first): \(String(cString: strerror(errno)))")
    }
}
