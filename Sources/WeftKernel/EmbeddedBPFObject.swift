import Foundation

/// One compiled eBPF object, embedded in the binary by the BPFCompiler build
/// plugin (see bpf/compile.sh); `EmbeddedBPFObject.all` lists them.
public struct EmbeddedBPFObject: Sendable {
    public let name: String
    let base64: String

    init(name: String, base64: String) {
        self.name = name
        self.base64 = base64
    }

    var bytes: [UInt8] { Data(base64Encoded: base64).map(Array.init) ?? [] }
}
