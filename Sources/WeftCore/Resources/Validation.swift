/// Kubernetes' own syntax rules for names, label keys and values and port
/// names (apimachinery's validation package), so a manifest Weft accepts is
/// one the API server would accept too.
enum Validation {
    // All of these grammars are ASCII: checks run on UTF-8 bytes, which also
    // rejects any non-ASCII character without Unicode property lookups.
    private static func isLowerAlnum(_ c: UInt8) -> Bool { (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) }
    private static func isAlnum(_ c: UInt8) -> Bool { isLowerAlnum(c) || (c >= 0x41 && c <= 0x5a) }
    private static func isLetter(_ c: UInt8) -> Bool { (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) }
    private static let dash = UInt8(ascii: "-"), dot = UInt8(ascii: "."), underscore = UInt8(ascii: "_")

    /// RFC 1123 label: 1-63 lowercase alphanumerics or '-', alphanumeric at both ends.
    static func dnsLabel(_ s: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        let b = s.utf8
        guard (1...63).contains(b.count), let first = b.first, let last = b.last,
              isLowerAlnum(first), isLowerAlnum(last),
              b.allSatisfy({ isLowerAlnum($0) || $0 == dash }) else {
            throw ManifestError(location, field: field,
                                "\(quoted(s)) is not a valid name: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit")
        }
    }

    /// RFC 1123 subdomain (label key prefixes).
    /// A string field's `maxLength` in the API's schema (characters, as
    /// OpenAPI counts them).
    static func maxLength(_ s: String, _ max: Int, field: String, at location: DocumentLocation) throws(ManifestError) {
        let count = s.unicodeScalars.count
        guard count <= max else { throw ManifestError(location, field: field, "at most \(max) characters, got \(count)") }
    }

    static func dnsSubdomain(_ s: String) -> Bool {
        guard (1...253).contains(s.utf8.count) else { return false }
        return s.utf8.split(separator: dot, omittingEmptySubsequences: false).allSatisfy { part in
            guard let first = part.first, let last = part.last else { return false }
            return isLowerAlnum(first) && isLowerAlnum(last)
                && part.allSatisfy { isLowerAlnum($0) || $0 == dash }
        }
    }

    /// A label name: 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends.
    static func qualifiedNamePart(_ s: Substring) -> Bool {
        let b = s.utf8
        guard (1...63).contains(b.count), let first = b.first, let last = b.last,
              isAlnum(first), isAlnum(last) else { return false }
        return b.allSatisfy { isAlnum($0) || $0 == dash || $0 == underscore || $0 == dot }
    }

    /// Kubernetes' qualified name: a name part, after an optional DNS
    /// subdomain and '/' (label keys, a port's appProtocol).
    static func isQualifiedName(_ s: String) -> Bool {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        switch parts.count {
        case 1: return qualifiedNamePart(parts[0])
        case 2: return dnsSubdomain(String(parts[0])) && qualifiedNamePart(parts[1])
        default: return false
        }
    }

    static func labelKey(_ key: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        guard isQualifiedName(key) else {
            throw ManifestError(location, field: "\(field).\(key)", "\(quoted(key)) is not a valid label key")
        }
    }

    static func labelValue(_ value: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        guard value.isEmpty || qualifiedNamePart(Substring(value)) else {
            throw ManifestError(location, field: field,
                                "\(quoted(value)) is not a valid label value: at most 63 alphanumerics, '-', '_' or '.', alphanumeric at both ends")
        }
    }

    /// IANA service name, as a named port must be: 1-15 lowercase
    /// alphanumerics or '-', at least one letter, no '--', no '-' at the ends.
    static func portName(_ s: String, field: String, at location: DocumentLocation) throws(ManifestError) {
        let b = s.utf8
        guard (1...15).contains(b.count), b.first != dash, b.last != dash, !s.contains("--"),
              b.allSatisfy({ isLowerAlnum($0) || $0 == dash }),
              b.contains(where: isLetter) else {
            throw ManifestError(location, field: field,
                                "\(quoted(s)) is not a valid port name: 1-15 lowercase letters, digits or '-', with at least one letter")
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
            throw ManifestError(location, field: field, "protocol must be TCP, UDP or SCTP, got \(quoted(text))")
        }
        return proto
    }
}
