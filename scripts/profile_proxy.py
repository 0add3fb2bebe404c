#!/usr/bin/env python3
"""Where the node proxy's CPU goes under the proxy benchmark's load
(`scripts/bench proxy-profile`; docs/proxy.md "Where the CPU goes").

The lab of scripts/bench_proxy.py (client pod, nginx backend pod, an L7
Service), h2load as fast as it goes through the Service for HTTP/1.1 and
HTTP/2, and `perf record -g` on the proxy's process meanwhile. Every sample is
charged to a layer by its innermost frame: the kernel, SwiftNIO's core
(channels, pipeline, event loop), NIO's HTTP/1 codec (llhttp included), NIO's
HTTP/2 stack (HPACK included), or Weft's own code. Samples in the Swift
runtime and libc (retain/release, malloc, metadata) go to the layer of the
nearest frame that has one, so "Weft" includes the reference counting its
code causes.

Then, as references for HTTP/1.1, the same load without perf through
HAProxy (bench proxy's configuration) and through `weft-proxy-floor`
(Benchmarks/ProxyFloor: an HTTP/1.1 proxy on SwiftNIO that does what that
HAProxy does and no more, one handler per channel, heads framed in place),
alternating with Weft: CPU per request of each, medians over REFERENCE_ROUNDS.
What the floor costs is what SwiftNIO itself costs; the rest of Weft's cost
is its pipeline and its codecs.

Last, the count the host's noise cannot move: user-space instructions per
request of Weft, HAProxy and (HTTP/1.1 only) the floor, for both loads, each run under valgrind's
callgrind for a fixed number of requests (the kernel's part is not counted;
instructions are not time, but on one machine they rank code the same way
and repeat to the instruction). Weft's proxy is started through
WEFT_PROXY_WRAPPER for that (ProxySupervisor).

Prints one table per load and writes docs/bench-proxy-profile.json. With
WEFT_PROFILE_KEEP=DIR, each load's perf.data is kept in DIR for `perf report`
(and each callgrind profile, for `callgrind_annotate`).
"""
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import NodeProcesses, revision, sh  # noqa: E402
from bench_proxy import (BACKEND, BACKEND_CONF, GW, HAPROXY_CONF, LOADS, THREADS, VIP, WEFT, cpu_seconds, h2load,  # noqa: E402
                         lab_yaml, pids_of, write)

SECONDS = int(os.environ.get("WEFT_PROFILE_SECONDS", "6"))
REFERENCE_ROUNDS = int(os.environ.get("WEFT_PROFILE_REFERENCE_ROUNDS", "3"))
COUNTED = int(os.environ.get("WEFT_PROFILE_COUNTED_REQUESTS", "3000"))
FLOOR = os.path.join(ROOT, ".build/release/weft-proxy-floor")
LAYERS = [
    ("$s9WeftProxy", "Weft"), ("$s8WeftCore", "Weft"), ("$s10WeftKernel", "Weft"),
    ("$s7NIOCore", "NIO core"), ("$s8NIOPosix", "NIO core"),
    ("$s8NIOHTTP1", "NIO HTTP/1 codec"), ("c_nio_llhttp", "NIO HTTP/1 codec"),
    ("$s8NIOHTTP2", "NIO HTTP/2"), ("$s8NIOHPACK", "NIO HTTP/2"),
]


def layer(sym, dso):
    if "kernel" in dso or sym.startswith("bpf_prog_"):
        return "kernel"
    for prefix, name in LAYERS:
        if sym.startswith(prefix):
            return name
    return None


def split(data):
    """Share of samples per layer, from `perf script` output."""
    out = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True).stdout
    counts = collections.Counter()
    frames = []

    def charge():
        if not frames:
            return
        for sym, dso in frames:
            name = layer(sym, dso)
            if name:
                counts[name] += 1
                return
        counts["other"] += 1

    for line in out.splitlines():
        if not line.strip():
            charge()
            frames = []
        elif line[0] in " \t":
            parts = line.split()
            if len(parts) >= 3:
                frames.append((parts[1].split("+0x")[0], parts[-1]))
    charge()
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()}, total


def main():
    if subprocess.run(["sh", "-c", "command -v perf"], capture_output=True).returncode != 0:
        raise SystemExit("perf is not installed (apt-get install linux-perf)")
    work = tempfile.mkdtemp(prefix="weft-profile-")
    os.chmod(work, 0o755)
    write(f"{work}/backend.conf", BACKEND_CONF.format(dir=work))
    config = f"{work}/config"
    os.mkdir(config)
    write(f"{config}/lab.yaml", lab_yaml(work))
    try:
        if os.environ.get("WEFT_PROFILE_ONLY") == "instructions":  # the callgrind part alone; no file written
            count_instructions(work, config)
            return
        results, references = run_lab(work, config, profile=True)
        # The same again with the express path off (the full path for every
        # request): what it saves, in the same run.
        _, full = run_lab(work, config, profile=False, env={"WEFT_PROXY_EXPRESS": "0"})
        references["weft_full_path"] = full["weft"]
        references["haproxy_beside_full_path"] = full["haproxy"]
        references["nio_floor_beside_full_path"] = full["nio_floor"]
        instructions = count_instructions(work, config)
    finally:
        subprocess.run(["rm", "-rf", work])
    rev = revision()
    with open(os.path.join(ROOT, "docs/bench-proxy-profile.json"), "w") as f:
        json.dump({"revision": rev, "date": time.strftime("%Y-%m-%d"), "seconds": SECONDS, "loads": results,
                   "http1_references": references, "instructions": instructions}, f, indent=1)


def under_callgrind(work, floor=False):
    """(valgrind's command line, a WEFT_PROXY_WRAPPER that runs the proxy
    under it, the binaries it runs: "weft" and, with `floor`, "nio_floor")."""
    if subprocess.run(["sh", "-c", "command -v callgrind_control"], capture_output=True).returncode != 0:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    # valgrind 3.19 cannot read the Swift toolchain's debug info: the
    # binaries run without it (their symbols stay).
    stripped = {}
    for name, path in (("weft", WEFT), ("nio_floor", FLOOR))[:2 if floor else 1]:
        stripped[name] = os.path.join(work, name + ".stripped")
        subprocess.run(["strip", "--strip-debug", "-o", stripped[name], path], check=True)
    valgrind = ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={work}/callgrind.%p"]
    wrapper = os.path.join(work, "callgrind-proxy")
    write(wrapper, "#!/bin/sh\nshift\nexec " + " ".join(valgrind) + f" {stripped['weft']} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    return valgrind, wrapper, stripped


def count_instructions(work, config):
    """User-space instructions per request under callgrind, HTTP/1.1 and
    HTTP/2: Weft's proxy (started through WEFT_PROXY_WRAPPER), HAProxy and
    (HTTP/1.1) the floor, each given COUNTED requests after a warm-up,
    counters zeroed in between. WEFT_PROFILE_LOAD=HTTP/2 (or HTTP/1.1)
    counts one load only."""
    valgrind, wrapper, stripped = under_callgrind(work, floor=True)
    sh(WEFT, "lab", "down", check=False)
    up = subprocess.run([WEFT, "lab", "up", "--config", config, "--nodes", "1"], capture_output=True, text=True,
                        env={**os.environ, "WEFT_PROXY_WRAPPER": wrapper})
    if up.returncode != 0:
        raise SystemExit(f"lab up failed: {up.stdout[-2000:]}{up.stderr[-2000:]}")
    processes = NodeProcesses(WEFT)
    out = {}
    try:
        node = json.load(open("/run/weft/lab/state.json"))["nodes"][0]
        write(f"{work}/haproxy.cfg", HAPROXY_CONF.format(backend=BACKEND, gw=GW, threads=THREADS, haproxy_affinity=""))
        # (load, side, url): HTTP/2 as bench proxy's HTTP/2 load (h2c from the
        # client, HTTP/1.1 to the backend); the floor speaks HTTP/1.1 only.
        sides = [("HTTP/1.1", "weft", f"http://{VIP}/"), ("HTTP/1.1", "haproxy", f"http://{GW}:16001/"),
                 ("HTTP/1.1", "nio_floor", f"http://{GW}:16005/"),
                 ("HTTP/2", "weft", f"http://{VIP}/"), ("HTTP/2", "haproxy", f"http://{GW}:16002/")]
        if os.environ.get("WEFT_PROFILE_LOAD"):  # one load only (A/B runs while working)
            sides = [s for s in sides if s[0] == os.environ["WEFT_PROFILE_LOAD"]]
        starts = {"haproxy": lambda: processes.start(node, *valgrind, "haproxy", "-f", f"{work}/haproxy.cfg", "-db"),
                  "nio_floor": lambda: processes.start(node, *valgrind, stripped["nio_floor"], GW, "16005", BACKEND, "8080", "2")}
        for load, name, url in sides:
            # (`lab run-in` execs: its pid is valgrind's, which is the program's.)
            pid = starts[name]() if name in starts else None
            answers(name, url, tries=600, wait=5, load=load)  # valgrind starts slowly
            fixed(url, 300, load)  # warm: pools, caches, lazily built state
            # (The agent may have restarted a proxy slow to start under
            # valgrind: the one that answers is the one in the pid file now.)
            pid = pid or int(open("/run/weft/n1/proxy.pid").read())
            tag = load.replace("/", "").replace(".", "").lower()
            total, done = callgrind_count(work, [pid], lambda: fixed(url, COUNTED, load), keep=f"{tag}-{name}")
            if done != COUNTED or not total:
                raise SystemExit(f"{load} {name} (pid {pid}): {done} of {COUNTED} requests answered, {total} instructions counted")
            out.setdefault(load, {})[name] = round(total / COUNTED)
            print(f"{load} {name}: {out[load][name]} user-space instructions per request (callgrind, {COUNTED} requests)",
                  flush=True)
            if name in starts:
                processes.stop()
    finally:
        processes.stop()
        sh(WEFT, "lab", "down", check=False)
    return out


def callgrind_count(work, pids, run, keep=None):
    """Zeroes the callgrind counters of `pids` (each a process started
    under callgrind with --callgrind-out-file={work}/callgrind.%p), calls
    `run`, dumps them: (user-space instructions of all of them meanwhile,
    what `run` returned). With WEFT_PROFILE_KEEP=DIR the dumps are kept
    there as callgrind-{keep}-{pid}.out."""
    for pid in pids:
        sh("callgrind_control", "-z", str(pid), check=False)
    result = run()
    asked = time.time()
    for pid in pids:
        sh("callgrind_control", "-d", str(pid), check=False)
    total = 0
    for pid in pids:
        dumps = []
        for _ in range(100):  # the dump written since it was asked for
            dumps = [f for f in os.listdir(work) if f.startswith(f"callgrind.{pid}")
                     and os.path.getmtime(os.path.join(work, f)) >= asked]
            if dumps:
                time.sleep(0.5)
                break
            time.sleep(0.2)
        for f in dumps:
            for line in open(os.path.join(work, f)):
                if line.startswith("summary:"):
                    total += int(line.split()[1])
            if keep and os.environ.get("WEFT_PROFILE_KEEP"):
                subprocess.run(["cp", os.path.join(work, f), os.path.join(os.environ["WEFT_PROFILE_KEEP"], f"callgrind-{keep}-{pid}.out")])
            os.remove(os.path.join(work, f))
    return total, result


def answers(name, url, tries=100, wait=1, load="HTTP/1.1"):
    """Waits until `url` answers 200 from the client pod."""
    h2 = ["--http2-prior-knowledge"] if load == "HTTP/2" else []
    for _ in range(tries):
        if sh(WEFT, "lab", "exec", "bench/client", "--", "curl", *h2, "-s", "-o", "/dev/null", "-w", "%{http_code}",
              "-m", str(wait), url, check=False) == "200":
            return
        time.sleep(0.1 if wait <= 1 else 0.2)
    raise SystemExit(f"{name} never answered 200 at {url}")


def fixed(url, n, load="HTTP/1.1"):
    """n requests of `load` in bench proxy's shape (HTTP/1.1: 16 connections;
    HTTP/2: 4 connections of 8 streams), as fast as they go, or with
    WEFT_PROFILE_RPS=N at N requests/s per connection (one h2load's
    connections send together: bench proxy's fixed-load bursts); the number
    answered 2xx."""
    flags, conns, streams = LOADS[load]
    rate = ["--rps", os.environ["WEFT_PROFILE_RPS"]] if os.environ.get("WEFT_PROFILE_RPS") else []
    r = subprocess.run([WEFT, "lab", "exec", "bench/client", "--", "h2load", *flags, "-c", str(conns), "-m", str(streams),
                        *rate, "-n", str(n), url], capture_output=True, text=True).stdout
    line = next((l for l in r.splitlines() if l.startswith("status codes:")), "")
    return int(line.split()[2]) if line else 0


def run_lab(work, config, profile, env=None):
    """One lab: with `profile`, perf on the proxy under each load; then the
    HTTP/1.1 references. `env` goes to the agents (and their proxies)."""
    sh(WEFT, "lab", "down", check=False)
    up = subprocess.run([WEFT, "lab", "up", "--config", config, "--nodes", "1"], capture_output=True, text=True,
                        env={**os.environ, **(env or {})})
    if up.returncode != 0:
        raise SystemExit(f"lab up failed: {up.stdout[-2000:]}{up.stderr[-2000:]}")
    results = {}
    processes = NodeProcesses(WEFT)
    try:
        for _ in range(100):
            if sh(WEFT, "lab", "exec", "bench/client", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                  "-m", "1", f"http://{VIP}/", check=False) == "200":
                break
            time.sleep(0.1)
        pid = int(open("/run/weft/n1/proxy.pid").read())
        for load in LOADS if profile else []:
            h2load(f"http://{VIP}/", load, 2)   # warm the pools
            data = os.path.join(work, "perf.data")
            perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            c0 = cpu_seconds([pid])
            top = h2load(f"http://{VIP}/", load, SECONDS, warmup=0)
            cpu = cpu_seconds([pid]) - c0
            perf.send_signal(2)
            perf.wait()
            shares, samples = split(data)
            if os.environ.get("WEFT_PROFILE_KEEP"):  # a directory: keep perf.data per load for `perf report`
                keep = os.path.join(os.environ["WEFT_PROFILE_KEEP"], "perf-%s.data" % load.replace("/", "").replace(".", ""))
                subprocess.run(["cp", data, keep], check=True)
            results[load] = {"shares": shares, "samples": samples, "per_core": top["requests"] / cpu if cpu else None,
                             "us_per_request": 1e6 * cpu / top["requests"] if top["requests"] else None}
            print(f"{load}: {samples} samples, {results[load]['us_per_request']:.1f} µs of proxy CPU per request "
                  "(perf attached)", flush=True)
            for name, share in shares.items():
                print(f"  {share * 100:5.1f}%  {name}")
        references = compare(work, pid, processes)
        stats = sh("curl", "-s", "--unix-socket", "/run/weft/n1/proxy.sock", "http://proxy/stats")
        express = int(next((l.split()[1] for l in stats.splitlines() if l.startswith("weft_proxy_express_requests_total ")), "-1"))
        if (express > 0) != ((env or {}).get("WEFT_PROXY_EXPRESS") != "0"):
            raise SystemExit(f"the express path served {express} requests with env {env}")
        return results, references
    finally:
        processes.stop()
        sh(WEFT, "lab", "down", check=False)


def compare(work, weft_pid, processes):
    """HTTP/1.1 µs of proxy CPU per request, no perf attached: Weft, HAProxy
    and the NIO floor, alternating, medians over REFERENCE_ROUNDS."""
    lab = json.load(open("/run/weft/lab/state.json"))
    node = lab["nodes"][0]
    write(f"{work}/haproxy.cfg", HAPROXY_CONF.format(backend=BACKEND, gw=GW, threads=THREADS, haproxy_affinity=""))

    def on_node(*cmd):
        return processes.start(node, *cmd)

    sides = {
        "weft": (f"http://{VIP}/", weft_pid),
        "haproxy": (f"http://{GW}:16001/", on_node("haproxy", "-f", f"{work}/haproxy.cfg", "-db")),
        "nio_floor": (f"http://{GW}:16005/", on_node(FLOOR, GW, "16005", BACKEND, "8080", "2")),
    }
    for name, (url, _) in sides.items():
        answers(name, url)
    runs = {name: [] for name in sides}
    for k in range(REFERENCE_ROUNDS):
        names = list(sides)
        for name in names[k % len(names):] + names[:k % len(names)]:
            url, pid = sides[name]
            procs = pids_of(pid)
            c0 = cpu_seconds(procs)
            top = h2load(url, "HTTP/1.1", SECONDS, warmup=0)
            cpu = cpu_seconds(procs) - c0
            runs[name].append(1e6 * cpu / top["requests"] if top["requests"] else float("nan"))
            print(f"reference round {k + 1} HTTP/1.1 {name}: {runs[name][-1]:.1f} µs of CPU per request", flush=True)
    return {name: {"us_per_request": statistics.median(v), "runs": v} for name, v in runs.items()}


if __name__ == "__main__":
    main()
