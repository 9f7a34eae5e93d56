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

import enum

import torch
from diffusers.quantizers import auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from .. import formats
from ..checkpoint import check_dtype, check_finite, tensor_shapes
from ..config import TernaryConfig
from ..errors import BitfluxError
from ..linear import TernaryLinear
from ..surgery import quantize_, replace_module, selected
from ..ternary import ternarize

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
        else:
            try:
                self.ternary = ternary or TernaryConfig(**settings)
            except TypeError as exc:
                raise BitfluxError(f"BitfluxQuantizationConfig: {exc}") from None

    def to_dict(self) -> dict:
        return self.ternary.to_dict()

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


class BitfluxQuantizer(DiffusersQuantizer):
    def __init__(self, quantization_config: BitfluxQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.config = quantization_config.ternary
        self.model = None  # set while loading: the scales are put in place before diffusers sees them

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files) -> list[str]:
        """A full-precision checkpoint's keys as the ternary model will hold them, so that diffusers reports
        none missing or unused: a selected layer's 2-D `weight` becomes its codes and scales (the model is not
        built yet; in a FLUX transformer every 2-D weight is a linear's)."""
        if self.pre_quantized:
            return loaded_keys
        shapes = tensor_shapes(list(checkpoint_files)) if checkpoint_files else {}
        keys = []
        for key in loaded_keys:
            layer, _, leaf = key.rpartition(".")
            dense = leaf == "weight" and len(shapes.get(key, ())) == 2 and selected(layer, self.config)
            keys += [f"{layer}.weight_packed", f"{layer}.weight_scale"] if dense else [key]
        return keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        quantize_(model, self.config)  # TernaryLinear on meta, in the config's packing
        self.model = model

    def maybe_update_state_dict(self, state_dict: dict) -> dict:
        # diffusers casts every float tensor to the model's dtype before it asks the quantizer: a layer's scales
        # are taken out first, in the dtype the config keeps them in; a full-precision weight is ternarized
        # before, as it was stored
        for name in [key for key in state_dict if key.endswith((".weight_scale", ".weight"))]:
            layer = self._layer(name)
            if layer is None:
                continue
            tensor = state_dict.pop(name)
            if name.endswith(".weight"):
                check_finite(tensor, f"{_WHERE}: tensor {name!r}")
                codes, tensor = ternarize(tensor, self.config.method, self.config.granularity,
                                          self.config.group_size_or_none)
                state_dict[name + "_packed"] = formats.pack(codes, self.config.format)
                tensor = tensor.to(self.config.scale_torch_dtype)
            device = layer.weight_packed.device
            _fill(layer, "weight_scale", f"{name.rpartition('.')[0]}.weight_scale", tensor,
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

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        raise BitfluxError(f"{_WHERE}: tensor {param_name!r} has shape {tuple(loaded_param.shape)}, the config "
                           f"expects {tuple(current_param.shape)}")

    def create_quantized_param(self, model, param_value, param_name: str, target_device, *args, **kwargs):
        layer, leaf = self._layer(param_name), param_name.rpartition(".")[2]
        _fill(layer, leaf, param_name, param_value, target_device)
        if leaf == "weight_packed" and layer.weight_scale.device.type != "meta":  # scales read before, on the CPU
            layer.weight_scale = layer.weight_scale.to(target_device)

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.model = None  # no cycle through model.hf_quantizer
        for name, tensor in model.state_dict().items():
            if tensor.device.type == "meta":
                raise BitfluxError(f"{_WHERE}: missing tensor {name!r}")
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
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]:
            dense = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                              device=layer.weight_packed.device, dtype=layer.weight_scale.dtype)
            dense.weight.data = layer.dequantize(dense.weight.dtype)
            if layer.bias is not None:
                dense.bias.data = layer.bias.clone()
            replace_module(model, name, dense)
        return model


def _fill(layer: TernaryLinear, leaf: str, name: str, tensor: torch.Tensor, device) -> None:
    """One of a layer's tensors set from the checkpoint, checked as load_transformer checks it."""
    expected = getattr(layer, leaf)
    check_dtype(_WHERE, name, tensor, expected.dtype, layer.packing)
    check_finite(tensor, f"{_WHERE}: tensor {name!r}")
    if tuple(tensor.shape) != tuple(expected.shape):
        raise BitfluxError(f"{_WHERE}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects "
                           f"{tuple(expected.shape)}")
    dtype = expected.dtype if leaf == "weight_scale" else tensor.dtype  # a bias comes in the model's dtype
    layer._buffers[leaf] = tensor.to(device=device, dtype=dtype, copy=True)  # not a view of a mapped file


def register() -> None:
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QuantMethod.BITFLUX.value, BitfluxQuantizer)
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QuantMethod.BITFLUX.value, BitfluxQuantizationConfig)


register()  # importing this module (bitflux's import does, once diffusers' quantizers are loaded) registers it
