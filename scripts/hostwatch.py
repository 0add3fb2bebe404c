#!/usr/bin/env python3
"""Finds the moments when the VM itself runs slow, so a latency benchmark can
say which of its slow requests the host caused.

On the shared VMs this project is benchmarked on, every vCPU now and then
runs at a small fraction of its speed for about 100 ms, every few seconds,
with nothing in the guest to show for it: no steal time, no interrupts, no
other task (the top of docs/benchmarks.md). A request in flight then
takes milliseconds whatever serves it, and at 1,000 requests/s those windows
alone make a p99.

The watch is a process that, every 2 ms, times a fixed piece of work in its
own thread's CPU time. Being preempted by the guest's other tasks does not
count (a thread's CPU clock stops while it waits); the host taking the vCPU
away, or starving it, does, because the guest cannot tell and keeps charging
the thread. A unit costing more than 3x its usual CPU time is slow; three
slow units less than 50 ms apart open a window, which closes 2 ms after the last
one. The reference cost is the lowest any watch of the run calibrated, so a run
spent wholly inside a slowdown shows as slow throughout.
It costs about 7% of one core (0.68 s of CPU in a 10 s watch), the same for
every side of a benchmark.

    with HostWatch() as watch:
        ...run the load...
    watch.windows          # [(start, end)] in seconds since the epoch
    quiet(rows, watch.windows)   # rows (start_us, latency_us, ...) that
                                 # overlap none of them

`scripts/hostwatch.py --show [SECONDS]` watches on its own and lists the windows.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

PERIOD = 0.002
UNIT = 1500
SLOW = 3.0
MIN_UNITS = 3
MERGE = 0.050
MARGIN = 0.002


def _work(n):
    x = 0
    for i in range(n):
        x += i
    return x


def calibrate(units=300):
    """What the work unit usually costs, in ns of thread CPU time: a low
    percentile, what it costs when nothing slows it."""
    costs = []
    for _ in range(units):
        c0 = time.thread_time_ns()
        _work(UNIT)
        costs.append(time.thread_time_ns() - c0)
        time.sleep(0.0005)
    costs.sort()
    return costs[len(costs) // 5]


def _watch(out, seconds, known):
    # A run that starts inside a long slowdown would calibrate slow and see
    # nothing: the lowest usual cost known to the caller is the reference.
    own = calibrate()
    usual = min(own, known) if known else own
    units = []
    end = time.time() + seconds
    while True:
        t0 = time.time()
        if t0 >= end:
            break
        c0 = time.thread_time_ns()
        _work(UNIT)
        cost = time.thread_time_ns() - c0
        units.append((t0, time.time(), cost > SLOW * usual))
        if os.path.exists(out + ".stop"):
            break
        time.sleep(PERIOD)
    windows = []
    slow = [(a, b) for a, b, s in units if s]
    i = 0
    while i < len(slow):
        j = i
        while j + 1 < len(slow) and slow[j + 1][0] - slow[j][1] < MERGE:
            j += 1
        if j - i + 1 >= MIN_UNITS:
            windows.append((slow[i][0] - MARGIN, slow[j][1] + MARGIN))
        i = j + 1
    with open(out, "w") as f:
        json.dump({"usual_ns": own, "units": len(units), "slow_units": len(slow), "windows": windows,
                   "start": units[0][0] if units else None, "end": units[-1][1] if units else None}, f)


class HostWatch:
    """Watches while the block runs. The lowest usual cost seen by any watch
    of this process is the reference for all later ones, so a run spent
    wholly inside a slowdown shows as slow throughout."""
    reference_ns = None

    def __init__(self, limit_seconds=120):
        self.out = tempfile.mktemp(prefix="weft-hostwatch-", dir="/tmp")
        self.limit = limit_seconds
        if HostWatch.reference_ns is None:
            HostWatch.reference_ns = calibrate()
        self.windows = []
        self.covered = 0.0
        self.span = 0.0

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.out, str(self.limit),
                                      str(HostWatch.reference_ns)])
        time.sleep(0.6)  # calibration
        return self

    def __exit__(self, *exc):
        open(self.out + ".stop", "w").close()
        try:
            self.proc.wait(timeout=10)
            data = json.load(open(self.out))
            self.windows = [tuple(w) for w in data["windows"]]
            HostWatch.reference_ns = min(HostWatch.reference_ns, data["usual_ns"])
            self.covered = sum(b - a for a, b in self.windows)
            self.span = (data["end"] - data["start"]) if data["start"] else 0.0
        except (subprocess.TimeoutExpired, OSError, ValueError) as e:
            # No windows: the quiet figures of this run are its plain ones.
            print(f"hostwatch: no verdict for this run ({e})", file=sys.stderr, flush=True)
            self.proc.kill()
            self.proc.wait()
        finally:
            for p in (self.out, self.out + ".stop"):
                if os.path.exists(p):
                    os.unlink(p)
        return False

    @property
    def share(self):
        """The part of the watched time the host was slow."""
        return self.covered / self.span if self.span else 0.0


def quiet(rows, windows):
    """The rows (start_us, latency_us, ...) in flight during no window."""
    if not windows:
        return list(rows)
    ws = sorted(windows)
    out = []
    for row in rows:
        a = row[0] / 1e6
        b = a + row[1] / 1e6
        if not any(wa < b and a < wb for wa, wb in ws):
            out.append(row)
    return out


def show(seconds):
    """`scripts/hostwatch.py --show [SECONDS]`: watch an idle machine and say
    when the host slowed it."""
    t0 = time.time()
    with HostWatch(limit_seconds=seconds + 5) as watch:
        time.sleep(seconds)
    for a, b in watch.windows:
        print(f"{a - t0:7.2f} s  slow for {1000 * (b - a):4.0f} ms")
    print(f"host slow {watch.share:.1%} of {watch.span:.1f} s ({len(watch.windows)} windows)")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--show":
        show(float(sys.argv[2]) if len(sys.argv) > 2 else 10.0)
    else:
        _watch(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
