/// A request path in the normal form routes and AuthorizationPolicy judge,
/// as Istio's default path normalization (`BASE`: Envoy's `normalize_path`)
/// makes it: percent-encoded unreserved characters decoded (`%61` is `a`,
/// `%2E` is `.`) and the other escapes' hex in upper case, backslashes made
/// slashes, and the dot segments removed (RFC 3986 6.2.2 and 5.2.4:
/// `/a/./b` and `/x/../b` are `/a/b` and `/b`). Slashes are not merged and
/// `%2F` stays encoded (Istio's `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES`
/// are not done).
///
/// Without it a rule is dodged by spelling its path another way: a DENY of
/// `/admin*` let `/./admin`, `/x/../admin` and `/%61dmin` through, and the
/// backend, which normalizes, served `/admin`; an HTTPRoute's PathPrefix
/// `/api` took `/api/../admin` to the api backend.
///
/// MeshConfig `proxy.pathNormalization` picks another of Istio's modes:
/// `NONE` (the path as sent), `MERGE_SLASHES` (also `//` made `/`),
/// `DECODE_AND_MERGE_SLASHES` (also `%2F` and `%5C` decoded to slashes
/// first).
public enum RequestPath {
    /// Istio's `meshConfig.pathNormalization.normalization` values.
    public enum Mode: String, Codable, Hashable, Sendable, CaseIterable {
        case none = "NONE"
        case base = "BASE"
        case mergeSlashes = "MERGE_SLASHES"
        case decodeAndMergeSlashes = "DECODE_AND_MERGE_SLASHES"

        var mergesSlashes: Bool { self == .mergeSlashes || self == .decodeAndMergeSlashes }
    }

    public enum Form: Equatable, Sendable {
        /// Already normal: nothing to change.
        case normal
        /// The normal form of a path that was not.
        case changed(String)
        /// A `%` not followed by two hex digits (Envoy answers 400).
        case malformed
    }

    /// True when `path` holds nothing normalization could change: no `%`,
    /// no backslash, no segment that begins with a dot. The express paths
    /// take only such paths (one pass over the bytes); the rest go to the
    /// full path, which normalizes.
    /// (Under `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES`, no `//`
    /// either; under `NONE` every path is plain.)
    @inlinable
    public static func isPlain(_ path: Substring, mode: Mode = .base) -> Bool {
        guard mode != .none else { return true }
        let merging = mode == .mergeSlashes || mode == .decodeAndMergeSlashes
        var afterSlash = false
        for c in path.utf8 {
            if c == UInt8(ascii: "%") || c == UInt8(ascii: "\\") || (afterSlash && (c == UInt8(ascii: ".") || (merging && c == UInt8(ascii: "/")))) {
                return false
            }
            afterSlash = c == UInt8(ascii: "/")
        }
        return true
    }

    /// The normal form of `path` (a path without its query; one that does
    /// not begin with `/`, such as `*`, is left as it is). `lenient`: a
    /// malformed escape is kept as it came and the rest normalized all the
    /// same (AuthorizationPolicy judges such a path by its normal form too,
    /// where a request reaches it without the full path's 400).
    public static func normalize(_ path: Substring, mode: Mode = .base, lenient: Bool = false) -> Form {
        guard path.utf8.first == UInt8(ascii: "/"), !isPlain(path, mode: mode) else { return .normal }
        var decoded: [UInt8] = []
        decoded.reserveCapacity(path.utf8.count)
        var it = path.utf8.makeIterator()
        while let c = it.next() {
            switch c {
            case UInt8(ascii: "%"):
                var copy = it
                guard let h = copy.next(), let l = copy.next(), let hi = hex(h), let lo = hex(l) else {
                    if !lenient { return .malformed }
                    decoded.append(c)
                    continue
                }
                it = copy
                let v = hi << 4 | lo
                if mode == .decodeAndMergeSlashes, v == UInt8(ascii: "/") || v == UInt8(ascii: "\\") {
                    decoded.append(UInt8(ascii: "/"))
                } else if isUnreserved(v) {
                    decoded.append(v)
                } else {
                    decoded += [UInt8(ascii: "%"), upperHex(hi), upperHex(lo)]
                }
            case UInt8(ascii: "\\"):
                decoded.append(UInt8(ascii: "/"))
            default:
                decoded.append(c)
            }
        }
        var out = removingDotSegments(decoded)
        if mode.mergesSlashes {
            var merged: [UInt8] = []
            merged.reserveCapacity(out.count)
            for c in out where !(c == UInt8(ascii: "/") && merged.last == UInt8(ascii: "/")) { merged.append(c) }
            out = merged
        }
        return out.elementsEqual(path.utf8) ? .normal : .changed(String(decoding: out, as: UTF8.self))
    }

    /// A request target (path and query) with its path in normal form.
    public static func normalize(target: String, mode: Mode = .base) -> Form {
        guard let q = target.utf8.firstIndex(of: UInt8(ascii: "?")) else { return normalize(target[...], mode: mode) }
        switch normalize(target[..<q], mode: mode) {
        case .changed(let path): return .changed(path + target[q...])
        case let other: return other
        }
    }

    /// RFC 3986 5.2.4 for a path that begins with `/`: `.` segments go, a
    /// `..` takes the segment before it (none above the root); a path that
    /// ends in either ends with `/`.
    static func removingDotSegments(_ path: [UInt8]) -> [UInt8] {
        let segments = path.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false).dropFirst()
        var kept: [ArraySlice<UInt8>] = []
        for (i, segment) in segments.enumerated() {
            let last = i == segments.count - 1
            if segment.elementsEqual([UInt8(ascii: ".")]) {
                if last { kept.append([]) }
            } else if segment.elementsEqual([UInt8(ascii: "."), UInt8(ascii: ".")]) {
                if !kept.isEmpty { kept.removeLast() }
                if last { kept.append([]) }
            } else {
                kept.append(segment)
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(path.count)
        for segment in kept {
            out.append(UInt8(ascii: "/"))
            out += segment
        }
        return out.isEmpty ? [UInt8(ascii: "/")] : out
    }

    /// RFC 3986 2.3: ALPHA, DIGIT, `-`, `.`, `_`, `~`.
    static func isUnreserved(_ c: UInt8) -> Bool {
        (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39)
            || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "~")
    }

    static func hex(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    static func upperHex(_ v: UInt8) -> UInt8 { v < 10 ? UInt8(ascii: "0") + v : UInt8(ascii: "A") + v - 10 }
}
