"""LoRA on ternary models: a 16-bit low-rank side branch, y = layer(x) + strength * (alpha / rank) * B(A(x)).

Why forward hooks and not wrapper modules: a wrapper renames the adapted layer's tensors
(`X.weight_packed` -> `X.base.weight_packed`), which breaks checkpoint saving, GGUF export and every
lookup by module name. A hook leaves the model's module tree and state_dict untouched. The LoRA weights
live in the LoraAdapter that load_lora returns (an nn.Module: `.to()` it if the model moves later).

Fusing adds the LoRA into the weights and re-ternarizes them (the branch then costs nothing); the layer's
original buffers are kept, so unfusing restores them exactly (fused adapters unfuse last-in, first-out).

Key layouts read (safetensors or a state dict):
  diffusers / PEFT: [transformer.|base_model.model.]<diffusers module>.lora_A.weight / .lora_B.weight [/ .alpha]
  kohya:            lora_unet_<original BFL module, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha
                    (e.g. lora_unet_double_blocks_0_img_attn_qkv: fused q/k/v rows split onto to_q/to_k/to_v)
  XLabs:            [diffusion_model.]double_blocks.N.processor.{qkv,proj}_lora{1,2}.down.weight / .up.weight
                    (1: the image stream's img_attn, 2: the text stream's txt_attn), single_blocks.N.processor.
                    qkv_lora (rows onto to_q/to_k/to_v) and .proj_lora (proj_out), as diffusers converts them
  also dotted original names and lora_down/lora_up with diffusers names.
Text-encoder keys are left out of the transformer's pairs; load_lora(pipe.text_encoder, ..., component=
"text_encoder") attaches CLIP's (lora_te1_ / text_encoder. with CLIP's module names), as diffusers does for FLUX
(T5's, lora_te2_ / text_encoder_2., neither applies).
Alpha: an .alpha tensor; else PEFT's lora_alpha (alpha_pattern, use_rslora) where diffusers keeps it, the
file's metadata ("lora_adapter_metadata"), or PEFT's adapter_config.json beside the file; without any the
scale is 1 (alpha = rank), as diffusers does.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import flux, formats
from ..checkpoint import check_finite
from ..errors import BitfluxError
from ..fusion import weak_reference
from ..kernels import forget_prepared
from ..linear import TernaryLinear
from ..ternary import ternarize

_ROLES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
          "alpha": "alpha", "down.weight": "down", "up.weight": "up"}  # the last two: XLabs'
# XLabs' attention-processor LoRAs: (double | single, block, qkv | proj, stream 1 (image) | 2 (text) | none)
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)$")
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
COMPONENTS = ("transformer", "text_encoder")  # what a LoRA's pairs adapt: FLUX's transformer and CLIP
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.)")
# CLIP's pairs (FLUX's first text encoder, diffusers' text_encoder: kohya's lora_te1_, lora_te_ in SD's naming);
# T5's (lora_te2_, text_encoder_2.) diffusers does not apply to FLUX either
_CLIP = re.compile(r"^(lora_te1?_|text_encoder\.)")
_UNSUPPORTED = ("dora_scale", "lora_magnitude_vector", "hada_", "lokr_", ".diff", "lora_mid")


def _check_pair(down: torch.Tensor, up: torch.Tensor, what: str) -> None:
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise BitfluxError(f"{what} has shapes {tuple(down.shape)} and {tuple(up.shape)}, not (r, in) and (out, r) "
                           "with r >= 1")


class LoraBranch(nn.Module):
    """down (rank, in) and up (out, rank) in 16 bits; forward returns (alpha / rank) * up(down(x))."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None, dtype=torch.bfloat16):
        super().__init__()
        _check_pair(down, up, "LoRA pair")
        # Frozen for inference; a training script turns gradients on with adapter.requires_grad_(True).
        self.down = nn.Parameter(down.detach().to(dtype).clone(), requires_grad=False)
        self.up = nn.Parameter(up.detach().to(dtype).clone(), requires_grad=False)
        self.scale = 1.0 if alpha is None else float(alpha) / down.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense (out, in) float32 weight this branch adds."""
        return self.scale * (self.up.float() @ self.down.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # on x's device too: a model moved after the LoRA was attached (pipe.to, CPU offload) takes it along
        return self.scale * F.linear(F.linear(x, self.down.to(x.device, x.dtype)), self.up.to(x.device, x.dtype))


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    return layer.dequantize(torch.float32) if isinstance(layer, TernaryLinear) else layer.weight.detach().float()


class LoraAdapter(nn.Module):
    """One LoRA attached to a model. `strength` may be changed at any time while unfused."""

    def __init__(self, model: nn.Module, branches: dict[str, LoraBranch], strength: float = 1.0,
                 skipped_text_encoder_pairs: int = 0):
        super().__init__()
        self.skipped_text_encoder_pairs = skipped_text_encoder_pairs  # in the file, not applied
        self.names = list(branches)
        self.branches = nn.ModuleList(branches.values())
        self.strength = float(strength)
        self.fused = False
        # The layers, held weakly: their hooks hold this adapter, so strong references would make a cycle that keeps
        # a deleted model's codes (on a GPU too) until Python's garbage collector runs.
        self._layers = {name: weakref.ref(model.get_submodule(name)) for name in self.names}
        self._hooks = [model.get_submodule(name).register_forward_hook(functools.partial(self._add_branch, branch))
                       for name, branch in branches.items()]
        self._saved: dict[str, tuple] = {}

    def _layer(self, name: str) -> nn.Module:
        layer = self._layers[name]()
        if layer is None:
            raise BitfluxError("the model this LoRA was attached to is gone: copy or save the model with it")
        return layer

    # A copy or a pickle holds the layers it copies along (a deep copy of the model: the copied layers); those of a
    # model that is gone stay gone, with their hooks.
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_layers": {name: ref() for name, ref in self._layers.items()},
                "_hooks": [hook for hook in self._hooks if hook.hooks_dict_ref() is not None]}

    def __setstate__(self, state: dict) -> None:
        layers = {name: weak_reference(layer) for name, layer in state["_layers"].items()}
        super().__setstate__({**state, "_layers": layers})

    def _add_branch(self, branch: LoraBranch, module, args, output):
        if self.fused or self.strength == 0:
            return output
        return output + self.strength * branch(args[0]).to(output.dtype)

    def items(self):
        return zip(self.names, self.branches)

    def check_removable(self, keep_fused: bool = False, along=()) -> None:
        """What remove(keep_fused) refuses, refused before anything changes: with keep_fused, a LoRA fused before
        this one must go first (unfusing it would put back weights without this one's part), unless it is one of
        `along`, removed with it; without, one fused after it (unfuse). A model that is gone refuses nothing."""
        for name, layer in self._live_layers() if self.fused else ():
            stack = layer.__dict__.get("_bitflux_fused", [])
            if self not in stack:  # (a fuse that failed half way and its put-back that failed too)
                continue
            if keep_fused and not all(other in along for other in stack[:stack.index(self)]):
                raise BitfluxError(f"{name}: a LoRA fused before this one would unfuse over it; remove or "
                                   "unfuse that one first")
            if not keep_fused and stack[-1] is not self:
                raise BitfluxError(f"{name}: another LoRA was fused after this one; unfuse it first")

    def remove(self, keep_fused: bool = False) -> None:
        """Detach from the model: unfusing first if fused, or with keep_fused leaving the fused weights in the
        layers (their originals are dropped: diffusers' fuse_lora() then unload_lora_weights()); check_removable
        says what is refused. From a model that is gone (its hooks went with it) it only forgets it."""
        self.check_removable(keep_fused)
        live = self._live_layers()
        if self.fused and (keep_fused or not live):
            for _, layer in live:
                _off_stack(layer, self)  # a LoRA fused after it unfuses to these
            self._saved.clear()
            self.fused = False
        elif self.fused:
            self.unfuse()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _live_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, layer) of the adapted layers still there: all of them, or none once the model is gone."""
        return [(name, layer) for name, ref in self._layers.items() if (layer := ref()) is not None]

    @torch.no_grad()
    def fuse(self, method: str = "lsq", progress: bool = True) -> None:
        """Fold strength * delta into the weights: ternary layers are re-ternarized with `method` at their
        own granularity, dense layers get the delta added. The branch stops running. lsq (least squares)
        gives an already ternary weight back as it is, so a small delta moves it little; absmean would
        shrink every scale by the share of zero codes (28 % of the demo's: a zero delta moved its images by
        ~25 % RMS). A progress bar shows after 2 s (on a 2-core CPU, ~0.9 s a 3072 x 12288 layer: minutes
        for a LoRA on all of FLUX.1-dev's)."""
        if self.fused:
            raise BitfluxError("this LoRA is already fused")
        try:
            for name, branch in tqdm(list(self.items()), desc="fusing LoRA", unit="layer", leave=False, delay=2,
                                     disable=not progress):
                self._fuse_layer(name, branch, method)
        except BaseException:  # (out of memory, Ctrl-C) the layers fused so far put back: all or nothing
            try:
                for name in list(self._saved):
                    self._put_back(name)
                for _, layer in self._live_layers():
                    _off_stack(layer, self)  # (one stacked before its buffers were saved)
            finally:
                self.fused = bool(self._saved)  # what a second interrupt left: unfuse() or remove() finishes it
            raise
        self.fused = True

    def _fuse_layer(self, name: str, branch: LoraBranch, method: str) -> None:
        layer = self._layer(name)
        weight = _dense_weight(layer)
        weight = weight + self.strength * branch.delta().to(weight.device)
        # what may fail (memory) first, then the layer changed and its old buffers saved, at once
        if isinstance(layer, TernaryLinear):
            codes, scales = ternarize(weight, method, layer.granularity, layer.group_size)
            packed, scales = formats.pack(codes, layer.packing), scales.to(layer.weight_scale.dtype)
            self._saved[name] = (layer.weight_packed, layer.weight_scale)
            forget_prepared(layer.weight_packed)  # kept for unfuse(), not run meanwhile
            layer.weight_packed, layer.weight_scale = packed, scales
        else:  # the stored parameter: a narrowed text encoder's `weight` is a widened copy (text_encoders)
            stored = layer._parameters["weight"]
            weight = weight.to(stored.dtype)
            self._saved[name] = (stored.data,)
            stored.data = weight
        layer.__dict__.setdefault("_bitflux_fused", []).append(self)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the buffers the layers had before fuse(): exactly, or as the model's moves since (.to(dtype),
        .to(device)) would have made them."""
        if not self.fused:
            raise BitfluxError("this LoRA is not fused")
        self.check_removable()
        for name in list(self._saved):
            self._put_back(name)
        self.fused = False

    def _put_back(self, name: str) -> None:
        """One layer's buffers from before fuse(), and this LoRA off its stack."""
        layer = self._layer(name)
        if isinstance(layer, TernaryLinear):
            packed, scales = self._saved.pop(name)
            layer.weight_packed = packed.to(layer.weight_packed.device)
            layer.weight_scale = scales.to(layer.weight_scale)
        else:
            (weight,) = self._saved.pop(name)
            stored = layer._parameters["weight"]
            stored.data = weight.to(stored)
        _off_stack(layer, self)


def _off_stack(layer: nn.Module, adapter: LoraAdapter) -> None:
    """The adapter out of the layer's stack of fused LoRAs (where it is: a fuse that failed half way may not have
    put it there)."""
    stack = layer.__dict__.get("_bitflux_fused", [])
    if adapter in stack:
        stack.remove(adapter)


# ---- reading LoRA files ------------------------------------------------------------------------------------

def _split_key(key: str) -> tuple[str, str]:
    """'<stem>.<role suffix>' -> (stem, role) with role in down / up / alpha."""
    for suffix, role in _ROLES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    if any(marker in key for marker in _UNSUPPORTED):
        raise BitfluxError(f"unsupported LoRA variant (DoRA, LoHa, LoKr or full diff): key {key!r}")
    raise BitfluxError(f"not a LoRA key: {key!r} (expected .lora_A/.lora_B/.lora_down/.lora_up weights)")


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, TernaryLinear))]


def _original_names(model: nn.Module) -> dict[str, str]:
    """Original (BFL) linear name -> its name with underscores, for this model's depth."""
    try:
        names = flux.diffusers_to_original({f"{n}.weight": torch.zeros(2, 0) for n in _linear_names(model)})
    except BitfluxError:
        return {}  # not a FLUX transformer: only diffusers names apply
    return {k.removesuffix(".weight"): k.removesuffix(".weight").replace(".", "_") for k in names}


def _resolve(stem: str, diffusers: set[str], original: dict[str, str]) -> tuple[str, str] | str:
    """A LoRA key stem -> ('diffusers' | 'original', module name) or ('qkv', a single block's attention, whose
    to_q/to_k/to_v take a third of the rows each); "skip" for text-encoder keys."""
    if _TEXT_ENCODER.match(stem):
        return "skip"
    if xlabs := _XLABS.match(stem):
        return _xlabs_layer(stem, *xlabs.groups(), diffusers, original)
    for prefix in ("lora_unet_", "lora_transformer_"):
        if stem.startswith(prefix):
            flat = stem[len(prefix):]
            match = next((n for n in diffusers if n.replace(".", "_") == flat), None)
            if match:
                return "diffusers", match
            match = next((n for n, underscored in original.items() if underscored == flat), None)
            if match:
                return "original", match
            raise _Unmatched(stem)
    for prefix in _PREFIXES:
        stem = stem.removeprefix(prefix)
    if stem in diffusers:
        return "diffusers", stem
    if stem in original:
        return "original", stem
    raise _Unmatched(stem)


def _resolve_text_encoder(stem: str, names: set[str]) -> tuple[str, str] | str | None:
    """A LoRA key stem -> ('diffusers', CLIP module name) for CLIP's pairs (kohya's names with underscores, or
    dotted), "skip" for T5's (not applied), None for the transformer's."""
    if not _TEXT_ENCODER.match(stem):
        return None
    if not (clip := _CLIP.match(stem)):
        return "skip"
    name = stem[clip.end():]
    # transformers 5's CLIPTextModel names its layers without the text_model. that files (and 4's) write
    for candidate in (name, name.removeprefix("text_model.").removeprefix("text_model_")):
        if candidate in names:
            return "diffusers", candidate
        if match := next((n for n in names if n.replace(".", "_") == candidate), None):
            return "diffusers", match
    raise _Unmatched(stem)


def _xlabs_layer(stem: str, kind: str, block: str, layer: str, stream: str, diffusers: set[str],
                 original: dict[str, str]) -> tuple[str, str]:
    """An XLabs processor LoRA's layer: a double block's qkv or proj of stream 1 (image) or 2 (text), by its
    original name; a single block's qkv onto its attention's to_q/to_k/to_v ('qkv'), its proj onto proj_out."""
    if kind == "double" and stream:
        name = f"double_blocks.{block}.{'img' if stream == '1' else 'txt'}_attn.{layer}"
        if name in original:
            return "original", name
    elif kind == "single" and not stream:
        name = f"single_transformer_blocks.{block}"
        if layer == "qkv" and f"{name}.attn.to_q" in diffusers:
            return "qkv", f"{name}.attn"
        if layer == "proj" and f"{name}.proj_out" in diffusers:
            return "diffusers", f"{name}.proj_out"
    raise _Unmatched(stem)


class _Unmatched(Exception):
    """A LoRA key naming no linear layer of the model: read_lora names the first and counts them all."""


def _to_diffusers(name: str, down, up, model: nn.Module) -> dict[str, tuple]:
    """An original-layout LoRA pair -> per diffusers layer (down, up rows). A fused layer's rows split
    like its weight (q/k/v, and linear1's MLP rows); all parts share the down matrix."""
    width = model.get_submodule("x_embedder").out_features
    parts = flux.convert_original_tensor(f"{name}.weight", up, width)
    return {k.removesuffix(".weight"): (down, part) for k, part in parts.items()}


@dataclass(frozen=True)
class PeftScaling:
    """What PEFT's LoraConfig says of the scale alpha / r: lora_alpha, alpha_pattern (per module), and
    use_rslora (alpha / sqrt(r) instead)."""

    alpha: float | None = None
    pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False

    def alpha_for(self, name: str, rank: int) -> float | None:
        """A diffusers layer's alpha as LoraBranch takes it (its scale alpha / rank): the alpha_pattern entry
        whose key matches the module name's end (PEFT's rule), else lora_alpha; rsLoRA's alpha / sqrt(r)
        as the alpha that gives it."""
        try:
            key = next((k for k in self.pattern if re.match(rf"(.*\.)?({k})$", name)), None)
        except re.error as exc:
            raise BitfluxError(f"LoRA alpha_pattern: a key is no regular expression ({exc})") from None
        alpha = self.pattern[key] if key is not None else self.alpha
        return alpha * math.sqrt(rank) if alpha is not None and self.rslora else alpha


def _peft_scaling(path: Path) -> dict[str, PeftScaling]:
    """Each component's PEFT config, as diffusers keeps it in the file's metadata ("lora_adapter_metadata": keys
    prefixed "transformer." and "text_encoder." by the pipeline's save_lora_weights, unprefixed by the model's
    save_lora_adapter: the transformer's) or PEFT in adapter_config.json beside the file; none without either."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw is None and (path.parent / "adapter_config.json").is_file():
            raw = (path.parent / "adapter_config.json").read_text()
        if raw is None:
            return {}
        config = json.loads(raw)
        configs = {component: {key.removeprefix(f"{component}."): value for key, value in config.items()
                                if key.startswith(f"{component}.")} for component in COMPONENTS}
        if not any(configs.values()):
            configs = {"transformer": config}
        scalings = {}
        for component, config in configs.items():
            alpha, pattern = config.get("lora_alpha"), config.get("alpha_pattern") or {}
            scalings[component] = PeftScaling(None if alpha is None else float(alpha),
                                              {str(k): float(v) for k, v in pattern.items()},
                                              bool(config.get("use_rslora", False)))
        return scalings
    except (ValueError, TypeError, AttributeError, OSError) as exc:
        raise BitfluxError(f"{path}: unreadable LoRA alpha in its PEFT config ({exc})") from None


def lora_file(source: str | Path) -> Path:
    """The LoRA file `source` names: a .safetensors file; a folder holding one (or PEFT's adapter_model.safetensors
    among others); or the Hugging Face hub id of such a folder, already in the local cache (bitflux never
    downloads at run time), with the file's name after it where it holds several (ORG/NAME/FILE.safetensors)."""
    from ..convert import from_hub_cache, looks_like_hub_id

    if not str(source).strip():  # Path("") is the current folder
        raise BitfluxError("the LoRA's name is empty")
    path = Path(source)
    if not path.exists():
        org, _, rest = str(source).partition("/")
        name, _, inside = rest.partition("/")
        repo = f"{org}/{name}"
        if not looks_like_hub_id(repo) or (not inside and path.suffix == ".safetensors"):
            raise BitfluxError(f"{source}: no such LoRA file")
        path = from_hub_cache(repo) / inside
        if not path.exists():
            raise BitfluxError(f"{source}: no {inside} in the cached {repo}")
    if not path.is_dir():
        return path
    files = sorted(path.glob("*.safetensors"))
    if path / "adapter_model.safetensors" in files:
        return path / "adapter_model.safetensors"
    if len(files) == 1:
        return files[0]
    if not files:
        raise BitfluxError(f"{source}: no .safetensors LoRA file in it")
    raise BitfluxError(f"{source} holds {len(files)} .safetensors files: name one "
                       f"({', '.join(f'{source}/{f.name}' for f in files)})")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA's tensors, read once for every model it adapts, and what its PEFT config says of alpha."""

    state: dict
    scalings: dict[str, PeftScaling]  # by component
    name: str = ""  # the file's, for messages


def open_lora(source) -> LoraFile:
    """A LoRA (lora_file's source, or a state dict) read."""
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, (str, Path)):
        from safetensors.torch import load_file

        path = lora_file(source)
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors' own error types
            if path.suffix != ".safetensors":
                raise BitfluxError(f"{path}: not a .safetensors file (bitflux reads LoRAs as safetensors)") from None
            raise BitfluxError(f"{path}: cannot read LoRA safetensors ({exc})") from None
        scalings, name = _peft_scaling(path), str(source)
    else:
        state, scalings, name = dict(source), {}, ""
    return LoraFile(state, scalings, name)


def refuse_t5_only(lora: LoraFile) -> None:
    """Refuse a LoRA whose pairs are all T5's, which nothing applies, before any model is loaded for it."""
    stems = {_split_key(key)[0] for key in lora.state}
    if stems and all(_TEXT_ENCODER.match(stem) and not _CLIP.match(stem) for stem in stems):
        raise NoPairsError(0, len(stems), lora.name)


def read_lora(source, model: nn.Module, component: str = "transformer") -> tuple[dict[str, tuple], int]:
    """A LoRA (lora_file's source, a state dict, or open_lora's) -> ({layer of `model`: (down, up, alpha)},
    number of text-encoder pairs left out). component: what `model` is, "transformer" (its pairs by diffusers'
    names; all the text encoders' left out) or "text_encoder" (CLIP's; T5's left out, none is no error)."""
    if component not in COMPONENTS:
        raise BitfluxError(f"a LoRA adapts the transformer or the text_encoder, not {component!r}")
    lora = open_lora(source)
    if not isinstance(model, nn.Module):
        raise BitfluxError(f"a LoRA attaches to a model (a pipeline's is pipe.transformer), not a "
                           f"{type(model).__name__}")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.state.items():
        if not torch.is_tensor(tensor):
            raise BitfluxError(f"LoRA tensor {key!r} is a {type(tensor).__name__}, not a torch tensor")
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise BitfluxError(f"LoRA tensor {key!r}: {tensor.dtype}, not real numbers")
        check_finite(tensor, f"LoRA tensor {key!r}")
        stem, role = _split_key(key)
        grouped.setdefault(stem, {})[role] = tensor
    text = component == "text_encoder"
    diffusers, original = set(_linear_names(model)), {} if text else _original_names(model)
    pairs, skipped, clip_skipped, unmatched, source_of = {}, 0, 0, [], {}
    for stem, roles in grouped.items():
        if "down" not in roles or "up" not in roles:
            raise BitfluxError(f"LoRA {stem!r} lacks its {'down (A)' if 'down' not in roles else 'up (B)'} matrix")
        try:
            resolved = _resolve_text_encoder(stem, diffusers) if text else _resolve(stem, diffusers, original)
        except _Unmatched as exc:
            unmatched.append(str(exc))
            continue
        if resolved is None:  # another component's
            continue
        if resolved == "skip":
            skipped += 1
            clip_skipped += bool(_CLIP.match(stem))
            continue
        layout, name = resolved
        if "alpha" in roles:
            if roles["alpha"].numel() != 1:
                raise BitfluxError(f"LoRA {stem!r}: alpha holds {roles['alpha'].numel()} values, not one")
            alpha = float(roles["alpha"])
        else:
            scaling = lora.scalings.get(component, PeftScaling())
            alpha = scaling.alpha_for(name, roles["down"].shape[0]) if layout == "diffusers" else None
        if layout == "diffusers":
            targets = {name: (roles["down"], roles["up"])}
        elif layout == "qkv":
            if roles["up"].shape[0] % 3:
                raise BitfluxError(f"LoRA {stem!r}: {roles['up'].shape[0]} rows, not q, k and v's alike")
            targets = {f"{name}.to_{part}": (roles["down"], rows)
                       for part, rows in zip("qkv", roles["up"].chunk(3))}
        else:
            targets = _to_diffusers(name, roles["down"], roles["up"], model)
        for target, (down, up) in targets.items():
            layer = model.get_submodule(target)
            _check_pair(down, up, f"LoRA {stem!r}")
            if (up.shape[0], down.shape[1]) != (layer.out_features, layer.in_features):
                raise BitfluxError(f"LoRA for {target} is {up.shape[0]}x{down.shape[1]}, "
                                   f"the layer is {layer.out_features}x{layer.in_features}")
            if target in pairs:  # e.g. kohya's fused q/k/v and diffusers' to_q in one file
                raise BitfluxError(f"LoRA {stem!r} and {source_of[target]!r} both adapt {target}")
            pairs[target], source_of[target] = (down, up, alpha), stem
    if unmatched:
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise BitfluxError(f"LoRA key {unmatched[0]!r}{more} names no linear layer of this model")
    if not pairs and not text:
        raise NoPairsError(clip_skipped, skipped - clip_skipped)
    return pairs, skipped


class NoPairsError(BitfluxError):
    """A LoRA without a pair for the transformer: none, or text-encoder pairs only, CLIP's (which the text encoder
    takes: load_lora(..., component="text_encoder")) or T5's (which nothing applies)."""

    def __init__(self, clip_pairs: int, t5_pairs: int, name: str = ""):
        super().__init__(f"{name + ': ' if name else ''}the LoRA has no pair for this transformer" + (
            f": its {clip_pairs + t5_pairs} pairs are the text encoders' ({clip_pairs} CLIP's, {t5_pairs} T5's)"
            if clip_pairs and t5_pairs else f": its {clip_pairs} pairs are CLIP's" if clip_pairs else
            f": its {t5_pairs} pairs are {T5_LEFT_OUT}" if t5_pairs else ""))
        self.clip_pairs, self.t5_pairs = clip_pairs, t5_pairs


T5_LEFT_OUT = "T5's, which diffusers does not apply to FLUX either"
# The dtype of a text encoder's branches: CLIP is small, and a narrowed encoder (text_encoders) computes in a wider
# dtype than its parameters', so its dtype is no guide
CLIP_BRANCHES = torch.float32


def warn_left_out(count: int, reason: str, source=None) -> None:
    """Warn (where count > 0) that a LoRA's text-encoder pairs were not applied, and why."""
    if count:
        name = source.name if isinstance(source, LoraFile) else str(source) if isinstance(source, (str, Path)) else ""
        where = f"{name}: " if name else ""
        warnings.warn(f"bitflux: {where}{count} text-encoder LoRA pairs left out ({reason})", stacklevel=3)


def load_lora(model: nn.Module, source, strength: float = 1.0, dtype: torch.dtype | None = None,
              component: str = "transformer") -> LoraAdapter:
    """Attach a LoRA (a .safetensors file, a folder holding one, a hub id in the local cache: lora_file; a state
    dict, or open_lora's) to `model` as side branches; returns its adapter. Several may be attached at once: their
    branches add up. A torch.compile wrapper's model takes it (before the first compiled call: a graph compiled
    since does not see it). component "text_encoder": `model` is a FLUX pipeline's CLIP text encoder
    (pipe.text_encoder), which takes the LoRA's CLIP pairs (maybe none). dtype: the branches' (default: bf16 on
    a transformer, CLIP_BRANCHES on a text encoder)."""
    dtype = dtype or (CLIP_BRANCHES if component == "text_encoder" else torch.bfloat16)
    model = model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model
    pairs, skipped = read_lora(source, model, component)
    branches = {}
    for name, (down, up, alpha) in pairs.items():
        layer = model.get_submodule(name)
        device = next(iter([*layer.parameters(), *layer.buffers()])).device
        branches[name] = LoraBranch(down, up, alpha, dtype).to(device)
    return LoraAdapter(model, branches, strength, skipped)
