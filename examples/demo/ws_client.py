#!/usr/bin/env python3
"""A WebSocket client for the demo: ws_client.py [--http2] HOST PORT COUNT
SIZE [HEADER...]. Upgrades GET /ws (each HEADER, "name: value", added to the
request), sends COUNT masked binary messages of SIZE bytes (SIZE < 65536),
one at a time, and checks that each comes back whole. Prints the status
line, the answering pod (X-Pod of the 101) and what was echoed; exits 1 on
any mismatch or error. With --http2: the same over an h2c connection with
prior knowledge, opened by an extended CONNECT (RFC 8441), once the server's
SETTINGS offer it (python3-h2)."""
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


def frame(payload):
    """A masked binary WebSocket frame."""
    size = len(payload)
    mask = os.urandom(4)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    return bytes([0x82]) + length + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload))


def unframe(held):
    """(opcode, payload, rest) of the first whole frame in HELD, or None."""
    if len(held) < 2:
        return None
    n, at = held[1] & 0x7F, 2
    if n == 126:
        if len(held) < 4:
            return None
        n, at = int.from_bytes(held[2:4], "big"), 4
    if len(held) < at + n:
        return None
    return held[0] & 0x0F, held[at:at + n], held[at + n:]


def over_http2(host, port, count, size, extra):
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(conn.data_to_send())
        state = {"offered": None, "status": None, "fields": {}, "held": b"", "ended": False}

        def pump():
            data = s.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.RemoteSettingsChanged):
                    c = e.changed_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL)
                    state["offered"] = bool(c and c.new_value == 1)
                elif isinstance(e, h2.events.ResponseReceived):
                    state["fields"] = dict(e.headers)
                    state["status"] = state["fields"].get(":status")
                elif isinstance(e, h2.events.DataReceived):
                    state["held"] += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                    state["ended"] = True
            out = conn.data_to_send()
            if out:
                s.sendall(out)

        while state["offered"] is None:
            pump()
        if not state["offered"]:
            sys.exit("ws_client.py: the server does not offer extended CONNECT")
        fields = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"), (":path", "/ws"),
                  (":authority", host), ("sec-websocket-version", "13")]
        fields += [(k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in extra)]
        conn.send_headers(1, fields)
        s.sendall(conn.data_to_send())
        while state["status"] is None and not state["ended"]:
            pump()
        if state["status"] != "200":
            sys.exit("ws_client.py: no WebSocket: :status %s" % state["status"])
        start = time.monotonic()
        for i in range(count):
            payload = os.urandom(size)
            conn.send_data(1, frame(payload))
            s.sendall(conn.data_to_send())
            while unframe(state["held"]) is None:
                if state["ended"]:
                    sys.exit("ws_client.py: the stream ended at message %d" % i)
                pump()
            opcode, echo, state["held"] = unframe(state["held"])
            if opcode != 2 or echo != payload:
                sys.exit("ws_client.py: message %d came back different" % i)
        elapsed = time.monotonic() - start
        conn.send_data(1, bytes([0x88, 0x80]) + os.urandom(4), end_stream=True)
        s.sendall(conn.data_to_send())
    print("  :status 200 on stream 1 from %s; %d messages of %d B echoed whole, %.0f µs a round trip"
          % (state["fields"].get("x-pod", "?"), count, size, elapsed / count * 1e6))


def main():
    args = sys.argv[1:]
    http2 = bool(args) and args[0] == "--http2"
    if http2:
        args = args[1:]
    host, port, count, size = args[0], int(args[1]), int(args[2]), int(args[3])
    if not 0 < size < 65536:
        sys.exit("ws_client.py: SIZE must be 1..65535")
    if http2:
        return over_http2(host, port, count, size, args[4:])
    extra = "".join(h + "\r\n" for h in args[4:])
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
            s.sendall(frame(payload))
            head, held = read_exactly(s, 2, held)
            n = head[1] & 0x7F
            if n == 126:
                ext, held = read_exactly(s, 2, held)
                n = int.from_bytes(ext, "big")
            echo, held = read_exactly(s, n, held)
            if head[0] != 0x82 or echo != payload:
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
