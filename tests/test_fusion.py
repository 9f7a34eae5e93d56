import gc
import io
import weakref

import pytest
import torch
from conftest import build_tiny, tiny_inputs

from bitflux import (
    BitfluxError,
    TernaryConfig,
    TernaryLinear,
    kernels,
    load_transformer,
    quantize_,
    save_transformer,
    set_activations,
    set_packing,
)
from bitflux.fusion import (
    FusedProjection,
    fuse_projections,
    gather_codes,
)
from bitflux.interop.lora import load_lora
from bitflux.kernels import consecutive_rows, use_backend


def ternary_tiny(granularity="tensor", fmt="tq2", activations="a16", seed=0):
    model = build_tiny(seed)
    config = TernaryConfig(format=fmt, activations=activations, **TernaryConfig.parse_granularity(granularity))
    quantize_(model, config)
    return model, config


def forward(model, backend="cpu"):
    with torch.no_grad(), use_backend(backend):
        return model(**tiny_inputs())[0]


def fused_pair(granularity="tensor", fmt="tq2", activations="a16"):
    separate, config = ternary_tiny(granularity, fmt, activations)
    fused, _ = ternary_tiny(granularity, fmt, activations)
    assert fuse_projections(fused) == 4  # 2 double blocks (text and image groups) + 2 single blocks
    return separate, fused, config


def gathered(attention):
    """The one tensor the attention's q/k/v codes are rows of, or None."""
    return consecutive_rows([getattr(attention, name).weight_packed for name in ("to_q", "to_k", "to_v")])


def lora_on_q(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    name = "transformer_blocks.0.attn.to_q"
    layer = model.get_submodule(name)
    down = torch.randn(4, layer.in_features, generator=generator)
    up = torch.randn(layer.out_features, 4, generator=generator)
    return load_lora(model, {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("granularity,fmt,activations", [
    ("tensor", "tq2", "a16"), ("channel", "tq1", "a8"), ("group:16", "tq2", "a8"), ("tensor", "tq1", "fp8"),
])
def test_fused_model_computes_what_the_separate_layers_do(backend, granularity, fmt, activations):
    separate, fused, _ = fused_pair(granularity, fmt, activations)
    attention = fused.transformer_blocks[0].attn
    assert attention.fused_projections and isinstance(attention.to_qkv, FusedProjection)
    assert isinstance(attention.to_added_qkv, FusedProjection)
    # the same codes and scales, the same per-token activation quantization: equal up to the order in which
    # a kernel sums (exactly equal for the integer 8-bit modes)
    expected, actual = forward(separate, backend), forward(fused, backend)
    if activations == "a16":
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(actual, expected)


def test_codes_are_held_once_and_state_dict_is_unchanged():
    separate, fused, _ = fused_pair()
    attention = fused.single_transformer_blocks[0].attn
    assert gathered(attention) is not None
    expected, actual = separate.state_dict(), fused.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_saved_fused_model_loads_as_the_separate_one(tmp_path):
    separate, fused, config = fused_pair("channel")
    save_transformer(fused, tmp_path / "out", config)
    loaded = load_transformer(tmp_path / "out")
    assert not loaded.transformer_blocks[0].attn.fused_projections
    assert torch.equal(forward(loaded), forward(separate))


def test_lora_side_branch_runs_on_the_fused_output():
    separate, fused, _ = fused_pair()
    lora_on_q(separate), lora_on_q(fused)
    kernels._joined_scales_cache.clear()
    assert torch.equal(forward(fused), forward(separate))
    assert gathered(fused.transformer_blocks[0].attn) in kernels._joined_scales_cache  # one GEMM for q/k/v
    # a hook of another kind (here, before the call) makes that attention run its layers one by one
    calls = []
    for model in (separate, fused):
        model.transformer_blocks[0].attn.to_k.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert torch.equal(forward(fused), forward(separate)) and len(calls) == 2


def test_changed_layers_are_fused_again():
    separate, fused, _ = fused_pair("channel")
    # a fused LoRA gives to_q new codes and scales
    adapters = lora_on_q(separate), lora_on_q(fused)
    for adapter in adapters:
        adapter.fuse()
    assert torch.equal(forward(fused), forward(separate))
    for adapter in adapters:
        adapter.remove()  # unfuses: to_q gets back its view of the codes as they were first gathered
    assert torch.equal(forward(fused), forward(separate))
    assert gathered(fused.transformer_blocks[0].attn) is not None  # gathered again
    # in place: new scales, and a state dict loaded into the layers
    for model in (separate, fused):
        with torch.no_grad():
            model.transformer_blocks[1].attn.add_k_proj.weight_scale.mul_(1.5)
    assert torch.equal(forward(fused), forward(separate))
    other, _ = ternary_tiny("channel", seed=5)
    for model in (separate, fused):
        model.load_state_dict(other.state_dict())
    assert torch.equal(forward(fused), forward(other))
    # new activations and a new packing for every layer
    for model in (separate, fused):
        set_activations(model, "a8")
        set_packing(model, "tq1")
    assert torch.equal(forward(fused), forward(separate))
    assert gathered(fused.transformer_blocks[0].attn) is not None  # gathered again


def test_diffusers_unfuse_returns_to_the_separate_layers():
    separate, fused, _ = fused_pair()
    fused.unfuse_qkv_projections()
    assert not any(isinstance(m, FusedProjection) for m in fused.modules())
    assert torch.equal(forward(fused), forward(separate))
    assert fuse_projections(fused) == 4


def test_only_ternary_attention_is_fused():
    model = build_tiny()
    assert fuse_projections(model) == 0  # full precision: diffusers' own fuse_qkv_projections is for that
    quantize_(model, TernaryConfig())
    model.single_transformer_blocks[0].attn.to_v = torch.nn.Linear(64, 64)
    assert fuse_projections(model) == 3
    assert not model.single_transformer_blocks[0].attn.fused_projections
    assert fuse_projections(model) == 0  # fused once
    assert sum(isinstance(m, TernaryLinear) for m in model.modules()) > 0


def test_a_moved_model_frees_the_old_fused_codes_and_gathers_again():
    separate, fused, _ = fused_pair()
    attention = fused.transformer_blocks[0].attn
    old = weakref.ref(gathered(attention))
    fused._apply(lambda tensor: tensor.clone())  # what .to(device) does: every buffer replaced
    gc.collect()
    assert old() is None and gathered(attention) is None
    assert torch.equal(forward(fused), forward(separate))
    assert gathered(attention) is not None


@pytest.mark.parametrize("with_lora", [False, True])
def test_a_fused_model_compiles_as_one_graph(with_lora):
    """torch.compile traces each FusedProjection as one operator, as it does TernaryLinear (tests/test_surgery.py):
    no graph break (a LoRA's hook included), and the eager model's result."""
    _, fused, _ = fused_pair("channel")
    if with_lora:
        lora_on_q(fused)
    inputs = tiny_inputs()
    with torch.no_grad(), use_backend("reference"):
        explained = torch._dynamo.explain(fused)(**inputs)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        ops = [node.target for graph in explained.graphs for node in graph.graph.nodes]
        eager = fused(**inputs)[0]
        compiled = torch.compile(fused, fullgraph=True)(**inputs)[0]
    # per double block 14 ternary layers: 8 alone and 2 groups of 3; per single block 6: 3 alone, 1 group
    assert ops.count(torch.ops.bitflux.ternary_linear.default) == 2 * 8 + 2 * 3
    assert ops.count(torch.ops.bitflux.ternary_linear_rows.default) == 2 * 2 + 2 * 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_gathered_under_inference_mode_the_layers_stay_writable():
    separate, fused, _ = fused_pair()
    for model in (separate, fused):
        set_packing(model, "tq1")  # new codes: gathered again at the next call
    with torch.inference_mode():
        fused(**tiny_inputs())
    fused.load_state_dict(separate.state_dict())  # in place, outside inference_mode
    assert torch.equal(forward(fused), forward(separate))


def test_under_inference_mode_a_moved_model_runs():
    separate, fused, _ = fused_pair()
    with torch.inference_mode():
        fused.to(torch.float64).to(torch.float32)  # new scales and biases, made under inference_mode
        actual = fused(**tiny_inputs())[0]
    assert torch.equal(actual, forward(separate))


def test_compiled_model_sees_changed_layers():
    """The fused operator finds the layers' codes, scales and biases when it runs, not when it was traced."""
    separate, fused, _ = fused_pair("channel")
    compiled = torch.compile(fused, fullgraph=True)
    inputs = tiny_inputs()
    with torch.no_grad(), use_backend("reference"):
        compiled(**inputs)
        other, _ = ternary_tiny("channel", seed=5)
        for model in (fused, separate):
            model.load_state_dict(other.state_dict())
            model.transformer_blocks[0].attn.to_k.weight_scale.mul_(2)
        torch.testing.assert_close(compiled(**inputs)[0], separate(**inputs)[0], rtol=1e-4, atol=1e-4)
    # and ran the three layers as one: their scales were joined for the codes they are rows of
    assert gathered(fused.transformer_blocks[0].attn) in kernels._joined_scales_cache


def test_replaced_layers_and_swapped_storage_are_run_as_they_are():
    separate, fused, _ = fused_pair()
    for model in (separate, fused):
        torch.manual_seed(7)
        model.single_transformer_blocks[1].attn.to_k = torch.nn.Linear(64, 64)  # no longer ternary
        attention = model.transformer_blocks[0].attn
        with torch.no_grad():
            attention.to_v.weight_packed.data = attention.to_v.weight_packed.flip(0).clone()
            attention.add_q_proj.weight_scale.data = attention.add_q_proj.weight_scale * 3
    assert torch.equal(forward(fused), forward(separate))


def test_a_fused_model_pickles_copies_and_is_freed_when_deleted():
    """A copy or a pickle runs its own layers; a deleted fused model frees its codes at once, without waiting
    for Python's garbage collector (a model reloaded on a GPU needs that memory)."""
    import copy
    import gc
    import weakref

    separate, fused, _ = fused_pair()
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(fused)
    for model in (loaded, twin):
        assert isinstance(model.transformer_blocks[0].attn.to_qkv, FusedProjection)
        assert model.transformer_blocks[0].attn.to_qkv.layers()[0] is model.transformer_blocks[0].attn.to_q
        assert torch.equal(forward(model), forward(separate))
    forward(fused)
    codes = weakref.ref(fused.transformer_blocks[0].attn.to_q.weight_packed._base)
    gc.disable()
    try:
        del fused
        assert codes() is None
    finally:
        gc.enable()


def test_a_fused_projection_that_outlived_its_attention_says_so_and_so_do_its_copies():
    import copy

    _, fused, _ = fused_pair()
    projection = fused.transformer_blocks[0].attn.to_qkv
    del fused
    gc.collect()
    for orphan in (projection, copy.deepcopy(projection)):
        with pytest.raises(BitfluxError, match="outlived its attention module"):
            orphan(torch.zeros(1, 4))


def test_loaded_ternary_pipelines_are_fused():
    from bitflux.pipeline import demo_ternary_path, load_pipeline

    pipe = load_pipeline(demo_ternary_path(progress=False))
    attentions = [m for m in pipe.transformer.modules() if hasattr(m, "fused_projections")]
    assert attentions and all(m.fused_projections for m in attentions)


def test_biases_edited_through_data_are_seen():
    separate, fused, _ = fused_pair("channel")
    forward(fused)
    for model in (separate, fused):
        model.transformer_blocks[0].attn.to_k.bias.data.mul_(3)  # no version bump
    assert torch.equal(forward(fused), forward(separate))


def test_hooks_get_their_layers_own_output_and_other_hooks_their_own_call():
    separate, fused, _ = fused_pair()
    shapes = []
    for model in (separate, fused):
        model.transformer_blocks[0].attn.to_k.register_forward_hook(
            lambda module, args, out: shapes.append(out.view(-1).shape) or out * 2)
    assert torch.equal(forward(fused), forward(separate)) and shapes[0] == shapes[1]
    # a hook that removes itself, before another (as another thread's LoRA remove() may while a call runs)
    for model in (separate, fused):
        handle, layer = [], model.transformer_blocks[0].attn.to_q
        handle.append(layer.register_forward_hook(lambda module, args, out, handle=handle: handle[0].remove() or out * 3))
        layer.register_forward_hook(lambda module, args, out: out + 1)
    assert torch.equal(forward(fused), forward(separate)) and torch.equal(forward(fused), forward(separate))
    x = torch.randn(2, 64, requires_grad=True)
    called = []
    fused.transformer_blocks[1].attn.to_v.register_full_backward_hook(lambda *args: called.append(1))
    fused.transformer_blocks[1].attn.to_qkv(x).sum().backward()
    assert called and x.grad is not None


def test_a_repacked_model_is_gathered_before_it_is_compiled():
    _, fused, _ = fused_pair()
    set_packing(fused, "tq1")
    assert gathered(fused.transformer_blocks[0].attn) is not None


def test_codes_swapped_under_their_views_are_left_in_place():
    """diffusers' group offloading swaps buffers' storage (`.data =`) and finds them again by identity: a fused
    attention whose views were swapped so runs its layers one by one rather than replacing the buffers."""
    separate, fused, _ = fused_pair()
    attention = fused.transformer_blocks[0].attn
    held = [attention.to_q.weight_packed, attention.to_k.weight_packed, attention.to_v.weight_packed]
    for codes in held:
        codes.data = codes.clone()
    assert torch.equal(forward(fused), forward(separate))
    assert all(getattr(attention, name).weight_packed is codes for name, codes in zip(("to_q", "to_k", "to_v"), held))


@pytest.mark.parametrize("with_bias", [True, False])
def test_rows_of_one_tensor_or_not_give_the_separate_layers_result(with_bias):
    torch.manual_seed(0)
    layers = [TernaryLinear.from_linear(torch.nn.Linear(40, n, bias=with_bias), TernaryConfig()) for n in (8, 24, 16)]
    x = torch.randn(5, 40)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)

    def rows_call():
        return kernels.ternary_linear_rows(x, [layer.weight_packed for layer in layers],
                                           [layer.weight_scale for layer in layers],
                                           [layer.bias for layer in layers] if with_bias else None, 40, None, "tq2")

    assert consecutive_rows([layer.weight_packed for layer in layers]) is None
    torch.testing.assert_close(rows_call(), expected, rtol=1e-6, atol=1e-6)
    gather_codes(layers)
    assert consecutive_rows([layer.weight_packed for layer in layers]) is not None
    torch.testing.assert_close(rows_call(), expected, rtol=1e-6, atol=1e-6)
