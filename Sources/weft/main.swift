import ArgumentParser
import WeftCore

// The one binary. Each subcommand parses its arguments and hands over to a
// module: WeftAgent runs the node daemon, WeftCore validates, WeftLab builds
// the sandbox, WeftKernel reads the pinned maps.
struct Weft: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "weft",
        abstract: "A sidecarless service mesh: eBPF in the kernel, one Swift proxy per node.",
        version: "weft \(Build.version)",
        subcommands: [AgentCommand.self, ValidateCommand.self, ApplyCommand.self, DeleteCommand.self, GetCommand.self,
                      StatusCommand.self, TopCommand.self, GraphCommand.self, PolicyCommand.self, RouteCommand.self, ProxyCommand.self,
                      CACommand.self, LabCommand.self])
}

Weft.main()
