"""The Triton backend against the reference backend: compiled on a GPU when there is one, otherwise
under Triton's interpreter (TRITON_INTERPRET=1) on the CPU at small shapes.

W1.58A8 is checked bit for bit: with power-of-two weight scales every float step after the int32 sums
is exact or rounded identically, so equal outputs mean equal integer results; unit scales check the int32
sums alone. W1.58A16 is checked to float tolerance (the kernel applies per-tensor/channel scales in fp32,
the reference in the input dtype). fp8 sums are not exact in fp32, so fp8 is checked to a tolerance.

The a8 truth is computed on the CPU: on CUDA, PyTorch divides a tensor by a Python number as a multiply
by its rounded reciprocal (BinaryDivTrueKernel.cu), so reference.quantize_activations' `/ 127.0` gives a
scale 1 ulp off the correctly rounded quotient for about 5 % of rows there; the kernels divide exactly.
"""

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, conftest.py has set TRITON_INTERPRET=1

from bitflux import TernaryConfig, TernaryLinear, formats, kernels, ternary  # noqa: E402
from bitflux.kernels import TernaryWeight, reference  # noqa: E402
from bitflux.kernels import triton as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (M, K, N): K and N off the tile sizes, M = 1, a partial small tile, a partial large tile. Without a
# GPU's timing each call takes its default strategy (gemv at one token, split-K up to 16, then cuBLAS or, for
# a8, the tile kernel on expanded codes); on a GPU the fastest is measured. (130, 256, 144) is one that every
# strategy for many tokens, cuBLAS's 8-bit GEMMs included, takes.
SHAPES = [(1, 130, 20), (5, 300, 70), (17, 384, 33), (130, 256, 129)]
DENSE_SHAPE = (130, 256, 144)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALES = [("tensor", None), ("channel", None), ("group", 128)]
# Relative tolerance per dtype, against the largest output magnitude.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# On a GPU every distinct case is a compile (seconds), so the cases form a Latin square rather than a
# full product: every (shape, dtype), (shape, scales) and (dtype, scales) pair still occurs.
A16_CASES = [(shape, dtype, SCALES[(i + j) % 3]) for i, shape in enumerate(SHAPES) for j, dtype in enumerate(DTYPES)]
A8_EXACT_CASES = [(shape, scales) for i, shape in enumerate(SHAPES + [DENSE_SHAPE])
                  for scales in (SCALES + [("group", 256)])[i % 2::2]]
FP8_CASES = [(shape, dtype, SCALES[(i + j) % 2]) for i, shape in enumerate(SHAPES + [DENSE_SHAPE])
             for j, dtype in enumerate(DTYPES) if (i + j) % 2 == 0 or shape == DENSE_SHAPE]


def _layer(scale_mode, k, n, packing="tq2"):
    """What strategies() reads of a prepared weight."""
    return SimpleNamespace(scale_mode=scale_mode, in_features=k, out_features=n, tq1=packing == "tq1")


def _strategy_cases():
    """(shape, activations, scales, dtype, packing, strategy) for every strategy each shape offers; scales
    and dtype rotate (a8 stays fp32 for bit-exact outputs)."""
    scale_modes = {"tensor": tk._SCALE_TENSOR, "channel": tk._SCALE_CHANNEL, "group": tk._SCALE_GROUP}
    cases = []
    for i, (m, k, n) in enumerate([(1, 130, 20), (3, 300, 70), (17, 384, 33), DENSE_SHAPE]):
        for j, activations in enumerate(("a16", "a8", "fp8")):
            for g, scales in enumerate(SCALES):
                if activations == "fp8" and scales[0] == "group":
                    continue
                dtype = torch.float32 if activations == "a8" else DTYPES[(i + j + g) % 3]
                for packing in formats.CODES_PER_BYTE:
                    layer = _layer(scale_modes[scales[0]], k, n, packing)
                    cases += [((m, k, n), activations, scales, dtype, packing, name)
                              for name in tk.strategies(m, layer, activations, dtype)]
    return cases


def _weight(n, k, granularity="tensor", group_size=None, power_of_two=False, seed=0, packing="tq2"):
    gen = torch.Generator().manual_seed(seed)
    codes, scales = ternary.ternarize(torch.randn(n, k, generator=gen), "absmean", granularity, group_size)
    if power_of_two:
        scales = 2.0 ** torch.randint(-2, 3, scales.shape, generator=gen).float()
    return TernaryWeight(formats.pack(codes, packing).to(DEVICE), scales.to(DEVICE), k, n, group_size, packing)


def _activations(m, k, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)


def _on_cpu(fn, *tensors):
    """fn on CPU copies, the result moved back: the device-independent truth (see the module doc)."""
    out = fn(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors])
    return out.to(DEVICE)


def _cpu_weight(weight):
    return TernaryWeight(weight.packed.cpu(), weight.scales.cpu(), weight.in_features, weight.out_features,
                         weight.group_size, weight.packing)


def _assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype] * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol)


def test_prepare_keeps_the_layers_bytes():
    weight = _weight(16, 256, "group", 128)
    prepared = tk.prepare(weight)
    assert prepared.packed.data_ptr() == weight.packed.data_ptr()  # no second copy of the weights
    assert prepared.scales.dtype == torch.float32 and prepared.scales.shape == (16, 2)


def test_a_prepared_weight_refers_to_its_bytes_without_keeping_them():
    """The bytes are the layer's: once they are gone, a prepared weight says so instead of failing later."""
    import gc

    prepared = tk.prepare(_weight(16, 256))
    gc.collect()
    with pytest.raises(RuntimeError, match="are gone"):
        tk.linear(_activations(2, 256, torch.float32), prepared, None, "a16")


@pytest.fixture(params=["one pass", "two passes", "two passes, long rows"])
def quantizer_passes(request, monkeypatch):
    """Each path of the activation quantizer: whole rows in registers, and (more rows than the threshold,
    lowered here) two passes over blocks of QUANTIZE_BLOCKS[0] columns, or of QUANTIZE_BLOCKS[1] for rows
    past 4096 columns (made as small here, so that the test's rows of 2500 take them)."""
    if request.param != "one pass":
        monkeypatch.setattr(tk, "_ONE_PASS_ROWS", 0)
    if request.param == "two passes, long rows":
        monkeypatch.setattr(tk, "QUANTIZE_BLOCKS", (1 << 20, 512))
        monkeypatch.setattr(tk, "_LONG_ROWS", 2048)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_activations_is_bit_identical(dtype, quantizer_passes):
    x = _activations(6, 2500, dtype)  # two passes: K spans three blocks of each row (five of the long rows')
    x[1] = 0.0
    x[2, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: exact ties must round half to even
    x[2, 4:] = 0.0
    q, scale = tk.quantize_activations(x)
    q_ref, scale_ref = reference.quantize_activations(x.cpu())
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(scale.cpu(), scale_ref.reshape(-1))


@pytest.mark.parametrize("fp8", [False, True])
def test_plane_major_quantization_is_a_column_permutation(fp8, quantizer_passes):
    """The quantizer's plane-major output is plane_major() of its natural output: column PLANE p + j of each
    block of 4 x PLANE holds column 4j + p, zero-padded to whole blocks (K = 300: two blocks)."""
    x = _activations(3, 300, torch.bfloat16)
    natural, scale = tk.quantize_activations(x, fp8=fp8)
    planar, planar_scale = tk.quantize_activations(x, fp8=fp8, plane_major=True)
    assert planar.shape == (3, 8 * tk.PLANE) and torch.equal(planar_scale, scale)
    assert torch.equal(planar.view(torch.uint8), tk.plane_major(natural.view(torch.uint8)))
    columns = torch.arange(300, dtype=torch.float32)[None]
    assert tk.plane_major(columns)[0, tk.PLANE + 5].item() == 4 * 5 + 1  # plane 1, byte 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8_matches_torch_cast(dtype, quantizer_passes):
    x = _activations(5, 2500, dtype)
    x[1] = 0.0
    x[2] *= 1e-3  # scale small: many values land in e4m3's subnormal range after division
    # scale 1: exact ties between e4m3 neighbours (17 -> 16, 19 -> 20, 0.5 * 2^-9 -> 0) and subnormals
    x[3, :7] = torch.tensor([448.0, 17.0, 19.0, 2.0**-10, 3 * 2.0**-10, -0.0048828125, 1.5 * 2.0**-6])
    x[3, 7:] = 0.0
    q, scale = tk.quantize_activations(x, fp8=True)
    assert q.dtype == torch.float8_e4m3fn
    expected, expected_scale = reference.quantize_activations(x.cpu(), fp8=True)
    assert torch.equal(scale.cpu(), expected_scale.reshape(-1))
    assert torch.equal(q.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("packing", formats.CODES_PER_BYTE)
@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_expand_writes_the_codes(dtype, scales, packing):
    granularity, group_size = scales
    weight = _weight(40, 390, granularity, group_size, packing=packing)  # K off the block, N off the block
    codes = formats.unpack(weight.packed.cpu(), 390, packing)
    dense = tk.expand(tk.prepare(weight), dtype)
    assert torch.equal(dense.cpu().float(), codes.float())


@pytest.mark.parametrize("packing", formats.CODES_PER_BYTE)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_expand_is_the_reference_dense_weight(dtype, granularity, packing):
    """a16 on cuBLAS multiplies a transient of code x scale: bit for bit the reference's dense weight (within
    bf16's last bit in the interpreter, whose fp32 -> bf16 conversion truncates)."""
    weight = _weight(40, 390, granularity, packing=packing)
    dense = tk.expand(tk.prepare(weight), dtype, scaled=True)
    expected = reference.dequantize(_cpu_weight(weight), dtype)
    assert dense.dtype == dtype
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        torch.testing.assert_close(dense.cpu(), expected, rtol=2.0**-7, atol=0.0)  # one bf16 step
    else:
        assert torch.equal(dense.cpu(), expected)


def test_tq1_digit_table_holds_every_bytes_digits():
    """Digit p of byte b at bits 2p, for all 256 bytes (past 242 as formats.unpack reads them)."""
    table = tk.tq1_digit_table(torch.device(DEVICE))
    digits = formats.unpack(torch.arange(256, dtype=torch.uint8).reshape(-1, 1), 5, "tq1").to(torch.int32) + 1
    assert table.dtype == torch.int16  # 512 bytes: 4 cache lines
    assert torch.equal(table.cpu().to(torch.int32), sum(digits[:, p] << (2 * p) for p in range(5)))


@pytest.mark.parametrize("strategy", ["expanded", "splitk", "gemv"])
def test_every_tq1_byte_decodes(strategy):
    """All 243 tq1 bytes, in a row long enough for two steps of the split-K kernels: decoded exactly as
    formats.unpack does, through the digit table (expanded, splitk) or by multiplies and shifts (gemv)."""
    k = 5 * 243 * 2
    packed = torch.arange(243, dtype=torch.uint8).repeat(2).flip(0).reshape(1, -1).repeat(3, 1)
    weight = TernaryWeight(packed.to(DEVICE), torch.ones(1, 1, device=DEVICE), k, 3, None, "tq1")
    codes = formats.unpack(packed, k, "tq1")
    if strategy == "expanded":
        assert torch.equal(tk.expand(tk.prepare(weight), torch.int8).cpu(), codes)
        return
    x = torch.zeros(1, k, device=DEVICE)
    for column in (0, 1, 2, 3, 4, 5 * 200 + 3, k - 1):  # one-hot rows read single codes back
        x.zero_()
        x[0, column] = 1.0
        out = tk.linear(x, tk.prepare(weight), None, "a16", strategy=strategy)
        assert torch.equal(out.cpu(), codes[:, column].float()[None, :])


def _halves(value: int, kind: str) -> list[float]:
    """The two 16-bit floats of a register (bf16x2 or f16x2), element 0 in the low half."""
    dtype = torch.bfloat16 if kind == "bf16x2" else torch.float16
    bits = torch.tensor([value & 0xFFFF, value >> 16], dtype=torch.int32).to(torch.int16)  # wraps, bit for bit
    return bits.view(dtype).float().tolist()


def _from_halves(values: list[float], kind: str) -> int:
    dtype = torch.bfloat16 if kind == "bf16x2" else torch.float16
    bits = torch.tensor(values).to(dtype).view(torch.int16).int().tolist()
    register = (bits[0] & 0xFFFF) | (bits[1] & 0xFFFF) << 16
    assert _halves(register, kind) == values  # the results are exact: no rounding to model
    return register


def _run_ptx(asm: str, operands: list[int]) -> dict[str, int]:
    """The registers after running `asm` (one of the decode PTX strings; operands $0.. by position, outputs
    included) on one thread, by the PTX ISA's definitions of the few instructions it uses: no GPU runs the
    inline PTX in CI, so this checks its selectors, masks and constants."""
    regs = {f"${i}": value for i, value in enumerate(operands)}

    def read(operand: str) -> int:
        return regs[operand] if operand in regs else int(operand, 0) & 0xFFFFFFFF

    for statement in asm.strip("{} ").split(";"):
        op, _, args = statement.strip().partition(" ")
        if not op or op == ".reg":
            continue
        d, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            regs[d] = read(src[0])
        elif op == "shr.b32":
            regs[d] = read(src[0]) >> read(src[1])
        elif op in ("and.b32", "or.b32"):
            a, b = read(src[0]), read(src[1])
            regs[d] = a & b if op == "and.b32" else a | b
        elif op == "prmt.b32":  # default mode: selector nibble i picks byte i of d from the 8 bytes {b, a}
            pool, selector = read(src[0]) | read(src[1]) << 32, read(src[2])
            assert all(selector >> (4 * i + 3) & 1 == 0 for i in range(4))  # no sign replication wanted
            regs[d] = sum((pool >> (8 * (selector >> (4 * i) & 7)) & 0xFF) << (8 * i) for i in range(4))
        elif op.startswith("fma.rn."):
            kind = op.removeprefix("fma.rn.")
            a, b, c = (_halves(read(x), kind) for x in src)
            regs[d] = _from_halves([x * y + z for x, y, z in zip(a, b, c)], kind)
        else:
            raise AssertionError(f"no model of {op}")
    return regs


@pytest.mark.parametrize("shift", [0, 2, 4, 6])
@pytest.mark.parametrize("codes", ["bf16", "fp16", "int8", "e4m3"])
def test_ptx_decodes_every_tq2_byte(codes, shift):
    """The inline PTX of _plane_codes, run by the model above on every valid tq2 byte (digits 0-2) in each
    of a register's four places, beside random others: each element is the code of its own byte."""
    gen = torch.Generator().manual_seed(shift)
    valid = [b for b in range(256) if all(b >> (2 * p) & 3 != 3 for p in range(4))]
    asm = {"bf16": tk._PTX_BF16, "fp16": tk._PTX_FP16, "int8": tk._PTX_INT8, "e4m3": tk._PTX_E4M3}[codes].value
    for place in range(4):
        for byte in valid:
            row = [valid[i] for i in torch.randint(len(valid), (4,), generator=gen).tolist()]
            row[place] = byte
            word = sum(b << (8 * i) for i, b in enumerate(row))
            expected = [(b >> shift & 3) - 1 for b in row]
            if codes in ("bf16", "fp16"):
                regs = _run_ptx(asm, [0, 0, word, shift, shift, shift, shift])
                kind = "bf16x2" if codes == "bf16" else "f16x2"
                got = [v for r in ("$0", "$1") for v in _halves(regs[r], kind)]
            else:
                regs = _run_ptx(asm, [0, word, shift, shift, shift, shift])
                as_bytes = torch.tensor([regs["$0"] >> (8 * i) & 0xFF for i in range(4)], dtype=torch.uint8)
                got = as_bytes.view(torch.int8 if codes == "int8" else torch.float8_e4m3fn).float().tolist()
            assert got == expected, (codes, shift, hex(word))


@pytest.mark.parametrize("activations", ["a8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (17, 390, 40), (33, 513, 17)])
def test_expanded_operands_take_one_launch(activations, m, k, n, quantizer_passes, monkeypatch):
    """The GEMMs on expanded codes get quantized activations and codes from one launch (an eager forward
    pays the host per launch), bit-identical to quantizing and expanding apart."""
    weight, x = _weight(n, k, "channel"), _activations(m, k, torch.bfloat16)
    prepared = tk.prepare(weight)
    apart = (*tk.quantize_activations(x, fp8=activations == "fp8"),
             tk.expand(prepared, tk._operand_dtype(activations, x.dtype)))
    launches = []
    kernel = tk._operands_kernel
    monkeypatch.setattr(tk, "_operands_kernel", _CountingKernel(kernel, launches))
    together = tk._expanded_operands(x, prepared, activations)
    assert len(launches) == 1
    for a, b in zip(together, apart):  # compared as bytes: torch.equal knows no fp8
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class _CountingKernel:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("shape,scales", A8_EXACT_CASES)
def test_a8_equals_integer_reference_exactly(shape, scales):
    """Bit for bit with scales that are not powers of two: compiled, a multiply fused with the add after it (a
    group's sum into the accumulator) would show in the last bits."""
    (m, k, n), (granularity, group_size) = shape, scales
    weight = _weight(n, k, granularity, group_size)
    x = _activations(m, k, torch.float32)
    out = tk.linear(x, tk.prepare(weight), None, "a8")
    assert torch.equal(out, _on_cpu(reference.linear_a8, x, _cpu_weight(weight), None))


@pytest.mark.parametrize("shape", SHAPES + [DENSE_SHAPE])
def test_a8_integer_sums_are_exact(shape):
    """Unit scales: integer activations with max |x| = 127 per row quantize to themselves (scale 1), so
    the output is the int32 sum itself, whatever the float epilogue does."""
    m, k, n = shape
    weight = _weight(n, k, "channel", power_of_two=True)
    weight = TernaryWeight(weight.packed, torch.ones_like(weight.scales), k, n, None)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x[:, 0] = 127.0
    out = tk.linear(x.to(DEVICE), tk.prepare(weight), None, "a8")
    codes = formats.unpack(weight.packed.cpu(), k, "tq2")
    assert torch.equal(out.cpu(), reference.integer_matmul(x.to(torch.int8), codes).float())


@pytest.mark.parametrize("shape,dtype,scales", FP8_CASES)
def test_fp8_matches_reference(shape, dtype, scales):
    """fp32 sums of e4m3 values are not exact (and the dense path returns bf16 from _scaled_mm), so the
    tolerance is a few bf16 ulps of the largest output."""
    (m, k, n), (granularity, group_size) = shape, scales
    weight = _weight(n, k, granularity, group_size)
    x, bias = _activations(m, k, dtype), _activations(1, n, dtype, seed=2).reshape(-1)
    out = tk.linear(x, tk.prepare(weight), bias, "fp8")
    assert out.dtype == dtype and out.shape == (m, n)
    expected = _on_cpu(reference.linear_fp8, x, _cpu_weight(weight), bias)
    _assert_close(out, expected, torch.bfloat16)


def test_fp8_with_group_scales_is_left_to_the_reference():
    weight = _weight(16, 256, "group", 128)
    assert not tk.supports(_activations(2, 256, torch.bfloat16), weight, "fp8")


@pytest.mark.parametrize("dtype,scales", list(zip(DTYPES, SCALES)))
def test_a8_with_bias_matches_reference(dtype, scales):
    granularity, group_size = scales
    m, k, n = 5, 300, 70
    weight = _weight(n, k, granularity, group_size)
    x, bias = _activations(m, k, dtype), _activations(1, n, dtype, seed=2).reshape(-1)
    out = tk.linear(x, tk.prepare(weight), bias, "a8")
    assert out.dtype == dtype
    expected = _on_cpu(reference.linear_a8, x, _cpu_weight(weight), bias)
    if dtype == torch.float32:  # bit for bit, compiled too (no product fused with the bias's add)
        assert torch.equal(out, expected)
    else:  # only the last rounding, to 16 bits, may differ (the interpreter's cast truncates)
        torch.testing.assert_close(out.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("shape,dtype,scales", A16_CASES)
def test_a16_matches_reference(shape, dtype, scales):
    (m, k, n), (granularity, group_size) = shape, scales
    weight = _weight(n, k, granularity, group_size)
    x, bias = _activations(m, k, dtype), _activations(1, n, dtype, seed=2).reshape(-1)
    out = tk.linear(x, tk.prepare(weight), bias, "a16")
    assert out.dtype == dtype and out.shape == (m, n)
    _assert_close(out, reference.linear(x, weight, bias, "a16"), dtype)


def test_leading_dims_empty_and_strided_inputs():
    weight = _weight(40, 256, "channel")
    prepared = tk.prepare(weight)
    x = _activations(6, 256, torch.float16).reshape(2, 3, 256)
    out = tk.linear(x, prepared, None, "a16")
    assert out.shape == (2, 3, 40)
    _assert_close(out, reference.linear(x, weight, None, "a16"), torch.float16)
    assert tk.linear(x[:0], prepared, None, "a8").shape == (0, 3, 40)
    strided = _activations(256, 4, torch.float16).t()  # last dimension not contiguous
    _assert_close(tk.linear(strided, prepared, None, "a8"),
                  _on_cpu(reference.linear_a8, strided, _cpu_weight(weight), None), torch.float16)


@pytest.mark.parametrize("activations", ["a16", "a8"])
def test_ternary_linear_dispatches_to_triton(activations):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 48).to(torch.bfloat16)
    layer = TernaryLinear.from_linear(dense, TernaryConfig(granularity="channel", activations=activations)).to(DEVICE)
    x = _activations(3, 256, torch.bfloat16).reshape(1, 3, 256)
    with kernels.use_backend("triton"):
        assert kernels.select_backend(x, layer.ternary_weight, activations) is tk
        out = layer(x)
    _assert_close(out, reference.linear(x, layer.ternary_weight, layer.bias, activations), torch.bfloat16)


@pytest.mark.parametrize("activations,packing", [("a16", "tq2"), ("a8", "tq2"), ("a8", "tq1")])
def test_compiled_graph_runs_the_triton_kernels(activations, packing):
    """torch.compile (fullgraph) over ternary layers and the float ops between them: each layer is one
    operator that launches the Triton kernels, and the result equals the eager layers'."""
    torch.manual_seed(0)
    config = TernaryConfig(granularity="channel", activations=activations, format=packing)
    model = torch.nn.Sequential(TernaryLinear.from_linear(torch.nn.Linear(256, 64), config), torch.nn.ReLU(),
                                TernaryLinear.from_linear(torch.nn.Linear(64, 32), config)).to(DEVICE)
    x = _activations(17, 256, torch.float32)
    with torch.no_grad(), kernels.use_backend("triton"):
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=0, atol=0)


def test_inputs_that_need_a_gradient_take_the_reference():
    """The kernels have no backward: an input that needs a gradient (LoRA training through ternary layers)
    is computed by the reference backend, so the gradient reaches it."""
    layer = TernaryLinear.from_linear(torch.nn.Linear(64, 16)).to(DEVICE)
    x = _activations(3, 64, torch.float32).requires_grad_()
    with kernels.use_backend("triton"):
        assert kernels.select_backend(x, layer.ternary_weight, "a16") is reference
        layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(3, -1))


def test_groups_not_multiple_of_chunk_fall_back_to_reference():
    weight = _weight(16, 256, "group", 64)
    x = _activations(2, 256, torch.float32)
    assert not tk.supports(x, weight, "a16")  # 64 is not a multiple of tk.GROUP_MULTIPLE
    with kernels.use_backend("triton"):
        assert kernels.select_backend(x, weight, "a16") is reference


@pytest.mark.parametrize("shape,activations,scales,dtype,packing,strategy", _strategy_cases(), ids=str)
def test_every_strategy_matches_the_reference(shape, activations, scales, dtype, packing, strategy):
    """a8 bit for bit (fp32; compiled too: every product of its epilogue is rounded by itself, as the
    reference's), a16 and fp8 to tolerance; with a bias; tq2 and tq1."""
    (m, k, n), (granularity, group_size) = shape, scales
    weight = _weight(n, k, granularity, group_size, packing=packing)
    x = _activations(m, k, dtype)
    bias = _activations(1, n, dtype, seed=2).reshape(-1)
    out = tk.linear(x, tk.prepare(weight), bias, activations, strategy=strategy)
    assert out.dtype == dtype and out.shape == (m, n)
    if activations == "a8":
        assert torch.equal(out, _on_cpu(reference.linear_a8, x, _cpu_weight(weight), bias))
    elif activations == "fp8":
        _assert_close(out, _on_cpu(reference.linear_fp8, x, _cpu_weight(weight), bias), torch.bfloat16)
    else:
        _assert_close(out, reference.linear(x, weight, bias, "a16"), dtype)


@pytest.mark.parametrize("packing", ["tq2", "tq1"])
@pytest.mark.parametrize("activations", ["a16", "a8", "fp8"])
@pytest.mark.parametrize("strategy", ["gemv", "splitk"])
def test_whole_steps_read_the_codes_unmasked(strategy, activations, packing, monkeypatch):
    """K a whole number of split-K steps: the byte loads drop their masks (EVEN_K), rows past N read row
    N - 1 and each slice's prefetch past its end re-reads its last step; outputs unchanged. Small tiles
    make several steps, two K slices and a partial N tile."""
    monkeypatch.setattr(tk, "GEMV_TILE", (1, 8, 64, 4, 1))
    monkeypatch.setattr(tk, "SPLITK_TILE", (16, 8, 128, 4, 1))  # tq1: a tl.dot per plane of 32 bytes (int8 wants 32)
    step = (64 if strategy == "gemv" else 128) // 4 * formats.CODES_PER_BYTE[packing]
    m, k, n = (1 if strategy == "gemv" else 3), 4 * step, 20
    weight = _weight(n, k, "channel", power_of_two=activations == "a8", packing=packing)
    x = _activations(m, k, torch.float32 if activations == "a8" else torch.bfloat16)
    out = tk.linear(x, tk.prepare(weight), None, activations, strategy=strategy)
    if activations == "a8":
        assert torch.equal(out, _on_cpu(reference.linear_a8, x, _cpu_weight(weight), None))
    elif activations == "fp8":
        _assert_close(out, _on_cpu(reference.linear_fp8, x, _cpu_weight(weight), None), torch.bfloat16)
    else:
        _assert_close(out, reference.linear(x, weight, None, "a16"), torch.bfloat16)


def _ties(activations: str, k: int) -> torch.Tensor:
    """One row whose scale is exactly 1 (max |x| = 127 or 448) and whose values lie on the quantizer's rounding
    ties (halves for int8; midpoints of e4m3 neighbours, normal and subnormal, for fp8), beside random ones."""
    if activations == "a8":
        special = [127.0, -126.5, 2.5, -0.5, 1.5, 0.5, 3.5, -3.5]
    else:
        special = [448.0, 1.0625, -1.1875, 17.0, 19.0, -104.0, 3 * 2.0**-10, -5 * 2.0**-10, 2.0**-10, 464.0 / 2]
    x = _activations(1, k, torch.float32).cpu()
    x[0, :len(special)] = torch.tensor(special)
    return x.to(DEVICE)


@pytest.mark.parametrize("packing", ["tq2", "tq1"])
@pytest.mark.parametrize("activations", ["a8", "fp8"])
@pytest.mark.parametrize("strategy,k,n,split", [("gemv", 300, 300, False), ("gemv", 512, 512, False),
                                                ("gemv", 2100, 20, True), ("gemv8", 2100, 20, True),
                                                ("qgemv", 300, 300, False), ("qgemv", 2100, 20, True)])
def test_gemv_quantizes_its_row_exactly(strategy, k, n, split, activations, packing, monkeypatch):
    """The one-token GEMV quantizes x itself (no quantizer launch): with identity codes each output is one
    quantized value x its scale, so the outputs show every rounding, bit for bit against the reference; a zero
    row (scale 1e-12 / qmax) too. N = K = 300 (masked steps) and 512 (whole steps) take a
    GEMV_QUANTIZING_TILES tile in one K slice (8 programs aimed at, on a GPU too); 20 x 2100 splits K, so the
    scale reaches the epilogue kernel through memory (stored by program (0, 0)). qgemv, the same GEMV on the
    quantizer launch's output, gives the same bits."""
    monkeypatch.setattr(tk, "_target_programs", lambda device, per_sm=None: 2 * (per_sm or tk.PROGRAMS_PER_SM))
    codes = torch.eye(n, k, dtype=torch.int8)
    weight = TernaryWeight(formats.pack(codes, packing).to(DEVICE), torch.ones(1, 1, device=DEVICE), k, n, None,
                           packing)
    linear = {"a8": reference.linear_a8, "fp8": reference.linear_fp8}[activations]
    splits = []
    real_split_k = tk._split_k
    monkeypatch.setattr(tk, "_split_k", lambda *args: splits.append(real_split_k(*args)) or splits[-1])
    for x in (_ties(activations, k), torch.zeros(1, k, device=DEVICE)):
        out = tk.linear(x, tk.prepare(weight), None, activations, strategy=strategy)
        assert torch.equal(out, _on_cpu(linear, x, _cpu_weight(weight), None))
    assert all((result[1].dim() == 3) == split for result in splits)
    assert (tk._gemv_tile(n, activations, torch.device(DEVICE)) != tk.GEMV_TILE) == (n >= 256)


@pytest.mark.parametrize("strategy,m", [("dp4a", 1), ("dp4a", 5), ("dp4a", 16), ("dp4a1", 1), ("dp4ak", 1)])
@pytest.mark.parametrize("k,n,granularity,with_bias", [(16, 3, "tensor", False), (400, 33, "channel", True),
                                                       (1024, 70, "channel", False), (2048, 20, "tensor", True),
                                                       (2064, 20, "channel", False), (6144, 20, "tensor", True)])
def test_dp4a_is_exact(strategy, m, k, n, granularity, with_bias, monkeypatch):
    """a8 on words of codes (DP4A): bit for bit the integer reference, with a bias too (each product rounded by
    itself, as the reference rounds it: an H200 found the last bits off when the compiler fused the activation
    scale's multiply with the bias's add), on random rows and one of the quantizer's extremes and ties. K = 16 and 400: rows of a partial step (masked
    loads); 1024 (one step) and 2048 (two, split over K slices here): whole steps, unmasked; 2064: split, its
    last step partial; 6144: dp4ak's steps of 2048 codes, three whole ones split over K. One token takes the
    kernel's own one-row loop, 5 a partial tile of 8, 16 a whole one.
    dp4a1 quantizes the row in the kernel: the same bits, its scale reaching the epilogue of a split through
    memory; a zero row too (scale 1e-12 / 127)."""
    if strategy == "dp4a1":  # its one-token tile, at the step of the others (whole and partial steps as above)
        monkeypatch.setattr(tk, "DP4A_QUANTIZING_TILE", (64, tk.DP4A_TILE[1], 4))
    weight = _weight(n, k, granularity)
    bias = _activations(1, n, torch.float32, seed=2).reshape(-1) if with_bias else None
    rows = [torch.cat([_ties("a8", k), _activations(m - 1, k, torch.float32)])]
    rows += [torch.zeros(1, k, device=DEVICE)] * (m == 1)
    for x in rows:
        out = tk.linear(x, tk.prepare(weight), bias, "a8", strategy=strategy)
        assert torch.equal(out, _on_cpu(reference.linear_a8, x, _cpu_weight(weight), bias))


def test_dp4a_is_offered_for_few_int8_tokens_on_tq2_words():
    layer = _layer(tk._SCALE_CHANNEL, 3072, 64)
    assert "dp4a" in tk.strategies(1, layer, "a8")
    assert "dp4a" in tk.strategies(16, layer, "a8")
    assert {"dp4a1", "dp4ak"} <= set(tk.strategies(1, layer, "a8"))
    assert not {"dp4a1", "dp4ak"} & set(tk.strategies(2, layer, "a8"))
    assert all("dp4a" not in tk.strategies(*case) for case in [
        (17, layer, "a8"), (1, layer, "a16"), (1, layer, "fp8"), (1, _layer(tk._SCALE_TENSOR, 3072, 64, "tq1"), "a8"),
        (1, _layer(tk._SCALE_TENSOR, 3080, 64), "a8"), (1, _layer(tk._SCALE_GROUP, 3072, 64), "a8"),
        (1, _layer(tk._SCALE_TENSOR, tk.FP32_EXACT_INT8_K // 16 * 16 + 16, 64), "a8")])  # split sums exact in fp32


@pytest.mark.parametrize("scales", ["pieces", "channel", "tensor"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_a16_on_cublas_is_one_gemm_on_scaled_codes(with_bias, scales, monkeypatch):
    """a16 on cuBLAS: one GEMM on a transient of code x scale, whatever the scales (a layer of q/k/v fused by
    bitflux.fusion joins per-tensor scales into runs of one), with no scale epilogue after it."""
    m, k, n = 130, 256, 96
    weight = _weight(n, k, "channel" if scales == "channel" else "tensor")
    if scales == "pieces":
        runs = torch.tensor([0.5, 2.0, 0.25]).repeat_interleave(32)[:, None].to(weight.scales.device)
        weight = TernaryWeight(weight.packed, runs, k, n, None)
    gemms = []
    monkeypatch.setattr(tk, "_epilogue", None)  # never called
    for name in ("mm", "addmm"):
        monkeypatch.setattr(torch, name, _counted(getattr(torch, name), gemms))
    x = _activations(m, k, torch.bfloat16)
    bias = _activations(1, n, torch.bfloat16, seed=2).reshape(-1) if with_bias else None
    out = tk.linear(x, tk.prepare(weight), bias, "a16", strategy="cublas")
    assert len(gemms) == 1
    _assert_close(out, reference.linear(x, weight, bias, "a16"), torch.bfloat16)


def _counted(op, calls: list):
    def call(*args, **kwargs):
        calls.append(op)
        return op(*args, **kwargs)
    return call


class _Launches:
    """Stands in for a kernel: records each launch's programs and options, then launches it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((math.prod(grid), kwargs.get("PDL"), kwargs.get("launch_pdl")))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(not tk._interpreting(), reason="on a GPU every test runs with PDL where it has it (sm_90)")
@pytest.mark.parametrize("strategy,m,activations", [("splitk", 5, "a8"), ("gemv", 1, "fp8"), ("qgemv", 1, "a8"),
                                                    ("planar", 16, "a16"), ("dp4a", 3, "a8"), ("dp4a1", 1, "a8"),
                                                    ("expanded", 17, "a8")])
def test_programmatic_dependent_launch_waits_in_every_program(strategy, m, activations, monkeypatch):
    """With programmatic dependent launch (PDL, sm_90) the quantizer, the GEMVs and the split's epilogue are
    launched with Triton's launch_pdl, and every program of them waits for the grid before it (griddepcontrol,
    stood in for here: the interpreter runs none) and then lets the next launch; the results are those
    without it. The shapes split K, so the epilogue launches too."""
    k, n = 2048, 20
    weight = _weight(n, k, "channel", power_of_two=True)
    x = _activations(m, k, torch.float32)
    plain = tk.linear(x, tk.prepare(weight), None, activations, strategy=strategy)
    launches, calls = [], {"wait": 0, "let launch": 0}
    monkeypatch.setattr(tk, "_pdl", lambda device: {"PDL": True, "launch_pdl": True})
    monkeypatch.setattr(tk, "gdc_wait", lambda: calls.__setitem__("wait", calls["wait"] + 1))
    monkeypatch.setattr(tk, "gdc_launch_dependents", lambda: calls.__setitem__("let launch", calls["let launch"] + 1))
    for name in ("_operands_kernel", "_gemv_kernel", "_epilogue_kernel", "_planar_matmul", "_dp4a_gemv_kernel"):
        monkeypatch.setattr(tk, name, _Launches(getattr(tk, name), launches))
    out = tk.linear(x, tk.prepare(weight), None, activations, strategy=strategy)
    assert torch.equal(out, plain)
    assert len(launches) >= (2 if strategy != "expanded" else 1)
    assert all(pdl and launch_pdl for _, pdl, launch_pdl in launches)
    programs = sum(count for count, _, _ in launches)
    assert calls == {"wait": programs, "let launch": programs}


def test_programmatic_dependent_launch_only_where_the_gpu_has_it(monkeypatch):
    assert tk._pdl(torch.device("cpu")) == {}  # nor in the interpreter
    if torch.cuda.is_available():
        expected = tk.PDL and tk._HAS_PDL and torch.cuda.get_device_capability() >= (9, 0)
        assert tk._pdl(torch.device("cuda", 0)) == ({"PDL": True, "launch_pdl": True} if expected else {})
    monkeypatch.setattr(tk, "PDL", False)  # BITFLUX_TRITON_PDL=0
    assert tk._pdl(torch.device("cuda", 0)) == {}


def test_int8_sums_added_in_fp32_stay_exact():
    """The GEMV sums int8 products in fp32, and split slices add their int32 sums in fp32: those strategies are
    offered for a8 only while 127 K < 2^24 (FLUX's longest rows: 15360); longer rows keep to int32 sums."""
    summed_in_fp32 = {"gemv", "gemv8", "qgemv", "splitk", "splitk8", "planar", "dp4a", "dp4a1", "dp4ak"}
    for M in (1, 16):
        assert summed_in_fp32 & set(tk.strategies(M, _layer(tk._SCALE_TENSOR, tk.FP32_EXACT_INT8_K // 16 * 16, 8), "a8"))
        longer = tk.strategies(M, _layer(tk._SCALE_TENSOR, tk.FP32_EXACT_INT8_K // 16 * 16 + 16, 8), "a8")
        assert not summed_in_fp32 & set(longer) and "tiled" in longer
    assert "gemv" in tk.strategies(1, _layer(tk._SCALE_TENSOR, tk.FP32_EXACT_INT8_K + 1, 8), "fp8")
    assert 127 * tk.FP32_EXACT_INT8_K < 2**24 <= 127 * (tk.FP32_EXACT_INT8_K + 1)


def test_default_strategies_and_refusals():
    """The default (first) is what won most such calls on the H100/H200: gemv at one token, split-K up to 16,
    cuBLAS above for a16 and fp8, the int8 tile kernel on expanded codes for a8."""
    layer, grouped = _layer(tk._SCALE_TENSOR, 256, 144), _layer(tk._SCALE_GROUP, 256, 144)
    assert tk.strategies(1, layer, "a16") == ["gemv", "splitk", "tiled", "planar", "splitk8", "gemv8"]
    assert tk.strategies(1, layer, "fp8") == ["gemv", "splitk", "tiled", "planar", "splitk8", "gemv8", "qgemv"]
    assert tk.strategies(3, layer, "a16") == ["splitk", "tiled", "planar", "splitk8"]
    assert tk.strategies(17, layer, "a8") == ["expanded", "tiled", "planar", "cublas"]
    assert tk.strategies(17, layer, "fp8") == ["cublas", "tiled", "planar", "expanded"]
    assert tk.strategies(1, grouped, "a8") == ["tiled"]
    assert tk.strategies(200, grouped, "a16") == ["tiled", "expanded"]  # planar steps, cuBLAS: no groups
    # fp8's row-wise scaled cuBLAS GEMM gives bf16 only: not for other activations
    assert tk.strategies(17, layer, "fp8", torch.float16) == ["expanded", "tiled", "planar"]
    odd = _layer(tk._SCALE_TENSOR, 250, 144)
    assert "cublas" not in tk.strategies(200, odd, "a8") and "cublas" in tk.strategies(200, odd, "a16")
    # tq1: no tile kernels on 2-bit tiles; the expanded GEMM computes what the split-K kernel cannot
    tq1, tq1_grouped = _layer(tk._SCALE_TENSOR, 256, 144, "tq1"), _layer(tk._SCALE_GROUP, 256, 144, "tq1")
    assert tk.strategies(1, tq1, "a16") == ["gemv", "splitk", "expanded", "splitk8", "gemv8"]
    assert tk.strategies(17, tq1, "fp8") == ["cublas", "expanded"]
    assert tk.strategies(1, tq1_grouped, "a8") == ["expanded"]
    weight = _weight(20, 130)
    with pytest.raises(ValueError, match="strategy 'cublas' cannot compute this call"):
        tk.linear(_activations(1, 130, torch.float32), tk.prepare(weight), None, "a8", strategy="cublas")


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp16_a16_on_cublas_scales_before_its_sums_overflow(granularity):
    """fp16 on cuBLAS, per-channel or per-tensor scales (no alpha in fp16): sums of the codes alone pass
    fp16's 65504 (here 76800) where the scaled outputs do not (768); the reference's fp16 weights are scaled
    codes."""
    m, k, n = 17, 256, 32
    scales = torch.linspace(0.01, 0.02, n)[:, None] if granularity == "channel" else torch.full((1, 1), 0.015)
    weight = TernaryWeight(formats.pack(torch.ones(n, k, dtype=torch.int8)).to(DEVICE), scales.to(DEVICE), k, n, None)
    x, bias = torch.full((m, k), 300.0, dtype=torch.float16, device=DEVICE), torch.ones(n, device=DEVICE)
    for b in (None, bias):
        out = tk.linear(x, tk.prepare(weight), b, "a16", strategy="cublas")
        _assert_close(out, reference.linear(x, weight, b, "a16"), torch.float16)
        assert torch.isfinite(out).all()


def test_quantize_activations_reads_any_row_layout():
    x = _activations(64, 3, torch.float32).t()  # rows of stride 64
    for fp8 in (False, True):
        q, scale = tk.quantize_activations(x, fp8=fp8)
        expected_q, expected_scale = reference.quantize_activations(x.cpu(), fp8=fp8)
        assert torch.equal(q.cpu().view(torch.uint8), expected_q.view(torch.uint8))
        assert torch.equal(scale.cpu(), expected_scale.reshape(-1))


def test_choose_times_once_takes_the_fastest_and_skips_failures(monkeypatch, tmp_path):
    monkeypatch.setenv("BITFLUX_CACHE", str(tmp_path))
    monkeypatch.setattr(tk, "_namespace", lambda device: "test GPU")
    monkeypatch.setattr(tk, "_stored", None)
    monkeypatch.setattr(tk, "chosen", {})
    monkeypatch.setattr(tk, "timings", {})
    monkeypatch.setattr(tk, "_gpu_ms", lambda fn, graph: fn())  # "time" = fn's result

    def run(name):
        if name == "broken":
            raise RuntimeError("not on this GPU")
        return {"slow": 2.0, "fast": 1.0}[name]

    key = tk.CallKey("a16", torch.bfloat16, tk._SCALE_TENSOR, True, 4096, 3072, 3072)
    names = ["slow", "broken", "fast"]
    assert tk._choose(key, names, run, "cuda") == "fast"
    assert tk.timings[key] == {"slow": 2.0, "broken": math.inf, "fast": 1.0}
    monkeypatch.setattr(tk, "_gpu_ms", lambda fn, graph: pytest.fail("timed twice"))
    assert tk._choose(key, names, run, "cuda") == "fast"
    # A new process (nothing in memory) reads the choice back from the cache: no timing.
    monkeypatch.setattr(tk, "chosen", {})
    monkeypatch.setattr(tk, "_stored", None)
    assert tk._choose(key, names, run, "cuda") == "fast"
    stored = json.loads((tmp_path / tk.STRATEGY_FILE).read_text())
    assert stored == {"test GPU": {"a16 bfloat16 scales 0 bias 1 4096x3072x3072": "fast"}}
    # A stored strategy that no longer applies is timed again.
    monkeypatch.setattr(tk, "chosen", {})
    monkeypatch.setattr(tk, "_gpu_ms", lambda fn, graph: fn())
    assert tk._choose(key, ["slow"], run, "cuda") == "slow"


def test_choose_times_gpu_time_and_nothing_while_capturing(monkeypatch, tmp_path):
    """Few-token candidates are timed replayed from a CUDA graph; after a failed capture, eagerly for the
    rest of the process (one warning); a call first seen during a capture takes the default, remembered
    nowhere."""
    monkeypatch.setattr(tk, "_graph_timing", True)
    monkeypatch.setattr(tk, "_graph_ms", lambda fn: fn() / 10)
    monkeypatch.setattr(tk.triton.testing, "do_bench", lambda fn, **kwargs: fn())
    assert tk._gpu_ms(lambda: 5.0, graph=True) == 0.5
    assert tk._gpu_ms(lambda: 5.0, graph=False) == 5.0  # large calls: eager, L2 flushed

    def uncapturable(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    def unsupported():
        raise RuntimeError("cuBLAS refuses this shape")

    monkeypatch.setattr(tk, "_graph_ms", uncapturable)
    with pytest.raises(RuntimeError, match="refuses"):  # a strategy that fails eagerly: skipped by _choose
        tk._gpu_ms(unsupported, graph=True)
    assert tk._graph_timing  # and graph timing stays on
    with pytest.warns(UserWarning, match="timed eagerly from now on"):
        assert tk._gpu_ms(lambda: 5.0, graph=True) == 5.0
    monkeypatch.setattr(tk, "_graph_ms", lambda fn: pytest.fail("captured after a failed capture"))
    assert tk._gpu_ms(lambda: 5.0, graph=True) == 5.0
    monkeypatch.setenv("BITFLUX_CACHE", str(tmp_path))
    monkeypatch.setattr(tk, "_namespace", lambda device: "test GPU")
    monkeypatch.setattr(tk, "_stored", None)
    monkeypatch.setattr(tk, "chosen", {})
    monkeypatch.setattr(tk.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tk.torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(tk, "_gpu_ms", lambda fn, graph: pytest.fail("timed during a capture"))
    key = tk.CallKey("a16", torch.bfloat16, tk._SCALE_TENSOR, False, 1, 3072, 3072)
    assert tk._choose(key, ["splitk", "gemv"], lambda name: 1.0, "cuda") == "splitk"
    assert tk.chosen == {} and not (tmp_path / tk.STRATEGY_FILE).exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_timing_runs_on_the_default_stream():
    """_graph_ms captures on a side stream (Triton 3.0/3.1's do_bench_cudagraph refused the default one)."""
    x = torch.randn(64, 64, device="cuda")
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert 0 < tk._graph_ms(lambda: x @ x) < 100


def test_strategy_choices_are_kept_per_kernel_source(monkeypatch):
    """The cache's section names the GPU, the versions, a digest of the kernels' source and PDL where it is on:
    choices timed against other kernels (a checkout between releases) or launches are not reused."""
    monkeypatch.setattr(tk.torch.cuda, "get_device_name", lambda device: "Some GPU")
    digest = hashlib.sha256(Path(tk.__file__).read_bytes()).hexdigest()[:12]
    namespace = tk._namespace(torch.device("cuda", 0))
    assert namespace.startswith("Some GPU | torch ") and namespace.endswith(f" | kernels {digest}")
    monkeypatch.setattr(tk, "_pdl", lambda device: {"PDL": True, "launch_pdl": True})
    assert tk._namespace(torch.device("cuda", 0)) == f"{namespace} | pdl"  # timed with launches overlapped


def test_an_unwritable_strategy_cache_only_warns(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BITFLUX_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    monkeypatch.setattr(tk, "_namespace", lambda device: "test GPU")
    monkeypatch.setattr(tk, "_stored", None)
    monkeypatch.setattr(tk, "chosen", {})
    monkeypatch.setattr(tk, "timings", {})
    monkeypatch.setattr(tk, "_gpu_ms", lambda fn, graph: fn())
    key = tk.CallKey("a8", torch.bfloat16, tk._SCALE_CHANNEL, False, 512, 3072, 3072)
    with pytest.warns(UserWarning, match="cannot keep Triton strategy choices"):
        assert tk._choose(key, ["only"], lambda name: 1.0, "cuda") == "only"


def _config_id(config):
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}" + ("-swap" if kw["SWAP"] else "")


# Swapped tiles serve the 2-bit codes only (the tuner never offers them for expanded codes).
TILE_CASES = [pytest.param(config, strategy, id=f"{_config_id(config)}-{strategy}")
              for config in tk._ternary_matmul.configs for strategy in ("tiled", "expanded")
              if not (strategy == "expanded" and config.kwargs["SWAP"])]


@pytest.mark.parametrize("config,strategy", TILE_CASES)
def test_every_tile_config(config, strategy, monkeypatch):
    """Each autotune config of the tile kernel forced in turn (without timing only a regime's first runs):
    a8 with per-group scales bit for bit (the swapped tile's group flush included), a16 and fp8 to
    tolerance. On a GPU, operand widths whose tiles exceed its shared memory are left out, as the tuner
    leaves them out."""
    monkeypatch.setattr(tk._ternary_matmul, "early_config_prune", lambda configs, named_args, **kwargs: [config])
    monkeypatch.setattr(tk._ternary_matmul, "cache", {})

    def fits(operand_dtype):
        operand = torch.empty(0, dtype=operand_dtype, device=DEVICE)
        return tk._fits_shared_memory(config, operand, operand, dense=strategy == "expanded")

    m, k, n = 37, 384, 130
    weight = _weight(n, k, "group", 128, power_of_two=True)
    x = _activations(m, k, torch.float32)
    out = tk.linear(x, tk.prepare(weight), None, "a8", strategy=strategy)
    assert torch.equal(out, _on_cpu(reference.linear_a8, x, _cpu_weight(weight), None))
    weight = _weight(n, k, "channel")
    x, bias = _activations(m, k, torch.float16), _activations(1, n, torch.float16, seed=2).reshape(-1)
    if fits(torch.float16):
        out = tk.linear(x, tk.prepare(weight), bias, "a16", strategy=strategy)
        _assert_close(out, reference.linear(x, weight, bias, "a16"), torch.float16)
    out = tk.linear(x, tk.prepare(weight), bias, "fp8", strategy=strategy)
    _assert_close(out, _on_cpu(reference.linear_fp8, x, _cpu_weight(weight), bias), torch.bfloat16)


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("activations", ["a8", "fp8"])
def test_a_token_holding_nan_or_inf_gives_nan_outputs(special, m, activations):
    """A NaN or infinity in a token makes its outputs NaN with every strategy, as the reference's (and the CPU
    kernel's) are: the max instructions drop NaN, so the quantizer used to give finite numbers made from the
    rest of the row, hiding a blow-up. The other tokens are unchanged."""
    k, n = 64, 4
    weight = _weight(n, k)
    x = _activations(m, k, torch.float32)
    x[0, 5] = special
    prepared = tk.prepare(weight)
    for strategy in tk.strategies(m, prepared, activations):
        out = tk.linear(x, prepared, None, activations, strategy=strategy).cpu()
        assert out[0].isnan().all(), strategy
        assert out[1:].isfinite().all(), strategy


def test_fp8_with_one_group_a_row_is_per_channel_everywhere():
    """A group as wide as the rows is one scale a row: the GPU kernels take it as per channel, and so does the
    reference (it refused it as per-group)."""
    weight = _weight(24, 100, "group", 128)
    assert weight.scales.shape[1] == 1
    x = _activations(3, 100, torch.float32)
    channel = TernaryWeight(weight.packed, weight.scales, 100, 24, None)
    assert torch.equal(reference.linear_fp8(x.cpu(), _cpu_weight(weight), None),
                       reference.linear_fp8(x.cpu(), _cpu_weight(channel), None))
