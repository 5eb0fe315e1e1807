"""How fast, and in how much memory, `materialize` writes a ViT-B/16-sized checkpoint.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/materialize.py --repeats 5 --num-templates 64

Variants, each repeat in a fresh subprocess (torch.set_num_threads(1), float32, 86.6M parameters):
  materialize  weit_cli.commands.materialize.materialize(bundle, out): read the bundle, compose every dense tensor and
               stream it to disk (temp file, fsync, rename).
  timm         timm.create_model("vit_base_patch16_224") + safetensors.torch.save_file(state_dict).
  timm-init    timm.create_model alone (no file): shows how much of `timm` is the write.
  write        safetensors.torch.save_file of the same tensors, already in memory: the write limit.
  write+fsync  the same, then fsync: the write limit for a durable file (materialize fsyncs).

With --end-to-end the whole process is timed instead, spawn to exit, imports included (what a user
waits for): `python -m weit_cli.cli materialize BUNDLE -o OUT` against a process that imports timm,
creates vit_base_patch16_224 and saves it with safetensors; OMP_NUM_THREADS=1 for both.

The bundle (random templates p = q = 64, N per type from --num-templates, random scalers, small
parameters of a randomly initialised vit_base_patch16_224) is built once, before anything is timed.

Peak memory: after imports and set-up the child resets the kernel's high-water mark
(`echo 5 > /proc/self/clear_refs`) and reports VmHWM − VmRSS(before) once the timed step is done.
Unlike tracemalloc this sees every allocation (torch's C++ allocator, numpy, safetensors' Rust side);
where clear_refs is unavailable it falls back to ru_maxrss − RSS after set-up (an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("materialize", "timm", "timm-init", "write", "write+fsync")
VIT_B = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, depth=12, width=768, num_heads=12)


# ---------------------------------------------------------------------------------------------- child
def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(variant: str, bundle: Path, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    import timm
    from safetensors.torch import save_file

    from weit_cli.commands.materialize import materialize

    tensors = None
    if variant.startswith("write"):
        from weit_cli.io.bundle_file import load_bundle

        b, _ = load_bundle(bundle)
        with torch.no_grad():
            tensors = {k: v.contiguous() for k, v in b.state_dict().items()}
        del b

    rss_before = _status("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    if variant == "materialize":
        materialize(bundle, out)
    elif variant.startswith("timm"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        if variant == "timm":
            save_file(model.state_dict(), str(out))
    else:
        save_file(tensors, str(out))
        if variant == "write+fsync":
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.perf_counter() - t0
    if exact:
        peak = _status("VmHWM") - rss_before
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.rglob("*")) if p.is_file()) if out.exists() else 0
    return {"variant": variant, "seconds": seconds, "peak_extra_bytes": peak, "file_bytes": size, "exact_peak": exact}


# ---------------------------------------------------------------------------------------------- parent
def build_bundle(path: Path, num_templates: int, seed: int) -> dict:
    """Random templates and scalers for ViT-B/16, small parameters from a random timm vit_base."""
    import torch

    torch.set_num_threads(1)
    from weit_cli.arch._registry import get_adapter
    from weit_cli.core.bundle import Bundle
    from weit_cli.io.bundle_file import save_bundle

    adapter = get_adapter("vit")
    arch = adapter.arch_from_dict(VIT_B)
    torch.manual_seed(seed)
    state = adapter.build(arch).state_dict()
    types = adapter.template_types(arch)
    g = torch.Generator().manual_seed(seed)
    templates = {t: torch.randn(num_templates, tt.p, tt.q, generator=g) / tt.p for t, tt in types.items()}
    scalers, small = {}, {}
    for k, v in state.items():
        t = adapter.template_type_of(k)
        if t is None:
            small[k] = v.float().clone()
        else:
            a, b = v.shape[0] // types[t].p, v.shape[1] // types[t].q
            scalers[k] = torch.randn(num_templates, a, b, generator=g) * (0.02 / num_templates**0.5)
    bundle = Bundle(adapter, arch, templates, scalers, small)
    save_bundle(path, bundle, {"command": "benchmarks/materialize.py", "seed": seed})
    return {"bundle_bytes": path.stat().st_size, **bundle.param_counts()}


def run_child(variant: str, bundle: Path, workdir: Path) -> dict:
    out = workdir / ("model.safetensors" if variant != "materialize" else "materialized.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", variant, "--bundle", str(bundle), "--out", str(out)]
    os.sync()  # every variant starts with no dirty pages from the previous one waiting to be written back
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr}")
    out.unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


E2E = ("weit materialize", "timm create+save")
TIMM_SAVE = (
    "import sys, torch, timm; from safetensors.torch import save_file; torch.set_num_threads(1); "
    "save_file(timm.create_model('vit_base_patch16_224', pretrained=False).state_dict(), sys.argv[1])"
)


def run_process(variant: str, bundle: Path, workdir: Path) -> float:
    """Wall time of one whole process of `variant` (E2E), imports included."""
    out = workdir / "e2e.safetensors"
    cmd = {
        "weit materialize": [sys.executable, "-m", "weit_cli.cli", "materialize", str(bundle), "-o", str(out), "--force"],
        "timm create+save": [sys.executable, "-c", TIMM_SAVE, str(out)],
    }[variant]
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr}")
    out.unlink(missing_ok=True)
    return seconds


def end_to_end(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="weit-bench-", dir=args.workdir))
    load_before = os.getloadavg()[0]
    try:
        bundle = workdir / "bundle.safetensors"
        build_bundle(bundle, args.num_templates, args.seed)
        times: dict[str, list[float]] = {v: [] for v in E2E}
        for r in range(args.repeats):
            for v in E2E[r % 2 :] + E2E[: r % 2]:
                times[v].append(run_process(v, bundle, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    ratio = med["weit materialize"] / med["timm create+save"]
    report = {"seconds_median": med, "seconds_all": {v: [round(x, 2) for x in t] for v, t in times.items()}, "ratio": ratio,
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"ViT-B/16, bundle N={args.num_templates}, whole processes, {args.repeats} repeats\n| process | median (s) | min (s) |\n|---|---|---|")
    for v, t in times.items():
        print(f"| {v} | {med[v]:.2f} | {min(t):.2f} |")
    print(f"weit materialize / timm create+save: {ratio:.2f} (target <= 0.5); load average (1 min) before, after: {report['load_average_1min']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh subprocesses per variant (median reported)")
    ap.add_argument("--num-templates", type=int, default=64, help="templates per matrix type in the bundle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where files are written (default: a temp folder)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--end-to-end", action="store_true", help="time whole processes (imports included): weit materialize vs timm create+save")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.bundle, args.out)))
        return
    if args.end_to_end:
        end_to_end(args)
        return

    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="weit-bench-", dir=args.workdir))
    try:
        bundle = workdir / "bundle.safetensors"
        info = build_bundle(bundle, args.num_templates, args.seed)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):  # interleaved and rotated, so load drift on a shared machine hits all alike
            for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:
                runs[v].append(run_child(v, bundle, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    res = {
        v: {
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "seconds_min": min(r["seconds"] for r in rs),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "peak_extra_bytes_max": max(r["peak_extra_bytes"] for r in rs),
            "file_bytes": rs[0]["file_bytes"],
            "exact_peak": all(r["exact_peak"] for r in rs),
        }
        for v, rs in runs.items()
    }
    m = res["materialize"]
    ratios = {
        "time_vs_timm": m["seconds_median"] / res["timm"]["seconds_median"],
        "time_vs_write": m["seconds_median"] / res["write"]["seconds_median"],
        "time_vs_write_fsync": m["seconds_median"] / res["write+fsync"]["seconds_median"],
        "min_time_vs_timm": m["seconds_min"] / res["timm"]["seconds_min"],
        "min_time_vs_write": m["seconds_min"] / res["write"]["seconds_min"],
        "peak_vs_file": m["peak_extra_bytes_max"] / m["file_bytes"],
        "write_vs_timm": res["write"]["seconds_median"] / res["timm"]["seconds_median"],
    }
    report = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch threads 1",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: others' jobs
        "num_templates": args.num_templates,
        "repeats": args.repeats,
        "bundle": info,
        "results": res,
        "ratios": ratios,
        "targets_met": {
            "time <= 0.5x timm": ratios["time_vs_timm"] <= 0.5,
            "time <= 1.5x write": ratios["time_vs_write"] <= 1.5,
            "peak < 1.5x file": ratios["peak_vs_file"] < 1.5,
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    mb = 1e6
    print(f"ViT-B/16 (86.6M params), bundle N={args.num_templates}: {info['bundle_bytes'] / mb:.1f} MB; "
          f"{args.repeats} repeats, median wall time; peak = max extra memory over the repeats")
    print("| variant | median time (s) | min time (s) | peak extra memory (MB) | file (MB) |\n|---|---|---|---|---|")
    for v, r in res.items():
        print(f"| {v} | {r['seconds_median']:.2f} | {r['seconds_min']:.2f} | {r['peak_extra_bytes_max'] / mb:.0f} "
              f"| {r['file_bytes'] / mb:.0f} |")
    bound = res["write"]["seconds_median"] / res["timm"]["seconds_median"]
    print(f"floor for time_vs_timm (materialize cannot beat the write limit): {bound:.2f}")
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    print("load average (1 min) before, after:", report["load_average_1min"])
    print("targets met:", report["targets_met"])


if __name__ == "__main__":
    main()
