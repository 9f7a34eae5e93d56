import pytest
import torch
from conftest import build_tiny, tiny_inputs

from bitflux import BitfluxError, TernaryConfig, TernaryLinear, quantize_
from bitflux.flux import FLUX_DEV_CONFIG, build_transformer
from bitflux.kernels import use_backend
from bitflux.surgery import set_activations, set_packing


def test_flux_dev_on_meta_matches_the_paper():
    model = build_transformer(FLUX_DEV_CONFIG, "meta")
    report = quantize_(model, TernaryConfig(format="tq2"))
    assert report.total_params == pytest.approx(11.901e9, rel=1e-3)
    assert report.coverage == pytest.approx(0.995, abs=0.001)
    ratio = report.bytes_bf16() / report.bytes_quantized("tq2")
    assert ratio == pytest.approx(7.7, abs=0.05)
    assert report.bytes_bf16() / report.bytes_quantized("tq1") > ratio + 1.5
    assert len(report.layers) == 19 * 12 + 38 * 7


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:32"])
def test_quantized_model_equals_dequantized_swap(granularity):
    model = build_tiny()
    report = quantize_(model, TernaryConfig(**TernaryConfig.parse_granularity(granularity)))
    assert all(name.startswith(("transformer_blocks.", "single_transformer_blocks.")) for name in
               (layer.name for layer in report.layers))
    reference = build_tiny()
    with torch.no_grad():
        for layer in report.layers:
            reference.get_submodule(layer.name).weight.copy_(model.get_submodule(layer.name).dequantize())
    inputs = tiny_inputs()
    with use_backend("reference"), torch.no_grad():
        out = model(**inputs)[0]
        expected = reference(**inputs)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_include_exclude_patterns():
    model = build_tiny()
    report = quantize_(model, TernaryConfig(exclude=(r"norm1?(_context)?\.linear$", r"\.ff\.")))
    names = [layer.name for layer in report.layers]
    assert not any(n.endswith(("norm1.linear", "norm.linear")) or ".ff." in n for n in names)
    assert isinstance(model.get_submodule("transformer_blocks.0.attn.to_q"), TernaryLinear)
    assert isinstance(model.get_submodule("transformer_blocks.0.ff.net.2"), torch.nn.Linear)
    assert isinstance(model.x_embedder, torch.nn.Linear)


def test_parameter_count_unchanged():
    model = build_tiny()
    before = sum(p.numel() for p in model.parameters())
    report = quantize_(model)
    assert report.total_params == before
    from bitflux.surgery import count_params
    assert count_params(model) == before


def test_set_activations_switches_every_ternary_layer():
    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="channel"))
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert set_activations(model, "fp8") == len(layers) > 0
    assert {layer.activations for layer in layers} == {"fp8"}
    with pytest.raises(BitfluxError, match="activations must be one of"):
        set_activations(model, "int4")


def test_set_packing_repacks_every_layer_exactly():
    """tq2 -> tq1 in memory: the same codes and outputs in 20 % fewer bytes, and back to the same bytes."""
    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="channel"))
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    tq2_bytes = [layer.weight_packed.clone() for layer in layers]
    codes = [layer.codes() for layer in layers]
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs)[0]
        assert set_packing(model, "tq1") == len(layers) > 0
        assert all(layer.packing == "tq1" and torch.equal(layer.codes(), c) for layer, c in zip(layers, codes))
        assert sum(layer.weight_packed.numel() for layer in layers) < 0.85 * sum(b.numel() for b in tq2_bytes)
        assert torch.equal(model(**inputs)[0], before)
    assert set_packing(model, "tq1") == 0  # nothing left to repack
    set_packing(model, "tq2")
    assert all(torch.equal(layer.weight_packed, b) for layer, b in zip(layers, tq2_bytes))
    with pytest.raises(BitfluxError, match="unknown packing 'tq3'; choose one of tq2, tq1"):
        set_packing(model, "tq3")


def test_set_packing_refuses_captured_graphs():
    """Captured graphs replay the old bytes' addresses."""
    from bitflux.graphs import GraphedForward

    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="channel"))
    model.forward = GraphedForward(model.forward)  # what cuda_graphed() does, on a CUDA model
    with pytest.raises(BitfluxError, match="repack before cuda_graphed"):
        set_packing(model, "tq1")
    del model.forward
    assert set_packing(model, "tq1") > 0


def test_fp8_activations_refuse_per_group_scales():
    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="group", group_size=16))
    with pytest.raises(BitfluxError, match="per-group scales"):
        set_activations(model, "fp8")
    assert set_activations(model, "a8") > 0


@pytest.mark.parametrize("backend,activations,tolerance", [("reference", "a16", 1e-4), ("auto", "a8", 1e-2)])
def test_a_quantized_flux_transformer_compiles_as_one_graph(backend, activations, tolerance):
    """torch.compile on a ternary FLUX transformer: one graph, no break at any ternary layer (each is one
    operator), and the compiled forward computes what the eager one does. Inductor fuses the float ops
    between the layers in its own order: a16 agrees to float rounding; with int8 activations a value near a
    rounding boundary can land on the other side (about 0.3 % here), so a8 is compared in norm."""
    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="channel", activations=activations))
    inputs = tiny_inputs()
    with torch.no_grad(), use_backend(backend):
        explained = torch._dynamo.explain(model)(**inputs)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        eager = model(**inputs)[0]
        compiled = torch.compile(model, fullgraph=True)(**inputs)[0]
    assert ((compiled - eager).norm() / eager.norm()).item() < tolerance


def test_quantize_refuses_what_it_cannot_ternarize_rightly():
    """A pipeline instead of its transformer, settings not in a TernaryConfig, PEFT's LoRA layers (their own
    nn.Linear would be ternarized too), diffusers' fused q/k/v (the separate layers it keeps would be
    ternarized beside it) and a NaN weight, in the last layer: one line each, the model left as it was."""
    from types import SimpleNamespace

    for model, config, words in (
            (SimpleNamespace(transformer=build_tiny()), None, "not a SimpleNamespace: a pipeline's is pipe.transformer"),
            (build_tiny(), {"method": "lsq"}, "config must be a TernaryConfig, got dict")):
        with pytest.raises(BitfluxError, match=words):
            quantize_(model, config)
    with_lora = build_tiny()
    with_lora.transformer_blocks[0].attn.to_q.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(64, 4)})
    fused = build_tiny()
    fused.fuse_qkv_projections()
    poisoned = build_tiny()  # a blow-up in training, or a bad merge: its layer's scale would be NaN
    with torch.no_grad():
        poisoned.single_transformer_blocks[-1].proj_out.weight[3, 5] = float("nan")
    for model, words in ((with_lora, "attn.to_q.lora_A: the model holds PEFT LoRA layers"),
                         (fused, "attn.to_qkv: diffusers' fused q/k/v projection; unfuse_qkv_projections"),
                         (poisoned, r"single_transformer_blocks.\d+.proj_out.weight holds NaN or infinite")):
        with pytest.raises(BitfluxError, match=words):
            quantize_(model)
        assert not any(isinstance(m, TernaryLinear) for m in model.modules())
    with pytest.raises(BitfluxError, match="set_activations takes a model"):
        set_activations(SimpleNamespace(transformer=None), "a8")


def test_a_pattern_given_as_a_string_is_one_pattern():
    model = build_tiny()
    report = quantize_(model, TernaryConfig(include=r"^transformer_blocks\.", exclude="ff"))
    assert report.layers and all(layer.name.startswith("transformer_blocks.") and ".ff" not in layer.name
                                 for layer in report.layers)
    with pytest.raises(BitfluxError, match="group_size=64"):
        TernaryConfig(granularity="group:64")


def test_quantized_buffers_hold_no_autograd_history():
    model = build_tiny()  # its parameters require gradients
    quantize_(model, TernaryConfig(method="lsq", granularity="channel"))
    assert all(buffer.grad_fn is None and not buffer.requires_grad for buffer in model.buffers())
