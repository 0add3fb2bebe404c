#!/usr/bin/env python3
"""A tiny HTTP server for lab pods: answers every GET with the pod's identity,
so a client can see which replica a Service sent it to."""
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
http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
