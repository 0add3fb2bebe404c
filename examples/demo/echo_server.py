#!/usr/bin/env python3
"""A tiny HTTP server for lab pods: answers every GET with the pod's identity,
so a client can see which replica a Service sent it to. A GET that asks to
upgrade to WebSocket is answered 101 (naming the pod in X-Pod), then every
message is echoed back until the client closes (ws_client.py). With
`--tls PORT` it also serves HTTPS there, with a self-signed certificate naming
the pod (made with openssl at start; the files are removed once loaded)."""
import base64
import hashlib
import http.server
import os
import sys

POD = os.environ.get("WEFT_POD_NAME", "unknown")
NODE = os.environ.get("WEFT_NODE", "unknown")
IP = os.environ.get("WEFT_POD_IP", "0.0.0.0")
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 8080


def frames(stream):
    """Each WebSocket frame read from STREAM, as (opcode, unmasked payload),
    until EOF."""
    while len(head := stream.read(2)) == 2:
        length = head[1] & 0x7F
        if length >= 126:
            length = int.from_bytes(stream.read(2 if length == 126 else 8), "big")
        mask = stream.read(4) if head[1] & 0x80 else bytes(4)
        yield head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(stream.read(length)))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        size = 0
        if self.path.startswith("/bytes/"):
            size = int(self.path.split("/")[2])
        body = (f"pod={POD} node={NODE} ip={IP} path={self.path}\n").encode()
        if size:
            body = b"x" * size
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pod", POD)
        self.end_headers()
        self.wfile.write(body)

    def websocket(self):
        """RFC 6455: the handshake, then each frame's payload sent back in an
        unmasked frame of the same type, until a close frame or EOF."""
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.send_header("X-Pod", POD)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        for opcode, payload in frames(self.rfile):
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            size = bytes([len(payload)]) if len(payload) < 126 else bytes([126]) + len(payload).to_bytes(2, "big")
            self.wfile.write(bytes([0x80 | opcode]) + size + payload)
            self.wfile.flush()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer.allow_reuse_address = True
if "--tls" in sys.argv:
    import shutil
    import ssl
    import subprocess
    import tempfile
    import threading
    where = tempfile.mkdtemp(prefix="weft-demo-tls-")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", where + "/key.pem", "-out", where + "/cert.pem", "-days", "30", "-subj", "/CN=" + POD],
                       check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(where + "/cert.pem", where + "/key.pem")
    finally:
        shutil.rmtree(where, ignore_errors=True)
    secure = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[sys.argv.index("--tls") + 1])), Handler)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    threading.Thread(target=secure.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
