"""diffusers' pipeline LoRA methods on a ternary pipeline: `pipe.load_lora_weights(...)`, `set_adapters`,
`fuse_lora`, ... as diffusers names them, run by bitflux's LoRA side branches (interop.lora) instead of PEFT.

diffusers' own methods need PEFT, whose LoRA layers wrap dense `weight`s that a TernaryLinear does not hold.
load_pipeline and quantize_pipeline give their ternary pipelines these methods (add_lora_methods, for one made
otherwise): bound to the pipeline object itself, so its class, and what save_pretrained writes, stay diffusers'.
They follow diffusers' (PEFT's) behaviour: adapters are named (default_0, default_1, ... by default); the one
loaded last is the active one until set_adapters names others, with their weights; fuse_lora folds the active
ones into the weights at weight x lora_scale and unfuse_lora takes them out again; unload_lora_weights drops every
adapter but keeps what is fused; a call's `joint_attention_kwargs={"scale": s}` runs the unfused active ones at
weight x s. A LoRA's CLIP pairs adapt the text encoder alike (its own weight in set_adapters' per-component dicts,
fuse_lora(components=["text_encoder"])); T5's are left out with a warning, as diffusers leaves them for FLUX.
"""

from __future__ import annotations

import inspect
import itertools
import numbers
import warnings
import weakref

import torch

from ..config import FLOAT32_MAX
from ..errors import BitfluxError
from ..fusion import weak_reference
from ..graphs import GraphedForward
from .lora import (
    COMPONENTS,
    T5_LEFT_OUT,
    LoraAdapter,
    NoPairsError,
    load_lora,
    open_lora,
    warn_left_out,
)

# load_lora_weights' keywords that change nothing here: bitflux reads local files and the hub cache only, and
# safetensors only (use_safetensors=False is refused below)
_IGNORED = {"local_files_only", "low_cpu_mem_usage", "use_safetensors"}
# (encode_prompt: the pipeline's own, its text encoder's adapters scaled by its lora_scale)
METHODS = ("load_lora_weights", "set_adapters", "get_active_adapters", "get_list_adapters", "delete_adapters",
           "unload_lora_weights", "fuse_lora", "unfuse_lora", "enable_lora", "disable_lora", "set_lora_device",
           "encode_prompt")


class PipelineLoras:
    """The LoRAs of one ternary pipeline by adapter name: each a LoraAdapter on the transformer and, where the LoRA
    has CLIP pairs, one on the text encoder (COMPONENTS), whose strength is its weight while it is active and LoRAs
    are enabled, else 0 (its branches then do not run). They belong to the transformer they were loaded onto: once
    the pipeline holds another (or none), they are forgotten, their text-encoder branches taken off."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)  # the pipeline holds its bound methods, which hold this
        self._model = weak_reference(None)
        self.adapters: dict[str, dict[str, LoraAdapter]] = {}  # name -> component -> adapter
        self.fused: dict[str, list[str]] = {component: [] for component in COMPONENTS}  # in the order fused
        self._forget(None)

    def _forget(self, model) -> None:
        self._take_off_text_parts()  # the text encoder stays the pipeline's
        if (old := self._model()) is not None:
            _LORAS_OF.get(old, set()).discard(self)
        _scaled_by(model, self)
        self._model = weak_reference(model)
        self._text_model = weak_reference(None)
        self.adapters = {}
        self.weights: dict[str, dict[str, float]] = {}  # name -> component -> weight
        self.active: list[str] = []
        self.fused = {component: [] for component in COMPONENTS}
        self.call_scale = dict.fromkeys(COMPONENTS, 1.0)
        self.enabled = True

    # A copy or a pickle of the pipeline holds its own: the copied pipeline and models (see LoraAdapter).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pipe": self._pipe(), "_model": self._model(), "_text_model": self._text_model()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, **{name: weak_reference(state[name]) for name in ("_pipe", "_model", "_text_model")})
        _scaled_by(state["_model"], self)

    def _transformer(self, needed: bool = True):
        """The pipeline's transformer, unwrapped from torch.compile (None where it has none and none is needed)."""
        model = self._component("transformer")
        if model is None or model is not self._model():  # (a released transformer's reference is dead: None)
            self._forget(model)
        if model is None and needed:
            raise BitfluxError("the pipeline has no transformer (released after generating?): its LoRAs went "
                               "with it")
        return model

    def _text_encoder(self):
        """The pipeline's CLIP text encoder (None where it has none): the adapters' parts on another come off it."""
        model = self._component("text_encoder")
        # (one that is gone reads as None too, so its parts are looked for as well)
        if model is not self._text_model() or (model is None and any("text_encoder" in parts
                                                                      for parts in self.adapters.values())):
            self._take_off_text_parts()
            self._text_model = weak_reference(model)
            self._apply()
        return model

    def _component(self, name: str):
        """The pipeline's `name` module, unwrapped from torch.compile; None where it has none."""
        module = getattr(self._pipe(), name, None)
        return getattr(module, "_orig_mod", module)

    def _take_off_text_parts(self) -> None:
        """The adapters' branches off the text encoder they were loaded onto (what is fused stays, as unload
        leaves it; first fused first, so that none unfuses over another), and out of the bookkeeping; adapters
        left with no part are deleted. Where a LoRA attached by hand lies under a fused part, the parts are
        left on that encoder, no longer the pipeline's, with a warning."""
        texts = {name: parts["text_encoder"] for name, parts in self.adapters.items() if "text_encoder" in parts}
        try:
            for adapter in texts.values():
                adapter.check_removable(keep_fused=True, along=list(texts.values()))
        except BitfluxError as exc:
            warnings.warn(f"bitflux: LoRA branches left on the text encoder taken out of the pipeline, at strength "
                          f"0 ({exc})", stacklevel=4)
            for adapter in texts.values():
                adapter.strength = 0.0
        else:
            for name in _in_fused_order(texts, self.fused["text_encoder"]):
                texts[name].remove(keep_fused=True)
        for parts in self.adapters.values():
            parts.pop("text_encoder", None)
        self.fused["text_encoder"] = []
        if empty := [name for name, parts in self.adapters.items() if not parts]:  # CLIP-only ones
            self._drop(empty, fallback=False)

    def encode_prompt(self, *args, **kwargs):
        """The pipeline's own encode_prompt, the text encoder's adapters at weight x lora_scale, as PEFT's layers
        are scaled (FluxPipeline passes its joint_attention_kwargs' scale)."""
        pipe = self._pipe()
        encode = type(pipe).encode_prompt
        try:
            lora_scale = inspect.signature(encode).bind(pipe, *args, **kwargs).arguments.get("lora_scale")
        except TypeError:  # arguments encode_prompt does not take: its own error
            return encode(pipe, *args, **kwargs)
        self._scale("text_encoder", 1.0 if lora_scale is None else _number(lora_scale, "lora_scale"))
        return encode(pipe, *args, **kwargs)

    def _scale(self, component: str, scale: float) -> None:
        if scale != self.call_scale[component]:
            self.call_scale[component] = scale
            self._apply(strengths_only=True)

    def _apply(self, strengths_only: bool = False) -> None:
        changed = False
        for name, parts in self.adapters.items():
            for component, adapter in parts.items():
                on = self.enabled and name in self.active
                strength = self.weights[name][component] * self.call_scale[component] if on else 0.0
                changed |= component == "transformer" and strength != adapter.strength  # (graphs hold its)
                adapter.strength = strength
        pipe = self._pipe()
        if pipe is not None:  # diffusers' fused_loras and num_fused_loras read it
            pipe._merged_adapters = {name for names in self.fused.values() for name in names}
        # CUDA graphs captured before froze the strengths and read the weights fuse_lora may have replaced:
        # the next call captures anew
        transformer = getattr(pipe, "transformer", None)
        if (transformer is not None and isinstance(transformer.forward, GraphedForward)
                and (changed or not strengths_only)):
            transformer.forward.graphs.clear()

    def _names(self, adapter_names) -> list[str]:
        names = list(dict.fromkeys([adapter_names] if isinstance(adapter_names, str) else adapter_names))
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise BitfluxError(f"no LoRA adapter {unknown[0]!r}; the pipeline has {sorted(self.adapters) or 'none'}")
        return names

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs) -> None:
        """A LoRA (a .safetensors file, a folder holding one, a hub id in the local cache, or a state dict; with
        weight_name and subfolder as diffusers takes them) attached as adapter `adapter_name` (default: the first
        free default_N), its CLIP pairs to the text encoder, which becomes the active one at weight 1. hotswap: it
        replaces the adapter of that name by a LoRA on the same layers, keeping its weights and state."""
        source = pretrained_model_name_or_path_or_dict
        weight_name, subfolder = kwargs.pop("weight_name", None), kwargs.pop("subfolder", None)
        if kwargs.get("use_safetensors") is False:
            raise BitfluxError("bitflux reads LoRAs from .safetensors files only")
        if {"torch_dtype", "dtype"} & set(kwargs):
            raise BitfluxError("the LoRA's branches take their model's dtype (bitflux.interop.lora.load_lora "
                               "takes another)")
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise BitfluxError(f"load_lora_weights on a ternary pipeline takes no {unknown[0]!r} (bitflux reads "
                               "local files and the hub cache only)")
        if not isinstance(source, dict):
            inside = [str(part).strip("/") for part in (subfolder, weight_name) if part]
            source = "/".join([str(source).rstrip("/"), *inside]) if inside else source
        elif weight_name or subfolder:
            raise BitfluxError("weight_name and subfolder name a file; a state dict is given")
        transformer, text_encoder = self._transformer(), self._text_encoder()
        if adapter_name is None and not hotswap:
            adapter_name = next(name for i in itertools.count(len(self.adapters))
                                if (name := f"default_{i}") not in self.adapters)
        if not isinstance(adapter_name, str):
            raise BitfluxError(f"adapter_name must be a string, not {type(adapter_name).__name__}")
        if hotswap and adapter_name not in self.adapters:
            raise BitfluxError(f"hotswap replaces a loaded adapter; there is no {adapter_name!r}")
        if hotswap and any(adapter_name in names for names in self.fused.values()):
            raise BitfluxError(f"adapter {adapter_name!r} is fused: unfuse_lora() before hotswapping it")
        if not hotswap and adapter_name in self.adapters:
            raise BitfluxError(f"LoRA adapter name {adapter_name!r} is in use already")
        lora = open_lora(source)  # read once for both models
        try:
            parts = {"transformer": load_lora(transformer, lora, strength=0.0, dtype=transformer.dtype)}
            left_out = parts["transformer"].skipped_text_encoder_pairs
        except NoPairsError as exc:  # CLIP's pairs alone: diffusers takes those too
            if exc.clip_pairs and text_encoder is None:
                raise BitfluxError(f"{exc}, and the pipeline has no text encoder to take them") from None
            if not exc.clip_pairs:
                raise
            parts, left_out = {}, exc.clip_pairs + exc.t5_pairs
        if text_encoder is not None and left_out:
            try:
                text = load_lora(text_encoder, lora, strength=0.0, component="text_encoder")
            except BitfluxError:
                for adapter in parts.values():
                    adapter.remove()
                raise
            if text.names:
                parts["text_encoder"] = text
            left_out = text.skipped_text_encoder_pairs
        if hotswap and {component: set(adapter.names) for component, adapter in parts.items()} != {
                component: set(adapter.names) for component, adapter in self.adapters[adapter_name].items()}:
            for adapter in parts.values():
                adapter.remove()
            raise BitfluxError(f"hotswap replaces adapter {adapter_name!r}'s pairs by a LoRA's on the same layers; "
                               "this one adapts others (load it under a name of its own)")
        if hotswap:
            for adapter in self.adapters[adapter_name].values():
                adapter.remove()
        else:
            self.weights[adapter_name] = dict.fromkeys(COMPONENTS, 1.0)
            self.active = [adapter_name]  # as PEFT: the adapter loaded last is the active one
        self.adapters[adapter_name] = parts
        self._apply()
        warn_left_out(left_out, T5_LEFT_OUT if text_encoder is not None else "the pipeline has no text encoder")

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """These adapters active, at these weights (one for all, one each, None for 1; diffusers' per-component
        dicts give their "transformer" and "text_encoder" entries, 1 where absent); the others inactive."""
        self._transformer()
        names = self._names(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise BitfluxError(f"{len(weights)} adapter weights for {len(names)} adapters")
        by_component = [weight if isinstance(weight, dict) else dict.fromkeys(COMPONENTS, weight)
                        for weight in weights]
        weights = [{component: _number(1.0 if weight.get(component) is None else weight[component],
                                       f"the {component} weight of adapter {name!r}")
                    for component in COMPONENTS} for name, weight in zip(names, by_component)]
        self.weights.update(zip(names, weights))
        self.active = names
        self._apply()

    def get_active_adapters(self) -> list[str]:
        self._transformer(needed=False)
        self._text_encoder()
        return list(self.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        self._transformer(needed=False)
        self._text_encoder()
        listed = {component: [name for name, parts in self.adapters.items() if component in parts]
                  for component in COMPONENTS}
        return {component: names for component, names in listed.items() if names}

    def delete_adapters(self, adapter_names) -> None:
        """Detach these adapters; what of them is fused stays in the weights, as unload_lora_weights keeps it
        (unless another fused before it would unfuse over it: refused). Where no active one is left, the
        first remaining by name becomes active, as PEFT does; where none is left, LoRAs are enabled again."""
        self._transformer()
        self._text_encoder()
        names = self._names(adapter_names)
        doomed = [adapter for name in names for adapter in self.adapters[name].values()]
        for adapter in doomed:  # all or nothing
            adapter.check_removable(keep_fused=True, along=doomed)
        for component, fused in self.fused.items():
            for name in _in_fused_order(names, fused):
                if component in self.adapters[name]:
                    self.adapters[name][component].remove(keep_fused=True)
        self._drop(names)
        self._apply()

    def _drop(self, names: list[str], fallback: bool = True) -> None:
        """These adapters out of the bookkeeping. fallback (a delete): where no active one is left, the first
        remaining by name becomes active, as PEFT does. Where none is left, LoRAs are enabled again."""
        for name in names:
            del self.adapters[name], self.weights[name]
        self.fused = {component: [name for name in fused if name not in names] for component, fused in self.fused.items()}
        was_active = any(name in self.active for name in names)
        self.active = [name for name in self.active if name not in names]
        if fallback and was_active and not self.active and self.adapters:
            self.active = [min(self.adapters)]
        self.enabled = self.enabled or not self.adapters  # PEFT's disabling goes with the last adapter's layers

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Detach every adapter; fused ones stay in the weights (fuse_lora() then unload_lora_weights() keeps
        the LoRA without its branches)."""
        if self._transformer(needed=False) is not None:
            self._text_encoder()  # (which may drop adapters of CLIP pairs alone)
            self.delete_adapters(list(self.adapters))

    def fuse_lora(self, components=("transformer",), lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs) -> None:
        """Fold the active adapters (or `adapter_names`) into these components' weights at weight x lora_scale:
        the transformer's re-ternarized, the text encoder's added (LoraAdapter.fuse); their branches stop
        running."""
        components = [component for component in COMPONENTS if component in components]
        if not components:
            return
        self._transformer()
        self._text_encoder()
        lora_scale = _number(lora_scale, "lora_scale")
        if not self.enabled:
            raise BitfluxError("LoRAs are disabled: enable_lora() before fusing them")
        try:
            for name in self.active if adapter_names is None else self._names(adapter_names):
                for component in components:
                    adapter = self.adapters[name].get(component)
                    if adapter is not None and name not in self.fused[component]:
                        adapter.strength = self.weights[name][component] * lora_scale
                        adapter.fuse()
                        self.fused[component].append(name)
        finally:
            self._apply()

    def unfuse_lora(self, components=("transformer", "text_encoder"), **kwargs) -> None:
        """Put back the weights fuse_lora replaced in these components (exactly), last fused first; the adapters
        run as branches again."""
        if self._transformer(needed=False) is None:
            return
        self._text_encoder()
        try:
            for component in COMPONENTS:
                while component in components and self.fused[component]:
                    self.adapters[self.fused[component][-1]][component].unfuse()
                    self.fused[component].pop()
        finally:
            self._apply()

    def enable_lora(self) -> None:
        self._transformer(needed=False)
        self.enabled = True
        self._apply()

    def disable_lora(self) -> None:
        """Every adapter stops running until enable_lora; fused ones are unfused first, as PEFT's disabled
        layers unmerge theirs."""
        self.unfuse_lora()
        self.enabled = False
        self._apply()

    def set_lora_device(self, adapter_names, device) -> None:
        self._transformer()
        self._text_encoder()
        for name in self._names(adapter_names):
            try:
                for adapter in self.adapters[name].values():
                    adapter.to(device)
            except (RuntimeError, AssertionError, TypeError) as exc:  # torch's, for a device it cannot use
                raise BitfluxError(f"cannot move LoRA adapter {name!r} to {device!r}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _in_fused_order(names, fused: list[str]) -> list[str]:
    """The names, those in `fused` first in the order fused, so that each, taken off keeping its fused weights,
    then lies under those fused after it."""
    return sorted(names, key=lambda name: fused.index(name) if name in fused else len(fused))


# Each transformer's PipelineLoras (a transformer may be in several pipelines), for its one scale hook: a function
# of this module, so that a copy or a pickle of the transformer takes no pipeline along.
_LORAS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scaled_by(model, loras: PipelineLoras) -> None:
    if model is None:
        return
    if _take_call_scale not in model._forward_pre_hooks.values():  # (a copied transformer has it already)
        model.register_forward_pre_hook(_take_call_scale, with_kwargs=True)
    _LORAS_OF.setdefault(model, weakref.WeakSet()).add(loras)


@torch.compiler.disable  # Python bookkeeping of the pipelines, outside any compiled graph
def _take_call_scale(model, args, kwargs):
    """The transformer's forward pre-hook: diffusers' per-call LoRA scale, joint_attention_kwargs={"scale": s}
    (FluxPipeline passes its joint_attention_kwargs to every transformer call), runs the unfused active adapters
    of every pipeline holding the transformer at weight x s, as PEFT's layers do. The scale is taken out of the
    call's keywords, where diffusers would warn that it is ineffective without PEFT; it holds until a call gives
    another (none: 1), so a generation's steps share one, and CUDA graphs are captured anew only when it changes
    the strengths."""
    loras = list(_LORAS_OF.get(model, ()))
    if not loras:
        return None
    attention = kwargs.get("joint_attention_kwargs")
    scale = 1.0
    if isinstance(attention, dict) and "scale" in attention:
        attention = dict(attention)
        scale = _number(attention.pop("scale"), "joint_attention_kwargs' LoRA scale")
        kwargs = {**kwargs, "joint_attention_kwargs": attention}
    for each in loras:
        each._scale("transformer", scale)
    return args, kwargs


def _number(value, what: str) -> float:
    """A real number (NumPy's, 0-d arrays and one-element tensors too) within float32's finite range, as a
    float."""
    if ((isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex())
            or (getattr(value, "ndim", None) == 0 and hasattr(value, "item"))):  # (a 0-d NumPy array)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(value) <= FLOAT32_MAX:
        raise BitfluxError(f"{what} must be a finite number within float32's range, not {value!r}")
    return float(value)


def add_lora_methods(pipe):
    """Give a pipeline with a ternary transformer diffusers' LoRA methods (METHODS), run by bitflux; returns it.
    A pipeline that has them keeps them (and the adapters they hold)."""
    if isinstance(getattr(vars(pipe).get("load_lora_weights"), "__self__", None), PipelineLoras):
        return pipe
    loras = PipelineLoras(pipe)
    for name in METHODS:
        setattr(pipe, name, getattr(loras, name))
    return pipe
