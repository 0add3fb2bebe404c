import Foundation
import Logging
import Synchronization
import WeftCore
import WeftKernel

/// The one path from config to kernel: read the manifests, validate the set
/// whole, compute the desired service table, diff it against what the maps
/// hold, write the difference in a safe order. A refused set changes nothing.
final class Reconciler {
    private let configuration: AgentConfiguration
    private let maps: ServiceMaps
    private let cache = ManifestCache()
    private let logger: Logger
    let status: SharedStatus
    /// What the kernel's service maps hold, as of the last successful write.
    private var applied: ServiceMapIndex
    /// The table those maps were planned from; nil forces a full plan.
    private var lastTable: ServiceTable?
    private var inForce: ClusterState?
    /// Set when a write failed part-way: the next pass re-reads the kernel.
    private var kernelUncertain = false

    init(configuration: AgentConfiguration, maps: ServiceMaps, status: SharedStatus, logger: Logger) throws {
        self.configuration = configuration
        self.maps = maps
        self.status = status
        self.logger = logger
        // Adopt: start from what the pinned maps hold (a previous agent's
        // work), so an unchanged config writes nothing.
        self.applied = ServiceMapIndex(try maps.snapshot())
    }

    /// Entries currently in the service and backend maps.
    var mapFill: (services: Int, backends: Int) { (applied.snapshot.slots.count, applied.snapshot.backends.count) }

    enum Outcome {
        /// The config set is in force (possibly with nothing to write).
        case inForce
        /// The config set was refused; the previous one stays. Wait for the next file change.
        case refused
        /// Writing the maps failed; retry from the kernel's state.
        case kernelFailed
    }

    @discardableResult
    func reconcile() -> Outcome {
        let start = ContinuousClock.now
        var phases: [(String, ContinuousClock.Instant)] = [("start", start)]
        func mark(_ name: String) { phases.append((name, .now)) }
        let state: ClusterState
        switch cache.load(directory: configuration.configDirectory) {
        case .failure(let errors):
            for error in errors.errors { logger.error("config refused: \(error)") }
            logger.error("config refused: \(errors.errors.count) error(s); generation \(status.withLock { $0.generation }) stays in force")
            status.withLock { $0.configErrors = errors.errors.map(\.description) }
            return .refused
        case .success(let s):
            state = s
        }
        do {
            if kernelUncertain {
                applied = ServiceMapIndex(try maps.snapshot())
                lastTable = nil
                kernelUncertain = false
            }
            mark("load")
            let table = ServiceTable(state)
            mark("table")
            // Only frontends whose backends changed are planned; the first pass
            // (adoption) compares everything against what the kernel holds.
            // Planned in place: if a write then fails, the next pass rebuilds
            // the index from the kernel (kernelUncertain), so nothing is lost.
            let writes = ServiceMapPlanner.plan(desired: table, index: &applied,
                                                only: lastTable.map { table.changedFrontends(since: $0) })
            mark("plan")
            do {
                try maps.apply(writes)
                mark("write")
            } catch {
                kernelUncertain = true
                throw error
            }
            lastTable = table
            let seconds = (ContinuousClock.now - start).seconds
            let changed = inForce != state
            inForce = state
            status.withLock { s in
                if changed || s.generation == 0 {
                    s.generation += 1
                    s.appliedAt = Date().timeIntervalSince1970
                }
                s.configErrors = []
                s.lastWrites = writes.count
                s.lastReconcileSeconds = seconds
            }
            status.setInForce(table: table, config: state)
            mark("status")
            let phaseMillis = Dictionary(uniqueKeysWithValues: zip(phases.dropFirst(), phases).map {
                ($0.0.0, ($0.0.1 - $0.1.1).seconds * 1000)
            })
            status.withLock { $0.lastReconcilePhases = phaseMillis }
            logger.debug("reconcile phases", metadata: Logger.Metadata(uniqueKeysWithValues: phaseMillis.map {
                ($0.key, .string(String(format: "%.1fms", $0.value)))
            }))
            if !writes.isEmpty || changed {
                logger.info("config in force", metadata: [
                    "generation": "\(status.withLock { $0.generation })", "services": "\(state.services.count)",
                    "workloads": "\(state.workloads.count)", "map_writes": "\(writes.count)",
                    "seconds": "\(String(format: "%.4f", seconds))",
                ])
            }
            return .inForce
        } catch {
            logger.error("writing the service maps failed: \(error); will retry from the kernel's state")
            status.withLock { $0.configErrors = ["kernel: \(error)"] }
            return .kernelFailed
        }
    }
}

extension Duration {
    var seconds: Double {
        let (s, attos) = components
        return Double(s) + Double(attos) / 1e18
    }
}
