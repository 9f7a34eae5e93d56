"""quantize_(model, config): swap the targeted nn.Linear modules for TernaryLinear, in place."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import formats
from .checkpoint import check_finite
from .config import ACTIVATIONS, FORMATS, TernaryConfig
from .errors import BitfluxError
from .fusion import gather_fused
from .graphs import GraphedForward
from .linear import TernaryLinear, scale_shape

_SCALE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BF16_BYTES = 2


@dataclass(frozen=True)
class QuantizedLayer:
    name: str
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class QuantizationReport:
    """What quantize_ did, with byte counts for every storage format (16-bit baseline for the rest)."""

    config: TernaryConfig
    total_params: int
    layers: list[QuantizedLayer] = field(default_factory=list)

    @property
    def quantized_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def coverage(self) -> float:
        return self.quantized_params / max(self.total_params, 1)

    def layer_bytes(self, layer: QuantizedLayer, fmt: str) -> int:
        rows, groups = scale_shape(layer.out_features, layer.in_features, self.config.granularity,
                                   self.config.group_size_or_none)
        return (formats.packed_nbytes(layer.out_features, layer.in_features, fmt)
                + rows * groups * _SCALE_BYTES[self.config.scale_dtype])

    def bytes_bf16(self) -> int:
        return self.total_params * BF16_BYTES

    def bytes_quantized(self, fmt: str) -> int:
        """Packed codes and scales of the quantized layers, every other parameter in 16 bits."""
        rest = (self.total_params - self.quantized_params) * BF16_BYTES
        return rest + sum(self.layer_bytes(layer, fmt) for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "modules_quantized": len(self.layers),
            "params_total": self.total_params,
            "params_quantized": self.quantized_params,
            "coverage": self.coverage,
            "bytes": {"bf16": self.bytes_bf16(), **{fmt: self.bytes_quantized(fmt) for fmt in formats.CODES_PER_BYTE}},
            "ratio_vs_bf16": {fmt: self.bytes_bf16() / self.bytes_quantized(fmt) for fmt in formats.CODES_PER_BYTE},
        }


def is_target(name: str, module: nn.Module, config: TernaryConfig) -> bool:
    return isinstance(module, nn.Linear) and selected(name, config)


def selected(name: str, config: TernaryConfig) -> bool:
    return any(re.search(p, name) for p in config.include) and not any(re.search(p, name) for p in config.exclude)


def config_describing(model: nn.Module, config: TernaryConfig) -> TernaryConfig:
    """config, its include/exclude widened to select exactly the model's ternary layers: those it leaves out
    named in include, its dense targets in exclude, one by one (another tool's GGUF: its own choice of layers)."""
    def named(names):
        return tuple(f"^{re.escape(name)}$" for name in names)

    modules = list(model.named_modules())
    extra = [name for name, module in modules if isinstance(module, TernaryLinear) and not selected(name, config)]
    dense = [name for name, module in modules if is_target(name, module, config)]
    if not (extra or dense):
        return config
    return dataclasses.replace(config, include=(*config.include, *named(extra)),
                               exclude=(*config.exclude, *named(dense)))


def is_slot(name: str, module: nn.Module, config: TernaryConfig) -> bool:
    """A layer the config makes ternary, before quantize_ (nn.Linear) or after it (TernaryLinear)."""
    return isinstance(module, (nn.Linear, TernaryLinear)) and selected(name, config)


def target_names(model: nn.Module, config: TernaryConfig) -> list[str]:
    return [name for name, module in model.named_modules() if is_target(name, module, config)]


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """root's submodule `name` (dotted) replaced by `module`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)


@torch.no_grad()
def quantize_(model: nn.Module, config: TernaryConfig | None = None) -> QuantizationReport:
    """Replace every targeted nn.Linear by a TernaryLinear (meta modules stay on meta, without weights). A
    diffusers model records the config as its config's quantization_config, so that its save_pretrained folder
    loads back with load_transformer."""
    _check_model(model, "quantize_")
    config = config or TernaryConfig()
    if not isinstance(config, TernaryConfig):
        raise BitfluxError(f"config must be a TernaryConfig, got {type(config).__name__} "
                           "(TernaryConfig(**settings) makes one)")
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("lora_A", "lora_B", "base_layer"):
            raise BitfluxError(f"{name}: the model holds PEFT LoRA layers; fuse_lora() and unload_lora_weights() "
                               "them first, or quantize first and load LoRAs with bitflux.interop.lora "
                               "(docs/LORA.md)")
        if leaf in ("to_qkv", "to_added_qkv") and isinstance(module, nn.Linear):
            raise BitfluxError(f"{name}: diffusers' fused q/k/v projection; unfuse_qkv_projections() first "
                               "(bitflux fuses the ternary ones itself: fuse_projections)")
    report = QuantizationReport(config, total_params=count_params(model))
    names = target_names(model, config)
    for name in names:  # all before any is replaced: a refused model is left as it was
        weight = model.get_submodule(name).weight
        if weight.device.type != "meta":
            check_finite(weight, f"{name}.weight")  # its scale would be NaN: black images, far from the cause
    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, TernaryLinear.from_linear(linear, config))
        report.layers.append(QuantizedLayer(name, linear.out_features, linear.in_features))
    if report.layers:
        record_config(model, config.to_dict())
    return report


def _check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        hint = (": a pipeline's is pipe.transformer (bitflux.quantize_pipeline(pipe) ternarizes a copy of it)"
                if hasattr(model, "transformer") else "")
        raise BitfluxError(f"{what} takes a model (an nn.Module), not a {type(model).__name__}{hint}")


def record_config(model: nn.Module, settings: dict) -> None:
    """The ternary settings in the model's config: diffusers' save_pretrained writes model.config as the folder's
    config.json, whose quantization_config makes the folder a bitflux model to every loader."""
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=settings)


def _recorded_config(model: nn.Module) -> dict | None:
    return getattr(model, "config", {}).get("quantization_config")


def ternary_config_of(model: nn.Module) -> TernaryConfig:
    """The model's TernaryConfig as quantize_ recorded it, else the storage facts read off its first layer."""
    recorded = _recorded_config(model)
    if recorded:
        return TernaryConfig.from_dict(dict(recorded))
    layer = next((m for m in model.modules() if isinstance(m, TernaryLinear)), None)
    if layer is None:
        raise BitfluxError("the model has no TernaryLinear layer: quantize it first")
    return TernaryConfig(granularity=layer.granularity, group_size=layer.group_size or 128,
                         scale_dtype=str(layer.weight_scale.dtype).removeprefix("torch."),
                         activations=layer.activations, format=layer.packing)


def check_config(model: nn.Module, config: TernaryConfig) -> None:
    """The config describes the model's ternary layers as load_transformer will rebuild them: the same layers
    (include/exclude) with the same scale granularity. Its format and scale dtype are storage, converted on
    saving; its method and activations change nothing stored."""
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear) != is_slot(name, module, config):
            state = "is" if isinstance(module, TernaryLinear) else "is not"
            raise BitfluxError(f"{name} {state} ternary, which the config's include/exclude do not say")
        if isinstance(module, TernaryLinear) and (module.granularity != config.granularity
                                                  or module.group_size != config.group_size_or_none):
            found = f"group:{module.group_size}" if module.group_size else module.granularity
            wanted = f"group:{config.group_size}" if config.granularity == "group" else config.granularity
            raise BitfluxError(f"{name} has {found} scales, the config says {wanted}")


def set_activations(model: nn.Module, activations: str) -> int:
    """Run every TernaryLinear of a loaded model with `activations` (a16 | a8 | fp8), whatever its checkpoint
    was quantized with (the codes and scales do not depend on it): the number of layers changed."""
    _check_model(model, "set_activations")
    if activations not in ACTIVATIONS:
        raise BitfluxError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    if activations == "fp8" and any(layer.granularity == "group" for layer in layers):
        raise BitfluxError("fp8 activations need per-tensor or per-channel scales; this model has per-group scales")
    for layer in layers:
        layer.activations = activations
    _update_recorded(model, activations=activations)
    return len(layers)


def _update_recorded(model: nn.Module, **changes) -> None:
    recorded = _recorded_config(model)
    if recorded:
        record_config(model, {**recorded, **changes})


def set_packing(model: nn.Module, packing: str) -> int:
    """Repack every TernaryLinear of a loaded model into `packing` (tq2 | tq1), in memory and on its device:
    exact (integers only; one layer's codes unpacked at a time), so a tq2 checkpoint can run with tq1's 20 %
    fewer weight bytes without quantizing again. The number of layers repacked. Not under CUDA graphs
    (they replay the old bytes' addresses) nor with a LoRA fused (unfuse() puts back the old bytes)."""
    _check_model(model, "set_packing")
    if packing not in FORMATS:
        raise BitfluxError(f"unknown packing {packing!r}; choose one of {', '.join(FORMATS)}")
    if any(isinstance(m.forward, GraphedForward) for m in model.modules()):
        raise BitfluxError("repack before cuda_graphed(): the captured graphs read the old bytes")
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear) and m.packing != packing]
    if any(layer.__dict__.get("_bitflux_fused") for layer in layers):
        raise BitfluxError("a LoRA is fused into this model: unfuse() it before repacking")
    for layer in layers:
        layer.weight_packed = formats.convert(layer.weight_packed, layer.in_features, layer.packing, packing)
        layer.packing = packing
    gather_fused(model)  # fused q/k/v: their new codes as one tensor's rows again
    _update_recorded(model, format=packing)
    return len(layers)


def count_params(model: nn.Module) -> int:
    """Parameters a full-precision model has: TernaryLinear layers count their dense weight and bias."""
    total = 0
    for module in model.modules():
        if isinstance(module, TernaryLinear):
            total += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total
