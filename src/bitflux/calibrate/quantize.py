"""`bitflux quantize SOURCE -o OUT --calibrate PROMPTS.txt`: calibrate a FLUX pipeline folder into a
bitflux pipeline folder, the full-precision transformer beside the student only a block at a time (or whole
for the onpolicy stage's teacher, where it fits in free memory)."""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import AtomicFolder, check_output_apart, save_transformer
from ..config import TernaryConfig
from ..convert import copy_pipeline_components, pipeline_components, resolve_source
from ..errors import BitfluxError
from ..pipeline import (
    check_text_to_image,
    default_image_size,
    encode_prompts,
    text_length,
)
from . import (
    CalibrationConfig,
    CalibrationReport,
    calibrate_transformer,
    check_workdir,
    measured,
    onpolicy_data,
    teacher_data,
)
from .memory import available_memory, release_cached_memory
from .sources import FolderSource


def teacher_settings(pipe, **given) -> dict:
    """How the teacher samples unless given: the model's own image size and text length, 20 steps and
    guidance 3.5 (`bitflux generate`'s defaults)."""
    width, height = default_image_size(pipe)
    return {"height": height, "width": width, "max_sequence_length": text_length(pipe),
            "num_inference_steps": 20, "guidance_scale": 3.5, **given}


def quantize_calibrated(source: str | Path, out: str | Path, prompts: list[str], config: TernaryConfig | None = None,
                        calibration: CalibrationConfig | None = None, *, force: bool = False, device=None,
                        workdir: str | Path | None = None, progress: bool = True,
                        stream_teacher: bool | None = None) -> CalibrationReport:
    """Calibrate the transformer of the FLUX pipeline folder SOURCE and write a bitflux pipeline folder OUT.

    The text encoders and the full-precision transformer are never in memory together: the teacher gets each
    batch of prompts encoded by the text encoders alone (T5 streamed, pipeline.encode_prompts) and samples
    with the transformer streamed from SOURCE a block at a time (streaming.stream_transformer: FLUX.1-dev on a
    24 GB machine) if `stream_teacher`, or when None unless it fits in the device's free memory with room
    (teacher_pipeline); the block-wise stages read it a block at a time. Compute runs on `device` (default:
    cuda when available), in bfloat16 there and float32 on CPU.
    """
    config = config or TernaryConfig()
    calib = calibration or CalibrationConfig()
    found = resolve_source(source)
    check_output_apart(found.pipeline_root or source, out)
    if found.pipeline_root is None:
        raise BitfluxError(f"{source}: calibration needs a whole FLUX pipeline folder (its text encoders turn "
                           "the prompts into the teacher's inputs), not a transformer alone")
    check_text_to_image(found.pipeline_root)
    out = Path(out)
    AtomicFolder(out, force).check()  # before the calibration's hours, not after
    if workdir is not None:
        kept, replaced = Path(workdir).resolve(), out.resolve()
        if kept == replaced or replaced in kept.parents:
            raise BitfluxError(f"--workdir {workdir}: keep it apart from the output {out}, which replaces what it "
                               "holds")
        # not the source folder itself nor one of its components, which the output copies (and whose files the
        # teacher reads); another folder in the source's is copied nowhere
        source_root = found.pipeline_root.resolve()
        if kept == source_root or (source_root in kept.parents
                                   and kept.relative_to(source_root).parts[0] in pipeline_components(source_root)):
            raise BitfluxError(f"--workdir {workdir}: keep it apart from the source {found.pipeline_root} and its "
                               "components, which the output copies")
    text = sorted(key for key in calib.pipeline_kwargs if "prompt" in key)
    if text:
        raise BitfluxError(f"{', '.join(text)}: not taken here, where the calibration prompts are encoded apart; "
                           "bitflux.calibrate.calibrate samples with a whole pipeline")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    root = found.pipeline_root
    transformer_source = FolderSource(root / "transformer", dtype)
    report = CalibrationReport(calib.stages)
    with measured(report, device):
        pipe = teacher_pipeline(root, transformer_source, device, stream_teacher)
        report.teacher_streamed = not list(pipe.transformer.transformer_blocks.parameters())
        calib = replace(calib, pipeline_kwargs=teacher_settings(pipe, **calib.pipeline_kwargs))  # the caller's kept
        if workdir is not None:
            workdir = check_workdir(workdir, config, calib, transformer_source, prompts)

        def encode(batch, length):
            return encode_prompts(root, batch, device, dtype, length)

        teacher = teacher_data(pipe, prompts, calib, workdir, progress, report, encode)
        del pipe  # the block-wise stages read the teacher's weights a block at a time, beside the student
        gc.collect()

        def onpolicy(student, round_index):
            release_cached_memory(device)  # distillation's freed memory counts as free for the rule below
            # the teacher again, by the same rule now that the student is in memory too
            pipe = teacher_pipeline(root, transformer_source, device, stream_teacher)
            records = onpolicy_data(pipe, student, prompts, calib, progress, encode, round_index)
            del pipe
            gc.collect()  # a streamed transformer's hooks hold it in reference cycles
            return records

        model, report = calibrate_transformer(transformer_source, teacher, config, calib, device, workdir, progress,
                                              report, onpolicy)
    with AtomicFolder(out, force) as tmp:
        save_transformer(model.to(torch.device("cpu")), tmp / "transformer", config)
        copy_pipeline_components(root, tmp)
    return report


def teacher_pipeline(root: Path, source: FolderSource, device: torch.device, stream: bool | None = None):
    """The full-precision pipeline the teacher samples with, on `device`, in the source's dtype: no text
    encoders (prompts come encoded), the transformer streamed a block at a time from the folder if `stream`;
    None: unless its weights and a quarter more (at least 4 GiB, for the activations) fit in the device's free
    memory, when holding it whole spares reading its weights again at every step."""
    from ..pipeline import pipeline_from_folder, text_to_image_class
    from ..streaming import stream_transformer
    from ..text_encoders import TEXT_ENCODERS
    from . import full_model

    if stream is None:
        weights = sum(p.numel() for p in source.skeleton.parameters()) * source.dtype.itemsize
        stream = weights + max(weights // 4, 4 * 2**30) > available_memory(device)
    transformer = (stream_transformer(root / "transformer", source.dtype, device) if stream
                   else full_model(source, device))
    pipe = pipeline_from_folder(root, source.dtype, {**dict.fromkeys(TEXT_ENCODERS), "transformer": transformer},
                                text_to_image_class())
    pipe.vae.to(device)  # not run (the teacher stops at latents), but older diffusers take the device from it
    return pipe
