"""How long the command line takes to answer what needs no training: start-up, `list-archs`, `--help`,
`inspect` of a bundle, and an argument error (a missing bundle file), as ratios to `weit --version`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/startup.py --repeats 5

Each command runs as `python -m weit_cli.cli ...` in a fresh subprocess (what the `weit` script
does), wall time from spawn to exit, stdout and stderr discarded; the commands are interleaved and
rotated across repeats so that drifting load hits all alike; median and min over the repeats. The
bundle is a random-weight ViT (depth 4, width 128, 16 templates per type) written before anything is
timed. Target (issue 20): `inspect BUNDLE --json` ≤ 3× `--version`; `list-archs`, `--help` and the
argument error well under a second. `inspect --check` (reads every tensor, imports torch) is shown
for comparison, not a target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(bundle: Path, missing: Path, out: Path) -> dict[str, list[str]]:
    return {
        "--version": ["--version"],
        "list-archs": ["list-archs"],
        "--help": ["--help"],
        "inspect BUNDLE --json": ["inspect", str(bundle), "--json"],
        "materialize MISSING (error)": ["materialize", str(missing), "-o", str(out), "--json"],
        "inspect BUNDLE --json --check": ["inspect", str(bundle), "--json", "--check"],
    }


def build_bundle(path: Path) -> None:
    import torch

    from weit_cli.arch._registry import get_adapter
    from weit_cli.core.extract import from_dense
    from weit_cli.io.bundle_file import save_bundle

    ad = get_adapter("vit")
    arch = ad.arch_from_dict(dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, depth=4, width=128, num_heads=4, family="vit"))
    torch.manual_seed(0)
    b, _ = from_dense(ad, arch, ad.build(arch).state_dict(), None, 16)
    save_bundle(path, b, {"command": "benchmarks/startup.py"})


def time_one(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "weit_cli.cli", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh subprocesses per command (median reported)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_bundle(tmp / "bundle.safetensors")
        cmds = commands(tmp / "bundle.safetensors", tmp / "missing.safetensors", tmp / "out")
        names = list(cmds)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(a.repeats):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                times[n].append(time_one(cmds[n], tmp))
    base = statistics.median(times["--version"])
    result = {
        n: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3), "vs_version": round(statistics.median(t) / base, 2)}
        for n, t in times.items()
    }
    result["targets"] = {
        "inspect <= 3x --version": result["inspect BUNDLE --json"]["vs_version"] <= 3,
        "list-archs, --help, error < 1 s": all(result[n]["median_s"] < 1 for n in ("list-archs", "--help", "materialize MISSING (error)")),
    }
    result["load_avg"] = os.getloadavg()[0]
    if a.json:
        print(json.dumps(result))
        return
    print(f"{'command':32} {'median s':>9} {'min s':>7} {'× --version':>12}")
    for n in names:
        r = result[n]
        print(f"{n:32} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['vs_version']:12.2f}")
    print("targets:", result["targets"], f"load average {result['load_avg']:.2f}")


if __name__ == "__main__":
    main()
