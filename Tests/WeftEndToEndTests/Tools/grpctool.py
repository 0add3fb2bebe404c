#!/usr/bin/python3
"""A gRPC server and client for the proxy tests, on Debian's python3-grpcio.
No generated stubs: methods carry raw bytes (identity serializers), so the
test needs no protoc. Service weft.Echo:
  Say    unary          -> b"<pod>:<request>"
  Count  server stream  -> n messages for request b"n"
  Chat   bidi stream    -> each message echoed as b"<pod>:<message>"
  Fail   unary          -> status UNAVAILABLE, details "on purpose"
  Drop   server stream  -> one message, then status UNAVAILABLE (in trailers)
  Maybe  unary          -> every other call of the server UNAVAILABLE (the first fails)
  Slow   unary          -> b"slow", 2 s late
  SetHealth unary        b"NAME=SERVING|NOT_SERVING": what Health/Check says for NAME
and grpc.health.v1.Health/Check (the gRPC Health Checking Protocol, its
protobuf messages written by hand): SERVING for "" and "weft.Echo" until
SetHealth says otherwise, NOT_FOUND for a service it does not know.
Every weft.Echo call ends with trailing metadata x-pod: <pod>.
Usage: grpctool.py serve PORT | grpctool.py call HOST PORT [NAME=VALUE...]
       | grpctool.py fail HOST PORT N [Fail|Drop|Maybe|Slow|Say] (N calls, one channel: their codes and
         the distinct details of the failures)
       | grpctool.py spread HOST PORT N (N Says, one channel: the pods that answered, and errors)
       | grpctool.py sethealth HOST PORT NAME=SERVING|NOT_SERVING
       | grpctool.py sticky HOST PORT N NAME (N Says in a Header session named NAME: the pods, the session)
       | grpctool.py watches HOST PORT N (N Chat streams open at once on one channel: how many echoed)
(call: every call carries the NAME=VALUE pairs as metadata)
"""
import json
import os
import sys
import threading
from concurrent import futures

import grpc

POD = os.environ.get("WEFT_POD_NAME", "unknown")


def serve(port):
    def say(request, context):
        context.set_trailing_metadata((("x-pod", POD),))
        return POD.encode() + b":" + request

    def count(request, context):
        context.set_trailing_metadata((("x-pod", POD),))
        for i in range(int(request)):
            yield b"%d" % i

    def chat(requests, context):
        context.set_trailing_metadata((("x-pod", POD),))
        for r in requests:
            yield POD.encode() + b":" + r

    def fail(request, context):
        context.set_trailing_metadata((("x-pod", POD),))
        context.abort(grpc.StatusCode.UNAVAILABLE, "on purpose")

    maybe_calls = [0]
    maybe_lock = threading.Lock()

    def maybe(request, context):
        context.set_trailing_metadata((("x-pod", POD),))
        with maybe_lock:
            maybe_calls[0] += 1
            odd = maybe_calls[0] % 2 == 1
        if odd:
            context.abort(grpc.StatusCode.UNAVAILABLE, "every other call")
        return POD.encode()

    def slow(request, context):
        import time
        time.sleep(2)
        return b"slow"

    def drop(request, context):
        context.set_trailing_metadata((("x-pod", POD),))
        yield b"first"
        context.abort(grpc.StatusCode.UNAVAILABLE, "after a message")

    health = {"": 1, "weft.Echo": 1}

    def health_check(request, context):
        # HealthCheckRequest: field 1 (tag 0x0a), a name shorter than 128 bytes.
        name = request[2:2 + request[1]].decode() if request[:1] == b"\x0a" else ""
        if name not in health:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return bytes([0x08, health[name]])  # HealthCheckResponse{status}

    def set_health(request, context):
        name, _, status = request.decode().partition("=")
        health[name] = {"SERVING": 1, "NOT_SERVING": 2}[status]
        return b"ok"

    health_handler = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(health_check),
    })
    handler = grpc.method_handlers_generic_handler("weft.Echo", {
        "SetHealth": grpc.unary_unary_rpc_method_handler(set_health),
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Drop": grpc.unary_stream_rpc_method_handler(drop),
        "Maybe": grpc.unary_unary_rpc_method_handler(maybe),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    })
    # (A stream's handler holds a worker while it is open: room for the
    # watches test's 150 at once.)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=200))
    server.add_generic_rpc_handlers((handler, health_handler))
    server.add_insecure_port("0.0.0.0:%d" % int(port))
    server.start()
    server.wait_for_termination()


def call(host, port, *pairs):
    out = {}
    md = tuple(tuple(p.split("=", 1)) for p in pairs)
    with grpc.insecure_channel("%s:%s" % (host, port)) as channel:
        say = channel.unary_unary("/weft.Echo/Say")
        replies = []
        for i in range(10):
            reply, c = say.with_call(b"hi-%d" % i, timeout=5, metadata=md)
            replies.append(reply.decode())
            out["say_trailer"] = dict(c.trailing_metadata()).get("x-pod")
        out["say"] = replies
        stream = channel.unary_stream("/weft.Echo/Count")(b"5", timeout=5, metadata=md)
        out["count"] = [m.decode() for m in stream]
        out["count_code"] = stream.code().name
        out["count_trailer"] = dict(stream.trailing_metadata() or ()).get("x-pod")
        chat = channel.stream_stream("/weft.Echo/Chat")(iter([b"a", b"b", b"c"]), timeout=5, metadata=md)
        out["chat"] = [m.decode() for m in chat]
        try:
            channel.unary_unary("/weft.Echo/Fail")(b"x", timeout=5, metadata=md)
            out["fail"] = "no error"
        except grpc.RpcError as e:
            out["fail"] = "%s %s" % (e.code().name, e.details())
    print(json.dumps(out))


def steady(host, port, seconds):
    """Unary calls on one channel for a while, 10 ms apart: how many were
    answered and every failure (drain tests)."""
    import time
    ok, failures = 0, []
    end = time.time() + float(seconds)
    with grpc.insecure_channel("%s:%s" % (host, port)) as channel:
        say = channel.unary_unary("/weft.Echo/Say")
        while time.time() < end:
            try:
                say(b"hi", timeout=5)
                ok += 1
            except grpc.RpcError as e:
                failures.append("%.3f %s %s" % (time.time(), e.code().name, e.details()))
            time.sleep(0.01)
    print(json.dumps({"ok": ok, "failures": failures}))


def fail(host, port, n, method="Fail"):
    codes, details = {}, []
    with grpc.insecure_channel("%s:%s" % (host, port)) as channel:
        if method == "Drop":
            stream = channel.unary_stream("/weft.Echo/Drop")
            call = lambda body, timeout: list(stream(body, timeout=timeout))
        else:
            call = channel.unary_unary("/weft.Echo/" + method)
        for _ in range(int(n)):
            try:
                call(b"x", timeout=5)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                if e.details() not in details:
                    details.append(e.details())
            codes[code] = codes.get(code, 0) + 1
    print(json.dumps({"codes": codes, "details": details}))


def spread(host, port, n):
    pods, errors = {}, []
    with grpc.insecure_channel("%s:%s" % (host, port)) as channel:
        say = channel.unary_unary("/weft.Echo/Say")
        for _ in range(int(n)):
            try:
                pod = say(b"x", timeout=5).decode().split(":")[0]
                pods[pod] = pods.get(pod, 0) + 1
            except grpc.RpcError as e:
                errors.append("%s %s" % (e.code().name, e.details()))
    print(json.dumps({"pods": pods, "errors": errors}))


def sticky(host, port, n, name):
    """N Says on one channel in a GRPCRoute's Header session: the first call
    without it, every later one carrying the value the first answer's
    headers gave in NAME. The pods that answered, and the session value."""
    pods, token, errors = {}, None, []
    with grpc.insecure_channel("%s:%s" % (host, port)) as channel:
        say = channel.unary_unary("/weft.Echo/Say")
        for _ in range(int(n)):
            try:
                reply, c = say.with_call(b"x", timeout=5, metadata=((name, token),) if token else ())
                pod = reply.decode().split(":")[0]
                pods[pod] = pods.get(pod, 0) + 1
                if token is None:
                    token = dict(c.initial_metadata()).get(name)
            except grpc.RpcError as e:
                errors.append("%s %s" % (e.code().name, e.details()))
    print(json.dumps({"pods": pods, "session": token, "errors": errors}))


def watches(host, port, n):
    """N Chat streams open at once on one channel (one HTTP/2 connection),
    as long-lived watches are: each sends a message and waits for its echo,
    and all stay open until every one has had its echo (or 20 s pass).
    How many were echoed, then how the streams ended."""
    import time
    n = int(n)
    release = threading.Event()

    def requests(i):
        yield b"w%d" % i
        release.wait(40)

    results = [None] * n
    with grpc.insecure_channel("%s:%s" % (host, port)) as channel:
        chat = channel.stream_stream("/weft.Echo/Chat")
        calls = [chat(requests(i), timeout=60) for i in range(n)]

        def first(i):
            try:
                results[i] = next(calls[i]).decode()
            except Exception as e:  # noqa: BLE001 (reported)
                results[i] = "error %s" % e

        threads = [threading.Thread(target=first, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        for t in threads:
            t.join(max(0.0, deadline - time.time()))
        echoed = sum(1 for r in results if r is not None and not r.startswith("error"))
        release.set()
        codes = {}
        for t, c in zip(threads, calls):
            if t.is_alive():
                # Still waiting for its echo (a second reader would be an
                # error): given up.
                c.cancel()
                codes["NO_ECHO"] = codes.get("NO_ECHO", 0) + 1
                continue
            try:
                for _ in c:
                    pass
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            codes[code] = codes.get(code, 0) + 1
    errors = [r for r in results if r is not None and r.startswith("error")][:5]
    print(json.dumps({"echoed": echoed, "codes": codes, "errors": errors}))


def sethealth(host, port, pair):
    with grpc.insecure_channel("%s:%s" % (host, port)) as channel:
        print(channel.unary_unary("/weft.Echo/SetHealth")(pair.encode(), timeout=5).decode())


if __name__ == "__main__":
    {"serve": serve, "call": call, "steady": steady, "fail": fail, "spread": spread,
     "sethealth": sethealth, "sticky": sticky, "watches": watches}[sys.argv[1]](*sys.argv[2:])
