#!/usr/bin/python3
"""Speaks to a node proxy's tunnel port the way another node's proxy does:
TLS 1.3 with a client certificate, ALPN h2, then one HTTP/2 CONNECT stream
(python3-h2). Prints one JSON line of what happened; the test judges.

  tunnelprobe.py sni SPIFFE-URI
      the server name that asks a proxy for that identity's certificate
  tunnelprobe.py connect HOST PORT DEST-URI CERT KEY CA AUTHORITY SOURCE [PAYLOAD]
      {"tls": "ok"|error, "peer_uri": ..., "status": N, "reason": ..., "echo": ...}
"""
import hashlib
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def sni(uri):
    return hashlib.sha256(uri.encode()).hexdigest()[:24] + ".id.weft"


def connect(host, port, dest, cert, key, ca, authority, source, payload=b""):
    out = {}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, int(port)), timeout=3)
    try:
        s = ctx.wrap_socket(raw, server_hostname=sni(dest))
    except (ssl.SSLError, OSError) as e:
        out["tls"] = "handshake: %s" % e
        return out
    out["tls"] = "ok"
    der = s.getpeercert()
    out["peer_uri"] = [v for k, v in der.get("subjectAltName", ()) if k == "URI"]
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "CONNECT"), (":authority", authority), ("x-weft-source", source)])
    try:
        s.sendall(conn.data_to_send())
        echo = b""
        sent = False
        while True:
            data = s.recv(65535)
            if not data:
                out.setdefault("status", 0)
                out["closed"] = True
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    headers = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
                                   for k, v in ev.headers)
                    out["status"] = int(headers.get(":status", "0"))
                    out["reason"] = headers.get("x-weft-reason")
                    if out["status"] == 200 and not sent:
                        conn.send_data(stream, payload, end_stream=True)
                        sent = True
                elif isinstance(ev, h2.events.DataReceived):
                    echo += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, stream)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    out["echo"] = echo.decode(errors="replace")
                    return out
            s.sendall(conn.data_to_send())
    except (ssl.SSLError, OSError) as e:
        out["error"] = str(e)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "sni":
        print(json.dumps({"sni": sni(sys.argv[2])}))
    else:
        a = sys.argv[2:]
        print(json.dumps(connect(*a[:8], payload=(a[8].encode() if len(a) > 8 else b""))))
