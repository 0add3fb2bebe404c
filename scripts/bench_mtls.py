#!/usr/bin/env python3
"""Cross-node mTLS: Weft's tunnels against no mesh and against HAProxy doing
the same TLS between the nodes, side by side in one lab and one run (issue #5).

Lab: two nodes with the lab's mesh CA. A client pod on n1. On n2, two nginx
pods answering `200 ok` (and serving one 64 MiB file): `plain` under
PeerAuthentication DISABLE, `meshed` under the default (PERMISSIVE: every
mesh client reaches it through a tunnel). Four ways from client to an n2
backend:
  direct   plain's address: plaintext across the fabric, no proxy at all
  l4       meshed's address: connect4 sends it to n1's proxy, which carries it
           in an HTTP/2 CONNECT stream of the mTLS tunnel to n2's proxy
  l7       a Service (appProtocol http) over meshed: n1's proxy does the HTTP
           work, then the same tunnel
  haproxy  HAProxy on n1 (TCP mode) originating mutual TLS 1.3 with ECDSA
           P-256 certificates to HAProxy on n2, which terminates it and
           connects to plain: the same shape as the tunnel, done by HAProxy
Measured:
  latency     h2load, HTTP/1.1 keep-alive, RATE requests/s over 10 fixed
              connections, rounds rotating the sides; p50/p99 minus direct's.
              Two shapes of the same load: one h2load whose 10 connections
              send in step (bursts of 10 every 10 ms), and 10 h2loads of one
              connection each (independent clients). Each run is watched for
              host slowdowns (scripts/hostwatch.py); the requests in flight
              during one are left out of the *quiet* figures, on every side
              alike, and a round disturbed for more than DISTURBED of a run
              is run again (bench_proxy.until_calm)
  bulk        the 64 MiB file, over and over for BULK_S seconds: MB/s, and MB/s
              per core of the two tunnel ends (bytes over the CPU seconds of
              both proxies, times two: each byte is encrypted by one end and
              decrypted by the other), as a ratio to `openssl speed` AES-128-GCM
              on one core (the mean of encrypt and decrypt; the highest of a
              run before the rounds and one after each round's bulk runs)
  handshakes  full TLS 1.3 handshakes with a client certificate (no
              resumption) against n2's tunnel port and against n2's HAProxy,
              from two client processes on n1: handshakes per CPU second of
              the server
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchdoc import NodeProcesses, revision, sh, write_section  # noqa: E402
from bench_proxy import DISTURBED, RETRIES, added_over, cpu_seconds, h2load_watched, pids_of, until_calm  # noqa: E402

WEFT = os.path.join(ROOT, ".build/release/weft")
ROUNDS = int(os.environ.get("WEFT_BENCH_MTLS_ROUNDS", "3"))
FIXED_S = int(os.environ.get("WEFT_BENCH_MTLS_SECONDS", "8"))
BULK_S = int(os.environ.get("WEFT_BENCH_MTLS_BULK_SECONDS", "6"))
HANDSHAKE_S = int(os.environ.get("WEFT_BENCH_MTLS_HANDSHAKE_SECONDS", "5"))
RATE = int(os.environ.get("WEFT_BENCH_MTLS_RATE", "1000"))
# For iterating on one part: latency, bulk or handshakes (the report needs all three).
ONLY = os.environ.get("WEFT_BENCH_MTLS_ONLY")
# name: (h2load processes, connections each): the same 10 connections, in step or independent.
SHAPES = {"in step": (1, 10), "independent": (10, 1)}
CLIENT, PLAIN, MESHED, VIP = "198.18.1.10", "198.18.2.20", "198.18.2.21", "198.19.9.21"
N1_GW, N2_FABRIC = "198.18.1.1", "198.18.0.2"
BIG = "big.bin"
TARGETS = {
    "direct": f"http://{PLAIN}:8080/",
    "l4": f"http://{MESHED}:8080/",
    "l7": f"http://{VIP}/",
    "haproxy": f"http://{N1_GW}:17001/",
}
TRUST = "cluster.local"

BACKEND_CONF = """worker_processes 1;
pid {dir}/{name}.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  server {{
    listen 8080;
    root {dir}/www;
    location = / {{ return 200 "ok\\n"; }}
  }}
}}
"""

HAPROXY_COMMON = """global
  nbthread 2
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
"""

HAPROXY_N1 = HAPROXY_COMMON + """frontend fe
  bind {gw}:17001
  default_backend be
backend be
  server n2 {n2}:17443 ssl verify required ca-file {dir}/ca.pem crt {dir}/client.pem ssl-min-ver TLSv1.3 sni str(n2.bench)
"""

HAPROXY_N2 = HAPROXY_COMMON + """frontend fe
  bind {n2}:17443 ssl crt {dir}/server.pem ca-file {dir}/ca.pem verify required ssl-min-ver TLSv1.3
  default_backend be
backend be
  server plain {plain}:8080
"""

# Full handshakes in a loop: new context state each time (no session reuse).
HANDSHAKER = r"""
import hashlib, socket, ssl, sys, time
host, port, cert, key, ca, sni, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], float(sys.argv[7])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])
n = failed = 0
end = time.time() + seconds
while time.time() < end:
    try:
        with socket.create_connection((host, port), timeout=3) as raw:
            with ctx.wrap_socket(raw, server_hostname=sni) as s:
                n += 1
    except (OSError, ssl.SSLError):
        failed += 1
print(n, failed)
"""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def openssl_speed():
    """AES-128-GCM on one core, 16 KiB blocks (a full TLS record): MB/s encrypt and decrypt."""
    out = {}
    for mode, extra in (("encrypt", []), ("decrypt", ["-decrypt"])):
        text = sh("openssl", "speed", "-seconds", "3", "-bytes", "16384", *extra, "-evp", "aes-128-gcm")
        line = [l for l in text.splitlines() if l.lower().startswith("aes-128-gcm")][-1]
        out[mode] = float(line.split()[-1].rstrip("k")) * 1000 / 1e6
    return out


def sni(uri):
    import hashlib
    return hashlib.sha256(uri.encode()).hexdigest()[:24] + ".id.weft"


def prepare(work):
    """Writes the lab's files into `work` (nginx and HAProxy configurations,
    certificates, the 64 MiB file) and its config directory; returns that."""
    os.mkdir(f"{work}/www")
    sh("dd", "if=/dev/urandom", f"of={work}/www/{BIG}", "bs=1M", "count=64", "status=none")
    os.chmod(f"{work}/www/{BIG}", 0o644)
    for name in ("plain", "meshed"):
        write(f"{work}/{name}.conf", BACKEND_CONF.format(dir=work, name=name))
    # HAProxy's certificates: the same kind as the mesh's (ECDSA P-256), from a CA of their own.
    ossl = ["openssl"]
    sh(*ossl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
       "-subj", "/CN=bench-ca", "-keyout", f"{work}/ca.key", "-out", f"{work}/ca.pem")
    # HAProxy checks the server's name against the SNI it sends (n2.bench).
    for who, cn in (("server", "n2.bench"), ("client", "client")):
        sh(*ossl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={cn}",
           "-keyout", f"{work}/{who}.key", "-out", f"{work}/{who}.csr")
        sh(*ossl, "x509", "-req", "-in", f"{work}/{who}.csr", "-CA", f"{work}/ca.pem", "-CAkey", f"{work}/ca.key",
           "-CAcreateserial", "-days", "1", "-out", f"{work}/{who}.crt")
        write(f"{work}/{who}.pem", open(f"{work}/{who}.crt").read() + open(f"{work}/{who}.key").read())
    write(f"{work}/haproxy-n1.cfg", HAPROXY_N1.format(gw=N1_GW, n2=N2_FABRIC, dir=work))
    write(f"{work}/haproxy-n2.cfg", HAPROXY_N2.format(n2=N2_FABRIC, plain=PLAIN, dir=work))
    config = f"{work}/config"
    os.mkdir(config)

    def backend(name, address):
        return f"""apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: bench, labels: {{app: {name}}}, annotations: {{lab.weft.dev/command: "nginx -p {work} -c {work}/{name}.conf -g 'daemon off;'"}}}}
spec: {{node: n2, address: {address}, ports: [{{name: http, port: 8080}}]}}
"""
    write(f"{config}/lab.yaml", f"""apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {{name: client, namespace: bench, labels: {{app: client}}, annotations: {{lab.weft.dev/command: "sleep infinity"}}}}
spec: {{node: n1, address: {CLIENT}}}
---
{backend("plain", PLAIN)}---
{backend("meshed", MESHED)}---
apiVersion: v1
kind: Service
metadata: {{name: meshed, namespace: bench}}
spec:
  clusterIP: {VIP}
  selector: {{app: meshed}}
  ports: [{{name: http, port: 80, targetPort: http, appProtocol: http}}]
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {{name: plain, namespace: bench}}
spec: {{selector: {{matchLabels: {{app: plain}}}}, mtls: {{mode: DISABLE}}}}
""")
    return config


def main():
    work = tempfile.mkdtemp(prefix="weft-bench-mtls-")
    os.chmod(work, 0o755)
    config = prepare(work)
    speed = dict(openssl_speed(), runs=1)
    print(f"openssl speed AES-128-GCM, one core: {speed['encrypt']:.0f} MB/s encrypt, {speed['decrypt']:.0f} MB/s decrypt", flush=True)
    sh(WEFT, "lab", "down", check=False)
    sh(WEFT, "lab", "up", "--config", config, "--nodes", "2")
    processes = NodeProcesses(WEFT)
    try:
        lab = json.load(open("/run/weft/lab/state.json"))
        nodes = {n["name"]: n for n in lab["nodes"]}

        def on_node(node, *cmd):
            return processes.start(nodes[node], *cmd)

        pids = {
            "haproxy": [on_node("n1", "haproxy", "-f", f"{work}/haproxy-n1.cfg", "-db"),
                        on_node("n2", "haproxy", "-f", f"{work}/haproxy-n2.cfg", "-db")],
            "weft": [int(open(f"/run/weft/{n}/proxy.pid").read()) for n in ("n1", "n2")],
        }
        for _ in range(150):
            codes = {name: sh(WEFT, "lab", "exec", "bench/client", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "-m", "1", url, check=False) for name, url in TARGETS.items()}
            if all(c == "200" for c in codes.values()):
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"some side never answered 200: {codes}")

        def side_procs(name):
            """The processes whose CPU a side costs: both tunnel ends, or both HAProxies."""
            roots = pids["weft"] if name in ("l4", "l7") else pids.get(name, [])
            return [p for root in roots for p in pids_of(root)]

        latency = {shape: {name: [] for name in TARGETS} for shape in SHAPES}
        repeated = kept_disturbed = 0
        bulk = {name: [] for name in TARGETS if name != "l7"}
        names = list(TARGETS)
        for k in range(ROUNDS):
            order = names[k % len(names):] + names[:k % len(names)]
            def one_round():
                got = {shape: {} for shape in SHAPES}
                for shape, (processes, conns) in SHAPES.items():
                    for name in order:
                        r = h2load_watched(TARGETS[name], None, FIXED_S, RATE, shape=(["--h1"], conns, 1), processes=processes)
                        got[shape][name] = r
                        print(f"round {k + 1} {shape} {name}: {r['rate']:.0f} req/s p50 {r['p50_us']} us p99 {r['p99_us']} us; "
                              f"quiet p50 {r['quiet']['p50_us']} p99 {r['quiet']['p99_us']} ({r['left_out']:.1%} left out, host "
                              f"slow {r['host_slow']:.1%} of the time); failed {r['failed']}", flush=True)
                return got, [r for sides in got.values() for r in sides.values()]
            if ONLY in (None, "latency"):
                got, again, still = until_calm(one_round, f"round {k + 1}")
                repeated += again
                kept_disturbed += still
                for shape, sides in got.items():
                    for name, r in sides.items():
                        latency[shape][name].append(r)
            for name in order if ONLY in (None, "bulk") else []:
                if name == "l7":
                    continue
                ps = side_procs(name)
                c0 = cpu_seconds(ps)
                script = (f"end=$(( $(date +%s) + {BULK_S} )); n=0; while [ $(date +%s) -lt $end ]; do "
                          f"curl -s -o /dev/null -w '%{{size_download}}\\n' {TARGETS[name]}{BIG}; done")
                t0 = time.time()
                out = sh(WEFT, "lab", "exec", "bench/client", "--", "sh", "-c", script)
                elapsed = time.time() - t0
                cpu = cpu_seconds(ps) - c0
                total = sum(int(x) for x in out.split() if x.isdigit())
                entry = {"bytes": total, "seconds": elapsed, "mb_s": total / elapsed / 1e6, "cpu_s": cpu,
                         "per_core_end": (2 * total / cpu / 1e6) if cpu > 0 and ps else float("nan")}
                bulk[name].append(entry)
                print(f"round {k + 1} bulk {name}: {entry['mb_s']:.0f} MB/s, {entry['per_core_end']:.0f} MB/s per core per end", flush=True)
            if ONLY in (None, "bulk"):
                # The ceiling is the best the machine did: measured again each
                # round, beside the bulk runs, so one slow moment cannot lower it.
                again = openssl_speed()
                speed = {mode: max(speed[mode], again[mode]) for mode in again} | {"runs": speed["runs"] + 1}

        # Handshakes: the mesh's certificate for a client identity (n1's
        # intermediate issues it), asking n2's proxy for meshed's identity.
        sh(WEFT, "ca", "issue", "--ca", "/run/weft/lab/ca/n1", "--id", f"spiffe://{TRUST}/ns/bench/sa/client",
           "--out", f"{work}/mesh-client")
        mesh_ca = "/run/weft/lab/ca/root/root.crt"
        handshakes = {}
        hs_targets = {
            "weft": (N2_FABRIC, 15008, f"{work}/mesh-client.crt", f"{work}/mesh-client.key", mesh_ca,
                     sni(f"spiffe://{TRUST}/ns/bench/sa/default"), [pids["weft"][1]]),
            "haproxy": (N2_FABRIC, 17443, f"{work}/client.crt", f"{work}/client.key", f"{work}/ca.pem", "n2.bench",
                        pids_of(pids["haproxy"][1])),
        }
        for name, (host, port, cert, key, ca, server_name, server) in hs_targets.items() if ONLY in (None, "handshakes") else []:
            c0 = cpu_seconds(server)
            procs_ = [subprocess.Popen(["ip", "netns", "exec", nodes["n1"]["netns"], "/usr/bin/python3", "-c", HANDSHAKER, host, str(port),
                                        cert, key, ca, server_name, str(HANDSHAKE_S)], stdout=subprocess.PIPE, text=True)
                      for _ in range(2)]
            counts = [tuple(int(x) for x in p.communicate()[0].split()) for p in procs_]
            cpu = cpu_seconds(server) - c0
            done, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
            handshakes[name] = {"handshakes": done, "failed": failed, "per_s": done / HANDSHAKE_S, "server_cpu_s": cpu,
                                "per_core": done / cpu if cpu > 0 else float("nan")}
            print(f"handshakes {name}: {done} in {HANDSHAKE_S}s ({failed} failed), {handshakes[name]['per_core']:.0f} per server core", flush=True)
    finally:
        processes.stop()
        sh(WEFT, "lab", "down", check=False)
        subprocess.run(["rm", "-rf", work])

    if ONLY:
        return
    summary = {"openssl": speed, "latency": {}, "bulk": {}, "handshakes": handshakes, "repeated": repeated,
               "kept_disturbed": kept_disturbed}
    for shape, sides in latency.items():
        summary["latency"][shape] = {}
        for name, runs in sides.items():
            s = {k: statistics.median(r[k] for r in runs) for k in ("p50_us", "p99_us", "rate", "left_out", "host_slow")}
            s["quiet_p50_us"] = statistics.median(r["quiet"]["p50_us"] for r in runs)
            s["quiet_p99_us"] = statistics.median(r["quiet"]["p99_us"] for r in runs)
            s["failed"] = sum(r["failed"] for r in runs)
            if name != "direct":
                s.update(added_over(runs, sides["direct"]))
            summary["latency"][shape][name] = s
    ceiling = (speed["encrypt"] + speed["decrypt"]) / 2
    for name, runs in bulk.items():
        s = {"mb_s": statistics.median(r["mb_s"] for r in runs)}
        if name != "direct":
            s["per_core_end"] = statistics.median(r["per_core_end"] for r in runs)
            s["vs_openssl"] = s["per_core_end"] / ceiling
        summary["bulk"][name] = s
    with open(os.path.join(ROOT, "docs/bench-mtls.json"), "w") as f:
        json.dump({"summary": summary, "latency_rounds": latency, "bulk_rounds": bulk}, f, indent=1)
    report(summary)


def report(summary):
    lat, bulk, hs, speed = summary["latency"], summary["bulk"], summary["handshakes"], summary["openssl"]
    ceiling = (speed["encrypt"] + speed["decrypt"]) / 2
    h2 = sh("h2load", "--version").split("\n")[0]
    lines = [
        "## mTLS between nodes: Weft's tunnel vs no mesh vs HAProxy TLS (issue #5)",
        "",
        f"Made by `scripts/bench mtls` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel {os.uname().release}), "
        f"release build at {revision()}, a 2-node lab with the mesh CA; {ROUNDS} rounds rotating the order of the sides, medians. Client pod on "
        "n1, nginx pods on n2. *direct*: plaintext to a DISABLE pod, no proxy. *l4*: the pod's own address, carried by the "
        "tunnel (n1's proxy -> HTTP/2 CONNECT over mutual TLS 1.3 -> n2's proxy). *l7*: a Service with appProtocol http over "
        "the same pod, so n1's proxy also does the HTTP work. *haproxy*: HAProxy 2.6 in TCP mode on each node, n1's "
        "originating mutual TLS 1.3 (ECDSA P-256, as the mesh's certificates) to n2's, which terminates it. Both proxies "
        "have 2 threads; all sides share the VM's cores with the load generator and the backends.",
        "",
        f"Latency: {h2}, HTTP/1.1, {RATE} requests/s over 10 keep-alive connections, {FIXED_S} s per side, shape and "
        "round; *added* = side minus direct, per round. Two shapes of that load: *in step*, one h2load whose 10 connections "
        "send together (a burst of 10 requests every 10 ms), and *independent*, 10 h2loads of one connection each, whose "
        "timers fall where they start.",
        "",
        "At this rate the host's slowdowns (top of this page) alone make the p99 of every side. `scripts/hostwatch.py` "
        "finds them while each side runs; the *quiet* columns leave out the requests in flight during one, on every side "
        "alike. *host slow* is the share of "
        "the run inside such windows, *left out* the share of requests. A round in which the host was slow for more than "
        f"{DISTURBED:.0%} of one run is run again, at most {RETRIES} times (this time: {summary['repeated']} repeats, and "
        f"{summary['kept_disturbed']} of {ROUNDS} rounds kept still over it).",
        "",
        "| shape | side | p50 | p99 | added p50 | added p99 | quiet p99 | quiet added p50 | quiet added p99 | host slow | left out | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    us = "{:.0f} µs".format
    for shape, sides in lat.items():
        for name in ("direct", "l4", "l7", "haproxy"):
            s = sides[name]
            added = ["–"] * 4 if name == "direct" else [us(s[k]) for k in ("added_p50_us", "added_p99_us", "quiet_added_p50_us", "quiet_added_p99_us")]
            lines.append(f"| {shape} | {name} | {us(s['p50_us'])} | {us(s['p99_us'])} | {added[0]} | {added[1]} | "
                         f"{us(s['quiet_p99_us'])} | {added[2]} | {added[3]} | {s['host_slow']:.1%} | {s['left_out']:.1%} | {s['failed']} |")
    lines += [
        "",
        f"Bulk: a 64 MiB file fetched over and over with curl for {BULK_S} s. *per core per end* = 2 x bytes / CPU seconds "
        "of both proxies (each byte is encrypted by one end and decrypted by the other); the ceiling is `openssl speed "
        f"-evp aes-128-gcm -bytes 16384` on one core, the highest of {speed['runs']} runs (one before the rounds, one after each "
        f"round's bulk runs): {speed['encrypt']:.0f} MB/s encrypt, {speed['decrypt']:.0f} MB/s "
        f"decrypt, {ceiling:.0f} MB/s mean.",
        "",
        "| side | MB/s | MB/s per core per end | vs openssl |",
        "|---|---|---|---|",
    ]
    for name in ("direct", "l4", "haproxy"):
        s = bulk[name]
        if name == "direct":
            lines.append(f"| direct | {s['mb_s']:.0f} | – | – |")
        else:
            lines.append(f"| {name} | {s['mb_s']:.0f} | {s['per_core_end']:.0f} | {s['vs_openssl']:.0%} |")
    lines += [
        "",
        f"Handshakes: full TLS 1.3 handshakes with a client certificate and no resumption, from two Python clients on n1 for "
        f"{HANDSHAKE_S} s; *per core* = handshakes / CPU seconds of the server (n2's proxy, or n2's HAProxy).",
        "",
        "| server | handshakes/s | per server core | failed |",
        "|---|---|---|---|",
    ]
    for name in ("weft", "haproxy"):
        s = hs[name]
        lines.append(f"| {name} | {s['per_s']:.0f} | {s['per_core']:.0f} | {s['failed']} |")
    step, ind = lat["in step"], lat["independent"]
    ms = "{:.2f} ms".format
    lines += [
        "",
        f"Against the targets: at {RATE} req/s the L4 tunnel adds {ms(step['l4']['added_p99_us'] / 1000)} p99 in step and "
        f"{ms(ind['l4']['added_p99_us'] / 1000)} independent, all requests counted; {ms(step['l4']['quiet_added_p99_us'] / 1000)} "
        f"and {ms(ind['l4']['quiet_added_p99_us'] / 1000)} outside host slowdowns (target at most 0.2 ms; HAProxy's TLS adds "
        f"{ms(step['haproxy']['added_p99_us'] / 1000)} / {ms(ind['haproxy']['added_p99_us'] / 1000)}, and "
        f"{ms(step['haproxy']['quiet_added_p99_us'] / 1000)} / {ms(ind['haproxy']['quiet_added_p99_us'] / 1000)} quiet). "
        f"It moves {bulk['l4']['vs_openssl']:.0%} "
        f"of the openssl ceiling per core per end (target at least 80%; HAProxy {bulk['haproxy']['vs_openssl']:.0%}). "
        f"Handshakes per core: Weft {hs['weft']['per_core']:.0f}, HAProxy {hs['haproxy']['per_core']:.0f} "
        f"({hs['weft']['per_core'] / hs['haproxy']['per_core']:.2f}x).",
    ]
    write_section("mtls", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
