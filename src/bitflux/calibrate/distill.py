"""End-to-end velocity distillation: the ternary student matches the teacher's velocity predictions
on the records of the teacher's sampling trajectories (the distill stage), and then on fresh ones and on the
student's own (the onpolicy stage, teacher.onpolicy_records)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import write_text_atomic
from ..config import TernaryConfig
from .config import CalibrationConfig
from .latent import fit, freeze, to_latent
from .teacher import TeacherData, damaged_record

# In the workdir, for each stage (and each later round of the onpolicy stage: onpolicy-2, ...): STAGE.pt, the
# training state, written every few minutes; STAGE-start.json, the velocity error before training, for the report
# of a resumed run.


def stage_name(stage: str, round_index: int = 0) -> str:
    """The workdir's name for a stage's round: `stage` for the first, `stage-2`, `stage-3`, ... after."""
    return stage if round_index == 0 else f"{stage}-{round_index + 1}"


def _velocity_error(model, teacher: TeacherData, index, device, norm) -> torch.Tensor:
    predicted = model(**teacher.batch(index, device))[0]
    return (predicted.float() - teacher.velocity[index].to(device).float()).pow(2).mean() / norm


@torch.no_grad()
def evaluate(model, teacher: TeacherData, index: torch.Tensor, batch_size: int, device) -> float:
    """Relative squared velocity error ||v_student - v_teacher||^2 / ||v_teacher||^2 on `index`."""
    norm = teacher.velocity.float().pow(2).mean()
    return sum(_velocity_error(model, teacher, i, device, norm).item() * len(i) for i in index.split(batch_size)) / len(index)


def distill(model: nn.Module, teacher: TeacherData, config: TernaryConfig, calib: CalibrationConfig, device="cpu",
            progress: bool = True, workdir: Path | None = None, stage: str = "distill",
            round_index: int = 0) -> tuple[float, float]:
    """In place: the model's targeted layers (full precision: starting from the config's rounding;
    ternary: from their codes and scales) are trained as LatentTernaryLinear, then frozen.
    Only ternary weights and scales learn; everything else stays the teacher's. Returns the relative
    velocity error on the evaluation records before and after. `stage`: distill or onpolicy (its steps, its
    seed, its files), `round_index`: the onpolicy stage's round. With `workdir`, training checkpoints go to
    workdir/NAME.pt (stage_name) and a repeated run goes on from the last one."""
    steps, seed = {"distill": (calib.distill_steps, calib.seed + 1),
                   "onpolicy": (calib.onpolicy_steps, calib.seed + 2 + round_index)}[stage]
    name = stage_name(stage, round_index)
    to_latent(model, config)
    eval_index = calib.eval_index(len(teacher))
    norm = teacher.velocity.float().pow(2).mean()
    start_file = Path(workdir) / f"{name}-start.json" if workdir else None
    if start_file is not None and start_file.exists():  # resumed: the error of the untrained student
        try:
            before = float(json.loads(start_file.read_text())["velocity_error"])
        except (ValueError, KeyError, TypeError) as exc:
            raise damaged_record(start_file, exc) from None
    else:
        before = evaluate(model, teacher, eval_index, calib.batch_size, device)
        if start_file is not None:
            write_text_atomic(start_file, json.dumps({"velocity_error": before}))
    fit(model, lambda index: _velocity_error(model, teacher, index, device, norm), len(teacher), steps,
        calib.batch_size, calib.latent_lr, calib.scale_lr, seed, progress, name,
        checkpoint=Path(workdir) / f"{name}.pt" if workdir else None)
    after = evaluate(model, teacher, eval_index, calib.batch_size, device)
    freeze(model)
    return before, after
