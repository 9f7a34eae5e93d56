"""CalibrationConfig: what calibration runs and with which budget, validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import BitfluxError

STAGES = ("scales", "blockwise", "distill", "onpolicy")
# `--calibration X` on the command line runs X and every cheaper stage before it.
LEVELS = {"scales": ("scales",), "blockwise": ("scales", "blockwise"), "distill": ("scales", "blockwise", "distill"),
          "onpolicy": STAGES}


@dataclass
class CalibrationConfig:
    """stages: any of scales, blockwise, distill, onpolicy, run in that order.
    samples: teacher trajectories (one image each, prompts cycled, noise seed `seed + j`); every
        denoising step of each is one training record. The onpolicy stage records as many fresh ones (seeds
        `seed + samples + j`) and as many of the student's own.
    steps: optimisation steps per block (blockwise); distill_steps: in total (distill); onpolicy_steps: in
        each round of the onpolicy stage.
    onpolicy_rounds: each round records as many fresh and own trajectories again (round r: seeds
        `seed + samples * (1 + 2r) + j` and `seed + samples * (2 + 2r) + j`; the student as the round before left
        it), adds them to the earlier rounds' records and distils on all of them (DAgger).
    pipeline_kwargs: how the teacher samples (num_inference_steps, guidance_scale, height, width,
        max_sequence_length): calibrate at the settings you generate with. Those not given are
        `bitflux generate`'s: the model's own image size and text length, 20 steps, guidance 3.5.
    """

    stages: tuple[str, ...] = ("scales", "blockwise")
    samples: int = 32
    steps: int = 200
    distill_steps: int = 500
    onpolicy_steps: int = 500
    onpolicy_rounds: int = 1
    batch_size: int = 16
    latent_lr: float = 1e-2  # in rounding steps per optimisation step (see latent.py)
    scale_lr: float = 1e-3  # on log(scale)
    eval_records: int = 64  # fixed records on which each stage's objective is reported
    seed: int = 0
    pipeline_kwargs: dict = field(default_factory=dict)
    version: int = 1

    def __post_init__(self):
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise BitfluxError(f"unknown calibration stage {unknown[0] if unknown else '(none)'!r}; "
                               f"choose from {', '.join(STAGES)}")
        if list(self.stages) != sorted(set(self.stages), key=STAGES.index):
            raise BitfluxError(f"calibration stages run in the order {', '.join(STAGES)}, each once")
        if self.stages == ("onpolicy",):
            raise BitfluxError("the onpolicy stage goes on from a calibrated student: run it after another stage")
        for name in ("samples", "steps", "distill_steps", "onpolicy_steps", "onpolicy_rounds", "batch_size",
                     "eval_records"):
            value, least = getattr(self, name), 0 if name.endswith("steps") else 1
            if not isinstance(value, int) or value < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise BitfluxError(f"calibration {name} must be {kind} integer, got {value!r}")

    @classmethod
    def for_level(cls, level: str, **kwargs) -> "CalibrationConfig":
        if level not in LEVELS:
            raise BitfluxError(f"unknown calibration {level!r}; choose one of {', '.join(LEVELS)}")
        return cls(stages=LEVELS[level], **kwargs)

    def eval_index(self, records: int):
        """The fixed records on which each stage's objective is measured before and after."""
        import torch

        return torch.randperm(records, generator=torch.Generator().manual_seed(self.seed))[:self.eval_records]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
