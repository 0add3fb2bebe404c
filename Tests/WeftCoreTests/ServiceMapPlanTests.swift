import Testing
@testable import WeftCore

private let vip = IPv4Address("198.19.0.10")!
private func frontend(_ port: UInt16 = 80) -> Frontend { Frontend(vip: vip, port: port, transport: .tcp) }
private func backend(_ last: UInt32, port: UInt16 = 8080) -> BackendAddress {
    BackendAddress(address: IPv4Address(198 << 24 | 18 << 16 | 1 << 8 | last), port: port, transport: .tcp)
}
private func table(_ entries: [Frontend: [BackendAddress]]) -> ServiceTable {
    ServiceTable(entries: entries.mapValues { .init(name: "t", backends: $0, needsProxy: false) })
}

/// Applies writes to a snapshot the way the kernel map would.
private func apply(_ writes: [ServiceMapWrite], to snapshot: ServiceMapSnapshot) -> ServiceMapSnapshot {
    var s = snapshot
    for w in writes {
        switch w {
        case .putBackend(let id, let b): s.backends[id] = b
        case .putSlot(let k, let v): s.slots[k] = v
        case .deleteSlot(let k): s.slots[k] = nil
        case .deleteBackend(let id): s.backends[id] = nil
        }
    }
    return s
}

/// Every prefix of the write sequence leaves a state in which any slot a
/// reader can draw (1...count of a master) exists and names an existing backend.
private func everyIntermediateStateIsConsistent(_ writes: [ServiceMapWrite], from start: ServiceMapSnapshot) -> Bool {
    var s = start
    for w in writes {
        s = apply([w], to: s)
        for (key, master) in s.slots where key.slot == 0 {
            for slot in 1...max(1, Int(master.count)) where master.count > 0 {
                guard let v = s.slots[.init(key.frontend, slot: UInt16(slot))], s.backends[v.backendID] != nil else { return false }
            }
        }
    }
    return true
}

@Suite struct ServiceMapPlanning {
    @Test func freshPlanWritesBackendsThenSlotsThenMaster() {
        let (target, writes) = ServiceMapPlanner.plan(desired: table([frontend(): [backend(2), backend(3)]]), current: .init())
        #expect(writes.count == 5)
        guard case .putBackend = writes[0], case .putBackend = writes[1],
              case .putSlot(let k1, _) = writes[2], case .putSlot(let k2, _) = writes[3],
              case .putSlot(let master, let mv) = writes[4] else { Issue.record("order: \(writes)"); return }
        #expect([k1.slot, k2.slot, master.slot] == [1, 2, 0])
        #expect(mv.count == 2)
        #expect(apply(writes, to: .init()) == target)
        #expect(target.frontends.first?.backends.compactMap { $0 } == [backend(2), backend(3)])
    }

    @Test func unchangedDesiredStateWritesNothing() {
        let desired = table([frontend(): [backend(2), backend(3)], frontend(81): [backend(2)]])
        let (target, _) = ServiceMapPlanner.plan(desired: desired, current: .init())
        let (again, writes) = ServiceMapPlanner.plan(desired: desired, current: target)
        #expect(writes.isEmpty)
        #expect(again == target)
    }

    @Test func scaleDownKeepsSurvivorsInPlaceAndShrinksSafely() {
        let start = ServiceMapPlanner.plan(desired: table([frontend(): [backend(2), backend(3), backend(4)]]), current: .init()).target
        let (target, writes) = ServiceMapPlanner.plan(desired: table([frontend(): [backend(3), backend(4)]]), current: start)
        #expect(apply(writes, to: start) == target)
        #expect(everyIntermediateStateIsConsistent(writes, from: start))
        // backend(2) sat in slot 1: the last survivor moved into it, nothing else moved.
        let slots = target.frontends[0].backends.compactMap { $0 }
        #expect(Set(slots) == [backend(3), backend(4)])
        #expect(target.backends.values.contains(backend(2)) == false)
        #expect(writes.filter { if case .putSlot = $0 { true } else { false } }.count == 2)  // slot 1 + master
    }

    @Test func scaleUpAndRemovalAreConsistentAtEveryStep() {
        let start = ServiceMapPlanner.plan(desired: table([frontend(): [backend(2)], frontend(81): [backend(5), backend(6)]]), current: .init()).target
        let desired = table([frontend(): [backend(2), backend(7), backend(8)]])
        let (target, writes) = ServiceMapPlanner.plan(desired: desired, current: start)
        #expect(everyIntermediateStateIsConsistent(writes, from: start))
        #expect(apply(writes, to: start) == target)
        #expect(target.frontends.map(\.frontend) == [frontend()])
        // Freed ids are not reused within the same plan.
        let oldIDs = Set(start.backends.keys)
        let newIDs = Set(target.backends.filter { $0.value == backend(7) || $0.value == backend(8) }.keys)
        #expect(oldIDs.isDisjoint(with: newIDs))
    }

    @Test func serviceIDsAreStableAcrossUnrelatedChanges() {
        let one = ServiceMapPlanner.plan(desired: table([frontend(): [backend(2)]]), current: .init()).target
        let two = ServiceMapPlanner.plan(desired: table([frontend(): [backend(2)], frontend(81): [backend(3)]]), current: one).target
        #expect(one.frontends[0].serviceID == two.frontends.first { $0.frontend == frontend() }?.serviceID)
    }

    @Test func slotOrderFillsHolesFromTheTail() {
        #expect(ServiceMapPlanner.slotOrder(current: [1, 2, 3, 4], desired: [1, 3, 4]) == [1, 4, 3])
        #expect(ServiceMapPlanner.slotOrder(current: [1, 2, 3], desired: [1, 2, 3, 9]) == [1, 2, 3, 9])
        #expect(ServiceMapPlanner.slotOrder(current: [1, 2], desired: []) == [])
        #expect(ServiceMapPlanner.slotOrder(current: [5, 5, 6], desired: [5, 6]) == [5, 6])
    }

    @Test func sessionAffinityRidesOnTheMasterEntryOnly() {
        var desired = table([frontend(): [backend(2), backend(3)]])
        desired.entries[frontend()]?.affinityTimeout = 30
        let (target, _) = ServiceMapPlanner.plan(desired: desired, current: .init())
        let master = target.slots[.init(frontend(), slot: 0)]
        #expect(master?.affinityTimeout == 30 && master?.flags == ServiceMapSnapshot.SlotValue.affinityFlag && master?.count == 2)
        #expect(target.frontends.first?.affinityTimeout == 30)
        // The timeout in the master's backend id is no backend: both stay
        // referenced by their slots only, and go when the Service does.
        #expect(Set(target.backends.keys).count == 2)
        let (gone, writes) = ServiceMapPlanner.plan(desired: table([:]), current: target)
        #expect(gone.slots.isEmpty && gone.backends.isEmpty, "\(writes)")
        // Switched off: the master is rewritten without it.
        desired.entries[frontend()]?.affinityTimeout = 0
        let (plain, _) = ServiceMapPlanner.plan(desired: desired, current: target)
        #expect(plain.slots[.init(frontend(), slot: 0)]?.affinityTimeout == nil
                    && plain.slots[.init(frontend(), slot: 0)]?.backendID == 0)
    }

    /// A TCPRoute's split names a backend in several slots: each keeps as
    /// many as it is to have where it sat, and plans stay consistent and
    /// agree with full plans as the shares change.
    @Test func weightedSlotsKeepTheirPlacesAndCounts() {
        #expect(ServiceMapPlanner.slotOrder(current: [1, 1, 2, 2], desired: [1, 2, 2, 2]) == [1, 2, 2, 2])
        #expect(ServiceMapPlanner.slotOrder(current: [1, 1, 1, 2], desired: [1, 2]) == [1, 2])
        #expect(ServiceMapPlanner.slotOrder(current: [1, 2], desired: [1, 1, 2, 3, 3]) == [1, 2, 1, 3, 3])
        var rng = SystemRandomNumberGenerator()
        var index = ServiceMapIndex()
        var previous = ServiceTable()
        for _ in 0..<200 {
            var entries = previous.entries.mapValues(\.backends)
            let f = frontend(UInt16.random(in: 80...83, using: &rng))
            entries[f] = (2...UInt32.random(in: 2...5, using: &rng)).flatMap { b in
                Array(repeating: backend(b), count: Int.random(in: 0...9, using: &rng))
            }.shuffled(using: &rng)
            let desired = table(entries)
            let before = index.snapshot
            let writes = ServiceMapPlanner.plan(desired: desired, index: &index, only: desired.changedFrontends(since: previous))
            #expect(everyIntermediateStateIsConsistent(writes, from: before))
            #expect(apply(writes, to: before) == index.snapshot)
            #expect(ServiceMapPlanner.plan(desired: desired, current: index.snapshot).writes.isEmpty)
            for fe in index.snapshot.frontends {
                let have = Dictionary(fe.backends.compactMap { $0 }.map { ($0, 1) }, uniquingKeysWith: +)
                let want = Dictionary((desired.entries[fe.frontend]?.backends ?? []).map { ($0, 1) }, uniquingKeysWith: +)
                #expect(have == want)
            }
            previous = desired
        }
    }

    @Test func aServiceWithNoBackendsHasAMasterWithCountZero() {
        let (target, _) = ServiceMapPlanner.plan(desired: table([frontend(): []]), current: .init())
        #expect(target.slots[.init(frontend(), slot: 0)]?.count == 0)
        #expect(target.frontends[0].backends.isEmpty)
    }

    @Test func incrementalPlansAgreeWithFullPlansOverRandomChanges() {
        var rng = SystemRandomNumberGenerator()
        var index = ServiceMapIndex()
        var previous = ServiceTable()
        for _ in 0..<200 {
            var entries = previous.entries.mapValues(\.backends)
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let f = frontend(UInt16.random(in: 80...90, using: &rng))
                if Bool.random(using: &rng) && entries[f] != nil && Int.random(in: 0...3, using: &rng) == 0 {
                    entries[f] = nil
                } else {
                    entries[f] = (0..<Int.random(in: 0...6, using: &rng)).map { _ in backend(UInt32.random(in: 2...12, using: &rng)) }
                }
            }
            let desired = table(entries.mapValues { Array(Set($0)).sorted() })
            let before = index.snapshot
            let writes = ServiceMapPlanner.plan(desired: desired, index: &index, only: desired.changedFrontends(since: previous))
            #expect(everyIntermediateStateIsConsistent(writes, from: before))
            #expect(apply(writes, to: before) == index.snapshot)
            // The kernel state now is exactly what a full plan would want: it finds nothing to do.
            let (_, fullWrites) = ServiceMapPlanner.plan(desired: desired, current: index.snapshot)
            #expect(fullWrites.isEmpty, "\(fullWrites)")
            for f in index.snapshot.frontends {
                #expect(Set(f.backends.compactMap { $0 }) == Set(desired.entries[f.frontend]?.backends ?? []))
            }
            #expect(Set(index.snapshot.frontends.map(\.frontend)) == Set(desired.entries.keys))
            // No backend without a slot naming it.
            let named = Set(index.snapshot.slots.filter { $0.key.slot != 0 }.map(\.value.backendID))
            #expect(Set(index.snapshot.backends.keys) == named)
            previous = desired
        }
    }

    @Test func fullPlanRemovesOrphanSlotsBeyondTheCount() {
        var start = ServiceMapPlanner.plan(desired: table([frontend(): [backend(2)]]), current: .init()).target
        // A crash between writing slot 2 and raising the count left an orphan.
        start.backends[99] = backend(9)
        start.slots[.init(frontend(), slot: 2)] = .init(backendID: 99, serviceID: 1, count: 0, flags: 0)
        let (target, writes) = ServiceMapPlanner.plan(desired: table([frontend(): [backend(2)]]), current: start)
        #expect(writes == [.deleteSlot(.init(frontend(), slot: 2)), .deleteBackend(id: 99)])
        #expect(target.slots.count == 2 && target.backends.count == 1)
    }
}
