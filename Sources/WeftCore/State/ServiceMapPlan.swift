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
        /// A slot's backend; in a master entry (slot 0) with
        /// `affinityFlag`, the sessionAffinity timeout in seconds.
        public var backendID: UInt32
        public var serviceID: UInt32
        public var count: UInt16
        public var flags: UInt8

        /// Master flags (weft_abi.h WEFT_SVC_F_*).
        public static let l7Flag: UInt8 = 0x01
        public static let affinityFlag: UInt8 = 0x02

        /// A master entry's sessionAffinity timeout in seconds, if it has one.
        public var affinityTimeout: UInt32? { flags & Self.affinityFlag != 0 ? backendID : nil }

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
    public var frontends: [(frontend: Frontend, serviceID: UInt32, flags: UInt8, affinityTimeout: UInt32?,
                            backends: [BackendAddress?])] {
        slots.filter { $0.key.slot == 0 }
            .sorted { $0.key < $1.key }
            .map { master in
                let f = master.key.frontend
                let list = (0..<Int(master.value.count)).map { i -> BackendAddress? in
                    guard let id = slots[SlotKey(f, slot: UInt16(i + 1))]?.backendID else { return nil }
                    return self.backends[id]
                }
                return (f, master.value.serviceID, master.value.flags, master.value.affinityTimeout, list)
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

/// What the kernel's service maps hold, with the indexes a plan needs kept
/// alongside: backend id by address, how many slots name each backend, which
/// ids are in use. Built once from a snapshot (O(entries)), then kept current
/// by `apply`, so planning a change costs the size of the change.
public struct ServiceMapIndex: Sendable {
    public private(set) var snapshot: ServiceMapSnapshot
    private(set) var idOf: [BackendAddress: UInt32] = [:]
    private(set) var references: [UInt32: Int] = [:]
    private(set) var serviceIDs: Set<UInt32> = []
    /// No free backend id is below this.
    private var lowestFreeBackend: UInt32 = 1
    private var lowestFreeService: UInt32 = 1

    public init(_ snapshot: ServiceMapSnapshot = .init()) {
        self.snapshot = ServiceMapSnapshot()
        apply(snapshot.backends.sorted { $0.key < $1.key }.map { .putBackend(id: $0.key, $0.value) })
        apply(snapshot.slots.sorted { $0.key < $1.key }.map { .putSlot($0.key, $0.value) })
    }

    /// The frontends that have any entry in the maps, master or orphan slot.
    var frontends: Set<Frontend> { Set(snapshot.slots.keys.map(\.frontend)) }

    /// Backend ids in slot order for a frontend, as its master's count says.
    func slots(of frontend: Frontend) -> [UInt32] {
        guard let master = snapshot.slots[.init(frontend, slot: 0)] else { return [] }
        return (0..<Int(master.count)).compactMap { snapshot.slots[.init(frontend, slot: UInt16($0 + 1))]?.backendID }
    }

    public mutating func apply(_ writes: [ServiceMapWrite]) {
        for write in writes {
            switch write {
            case .putBackend(let id, let address):
                if let old = snapshot.backends[id], idOf[old] == id { idOf[old] = nil }
                snapshot.backends[id] = address
                if let existing = idOf[address], existing < id {} else { idOf[address] = id }
            case .putSlot(let key, let value):
                let old = snapshot.slots.updateValue(value, forKey: key)
                if key.slot == 0 {
                    serviceIDs.insert(value.serviceID)
                } else {
                    if let old { references[old.backendID, default: 0] -= 1 }
                    references[value.backendID, default: 0] += 1
                }
            case .deleteSlot(let key):
                guard let old = snapshot.slots.removeValue(forKey: key) else { continue }
                if key.slot == 0 {
                    serviceIDs.remove(old.serviceID)
                    lowestFreeService = min(lowestFreeService, old.serviceID)
                } else {
                    references[old.backendID, default: 0] -= 1
                }
            case .deleteBackend(let id):
                guard let old = snapshot.backends.removeValue(forKey: id) else { continue }
                if idOf[old] == id { idOf[old] = nil }
                lowestFreeBackend = min(lowestFreeBackend, id)
            }
        }
    }

    /// Grows the tables once for a plan of known size instead of rehashing
    /// as 100,000s of writes arrive.
    mutating func reserve(slots: Int, backends: Int) {
        snapshot.slots.reserveCapacity(slots)
        snapshot.backends.reserveCapacity(backends)
        idOf.reserveCapacity(backends)
        references.reserveCapacity(backends)
    }

    /// Lowest backend id neither in the map nor in `taken`. Ids freed by the
    /// plan being made are still in the map, so they are not reused in it.
    mutating func freeBackendID(excluding taken: Set<UInt32>) -> UInt32 {
        while snapshot.backends[lowestFreeBackend] != nil || taken.contains(lowestFreeBackend) { lowestFreeBackend += 1 }
        var id = lowestFreeBackend
        while snapshot.backends[id] != nil || taken.contains(id) { id += 1 }
        return id
    }

    mutating func freeServiceID(excluding taken: Set<UInt32>) -> UInt32 {
        while serviceIDs.contains(lowestFreeService) || taken.contains(lowestFreeService) { lowestFreeService += 1 }
        var id = lowestFreeService
        while serviceIDs.contains(id) || taken.contains(id) { id += 1 }
        return id
    }
}

/// Turns desired ServiceTable entries into the map writes that bring the
/// kernel from what it holds to what is desired, touching only what differs.
///
/// The write order keeps every intermediate state valid for a concurrent
/// connect(): backends exist before any slot names them; a service's slots
/// are written before its master raises the count, and deleted only after the
/// master lowered it; a removed service loses its master (so no new lookups
/// hit it) before its slots; backends no slot names any more go last. Ids of
/// existing services and backends are kept, so a restarted agent over an
/// unchanged config writes nothing.
public enum ServiceMapPlanner {
    /// The kernel's slot counter is 16 bits (WEFT_MAX_BACKENDS_PER_SERVICE).
    public static let maxBackendsPerService = 65535

    /// Full plan: every frontend of `desired` and of the maps.
    public static func plan(desired table: ServiceTable, current: ServiceMapSnapshot)
        -> (target: ServiceMapSnapshot, writes: [ServiceMapWrite])
    {
        var index = ServiceMapIndex(current)
        let writes = plan(desired: table, index: &index, only: nil)
        return (index.snapshot, writes)
    }

    /// Plans `desired` against `index` and applies the writes to it. With
    /// `only`, just those frontends are compared (the caller knows nothing
    /// else changed); without it, every frontend desired or present is, and
    /// anything in the maps that nothing names is removed.
    public static func plan(desired table: ServiceTable, index: inout ServiceMapIndex,
                            only: Set<Frontend>?) -> [ServiceMapWrite] {
        let frontends = (only ?? Set(table.entries.keys).union(index.frontends)).sorted()
        if only == nil {
            let slots = table.entries.values.reduce(table.entries.count) { $0 + $1.backends.count }
            index.reserve(slots: slots, backends: slots - table.entries.count)
        }
        var newBackends: [ServiceMapWrite] = []
        var slotWrites: [ServiceMapWrite] = []
        var removedMasters: [ServiceMapWrite] = []
        var removedSlots: [ServiceMapWrite] = []
        var takenBackendIDs: Set<UInt32> = []
        var takenServiceIDs: Set<UInt32> = []
        var released: Set<UInt32> = []
        var pending: [BackendAddress: UInt32] = [:]
        // Full plans also find slots beyond a master's count (a crash
        // mid-write): group every slot by frontend once.
        var allSlots: [Frontend: [(UInt16, UInt32)]] = [:]
        if only == nil {
            for (key, value) in index.snapshot.slots where key.slot != 0 {
                allSlots[key.frontend, default: []].append((key.slot, value.backendID))
            }
        }

        for frontend in frontends {
            let masterKey = ServiceMapSnapshot.SlotKey(frontend, slot: 0)
            let master = index.snapshot.slots[masterKey]
            // Every slot key present for this frontend, counted or not.
            let presentSlots = UInt16(0)...UInt16(truncatingIfNeeded: max(Int(master?.count ?? 0), 0))
            var existing = presentSlots.dropFirst().compactMap { slot -> (UInt16, UInt32)? in
                index.snapshot.slots[.init(frontend, slot: slot)].map { (slot, $0.backendID) }
            }
            if only == nil { existing = (allSlots[frontend] ?? []).sorted { $0.0 < $1.0 } }
            guard let entry = table.entries[frontend] else {
                if master != nil { removedMasters.append(.deleteSlot(masterKey)) }
                for (slot, id) in existing {
                    removedSlots.append(.deleteSlot(.init(frontend, slot: slot)))
                    released.insert(id)
                }
                continue
            }
            let ids = entry.backends.prefix(maxBackendsPerService).map { address -> UInt32 in
                if let id = index.idOf[address] ?? pending[address] { return id }
                let id = index.freeBackendID(excluding: takenBackendIDs)
                takenBackendIDs.insert(id)
                pending[address] = id
                newBackends.append(.putBackend(id: id, address))
                return id
            }
            let order = slotOrder(current: index.slots(of: frontend), desired: ids)
            let sid: UInt32
            if let master {
                sid = master.serviceID
            } else {
                sid = index.freeServiceID(excluding: takenServiceIDs)
                takenServiceIDs.insert(sid)
            }
            for (i, id) in order.enumerated() {
                let key = ServiceMapSnapshot.SlotKey(frontend, slot: UInt16(i + 1))
                let value = ServiceMapSnapshot.SlotValue(backendID: id, serviceID: sid, count: 0, flags: 0)
                if index.snapshot.slots[key] != value { slotWrites.append(.putSlot(key, value)) }
            }
            let masterValue = ServiceMapSnapshot.SlotValue(
                backendID: entry.affinityTimeout, serviceID: sid, count: UInt16(order.count),
                flags: (entry.needsProxy ? ServiceMapSnapshot.SlotValue.l7Flag : 0)
                    | (entry.affinityTimeout > 0 ? ServiceMapSnapshot.SlotValue.affinityFlag : 0))
            if master != masterValue { slotWrites.append(.putSlot(masterKey, masterValue)) }
            for (slot, id) in existing where Int(slot) > order.count {
                slotWrites.append(.deleteSlot(.init(frontend, slot: slot)))
                released.insert(id)
            }
            for (slot, id) in existing where Int(slot) <= order.count && order[Int(slot) - 1] != id {
                released.insert(id)
            }
        }
        var writes = newBackends + slotWrites + removedMasters + removedSlots
        index.apply(writes)
        // Backends no slot names any more; in a full plan, every such backend.
        let candidates = only == nil ? Set(index.snapshot.backends.keys) : released
        let unreferenced = candidates.filter { (index.references[$0] ?? 0) <= 0 && index.snapshot.backends[$0] != nil }
            .sorted().map { ServiceMapWrite.deleteBackend(id: $0) }
        index.apply(unreferenced)
        writes += unreferenced
        return writes
    }

    /// Slot order that moves as few slots as possible: surviving backends keep
    /// their slot, a removed one's slot is filled by the last survivor (so no
    /// slot ever points at a removed backend), new backends are appended.
    static func slotOrder(current: [UInt32], desired: [UInt32]) -> [UInt32] {
        // How many slots each backend is to have: one, or (a TCPRoute's
        // split) as many as its weight gives it.
        var wanted: [UInt32: Int] = [:]
        for id in desired { wanted[id, default: 0] += 1 }
        var slots: [UInt32?] = current.map { id in
            guard let n = wanted[id], n > 0 else { return nil }
            wanted[id] = n - 1
            return id
        }
        var i = 0
        while i < slots.count {
            if slots[i] == nil {
                while let last = slots.last, last == nil { slots.removeLast() }
                if i < slots.count { slots[i] = slots.removeLast() }
            }
            i += 1
        }
        var order = slots.compactMap { $0 }
        for id in desired {
            guard let n = wanted[id], n > 0 else { continue }
            wanted[id] = n - 1
            order.append(id)
        }
        return order
    }
}

extension ServiceTable {
    /// Frontends whose entry differs between two tables (added, removed or changed).
    public func changedFrontends(since previous: ServiceTable) -> Set<Frontend> {
        var changed: Set<Frontend> = []
        for (frontend, entry) in entries where previous.entries[frontend] != entry { changed.insert(frontend) }
        for frontend in previous.entries.keys where entries[frontend] == nil { changed.insert(frontend) }
        return changed
    }
}
