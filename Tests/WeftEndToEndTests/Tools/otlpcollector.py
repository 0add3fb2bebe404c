#!/usr/bin/env python3
"""A minimal OTLP/HTTP collector for the tests: accepts POST /v1/traces with
the JSON encoding, keeps every span, and answers GET /spans with them all as
one JSON list (each span with its resource attributes under "resource").
Usage: otlpcollector.py PORT"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPANS = []
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        try:
            doc = json.loads(self.rfile.read(length))
            found = []
            for rs in doc["resourceSpans"]:
                resource = {a["key"]: a["value"] for a in rs["resource"]["attributes"]}
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        span["resource"] = resource
                        found.append(span)
        except (ValueError, KeyError, TypeError) as e:
            return self.reply(400, {"error": str(e)})
        with LOCK:
            SPANS.extend(found)
        self.reply(200, {})

    def do_GET(self):
        with LOCK:
            self.reply(200, SPANS)


ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
