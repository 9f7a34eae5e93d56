"""Teacher data: the full-precision pipeline sampled on the calibration prompts, with every transformer
call along its own trajectories recorded (inputs and predicted velocity). No image data is involved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..checkpoint import write_atomic
from ..errors import BitfluxError

PER_CALL = ("hidden_states", "timestep", "guidance")
# The text conditioning is the same at every denoising step of a trajectory: kept once per trajectory (for
# FLUX.1-dev, T5's 512 x 4096 states are 4 MB a record, 8x the image latents), records point at it.
PROMPT = ("encoder_hidden_states", "pooled_projections")
PROMPT_INDEX = "prompt_index"
SHARED = ("img_ids", "txt_ids")


def damaged_record(path: Path, exc: Exception) -> BitfluxError:
    """A workdir record that cannot be read back: what is wrong, and what to do about it, in one line."""
    return BitfluxError(f"{path}: a damaged workdir record ({str(exc).splitlines()[0]}); delete it to compute it "
                        "again")


@dataclass
class TeacherData:
    """Records of transformer calls, stacked along dim 0; `velocity` is the teacher's output for each.
    `prompts`, if given, holds the text conditioning once per trajectory and inputs["prompt_index"] the row
    each record uses; without it the conditioning is in `inputs`, one row per record."""

    inputs: dict[str, torch.Tensor]
    velocity: torch.Tensor
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.velocity.shape[0]

    def batch(self, index: torch.Tensor, device) -> dict:
        """Keyword arguments for FluxTransformer2DModel.forward for the records at `index`."""
        kwargs = {k: (v if k in SHARED else v[index]).to(device) for k, v in self.inputs.items() if k != PROMPT_INDEX}
        if self.prompts:
            rows = self.inputs[PROMPT_INDEX][index]
            kwargs.update({k: v[rows].to(device) for k, v in self.prompts.items()})
        kwargs.setdefault("guidance", None)
        return {**kwargs, "return_dict": False}

    def joined(self, other: TeacherData) -> TeacherData:
        """These records, then `other`'s (recorded at the same image size, each with its own text rows)."""
        if any(not torch.equal(self.inputs[key], other.inputs[key]) for key in SHARED):
            raise BitfluxError("records of different image sizes or text lengths cannot be joined")
        offset = len(self.prompts["encoder_hidden_states"])
        inputs = {key: value if key in SHARED else
                  torch.cat([value, other.inputs[key] + (offset if key == PROMPT_INDEX else 0)])
                  for key, value in self.inputs.items()}
        return TeacherData(inputs, torch.cat([self.velocity, other.velocity]),
                           {key: torch.cat([value, other.prompts[key]]) for key, value in self.prompts.items()})

    def save(self, path: Path) -> None:
        prompts = {f"prompt.{k}": v for k, v in self.prompts.items()}
        write_atomic(Path(path), lambda tmp: save_file({**self.inputs, **prompts, "velocity": self.velocity}, str(tmp)))

    @classmethod
    def load(cls, path: Path) -> "TeacherData":
        try:
            tensors = load_file(str(path))
            velocity = tensors.pop("velocity")
        except (SafetensorError, OSError, KeyError) as exc:
            raise damaged_record(path, exc) from None
        prompts = {k.removeprefix("prompt."): tensors.pop(k) for k in list(tensors) if k.startswith("prompt.")}
        return cls(tensors, velocity, prompts)


@torch.no_grad()
def collect(pipeline, prompts: list[str], samples: int, seed: int = 0, batch_size: int = 8,
            progress: bool = True, encode=None, label=None, desc: str = "teacher trajectories",
            **call_kwargs) -> TeacherData:
    """Sample `samples` trajectories (prompt j mod len(prompts), noise seed `seed + j`) with the pipeline
    and record every transformer call, with the velocity it returned or, given `label` (a transformer),
    the velocity `label` predicts for the same inputs. `encode(prompts, max_sequence_length) -> embeddings` (as
    pipeline.encode_prompts makes them), for a pipeline without text encoders: called for each batch of
    trajectories, with the prompts the pipeline would have encoded itself. `call_kwargs` go to the pipeline
    (num_inference_steps, guidance_scale, height, width, max_sequence_length, ...)."""
    if not prompts:
        raise BitfluxError("no calibration prompts")
    from ..pipeline import as_text_to_image

    pipeline = as_text_to_image(pipeline)  # a Kontext pipeline's own call would sample at 1024 x 1024

    def text(index: range) -> dict:
        batch = [prompts[j % len(prompts)] for j in index]
        if encode is None:
            return {"prompt": batch}
        from ..pipeline import placed_embeddings

        return placed_embeddings(pipeline, encode(batch, call_kwargs.get("max_sequence_length", 512)))

    calls: list[dict[str, torch.Tensor]] = []
    conditioning: list[dict[str, torch.Tensor]] = []  # one entry per distinct text conditioning tensor
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # this pipeline call's conditionings and their rows

    def record(module, args, kwargs, output):
        call = {k: kwargs[k].detach().cpu() for k in (*PER_CALL, *SHARED) if kwargs.get(k) is not None}
        states = kwargs["encoder_hidden_states"]
        # The pipeline passes the same tensor at every step of a call (two with true CFG): the same object
        # means the same conditioning. Objects are only compared within one pipeline call, which holds them.
        rows = next((rows for known, rows in seen if known is states), None)
        if rows is None:
            first = sum(len(c["encoder_hidden_states"]) for c in conditioning)
            rows = torch.arange(first, first + len(states))
            seen.append((states, rows))
            conditioning.append({k: kwargs[k].detach().cpu() for k in PROMPT})
        call[PROMPT_INDEX] = rows
        call["velocity"] = (label(*args, **kwargs) if label is not None else output)[0].detach().cpu()
        calls.append(call)

    saved_bar_config = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)
    handle = pipeline.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        for start in tqdm(range(0, samples, batch_size), desc=desc, unit="batch",
                          disable=not progress):
            index = range(start, min(samples, start + batch_size))
            seen.clear()
            pipeline(**text(index),
                     generator=[torch.Generator().manual_seed(seed + j) for j in index],
                     output_type="latent", **call_kwargs)
    finally:
        handle.remove()
        seen.clear()
        pipeline.set_progress_bar_config(**saved_bar_config)
    for key in SHARED:
        if any(not torch.equal(c[key], calls[0][key]) for c in calls):
            raise BitfluxError(f"teacher calls disagree on {key}; calibrate at one image size")
    inputs = {k: torch.cat([c[k] for c in calls]) for k in (*PER_CALL, PROMPT_INDEX) if k in calls[0]}
    inputs.update({k: calls[0][k] for k in SHARED})
    prompt_rows = {k: torch.cat([c[k] for c in conditioning]) for k in PROMPT}
    return TeacherData(inputs, torch.cat([c["velocity"] for c in calls]), prompt_rows)


def onpolicy_records(pipeline, student, prompts: list[str], samples: int, seed: int, batch_size: int = 8,
                     progress: bool = True, encode=None, **call_kwargs) -> TeacherData:
    """Records a calibrated student has not been fitted on: `samples` fresh trajectories of the pipeline (the
    teacher, noise seeds `seed + j`), then as many of the student's own (seeds `seed + samples + j`), each of
    its states labelled with the teacher's velocity there (on-policy: where the student's sampling drifts, the
    teacher says how to go on). The student runs where the pipeline does. Arguments as for collect."""
    if next(student.parameters()).device != pipeline._execution_device:
        raise BitfluxError(f"the student is on {next(student.parameters()).device}, the pipeline runs on "
                           f"{pipeline._execution_device}: the onpolicy stage samples with both on one device")
    kwargs = {"batch_size": batch_size, "progress": progress, "encode": encode, **call_kwargs}
    fresh = collect(pipeline, prompts, samples, seed, **kwargs)
    student_pipeline = type(pipeline)(**{**pipeline.components, "transformer": student})
    own = collect(student_pipeline, prompts, samples, seed + samples, label=pipeline.transformer,
                  desc="student trajectories", **kwargs)
    return fresh.joined(own)
