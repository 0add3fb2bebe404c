#!/usr/bin/env python3
"""Weft benchmarks, all in one lab and one run, so ratios compare like with like.

1. Datapath: the same load direct to a pod IP and through its clusterIP, in
   short rounds paired and alternated (direct/clusterIP, clusterIP/direct):
   HTTP requests on new connections (ab, no keep-alive, nginx backend) and a
   bulk TCP transfer (iperf3). The ratio is the median of per-pair ratios.
2. Scale: 10,000 Services x 10 backends written as one file; seconds from the
   file's rename to the agent reporting the new generation in force, and the
   agent's RSS with that table loaded: once with one agent alone (as on a
   node), once into the lab's two agents.
3. Reaction: with the big table loaded, a Workload is relabelled into a
   Service; delay from the file write to the first connection that reaches it.
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import revision, write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.path.join(ROOT, ".build/release/weft")
TOOL = os.path.join(ROOT, "Tests/WeftEndToEndTests/Tools/labtool.py")
ECHO = os.path.join(ROOT, "examples/demo/echo_server.py")
ROUNDS = int(os.environ.get("WEFT_BENCH_ROUNDS", "5"))
PAIRS_HTTP = int(os.environ.get("WEFT_BENCH_HTTP_PAIRS", "30"))
PAIRS_BULK = int(os.environ.get("WEFT_BENCH_BULK_PAIRS", "12"))


def sh(*args, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


def in_pod(pod, *args, check=True):
    return sh(WEFT, "lab", "exec", pod, "--", *args, check=check)


def generation(socket):
    out = sh("curl", "-s", "--unix-socket", socket, "http://agent/generation", check=False)
    if not out.strip():
        raise ValueError(f"no answer from {socket} yet")
    return int(out.split()[0])


def status(node="n1"):
    out = sh("curl", "-s", "--unix-socket", f"/run/weft/{node}/agent.sock", "http://agent/status")
    return json.loads(out)


def workload(name, node, addr, labels, command, port):
    return f"""apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: bench, labels: {labels}, annotations: {{lab.weft.dev/command: "{command}"}}}}
spec: {{node: {node}, address: {addr}, ports: [{{name: p, port: {port}}}]}}
"""


def service(name, ip, selector, port, target):
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: bench}}
spec: {{clusterIP: {ip}, selector: {selector}, ports: [{{port: {port}, targetPort: {target}}}]}}
"""


def pods_file(echo2_labels):
    nginx_conf = os.path.join(CONFIG, "nginx.conf")
    docs = [
        workload("client", "n1", "198.18.1.10", "{app: client}", "sleep infinity", 1),
        workload("web", "n2", "198.18.2.12", "{app: web}", f"nginx -c {nginx_conf} -p /tmp/weft-bench-nginx", 8080),
        workload("bulk", "n2", "198.18.2.20", "{app: bulk}", "iperf3 -s -p 5201", 5201),
        workload("echo-1", "n2", "198.18.2.30", "{app: echo}", f"python3 {ECHO} 8080", 8080),
        workload("echo-2", "n2", "198.18.2.31", echo2_labels, f"python3 {ECHO} 8080", 8080),
    ]
    return "---\n".join(docs)


def write(name, text):
    tmp = os.path.join(CONFIG, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(CONFIG, name))
    return time.time()


def prog_stats(prog_id):
    """(run_time_ns, run_cnt) the kernel accounts for a program (needs
    kernel.bpf_stats_enabled=1)."""
    info = json.loads(sh("bpftool", "prog", "show", "id", str(prog_id), "-j"))
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def ab(url, n=4000, c=8):
    out = in_pod("client", "timeout", "120", "ab", "-q", "-n", str(n), "-c", str(c), url)
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\d+)", out, re.M))
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))
    return rps, int(pct["50"]), int(pct["99"]), failed


def iperf(host):
    out = in_pod("client", "timeout", "30", "iperf3", "-c", host, "-p", "5201", "-t", "2", "-J")
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def reaction():
    """Relabels echo-2 into Service echo while a client dials it back to back;
    returns ms from the file write to the first connection reaching echo-2."""
    delays = []
    for _ in range(ROUNDS):
        write("pods.yaml", pods_file("{app: standby}"))
        time.sleep(1.0)
        box = {}
        probe = threading.Thread(target=lambda: box.update(json.loads(in_pod("client", "python3", TOOL, "probe", "198.19.0.50", "80", "2.5"))))
        probe.start()
        time.sleep(0.8)
        tw = write("pods.yaml", pods_file("{app: echo}"))
        probe.join()
        first = min((t for t, pod in box["seen"] if pod == "echo-2" and t >= tw), default=None)
        if first is not None:
            delays.append((first - tw) * 1000)
    return delays


def wait_for(cond, what, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def main():
    global CONFIG
    tmp = tempfile.mkdtemp(prefix="weft-bench-")
    CONFIG = os.path.join(tmp, "config")
    os.makedirs(CONFIG)
    os.makedirs("/tmp/weft-bench-nginx/logs", exist_ok=True)
    with open(os.path.join(CONFIG, "nginx.conf"), "w") as f:
        f.write("""daemon off; worker_processes 1; error_log /dev/null; pid /tmp/weft-bench-nginx/nginx.pid;
events { worker_connections 4096; }
http { access_log off; server { listen 8080 reuseport backlog=4096;
  location / { return 200 "ok\\n"; } } }
""")
    svcs = [service("web", "198.19.0.10", "{app: web}", 80, 8080),
            service("bulk", "198.19.0.40", "{app: bulk}", 5201, 5201),
            service("echo", "198.19.0.50", "{app: echo}", 80, 8080)]
    # The kernel-only path is what this measures: with mTLS between nodes
    # (the default, PERMISSIVE) a meshed client's cross-node connection
    # would go through both nodes' proxies (`scripts/bench mtls` measures
    # that), so the bench namespace's pods take plaintext.
    svcs.append("apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: plain, namespace: bench}\n"
                "spec: {mtls: {mode: DISABLE}}\n")
    write("services.yaml", "---\n".join(svcs))
    write("pods.yaml", pods_file("{app: standby}"))
    sh(WEFT, "lab", "down", check=False)
    results = {}
    try:
        sh(WEFT, "lab", "up", "--config", CONFIG, "--nodes", "2")
        wait_for(lambda: "ok" in in_pod("client", "curl", "-s", "-m", "1", "http://198.18.2.12:8080/", check=False), "nginx")
        wait_for(lambda: "receiver" in in_pod("client", "timeout", "10", "iperf3", "-c", "198.18.2.20", "-n", "1K", check=False), "iperf3")

        # 1. Datapath: many short paired rounds, direct then clusterIP, so
        # the machine's drift hits both sides of each pair alike; the figure
        # is the median of the per-pair ratios.
        http = {"direct": [], "clusterIP": []}
        bulk = {"direct": [], "clusterIP": []}
        # The kernel's own accounting of weft_connect4 (on n1, where the
        # client runs) splits its CPU time by path: a clusterIP connect (hit)
        # and a direct one (miss: one lookup, no rewrite).
        connect4 = next(p["programID"] for p in status()["programs"] if p["name"] == "weft_connect4")
        stats_was = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
        prog_cost = {"direct": [0, 0], "clusterIP": [0, 0]}
        sh("sysctl", "-qw", "kernel.bpf_stats_enabled=1")
        try:
            for i in range(PAIRS_HTTP):
                order = [("direct", "http://198.18.2.12:8080/"), ("clusterIP", "http://198.19.0.10/")]
                for name, url in (order if i % 2 == 0 else order[::-1]):
                    t0, c0 = prog_stats(connect4)
                    http[name].append(ab(url, n=2000))
                    t1, c1 = prog_stats(connect4)
                    prog_cost[name][0] += t1 - t0
                    prog_cost[name][1] += c1 - c0
        finally:
            sh("sysctl", "-qw", f"kernel.bpf_stats_enabled={stats_was}")
        # A/A: the same pairing with direct on both sides, to show how wide the
        # method's spread is when nothing differs.
        aa = []
        for i in range(PAIRS_HTTP):
            first, second = ab("http://198.18.2.12:8080/", n=2000)[0], ab("http://198.18.2.12:8080/", n=2000)[0]
            aa.append(second / first)
        results["http_aa_ratios"] = sorted(aa)
        results["connect4_ns"] = {k: (t / c if c else float("nan"), c) for k, (t, c) in prog_cost.items()}
        # During the clusterIP bulk rounds, count every run of every weft
        # program on the client's node: per connection, never per packet.
        prog_ids = [p["programID"] for p in status()["programs"]]
        runs_during_bulk = 0
        bytes_during_bulk = 0.0
        sh("sysctl", "-qw", "kernel.bpf_stats_enabled=1")
        try:
            for i in range(PAIRS_BULK):
                order = [("direct", "198.18.2.20"), ("clusterIP", "198.19.0.40")]
                for name, host in (order if i % 2 == 0 else order[::-1]):
                    before = sum(prog_stats(p)[1] for p in prog_ids)
                    bulk[name].append(iperf(host))
                    if name == "clusterIP":
                        runs_during_bulk += sum(prog_stats(p)[1] for p in prog_ids) - before
                        bytes_during_bulk += bulk[name][-1] * 1e9 / 8 * 2
        finally:
            sh("sysctl", "-qw", f"kernel.bpf_stats_enabled={stats_was}")
        results["bulk_program_runs"] = (runs_during_bulk, PAIRS_BULK, bytes_during_bulk)
        bulk_aa = []
        for i in range(PAIRS_BULK):
            first, second = iperf("198.18.2.20"), iperf("198.18.2.20")
            bulk_aa.append(second / first)
        results["bulk_aa_ratios"] = sorted(bulk_aa)
        results["http_pair_ratios"] = sorted(c[0] / d[0] for d, c in zip(http["direct"], http["clusterIP"]))
        results["bulk_pair_ratios"] = sorted(c / d for d, c in zip(bulk["direct"], bulk["clusterIP"]))
        results["http"] = {k: {"rps": statistics.median(r[0] for r in v),
                               "rps_range": (min(r[0] for r in v), max(r[0] for r in v)),
                               "p50": statistics.median(r[1] for r in v),
                               "p99": statistics.median(r[2] for r in v),
                               "failed": sum(r[3] for r in v)} for k, v in http.items()}
        results["bulk"] = {k: statistics.median(v) for k, v in bulk.items()}
        results["bulk_range"] = {k: (min(v), max(v)) for k, v in bulk.items()}

        # Reaction at demo size, before the big table.
        wait_for(lambda: "echo-2" in in_pod("client", "curl", "-s", "-m", "1", "http://198.18.2.31:8080/", check=False), "echo-2")
        results["reaction_small_ms"] = reaction()

        # 2. Scale: 10,000 Services x 10 backends, into the lab's agents
        # (two agents sharing this machine's cores, as the lab runs them).
        text = scale_manifests()
        before = status()["generation"]
        t0 = write("scale.yaml", text)
        wait_for(lambda: generation("/run/weft/n1/agent.sock") > before, "the 10,000-Service table", timeout=300)
        results["scale_lab_s"] = time.time() - t0

        results["reaction_ms"] = reaction()
    finally:
        sh(WEFT, "lab", "down", check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree("/tmp/weft-bench-nginx", ignore_errors=True)
    results["scale"] = scale_one_agent()
    report(results)


def scale_manifests():
    """10,000 Services x 10 backends. Services share 10,000 Workloads in 1,000
    groups of 10; each Service has its own targetPort, so every (Service,
    Workload) pair is a distinct backend: 100,000 backends, 110,000 slots."""
    docs = []
    for g in range(1000):
        for k in range(10):
            n = g * 10 + k
            docs.append(f"apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: s{n}, namespace: scale, labels: {{group: g{g}}}}}\n"
                        f"spec: {{node: n2, address: 198.18.{100 + n // 250}.{2 + n % 250}}}\n")
    for i in range(10000):
        docs.append(f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: scale}}\n"
                    f"spec: {{clusterIP: 198.19.{40 + i // 250}.{2 + i % 250}, selector: {{group: g{i % 1000}}}, ports: [{{port: 80, targetPort: {10000 + i // 1000}}}]}}\n")
    return "---\n".join(docs)


def scale_one_agent():
    """One agent alone on the machine, as on a node: its own scratch cgroup,
    pins and config dir. Measures rename -> generation in force for the
    10,000-Service file, then for a one-Service change on top of it."""
    cg2 = next(l.split()[1] for l in open("/proc/mounts") if l.split()[2] == "cgroup2")
    cgroup = os.path.join(cg2, "weft-bench-scale")
    config = tempfile.mkdtemp(prefix="weft-bench-scale-")
    os.makedirs(cgroup, exist_ok=True)
    sock = "/run/weft/bench-scale/agent.sock"
    agent = subprocess.Popen([WEFT, "agent", "--config", config, "--node", "bench-scale", "--cgroup", cgroup,
                              "--metrics-addr", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: generation(sock) >= 1, "the scale agent")
        global CONFIG
        CONFIG = config
        text = scale_manifests()
        loads = []
        for i in range(5):
            if i:
                # Empty the config again (all 10,000 Services leave), then reload.
                before = generation(sock)
                os.remove(os.path.join(config, "scale.yaml"))
                wait_for(lambda: generation(sock) > before, "the table to empty", timeout=300)
            before = generation(sock)
            t0 = write("scale.yaml", text)
            wait_for(lambda: generation(sock) > before, "the 10,000-Service table", timeout=300)
            loads.append(time.time() - t0)
            st = json.loads(sh("curl", "-s", "--unix-socket", sock, "http://agent/status"))
        rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{agent.pid}/status").read()).group(1)) / 1024
        small = []
        for i in range(ROUNDS):
            before = generation(sock)
            ts = write("small.yaml", f"apiVersion: v1\nkind: Service\nmetadata: {{name: extra, namespace: scale}}\n"
                                     f"spec: {{clusterIP: 198.19.200.1, selector: {{group: g{i + 1}}}, ports: [{{port: 80}}]}}\n")
            wait_for(lambda: generation(sock) > before, "a one-Service change")
            small.append((time.time() - ts) * 1000)
        st_small = json.loads(sh("curl", "-s", "--unix-socket", sock, "http://agent/status"))
        return {"write_to_in_force_s": statistics.median(loads), "loads_s": loads, "reconcile_s": st["lastReconcileSeconds"], "phases": st["lastReconcilePhases"],
                "map_writes": st["lastWrites"], "rss_mib": rss, "file_mib": len(text) / 2**20,
                "small_ms": small, "small_phases": st_small["lastReconcilePhases"]}
    finally:
        agent.terminate()
        agent.wait()
        sh(WEFT, "agent", "--node", "bench-scale", "--uninstall", check=False)
        os.rmdir(cgroup)
        shutil.rmtree(config, ignore_errors=True)


PHASES = ["load", "policy", "policy-write", "table", "proxy-table", "proxy", "plan", "write", "proxy-confirm", "status"]


def report(r):
    h, b, s = r["http"], r["bulk"], r["scale"]
    d = r["reaction_ms"]
    ds = r["reaction_small_ms"]
    hr, br = r["http_pair_ratios"], r["bulk_pair_ratios"]
    cn = r["connect4_ns"]

    def quart(v):
        q = statistics.quantiles(v, n=4)
        return f"**{statistics.median(v):.3f}** [{q[0]:.3f}, {q[2]:.3f}]"

    lines = [
        "## Service load balancing: clusterIP vs direct (issue #2)",
        "",
        f"Made by `scripts/bench datapath` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel {os.uname().release}), "
        f"release build at {revision()}; rounds alternate and are paired as described per table. The machine is a shared VM: read the ratios, not the absolute numbers.",
        "",
        "Client pod on node n1, one backend pod on node n2 (cross-node, routed through the lab fabric; the bench namespace "
        "is under PeerAuthentication DISABLE, so the connection goes straight across, not through the mTLS tunnel, "
        "which `scripts/bench mtls` measures). "
        "The clusterIP path pays one map lookup at `connect()` and nothing per packet.",
        "",
        "| load | direct to pod IP (median) | through clusterIP (median) | clusterIP / direct: median of paired rounds [quartiles] |",
        "|---|---|---|---|",
        f"| HTTP, new connection per request (ab -n 2000 -c 8, nginx), {len(hr)} pairs: req/s | {h['direct']['rps']:.0f} | {h['clusterIP']['rps']:.0f} | {quart(hr)} |",
        f"| same: p50 / p99 latency (ms) | {h['direct']['p50']:.0f} / {h['direct']['p99']:.0f} | {h['clusterIP']['p50']:.0f} / {h['clusterIP']['p99']:.0f} | |",
        f"| bulk TCP (iperf3, 2 s), {len(br)} pairs: Gbit/s | {b['direct']:.2f} | {b['clusterIP']:.2f} | {quart(br)} |",
        f"| A/A check: HTTP direct vs direct, same pairing, {len(r['http_aa_ratios'])} pairs | | | {quart(r['http_aa_ratios'])} |",
        f"| A/A check: bulk direct vs direct, same pairing, {len(r['bulk_aa_ratios'])} pairs | | | {quart(r['bulk_aa_ratios'])} |",
        "",
        f"Kernel cost, measured by the kernel (`kernel.bpf_stats_enabled`, run_time_ns / run_cnt of weft_connect4 on the "
        f"client's node over those rounds): **{cn['clusterIP'][0]:.0f} ns per clusterIP connect** (translate, socket "
        f"storage) and {cn['direct'][0]:.0f} ns per direct connect (the Service lookup misses; the policy and tunnel "
        f"checks every connect gets), over {cn['clusterIP'][1]:,} and "
        f"{cn['direct'][1]:,} connects. At the direct rate of {h['direct']['rps']:.0f} req/s on {os.cpu_count()} cores a request "
        f"takes ~{os.cpu_count() * 1e9 / h['direct']['rps'] / 1000:.0f} us of CPU, so the clusterIP path adds "
        f"**{(cn['clusterIP'][0] - cn['direct'][0]) / (os.cpu_count() * 1e9 / h['direct']['rps']) * 100:.2f}%** of it, and nothing per packet "
        f"(during the {r['bulk_program_runs'][1]} clusterIP bulk rounds, about {r['bulk_program_runs'][2] / 1e9:.0f} GB in all, the "
        f"weft programs ran {r['bulk_program_runs'][0]} times in total: at connect and getpeername, never per packet). Compare the end-to-end ratios with the A/A row: on this VM the "
        "method's own spread is several percent, wider than the 2% target, so the kernel's accounting is the precise figure.",
        "",
        f"Failed requests: direct {h['direct']['failed']}, clusterIP {h['clusterIP']['failed']}. Target: clusterIP within 2% of direct. "
        f"Round-to-round spread on this VM, for scale: HTTP direct {h['direct']['rps_range'][0]:.0f}-{h['direct']['rps_range'][1]:.0f}, "
        f"clusterIP {h['clusterIP']['rps_range'][0]:.0f}-{h['clusterIP']['rps_range'][1]:.0f} req/s; bulk direct "
        f"{r['bulk_range']['direct'][0]:.2f}-{r['bulk_range']['direct'][1]:.2f}, clusterIP {r['bulk_range']['clusterIP'][0]:.2f}-{r['bulk_range']['clusterIP'][1]:.2f} Gbit/s.",
        "",
        "## Config to kernel",
        "",
        "One agent alone on the machine (as on a node): its own cgroup, pins and config directory. "
        f"The file: 10,000 Services x 10 backends ({s['map_writes']:,} map writes, {s['file_mib']:.1f} MiB of YAML, "
        "20,000 documents; Services share 10,000 Workloads, each with its own targetPort).",
        "",
        "| measurement | result | target |",
        "|---|---|---|",
        f"| 10,000-Service file: rename to generation in force (median of {len(s['loads_s'])}: " + ", ".join(f"{x:.2f}" for x in s['loads_s']) + f") | {s['write_to_in_force_s']:.2f} s | < 1 s |",
        f"| of which the agent's reconcile (last load) | {s['reconcile_s']:.2f} s | |",
        f"| agent RSS with that table loaded | {s['rss_mib']:.0f} MiB | |",
        f"| one-Service change on top of it: rename to generation in force (median of {len(s['small_ms'])}) | {statistics.median(s['small_ms']):.0f} ms | < 100 ms |",
        "",
        "Reconcile phases, from the agent's own timings (`weft status`, /status):",
        "",
        "| phase (ms) | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
        "| 10,000-Service file | " + " | ".join(f"{s['phases'].get(p, 0):.0f}" for p in PHASES) + " |",
        "| one-Service change | " + " | ".join(f"{s['small_phases'].get(p, 0):.1f}" for p in PHASES) + " |",
        "",
        "load = read, parse (files over 256 KiB are split at document markers and parsed on every core) and validate "
        "the whole set; policy = NetworkPolicy compiled to map entries, and policy-write their writes; table = selectors "
        "to backends; plan = map diff, only for frontends whose backends changed (a full plan at start); write = batched "
        "map updates; proxy-table = the node proxy's route table built; proxy = compared with the one the proxy has and "
        "handed over, until the proxy confirms its generation (a change that leaves the table as it was, as a "
        "one-Service L4 change does, hands over only the generation, ProxyTable.generationFileName, and the proxy "
        "moves the snapshot it has to it without compiling anything again; that one is confirmed after the map "
        "writes: proxy-confirm).",
        "",
        "In the lab (both nodes' agents on this 2-core machine, plus the probing client and the servers):",
        "",
        "| measurement | result | target |",
        "|---|---|---|",
        f"| 10,000-Service file: rename to generation in force on n1 | {r['scale_lab_s']:.2f} s | |",
        f"| a Workload relabelled into a Service, table loaded: file write to the first connection reaching it (median of {len(d)}) | {statistics.median(d) if d else float('nan'):.0f} ms (min {min(d) if d else 0:.0f}, max {max(d) if d else 0:.0f}) | < 100 ms |",
        f"| the same relabel at demo size (5 Workloads, 3 Services) (median of {len(ds)}) | {statistics.median(ds) if ds else float('nan'):.0f} ms (min {min(ds) if ds else 0:.0f}, max {max(ds) if ds else 0:.0f}) | < 100 ms |",
        "",
    ]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    write_section("datapath", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("interrupted"))
    main()
