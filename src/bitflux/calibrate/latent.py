"""The training form of a ternary layer: latent weights rounded on the fly, straight-through gradients.

W = scales * clamp(round(u), -1, 1), where u is the latent weight measured in units of a per-scale-group
rounding step. Measuring u in steps makes one learning rate fit every model: a code flips once u moves
by about half a unit, whatever the magnitude of the original weights.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoint import write_atomic
from ..config import TernaryConfig
from ..kernels import reference
from ..linear import TernaryLinear
from ..surgery import is_target, replace_module
from ..ternary import expand_scales, grouped, ternarize

_EPS = torch.finfo(torch.float32).tiny  # only where a step or scale is 0: groups of tiny weights keep theirs


def rounding_step(weight: torch.Tensor, codes: torch.Tensor, granularity: str, group_size: int | None):
    """Per scale group, a step d with clamp(round(weight / d), -1, 1) == codes.

    absmean, twn and lsq all zero the weights below a magnitude threshold t and keep the sign of the
    rest; d = 2t reproduces that, with t halfway between the largest zeroed and the smallest kept |w|.
    """
    magnitude = grouped(weight.float().abs(), granularity, group_size)
    kept = grouped(codes.float().abs(), granularity, group_size) > 0
    largest_zeroed = torch.where(kept, 0.0, magnitude).amax(-1)
    smallest_kept = torch.where(kept, magnitude, torch.inf).amin(-1)
    # A group with no kept weight needs d > 2 max|w|; one with no zeroed weight, d <= min|w|.
    step = torch.where(smallest_kept.isinf(), 2 * largest_zeroed * (1 + 1e-6), largest_zeroed + smallest_kept)
    return step.clamp_min(_EPS)


def fake_quantized_activations(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x rounded per token as the a8 (int8) or fp8 (e4m3) kernels see it (kernels.reference), with a
    straight-through gradient, so that calibration learns against the activations the model will get."""
    q, scale = reference.quantize_activations(x, fp8=mode == "fp8")
    rounded = q.float() * scale
    return x + (rounded - x.float()).to(x.dtype).detach()


class LatentTernaryLinear(nn.Module):
    """Trainable stand-in for a TernaryLinear: latent `u` (straight-through rounding) and `log_gain` on
    the scales are parameters; the bias stays as it was (a buffer)."""

    def __init__(self, latent: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int | None, config: TernaryConfig):
        super().__init__()
        self.config = config
        self.group_size = group_size
        self.latent = nn.Parameter(latent.float().clone())
        self.log_gain = nn.Parameter(torch.zeros_like(scales, dtype=torch.float32))
        self.register_buffer("base_scale", scales.float().clamp_min(_EPS).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: TernaryConfig, scales: torch.Tensor | None = None):
        """Start exactly at the config's rounding of the full-precision weight (codes), with its scales
        or the given ones."""
        weight = linear.weight.detach().float()
        group_size = config.group_size_or_none
        codes, plain = ternarize(weight, config.method, config.granularity, group_size)
        scales = plain if scales is None else scales
        step = rounding_step(weight, codes, config.granularity, group_size)
        latent = weight / expand_scales(step.reshape(scales.shape), weight.shape[1], group_size)
        return cls(latent, scales, linear.bias, group_size, config)

    @classmethod
    def from_ternary(cls, layer: TernaryLinear, config: TernaryConfig) -> "LatentTernaryLinear":
        """Start at an existing ternary layer; the latent sits on the codes (half a step from flipping). It
        freezes back into the layer's own packing."""
        return cls(layer.codes().float(), layer.weight_scale.float(), layer.bias, layer.group_size,
                   dataclasses.replace(config, format=layer.packing))

    def codes(self) -> torch.Tensor:
        return torch.clamp(torch.round(self.latent.detach()), -1, 1)

    def scales(self) -> torch.Tensor:
        return self.base_scale * torch.exp(self.log_gain)

    def weight(self) -> torch.Tensor:
        """The ternary weight, differentiable: identity gradient through the rounding (straight-through)."""
        u = self.latent
        codes = u + (torch.clamp(torch.round(u), -1, 1) - u).detach()
        return codes * expand_scales(self.scales(), u.shape[1], self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.activations != "a16":
            x = fake_quantized_activations(x, self.config.activations)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def freeze(self) -> TernaryLinear:
        return TernaryLinear.from_codes(self.codes().to(torch.int8), self.scales(), self.bias, self.group_size,
                                        self.config)


def target_linears(root: nn.Module, config: TernaryConfig, prefix: str = "") -> dict[str, nn.Linear]:
    """The nn.Linear layers of `root` the config targets; `prefix` is root's name in the whole model, so
    the include/exclude patterns see full names."""
    return {name: module for name, module in root.named_modules()
            if is_target(f"{prefix}.{name}" if prefix else name, module, config)}


def to_latent(root: nn.Module, config: TernaryConfig, prefix: str = "",
              scales: dict[str, torch.Tensor] | None = None) -> int:
    """In place: TernaryLinear layers and targeted nn.Linear layers become LatentTernaryLinear (the
    latter with `scales[name]` where given). Returns how many layers were converted."""
    scales = scales or {}
    linears = target_linears(root, config, prefix)
    for name, module in linears.items():
        replace_module(root, name, LatentTernaryLinear.from_linear(module, config, scales.get(name)))
    ternary = [(n, m) for n, m in root.named_modules() if isinstance(m, TernaryLinear)]
    for name, module in ternary:
        replace_module(root, name, LatentTernaryLinear.from_ternary(module, config))
    return len(linears) + len(ternary)


def freeze(root: nn.Module) -> None:
    """In place: every LatentTernaryLinear becomes the TernaryLinear it computes."""
    for name, module in list(root.named_modules()):
        if isinstance(module, LatentTernaryLinear):
            replace_module(root, name, module.freeze())


def latent_layers(root: nn.Module) -> dict[str, LatentTernaryLinear]:
    return {n: m for n, m in root.named_modules() if isinstance(m, LatentTernaryLinear)}


def fit(root: nn.Module, loss_of, records: int, steps: int, batch_size: int, latent_lr: float, scale_lr: float,
        seed: int, progress: bool = True, desc: str = "", checkpoint: Path | None = None,
        checkpoint_seconds: float = 300.0) -> None:
    """Adam on the latent weights and log-scales of root's LatentTernaryLinear layers, everything else
    frozen; `loss_of(index)` is the loss on the records at `index`, drawn with a seeded generator. The
    cosine schedule decays to zero so that the codes settle before freezing. With `checkpoint`, the whole
    training state (trainable tensors, Adam's moments, the schedule, the record generator) is written there
    every `checkpoint_seconds` and at the end, and a run that finds it there goes on from its step: the
    result equals an uninterrupted run's."""
    layers = latent_layers(root)
    for p in root.parameters():
        p.requires_grad_(False)
    trainable = {f"{name}.{kind}": getattr(m, kind) for name, m in layers.items() for kind in ("latent", "log_gain")}
    groups = [{"params": [m.latent for m in layers.values()], "lr": latent_lr},
              {"params": [m.log_gain for m in layers.values()], "lr": scale_lr}]
    for p in trainable.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    generator = torch.Generator().manual_seed(seed)
    start = 0
    if checkpoint is not None and checkpoint.exists():
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            with torch.no_grad():
                for name, tensor in state["trainable"].items():
                    trainable[name].copy_(tensor)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            start = state["step"]
        except (RuntimeError, KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as exc:
            from .teacher import damaged_record

            raise damaged_record(checkpoint, exc) from None
    saved_at = time.monotonic()
    for step in tqdm(range(start, steps), desc=desc, unit="step", leave=False, disable=not progress, initial=start,
                     total=steps):
        loss = loss_of(torch.randint(records, (batch_size,), generator=generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if checkpoint is not None and (step + 1 == steps or time.monotonic() - saved_at >= checkpoint_seconds):
            _save_training_state(checkpoint, step + 1, trainable, optimizer, schedule, generator)
            saved_at = time.monotonic()
    for p in root.parameters():
        p.requires_grad_(False)


def _save_training_state(path: Path, step: int, trainable: dict, optimizer, schedule, generator) -> None:
    state = {"step": step, "trainable": {name: p.detach() for name, p in trainable.items()},
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "generator": generator.get_state()}
    write_atomic(path, lambda tmp: torch.save(state, tmp))  # a run stopped while writing keeps the previous one
