"""diffusers' pipeline LoRA methods on a ternary pipeline: `pipe.load_lora_weights(...)`, `set_adapters`,
`fuse_lora`, ... as diffusers names them, run by bitflux's LoRA side branches (interop.lora) instead of PEFT.

diffusers' own methods need PEFT, whose LoRA layers wrap dense `weight`s that a TernaryLinear does not hold.
load_pipeline and quantize_pipeline give their ternary pipelines these methods (add_lora_methods, for one made
otherwise): bound to the pipeline object itself, so its class, and what save_pretrained writes, stay diffusers'.
They follow diffusers' (PEFT's) behaviour: adapters are named (default_0, default_1, ... by default); the one
loaded last is the active one until set_adapters names others, with their weights; fuse_lora folds the active
ones into the weights at weight x lora_scale and unfuse_lora takes them out again; unload_lora_weights drops every
adapter but keeps what is fused. Text-encoder pairs are left out (with a warning), and diffusers' per-call
`joint_attention_kwargs={"scale": ...}` scales PEFT layers only: an adapter's weight is its strength here.
"""

from __future__ import annotations

import warnings
import weakref

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
    while it is active and LoRAs are enabled, else 0 (its branch then does not run)."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)  # the pipeline holds its bound methods, which hold this
        self.adapters: dict[str, LoraAdapter] = {}
        self.weights: dict[str, float] = {}
        self.active: list[str] = []
        self.fused: list[str] = []  # in the order fused: unfused the other way round
        self.enabled = True

    # A copy or a pickle of the pipeline holds its own: the copied pipeline (see LoraAdapter).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pipe": self._pipe()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pipe=weak_reference(state["_pipe"]))

    def _transformer(self):
        pipe = self._pipe()
        transformer = None if pipe is None else pipe.transformer
        if transformer is None:
            raise BitfluxError("the pipeline has no transformer to take a LoRA")
        return transformer

    def _apply(self) -> None:
        for name, adapter in self.adapters.items():
            adapter.strength = self.weights[name] if self.enabled and name in self.active else 0.0
        # CUDA graphs captured before froze the strengths and read the weights fuse_lora may have replaced:
        # the next call captures anew
        transformer = getattr(self._pipe(), "transformer", None)
        if isinstance(vars(transformer).get("forward") if transformer is not None else None, GraphedForward):
            transformer.forward.graphs.clear()

    def _names(self, adapter_names) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise BitfluxError(f"no LoRA adapter {unknown[0]!r}; the pipeline has {sorted(self.adapters) or 'none'}")
        return names

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs) -> None:
        """A LoRA (a .safetensors file, a folder holding one, a hub id in the local cache, or a state dict; with
        weight_name and subfolder as diffusers takes them) attached as adapter `adapter_name`, which becomes the
        active one at weight 1. hotswap: it replaces the adapter of that name, keeping its weight and state."""
        source = pretrained_model_name_or_path_or_dict
        weight_name, subfolder = kwargs.pop("weight_name", None), kwargs.pop("subfolder", None)
        if kwargs.get("use_safetensors") is False:
            raise BitfluxError("bitflux reads LoRAs from .safetensors files only")
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise BitfluxError(f"load_lora_weights on a ternary pipeline takes no {unknown[0]!r} (bitflux reads "
                               "local files and the hub cache only)")
        if not isinstance(source, dict):
            inside = [str(part).strip("/") for part in (subfolder, weight_name) if part]
            source = "/".join([str(source).rstrip("/"), *inside]) if inside else source
        elif weight_name or subfolder:
            raise BitfluxError("weight_name and subfolder name a file; a state dict is given")
        if adapter_name is None and not hotswap:
            adapter_name = f"default_{len(self.adapters)}"
        if not isinstance(adapter_name, str):
            raise BitfluxError(f"adapter_name must be a string, not {type(adapter_name).__name__}")
        if hotswap and adapter_name not in self.adapters:
            raise BitfluxError(f"hotswap replaces a loaded adapter; there is no {adapter_name!r}")
        if hotswap and adapter_name in self.fused:
            raise BitfluxError(f"adapter {adapter_name!r} is fused: unfuse_lora() before hotswapping it")
        if not hotswap and adapter_name in self.adapters:
            raise BitfluxError(f"LoRA adapter name {adapter_name!r} is in use already")
        transformer = self._transformer()
        adapter = load_lora(transformer, source, strength=0.0, dtype=transformer.dtype)
        if adapter.skipped_text_encoder_pairs:
            warnings.warn(f"bitflux: {adapter.skipped_text_encoder_pairs} text-encoder LoRA pairs left out "
                          "(bitflux applies the transformer's)", stacklevel=2)
        if hotswap:
            self.adapters[adapter_name].remove()
        else:
            self.weights[adapter_name] = 1.0
            self.active = [adapter_name]  # as PEFT: the adapter loaded last is the active one
        self.adapters[adapter_name] = adapter
        self._apply()

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """These adapters active, at these weights (one for all, one each, None for 1; diffusers' per-component
        dicts give their "transformer" entry); the others inactive."""
        names = self._names(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise BitfluxError(f"{len(weights)} adapter weights for {len(names)} adapters")
        for name, weight in zip(names, weights):
            if isinstance(weight, dict):
                weight = weight.get("transformer", 1.0)
            self.weights[name] = _number(1.0 if weight is None else weight, f"adapter {name!r}'s weight")
        self.active = list(dict.fromkeys(names))
        self._apply()

    def get_active_adapters(self) -> list[str]:
        return list(self.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"transformer": list(self.adapters)} if self.adapters else {}

    def delete_adapters(self, adapter_names) -> None:
        """Detach these adapters (what of them is fused stays in the weights, as unload_lora_weights keeps it);
        where no active one is left, the first remaining becomes active, as PEFT does."""
        for name in self._names(adapter_names):
            self.adapters.pop(name).remove(keep_fused=True)
            del self.weights[name]
            if name in self.fused:
                self.fused.remove(name)
            if name in self.active:
                self.active.remove(name)
                if not self.active and self.adapters:
                    self.active = [next(iter(self.adapters))]
        self._apply()

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Detach every adapter; fused ones stay in the weights (fuse_lora() then unload_lora_weights() keeps
        the LoRA without its branches)."""
        self.delete_adapters(list(self.adapters))

    def fuse_lora(self, components=("transformer",), lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs) -> None:
        """Fold the active adapters (or `adapter_names`) into the transformer's weights at weight x lora_scale:
        re-ternarized (LoraAdapter.fuse), their branches stop running. Text encoders hold no bitflux LoRA."""
        if "transformer" not in components:
            return
        lora_scale = _number(lora_scale, "lora_scale")
        for name in self.active if adapter_names is None else self._names(adapter_names):
            if name not in self.fused:
                self.adapters[name].strength = self.weights[name] * lora_scale
                self.adapters[name].fuse()
                self.fused.append(name)
        self._apply()

    def unfuse_lora(self, components=("transformer", "text_encoder"), **kwargs) -> None:
        """Put back the weights fuse_lora replaced (exactly), last fused first; the adapters run as branches
        again."""
        if "transformer" not in components:
            return
        while self.fused:
            self.adapters[self.fused.pop()].unfuse()
        self._apply()

    def enable_lora(self) -> None:
        self.enabled = True
        self._apply()

    def disable_lora(self) -> None:
        """The unfused adapters stop running until enable_lora (fused ones stay in the weights)."""
        self.enabled = False
        self._apply()

    def set_lora_device(self, adapter_names, device) -> None:
        for name in self._names(adapter_names):
            self.adapters[name].to(device)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= FLOAT32_MAX:
        raise BitfluxError(f"{what} {value!r} is not a finite number within float32's range")
    return float(value)


def add_lora_methods(pipe):
    """Give a pipeline with a ternary transformer diffusers' LoRA methods (METHODS), run by bitflux; returns it."""
    loras = PipelineLoras(pipe)
    for name in METHODS:
        setattr(pipe, name, getattr(loras, name))
    return pipe
