"""Streaming SOURCE -> bitflux folder: the engine of `bitflux quantize`.

Sources: a diffusers FLUX pipeline or transformer folder, an original single-file FLUX checkpoint (bf16,
fp8, ComfyUI's scaled fp8, or an all-in-one file whose transformer is under `model.diffusion_model.`), or a
hub id found in the local Hugging Face cache. Tensors are read one at a time (fused tensors of the original
layout are split as they come) and written in bounded shards, so peak memory does not grow with depth.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, flux, formats
from .config import TernaryConfig
from .errors import BitfluxError
from .surgery import QuantizationReport, quantize_
from .ternary import ternarize

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# ComfyUI's fp8 checkpoints keep a scale beside each fp8 weight: `<layer>.scale_weight` (its "scaled_fp8"
# files) or `<layer>.weight_scale` (its per-layer format, described by `<layer>.comfy_quant`). A weight is its
# fp8 values times the scale; the other entries serve only fp8 matrix products (input scales) or mark the format.
_WEIGHT_SCALE_LEAVES = ("scale_weight", "weight_scale")
_FP8_MARKER_LEAVES = ("scale_input", "input_scale", "comfy_quant", "scaled_fp8")


@dataclass
class Source:
    """A resolved checkpoint: where its transformer weights are and how they are laid out."""

    transformer_config: dict
    files: list[Path]
    original_layout: bool
    pipeline_root: Path | None = None  # set when the source is a whole pipeline folder
    # an original file's transformer tensors, when the file holds others too (all-in-one, fp8 scales); None: all
    names: frozenset[str] | None = None
    weight_scales: dict[str, str] = field(default_factory=dict)  # scaled fp8: weight name -> its scale's name

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of the transformer's tensors, from the file headers alone."""
        shapes = checkpoint.tensor_shapes(self.files)
        return shapes if self.names is None else {k: v for k, v in shapes.items() if k in self.names}


def resolve_source(source: str | Path) -> Source:
    path = Path(source)
    if not path.exists():
        if looks_like_hub_id(str(source)):
            return resolve_source(from_hub_cache(str(source)))
        raise BitfluxError(f"{source}: no such file or folder")
    if path.is_file():
        if checkpoint.is_gguf(path):
            raise BitfluxError(f"{path}: a GGUF file converts with `bitflux quantize` (interop.gguf.gguf_to_folder), "
                               "without calibration: it holds no full-precision pipeline")
        if path.suffix.lower() not in checkpoint.SAFETENSORS_SUFFIXES:
            raise BitfluxError(f"{path}: not a safetensors file (bitflux reads .safetensors or .sft, never pickle)")
        return _original_file(path)
    if (path / "model_index.json").exists():
        index = checkpoint.parse_json_object((path / "model_index.json").read_bytes(), str(path / "model_index.json"))
        if index.get("_class_name") not in ("FluxPipeline", None) and "transformer" not in index:
            raise BitfluxError(f"{path}: a {index.get('_class_name')} pipeline, not a FLUX pipeline")
        if not (path / "transformer").is_dir():
            raise BitfluxError(f"{path}: pipeline folder without a transformer/ folder")
        found = resolve_source(path / "transformer")
        found.pipeline_root = path
        return found
    config = checkpoint.read_config(path)
    flux.check_flux_config(config, str(path))
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        by = "bitflux" if method == "bitflux" else f"{method} (its quantization_config)"
        raise BitfluxError(f"{path}: already quantized by {by}; quantize the full-precision source instead")
    return Source(config, checkpoint.weight_files(path), original_layout=False)


def _original_file(path: Path) -> Source:
    """An original single-file checkpoint: its transformer's tensors (an all-in-one file's VAE and text encoders
    left out) and their fp8 scales, checked from the header before any tensor is read."""
    header = checkpoint.read_safetensors_header(path)
    keys = [key for key in header if key != "__metadata__"]
    if not flux.is_original_layout(keys):
        raise BitfluxError(f"{path}: not an original FLUX checkpoint (no double_blocks / single_blocks); "
                           "for diffusers weights pass the folder holding config.json")
    # ComfyUI's all-in-one checkpoints keep the transformer under this prefix beside the VAE and text encoders
    transformer = [key for key in keys if key.startswith(flux.ORIGINAL_PREFIX)] or keys
    names, scales = set(), {}
    for key in transformer:
        layer, _, leaf = key.rpartition(".")
        if leaf in _WEIGHT_SCALE_LEAVES:
            scales[f"{layer}.weight"] = key
        elif leaf not in _FP8_MARKER_LEAVES:
            names.add(key)
    for name in names:
        if header[name]["dtype"] not in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"):
            raise BitfluxError(f"{path}: tensor {name!r} is {header[name]['dtype']}: a checkpoint quantized to "
                               "integers (int8, nf4, nvfp4), which bitflux does not read; quantize the bf16 or fp8 "
                               "checkpoint instead")
    for weight, scale in scales.items():
        if weight not in names:
            raise BitfluxError(f"{path}: scale {scale!r} has no weight {weight!r} beside it")
        rows, shape = header[weight]["shape"][0], tuple(header[scale]["shape"])
        if math.prod(shape) != 1 and shape not in ((rows,), (rows, 1)):
            raise BitfluxError(f"{path}: {scale!r} has shape {shape}: scales per block of a row, which bitflux does "
                               "not read (one scale per tensor or per row only); quantize the bf16 checkpoint instead")
    shapes = {key: tuple(header[key]["shape"]) for key in names}
    try:
        config = flux.config_from_original_shapes(shapes)
    except BitfluxError as exc:
        raise BitfluxError(f"{path}: {exc}") from None
    return Source(config, [path], original_layout=True, names=frozenset(names), weight_scales=scales)


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/"))


def from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:
        # Files fetched selectively (`hf download REPO FILES`, --include, --exclude flux1-dev.safetensors): the
        # snapshot lacks some of the repository's files, which huggingface_hub >= 2.4 reports with its path
        partial = getattr(exc, "snapshot_path", None)
        if partial is not None and Path(partial).is_dir():
            return Path(partial)
        raise BitfluxError(
            f"{repo_id}: no such local path, and not in the local Hugging Face cache (bitflux never downloads at "
            f"run time); fetch it first with `hf download {repo_id}` or pass a local folder") from None


def _source_tensors(source: Source, where: str | Path):
    """Yield dicts of diffusers-named tensors converted from one source tensor each, checked under the name the
    source gives it (`where`: the source as the user named it)."""
    width = flux.original_width(source.shapes()) if source.original_layout else 0
    weight_of = {scale: weight for weight, scale in source.weight_scales.items()}
    scales = {}
    for name, scale in checkpoint.iter_tensors(source.files, weight_of):  # a few hundred numbers: read first
        checkpoint.check_finite(scale, f"{where}: tensor {name!r}")
        scales[weight_of[name]] = scale.float()
    for name, tensor in checkpoint.iter_tensors(source.files, source.names):
        # every FLUX transformer tensor is floating point; load_transformer refuses others
        if not tensor.is_floating_point():
            raise BitfluxError(f"{where}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, "
                               "expected floating point (corrupted?)")
        if name in scales:  # scaled fp8: its values times its scale (per tensor or per row), in bf16 as below
            tensor = (tensor.float() * scales[name].reshape(-1, *[1] * (tensor.dim() - 1))).to(torch.bfloat16)
        elif tensor.dtype == torch.float64:  # an fp64 export: fp32, the widest dtype bitflux's loaders take
            tensor = tensor.float()
        else:  # fp8 checkpoints: every fp8 value is a bf16
            tensor = checkpoint.widened_fp8(tensor)
        checkpoint.check_finite(tensor, f"{where}: tensor {name!r}")
        yield _original_to_diffusers(source, name, tensor, width) if source.original_layout else {name: tensor}


def _original_to_diffusers(source: Source, name: str, tensor: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    try:
        return flux.convert_original_tensor(name, tensor, width)
    except BitfluxError as exc:  # the file it is in (an original layout is one file)
        raise BitfluxError(f"{source.files[0]}: {exc}") from None


def converted_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    """Diffusers-named shapes of the source, from the file headers alone (original layout converted on meta)."""
    shapes = source.shapes()
    if not source.original_layout:
        return shapes
    width = flux.original_width(shapes)
    return {k: tuple(v.shape) for key, shape in shapes.items()
            for k, v in _original_to_diffusers(source, key, torch.empty(shape, device="meta"), width).items()}


def check_source(found: Source, source: str | Path, model) -> None:
    """The source's tensors (their headers) are those of `model` (its config's transformer, on meta) with their
    shapes, and nothing else: checked before any work. Named as the source names them."""

    def named(key: str) -> str:  # an original file's tensor, and which diffusers tensor of it is meant
        try:
            return f"{flux.original_name(key)!r} ({key} in diffusers' names)" if found.original_layout else repr(key)
        except BitfluxError:  # no original name: a tensor no FLUX checkpoint has
            return repr(key)

    shapes, expected = converted_shapes(found), {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in shapes.items():
        if name not in expected:
            raise BitfluxError(f"{source}: unexpected tensor {named(name)} for a FLUX transformer")
        if tuple(shape) != expected[name]:
            raise BitfluxError(f"{source}: tensor {named(name)} has shape {tuple(shape)}, the config expects "
                               f"{expected[name]}")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise BitfluxError(f"{source}: missing tensor {named(missing[0])} ({len(missing)} missing)")


def quantize_checkpoint(source: str | Path, out: str | Path, config: TernaryConfig | None = None,
                        force: bool = False, progress: bool = True,
                        max_shard_bytes: int = checkpoint.DEFAULT_SHARD_BYTES) -> QuantizationReport:
    """Quantize SOURCE into the bitflux folder OUT, streaming; returns the report."""
    config = config or TernaryConfig()
    found = resolve_source(source)
    checkpoint.check_output_apart(found.pipeline_root or source, out)
    model = flux.build_transformer(found.transformer_config, "meta")
    check_source(found, source, model)
    report = quantize_(model, config)
    targets = {layer.name for layer in report.layers}
    out = Path(out)
    with checkpoint.AtomicFolder(out, force) as tmp:
        transformer_dir = tmp / "transformer" if found.pipeline_root else tmp
        transformer_dir.mkdir(exist_ok=True)
        writer = checkpoint.ShardWriter(transformer_dir, max_shard_bytes)
        # closed on the way out of an error too, so that the error's line starts a line of its own
        with tqdm(total=len(found.shapes()), desc="quantizing", unit="tensor",
                  disable=not progress) as bar:
            for converted in _source_tensors(found, source):
                for name, tensor in converted.items():
                    layer, _, leaf = name.rpartition(".")
                    if layer in targets and leaf == "weight":
                        packed, scales = ternarized(tensor, config)
                        writer.add(f"{layer}.weight_packed", packed)
                        writer.add(f"{layer}.weight_scale", scales)
                    else:
                        writer.add(name, tensor)
                bar.update(1)
        writer.finish()
        checkpoint.write_config(transformer_dir, found.transformer_config, config)
        if found.pipeline_root:
            copy_pipeline_components(found.pipeline_root, tmp)
    return report


def ternarized(weight: torch.Tensor, config: TernaryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense weight as a bitflux folder stores it: packed codes and scales in the config's format and dtype
    (what `bitflux quantize` writes, and diffusers' from_pretrained makes while loading)."""
    codes, scales = ternarize(weight, config.method, config.granularity, config.group_size_or_none)
    return formats.pack(codes, config.format), scales.to(config.scale_torch_dtype)


def pipeline_components(root: Path) -> set[str]:
    """The component folders the pipeline folder's model_index.json names."""
    index = checkpoint.parse_json_object((root / "model_index.json").read_bytes(), str(root / "model_index.json"))
    return {name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)}


def copy_pipeline_components(root: Path, dest: Path) -> None:
    """The pipeline's components but the transformer (the folders model_index.json names) and its small files:
    weight files hard-linked where the filesystem allows (no extra disk: FLUX.1's T5 is 9.5 GB), the small files
    (configs, tokenizers) copied, so that editing one in the output leaves the source's alone. Weight files at
    the top are no component: the FLUX.1-dev repository keeps its original-layout transformer and autoencoder
    there (flux1-dev.safetensors, ae.safetensors: 24 GB in full precision), which a ternary copy must not carry."""
    components = pipeline_components(root)
    for item in root.iterdir():
        target = dest / item.name
        try:
            if item.is_dir():
                if item.name in components and item.name != "transformer":
                    checkpoint.copy_folder(item, target)
            elif item.suffix not in checkpoint.LINKED_SUFFIXES:
                shutil.copy2(item, target)
        except OSError as exc:
            if exc.errno in checkpoint.WRITE_ERRNOS:
                raise  # the output's own trouble: its AtomicFolder reports it
            raise BitfluxError(f"{exc.filename or item}: cannot copy this pipeline component "
                               f"({exc.strerror or exc})") from None
