import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_CONFIG, build_tiny, cached_hub_snapshot, tiny_inputs, tiny_pipeline

from bitflux import BitfluxError, TernaryConfig, TernaryLinear, quantize_, set_packing
from bitflux.interop.lora import LoraBranch, load_lora, read_lora
from bitflux.kernels import use_backend
from bitflux.ternary import ternarize
from bitflux.text_encoders import narrow


def ternary_holder(out_features, in_features, granularity="tensor", seed=0, fmt="tq2"):
    torch.manual_seed(seed)
    model = nn.Module()
    config = TernaryConfig(format=fmt, **TernaryConfig.parse_granularity(granularity))
    model.layer = TernaryLinear.from_linear(nn.Linear(in_features, out_features), config)
    return model


def lora_pair(out_features, in_features, rank=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, in_features, generator=generator) * 0.1,
            torch.randn(out_features, rank, generator=generator) * 0.1)


def fp_lora_reference(layer, x, pairs):
    """Full-precision LoRA math on the dequantized weight: x (W + sum s * alpha / r * B A)^T + b."""
    weight = layer.dequantize(torch.float32)
    for (down, up, alpha), strength in pairs:
        weight = weight + strength * (alpha / down.shape[0]) * up @ down
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("shape", [(8, 16), (33, 97), (64, 130)])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:16"])
def test_branch_equals_fp_lora_math_on_dequantized_weights(shape, granularity):
    model = ternary_holder(*shape, granularity)
    down, up = lora_pair(*shape)
    lora = {"layer.lora_A.weight": down, "layer.lora_B.weight": up, "layer.alpha": torch.tensor(8.0)}
    adapter = load_lora(model, lora, strength=0.7, dtype=torch.float32)
    x = torch.randn(3, 5, shape[1])
    with use_backend("reference"):
        y = model.layer(x)
    expected = fp_lora_reference(model.layer, x, [((down, up, 8.0), 0.7)])
    assert adapter.names == ["layer"]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_sixteen_bit_branch_matches_the_math_on_its_rounded_weights():
    model = ternary_holder(32, 64)
    down, up = lora_pair(32, 64)
    load_lora(model, {"layer.lora_down.weight": down, "layer.lora_up.weight": up})  # bfloat16 by default
    x = torch.randn(4, 64)
    with use_backend("reference"):
        y = model.layer(x)
    expected = fp_lora_reference(model.layer, x, [((down.bfloat16().float(), up.bfloat16().float(), 4.0), 1.0)])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_strength_several_loras_and_removal():
    model = ternary_holder(24, 40)
    x = torch.randn(2, 40)
    with use_backend("reference"):
        base = model.layer(x)
        pairs = [lora_pair(24, 40, rank=r, seed=r) for r in (2, 6)]
        adapters = [load_lora(model, {"layer.lora_A.weight": d, "layer.lora_B.weight": u}, dtype=torch.float32)
                    for d, u in pairs]
        adapters[0].strength, adapters[1].strength = 0.5, -1.5
        expected = fp_lora_reference(model.layer, x, [((d, u, d.shape[0]), s) for (d, u), s in zip(pairs, (0.5, -1.5))])
        torch.testing.assert_close(model.layer(x), expected, rtol=1e-5, atol=1e-5)
        adapters[1].strength = 0
        torch.testing.assert_close(model.layer(x), fp_lora_reference(model.layer, x, [((*pairs[0], 2), 0.5)]),
                                   rtol=1e-5, atol=1e-5)
        for adapter in adapters:
            adapter.remove()
        assert torch.equal(model.layer(x), base)


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:16"])
def test_fuse_reternarizes_and_unfuse_is_exact(granularity, fmt):
    model = ternary_holder(24, 40, granularity, fmt=fmt)
    layer = model.layer
    packed, scale = layer.weight_packed, layer.weight_scale
    stored = packed.clone()
    x = torch.randn(2, 40)
    with use_backend("reference"):
        base = layer(x)
        down, up = lora_pair(24, 40)
        adapter = load_lora(model, {"layer.lora_A.weight": down, "layer.lora_B.weight": up}, strength=2.0,
                            dtype=torch.float32)
        with_branch = layer(x)
        adapter.fuse()
        config = TernaryConfig(**TernaryConfig.parse_granularity(granularity))
        want_codes, want_scales = ternarize(ternary_holder(24, 40, granularity).layer.dequantize(torch.float32)
                                            + 2.0 * up @ down, "lsq", config.granularity,
                                            config.group_size_or_none)
        assert torch.equal(layer.codes(), want_codes) and torch.equal(layer.weight_scale, want_scales)
        assert layer.weight_packed.shape == packed.shape  # fused in the layer's own packing
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(torch.float32), layer.bias))
        adapter.unfuse()
        assert layer.weight_packed is packed and layer.weight_scale is scale
        assert torch.equal(layer.weight_packed, stored)
        assert torch.equal(layer(x), with_branch)
        adapter.remove()
        assert torch.equal(layer(x), base)


def test_unfuse_after_a_dtype_move_gives_the_layers_back_in_the_models_dtype():
    """fuse(), then model.to(bfloat16), then unfuse(): the saved buffers come back as the move made the rest
    (a dense weight left in fp32 beside a bf16 bias would not even run; the scales keep their dtype)."""
    model = ternary_holder(24, 40)
    model.dense = nn.Linear(40, 24)
    ternary_scale, dense_weight = model.layer.weight_scale.clone(), model.dense.weight.detach().clone()
    down, up = lora_pair(24, 40)
    adapter = load_lora(model, {"layer.lora_A.weight": down, "layer.lora_B.weight": up,
                                "dense.lora_A.weight": down, "dense.lora_B.weight": up}, dtype=torch.float32)
    adapter.fuse()
    model.to(torch.bfloat16)
    adapter.unfuse()
    assert torch.equal(model.layer.weight_scale, ternary_scale)
    assert torch.equal(model.dense.weight, dense_weight.to(torch.bfloat16))
    adapter.remove()
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    with use_backend("reference"):
        assert model.layer(x).dtype == model.dense(x).dtype == torch.bfloat16


def test_repacking_waits_for_fused_loras():
    """unfuse() puts back the bytes fuse() saved, in the packing they had: no repacking in between."""
    model = ternary_holder(24, 40)
    down, up = lora_pair(24, 40)
    adapter = load_lora(model, {"layer.lora_A.weight": down, "layer.lora_B.weight": up}, dtype=torch.float32)
    adapter.fuse()
    with pytest.raises(BitfluxError, match="a LoRA is fused into this model: unfuse"):
        set_packing(model, "tq1")
    adapter.unfuse()
    assert set_packing(model, "tq1") == 1 and model.layer.packing == "tq1"


def test_fused_layers_do_not_keep_the_prepared_weights_of_their_saved_codes():
    """fuse() keeps the layer's original codes for unfuse(); what a backend prepared from them (a repacked copy
    of the layer) is let go meanwhile."""
    from bitflux import kernels

    model = ternary_holder(24, 40, "channel")
    x = torch.randn(2, 40)
    with torch.no_grad():
        model.layer(x)
        original = model.layer.weight_packed
        down, up = lora_pair(24, 40)
        adapter = load_lora(model, {"layer.lora_A.weight": down, "layer.lora_B.weight": up}, dtype=torch.float32)
        with_branch = model.layer(x)
        adapter.fuse()
        model.layer(x)
        assert original not in kernels._prepared
        adapter.unfuse()
        assert torch.equal(model.layer(x), with_branch)


def test_fused_loras_unfuse_last_in_first_out():
    model = ternary_holder(8, 16)
    keys = ("layer.lora_A.weight", "layer.lora_B.weight")
    first, second = (load_lora(model, dict(zip(keys, lora_pair(8, 16, seed=s)))) for s in (1, 2))
    first.fuse()
    second.fuse()
    with pytest.raises(BitfluxError, match="unfuse it first"):
        first.unfuse()
    second.unfuse()
    first.unfuse()


@pytest.mark.parametrize("step,error", [("ternarize", MemoryError), ("forget_prepared", KeyboardInterrupt)])
def test_a_fuse_that_fails_half_way_puts_back_what_it_fused(flux, monkeypatch, step, error):
    """Fusing is all or nothing: a failure at the second layer (out of memory while ternarizing; Ctrl-C once a
    layer's old buffers are saved, before it is marked fused) puts back what was fused and leaves the LoRA
    unfused, to be fused again."""
    import bitflux.interop.lora as lora_module

    state = {f"transformer.transformer_blocks.0.attn.{name}.lora_{part}.weight": matrix
             for name in ("to_q", "to_k") for part, matrix in zip("AB", lora_pair(WIDTH, WIDTH, seed=13))}
    layers = [flux.get_submodule(f"transformer_blocks.0.attn.{name}") for name in ("to_q", "to_k")]
    before = [(layer.weight_packed, layer.weight_scale) for layer in layers]
    adapter = load_lora(flux, state)
    real, calls = getattr(lora_module, step), []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_module, step, failing_second)
    with pytest.raises(error):
        adapter.fuse(progress=False)
    assert not adapter.fused and all(not layer.__dict__.get("_bitflux_fused") for layer in layers)
    assert all(layer.weight_packed is packed and layer.weight_scale is scale
               for layer, (packed, scale) in zip(layers, before))
    monkeypatch.setattr(lora_module, step, real)
    adapter.fuse(progress=False)
    adapter.remove()
    assert all(torch.equal(layer.weight_packed, packed) for layer, (packed, _) in zip(layers, before))


def test_a_fuse_stopped_again_while_putting_back_is_finished_by_remove(flux, monkeypatch):
    """A second Ctrl-C during a failed fuse's put-back leaves the LoRA fused where it was not put back yet:
    remove() (or unfuse()) finishes putting the layers back."""
    import bitflux.interop.lora as lora_module

    names = ("to_q", "to_k", "to_v")
    state = {f"transformer.transformer_blocks.0.attn.{name}.lora_{part}.weight": matrix
             for name in names for part, matrix in zip("AB", lora_pair(WIDTH, WIDTH, seed=14))}
    layers = [flux.get_submodule(f"transformer_blocks.0.attn.{name}") for name in names]
    before = [layer.weight_packed for layer in layers]
    adapter = load_lora(flux, state)
    real_ternarize, real_put_back, calls = lora_module.ternarize, lora_module.LoraAdapter._put_back, []

    def ternarize_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return real_ternarize(*args, **kwargs)

    def put_back_interrupted(self, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_module, "ternarize", ternarize_twice)
    monkeypatch.setattr(lora_module.LoraAdapter, "_put_back", put_back_interrupted)
    with pytest.raises(KeyboardInterrupt):
        adapter.fuse(progress=False)
    assert adapter.fused and len(adapter._saved) == 2
    monkeypatch.setattr(lora_module.LoraAdapter, "_put_back", real_put_back)
    adapter.remove()
    assert all(layer.weight_packed is packed and not layer.__dict__.get("_bitflux_fused")
               for layer, packed in zip(layers, before))


def test_dense_layers_take_a_lora_too():
    model = nn.Module()
    model.layer = nn.Linear(16, 8)
    weight = model.layer.weight.detach().clone()
    storage = model.layer.weight.data_ptr()
    down, up = lora_pair(8, 16)
    adapter = load_lora(model, {"layer.lora_A.weight": down, "layer.lora_B.weight": up}, dtype=torch.float32)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.layer(x), F.linear(x, weight + up @ down, model.layer.bias))
    adapter.fuse()
    torch.testing.assert_close(model.layer(x), F.linear(x, weight + up @ down, model.layer.bias))
    adapter.unfuse()
    assert model.layer.weight.data_ptr() == storage and torch.equal(model.layer.weight, weight)


# ---- key layouts on a FLUX transformer ----------------------------------------------------------------------

WIDTH = TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]


@pytest.fixture(scope="module")
def flux():
    model = build_tiny()
    quantize_(model, TernaryConfig())
    return model


def test_a_narrowed_text_encoders_lora_fuses_into_its_stored_weights():
    """CLIP narrowed as load_pipeline holds it on a CPU (text_encoders.narrow: weights stored in bf16, computed in
    fp32, `weight` a widened copy): a LoRA's CLIP pairs run on it, fusing adds them into the stored weights (to
    bf16) and unfusing puts those back exactly."""
    clip = narrow(tiny_pipeline().text_encoder, torch.bfloat16, torch.float32)
    stored = {name: parameter.clone() for name, parameter in clip.named_parameters()}
    down, up = lora_pair(32, 24, seed=11)
    state = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up}
    ids = torch.tensor([[3, 4, 6, 2]])
    with torch.no_grad():
        base = clip(ids).pooler_output
        adapter = load_lora(clip, state, component="text_encoder")  # fp32 branches by default on a text encoder
        assert all(branch.down.dtype == torch.float32 for branch in adapter.branches)
        branches = clip(ids).pooler_output
        adapter.fuse()
        fused = clip(ids).pooler_output
        assert clip.encoder.layers[0].mlp.fc1._parameters["weight"].dtype == torch.bfloat16
        assert not torch.equal(branches, base)
        torch.testing.assert_close(fused, branches, rtol=0, atol=2e-2 * branches.abs().max().item())
        adapter.unfuse()
        assert all(torch.equal(parameter, stored[name]) for name, parameter in clip.named_parameters())
        adapter.remove()
        assert torch.equal(clip(ids).pooler_output, base)


def test_kohya_original_names_split_fused_rows_onto_diffusers_layers(flux):
    mlp = flux.get_submodule("single_transformer_blocks.0.proj_mlp").out_features
    qkv_down, qkv_up = lora_pair(3 * WIDTH, WIDTH, seed=3)
    lin1_down, lin1_up = lora_pair(3 * WIDTH + mlp, WIDTH, seed=4)
    mod_down, mod_up = lora_pair(2 * WIDTH, WIDTH, seed=5)
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv_down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_up,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": lin1_down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": lin1_up,
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": mod_down,
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": mod_up,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
    }
    pairs, skipped = read_lora(kohya, flux)
    assert skipped == 1
    rows = {name: slice(i * WIDTH, (i + 1) * WIDTH) for i, name in enumerate(("to_q", "to_k", "to_v"))}
    for name, part in rows.items():
        down, up, alpha = pairs[f"transformer_blocks.0.attn.{name}"]
        assert down is qkv_down and torch.equal(up, qkv_up[part]) and alpha == 2.0
        down, up, alpha = pairs[f"single_transformer_blocks.0.attn.{name}"]
        assert down is lin1_down and torch.equal(up, lin1_up[part]) and alpha is None
    assert torch.equal(pairs["single_transformer_blocks.0.proj_mlp"][1], lin1_up[3 * WIDTH:])
    # The original final modulation emits (shift, scale); diffusers' norm_out emits (scale, shift).
    assert torch.equal(pairs["norm_out.linear"][1], torch.cat([mod_up[WIDTH:], mod_up[:WIDTH]]))


def test_diffusers_and_kohya_files_of_one_lora_give_the_same_model(flux):
    down, up = lora_pair(3 * WIDTH, WIDTH, seed=6)
    kohya = {"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": down,
             "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": up,
             "lora_unet_double_blocks_0_txt_attn_qkv.alpha": torch.tensor(8.0)}
    diffusers = {}
    for i, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        stem = f"transformer.transformer_blocks.0.attn.{name}"
        diffusers.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up[i * WIDTH:(i + 1) * WIDTH],
                          f"{stem}.alpha": torch.tensor(8.0)})
    _assert_same_model(flux, kohya, diffusers)


def _assert_same_model(flux, lora, diffusers_lora) -> None:
    """The two LoRAs change the model's output, and alike; removed, the model is as it was."""
    inputs = tiny_inputs()
    outputs = []
    with torch.no_grad(), use_backend("reference"):
        base = flux(**inputs)[0]
        for state in (lora, diffusers_lora):
            adapter = load_lora(flux, state, dtype=torch.float32)
            outputs.append(flux(**inputs)[0])
            adapter.remove()
        assert torch.equal(flux(**inputs)[0], base)
    assert not torch.equal(outputs[0], base)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_xlabs_processor_loras_give_the_diffusers_model(flux):
    """XLabs' files name attention-processor LoRAs: a double block's qkv_lora1/proj_lora1 (image stream),
    qkv_lora2/proj_lora2 (text stream), a single block's qkv_lora (onto to_q/to_k/to_v) and proj_lora
    (proj_out); no alpha (scale 1), as diffusers converts them."""
    proj_in = flux.get_submodule("single_transformer_blocks.0.proj_out").in_features
    pairs = {"double_blocks.0.processor.qkv_lora1": lora_pair(3 * WIDTH, WIDTH, seed=7),
             "diffusion_model.double_blocks.0.processor.proj_lora2": lora_pair(WIDTH, WIDTH, seed=8),
             "single_blocks.0.processor.qkv_lora": lora_pair(3 * WIDTH, WIDTH, seed=9),
             "single_blocks.0.processor.proj_lora": lora_pair(WIDTH, proj_in, seed=10)}
    xlabs = {f"{stem}.{role}.weight": matrix for stem, pair in pairs.items() for role, matrix in zip(("down", "up"), pair)}
    targets = {"double_blocks.0.processor.qkv_lora1": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                       "transformer_blocks.0.attn.to_v"],
               "diffusion_model.double_blocks.0.processor.proj_lora2": ["transformer_blocks.0.attn.to_add_out"],
               "single_blocks.0.processor.qkv_lora": [f"single_transformer_blocks.0.attn.to_{p}" for p in "qkv"],
               "single_blocks.0.processor.proj_lora": ["single_transformer_blocks.0.proj_out"]}
    diffusers = {}
    for stem, names in targets.items():
        down, up = pairs[stem]
        for name, rows in zip(names, up.chunk(len(names))):
            diffusers.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": rows})
    assert set(read_lora(xlabs, flux)[0]) == {name for names in targets.values() for name in names}
    _assert_same_model(flux, xlabs, diffusers)


@pytest.mark.parametrize("state,message", [
    ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, WIDTH)}, "lacks its up"),
    ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3),
      "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(WIDTH, 4)}, "the layer is 64x64"),
    ({"nope.lora_A.weight": torch.zeros(4, 3), "nope.lora_B.weight": torch.zeros(3, 4)}, "names no linear"),
    ({"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(4, 3),
      "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(3, 4)}, "names no linear layer"),
    ({"nope.lora_A.weight": torch.zeros(4, 3), "nope.lora_B.weight": torch.zeros(3, 4),
      "nope2.lora_A.weight": torch.zeros(4, 3), "nope2.lora_B.weight": torch.zeros(3, 4)}, "'nope' \\(and 1 more\\)"),
    ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(0, WIDTH),
      "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(WIDTH, 0)}, "with r >= 1"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, WIDTH),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * WIDTH, 4),
      "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, WIDTH),
      "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(WIDTH, 4)}, "both adapt transformer_blocks.0.attn.to_q"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 3),
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3, 4)},
     "its 1 pairs are CLIP's"),
    ({"double_blocks.0.processor.qkv_lora.down.weight": torch.zeros(4, WIDTH),  # a double block has two streams
      "double_blocks.0.processor.qkv_lora.up.weight": torch.zeros(3 * WIDTH, 4)}, "names no linear layer"),
    ({"single_blocks.0.processor.qkv_lora.down.weight": torch.zeros(4, WIDTH),
      "single_blocks.0.processor.qkv_lora.up.weight": torch.zeros(3 * WIDTH + 1, 4)}, "not q, k and v's alike"),
    ({"transformer_blocks.0.attn.to_q.dora_scale": torch.zeros(1)}, "DoRA"),
    ({"transformer_blocks.0.attn.to_q.weight": torch.zeros(1)}, "not a LoRA key"),
    ({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((4, WIDTH), float("nan")),
      "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(WIDTH, 4)}, "lora_A.weight' holds NaN"),
])
def test_bad_lora_files_give_one_line_errors(flux, state, message):
    with pytest.raises(BitfluxError, match=message) as info:
        load_lora(flux, state)
    assert "\n" not in str(info.value)


def test_branch_rejects_mismatched_pairs():
    with pytest.raises(BitfluxError, match="not \\(r, in\\)"):
        LoraBranch(torch.zeros(4, 8), torch.zeros(8, 3))


def test_alpha_from_the_peft_config_diffusers_and_peft_write(flux, tmp_path):
    """diffusers' save_lora_weights keeps PEFT's lora_alpha (and alpha_pattern) in the file's metadata, PEFT
    in adapter_config.json beside the file, neither as .alpha tensors: read there, a pattern before the
    default; an .alpha tensor still wins."""
    import json

    from safetensors.torch import save_file

    state = {}
    for name in ("to_q", "to_k"):
        down, up = lora_pair(WIDTH, WIDTH, seed=7)
        state.update({f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight": down,
                      f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight": up})
    config = {"lora_alpha": 2, "alpha_pattern": {"attn.to_k": 8}, "r": 4}
    save_file(state, str(tmp_path / "diffusers.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in config.items()})})
    (tmp_path / "peft").mkdir()
    save_file(state, str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    for path in (tmp_path / "diffusers.safetensors", tmp_path / "peft" / "adapter_model.safetensors"):
        pairs, _ = read_lora(path, flux)
        assert pairs["transformer_blocks.0.attn.to_q"][2] == 2.0
        assert pairs["transformer_blocks.0.attn.to_k"][2] == 8.0
    save_file({**state, "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(4.0)},
              str(tmp_path / "tensor.safetensors"), metadata={"lora_adapter_metadata": json.dumps({
                  "transformer.lora_alpha": 2})})
    assert read_lora(tmp_path / "tensor.safetensors", flux)[0]["transformer_blocks.0.attn.to_q"][2] == 4.0
    with pytest.raises(BitfluxError, match="alpha holds 2 values"):
        read_lora({**state, "transformer.transformer_blocks.0.attn.to_q.alpha": torch.ones(2)}, flux)
    # the model's own save_lora_adapter writes the config unprefixed; use_rslora scales by alpha / sqrt(r)
    save_file(state, str(tmp_path / "adapter.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
        {"lora_alpha": 16, "r": 4, "use_rslora": True})})
    pairs, _ = read_lora(tmp_path / "adapter.safetensors", flux)
    down, _, alpha = pairs["transformer_blocks.0.attn.to_q"]
    assert alpha / down.shape[0] == 16 / 4 ** 0.5
    # the pipeline's save_lora_weights keeps each component's config under its prefix: CLIP's pairs take theirs
    clip = tiny_pipeline().text_encoder
    down, up = lora_pair(24, 24, rank=2, seed=12)
    save_file({**state, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up},
              str(tmp_path / "both.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
                  {"transformer.lora_alpha": 2, "text_encoder.lora_alpha": 8, "text_encoder.r": 2})})
    assert read_lora(tmp_path / "both.safetensors", flux)[0]["transformer_blocks.0.attn.to_q"][2] == 2.0
    pairs, _ = read_lora(tmp_path / "both.safetensors", clip, component="text_encoder")
    assert pairs["encoder.layers.0.self_attn.q_proj"][2] == 8.0


def test_fusing_nothing_leaves_the_layers_as_they_were():
    """fuse()'s default (lsq) gives an already ternary weight back: a LoRA at strength 0 fused changes nothing.
    absmean, the default before, shrank every scale by the share of zero codes (outputs ~9 % off)."""
    model = ternary_holder(24, 40, "channel")
    layer = model.layer
    codes, scales = layer.codes(), layer.weight_scale.clone()
    down, up = lora_pair(24, 40)
    adapter = load_lora(model, {"layer.lora_A.weight": down, "layer.lora_B.weight": up}, strength=0.0)
    adapter.fuse()
    assert torch.equal(layer.codes(), codes)
    torch.testing.assert_close(layer.weight_scale, scales)


def test_odd_callers_and_files_are_told_in_one_line(flux):
    """A pipeline where the transformer is meant; an fp8 file (ComfyUI keeps some so) loads as its values."""
    pipe = type("FluxPipeline", (), {"transformer": flux})()
    with pytest.raises(BitfluxError, match="a pipeline's is pipe.transformer"):
        load_lora(pipe, {})
    down, up = lora_pair(WIDTH, WIDTH)
    fp8 = {"transformer_blocks.0.attn.to_q.lora_A.weight": down.to(torch.float8_e4m3fn),
           "transformer_blocks.0.attn.to_q.lora_B.weight": up.to(torch.float8_e4m3fn)}
    adapter = load_lora(flux, fp8, dtype=torch.float32)
    assert torch.equal(adapter.branches[0].down, down.to(torch.float8_e4m3fn).float())
    adapter.remove()


def test_a_file_that_is_not_safetensors_is_named_so(flux, tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "lora.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(BitfluxError, match="lora.pt: not a .safetensors file"):
        load_lora(flux, tmp_path / "lora.pt")
    with pytest.raises(BitfluxError, match="broken.safetensors: cannot read LoRA safetensors"):
        load_lora(flux, tmp_path / "broken.safetensors")


def test_text_encoder_pairs_are_counted(flux):
    down, up = lora_pair(WIDTH, WIDTH)
    state = {"transformer_blocks.0.attn.to_q.lora_A.weight": down, "transformer_blocks.0.attn.to_q.lora_B.weight": up,
             "lora_te1_encoder_layers_0_fc1.lora_down.weight": torch.zeros(2, 3),
             "lora_te1_encoder_layers_0_fc1.lora_up.weight": torch.zeros(3, 2)}
    adapter = load_lora(flux, state)
    assert adapter.skipped_text_encoder_pairs == 1 and adapter.names == ["transformer_blocks.0.attn.to_q"]
    adapter.remove()


def test_a_lora_is_named_by_its_file_its_folder_or_its_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    """As --model takes a cached hub id: LoRA repositories are folders of one .safetensors file (PEFT's:
    adapter_model.safetensors beside its config); bitflux never downloads."""
    from bitflux.interop.lora import lora_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cached_hub_snapshot(monkeypatch, tmp_path / "hf" / "hub", "someone/ink-lora")
    assert lora_file("someone/ink-lora") == snapshot / "ink.safetensors"
    assert lora_file(snapshot) == lora_file(snapshot / "ink.safetensors") == snapshot / "ink.safetensors"
    (snapshot / "adapter_model.safetensors").write_bytes(b"")
    assert lora_file(snapshot) == snapshot / "adapter_model.safetensors"
    for source, words in (("someone/other-lora", "not in the local Hugging Face cache"),
                          (tmp_path / "missing.safetensors", "no such LoRA file"),
                          ("loras/missing.safetensors", "no such LoRA file"),
                          (tmp_path / "hf", "no .safetensors LoRA file in it")):
        with pytest.raises(BitfluxError, match=words):
            lora_file(source)
    (snapshot / "adapter_model.safetensors").unlink()
    (snapshot / "ink_comfy.safetensors").write_bytes(b"")
    with pytest.raises(BitfluxError, match=r"someone/ink-lora holds 2 .safetensors files: name one "
                                           r"\(someone/ink-lora/ink.safetensors, someone/ink-lora/ink_comfy"):
        lora_file("someone/ink-lora")
    assert lora_file("someone/ink-lora/ink_comfy.safetensors") == snapshot / "ink_comfy.safetensors"
    with pytest.raises(BitfluxError, match="someone/ink-lora/x.safetensors: no x.safetensors in the cached someone/ink"):
        lora_file("someone/ink-lora/x.safetensors")
    for empty in ("", " "):
        with pytest.raises(BitfluxError, match="the LoRA's name is empty"):
            lora_file(empty)


def test_a_repository_fetched_in_part_is_read_from_the_cache(tmp_path, monkeypatch):
    """`hf download REPO FILE` (or --include, or FLUX.1-dev without its 23 GB flux1-dev.safetensors): huggingface_hub
    >= 2.4 records the repository's whole file list and calls the snapshot incomplete; its files are used."""
    from bitflux.convert import from_hub_cache

    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    repo = cached_hub_snapshot(monkeypatch, tmp_path / "hub", "someone/ink-lora").parents[1]
    tree_cache.write_tree_cache(str(repo), "abc123", {name: tree_cache.TreeCacheEntry(size=0, blob_id="0" * 40)
                                                      for name in ("README.md", "ink.safetensors")})
    assert from_hub_cache("someone/ink-lora") == repo / "snapshots" / "abc123"


def test_a_model_with_a_lora_is_freed_when_deleted_and_its_copies_keep_their_own():
    """No reference cycle (layer -> hook -> adapter -> layer) keeps a deleted model's codes until the garbage
    collector runs; a deep copy's adapter fuses the copy's layers."""
    import copy
    import gc
    import weakref

    model = ternary_holder(24, 40)
    down, up = lora_pair(24, 40)
    adapter = load_lora(model, {"layer.lora_A.weight": down, "layer.lora_B.weight": up})
    twin = copy.deepcopy(model)
    twin_adapter = next(hook.func.__self__ for hook in twin.layer._forward_hooks.values())
    twin_adapter.fuse()
    assert not torch.equal(twin.layer.weight_packed, model.layer.weight_packed) or not torch.equal(
        twin.layer.weight_scale, model.layer.weight_scale)
    assert adapter.fused is False
    codes = weakref.ref(model.layer.weight_packed)
    gc.disable()
    try:
        del model
        assert codes() is None
    finally:
        gc.enable()
    with pytest.raises(BitfluxError, match="the model this LoRA was attached to is gone"):
        adapter.fuse()
    with pytest.raises(BitfluxError, match="is gone"):  # and so is a copy's
        copy.deepcopy(adapter).fuse()


def test_a_lora_of_booleans_or_complex_numbers_is_refused(flux):
    down, up = lora_pair(WIDTH, WIDTH)
    for bad, words in ((down > 0, ": torch.bool, not real numbers"), (down.to(torch.complex64), ": torch.complex64, not"),
                       (down.numpy(), " is a ndarray, not a torch tensor"), (4.0, " is a float, not a torch tensor")):
        with pytest.raises(BitfluxError, match=f"lora_A.weight'{words}"):
            read_lora({"transformer_blocks.0.attn.to_q.lora_A.weight": bad,
                       "transformer_blocks.0.attn.to_q.lora_B.weight": up}, flux)


def test_a_compiled_model_takes_a_lora_on_its_own_layers():
    """torch.compile's wrapper names every layer _orig_mod.X: load_lora attaches to the model it wraps."""
    model = build_tiny()
    quantize_(model, TernaryConfig())
    down, up = lora_pair(WIDTH, WIDTH)
    adapter = load_lora(torch.compile(model), {"transformer_blocks.0.attn.to_q.lora_A.weight": down,
                                               "transformer_blocks.0.attn.to_q.lora_B.weight": up})
    assert adapter.names == ["transformer_blocks.0.attn.to_q"]
    assert model.transformer_blocks[0].attn.to_q._forward_hooks
