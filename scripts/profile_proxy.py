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

Prints one table per load and writes docs/bench-proxy-profile.json.
"""
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import sh  # noqa: E402
from bench_proxy import BACKEND_CONF, LOADS, VIP, WEFT, cpu_seconds, h2load, lab_yaml, write  # noqa: E402

SECONDS = int(os.environ.get("WEFT_PROFILE_SECONDS", "6"))
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
    sh(WEFT, "lab", "down", check=False)
    sh(WEFT, "lab", "up", "--config", config, "--nodes", "1")
    results = {}
    try:
        for _ in range(100):
            if sh(WEFT, "lab", "exec", "bench/client", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                  "-m", "1", f"http://{VIP}/", check=False) == "200":
                break
            time.sleep(0.1)
        pid = int(open("/run/weft/n1/proxy.pid").read())
        for load in LOADS:
            h2load(f"http://{VIP}/", load, 2)   # warm the pools
            data = os.path.join(work, "perf.data")
            perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            c0 = cpu_seconds([pid])
            top = h2load(f"http://{VIP}/", load, SECONDS)
            cpu = cpu_seconds([pid]) - c0
            perf.send_signal(2)
            perf.wait()
            shares, samples = split(data)
            results[load] = {"shares": shares, "samples": samples, "per_core": top["requests"] / cpu if cpu else None,
                             "us_per_request": 1e6 * cpu / top["requests"] if top["requests"] else None}
            print(f"{load}: {samples} samples, {results[load]['us_per_request']:.1f} µs of proxy CPU per request "
                  "(perf attached)", flush=True)
            for name, share in shares.items():
                print(f"  {share * 100:5.1f}%  {name}")
    finally:
        sh(WEFT, "lab", "down", check=False)
        subprocess.run(["rm", "-rf", work])
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(ROOT, "docs/bench-proxy-profile.json"), "w") as f:
        json.dump({"revision": rev, "date": time.strftime("%Y-%m-%d"), "seconds": SECONDS, "loads": results}, f, indent=1)


if __name__ == "__main__":
    main()
