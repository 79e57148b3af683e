"""Start-up time and peak memory of one ``psrv run`` (docs/scale.md).

    python scripts/measure_startup.py CHECKOUT OUT [psrv run options...]
    python scripts/measure_startup.py . /tmp/m1000 --algorithm laq --rounds 5 --workers 1000

Runs ``python -m psrv run OPTIONS --out OUT`` in the checkout CHECKOUT (so an older checkout can be
measured the same way) and prints one JSON line: start-up = command start to the first round record
in ``OUT/<algorithm>/metrics.jsonl`` (round 0 closed); peak memory = the largest sum of VmRSS over
the command's process tree, sampled every 0.1 s from /proc (Linux); the size of metrics.jsonl.
Bounded by the run itself (its own timeouts); Ctrl-C stops it and its workers.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
    sys.exit(__doc__.strip())
cwd, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
cmd = [sys.executable, "-m", "psrv", "run", *args, "--out", out]
t0 = time.monotonic()
Path(out).mkdir(parents=True, exist_ok=True)
log = open(Path(out).parent / (Path(out).name + ".stderr"), "w+")  # a file: a pipe could fill and stall the run
p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, text=True)
peak, first, nproc = 0, None, 0
while p.poll() is None:
    pids = tree(p.pid)
    total = sum(rss(x) for x in pids)
    if total > peak:
        peak, nproc = total, len(pids)
    found = [m for m in Path(out).glob("*/metrics.jsonl") if m.stat().st_size > 0]
    if first is None and found:
        first = time.monotonic() - t0
    time.sleep(0.1)
wall = time.monotonic() - t0
log.seek(0)
err = log.read()
s = json.load(open(Path(out) / "summary.json")) if (Path(out) / "summary.json").exists() else {}
print(
    json.dumps(
        {
            "cmd": " ".join(["psrv", "run", *args]),
            "rc": p.returncode,
            "startup_to_round0_s": first and round(first, 1),
            "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak / 2**30, 2),
            "processes_at_peak": nproc,
            "rounds": s.get("rounds"),
            "status": s.get("status"),
            "metrics_bytes": sum(m.stat().st_size for m in Path(out).glob("*/metrics.jsonl")),
            "stderr_tail": err.strip().splitlines()[-1:],
        }
    )
)
