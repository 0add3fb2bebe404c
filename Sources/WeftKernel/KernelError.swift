import CLibbpf
import Glibc

/// A failed kernel or libbpf call: what was attempted, and the errno.
/// Every syscall wrapper in this module turns its failure into one of these,
/// in one place, so callers never see a raw return code.
public struct KernelError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    /// From libbpf's convention: a negative return is -errno.
    static func check(_ result: Int32, _ operation: @autoclosure () -> String) throws(KernelError) {
        if result < 0 { throw KernelError(operation(), errno: -result) }
    }

    /// From a NULL pointer return: errno holds the reason.
    static func fromErrno(_ operation: String) -> KernelError {
        KernelError(operation, errno: weft_errno())
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// A refusal to start, in one sentence an operator can act on.
public struct PreflightError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
