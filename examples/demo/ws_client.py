#!/usr/bin/env python3
"""A WebSocket client for the demo: ws_client.py HOST PORT COUNT SIZE
[HEADER...]. Upgrades GET /ws (each HEADER, "name: value", added to the
request), sends COUNT masked binary messages of SIZE bytes (SIZE < 65536),
one at a time, and checks that each comes back whole. Prints the status
line, the answering pod (X-Pod of the 101) and what was echoed; exits 1 on
any mismatch or error."""
import base64
import hashlib
import os
import socket
import sys
import time


def read_exactly(sock, n, held):
    while len(held) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed with %d of %d bytes" % (len(held), n))
        held += chunk
    return held[:n], held[n:]


def main():
    host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if not 0 < size < 65536:
        sys.exit("ws_client.py: SIZE must be 1..65535")
    extra = "".join(h + "\r\n" for h in sys.argv[5:])
    key = base64.b64encode(os.urandom(16)).decode()
    want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (host, key, extra)).encode())
        held = b""
        while b"\r\n\r\n" not in held:
            chunk = s.recv(4096)
            if not chunk:
                sys.exit("ws_client.py: closed before the answer's head")
            held += chunk
        head, held = held.split(b"\r\n\r\n", 1)
        lines = head.decode(errors="replace").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if not lines[0].startswith("HTTP/1.1 101") or fields.get("sec-websocket-accept") != want:
            sys.exit("ws_client.py: no WebSocket: %s" % lines[0])
        start = time.monotonic()
        for i in range(count):
            payload = os.urandom(size)
            mask = os.urandom(4)
            length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
            s.sendall(bytes([0x82]) + length + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload)))
            frame, held = read_exactly(s, 2, held)
            n = frame[1] & 0x7F
            if n == 126:
                ext, held = read_exactly(s, 2, held)
                n = int.from_bytes(ext, "big")
            echo, held = read_exactly(s, n, held)
            if frame[0] != 0x82 or echo != payload:
                sys.exit("ws_client.py: message %d came back different" % i)
        elapsed = time.monotonic() - start
        s.sendall(bytes([0x88, 0x80]) + os.urandom(4))
    print("  %s from %s; %d messages of %d B echoed whole, %.0f µs a round trip"
          % (lines[0], fields.get("x-pod", "?"), count, size, elapsed / count * 1e6))


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        sys.exit("ws_client.py: %s" % e)
