"""The text encoders held in their checkpoint's 16-bit dtype and computed in fp32.

FLUX.1 ships its text encoders in bf16 (T5-XXL: 9.5 GB), and a CPU runs them in fp32, whose matmuls are
several times faster there than bf16's. Loaded in fp32 they take twice the memory for no extra precision:
T5-XXL alone 19 GB, the whole FLUX.1-dev pipeline with the ternary transformer more than a 24 GiB machine.
Here each linear layer keeps its stored weight and widens it for its own use (one layer's wide copy at a
time, kept until the next layer's or the end of the encoder's call), and the small rest (embeddings, norms,
biases) is widened once. Every widened value is the stored one exactly, so the outputs are those of the
encoder loaded in fp32. The cost: each weight converted at each use (T5-XXL's encode 1.2x as long, once per
prompt; BENCHMARKS.md).

A fused PEFT LoRA (PEFT's `fuse_lora`, which adds to `weight.data`) does not reach the stored weights, and PEFT
then stops adding its branch: the LoRA is lost. Load such text encoder LoRAs unfused, or the pipeline with the
encoders in fp32 (diffusers' own from_pretrained); bitflux's LoRAs (interop.lora) fuse into the stored weights.

On a CPU (load_pipeline's default there) and for prompts encoded before the transformer is loaded
(pipeline.encode_prompts), T5 is streamed instead: its blocks' weights stay in the checkpoint and each block's
are read and widened right before it runs and dropped after it (bitflux.streaming), so that T5-XXL holds its
embedding (0.5 GB in fp32) and one block at a time (0.8 GB) instead of all of its 24 blocks.
"""

from __future__ import annotations

import importlib
import weakref
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    TORCH_DTYPES,
    parse_json_object,
    read_config,
    read_safetensors_header,
    tensor_shapes,
    weight_files,
)
from .errors import BitfluxError
from .kernels import tensor_version
from .streaming import check_stored, load_outside, stream_blocks

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # FluxPipeline's: CLIP-L and T5-XXL


class NarrowLinear(nn.Linear):
    """An nn.Linear whose weight parameter stays as stored (state_dict saves it so), while `weight`, what
    forward and callers read, is it widened to the dtype of the `wide` buffer (empty: it only carries the
    dtype, so that `.to(dtype)`, which converts the stored weight too, sets what the layer computes in)."""

    # The latest widening, of any layer: a weight read again before another one is not widened again (T5 reads
    # its `wo` weight's dtype before calling it); dropped when an encoder call starts and ends (forget_widened).
    # It refers to its layer weakly and to the stored weight by address only, so that nothing but the wide copy
    # is kept, and .to() may swap the parameters.
    latest: tuple = (None, None, None)

    @property
    def weight(self) -> torch.Tensor:
        stored = self._parameters.get("weight")
        if stored is None:
            raise AttributeError("weight")  # while nn.Linear registers it, hasattr must see none
        if (torch.is_grad_enabled() and stored.requires_grad) or torch.compiler.is_compiling():
            return stored.to(self.wide.dtype)  # not shared between calls: an autograd graph's, a traced one
        key = (id(stored), stored.device, stored.data_ptr(), tensor_version(stored), self.wide.dtype)
        layer, latest_key, widened = NarrowLinear.latest  # one read: another thread may replace it
        if layer is None or layer() is not self or latest_key != key:
            NarrowLinear.latest = (None, None, None)  # the previous wide copy goes before the next is made
            widened = stored.to(self.wide.dtype)
            NarrowLinear.latest = (weakref.ref(self), key, widened)
        return widened


def forget_widened(*_) -> None:
    """Drop the latest widening (hooks on each narrowed encoder: none is kept between its calls, or taken from
    before one, when weights may have been changed in ways no version counter shows)."""
    NarrowLinear.latest = (None, None, None)


def narrow(module: nn.Module, storage: torch.dtype, compute: torch.dtype) -> nn.Module:
    """The module's nn.Linear layers made NarrowLinear, their weights stored in `storage` and read in
    `compute`; its other floating parameters and buffers converted to `compute`. Exact only for weights whose
    values `storage` holds (what a checkpoint in `storage` loads)."""
    for layer in [m for m in module.modules() if type(m) is nn.Linear]:
        layer.__class__ = NarrowLinear  # in place: the parent's reference, names and hooks stay
        layer._parameters["weight"].data = layer._parameters["weight"].data.to(storage)  # T5's wo loads wider
        layer.register_buffer("wide", torch.empty(0, dtype=compute), persistent=False)
    for owner in module.modules():
        for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            stored = isinstance(owner, NarrowLinear) and name == "weight"
            if tensor is not None and tensor.is_floating_point() and not stored:
                tensor.data = tensor.data.to(compute)
    module.register_forward_pre_hook(forget_widened)
    module.register_forward_hook(forget_widened, always_call=True)  # also when the call raises
    return module.requires_grad_(False)


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    """The one floating dtype of a model folder's safetensors weights, or None (none, or several)."""
    dtypes = {info["dtype"] for file in weight_files(folder)
              for name, info in read_safetensors_header(file).items() if name != "__metadata__"}
    floating = {TORCH_DTYPES.get(name) for name in dtypes} - {None}
    floating = {dtype for dtype in floating if dtype.is_floating_point}
    return floating.pop() if len(floating) == 1 else None


def _encoders(root: Path, names=TEXT_ENCODERS):
    """(name, folder, class name, stored dtype) of each of the pipeline folder's text encoders that bitflux
    may load itself: transformers models in safetensors, not quantized, in one floating dtype."""
    index = parse_json_object((root / "model_index.json").read_bytes(), str(root / "model_index.json"))
    for name in names:
        folder = root / name
        library, class_name = (index.get(name) or [None, None])[:2]
        if library != "transformers" or not (folder / "config.json").is_file():
            continue
        if "quantization_config" in read_config(folder):
            continue
        try:
            storage = checkpoint_dtype(folder)
        except BitfluxError:
            continue  # no safetensors (pickle weights): diffusers loads it as it can
        if storage is not None:
            yield name, folder, class_name, storage


def narrow_text_encoders(root: Path, dtype: torch.dtype, names=TEXT_ENCODERS) -> dict[str, nn.Module]:
    """For an fp32 pipeline, the pipeline folder's text encoders (of `names`) stored in bf16 or fp16 (not
    quantized), loaded in their own dtype and computed in fp32 (narrow); the others are left to diffusers."""
    if dtype != torch.float32:
        return {}
    loaded = {}
    for name, folder, class_name, storage in _encoders(root, names):
        if storage not in (torch.bfloat16, torch.float16):
            continue
        try:
            model_class = getattr(importlib.import_module("transformers"), class_name)
            model = model_class.from_pretrained(str(folder), torch_dtype=storage, local_files_only=True)
        except (AttributeError, OSError, RuntimeError, ValueError) as exc:
            raise BitfluxError(f"{folder}: cannot load the text encoder ({str(exc).splitlines()[0]})") from None
        model = narrow(model, storage, dtype)
        # FluxPipeline casts an encoder's outputs to the dtype it reports, its first parameter's: the token
        # embedding, widened, in CLIP and T5; an encoder where that is a stored weight is left to diffusers
        if model.dtype == dtype:
            loaded[name] = model
    return loaded


T5_BLOCKS = "encoder.block."  # T5EncoderModel's blocks' weight names begin so
TIED_EMBEDDING = ("shared.weight", "encoder.embed_tokens.weight")


STREAMED_DTYPES = (torch.float32, torch.bfloat16)  # what transformers loads T5 in whole (fp16 keeps `wo` in fp32)


def streamed_text_encoders(root: Path, dtype: torch.dtype, device: str | torch.device) -> dict[str, nn.Module]:
    """The pipeline folder's T5 encoder (FLUX's text_encoder_2) with its blocks' weights left in the checkpoint
    (stream_t5), computing in fp32 or bf16 on `device`; other encoders are left to the caller."""
    if dtype not in STREAMED_DTYPES:
        return {}
    return {name: stream_t5(folder, dtype, device) for name, folder, class_name, _ in _encoders(root)
            if class_name == "T5EncoderModel"}


def stream_t5(folder: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """A T5EncoderModel on `device` whose blocks hold no weights between calls (streaming.stream_blocks): each
    block's are read from the folder's safetensors and converted to `dtype` on `device` right before it runs,
    and dropped after it. The embedding and the final norm are loaded once (T5-XXL: 0.5 GB in fp32, 0.26 in
    bf16), the blocks take one block's memory (0.8 / 0.4 GB) instead of 24; tensors the encoder does not use (a
    decoder's) are not read. Outputs equal those of the model loaded whole in `dtype`."""
    from transformers import T5Config, T5EncoderModel

    files = weight_files(folder)
    stored = tensor_shapes(files)
    try:
        with torch.device("meta"):
            model = T5EncoderModel(T5Config.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError) as exc:
        raise BitfluxError(f"{folder}: cannot load the text encoder ({str(exc).splitlines()[0]})") from None
    # The token embedding is tied (shared.weight is encoder.embed_tokens.weight) and often saved under one name.
    embedding = next((name for name in TIED_EMBEDDING if name in stored), TIED_EMBEDDING[0])
    check_stored(model, stored, folder, dict.fromkeys(TIED_EMBEDDING, embedding))
    rest = {name for name in model.state_dict() if not name.startswith(T5_BLOCKS) and name in stored}
    load_outside(model, files, rest | {embedding}, dtype, device)
    model.shared.weight = model.encoder.embed_tokens.weight = model.get_parameter(embedding)
    blocks = [f"{T5_BLOCKS}{i}" for i in range(len(model.encoder.block))]
    return stream_blocks(model, blocks, folder)
