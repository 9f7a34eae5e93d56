"""diffusers' pipeline LoRA methods on a ternary pipeline: `pipe.load_lora_weights(...)`, `set_adapters`,
`fuse_lora`, ... as diffusers names them, run by bitflux's LoRA side branches (interop.lora) instead of PEFT.

diffusers' own methods need PEFT, whose LoRA layers wrap dense `weight`s that a TernaryLinear does not hold.
load_pipeline and quantize_pipeline give their ternary pipelines these methods (add_lora_methods, for one made
otherwise): bound to the pipeline object itself, so its class, and what save_pretrained writes, stay diffusers'.
They follow diffusers' (PEFT's) behaviour: adapters are named (default_0, default_1, ... by default); the one
loaded last is the active one until set_adapters names others, with their weights; fuse_lora folds the active
ones into the weights at weight x lora_scale and unfuse_lora takes them out again; unload_lora_weights drops every
adapter but keeps what is fused; a call's `joint_attention_kwargs={"scale": s}` runs the unfused active ones at
weight x s. Text-encoder pairs are left out (with a warning).
"""

from __future__ import annotations

import itertools
import numbers
import warnings
import weakref

import torch

from ..config import FLOAT32_MAX
from ..errors import BitfluxError
from ..fusion import weak_reference
from ..graphs import GraphedForward
from .lora import LoraAdapter, load_lora

# load_lora_weights' keywords that change nothing here: bitflux reads local files and the hub cache only, and
# safetensors only (use_safetensors=False is refused below)
_IGNORED = {"local_files_only", "low_cpu_mem_usage", "use_safetensors"}
METHODS = ("load_lora_weights", "set_adapters", "get_active_adapters", "get_list_adapters", "delete_adapters",
           "unload_lora_weights", "fuse_lora", "unfuse_lora", "enable_lora", "disable_lora", "set_lora_device")


class PipelineLoras:
    """The LoRAs of one ternary pipeline by adapter name: each a LoraAdapter whose strength is its weight
    while it is active and LoRAs are enabled, else 0 (its branch then does not run). They belong to the
    transformer they were loaded onto: once the pipeline holds another (or none), they are forgotten."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)  # the pipeline holds its bound methods, which hold this
        self._scale_hook = None
        self._forget(None)

    def _forget(self, model) -> None:
        if self._scale_hook is not None:
            self._scale_hook.remove()
        self._scale_hook = (None if model is None else
                            model.register_forward_pre_hook(self._take_call_scale, with_kwargs=True))
        self.call_scale = 1.0
        self._model = weak_reference(model)
        self.adapters: dict[str, LoraAdapter] = {}
        self.weights: dict[str, float] = {}
        self.active: list[str] = []
        self.fused: list[str] = []  # in the order fused: unfused the other way round
        self.enabled = True

    # A copy or a pickle of the pipeline holds its own: the copied pipeline and transformer (see LoraAdapter).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pipe": self._pipe(), "_model": self._model()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pipe=weak_reference(state["_pipe"]), _model=weak_reference(state["_model"]))

    def _transformer(self, needed: bool = True):
        """The pipeline's transformer, unwrapped from torch.compile (None where it has none and none is needed)."""
        transformer = getattr(self._pipe(), "transformer", None)
        model = getattr(transformer, "_orig_mod", transformer)
        if model is None or model is not self._model():  # (a released transformer's reference is dead: None)
            self._forget(model)
        if model is None and needed:
            raise BitfluxError("the pipeline has no transformer (released after generating?): its LoRAs went "
                               "with it")
        return model

    def _take_call_scale(self, model, args, kwargs):
        """The transformer's forward pre-hook: diffusers' per-call LoRA scale, joint_attention_kwargs={"scale": s}
        (FluxPipeline passes its joint_attention_kwargs to every transformer call), runs the unfused active
        adapters at weight x s, as PEFT's layers do. The scale is taken out of the call's keywords, where
        diffusers would warn that it is ineffective without PEFT; it holds until a call gives another (none: 1),
        so a generation's steps share one, and CUDA graphs are captured anew only when it changes."""
        attention = kwargs.get("joint_attention_kwargs")
        scale = 1.0
        if isinstance(attention, dict) and "scale" in attention:
            attention = dict(attention)
            scale = _number(attention.pop("scale"), "joint_attention_kwargs' LoRA scale")
            kwargs = {**kwargs, "joint_attention_kwargs": attention}
        if scale != self.call_scale:
            self.call_scale = scale
            self._apply()
        return args, kwargs

    def _apply(self) -> None:
        for name, adapter in self.adapters.items():
            adapter.strength = (self.weights[name] * self.call_scale if self.enabled and name in self.active
                                else 0.0)
        pipe = self._pipe()
        if pipe is not None:
            pipe._merged_adapters = set(self.fused)  # diffusers' fused_loras and num_fused_loras read it
        # CUDA graphs captured before froze the strengths and read the weights fuse_lora may have replaced:
        # the next call captures anew
        transformer = getattr(pipe, "transformer", None)
        if transformer is not None and isinstance(transformer.forward, GraphedForward):
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
        free default_N), which becomes the active one at weight 1. hotswap: it replaces the adapter of that
        name by a LoRA on the same layers, keeping its weight and state."""
        source = pretrained_model_name_or_path_or_dict
        weight_name, subfolder = kwargs.pop("weight_name", None), kwargs.pop("subfolder", None)
        if kwargs.get("use_safetensors") is False:
            raise BitfluxError("bitflux reads LoRAs from .safetensors files only")
        if {"torch_dtype", "dtype"} & set(kwargs):
            raise BitfluxError("the LoRA's branches take the transformer's dtype (bitflux.interop.lora.load_lora "
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
        transformer = self._transformer()
        if adapter_name is None and not hotswap:
            adapter_name = next(name for i in itertools.count(len(self.adapters))
                                if (name := f"default_{i}") not in self.adapters)
        if not isinstance(adapter_name, str):
            raise BitfluxError(f"adapter_name must be a string, not {type(adapter_name).__name__}")
        if hotswap and adapter_name not in self.adapters:
            raise BitfluxError(f"hotswap replaces a loaded adapter; there is no {adapter_name!r}")
        if hotswap and adapter_name in self.fused:
            raise BitfluxError(f"adapter {adapter_name!r} is fused: unfuse_lora() before hotswapping it")
        if not hotswap and adapter_name in self.adapters:
            raise BitfluxError(f"LoRA adapter name {adapter_name!r} is in use already")
        adapter = load_lora(transformer, source, strength=0.0, dtype=transformer.dtype)
        if hotswap and set(adapter.names) != set(self.adapters[adapter_name].names):
            adapter.remove()
            raise BitfluxError(f"hotswap replaces adapter {adapter_name!r}'s pairs by a LoRA's on the same layers; "
                               "this one adapts others (load it under a name of its own)")
        if hotswap:
            self.adapters[adapter_name].remove()
        else:
            self.weights[adapter_name] = 1.0
            self.active = [adapter_name]  # as PEFT: the adapter loaded last is the active one
        self.adapters[adapter_name] = adapter
        self._apply()
        if adapter.skipped_text_encoder_pairs:
            warnings.warn(f"bitflux: {adapter.skipped_text_encoder_pairs} text-encoder LoRA pairs left out "
                          "(bitflux applies the transformer's)", stacklevel=2)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """These adapters active, at these weights (one for all, one each, None for 1; diffusers' per-component
        dicts give their "transformer" entry); the others inactive."""
        self._transformer()
        names = self._names(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise BitfluxError(f"{len(weights)} adapter weights for {len(names)} adapters")
        weights = [weight.get("transformer", 1.0) if isinstance(weight, dict) else weight for weight in weights]
        weights = [_number(1.0 if weight is None else weight, f"the weight of adapter {name!r}")
                   for name, weight in zip(names, weights)]
        self.weights.update(zip(names, weights))
        self.active = names
        self._apply()

    def get_active_adapters(self) -> list[str]:
        self._transformer(needed=False)
        return list(self.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        self._transformer(needed=False)
        return {"transformer": list(self.adapters)} if self.adapters else {}

    def delete_adapters(self, adapter_names) -> None:
        """Detach these adapters; what of them is fused stays in the weights, as unload_lora_weights keeps it
        (unless another fused before it would unfuse over it: refused). Where no active one is left, the
        first remaining by name becomes active, as PEFT does; where none is left, LoRAs are enabled again."""
        self._transformer()
        names = self._names(adapter_names)
        was_active = any(name in self.active for name in names)
        try:  # fused ones in the order fused: each then lies under those fused after it
            for name in sorted(names, key=lambda name: self.fused.index(name) if name in self.fused else -1):
                self.adapters[name].remove(keep_fused=True)
                del self.adapters[name], self.weights[name]
                self.fused = [other for other in self.fused if other != name]
                self.active = [other for other in self.active if other != name]
        finally:
            if was_active and not self.active and self.adapters:
                self.active = [min(self.adapters)]
            self.enabled = self.enabled or not self.adapters  # PEFT's disabling goes with the last adapter's layers
            self._apply()

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Detach every adapter; fused ones stay in the weights (fuse_lora() then unload_lora_weights() keeps
        the LoRA without its branches)."""
        if self._transformer(needed=False) is not None:
            self.delete_adapters(list(self.adapters))

    def fuse_lora(self, components=("transformer",), lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs) -> None:
        """Fold the active adapters (or `adapter_names`) into the transformer's weights at weight x lora_scale:
        re-ternarized (LoraAdapter.fuse), their branches stop running. Text encoders hold no bitflux LoRA."""
        if "transformer" not in components:
            return
        self._transformer()
        lora_scale = _number(lora_scale, "lora_scale")
        if not self.enabled:
            raise BitfluxError("LoRAs are disabled: enable_lora() before fusing them")
        try:
            for name in self.active if adapter_names is None else self._names(adapter_names):
                if name not in self.fused:
                    self.adapters[name].strength = self.weights[name] * lora_scale
                    self.adapters[name].fuse()
                    self.fused.append(name)
        finally:
            self._apply()

    def unfuse_lora(self, components=("transformer", "text_encoder"), **kwargs) -> None:
        """Put back the weights fuse_lora replaced (exactly), last fused first; the adapters run as branches
        again."""
        if "transformer" not in components or self._transformer(needed=False) is None:
            return
        try:
            while self.fused:
                self.adapters[self.fused[-1]].unfuse()
                self.fused.pop()
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
        for name in self._names(adapter_names):
            try:
                self.adapters[name].to(device)
            except (RuntimeError, AssertionError, TypeError) as exc:  # torch's, for a device it cannot use
                raise BitfluxError(f"cannot move LoRA adapter {name!r} to {device!r}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _number(value, what: str) -> float:
    """A real number (NumPy's and one-element tensors too) within float32's finite range, as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
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
