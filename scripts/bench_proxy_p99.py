#!/usr/bin/env python3
"""Issue #4's latency target, settled by count: is Weft's added p99 at the
fixed load no higher than HAProxy's?

`scripts/bench proxy` measures everything the issue asks for in a few long
rounds; in its runs the per-round difference between the two p99s moves by
hundreds of µs either way with the host, so a handful of rounds cannot tell
a real difference from the host's luck. This runs only what that question
needs, many times: the same lab, proxies, load and interleaving as
`scripts/bench proxy` (scripts/bench_proxy.py), the fixed load alone, on
direct, Weft and HAProxy, in WEFT_BENCH_P99_ROUNDS rounds (default 30).

Per round and load, each side's p99 over its slices; Weft's minus HAProxy's
is the round's paired difference (direct's part cancels). Over the rounds:
- the sign test: in how many rounds Weft's was the lower, and the chance of
  a split at least that uneven were the two p99s alike (exact binomial);
- the median of the differences with a distribution-free 95% interval
  (order statistics; no assumption on the differences' shape).
The interval below zero says Weft's added p99 is lower; above zero, higher;
across zero, that this many rounds cannot tell them apart.

WEFT_BENCH_P99_LOADS (comma-separated; default every load) runs only some
of the loads. WEFT_BENCH_P99_MINUTES=N starts no round after N minutes
(the rounds done by then are the run; a stop set by the clock, never by
what the rounds say, so it leaves the statistics as they are). Every run's rounds are kept in
docs/bench-proxy-p99[-pinned]-runs.json, and the section also gives the
statistics over all runs' rounds together, per load, each run counted
whatever it said: at 95% and at the stricter level that keeps 95% over as
many looks as there were runs (Bonferroni: 1 - 0.05 / runs), since
pooling after each new run looks at the data again.

--pinned: the proxies on one core, everything else on the other, as
`scripts/bench proxy-pinned`. Writes its own section of docs/benchmarks.md
and docs/bench-proxy-p99[-pinned].json.
"""
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy as b  # noqa: E402
from benchdoc import revision, sh, write_section  # noqa: E402

ROUNDS = int(os.environ.get("WEFT_BENCH_P99_ROUNDS", "30"))
MINUTES = float(os.environ.get("WEFT_BENCH_P99_MINUTES", "0")) or None
SIDES = ["direct", "weft", "haproxy"]
LEVEL = 0.95
LOADS = os.environ.get("WEFT_BENCH_P99_LOADS", ",".join(b.LOADS)).split(",")
if not LOADS or any(load not in b.LOADS for load in LOADS):
    raise SystemExit(f"WEFT_BENCH_P99_LOADS: loads from {list(b.LOADS)}, comma-separated; got {LOADS}")
RUNS = os.path.join(b.ROOT, f"docs/bench-proxy-p99{b.SUFFIX}-runs.json")


def binomial_cdf(k, n):
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2 ** n if k >= 0 else 0.0


def sign_test(diffs):
    """Rounds Weft lower, higher and tied, and the two-sided chance of a
    split at least this uneven were both sides alike (ties left out)."""
    lower, higher = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    n = lower + higher
    p = min(1.0, 2 * binomial_cdf(min(lower, higher), n)) if n else 1.0
    return {"lower": lower, "higher": higher, "tied": len(diffs) - n, "p_two_sided": p}


def median_interval(diffs, level=LEVEL):
    """A distribution-free interval for the median of `diffs`: the j-th
    smallest and j-th largest, j the largest rank whose two tails together
    keep at least `level` (its exact confidence returned too). None when too
    few rounds reach `level` at all."""
    xs, n = sorted(diffs), len(diffs)
    best = None
    for j in range(1, n // 2 + 1):
        tails = 2 * binomial_cdf(j - 1, n)
        if tails <= 1 - level:
            best = (xs[j - 1], xs[n - j], 1 - tails)
    return best


def verdict(interval):
    if interval is None:
        return "too few rounds"
    lo, hi, _ = interval
    if hi < 0:
        return "Weft lower"
    if lo > 0:
        return "Weft higher"
    return "not told apart"


def summarise(rounds, load, level=LEVEL):
    """Per load: each side's median p99 added over direct, and the paired
    statistics for p99, quiet p99 and p50 (intervals at `level`)."""
    rs = rounds[load]
    out = {"rounds": len(rs)}
    for name in ("weft", "haproxy"):
        out[f"{name}_added_p99_us"] = statistics.median(r[name]["p99_us"] - r["direct"]["p99_us"] for r in rs)
        out[f"{name}_added_p50_us"] = statistics.median(r[name]["p50_us"] - r["direct"]["p50_us"] for r in rs)
    for key, get in (("p99", lambda s: s["p99_us"]), ("quiet_p99", lambda s: s["quiet"]["p99_us"]),
                     ("p50", lambda s: s["p50_us"])):
        diffs = [get(r["weft"]) - get(r["haproxy"]) for r in rs]
        out[key] = {"diffs": diffs, "median": statistics.median(diffs), "interval": median_interval(diffs, level),
                    **sign_test(diffs)}
        out[key]["verdict"] = verdict(out[key]["interval"])
    out["failed"] = {name: sum(r[name]["failed"] for r in rs) for name in SIDES}
    out["host_slow"] = statistics.median(max(r[name]["host_slow"] for name in SIDES) for r in rs)
    return out


def compact(got):
    """A round's sides with what summarise reads, for the runs file."""
    return {name: {"p99_us": s["p99_us"], "p50_us": s["p50_us"], "quiet": {"p99_us": s["quiet"]["p99_us"]},
                   "failed": s["failed"], "host_slow": s["host_slow"]} for name, s in got.items()}


def pool(runs):
    """Every run's rounds together, per load: the summary at 95% and at
    1 - 0.05 / (runs of that load), with the runs' revisions."""
    out = {}
    for load in b.LOADS:
        with_load = [r for r in runs if r["rounds"].get(load)]
        if not with_load:
            continue
        rounds = {load: [x for r in with_load for x in r["rounds"][load]]}
        strict = 1 - (1 - LEVEL) / len(with_load)
        out[load] = {"runs": [f"{r['revision']} ({len(r['rounds'][load])})" for r in with_load],
                     "level": summarise(rounds, load), "strict": summarise(rounds, load, strict)}
    return out


def main():
    started = time.time()
    rounds = {load: [] for load in LOADS}
    repeated = kept_disturbed = 0
    with b.proxies_lab():
        for k in range(ROUNDS):
            if MINUTES and time.time() - started > 60 * MINUTES:
                print(f"{MINUTES:g} minutes gone: no more rounds ({k} run)", flush=True)
                break
            order = SIDES[k % len(SIDES):] + SIDES[:k % len(SIDES)]
            for load in LOADS:
                def one_round():
                    got = {name: [] for name in order}
                    for j in range(b.SLICES):
                        for name in (order if j % 2 == 0 else order[::-1]):
                            got[name].append(b.h2load_watched(b.TARGETS[name][load], load, b.FIXED_SLICE_S, b.RATE,
                                                              keep_rows=True))
                    pooled = {name: b.pooled(slices) for name, slices in got.items()}
                    return pooled, list(pooled.values())
                got, again, still = b.until_calm(one_round, f"round {k + 1} {load}")
                repeated += again
                kept_disturbed += still
                rounds[load].append(got)
                w, h, d = got["weft"], got["haproxy"], got["direct"]
                print(f"round {k + 1}/{ROUNDS} {load}: p99 direct {d['p99_us']} weft {w['p99_us']} haproxy {h['p99_us']} µs "
                      f"(weft - haproxy {w['p99_us'] - h['p99_us']:+d}); p50 {d['p50_us']} / {w['p50_us']} / {h['p50_us']} µs; "
                      f"host slow {max(r['host_slow'] for r in got.values()):.1%} "
                      f"[{(time.time() - started) / 60:.1f} min]", flush=True)
    summary = {load: summarise(rounds, load) for load in LOADS}
    minutes = (time.time() - started) / 60
    done = len(rounds[LOADS[0]])
    with open(os.path.join(b.ROOT, f"docs/bench-proxy-p99{b.SUFFIX}.json"), "w") as f:
        json.dump({"summary": summary, "rounds": rounds, "repeated": repeated, "kept_disturbed": kept_disturbed,
                   "minutes": minutes}, f, indent=1)
    runs = json.load(open(RUNS)) if os.path.exists(RUNS) else []
    runs.append({"revision": revision(), "date": time.strftime("%Y-%m-%d"), "minutes": round(minutes),
                 "rounds": {load: [compact(r) for r in rs] for load, rs in rounds.items()}})
    with open(RUNS, "w") as f:
        json.dump(runs, f, indent=None, separators=(",", ":"))
        f.write("\n")
    report(summary, repeated, kept_disturbed, minutes, pool(runs), done)


def interval_text(s):
    if s["interval"] is None:
        return "–"
    lo, hi, conf = s["interval"]
    return f"{lo:+.0f} … {hi:+.0f} µs ({conf:.1%})"


def report(summary, repeated, kept_disturbed, minutes, pooled, done):
    h2 = sh("h2load", "--version").split("\n")[0]
    lines = [
        "## L7 proxy: the fixed-load p99, Weft vs HAProxy, by count" + (", one core each" if b.PINNED else "")
        + " (issue #4)",
        "",
        f"Made by `{'' if LOADS == list(b.LOADS) else 'WEFT_BENCH_P99_LOADS=' + ','.join(LOADS) + ' '}"
        f"WEFT_BENCH_P99_ROUNDS={ROUNDS} {f'WEFT_BENCH_P99_MINUTES={MINUTES:g} ' if MINUTES else ''}"
        f"scripts/bench proxy-p99{b.SUFFIX}` ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, kernel {os.uname().release}), release build at {revision()} (as `scripts/bench` builds it); "
        f"{done} rounds of {', '.join(LOADS)}, {minutes:.0f} minutes. The lab, proxies, configurations, load ({h2}) and interleaving of "
        f"`scripts/bench proxy{b.SUFFIX}` (its section is above), the fixed load only "
        f"({b.RATE} requests/s; HTTP/1.1 16 connections, HTTP/2 4 connections x 8 streams), on direct, Weft and HAProxy: "
        f"{b.FIXED_SLICE_S * b.SLICES} s per side, load and round in {b.SLICES} slices, every side in turn in each slice, "
        "the order rotating by round and mirrored every other slice. A round's p99 is over all of a side's requests in it; "
        "its paired difference is Weft's minus HAProxy's (direct's part cancels). Rounds the host slowed for more than "
        f"{b.DISTURBED:.0%} of a run were run again (rounds run again: {repeated}; kept still over it: {kept_disturbed}).",
        "",
        "The few rounds of that section cannot tell the proxies' p99s apart from the host's luck: a round's "
        "difference moves by hundreds of µs either way. Here: the sign test (in how many rounds Weft's p99 was the "
        "lower; *p*, the two-sided chance of a split at least that uneven were the two alike) and the median of the "
        f"rounds' differences with a distribution-free {LEVEL:.0%} interval (order statistics, exact confidence in "
        "brackets). An interval wholly below zero says Weft's is lower; one across zero, that these rounds cannot tell.",
        "",
        "| load | measure | Weft − HAProxy, median | interval | rounds Weft lower / higher / tied | p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"p99": "added p99", "quiet_p99": "quiet added p99", "p50": "added p50"}
    for load, s in summary.items():
        for key, label in names.items():
            t = s[key]
            lines.append(f"| {load} | {label} | {t['median']:+.0f} µs | {interval_text(t)} | {t['lower']} / {t['higher']} / "
                         f"{t['tied']} | {t['p_two_sided']:.2g} | {t['verdict']} |")
    lines += ["", "Each side's medians over the rounds, added over direct:", "",
              "| load | Weft added p50 | HAProxy added p50 | Weft added p99 | HAProxy added p99 | failed (direct / weft / haproxy) |",
              "|---|---|---|---|---|---|"]
    for load, s in summary.items():
        f = s["failed"]
        lines.append(f"| {load} | {s['weft_added_p50_us']:.0f} µs | {s['haproxy_added_p50_us']:.0f} µs | "
                     f"{s['weft_added_p99_us']:.0f} µs | {s['haproxy_added_p99_us']:.0f} µs | "
                     f"{f['direct']} / {f['weft']} / {f['haproxy']} |")
    lines += ["", "Every round's p99 difference, Weft minus HAProxy, sorted (µs):", ""]
    for load, s in summary.items():
        lines.append(f"- {load}: {' '.join(f'{d:+d}' for d in sorted(s['p99']['diffs']))}")
    lines += ["", f"Every run's rounds together (`docs/bench-proxy-p99{b.SUFFIX}-runs.json`; each run counted, whatever it "
              "said; the stricter interval keeps 95% over as many looks as there were runs):", "",
              "| load | runs (rounds) | measure | Weft − HAProxy, median | 95% interval | stricter interval | "
              "rounds Weft lower / higher / tied | p | verdict at 95% / stricter |",
              "|---|---|---|---|---|---|---|---|---|"]
    for load, s in pooled.items():
        for key in ("p99", "p50"):
            t, u = s["level"][key], s["strict"][key]
            lines.append(f"| {load} | {', '.join(s['runs'])} | added {key} | {t['median']:+.0f} µs | {interval_text(t)} | "
                         f"{interval_text(u)} | {t['lower']} / {t['higher']} / {t['tied']} | {t['p_two_sided']:.2g} | "
                         f"{t['verdict']} / {u['verdict']} |")
    write_section("proxy_p99_pinned" if b.PINNED else "proxy_p99", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
