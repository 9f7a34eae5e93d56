"""Sequential block-wise reconstruction, one full-precision block alive at a time.

Two streams of block inputs flow through the transformer, one block at a time: the full-precision
stream (the teacher's activations) and the student stream (what the already calibrated ternary blocks
produce). For each block, the full-precision block is loaded, run once on its stream (its outputs are the
targets; its layers' input Gram matrices feed the closed-form scales), then turned in place into its
ternary student, which learns to map the student stream to those targets, so it also corrects the
errors of the blocks before it. The student is frozen to TernaryLinear layers and saved, and the
full-precision block is gone before the next one is loaded.

Resuming needs only the saved ternary blocks: both streams are recomputed by forward passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..checkpoint import write_atomic
from ..config import TernaryConfig
from ..flux import block_names, build_transformer, outside_blocks
from ..surgery import quantize_, replace_module
from .config import CalibrationConfig
from .latent import fit, freeze, target_linears, to_latent
from .scales import InputGrams, refined_scales
from .teacher import TeacherData, damaged_record


@dataclass
class Streams:
    """Block inputs of every teacher record: image tokens (N, L, D) and text tokens (N, T, D)."""

    hidden: torch.Tensor
    encoder: torch.Tensor


@dataclass
class Conditioning:
    """What every block receives besides the streams, the same for teacher and student."""

    temb: torch.Tensor  # (N, D)
    rotary: tuple[torch.Tensor, torch.Tensor]


@dataclass
class BlockRecord:
    name: str
    seconds: float = 0.0
    scale_errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> before, after
    loss_before: float | None = None  # relative block-output error on the evaluation records
    loss_after: float | None = None
    resumed: bool = False


class _Captured(Exception):
    pass


@torch.no_grad()
def stem(model: nn.Module, teacher: TeacherData, batch_size: int, device) -> tuple[Streams, Conditioning]:
    """The first block's inputs for every record, computed by the model's own embedders: a pre-hook on
    the first block captures them and stops the forward pass (the blocks themselves may be on meta)."""
    first = model.get_submodule(block_names(dict(model.config))[0])
    captured = []

    def capture(module, args, kwargs):
        captured.append(kwargs)
        raise _Captured

    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for index in torch.arange(len(teacher)).split(batch_size):
            try:
                model(**teacher.batch(index, device))
            except _Captured:
                pass
    finally:
        handle.remove()
    streams = Streams(torch.cat([c["hidden_states"].cpu() for c in captured]),
                      torch.cat([c["encoder_hidden_states"].cpu() for c in captured]))
    cos, sin = captured[0]["image_rotary_emb"]
    return streams, Conditioning(torch.cat([c["temb"].cpu() for c in captured]), (cos.cpu(), sin.cpu()))


def _forward(block, streams: Streams, cond: Conditioning, index, device) -> tuple[torch.Tensor, torch.Tensor]:
    encoder, hidden = block(hidden_states=streams.hidden[index].to(device),
                            encoder_hidden_states=streams.encoder[index].to(device),
                            temb=cond.temb[index].to(device),
                            image_rotary_emb=tuple(r.to(device) for r in cond.rotary))
    return hidden, encoder


@torch.no_grad()
def run_block(block, streams: Streams, cond: Conditioning, batch_size: int, device) -> Streams:
    """The block's outputs for every record, written into fresh host tensors batch by batch."""
    out = Streams(torch.empty_like(streams.hidden), torch.empty_like(streams.encoder))
    for index in torch.arange(len(cond.temb)).split(batch_size):
        hidden, encoder = _forward(block, streams, cond, index, device)
        out.hidden[index], out.encoder[index] = hidden.to(out.hidden.dtype).cpu(), encoder.to(out.encoder.dtype).cpu()
    return out


def _mean_square(t: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """mean(t^2) in fp32 without an fp32 copy of all of t (the streams of a large model are GBs)."""
    return sum(chunk.float().pow(2).sum() for chunk in t.split(rows)) / t.numel()


class BlockObjective:
    """Relative squared error of a block's outputs against the full-precision targets; the text-token
    outputs of the last block feed nothing, so they count only where another block reads them."""

    def __init__(self, targets: Streams, text_counts: bool):
        self.targets = targets
        self.text_weight = 1.0 if text_counts else 0.0
        self.hidden_norm = _mean_square(targets.hidden).clamp_min(1e-30)
        self.encoder_norm = _mean_square(targets.encoder).clamp_min(1e-30)

    def __call__(self, block, inputs: Streams, cond: Conditioning, index, device) -> torch.Tensor:
        hidden, encoder = _forward(block, inputs, cond, index, device)
        loss = (hidden.float() - self.targets.hidden[index].to(device).float()).pow(2).mean() / self.hidden_norm
        if self.text_weight:
            loss = loss + (encoder.float() - self.targets.encoder[index].to(device).float()).pow(2).mean() / self.encoder_norm
        return loss

    @torch.no_grad()
    def evaluate(self, block, inputs: Streams, cond: Conditioning, index, batch_size: int, device) -> float:
        parts = [self(block, inputs, cond, i, device).item() * len(i) for i in index.split(batch_size)]
        return sum(parts) / len(index)


def train_block(block: nn.Module, inputs: Streams, objective: BlockObjective, cond: Conditioning,
                calib: CalibrationConfig, eval_index: torch.Tensor, seed: int, device,
                progress: bool = True, desc: str = "") -> tuple[float, float]:
    """Fit the block's latent ternary layers to the objective; returns it before and after."""
    before = objective.evaluate(block, inputs, cond, eval_index, calib.batch_size, device)
    fit(block, lambda index: objective(block, inputs, cond, index, device), len(cond.temb), calib.steps,
        calib.batch_size, calib.latent_lr, calib.scale_lr, seed, progress, desc)
    return before, objective.evaluate(block, inputs, cond, eval_index, calib.batch_size, device)


def _refined_block_scales(block, grams: dict, config: TernaryConfig, record: BlockRecord) -> dict:
    """Closed-form scales of every targeted layer of the block (its errors go into the record)."""
    scales = {}
    for layer_name, gram in grams.items():
        scales[layer_name], before, after = refined_scales(block.get_submodule(layer_name), gram, config)
        record.scale_errors[layer_name] = (before, after)
    return scales


def student_skeleton(source, config: TernaryConfig, device) -> nn.Module:
    """The transformer with ternary placeholders on meta inside the blocks and the full-precision
    embedders and output layers (not quantized) loaded from the source."""
    model = build_transformer(source.config, "meta")
    quantize_(model, config)
    for name in outside_blocks(model):
        setattr(model, name, source.load(name, device))
    return model


def _save_atomic(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def reconstruct(source, teacher: TeacherData, config: TernaryConfig, calib: CalibrationConfig, device="cpu",
                workdir: Path | None = None, progress: bool = True, on_event=None) -> tuple[nn.Module, list[BlockRecord]]:
    """Calibrate every block in order with the stages in calib.stages among scales and blockwise.

    Returns the ternary transformer and one record per block. With `workdir`, each finished block is
    saved to workdir/blocks/ and found there again when the run is repeated (resume). `on_event(event,
    block_name)` is called on "loaded" (the full-precision block), "trained" and "saved".
    """
    notify = on_event or (lambda event, name: None)
    model = student_skeleton(source, config, device)
    fp_stream, cond = stem(model, teacher, calib.batch_size, device)
    student_stream = fp_stream
    eval_index = calib.eval_index(len(teacher))
    names = block_names(source.config)
    records = []
    for position, name in enumerate(tqdm(names, desc="blocks", unit="block", disable=not progress)):
        start = time.perf_counter()
        record = BlockRecord(name)
        saved = Path(workdir) / "blocks" / f"{name}.safetensors" if workdir else None
        block = source.load(name, device)
        notify("loaded", name)
        if saved is not None and saved.exists():
            targets = run_block(block, fp_stream, cond, calib.batch_size, device)
            del block
            block = model.get_submodule(name)
            # copies of their own, not views of the mapped file (safetensors >= 0.8), as a block calibrated now has
            try:
                saved_state = load_file(str(saved))
            except (SafetensorError, OSError) as exc:
                raise damaged_record(saved, exc) from None
            saved_state = {key: tensor.to(device, copy=True) for key, tensor in saved_state.items()}
            try:
                block.load_state_dict(saved_state, assign=True, strict=True)
            except RuntimeError as exc:  # keys or shapes that are not the block's
                raise damaged_record(saved, exc) from None
            record.resumed = True
        else:
            grams = InputGrams(target_linears(block, config, name)) if "scales" in calib.stages else None
            targets = run_block(block, fp_stream, cond, calib.batch_size, device)
            scales = _refined_block_scales(block, grams.close(), config, record) if grams is not None else {}
            del grams
            to_latent(block, config, name, scales)  # the block's full-precision weights end here
            if "blockwise" in calib.stages:
                objective = BlockObjective(targets, text_counts=position < len(names) - 1)
                record.loss_before, record.loss_after = train_block(
                    block, student_stream, objective, cond, calib, eval_index, seed=calib.seed * 100003 + position,
                    device=device, progress=progress, desc=name)
            notify("trained", name)
            freeze(block)
            if saved is not None:
                _save_atomic(block.state_dict(), saved)
        replace_module(model, name, block)
        student_stream = run_block(block, student_stream, cond, calib.batch_size, device)
        fp_stream = targets
        record.seconds = time.perf_counter() - start
        records.append(record)
        notify("saved", name)
    return model.eval(), records
