#!/usr/bin/env python3
"""What a UDP datagram costs in Weft's kernel datapath (issues #2 and #3,
their UDP parts): a Service's clusterIP for connected and unconnected
sockets, and NetworkPolicy's per-exchange judgement.

Lab: a client pod on n1, a UDP echo server pod on n2 (labtool `listen`),
a Service `echo` (clusterIP CLUSTER_IP:53 -> the pod's 5353/UDP). Each side
is one client socket keeping WINDOW datagrams in flight for SECONDS
(labtool `udp-rate`), an exchange being a datagram out and its echo back:

  direct connected      connect(pod:5353), then send/recv
  direct sendto         sendto(pod:5353)/recvfrom on an unconnected socket
  clusterIP connected   connect(clusterIP:53): connect4 picks the backend once
  clusterIP sendto      sendto(clusterIP:53): sendmsg4 picks a backend for
                        each datagram, recvmsg4 reports the clusterIP back
  clusterIP sendto, ClientIP affinity
                        the same to a Service with sessionAffinity: ClientIP:
                        each datagram finds the client's kept backend

in two phases: no NetworkPolicy, then both pods isolated (the server's
ingress allows the client on 5353/UDP, the client's egress allows the
server), so every new exchange is judged and remembered (weft_udp_flows).
Sides rotate within each round; rates are compared with `direct sendto` of
the same round (the median of the rounds' ratios). The kernel's own
accounting (kernel.bpf_stats_enabled) gives every weft program's run time on
both nodes per exchange, which this VM's noise does not move.
"""
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import agent, generation, revision, sh, write_config as write, write_section  # noqa: E402

WEFT = os.path.join(ROOT, ".build/release/weft")
TOOL = os.path.join(ROOT, "Tests/WeftEndToEndTests/Tools/labtool.py")
ROUNDS = int(os.environ.get("WEFT_BENCH_UDP_ROUNDS", "7"))
SECONDS = float(os.environ.get("WEFT_BENCH_UDP_SECONDS", "2"))
WINDOW = int(os.environ.get("WEFT_BENCH_UDP_WINDOW", "8"))
CLIENT, SERVER, CLUSTER_IP, STICKY_IP = "198.18.1.10", "198.18.2.10", "198.19.0.53", "198.19.0.54"
SIDES = [("direct connected", "udp", SERVER, 5353), ("direct sendto", "udps", SERVER, 5353),
         ("clusterIP connected", "udp", CLUSTER_IP, 53), ("clusterIP sendto", "udps", CLUSTER_IP, 53),
         ("clusterIP sendto, ClientIP affinity", "udps", STICKY_IP, 53)]
BASE = "direct sendto"

PODS = f"""apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: client, namespace: bench, labels: {{app: client}}, annotations: {{lab.weft.dev/command: "sleep infinity"}}}}
spec: {{node: n1, address: {CLIENT}}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: echo, namespace: bench, labels: {{app: echo}}, annotations: {{lab.weft.dev/command: "python3 {TOOL} listen udp:5353"}}}}
spec: {{node: n2, address: {SERVER}, ports: [{{name: echo, port: 5353, protocol: UDP}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: bench}}
spec: {{clusterIP: {CLUSTER_IP}, selector: {{app: echo}}, ports: [{{name: echo, port: 53, targetPort: echo, protocol: UDP}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-sticky, namespace: bench}}
spec: {{clusterIP: {STICKY_IP}, selector: {{app: echo}}, sessionAffinity: ClientIP, ports: [{{name: echo, port: 53, targetPort: echo, protocol: UDP}}]}}
"""

POLICY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: echo-in, namespace: bench}
spec:
  podSelector: {matchLabels: {app: echo}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{protocol: UDP, port: 5353}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: bench}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: echo}}}], ports: [{protocol: UDP, port: 5353}]}]
"""


def programs():
    """(node, name, id) of every weft program on both nodes."""
    out = []
    for node in ("n1", "n2"):
        out += [(node, p["name"], p["programID"]) for p in json.loads(agent(node, "/status"))["programs"]]
    return out


def prog_stats(progs):
    """{name: (run_time_ns, run_cnt)}, both nodes' programs of a name summed."""
    stats = {}
    for _, name, i in progs:
        info = json.loads(sh("bpftool", "prog", "show", "id", str(i), "-j"))
        ns, runs = stats.get(name, (0, 0))
        stats[name] = (ns + info.get("run_time_ns", 0), runs + info.get("run_cnt", 0))
    return stats


def run_side(mode, host, port, progs):
    before = prog_stats(progs)
    out = sh(WEFT, "lab", "exec", "bench/client", "--", "python3", TOOL, "udp-rate", mode, host, str(port),
             str(SECONDS), str(WINDOW))
    after = prog_stats(progs)
    r = json.loads(out.strip().splitlines()[-1])
    n = max(r["exchanges"], 1)
    r["programs"] = {name: {"ns": (after[name][0] - before[name][0]) / n, "runs": (after[name][1] - before[name][1]) / n}
                     for name in after if after[name][1] > before[name][1]}
    r["ns"] = sum(p["ns"] for p in r["programs"].values())
    r["runs"] = sum(p["runs"] for p in r["programs"].values())
    return r


def wait_for_echo():
    for _ in range(100):  # the server starts asynchronously
        r = json.loads(sh(WEFT, "lab", "exec", "bench/client", "--", "python3", TOOL, "udp-rate", "udps", SERVER, "5353",
                          "0.2", "1", check=False).strip().splitlines()[-1] or "{}")
        if r.get("exchanges", 0) > 0:
            return
        time.sleep(0.1)
    raise SystemExit("the echo server never answered")


def main():
    config = tempfile.mkdtemp(prefix="weft-bench-udp-")
    write(config, "pods.yaml", PODS)
    write(config, "policy.yaml", "# no policy\n")
    sh(WEFT, "lab", "down", check=False)
    sh(WEFT, "lab", "up", "--config", config, "--nodes", "2")
    old_stats = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
    results = {}
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        progs = programs()
        wait_for_echo()
        for phase in ("no policy", "both pods isolated"):
            if phase != "no policy":
                before = {node: generation(node) for node in ("n1", "n2")}
                write(config, "policy.yaml", POLICY)
                while any(generation(node) <= before[node] for node in ("n1", "n2")):
                    time.sleep(0.02)
                wait_for_echo()
            rounds = {name: [] for name, *_ in SIDES}
            for k in range(ROUNDS):
                order = SIDES[k % len(SIDES):] + SIDES[:k % len(SIDES)]
                if k % 2:
                    order.reverse()
                for name, mode, host, port in order:
                    rounds[name].append(run_side(mode, host, port, progs))
            row = {}
            for name, rs in rounds.items():
                names = sorted({p for r in rs for p in r["programs"]})
                row[name] = {
                    "rate": statistics.median(r["rate"] for r in rs),
                    "vs_base": statistics.median(a["rate"] / b["rate"] for a, b in zip(rs, rounds[BASE])),
                    "ns": statistics.median(r["ns"] for r in rs),
                    "runs": statistics.median(r["runs"] for r in rs),
                    "programs": {p: {"ns": statistics.median(r["programs"].get(p, {"ns": 0})["ns"] for r in rs),
                                     "runs": statistics.median(r["programs"].get(p, {"runs": 0})["runs"] for r in rs)}
                                 for p in names},
                    "lost": sum(r["lost"] for r in rs), "exchanges": sum(r["exchanges"] for r in rs),
                    "foreign": sum(r["foreign"] for r in rs), "errors": sum(r["errors"] for r in rs),
                    "rounds": rs,
                }
                print(f"{phase} / {name}: {row[name]['rate']:,.0f}/s ({row[name]['vs_base']:.3f}x) "
                      f"{row[name]['ns']:.0f} ns/exchange, {row[name]['runs']:.2f} runs", flush=True)
            results[phase] = row
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(old_stats)
        sh(WEFT, "lab", "down", check=False)
        sh("rm", "-rf", config)
    saved = {"revision": revision(), "rounds": ROUNDS, "seconds": SECONDS, "window": WINDOW, "phases": results}
    with open(os.path.join(ROOT, "docs/bench-udp.json"), "w") as f:
        json.dump(saved, f, indent=1)
    report(saved)


def short(name):
    return name.removeprefix("weft_")


def report(saved):
    results, rounds, seconds, window = saved["phases"], saved["rounds"], saved["seconds"], saved["window"]
    lines = [
        "## UDP: what a datagram costs in the kernel (issues #2 and #3)",
        "",
        f"Made by `scripts/bench udp` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel {os.uname().release}), "
        f"release build at {saved['revision']}; {rounds} rounds of {seconds:.0f} s per side, the sides' order rotating by round and "
        "reversed every other one; medians.",
        "",
        f"A client pod on n1 and a UDP echo server pod on n2 (cross-node, through the lab fabric); one client socket per side "
        f"keeps {window} datagrams of 32 bytes in flight, an *exchange* being one datagram out and its echo back. "
        "`connected`: connect(), then send()/recv(); `sendto`: an unconnected socket, sendto()/recvfrom(). Through the "
        "clusterIP, connect4 picks the backend once for a connected socket, and sendmsg4 picks one for each datagram of an "
        "unconnected one (and remembers it in `weft_udp_revnat`, so that recvmsg4 reports the clusterIP as the source of "
        "the echo); with `sessionAffinity: ClientIP` it finds the client's kept backend instead of drawing one "
        "(`weft_affinity`, checked against its slot). In the second phase both pods are isolated by NetworkPolicy (the server's ingress allows the client on "
        "5353/UDP, the client's egress the server): each new exchange is judged, and a known one is passed on a "
        "`weft_udp_flows` lookup. *kernel ns* is the run time the kernel accounts to every weft program on both nodes "
        "(`kernel.bpf_stats_enabled`) over the side's run, per exchange; the Python client and echo server set the rates, "
        f"which are compared with `{BASE}` in the same round (the median of the rounds' ratios).",
        "",
        "| phase | side | exchanges/s | ÷ direct sendto | kernel ns per exchange | program runs per exchange | where it goes (ns per exchange) | lost | answers not from the address sent to |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for phase, row in results.items():
        for name, *_ in SIDES:
            s = row[name]
            where = ", ".join(f"{short(p)} {v['ns']:.0f} ({v['runs']:.2f})" for p, v in
                              sorted(s["programs"].items(), key=lambda kv: -kv[1]["ns"]) if v["runs"] > 0.001)
            lines.append(f"| {phase} | {name} | {s['rate']:,.0f} | {s['vs_base']:.3f} | {s['ns']:.0f} | {s['runs']:.2f} | "
                         f"{where} | {s['lost']} of {s['exchanges']:,} | {s['foreign']} |")
    plain, iso = results.get("no policy"), results.get("both pods isolated")
    if plain and iso:
        lines += [
            "",
            "What the clusterIP adds per exchange: "
            f"{plain['clusterIP connected']['ns'] - plain['direct connected']['ns']:+.0f} ns connected, "
            f"{plain['clusterIP sendto']['ns'] - plain['direct sendto']['ns']:+.0f} ns unconnected (no policy), "
            f"{plain['clusterIP sendto, ClientIP affinity']['ns'] - plain['clusterIP sendto']['ns']:+.0f} ns more "
            "with ClientIP affinity; "
            "what the policy adds: "
            f"{iso['direct connected']['ns'] - plain['direct connected']['ns']:+.0f} ns connected, "
            f"{iso['direct sendto']['ns'] - plain['direct sendto']['ns']:+.0f} ns unconnected (direct), "
            f"{iso['clusterIP sendto']['ns'] - plain['clusterIP sendto']['ns']:+.0f} ns unconnected through the clusterIP. "
            "In brackets, the program's runs per exchange. Raw rounds: `docs/bench-udp.json`.",
        ]
    write_section("udp", lines)


if __name__ == "__main__":
    if "--report-only" in sys.argv:
        report(json.load(open(os.path.join(ROOT, "docs/bench-udp.json"))))
    else:
        main()
