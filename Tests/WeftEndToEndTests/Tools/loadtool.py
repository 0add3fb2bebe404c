#!/usr/bin/env python3
"""Clients for the resilience tests (TrafficPolicy), run inside a lab pod.
Each prints one JSON line of what it saw; the Swift test judges it.

  spread URL N CONC [--header NAME:VALUE] [--keys K --key-header NAME]
      N GETs over CONC keep-alive connections. Counts answers by pod (X-Pod)
      and by status. With --keys, request i carries key "user-(i mod K)" in
      the header and the answer maps each key to the pods that served it.
  burst URL CONC
      CONC GETs at once, each on its own connection, released together.
  rate URL SECONDS CONC
      GETs as fast as CONC keep-alive connections go, for SECONDS: counts by
      status, and the Retry-After values of 429s.
  timed URL N CONC
      N GETs; counts by status and how many took at least 90% of --slow MS.
  cookie URL N COOKIE
      One client that keeps cookies: the first answer's Set-Cookie, and the
      pods that served the N requests.
  watch-tcp HOST PORT SECONDS POD
      New TCP connections (one GET each) for SECONDS: when each one failed,
      and when POD last answered (unix seconds).
  watch-http URL SECONDS POD
      The same through HTTP keep-alive (errors are statuses >= 500).
"""
import http.client
import json
import socket
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlparse


def target(url):
    u = urlparse(url)
    return u.hostname, u.port or 80, (u.path or "/") + ("?" + u.query if u.query else "")


def get(conn, path, headers=None):
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    r.read()
    return r.status, r.getheader("x-pod") or "-", r


class Session:
    """A keep-alive connection that reconnects after a failure; a failed
    request reads as status 0."""

    def __init__(self, host, port, timeout=10):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def get(self, path, headers=None):
        try:
            return get(self.conn, path, headers)
        except Exception:
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            return 0, "-", None


def in_threads(conc, work):
    threads = [threading.Thread(target=work) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def numbered(n):
    """Hands out 0..n-1 to worker threads; None when done."""
    lock = threading.Lock()
    it = iter(range(n))

    def take():
        with lock:
            return next(it, None)
    return take


def spread(url, n, conc, header=None, keys=0, key_header=None):
    host, port, path = target(url)
    pods, codes, owners = Counter(), Counter(), {}
    lock = threading.Lock()
    take = numbered(n)

    def worker():
        session = Session(host, port)
        while (i := take()) is not None:
            h = {}
            if header:
                k, v = header.split(":", 1)
                h[k] = v
            key = None
            if keys:
                key = "user-%d" % (i % keys)
                h[key_header] = key
            status, pod, _ = session.get(path, h)
            with lock:
                codes[status] += 1
                if status == 200:
                    pods[pod] += 1
                    if key is not None:
                        owners.setdefault(key, set()).add(pod)

    in_threads(conc, worker)
    out = {"pods": pods, "codes": {str(k): v for k, v in codes.items()}}
    if keys:
        out["owners"] = {k: sorted(v) for k, v in owners.items()}
    return out


def burst(url, conc):
    host, port, path = target(url)
    codes = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(conc)

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.connect()
        barrier.wait()
        try:
            status, _, _ = get(conn, path)
        except Exception:
            status = 0
        with lock:
            codes[status] += 1
        conn.close()

    in_threads(conc, worker)
    return {"codes": {str(k): v for k, v in codes.items()}}


def rate(url, seconds, conc):
    host, port, path = target(url)
    codes, retry_after = Counter(), Counter()
    lock = threading.Lock()
    start = time.monotonic()
    end = start + seconds

    def worker():
        session = Session(host, port)
        while time.monotonic() < end:
            status, _, r = session.get(path)
            with lock:
                codes[status] += 1
                if status == 429:
                    retry_after[r.getheader("retry-after") or "missing"] += 1

    in_threads(conc, worker)
    return {"codes": {str(k): v for k, v in codes.items()}, "retry_after": retry_after,
            "seconds": time.monotonic() - start}


def timed(url, n, conc, slow_ms):
    host, port, path = target(url)
    codes = Counter()
    slow = [0]
    lock = threading.Lock()
    take = numbered(n)

    def worker():
        session = Session(host, port)
        while take() is not None:
            t0 = time.monotonic()
            status, _, _ = session.get(path)
            took = (time.monotonic() - t0) * 1000
            with lock:
                codes[status] += 1
                if status == 200 and took >= 0.9 * slow_ms:
                    slow[0] += 1

    in_threads(conc, worker)
    return {"codes": {str(k): v for k, v in codes.items()}, "slow": slow[0]}


def cookie(url, n, name):
    host, port, path = target(url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    pods = Counter()
    jar, set_cookie = None, None
    for _ in range(n):
        status, pod, r = get(conn, path, {"cookie": jar} if jar else {})
        sc = r.getheader("set-cookie")
        if sc and jar is None:
            set_cookie = sc
            jar = sc.split(";", 1)[0]
        pods[pod] += 1
    return {"set_cookie": set_cookie, "pods": pods}


def watch_tcp(host, port, seconds, pod):
    # "empty": connections closed with no answer (a proxy in between that
    # could not reach the backend), apart from refused ones ("failures").
    failures, empty, last_seen, pods = [], [], 0.0, Counter()
    end = time.time() + seconds
    while time.time() < end:
        now = time.time()
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            who = "-"
            for line in data.split(b"\r\n"):
                if line.lower().startswith(b"x-pod:"):
                    who = line.split(b":", 1)[1].strip().decode()
            pods[who] += 1
            if who == pod:
                last_seen = now
            if not data:
                empty.append(now)
        except OSError:
            failures.append(now)
        time.sleep(0.01)
    return {"failures": failures, "empty": empty, "last_seen": last_seen, "pods": pods}


def watch_http(url, seconds, pod):
    host, port, path = target(url)
    session = Session(host, port, timeout=5)
    errors, last_seen, pods, codes = [], 0.0, Counter(), Counter()
    end = time.time() + seconds
    while time.time() < end:
        now = time.time()
        status, who, _ = session.get(path)
        codes[status] += 1
        if status >= 500 or status == 0:
            errors.append(now)
        else:
            pods[who] += 1
            if who == pod:
                last_seen = now
        time.sleep(0.01)
    return {"errors": errors, "last_seen": last_seen, "pods": pods, "codes": {str(k): v for k, v in codes.items()}}


def main(argv):
    cmd = argv[1]
    if cmd == "spread":
        header = argv[argv.index("--header") + 1] if "--header" in argv else None
        keys = int(argv[argv.index("--keys") + 1]) if "--keys" in argv else 0
        key_header = argv[argv.index("--key-header") + 1] if "--key-header" in argv else None
        out = spread(argv[2], int(argv[3]), int(argv[4]), header, keys, key_header)
    elif cmd == "burst":
        out = burst(argv[2], int(argv[3]))
    elif cmd == "rate":
        out = rate(argv[2], float(argv[3]), int(argv[4]))
    elif cmd == "timed":
        out = timed(argv[2], int(argv[3]), int(argv[4]), float(argv[argv.index("--slow") + 1]))
    elif cmd == "cookie":
        out = cookie(argv[2], int(argv[3]), argv[4])
    elif cmd == "watch-tcp":
        out = watch_tcp(argv[2], int(argv[3]), float(argv[4]), argv[5])
    elif cmd == "watch-http":
        out = watch_http(argv[2], float(argv[3]), argv[4])
    else:
        raise SystemExit(__doc__)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
