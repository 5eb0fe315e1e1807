"""What the benchmarks that run weit's commands stage by stage share: a stage runs once, and its JSON
result is kept next to its outputs, so an interrupted benchmark continues where it stopped. Two
benchmark processes that need the same stage (the same key) take turns: the second waits for the
first's result instead of computing it again."""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path


def cached(work: Path, key: Path, fn) -> dict:
    """Run `fn` once; its JSON result (plus the stage's wall time) is kept as key + .json."""
    path = key.with_name(key.name + ".json")
    if path.exists():
        return json.loads(path.read_text())
    key.parent.mkdir(parents=True, exist_ok=True)
    with open(key.with_name(key.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if path.exists():  # another process made it while this one waited
            return json.loads(path.read_text())
        t = time.perf_counter()
        out = fn()
        out["stage_s"] = round(time.perf_counter() - t, 2)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
        tmp.replace(path)
    print(f"  {key.relative_to(work)}: {out['stage_s']:.1f}s", flush=True)
    return out
