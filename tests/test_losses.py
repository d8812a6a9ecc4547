"""Tests for CoDE's InfoNCE loss, derangements and the full CoDE loss."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from codetrain.losses import code_loss, derangement, info_nce

VIEWS = ("x_r", "x_f", "a_r", "a_f", "g_r", "l_r", "g_f", "l_f")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Random float64 unit vectors, one per row."""
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_nce(q: np.ndarray, k: np.ndarray, negs: np.ndarray, t: float) -> float:
    """InfoNCE written out with plain Python loops and math.exp/log (float64)."""
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(sum(q[i][j] * k[i][j] for j in range(len(q[i]))) / t)
        neg = sum(math.exp(sum(q[i][j] * m[j] for j in range(len(m))) / t) for m in negs)
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def make_views(seed: int, batch: int = 6, dim: int = 16) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """The eight CoDE views as numpy arrays and as float64 tensors."""
    rng = np.random.default_rng(seed)
    arrays = {k: unit_rows(rng, batch, dim) for k in VIEWS}
    return arrays, {k: torch.from_numpy(v) for k, v in arrays.items()}


@pytest.mark.parametrize("temperature", [0.1, 0.5, 0.05])
def test_info_nce_matches_direct_loops(temperature: float) -> None:
    rng = np.random.default_rng(0)
    q, k, n = unit_rows(rng, 5, 8), unit_rows(rng, 5, 8), unit_rows(rng, 7, 8)
    got = info_nce(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(n), temperature)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference_nce(q, k, n, temperature), rel=1e-12)


def test_info_nce_is_stable_at_tiny_temperature_in_float32() -> None:
    rng = np.random.default_rng(1)
    q, k, n = unit_rows(rng, 4, 8), unit_rows(rng, 4, 8), unit_rows(rng, 9, 8)
    q[0] = k[0]  # logit 1/t = 200 overflows a naive float32 exp
    t = 0.005
    got = info_nce(*(torch.from_numpy(a).float() for a in (q, k, n)), temperature=t)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(reference_nce(q, k, n, t), rel=1e-4)


def test_info_nce_low_precision_inputs_compute_in_float32() -> None:
    rng = np.random.default_rng(2)
    q, k, n = (torch.from_numpy(unit_rows(rng, m, 8)).float() for m in (4, 4, 6))
    got = info_nce(q.bfloat16(), k.bfloat16(), n.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(info_nce(q, k, n).item(), abs=0.05)


def test_info_nce_rejects_bad_shapes_and_temperature() -> None:
    q = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="query and positive"):
        info_nce(q, q[:2], q)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(q, q, torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, q, temperature=0.0)


def test_derangement_has_no_fixed_point_over_many_sizes_and_seeds() -> None:
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        for n in range(2, 201):
            perm = derangement(n, gen)
            assert perm.dtype == torch.long
            assert torch.equal(torch.sort(perm).values, torch.arange(n)), (n, seed)
            assert not (perm == torch.arange(n)).any(), (n, seed)


def test_derangement_covers_all_derangements_evenly() -> None:
    gen = torch.Generator().manual_seed(7)
    counts = Counter(tuple(derangement(4, gen).tolist()) for _ in range(1800))
    assert len(counts) == 9  # !4 = 9 derangements of 4 items
    assert all(150 <= c <= 250 for c in counts.values()), counts  # ~200 each if uniform


def test_derangement_is_reproducible_from_the_generator() -> None:
    a = derangement(50, torch.Generator().manual_seed(3))
    b = derangement(50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 0])
def test_derangement_of_fewer_than_two_raises(n: int) -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        derangement(n, torch.Generator().manual_seed(0))


def test_code_loss_matches_direct_computation() -> None:
    arrays, tensors = make_views(seed=11)
    t = 0.1
    out = code_loss(tensors, torch.Generator().manual_seed(5), global_local=True, temperature=t)
    replay = torch.Generator().manual_seed(5)
    perm_r = derangement(6, replay).tolist()
    perm_f = derangement(6, replay).tolist()
    a_r = np.stack([arrays["a_r"][p] for p in perm_r])
    a_f = np.stack([arrays["a_f"][p] for p in perm_f])
    g_real = reference_nce(arrays["x_r"], a_r, a_f, t)
    g_fake = reference_nce(arrays["x_f"], a_f, a_r, t)
    l_real = reference_nce(arrays["l_r"], arrays["g_r"], arrays["g_f"], t)
    l_fake = reference_nce(arrays["l_f"], arrays["g_f"], arrays["g_r"], t)
    real, fake = (g_real + l_real) / 2, (g_fake + l_fake) / 2
    assert out.total.item() == pytest.approx(real + fake, rel=1e-12)
    assert out.real == pytest.approx(real, rel=1e-12)
    assert out.fake == pytest.approx(fake, rel=1e-12)
    assert (out.global_real, out.global_fake) == pytest.approx((g_real, g_fake), rel=1e-12)
    assert (out.local_real, out.local_fake) == pytest.approx((l_real, l_fake), rel=1e-12)
    assert out.log_dict()["loss"] == pytest.approx(real + fake, rel=1e-12)


def test_global_only_ablation_differs_and_needs_no_crops() -> None:
    _, tensors = make_views(seed=12)
    full = code_loss(tensors, torch.Generator().manual_seed(1))
    global_only = {k: v for k, v in tensors.items() if k in ("x_r", "x_f", "a_r", "a_f")}
    ablation = code_loss(global_only, torch.Generator().manual_seed(1), global_local=False)
    assert ablation.total.item() != pytest.approx(full.total.item(), rel=1e-6)
    assert ablation.global_real == pytest.approx(full.global_real, rel=1e-12)
    assert ablation.total.item() == pytest.approx(full.global_real + full.global_fake, rel=1e-12)
    assert ablation.local_real is None and ablation.local_fake is None
    assert "loss_local_real" not in ablation.log_dict()


def test_code_loss_names_missing_views() -> None:
    _, tensors = make_views(seed=13)
    del tensors["l_f"]
    with pytest.raises(KeyError, match="l_f"):
        code_loss(tensors, torch.Generator().manual_seed(0))


def test_gradients_reach_every_view() -> None:
    _, tensors = make_views(seed=14)
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    code_loss(leaves, torch.Generator().manual_seed(0)).total.backward()
    for key, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, key


def test_loss_decreases_when_embeddings_are_free_parameters() -> None:
    torch.manual_seed(0)
    params = {k: torch.nn.Parameter(torch.randn(8, 16)) for k in VIEWS}
    opt = torch.optim.Adam(params.values(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = code_loss({k: F.normalize(p, dim=1) for k, p in params.items()}, gen)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
