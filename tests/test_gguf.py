import struct

import numpy as np
import pytest
import torch
from torch import nn

from bitflux import BitfluxError, TernaryConfig, TernaryLinear
from bitflux.interop.gguf import (
    decode_blocks, encode_blocks, export_gguf, from_block_scales, load_gguf, read_gguf, to_block_scales,
)

gguf = pytest.importorskip("gguf")
QTYPES = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}


def random_codes(rows, cols, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (rows, cols), generator=generator, dtype=torch.int8)


def random_block_scales(rows, blocks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, blocks, generator=generator) * 0.1 + 1e-3).half()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (5, 1280), (2, 3072)])
def test_blocks_match_ggml_reference_byte_for_byte(qtype, shape):
    codes = random_codes(*shape)
    codes[:, ::256] = 1  # no all-zero block: ggml's quantizer writes scale 0 there, we keep ours
    scales = random_block_scales(shape[0], shape[1] // 256)
    weights = codes.float() * scales.float().repeat_interleave(256, 1)
    expected = gguf.quants.quantize(weights.numpy(), QTYPES[qtype])
    ours = encode_blocks(codes, scales, qtype).numpy()
    assert ours.shape == expected.shape and np.array_equal(ours, expected)
    assert np.array_equal(gguf.quants.dequantize(ours, QTYPES[qtype]), weights.numpy())


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("fill", [-1, 0, 1, None])
def test_decode_inverts_encode(qtype, fill):
    codes = random_codes(4, 768, seed=1) if fill is None else torch.full((4, 768), fill, dtype=torch.int8)
    scales = random_block_scales(4, 3, seed=2)
    back_codes, back_scales = decode_blocks(encode_blocks(codes, scales, qtype), qtype)
    assert torch.equal(back_codes, codes) and torch.equal(back_scales, scales)


@pytest.mark.parametrize("granularity,scale_shape", [("tensor", (1, 1)), ("channel", (6, 1)),
                                                     ("group:512", (6, 3)), ("group:256", (6, 5))])
def test_scales_map_to_blocks_and_back_exactly(granularity, scale_shape):
    config = TernaryConfig(**TernaryConfig.parse_granularity(granularity))
    scales = (torch.rand(scale_shape) + 0.01).half().float()
    blocks = to_block_scales(scales, 6, 1280, config.group_size_or_none, "layer")
    assert blocks.shape == (6, 5) and blocks.dtype == torch.float16
    assert torch.equal(from_block_scales(blocks, config.granularity, config.group_size), scales)


def test_scales_that_blocks_cannot_hold_are_refused():
    with pytest.raises(BitfluxError, match="multiple of 256"):
        to_block_scales(torch.ones(4, 1), 4, 384, None, "layer")
    with pytest.raises(BitfluxError, match="group_size 128"):
        to_block_scales(torch.ones(4, 4), 4, 512, 128, "layer")
    with pytest.raises(BitfluxError, match="float16"):
        to_block_scales(torch.full((1, 1), 1e6), 4, 512, None, "layer")


# ---- whole models -----------------------------------------------------------------------------------------

def tiny_flux(width_heads=2, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                  num_attention_heads=width_heads, joint_attention_dim=64,
                                  pooled_projection_dim=32, axes_dims_rope=(16, 56, 56)).eval()


def ternarize_blocks(model, config):
    """Swap the linears of the transformer blocks for TernaryLinear (what surgery.quantize_ does)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "transformer_blocks." in n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, TernaryLinear.from_linear(getattr(parent, child), config))
    return model


def flux_inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=generator),
                encoder_hidden_states=torch.randn(1, 4, cfg.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=generator),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))


def ternary_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}


@pytest.fixture(scope="module")
def models():
    """One tiny ternary model per scale layout, built once (width 256: every in_features is a multiple of 256)."""
    return {granularity: ternarize_blocks(tiny_flux(), TernaryConfig(
        **TernaryConfig.parse_granularity(granularity), scale_dtype=scale_dtype))
        for granularity, scale_dtype in [("tensor", "float16"), ("channel", "float32"), ("group:512", "bfloat16")]}


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:512"])
def test_round_trip_is_bit_exact_for_codes_and_fp16_scales(models, tmp_path, qtype, granularity):
    model = models[granularity]
    summary = export_gguf(model, tmp_path / "m.gguf", qtype)
    assert summary.ternary_tensors == len(ternary_layers(model)) and not (tmp_path / "m.gguf.tmp").exists()
    contents = read_gguf(summary.path)
    assert contents.architecture == "flux"
    for name, layer in ternary_layers(model).items():
        assert torch.equal(contents.state_dict[f"{name}.weight_packed"], layer.weight_packed)
        scale = contents.state_dict[f"{name}.weight_scale"]
        # The file holds fp16 scales: float16 and bfloat16 scales of this size survive exactly.
        assert scale.dtype == layer.weight_scale.dtype
        assert torch.equal(scale, layer.weight_scale.half().to(scale.dtype))
    dense = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_packed", "weight_scale"))}
    for key, tensor in dense.items():
        assert torch.equal(contents.state_dict[key], tensor), key


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_package_reads_our_file_as_our_dequantized_weights(models, tmp_path, qtype):
    model = models["channel"]
    export_gguf(model, tmp_path / "m.gguf", qtype)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.get_field("general.architecture").contents() == "flux"
    tensors = {t.name: t for t in reader.tensors}
    for name, layer in ternary_layers(model).items():
        tensor = tensors[f"{name}.weight"]
        assert tensor.tensor_type == QTYPES[qtype]
        assert tuple(reversed(tensor.shape.tolist())) == (layer.out_features, layer.in_features)
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        ours = layer.codes().float() * layer.weight_scale.half().float()
        assert np.array_equal(theirs, ours.numpy()), name


@pytest.mark.parametrize("granularity", ["tensor", "group:512"])
def test_load_gguf_rebuilds_a_model_with_the_same_output(models, tmp_path, granularity):
    model = models[granularity]  # float16 / bfloat16 scales: the file holds them exactly
    export_gguf(model, tmp_path / "m.gguf", "tq1_0")
    loaded = load_gguf(tmp_path / "m.gguf")
    assert set(ternary_layers(loaded)) == set(ternary_layers(model))
    with torch.no_grad():
        expected = model(**flux_inputs(model)).sample
        assert torch.equal(loaded(**flux_inputs(model)).sample, expected)


def test_a_foreign_file_gets_the_coarsest_exact_granularity(tmp_path):
    """A file written by ggml's own quantizer (scale = max |w| per block) reads back as group:256 scales."""
    weights = torch.randn(4, 512)
    writer = gguf.GGUFWriter(tmp_path / "f.gguf", "flux")
    writer.add_tensor("x.weight", gguf.quants.quantize(weights.numpy(), QTYPES["tq2_0"]),
                      raw_dtype=QTYPES["tq2_0"])
    writer.add_tensor("x.bias", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    contents = read_gguf(tmp_path / "f.gguf")
    assert contents.quantization_config.granularity == "group" and contents.quantization_config.group_size == 256
    layer = TernaryLinear(512, 4, group_size=256, scale_shape=(4, 2))
    layer.load_state_dict({k.removeprefix("x."): v for k, v in contents.state_dict.items()})
    expected = gguf.quants.dequantize(gguf.quants.quantize(weights.numpy(), QTYPES["tq2_0"]), QTYPES["tq2_0"])
    assert np.array_equal(layer.dequantize(torch.float32).numpy(), expected)


def test_export_refuses_rows_that_are_not_whole_blocks(tmp_path):
    model = ternarize_blocks(nn.Sequential(), TernaryConfig())
    model.transformer_blocks = nn.ModuleList([nn.Linear(384, 8)])
    ternarize_blocks(model, TernaryConfig())
    with pytest.raises(BitfluxError, match="384 is not a multiple of 256"):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# ---- malformed files --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "ok.gguf"
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Linear(256, 4)])
    export_gguf(ternarize_blocks(model, TernaryConfig()), path)
    return path


def corrupt(small_file, tmp_path, edit):
    data = bytearray(small_file.read_bytes())
    edit(data)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    return bad


def type_field_offset(path):
    field = gguf.GGUFReader(path).tensors[0].field
    return field.offset + sum(int(part.nbytes) for part in field.parts[:4])


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.__setitem__(slice(0, 4), b"GGML"), "not a readable GGUF file: bad magic"),
    (lambda d: d.__delitem__(slice(len(d) - 100, None)), "truncated"),
    (lambda d: d.__delitem__(slice(40, None)), "truncated"),
    (lambda d: d.clear(), "truncated"),
    (None, "unknown tensor type"),
])
def test_malformed_files_give_a_one_line_error(small_file, tmp_path, edit, message):
    if edit is None:  # an unknown tensor type id
        offset = type_field_offset(small_file)
        edit = lambda d: d.__setitem__(slice(offset, offset + 4), struct.pack("<I", 99))  # noqa: E731
    with pytest.raises(BitfluxError, match=message) as info:
        read_gguf(corrupt(small_file, tmp_path, edit))
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_type_name(tmp_path, small_file):
    with pytest.raises(BitfluxError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(BitfluxError, match="tq3_0"):
        export_gguf(nn.Linear(2, 2), tmp_path / "m.gguf", "tq3_0")
