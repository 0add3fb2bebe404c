#!/usr/bin/env python3
"""Heap allocations and system calls per request, and per new connection,
in each L7 proxy: what "the hot path allocates as little as SwiftNIO allows"
comes to, counted, beside HAProxy and nginx.

The lab, proxies and configurations of `scripts/bench proxy` (Weft through
the Service clusterIP, captured by connect4; HAProxy and nginx on the node;
2 threads/workers each; HTTP/1.1 connections to the nginx backend kept
alive). A uprobe on the C library's malloc (`perf probe`, removed after)
and the raw_syscalls tracepoint are counted by `perf stat` on each proxy's
processes while h2load sends a fixed number of requests:
  kept-alive HTTP/1.1  16 connections, one request at a time on each
  HTTP/2               4 connections x 8 streams (h2c, prior knowledge)
  new connections      HTTP/1.1, one request on each, closed after it
For Weft also the Swift runtime's reference counting (swift_retain and
swift_release, and their _n forms, uprobes on the weft binary's own copies:
the runtime is linked in): each call an atomic instruction on the object's
count, a cost of Swift's memory model that C proxies do not pay and malloc
does not show (the two functions took about a fifth of the proxy's CPU
samples under the HTTP/2 load in a perf profile, 2026-12-06). Each count
is divided by the requests (or connections) answered; medians of ROUNDS
rounds. Counts, not times: they hardly move from run to run, which is
what makes them a check on a change to the proxy. Results: the `proxy_alloc`
section of docs/benchmarks.md.
"""
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import h2load_requests, revision, sh, write_section  # noqa: E402
from bench_proxy import TARGETS, WEFT, pids_of, proxies_lab  # noqa: E402

ROUNDS = int(os.environ.get("WEFT_BENCH_ALLOC_ROUNDS", "3"))
REQUESTS = int(os.environ.get("WEFT_BENCH_ALLOC_REQUESTS", "20000"))
CONNECTIONS = int(os.environ.get("WEFT_BENCH_ALLOC_CONNECTIONS", "2000"))
SIDES = ["weft", "haproxy", "nginx"]
# name: (target protocol, h2load flags, count, unit)
LOADS = {
    "kept-alive HTTP/1.1": ("HTTP/1.1", ["--h1", "-c", "16", "-m", "1"], REQUESTS, "request"),
    "HTTP/2": ("HTTP/2", ["-c", "4", "-m", "8"], REQUESTS, "request"),
    "new connections": ("HTTP/1.1", ["--h1", "-c", str(CONNECTIONS), "-r", "50", "--rate-period", "100ms"], CONNECTIONS,
                        "connection"),
}
WARM = {"HTTP/1.1": LOADS["kept-alive HTTP/1.1"][1], "HTTP/2": LOADS["HTTP/2"][1]}
EVENTS = ["probe_libc:malloc", "raw_syscalls:sys_enter"]
# Swift's reference counting, in the weft binary (its runtime linked in).
REFCOUNT = ["swift_retain", "swift_release", "swift_retain_n", "swift_release_n"]


def libc_of(pid):
    """The C library the process maps (its malloc is what the probe counts)."""
    for line in open(f"/proc/{pid}/maps"):
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
            return path
    raise SystemExit(f"process {pid} maps no C library")


def refcount_probes(exe):
    """Uprobes on the Swift runtime's reference counting in `exe` (by address:
    the binary has no debug information for perf to find them by name)."""
    symbols = {}
    for line in sh("nm", exe).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in REFCOUNT:
            symbols[parts[2]] = int(parts[0], 16)
    missing = [name for name in REFCOUNT if name not in symbols]
    if missing:
        raise SystemExit(f"{exe} has no {', '.join(missing)} (is the Swift runtime linked in?)")
    for name in REFCOUNT:
        subprocess.run(["perf", "probe", "-q", "-x", exe, "-a", f"{name}=0x{symbols[name]:x}"], check=True)
    return [f"probe_weft:{name}" for name in REFCOUNT]


def counted(pids, flags, count, url, extra=()):
    """h2load's run with `perf stat` on `pids`: each event per request (or
    connection) answered."""
    out_file = f"/tmp/weft-bench-alloc-{os.getpid()}.stat"
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join([*EVENTS, *extra]), "-o", out_file,
                             "-p", ",".join(map(str, pids))], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # (perf attached to every thread)
        out = sh(WEFT, "lab", "exec", "bench/client", "--", "h2load", *flags, "-n", str(count), "-t", "1", url)
    finally:
        perf.send_signal(2)
        perf.wait()
    done = h2load_requests(out)["succeeded"]
    if done == 0:
        raise SystemExit(f"h2load to {url} answered nothing: {out[-1500:]}")
    got = {}
    with open(out_file) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) > 3 and parts[0].strip().isdigit():
                got[parts[2]] = int(parts[0]) / done
    os.unlink(out_file)
    refcount = sum(got[e] for e in extra) if extra else None
    return {"malloc": got["probe_libc:malloc"], "syscalls": got["raw_syscalls:sys_enter"], "refcount": refcount,
            "failed": count - done}


def main():
    rounds = {(side, load): [] for side in SIDES for load in LOADS}
    probes = []
    try:
        with proxies_lab() as pids:
            subprocess.run(["perf", "probe", "-q", "-d", "probe_weft:*"], stderr=subprocess.DEVNULL)
            weft_exe = os.path.realpath(f"/proc/{pids['weft']}/exe")
            refcount = refcount_probes(weft_exe)
            for side in SIDES:
                lib = libc_of(pids_of(pids[side])[0])
                if lib not in probes:
                    subprocess.run(["perf", "probe", "-q", "-d", "probe_libc:malloc"], stderr=subprocess.DEVNULL)
                    subprocess.run(["perf", "probe", "-q", "-x", lib, "malloc"], check=True)
                    probes.append(lib)
            for k in range(ROUNDS):
                order = SIDES[k % len(SIDES):] + SIDES[:k % len(SIDES)]
                for side in order:
                    proc = pids_of(pids[side])
                    for load, (proto, flags, count, _) in LOADS.items():
                        url = TARGETS[side][proto]
                        # Warm: pools filled, connections to the backend open.
                        sh(WEFT, "lab", "exec", "bench/client", "--", "h2load", *WARM[proto], "-n", "2000", "-t", "1", url)
                        r = counted(proc, flags, count, url, extra=refcount if side == "weft" else ())
                        rounds[(side, load)].append(r)
                        rc = f", {r['refcount']:.1f} retain/release" if r["refcount"] is not None else ""
                        print(f"round {k + 1} {side} {load}: {r['malloc']:.2f} malloc, {r['syscalls']:.2f} syscalls{rc}, "
                              f"failed {r['failed']}", flush=True)
    finally:
        subprocess.run(["perf", "probe", "-q", "-d", "probe_libc:malloc"], stderr=subprocess.DEVNULL)
        subprocess.run(["perf", "probe", "-q", "-d", "probe_weft:*"], stderr=subprocess.DEVNULL)
    report(rounds)


def report(rounds):
    median = statistics.median
    h2 = sh("h2load", "--version").split("\n")[0]
    lines = [
        "## L7 proxy: allocations and system calls per request (issue #4)",
        "",
        f"Made by `scripts/bench proxy-alloc` ({time.strftime('%Y-%m-%d')}, kernel {os.uname().release}), release build "
        f"at {revision()}; {ROUNDS} rounds rotating the order of the sides, medians. The lab, proxies and configurations "
        "of `scripts/bench proxy` (its section is above). Counted by `perf stat` on each proxy's processes: calls to the C "
        "library's malloc (a uprobe) and system calls, over what h2load "
        f"({h2}) had answered: {REQUESTS} requests on 16 kept-alive HTTP/1.1 connections, {REQUESTS} on 4 HTTP/2 "
        f"connections x 8 streams, and {CONNECTIONS} new HTTP/1.1 connections with one request each. Weft's Swift objects "
        "are malloc's; HAProxy and nginx take most of theirs from pools of their own, which this does not see. "
        "*retain/release*: Weft's calls to the Swift runtime's swift_retain and swift_release (and their _n forms; "
        "uprobes on the weft binary), each an atomic update of an object's reference count; C has none.",
        "",
        "| load | per | side | malloc | system calls | retain/release | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for load, (_, _, _, unit) in LOADS.items():
        for side in SIDES:
            runs = rounds[(side, load)]
            counts = [r["refcount"] for r in runs if r["refcount"] is not None]
            refcount = f"{median(counts):.0f}" if counts else "–"
            lines.append(f"| {load} | {unit} | {side} | {median(r['malloc'] for r in runs):.1f} | "
                         f"{median(r['syscalls'] for r in runs):.1f} | {refcount} | {sum(r['failed'] for r in runs)} |")
    write_section("proxy_alloc", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
