#!/usr/bin/env python3
"""TLS passthrough by server name (TLSRoute): Weft's node proxy against
HAProxy and nginx doing the same, side by side in one lab and one run.

Lab: one node; a client pod and an nginx pod serving HTTPS on 8443 (TLS 1.3,
a self-signed ECDSA P-256 certificate for pass.bench.example, no session
resumption). Four ways from the client to it, each sending the SNI
pass.bench.example and getting the backend's own handshake:
  direct   the pod's address, no proxy
  weft     the Service's clusterIP:443; connect4 sends it to the node proxy,
           whose TLSRoute for pass.bench.example reads the ClientHello's
           server name and passes the bytes on to the pod
  haproxy  HAProxy on the node, TCP mode: waits for the ClientHello
           (req_ssl_hello_type) and routes by req_ssl_sni
  nginx    nginx stream on the node: ssl_preread, a map of
           $ssl_preread_server_name
No side terminates TLS; an unknown name is refused by each. Every proxy has 2
threads/workers bound one per core, as in `scripts/bench proxy`.
Measured, per round, the sides in rotating order:
  kept   h2load --h1 over TLS, 16 kept connections: RATE requests/s for
         FIXED_S in SLICES slices interleaved with the other sides', as
         `scripts/bench proxy` does (p50/p99 added over direct, per round;
         the quiet columns leave out requests in flight during a host
         slowdown), then as fast as they go for MAX_S: requests per CPU
         second of the proxy, and the whole node's CPU per request
  new    h2load --h1, NEW_RATE new connections a second for NEW_S, each a full
         handshake and one request: CPU µs of the proxy per connection, and
         h2load's mean time to the first byte (connect, handshake, request)
         added over direct
"""
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import NodeProcesses, h2load_requests, machine_cpu_seconds, revision, sh, write_section  # noqa: E402
from bench_proxy import (DISTURBED, RETRIES, SLICES, added_over, cpu_seconds, h2load, h2load_watched, pids_of,  # noqa: E402
                         pooled, rss_mib, until_calm)

WEFT = os.path.join(ROOT, ".build/release/weft")
ROUNDS = int(os.environ.get("WEFT_BENCH_TLS_ROUNDS", "3"))
FIXED_S = int(os.environ.get("WEFT_BENCH_TLS_SECONDS", "6"))
FIXED_SLICE_S = max(1, FIXED_S // SLICES)
MAX_S = int(os.environ.get("WEFT_BENCH_TLS_MAX_SECONDS", "4"))
NEW_S = int(os.environ.get("WEFT_BENCH_TLS_NEW_SECONDS", "4"))
RATE = int(os.environ.get("WEFT_BENCH_TLS_RATE", "1600"))
NEW_RATE = int(os.environ.get("WEFT_BENCH_TLS_NEW_RATE", "500"))
THREADS = 2
CONNS = 16
NAME = "pass.bench.example"
CLIENT, BACKEND, VIP, GW = "198.18.1.10", "198.18.1.20", "198.19.9.10", "198.18.1.1"
TARGETS = {"direct": f"{BACKEND}:8443", "weft": f"{VIP}:443", "haproxy": f"{GW}:16443", "nginx": f"{GW}:16444"}
URL = f"https://{NAME}/"

BACKEND_CONF = """worker_processes 1;
pid {dir}/backend.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 8443 ssl;
    ssl_certificate {dir}/cert.pem;
    ssl_certificate_key {dir}/key.pem;
    ssl_protocols TLSv1.3;
    ssl_session_tickets off;
    ssl_session_cache off;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""

HAPROXY_CONF = """global
  nbthread {threads}
  cpu-map auto:1/1-{threads} 0-{last}
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend fe
  bind {gw}:16443
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req_ssl_hello_type 1 }}
  use_backend be if {{ req_ssl_sni -i {name} }}
backend be
  server s1 {backend}:8443
"""

NGINX_CONF = """load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {threads};
worker_cpu_affinity auto;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
stream {{
  map $ssl_preread_server_name $up {{ {name} {backend}:8443; default 127.0.0.1:1; }}
  server {{
    listen {gw}:16444;
    ssl_preread on;
    proxy_pass $up;
  }}
}}
"""


def lab_yaml(work):
    return f"""apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: client, namespace: bench, labels: {{app: client}}, annotations: {{lab.weft.dev/command: "sleep infinity"}}}}
spec: {{node: n1, address: {CLIENT}}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: backend, namespace: bench, labels: {{app: backend}}, annotations: {{lab.weft.dev/command: "nginx -p {work} -c {work}/backend.conf -g 'daemon off;'"}}}}
spec: {{node: n1, address: {BACKEND}, ports: [{{name: https, port: 8443}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: pass, namespace: bench}}
spec:
  clusterIP: {VIP}
  selector: {{app: backend}}
  ports: [{{name: https, port: 443, targetPort: https}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {{name: pass, namespace: bench}}
spec:
  parentRefs: [{{group: "", kind: Service, name: pass}}]
  hostnames: [{NAME}]
  rules: [{{backendRefs: [{{name: pass, port: 443}}]}}]
"""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def tls_lab():
    work = tempfile.mkdtemp(prefix="weft-bench-tls-")
    os.chmod(work, 0o755)
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
       "-keyout", f"{work}/key.pem", "-out", f"{work}/cert.pem", "-days", "1", "-subj", f"/CN={NAME}")
    os.chmod(f"{work}/key.pem", 0o644)
    write(f"{work}/backend.conf", BACKEND_CONF.format(dir=work))
    write(f"{work}/haproxy.cfg", HAPROXY_CONF.format(threads=THREADS, last=THREADS - 1, gw=GW, name=NAME, backend=BACKEND))
    write(f"{work}/nginx.conf", NGINX_CONF.format(threads=THREADS, dir=work, gw=GW, name=NAME, backend=BACKEND))
    config = f"{work}/config"
    os.mkdir(config)
    write(f"{config}/lab.yaml", lab_yaml(work))
    sh(WEFT, "lab", "down", check=False)
    processes = NodeProcesses(WEFT)
    try:
        sh(WEFT, "lab", "up", "--config", config, "--nodes", "1", "--proxy-threads", str(THREADS), "--proxy-pin-threads")
        node = json.load(open("/run/weft/lab/state.json"))["nodes"][0]
        pids = {
            "haproxy": processes.start(node, "haproxy", "-f", f"{work}/haproxy.cfg", "-db"),
            "nginx": processes.start(node, "nginx", "-p", work, "-c", f"{work}/nginx.conf", "-g", "daemon off;"),
            "weft": int(open("/run/weft/n1/proxy.pid").read()),
        }

        def answer(target, name=NAME):
            host, port = target.rsplit(":", 1)
            return sh(WEFT, "lab", "exec", "bench/client", "--", "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-m", "1",
                      "--connect-to", f"{name}:443:{host}:{port}", f"https://{name}/", check=False)
        for _ in range(100):
            if all(answer(t) == "200" for t in TARGETS.values()):
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"some side never answered 200: {[(n, answer(t)) for n, t in TARGETS.items()]}")
        # Every proxy refuses a name it has no route for (no side is a plain relay).
        for name in ("weft", "haproxy", "nginx"):
            if answer(TARGETS[name], "other.bench.example") == "200":
                raise SystemExit(f"{name} passed a connection for other.bench.example")
        yield pids
    finally:
        processes.stop()
        sh(WEFT, "lab", "down", check=False)
        subprocess.run(["rm", "-rf", work])


def duration_us(text):
    """An h2load duration ("812us", "1.52ms", "2.1s") in µs."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if not m:
        raise SystemExit(f"h2load printed a duration this script does not read: {text}")
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def new_connections(target, proxy_pids):
    """NEW_RATE new connections a second for NEW_S, one request each: the
    proxy's CPU µs per connection and h2load's mean time to first byte."""
    return h2load_new([f"--connect-to={target}"], URL, proxy_pids, NEW_RATE, NEW_S)


def h2load_new(extra, url, proxy_pids, rate, seconds):
    """h2load --h1 from the client pod opening `rate` new connections a
    second for `seconds`, one request on each: connections answered, failed,
    mean time to first byte, and the CPU µs of `proxy_pids` per connection."""
    total = rate * seconds
    per_tenth = max(1, rate // 10)
    c0, m0 = cpu_seconds(proxy_pids), machine_cpu_seconds()
    out = sh(WEFT, "lab", "exec", "bench/client", "--", "h2load", "--h1", *extra, "-r", str(per_tenth),
             "--rate-period", "100ms", "-c", str(total), "-n", str(total), "-t", "1", url)
    cpu, machine = cpu_seconds(proxy_pids) - c0, machine_cpu_seconds() - m0
    done = h2load_requests(out)["succeeded"]
    ttfb = None
    for line in out.splitlines():
        if line.startswith("time to 1st byte:"):
            ttfb = duration_us(line.split(":", 1)[1].split()[2])
    if ttfb is None or done == 0:
        raise SystemExit(f"h2load to {url} made no connection: {out[-1500:]}")
    # (Failed, errored and never made alike: every connection not answered 2xx.)
    return {"connections": done, "failed": total - done, "ttfb_us": ttfb,
            "cpu_us_per_conn": cpu / done * 1e6 if proxy_pids else None,
            "machine_us_per_conn": machine / done * 1e6}


def main():
    shape = lambda target: (["--h1", f"--connect-to={target}"], CONNS, 1)  # noqa: E731
    with tls_lab() as pids:
        names = list(TARGETS)
        rounds = {name: {"fixed": [], "max": [], "new": []} for name in names}
        repeated = kept_disturbed = 0
        for k in range(ROUNDS):
            order = names[k % len(names):] + names[:k % len(names)]

            def one_round():
                # The kept load's latency in slices, every side in turn in each,
                # the order mirrored every other slice (as `scripts/bench proxy`
                # does), so that the sides meet the same host speed.
                slices = {name: [] for name in order}
                for j in range(SLICES):
                    for name in (order if j % 2 == 0 else order[::-1]):
                        slices[name].append(h2load_watched(URL, None, FIXED_SLICE_S, RATE, shape=shape(TARGETS[name]),
                                                           keep_rows=True))
                got = {}
                for name in order:
                    proc = pids_of(pids[name]) if name in pids else []
                    fixed = pooled(slices[name])
                    c0, m0 = cpu_seconds(proc), machine_cpu_seconds()
                    top = h2load(URL, None, MAX_S, shape=shape(TARGETS[name]), warmup=0)
                    top["cpu_s"] = cpu_seconds(proc) - c0
                    top["machine_us_per_req"] = (machine_cpu_seconds() - m0) / top["requests"] * 1e6
                    # (A proxy that spent under 10 ms, a clock tick's worth, on a
                    # 4 s run relayed next to nothing: Weft's, whose bytes the
                    # kernel splices past it. No per-core figure then.)
                    top["per_core"] = top["requests"] / top["cpu_s"] if top["cpu_s"] >= 0.01 else None
                    new = new_connections(TARGETS[name], proc)
                    got[name] = {"fixed": fixed, "max": top, "new": new}
                    print(f"round {k + 1} {name}: kept p50 {fixed['p50_us']}us p99 {fixed['p99_us']}us (quiet {fixed['quiet']['p99_us']}us, "
                          f"host slow {fixed['host_slow']:.1%}) | max {top['rate']:.0f}/s"
                          + (f", {top['per_core']:.0f}/s per core" if top["per_core"] else "")
                          + f" | new: ttfb {new['ttfb_us']:.0f}us" + (f", {new['cpu_us_per_conn']:.0f} CPU us per connection" if proc else ""),
                          flush=True)
                return got, [g["fixed"] for g in got.values()]
            got, again, still = until_calm(one_round, f"round {k + 1}")
            repeated += again
            kept_disturbed += still
            for name, g in got.items():
                for kind, v in g.items():
                    rounds[name][kind].append(v)
        rss = {name: rss_mib(pids_of(pid)) for name, pid in pids.items()}

    summary = {}
    for name, runs in rounds.items():
        s = {"p50_us": statistics.median(r["p50_us"] for r in runs["fixed"]),
             "p99_us": statistics.median(r["p99_us"] for r in runs["fixed"]),
             "host_slow": statistics.median(r["host_slow"] for r in runs["fixed"]),
             "max_rate": statistics.median(r["rate"] for r in runs["max"]),
             "ttfb_us": statistics.median(r["ttfb_us"] for r in runs["new"]),
             "machine_us_per_req": statistics.median(r["machine_us_per_req"] for r in runs["max"]),
             "machine_us_per_conn": statistics.median(r["machine_us_per_conn"] for r in runs["new"]),
             "failed": sum(r["failed"] for kind in ("fixed", "max", "new") for r in runs[kind])}
        if name != "direct":
            s.update(added_over(runs["fixed"], rounds["direct"]["fixed"]))
            cores = [r["per_core"] for r in runs["max"] if r["per_core"]]
            s["per_core"] = statistics.median(cores) if cores else None
            s["cpu_us_per_conn"] = statistics.median(r["cpu_us_per_conn"] for r in runs["new"])
            s["added_ttfb_us"] = statistics.median(a["ttfb_us"] - b["ttfb_us"] for a, b in zip(runs["new"], rounds["direct"]["new"]))
            s["added_p99_rounds"] = [round(a["p99_us"] - b["p99_us"]) for a, b in zip(runs["fixed"], rounds["direct"]["fixed"])]
            s["added_machine_us_per_req"] = statistics.median(
                a["machine_us_per_req"] - b["machine_us_per_req"] for a, b in zip(runs["max"], rounds["direct"]["max"]))
            s["added_machine_us_per_conn"] = statistics.median(
                a["machine_us_per_conn"] - b["machine_us_per_conn"] for a, b in zip(runs["new"], rounds["direct"]["new"]))
            s["rss_mib"] = rss[name]
        summary[name] = s
    for runs in rounds.values():
        for r in runs["fixed"]:
            r.pop("rows", None)
            r.pop("calm", None)
    with open(os.path.join(ROOT, "docs/bench-tls.json"), "w") as f:
        json.dump({"summary": summary, "rounds": rounds, "repeated": repeated, "kept_disturbed": kept_disturbed}, f, indent=1)
    report(summary, repeated, kept_disturbed)


def report(summary, repeated, kept_disturbed):
    h2 = sh("h2load", "--version").split("\n")[0]
    us = "{:.0f} µs".format
    lines = [
        "## TLS passthrough by server name: Weft's TLSRoute vs HAProxy vs nginx",
        "",
        f"Made by `scripts/bench tls` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel {os.uname().release}), "
        f"release build at {revision()}; {ROUNDS} rounds rotating the order of the sides, medians. One node: a client pod and an "
        f"nginx pod serving HTTPS (TLS 1.3, ECDSA P-256, no resumption) for `{NAME}`. *direct*: the pod's address. *weft*: the "
        "Service's clusterIP, which a TLSRoute for that name routes (connect4 -> node proxy -> the ClientHello's server name -> "
        "the pod). *haproxy*: HAProxy 2.6 on the node in TCP mode, routing by `req_ssl_sni` after `req_ssl_hello_type`. "
        "*nginx*: nginx stream with `ssl_preread` and a map of `$ssl_preread_server_name`. No side terminates TLS, and each "
        "refuses a name it has no route for (checked before the rounds). Every proxy has 2 threads/workers bound one per core; "
        "all share the VM's 2 cores with h2load and the backend.",
        "",
        f"- kept: {h2}, HTTP/1.1 over TLS, {CONNS} kept connections at {RATE} requests/s, {FIXED_SLICE_S * SLICES} s per side "
        f"and round in {SLICES} slices of {FIXED_SLICE_S} s interleaved with the other sides' (each slice every side in turn, "
        "the order mirrored every other slice; since 2200f42, before it one side after another), percentiles over all of a "
        "side's requests in the round (*added* = side minus direct, per round; *quiet* leaves out the requests in flight while "
        "the host slowed the VM, top of this page), then, side by side, as "
        f"fast as they go for {MAX_S} s: *per core* = requests / CPU seconds of the proxy's processes; *node CPU* = the CPU "
        "time the whole VM spent per request in that run (every process and the kernel's work, /proc/stat), and *added* that "
        "minus direct's in the same round: what a side costs wherever its work runs. Weft's splice (docs/shortcut.md, rule 7) "
        "moves a passed-through connection's bytes past the proxy, in the senders' own system calls, so its proxy's CPU no "
        "longer says what it costs; the node's does.",
        f"- new: {NEW_RATE} new connections a second for {NEW_S} s, each a full handshake with the backend and one request: "
        "*CPU per connection* of the proxy, the node's CPU per connection added over direct's, and h2load's mean time to the "
        "first byte (connect, handshake, request) added over direct.",
        f"- A round in which the host was slow for more than {DISTURBED:.0%} of a kept run is run again, at most {RETRIES} times "
        f"(this time: {repeated} repeats, {kept_disturbed} of {ROUNDS} rounds kept still over it).",
        "",
        "| side | kept: added p50 | added p99 | quiet added p99 | req/s per core | node CPU per request (added) | max req/s | "
        "new: CPU per connection | node CPU per connection (added) | added time to first byte | RSS | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    us1 = "{:.1f} µs".format
    for name in TARGETS:
        s = summary[name]
        if name == "direct":
            lines.append(f"| direct | – | – | – | – | {us1(s['machine_us_per_req'])} | {s['max_rate']:.0f} | – | "
                         f"{us(s['machine_us_per_conn'])} | – ({us(s['ttfb_us'])}) | – | {s['failed']} |")
            continue
        per_core = f"{s['per_core']:,.0f}" if s["per_core"] else "– (proxy idle)"
        lines.append(f"| {name} | {us(s['added_p50_us'])} | {us(s['added_p99_us'])} | {us(s['quiet_added_p99_us'])} | "
                     f"{per_core} | {us1(s['machine_us_per_req'])} ({s['added_machine_us_per_req']:+.1f}) | {s['max_rate']:.0f} | "
                     f"{us(s['cpu_us_per_conn'])} | {us(s['machine_us_per_conn'])} ({s['added_machine_us_per_conn']:+.0f}) | "
                     f"{us(s['added_ttfb_us'])} | {s['rss_mib']:.0f} MiB | {s['failed']} |")
    w, h = summary["weft"], summary["haproxy"]
    ratio = (f"the proxy's own requests per core {w['per_core'] / h['per_core']:.2f}x" if w["per_core"] and h["per_core"]
             else "Weft's proxy itself idle, the kernel splicing the bytes past it")
    lines += [
        "",
        f"Weft against HAProxy: node CPU added per kept request {w['added_machine_us_per_req']:+.1f} µs vs "
        f"{h['added_machine_us_per_req']:+.1f} µs ({ratio}), max requests/s {w['max_rate'] / h['max_rate']:.2f}x, added p99 "
        f"{us(w['added_p99_us'])} vs {us(h['added_p99_us'])}; per new connection, node CPU added "
        f"{w['added_machine_us_per_conn']:+.0f} µs vs {h['added_machine_us_per_conn']:+.0f} µs, the proxy's own CPU "
        f"{w['cpu_us_per_conn'] / h['cpu_us_per_conn']:.2f}x ({us(w['cpu_us_per_conn'])} vs {us(h['cpu_us_per_conn'])}).",
        "",
        "Added p99 round by round (µs; a round's sides alternate slice by slice): "
        + "; ".join(f"{name} {' '.join(f'{v:+d}' for v in summary[name]['added_p99_rounds'])}" for name in TARGETS if name != "direct")
        + f"; Weft's the lower of Weft's and HAProxy's in "
        f"{sum(a < b for a, b in zip(w['added_p99_rounds'], h['added_p99_rounds']))} of {len(w['added_p99_rounds'])} rounds.",
    ]
    write_section("tls", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
