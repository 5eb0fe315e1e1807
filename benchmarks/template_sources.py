"""Where should templates come from? ViT templates from `weit pretrain` (nested sizes trained under the
constraint) against templates from `weit extract-templates` of a dense ViT trained for the same number
of optimiser steps — data-free (shared SVD) and with WAVE-style distillation from that dense model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/template_sources.py              # budget 'small'
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/template_sources.py --budget tiny  # a smoke run

The pretrained bundle and the dense ViT are `benchmarks/quality.py`'s (same budget, same cache folder
runs/quality-<budget>, so a finished quality run is reused): recipes/vit-fashion-small.yaml on
Fashion-MNIST, the dense ViT of the largest size (depth 3, width 96) trained from timm's init with the
bundle's steps, batch, learning rate and schedule. From the dense model, with the recipe's template
size (32) and count (32 per type):

    pretrain      the pretrained bundle
    svd           extract-templates (data-free shared SVD)
    svd+distill   extract-templates --data fashion-mnist --distill-steps K (templates, scalers and small
                  parameters trained as the student of the dense model: CE + KL; K extra steps on data)

Each bundle is materialized at four sizes (the largest, two nested ones, one deeper and wider than
anything trained) and scored on the official Fashion-MNIST test split: as materialized (no data), and
after `fit-scalers` (templates frozen, F steps on a fixed 10 % training subset, seed 0).
Outputs: docs/template-sources/template-sources-<budget>.{json,md}. Every stage is cached in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pretrain", "svd", "svd+distill")
BUDGETS = {
    "tiny": dict(quality="tiny", sizes=[(3, 96), (2, 64), (1, 32), (4, 128)], distill_steps=10, fit_steps=10, subset=0.02),
    "small": dict(quality="small", sizes=[(3, 96), (2, 64), (1, 32), (4, 128)], distill_steps=200, fit_steps=100, subset=0.1),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    ap.add_argument("--work", type=Path, help="quality.py's cache folder (default runs/quality-<budget>).")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "template-sources", help="Where the table and JSON go.")
    ap.add_argument("--distill-steps", type=int, help="Override the budget's distillation steps.")
    ap.add_argument("--fit-steps", type=int, help="Override the budget's fit-scalers steps.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1 by default).")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    cfg = dict(BUDGETS[args.budget])
    if args.distill_steps:
        cfg["distill_steps"] = args.distill_steps
    if args.fit_steps:
        cfg["fit_steps"] = args.fit_steps
    qcfg = quality.BUDGETS[cfg["quality"]]
    work = args.work or ROOT / "runs" / f"quality-{cfg['quality']}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = run(work, cfg, qcfg, quality, args)
    res["total_s"] = round(time.perf_counter() - t0, 1)  # this invocation (cached stages cost nothing)
    own = [*res["extraction"].values(), *res["rows"]]
    res["compute_s"] = round(sum(st.get("stage_s", 0.0) for st in own), 1)  # every stage of this script, cached or not
    res["shared_compute_s"] = round(res["pretrain"].get("stage_s", 0.0) + res["dense"].get("stage_s", 0.0), 1)
    res["command"] = ("benchmarks/template_sources.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    args.docs.mkdir(parents=True, exist_ok=True)
    name = f"template-sources-{args.budget}"
    (args.docs / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = table(res)
    (args.docs / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {args.docs / name}.{{json,md}} in {res['total_s'] / 60:.1f} min")
    return 0


def run(work: Path, cfg: dict, qcfg: dict, quality, args) -> dict:
    from weit_cli import recipe as rcp
    from weit_cli.commands.extract import extract_templates
    from weit_cli.commands.fit_scalers import fit_scalers
    from weit_cli.commands.materialize import materialize

    # The pretrained bundle and the dense model: quality.py's stages, cached in the same folder.
    bench = quality.Bench(work, qcfg, SimpleNamespace(overrides=[], tag=""))
    recipe = rcp.load_recipe(ROOT / qcfg["recipe"], qcfg["overrides"])
    bench.pre = work / f"pretrain-{rcp.digest(recipe)[:10]}"
    bench.pre.mkdir(exist_ok=True)
    pre = bench.cached(bench.pre / "bundle", lambda: bench.pretrain_bundle(qcfg["overrides"]))
    shared = [o for o in qcfg["overrides"] if not o.startswith(("templates.", "nested."))]
    dense_recipe = rcp.load_recipe(ROOT / qcfg["recipe"], shared)
    dense = bench.cached(work / f"dense-{rcp.digest(dense_recipe)[:10]}", lambda: bench.pretrain_dense(dense_recipe))

    out = work / "template-sources"
    (out / "models").mkdir(parents=True, exist_ok=True)
    p, counts = recipe.template_size, recipe.template_counts()
    n = counts["qkv"]
    assert set(counts.values()) == {n}, "one template count for every type"
    bundles = {"pretrain": Path(pre["path"])}
    extraction = {}
    for source, steps in (("svd", None), ("svd+distill", cfg["distill_steps"])):
        path = out / f"{source}-{steps or 0}.safetensors"
        key = out / f"{source}-{steps or 0}"

        def extract(path=path, steps=steps):
            kw = dict(data="fashion-mnist", distill_steps=steps, seed=0) if steps else {}
            r = extract_templates(Path(dense["path"]), path, template_size=p, num_templates=n, force=True, device="cpu", **kw)
            return {k: r[k] for k in ("relative_error", "params") if k in r} | (
                {"distillation": {k: v for k, v in r["distillation"].items()}} if "distillation" in r else {}
            )

        extraction[source] = bench.cached(key, extract)
        bundles[source] = path

    rows = []
    for source, bundle in bundles.items():
        tag = f"{source}-{cfg['distill_steps']}" if source == "svd+distill" else source
        for depth, width in cfg["sizes"]:
            key = out / f"{tag}-{depth}x{width}-fit{cfg['fit_steps']}"

            def score(bundle=bundle, depth=depth, width=width, tag=tag):
                folder = out / "models" / f"{tag}-{depth}x{width}"
                materialize(bundle, folder, depth=depth, width=width, force=True)
                init = bench.test_acc(folder, "fashion-mnist")
                scalers = out / "models" / f"{tag}-{depth}x{width}-fit{cfg['fit_steps']}.safetensors"
                fit = fit_scalers(
                    bundle, scalers, data="fashion-mnist", depth=depth, width=width, steps=cfg["fit_steps"], lr=1e-3,
                    train_subset=cfg["subset"], seed=0, device="cpu", force=True,
                )
                fitted = out / "models" / f"{tag}-{depth}x{width}-fitted"
                materialize(bundle, fitted, depth=depth, width=width, scalers=scalers, force=True)
                return {"source": source, "size": [depth, width], "init_test_acc": init,
                        "fit_test_acc": bench.test_acc(fitted, "fashion-mnist"), "fit_seconds": round(fit["fit_seconds"], 1),
                        "fit_loss": [fit["loss_first"], fit["loss_last"]]}

            rows.append(bench.cached(key, score))
    return {
        "budget": args.budget,
        "settings": {
            "recipe": qcfg["recipe"], "recipe_overrides": qcfg["overrides"], "recipe_sha256": rcp.digest(recipe),
            "template_size": p, "templates_per_type": n, "pretrain_steps": recipe.train.steps,
            "distill": {"steps": cfg["distill_steps"], "lr": 1e-3, "batch_size": 64, "temperature": 1.0, "seed": 0},
            "fit": {"steps": cfg["fit_steps"], "lr": 1e-3, "batch_size": 64, "train_subset": cfg["subset"], "seed": 0},
            "sizes": cfg["sizes"], "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        },
        "pretrain": pre,
        "dense": dense,
        "extraction": extraction,
        "rows": rows,
    }


def table(res: dict) -> str:
    s = res["settings"]
    ex = res["extraction"]
    d = ex["svd+distill"].get("distillation", {})
    lines = [
        f"Budget `{res['budget']}`: `{res['command']}`, {s['threads']} thread(s), {res.get('compute_s', 0) / 60:.1f} min of "
        f"compute over this script's stages, plus {res.get('shared_compute_s', 0) / 60:.1f} min for the pretraining it "
        "shares with benchmarks/quality.py.",
        "",
        f"Both starting points had {s['pretrain_steps']} optimiser steps on Fashion-MNIST (recipe `{s['recipe']}`): the "
        f"weit bundle ({100 * res['pretrain']['largest_test_acc']:.2f}% test accuracy at its largest size) and the dense "
        f"ViT 3×96 ({100 * res['dense']['largest_test_acc']:.2f}%). Extraction: {s['templates_per_type']} templates of "
        f"{s['template_size']}×{s['template_size']} per type; SVD relative error "
        + ", ".join(f"{t} {v:.3f}" for t, v in ex["svd"]["relative_error"].items())
        + f". Distillation: {s['distill']['steps']} steps (lr {s['distill']['lr']:g}, batch {s['distill']['batch_size']}), "
        f"accuracy of the student at 3×96 on the {d.get('eval_split', '?')} {100 * d.get('student_acc_before', float('nan')):.2f}% → "
        f"{100 * d.get('student_acc_after', float('nan')):.2f}% (teacher {100 * d.get('teacher_acc', float('nan')):.2f}%).",
        "",
        f"Test accuracy (%) on the official test split, as materialized (no data) and after fit-scalers "
        f"({s['fit']['steps']} steps, {100 * s['fit']['train_subset']:g} % subset):",
        "",
        "| size (depth×width) | " + " | ".join(f"{src} | {src} + fit" for src in SOURCES) + " |",
        "|---|" + "---|" * (2 * len(SOURCES)),
    ]
    sizes = list(dict.fromkeys(tuple(r["size"]) for r in res["rows"]))
    for size in sizes:
        cells = []
        for src in SOURCES:
            r = next(r for r in res["rows"] if r["source"] == src and tuple(r["size"]) == size)
            cells += [f"{100 * r['init_test_acc']:.2f}", f"{100 * r['fit_test_acc']:.2f}"]
        lines.append(f"| {size[0]}×{size[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
