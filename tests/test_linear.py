import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitflux import BitfluxError, TernaryConfig, TernaryLinear, formats
from bitflux.kernels import select_backend, unavailable_reason, use_backend

# Reference backend vs F.linear on the dequantized weight: same math, so only summation order differs.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 130), (33, 97)])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:16"])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_dequantized_linear(dtype, shape, granularity, bias):
    out_features, in_features = shape
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    config = TernaryConfig(**TernaryConfig.parse_granularity(granularity))
    layer = TernaryLinear.from_linear(linear, config).to(dtype)
    x = torch.randn(2, 5, in_features, dtype=dtype)
    with use_backend("reference"):
        y = layer(x)
    expected = nn.functional.linear(x.float(), layer.dequantize(torch.float32),
                                    None if layer.bias is None else layer.bias.float())
    assert y.dtype == dtype and y.shape == (2, 5, out_features)
    tol = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    assert (y.float() - expected).abs().max().item() <= tol


def test_meta_device_module_and_forward():
    with torch.device("meta"):
        linear = nn.Linear(3072, 12288)
    layer = TernaryLinear.from_linear(linear, TernaryConfig(granularity="channel"))
    assert layer.weight_packed.shape == (12288, 768) and layer.weight_packed.is_meta
    assert layer.weight_scale.shape == (12288, 1)
    y = layer(torch.empty(4, 3072, device="meta"))
    assert y.shape == (4, 12288) and y.is_meta


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activations", ["a16", "a8"])
@pytest.mark.parametrize("in_features", [1, 7, 33, 130])
def test_tq1_layer_computes_what_the_tq2_layer_of_its_codes_does(backend, activations, in_features):
    if unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend} is not available here")
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (24, in_features), dtype=torch.int8)
    scales, bias = torch.rand(24, 1) + 0.05, torch.randn(24)
    tq2, tq1 = (TernaryLinear.from_codes(codes, scales, bias, config=TernaryConfig(format=fmt, activations=activations))
                for fmt in ("tq2", "tq1"))
    assert tq1.packing == "tq1" and tq1.weight_packed.shape == (24, -(-in_features // 5))
    assert torch.equal(tq1.codes(), codes)
    x = torch.randn(3, in_features)
    with torch.no_grad(), use_backend(backend):
        assert select_backend(x, tq1.ternary_weight, activations).NAME == backend
        assert torch.equal(tq1(x), tq2(x))


def test_packing_follows_the_config_and_bad_names_are_refused():
    with torch.device("meta"):
        linear = nn.Linear(33, 8)
    layer = TernaryLinear.from_linear(linear, TernaryConfig(format="tq1"))
    assert layer.packing == "tq1" and layer.weight_packed.shape == (8, 7) and "packing=tq1" in repr(layer)
    assert torch.equal(TernaryLinear(33, 8, packing="tq1").codes(), torch.zeros(8, 33, dtype=torch.int8))
    with pytest.raises(BitfluxError, match="unknown packing 'tq3'; choose one of tq2, tq1"):
        TernaryLinear(33, 8, packing="tq3")


def test_a_set_of_patterns_is_held_in_one_order():
    """Its order would change from run to run, and with it config.json, a calibration workdir's manifest and the
    demo's cache key."""
    assert TernaryConfig(exclude={"norm", r"\.proj_out", "ff_context"}).exclude == (r"\.proj_out", "ff_context", "norm")


@pytest.mark.parametrize("data,message", [
    ({"include": ["attn.(to_q"]}, "bad include/exclude pattern 'attn.\\(to_q'"),
    ({"exclude": [3]}, "bad include/exclude pattern 3"),
    ({"include": None}, "include must be a pattern or a list of them, got None"),  # a config.json's null
    ({"exclude": 5}, "exclude must be a pattern or a list of them, got 5"),
    ({"include": b"^x"}, "include must be a pattern or a list of them, got b'\\^x'"),
])
def test_config_patterns_are_checked(data, message):
    with pytest.raises(BitfluxError, match=message):
        TernaryConfig(**data)
    with pytest.raises(BitfluxError, match="must be a JSON object, found str"):
        TernaryConfig.from_dict("tq2")


def test_bytes_of_the_other_packing_are_refused_with_the_reason():
    tq2 = TernaryLinear.from_linear(nn.Linear(33, 8))
    tq1 = TernaryLinear(33, 8, packing="tq1")
    with pytest.raises(BitfluxError, match=r"weight_packed has shape \(8, 9\); this tq1 layer \(33 inputs\) takes "
                                           r"\(8, 7\): repack the codes with formats.convert"):
        tq1.load_state_dict(tq2.state_dict())
    tq2_bytes = formats.convert(tq1.weight_packed, 33, "tq1", "tq2")
    tq2.load_state_dict({**tq2.state_dict(), "weight_packed": tq2_bytes})  # repacked: accepted
    assert torch.equal(tq2.codes(), tq1.codes())


def test_state_dict_keys_and_dtypes():
    layer = TernaryLinear.from_linear(nn.Linear(10, 6), TernaryConfig(granularity="group", group_size=4))
    sd = layer.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "bias"}
    assert sd["weight_packed"].dtype == torch.uint8 and sd["weight_packed"].shape == (6, 3)
    assert sd["weight_scale"].shape == (6, 3)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("cast,bias_dtype", [(lambda m: m.to(torch.bfloat16), torch.bfloat16),
                                             (lambda m: m.half(), torch.float16), (lambda m: m.float(), torch.float32),
                                             (lambda m: m.to("cpu", torch.float64), torch.float64),
                                             (lambda m: m.to("meta"), torch.float32)])
def test_casts_move_the_scales_but_keep_their_dtype_and_values(scale_dtype, cast, bias_dtype):
    """A model's .to(dtype) sets what it computes in; the scales stay in the config's scale_dtype, unrounded."""
    torch.manual_seed(0)
    layer = TernaryLinear.from_linear(nn.Linear(40, 24), TernaryConfig(granularity="channel", scale_dtype=scale_dtype))
    scales = layer.weight_scale.clone()
    cast(layer)
    assert layer.weight_scale.dtype == scales.dtype and layer.weight_packed.dtype == torch.uint8
    assert layer.bias.dtype == bias_dtype
    if layer.weight_scale.is_meta:
        assert layer.weight_scale.shape == scales.shape and layer.bias.is_meta
    else:
        assert torch.equal(layer.weight_scale, scales)


CPU_BACKENDS = ["auto", "reference"]  # auto: the C kernel where it is built


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weights_written_in_place_after_a_forward_are_used(backend):
    """load_state_dict copies into the existing buffers: a backend's prepared (repacked) weight must not
    outlive them."""
    torch.manual_seed(0)
    layer, other = (TernaryLinear.from_linear(nn.Linear(64, 32), TernaryConfig(granularity="channel"))
                    for _ in range(2))
    x = torch.randn(3, 64)
    with torch.no_grad(), use_backend(backend):
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activations,granularity,fmt", [("a16", "channel", "tq2"), ("a8", "group:32", "tq2"),
                                                        ("fp8", "tensor", "tq2"), ("a8", "group:32", "tq1")])
def test_torch_compile_takes_ternary_layers_whole(backend, activations, granularity, fmt):
    """torch.compile(fullgraph=True) traces a ternary layer as one operator (no graph break) and computes
    exactly what the eager layer does."""
    torch.manual_seed(0)
    config = TernaryConfig(activations=activations, format=fmt, **TernaryConfig.parse_granularity(granularity))
    layer = TernaryLinear.from_linear(nn.Linear(96, 40), config)
    x = torch.randn(2, 7, 96)
    with torch.no_grad(), use_backend(backend):
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_torch_compile_with_gradients_traces_the_reference():
    """Inputs that need a gradient (LoRA training) take the traceable reference path: same values, and the
    gradient flows to x."""
    torch.manual_seed(0)
    layer = TernaryLinear.from_linear(nn.Linear(32, 16))
    x = torch.randn(4, 32, requires_grad=True)
    out = torch.compile(layer, fullgraph=True)(x)
    out.sum().backward()
    with use_backend("reference"):
        torch.testing.assert_close(out, layer(x))
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(4, -1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layers_made_in_inference_mode_run(backend):
    with torch.inference_mode():
        layer = TernaryLinear.from_linear(nn.Linear(64, 32))
        with use_backend(backend):
            assert layer(torch.randn(2, 64)).shape == (2, 32)


def test_compiled_layers_use_and_free_their_own_prepared_weights():
    """The compiled operator finds a layer's prepared weight by its bytes: made once, and nothing outlives the
    layer."""
    import gc
    import weakref

    from bitflux import kernels

    if kernels.unavailable_reason("cpu") is not None:
        pytest.skip("the C kernel (the backend that prepares a weight on a CPU) is not built here")
    layer = TernaryLinear.from_linear(nn.Linear(64, 32))
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(3, 64))
        first = kernels._prepared[layer.weight_packed]
        with torch._dynamo.config.patch(error_on_recompile=True):  # a filled cache is no reason to recompile
            compiled(torch.randn(3, 64))
        assert kernels._prepared[layer.weight_packed] is first
    packed = weakref.ref(layer.weight_packed)
    del layer, compiled, first
    torch._dynamo.reset()
    gc.collect()
    assert packed() is None and len(kernels._prepared) == 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_blocks_share_one_graph(backend):
    """Compiling block by block (diffusers' compile_repeated_blocks): layers of the same shape reuse the first
    one's graph; nothing per layer is baked into it."""
    from bitflux.kernels import unavailable_reason

    if unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend} is not available here")
    torch.manual_seed(0)
    blocks = [TernaryLinear.from_linear(nn.Linear(64, 32)) for _ in range(3)]
    for block in blocks:
        block.compile(fullgraph=True)
    x = torch.randn(3, 64)
    with torch.no_grad(), use_backend(backend):
        blocks[0](x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for block in blocks[1:]:
                assert torch.equal(block(x), block.forward(x))  # forward itself: not compiled


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_load_state_dict_in_inference_mode_is_seen(backend):
    """Tensors made under inference_mode keep no version counter: load_state_dict forgets what was prepared."""
    torch.manual_seed(0)
    with torch.inference_mode(), use_backend(backend):
        layer, other = (TernaryLinear.from_linear(nn.Linear(64, 32), TernaryConfig(granularity="channel"))
                        for _ in range(2))
        x = torch.randn(3, 64)
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swapped_or_replaced_buffers_are_used(backend):
    """Storage swapped under the same tensor (`.data = ...`) and scales replaced by a new tensor (which may
    take the freed one's address) are both seen."""
    torch.manual_seed(0)
    layer, other = (TernaryLinear.from_linear(nn.Linear(64, 32, bias=False), TernaryConfig(granularity="channel"))
                    for _ in range(2))
    x = torch.randn(3, 64)
    with torch.no_grad(), use_backend(backend):
        layer(x)
        layer.weight_packed.data = other.weight_packed.clone()
        layer.weight_scale = other.weight_scale.clone()
        assert torch.equal(layer(x), other(x))
        layer.weight_scale = None
        layer.weight_scale = other.weight_scale * 2
        assert torch.equal(layer(x), 2 * other(x))


@pytest.mark.parametrize("activations", ["a8", "fp8"])
def test_quantized_activations_pass_a_straight_through_gradient(activations):
    """An input needing a gradient (a LoRA trained on the ternary model) goes to the reference backend: its
    value is the quantized activations', its gradient that of x W^T, as if rounding were the identity. The
    int8 cast used to cut the graph (one nonzero gradient per token, through the absmax)."""
    layer = TernaryLinear.from_linear(nn.Linear(48, 16), TernaryConfig(activations=activations))
    x = torch.randn(3, 48, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        assert torch.equal(out, layer(x))
    out.pow(2).sum().backward()
    dense = x.detach().clone().requires_grad_()
    F.linear(dense, layer.dequantize()).mul(out.detach() * 2).sum().backward()
    assert torch.allclose(x.grad, dense.grad, atol=1e-6)


@pytest.mark.parametrize("activations", ["a16", "a8", "fp8"])
@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32)])
def test_no_tokens_give_no_outputs(activations, shape):
    layer = TernaryLinear.from_linear(nn.Linear(32, 8), TernaryConfig(activations=activations))
    for backend in ("reference", "auto"):
        with use_backend(backend):
            assert layer(torch.randn(shape)).shape == (*shape[:-1], 8)


@pytest.mark.parametrize("x", [torch.ones(2, 32, dtype=torch.int64), torch.ones(2, 16), torch.tensor(1.0)])
def test_inputs_a_linear_layer_would_refuse_are_refused(x):
    """Integer inputs (a16 returned zeros, a8 truncated numbers) and a wrong last dimension (a reshape error
    on the CPU, or silently no output with no tokens): one line, on every backend."""
    layer = TernaryLinear.from_linear(nn.Linear(32, 8))
    with pytest.raises(BitfluxError, match="takes floating-point inputs whose last dimension is 32"):
        layer(x)
