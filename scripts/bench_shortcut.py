#!/usr/bin/env python3
"""The same-node socket shortcut on vs off vs plain loopback, side by side in
one lab and one run (issue #7).

Lab: one node (n1), a client pod and a server pod (both shortcut receivers),
the server running scripts/tools/pingpong.c's echo server. Request/response:
send SIZE bytes, wait for SIZE back, as fast as it goes. Each point is measured
twice: with one connection (latency: p50/p99) and with CONNS connections, enough
to keep both cores busy (throughput: requests/s, i.e. CPU cost per request).
  unix      client and server in the server pod over a Unix socket: the ceiling
  loopback  client and server in the server pod over 127.0.0.1: no mesh
  pod       client -> a kernel-only Service -> server (pod -> pod)
  proxy     client -> an L7 Service -> `weft proxy` (opaque TCP) -> server
            (pod -> proxy -> pod)
  plain     the same as proxy between two other pods that are no receivers
            (the default for a pod): the proxy's sockets to them only send
            by TCP, and a spliced message leaves the proxy's socket by TCP
  websocket the plain pods again, each connection first an HTTP/1.1 Upgrade
            the server answers 101 (as a WebSocket starts): the proxy
            routes it as HTTP, then joins the connections byte for byte
pod and proxy run with the shortcut off and on (MeshConfig, switched live),
the order rotating each round; medians over rounds. proxy runs in three
modes: off; "hops" (shortcut on, splicing off: only the pod -> proxy and
proxy -> pod hops are shortened, the proxy still relays every byte); and
"splice" (the default: the kernel moves the opaque bytes past the proxy
once it holds none of them).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import sh, write_section  # noqa: E402

WEFT = os.path.join(ROOT, ".build/release/weft")
ROUNDS = int(os.environ.get("WEFT_BENCH_SHORTCUT_ROUNDS", "3"))
SECONDS = float(os.environ.get("WEFT_BENCH_SHORTCUT_SECONDS", "2"))
CONNS = int(os.environ.get("WEFT_BENCH_SHORTCUT_CONNS", "8"))
SIZES = [64, 1024, 4096, 16384, 65536, 1 << 20]
CLIENT, SERVER, POD_VIP, PROXY_VIP = "198.18.1.10", "198.18.1.20", "198.19.6.10", "198.19.6.11"
PLAIN_CLIENT, PLAIN_SERVER, PLAIN_VIP = "198.18.1.11", "198.18.1.21", "198.19.6.12"


def manifests(tool):
    return f"""
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: client, namespace: bench, labels: {{app: client}}, annotations: {{lab.weft.dev/command: "sleep infinity", weft.dev/socket-shortcut: receive}}}}
spec: {{node: n1, address: {CLIENT}}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: server, namespace: bench, labels: {{app: server}}, annotations: {{lab.weft.dev/command: "{tool} serve 9000", weft.dev/socket-shortcut: receive}}}}
spec: {{node: n1, address: {SERVER}, ports: [{{name: tcp, port: 9000}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: pod, namespace: bench}}
spec: {{clusterIP: {POD_VIP}, selector: {{app: server}}, ports: [{{name: tcp, port: 9000, targetPort: tcp}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: proxy, namespace: bench}}
spec: {{clusterIP: {PROXY_VIP}, selector: {{app: server}}, ports: [{{name: tcp, port: 9000, targetPort: tcp, appProtocol: http}}]}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: plainclient, namespace: bench, labels: {{app: plainclient}}, annotations: {{lab.weft.dev/command: "sleep infinity"}}}}
spec: {{node: n1, address: {PLAIN_CLIENT}}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: plainserver, namespace: bench, labels: {{app: plainserver}}, annotations: {{lab.weft.dev/command: "{tool} serve 9000"}}}}
spec: {{node: n1, address: {PLAIN_SERVER}, ports: [{{name: tcp, port: 9000}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: plain, namespace: bench}}
spec: {{clusterIP: {PLAIN_VIP}, selector: {{app: plainserver}}, ports: [{{name: tcp, port: 9000, targetPort: tcp, appProtocol: http}}]}}
"""


MODES = {"off": (False, False), "hops": (True, False), "splice": (True, True)}   # mode -> (enabled, splice)


def mesh(mode):
    enabled, splice = MODES[mode]
    return ("apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
            f"spec: {{socketShortcut: {{enabled: {str(enabled).lower()}, splice: {str(splice).lower()}}}}}\n")


def status():
    out = sh("curl", "-s", "--unix-socket", "/run/weft/n1/agent.sock", "http://agent/status")
    return json.loads(out)


def in_mode(s, mode):
    enabled, splice = MODES[mode]
    sc = s["shortcut"]
    return sc["state"] == ("on" if enabled else "off") and (not enabled or sc.get("splice") == splice)


def set_shortcut(config, mode):
    s = status()
    if in_mode(s, mode):
        return   # the same file again would not make a new generation
    before = s["generation"]
    path = os.path.join(config, "mesh.yaml")
    with open(path + ".tmp", "w") as f:
        f.write(mesh(mode))
    os.rename(path + ".tmp", path)
    for _ in range(300):
        s = status()
        if s["generation"] > before and in_mode(s, mode):
            return
        time.sleep(0.02)
    raise SystemExit(f"the agent did not switch the shortcut to {mode}: {s['shortcut']}")


def pingpong(tool, pod, host, size, conns, verb="run"):
    out = sh(WEFT, "lab", "exec", pod, "--", tool, verb, host, "9000", str(size), str(SECONDS), str(conns))
    r = json.loads(out.strip().splitlines()[-1])
    if r["failed"] or r["requests"] == 0:
        raise SystemExit(f"pingpong {pod} -> {host} size {size} failed: {r}")
    return r


def main():
    work = tempfile.mkdtemp(prefix="weft-bench-shortcut-")
    tool = os.path.join(work, "pingpong")
    clang = "clang"
    for c in ["clang", "/opt/swift/usr/bin/clang", "cc"]:
        if subprocess.run(["sh", "-c", f"command -v {c}"], capture_output=True).returncode == 0:
            clang = c
            break
    sh(clang, "-O2", "-pthread", "-o", tool, os.path.join(ROOT, "scripts/tools/pingpong.c"))
    config = os.path.join(work, "config")
    os.makedirs(config)
    with open(os.path.join(config, "bench.yaml"), "w") as f:
        f.write(manifests(tool))
    with open(os.path.join(config, "mesh.yaml"), "w") as f:
        f.write(mesh("splice"))
    subprocess.run([WEFT, "lab", "down"], capture_output=True)
    sh(WEFT, "lab", "up", "--config", config, "--nodes", "1")
    results = {}   # (path, mode, size, kind) -> [run]; kind "lat" (1 connection) or "tput" (CONNS)

    def measure(path, mode, pod, host, verb="run"):
        for size in SIZES:
            for kind, conns in [("lat", 1), ("tput", CONNS)]:
                results.setdefault((path, mode, size, kind), []).append(pingpong(tool, pod, host, size, conns, verb))

    try:
        for pod, server in [("bench/client", SERVER), ("bench/plainclient", PLAIN_SERVER)]:
            for _ in range(100):
                if subprocess.run([WEFT, "lab", "exec", pod, "--", tool, "run", server, "9000", "64", "0.05", "1"],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
        if status()["shortcut"]["state"] != "on":
            raise SystemExit(f"the shortcut is not available here: {status()['shortcut']}")
        for rnd in range(ROUNDS):
            order = list(MODES)[rnd % 3:] + list(MODES)[:rnd % 3]
            measure("unix", "-", "bench/server", "unix")
            measure("loopback", "-", "bench/server", "127.0.0.1")
            for mode in order:
                set_shortcut(config, mode)
                if mode != "hops":   # splicing changes nothing pod -> pod
                    measure("pod", "on" if mode == "splice" else "off", "bench/client", POD_VIP)
                measure("proxy", "on" if mode == "splice" else mode, "bench/client", PROXY_VIP)
                measure("plain", "on" if mode == "splice" else mode, "bench/plainclient", PLAIN_VIP)
                measure("websocket", "on" if mode == "splice" else mode, "bench/plainclient", PLAIN_VIP, "upgrade")
            print(f"round {rnd + 1}/{ROUNDS} done", flush=True)
        events = status()["shortcut"].get("events", {})
    finally:
        subprocess.run([WEFT, "lab", "down"], capture_output=True)
        subprocess.run(["rm", "-rf", work])
    summary = {}
    for key, runs in results.items():
        summary["|".join(map(str, key))] = {f: statistics.median(r[f] for r in runs) for f in ["rps", "p50_us", "p99_us", "mbps"]}
    with open(os.path.join(ROOT, "docs/bench-shortcut.json"), "w") as f:
        json.dump({"summary": summary, "events": events, "rounds": ROUNDS, "seconds": SECONDS, "conns": CONNS}, f, indent=1, sort_keys=True)
    plot(summary)
    report(summary, events)


def get(summary, path, mode, size, kind="tput"):
    return summary[f"{path}|{mode}|{size}|{kind}"]


def human(size):
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB" if size >= 1024 else f"{size} B"


def plot(summary):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 4, figsize=(21, 4))
    for ax, path in zip(axes, ["pod", "proxy", "plain", "websocket"]):
        xs = range(len(SIZES))
        modes = [("off", "o-", "shortcut off"), ("on", "s-", "shortcut on")]
        if path != "pod":
            modes = [("off", "o-", "shortcut off"), ("hops", "d-", "on, splicing off (hops only)"),
                     ("on", "s-", "on (default: splice past the proxy)")]
        for mode, style, label in modes:
            ax.plot(xs, [get(summary, path, mode, s)["rps"] for s in SIZES], style, label=label)
        ax.plot(xs, [get(summary, "loopback", "-", s)["rps"] for s in SIZES], "^--", label="plain loopback (no mesh)")
        ax.plot(xs, [get(summary, "unix", "-", s)["rps"] for s in SIZES], "v:", label="Unix socket (ceiling)")
        ax.set_xticks(list(xs), [human(s) for s in SIZES])
        ax.set_yscale("log")
        ax.set_title({"pod": "pod -> pod", "proxy": "pod -> proxy -> pod (receivers)",
                      "plain": "pod -> proxy -> pod (no receivers)",
                      "websocket": "after an Upgrade (no receivers)"}[path])
        ax.set_xlabel("message size (request and response)")
        ax.set_ylabel(f"requests/s, {CONNS} connections")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "docs/bench-shortcut.png"), dpi=110)


def report(summary, events):
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "## Same-node socket shortcut (issue #7)",
        "",
        f"Made by `scripts/bench shortcut` at {rev} on {time.strftime('%Y-%m-%d')}: {ROUNDS} rounds, medians; "
        f"request/response (SIZE bytes each way) for {SECONDS:g} s per point, measured twice: "
        f"with {CONNS} connections for requests/s (both cores busy, so it shows CPU cost per request) and with "
        "one connection for latency. The shortcut is switched live by MeshConfig between the off and on runs, "
        "their order rotating by round. *on* is the default configuration. For the proxy path, *hops only* is the "
        "shortcut with MeshConfig `socketShortcut.splice: false`: the pod -> proxy and proxy -> pod hops are "
        "redirected but the proxy reads and writes every byte; by default the kernel splices the opaque bytes "
        "past the proxy once it holds none of a direction's bytes (docs/shortcut.md, \"Splice\"), so the proxy "
        "handles the first exchange and then only the connection's end.",
        "",
        "- unix: client and server in one pod over a Unix socket: what skipping TCP/IP can gain at most.",
        "- loopback: client and server in one pod over 127.0.0.1, no mesh in the way.",
        "- pod: client pod -> kernel-only Service -> server pod. proxy: client pod -> L7 Service -> `weft proxy` (opaque TCP) -> server pod, "
        "both pods receivers (a spliced message goes into the server's queue). plain: the same between two pods that are no receivers, "
        "the default for a pod (a spliced message leaves the proxy's socket to the far pod by TCP). websocket: the plain pods "
        "again, each connection first an HTTP/1.1 Upgrade the server answers 101, as a WebSocket starts (the proxy routes it "
        "as HTTP, then joins the two connections byte for byte; request/response after it).",
        "- The client, the server and the proxy share the VM's 2 cores; ratios are what compare.",
        "",
        f"| path | size | unix req/s | loopback req/s | off req/s | hops only req/s | on req/s | on / off | hops only / off | 1 conn on / off | 1 conn p50 off -> on | 1 conn p99 off -> on | on MB/s each way |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    small_ok, never_worse = True, True
    for path in ["pod", "proxy", "plain", "websocket"]:
        for size in SIZES:
            ux, lo = get(summary, "unix", "-", size), get(summary, "loopback", "-", size)
            off, on = get(summary, path, "off", size), get(summary, path, "on", size)
            off1, on1 = get(summary, path, "off", size, "lat"), get(summary, path, "on", size, "lat")
            ratio = on["rps"] / off["rps"]
            if size <= 4096 and ratio < 1.5:
                small_ok = False
            if ratio < 0.95:
                never_worse = False
            hops = f"{get(summary, path, 'hops', size)['rps']:,.0f}" if path != "pod" else "–"
            hops_ratio = f"{get(summary, path, 'hops', size)['rps'] / off['rps']:.2f}x" if path != "pod" else "–"
            lines.append(f"| {path} | {human(size)} | {ux['rps']:,.0f} | {lo['rps']:,.0f} | {off['rps']:,.0f} | {hops} | {on['rps']:,.0f} | "
                         f"**{ratio:.2f}x** | {hops_ratio} | {on1['rps'] / off1['rps']:.2f}x | {off1['p50_us']:.0f} -> {on1['p50_us']:.0f} µs | "
                         f"{off1['p99_us']:.0f} -> {on1['p99_us']:.0f} µs | {on['mbps']:.1f} |")
    lines += [
        "",
        f"Against the target, read on the {CONNS}-connection requests/s (at least 1.5x up to 4 KiB; "
        "never more than 5% worse than off at any size): "
        f"up to 4 KiB {'met' if small_ok else 'NOT met'}; never worse {'met' if never_worse else 'NOT met'}.",
        "",
        "Kernel counters over the run: " + ", ".join(f"{k} {v:,}" for k, v in sorted(events.items()) if v) + ".",
        "",
        "![shortcut](bench-shortcut.png)",
    ]
    write_section("shortcut", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
