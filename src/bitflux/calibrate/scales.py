"""Closed-form scale refinement: per layer, the scales that minimise the output error E||x (W - W_q)^T||^2
under the layer's own input statistics, with the ternary codes held fixed.

With G = E[x x^T] (the layer's input Gram matrix) the error is tr((W - W_q) G (W - W_q)^T), quadratic in
the scales, so the best scales solve a small linear system per output row (one unknown per scale group).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ternary import dequantize, grouped, ternarize

# GPTQ's dampening: adding 1 % of the mean diagonal keeps G well conditioned when some input features
# never vary, and pulls the solution slightly towards the weight-space (plain) scales.
DAMPING = 0.01
_CHUNK_ELEMENTS = 2**26  # bounds the per-group solve's intermediate to 256 MiB of fp32


class InputGrams:
    """Accumulates G = mean over tokens of x x^T at the input of each given nn.Linear (forward pre-hooks)."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.sums = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                     for name, m in layers.items()}
        self.tokens = dict.fromkeys(layers, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sums[name].addmm_(x.t(), x)
            self.tokens[name] += x.shape[0]
        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return {name: total / max(self.tokens[name], 1) for name, total in self.sums.items()}


def damped(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    return gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], device=gram.device)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(E G E^T) / tr(W G W^T) with E = W - W_q: the relative output error under inputs with Gram G."""
    error = weight.float() - quantized.float()
    return ((error @ gram) * error).sum().item() / ((weight.float() @ gram) * weight.float()).sum().clamp_min(1e-30).item()


@torch.no_grad()
def solve_scales(weight: torch.Tensor, codes: torch.Tensor, gram: torch.Tensor, granularity: str,
                 group_size: int | None) -> torch.Tensor:
    """argmin over scales of tr((W - s*T) G (W - s*T)^T), scales shaped as ternarize() returns them."""
    dtype = torch.promote_types(gram.dtype, torch.float32)
    w, t, gram = weight.to(dtype), codes.to(dtype), gram.to(dtype)
    if granularity in ("tensor", "channel"):
        dims = None if granularity == "tensor" else 1
        numerator = (t * (w @ gram)).sum(dims)
        denominator = (t * (t @ gram)).sum(dims)
        return (numerator / denominator.clamp_min(1e-30)).reshape(-1, 1)
    # Per group: A[r, g, h] = t_rg^T G_gh t_rh and b[r, g] = t_rg^T (G w_r)_g, one G x G system per row.
    group_size = min(group_size, t.shape[1])  # a group wider than the rows is one group of the row, unpadded
    t_groups = grouped(t, "group", group_size)  # (out, groups, size)
    n_groups = t_groups.shape[1]
    padded = n_groups * group_size
    g = torch.nn.functional.pad(gram, (0, padded - gram.shape[0], 0, padded - gram.shape[0]))
    g = g.reshape(n_groups, group_size, n_groups, group_size)
    b = (t_groups * grouped(w @ gram, "group", group_size)).sum(-1)
    rows = max(1, _CHUNK_ELEMENTS // (padded * n_groups))
    a = torch.cat([torch.einsum("rgi,rgih->rgh", chunk, torch.einsum("gihj,rhj->rgih", g, chunk))
                   for chunk in t_groups.split(rows)])
    ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-30)
    a = a + ridge * torch.eye(n_groups, device=a.device, dtype=dtype)
    return torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def refined_scales(linear: nn.Linear, gram: torch.Tensor, config) -> tuple[torch.Tensor, float, float]:
    """The config's codes for this layer with output-error-optimal scales, and the relative output error
    (under the damped Gram) before and after. Where the solution is not a usable positive scale (a group
    with no kept weight, a degenerate system), the plain scale is kept."""
    weight = linear.weight.detach().float()
    group_size = config.group_size_or_none
    codes, plain = ternarize(weight, config.method, config.granularity, group_size)
    gram = damped(gram.to(weight.device))
    solved = solve_scales(weight, codes, gram, config.granularity, group_size)
    scales = torch.where(torch.isfinite(solved) & (solved > 0), solved, plain)
    before = output_error(weight, dequantize(codes, plain, group_size), gram)
    after = output_error(weight, dequantize(codes, scales, group_size), gram)
    return scales, before, after
