"""TernaryConfig: how a model is ternarized, validated, and serialized into config.json."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import BitfluxError

METHODS = ("absmean", "twn", "lsq")
GRANULARITIES = ("tensor", "channel", "group")
FORMATS = ("tq2", "tq1")
ACTIVATIONS = ("a16", "a8", "fp8")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype names -> torch's
SCALE_DTYPES = ("float32", "float16", "bfloat16")
# torch.finfo(torch.float32).max, without importing torch: the bound of settings that become float32 tensors
FLOAT32_MAX = 3.4028234663852886e38

# The paper's targets: every nn.Linear inside FluxTransformerBlock and FluxSingleTransformerBlock.
DEFAULT_INCLUDE = (r"^transformer_blocks\.\d+\.", r"^single_transformer_blocks\.\d+\.")


@dataclass
class TernaryConfig:
    """Ternarization settings.

    method: absmean (BitNet b1.58, the paper's), twn (thresholded), lsq (alternating least squares).
    granularity: one scale per tensor (the paper's), per output channel, or per group of
        `group_size` consecutive input features.
    format: the codes' packing, on disk and in memory: tq2 (4 codes a byte) runs on every kernel; tq1
        (5 a byte) takes 20% fewer bytes. On a GPU the Triton backend reads tq1 with every strategy but
        its two fused 2-bit tile kernels; the CPU kernel reads tq2 in place and widens a tq1 layer to tq2
        as it reads it (held in 1.6 bits, slower at few tokens: docs/CPU_KERNEL.md).
    activations: a16 keeps activations in the input dtype; a8 quantizes them per token to int8; fp8 per
        token to float8 e4m3 (tensor-core speed on Hopper-class GPUs; per-tensor/channel scales only).
        Slightly different numerics from a16. On CPUs the fast kernel always uses int8 activations.
    include/exclude: regular expressions matched (re.search) against module names.
    """

    method: str = "absmean"
    granularity: str = "tensor"
    group_size: int = 128
    format: str = "tq2"
    activations: str = "a16"
    scale_dtype: str = "float32"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self):
        # one pattern given as a string is that pattern (tuple() would split it into characters)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if not isinstance(patterns, Iterable) or isinstance(patterns, bytes):
                raise BitfluxError(f"{name} must be a pattern or a list of them, got {patterns!r}")
            # a set's order changes from run to run: sorted, so the config (and what it keys) is the same in each
            setattr(self, name, (patterns,) if isinstance(patterns, str) else
                    tuple(sorted(patterns) if isinstance(patterns, set | frozenset) else patterns))
        if isinstance(self.granularity, str) and self.granularity.startswith("group:"):
            raise BitfluxError(f"granularity {self.granularity!r} is the command line's spelling; in Python: "
                               f"granularity='group', group_size={self.granularity.split(':', 1)[1]}")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise BitfluxError(f"bad include/exclude pattern {pattern!r}: {exc}") from None
        for name, value, allowed in (
            ("method", self.method, METHODS),
            ("granularity", self.granularity, GRANULARITIES),
            ("format", self.format, FORMATS),
            ("activations", self.activations, ACTIVATIONS),
            ("scale_dtype", self.scale_dtype, SCALE_DTYPES),
        ):
            if value not in allowed:
                raise BitfluxError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise BitfluxError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.activations == "fp8" and self.granularity == "group":
            raise BitfluxError("fp8 activations need per-tensor or per-channel scales, not per-group")
        if self.version != 1:
            raise BitfluxError(f"unsupported quantization_config version {self.version}")

    @classmethod
    def parse_granularity(cls, text: str) -> dict:
        """'tensor' | 'channel' | 'group:N' -> keyword arguments for TernaryConfig."""
        if text.startswith("group:"):
            size = text.split(":", 1)[1]
            if not size.isdigit() or int(size) < 1:
                raise BitfluxError(f"bad granularity {text!r}; expected group:N with N a positive integer")
            return {"granularity": "group", "group_size": int(size)}
        return {"granularity": text}

    @property
    def scale_torch_dtype(self):
        import torch

        return getattr(torch, self.scale_dtype)

    @property
    def group_size_or_none(self) -> int | None:
        return self.group_size if self.granularity == "group" else None

    def to_dict(self) -> dict:
        from . import __version__

        return {"quant_method": "bitflux", "bitflux_version": __version__, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "TernaryConfig":
        if not isinstance(data, dict):
            raise BitfluxError(f"quantization_config must be a JSON object, found {type(data).__name__}")
        if data.get("quant_method") != "bitflux":
            raise BitfluxError(f"quantization_config is not bitflux's (quant_method={data.get('quant_method')!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
