"""What the benchmarks that run weit's commands stage by stage share: a stage runs once, and its JSON
result is kept next to its outputs, so an interrupted benchmark continues where it stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path


def cached(work: Path, key: Path, fn) -> dict:
    """Run `fn` once; its JSON result (plus the stage's wall time) is kept as key + .json."""
    path = key.with_name(key.name + ".json")
    if path.exists():
        return json.loads(path.read_text())
    t = time.perf_counter()
    out = fn()
    out["stage_s"] = round(time.perf_counter() - t, 2)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"  {key.relative_to(work)}: {out['stage_s']:.1f}s", flush=True)
    return out
