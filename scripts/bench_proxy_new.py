#!/usr/bin/env python3
"""New connections through the L7 proxies: what a client that opens a
connection for each request (no keep-alive) costs each proxy.

The lab, proxies and configurations of `scripts/bench proxy` (HTTP/1.1 side:
Weft through the Service clusterIP, captured by connect4; HAProxy and nginx
on the node; every proxy with 2 threads/workers bound one per core, each
keeping its connections to the nginx backend alive). Per round, the sides in
rotating order: h2load --h1 opens NEW_RATE connections a second for NEW_S
seconds, one request on each, then closes it:
  *CPU per connection*  the proxy's CPU time (its processes, from /proc)
                        over the connections answered
  *time to 1st byte*    h2load's mean, connect to the answer's first byte
  *failed*              connections not answered 200
Direct (the backend's own address) gives the time to first byte with no
proxy. Results: the `proxy_new` section of docs/benchmarks.md.
"""
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import revision, sh, write_section  # noqa: E402
from bench_proxy import TARGETS, pids_of, proxies_lab  # noqa: E402
from bench_tls import h2load_new  # noqa: E402

ROUNDS = int(os.environ.get("WEFT_BENCH_NEW_ROUNDS", "5"))
NEW_S = int(os.environ.get("WEFT_BENCH_NEW_SECONDS", "4"))
NEW_RATE = int(os.environ.get("WEFT_BENCH_NEW_RATE", "500"))
SIDES = ["direct", "weft", "haproxy", "nginx"]


def new_connections(url, proxy_pids):
    return h2load_new([], url, proxy_pids, NEW_RATE, NEW_S)


def main():
    rounds = {name: [] for name in SIDES}
    with proxies_lab() as pids:
        for k in range(ROUNDS):
            order = SIDES[k % len(SIDES):] + SIDES[:k % len(SIDES)]
            for name in order:
                proc = pids_of(pids[name]) if name in pids else []
                r = new_connections(TARGETS[name]["HTTP/1.1"], proc)
                rounds[name].append(r)
                print(f"round {k + 1} {name}: ttfb {r['ttfb_us']:.0f}us"
                      + (f", {r['cpu_us_per_conn']:.0f} CPU us per connection" if proc else "") + f", failed {r['failed']}",
                      flush=True)
    report(rounds)


def report(rounds):
    us = "{:.0f} µs".format
    h2 = sh("h2load", "--version").split("\n")[0]
    median = statistics.median
    lines = [
        "## L7 proxy: new connections, one request each (issue #4)",
        "",
        f"Made by `scripts/bench proxy-new` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel {os.uname().release}), "
        f"release build at {revision()}; {ROUNDS} rounds rotating the order of the sides, medians. The lab, proxies and "
        "configurations of `scripts/bench proxy` (its section is above), HTTP/1.1: each proxy keeps its connections to the "
        f"backend alive. Load: {h2}, {NEW_RATE} new connections a second for {NEW_S} s, one request on each, closed after "
        "its answer (a client without keep-alive). *CPU per connection*: the proxy's processes' CPU time (the scheduler's "
        "count in ns, every thread; until 2026-12-06 whole 10 ms clock ticks, a dozen or so a run) over the "
        "connections answered; *time to first byte*: h2load's mean, connect to the answer's first byte, and that minus "
        "direct's in the same round.",
        "",
        "| side | CPU per connection | vs HAProxy | time to first byte | added | failed |",
        "|---|---|---|---|---|---|",
    ]
    h = median(r["cpu_us_per_conn"] for r in rounds["haproxy"])
    for name in SIDES:
        runs = rounds[name]
        ttfb = median(r["ttfb_us"] for r in runs)
        failed = sum(r["failed"] for r in runs)
        if name == "direct":
            lines.append(f"| direct | – | – | {us(ttfb)} | – | {failed} |")
            continue
        cpu = median(r["cpu_us_per_conn"] for r in runs)
        added = median(a["ttfb_us"] - b["ttfb_us"] for a, b in zip(runs, rounds["direct"]))
        lines.append(f"| {name} | {us(cpu)} | {cpu / h:.2f} | {us(ttfb)} | {us(added)} | {failed} |")
    ratios = sorted(a["cpu_us_per_conn"] / b["cpu_us_per_conn"] for a, b in zip(rounds["weft"], rounds["haproxy"]))
    lines += ["", "Weft's CPU per new connection over HAProxy's, round by round: "
              + " ".join(f"{x:.2f}" for x in ratios) + "."]
    write_section("proxy_new", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
