/// Kubernetes' own syntax rules for names, label keys and values and port
/// names (apimachinery's validation package), so a manifest Weft accepts is
/// one the API server would accept too.
enum Validation {
    private static func isLowerAlnum(_ c: Character) -> Bool {
        c.isASCII && (c.isLowercase || c.isNumber)
    }

    private static func isAlnum(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber)
    }

    /// RFC 1123 label: 1-63 lowercase alphanumerics or '-', alphanumeric at both ends.
    static func dnsLabel(_ s: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        guard (1...63).contains(s.count), let first = s.first, let last = s.last,
              isLowerAlnum(first), isLowerAlnum(last),
              s.allSatisfy({ isLowerAlnum($0) || $0 == "-" }) else {
            throw ManifestError(location, field: field,
                                "\"\(s)\" is not a valid name: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit")
        }
    }

    /// RFC 1123 subdomain (label key prefixes).
    static func dnsSubdomain(_ s: String) -> Bool {
        guard (1...253).contains(s.count) else { return false }
        return s.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { part in
            guard let first = part.first, let last = part.last else { return false }
            return isLowerAlnum(first) && isLowerAlnum(last)
                && part.allSatisfy { isLowerAlnum($0) || $0 == "-" }
        }
    }

    /// A label name: 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends.
    static func qualifiedNamePart(_ s: Substring) -> Bool {
        guard (1...63).contains(s.count), let first = s.first, let last = s.last,
              isAlnum(first), isAlnum(last) else { return false }
        return s.allSatisfy { isAlnum($0) || $0 == "-" || $0 == "_" || $0 == "." }
    }

    static func labelKey(_ key: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        let parts = key.split(separator: "/", omittingEmptySubsequences: false)
        let ok: Bool
        switch parts.count {
        case 1: ok = qualifiedNamePart(parts[0])
        case 2: ok = dnsSubdomain(String(parts[0])) && qualifiedNamePart(parts[1])
        default: ok = false
        }
        guard ok else {
            throw ManifestError(location, field: "\(field).\(key)", "\"\(key)\" is not a valid label key")
        }
    }

    static func labelValue(_ value: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        guard value.isEmpty || qualifiedNamePart(Substring(value)) else {
            throw ManifestError(location, field: field,
                                "\"\(value)\" is not a valid label value: at most 63 alphanumerics, '-', '_' or '.', alphanumeric at both ends")
        }
    }

    /// IANA service name, as a named port must be: 1-15 lowercase
    /// alphanumerics or '-', at least one letter, no '--', no '-' at the ends.
    static func portName(_ s: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        guard (1...15).contains(s.count), s.first != "-", s.last != "-", !s.contains("--"),
              s.allSatisfy({ isLowerAlnum($0) || $0 == "-" }),
              s.contains(where: { $0.isLetter }) else {
            throw ManifestError(location, field: field,
                                "\"\(s)\" is not a valid port name: 1-15 lowercase letters, digits or '-', with at least one letter")
        }
    }

    static func port(_ value: Int, field: String, at location: DocumentLocation) throws(ManifestError) -> UInt16 {
        guard (1...65535).contains(value) else {
            throw ManifestError(location, field: field, "port must be between 1 and 65535, got \(value)")
        }
        return UInt16(value)
    }

    static func transportProtocol(_ text: String?, field: String,
                                  at location: DocumentLocation) throws(ManifestError) -> TransportProtocol {
        guard let text else { return .tcp }
        guard let proto = TransportProtocol(rawValue: text) else {
            throw ManifestError(location, field: field, "protocol must be TCP, UDP or SCTP, got \"\(text)\"")
        }
        return proto
    }
}
