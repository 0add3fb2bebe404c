import CLibbpf
import Glibc

/// A typed view of one BPF map, opened from its pin. Keys and values are the
/// ABI structs from weft_abi.h, so the layout is the kernel's by construction.
/// Owns its fd and closes it when released.
public final class BPFMap<Key: BitwiseCopyable, Value: BitwiseCopyable>: @unchecked Sendable {
    // @unchecked: the fd is immutable after init and the kernel serialises map
    // operations; nothing else is stored.
    public let fd: Int32
    public let path: String

    public init(pinned path: String) throws(KernelError) {
        let fd = bpf_obj_get(path)
        try KernelError.check(fd, "open pinned map \(path)")
        self.fd = fd
        self.path = path
        var maxEntries: UInt32 = 0, keySize: UInt32 = 0, valueSize: UInt32 = 0
        try KernelError.check(weft_map_info(fd, &maxEntries, &keySize, &valueSize), "inspect map \(path)")
        guard keySize == MemoryLayout<Key>.size else {
            close(fd)
            throw KernelError("map \(path) has key size \(keySize), this weft expects \(MemoryLayout<Key>.size)", errno: EINVAL)
        }
        self.capacity = Int(maxEntries)
    }

    deinit { close(fd) }

    /// max_entries of the map (0 for socket storage, which has none).
    public let capacity: Int

    public func lookup(_ key: Key) throws(KernelError) -> Value? {
        var key = key
        var value = zeroed(Value.self)
        let rc = bpf_map_lookup_elem(fd, &key, &value)
        if rc == -ENOENT { return nil }
        try KernelError.check(rc, "lookup in \(path)")
        return value
    }

    public func update(_ key: Key, _ value: Value) throws(KernelError) {
        var key = key, value = value
        try KernelError.check(bpf_map_update_elem(fd, &key, &value, UInt64(BPF_ANY)), "update \(path)")
    }

    /// Updates many entries in one BPF_MAP_UPDATE_BATCH call. The kernel
    /// applies them one by one in array order (not atomically as a set), so
    /// callers keep the same ordering guarantees as with single updates.
    public func updateBatch(_ keys: [Key], _ values: [Value]) throws(KernelError) {
        precondition(keys.count == values.count)
        var done = 0
        while done < keys.count {
            var count = UInt32(keys.count - done)
            let rc = keys.withUnsafeBytes { k in
                values.withUnsafeBytes { v in
                    bpf_map_update_batch(fd, k.baseAddress! + done * MemoryLayout<Key>.stride,
                                         v.baseAddress! + done * MemoryLayout<Value>.stride, &count, nil)
                }
            }
            if rc == -EINVAL || rc == -ENOTSUP || rc == -EOPNOTSUPP {
                // Kernels without batch support for this map type: one by one.
                for i in done..<keys.count { try update(keys[i], values[i]) }
                return
            }
            try KernelError.check(rc, "batch update \(path)")
            done += Int(count)
        }
    }

    /// Removes `key` and returns its value, in one BPF_MAP_LOOKUP_AND_DELETE_ELEM
    /// (hash and LRU hash maps since Linux 5.14); a kernel or map type
    /// without it gets a lookup and a delete.
    public func take(_ key: Key) throws(KernelError) -> Value? {
        var key = key
        var value = zeroed(Value.self)
        let rc = bpf_map_lookup_and_delete_elem(fd, &key, &value)
        if rc == -ENOENT { return nil }
        if rc == -EINVAL || rc == -ENOTSUP || rc == -EOPNOTSUPP {
            guard let found = try lookup(key) else { return nil }
            _ = try delete(key)
            return found
        }
        try KernelError.check(rc, "lookup and delete in \(path)")
        return value
    }

    /// Deletes `key`; true if it was there.
    @discardableResult
    public func delete(_ key: Key) throws(KernelError) -> Bool {
        var key = key
        let rc = bpf_map_delete_elem(fd, &key)
        if rc == -ENOENT { return false }
        try KernelError.check(rc, "delete from \(path)")
        return true
    }

    /// Every key, walked with BPF_MAP_GET_NEXT_KEY.
    public func keys() throws(KernelError) -> [Key] {
        var out: [Key] = []
        var next = zeroed(Key.self)
        var rc = bpf_map_get_next_key(fd, nil, &next)
        while rc == 0 {
            out.append(next)
            var current = next
            rc = bpf_map_get_next_key(fd, &current, &next)
        }
        if rc != -ENOENT { try KernelError.check(rc, "iterate \(path)") }
        return out
    }

    /// Every entry; keys deleted between the walk and the lookup are skipped.
    public func entries() throws(KernelError) -> [(key: Key, value: Value)] {
        var out: [(Key, Value)] = []
        for key in try keys() {
            if let value = try lookup(key) { out.append((key, value)) }
        }
        return out
    }

    public func count() throws(KernelError) -> Int { try keys().count }
}

/// An all-zero value of a plain C struct (padding included), for out-parameters.
func zeroed<T: BitwiseCopyable>(_: T.Type = T.self) -> T {
    withUnsafeTemporaryAllocation(of: T.self, capacity: 1) { buffer in
        UnsafeMutableRawBufferPointer(buffer).initializeMemory(as: UInt8.self, repeating: 0)
        return buffer[0]
    }
}

/// A BPF_MAP_TYPE_PERCPU_ARRAY of u64 counters, summed over CPUs on read.
public final class PerCPUCounters: @unchecked Sendable {
    public let fd: Int32
    public let path: String
    private let cpus: Int

    public init(pinned path: String) throws(KernelError) {
        let fd = bpf_obj_get(path)
        try KernelError.check(fd, "open pinned map \(path)")
        let cpus = libbpf_num_possible_cpus()
        if cpus <= 0 {
            close(fd)
            throw KernelError("count possible CPUs", errno: -cpus)
        }
        self.fd = fd
        self.path = path
        self.cpus = Int(cpus)
    }

    deinit { close(fd) }

    /// The sum over all CPUs of counter `index`.
    public func sum(_ index: UInt32) throws(KernelError) -> UInt64 {
        try perCPUSum(fd: fd, key: index, cpus: cpus, path: path) ?? 0
    }
}

/// Reads one key of a per-CPU map of u64 counters and sums the CPUs' values;
/// nil if the key is absent. The kernel fills one value per possible CPU.
func perCPUSum<Key: BitwiseCopyable>(fd: Int32, key: Key, cpus: Int, path: String) throws(KernelError) -> UInt64? {
    var key = key
    var values = [UInt64](repeating: 0, count: cpus)
    let rc = values.withUnsafeMutableBytes { bpf_map_lookup_elem(fd, &key, $0.baseAddress) }
    if rc == -ENOENT { return nil }
    try KernelError.check(rc, "read per-CPU counters \(path)")
    return values.reduce(0, &+)
}
