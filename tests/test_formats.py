import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitflux import formats


@settings(max_examples=200, deadline=None)
@given(
    out_features=st.integers(1, 13),
    in_features=st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 3, 5, 7, 31, 97, 257, 3072])),
    fmt=st.sampled_from(["tq2", "tq1"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_bit_exact(out_features, in_features, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (out_features, in_features), generator=g, dtype=torch.int8)
    packed = formats.pack(codes, fmt)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == formats.packed_shape(out_features, in_features, fmt)
    assert torch.equal(formats.unpack(packed, in_features, fmt), codes)
    other = "tq1" if fmt == "tq2" else "tq2"
    assert torch.equal(formats.convert(packed, in_features, fmt, other), formats.pack(codes, other))


def test_tq2_byte_layout():
    # codes -1, 0, +1, +1 -> digits 0, 1, 2, 2 -> 0 + 1*4 + 2*16 + 2*64 = 164
    codes = torch.tensor([[-1, 0, 1, 1, 1]], dtype=torch.int8)
    assert formats.pack(codes, "tq2").tolist() == [[164, 0b01010110]]


def test_tq1_byte_layout():
    # digits 0, 1, 2, 2, 1 -> 0 + 3 + 18 + 54 + 81 = 156; padding digits are 1 (w = 0)
    codes = torch.tensor([[-1, 0, 1, 1, 0, 1]], dtype=torch.int8)
    assert formats.pack(codes, "tq1").tolist() == [[156, 2 + 3 + 9 + 27 + 81]]
    assert formats.pack(torch.ones(1, 5, dtype=torch.int8), "tq1").max().item() == 242


@pytest.mark.parametrize("fmt,bits", [("tq2", 2.0), ("tq1", 1.6)])
def test_bits_per_weight(fmt, bits):
    assert formats.packed_nbytes(3072, 3072, fmt) * 8 / (3072 * 3072) == pytest.approx(bits, abs=2e-3)  # row padding
