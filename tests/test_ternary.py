import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitflux.ternary import dequantize, relative_error, ternarize

METHODS = ["absmean", "twn", "lsq"]


def _matrix(kind: str, out_features=96, in_features=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        w = torch.randn(out_features, in_features, generator=g)
    else:
        w = torch.distributions.Laplace(0.0, 1.0).sample((out_features, in_features))
    # Real weights have channel-wise and group-wise spread; without it finer scales cannot help.
    row_scale = torch.exp(torch.randn(out_features, 1, generator=g))
    col_scale = torch.exp(0.5 * torch.randn(1, in_features, generator=g))
    return w * row_scale * col_scale


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_error_order_by_method(kind, granularity):
    torch.manual_seed(0)
    w = _matrix(kind)
    err = {m: relative_error(w, *ternarize(w, m, granularity, 64), 64) for m in METHODS}
    assert err["lsq"] <= err["twn"] + 1e-6 <= err["absmean"] + 1e-6, err


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
@pytest.mark.parametrize("method", METHODS)
def test_error_order_by_granularity(kind, method):
    w = _matrix(kind)
    err = {g: relative_error(w, *ternarize(w, method, g, 64), 64) for g in ["tensor", "channel", "group"]}
    assert err["group"] <= err["channel"] <= err["tensor"], err


def test_absmean_is_bitnet_b158():
    w = torch.tensor([[0.1, -0.5, 2.0, 0.0], [1.0, -1.0, 0.2, -0.05]])
    codes, scales = ternarize(w, "absmean", "tensor")
    gamma = w.abs().mean()
    assert torch.allclose(scales, gamma.reshape(1, 1))
    assert torch.equal(codes, torch.clamp(torch.round(w / gamma), -1, 1).to(torch.int8))


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 9),
    in_features=st.integers(1, 70),
    method=st.sampled_from(METHODS),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    group_size=st.sampled_from([1, 3, 8, 64]),
)
def test_shapes_and_code_range(out_features, in_features, method, granularity, group_size):
    w = torch.randn(out_features, in_features)
    codes, scales = ternarize(w, method, granularity, group_size)
    assert codes.shape == w.shape and codes.dtype == torch.int8
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    expected = {"tensor": (1, 1), "channel": (out_features, 1),
                "group": (out_features, -(-in_features // group_size))}[granularity]
    assert tuple(scales.shape) == expected
    assert torch.isfinite(dequantize(codes, scales, group_size)).all()


def test_zero_weight_is_finite():
    codes, scales = ternarize(torch.zeros(4, 8), "lsq", "channel")
    assert torch.equal(codes, torch.zeros(4, 8, dtype=torch.int8))
    assert torch.isfinite(scales).all()


@pytest.mark.parametrize("method", ["twn", "lsq"])
def test_a_row_of_tiny_weights_keeps_its_own_scale(method):
    """twn and lsq scale a row by the mean of the weights they keep, however small: a floor on it scaled a row of
    1e-11 weights up 1000x. Calibration's rounding step reproduces the codes there too."""
    from bitflux.calibrate.latent import rounding_step

    weight = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    weight[1] *= 1e-11
    codes, scales = ternarize(weight, method, "channel")
    assert relative_error(weight[1:], codes[1:], scales[1:]) < 0.5
    step = rounding_step(weight, codes, "channel", None)
    assert torch.equal(torch.clamp(torch.round(weight / step), -1, 1).to(torch.int8), codes)


@pytest.mark.parametrize("method", ["absmean", "twn", "lsq"])
def test_a_group_wider_than_the_rows_is_the_row(method):
    """group:N with N past in_features: one group a row, as per channel, without padding rows to N (a group of
    10^8 asked for 25 GB before)."""
    weight = torch.randn(6, 40)
    codes, scales = ternarize(weight, method, "group", 10**8)
    channel_codes, channel_scales = ternarize(weight, method, "channel", None)
    assert torch.equal(codes, channel_codes) and torch.equal(scales, channel_scales)
    assert torch.equal(dequantize(codes, scales, 10**8), dequantize(channel_codes, channel_scales))
