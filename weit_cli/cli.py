"""The `weit` command line: parses options, calls one library function (cli_runtime.run: errors,
exit codes, SIGTERM), renders the result (cli_render).

Heavy imports (torch, timm) happen inside the commands so that `weit --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from weit_cli import cli_render as render
from weit_cli.cli_runtime import WeitApp, rank, run
from weit_cli.options import (
    DISTILL,
    EVALUATE,
    EXTRACT,
    FINETUNE,
    FIT_SCALERS,
    MATERIALIZE,
    SAMPLE,
    SEED,
)


app = WeitApp(
    name="weit",
    help="Resize PyTorch models through Kronecker weight templates (WeiT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (for pipelines) instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Where to write.")]


@app.command("extract-templates")
def extract_templates_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Dense model: a timm, diffusers or transformers folder, a weights file, or a hub id hf-hub:ORG/NAME[@REVISION][/SUBFOLDER] (read from the Hugging Face cache).")],
    output: OutOpt,
    template_size: Annotated[Optional[int], typer.Option("--template-size", "-p", help="Template block size p (default: the family's, e.g. the attention head size or the gcd of the conv widths, at most 16).")] = None,
    num_templates: Annotated[int, typer.Option("--num-templates", "-n", help="Templates per matrix type (each type capped at its full rank p·q·k).")] = EXTRACT.num_templates,
    num_heads: Annotated[Optional[int], typer.Option(help="Attention heads of the source, if its files do not say.")] = None,
    img_size: Annotated[Optional[int], typer.Option(help="Image size of the source, if its files do not say.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Distil the templates from the checkpoint on this data after the SVD (fashion-mnist, mnist5k, digits or an image folder).")] = None,
    distill_steps: Annotated[Optional[int], typer.Option(help=f"Distillation steps (with --data; default {DISTILL.steps}).")] = None,
    distill_lr: Annotated[Optional[float], typer.Option(help=f"Distillation learning rate (default {DISTILL.lr:g}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Distillation batch size (default {DISTILL.batch_size}).")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = DISTILL.temperature,
    seed: Annotated[int, typer.Option(help="Seed of the data split and batch order.")] = SEED,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if available).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a template bundle from a dense checkpoint (shared truncated SVD per matrix type), then
    optionally distil it from the checkpoint on data (--data)."""

    def go():
        from weit_cli.commands.extract import extract_templates

        with render.StepProgress("distill", not as_json and data is not None) as progress:
            return extract_templates(
                checkpoint, output, template_size=template_size, num_templates=num_templates,
                num_heads=num_heads, img_size=img_size, data=data, distill_steps=distill_steps,
                distill_lr=distill_lr, batch_size=batch_size, temperature=temperature, seed=seed,
                device=device, force=force, on_step=progress,
            )

    run(go, as_json, render.extract_templates)


@app.command()
def materialize(
    bundle: Annotated[Path, typer.Argument(help="Template bundle (.safetensors).")],
    output: OutOpt,
    depth: Annotated[Optional[str], typer.Option(help="Blocks (default: the bundle's). Families with stages: per stage, e.g. 2,2,2,2; one number sets every stage.")] = None,
    width: Annotated[Optional[str], typer.Option(help="Embedding width; families with stages: channels per stage, e.g. 64,128,256,512, or one number for stage 1 that keeps the bundle's stage ratios (default: the bundle's).")] = None,
    mlp_ratio: Annotated[Optional[float], typer.Option(help="MLP hidden width / width.")] = None,
    num_heads: Annotated[Optional[int], typer.Option(help="Heads (must equal width / head_dim).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier outputs; a new head starts at zero.")] = None,
    depth_rule: Annotated[str, typer.Option(help="auto (to shrink, the rule the bundle was pretrained with, prefix by default; to grow, the model family's rule, docs/method.md) | prefix | spread | interp | stack | interleave | identity.")] = MATERIALIZE.depth_rule,
    width_rule: Annotated[str, typer.Option(help="tile (Net2Net, lossless for integer ratios) | tile-nodiv.")] = MATERIALIZE.width_rule,
    scalers: Annotated[Optional[Path], typer.Option(help="Scalers fitted by 'weit fit-scalers'.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = MATERIALIZE.dtype,
    calibrate: Annotated[Optional[str], typer.Option(help="BatchNorm models: re-estimate the running statistics on this data (fashion-mnist, mnist5k, digits or an image folder).")] = None,
    calibrate_batches: Annotated[int, typer.Option(help="Batches for --calibrate.")] = MATERIALIZE.calibrate_batches,
    calibrate_batch_size: Annotated[int, typer.Option(help="Images per --calibrate batch.")] = MATERIALIZE.calibrate_batch_size,
    seed: Annotated[int, typer.Option(help="Seed of the calibration batches and data split.")] = SEED,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write an ordinary checkpoint of any size in its family's own library layout: a timm folder
    (classifiers; timm's local-dir:), a diffusers folder (image generators), a transformers folder
    (control models), or a bare .safetensors."""

    def go():
        from weit_cli.commands.materialize import materialize as mat

        return mat(
            bundle, output, depth=_sizes(depth, "depth"), width=_sizes(width, "width"), mlp_ratio=mlp_ratio,
            num_heads=num_heads, num_classes=num_classes, depth_rule=depth_rule, width_rule=width_rule,
            scalers=scalers, dtype=dtype, calibrate=calibrate, calibrate_batches=calibrate_batches,
            calibrate_batch_size=calibrate_batch_size, seed=seed, force=force,
        )

    run(go, as_json, render.materialize)


def _subset(train_subset: float | None) -> float | int | None:
    """--train-subset: a fraction ≤ 1 stays a fraction; more is an image count."""
    return int(train_subset) if train_subset is not None and train_subset > 1 else train_subset


def _sizes(text: str | None, name: str) -> int | list[int] | None:
    """'64' → 64; '64,128,256,512' → a per-stage list."""
    from weit_cli.errors import WeitError

    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise WeitError(f"--{name} '{text}' is not a number or a comma list of numbers", f"e.g. --{name} 2 or --{name} 2,2,2,2") from None
    return values[0] if len(values) == 1 else values


@app.command()
def pretrain(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    output: OutOpt,
    data: Annotated[Optional[str], typer.Option("--data", help="fashion-mnist[:folder], mnist5k, digits, or an image-folder path (overrides data.source).")] = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Nested distillation: a dense checkpoint (folder, file or hf-hub:ORG/NAME) of the recipe's largest size that every trained size learns from (sets teacher.source; templates start from its SVD).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value, e.g. --set train.lr=1e-3 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint (OUTPUT stem + .ckpt.safetensors).")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N] (default: a GPU when present).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a template bundle under the Kronecker constraint, nested sizes trained together (torchrun-ready)."""
    import shlex

    main_rank = rank() == 0
    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--json")]
    command = "weit " + shlex.join(argv)

    def go():
        from weit_cli.commands.pretrain import pretrain as pt

        with render.StepProgress("pretrain", not as_json and main_rank) as progress:
            return pt(recipe, output, data=data, teacher=teacher, overrides=overrides, resume=resume, force=force, device=device,
                      command=command, callback=progress)

    if not main_rank:
        run(go, False, lambda r: None)
    else:
        run(go, as_json, render.pretrain)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A bundle, scalers file, or dense checkpoint (folder, file or hf-hub:ORG/NAME).")],
    full: Annotated[bool, typer.Option("--full", help="Every provenance field as its own row (the resolved recipe too).")] = False,
    check: Annotated[bool, typer.Option("--check", help="Also read every tensor and check its values (without it a bundle or scalers file is answered from its header).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a file's kind, metadata, architecture, templates, parameter counts and where it came from."""

    def go():
        from weit_cli.commands.inspect import inspect as insp

        return insp(file, check=check)

    run(go, as_json, lambda r: render.inspect(r, full))


@app.command("fit-scalers")
def fit_scalers_cmd(
    bundle: Annotated[Path, typer.Argument(help="Template bundle (.safetensors).")],
    output: OutOpt,
    data: Annotated[str, typer.Option(help="fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image folder.")],
    depth: Annotated[Optional[str], typer.Option(help="Target blocks (default: the bundle's). Families with stages: per stage, e.g. 1,1,1,1; one number sets every stage.")] = None,
    width: Annotated[Optional[str], typer.Option(help="Embedding width; families with stages: channels per stage, or one number for stage 1 (default: the bundle's).")] = None,
    mlp_ratio: Annotated[Optional[float], typer.Option(help="Target MLP hidden width / width.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier outputs (default: the data's class count).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = FIT_SCALERS.steps,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup then cosine).")] = FIT_SCALERS.lr,
    warmup: Annotated[Optional[int], typer.Option(help="Warmup steps (default: 10% of --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = FIT_SCALERS.batch_size,
    train_subset: Annotated[Optional[float], typer.Option(help="Fit on part of the training split: fraction ≤ 1 or image count.")] = None,
    no_small: Annotated[bool, typer.Option("--no-small", help="Train the scalers only; keep norms, biases and embeddings as resized.")] = False,
    reset_head: Annotated[bool, typer.Option("--reset-head", help="Start a fresh classifier (automatic when the class count differs).")] = False,
    distill: Annotated[float, typer.Option(help="Weight of KL(bundle's largest model ‖ target) in the loss, 0–1 (0: off).")] = FIT_SCALERS.distill,
    temperature: Annotated[float, typer.Option(help="Distillation softmax temperature.")] = FIT_SCALERS.temperature,
    depth_rule: Annotated[str, typer.Option(help="Initial depth rule: auto (to shrink, the rule the bundle was pretrained with, prefix by default; to grow, the model family's rule, docs/method.md) | prefix | spread | interp | stack | interleave | identity.")] = FIT_SCALERS.depth_rule,
    width_rule: Annotated[str, typer.Option(help="Initial width rule: tile | tile-nodiv.")] = FIT_SCALERS.width_rule,
    seed: Annotated[int, typer.Option(help="Seed of the data split and order.")] = SEED,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    calibrate_batches: Annotated[int, typer.Option(help="BatchNorm models: batches of the fitting data that re-estimate the running statistics after fitting.")] = FIT_SCALERS.calibrate_batches,
    checkpoint_every: Annotated[int, typer.Option(help="Write a resumable checkpoint every N steps (OUTPUT stem + .ckpt.safetensors; 0: never).")] = FIT_SCALERS.checkpoint_every,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fit from its checkpoint (same command plus --resume).")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fit scalers for one target size with the templates frozen (for 'materialize --scalers')."""

    def go():
        from weit_cli.commands.fit_scalers import fit_scalers

        subset = _subset(train_subset)
        with render.StepProgress("fit-scalers", not as_json) as progress:
            return fit_scalers(
                bundle, output, data=data, depth=_sizes(depth, "depth"), width=_sizes(width, "width"), mlp_ratio=mlp_ratio,
                num_classes=num_classes, calibrate_batches=calibrate_batches, steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, train_subset=subset, train_small=not no_small,
                reset_head=reset_head, distill=distill, temperature=temperature, depth_rule=depth_rule, width_rule=width_rule, seed=seed,
                device=device, force=force, resume=resume, checkpoint_every=checkpoint_every, on_step=progress,
            )

    run(go, as_json, render.fit_scalers)


@app.command()
def finetune(
    model: Annotated[Path, typer.Argument(help="Model to train: a materialized timm, diffusers or transformers folder, a .safetensors file, or a hub id hf-hub:ORG/NAME[@REVISION][/SUBFOLDER].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder (metrics.json, best/, last/).")],
    data: Annotated[str, typer.Option(help="fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image folder.")],
    epochs: Annotated[int, typer.Option(help="Epochs over the training split.")],
    init: Annotated[str, typer.Option(help="weit (MODEL's weights) | random (the library's own init) | weight-selection (needs --from).")] = FINETUNE.init,
    source: Annotated[Optional[Path], typer.Option("--from", help="Larger dense checkpoint (folder, file or hf-hub:ORG/NAME) for --init weight-selection.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = FINETUNE.lr,
    warmup: Annotated[float, typer.Option(help="Linear warmup, in epochs (may be fractional).")] = FINETUNE.warmup,
    schedule: Annotated[str, typer.Option(help="cosine (to --min-lr-ratio) | constant, after warmup.")] = FINETUNE.schedule,
    min_lr_ratio: Annotated[float, typer.Option(help="Final learning rate as a fraction of --lr (cosine).")] = FINETUNE.min_lr_ratio,
    batch_size: Annotated[int, typer.Option(help="Images per step over all processes.")] = FINETUNE.batch_size,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on norms, biases, embeddings).")] = FINETUNE.weight_decay,
    grad_clip: Annotated[float, typer.Option(help="Clip the global gradient norm (0: off).")] = FINETUNE.grad_clip,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = FINETUNE.label_smoothing,
    train_subset: Annotated[Optional[float], typer.Option(help="Train on part of the training split: fraction ≤ 1 or image count.")] = None,
    data_seed: Annotated[int, typer.Option(help="Seed of the validation split and the training subset.")] = SEED,
    ema: Annotated[float, typer.Option(help="Keep an EMA of the weights with this decay (warm-up power 0.75); it is scored and written (0: off).")] = FINETUNE.ema,
    reset_head: Annotated[bool, typer.Option("--reset-head", help="Start a fresh classifier (automatic when the class count differs).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")] = SEED,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in the output folder.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a model of any family with its own library's layout, no constraint (classifiers on images,
    image generators on the diffusion loss, control models on trajectories), from weit's weights or a baseline
    initialisation; DDP under torchrun."""

    main_rank = rank() == 0  # under torchrun only rank 0 prints the summary

    def go():
        from weit_cli.commands.finetune import finetune as ft

        with render.StepProgress("finetune", not as_json and main_rank) as progress:
            return ft(
                model, output, data=data, epochs=epochs, init=init, source=source, lr=lr, warmup=warmup,
                schedule=schedule, min_lr_ratio=min_lr_ratio, batch_size=batch_size, weight_decay=weight_decay,
                grad_clip=grad_clip, label_smoothing=label_smoothing, train_subset=_subset(train_subset), data_seed=data_seed,
                reset_head=reset_head, seed=seed, resume=resume, force=force, device=device, on_step=progress,
                ema=ema,
            )

    run(go, as_json and main_rank, render.finetune if main_rank else lambda r: None)


@app.command()
def sample(
    model: Annotated[Path, typer.Argument(help="A materialized generator: a diffusers folder (config.json, weights, scheduler_config.json), .safetensors, or hf-hub:ORG/NAME.")],
    output: OutOpt,
    cls: Annotated[Optional[int], typer.Option("--class", help="Class of every image (default: all classes in turn, one grid column each).")] = None,
    n: Annotated[int, typer.Option("-n", help="Images in the grid.")] = SAMPLE.n,
    steps: Annotated[int, typer.Option(help="DDIM sampling steps.")] = SAMPLE.steps,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1: none).")] = SAMPLE.guidance,
    seed: Annotated[int, typer.Option(help="Seed of the starting noise: the same seed gives the same PNG bytes.")] = SEED,
    batch_size: Annotated[int, typer.Option(help="Images per sampling batch (the images do not depend on it).")] = SAMPLE.batch_size,
    scale: Annotated[Optional[int], typer.Option(help="Enlarge the grid N× (nearest neighbour; default: each image ≥ 112 px, ×4 for 28 px).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Draw a seeded PNG grid of samples from a materialized image generator."""

    def go():
        from weit_cli.commands.sample import sample_grid
        from weit_cli.training.progress import heartbeat

        with heartbeat(f"sample: {n} images, {steps} DDIM steps"):
            return sample_grid(model, output, cls=cls, n=n, steps=steps, guidance=guidance, seed=seed,
                               batch_size=batch_size, device=device, force=force, scale=scale)

    run(go, as_json, render.sample)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="A materialized model (folder or .safetensors), any family.")],
    data: Annotated[Optional[str], typer.Option(help="Classifiers and generators: fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image folder (its test split is used).")] = None,
    env: Annotated[Optional[str], typer.Option(help="Control models: the environment to roll out in, e.g. Hopper-v5 (default: the one of its control_config.json).")] = None,
    episodes: Annotated[Optional[int], typer.Option(help=f"Control models: rollout episodes; episode i resets with seed + i (default {EVALUATE.episodes}).")] = None,
    target_return: Annotated[Optional[float], typer.Option(help="Control models: the return to condition on (default: the best return of the training data).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Control models: cut episodes after this many steps (default: the environment's time limit).")] = None,
    num_samples: Annotated[int, typer.Option(help="Generators: images sampled (balanced over the classes) and real test images compared.")] = EVALUATE.num_samples,
    steps: Annotated[int, typer.Option(help="Generators: DDIM sampling steps.")] = SAMPLE.steps,
    guidance: Annotated[float, typer.Option(help="Generators: classifier-free guidance scale (1: none).")] = SAMPLE.guidance,
    seed: Annotated[int, typer.Option(help="Seed of the data split and the samples.")] = SEED,
    batch_size: Annotated[int, typer.Option(help="Images per evaluation batch.")] = EVALUATE.batch_size,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if present).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a model: classifiers by test accuracy and loss on --data; generators by a Fréchet distance in
    weit's judge-classifier features (not Inception-FID) and the class accuracy of their samples;
    control models by rollouts in --env (returns, normalised score mean and spread, wall time)."""

    def go():
        from weit_cli.commands.evaluate import evaluate as ev
        from weit_cli.training.progress import heartbeat

        with heartbeat(f"evaluate {model}"):
            return ev(model, data=data, num_samples=num_samples, steps=steps, guidance=guidance, seed=seed,
                      batch_size=batch_size, device=device, env=env, episodes=episodes, target_return=target_return,
                      max_steps=max_steps)

    run(go, as_json, render.evaluate)


@app.command("list-archs")
def list_archs(as_json: JsonOpt = False) -> None:
    """List the architecture families weit can template."""

    def go():
        from weit_cli.arch._registry import list_families

        return {"families": list_families()}

    run(go, as_json, lambda r: print("\n".join(r["families"])))


def _print_version(value: bool) -> None:
    """Eager: runs while the options are parsed, before click asks for a subcommand (a plain option
    of the root callback only runs when one follows, so `weit --version` was 'Missing command')."""
    if value:
        from weit_cli import __version__

        print(f"weit {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


if __name__ == "__main__":
    app()
