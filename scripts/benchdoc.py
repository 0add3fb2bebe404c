"""docs/benchmarks.md is written by several bench scripts; each owns one
section, between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, and
rewrites only that."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "docs/benchmarks.md")


def _revision():
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "Sources", "bpf", "Package.swift", "Package.resolved"],
                           capture_output=True, text=True).stdout.strip()
    return f"{rev} with uncommitted changes" if dirty else rev


# Taken when a benchmark starts (scripts/bench has just built it), not when
# it writes its table minutes later: the sources may have moved meanwhile.
_REVISION = _revision()


def revision():
    """The commit the measured build came from, marked when the sources
    (not the docs) differed from it when the benchmark started."""
    return _REVISION


HEADER = """# Benchmarks

Every table here is written by `scripts/bench` (all sections) or `scripts/bench SECTION`; each
section says when and how it was made. The machine is a shared VM: read the ratios, not the
absolute numbers.

The VM's host slows it without telling it. A C loop pinned to each vCPU of an idle VM runs
at as little as 7% of its speed for 60-150 ms every 1.5-3 s, on both vCPUs at once, while the guest
charges all that time to the loop as user time: no steal time, no interrupts, no softirq, no
other task. A request in flight then takes milliseconds, whatever serves it, and 4-6% of an
idle run falls in such a window (10-25% of a loaded one on a busy afternoon), more than the 1%
a p99 looks at. The latency benchmarks
(`proxy`, `mtls`) run `scripts/hostwatch.py` beside every measurement: a probe that times a
fixed piece of work every 2 ms in its own thread's CPU time, which the guest's own scheduling
does not inflate but the host's slowdown does. Their *quiet* columns leave out the requests
in flight during a window it found, on every side alike; the plain columns count every request.
It sees slowdowns of 3x or more: on a busy afternoon the host also slows the VM less, for
longer, and that still shows in the quiet figures, which is why rounds disturbed for more than
a quarter of a run are run again.
"""
ORDER = ["datapath", "policy", "udp", "proxy", "proxy_pinned", "proxy_p99", "proxy_p99_pinned", "proxy_new", "proxy_alloc", "shortcut", "observability", "resilience_express", "resilience", "mtls", "tls"]


def write_section(name, lines):
    text = open(PATH).read() if os.path.exists(PATH) else HEADER
    if not text.startswith("# Benchmarks"):
        text = HEADER
    body = f"<!-- bench:{name} -->\n" + "\n".join(lines).rstrip() + f"\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    # Keep sections in a stable order.
    sections = {m.group(1): m.group(0) for m in re.finditer(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", text, re.S)}
    head = re.split(r"<!-- bench:\w+ -->", text)[0].rstrip()
    ordered = [sections[k] for k in ORDER if k in sections] + [v for k, v in sections.items() if k not in ORDER]
    with open(PATH, "w") as f:
        f.write(head + "\n\n" + "\n\n".join(ordered) + "\n")


def agent(node, path):
    """A lab node's agent, asked over its unix socket."""
    return sh("curl", "-s", "--unix-socket", f"/run/weft/{node}/agent.sock", f"http://agent{path}")


def generation(node):
    """The config generation a lab node's agent has in force (-1: no answer)."""
    out = agent(node, "/generation").split()
    return int(out[0]) if out else -1


def write_config(config, name, text):
    """Writes a config file whole (a rename), as the agent expects."""
    tmp = os.path.join(config, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(config, name))


def machine_cpu_seconds():
    """All CPU time the machine spent (every core, every mode but idle):
    what a side costs wherever it runs, in its own process, in the sender's
    system calls or in softirq."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def h2load_requests(out):
    """The counts on h2load's "requests:" line (total, started, done,
    succeeded, failed, errored, timeout), by name; zeros if it has none."""
    counts = dict.fromkeys(["total", "started", "done", "succeeded", "failed", "errored", "timeout"], 0)
    for line in out.splitlines():
        if line.startswith("requests:"):
            words = line.replace(",", "").split()
            for name in counts:
                if name in words:
                    counts[name] = int(words[words.index(name) - 1])
    return counts


def sh(*args, check=True, input=None):
    """Runs a command; its stdout, or exit with what it said."""
    r = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:8])} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout


class NodeProcesses:
    """Processes a benchmark runs on lab nodes (HAProxy, nginx, ...): in the
    node's netns and its agent's cgroup, so `lab down` finds them even if the
    script dies; `stop()` ends them, by pid."""

    def __init__(self, weft):
        self.weft = weft
        self.started = []

    def start(self, node, *cmd):
        """`node` is an entry of the lab's state.json; returns the pid."""
        p = subprocess.Popen([self.weft, "lab", "run-in", "--netns", node["netns"], "--cgroup", node["agentCgroup"],
                              "--", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(p)
        return p.pid

    def stop(self):
        for p in self.started:
            p.terminate()
        for p in self.started:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.started = []
