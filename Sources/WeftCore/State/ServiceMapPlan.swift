/// The contents of the kernel's service and backend maps, in Swift terms.
/// Read from the pinned maps (WeftKernel) or built from a ServiceTable here.
public struct ServiceMapSnapshot: Hashable, Sendable {
    public struct SlotKey: Hashable, Comparable, Sendable {
        public var frontend: Frontend
        public var slot: UInt16

        public init(_ frontend: Frontend, slot: UInt16) {
            self.frontend = frontend
            self.slot = slot
        }

        public static func < (a: SlotKey, b: SlotKey) -> Bool { (a.frontend, a.slot) < (b.frontend, b.slot) }
    }

    public struct SlotValue: Hashable, Sendable {
        public var backendID: UInt32
        public var serviceID: UInt32
        public var count: UInt16
        public var flags: UInt8

        public init(backendID: UInt32, serviceID: UInt32, count: UInt16, flags: UInt8) {
            self.backendID = backendID
            self.serviceID = serviceID
            self.count = count
            self.flags = flags
        }
    }

    public var slots: [SlotKey: SlotValue]
    public var backends: [UInt32: BackendAddress]

    public init(slots: [SlotKey: SlotValue] = [:], backends: [UInt32: BackendAddress] = [:]) {
        self.slots = slots
        self.backends = backends
    }

    /// Each frontend with its backends in slot order, as the kernel would
    /// draw them: what `weft get services` prints.
    public var frontends: [(frontend: Frontend, serviceID: UInt32, flags: UInt8, backends: [BackendAddress?])] {
        slots.filter { $0.key.slot == 0 }
            .sorted { $0.key < $1.key }
            .map { master in
                let f = master.key.frontend
                let list = (0..<Int(master.value.count)).map { i -> BackendAddress? in
                    guard let id = slots[SlotKey(f, slot: UInt16(i + 1))]?.backendID else { return nil }
                    return self.backends[id]
                }
                return (f, master.value.serviceID, master.value.flags, list)
            }
    }
}

/// One map operation. The order of a plan's writes is part of its meaning.
public enum ServiceMapWrite: Hashable, Sendable {
    case putBackend(id: UInt32, BackendAddress)
    case putSlot(ServiceMapSnapshot.SlotKey, ServiceMapSnapshot.SlotValue)
    case deleteSlot(ServiceMapSnapshot.SlotKey)
    case deleteBackend(id: UInt32)
}

/// Turns a desired ServiceTable into the map writes that bring the kernel
/// from what it holds to what is desired, touching only what differs.
///
/// The write order keeps every intermediate state valid for a concurrent
/// connect(): backends exist before any slot names them; a service's slots
/// are written before its master raises the count, and deleted only after the
/// master lowered it; a removed service loses its master (so no new lookups
/// hit it) before its slots; backends go last. Ids of existing services and
/// backends are kept, so a restarted agent over unchanged config writes nothing.
public enum ServiceMapPlanner {
    /// The kernel's slot counter is 16 bits (WEFT_MAX_BACKENDS_PER_SERVICE).
    public static let maxBackendsPerService = 65535

    public static func plan(desired table: ServiceTable, current: ServiceMapSnapshot)
        -> (target: ServiceMapSnapshot, writes: [ServiceMapWrite])
    {
        var target = ServiceMapSnapshot()
        var writes: [ServiceMapWrite] = []

        // Backend ids: keep the lowest existing id per address, allocate the
        // lowest free ones to new addresses.
        var backendID: [BackendAddress: UInt32] = [:]
        for (id, address) in current.backends.sorted(by: { $0.key < $1.key }) where backendID[address] == nil {
            backendID[address] = id
        }
        let wanted = Set(table.entries.values.flatMap(\.backends))
        // Ids freed by this plan are not reused in it: a slot still naming a
        // stale backend must not reach a new address before it is rewritten.
        var freeBackend = IDAllocator(used: Set(current.backends.keys))
        for address in wanted.sorted() {
            let id = backendID[address] ?? freeBackend.next()
            backendID[address] = id
            target.backends[id] = address
            if current.backends[id] != address { writes.append(.putBackend(id: id, address)) }
        }

        // Service ids: kept from the current master entry.
        var serviceID: [Frontend: UInt32] = [:]
        var currentSlots: [Frontend: [UInt32]] = [:]
        for (key, value) in current.slots where key.slot == 0 {
            serviceID[key.frontend] = value.serviceID
            currentSlots[key.frontend] = (0..<Int(value.count)).compactMap {
                current.slots[.init(key.frontend, slot: UInt16($0 + 1))]?.backendID
            }
        }
        var freeService = IDAllocator(used: Set(serviceID.values))

        for (frontend, entry) in table.entries.sorted(by: { $0.key < $1.key }) {
            let sid = serviceID[frontend] ?? freeService.next()
            let flags: UInt8 = entry.needsProxy ? 0x01 : 0
            let ids = slotOrder(current: currentSlots[frontend] ?? [],
                                desired: entry.backends.compactMap { backendID[$0] })
                .prefix(maxBackendsPerService)
            for (i, id) in ids.enumerated() {
                let key = ServiceMapSnapshot.SlotKey(frontend, slot: UInt16(i + 1))
                let value = ServiceMapSnapshot.SlotValue(backendID: id, serviceID: sid, count: 0, flags: 0)
                target.slots[key] = value
                if current.slots[key] != value { writes.append(.putSlot(key, value)) }
            }
            let master = ServiceMapSnapshot.SlotKey(frontend, slot: 0)
            let masterValue = ServiceMapSnapshot.SlotValue(backendID: 0, serviceID: sid,
                                                           count: UInt16(ids.count), flags: flags)
            target.slots[master] = masterValue
            if current.slots[master] != masterValue { writes.append(.putSlot(master, masterValue)) }
        }

        // Everything in the map that the target does not hold: masters first
        // (a removed service stops matching at once), then slots, then backends.
        let stale = current.slots.keys.filter { target.slots[$0] == nil }.sorted()
        writes += stale.filter { $0.slot == 0 }.map { .deleteSlot($0) }
        writes += stale.filter { $0.slot != 0 }.map { .deleteSlot($0) }
        writes += current.backends.keys.filter { target.backends[$0] == nil }.sorted().map { .deleteBackend(id: $0) }
        return (target, writes)
    }

    /// Slot order that moves as few slots as possible: surviving backends keep
    /// their slot, a removed one's slot is filled by the last survivor (so no
    /// slot ever points at a removed backend), new backends are appended.
    static func slotOrder(current: [UInt32], desired: [UInt32]) -> [UInt32] {
        let keep = Set(desired)
        var seen: Set<UInt32> = []
        var slots: [UInt32?] = current.map { id in keep.contains(id) && seen.insert(id).inserted ? id : nil }
        var i = 0
        while i < slots.count {
            if slots[i] == nil {
                while let last = slots.last, last == nil { slots.removeLast() }
                if i < slots.count { slots[i] = slots.removeLast() }
            }
            i += 1
        }
        var order = slots.compactMap { $0 }
        let present = Set(order)
        order += desired.filter { !present.contains($0) }
        return order
    }
}

/// Hands out the lowest ids (from 1) not in use.
struct IDAllocator {
    private var used: Set<UInt32>
    private var cursor: UInt32 = 1

    init(used: Set<UInt32>) { self.used = used }

    mutating func next() -> UInt32 {
        while used.contains(cursor) { cursor += 1 }
        used.insert(cursor)
        return cursor
    }
}
