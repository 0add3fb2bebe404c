#!/usr/bin/env python3
"""What the mTLS tunnel costs in user-space instructions, a count the host's
noise cannot move (`scripts/bench tunnel-profile`; docs/security.md).

The lab of scripts/bench_mtls.py (client pod on n1, nginx pods on n2), with
both nodes' proxies started under valgrind's callgrind (WEFT_PROXY_WRAPPER),
and HAProxy's TLS pair (n1 originating, n2 terminating) under callgrind too.
For each side, *l4* (the pod's own address: n1's proxy -> HTTP/2 CONNECT
over mutual TLS 1.3 -> n2's proxy), *l7* (a Service with appProtocol http
over the same pod: both proxies do the HTTP work too, and the tunnel
carries it in stream channels) and *haproxy*:

  requests  COUNTED HTTP/1.1 requests over 10 keep-alive connections after a
            warm-up: instructions of both ends per request
  bulk      the 64 MiB file fetched BULK times: instructions of both ends per
            MiB carried (each byte is encrypted by one end and decrypted by
            the other)

Instructions are not time and the kernel's part is not counted; they repeat
from run to run, so a change of a few per cent shows where timings on this
shared VM cannot. Prints the figures and writes docs/bench-tunnel-profile.json.
WEFT_PROFILE_KEEP=DIR keeps each callgrind dump for callgrind_annotate.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import NodeProcesses, revision, sh  # noqa: E402
from bench_mtls import BIG, TARGETS, prepare  # noqa: E402
from profile_proxy import WEFT, answers, callgrind_count, under_callgrind  # noqa: E402

COUNTED = int(os.environ.get("WEFT_PROFILE_COUNTED_REQUESTS", "3000"))
BULK = int(os.environ.get("WEFT_PROFILE_BULK_FETCHES", "2"))
# l7: a Service with appProtocol http over the same pods (both proxies do
# the HTTP work, and the tunnel carries it on stream channels).
SIDES = tuple(os.environ.get("WEFT_PROFILE_SIDES", "l4,l7,haproxy").split(","))


def requests(url, n):
    """n HTTP/1.1 requests over 10 connections, as fast as they go; the number answered 2xx."""
    r = subprocess.run([WEFT, "lab", "exec", "bench/client", "--", "h2load", "--h1", "-c", "10", "-m", "1", "-n", str(n), url],
                       capture_output=True, text=True).stdout
    line = next((l for l in r.splitlines() if l.startswith("status codes:")), "")
    return int(line.split()[2]) if line else 0


def fetch(url, times):
    """The 64 MiB file `times` times; the bytes received."""
    out = sh(WEFT, "lab", "exec", "bench/client", "--", "sh", "-c",
             f"for i in $(seq {times}); do curl -s -o /dev/null -w '%{{size_download}}\\n' {url}{BIG}; done")
    return sum(int(x) for x in out.split() if x.isdigit())


def main():
    work = tempfile.mkdtemp(prefix="weft-profile-tunnel-")
    os.chmod(work, 0o755)
    processes = NodeProcesses(WEFT)
    out = {}
    try:
        config = prepare(work)
        valgrind, wrapper, _ = under_callgrind(work)
        sh(WEFT, "lab", "down", check=False)
        up = subprocess.run([WEFT, "lab", "up", "--config", config, "--nodes", "2"], capture_output=True, text=True,
                            env={**os.environ, "WEFT_PROXY_WRAPPER": wrapper})
        if up.returncode != 0:
            raise SystemExit(f"lab up failed: {up.stdout[-2000:]}{up.stderr[-2000:]}")
        nodes = {n["name"]: n for n in json.load(open("/run/weft/lab/state.json"))["nodes"]}
        haproxy = [processes.start(nodes[n], *valgrind, "haproxy", "-f", f"{work}/haproxy-{n}.cfg", "-db") for n in ("n1", "n2")]
        for name in SIDES:
            answers(name, TARGETS[name], tries=600, wait=5)  # valgrind starts slowly
            requests(TARGETS[name], 300)  # warm: tunnels, pools, lazily built state
            # (The agents may have restarted a proxy slow to start under
            # valgrind: the ones that answer are those in the pid files now.)
            pids = haproxy if name == "haproxy" else [int(open(f"/run/weft/{n}/proxy.pid").read()) for n in ("n1", "n2")]
            total, done = callgrind_count(work, pids, lambda: requests(TARGETS[name], COUNTED), keep=f"tunnel-requests-{name}")
            if done != COUNTED or not total:
                raise SystemExit(f"{name}: {done} of {COUNTED} requests answered, {total} instructions counted")
            size = os.path.getsize(f"{work}/www/{BIG}")
            moved, got = callgrind_count(work, pids, lambda: fetch(TARGETS[name], BULK), keep=f"tunnel-bulk-{name}")
            if got != BULK * size or not moved:
                raise SystemExit(f"{name}: {got} of {BULK * size} bytes fetched, {moved} instructions counted")
            out[name] = {"per_request": round(total / COUNTED), "per_mib": round(moved / (got / (1 << 20)))}
            print(f"{name}: {out[name]['per_request']} user-space instructions per request (both ends, {COUNTED} requests); "
                  f"{out[name]['per_mib']} per MiB carried ({BULK} x 64 MiB)", flush=True)
    finally:
        processes.stop()
        sh(WEFT, "lab", "down", check=False)
        subprocess.run(["rm", "-rf", work])
    rev = revision()
    with open(os.path.join(ROOT, "docs/bench-tunnel-profile.json"), "w") as f:
        json.dump({"revision": rev, "date": time.strftime("%Y-%m-%d"), "counted_requests": COUNTED, "bulk_fetches": BULK,
                   "instructions": out}, f, indent=1)


if __name__ == "__main__":
    main()
