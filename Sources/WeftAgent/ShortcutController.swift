import Foundation
import Logging
import WeftCore
import WeftKernel

/// Runs the same-node socket shortcut for the agent: attaches it unless told
/// not to, proves at start that this kernel really redirects (a probe with
/// two sockets of its own), and then keeps its switch and address table in
/// step with the config. Used from the agent's control thread only.
final class ShortcutController {
    private(set) var status: AgentStatus.ShortcutStatus
    let maps: ShortcutMaps?
    private let flagAllows: Bool
    private let proxyCovered: Bool
    private let logger: Logger

    init(configuration: AgentConfiguration, pinDirectory: String, podCgroup: String, cgroupMount: String,
         logger: Logger) {
        self.logger = logger
        flagAllows = configuration.socketShortcut
        var maps: ShortcutMaps?
        var covered = false
        var status = AgentStatus.ShortcutStatus(state: "off", reason: nil)
        if !configuration.socketShortcut {
            status.reason = "--socket-shortcut off"
            // A previous agent may have left it on: turn it off (flows already
            // on it move to TCP at their next message).
            maps = try? ShortcutMaps(pinDirectory: pinDirectory)
            try? maps?.setEnabled(false)
            maps = nil
        } else {
            do {
                let proxyCgroup = Shortcut.proxyCgroup(cgroupMount: cgroupMount, podCgroup: podCgroup)
                let attachment = try Shortcut.attach(pinDirectory: pinDirectory, podCgroup: podCgroup,
                                                     proxyCgroup: proxyCgroup, logger: logger)
                covered = attachment.proxyCovered
                status.programs = attachment.programs.map { .init(name: $0.name, state: $0.state.rawValue, programID: $0.programID) }
                let m = try ShortcutMaps(pinDirectory: pinDirectory)
                if let failure = m.probe() {
                    status.state = "unavailable"
                    status.reason = "start-up probe failed: \(failure)"
                    try? m.setEnabled(false)
                } else {
                    maps = m
                }
            } catch {
                status.state = "unavailable"
                status.reason = "this kernel refused it: \(error)"
            }
            if let reason = status.reason { logger.warning("socket shortcut \(status.state): \(reason)") }
        }
        self.maps = maps
        self.proxyCovered = covered
        self.status = status
    }

    /// Follows the config: MeshConfig's switch and receivers, this node's
    /// pods, and the proxy's address. Returns the number of map writes.
    func apply(_ state: ClusterState, node: String, proxyAddress: IPv4Address?) throws -> Int {
        guard let maps else { return 0 }
        let config = state.meshConfig.socketShortcut
        var addresses: [ShortcutMaps.LocalAddress] = []
        var receivers: [String] = []
        for w in state.workloads where w.node == node {
            let receives = state.meshConfig.receives(w)
            if receives { receivers.append(w.metadata.qualifiedName) }
            addresses.append(.init(address: w.address, receives: receives, proxy: false))
        }
        if let proxyAddress { addresses.append(.init(address: proxyAddress, receives: false, proxy: true)) }
        // Addresses first, switch last: a socket never meets a half-written table.
        var writes = try maps.setLocal(addresses)
        let enable = flagAllows && config.enabled
        let splice = enable && config.splice
        if try maps.switches() != (enable, splice) {
            try maps.setEnabled(enable, splice: splice)
            writes += 1
            logger.notice("socket shortcut \(enable ? "on" : "off"), splicing past the proxy \(splice ? "on" : "off")")
        }
        status.splice = splice
        status.state = enable ? "on" : "off"
        status.reason = enable ? nil : "MeshConfig socketShortcut.enabled: false"
        status.podReceivers = config.podReceivers.rawValue
        status.receivers = receivers.sorted()
        status.proxyReceives = proxyAddress != nil && proxyCovered
        return writes
    }
}
