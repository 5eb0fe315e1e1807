"""Composition math (docs/method.md §1) and shared SVD extraction (docs/method.md §3), as properties over shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weit_cli.core.kron import compose, extract_shared, rearrange, relative_error

PROPS = settings(max_examples=25, deadline=None, derandomize=True)

dims = st.integers(1, 4)
kernels = st.sampled_from([(), (1,), (3,), (2, 3), (3, 3)])


def kron_sum(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ_t torch.kron(S[t], T[t]); for conv templates S[t] gets trailing unit dims (torch.kron would
    otherwise pad it in front)."""
    k = t.dim() - 3
    return sum(torch.kron(s[i].reshape(*s.shape[1:], *([1] * k)), t[i]) for i in range(s.shape[0]))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@PROPS
@given(n=dims, a=dims, b=dims, p=dims, q=dims, kernel=kernels, seed=st.integers(0, 2**16))
def test_compose_is_sum_of_kron(n, a, b, p, q, kernel, seed):
    s, t = rand(n, a, b, seed=seed), rand(n, p, q, *kernel, seed=seed + 1)
    w = compose(s, t)
    assert w.shape == (a * p, b * q, *kernel)
    torch.testing.assert_close(w, kron_sum(s, t), rtol=1e-12, atol=1e-12)


def test_compose_block_layout_by_hand():
    # one template, 2×1 grid of 1×2 blocks: W = [[s0·t], [s1·t]]
    s = torch.tensor([[[2.0], [-1.0]]])
    t = torch.tensor([[[1.0, 3.0]]])
    assert compose(s, t).tolist() == [[2.0, 6.0], [-1.0, -3.0]]


@PROPS
@given(n=dims, a=dims, b=dims, p=dims, q=dims, kernel=kernels, seed=st.integers(0, 2**16))
def test_rearrange_is_van_loan_pitsianis(n, a, b, p, q, kernel, seed):
    s, t = rand(n, a, b, seed=seed), rand(n, p, q, *kernel, seed=seed + 1)
    r = rearrange(kron_sum(s, t), p, q)
    expected = sum(torch.outer(s[i].reshape(-1), t[i].reshape(-1)) for i in range(n))  # Σ vec S vec Tᵀ
    torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-12)


@PROPS
@given(a=dims, b=dims, p=dims, q=dims, kernel=kernels)
def test_rearrange_is_a_permutation(a, b, p, q, kernel):
    w = torch.arange(a * p * b * q * max(1, torch.Size(kernel).numel()), dtype=torch.float64)
    w = w.reshape(a * p, b * q, *kernel)
    r = rearrange(w, p, q)
    assert r.shape[0] == a * b
    assert sorted(r.reshape(-1).tolist()) == w.reshape(-1).tolist()


def test_shape_errors():
    with pytest.raises(ValueError, match="grid of 3×2 blocks"):
        rearrange(torch.zeros(4, 4), 3, 2)
    with pytest.raises(ValueError, match="2 scaler sets for 3 templates"):
        compose(torch.zeros(2, 1, 1), torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="num_templates"):
        extract_shared([torch.zeros(4, 4)], 2, 2, 5)


# ---------------------------------------------------------------------------------------------- extraction
@PROPS
@given(layers=st.integers(1, 3), a=dims, b=dims, p=st.integers(1, 3), q=st.integers(1, 3), kernel=kernels,
       seed=st.integers(0, 2**16))
def test_full_rank_extraction_is_exact(layers, a, b, p, q, kernel, seed):
    weights = [rand(a * p, b * q, *kernel, seed=seed + i).float() for i in range(layers)]
    full = p * q * max(1, torch.Size(kernel).numel())
    templates, scalers = extract_shared(weights, p, q, full)
    assert templates.shape == (full, p, q, *kernel)
    for w, s in zip(weights, scalers):
        assert s.shape == (full, a, b)
        torch.testing.assert_close(compose(s, templates), w, rtol=1e-5, atol=1e-5)
    assert relative_error(weights, scalers, templates) < 1e-6


def test_truncated_error_decreases_and_matches_singular_values():
    p = q = 4
    weights = [rand(12, 8, seed=i).float() for i in range(3)]
    stacked = torch.cat([rearrange(w.double(), p, q) for w in weights])
    sigma = torch.linalg.svdvals(stacked)
    total = stacked.pow(2).sum()
    errors = []
    for n in (1, 2, 4, 8, 12, 16):
        templates, scalers = extract_shared(weights, p, q, n)
        reported = relative_error(weights, scalers, templates)
        # recomputed by hand from the dense weights …
        num = sum((w.double() - compose(s.double(), templates.double())).pow(2).sum() for w, s in zip(weights, scalers))
        by_hand = (num / sum(w.double().pow(2).sum() for w in weights)).sqrt().item()
        assert reported == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
        # … and equal to the Eckart–Young optimum: the discarded singular values
        optimum = (sigma[n:].pow(2).sum() / total).sqrt().item()
        assert reported == pytest.approx(optimum, rel=1e-4, abs=1e-6)
        errors.append(reported)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:4]))
    assert errors[-1] < 1e-6  # 16 = p·q: exact


def test_templates_are_shared_and_split_sqrt_sigma():
    p = q = 2
    weights = [rand(4, 4, seed=i).float() for i in range(2)]
    templates, scalers = extract_shared(weights, p, q, 3)
    stacked = torch.cat([rearrange(w.double(), p, q) for w in weights])
    sigma = torch.linalg.svdvals(stacked)[:3]
    # Both factors carry √σ: ‖T_t‖ = √σ_t and the stacked scaler columns have norm √σ_t too.
    t_norm = templates.double().reshape(3, -1).norm(dim=1)
    s_norm = torch.cat([s.double().reshape(3, -1) for s in scalers], 1).norm(dim=1)
    torch.testing.assert_close(t_norm, sigma.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_norm, sigma.sqrt(), rtol=1e-5, atol=1e-6)


def test_sign_fix_makes_extraction_reproducible():
    weights = [rand(6, 6, seed=i).float() for i in range(2)]
    t1, s1 = extract_shared(weights, 3, 3, 5)
    t2, s2 = extract_shared(weights, 3, 3, 5)
    assert torch.equal(t1, t2) and all(torch.equal(a, b) for a, b in zip(s1, s2))
    flat = t1.reshape(5, -1)
    largest = flat.gather(1, flat.abs().argmax(1, keepdim=True))
    assert (largest > 0).all()
    # SVD signs are arbitrary; the fix pins them to the templates, so −W gives the same templates
    # and negated scalers.
    t3, s3 = extract_shared([-w for w in weights], 3, 3, 5)
    torch.testing.assert_close(t3, t1, rtol=1e-5, atol=1e-6)
    for a, b in zip(s3, s1):
        torch.testing.assert_close(a, -b, rtol=1e-5, atol=1e-6)


def test_padding_beyond_rank_gives_live_templates():
    # One layer, a 2×2 scaler grid: the stack has 4 rows, so at most 4 templates carry signal.
    w = rand(4, 6, seed=3).float()
    templates, (scalers,) = extract_shared([w], 2, 3, 6)
    flat = templates.double().reshape(6, -1)
    assert (flat.norm(dim=1) > 0).all()  # no dead (zero) templates …
    assert scalers[4:].abs().max() == 0  # … the extra ones start with zero scalers,
    torch.testing.assert_close(flat @ flat.T - torch.diag(flat.norm(dim=1) ** 2), torch.zeros(6, 6, dtype=torch.float64),
                               atol=1e-5, rtol=0)  # orthogonal to the signal and to each other,
    torch.testing.assert_close(compose(scalers, templates), w, rtol=1e-5, atol=1e-5)  # and change nothing


def test_rank_deficient_weights_get_no_dead_templates():
    # Duplicated blocks (a checkpoint that was itself grown by tiling) leave zero singular values;
    # those directions must be padded like the ones beyond the row count, not left at zero.
    half = rand(2, 4, seed=5).float()
    w = torch.cat([half, half], 0)  # 4×4 in 2×2 blocks: the stack has 4 rows but rank 2
    templates, (scalers,) = extract_shared([w], 2, 2, 4)
    assert (templates.reshape(4, -1).norm(dim=1) > 1e-3).all()
    torch.testing.assert_close(compose(scalers, templates), w, rtol=1e-5, atol=1e-5)
    templates, (scalers,) = extract_shared([torch.zeros(4, 4)], 2, 2, 4)
    assert (templates.reshape(4, -1).norm(dim=1) > 0).all() and scalers.abs().max() == 0


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_compose_into_reused_buffers_is_identical(kernel):
    s, t = rand(5, 3, 2, seed=7).float(), rand(5, 4, 2, *kernel, seed=8).float()
    work = torch.full((1000,), float("nan"))  # larger than needed, and dirty
    out = torch.full((3 * 4 * 2 * 2 * max(1, torch.Size(kernel).numel()),), float("nan"))
    w = compose(s, t, out=out, work=work)
    assert w.data_ptr() == out.data_ptr() and w.shape == (12, 4, *kernel)
    assert torch.equal(w, compose(s, t))
    half = compose(s, t, out=torch.empty(out.numel(), dtype=torch.bfloat16), work=work)  # casts on the way
    assert half.dtype == torch.bfloat16 and torch.equal(half, compose(s, t).to(torch.bfloat16))
