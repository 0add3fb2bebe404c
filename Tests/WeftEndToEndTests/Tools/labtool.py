#!/usr/bin/env python3
"""Clients and servers the end-to-end tests run inside lab pods. Each client
prints one JSON line with what it observed; the Swift test decides."""
import errno
import json
import os
import re
import select
import socket
import sys
import threading
import time


def http_get(host, port, timeout=2.0):
    """One request on a new connection; returns the X-Pod of the answer."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"x-pod:"):
            return line.split(b":", 1)[1].strip().decode()
    if not data:
        # Closed without a byte of answer: the server went away mid-request.
        raise ConnectionAbortedError(errno.ECONNABORTED, "closed before any answer")
    raise RuntimeError("no X-Pod in %r" % data[:200])


def tally(host, port, n):
    counts, errors = {}, []
    for _ in range(int(n)):
        try:
            pod = http_get(host, int(port))
            counts[pod] = counts.get(pod, 0) + 1
        except OSError as e:
            errors.append(errno.errorcode.get(e.errno, str(e)))
    print(json.dumps({"counts": counts, "errors": errors}))


def probe(host, port, seconds):
    """Back-to-back new connections for a while: (unix time, pod) for each,
    stamped when the connection began (its connect() is when the kernel
    picks the backend; the exchange after it may take longer, through a
    tunnel); an error when it happened."""
    seen, errors = [], []
    end = time.time() + float(seconds)
    while time.time() < end:
        try:
            began = time.time()
            pod = http_get(host, int(port), timeout=1.0)
            seen.append((began, pod))
        except OSError as e:
            errors.append((time.time(), errno.errorcode.get(e.errno, str(e))))
    print(json.dumps({"seen": seen, "errors": errors}))


def refused(host, port):
    s = socket.socket()
    s.settimeout(3.0)
    start = time.monotonic()
    try:
        s.connect((host, int(port)))
        result = "connected"
    except socket.timeout:
        result = "timeout"
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e))
    print(json.dumps({"result": result, "ms": (time.monotonic() - start) * 1000}))


def peer(host, port):
    with socket.create_connection((host, int(port)), timeout=2.0) as s:
        print(json.dumps({"peer": list(s.getpeername())}))


def stream_server(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(port)))
    srv.listen(128)

    def echo(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def pattern(offset, size):
    return bytes((offset + i) * 7 % 251 for i in range(size))


def stream_client(host, port, seconds):
    """One long-lived connection echoing a checkable byte pattern."""
    s = socket.create_connection((host, int(port)), timeout=5.0)
    sent = received = 0
    ok = True
    end = time.time() + float(seconds)
    while time.time() < end:
        chunk = pattern(sent, 1024)
        s.sendall(chunk)
        sent += len(chunk)
        while received < sent:
            data = s.recv(sent - received)
            if not data:
                ok = False
                break
            if data != pattern(received, len(data)):
                ok = False
            received += len(data)
        if not ok:
            break
        time.sleep(0.01)
    s.close()
    print(json.dumps({"sent": sent, "received": received, "ok": ok}))


def listen(*ports):
    """TCP servers that accept and close, and UDP servers that echo, on
    every port given (tcp:N or udp:N)."""
    def tcp(port):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(512)
        while True:
            conn, _ = srv.accept()
            conn.close()

    def udp(port):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind(("0.0.0.0", port))
        while True:
            data, addr = srv.recvfrom(2048)
            srv.sendto(data, addr)

    for spec in ports:
        proto, port = spec.split(":")
        threading.Thread(target=tcp if proto == "tcp" else udp, args=(int(port),), daemon=True).start()
    print("listening", flush=True)
    while True:
        time.sleep(3600)


def udp_name(port, tcp_port=None):
    """A UDP server answering every datagram with its pod's name; with
    tcp_port, also a TCP listener there that accepts and closes (what a
    health check connects to)."""
    if tcp_port is not None:
        threading.Thread(target=listen, args=("tcp:" + tcp_port,), daemon=True).start()
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", int(port)))
    name = os.environ.get("WEFT_POD_NAME", "?").encode()
    print("listening", flush=True)
    while True:
        _, addr = srv.recvfrom(2048)
        srv.sendto(name, addr)


def udp_tally(mode, host, port, n, timeout="1.0"):
    """n requests to host:port over UDP, each answered by a udp-name server:
    "udp" connects a new socket per request, "udps" sends them all from one
    unconnected socket with sendto(); "udp6" and "udp6s" do the same from a
    dual-stack AF_INET6 socket to ::ffff:host, as Go and Java do. Prints the
    answers per backend name, the addresses the answers came from (recvfrom,
    and getpeername for a connected socket) and the errors."""
    names, sources, errors = {}, set(), {}
    v6 = mode.startswith("udp6")
    connected = mode in ("udp", "udp6")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    peer = ("::ffff:" + host, int(port)) if v6 else (host, int(port))
    one = None if connected else socket.socket(family, socket.SOCK_DGRAM)
    for i in range(int(n)):
        s = one or socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(float(timeout))
        try:
            if connected:
                s.connect(peer)
                s.send(b"who")
                sources.add("%s:%d" % s.getpeername()[:2])
            else:
                s.sendto(b"who", peer)
            data, source = s.recvfrom(64)
            names[data.decode()] = names.get(data.decode(), 0) + 1
            sources.add("%s:%d" % source[:2])
        except socket.timeout:
            errors["timeout"] = errors.get("timeout", 0) + 1
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e))
            errors[name] = errors.get(name, 0) + 1
        finally:
            if connected:
                s.close()
    if one is not None:
        one.close()
    print(json.dumps({"backends": names, "sources": sorted(sources), "errors": errors}))


def udp_rate(mode, host, port, seconds, window="8"):
    """UDP echo exchanges from one socket for a while, `window` datagrams of
    32 bytes in flight: "udp" connects and uses send()/recv(), "udps" uses
    sendto()/recvfrom() on an unconnected socket. Prints the exchanges (a
    datagram out, its echo back), their rate, the datagrams lost (not echoed
    within 0.2 s; each is replaced so the window stays full), the answers
    whose source was not host:port, and the send errors."""
    peer = (host, int(port))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected = mode == "udp"
    if connected:
        s.connect(peer)
    s.settimeout(0.2)
    payload = b"x" * 32
    exchanges = lost = foreign = errors = 0

    def send():
        nonlocal errors
        try:
            if connected:
                s.send(payload)
            else:
                s.sendto(payload, peer)
        except OSError:
            errors += 1

    for _ in range(int(window)):
        send()
    start = time.monotonic()
    end = start + float(seconds)
    now = start
    while now < end:
        for _ in range(64):
            try:
                if connected:
                    s.recv(64)
                else:
                    _, source = s.recvfrom(64)
                    if source != peer:
                        foreign += 1
                exchanges += 1
            except socket.timeout:
                lost += 1
            send()
        now = time.monotonic()
    s.close()
    print(json.dumps({"exchanges": exchanges, "rate": exchanges / (now - start), "lost": lost, "foreign": foreign,
                      "errors": errors}))


def attempt(proto, host, port, timeout, source_port=0):
    """One connection attempt: connected, or the errno name, or timeout. For
    UDP ("udp": connect() then send; "udps": sendto() without connecting),
    "connected" means a datagram came back from the echo server. A UDP
    attempt from `source_port` (not 0) is the same exchange as an earlier one
    from that port, to the server's socket that remembers exchanges."""
    start = time.monotonic()
    udp = proto != "tcp"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if udp and source_port:
            s.bind(("0.0.0.0", source_port))
        if proto == "udps":
            # Unconnected UDP: sendto() with an address, judged per datagram.
            s.sendto(b"ping", (host, port))
            s.recvfrom(64)
        else:
            s.connect((host, port))
            if udp:
                s.send(b"ping")
                s.recv(64)
        result = "connected"
    except socket.timeout:
        result = "timeout"
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
    return result, (time.monotonic() - start) * 1000


def matrix(targets, timeout="0.5", port_base="0"):
    """Tries every target (comma-separated proto:host:port), in parallel
    threads, and prints {target: [result, ms]}. With a port base, the UDP
    attempt to the i-th target goes from source port base + i: a new
    exchange for the server as long as no earlier run used that port (an
    ephemeral port may repeat one a server still remembers as allowed)."""
    out = {}
    lock = threading.Lock()

    def one(i, t):
        proto, host, port = t.split(":")
        source = int(port_base) + i if int(port_base) else 0
        r = attempt(proto, host, int(port), float(timeout), source)
        with lock:
            out[t] = r

    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(t for t in targets.split(",") if t)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(json.dumps(out))


def udp_hold(proto, host, port, pause, timeout="1.0"):
    """One UDP socket ("udp": connected; "udp6": a dual-stack AF_INET6 one
    connected to ::ffff:host; "udps": sendto() each time) echoes a datagram,
    waits `pause` seconds in silence, and echoes another; prints
    {"first": result, "after": result}."""
    v6 = proto == "udp6"
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(float(timeout))
    peer = ("::ffff:" + host, int(port)) if v6 else (host, int(port))
    proto = "udp" if v6 else proto

    def echo():
        try:
            if proto == "udp":
                s.send(b"ping")
                s.recv(64)
            else:
                s.sendto(b"ping", peer)
                s.recvfrom(64)
            return "connected"
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e))

    try:
        try:
            if proto == "udp":
                s.connect(peer)
        except OSError as e:
            print(json.dumps({"first": errno.errorcode.get(e.errno, str(e)), "after": "-"}))
            return
        first = echo()
        time.sleep(float(pause))
        print(json.dumps({"first": first, "after": echo()}))
    finally:
        s.close()


def first_change(proto, host, port, want, seconds, timeout="0.05"):
    """Attempts back to back until the result is `want`; prints when. The
    short timeout matters across nodes: an attempt whose SYN left while the
    client's node had the new policy and the server's node did not yet is
    dropped there, and should be given up, not waited out, so that the
    first attempt started after both nodes applied it is the one seen."""
    end = time.time() + float(seconds)
    while time.time() < end:
        result, _ = attempt(proto, host, int(port), float(timeout))
        if result == want:
            print(json.dumps({"at": time.time(), "result": result}))
            return
        time.sleep(0.002)
    print(json.dumps({"at": None, "result": result}))


def connect_rate(host, port, seconds):
    """New TCP connections back to back for a while (each closed with RST so
    no TIME_WAIT piles up): count, rate and connect() latency percentiles."""
    import struct
    lat = []
    failed = []
    kinds = {}
    linger = struct.pack("ii", 1, 0)
    end = time.monotonic() + float(seconds)
    addr = (host, int(port))
    while True:
        t0 = time.monotonic()
        if t0 >= end:
            break
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect(addr)
            lat.append(time.monotonic() - t0)
        except OSError as e:
            failed.append(time.monotonic() - t0)
            name = errno.errorcode.get(e.errno, str(e))
            kinds[name] = kinds.get(name, 0) + 1
        s.close()
    lat.sort()
    failed.sort()

    def q(xs, f):
        return xs[min(len(xs) - 1, int(f * len(xs)))] * 1e6 if xs else None
    print(json.dumps({"count": len(lat), "errors": len(failed), "error_kinds": kinds,
                      "rate": len(lat) / float(seconds),
                      "p50_us": q(lat, 0.5), "p90_us": q(lat, 0.9), "p99_us": q(lat, 0.99),
                      "failed_p50_us": q(failed, 0.5), "failed_p99_us": q(failed, 0.99)}))


def steady(targets, seconds, timeout="1.0"):
    """Attempts every target (proto:host:port, comma-separated) back to back
    for a while; prints the count of attempts and of each failure kind."""
    outcomes = {}
    attempts = 0
    end = time.time() + float(seconds)
    items = [t.split(":") for t in targets.split(",") if t]
    while time.time() < end:
        for proto, host, port in items:
            result, _ = attempt(proto, host, int(port), float(timeout))
            attempts += 1
            if result != "connected":
                key = f"{proto}:{host}:{port} {result}"
                outcomes[key] = outcomes.get(key, 0) + 1
    print(json.dumps({"attempts": attempts, "failures": outcomes}))


def http_load(host, port, n, path="/", *headers):
    """N requests over keep-alive HTTP/1.1 (reconnecting when the server
    closes): counts by pod and by status, and the errors."""
    import http.client
    hdrs = dict(h.split("=", 1) for h in headers)
    pods, statuses, errors = {}, {}, []
    conn = None
    start = time.monotonic()
    for _ in range(int(n)):
        for attempt in range(2):
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=5)
                conn.request("GET", path, headers=hdrs)
                r = conn.getresponse()
                r.read()
                pod = r.getheader("x-pod") or "-"
                pods[pod] = pods.get(pod, 0) + 1
                statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
                break
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn = None
                # A keep-alive connection the server closed as we reused it
                # is retried once on a new one, as every HTTP client does.
                if attempt == 1 or not isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)):
                    errors.append(type(e).__name__ + ": " + str(e))
                    break
    print(json.dumps({"pods": pods, "statuses": statuses, "errors": errors,
                      "seconds": time.monotonic() - start}))


def late_request(proto, host, port, ready, go):
    """Connects, creates the file `ready`, waits (10 s at most) for the file
    `go`, then sends one request, HTTP/1.1 or h2c (`proto` h1 or h2), and
    reads until the server closes: the status, the response's Connection
    field (h1) or the GOAWAY (h2), and whether and when the server closed
    (drain tests: a connection made before a drain that speaks only after
    it began). `proto` h1-kept: one HTTP/1.1 exchange first, then the wait,
    then the late request on the same kept-alive connection. `proto`
    h1-hold: a client that ignores the response's `Connection: close` and
    holds its socket open: after the response and EOF it sends 64 KiB at
    0.3 and 0.6 s (taken while the proxy lingers: no error) and again at
    3 s, past the 2 s linger (the proxy has closed: a reset); it never
    closes first, so the drain must not wait for it."""
    def wait_for_go():
        waited = time.time() + 10
        while not os.path.exists(go) and time.time() < waited:
            time.sleep(0.01)

    def connected():
        open(ready, "w").close()
        wait_for_go()
    if proto == "h2":
        out = _h2_raw(host, port, "/", until_closed=True, connected=connected)
        print(json.dumps({"status": int(out["status"] or 0), "goaway": out["goaway"], "closed": out["closed"] is not None,
                          "closed_at": out["closed"]}))
        return
    s = socket.create_connection((host, int(port)), timeout=5)
    if proto == "h1-kept":
        s.sendall(b"GET / HTTP/1.1\r\nHost: late\r\n\r\n")
        if not _read_response(s)[0][0]:
            raise SystemExit("the first exchange got no answer")
    connected()
    start = time.monotonic()
    s.sendall(b"GET / HTTP/1.1\r\nHost: late\r\n\r\n")
    if proto == "h1-hold":
        lines, fields, _ = _read_response(s)
        out = {"status": int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0,
               "connection": fields.get("connection", ""), "eof": s.recv(65536) == b"", "during": [], "after": None}
        answered = time.monotonic()
        for at, key in ((0.3, "during"), (0.6, "during"), (3.0, "after")):
            time.sleep(max(0.0, answered + at - time.monotonic()))
            try:
                # (After EOF, recv() reports no reset; a second send does.)
                s.sendall(b"x" * 65536)
                time.sleep(0.2)
                s.sendall(b"x")
                error = None
            except (BrokenPipeError, ConnectionResetError):
                error = "reset"  # (EPIPE or ECONNRESET, as the timing falls)
            except OSError as e:
                error = str(e)
            if key == "during":
                out["during"].append(error)
            else:
                out["after"] = error
        s.close()
        print(json.dumps(out))
        return
    data, closed = b"", False
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except socket.timeout:
        pass
    s.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    status = int(head[0].split()[1]) if len(head[0].split()) > 1 else 0
    print(json.dumps({"status": status, "connection": fields.get("connection", ""), "closed": closed,
                      "closed_at": round(time.monotonic() - start, 3) if closed else None}))


def http_steady(host, port, seconds, mode="mixed"):
    """Requests back to back for a while, half on fresh connections and half
    on one kept alive (mode "fresh": all on fresh connections, the most
    connections opened while a drain begins; mode "upgrade": curl --http2
    on a fresh connection each, the h2c Upgrade, answered over HTTP/2, or
    over HTTP/1.1 by a proxy draining, which declines it; "upgraded" counts
    the former): every failure is reported (drain tests), with the
    connection's local port."""
    import http.client
    import subprocess
    ok, failures, upgraded = 0, [], 0
    keep = None
    end = time.time() + float(seconds)
    i = 0
    while time.time() < end:
        i += 1
        if mode == "upgrade":
            r = subprocess.run(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                                "--http2", "http://%s:%s/" % (host, port)], capture_output=True, text=True)
            if r.stdout in ("200 2", "200 1.1"):
                ok += 1
                upgraded += r.stdout == "200 2"
            else:
                failures.append("curl --http2: %r %s" % (r.stdout, r.stderr.strip()))
            continue
        fresh = mode == "fresh" or i % 2 == 0
        for attempt in range(2):
            c, where = None, "connect"
            try:
                if fresh:
                    c = http.client.HTTPConnection(host, int(port), timeout=5)
                else:
                    if keep is None:
                        keep = http.client.HTTPConnection(host, int(port), timeout=5)
                    c = keep
                if c.sock is None:
                    c.connect()
                where = ("fresh" if fresh else "kept") + " connection from port %d" % c.sock.getsockname()[1]
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    failures.append("status %d" % r.status)
                else:
                    ok += 1
                if fresh or r.getheader("connection", "").lower() == "close":
                    c.close()
                    if not fresh:
                        keep = None
                break
            except (OSError, http.client.HTTPException) as e:
                if fresh and c is not None:
                    c.close()
                if not fresh and keep is not None:
                    keep.close()
                    keep = None
                    if attempt == 0 and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)):
                        continue  # an idle keep-alive connection closed under us: reconnect, as clients do
                failures.append("%s: %s: %s" % (where, type(e).__name__, e))
                break
    print(json.dumps({"ok": ok, "failures": failures, "upgraded": upgraded}))


def ws_echo(host, port, message, hold="0"):
    """A WebSocket client: handshake, three masked text frames and their
    echoes, then (after HOLD seconds of silence) a close frame."""
    import base64, hashlib, os
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(("GET /ws HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
        lines, headers, rest = _read_head(s)
        want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        echoes = []
        for i in range(3):
            payload = ("%s-%d" % (message, i)).encode()
            mask = os.urandom(4)
            s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload)))
            while len(rest) < 2 or len(rest) < 2 + rest[1]:
                chunk = s.recv(4096)
                if not chunk:
                    print(json.dumps({"status": lines[0], "accept_ok": headers.get("sec-websocket-accept") == want,
                                      "echoes": echoes, "error": "closed after %d echo(es)" % len(echoes),
                                      "head": lines}))
                    return
                rest += chunk
            n = rest[1]
            echoes.append(rest[2:2 + n].decode())
            rest = rest[2 + n:]
        time.sleep(float(hold))
        try:
            s.sendall(bytes([0x88, 0x80]) + os.urandom(4))
        except OSError:
            pass
        print(json.dumps({"status": lines[0], "accept_ok": headers.get("sec-websocket-accept") == want,
                          "echoes": echoes}))


def h2_ws_echo(host, port, message, streams="2"):
    """WebSocket over HTTP/2 (RFC 8441) on one h2c connection: waits for
    the server's SETTINGS (does it announce ENABLE_CONNECT_PROTOCOL?), opens
    STREAMS extended CONNECT streams to /ws at once and a GET beside them,
    sends three masked text frames on each and reads their echoes, then a
    close frame on each and reads the close and the stream's end."""
    import h2.events
    import h2.exceptions
    import h2.settings
    conn, s = _h2_client(host, port)
    announced, deadline = None, time.monotonic() + 5
    while announced is None and time.monotonic() < deadline:
        events, closed = _h2_pump(conn, s, 0.5)
        if closed:
            break
        for e in events:
            if isinstance(e, h2.events.RemoteSettingsChanged):
                c = e.changed_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL)
                announced = bool(c and c.new_value == 1)
    ids = [1 + 2 * i for i in range(int(streams))]
    get_id = ids[-1] + 2
    for sid in ids:
        conn.send_headers(sid, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                                (":path", "/ws"), (":authority", "ws"), ("sec-websocket-version", "13")])
    _h2_get(conn, s, get_id, host, "/beside-websockets")
    s.sendall(conn.data_to_send())
    state = {sid: {"status": None, "headers": {}, "rest": b"", "echoes": [], "close": None, "ended": False,
                   "reset": None, "sent": 0} for sid in ids}
    got = {"status": None, "body": b""}

    def frame(opcode, payload):
        mask = os.urandom(4)
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload))

    def send_next(sid):
        st = state[sid]
        if st["sent"] < 3:
            conn.send_data(sid, frame(1, ("%s-%d-%d" % (message, sid, st["sent"])).encode()))
        elif st["sent"] == 3:
            conn.send_data(sid, frame(8, b""))
        st["sent"] += 1

    closed, deadline = False, time.monotonic() + 15
    while not closed and time.monotonic() < deadline:
        if all(st["ended"] or st["reset"] is not None for st in state.values()) and got["status"] and got.get("done"):
            break
        events, closed = _h2_pump(conn, s, 1.0)
        for e in events:
            sid = getattr(e, "stream_id", None)
            if sid == get_id:
                if isinstance(e, h2.events.ResponseReceived):
                    got["status"] = dict(e.headers).get(":status")
                elif isinstance(e, h2.events.DataReceived):
                    got["body"] += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, sid)
                elif isinstance(e, h2.events.StreamEnded):
                    got["done"] = True
                continue
            st = state.get(sid)
            if st is None:
                if isinstance(e, h2.events.ConnectionTerminated):
                    closed = True
                continue
            if isinstance(e, h2.events.ResponseReceived):
                st["headers"] = dict(e.headers)
                st["status"] = st["headers"].pop(":status", None)
                if st["status"] == "200":
                    send_next(sid)
            elif isinstance(e, h2.events.DataReceived):
                conn.acknowledge_received_data(e.flow_controlled_length, sid)
                st["rest"] += e.data
                while len(st["rest"]) >= 2 and len(st["rest"]) >= 2 + (st["rest"][1] & 0x7F):
                    opcode, n = st["rest"][0] & 0x0F, st["rest"][1] & 0x7F
                    payload, st["rest"] = st["rest"][2:2 + n], st["rest"][2 + n:]
                    if opcode == 8:
                        st["close"] = payload.hex()
                        try:
                            conn.end_stream(sid)
                        except h2.exceptions.StreamClosedError:
                            pass  # the proxy ended the stream in the same read (the pod closed)
                    else:
                        st["echoes"].append(payload.decode())
                        send_next(sid)
            elif isinstance(e, h2.events.StreamEnded):
                st["ended"] = True
            elif isinstance(e, h2.events.StreamReset):
                st["reset"] = e.error_code
        out = conn.data_to_send()
        if out:
            s.sendall(out)
    s.close()
    beside = json.loads(got["body"] or b"{}").get("path") if got["status"] == "200" else None
    print(json.dumps({"announced": announced, "get_status": got["status"], "get_path": beside,
                      "streams": [{k: v for k, v in st.items() if k not in ("rest", "sent")} for st in state.values()]}))


def _h2_client(host, port):
    """An h2c (prior knowledge) client connection, python3-h2 on a socket;
    it sends WINDOW_UPDATE only when asked."""
    import h2.config
    import h2.connection
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(conn.data_to_send())
    return conn, s


def _h2_pump(conn, s, wait):
    """Reads for at most `wait` seconds; returns (events, closed)."""
    s.settimeout(wait)
    try:
        data = s.recv(1 << 20)
    except socket.timeout:
        return [], False
    if not data:
        return [], True
    events = conn.receive_data(data)
    out = conn.data_to_send()
    if out:
        s.sendall(out)
    return events, False


def _h2_get(conn, s, stream, host, path):
    conn.send_headers(stream, [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", host)],
                      end_stream=True)
    s.sendall(conn.data_to_send())


def h2_window(host, port, path, size, backend_host, backend_port):
    """An h2c GET of /bytes/SIZE whose windows the client keeps shut (it
    reads, never acknowledges) until the backend has stopped sending; then
    it opens them and reads to the end. Reports how much the backend had
    written by then (its /__sent, before and after), and whether the whole
    body came, byte for byte."""
    import h2.events
    import urllib.request
    size = int(size)

    def sent():
        with urllib.request.urlopen("http://%s:%s/__sent" % (backend_host, backend_port), timeout=5) as r:
            return json.loads(r.read())["sent"]

    base = sent()
    conn, s = _h2_client(host, port)
    _h2_get(conn, s, 1, host, path)
    body, status, ended, closed = bytearray(), None, False, False
    readings = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not closed:
        events, closed = _h2_pump(conn, s, 0.3)
        for e in events:
            if isinstance(e, h2.events.ResponseReceived):
                status = dict(e.headers).get(":status")
            elif isinstance(e, h2.events.DataReceived):
                body += e.data
        readings.append(sent() - base)
        if len(readings) >= 4 and readings[-1] == readings[-4] and readings[-1] > 0:
            break  # the backend has stopped: three readings, 0.9 s, alike
    shut = {"sent": readings[-1] if readings else 0, "received": len(body), "readings": len(readings)}
    conn.increment_flow_control_window(1 << 30)
    conn.increment_flow_control_window(1 << 30, stream_id=1)
    s.sendall(conn.data_to_send())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ended and not closed:
        events, closed = _h2_pump(conn, s, 1.0)
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                body += e.data
                conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded):
                ended = True
            elif isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                closed = True
        out = conn.data_to_send()
        if out:
            s.sendall(out)
    s.close()
    block = bytes(i % 251 for i in range(251 * 261))
    expected = (block * (size // len(block) + 1))[:size]
    print(json.dumps({"status": status, "shut": shut, "ended": ended, "length": len(body),
                      "exact": bytes(body) == expected, "sent_total": sent() - base}))


def _h2_frame(kind, flags, stream, payload):
    """An HTTP/2 frame's bytes."""
    import struct
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _h2_split(buf):
    """The whole frames at the start of BUF as (type, flags, stream,
    payload), and the bytes after them."""
    frames = []
    while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
        n = int.from_bytes(buf[:3], "big")
        frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7fffffff, buf[9:9 + n]))
        buf = buf[9 + n:]
    return frames, buf


def _h2_raw(host, port, path, fields=(), until_closed=False, method="GET", chunks=None, connected=None, ended=True,
            half_close=False):
    """One h2c request on stream 1 (GET, or `method` with a body of DATA
    frames of `chunks` bytes, the last one ending the stream), frames read
    by hand (python3-h2 stops taking frames once a GOAWAY has come, and
    refuses to send some of what the tests send). Returns what came back
    and when, in seconds from the request: GOAWAY, the status, the body,
    the stream's end or reset, and the connection's end; it waits for that
    end with `until_closed`. `connected` runs once the connection is made,
    before anything is sent. With `ended` false the request's HEADERS do
    not end the stream (and no DATA follows); with `half_close` the client
    shuts its side down (FIN) once the request is sent."""
    import struct
    import hpack
    s = socket.create_connection((host, int(port)), timeout=10)
    if connected:
        connected()
    block = hpack.Encoder().encode([(":method", method), (":path", path), (":scheme", "http"), (":authority", host),
                                    *fields])
    frame = _h2_frame
    start = time.monotonic()
    request = frame(1, 5, 1, block)
    if chunks is not None:
        request = frame(1, 4, 1, block)
        for i, n in enumerate(chunks or [0]):
            request += frame(0, 1 if i == max(len(chunks), 1) - 1 else 0, 1, b"x" * n)
    if not ended:
        request = frame(1, 4, 1, block)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + request)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    out = {"goaway": None, "status": None, "body": b"", "ended": None, "closed": None, "reset": None}
    decoder, buf = hpack.Decoder(), b""
    s.settimeout(1.0)
    while time.monotonic() - start < 30 and out["closed"] is None:
        if not until_closed and (out["ended"] is not None or out["reset"] is not None):
            break
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            continue
        except OSError as e:
            data = b""
            out["error"] = str(e)
        now = round(time.monotonic() - start, 3)
        if not data:
            out["closed"] = now
            break
        frames, buf = _h2_split(buf + data)
        for kind, flags, stream, payload in frames:
            if kind == 4 and not flags & 1 and not half_close:
                s.sendall(frame(4, 1, 0, b""))  # SETTINGS ACK
            elif kind == 7:
                last, code = struct.unpack(">II", payload[:8])
                out["goaway"] = {"at": now, "last_stream_id": last & 0x7fffffff, "error_code": code}
            elif kind == 1 and stream == 1:
                fields = dict(decoder.decode(payload))
                out["status"] = fields.get(":status")
                for name in ("set-cookie", "x-pod"):
                    if name in fields:
                        out[name] = fields[name]
            elif kind == 0 and stream == 1:
                out["body"] += payload
            elif kind == 3 and stream == 1:
                out["reset"] = struct.unpack(">I", payload[:4])[0]
            if kind in (0, 1) and stream == 1 and flags & 1:
                out["ended"] = now
    s.close()
    return out


def h2_body(host, port, path, chunks, *fields):
    """One h2c POST of PATH whose body is DATA frames of CHUNKS bytes
    (comma-separated; the last ends the stream), with extra fields
    NAME=VALUE (content-length among them, true or not): the status, the
    reset code, and the body as text."""
    pairs = [(f.split("=", 1)[0], f.split("=", 1)[1]) for f in fields]
    out = _h2_raw(host, port, path, pairs, method="POST", chunks=[int(n) for n in chunks.split(",") if n])
    out["body"] = out["body"].decode(errors="replace")
    print(json.dumps(out))


def h2_drain(host, port, path):
    """One h2c GET, the connection then held until the proxy closes it
    (a drain, an idle timeout): GOAWAY, the response, and the
    connection's end, and when."""
    out = _h2_raw(host, port, path, until_closed=True)
    if out["status"] != "200":
        out["text"] = out["body"][:300].decode("utf-8", "replace")  # (what answered, when it was not the pod)
    out["body"] = len(out["body"])
    print(json.dumps(out))


def h2_half_close(host, port, path, ended):
    """One h2c GET of PATH, the client's side shut down (FIN) right after
    it; the stream ended by the HEADERS frame if ENDED is 1, left open if
    0. What came back, and when the proxy closed the connection."""
    out = _h2_raw(host, port, path, method="GET" if ended == "1" else "POST", until_closed=True, ended=ended == "1",
                  half_close=True)
    out["body"] = len(out["body"])
    print(json.dumps(out))


def _recv_or_closed(s, start, out):
    """One recv from S: its bytes, or b"" when the peer closed or reset (the
    error kept in OUT) with OUT["closed"] the seconds since START."""
    try:
        chunk = s.recv(65536)
    except OSError as e:
        out["error"] = str(e)
        chunk = b""
    if not chunk:
        out["closed"] = round(time.monotonic() - start, 3)
    return chunk


def _trickle_step(s, pieces, start, every, out):
    """One turn of a slow sender on non-blocking S: the next of PIECES if
    its time has come (one every EVERY s from START; none before START is
    set), then a wait of a quarter of EVERY for bytes. The bytes read, b""
    once the peer closed or reset (OUT["closed"] set), None if none came."""
    if start is not None and pieces and time.monotonic() - start >= out["sent"] * every:
        try:
            s.send(pieces.pop(0))
            out["sent"] += 1
        except OSError as e:
            out["send_error"] = str(e)
            pieces.clear()
    ready, _, _ = select.select([s], [], [], every / 4)
    if not ready:
        return None
    return _recv_or_closed(s, start if start is not None else time.monotonic(), out)


def h1_idle(host, port, path, *headers):
    """One keep-alive HTTP/1.1 GET of PATH (extra header lines "Name: value"),
    then the connection left idle until the proxy closes it (30 s at
    most): the status line, and when (seconds from the request) the
    response was whole and the connection closed."""
    start = time.monotonic()
    s = socket.create_connection((host, int(port)), timeout=30)
    extra = "".join(h + "\r\n" for h in headers)
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path, extra)).encode())
    out = {"status": None, "answered": None, "closed": None}
    data = b""
    while out["closed"] is None:
        chunk = _recv_or_closed(s, start, out)
        if not chunk:
            break
        now = round(time.monotonic() - start, 3)
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and out["answered"] is None:
            out["status"] = head.split(b"\r\n")[0].decode()
            length = next((int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                out["answered"] = now
    s.close()
    print(json.dumps(out))


def h1_behind(host, port, path, *headers):
    """A keep-alive GET of PATH with HEADERS ("Name: value"), then, 100 ms
    later while it is still being answered, part of a second request's head
    in a write of its own, never ended. Reads until the proxy closes (8 s at
    most): the status lines, and when (seconds from the start) the first
    answer came and the connection closed (None: still open)."""
    s = socket.create_connection((host, int(port)), timeout=8)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.monotonic()
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path, "".join(h + "\r\n" for h in headers))).encode())
    time.sleep(0.1)
    s.sendall(b"GET /behind HTTP/1.1\r\nHost: t\r\nx-part: y\r\n")
    out = {"statuses": [], "answered": None, "closed": None}
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            out["closed"] = time.monotonic() - start
            break
        if out["answered"] is None:
            out["answered"] = time.monotonic() - start
        data += chunk
    # (A body need not end with a line break: the next status line follows it.)
    out["statuses"] = [m.decode() for m in re.findall(rb"HTTP/1\.1 \d{3} [^\r\n]*", data)]
    s.close()
    print(json.dumps(out))


def h2_slow(host, port, path, every_ms, mode, first=""):
    """An h2c GET of PATH whose header block (40 extra fields) is sent
    slowly, a piece every EVERY_MS ms, as MODE says: "head" trickles its
    HEADERS frame a byte at a time; "cont" sends HEADERS without
    END_HEADERS, then the rest of the block in CONTINUATION frames of 8
    bytes, each frame whole; "head:N" and "cont:N" end the block in N
    pieces. With FIRST ("first"), a whole GET on stream 1 is answered
    before the slow one (stream 3) starts. Reads until the slow request is
    answered or the proxy closes (35 s at most): GOAWAY (its debug data as
    text), the status, when (seconds from the slow request's start) it was
    answered and the connection closed, and how many pieces were sent."""
    import struct
    import hpack
    every = int(every_ms) / 1000
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    frame = _h2_frame
    encoder = hpack.Encoder()
    fields = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", host)]
    out = {"goaway": None, "status": None, "answered": None, "closed": None, "sent": 0}
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
    stream, buf = 1, b""
    if first:
        s.sendall(frame(1, 5, 1, encoder.encode(fields)))
        stream = 3
    block = encoder.encode(fields + [("x-slow-%d" % i, "y") for i in range(40)])
    kind, _, count = mode.partition(":")
    if kind == "head":
        whole = frame(1, 5, stream, block)
        size = -(-len(whole) // int(count)) if count else 1
        pieces = [whole[i:i + size] for i in range(0, len(whole), size)]
    else:
        size = -(-(len(block) - 8) // (int(count) - 1)) if count else 8
        rest = [block[i:i + size] for i in range(8, len(block), size)]
        pieces = [frame(1, 1, stream, block[:8])]
        pieces += [frame(9, 4 if i == len(rest) - 1 else 0, stream, piece) for i, piece in enumerate(rest)]
    # The slow block starts once the proxy's SETTINGS are acknowledged (an
    # ACK sent later would land inside it) and the first request answered.
    start, deadline, acked = None, time.monotonic() + 35, False
    s.setblocking(False)
    while out["closed"] is None and time.monotonic() < deadline:
        if start is None and acked and (not first or out.get("first")):
            start = time.monotonic()
        chunk = _trickle_step(s, pieces, start, every, out)
        if chunk is None:
            continue
        if not chunk:
            break
        at = round(time.monotonic() - start, 3) if start is not None else 0
        frames, buf = _h2_split(buf + chunk)
        for t, flags, sid, payload in frames:
            if t == 4 and not flags & 1 and start is None:
                s.sendall(frame(4, 1, 0, b""))  # SETTINGS ACK
                acked = True
            elif t == 7:
                last, code = struct.unpack(">II", payload[:8])
                out["goaway"] = {"at": at, "last_stream_id": last & 0x7fffffff, "error_code": code,
                                 "debug": payload[8:].decode(errors="replace")}
            elif t == 1 and sid == 1 and first:
                out["first"] = dict(hpack.Decoder().decode(payload)).get(":status")
            elif t == 1 and sid == stream:
                out["status"] = dict(hpack.Decoder().decode(payload)).get(":status")
                out["answered"] = at
        if out["answered"] is not None:
            break
    s.close()
    print(json.dumps(out))


def h1_slow(host, port, path, every_ms, mode, *headers):
    """One HTTP/1.1 request of PATH sent slowly, a piece every EVERY_MS ms,
    as MODE says: "head" trickles header lines and never ends the head;
    "head:N" sends N header lines so, then ends the head; "body:N" sends the
    head whole with a content-length of N, then the body a byte at a time.
    With HEADERS ("Name: value"), a whole keep-alive GET with them goes
    first on the same connection and is answered before the slow one
    starts. Reads until the slow request's response is whole or the proxy
    closes (30 s at most): its status line and body, when (seconds from its
    start) it was answered and the connection closed, and how many pieces
    were sent."""
    every = int(every_ms) / 1000
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {"status": None, "body": None, "answered": None, "closed": None, "sent": 0}

    def response(data):
        """(status line, body) once DATA holds a whole response, else None."""
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        length = next((int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
        return (head.split(b"\r\n")[0].decode(), body[:length].decode(errors="replace")) if len(body) >= length else None

    if headers:
        s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path, "".join(h + "\r\n" for h in headers))).encode())
        data = b""
        while response(data) is None:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("the first request was not answered: %r" % data)
            data += chunk
        out["first"] = response(data)[0]
    kind, _, count = mode.partition(":")
    if kind == "body":
        pieces = [("POST %s HTTP/1.1\r\nHost: t\r\ncontent-length: %s\r\n\r\n" % (path, count)).encode()]
        pieces += [b"x"] * int(count)
    else:
        lines = [("x-slow-%d: y\r\n" % i).encode() for i in range(int(count) if count else 10_000)]
        pieces = [("GET %s HTTP/1.1\r\nHost: t\r\n" % path).encode()] + lines + ([b"\r\n"] if count else [])
    start = time.monotonic()
    s.setblocking(False)
    data = b""
    while out["closed"] is None and time.monotonic() - start < 30:
        chunk = _trickle_step(s, pieces, start, every, out)
        if chunk is None:
            continue
        if not chunk:
            break
        now = round(time.monotonic() - start, 3)
        data += chunk
        got = response(data)
        if got and out["answered"] is None:
            out["status"], out["body"] = got
            out["answered"] = now
            if kind != "head" or count:
                break
    s.close()
    print(json.dumps(out))


def _read_head(s):
    """Reads from S until a response head is whole (or EOF): its lines, its
    fields (names lower-cased) and the bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    return lines, {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}, rest


def _read_response(s):
    """_read_head, then the body up to its content-length (or EOF)."""
    lines, fields, body = _read_head(s)
    length = int(fields.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return lines, fields, body


def h1_close_send(host, port, path, *headers):
    """A GET of PATH with `Connection: close` (and HEADERS, "Name: value"),
    its response read whole; then, as a client with more to send would (the
    rest of a body, a request pipelined behind), 64 KiB more, twice, 0.3 s
    apart; then reads to the end. The status line, whether the proxy said
    `connection: close`, how the connection ended ("eof" or the error) and
    any send error: a proxy that shuts its side and reads on (RFC 9112's
    staged close) takes those bytes; one that closed its socket answers
    them with a reset."""
    s = socket.create_connection((host, int(port)), timeout=5)
    extra = "".join(h + "\r\n" for h in headers)
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n%s\r\n" % (path, extra)).encode())
    lines, fields, body = _read_response(s)
    out = {"status": lines[0], "connection": fields.get("connection"), "body": len(body), "send_error": None}
    try:
        for _ in range(2):
            time.sleep(0.3)
            s.sendall(b"x" * 65536)
    except OSError as e:
        out["send_error"] = str(e)
    try:
        rest = s.recv(65536)
        out["end"] = "eof" if rest == b"" else "more: %r" % rest[:80]
    except OSError as e:
        out["end"] = str(e)
    s.close()
    print(json.dumps(out))


def hold(host, port, seconds):
    """Opens a TCP connection and holds it, saying nothing, for SECONDS."""
    with socket.create_connection((host, int(port)), timeout=5):
        time.sleep(float(seconds))
    print(json.dumps({"held": float(seconds)}))


def tcp_hold(host, port, seconds, send_after=None):
    """Connects to a server that speaks first, reads its banner, then holds
    the connection without a byte either way for SECONDS (but one line sent
    SEND_AFTER seconds in, if given): the banner, and whether the
    connection was still open at the end as this side sees it (a peer that
    cannot reach it never says otherwise)."""
    s = socket.create_connection((host, int(port)), timeout=5)
    banner = s.recv(100).decode(errors="replace").strip()
    if send_after is not None:
        time.sleep(float(send_after))
        try:
            s.sendall(b"late\n")
        except OSError:
            pass
        seconds = float(seconds) - float(send_after)
    time.sleep(float(seconds))
    s.setblocking(False)
    try:
        open_ = s.recv(1) != b""
    except BlockingIOError:
        open_ = True
    except OSError:
        open_ = False
    print(json.dumps({"banner": banner, "open": open_}))


def churn(web, banner):
    """Clients that go away every way a client can, each on its own
    connection to the proxy: HTTP/1.1 kept alive then closed, reset in the
    middle of a large response, a head cut short, nothing sent at all;
    h2c answered then closed, reset with a stream in flight, closed
    before its answer, a preface cut short; opaque TCP (WEB with binary
    bytes, BANNER speaking first) closed and reset. Returns what each
    saw; the proxy should hold none of these connections afterwards."""
    import struct
    import hpack
    out = {}

    def connect(host):
        return socket.create_connection((host, 80), timeout=5)

    def reset(s):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def h1(s, path):
        s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path).encode())

    s = connect(web)
    for i in range(3):
        h1(s, "/churn-%d" % i)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += s.recv(65536)
    s.close()
    out["h1_kept_alive"] = head.split(b"\r\n")[0].decode()
    s = connect(web)
    h1(s, "/bytes/20000000")
    out["h1_reset_mid_response"] = len(s.recv(65536))
    reset(s)
    s = connect(web)
    s.sendall(b"GET /half HTTP/1.1\r\nHost:")
    s.close()
    s = connect(web)
    s.close()
    out["h2_answered"] = _h2_raw(web, 80, "/churn-h2")["status"]
    s = connect(web)
    s.sendall(b"PRI * HTTP/2.0\r\n")
    s.close()
    block = hpack.Encoder().encode([(":method", "GET"), (":path", "/sleep/300"), (":scheme", "http"), (":authority", web)])
    frame = _h2_frame
    for name, end in (("h2_reset_in_flight", reset), ("h2_closed_in_flight", socket.socket.close)):
        s = connect(web)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 5, 1, block))
        time.sleep(0.05)
        end(s)
        out[name] = True
    s = connect(web)
    s.sendall(b"\x00\x01binary\n")
    time.sleep(0.3)
    s.close()
    s = connect(banner)
    out["tcp_banner"] = s.recv(100).decode().strip()
    s.sendall(b"\x00\x01binary\n")
    out["tcp_echo"] = s.recv(100).decode().strip()
    reset(s)
    s = connect(banner)
    s.recv(100)
    s.close()
    time.sleep(1.0)  # /sleep/300 answers land on closed connections
    print(json.dumps(out))


def h2_request(host, port, path, *fields):
    """One h2c GET of PATH with extra fields NAME=VALUE (PATH and VALUE with
    Python escapes, so \\r\\n can be sent): the status, the reset code, and
    the body as text."""
    import codecs
    pairs = [(f.split("=", 1)[0], codecs.decode(f.split("=", 1)[1], "unicode_escape")) for f in fields]
    out = _h2_raw(host, port, codecs.decode(path, "unicode_escape"), pairs)
    out["body"] = out["body"].decode(errors="replace")
    print(json.dumps(out))


def h2_heads(host, port, path, *specs):
    """h2c requests one after another on one connection, frames by hand
    (python3-h2 holds a client to the header list size the server
    announced), one HPACK encoder for all of them as a client has. Each
    SPEC is the size of an x-big field (0: none), with ":open" a POST whose
    HEADERS do not end the stream and 1000 bytes of its body follow (more
    to come). For each: the status, body, reset code and GOAWAY; it stops
    at the connection's end."""
    import struct
    import hpack
    s = socket.create_connection((host, int(port)), timeout=10)
    encoder, decoder, buf = hpack.Encoder(), hpack.Decoder(), b""
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b""))
    results = []
    for i, spec in enumerate(specs):
        size, _, mode = spec.partition(":")
        stream = 2 * i + 1
        fields = [(":method", "POST" if mode == "open" else "GET"), (":path", path), (":scheme", "http"),
                  (":authority", host)] + ([("x-big", "a" * int(size))] if int(size) else [])
        block = encoder.encode(fields)
        if mode == "open":
            s.sendall(_h2_frame(1, 4, stream, block) + _h2_frame(0, 0, stream, b"b" * 1000))
        else:
            s.sendall(_h2_frame(1, 5, stream, block))
        out = {"spec": spec, "status": None, "body": b"", "reset": None, "goaway": None, "closed": False}
        results.append(out)
        done = False
        while not done:
            try:
                data = s.recv(1 << 16)
            except socket.timeout:
                out["timeout"] = True
                break
            except OSError:
                data = b""
            if not data:
                out["closed"] = True
                break
            frames, buf = _h2_split(buf + data)
            for kind, flags, sid, payload in frames:
                if kind == 4 and not flags & 1:
                    s.sendall(_h2_frame(4, 1, 0, b""))  # SETTINGS ACK
                elif kind == 7:
                    last, code = struct.unpack(">II", payload[:8])
                    out["goaway"] = {"last_stream_id": last & 0x7fffffff, "error_code": code}
                elif sid == stream and kind == 1:
                    out["status"] = dict(decoder.decode(payload)).get(":status")
                elif sid == stream and kind == 0:
                    out["body"] += payload
                elif sid == stream and kind == 3:
                    out["reset"] = struct.unpack(">I", payload[:4])[0]
                    done = True
                if sid == stream and kind in (0, 1) and flags & 1 and mode != "open":
                    done = True
            if mode == "open" and out["status"] is not None and out["reset"] is None:
                s.settimeout(1.0)  # the reset follows the answer
        s.settimeout(10)
        out["body"] = out["body"].decode(errors="replace")
        if out["closed"]:
            break
    s.close()
    print(json.dumps({"requests": results}))


def tls_server(port, name):
    """A TLS server (a fresh self-signed certificate, made with openssl): on
    each connection it finishes the handshake, writes one JSON line naming
    itself and the server name (SNI) the client's ClientHello carried, and
    closes. A TLSRoute passes the ClientHello through untouched, so the
    name the server saw is the name the client sent."""
    import shutil
    import ssl
    import subprocess
    import tempfile
    where = tempfile.mkdtemp(prefix="weft-tls-")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", where + "/key.pem", "-out", where + "/cert.pem", "-days", "1", "-subj", "/CN=" + name],
                       check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(where + "/cert.pem", where + "/key.pem")
    finally:
        shutil.rmtree(where, ignore_errors=True)
    seen = {}

    def remember(sock, server_name, _context):
        seen[id(sock)] = server_name

    context.sni_callback = remember
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(128)

    def serve(conn):
        try:
            conn.settimeout(5)
            with context.wrap_socket(conn, server_side=True) as tls:
                line = json.dumps({"pod": name, "sni": seen.pop(id(tls), None)}) + "\n"
                tls.sendall(line.encode())
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tls_tally(host, port, n, server_name="-"):
    """n TLS connections, each sending `server_name` as SNI ("-": none):
    how many each server answered, what went wrong on the others (by
    kind), and how many answers saw another name than the one sent."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sni = None if server_name == "-" else server_name
    pods, errors, mismatched = {}, {}, 0
    for _ in range(int(n)):
        try:
            with socket.create_connection((host, int(port)), timeout=3) as raw:
                with context.wrap_socket(raw, server_hostname=sni) as tls:
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        data += chunk
            answer = json.loads(data)
            pods[answer["pod"]] = pods.get(answer["pod"], 0) + 1
            if answer["sni"] != sni:
                mismatched += 1
        except (OSError, ValueError) as e:
            kind = type(e).__name__
            errors[kind] = errors.get(kind, 0) + 1
    print(json.dumps({"pods": pods, "errors": errors, "mismatched": mismatched}))


def tls_pieces(host, port, server_name, size, pause_ms="20"):
    """One TLS connection whose ClientHello goes out in pieces of `size`
    bytes, `pause_ms` apart (a proxy must gather it across reads), then the
    handshake and the server's answer as usual; and one connection that
    sends nothing: how long until the other end closes it."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    raw = socket.create_connection((host, int(port)), timeout=5)

    def pump():
        if outgoing.pending:
            raw.sendall(outgoing.read())
        data = raw.recv(65536)
        if not data:
            raise ConnectionAbortedError(errno.ECONNABORTED, "closed during the handshake")
        incoming.write(data)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    for i in range(0, len(hello), int(size)):
        raw.sendall(hello[i:i + int(size)])
        time.sleep(int(pause_ms) / 1000)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    answer = b""
    while not answer.endswith(b"\n"):
        try:
            answer += tls.read(4096)
        except ssl.SSLWantReadError:
            pump()
        except ssl.SSLZeroReturnError:
            break
    raw.close()
    silent = socket.create_connection((host, int(port)), timeout=5)
    began = time.time()
    try:
        got = silent.recv(100)
    except OSError as e:
        got = repr(e).encode()
    closed_after = time.time() - began
    silent.close()
    print(json.dumps({"hello_bytes": len(hello), "answer": json.loads(answer), "silent_closed_after": closed_after,
                      "silent_got": got.decode(errors="replace")}))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"tally": tally, "probe": probe, "refused": refused, "peer": peer,
     "stream-server": stream_server, "stream-client": stream_client, "listen": listen,
     "matrix": matrix, "udp-hold": udp_hold, "udp-name": udp_name, "udp-tally": udp_tally, "udp-rate": udp_rate, "first-change": first_change, "connect-rate": connect_rate, "steady": steady,
     "http-load": http_load, "http-steady": http_steady, "late-request": late_request, "ws-echo": ws_echo, "h2-ws-echo": h2_ws_echo,
     "h2-window": h2_window, "h2-drain": h2_drain, "h2-request": h2_request, "h2-body": h2_body,
     "h2-half-close": h2_half_close, "h1-idle": h1_idle, "h1-slow": h1_slow, "h1-behind": h1_behind, "h2-slow": h2_slow, "h2-heads": h2_heads,
     "h1-close-send": h1_close_send, "tcp-hold": tcp_hold, "hold": hold,
     "churn": churn, "tls-server": tls_server, "tls-tally": tls_tally,
     "tls-pieces": tls_pieces}[command](*args)
