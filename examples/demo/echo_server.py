#!/usr/bin/env python3
"""A tiny HTTP server for lab pods: answers every GET with the pod's identity,
so a client can see which replica a Service sent it to. With `--tls PORT` it
also serves HTTPS there, with a self-signed certificate naming the pod (made
with openssl at start; the files are removed once loaded)."""
import http.server
import os
import sys

POD = os.environ.get("WEFT_POD_NAME", "unknown")
NODE = os.environ.get("WEFT_NODE", "unknown")
IP = os.environ.get("WEFT_POD_IP", "0.0.0.0")
PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 8080


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
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
