import copy
import struct

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, build_tiny, tiny_inputs
from torch import nn

import bitflux
from bitflux import BitfluxError, TernaryConfig, TernaryLinear, flux, quantize_
from bitflux.checkpoint import load_transformer, save_transformer
from bitflux.interop.gguf import (
    decode_blocks, encode_blocks, export_gguf, from_block_scales, gguf_to_folder, load_gguf, read_gguf,
    to_block_scales,
)
from bitflux.kernels import use_backend

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
                                                     ("group:512", (6, 3)), ("group:256", (6, 5)),
                                                     ("group:100000", (6, 1))])  # a group longer than a row
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
    with pytest.raises(BitfluxError, match="float16 to its 11 bits"):  # subnormal in fp16: digits lost
        to_block_scales(torch.full((1, 1), 3e-6), 4, 512, None, "layer")


def test_blocks_of_zero_codes_take_scale_zero_where_fp16_cannot_hold_theirs():
    codes = torch.ones(3, 512, dtype=torch.int8)
    codes[1] = 0  # an all-zero row: the quantizer's floor 1e-8 as its scale
    codes[2, 256:] = 0
    scales = torch.tensor([[0.5], [1e-8], [1e-8]])
    with pytest.raises(BitfluxError, match="float16"):  # row 2's first block has codes
        to_block_scales(scales, 3, 512, None, "layer", codes=codes)
    scales[2] = 0.25
    blocks = to_block_scales(scales, 3, 512, None, "layer", codes=codes)
    assert torch.equal(blocks.float(), torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.25, 0.25]]))


# ---- whole models -----------------------------------------------------------------------------------------

# Width 256 (2 heads x 128): every linear's in_features is a multiple of the 256-weight block.
CONFIG = {**TINY_CONFIG, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
          "axes_dims_rope": [16, 56, 56]}


def tiny_ternary(granularity="tensor", scale_dtype="float16"):
    model = build_tiny(config=CONFIG)
    quantize_(model, TernaryConfig(**TernaryConfig.parse_granularity(granularity), scale_dtype=scale_dtype))
    return model


def ternary_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}


def output(model):
    with torch.no_grad(), use_backend("reference"):
        return model(**tiny_inputs(CONFIG))[0]


@pytest.fixture(scope="module")
def models():
    """One tiny ternary model per scale layout, built once."""
    return {granularity: tiny_ternary(granularity, scale_dtype)
            for granularity, scale_dtype in [("tensor", "float16"), ("channel", "float32"), ("group:512", "bfloat16")]}


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:512"])
@pytest.mark.parametrize("names", ["original", "diffusers"])
def test_round_trip_is_bit_exact_for_codes_and_fp16_scales(models, tmp_path, qtype, granularity, names):
    model = models[granularity]
    summary = export_gguf(model, tmp_path / "m.gguf", qtype, names=names)
    assert not (tmp_path / "m.gguf.tmp").exists()
    contents = read_gguf(summary.path)
    assert contents.architecture == "flux" and contents.transformer_config["num_attention_heads"] == 2
    for name, layer in ternary_layers(model).items():
        assert torch.equal(contents.state_dict[f"{name}.weight_packed"], layer.weight_packed)
        scale = contents.state_dict[f"{name}.weight_scale"]
        # The file holds fp16 scales: float16 and bfloat16 scales of this size survive exactly.
        assert scale.dtype == layer.weight_scale.dtype
        assert torch.equal(scale, layer.weight_scale.half().to(scale.dtype))
    dense = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_packed", "weight_scale"))}
    assert set(contents.state_dict) == set(model.state_dict())
    for key, tensor in dense.items():
        assert torch.equal(contents.state_dict[key], tensor), key


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_package_reads_our_file_as_our_dequantized_weights(models, tmp_path, qtype):
    model = models["channel"]
    export_gguf(model, tmp_path / "m.gguf", qtype, names="diffusers")
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


def test_original_names_are_what_comfyui_gguf_reads(models, tmp_path):
    """ComfyUI-GGUF: general.architecture 'flux', single-file FLUX keys, ggml shapes reversed; the fused
    q/k/v rows keep each projection's own scale."""
    model = models["tensor"]
    export_gguf(model, tmp_path / "m.gguf", "tq2_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert "double_blocks.0.img_attn.proj.weight" in tensors and "transformer_blocks.0.attn.to_q.weight" not in tensors
    qkv = tensors["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.tensor_type == QTYPES["tq2_0"] and tuple(reversed(qkv.shape.tolist())) == (768, 256)
    expected = torch.cat([model.get_submodule(f"transformer_blocks.0.attn.{p}").dequantize(torch.float32)
                          for p in ("to_q", "to_k", "to_v")])
    assert np.array_equal(gguf.quants.dequantize(qkv.data, qkv.tensor_type), expected.numpy())
    linear1 = tensors["single_blocks.0.linear1.weight"]
    assert tuple(reversed(linear1.shape.tolist())) == (3 * 256 + 1024, 256)


@pytest.mark.parametrize("granularity", ["tensor", "group:512"])
def test_load_gguf_rebuilds_a_model_with_the_same_output(models, tmp_path, granularity):
    model = models[granularity]  # float16 / bfloat16 scales: the file holds them exactly
    export_gguf(model, tmp_path / "m.gguf", "tq1_0")
    loaded = load_gguf(tmp_path / "m.gguf")
    assert set(ternary_layers(loaded)) == set(ternary_layers(model))
    assert torch.equal(output(loaded), output(model))
    as_fp32 = load_gguf(tmp_path / "m.gguf", dtype=torch.float32)
    dense = {k: v.dtype for k, v in as_fp32.state_dict().items() if v.is_floating_point()}
    assert {d for k, d in dense.items() if not k.endswith(".weight_scale")} == {torch.float32}
    assert {d for k, d in dense.items() if k.endswith(".weight_scale")} == {
        v.dtype for k, v in loaded.state_dict().items() if k.endswith(".weight_scale")}


def test_a_loaded_gguf_saves_a_folder_that_loads_back(models, tmp_path):
    """A model read from a GGUF file carries its quantization_config as any ternary model does: its diffusers
    save_pretrained writes a bitflux folder (before, one without it, which diffusers loaded as dense layers of
    random weights). A name ending in .GGUF names a GGUF file too."""
    model = models["channel"]
    export_gguf(model, tmp_path / "m.GGUF", "tq2_0")
    loaded = bitflux.load_transformer(tmp_path / "m.GGUF")  # a GGUF file or a folder, by its name
    loaded.save_pretrained(tmp_path / "saved")
    again = load_transformer(tmp_path / "saved", dtype=loaded.dtype)
    assert set(ternary_layers(again)) == set(ternary_layers(model))
    assert torch.equal(output(again), output(loaded))


def test_export_from_a_bitflux_folder_and_quantize_back_to_one(models, tmp_path):
    model = models["tensor"]
    save_transformer(model, tmp_path / "folder", TernaryConfig(scale_dtype="float16", format="tq1"))
    export_gguf(tmp_path / "folder", tmp_path / "m.gguf", "tq2_0")
    gguf_to_folder(tmp_path / "m.gguf", tmp_path / "back")
    assert torch.equal(output(load_transformer(tmp_path / "back")), output(model))
    with pytest.raises(BitfluxError, match="already ternary with tensor scales"):
        gguf_to_folder(tmp_path / "m.gguf", tmp_path / "again", TernaryConfig(granularity="channel"))
    with pytest.raises(BitfluxError, match="codes are copied as they are, so --method lsq would not apply"):
        gguf_to_folder(tmp_path / "m.gguf", tmp_path / "again", overrides={"method": "lsq"})


def test_a_tq1_model_exports_the_codes_of_its_tq2_twin_and_loads_back_as_tq1(models, tmp_path):
    loaded = {}
    for fmt in ("tq2", "tq1"):
        save_transformer(models["channel"], tmp_path / fmt, TernaryConfig(granularity="channel", format=fmt))
        model = load_transformer(tmp_path / fmt)
        assert {layer.packing for layer in ternary_layers(model).values()} == {fmt}
        export_gguf(model, tmp_path / f"{fmt}.gguf", "tq2_0")
        loaded[fmt] = load_gguf(tmp_path / f"{fmt}.gguf")
        assert {layer.packing for layer in ternary_layers(loaded[fmt]).values()} == {fmt}
    for a, b in zip(ternary_layers(loaded["tq1"]).values(), ternary_layers(loaded["tq2"]).values()):
        assert torch.equal(a.codes(), b.codes()) and torch.equal(a.weight_scale, b.weight_scale)
    assert torch.equal(output(loaded["tq1"]), output(loaded["tq2"]))


def test_a_file_whose_config_says_tq1_loads_into_tq1_layers(models, tmp_path):
    model = copy.deepcopy(models["tensor"])
    model.register_to_config(quantization_config=TernaryConfig(scale_dtype="float16", format="tq1").to_dict())
    export_gguf(model, tmp_path / "m.gguf", "tq2_0")
    loaded = load_gguf(tmp_path / "m.gguf")
    assert {layer.packing for layer in ternary_layers(loaded).values()} == {"tq1"}
    assert torch.equal(output(loaded), output(model))


def write_original_layout_file(path, model, qtype=None, dense=(), also=()):
    """A file like the single-file FLUX GGUFs other tools write: original names, no bitflux metadata;
    block linears (but those named in `dense`) and those named in `also` quantized by ggml's own quantizer when
    `qtype` is given."""
    state = flux.diffusers_to_original({k: v.detach() for k, v in model.state_dict().items()})
    writer = gguf.GGUFWriter(path, "flux")
    for name, tensor in state.items():
        blocks = (name.startswith(("double_blocks", "single_blocks")) and name.endswith(".weight") and tensor.ndim == 2
                  and name not in dense) or name in also
        if qtype is not None and blocks:
            writer.add_tensor(name, gguf.quants.quantize(tensor.numpy(), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def test_a_foreign_ternary_file_loads_with_the_coarsest_exact_granularity(tmp_path):
    """ggml's quantizer writes scale = max |w| per block: the file reads back as group:256 scales, its
    config comes from the original tensor shapes, and every layer dequantizes as the gguf package does."""
    state = write_original_layout_file(tmp_path / "f.gguf", build_tiny(config=CONFIG), QTYPES["tq2_0"])
    loaded = load_gguf(tmp_path / "f.gguf")
    assert loaded.config.num_attention_heads == 2 and loaded.config.axes_dims_rope == [16, 56, 56]
    layer = loaded.get_submodule("transformer_blocks.0.attn.to_out.0")
    assert isinstance(layer, TernaryLinear) and layer.weight_scale.shape == (256, 1)
    expected = gguf.quants.dequantize(gguf.quants.quantize(state["double_blocks.0.img_attn.proj.weight"].numpy(),
                                                           QTYPES["tq2_0"]), QTYPES["tq2_0"])
    assert np.array_equal(layer.dequantize(torch.float32).numpy(), expected)


def test_a_foreign_file_ternary_in_other_layers_saves_a_folder_that_loads_back(tmp_path):
    """Another tool's file whose ternary layers are not the default config's (a block linear left dense, the
    final projection ternary): the config recorded on loading names the differences one by one, so
    save_pretrained's folder loads back; `bitflux quantize FILE` (gguf_to_folder) writes its folder too, with the
    dense block linear ternarized as any dense target layer."""
    write_original_layout_file(tmp_path / "f.gguf", build_tiny(config=CONFIG), QTYPES["tq2_0"],
                               dense=("double_blocks.0.img_mlp.2.weight",), also=("final_layer.linear.weight",))
    loaded = load_gguf(tmp_path / "f.gguf")
    assert not isinstance(loaded.get_submodule("transformer_blocks.0.ff.net.2"), TernaryLinear)
    assert isinstance(loaded.get_submodule("proj_out"), TernaryLinear)
    loaded.save_pretrained(tmp_path / "saved")
    again = load_transformer(tmp_path / "saved", dtype=loaded.dtype)
    assert set(ternary_layers(again)) == set(ternary_layers(loaded))
    assert torch.equal(output(again), output(loaded))
    folder = load_transformer(gguf_to_folder(tmp_path / "f.gguf", tmp_path / "q", progress=False))
    assert set(ternary_layers(folder)) == set(ternary_layers(loaded)) | {"transformer_blocks.0.ff.net.2"}


def test_a_dense_foreign_file_is_quantized_into_a_folder(tmp_path):
    dense = build_tiny(config=CONFIG)
    write_original_layout_file(tmp_path / "f.gguf", dense)
    assert torch.equal(output(load_gguf(tmp_path / "f.gguf")), output(dense))
    gguf_to_folder(tmp_path / "f.gguf", tmp_path / "q", TernaryConfig(granularity="channel"))
    expected = build_tiny(config=CONFIG)
    quantize_(expected, TernaryConfig(granularity="channel"))
    assert torch.equal(output(load_transformer(tmp_path / "q")), output(expected))


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_layer_with_an_all_zero_row_exports_and_loads_back(tmp_path, qtype):
    model = build_tiny(config=CONFIG)
    model.transformer_blocks[0].ff.net[2].weight.data[3] = 0
    quantize_(model, TernaryConfig(granularity="channel"))
    layer = model.transformer_blocks[0].ff.net[2]
    assert layer.weight_scale[3].item() < 6.1e-5  # below fp16's normal range
    export_gguf(model, tmp_path / "m.gguf", qtype)
    loaded = load_gguf(tmp_path / "m.gguf")
    back = loaded.transformer_blocks[0].ff.net[2]
    assert torch.equal(back.weight_packed, layer.weight_packed) and back.weight_scale[3].item() == 0
    for rounded in ternary_layers(model).values():  # what the file holds: fp16 scales (the zero row's: 0)
        rounded.weight_scale.copy_(rounded.weight_scale.half())
    assert torch.equal(output(loaded), output(model))


def test_export_refuses_rows_that_are_not_whole_blocks(tmp_path):
    model = build_tiny()  # width 64
    quantize_(model, TernaryConfig())
    with pytest.raises(BitfluxError, match="in_features 64 is not a multiple of 256"):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# ---- malformed files --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "ok.gguf"
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Sequential(nn.Linear(256, 4))])
    quantize_(model, TernaryConfig())
    export_gguf(model, path, names="diffusers")
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
    (lambda d: d.__setitem__(slice(d.find(b'"quant_method"'), d.find(b'"quant_method"') + 14), b"'quant_method'"),
     "bitflux.quantization_config: not valid JSON"),
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


def test_nan_in_a_gguf_file_is_refused(tmp_path):
    """As in a safetensors source: a GGUF holding NaN (a dense tensor here; a ternary tensor's block scales are
    checked too, though export_gguf writes none) would quantize or load into a model that computes NaN."""
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Sequential(nn.Linear(256, 4))])
    quantize_(model, TernaryConfig())
    layer = model.transformer_blocks[0][0]
    layer.bias.data.fill_(float("nan"))
    export_gguf(model, tmp_path / "nan.gguf", names="diffusers")
    with pytest.raises(BitfluxError, match="nan.gguf: tensor .* holds NaN or infinite values"):
        read_gguf(tmp_path / "nan.gguf")


def test_a_damaged_file_read_for_its_configs_alone_is_one_line(small_file, tmp_path):
    """`bitflux inspect` reads a GGUF file's metadata alone: a byte that is no UTF-8 there is one line too."""
    from bitflux.interop.gguf import stored_configs

    start = small_file.read_bytes().find(b'"quant_method"')
    bad = corrupt(small_file, tmp_path, lambda d: d.__setitem__(slice(start + 1, start + 3), b"\xff\xfe"))
    with pytest.raises(BitfluxError, match="malformed GGUF file"):
        stored_configs(bad)


def test_an_existing_output_is_refused_before_the_file_is_read(models, tmp_path, monkeypatch):
    from bitflux.interop import gguf as bitflux_gguf

    export_gguf(models["channel"], tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    monkeypatch.setattr(bitflux_gguf, "read_gguf", None)  # reading it would fail here
    with pytest.raises(BitfluxError, match="out exists; pass --force"):
        gguf_to_folder(tmp_path / "m.gguf", tmp_path / "out")


def test_a_ternary_tensor_of_no_linear_layer_is_one_line(models, tmp_path):
    from bitflux.interop.gguf import _build

    export_gguf(models["channel"], tmp_path / "m.gguf")
    contents = read_gguf(tmp_path / "m.gguf")
    packed = contents.state_dict["transformer_blocks.0.attn.to_q.weight_packed"]
    for name in ("foo", "transformer_blocks.0.attn.norm_q"):
        damaged = copy.copy(contents)
        damaged.state_dict = {**contents.state_dict, f"{name}.weight_packed": packed}
        with pytest.raises(BitfluxError, match=f"ternary tensor {name}.weight is no linear layer"):
            _build(damaged, "m.gguf")
