#!/usr/bin/python3
"""An independent reference for AuthorizationPolicy decisions, written from
Istio's documented semantics (not from Weft's Swift code), for the lab test
to judge what the mesh did against.

Usage: authzref.py POLICIES.yaml < requests.json > decisions.json
Each request: {"target": {"namespace", "labels"}, "principal", "namespace",
"ip", "port", "http": null | {"method", "path", "host", "headers": {}}}.
Each decision: true (allowed) or false.

Semantics: a policy applies to a workload in its namespace (or in
weft-system: every namespace) whose labels its selector matches (no
selector: all). DENY matches deny; then if any ALLOW policy applies, one of
its rules must match. A rule matches when some `from` source, some `to`
operation and every `when` condition match. Strings match exactly, as
prefix*, *suffix, or * (present). Without an HTTP request, HTTP-only
fields make an ALLOW rule fail and are ignored in a DENY rule.
"""
import ipaddress
import json
import sys

import yaml

ROOT = "weft-system"


def match(pattern, value):
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def any_match(patterns, value):
    return any(match(p, value) for p in patterns)


def in_blocks(blocks, ip):
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(b if "/" in b else b + "/32") for b in blocks)


def check(positive, negative, value, fn):
    """positive: value must match one; negative: value must match none.
    An absent value never matches, so it fails positive, passes negative."""
    if positive is not None and (value is None or not fn(positive, value)):
        return False
    if negative is not None and value is not None and fn(negative, value):
        return False
    return True


def host_match(patterns, host):
    h = host.lower()
    bare = h.rsplit(":", 1)[0] if ":" in h and h.rsplit(":", 1)[1].isdigit() else h
    return any(match(p.lower(), h) or match(p.lower(), bare) for p in patterns)


def principal_list(xs):
    return None if xs is None else [x[len("spiffe://"):] if x.startswith("spiffe://") else x for x in xs]


HTTP_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")


def source_ok(src, req):
    s = src["source"]
    return (check(principal_list(s.get("principals")), principal_list(s.get("notPrincipals")), req["principal"], any_match)
            and check(s.get("namespaces"), s.get("notNamespaces"), req["namespace"], any_match)
            and check(s.get("ipBlocks"), s.get("notIpBlocks"), req["ip"], in_blocks))


def operation_ok(op, req, unknown_http):
    o = op["operation"]
    ports = [int(p) for p in o.get("ports", [])] if "ports" in o else None
    not_ports = [int(p) for p in o.get("notPorts", [])] if "notPorts" in o else None
    if ports is not None and req["port"] not in ports:
        return False
    if not_ports is not None and req["port"] in not_ports:
        return False
    if not any(f in o for f in HTTP_FIELDS):
        return True
    http = req["http"]
    if http is None:
        return unknown_http
    return (check(o.get("methods"), o.get("notMethods"), http["method"], any_match)
            and check(o.get("paths"), o.get("notPaths"), http["path"].split("?")[0], any_match)
            and check(o.get("hosts"), o.get("notHosts"), http.get("host"), host_match))


def condition_ok(c, req, unknown_http):
    key = c["key"]
    values, not_values = c.get("values"), c.get("notValues")
    if key.startswith("request.headers["):
        http = req["http"]
        if http is None:
            return unknown_http
        name = key[len("request.headers["):-1].lower()
        got = [v for k, v in http.get("headers", {}).items() if k.lower() == name]
        if values is not None and not any(any_match(values, g) for g in got):
            return False
        if not_values is not None and any(any_match(not_values, g) for g in got):
            return False
        return True
    if key == "source.ip":
        return check(values, not_values, req["ip"], in_blocks)
    if key == "source.namespace":
        return check(values, not_values, req["namespace"], any_match)
    if key == "source.principal":
        return check(principal_list(values), principal_list(not_values), req["principal"], any_match)
    if key == "destination.port":
        return check(values, not_values, str(req["port"]), any_match)
    raise ValueError("unknown key " + key)


def rule_ok(rule, req, unknown_http):
    if rule.get("from") and not any(source_ok(s, req) for s in rule["from"]):
        return False
    if rule.get("to") and not any(operation_ok(o, req, unknown_http) for o in rule["to"]):
        return False
    return all(condition_ok(c, req, unknown_http) for c in rule.get("when", []))


def applies(policy, target):
    ns = policy["metadata"]["namespace"]
    if ns != target["namespace"] and ns != ROOT:
        return False
    labels = ((policy.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return all(target["labels"].get(k) == v for k, v in labels.items())


def decide(policies, req):
    mine = [p for p in policies if applies(p, req["target"])]
    def action(p):
        return (p.get("spec") or {}).get("action", "ALLOW")
    def rules(p):
        return (p.get("spec") or {}).get("rules") or []
    for p in mine:
        if action(p) == "DENY" and any(rule_ok(r, req, True) for r in rules(p)):
            return False
    allows = [p for p in mine if action(p) == "ALLOW"]
    if not allows:
        return True
    return any(rule_ok(r, req, False) for p in allows for r in rules(p))


def main():
    with open(sys.argv[1]) as f:
        policies = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "AuthorizationPolicy"]
    requests = json.load(sys.stdin)
    print(json.dumps([decide(policies, r) for r in requests]))


if __name__ == "__main__":
    main()
