#!/usr/bin/env python3
"""The node proxy against HAProxy and nginx, side by side in one lab and one
run (issue #4).

Lab: one node (n1) with a client pod and a backend pod running nginx that
answers `200 ok` (HTTP/1.1 on 8080, h2c on 8081). Four ways from client to
backend, all on the same node:
  direct   the backend's own address (the baseline latency is taken from)
  weft     the Service's clusterIP; connect4 captures it to `weft proxy`
  haproxy  HAProxy 2.6 on the node, as an equivalent L7 reverse proxy
  nginx    nginx 1.22 on the node, likewise
Each proxy gets two threads/workers (Weft's default on this 2-core VM: one
event loop per core), each bound to one core (Weft: the agent's
--proxy-pin-threads; HAProxy cpu-map; nginx worker_cpu_affinity auto), keeps
HTTP/1.1 connections to the backend alive, and
adds what Weft adds to every request (X-Forwarded-For, X-Forwarded-Proto,
Forwarded, Via, a request id, a new traceparent) after a Via loop check, so
that all do the same work and the backend reads the same request from each.
HTTP/2 from the client (h2c, prior knowledge) is proxied to HTTP/1.1 by all
three.

Two loads per side, from h2load in the client pod, rotating the order of the
sides each round (medians over rounds). Each load of a round runs in slices
(WEFT_BENCH_PROXY_SLICES, 3): slice by slice every side in turn, the order
reversed every other slice (A B C D, D C B A, ...), and a side's figures
pool its slices' requests. The VM's speed drifts by tens of percent over
tens of seconds (h2load's own time to send a burst moves with it), so sides
measured seconds apart, in mirrored order, meet the same host; one long run
per side, a minute from the next, did not.
  fixed    a fixed request rate over fixed connections: latency percentiles
           from h2load's per-request log, minus direct's = latency added.
           One h2load's connections send in step (a burst per tick); the
           same rate again from one h2load per connection ("independent"),
           whose ticks fall where they start
  max      as fast as the connections go: requests/s per proxy CPU core =
           requests / (CPU seconds the proxy's processes used)

With --pinned (`scripts/bench proxy-pinned`) each proxy runs one thread /
worker on a core of its own (CPU 1: Weft through the agent's
--proxy-threads 1, HAProxy nbthread 1, nginx one worker) while h2load, the
backend and the agent run on the other (CPU 0): the proxy no longer
competes with the load and the backend for its core, so *max* is one
core's worth of each proxy and the latencies say less about the scheduler.
It writes its own section, json and plot.
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import NodeProcesses, h2load_requests, revision, sh, write_section  # noqa: E402
from hostwatch import HostWatch, quiet  # noqa: E402

WEFT = os.path.join(ROOT, ".build/release/weft")
PINNED = "--pinned" in sys.argv[1:]
SUFFIX = "-pinned" if PINNED else ""
PROXY_CPU, LOAD_CPU = "1", "0"   # --pinned: the proxies' core, and everything else's
THREADS = 1 if PINNED else 2
ROUNDS = int(os.environ.get("WEFT_BENCH_PROXY_ROUNDS", "3"))
# Seconds per side, load and round, split into SLICES runs.
SLICES = max(1, int(os.environ.get("WEFT_BENCH_PROXY_SLICES", "3")))
FIXED_S = int(os.environ.get("WEFT_BENCH_PROXY_SECONDS", "6"))
MAX_S = int(os.environ.get("WEFT_BENCH_PROXY_MAX_SECONDS", "6"))
FIXED_SLICE_S, MAX_SLICE_S = max(1, FIXED_S // SLICES), max(1, MAX_S // SLICES)
RATE = int(os.environ.get("WEFT_BENCH_PROXY_RATE", "1600"))
# A round whose latency runs saw the host slow (scripts/hostwatch.py) for more
# than this share of one run is run again, at most RETRIES times: its p99s
# would say more about the host than about the proxies.
DISTURBED = float(os.environ.get("WEFT_BENCH_DISTURBED", "0.25"))
RETRIES = 2
# Without --pinned each proxy binds its threads one per core, the same way:
# Weft the agent's --proxy-pin-threads, HAProxy cpu-map, nginx
# worker_cpu_affinity auto. Left to float, two threads woken by one burst
# were often queued on one core while the other idled (docs/proxy.md, "Event
# loops bound to CPUs"). --pinned puts every thread on PROXY_CPU instead.
AFFINITY = ({"haproxy_affinity": "", "nginx_affinity": ""} if PINNED else
            {"haproxy_affinity": f"  cpu-map auto:1/1-{THREADS} 0-{THREADS - 1}\n",
             "nginx_affinity": "worker_cpu_affinity auto;\n"})
CLIENT, BACKEND, VIP, GW = "198.18.1.10", "198.18.1.20", "198.19.9.10", "198.18.1.1"
LOADS = {
    # name: (h2load flags, connections, streams per connection)
    "HTTP/1.1": (["--h1"], 16, 1),
    "HTTP/2": ([], 4, 8),
}
TARGETS = {
    "direct": {"HTTP/1.1": f"http://{BACKEND}:8080/", "HTTP/2": f"http://{BACKEND}:8081/"},
    "weft": {"HTTP/1.1": f"http://{VIP}/", "HTTP/2": f"http://{VIP}/"},
    "haproxy": {"HTTP/1.1": f"http://{GW}:16001/", "HTTP/2": f"http://{GW}:16002/"},
    "nginx": {"HTTP/1.1": f"http://{GW}:16003/", "HTTP/2": f"http://{GW}:16004/"},
}



def write(path, text):
    with open(path, "w") as f:
        f.write(text)


BACKEND_CONF = """worker_processes 1;
pid {dir}/backend.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 8080;
    listen 8081 http2;
    location / {{ add_header x-pod backend; return 200 "ok\\n"; }}
  }}
}}
"""

NGINX_CONF = """worker_processes {threads};
{nginx_affinity}pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream be {{ server {backend}:8080; keepalive 64; keepalive_requests 1000000; }}
  # The fields Weft adds to every request (see HAPROXY_CONF); nginx has one
  # random value per request, $request_id (32 hex digits): the traceparent's
  # trace id, and its first half the span id.
  map $request_id $span_id {{ "~^(?<h>[0-9a-f]{{16}})" $h; }}
  server {{
    listen {gw}:16003;
    listen {gw}:16004 http2;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      if ($http_via ~ "nginx-n1") {{ return 508; }}
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header Forwarded "for=$remote_addr;proto=$scheme";
      proxy_set_header Via "1.1 nginx-n1";
      proxy_set_header X-Request-ID $request_id;
      proxy_set_header traceparent "00-$request_id-$span_id-01";
    }}
  }}
}}
"""

HAPROXY_CONF = """global
  nbthread {threads}
{haproxy_affinity}  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option forwardfor
  http-reuse always
frontend fe
  bind {gw}:16001
  bind {gw}:16002 proto h2
  # The fields Weft adds to every request (docs/proxy.md), and its Via
  # loop check: X-Forwarded-For (above), X-Forwarded-Proto, Forwarded, Via,
  # a request id (a random UUID) and a new W3C traceparent.
  http-request return status 508 if {{ req.hdr(via) -m sub haproxy-n1 }}
  http-request set-header x-forwarded-proto http unless {{ req.hdr(x-forwarded-proto) -m found }}
  http-request add-header forwarded "for=%[src];proto=http"
  http-request add-header via "1.1 haproxy-n1"
  unique-id-format %[uuid]
  unique-id-header X-Request-ID
  # (Its 48 hex digits from six 32-bit random numbers: the cheapest way
  # found, about half what one UUID without its dashes costs, regsub.)
  http-request set-header traceparent "00-%[rand,hex,bytes(8),lower]%[rand,hex,bytes(8),lower]%[rand,hex,bytes(8),lower]%[rand,hex,bytes(8),lower]-%[rand,hex,bytes(8),lower]%[rand,hex,bytes(8),lower]-01"
  default_backend be
backend be
  server s1 {backend}:8080
"""


def lab_yaml(work):
    """One node: the client pod, the nginx backend pod and its L7 Service.
    The rounds leave each proxy idle for about 4 s while the other sides
    run, longer than Weft's default upstreamIdleTimeout (3 s): Weft would
    reconnect to the backend at the start of each of its slices, which
    HAProxy (pool-purge-delay 5 s) and nginx (upstream keepalive_timeout
    60 s) do not. So the lab keeps idle backend connections for 60 s, as
    nginx does."""
    return f"""apiVersion: weft.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{proxy: {{upstreamIdleTimeout: 60s}}}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: client, namespace: bench, labels: {{app: client}}, annotations: {{lab.weft.dev/command: "sleep infinity"}}}}
spec: {{node: n1, address: {CLIENT}}}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: backend, namespace: bench, labels: {{app: backend}}, annotations: {{lab.weft.dev/command: "nginx -p {work} -c {work}/backend.conf -g 'daemon off;'"}}}}
spec: {{node: n1, address: {BACKEND}, ports: [{{name: http, port: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: backend, namespace: bench}}
spec:
  clusterIP: {VIP}
  selector: {{app: backend}}
  ports: [{{name: http, port: 80, targetPort: http, appProtocol: http}}]
"""


def pids_of(root):
    """A process and all it started, at any depth (nginx's workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids):
    """CPU time of the processes, every thread: the scheduler's own count
    in nanoseconds (/proc/PID/task/TID/schedstat), where there is one,
    rather than utime + stime, which advance by whole clock ticks (10 ms: a
    few seconds of new connections took only a dozen of them)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            total += sum(int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0]) for tid in tasks) / 1e9
        except (OSError, ValueError, IndexError):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except OSError:
                pass
    return total


def pin(proxies, lab):
    """--pinned: every thread of each proxy (and of its workers) on
    PROXY_CPU; the lab's agent and pods (the backend) on LOAD_CPU, as
    h2load is (it is started under taskset). Threads made later inherit
    their creator's CPU."""
    # The agent alone (its child is Weft's proxy), the pods with all they started.
    for p in [n["agentPid"] for n in lab["nodes"]] + [d for p in lab["pods"] if p.get("pid") for d in pids_of(p["pid"])]:
        sh("taskset", "-a", "-p", "-c", LOAD_CPU, str(p))
    # Again until no thread of a proxy may run on the load's CPU (one made
    # while taskset went through the others keeps its creator's mask).
    mask = f"{1 << int(PROXY_CPU):x}"
    for _ in range(20):
        loose = []
        for pid in proxies.values():
            for p in pids_of(pid):
                sh("taskset", "-a", "-p", "-c", PROXY_CPU, str(p))
        for pid in proxies.values():
            for p in pids_of(pid):
                for t in os.listdir(f"/proc/{p}/task"):
                    allowed = sh("taskset", "-p", t, check=False).rsplit(":", 1)[-1].strip()
                    if allowed and allowed != mask:
                        loose.append(f"thread {t} of proxy {pid}: CPU mask {allowed}")
        if not loose:
            return
        time.sleep(0.2)
    raise SystemExit(f"cannot pin the proxies to CPU {PROXY_CPU}: {loose}")


def rss_mib(pids):
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def h2load(url, load, seconds, rate=None, shape=None, processes=1, keep_rows=False, warmup=1):
    """`load` names a shape in LOADS, or `shape` gives (flags, connections, streams).
    h2load counts nothing from its first `warmup` seconds; a caller that
    divides the requests by CPU time taken around the whole call passes
    warmup=0, or that CPU would include a second of requests not counted.
    With `processes` > 1, that many h2loads run at once, each with the shape
    and `rate` / `processes` requests/s: independent clients, whose request
    timers do not tick together as one h2load's connections do.
    With `keep_rows`, the result's `rows` are (start µs since the epoch,
    latency µs, status), in start order."""
    flags, conns, streams = shape or LOADS[load]
    logs, runs = [], []
    for _ in range(processes):
        log = tempfile.mktemp(prefix="weft-bench-h2load-", dir="/tmp")
        logs.append(log)
        args = [WEFT, "lab", "exec", "bench/client", "--", *(["taskset", "-c", LOAD_CPU] if PINNED else []), "h2load", *flags, "-c", str(conns), "-m", str(streams),
                "-t", "1", "-D", str(seconds), "--warm-up-time", str(warmup), "--log-file", log]
        if rate:
            args += ["--rps", str(max(1, rate // processes // conns))]
        runs.append(subprocess.Popen(args + [url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for run in runs:
        out, err = run.communicate()
        if run.returncode != 0:
            raise SystemExit(f"h2load {url} failed: {out[-2000:]}{err[-2000:]}")
        outs.append(out)
    rows = []
    statuses = {}
    try:
        for log in logs:
            for line in open(log):
                parts = line.split()
                if len(parts) >= 3:
                    statuses[parts[1]] = statuses.get(parts[1], 0) + 1
                    rows.append((int(parts[0]), int(parts[2]), int(parts[1])))
    finally:
        for log in logs:
            if os.path.exists(log):
                os.unlink(log)
    done = sum(statuses.values())
    failed = done - statuses.get("200", 0)
    for out in outs:
        counts = h2load_requests(out)
        failed += counts["failed"] + counts["errored"]
    rows.sort()
    result = {"requests": done, "rate": done / seconds, "failed": failed}
    result.update(percentiles(rows))
    if keep_rows:
        result["rows"] = rows
    return result


def h2load_watched(url, load, seconds, rate=None, shape=None, processes=1, keep_rows=False):
    """h2load under a HostWatch: the result also has `quiet` (p50/p99 of the
    requests in flight during no host slowdown), `left_out` (the share of
    requests that were) and `host_slow` (the share of the measured time in
    one). With `keep_rows`, also `rows` and `calm` (the quiet ones), for
    `pooled`."""
    with HostWatch() as watch:
        r = h2load(url, load, seconds, rate, shape, processes, keep_rows=True)
    rows = r.pop("rows")
    calm = quiet(rows, watch.windows)
    if keep_rows:
        r["rows"], r["calm"] = rows, calm
    r["quiet"] = percentiles(calm)
    r["left_out"] = 1 - len(calm) / len(rows) if rows else 0.0
    # The share of the measured time (h2load's warm-up second is not logged)
    # that fell in a window.
    if rows:
        a, b = rows[0][0] / 1e6, max(r[0] + r[1] for r in rows) / 1e6
        r["host_slow"] = sum(max(0.0, min(b, wb) - max(a, wa)) for wa, wb in watch.windows) / (b - a) if b > a else 0.0
    else:
        r["host_slow"] = watch.share
    return r


def pooled(slices):
    """One side's slices of a latency load (h2load_watched with keep_rows) as
    one run: percentiles over all their requests, rates and host-slow shares
    averaged (the slices are equally long), failures added; each slice's
    p50/p99 kept under `slices`."""
    rows = [row for s in slices for row in s["rows"]]
    calm = [row for s in slices for row in s["calm"]]
    r = {"requests": sum(s["requests"] for s in slices), "failed": sum(s["failed"] for s in slices),
         "rate": statistics.mean(s["rate"] for s in slices),
         "host_slow": statistics.mean(s["host_slow"] for s in slices),
         "left_out": 1 - len(calm) / len(rows) if rows else 0.0,
         "slices": [[s["p50_us"], s["p99_us"]] for s in slices]}
    r.update(percentiles(rows))
    r["quiet"] = percentiles(calm)
    return r


def pooled_max(slices):
    """One side's max-load slices (h2load results with `cpu_s`) as one run:
    requests / CPU seconds over all of them."""
    requests, cpu = sum(s["requests"] for s in slices), sum(s["cpu_s"] for s in slices)
    return {"requests": requests, "cpu_s": cpu, "per_core": requests / cpu if cpu > 0 else float("nan"),
            "rate": statistics.mean(s["rate"] for s in slices), "failed": sum(s["failed"] for s in slices),
            "slices": [s["requests"] / s["cpu_s"] if s["cpu_s"] > 0 else None for s in slices]}


def until_calm(run, label):
    """Calls `run()` (which returns runs of h2load_watched, in a list) again
    while the host was slow for more than DISTURBED of one of them, at most
    RETRIES more times. Returns its last result, how many times it ran again,
    and 1 if that result is still disturbed (else 0)."""
    for attempt in range(1 + RETRIES):
        got, runs = run()
        worst = max(r["host_slow"] for r in runs)
        if worst <= DISTURBED:
            return got, attempt, 0
        if attempt == RETRIES:
            return got, attempt, 1
        print(f"{label}: the host was slow for {worst:.0%} of one run; it runs again", flush=True)


def added_over(runs, base):
    """What a side adds over `base` (direct), from runs of h2load_watched:
    per round, side minus base, then the median over rounds."""
    pairs = list(zip(runs, base))

    def median(get):
        return statistics.median(get(a) - get(b) for a, b in pairs)
    return {"added_p50_us": median(lambda r: r["p50_us"]), "added_p99_us": median(lambda r: r["p99_us"]),
            "quiet_added_p50_us": median(lambda r: r["quiet"]["p50_us"]),
            "quiet_added_p99_us": median(lambda r: r["quiet"]["p99_us"])}


def percentiles(rows):
    """p50 and p99 of the rows' latencies, in µs."""
    latencies = sorted(r[1] for r in rows)

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")
    return {"p50_us": pct(0.50), "p99_us": pct(0.99)}


@contextlib.contextmanager
def proxies_lab():
    """The benchmark's lab, up: one node with the client pod, the nginx
    backend pod and its L7 Service (Weft's proxy), HAProxy and nginx on the
    node, every side answering 200 (and, --pinned, every process on its
    CPU). Yields each proxy's pid; takes it all down after, also on error."""
    work = tempfile.mkdtemp(prefix="weft-bench-proxy-")
    os.chmod(work, 0o755)
    write(f"{work}/backend.conf", BACKEND_CONF.format(dir=work))
    write(f"{work}/nginx.conf", NGINX_CONF.format(dir=work, backend=BACKEND, gw=GW, threads=THREADS, **AFFINITY))
    write(f"{work}/haproxy.cfg", HAPROXY_CONF.format(backend=BACKEND, gw=GW, threads=THREADS, **AFFINITY))
    config = f"{work}/config"
    os.mkdir(config)
    write(f"{config}/lab.yaml", lab_yaml(work))
    sh(WEFT, "lab", "down", check=False)
    processes = NodeProcesses(WEFT)
    try:
        sh(WEFT, "lab", "up", "--config", config, "--nodes", "1",
           *(["--proxy-threads", "1"] if PINNED else ["--proxy-threads", str(THREADS), "--proxy-pin-threads"]))
        lab = json.load(open("/run/weft/lab/state.json"))
        node = lab["nodes"][0]

        def on_node(*cmd):
            return processes.start(node, *cmd)

        pids = {
            "haproxy": on_node("haproxy", "-f", f"{work}/haproxy.cfg", "-db"),
            "nginx": on_node("nginx", "-p", work, "-c", f"{work}/nginx.conf", "-g", "daemon off;"),
            "weft": int(open("/run/weft/n1/proxy.pid").read()),
        }
        for _ in range(100):
            ok = all(sh(WEFT, "lab", "exec", "bench/client", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        "-m", "1", *(["--http2-prior-knowledge"] if load == "HTTP/2" else []), url, check=False) == "200"
                     for t in TARGETS.values() for load, url in t.items())
            if ok:
                break
            time.sleep(0.1)
        else:
            bad = [(name, load, sh(WEFT, "lab", "exec", "bench/client", "--", "curl", "-sS", "-m", "1",
                                   *(["--http2-prior-knowledge"] if load == "HTTP/2" else []), url, check=False))
                   for name, t in TARGETS.items() for load, url in t.items()]
            raise SystemExit(f"some side never answered 200: {bad}")
        if PINNED:
            pin(pids, lab)   # once every side answers: the pods' processes have started
        yield pids
    finally:
        processes.stop()
        sh(WEFT, "lab", "down", check=False)
        subprocess.run(["rm", "-rf", work])


def main():
    with proxies_lab() as pids:
        results = {load: {name: {"fixed": [], "independent": [], "max": []} for name in TARGETS} for load in LOADS}
        repeated = kept_disturbed = 0

        def run_slices(load, order):
            """Every side's slices of `load`, interleaved: per slice, each
            kind of load on every side in turn, mirrored every other slice."""
            flags, conns, streams = LOADS[load]
            got = {name: {"fixed": [], "independent": [], "max": []} for name in order}
            for j in range(SLICES):
                turn = order if j % 2 == 0 else order[::-1]
                for name in turn:
                    got[name]["fixed"].append(h2load_watched(TARGETS[name][load], load, FIXED_SLICE_S, RATE, keep_rows=True))
                for name in turn:
                    got[name]["independent"].append(h2load_watched(TARGETS[name][load], load, FIXED_SLICE_S, RATE,
                                                                   shape=(flags, 1, streams), processes=conns, keep_rows=True))
                for name in turn:
                    proc = pids_of(pids[name]) if name in pids else []
                    c0 = cpu_seconds(proc)
                    top = h2load(TARGETS[name][load], load, MAX_SLICE_S, warmup=0)
                    top["cpu_s"] = cpu_seconds(proc) - c0
                    got[name]["max"].append(top)
            return {name: {"fixed": pooled(g["fixed"]), "independent": pooled(g["independent"]),
                           "max": pooled_max(g["max"])} for name, g in got.items()}

        names = list(TARGETS)
        for k in range(ROUNDS):
            order = names[k % len(names):] + names[:k % len(names)]
            for load in LOADS:
                def one_round():
                    got = run_slices(load, order)
                    for name in order:
                        fixed, independent, top = got[name]["fixed"], got[name]["independent"], got[name]["max"]
                        print(f"round {k + 1} {load} {name}: fixed p50 {fixed['p50_us']}us p99 {fixed['p99_us']}us "
                              f"(quiet {fixed['quiet']['p99_us']}us, host slow {fixed['host_slow']:.1%}); independent p50 "
                              f"{independent['p50_us']}us p99 {independent['p99_us']}us (quiet {independent['quiet']['p99_us']}us, "
                              f"host slow {independent['host_slow']:.1%}) | max {top['rate']:.0f}/s, {top['per_core']:.0f}/s per core",
                              flush=True)
                    return got, [r[kind] for r in got.values() for kind in ("fixed", "independent")]
                got, again, still = until_calm(one_round, f"round {k + 1} {load}")
                repeated += again
                kept_disturbed += still
                for name, r in got.items():
                    for kind, v in r.items():
                        results[load][name][kind].append(v)
        rss = {name: rss_mib(pids_of(pid)) for name, pid in pids.items()}

    summary = {}
    for load, sides in results.items():
        summary[load] = {}
        for name, runs in sides.items():
            s = {k: statistics.median(r[k] for r in runs["fixed"]) for k in ("p50_us", "p99_us", "rate", "host_slow")}
            s["quiet_p99_us"] = statistics.median(r["quiet"]["p99_us"] for r in runs["fixed"])
            s["failed"] = sum(r["failed"] for r in runs["fixed"]) + sum(r["failed"] for r in runs["max"])
            s["max_rate"] = statistics.median(r["rate"] for r in runs["max"])
            if name != "direct":
                s["per_core"] = statistics.median(r["per_core"] for r in runs["max"])
                s["rss_mib"] = rss[name]
            summary[load][name] = s
        for name in ("weft", "haproxy", "nginx"):
            summary[load][name].update(added_over(sides[name]["fixed"], sides["direct"]["fixed"]))
            summary[load][name]["independent"] = added_over(sides[name]["independent"], sides["direct"]["independent"])
    paired = pairs(results)
    with open(os.path.join(ROOT, f"docs/bench-proxy{SUFFIX}.json"), "w") as f:
        json.dump({"summary": summary, "paired": paired, "rounds": results, "repeated": repeated,
                   "kept_disturbed": kept_disturbed}, f, indent=1)
    plot(summary)
    report(summary, paired, repeated, kept_disturbed)


def pairs(results):
    """Weft against HAProxy round by round (in one round their slices
    alternate seconds apart, on the same host state; medians over rounds can hide that one
    side won every round, or that the rounds split): per load, the per-core
    ratio and the added latencies' differences of each round."""
    out = {}
    for load, sides in results.items():
        w, h = sides["weft"], sides["haproxy"]
        rounds = []
        for i in range(len(w["max"])):
            r = {"per_core_ratio": w["max"][i]["per_core"] / h["max"][i]["per_core"]}
            for kind in ("fixed", "independent"):
                for p in ("p50_us", "p99_us"):
                    # Direct's part cancels: (weft - direct) - (haproxy - direct).
                    r[f"{kind}_{p[:3]}_minus_haproxy_us"] = w[kind][i][p] - h[kind][i][p]
            rounds.append(r)
        out[load] = rounds
    return out


def paired_lines(paired):
    """Round-by-round lines for the report: how many rounds met each part of
    the target, and the spread."""
    lines = ["", "Round by round, Weft against HAProxy (in each round their slices alternate seconds apart; a ratio "
             "above 1 or a difference below 0 is Weft ahead):", "",
             "| load | per core, Weft / HAProxy | rounds at or above 1 | fixed added p99, Weft minus HAProxy | rounds at or below 0 "
             "| fixed added p50, Weft minus HAProxy | rounds at or below 0 |", "|---|---|---|---|---|---|---|"]
    for load, rounds in paired.items():
        n = len(rounds)
        ratios = sorted(r["per_core_ratio"] for r in rounds)
        p99 = sorted(r["fixed_p99_minus_haproxy_us"] for r in rounds)
        p50 = sorted(r["fixed_p50_minus_haproxy_us"] for r in rounds)
        lines.append(f"| {load} | {' '.join(f'{x:.2f}' for x in ratios)} | {sum(x >= 1 for x in ratios)} of {n} | "
                     f"{' '.join(f'{x:+.0f}' for x in p99)} µs | {sum(x <= 0 for x in p99)} of {n} | "
                     f"{' '.join(f'{x:+.0f}' for x in p50)} µs | {sum(x <= 0 for x in p50)} of {n} |")
    return lines


def plot(summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sides = ["weft", "haproxy", "nginx"]
    colors = {"weft": "#1f77b4", "haproxy": "#2ca02c", "nginx": "#ff7f0e"}
    loads = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.25
    for i, side in enumerate(sides):
        xs = [j + (i - 1) * width for j in range(len(loads))]
        axes[0].bar(xs, [summary[l][side]["per_core"] for l in loads], width, color=colors[side], label=side)
        axes[1].bar(xs, [summary[l][side]["added_p99_us"] for l in loads], width, color=colors[side], label=side)
    axes[0].set_ylabel("requests/s per proxy CPU core (max load)")
    axes[1].set_ylabel(f"p99 latency added over direct, µs ({RATE} req/s)")
    for ax in axes:
        ax.set_xticks(range(len(loads)))
        ax.set_xticklabels(loads)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle("L7 proxies on the node: same lab, same backend, same load, one run"
                 + (" (each proxy on a core of its own)" if PINNED else ""))
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, f"docs/bench-proxy{SUFFIX}.png"), dpi=110)


def report(summary, paired, repeated, kept_disturbed):
    h2 = sh("h2load", "--version").split("\n")[0]
    lines = [
        "## L7 proxy: Weft vs HAProxy vs nginx" + (", one core each" if PINNED else "") + " (issue #4)",
        "",
        f"Made by `scripts/bench proxy{SUFFIX}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel {os.uname().release}), "
        f"release build at {revision()} (no run-time exclusivity checks, the Swift runtime linked in, as `scripts/bench` builds it); {ROUNDS} rounds rotating the order of the sides, medians. Load: {h2} in a client pod; backend: nginx "
        "answering `200 ok` in a pod on the same node. Every proxy runs on the node with "
        + (f"1 thread/worker pinned to CPU {PROXY_CPU} (Weft: the agent's `--proxy-threads 1`), h2load, the backend and the "
           f"agent pinned to CPU {LOAD_CPU}; each proxy " if PINNED else
           "2 threads/workers bound one per core (Weft: the agent's `--proxy-pin-threads`; HAProxy `cpu-map auto:1/1-2 0-1`; "
           "nginx `worker_cpu_affinity auto`; since 7f4b0e2, before it they floated), ")
        + "keeps HTTP/1.1 "
        "connections to the backend alive and adds to each request the fields Weft adds (X-Forwarded-For, X-Forwarded-Proto, "
        "Forwarded, Via, a request id and a new W3C traceparent) after the same Via loop check, so the backend reads the "
        "same request from each; HTTP/2 (h2c, prior knowledge) from the "
        "client is proxied to HTTP/1.1. `weft` is reached through the Service clusterIP (captured by connect4), the others "
        "through their listen address. (Until 51519d9 HAProxy and nginx added X-Forwarded-For and a request id only.)",
        "",
        f"- fixed: {RATE} requests/s over fixed connections (HTTP/1.1: 16 connections; HTTP/2: 4 connections x 8 streams), "
        f"{FIXED_SLICE_S * SLICES} s per side and round in {SLICES} slices of {FIXED_SLICE_S} s, interleaved with the other sides' (each slice "
        "every side in turn, the order mirrored every other slice, so that every side meets the same host speed; this VM's "
        "drifts by tens of percent over tens of seconds); latency from h2load's per-request log, percentiles over all of a "
        "side's requests in the round. *added* = side minus direct, per round. *quiet* leaves out "
        "the requests in flight while the VM's host slowed its vCPUs (found by `scripts/hostwatch.py`; see the top of "
        "this page), on every side alike; *host slow* is the share of the run in such windows. A round in which the host "
        f"was slow for more than {DISTURBED:.0%} of one latency run is run again, at most {RETRIES} times (this time: "
        f"{repeated} repeats, and {kept_disturbed} of {ROUNDS * len(LOADS)} rounds kept still over it).",
        "- independent: the same rate and connections, one h2load per connection, so their request timers do not tick "
        "together (the *fixed* load sends a burst of one request per connection every tick).",
        f"- max: the same connections as fast as they go, {MAX_SLICE_S * SLICES} s per side and round in {SLICES} interleaved slices with no "
        "warm-up (CPU is taken around each whole slice); *per core* = requests / CPU seconds of the proxy's processes, over "
        "the round's slices.",
        ("- The proxy has a core of its own, so *max* is about what one core of it serves (the proxy is the "
         "bottleneck when its core is busy all the run); the latencies include no wait for a core the load or the "
         "backend holds. The unpinned shape, where all share both cores, is the section above."
         if PINNED else
         "- The load generator, the backend and the proxy share the VM's 2 cores, so *max* rates are low in absolute terms; "
         "per-core figures and the ratios are what compare."),
        "",
        "| load | side | req/s per core | vs HAProxy | added p50 | added p99 | quiet added p99 | p99 | host slow | max req/s | RSS | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load, sides in summary.items():
        ha = sides["haproxy"]["per_core"]
        for name in ("direct", "weft", "haproxy", "nginx"):
            s = sides[name]
            if name == "direct":
                lines.append(f"| {load} | direct | – | – | – | – | – | {s['p99_us']:.0f} µs | {s['host_slow']:.1%} | {s['max_rate']:.0f} | – | {s['failed']} |")
            else:
                lines.append(f"| {load} | {name} | {s['per_core']:,.0f} | {s['per_core'] / ha:.2f} | {s['added_p50_us']:.0f} µs | "
                             f"{s['added_p99_us']:.0f} µs | {s['quiet_added_p99_us']:.0f} µs | {s['p99_us']:.0f} µs | {s['host_slow']:.1%} | "
                             f"{s['max_rate']:.0f} | {s['rss_mib']:.0f} MiB | {s['failed']} |")
    lines += [
        "",
        "Latency added with independent clients (same rate and connections):",
        "",
        "| load | side | added p50 | added p99 | quiet added p99 |",
        "|---|---|---|---|---|",
    ]
    for load, sides in summary.items():
        for name in ("weft", "haproxy", "nginx"):
            i = sides[name]["independent"]
            lines.append(f"| {load} | {name} | {i['added_p50_us']:.0f} µs | {i['added_p99_us']:.0f} µs | {i['quiet_added_p99_us']:.0f} µs |")
    w1, w2 = summary["HTTP/1.1"]["weft"], summary["HTTP/2"]["weft"]
    hp1, hp2 = summary["HTTP/1.1"]["haproxy"], summary["HTTP/2"]["haproxy"]
    def against(load):
        # The medians of each side's own rounds can pair a fast round of one
        # with a slow round of the other; the rounds' paired differences
        # cannot, so they lead.
        rounds = paired[load]
        p99 = statistics.median(r["fixed_p99_minus_haproxy_us"] for r in rounds)
        ratio = statistics.median(r["per_core_ratio"] for r in rounds)
        met = sum(r["per_core_ratio"] >= 1 and r["fixed_p99_minus_haproxy_us"] <= 0 for r in rounds)
        return (f"{load} per core {ratio:.2f}x HAProxy's and added p99 {p99:+.0f} µs against HAProxy's (medians of the "
                f"rounds' pairs; both parts met in {met} of {len(rounds)} rounds)")
    lines += [
        "",
        f"Against the target (Weft's requests/s per core at least HAProxy's, its added p99 no higher): {against('HTTP/1.1')}; "
        f"{against('HTTP/2')}. Each side's medians over the rounds, for reference: per core {w1['per_core'] / hp1['per_core']:.2f}x and "
        f"{w2['per_core'] / hp2['per_core']:.2f}x, added p99 {w1['added_p99_us']:.0f} vs {hp1['added_p99_us']:.0f} µs and "
        f"{w2['added_p99_us']:.0f} vs {hp2['added_p99_us']:.0f} µs (quiet: {w1['quiet_added_p99_us']:.0f} vs "
        f"{hp1['quiet_added_p99_us']:.0f}, {w2['quiet_added_p99_us']:.0f} vs {hp2['quiet_added_p99_us']:.0f} µs). "
        f"With independent clients, quiet: HTTP/1.1 "
        f"{w1['independent']['quiet_added_p99_us']:.0f} vs {hp1['independent']['quiet_added_p99_us']:.0f} µs, HTTP/2 "
        f"{w2['independent']['quiet_added_p99_us']:.0f} vs {hp2['independent']['quiet_added_p99_us']:.0f} µs.",
    ]
    lines += paired_lines(paired)
    lines += [
        "",
        f"![L7 proxies](bench-proxy{SUFFIX}.png)",
    ]
    write_section("proxy_pinned" if PINNED else "proxy", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
