import Foundation
import PackagePlugin

/// Compiles the C eBPF programs in bpf/ with clang -target bpf on every build
/// that touches them, and embeds the objects in the target as generated Swift.
/// Nothing prebuilt is committed: the kernel code is always built from source.
@main
struct BPFCompiler: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let bpf = context.package.directoryURL.appending(path: "bpf")
        let out = context.pluginWorkDirectoryURL.appending(path: "bpf")
        let clang = try context.tool(named: "clang").url
        // Every header and program is an input, so editing any of them rebuilds.
        let inputs = try FileManager.default
            .subpathsOfDirectory(atPath: bpf.path)
            .filter { $0.hasSuffix(".h") || $0.hasSuffix(".c") || $0.hasSuffix(".sh") }
            .sorted()
            .map { bpf.appending(path: $0) }
        return [
            .buildCommand(
                displayName: "Compiling eBPF programs in bpf/",
                executable: URL(fileURLWithPath: "/bin/sh"),
                arguments: [bpf.appending(path: "compile.sh").path, clang.path, bpf.path, out.path],
                inputFiles: inputs,
                outputFiles: [out.appending(path: "EmbeddedBPFObjects.swift")]
            )
        ]
    }
}
