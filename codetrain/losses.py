"""CoDE's contrastive loss: InfoNCE global (supervised, deranged positives) and global-local terms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

DEFAULT_TEMPERATURE = 0.1
"""InfoNCE temperature of the paper."""

GLOBAL_KEYS = ("x_r", "x_f", "a_r", "a_f")
LOCAL_KEYS = ("g_r", "l_r", "g_f", "l_f")


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Mean over the batch of -log(e^{q.k+/t} / (e^{q.k+/t} + sum_n e^{q.n/t})); every negative serves every query."""
    if query.ndim != 2 or query.shape != positive.shape:
        raise ValueError(f"query and positive must both be [B,D], got {tuple(query.shape)} and {tuple(positive.shape)}")
    if negatives.ndim != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives must be [M,{query.shape[1]}], got {tuple(negatives.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, k, n = query.to(dtype), positive.to(dtype), negatives.to(dtype)
    pos = (q * k).sum(dim=1, keepdim=True) / temperature
    logits = torch.cat([pos, q @ n.T / temperature], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos.squeeze(1)).mean()


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling, ~e draws)."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2 items (got n={n}): no sample can avoid its own index")
    identity = torch.arange(n, device=generator.device)
    while True:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        if not bool((perm == identity).any()):
            return perm


@dataclass
class LossOutput:
    """The total loss (for backward) and its parts as detached floats (for logging)."""

    total: torch.Tensor
    real: float
    fake: float
    global_real: float
    global_fake: float
    local_real: float | None
    local_fake: float | None

    def log_dict(self) -> dict[str, float]:
        """Every defined value as a float, keyed by name."""
        values = {
            "loss": float(self.total.detach()),
            "loss_real": self.real,
            "loss_fake": self.fake,
            "loss_global_real": self.global_real,
            "loss_global_fake": self.global_fake,
            "loss_local_real": self.local_real,
            "loss_local_fake": self.local_fake,
        }
        return {k: v for k, v in values.items() if v is not None}


def _check(emb: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    """Refuse missing views or views of differing shape."""
    missing = [k for k in keys if k not in emb]
    if missing:
        raise KeyError(f"code_loss needs embeddings {list(keys)}; missing {missing}")
    shapes = {k: tuple(emb[k].shape) for k in keys}
    if len(set(shapes.values())) != 1 or len(shapes[keys[0]]) != 2:
        raise ValueError(f"all embeddings must share one [B,D] shape, got {shapes}")


def code_loss(
    emb: Mapping[str, torch.Tensor],
    generator: torch.Generator,
    global_local: bool = True,
    temperature: float = DEFAULT_TEMPERATURE,
) -> LossOutput:
    """L = L_real + L_fake of CoDE; draws the real derangement, then the fake one, from `generator`."""
    keys = GLOBAL_KEYS + (LOCAL_KEYS if global_local else ())
    _check(emb, keys)
    batch = emb["x_r"].shape[0]
    device = emb["x_r"].device
    a_r = emb["a_r"][derangement(batch, generator).to(device)]
    a_f = emb["a_f"][derangement(batch, generator).to(device)]
    global_real = info_nce(emb["x_r"], a_r, a_f, temperature)
    global_fake = info_nce(emb["x_f"], a_f, a_r, temperature)
    if global_local:
        local_real = info_nce(emb["l_r"], emb["g_r"], emb["g_f"], temperature)
        local_fake = info_nce(emb["l_f"], emb["g_f"], emb["g_r"], temperature)
        real = (global_real + local_real) / 2
        fake = (global_fake + local_fake) / 2
        parts = torch.stack([real, fake, global_real, global_fake, local_real, local_fake]).detach().tolist()
        locals_ = parts[4], parts[5]
    else:
        real, fake = global_real, global_fake
        parts = torch.stack([real, fake, global_real, global_fake]).detach().tolist()
        locals_ = None, None
    return LossOutput(real + fake, parts[0], parts[1], parts[2], parts[3], *locals_)
