"""diffusers' own loading of bitflux folders: once bitflux is imported, `FluxPipeline.from_pretrained(folder)`
and `FluxTransformer2DModel.from_pretrained(folder)` give the ternary model, and its `save_pretrained` writes a
bitflux folder again. `FluxTransformer2DModel.from_pretrained(full_precision, quantization_config=
BitfluxQuantizationConfig(...))` ternarizes while loading, as bitsandbytes or torchao configs do.

diffusers picks a quantizer by the `quant_method` of a model's config.json ("bitflux" for ours); `register()`
puts bitflux's in its table. Loading builds the model on meta, replaces its linears by TernaryLinear
(surgery.quantize_ with the config), and fills each layer's packed codes, scales and bias as diffusers reads
them: a bitflux folder's codes stay in the stored packing and every tensor is checked as `load_transformer`
checks it; a full-precision weight is ternarized as it is read (plain rounding, one layer in memory at a time,
the codes `bitflux quantize` writes). bitflux.load_pipeline does more for running (q/k/v fused, T5 streamed on
a CPU); this is the plain diffusers way in.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.quantizers import auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from ..checkpoint import check_dtype, check_finite, tensor_shapes, widened_fp8
from ..config import TernaryConfig
from ..convert import ternarized
from ..errors import BitfluxError
from ..linear import TernaryLinear
from ..surgery import quantize_, replace_module, selected

_WHERE = "the checkpoint"  # diffusers does not tell its quantizer which folder it reads


class QuantMethod(str, enum.Enum):
    """diffusers reads `quant_method.value` of every quantization config."""

    BITFLUX = "bitflux"


class BitfluxQuantizationConfig(QuantizationConfigMixin):
    """A TernaryConfig as diffusers holds a model's quantization config: `BitfluxQuantizationConfig(
    TernaryConfig(...))` or with TernaryConfig's keywords; a bitflux folder's stored one (diffusers reads it)."""

    def __init__(self, ternary: TernaryConfig | None = None, **settings):
        self.quant_method = QuantMethod.BITFLUX
        if "quant_method" in settings:  # a config.json's, which may hold keys of other bitflux versions
            self.ternary = TernaryConfig.from_dict(settings)
        elif ternary is not None:
            if not isinstance(ternary, TernaryConfig) or settings:
                raise BitfluxError("BitfluxQuantizationConfig takes a TernaryConfig or TernaryConfig's keywords, "
                                   f"not {type(ternary).__name__}{' and keywords' if settings else ''}")
            self.ternary = ternary
        else:
            self.ternary = _ternary_config(**settings)

    def update(self, **kwargs) -> dict:
        """diffusers' way to change a config: TernaryConfig's keywords; returns the others, unused."""
        known = {k: v for k, v in kwargs.items() if k in self.ternary.__dataclass_fields__}
        self.ternary = _ternary_config(**{**dataclasses.asdict(self.ternary), **known})
        return {k: v for k, v in kwargs.items() if k not in known}

    def to_dict(self) -> dict:
        return self.ternary.to_dict()

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


def _ternary_config(**settings) -> TernaryConfig:
    try:
        return TernaryConfig(**settings)
    except TypeError as exc:
        raise BitfluxError(f"BitfluxQuantizationConfig: {exc}") from None


class BitfluxQuantizer(DiffusersQuantizer):
    def __init__(self, quantization_config: BitfluxQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.config = quantization_config.ternary
        self.model = None  # set while loading: the scales are put in place before diffusers sees them
        self.from_pretrained = False  # set by maybe_update_loaded_keys, which only from_pretrained calls

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # a layer's codes and scales may lie in two shards: placed in turn, on one device

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files) -> list[str]:
        """A full-precision checkpoint's keys as the ternary model will hold them, so that diffusers reports
        none missing or unused: a selected layer's 2-D `weight` becomes its codes and scales (the model is not
        built yet; in a FLUX transformer every 2-D weight is a linear's)."""
        self.from_pretrained = True
        if self.pre_quantized:
            return loaded_keys
        files = [Path(file) for file in checkpoint_files or []]
        if any(file.suffix != ".safetensors" for file in files):
            raise BitfluxError(f"{files[0]}: bitflux ternarizes safetensors checkpoints only (pickle files can run "
                               "code when read)")
        shapes = tensor_shapes(files)
        keys = []
        for key in loaded_keys:
            layer, _, leaf = key.rpartition(".")
            dense = leaf == "weight" and len(shapes.get(key, ())) == 2 and selected(layer, self.config)
            keys += [f"{layer}.weight_packed", f"{layer}.weight_scale"] if dense else [key]
        return keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.from_pretrained:
            _refuse_single_file()
        quantize_(model, self.config)  # TernaryLinear on meta, in the config's packing
        self.model = model

    def maybe_update_state_dict(self, state_dict: dict) -> dict:
        """Each tensor checked as stored (diffusers casts every float tensor to the model's dtype before it asks
        the quantizer), then: a layer's scales taken out, in the dtype the config keeps them in; a full-precision
        weight ternarized as it was stored."""
        if self.model is None:  # diffusers 0.42's from_single_file calls this before it builds the model
            _refuse_single_file()
        stored = ("weight_packed", "weight_scale", "bias") if self.pre_quantized else ("weight", "bias")
        for name in list(state_dict):
            layer, leaf = self._layer(name), name.rpartition(".")[2]
            tensor = state_dict[name]
            if layer is not None and leaf not in stored:  # e.g. a dense weight in a bitflux folder, an fp8 scale
                raise BitfluxError(f"{_WHERE}: unexpected tensor {name!r} for a ternary layer, which holds "
                                   f"{', '.join(stored)}")
            if not self.pre_quantized:
                tensor = state_dict[name] = widened_fp8(tensor)  # fp8 sources: every value is a bf16
            codes = leaf == "weight_packed" and layer is not None
            check_dtype(_WHERE, name, tensor, torch.uint8 if codes else torch.float32, getattr(layer, "packing", ""))
            check_finite(tensor, f"{_WHERE}: tensor {name!r}")
            if layer is None or leaf in ("weight_packed", "bias"):
                continue  # diffusers places it (create_quantized_param for the layers')
            del state_dict[name]
            if leaf == "weight":
                state_dict[f"{name}_packed"], tensor = ternarized(tensor, self.config)
            device = layer.weight_packed.device
            _place(layer, "weight_scale", f"{name.rpartition('.')[0]}.weight_scale", tensor,
                   "cpu" if device.type == "meta" else device)
        return state_dict

    def _layer(self, name: str) -> TernaryLinear | None:
        try:
            module = self.model.get_submodule(name.rpartition(".")[0])
        except AttributeError:
            return None  # not the model's: diffusers reports it as unexpected
        return module if isinstance(module, TernaryLinear) else None

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        return self._layer(param_name) is not None

    def create_quantized_param(self, model, param_value, param_name: str, target_device, *args, **kwargs):
        # diffusers calls this for a misshapen tensor too (after check_quantized_param_shape): _place refuses it
        layer, leaf = self._layer(param_name), param_name.rpartition(".")[2]
        _place(layer, leaf, param_name, param_value, target_device)
        if leaf == "weight_packed" and layer.weight_scale.device.type != "meta":  # scales read before, on the CPU
            layer.weight_scale = layer.weight_scale.to(target_device)

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.model = None  # no cycle through model.hf_quantizer
        for name, tensor in model.state_dict().items():
            if tensor.device.type == "meta":
                raise BitfluxError(f"{_WHERE}: missing tensor {name!r}")
        for module in model.modules():
            if isinstance(module, TernaryLinear):
                continue  # its tensors are copies already (_place)
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                # memory of its own, as load_transformer's: diffusers leaves views of the mapped file, laid out
                # as the file has them, and some CPUs' BLAS sums in another order there (fp32 images off a
                # few levels)
                tensor.data = tensor.data.clone()
        return model

    @property
    def is_serializable(self) -> bool:
        return True  # plain tensors: save_pretrained writes a bitflux folder

    @property
    def is_trainable(self) -> bool:
        return False  # LoRA on ternary layers is bitflux.interop.lora's

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model):
        # the dtype the model computes in: its unquantized parameters' (a layer's scales may be stored wider)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]:
            dense = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                              device=layer.weight_packed.device, dtype=dtype)
            dense.weight.data = layer.dequantize(dtype)
            if layer.bias is not None:
                dense.bias.data = layer.bias.to(dtype)
            replace_module(model, name, dense)
        # save_pretrained then writes a dense model (diffusers keeps a model's config in _internal_dict)
        model._internal_dict = FrozenDict({k: v for k, v in model.config.items() if k != "quantization_config"})
        return model


def _refuse_single_file():
    raise BitfluxError("from_single_file does not ternarize while loading (diffusers hands over an original file's "
                       "fused tensors): `bitflux quantize FILE -o FOLDER` reads original single files, streamed, then "
                       "from_pretrained(FOLDER)")


def _place(layer: TernaryLinear, leaf: str, name: str, tensor: torch.Tensor, device) -> None:
    """One of a layer's tensors (checked as stored by maybe_update_state_dict) set in its shape and dtype."""
    expected = getattr(layer, leaf)
    if tuple(tensor.shape) != tuple(expected.shape):
        raise BitfluxError(f"{_WHERE}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects "
                           f"{tuple(expected.shape)}")
    dtype = expected.dtype if leaf == "weight_scale" else tensor.dtype  # a bias comes in the model's dtype
    layer._buffers[leaf] = tensor.to(device=device, dtype=dtype, copy=True)  # not a view of a mapped file


def register() -> None:
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QuantMethod.BITFLUX.value, BitfluxQuantizer)
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QuantMethod.BITFLUX.value, BitfluxQuantizationConfig)


register()  # importing this module (bitflux's import does, once diffusers' quantizers are loaded) registers it
