"""GGUF files with ggml's ternary block types: export a bitflux transformer as TQ2_0 / TQ1_0, read one back.

A ggml block holds 256 consecutive weights of one row and ONE fp16 scale, stored after the codes:
  TQ2_0, 66 bytes: 64 bytes of 2-bit digits u = w + 1; byte 32 j + m holds weight 128 j + 32 l + m at
         bits 2l (j < 2, l < 4, m < 32); then the fp16 scale.
  TQ1_0, 54 bytes: 48 + 4 bytes of base-3 digits; then the fp16 scale. Weights 0..159 go to bytes 0..31
         (weight 32 n + m -> digit n of byte m), 160..239 to bytes 32..47 (160 + 16 n + m -> digit n of
         byte 32 + m), 240..255 to bytes 48..51 (240 + 4 n + m -> digit n of byte 48 + m, four digits).
         A byte holding digits d0..d4 (d0 most significant) stores ceil(256 * sum(d_n 3^(4-n)) / 243), so
         digit n reads back as ((byte * 3^n mod 256) * 3) >> 8.
These are ggml's layouts (ggml-quants.c, gguf-py quants.py); tests/test_gguf.py checks ours against the
`gguf` package byte for byte.

What maps exactly: a block has one scale, so bitflux's per-tensor and per-channel scales map to it, and
per-group scales when the group is a whole number of blocks (group_size a multiple of 256; a group that
divides 256 would not do: a 256-weight block cannot hold two scales). Scales are rounded
to fp16 (round to nearest even): exact for float16 scales and for bfloat16 scales >= 2^-14, relative error
<= 2^-11 for float32; a block of zero codes whose scale fp16 cannot hold (an all-zero row's 1e-8) gets scale
0, as ggml's quantizer gives it. Rows whose in_features is not a multiple of 256 cannot be blocks: export
refuses them with a BitfluxError rather than storing a silently 8x larger dense copy (every FLUX.1 linear has
in_features 3072, 12288 or 15360). Every other tensor keeps its dtype: F32, F16 or BF16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import flux, formats
from ..checkpoint import (
    AtomicFolder,
    architecture_config,
    check_finite,
    check_output_apart,
    is_gguf,
    load_transformer,
    parse_json_object,
    save_transformer,
    write_atomic,
)
from ..config import TernaryConfig
from ..errors import BitfluxError
from ..linear import TernaryLinear
from ..surgery import (
    config_describing,
    quantize_,
    record_config,
    replace_module,
    ternary_config_of,
)

try:
    import gguf
except ImportError:  # an optional dependency: the error says how to get it when GGUF is used
    gguf = None

BLOCK = 256
QTYPE_NAMES = ("tq2_0", "tq1_0")
NAME_LAYOUTS = ("original", "diffusers")
_POW3 = (1, 3, 9, 27, 81)
# TQ1_0 splits a block into three runs of bytes: (digits per byte, bytes) for weights 0-159, 160-239, 240-255.
_TQ1_RUNS = ((5, 32), (5, 16), (4, 4))
_META_CONFIG = "bitflux.quantization_config"
_META_TRANSFORMER = "bitflux.transformer_config"


def _require_gguf():
    if gguf is None:
        raise BitfluxError("GGUF needs the gguf package: pip install 'bitflux[gguf]'")
    return gguf


def _qtype(name: str):
    if name not in QTYPE_NAMES:
        raise BitfluxError(f"unknown GGUF ternary type {name!r}; choose one of {', '.join(QTYPE_NAMES)}")
    return getattr(_require_gguf().GGMLQuantizationType, name.upper())


def _block_bytes(qtype) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][1]


# ---- block codecs: pure functions on tensors -------------------------------------------------------------

def encode_blocks(codes: torch.Tensor, block_scales: torch.Tensor, qtype_name: str) -> torch.Tensor:
    """(rows, in) int8 codes in {-1, 0, 1} and (rows, in / 256) float16 scales -> (rows, bytes) uint8 blocks."""
    rows, in_features = codes.shape
    digits = (codes.to(torch.int32) + 1).reshape(rows, in_features // BLOCK, BLOCK)
    if qtype_name == "tq2_0":
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=codes.device).view(4, 1)
        packed = (digits.reshape(rows, -1, 2, 4, 32) << shifts).sum(-2).reshape(rows, -1, 64)
    else:
        runs, start = [], 0
        for per_byte, width in _TQ1_RUNS:
            run = digits[..., start:start + per_byte * width].reshape(rows, -1, per_byte, width)
            place = torch.tensor([81, 27, 9, 3, 1][:per_byte], dtype=torch.int32, device=codes.device).view(-1, 1)
            runs.append((run * place).sum(-2))
            start += per_byte * width
        # 8-bit fixed point of value / 243, rounded up, so that digits come back by multiplying by 3.
        packed = (torch.cat(runs, -1) * 256 + 242) // 243
    scale_bytes = block_scales.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, -1, 2)
    return torch.cat([packed.to(torch.uint8), scale_bytes], -1).reshape(rows, -1)


def decode_blocks(blocks: torch.Tensor, qtype_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, bytes) uint8 blocks -> (rows, in) int8 codes and (rows, in / 256) float16 block scales."""
    rows = blocks.shape[0]
    per_block = 66 if qtype_name == "tq2_0" else 54
    blocks = blocks.reshape(rows, -1, per_block)
    packed = blocks[..., :-2].to(torch.int32)
    scales = blocks[..., -2:].contiguous().view(torch.float16).reshape(rows, -1)
    if qtype_name == "tq2_0":
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=blocks.device).view(4, 1)
        digits = (packed.reshape(rows, -1, 2, 1, 32) >> shifts) & 3
    else:
        runs, start = [], 0
        for per_byte, width in _TQ1_RUNS:
            run = packed[..., start:start + width].unsqueeze(-2)
            power = torch.tensor(_POW3[:per_byte], dtype=torch.int32, device=blocks.device).view(-1, 1)
            runs.append((((run * power) % 256) * 3 >> 8).flatten(-2))
            start += width
        digits = torch.cat(runs, -1)
    return (digits.reshape(rows, -1) - 1).to(torch.int8), scales


# ---- scales: bitflux granularities <-> one fp16 scale per block ----------------------------------------

def to_block_scales(scales: torch.Tensor, out_features: int, in_features: int, group_size: int | None,
                    name: str, codes: torch.Tensor | None = None) -> torch.Tensor:
    """bitflux scales (1|out, 1|groups) -> (out, in / 256) float16, or a BitfluxError when not exact.

    Given the layer's (out, in) codes, a block whose codes are all 0 takes 0 where fp16 cannot hold its scale
    (ggml's quantizer writes 0 there too): its weights are 0 whatever the scale. An all-zero row's scale is
    the quantizer's floor (1e-8), which fp16 cannot hold."""
    if in_features % BLOCK:
        raise BitfluxError(f"{name}: in_features {in_features} is not a multiple of {BLOCK}, "
                           f"so ggml ternary blocks cannot hold it")
    if scales.shape[1] > 1 and group_size % BLOCK:
        raise BitfluxError(f"{name}: per-group scales with group_size {group_size} do not map to ggml blocks, "
                           f"which hold one scale per {BLOCK} weights (group_size must be a multiple of {BLOCK})")
    n_blocks = in_features // BLOCK
    per_group = 1 if scales.shape[1] == 1 else group_size // BLOCK
    blocks = scales.float().repeat_interleave(per_group, 1)[:, :n_blocks].expand(out_features, n_blocks)
    half = blocks.to(torch.float16)
    # below 6.1e-5 fp16 is subnormal: fewer digits, up to all of them lost (0)
    inexact = ~torch.isfinite(half) | ((half.float() - blocks).abs() > blocks.abs() * 2**-11)
    if inexact.any() and codes is not None:
        unused = codes.reshape(out_features, n_blocks, BLOCK).eq(0).all(-1)
        half, inexact = half.masked_fill(inexact & unused, 0), inexact & ~unused
    if inexact.any():
        raise BitfluxError(f"{name}: a scale does not fit in float16 to its 11 bits (range 6.1e-5 .. 65504)")
    return half


def from_block_scales(block_scales: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor | None:
    """(rows, blocks) -> bitflux scales of `granularity` (float32), or None if they do not have that structure."""
    if granularity == "tensor":
        scales = block_scales[:1, :1]
    elif granularity == "channel":
        scales = block_scales[:, :1]
    elif group_size % BLOCK == 0 or group_size >= block_scales.shape[1] * BLOCK:  # whole blocks, or whole rows
        scales = block_scales[:, ::max(1, group_size // BLOCK)]
    else:
        return None
    per_group = 1 if scales.shape[1] == 1 else group_size // BLOCK
    expanded = scales.repeat_interleave(per_group, 1)[:, :block_scales.shape[1]]
    return scales.float() if torch.equal(expanded.expand_as(block_scales), block_scales) else None


# ---- export ------------------------------------------------------------------------------------------------

@dataclass
class ExportSummary:
    path: Path
    ternary_tensors: int
    dense_tensors: int
    bytes: int


def _dense_array(tensor: torch.Tensor, name: str):
    """A dense tensor as (numpy array, ggml type or None); BF16 travels as raw bytes, numpy has no bfloat16."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16
    if tensor.dtype in (torch.float32, torch.float16):
        return tensor.numpy(), None
    raise BitfluxError(f"{name}: dtype {tensor.dtype} has no GGUF counterpart here (float32/16, bfloat16)")


def _export_tensors(model: nn.Module, names: str):
    """-> ({weight name: (packed codes, block scales)}, {name: dense tensor}, packing) in the `names` layout.

    The original layout fuses q/k/v (and linear1's MLP rows): codes and block scales are concatenated
    row by row like any weight, which is exact because every block scale belongs to one row.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    # One packing for every tensor, so that the parts of a fused layer concatenate: the layers' own where
    # they share one (no copy), else tq2.
    packings = {layer.packing for layer in layers.values()}
    packing = packings.pop() if len(packings) == 1 else "tq2"
    packed, scales, dense = {}, {}, {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner not in layers or leaf not in ("weight_packed", "weight_scale"):
            dense[key] = tensor
        elif leaf == "weight_packed":
            layer = layers[owner]
            # Every layer is checked before a byte is written, so a refusal leaves nothing behind.
            block_scales = functools.partial(to_block_scales, layer.weight_scale.cpu(), layer.out_features,
                                             layer.in_features, layer.group_size, owner)
            try:
                scales[f"{owner}.weight"] = block_scales()
            except BitfluxError:  # the codes unpacked only then: blocks of zero codes may hold any scale
                scales[f"{owner}.weight"] = block_scales(codes=formats.unpack(tensor.cpu(), layer.in_features,
                                                                              layer.packing))
            packed[f"{owner}.weight"] = formats.convert(tensor.cpu(), layer.in_features, layer.packing, packing)
    if names == "original":
        try:
            packed, scales, dense = (flux.diffusers_to_original(d) for d in (packed, scales, dense))
        except KeyError as exc:
            raise BitfluxError(f"fused FLUX layer part {exc} is not ternary while its siblings are; "
                               f"export with names='diffusers'") from None
    elif names != "diffusers":
        raise BitfluxError(f"unknown tensor names {names!r}; choose one of {', '.join(NAME_LAYOUTS)}")
    return {name: (packed[name], scales[name]) for name in packed}, dense, packing


def export_gguf(source, path, type: str = "tq2_0", names: str = "original", force: bool = False) -> ExportSummary:
    """Write a ternary transformer (a module, or a bitflux folder) as a GGUF file of `type` blocks.

    names="original": the single-file FLUX (BFL) names ComfyUI-GGUF and stable-diffusion.cpp read, with
    general.architecture "flux"; names="diffusers": the module names of FluxTransformer2DModel (also
    for models that are not FLUX). The bitflux quantization_config and the diffusers transformer config
    ride along as JSON strings, so read_gguf / load_gguf rebuild the exact model. Written to a temporary
    name, renamed when complete; an existing file is replaced only with `force`.
    """
    g = _require_gguf()
    qtype = _qtype(type)
    path = Path(path)
    if not is_gguf(path):  # what `bitflux quantize`, `load_transformer` and other tools take for GGUF
        raise BitfluxError(f"{path}: a GGUF file's name ends in .gguf")
    if path.exists() and not (force and path.is_file()):
        raise BitfluxError(f"{path} exists; pass --force to replace it" if path.is_file() else
                           f"{path} exists and is not a file")
    if not path.parent.is_dir():
        raise BitfluxError(f"{path.parent}: no such folder for the GGUF file")
    if isinstance(source, (str, Path)):
        check_output_apart(source, path)
    model = _load_source(source)
    ternary, dense, packing = _export_tensors(model, names)
    writer = g.GGUFWriter(None, "flux")
    writer.add_quantization_version(g.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(g.LlamaFileType, f"MOSTLY_{type.upper()}"))
    writer.add_string(_META_CONFIG, json.dumps(ternary_config_of(model).to_dict()))
    if hasattr(model, "config"):
        writer.add_string(_META_TRANSFORMER, json.dumps(architecture_config(model.config), default=list))
    total = 0
    for name, (packed, scales) in ternary.items():
        shape = (packed.shape[0], scales.shape[1] * _block_bytes(qtype))
        writer.add_tensor_info(name, shape, np.dtype(np.uint8), shape[0] * shape[1], raw_dtype=qtype)
        total += shape[0] * shape[1]
    for name, tensor in dense.items():
        array, raw = _dense_array(tensor, name)
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
        total += array.nbytes

    def write(tmp: Path) -> None:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for packed, scales in tqdm(ternary.values(), desc=f"GGUF {type}", unit="tensor", leave=False):
                codes = formats.unpack(packed, scales.shape[1] * BLOCK, packing)
                writer.write_tensor_data(encode_blocks(codes, scales, type).numpy())
            for name, tensor in dense.items():
                writer.write_tensor_data(_dense_array(tensor, name)[0])
            writer.close()  # its last flush can fail too
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk: closing flushes what cannot be written either
                writer.close()
            raise

    write_atomic(path, write)
    return ExportSummary(path, len(ternary), len(dense), total)


def _load_source(source) -> nn.Module:
    return source if isinstance(source, nn.Module) else load_transformer(source)


# ---- import ------------------------------------------------------------------------------------------------

@dataclass
class GGUFContents:
    """A GGUF file in bitflux's state-dict convention: ternary weights as `X.weight_packed` (packed in the
    quantization_config's format, as its layers hold them) and `X.weight_scale`, every other tensor dense
    under its own name."""

    state_dict: dict[str, torch.Tensor]
    quantization_config: TernaryConfig
    transformer_config: dict | None
    architecture: str | None


def _field_string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _open(path):
    g = _require_gguf()
    if not Path(path).is_file():
        raise BitfluxError(f"{path}: no such file")
    try:
        reader = g.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError) as exc:
        raise BitfluxError(f"{path}: not a readable GGUF file: {_why(exc)} ({exc})") from None
    return reader


@contextlib.contextmanager
def _read_from(path):
    """What the gguf package raises while a file's fields or tensors are read: a damaged file, in one line."""
    try:
        yield
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise BitfluxError(f"{path}: malformed GGUF file ({exc})") from None


def _why(exc: Exception) -> str:
    """gguf's reader raises bare ValueError/IndexError; name the usual causes for the user."""
    text = str(exc)
    if "magic" in text:
        return "bad magic"
    if "GGMLQuantizationType" in text:
        return "unknown tensor type"
    if isinstance(exc, IndexError) or "reshape" in text or "mmap" in text:
        return "truncated"
    return "malformed"


_DENSE_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_tensor(tensor):
    """-> ('ternary', (tq2 packed codes, block scales)) | ('dense', tensor) for one GGUF tensor. Codes are
    packed at once: unpacked int8 codes of a whole FLUX model would take 12 GB."""
    kind = tensor.tensor_type.name
    shape = tuple(int(v) for v in reversed(tensor.shape))
    data = torch.from_numpy(np.array(tensor.data))
    if kind in ("TQ2_0", "TQ1_0"):
        codes, block_scales = decode_blocks(data.reshape(-1, data.shape[-1]), kind.lower())
        return "ternary", (formats.pack(codes, "tq2"), block_scales)
    if kind in _DENSE_TORCH:
        return "dense", data.view(torch.uint8).view(_DENSE_TORCH[kind]).reshape(shape)
    # Any other ggml type (Q8_0, Q4_K, ...) is read as float32 so that `bitflux quantize` can start from it.
    return "dense", torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(shape)


def _ternary_granularity(config: TernaryConfig | None, ternary: dict) -> TernaryConfig:
    """The stored config if its granularity fits every tensor, else (foreign files) the coarsest that does."""
    candidates = [config] if config is not None else [
        TernaryConfig(granularity="tensor"), TernaryConfig(granularity="channel"),
        TernaryConfig(granularity="group", group_size=BLOCK)]
    for candidate in candidates:
        if all(from_block_scales(s, candidate.granularity, candidate.group_size) is not None
               for _, s in ternary.values()):
            return candidate
    name = next(n for n, (_, s) in ternary.items()
                if from_block_scales(s, candidates[0].granularity, candidates[0].group_size) is None)
    raise BitfluxError(f"{name}: block scales do not follow the file's {candidates[0].granularity} granularity")


def _diffusers_named(raw: dict, shapes: dict) -> dict:
    """Original-layout tensors -> diffusers names; a fused ternary tensor splits its codes and its block
    scales along the same rows."""
    width = flux.original_width(shapes)
    out = {}
    for name, (kind, payload) in raw.items():
        if kind == "dense":
            out.update((k, ("dense", v)) for k, v in flux.convert_original_tensor(name, payload, width).items())
        else:
            codes, scales = (flux.convert_original_tensor(name, part, width) for part in payload)
            out.update((k, ("ternary", (codes[k], scales[k]))) for k in codes)
    return out


def stored_configs(path) -> tuple[dict, TernaryConfig]:
    """(transformer config, quantization config) from a bitflux-written GGUF file's metadata, reading no
    tensor data (`bitflux inspect`)."""
    reader = _open(path)
    with _read_from(path):
        stored, transformer = _field_string(reader, _META_CONFIG), _field_string(reader, _META_TRANSFORMER)
    if not stored or not transformer:
        raise BitfluxError(f"{path}: a GGUF file without bitflux's metadata; `bitflux quantize {Path(path).name} "
                           "-o FOLDER` reads it, then inspect FOLDER")
    config = parse_json_object(transformer, f"{path}: {_META_TRANSFORMER}")
    return config, TernaryConfig.from_dict(parse_json_object(stored, f"{path}: {_META_CONFIG}"))


def read_gguf(path, progress: bool = True) -> GGUFContents:
    """Read a GGUF file (ours or another tool's; diffusers or original FLUX names) into bitflux's
    state-dict convention with diffusers names. Holds the whole model: ternary codes stay packed."""
    reader = _open(path)
    with _read_from(path):
        stored = _field_string(reader, _META_CONFIG)
        transformer = _field_string(reader, _META_TRANSFORMER)
        architecture = _field_string(reader, "general.architecture")
        shapes = {t.name: tuple(int(v) for v in reversed(t.shape)) for t in reader.tensors}
        raw = {t.name: _read_tensor(t) for t in tqdm(reader.tensors, desc="reading GGUF", unit="tensor", leave=False,
                                                     disable=not progress)}
    for name, (kind, payload) in raw.items():  # as a safetensors source's are checked
        check_finite(payload if kind == "dense" else payload[1], f"{path}: tensor {name!r}")  # ternary: block scales
    if flux.is_original_layout(shapes):
        raw = _diffusers_named(raw, shapes)
        transformer = transformer or json.dumps(flux.config_from_original_shapes(shapes))
    ternary = {name: payload for name, (kind, payload) in raw.items() if kind == "ternary"}
    config = _ternary_granularity(
        TernaryConfig.from_dict(parse_json_object(stored, f"{path}: {_META_CONFIG}")) if stored else None, ternary)
    del ternary
    state_dict = {}
    for name in list(raw):
        # Taken out as they are converted: the file's tq2 codes and the layers' packing of them are never
        # both held whole.
        kind, payload = raw.pop(name)
        if kind == "dense":
            state_dict[name] = payload
            continue
        packed, block_scales = payload
        stem = name.removesuffix(".weight")
        state_dict[f"{stem}.weight_packed"] = formats.convert(packed, block_scales.shape[1] * BLOCK, "tq2",
                                                              config.format)
        state_dict[f"{stem}.weight_scale"] = from_block_scales(
            block_scales, config.granularity, config.group_size).to(config.scale_torch_dtype)
    transformer = parse_json_object(transformer, f"{path}: {_META_TRANSFORMER}") if transformer else None
    return GGUFContents(state_dict, config, transformer, architecture)


def load_gguf(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A FluxTransformer2DModel from a GGUF file: layers stored as TQ blocks become TernaryLinear, the
    rest load as they are (other ggml types dequantized to float32), or in `dtype` (the scales keep theirs,
    as in a bitflux folder)."""
    contents = read_gguf(path)
    if dtype is not None:
        contents.state_dict = {key: tensor.to(dtype) if tensor.is_floating_point()
                               and not key.endswith(".weight_scale") else tensor
                               for key, tensor in contents.state_dict.items()}
    return _build(contents, path).to(device)


def _build(contents: GGUFContents, path) -> nn.Module:
    if contents.transformer_config is None:
        raise BitfluxError(f"{path}: neither {_META_TRANSFORMER} metadata nor original FLUX tensor names, "
                           f"so the model's shape is unknown; use read_gguf for its tensors")
    model = flux.build_transformer(contents.transformer_config, "meta")
    for key in contents.state_dict:
        if key.endswith(".weight_packed"):
            name = key.removesuffix(".weight_packed")
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear):
                raise BitfluxError(f"{path}: ternary tensor {name}.weight is no linear layer of the transformer")
            replace_module(model, name, TernaryLinear.from_linear(linear, contents.quantization_config))
    try:
        model.load_state_dict(contents.state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise BitfluxError(f"{path}: tensors do not fit the transformer config "
                           f"({str(exc).splitlines()[-1].strip()})") from None
    if any(isinstance(module, TernaryLinear) for module in model.modules()):  # so that save_pretrained's folder
        record_config(model, config_describing(model, contents.quantization_config).to_dict())  # loads back
    return model.eval()


def gguf_to_folder(path, out, config: TernaryConfig | None = None, force: bool = False,
                   overrides: dict | None = None, progress: bool = True) -> Path:
    """`bitflux quantize model.gguf`: a GGUF file -> bitflux folder. TQ layers are copied as they are (no
    re-ternarization); dense target layers (a GGUF from another tool) are ternarized with `config`. Without
    one, the file's own quantization_config with `overrides` (the settings a user gave, e.g. format or
    activations), so the folder's config describes the tensors it holds (their scales' dtype included)."""
    check_output_apart(path, out)
    AtomicFolder(out, force).check()  # before the file's minutes of reading, not after
    contents = read_gguf(path, progress)
    stored = contents.quantization_config
    has_ternary = any(k.endswith(".weight_packed") for k in contents.state_dict)
    config = config or dataclasses.replace(stored, **(overrides or {}))
    same_scales = (config.granularity, config.group_size_or_none) == (stored.granularity, stored.group_size_or_none)
    if has_ternary and not same_scales:
        raise BitfluxError(f"{path} is already ternary with {stored.granularity} scales; converting them to "
                           f"{config.granularity} would need the full-precision weights")
    if has_ternary and (overrides or {}).get("method", stored.method) != stored.method:
        raise BitfluxError(f"{path} is already ternary; its codes are copied as they are, so --method "
                           f"{config.method} would not apply")
    model = _build(contents, path)
    quantize_(model, config)  # only the dense target layers are left to quantize
    # another tool's file may be ternary beyond the config's layers: those named in it
    return save_transformer(model, out, config_describing(model, config), force)
