"""diffusers' own from_pretrained / save_pretrained on bitflux folders, and ternarizing while loading
(bitflux.interop.diffusers_quantizer): the same tensors, bit for bit, as bitflux's own loader and quantizer."""

import subprocess
import sys

import pytest
import torch
from conftest import build_tiny, tiny_inputs
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from bitflux import (
    BitfluxError,
    BitfluxQuantizationConfig,
    TernaryConfig,
    TernaryLinear,
    load_transformer,
    quantize_checkpoint,
)
from bitflux.kernels import use_backend

CONFIGS = [TernaryConfig(), TernaryConfig(granularity="channel", format="tq1", scale_dtype="float16"),
           TernaryConfig(granularity="group", group_size=16, activations="a8")]


def _same(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def bf16_folder(tmp_path):
    build_tiny().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    return tmp_path / "bf16"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_from_pretrained_loads_a_bitflux_folder_as_load_transformer_does(tmp_path, bf16_folder, config, dtype):
    """Scales keep the stored dtype (diffusers would cast them to torch_dtype), codes their packing; the
    model saves back to a folder bitflux loads, unchanged."""
    quantize_checkpoint(bf16_folder, tmp_path / "q", config, progress=False)
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=dtype)
    assert _same(model, load_transformer(tmp_path / "q", dtype=dtype or torch.float32))
    assert {m.packing for m in model.modules() if isinstance(m, TernaryLinear)} == {config.format}
    model.save_pretrained(tmp_path / "saved")
    assert _same(load_transformer(tmp_path / "saved", dtype=dtype or torch.float32), model)


@pytest.mark.parametrize("config", CONFIGS)
def test_a_full_precision_folder_is_ternarized_while_loading(tmp_path, bf16_folder, config, capfd):
    """quantization_config=BitfluxQuantizationConfig(...): the codes and scales `bitflux quantize` writes, and
    diffusers reports no weight missing or unused."""
    model = FluxTransformer2DModel.from_pretrained(bf16_folder, quantization_config=BitfluxQuantizationConfig(config),
                                                   torch_dtype=torch.bfloat16)
    quantize_checkpoint(bf16_folder, tmp_path / "q", config, progress=False)
    assert _same(model, load_transformer(tmp_path / "q", dtype=torch.bfloat16))
    err = capfd.readouterr().err
    assert "not used" not in err and "newly initialized" not in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_gives_dense_layers_computing_the_same(tmp_path, bf16_folder, dtype):
    """Dense layers in the model's dtype (not the scales' float32), and a config without quantization_config:
    saved, the model loads back dense."""
    quantize_checkpoint(bf16_folder, tmp_path / "q", TernaryConfig(), progress=False)
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=dtype)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in tiny_inputs().items()}
    with use_backend("reference"), torch.no_grad():
        ternary = model(**inputs)[0]
        model.dequantize()
        assert not any(isinstance(m, TernaryLinear) for m in model.modules())
        assert {p.dtype for p in model.parameters()} == {dtype}
        dense = model(**inputs)[0]
        assert torch.allclose(dense.float(), ternary.float(), atol=1e-5 if dtype == torch.float32 else 0.1)
        model.save_pretrained(tmp_path / "dense")
        reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "dense", torch_dtype=dtype)
        assert not any(isinstance(m, TernaryLinear) for m in reloaded.modules())
        assert _same(reloaded, model)


def test_damaged_tensors_are_refused_in_one_line(tmp_path, bf16_folder):
    quantize_checkpoint(bf16_folder, tmp_path / "q", TernaryConfig(), progress=False)
    (file,) = (tmp_path / "q").glob("*.safetensors")
    tensors = load_file(file)
    name = next(k for k in tensors if k.endswith("weight_packed"))
    tensors[name] = torch.full_like(tensors[name], 0xFF)  # code 3 in every slot: no tq2 code
    save_file(tensors, file)
    with pytest.raises(BitfluxError, match=f"tensor '{name}' holds .* bytes that are no tq2 codes"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("damage", ["int8 codes", "int64 bias", "NaN", "dense weight", "stray"])
def test_tensors_are_checked_as_stored_whatever_the_dtype_asked(tmp_path, bf16_folder, damage):
    """diffusers casts every tensor to the model's dtype (torch_dtype, else the empty model's) before the
    quantizer sees it: the checks load_transformer makes are made on the stored tensors first."""
    quantize_checkpoint(bf16_folder, tmp_path / "q", TernaryConfig(), progress=False)
    (file,) = (tmp_path / "q").glob("*.safetensors")
    tensors = load_file(file)
    layer = "transformer_blocks.0.ff.net.2"
    if damage == "int8 codes":
        tensors[f"{layer}.weight_packed"] = tensors[f"{layer}.weight_packed"].to(torch.int8)
        expected = f"'{layer}.weight_packed' is int8, expected uint8"
    elif damage == "int64 bias":
        tensors[f"{layer}.bias"] = tensors[f"{layer}.bias"].to(torch.int64)
        expected = f"'{layer}.bias' is int64, expected float32, float16 or bfloat16"
    elif damage == "NaN":
        tensors["x_embedder.weight"][0, 0] = float("nan")
        expected = "'x_embedder.weight' holds NaN"
    elif damage == "dense weight":
        del tensors[f"{layer}.weight_packed"], tensors[f"{layer}.weight_scale"]
        tensors[f"{layer}.weight"] = torch.zeros(64, 256)
        expected = f"unexpected tensor '{layer}.weight' for a ternary layer"
    else:  # of the scale's shape: it used to become the layer's scale
        tensors[f"{layer}.input_scale"] = torch.full_like(tensors[f"{layer}.weight_scale"], 1000.0)
        expected = f"unexpected tensor '{layer}.input_scale' for a ternary layer"
    save_file(tensors, file)
    with pytest.raises(BitfluxError, match=expected):
        FluxTransformer2DModel.from_pretrained(tmp_path / "q")


def test_what_is_not_ternarized_while_loading_is_refused(tmp_path):
    """Pickle checkpoints (safetensors only, as everywhere in bitflux); from_single_file, whose original fused
    tensors the quantizer would see before diffusers splits them."""
    from diffusers.quantizers.auto import DiffusersAutoQuantizer

    build_tiny().save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(BitfluxError, match="ternarizes safetensors checkpoints only"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "bin", quantization_config=BitfluxQuantizationConfig())
    with pytest.raises(BitfluxError, match="from_single_file does not ternarize"):
        DiffusersAutoQuantizer.from_config(BitfluxQuantizationConfig()).maybe_update_state_dict({})


def test_settings_are_checked_as_ternary_configs_are():
    with pytest.raises(BitfluxError, match="unexpected keyword argument 'methd'"):
        BitfluxQuantizationConfig(methd="twn")
    with pytest.raises(BitfluxError, match="unknown format"):
        BitfluxQuantizationConfig(format="tq3")
    assert BitfluxQuantizationConfig(format="tq1").to_dict()["format"] == "tq1"
    for wrong in (("channel",), ({"format": "tq1"},)):
        with pytest.raises(BitfluxError, match="takes a TernaryConfig or TernaryConfig's keywords"):
            BitfluxQuantizationConfig(*wrong)
    with pytest.raises(BitfluxError, match="not TernaryConfig and keywords"):
        BitfluxQuantizationConfig(TernaryConfig(), format="tq1")
    config = BitfluxQuantizationConfig()
    assert config.update(format="tq1", other=1) == {"other": 1} and config.ternary.format == "tq1"


def test_registered_whichever_is_imported_first(tmp_path, bf16_folder):
    """bitflux registers with diffusers at import if diffusers' quantizers are loaded, else when they load."""
    quantize_checkpoint(bf16_folder, tmp_path / "q", TernaryConfig(), progress=False)
    load = (f"m = FluxTransformer2DModel.from_pretrained({str(tmp_path / 'q')!r}); "
            "print(type(m.transformer_blocks[0].ff.net[2]).__name__)")
    for imports in ("import bitflux; from diffusers import FluxTransformer2DModel",
                    "from diffusers import FluxTransformer2DModel; import bitflux"):
        run = subprocess.run([sys.executable, "-c", f"{imports}; {load}"], check=False, capture_output=True, text=True,
                             timeout=300)
        assert run.stdout.strip() == "TernaryLinear", run.stderr[-2000:]
