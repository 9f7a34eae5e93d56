import pytest
import torch
from conftest import TINY_CONFIG, build_tiny

from bitflux import BitfluxError, flux
from bitflux.flux import build_transformer


def _original_random(double=2, single=2, width=3072, cols=8, head_dim=32, seed=0):
    """A random state dict in the original single-file layout. Row counts of single blocks follow
    FLUX.1 (diffusers' converter hard-codes width 3072 there); column counts are tiny to keep it small."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    sd = {}
    for name, shape in {"img_in": (width, cols), "txt_in": (width, cols), "time_in.in_layer": (width, cols),
                        "time_in.out_layer": (width, cols), "vector_in.in_layer": (width, cols),
                        "vector_in.out_layer": (width, cols), "guidance_in.in_layer": (width, cols),
                        "guidance_in.out_layer": (width, cols), "final_layer.linear": (cols, cols),
                        "final_layer.adaLN_modulation.1": (2 * cols, cols)}.items():
        sd[f"{name}.weight"], sd[f"{name}.bias"] = r(*shape), r(shape[0])
    for i in range(double):
        p = f"double_blocks.{i}."
        for name, rows in {"img_mod.lin": 6 * cols, "txt_mod.lin": 6 * cols, "img_attn.qkv": 3 * cols,
                           "txt_attn.qkv": 3 * cols, "img_attn.proj": cols, "txt_attn.proj": cols,
                           "img_mlp.0": 4 * cols, "img_mlp.2": cols, "txt_mlp.0": 4 * cols, "txt_mlp.2": cols}.items():
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = r(rows, cols), r(rows)
        for n in ("img_attn", "txt_attn"):
            for q in ("query_norm", "key_norm"):
                sd[f"{p}{n}.norm.{q}.scale"] = r(head_dim)
    for i in range(single):
        p = f"single_blocks.{i}."
        for name, rows in {"linear1": 7 * width, "linear2": width, "modulation.lin": 3 * cols}.items():
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = r(rows, cols), r(rows)
        for q in ("query_norm", "key_norm"):
            sd[f"{p}norm.{q}.scale"] = r(head_dim)
    return sd


def test_original_conversion_equals_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    original = _original_random()
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    ours = {}
    width = flux.original_width({k: v.shape for k, v in original.items()})
    for key, tensor in original.items():  # tensor by tensor, as the streaming converter does
        ours.update(flux.convert_original_tensor(key, tensor, width))
    assert set(ours) == set(expected)
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key


def test_original_prefix_is_accepted():
    original = _original_random(1, 1)
    prefixed = {"model.diffusion_model." + k: v for k, v in original.items()}
    width = flux.original_width({k: v.shape for k, v in prefixed.items()})
    for key, tensor in prefixed.items():
        plain = flux.convert_original_tensor(key[len("model.diffusion_model."):], tensor, width)
        assert flux.convert_original_tensor(key, tensor, width).keys() == plain.keys()


def test_diffusers_to_original_round_trip_and_config():
    model = build_tiny()
    state = model.state_dict()
    original = flux.diffusers_to_original(state)
    assert flux.is_original_layout(original)
    assert flux.config_from_original_shapes({k: v.shape for k, v in original.items()}) == {
        k: v for k, v in TINY_CONFIG.items() if k != "patch_size"} | {"patch_size": 1}
    back = {}
    for key, tensor in original.items():
        back.update(flux.convert_original_tensor(key, tensor, flux.original_width({k: v.shape for k, v in original.items()})))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_a_conditioned_flux_gets_its_output_channels():
    """FLUX.1 Fill, Canny and Depth take their conditioning as more input channels than they put out."""
    config = dict(TINY_CONFIG, out_channels=16, in_channels=48)
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**{k: v for k, v in config.items() if k != "_class_name"})
    original = flux.diffusers_to_original(model.state_dict())
    inferred = flux.config_from_original_shapes({k: v.shape for k, v in original.items()})
    assert inferred["in_channels"] == 48 and inferred["out_channels"] == 16
    assert FluxTransformer2DModel(**{k: v for k, v in inferred.items() if k != "_class_name"}).proj_out.out_features == 16


def test_a_fused_tensor_lacking_a_part_is_named():
    import pytest

    from bitflux import BitfluxError

    with pytest.raises(BitfluxError, match=r"'double_blocks.0.img_attn.qkv.weight' .*attn.to_k, attn.to_v missing"):
        flux.diffusers_to_original({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("damage,words", [
    ({"axes_dims_rope": [1, 2]}, r"axes_dims_rope \[1, 2\] must be even sizes adding up to attention_head_dim 32"),
    ({"axes_dims_rope": [-16, 24, 24]}, r"must be even sizes adding up to attention_head_dim 32"),
    ({"axes_dims_rope": [2, 15, 15]}, r"must be even sizes adding up to attention_head_dim 32"),
    ({"num_layers": 10**9}, r"num_layers 1000000000 is not a size of a FLUX transformer \(0 .. 1024\)"),
    ({"attention_head_dim": 0, "axes_dims_rope": []}, r"attention_head_dim 0 is not a size of a FLUX transformer \(2 .. 4096\)"),
    ({"num_attention_heads": 0}, r"num_attention_heads 0 is not a size"),
    ({"attention_head_dim": "32"}, "attention_head_dim '32' is not a size"),
])
def test_a_config_no_flux_transformer_could_have_is_refused_before_one_is_built(damage, words):
    """A damaged config.json: its model would fail at its first forward, or take all memory while it is built."""
    with pytest.raises(BitfluxError, match=words):
        build_transformer({**TINY_CONFIG, **damage})
