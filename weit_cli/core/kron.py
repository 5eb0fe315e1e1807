"""Composition math: W = Σ_t S[t] ⊗ T[t] ("scaler_outer"), its rearrangement, and shared SVD extraction.

Shapes: templates T (N, p, q, *k), scalers S (N, a, b); the composed weight is (a·p, b·q, *k), an
a×b grid of p×q blocks (times any trailing kernel dims k, for convolutions).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def compose(scalers: Tensor, templates: Tensor, *, out: Tensor | None = None, work: Tensor | None = None) -> Tensor:
    """W[i·p+k, j·q+l, ...] = Σ_t S[t,i,j] · T[t,k,l,...]; one matmul, then a block permute.

    `out` (any dtype, W's number of elements) receives W, and `work` (flat, the inputs' dtype, at
    least W's number of elements) holds the matmul result: a streaming writer that reuses both for
    every weight avoids page-faulting fresh memory, which costs as much as the matmul itself. Both
    are for no-grad use only."""
    import torch

    n, a, b = scalers.shape
    nt, p, q, *kernel = templates.shape
    if n != nt:
        raise ValueError(f"{n} scaler sets for {nt} templates")
    lhs, rhs = scalers.reshape(n, a * b).transpose(0, 1), templates.reshape(n, -1)
    if work is None:
        blocks = lhs @ rhs  # (a·b, p·q·k)
    else:
        blocks = torch.mm(lhs, rhs, out=work[: a * b * rhs.shape[1]].view(a * b, rhs.shape[1]))
    w = blocks.reshape(a, b, p, q, *kernel).transpose(1, 2)  # (a, p, b, q, *k)
    if out is None:
        return w.reshape(a * p, b * q, *kernel)
    out.view(a, p, b, q, *kernel).copy_(w)
    return out.view(a * p, b * q, *kernel)


def rearrange(weight: Tensor, p: int, q: int) -> Tensor:
    """Van Loan–Pitsianis R(W): one row per p×q block, so R(Σ S⊗T) = Σ vec(S) vec(T)ᵀ."""
    rows, cols, *kernel = weight.shape
    if rows % p or cols % q:
        raise ValueError(f"weight {tuple(weight.shape)} is not a grid of {p}×{q} blocks")
    a, b = rows // p, cols // q
    w = weight.reshape(a, p, b, q, *kernel).transpose(1, 2)
    return w.reshape(a * b, -1)


def extract_shared(weights: list[Tensor], p: int, q: int, num_templates: int) -> tuple[Tensor, list[Tensor]]:
    """Least-squares best templates shared by `weights` (one per layer) and each layer's scalers.

    Stacks R(W_l) over layers and takes a rank-N truncated SVD, splitting √σ between both sides.
    With N = p·q·k the factorisation is exact. Directions beyond the matrix rank get zero scalers and
    unit-scale templates from the orthogonal complement, so they stay trainable rather than dead.
    """
    import torch

    kernel = tuple(weights[0].shape[2:])
    dim = p * q * math.prod(kernel)
    if not 1 <= num_templates <= dim:
        raise ValueError(f"num_templates must be in 1..{dim} for {p}×{q} templates")
    mats = [rearrange(w.detach().to(torch.float64), p, q) for w in weights]
    stacked = torch.cat(mats, 0)
    # The complement is only needed when more templates are asked for than the stack has rows.
    u, s, vh = torch.linalg.svd(stacked, full_matrices=num_templates > min(stacked.shape))
    # Numerical rank, not the row count: zero singular directions (duplicated or zeroed layers, e.g.
    # a checkpoint that was itself grown by tiling) would otherwise give zero templates with zero
    # scalers, a saddle point that gradient descent can never leave.
    tol = s.max() * max(stacked.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    rank = min(num_templates, int((s > tol).sum()))
    root = s[:rank].sqrt()
    t = torch.zeros(num_templates, dim, dtype=torch.float64)
    t[:rank] = root[:, None] * vh[:rank]
    left = torch.zeros(stacked.shape[0], num_templates, dtype=torch.float64)
    left[:, :rank] = u[:, :rank] * root[None, :]
    if num_templates > rank:  # padding directions: orthonormal complement, typical scale
        scale = root.mean() if rank else torch.tensor(1.0, dtype=torch.float64)
        t[rank:] = vh[rank:num_templates] * scale
    # Fix the SVD's sign ambiguity so extraction is reproducible: largest |entry| of each template > 0.
    idx = t.abs().argmax(1)
    sign = torch.sign(t.gather(1, idx[:, None]).squeeze(1))
    sign[sign == 0] = 1
    t = t * sign[:, None]
    left = left * sign[None, :]
    dtype = weights[0].dtype if weights[0].is_floating_point() else torch.float32
    templates = t.reshape(num_templates, p, q, *kernel).to(dtype)
    scalers, start = [], 0
    for w, m in zip(weights, mats):
        a, b = w.shape[0] // p, w.shape[1] // q
        chunk = left[start : start + m.shape[0]]
        start += m.shape[0]
        scalers.append(chunk.transpose(0, 1).reshape(num_templates, a, b).to(dtype))
    return templates, scalers


def relative_error(weights: list[Tensor], scalers: list[Tensor], templates: Tensor) -> float:
    """‖W − Σ S⊗T‖_F / ‖W‖_F over all layers of one type."""
    import torch

    num = den = 0.0
    for w, s in zip(weights, scalers):
        w64 = w.to(torch.float64)
        num += (w64 - compose(s.to(torch.float64), templates.to(torch.float64))).pow(2).sum().item()
        den += w64.pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else 0.0


