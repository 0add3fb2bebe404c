#!/usr/bin/env python3
"""Where the fixed-load time goes, Weft against HAProxy (docs/proxy.md,
"Where the CPU goes"). Prints what it measures; writes no file.

The lab and load of `scripts/bench proxy` (one node, nginx backend, h2load in
a client pod at 1,600 requests/s from one h2load: HTTP/2 4 connections x 8
streams, or with WEFT_BURSTS_LOAD=HTTP/1.1 16 connections), with the socket
shortcut off so that every byte crosses the pods' interfaces.
Per round and proxy, alternating:
  - tcpdump on the client pod's and the backend pod's interface (one clock):
    per burst of requests (events less than 400 µs apart), the client's first
    request packet to the first request at the backend ("in"), the backend's
    first request to its last response ("backend"), the backend's last
    response to the last packet to the client ("out"); the client's first to
    its last request packet ("send", h2load's own time, which no proxy
    touches but the host's speed moves) and to the last packet to it
    ("through"), and "through" over "send"; the backend's time per request
    (request in to response out on one connection); packets each way
  - h2load's per-request log: p50/p99, and the median latency by finishing
    rank (first, middle and last third) inside the bursts of the most
    common size (one h2load's connections send together)
  - the proxy's threads' CPU ticks (/proc/PID/task/*/stat) over the run
Environment: WEFT_BURSTS_LOAD (HTTP/2), WEFT_BURSTS_ROUNDS (3),
WEFT_BURSTS_SECONDS (4).
"""
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy as b  # noqa: E402
from benchdoc import NodeProcesses, sh  # noqa: E402
from profile_proxy import answers  # noqa: E402

ROUNDS = int(os.environ.get("WEFT_BURSTS_ROUNDS", "3"))
SECONDS = int(os.environ.get("WEFT_BURSTS_SECONDS", "4"))
LOAD = os.environ.get("WEFT_BURSTS_LOAD", "HTTP/2")
if LOAD not in b.LOADS:
    raise SystemExit(f"WEFT_BURSTS_LOAD: {LOAD!r} is not one of {', '.join(b.LOADS)}")
RATE = 1600
GAP = 400e-6  # events closer than this belong to one burst
NO_SHORTCUT = ("apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
               "spec:\n  socketShortcut:\n    enabled: false\n")


def thread_ticks(pid):
    """utime + stime of each thread of `pid`, by thread id."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            s = open(f"/proc/{pid}/task/{t}/stat").read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        out[t] = int(f[11]) + int(f[12])
    return out


def packets(pcap, client):
    """(time, kind, bytes) of the data packets in `pcap`: Q/S a request to /
    a response from the backend's :8080, q/s from / to the client pod."""
    text = subprocess.run(["tcpdump", "-r", pcap, "-nn", "-tt", "-q"], capture_output=True, text=True).stdout
    out = []
    for line in text.splitlines():
        p = line.split()
        if "IP" not in p or not p[-1].isdigit() or p[-1] == "0":
            continue
        k = p.index("IP")
        src, dst = p[k + 1], p[k + 3].rstrip(":")
        if dst.endswith(".8080"):
            kind = "Q"
        elif src.endswith(".8080"):
            kind = "S"
        elif src.startswith(client + "."):
            kind = "q"
        else:
            kind = "s"
        out.append((float(p[0]), kind, src, dst))
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def analyse(events, rows):
    events.sort()
    bursts, cur = [], [events[0]]
    for e in events[1:]:
        if e[0] - cur[-1][0] > GAP:
            bursts.append(cur)
            cur = [e]
        else:
            cur.append(e)
    bursts.append(cur)
    hops = collections.defaultdict(list)
    for burst in bursts:
        first = {k: next((e[0] for e in burst if e[1] == k), None) for k in "qQ"}
        last = {k: next((e[0] for e in reversed(burst) if e[1] == k), None) for k in "qSs"}
        if None in first.values() or None in last.values():
            continue
        hops["in"].append((first["Q"] - first["q"]) * 1e6)
        hops["backend"].append((last["S"] - first["Q"]) * 1e6)
        hops["out"].append((last["s"] - last["S"]) * 1e6)
        hops["send"].append((last["q"] - first["q"]) * 1e6)
        hops["through"].append((last["s"] - first["q"]) * 1e6)
    # The backend's time per request: a request in, then the response out
    # on the same connection.
    pending, service = {}, []
    for t, kind, src, dst in events:
        if kind == "Q":
            pending[src] = t
        elif kind == "S" and dst in pending:
            service.append((t - pending.pop(dst)) * 1e6)
    # h2load: latency by finishing rank inside the bursts of the most common
    # size, in thirds.
    groups, cur = [], [rows[0]]
    for row in rows[1:]:
        if row[0] - cur[0][0] < 100:
            cur.append(row)
        else:
            groups.append(cur)
            cur = [row]
    groups.append(cur)
    size = collections.Counter(len(g) for g in groups).most_common(1)[0][0]
    ranks = collections.defaultdict(list)
    for g in groups:
        if len(g) == size:
            for i, row in enumerate(sorted(r[1] for r in g)):
                ranks[min(2, i * 3 // size)].append(row)
    count = collections.Counter(e[1] for e in events)
    m = {h: median(v) for h, v in hops.items()}
    return {"bursts": len(hops["in"]), **m, "scaled": m["through"] / m["send"] if m["send"] > 0 else float("nan"),
            "service_p50": median(service), "to_client": count["s"], "from_client": count["q"],
            "size": size, "rank": [median(ranks[i]) for i in range(3)]}


def main():
    for tool in ("tcpdump", "h2load", "haproxy"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            raise SystemExit(f"{tool} is not installed (scripts/setup installs it)")
    work = tempfile.mkdtemp(prefix="weft-bursts-")
    os.chmod(work, 0o755)
    b.write(f"{work}/backend.conf", b.BACKEND_CONF.format(dir=work))
    b.write(f"{work}/haproxy.cfg", b.HAPROXY_CONF.format(backend=b.BACKEND, gw=b.GW, threads=b.THREADS, haproxy_affinity=""))
    config = f"{work}/config"
    os.mkdir(config)
    b.write(f"{config}/lab.yaml", b.lab_yaml(work))
    b.write(f"{config}/mesh.yaml", NO_SHORTCUT)
    sh(b.WEFT, "lab", "down", check=False)
    sh(b.WEFT, "lab", "up", "--config", config, "--nodes", "1")
    processes = NodeProcesses(b.WEFT)
    results = collections.defaultdict(list)
    try:
        node = json.load(open("/run/weft/lab/state.json"))["nodes"][0]
        pids = {"haproxy": processes.start(node, "haproxy", "-f", f"{work}/haproxy.cfg", "-db"),
                "weft": int(open("/run/weft/n1/proxy.pid").read())}
        for name in pids:
            answers(name, b.TARGETS[name][LOAD], load=LOAD)
        for rnd in range(ROUNDS):
            for name in ("weft", "haproxy") if rnd % 2 == 0 else ("haproxy", "weft"):
                captures, pcaps = [], []
                for pod in ("bench/client", "bench/backend"):
                    pcap = f"{work}/{name}-{pod.split('/')[1]}.pcap"
                    pcaps.append(pcap)
                    captures.append(subprocess.Popen(
                        [b.WEFT, "lab", "exec", pod, "--", "tcpdump", "-i", "weft0", "-s", "96", "-U", "-w", pcap, "tcp"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(1)
                before = thread_ticks(pids[name])
                r = b.h2load(b.TARGETS[name][LOAD], LOAD, SECONDS, RATE, keep_rows=True)
                after = thread_ticks(pids[name])
                time.sleep(0.3)
                for c in captures:
                    c.terminate()
                for c in captures:
                    c.wait(timeout=10)
                events = [e for pcap in pcaps for e in packets(pcap, b.CLIENT)]
                if not events or not r["rows"]:
                    raise SystemExit(f"{name}: nothing captured or logged")
                a = analyse(events, r["rows"])
                busy = sorted((after[t] - before.get(t, 0) for t in after if after[t] - before.get(t, 0) > 0), reverse=True)
                a.update(p50=r["p50_us"], p99=r["p99_us"], failed=r["failed"], ticks=busy[:2])
                results[name].append(a)
                print(f"round {rnd + 1} {name}: p50 {a['p50']:.0f} µs p99 {a['p99']:.0f} µs | per burst (median of "
                      f"{a['bursts']}): in {a['in']:.0f} µs, backend {a['backend']:.0f} µs, out {a['out']:.0f} µs, send "
                      f"{a['send']:.0f} µs, through {a['through']:.0f} µs, through / send {a['scaled']:.2f} | "
                      f"backend per request p50 {a['service_p50']:.0f} µs | by rank in bursts of {a['size']}: "
                      + " / ".join(f"{x:.0f}" for x in a["rank"]) + " µs | packets to/from client "
                      f"{a['to_client']}/{a['from_client']} | busiest threads' ticks {a['ticks']} | failed {a['failed']}",
                      flush=True)
    finally:
        processes.stop()
        sh(b.WEFT, "lab", "down", check=False)
        subprocess.run(["rm", "-rf", work])
    print(f"\n{LOAD}, medians over rounds:")
    print("| proxy | p50 | p99 | in | backend | out | send | through | through / send (each round) "
          "| backend per request p50 | rank: first / middle / last third |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        m = {k: median([r[k] for r in runs]) for k in ("p50", "p99", "in", "backend", "out", "send", "through", "service_p50")}
        scaled = ", ".join(f"{r['scaled']:.2f}" for r in runs)
        rank = " / ".join(f"{median([r['rank'][i] for r in runs]):.0f}" for i in range(3))
        print(f"| {name} | {m['p50']:.0f} µs | {m['p99']:.0f} µs | {m['in']:.0f} µs | {m['backend']:.0f} µs | "
              f"{m['out']:.0f} µs | {m['send']:.0f} µs | {m['through']:.0f} µs | {scaled} | {m['service_p50']:.0f} µs | "
              f"{rank} µs |")


if __name__ == "__main__":
    main()
