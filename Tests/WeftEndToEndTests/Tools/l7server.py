#!/usr/bin/env python3
"""An HTTP/1.1 backend for the proxy tests. Every response names the pod and
echoes what the request looked like on arrival (method, path, headers), so a
test can see what the proxy did to it. Behaviour by path:
  /status/NNN      answer with that status
  /sleep/MS        wait MS milliseconds first
  /flaky/RATE      answer 503 with probability RATE (0..1)
  /__count         how many requests this server has seen (not counted)
  /__sent          body bytes /bytes/N answers have written so far (not counted)
  /__set?fail=R&delay=MS&health=CODE
                   from now on: 503 on share R of requests, wait MS first,
                   answer /healthz with CODE (not counted)
  /__exit          the server process ends at once (a dead backend); the
                   answer says when: {"exiting_at": unix seconds}
  /healthz         200, or the code /__set gave (not counted)
  /chunked/N       the usual answer in N chunks (Transfer-Encoding: chunked)
  /unframed        the usual answer with no length: it ends when the server
                   closes the connection
Usage: l7server.py PORT [--fail-rate R]  (R: 503 on that share of every request)
"""
import hashlib
import json
import os
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POD = os.environ.get("WEFT_POD_NAME", "unknown")
FAIL_RATE = 0.0
DELAY_MS = 0
HEALTH = 200
COUNT = 0
SENT = 0
# 261 periods of i % 251: /bytes/N writes its body in these blocks.
BLOCK = bytes(i % 251 for i in range(251 * 261))
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, Nagle's
    # algorithm holds the body for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def websocket(self):
        """RFC 6455 handshake, then echo text frames until the client closes."""
        import base64, hashlib
        key = self.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept)
        self.send_header("x-pod", POD)
        self.end_headers()
        self.close_connection = True
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(self.rfile.read(2), "big")
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            reply = ("%s:" % POD).encode() + payload
            self.wfile.write(bytes([0x81, len(reply)]) + reply)

    def handle_any(self):
        global COUNT, SENT, FAIL_RATE, DELAY_MS, HEALTH
        if self.headers.get("upgrade", "").lower() == "websocket":
            return self.websocket()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path
        if path == "/__count":
            return self.reply(200, {"pod": POD, "count": COUNT})
        if path == "/__sent":
            return self.reply(200, {"pod": POD, "sent": SENT})
        if path == "/healthz":
            return self.reply(HEALTH, {"pod": POD, "health": HEALTH})
        if path == "/__exit":
            # Says when it dies (the clock is the machine's: the test can
            # measure from the moment itself, not from when its exec returned).
            self.reply(200, {"pod": POD, "exiting_at": time.time()})
            self.wfile.flush()
            os._exit(0)
        if path.startswith("/__set"):
            from urllib.parse import parse_qs, urlparse
            q = parse_qs(urlparse(path).query)
            FAIL_RATE = float(q.get("fail", [FAIL_RATE])[0])
            DELAY_MS = int(q.get("delay", [DELAY_MS])[0])
            HEALTH = int(q.get("health", [HEALTH])[0])
            return self.reply(200, {"pod": POD, "fail": FAIL_RATE, "delay": DELAY_MS, "health": HEALTH})
        with LOCK:
            COUNT += 1
        status = 200
        parts = path.split("?")[0].strip("/").split("/")
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
        elif parts[0] == "sleep" and len(parts) > 1:
            time.sleep(int(parts[1]) / 1000)
        elif parts[0] == "flaky" and len(parts) > 1 and random.random() < float(parts[1]):
            status = 503
        if DELAY_MS:
            time.sleep(DELAY_MS / 1000)
        if FAIL_RATE and random.random() < FAIL_RATE:
            status = 503
        answer = {"pod": POD, "method": self.command, "path": path, "body": len(body),
                  "body_sha256": hashlib.sha256(body).hexdigest(),
                  "headers": {k.lower(): v for k, v in self.headers.items()}}
        if parts[0] == "chunked" and len(parts) > 1:
            return self.reply_chunked(answer, int(parts[1]))
        if parts[0] == "bytes" and len(parts) > 1:
            # A large body, the same bytes every time: i % 251 (a prime, so
            # a slip of any short length shows).
            n = int(parts[1])
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                # Block by block, counted as each is written: a test can
                # see how far a reader's backpressure let the body go.
                for at in range(0, n, len(BLOCK)):
                    piece = BLOCK[:min(len(BLOCK), n - at)]
                    self.wfile.write(piece)
                    with LOCK:
                        SENT += len(piece)
            return
        if parts[0] == "unframed":
            data = (json.dumps(answer) + "\n").encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        self.reply(status, answer)

    def reply_chunked(self, obj, pieces):
        data = (json.dumps(obj) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            self.wfile.write(b"%x;n=%d\r\n%s\r\n" % (len(piece), i, piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\nx-done: yes\r\n\r\n")

    def reply(self, status, obj):
        data = (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-pod", POD)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = handle_any


def tcp_banner(port):
    """Raw TCP that speaks first: a banner, then an echo (passthrough tests)."""
    import socket
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)

    def serve(c):
        with c:
            c.sendall(("hello from %s\n" % POD).encode())
            while True:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(data)

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    port = int(sys.argv[1])
    if "--tcp-banner" in sys.argv:
        tcp_banner(port)
    if "--fail-rate" in sys.argv:
        FAIL_RATE = float(sys.argv[sys.argv.index("--fail-rate") + 1])
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 512
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
