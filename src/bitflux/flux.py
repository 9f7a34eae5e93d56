"""FLUX specifics: known configurations, building the transformer, and the original (BFL) single-file
layout converted to diffusers names one block at a time."""

from __future__ import annotations

import re

import torch

from .errors import BitfluxError

FLUX_CLASS = "FluxTransformer2DModel"

FLUX_DEV_CONFIG = {
    "_class_name": FLUX_CLASS, "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
FLUX_SCHNELL_CONFIG = {**FLUX_DEV_CONFIG, "guidance_embeds": False}
KNOWN_CONFIGS = {"flux.1-dev": FLUX_DEV_CONFIG, "flux.1-schnell": FLUX_SCHNELL_CONFIG}


# Sizes a config.json sets, with the least and the most a FLUX-class model could have: a damaged file (10**9 layers,
# heads of 0 dimensions) is refused before a model of its shape is built
_SIZE_LIMITS = {"num_layers": (0, 1024), "num_single_layers": (0, 1024), "num_attention_heads": (1, 1024),
                "attention_head_dim": (2, 4096), "in_channels": (1, 4096), "joint_attention_dim": (1, 65536),
                "pooled_projection_dim": (1, 65536), "patch_size": (1, 64)}


def check_flux_config(config: dict, where: str) -> None:
    name = config.get("_class_name")
    if name != FLUX_CLASS:
        raise BitfluxError(f"{where} is a {name or 'unknown model'}, not a FLUX transformer ({FLUX_CLASS})")
    for key, (least, most) in _SIZE_LIMITS.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most):
            raise BitfluxError(f"{where}: {key} {value!r} is not a size of a FLUX transformer ({least} .. {most})")
    axes, head = config.get("axes_dims_rope"), config.get("attention_head_dim")
    # each axis rotates pairs of dimensions: even sizes, none negative
    if axes is not None and head is not None and (
            not isinstance(axes, list | tuple) or not all(isinstance(a, int) and a >= 0 and a % 2 == 0 for a in axes)
            or sum(axes) != head):
        raise BitfluxError(f"{where}: axes_dims_rope {axes!r} must be even sizes adding up to attention_head_dim "
                           f"{head}")


def block_names(config: dict) -> list[str]:
    """The transformer's blocks in execution order."""
    return ([f"transformer_blocks.{i}" for i in range(config["num_layers"])]
            + [f"single_transformer_blocks.{i}" for i in range(config.get("num_single_layers", 0))])


def outside_blocks(model) -> list[str]:
    """Top-level submodules that are not block lists (embedders, output norm and projection)."""
    return [name for name, _ in model.named_children()
            if name not in ("transformer_blocks", "single_transformer_blocks")]


def build_transformer(config: dict, device: str | torch.device = "meta"):
    """A FluxTransformer2DModel from a config dict, on `device` (meta: no memory for weights)."""
    from diffusers import FluxTransformer2DModel

    check_flux_config(config, "the config")
    try:
        with torch.device(device):
            return FluxTransformer2DModel.from_config(config)
    except (TypeError, ValueError) as exc:
        raise BitfluxError(f"invalid FLUX transformer config: {exc}") from None


# ---- original single-file layout ------------------------------------------------------------------

ORIGINAL_PREFIX = "model.diffusion_model."
_GLOBAL_RENAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
}
_DOUBLE_FUSED = {  # fused rows -> equal chunks
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_RENAMES = {
    "modulation.lin": "norm.linear", "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
}
_LINEAR1_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # a single block's linear1 rows, in order
_FUSED = {**_DOUBLE_FUSED, "linear1": _LINEAR1_PARTS}  # every original fused tensor -> its parts, in row order
# diffusers names -> original ones
_GLOBAL_ORIGINAL = {v: k for k, v in _GLOBAL_RENAMES.items()}
_DOUBLE_ORIGINAL = {v: k for k, v in _DOUBLE_RENAMES.items()}
_SINGLE_ORIGINAL = {v: k for k, v in _SINGLE_RENAMES.items()}
_BLOCK_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK_KEY = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def strip_original_prefix(key: str) -> str:
    return key.removeprefix(ORIGINAL_PREFIX)


def is_original_layout(keys) -> bool:
    return any(strip_original_prefix(k).startswith(("double_blocks.", "single_blocks.")) for k in keys)


def _rename(suffix: str, renames: dict) -> str | None:
    for old, new in renames.items():
        if suffix == old or suffix.startswith(old + "."):
            return new + suffix[len(old):]
    return None


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    # The original AdaLayerNormContinuous emits (shift, scale); diffusers' emits (scale, shift).
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def original_width(shapes: dict) -> int:
    """The hidden width of an original checkpoint (rows of img_in), needed to split single blocks' linear1."""
    for key, shape in shapes.items():
        if strip_original_prefix(key) == "img_in.weight":
            return tuple(shape)[0]
    raise BitfluxError("not an original FLUX checkpoint: no img_in.weight")


def convert_original_tensor(key: str, tensor: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """One original-layout tensor -> its diffusers-named tensor(s); fused ones are split along rows.
    Tensor by tensor, so a converter holds one source tensor at a time whatever the block size."""
    key = strip_original_prefix(key)
    match = _BLOCK_KEY.match(key)
    if match is None:
        new = _rename(key, _GLOBAL_RENAMES)
        if new is None:
            raise BitfluxError(f"unexpected tensor {key!r} in an original FLUX checkpoint")
        return {new: _swap_halves(tensor) if new.startswith("norm_out.linear") else tensor}
    kind, index, suffix = match.groups()
    prefix = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}."
    if kind == "double_blocks":
        fused = next((f for f in _DOUBLE_FUSED if suffix.startswith(f + ".")), None)
        if fused is not None:
            param = suffix[len(fused) + 1:]
            return {f"{prefix}{name}.{param}": part for name, part in zip(_DOUBLE_FUSED[fused], tensor.chunk(3, dim=0))}
        new = _rename(suffix, _DOUBLE_RENAMES)
    elif suffix.startswith("linear1."):
        # linear1 fuses q, k, v (width rows each) and the MLP input projection.
        param = suffix[len("linear1."):]
        if tensor.shape[0] <= 3 * width:
            raise BitfluxError(f"tensor {key!r} has {tensor.shape[0]} rows: a single block's linear1 holds q, k, v "
                               f"({width} rows each) and the MLP's input projection")
        parts = torch.split(tensor, [width, width, width, tensor.shape[0] - 3 * width], dim=0)
        return {f"{prefix}{name}.{param}": part for name, part in zip(_LINEAR1_PARTS, parts)}
    else:
        new = _rename(suffix, _SINGLE_RENAMES)
    if new is None:
        raise BitfluxError(f"unexpected tensor {key!r} in an original FLUX checkpoint")
    return {prefix + new: tensor}


def config_from_original_shapes(shapes: dict[str, tuple]) -> dict:
    """Infer the diffusers config of an original single-file checkpoint from its tensor shapes."""
    shapes = {strip_original_prefix(k): tuple(v) for k, v in shapes.items()}
    try:
        width, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        config = {
            "_class_name": FLUX_CLASS, "patch_size": 1, "in_channels": in_channels,
            "num_layers": 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks.")),
            "num_single_layers": 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")),
                                         default=-1),
            "attention_head_dim": head_dim, "num_attention_heads": width // head_dim,
            "joint_attention_dim": shapes["txt_in.weight"][1],
            "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
            "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        }
        out_channels = shapes["final_layer.linear.weight"][0]
        if out_channels != in_channels:  # FLUX.1 Fill / Canny / Depth: the conditioning enters with the latents
            config["out_channels"] = out_channels
    except (KeyError, ValueError, IndexError) as exc:
        raise BitfluxError(f"not an original FLUX checkpoint: missing or malformed tensor {exc}") from None
    if head_dim % 32:
        raise BitfluxError(f"cannot infer rotary axes for head dim {head_dim}; use a diffusers folder with config.json")
    # FLUX splits each head's rotary dims as 1/8 (time) + 7/16 + 7/16 (height, width): 16, 56, 56 for 128.
    config["axes_dims_rope"] = [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]
    return config


def original_name(key: str) -> str:
    """The original-layout tensor holding diffusers' tensor `key`: for a part of q/k/v or of linear1, the
    fused tensor."""
    match = _DIFFUSERS_BLOCK_KEY.match(key)
    if match is None:
        new = _rename(key, _GLOBAL_ORIGINAL)
    else:
        kind, index, suffix = match.groups()
        layer, _, param = suffix.rpartition(".")
        if kind == "transformer_blocks":
            fused = next((f for f, parts in _DOUBLE_FUSED.items() if layer in parts), None)
            new = f"{fused}.{param}" if fused else _rename(suffix, _DOUBLE_ORIGINAL)
        else:
            new = f"linear1.{param}" if layer in _LINEAR1_PARTS else _rename(suffix, _SINGLE_ORIGINAL)
        new = None if new is None else f"{'double' if kind == 'transformer_blocks' else 'single'}_blocks.{index}.{new}"
    if new is None:
        raise BitfluxError(f"no original FLUX name for {key!r}")
    return new


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of convert_original_tensor over a whole state dict: diffusers names -> original layout.

    Tensors without a counterpart (e.g. bitflux's packed codes) are refused; the caller converts dense
    tensors. Fused q/k/v and linear1 are concatenated along rows again.
    """
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # fused original name -> parts by diffusers layer name
    for key, tensor in state.items():
        name = original_name(key)
        match = _BLOCK_KEY.match(name)
        if match and match.group(3).rpartition(".")[0] in _FUSED:
            pending.setdefault(name, {})[_DIFFUSERS_BLOCK_KEY.match(key).group(3).rpartition(".")[0]] = tensor
        else:
            out[name] = _swap_halves(tensor) if name.startswith("final_layer.adaLN_modulation.1") else tensor
    for name, parts in pending.items():
        fused = _BLOCK_KEY.match(name).group(3).rpartition(".")[0]
        absent = [p for p in _FUSED[fused] if p not in parts]
        if absent:  # the original tensor fuses them all
            raise BitfluxError(f"no original FLUX tensor {name!r} without all of its parts "
                               f"({', '.join(absent)} missing)")
        out[name] = torch.cat([parts[p] for p in _FUSED[fused]], dim=0)
    return out
