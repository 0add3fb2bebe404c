"""docs/benchmarks.md is written by several bench scripts; each owns one
section, between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, and
rewrites only that."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "docs/benchmarks.md")
HEADER = """# Benchmarks

Every table here is written by `scripts/bench` (all sections) or `scripts/bench SECTION`; each
section says when and how it was made. The machine is a shared VM: read the ratios, not the
absolute numbers.
"""
ORDER = ["datapath", "policy", "proxy", "shortcut", "observability", "resilience", "mtls"]


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


def sh(*args, check=True, input=None):
    """Runs a command; its stdout, or exit with what it said."""
    r = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:8])} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout
