"""diffusers FluxPipeline with a bitflux transformer: loading, in-memory quantization, generation."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .checkpoint import load_transformer, read_config
from .config import TernaryConfig
from .errors import BitfluxError
from .surgery import QuantizationReport, quantize_


def _flux_pipeline_class():
    from diffusers import FluxPipeline

    return FluxPipeline


def is_ternary_pipeline(path: str | Path) -> bool:
    return "quantization_config" in read_config(Path(path) / "transformer")


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers FluxPipeline from a pipeline folder: a bitflux one gets its ternary transformer (never
    materialised in full precision), a full-precision one loads as diffusers would."""
    root = Path(path)
    if not (root / "model_index.json").exists():
        raise BitfluxError(f"{root}: not a pipeline folder (no model_index.json)")
    extra = {}
    if is_ternary_pipeline(root):
        extra["transformer"] = load_transformer(root / "transformer", device=device, dtype=dtype)
    try:
        pipe = _flux_pipeline_class().from_pretrained(str(root), torch_dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise BitfluxError(f"{root}: cannot load the pipeline ({str(exc).splitlines()[0]})") from None
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device)


def quantize_pipeline(pipe, config: TernaryConfig | None = None, copy_transformer: bool = True):
    """Ternarize a loaded FluxPipeline's transformer in memory: returns (pipeline, report). With
    copy_transformer the given pipeline is left as it was (for side-by-side comparisons)."""
    transformer = copy.deepcopy(pipe.transformer) if copy_transformer else pipe.transformer
    report: QuantizationReport = quantize_(transformer, config or TernaryConfig())
    components = dict(pipe.components, transformer=transformer)
    ternary = type(pipe)(**components)
    ternary.set_progress_bar_config(leave=False)
    return ternary, report


def text_length(pipe) -> int:
    """FluxPipeline pads T5 text to max_sequence_length (512 by default); small models record less."""
    return min(512, int(getattr(pipe.tokenizer_2, "model_max_length", 512)))


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.5,
             height: int = 64, width: int = 64, progress: bool = True):
    """PIL images, one per prompt; the noise of each depends only on its seed, so full-precision and
    ternary pipelines given the same seeds start from the same latents."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance, generator=generators, max_sequence_length=text_length(pipe),
                output_type="pil").images


def cache_dir() -> Path:
    return Path(os.environ.get("BITFLUX_CACHE", Path.home() / ".cache" / "bitflux"))
