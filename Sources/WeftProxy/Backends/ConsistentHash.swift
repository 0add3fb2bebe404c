/// Consistent hashing for TrafficPolicy RingHash and Maglev: a request's key
/// (a header, a cookie, the source address) always lands on the same
/// backend while the backend set holds, and when one backend leaves only
/// the keys it held move. Built once per route snapshot; a lookup is a
/// binary search (ring) or one array index (Maglev).
enum ConsistentHash {
    /// A hash that is the same in every process and on every run (Swift's
    /// Hasher is seeded per process, which would move every key on a proxy
    /// restart): FNV-1a over the bytes, then SplitMix64's finaliser to
    /// spread FNV's weak low bits.
    static func stableHash<S: Sequence>(_ bytes: S) -> UInt64 where S.Element == UInt8 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01b3
        }
        return mix(h)
    }

    static func mix(_ x: UInt64) -> UInt64 {
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Ketama-style ring: each backend owns `virtualNodes` points; a key
    /// goes to the first point at or after its hash.
    struct Ring {
        static let virtualNodes = 160
        private var points: [(hash: UInt64, index: Int)] = []

        init(_ names: [String]) {
            for (i, name) in names.enumerated() {
                for v in 0..<Self.virtualNodes {
                    points.append((stableHash("\(name)#\(v)".utf8), i))
                }
            }
            points.sort { $0.hash < $1.hash }
        }

        /// The first backend index in ring order from the key's point that
        /// `accept` takes: the key's owner, or where it goes while that one
        /// is out.
        func first(_ hash: UInt64, where accept: (Int) -> Bool) -> Int? {
            guard !points.isEmpty else { return nil }
            var lo = 0, hi = points.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if points[mid].hash < hash { lo = mid + 1 } else { hi = mid }
            }
            for k in 0..<points.count {
                let i = points[(lo + k) % points.count].index
                if accept(i) { return i }
            }
            return nil
        }
    }

    /// Maglev (Eisenbud et al., NSDI 2016): a lookup table of prime size
    /// filled by each backend in turn along its own permutation, so every
    /// backend owns an equal share of slots, and removing one moves little
    /// beyond its own.
    struct Maglev {
        static let tableSize = 65_537
        private(set) var table: [Int32] = []

        init(_ names: [String]) {
            let m = Self.tableSize
            guard !names.isEmpty else { return }
            var offsets = [Int](), skips = [Int]()
            for name in names {
                offsets.append(Int(stableHash("\(name)/offset".utf8) % UInt64(m)))
                skips.append(Int(stableHash("\(name)/skip".utf8) % UInt64(m - 1)) + 1)
            }
            var next = [Int](repeating: 0, count: names.count)
            table = [Int32](repeating: -1, count: m)
            var filled = 0
            while true {
                for i in names.indices {
                    var c = (offsets[i] + next[i] * skips[i]) % m
                    while table[c] >= 0 {
                        next[i] += 1
                        c = (offsets[i] + next[i] * skips[i]) % m
                    }
                    table[c] = Int32(i)
                    next[i] += 1
                    filled += 1
                    if filled == m { return }
                }
            }
        }

        /// The key's slot first, then the following slots (a backend that
        /// is out passes its keys along the table).
        func first(_ hash: UInt64, where accept: (Int) -> Bool) -> Int? {
            guard !table.isEmpty else { return nil }
            let start = Int(hash % UInt64(table.count))
            for k in 0..<table.count {
                let i = Int(table[(start + k) % table.count])
                if accept(i) { return i }
            }
            return nil
        }
    }
}
