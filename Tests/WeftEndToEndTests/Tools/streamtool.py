#!/usr/bin/env python3
"""Byte-stream torture for the same-node socket shortcut.

  streamtool.py serve PORT
      One thread per connection. The first line a client sends is a JSON
      header saying what to do: sink (read to EOF, optionally after a pause,
      with recv or splice, answer the length and sha256), echo (send back
      everything until EOF), reply (read to EOF, then send N bytes and
      close), push (send N bytes and close at once), result (what a reset connection with that id had read).

  streamtool.py wait HOST PORT
      Until the server answers.

  streamtool.py stress HOST PORT [--cases a,b,...] [--seconds S] [--upgrade]
      Runs the named cases against a server and prints one JSON line:
      {"ok": bool, "cases": {name: {"ok": bool, ...}}}. Every socket has a
      timeout, so a stuck connection fails its case instead of hanging.
      With --upgrade every connection starts as an HTTP/1.1 Upgrade (as a
      WebSocket does): the request, the JSON header right behind it before
      any answer, then the server's 101; the case runs on what follows.

Every byte is checked: lengths and SHA-256 digests on both sides.
"""
import hashlib
import json
import os
import select
import socket
import struct
import sys
import tempfile
import threading
import time

TIMEOUT = 30.0
results = {}            # reset-case id -> what the server read
results_lock = threading.Lock()


def pattern(n, seed=0):
    """n deterministic, non-repeating-looking bytes (cheap to make and check)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps, rest = divmod(n, len(block))
    return block * reps + block[:rest]


UPGRADE_REQUEST = (b"GET /stream HTTP/1.1\r\nHost: stream\r\nConnection: Upgrade\r\n"
                   b"Upgrade: weft-stream\r\n\r\n")
UPGRADED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: weft-stream\r\n\r\n"
upgrade = False         # stress --upgrade


def read_until(sock, end, what):
    buf = bytearray()
    while not buf.endswith(end):
        b = sock.recv(1)
        if not b:
            raise ConnectionError("EOF before " + what)
        buf += b
    return bytes(buf)


def read_line(sock):
    return json.loads(read_until(sock, b"\n", "the header line"))


def read_header(sock):
    """The client's JSON header; an Upgrade request before it is answered 101."""
    line = read_until(sock, b"\n", "the header line")
    if line.startswith(b"GET "):
        read_until(sock, b"\r\n\r\n", "the end of the Upgrade request")
        sock.sendall(UPGRADED)
        line = read_until(sock, b"\n", "the header line")
    return json.loads(line)


def read_to_eof(sock, method="recv"):
    h = hashlib.sha256()
    n = 0
    if method == "splice":
        r, w = os.pipe()
        try:
            while True:
                # A socket with a timeout is non-blocking underneath.
                if not select.select([sock], [], [], TIMEOUT)[0]:
                    raise TimeoutError("splice: nothing to read for %ss" % TIMEOUT)
                try:
                    k = os.splice(sock.fileno(), w, 1 << 16)
                except BlockingIOError:
                    continue
                if k == 0:
                    break
                while k:
                    d = os.read(r, k)
                    h.update(d)
                    n += len(d)
                    k -= len(d)
        finally:
            os.close(r)
            os.close(w)
    else:
        buf = bytearray(1 << 18)
        view = memoryview(buf)
        while True:
            k = sock.recv_into(buf)
            if k == 0:
                break
            h.update(view[:k])
            n += k
    return n, h.hexdigest()


def handle(conn):
    conn.settimeout(TIMEOUT)
    try:
        hdr = read_header(conn)
        case = hdr["case"]
        if case == "sink":
            if hdr.get("pause"):
                time.sleep(hdr["pause"])
            n, digest = read_to_eof(conn, hdr.get("method", "recv"))
            conn.sendall(json.dumps({"len": n, "sha256": digest}).encode() + b"\n")
        elif case == "echo":
            buf = bytearray(1 << 18)
            while True:
                k = conn.recv_into(buf)
                if k == 0:
                    break
                conn.sendall(memoryview(buf)[:k])
            conn.shutdown(socket.SHUT_WR)
        elif case == "reply":
            n, digest = read_to_eof(conn)
            conn.sendall(json.dumps({"len": n, "sha256": digest}).encode() + b"\n")
            conn.sendall(pattern(hdr["size"], seed=7))
            conn.shutdown(socket.SHUT_WR)
        elif case == "push":
            conn.sendall(pattern(hdr["size"], seed=9))   # then close, without waiting for the client's end
        elif case == "reset":
            got = bytearray()
            error = None
            try:
                while True:
                    d = conn.recv(1 << 16)
                    if not d:
                        break
                    got += d
            except OSError as e:
                error = e.__class__.__name__
            with results_lock:
                results[hdr["id"]] = {"len": len(got), "prefix": bytes(got) == pattern(len(got), seed=3), "error": error}
        elif case == "ping":
            conn.sendall(b"pong\n")
        elif case == "result":
            deadline = time.time() + 3
            while time.time() < deadline:
                with results_lock:
                    r = results.pop(hdr["id"], None)
                if r is not None:
                    break
                time.sleep(0.01)
            conn.sendall(json.dumps(r).encode() + b"\n")
    except Exception as e:  # a case failing must not take the server down
        print(f"connection failed: {e!r}", file=sys.stderr, flush=True)
    finally:
        conn.close()


def serve(port):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)   # dual stack: v4-mapped sockets
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(4096)
    print(f"streamtool listening on {port}", flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# ----- client cases -----

def dial(addr, header):
    s = socket.create_connection(addr, timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if upgrade:
        s.sendall(UPGRADE_REQUEST + json.dumps(header).encode() + b"\n")
        head = read_until(s, b"\r\n\r\n", "the answer to the Upgrade")
        if not head.startswith(b"HTTP/1.1 101 "):
            raise ConnectionError("the Upgrade was answered %r" % head[:60])
    else:
        s.sendall(json.dumps(header).encode() + b"\n")
    return s


def finish_sink(s, data_len, digest):
    s.shutdown(socket.SHUT_WR)
    answer = read_line(s)
    s.close()
    ok = answer == {"len": data_len, "sha256": digest}
    return {"ok": ok, "sent": data_len, "server": answer}


def case_sizes(addr, **_):
    out = {}
    for size in [1, 1000, 65536, 1 << 20, 16 << 20, 64 << 20]:
        data = pattern(size, seed=size)
        s = dial(addr, {"case": "sink"})
        s.sendall(data)
        out[str(size)] = finish_sink(s, size, hashlib.sha256(data).hexdigest())
    return {"ok": all(r["ok"] for r in out.values()), "sizes": out}


def case_small_writes(addr, **_):
    s = dial(addr, {"case": "sink"})
    h = hashlib.sha256()
    total = 0
    for i in range(20000):
        chunk = pattern(1 + i % 97, seed=i % 13)
        s.sendall(chunk)
        h.update(chunk)
        total += len(chunk)
    return finish_sink(s, total, h.hexdigest())


def case_writev(addr, **_):
    s = dial(addr, {"case": "sink"})
    h = hashlib.sha256()
    total = 0
    for i in range(200):
        bufs = [pattern(100 + j * 37, seed=i + j) for j in range(16)]
        sent = s.sendmsg(bufs)
        flat = b"".join(bufs)
        if sent < len(flat):
            s.sendall(flat[sent:])
        h.update(flat)
        total += len(flat)
    return finish_sink(s, total, h.hexdigest())


def case_sendfile(addr, **_):
    data = pattern(8 << 20, seed=11)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        s = dial(addr, {"case": "sink"})
        off = 0
        while off < len(data):
            # A socket with a timeout is non-blocking underneath: wait for room.
            select.select([], [s], [], TIMEOUT)
            try:
                off += os.sendfile(s.fileno(), f.fileno(), off, len(data) - off)
            except BlockingIOError:
                pass
    return finish_sink(s, len(data), hashlib.sha256(data).hexdigest())


def case_splice_send(addr, **_):
    data = pattern(4 << 20, seed=12)
    s = dial(addr, {"case": "sink"})
    r, w = os.pipe()
    try:
        off = 0
        while off < len(data):
            k = os.write(w, data[off:off + 65536])
            off += k
            while k:
                select.select([], [s], [], TIMEOUT)
                try:
                    k -= os.splice(r, s.fileno(), k)
                except BlockingIOError:
                    pass
    finally:
        os.close(r)
        os.close(w)
    return finish_sink(s, len(data), hashlib.sha256(data).hexdigest())


def case_splice_recv(addr, **_):
    """The server reads with splice(): only ever right if nothing is redirected into it."""
    data = pattern(8 << 20, seed=13)
    s = dial(addr, {"case": "sink", "method": "splice"})
    s.sendall(data)
    return finish_sink(s, len(data), hashlib.sha256(data).hexdigest())


def start_writer(s, data, err, pace=0.0):
    """Sends `data` (in 64 KiB pieces, `pace` seconds apart) then FIN, on a
    thread, so that the caller can read the echo meanwhile."""
    def writer():
        try:
            step = 1 << 16
            for off in range(0, len(data), step):
                s.sendall(data[off:off + step])
                if pace:
                    time.sleep(pace)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(repr(e))

    t = threading.Thread(target=writer)
    t.start()
    return t


def case_echo(addr, size=16 << 20, pace=0.0, **_):
    data = pattern(size, seed=21)
    s = dial(addr, {"case": "echo"})
    err = []
    t = start_writer(s, data, err, pace)
    n, digest = read_to_eof(s)
    t.join()
    s.close()
    return {"ok": not err and n == size and digest == hashlib.sha256(data).hexdigest(), "len": n, "errors": err}


def case_pingpong(addr, rounds=2000, size=200, **_):
    """Request and answer, one at a time: `rounds` messages of `size` bytes
    each echoed back whole before the next goes."""
    s = dial(addr, {"case": "echo"})
    bad = 0
    for i in range(rounds):
        p = pattern(size, seed=i % 251)
        s.sendall(p)
        got = bytearray()
        while len(got) < size:
            d = s.recv(size - len(got))
            if not d:
                break
            got += d
        bad += bytes(got) != p
    s.shutdown(socket.SHUT_WR)
    rest = s.recv(16)
    s.close()
    return {"ok": bad == 0 and rest == b"", "rounds": rounds, "bad": bad}


def read_slowly(s, pause):
    """To EOF, 16 KiB at a time with a pause after each: length and sha256."""
    h = hashlib.sha256()
    n = 0
    while True:
        d = s.recv(16 << 10)
        if not d:
            break
        h.update(d)
        n += len(d)
        time.sleep(pause)
    return n, h.hexdigest()


def case_slow_echo(addr, size=4 << 20, **_):
    """Echo to a reader that takes its time: the whole echo is written
    before the client has read most of it, so whoever relays it still holds
    bytes for the client when the server's end (FIN after its last byte)
    arrives. Every held byte must still arrive before the client's EOF."""
    data = pattern(size, seed=23)
    s = dial(addr, {"case": "echo"})
    err = []
    t = start_writer(s, data, err)
    n, digest = read_slowly(s, 0.001)
    t.join()
    s.close()
    return {"ok": not err and n == size and digest == hashlib.sha256(data).hexdigest(), "len": n, "errors": err}


def case_server_first(addr, size=8 << 20, **_):
    """The server sends and closes before the client has said anything more
    or read much: its last bytes, and its end after them, wait in whoever
    relays them for a slow reader that never half-closes."""
    s = dial(addr, {"case": "push", "size": size})
    n, digest = read_slowly(s, 0.0005)
    s.close()
    return {"ok": n == size and digest == hashlib.sha256(pattern(size, seed=9)).hexdigest(), "len": n}


def case_half_close(addr, **_):
    data = pattern(1 << 20, seed=31)
    s = dial(addr, {"case": "reply", "size": 3 << 20})
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)          # our half closes; the server's stays open
    answer = read_line(s)
    n, digest = read_to_eof(s)
    s.close()
    ok = answer == {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()} \
        and n == 3 << 20 and digest == hashlib.sha256(pattern(3 << 20, seed=7)).hexdigest()
    return {"ok": ok, "server": answer, "reply_len": n}


def case_reset(addr, **_):
    rid = f"{os.getpid()}-{time.time()}"
    s = dial(addr, {"case": "reset", "id": rid})
    s.sendall(pattern(256 << 10, seed=3))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                            # RST
    q = dial(addr, {"case": "result", "id": rid})
    r = read_line(q)
    q.close()
    # As with plain TCP, bytes not yet read when the RST lands may be lost
    # (through a proxy, the whole connection may never reach the server):
    # what was read must be an exact prefix, and the connection must end.
    return {"ok": r is None or r["prefix"], "server": r}


def case_backpressure(addr, **_):
    """The server sleeps 2 s before reading: the writer must be held back
    (by TCP's window once the receiver's queue is full), not allowed to pile
    up unbounded bytes in the kernel; then every byte still arrives."""
    total = 48 << 20
    data = pattern(total, seed=41)
    s = dial(addr, {"case": "sink", "pause": 2.0})
    s.setblocking(False)
    accepted = 0
    t0 = time.time()
    while time.time() - t0 < 1.5 and accepted < total:
        try:
            accepted += s.send(data[accepted:accepted + (1 << 16)])
        except BlockingIOError:
            time.sleep(0.005)
    s.settimeout(TIMEOUT)
    s.sendall(data[accepted:])
    r = finish_sink(s, total, hashlib.sha256(data).hexdigest())
    r["accepted_while_paused"] = accepted
    r["ok"] = r["ok"] and accepted < (24 << 20)
    return r


def case_concurrent(addr, count=1000, **_):
    socks = []
    payloads = []
    for i in range(count):
        s = dial(addr, {"case": "echo"})
        socks.append(s)
    for i, s in enumerate(socks):
        p = pattern(1024, seed=100 + i)
        payloads.append(p)
        s.sendall(p)
        s.shutdown(socket.SHUT_WR)
    bad = 0
    for s, p in zip(socks, payloads):
        got = bytearray()
        while True:
            d = s.recv(4096)
            if not d:
                break
            got += d
        s.close()
        bad += bytes(got) != p
    return {"ok": bad == 0, "connections": count, "bad": bad}


CASES = {
    "sizes": case_sizes, "small_writes": case_small_writes, "writev": case_writev, "sendfile": case_sendfile,
    "splice_send": case_splice_send, "splice_recv": case_splice_recv, "echo": case_echo,
    "slow_echo": case_slow_echo, "server_first": case_server_first,
    "half_close": case_half_close, "reset": case_reset, "backpressure": case_backpressure,
    "concurrent": case_concurrent, "pingpong": case_pingpong,
}


def stress(host, port, names, seconds):
    addr = (host, port)
    out = {}
    for name in names:
        t0 = time.time()
        try:
            if name == "long":
                # ~`seconds` of paced echo traffic, for disturbances mid-flow.
                r = case_echo(addr, size=32 << 20, pace=seconds / 512)
            else:
                r = CASES[name](addr)
        except Exception as e:
            r = {"ok": False, "error": repr(e)}
        r["seconds"] = round(time.time() - t0, 3)
        out[name] = r
    print(json.dumps({"ok": all(r["ok"] for r in out.values()), "cases": out}), flush=True)


def main():
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "wait":
        # Until the server answers a ping (servers start asynchronously).
        deadline = time.time() + 20
        while True:
            try:
                s = dial((sys.argv[2], int(sys.argv[3])), {"case": "ping"})
                ok = s.recv(16) == b"pong\n"
                s.close()
                if ok:
                    print(json.dumps({"ok": True}))
                    return
            except OSError:
                pass
            if time.time() > deadline:
                print(json.dumps({"ok": False}))
                sys.exit(1)
            time.sleep(0.05)
    elif sys.argv[1] == "stress":
        global upgrade
        names = list(CASES)
        seconds = 3.0
        args = sys.argv[4:]
        while args:
            if args[0] == "--upgrade":
                upgrade = True
                args = args[1:]
                continue
            if args[0] == "--cases":
                names = args[1].split(",")
            elif args[0] == "--seconds":
                seconds = float(args[1])
            args = args[2:]
        stress(sys.argv[2], int(sys.argv[3]), names, seconds)


if __name__ == "__main__":
    main()
