#!/usr/bin/env python3
"""Parses Prometheus text exposition on stdin with the reference parser
(prometheus_client's, not ours; with --openmetrics its strict OpenMetrics
parser) and prints every sample as one JSON line:
{"samples": [[name, {labels}, value], ...], "families": {name: type}}.
A parse error exits non-zero with the parser's message."""
import json
import sys

if "--openmetrics" in sys.argv:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families

text = sys.stdin.read()
samples, families = [], {}
try:
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for s in family.samples:
            samples.append([s.name, s.labels, s.value])
except Exception as e:  # noqa: BLE001 - report whatever the parser refused
    print(f"parse error: {e}", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"samples": samples, "families": families}))
