"""Teacher data: the full-precision pipeline sampled on the calibration prompts, with every transformer
call along its own trajectories recorded (inputs and predicted velocity). No image data is involved."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..errors import BitfluxError

PER_CALL = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
SHARED = ("img_ids", "txt_ids")


@dataclass
class TeacherData:
    """Records of transformer calls, stacked along dim 0; `velocity` is the teacher's output for each."""

    inputs: dict[str, torch.Tensor]
    velocity: torch.Tensor

    def __len__(self) -> int:
        return self.velocity.shape[0]

    def batch(self, index: torch.Tensor, device) -> dict:
        """Keyword arguments for FluxTransformer2DModel.forward for the records at `index`."""
        kwargs = {k: (v if k in SHARED else v[index]).to(device) for k, v in self.inputs.items()}
        kwargs.setdefault("guidance", None)
        return {**kwargs, "return_dict": False}

    def save(self, path: Path) -> None:
        tmp = Path(f"{path}.tmp")
        save_file({**self.inputs, "velocity": self.velocity}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "TeacherData":
        tensors = load_file(str(path))
        velocity = tensors.pop("velocity")
        return cls(tensors, velocity)


@torch.no_grad()
def collect(pipeline, prompts: list[str], samples: int, seed: int = 0, batch_size: int = 8,
            progress: bool = True, **call_kwargs) -> TeacherData:
    """Sample `samples` trajectories (prompt j mod len(prompts), noise seed `seed + j`) with the pipeline
    and record every transformer call. `call_kwargs` go to the pipeline (num_inference_steps,
    guidance_scale, height, width, max_sequence_length, ...)."""
    if not prompts:
        raise BitfluxError("no calibration prompts")
    calls: list[dict[str, torch.Tensor]] = []

    def record(module, args, kwargs, output):
        call = {k: kwargs[k].detach().cpu() for k in (*PER_CALL, *SHARED) if kwargs.get(k) is not None}
        call["velocity"] = output[0].detach().cpu()
        calls.append(call)

    saved_bar_config = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)
    handle = pipeline.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        for start in tqdm(range(0, samples, batch_size), desc="teacher trajectories", unit="batch",
                          disable=not progress):
            index = range(start, min(samples, start + batch_size))
            pipeline(prompt=[prompts[j % len(prompts)] for j in index],
                     generator=[torch.Generator().manual_seed(seed + j) for j in index],
                     output_type="latent", **call_kwargs)
    finally:
        handle.remove()
        pipeline.set_progress_bar_config(**saved_bar_config)
    for key in SHARED:
        if any(not torch.equal(c[key], calls[0][key]) for c in calls):
            raise BitfluxError(f"teacher calls disagree on {key}; calibrate at one image size")
    inputs = {k: torch.cat([c[k] for c in calls]) for k in PER_CALL if k in calls[0]}
    inputs.update({k: calls[0][k] for k in SHARED})
    return TeacherData(inputs, torch.cat([c["velocity"] for c in calls]))
