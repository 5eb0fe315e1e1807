"""The constrained model in training: templates, scalers and small parameters as trainable tensors, and
a forward at any size through the real module of that size with the composed weights
(`torch.func.functional_call`), so that what is trained is exactly what `materialize` writes."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from weit_cli import recipe as rcp
from weit_cli.arch._registry import get_adapter
from weit_cli.core.bundle import Bundle
from weit_cli.core.extract import from_dense
from weit_cli.core.resize import resize, trained_depth_rule
from weit_cli.tasks.base import Task
from weit_cli.training.calibrate import STAT_SUFFIXES, recalibrated


def largest_arch(recipe: rcp.Recipe, num_classes: int | None):
    """The recipe's largest size; `num_classes` None for a task without classes (`Task.classes`)."""
    adapter = get_adapter(recipe.model.family)
    depth, width = recipe.largest()
    classes = {} if num_classes is None else {"num_classes": num_classes}
    arch = adapter.arch_for_recipe(recipe.model, depth=depth, width=width, **classes)
    adapter.target_arch(arch, template_size=recipe.template_size)  # validates the sizes once more
    return adapter, arch


def nested_record(recipe: rcp.Recipe) -> dict[str, Any]:
    """The bundle's record of its nested sizes (and of their depth rule, unless prefix: older bundles' bytes)."""
    record: dict[str, Any] = {"depths": list(recipe.nested.depths), "widths": list(recipe.nested.widths)}
    if recipe.nested.depth_rule != "prefix":
        record["depth_rule"] = recipe.nested.depth_rule
    if recipe.nested.sizes is not None:
        record["sizes"] = [list(x) for x in recipe.nested.sizes]
    return record


def initial_bundle(recipe: rcp.Recipe, num_classes: int | None, teacher: dict[str, Tensor] | None = None) -> Bundle:
    """Templates, scalers and small parameters at the largest size, before training.

    timm-svd (the recipe's name, for every family): a freshly initialised largest model (its library's
    own init, `Adapter.build`), factorised by the shared SVD of `extract-templates`; truncation to N
    templates shrinks the weights, so each type's scalers are rescaled to give the composed weights
    the RMS of that init. Small parameters are the library's.
    With a `teacher` state dict (of the largest size; `teacher.init`): the teacher's own shared SVD
    and small parameters, as `extract-templates` makes them, unscaled.
    """
    adapter, arch = largest_arch(recipe, num_classes)
    torch.manual_seed(recipe.seed)
    counts = recipe.template_counts()
    p = recipe.template_size
    if teacher is not None:
        bundle, _ = from_dense(adapter, arch, {k: v.detach() for k, v in teacher.items()}, p, counts)
        bundle.extra["nested"] = nested_record(recipe)
        return bundle
    dense = {k: v.detach().float() for k, v in adapter.build(arch).state_dict().items()}
    if recipe.templates.init == "timm-svd":
        bundle, _ = from_dense(adapter, arch, dense, p, counts)
        for t in bundle.templates:
            keys = [k for k in bundle.scalers if adapter.template_type_of(k, arch) == t]
            want = torch.cat([dense[k].reshape(-1) for k in keys]).pow(2).mean().sqrt()
            have = torch.cat([bundle.dense(k).reshape(-1) for k in keys]).pow(2).mean().sqrt()
            if have > 0:
                for k in keys:
                    bundle.scalers[k] = bundle.scalers[k] * (want / have)
    else:
        gen = torch.Generator().manual_seed(recipe.seed)
        types = adapter.template_types(arch, p)
        templates = {t: torch.randn(counts[t], tt.p, tt.q, *tt.kernel, generator=gen) for t, tt in types.items()}
        scalers, small = {}, {}
        for k in sorted(dense):
            t = adapter.template_type_of(k, arch)
            if t is None:
                small[k] = dense[k].clone()
            else:
                rows, cols = dense[k].shape[:2]
                n = counts[t]
                scalers[k] = torch.randn(n, rows // types[t].p, cols // types[t].q, generator=gen) * (0.02 / math.sqrt(n))
        bundle = Bundle(adapter, arch, templates, scalers, small)
    bundle.extra["nested"] = nested_record(recipe)
    return bundle


def _enc(key: str) -> str:
    """A dense key as a ParameterDict name: nn.Module names may not contain dots."""
    return key.replace(".", "/")


def _dec(key: str) -> str:
    return key.replace("/", ".")


class _Buffers(nn.Module):
    """BatchNorm running statistics under bundle-style names (buffers: never trained)."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(_enc(k), v.detach().clone())


class NestedModel(nn.Module):
    """The trainable parameters (templates, largest-size scalers and small parameters) and a forward
    at any nested size through the family's real module of that size. BatchNorm running statistics are
    kept apart, as buffers (see the module doc)."""

    def __init__(self, bundle: Bundle):
        super().__init__()
        self.adapter, self.arch, self.extra = bundle.adapter, bundle.arch, dict(bundle.extra)
        stats = {k for k in bundle.small if self.adapter.batchnorm and k.endswith(STAT_SUFFIXES)}
        self.templates = nn.ParameterDict({t: nn.Parameter(v.detach().clone()) for t, v in bundle.templates.items()})
        self.scalers = nn.ParameterDict({_enc(k): nn.Parameter(v.detach().clone()) for k, v in bundle.scalers.items()})
        self.small = nn.ParameterDict({_enc(k): nn.Parameter(v.detach().clone()) for k, v in bundle.small.items() if k not in stats})
        self.stats = _Buffers({k: bundle.small[k] for k in sorted(stats)})
        self._built: dict[tuple, nn.Module] = {}  # not submodules: their own weights are never used

    def named_tensors(self) -> dict[str, Tensor]:
        """Parameters under bundle-style names (templates.qkv, scalers.blocks.0…, small.pos_embed)."""
        out = {f"templates.{t}": v for t, v in self.templates.items()}
        out.update({f"scalers.{_dec(k)}": v for k, v in self.scalers.items()})
        out.update({f"small.{_dec(k)}": v for k, v in self.small.items()})
        return out

    def bundle(self, stats_copy: bool = False) -> Bundle:
        """The parameters as a Bundle; `stats_copy` gives copies of the BatchNorm statistics, for a
        training-mode forward to update without touching the stored ones."""
        small = {_dec(k): v for k, v in self.small.items()}
        small.update({_dec(k): (v.clone() if stats_copy else v) for k, v in self.stats.named_buffers()})
        return Bundle(
            self.adapter, self.arch, dict(self.templates.items()),
            {_dec(k): v for k, v in self.scalers.items()}, small, dict(self.extra),
        )

    def _device(self) -> torch.device:
        return next(iter(self.templates.values())).device

    def target(self, depth, width):
        p = next(iter(self.templates.values())).shape[1]
        return self.adapter.target_arch(self.arch, depth=depth, width=width, template_size=p)

    def state_at(self, depth, width) -> dict[str, Tensor]:
        """The dense state dict (the family's layout) of a nested size, composed differentiably (what materialize writes)."""
        rule = trained_depth_rule(self.extra) or "prefix"  # the smaller depths as materialize's auto keeps them
        return resize(self.bundle(stats_copy=True), self.target(depth, width), rule, "tile").state_dict()

    def module_at(self, depth, width) -> nn.Module:
        key = (depth, width)
        if key not in self._built:
            m = self.adapter.build(self.target(depth, width))
            m.requires_grad_(False)
            self._built[key] = m.to(self._device())
        return self._built[key]

    def forward(self, *inputs: Tensor, depth, width) -> Tensor:
        """The task's output at one size on the task's inputs (x; or x_t, t, y for a denoiser)."""
        from torch.func import functional_call

        module, state = self.module_at(depth, width), self.state_at(depth, width)
        return self.adapter.apply(lambda *a, **k: functional_call(module, state, a, k), *inputs)

    def frozen(self, depth, width, calibrate: Callable[[nn.Module], Any] | None = None):
        """The task's forward at one size, in eval mode, with the weights composed once. `calibrate(module)`
        (BatchNorm families) re-estimates the size's running statistics first, on a copy."""
        from torch.func import functional_call

        with torch.no_grad():
            state = {k: v.detach().clone() for k, v in self.state_at(depth, width).items()}
        if calibrate is not None and self.adapter.batchnorm:
            module = self.adapter.build(self.target(depth, width)).to(self._device())
            module.load_state_dict(state, strict=True)
            calibrate(module)
            return self.adapter.task_forward(module.eval())
        module = self.module_at(depth, width)

        def run(*inputs: Tensor) -> Tensor:
            was = module.training
            module.eval()
            try:
                return self.adapter.apply(lambda *a, **k: functional_call(module, state, a, k), *inputs)
            finally:
                module.train(was)

        return run

    @torch.no_grad()
    def calibrate_stats(self, calibrate: Callable[[nn.Module], Any]) -> None:
        """Re-estimate the largest size's BatchNorm statistics (the bundle's own) with `calibrate(module)`."""
        if not len(list(self.stats.buffers())):
            return
        module = self.adapter.build(self.arch).to(self._device())
        fresh, _ = recalibrated(module, self.bundle().state_dict(), calibrate)
        for k, v in self.stats.named_buffers():
            v.copy_(fresh[_dec(k)])


class SandwichLoss(nn.Module):
    """One forward over all sizes of a step, so DistributedDataParallel sees one graph that uses every
    parameter (the largest size always does). sizes[0] must be the largest.

    Without a `teacher`, in-place distillation: every smaller size's loss is
    (1 − distill)·task loss + distill·distance to the largest size's outputs. With a `teacher` (a
    dense model's task forward, frozen), every size — the largest too — learns from it:
    (1 − distill)·task loss + distill·distance to the teacher's outputs, computed once per batch.
    `distill` may change between steps (a warm-up)."""

    def __init__(self, net: NestedModel, task: Task, distill: float, temperature: float, teacher: nn.Module | None = None):
        super().__init__()
        self.net, self.task = net, task
        self.distill, self.temperature = distill, temperature
        self.teacher = [teacher]  # in a list: not a submodule (DDP must not see its frozen weights)
        # DDP with steps that leave parameters unused (one size per step): every parameter joins the
        # graph with a zero term, so each gets a (zero) gradient to all-reduce. AdamW then still moves
        # those parameters by its momentum and weight decay, which one process (no gradient) does not.
        self.touch_all = False

    def forward(self, batch: tuple[Tensor, ...], sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """The mean loss over `sizes`, and each size's plain task loss (detached)."""
        losses, ces = [], []
        teacher, external = None, self.teacher[0] is not None
        if external and self.distill > 0:
            with torch.no_grad():
                teacher = self.task.outputs(self.teacher[0], batch).detach()
        for i, (d, w) in enumerate(sizes):
            out = self.task.outputs(partial(self.net, depth=d, width=w), batch)
            ce = self.task.loss(out, batch)
            loss = ce
            if i == 0 and not external:
                teacher = out.detach()
            elif self.distill > 0:
                kl = self.task.distill_loss(out, teacher, batch, self.temperature)
                loss = (1 - self.distill) * ce + self.distill * kl
            losses.append(loss)
            ces.append(ce.detach())
        total = torch.stack(losses).mean()
        if self.touch_all:
            total = total + 0.0 * sum(p.sum() for p in self.net.parameters())
        return total, torch.stack(ces)


def sample_sizes(rng: random.Random, depths: list, widths: list[int], k: int, grid: list[tuple] | None = None) -> list[tuple]:
    """Largest, smallest, then k distinct random in-between sizes of `grid` (every depth × width pair
    when None; fewer if the grid is small). Depths are ints, or per-stage tuples whose largest/smallest
    are taken stage by stage."""
    largest = (rcp.elementwise(max, depths), max(widths))
    smallest = (rcp.elementwise(min, depths), min(widths))
    sizes = [largest] + ([smallest] if smallest != largest else [])
    grid = [(d, w) for d in depths for w in widths] if grid is None else grid
    rest = [s for s in grid if s not in sizes]
    if k and rest:
        sizes += rng.sample(rest, min(k, len(rest)))
    return sizes


# ---------------------------------------------------------------------------------------------- the schedule
def size_grid(recipe: rcp.Recipe) -> list[tuple]:
    """Every nested size of the recipe, depth-major (`Recipe.size_grid`)."""
    return recipe.size_grid()


def size_weights(recipe: rcp.Recipe, flops: dict[tuple, int]) -> dict[tuple, float] | None:
    """nested.sampling=one-size: each size's unnormalised probability, FLOPs ** nested.one_size_power."""
    if recipe.nested.sampling != "one-size":
        return None
    return {s: float(flops[s]) ** recipe.nested.one_size_power for s in size_grid(recipe)}


def step_sizes(rng: random.Random, recipe: rcp.Recipe, step: int, weights: dict[tuple, float] | None = None) -> list[tuple]:
    """The sizes trained at 0-based `step` (the largest first): the largest alone before
    nested.shrink_start × train.steps and in the last nested.largest_tail × train.steps; in between
    the sandwich, or one size drawn with `weights` (`size_weights`). `rng` is drawn from only on the
    nested steps."""
    ns = recipe.nested
    steps = recipe.train.steps
    if step < int(ns.shrink_start * steps) or step >= steps - int(ns.largest_tail * steps):
        return [recipe.largest()]
    if ns.sampling == "one-size":
        sizes = list(weights)
        return rng.choices(sizes, weights=[weights[s] for s in sizes])
    return sample_sizes(rng, recipe.depth_options(), ns.widths, ns.sandwich, size_grid(recipe))


@contextlib.contextmanager
def kept_random(task: Task, dev: torch.device):
    """Run a block without moving torch's random states or the task's own generators."""
    gens = [g for g in vars(task).values() if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in gens]
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        try:
            yield
        finally:
            for g, st in zip(gens, states):
                g.set_state(st)


def count_size_flops(net: NestedModel, task: Task, batch: tuple[Tensor, ...], sizes: list[tuple]) -> dict[tuple, int]:
    """FLOPs (torch's FlopCounterMode: matrix products, convolutions, attention) of one training step's
    forward and backward at each of `sizes` on `batch`, the composition of the weights included. Leaves
    every random state and the parameters' gradients as it found them."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with kept_random(task, net._device()):
        try:
            prepared = task.prepare(batch)
            for d, w in sizes:
                with FlopCounterMode(display=False) as fc:
                    task.loss(task.outputs(partial(net, depth=d, width=w), prepared), prepared).backward()
                out[(d, w)] = int(fc.get_total_flops())
        finally:
            for p in net.parameters():
                p.grad = None
    return out


def count_forward_flops(forward: Callable, task: Task, batch: tuple[Tensor, ...], dev: torch.device) -> int:
    """FLOPs of one forward of `forward` (a frozen teacher) on `batch`, random states kept."""
    from torch.utils.flop_counter import FlopCounterMode

    with kept_random(task, dev), torch.no_grad(), FlopCounterMode(display=False) as fc:
        task.outputs(forward, task.prepare(batch))
    return int(fc.get_total_flops())


def train_flops(recipe: rcp.Recipe, per_size: dict[tuple, int], teacher_step: int = 0, world: int = 1) -> dict[str, Any]:
    """Training FLOPs of the whole run: the schedule replayed from the seed (every step's sizes, as
    training draws them) times each size's per-batch count, plus the teacher's forwards; `per_size`
    and `teacher_step` are per rank's batch, `world` ranks."""
    rng, weights = random.Random(recipe.seed), size_weights(recipe, per_size)
    trained: dict[tuple, int] = {}
    for step in range(recipe.train.steps):
        for s in step_sizes(rng, recipe, step, weights):
            trained[s] = trained.get(s, 0) + 1
    teacher = teacher_step * recipe.train.steps * world
    total = sum(n * per_size[s] for s, n in trained.items()) * world + teacher
    return {"train_flops": total, "teacher_flops": teacher, "size_steps": trained}


# ---------------------------------------------------------------------------------------------- the command
def composed_forward(module: nn.Module, sized: Bundle) -> Callable[..., Tensor]:
    """The task's forward of `module` (x → logits; (x_t, t, y) → ε) with the composed weights of
    `sized` (gradients reach its tensors)."""
    from torch.func import functional_call

    # Buffers a state dict does not hold (a sin-cos position code recomputed from the size) are the
    # module's own; strict=True then still refuses any weight the bundle lacks.
    stored = set(module.state_dict())
    own = {k: v for k, v in module.named_buffers() if k not in stored}

    def forward(*inputs: Tensor) -> Tensor:
        with torch.autocast(inputs[0].device.type, enabled=False):  # compose in float32, even under bf16 autocast
            state = {**own, **sized.state_dict()}
        return sized.adapter.apply(lambda *a, **k: functional_call(module, state, a, k, strict=True), *inputs)

    return forward


