"""Ternary quantizer math as pure functions: weight -> (codes in {-1, 0, +1}, scales) and back.

Scales are a 2-D tensor that broadcasts over the (out, in) weight after expanding its second
dimension by `group_size`: per tensor (1, 1), per channel (out, 1), per group (out, ceil(in / g)).
"""

from __future__ import annotations

import torch

_EPS = 1e-8
_LSQ_MAX_ITERS = 30


def grouped(weight: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View the weight as (rows, groups, elements) so every scale reduces over the last dimension."""
    out_features, in_features = weight.shape
    if granularity == "tensor":
        return weight.reshape(1, 1, -1)
    if granularity == "channel":
        return weight.reshape(out_features, 1, in_features)
    if granularity == "group":
        group_size = min(group_size, in_features)  # a group wider than the rows is the row, unpadded
        pad = -in_features % group_size
        # Zero padding is neutral for every method below: it adds nothing to |W| sums and is
        # excluded from means through the element count of each group.
        padded = torch.nn.functional.pad(weight, (0, pad))
        return padded.reshape(out_features, -1, group_size)
    raise ValueError(f"unknown granularity {granularity!r}")


def _group_counts(in_features: int, granularity: str, group_size: int | None, device) -> torch.Tensor:
    """Number of real (not padded) elements in each group, shaped to broadcast as (1, groups, 1)."""
    if granularity != "group":
        return torch.ones(1, 1, 1, device=device)  # unused: means over unpadded groups are plain
    starts = torch.arange(0, in_features, group_size, device=device)
    return (torch.clamp(in_features - starts, max=group_size)).float().reshape(1, -1, 1)


def _mean_abs(groups: torch.Tensor, counts: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "group":
        return groups.abs().sum(-1, keepdim=True) / counts
    return groups.abs().mean(-1, keepdim=True)


def _absmean(groups, counts, granularity):
    gamma = _mean_abs(groups, counts, granularity).clamp_min(_EPS)
    codes = torch.clamp(torch.round(groups / gamma), -1, 1)
    return codes, gamma


def _mean_kept(magnitudes, kept, work=None):
    """s = <W,T>/<T,T>, the least-squares scale of the codes: the mean |w| of those kept (kept: 1.0 where a code
    is, else 0.0; W T = |W| there). Floored only where none is kept: a floor on the others would scale a group
    of tiny weights (1e-11) up to it. work: a buffer of |W|'s shape for the products, so that lsq's steps
    allocate nothing (on a CPU a fresh tensor of FLUX's size costs more in page faults than the arithmetic)."""
    count = kept.sum(-1, keepdim=True)
    scale = torch.mul(magnitudes, kept, out=work).sum(-1, keepdim=True) / count.clamp_min(1)
    return torch.where(count > 0, scale, _EPS)


def _twn(groups, counts, granularity):
    magnitudes = groups.abs()
    codes = torch.sign(groups) * (magnitudes > 0.7 * _mean_abs(groups, counts, granularity))
    return codes, _mean_kept(magnitudes, codes.abs())


def _lsq(groups, counts, granularity):
    """Alternate the two exact partial minimisers of ||W - s T||^2: T = clip(round(W / s)), s = <W,T>/<T,T>.

    Starting from TWN, every step can only lower the error, so lsq is never worse than twn. It stops at the
    first fixed point, a local optimum (for rows with outliers, not the global one). T's signs are W's, so the
    steps work on |W| and where codes are kept: clip(round(w / s)) is nonzero exactly where |w| / s > 0.5
    (round half to even takes 0.5 to 0). The same bits as with the codes themselves, in buffers made once:
    on a 12288 x 3072 layer 3.0-4.2x faster with 4 KB pages (a Python process's default), 1.2-2.7x with the
    huge pages the `bitflux` command asks for (BENCHMARKS.md, benchmarks/cpu_ternarize.py).
    """
    codes, scale = _twn(groups, counts, granularity)
    magnitudes, kept = groups.abs(), codes.abs()
    work, new_kept = torch.empty_like(magnitudes), torch.empty_like(magnitudes)
    for _ in range(_LSQ_MAX_ITERS):
        torch.gt(torch.div(magnitudes, scale, out=work), 0.5, out=new_kept)
        scale = _mean_kept(magnitudes, new_kept, work)
        stable = torch.equal(new_kept, kept)
        kept, new_kept = new_kept, kept
        if stable:
            break
    return torch.sign(groups) * kept, scale


_METHODS = {"absmean": _absmean, "twn": _twn, "lsq": _lsq}


@torch.no_grad()
def ternarize(
    weight: torch.Tensor, method: str = "absmean", granularity: str = "tensor", group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize a (out, in) weight. Returns codes (int8 in {-1, 0, 1}, same shape) and float32 scales."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}")
    if granularity == "group" and not group_size:
        raise ValueError("granularity 'group' needs a group_size")
    out_features, in_features = weight.shape
    groups = grouped(weight.float(), granularity, group_size)
    counts = _group_counts(in_features, granularity, group_size, weight.device)
    codes, scale = _METHODS[method](groups, counts, granularity)
    codes = codes.reshape(out_features, -1)[:, :in_features] if granularity == "group" else codes.reshape(weight.shape)
    return codes.to(torch.int8), scale.reshape(scale.shape[0], scale.shape[1]).float()


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Scales broadcastable against a (out, in) weight."""
    if scales.shape[1] == 1:
        return scales
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None, dtype=torch.float32):
    """codes * scales as a dense (out, in) weight of `dtype`."""
    return codes.to(dtype) * expand_scales(scales, codes.shape[1], group_size).to(dtype)


def relative_error(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size=None) -> float:
    """||W - dequantize(codes, scales)||_F / ||W||_F."""
    w = weight.float()
    return (torch.linalg.norm(w - dequantize(codes, scales, group_size)) / torch.linalg.norm(w)).item()
