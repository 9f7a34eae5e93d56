"""The cpu backend (C, W1.58A8) against reference.linear_a8, the integer reference.

The kernel's int32 sums are exact and its fp32 epilogue does the reference's operations in the reference's
order, so outputs are compared with torch.equal (bit for bit), on every ISA path this CPU has.
"""

import contextvars
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitflux import TernaryConfig, TernaryLinear, formats
from bitflux.errors import BitfluxError
from bitflux.kernels import TernaryWeight, cpu, reference, select_backend, ternary_linear, use_backend
from bitflux.kernels.cpu import _library

pytestmark = pytest.mark.skipif(cpu.available() is not None, reason=f"cpu backend: {cpu.available()}")

ISAS = cpu.ISAS


def make_weight(out_features, in_features, group_size=None, codes=None, scale_dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if codes is None:
        codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8, generator=generator)
    columns = 1 if group_size is None else -(-in_features // group_size)
    scales = (torch.rand(out_features, columns, generator=generator) + 0.05).to(scale_dtype)
    return TernaryWeight(formats.pack(codes), scales, in_features, out_features, group_size)


def run_cpu(x, weight, bias=None, isa=None):
    with cpu.use_isa(isa or cpu.current_isa()):
        return cpu.linear(x, cpu.prepare(weight), bias)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
# m <= 3: the GEMV path (codes read row by row), above: gathered tiles; the last quantizes its rows in parallel
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 64, 16), (2, 200, 17), (3, 37, 5), (4, 257, 31), (5, 64, 16),
                                     (13, 100, 1), (29, 130, 45), (7, 300, 33), (67, 1000, 20)])
@pytest.mark.parametrize("scales", ["tensor", "channel", "group:16", "group:32"])
def test_matches_integer_reference(isa, m, k, n, scales, threads):
    if isa not in cpu.supported_isas():
        pytest.skip(f"{isa} not supported by this CPU")
    group_size = int(scales.split(":")[1]) if scales.startswith("group") else None
    weight = make_weight(n, k, group_size)
    if scales == "tensor":
        weight = TernaryWeight(weight.packed, weight.scales[:1], k, n, None)
    x = torch.randn(m, k) * 3
    bias = torch.randn(n)
    assert torch.equal(run_cpu(x, weight, bias, isa), reference.linear_a8(x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes_and_3d_inputs(dtype):
    weight = make_weight(24, 70, scale_dtype=torch.float16)
    x = torch.randn(2, 5, 70).to(dtype)
    bias = torch.randn(24).to(dtype)
    y = run_cpu(x, weight, bias)
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    assert torch.equal(y, reference.linear_a8(x, weight, bias))


def test_non_contiguous_inputs_and_zero_rows():
    weight = make_weight(20, 48)
    base = torch.randn(6, 96)
    base[2] = 0  # an all-zero token: scale clamps to 1e-12 / 127, output = bias
    bias = torch.randn(20)
    for x in (base[:, ::2], base.t().contiguous().t()[:, :48], base.reshape(6, 2, 48)[:, 1]):
        assert not x.is_contiguous()
        assert torch.equal(run_cpu(x, weight, bias), reference.linear_a8(x, weight, bias))


def test_no_rows():
    weight = make_weight(9, 40)
    y = run_cpu(torch.empty(0, 40), weight, torch.randn(9))
    assert y.shape == (0, 9)
    assert run_cpu(torch.empty(2, 0, 40), weight).shape == (2, 0, 9)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("m, k", [(13, 16 * 16 * 3 + 5), (3, 4 * 32 * 16 * 2 + 5)])  # tiles; GEMV
def test_worst_case_sums_do_not_overflow(sign, m, k):
    """All codes +1 (u = 2) or -1 against max-magnitude activations: every int16 lane of the AVX2 paths
    reaches its flush bound (64 x 508: 16 chunks of a tile, 16 steps of 32 bytes of the GEMV), and the int32
    sums are at their largest for this K."""
    codes = torch.full((32, k), sign, dtype=torch.int8)
    weight = make_weight(32, k, codes=codes)
    x = torch.full((m, k), 5.0)
    x[1] = -5.0
    for isa in cpu.supported_isas():
        assert torch.equal(run_cpu(x, weight, isa=isa), reference.linear_a8(x, weight, None))


def _widened(tq1: torch.Tensor, k: int, isa: str) -> torch.Tensor:
    """The C kernel's widening of a whole tq1 layer into tq2 rows (bf_linear widens as it reads)."""
    out = torch.empty(formats.packed_shape(tq1.shape[0], k, "tq2"), dtype=torch.uint8)
    assert cpu._lib.bf_tq1_to_tq2(tq1.data_ptr(), tq1.stride(0), tq1.shape[0], k, out.data_ptr(), out.stride(0),
                                  2, cpu.ISAS.index(isa)) == 0
    return out


@pytest.mark.parametrize("k", [1, 4, 5, 7, 19, 20, 21, 33, 40, 130, 209, 1283])
def test_tq1_to_tq2_is_the_exact_repacking(k):
    """The C widening of tq1 rows (16 bytes -> 20 by SIMD arithmetic on AVX2 and up, 4 -> 5 by table, then a
    bit stream for the row's tail) equals formats.convert bit for bit, padding included, on every ISA, for
    every byte value (243..255 are no valid tq1 byte but decode as formats.unpack reads them); the rows here
    are strided. K = 130 and 209 take one SIMD step (the first K that does: 101), 1283 many."""
    gen = torch.Generator().manual_seed(k)
    cols = formats.packed_columns(k, "tq1")
    rows = torch.randint(0, 256, (37, cols + 3), dtype=torch.uint8, generator=gen)[:, :cols]
    if k >= 130:
        rows[:] = (torch.arange(rows.numel()) % 256).to(torch.uint8).reshape(rows.shape)  # every byte value
    for isa in cpu.supported_isas():
        assert torch.equal(_widened(rows, k, isa), formats.convert(rows.contiguous(), k, "tq1", "tq2")), isa


@pytest.mark.parametrize("k,group_size", [(1, None), (7, None), (33, None), (130, None), (160, 32)])
def test_tq1_weights_run_as_their_tq2_codes(k, group_size, threads):
    """A tq1 layer is read in place and widened to tq2 as the C kernel reads it: a panel at a time (GEMV), a
    weight tile at a time (one row block), or whole into a transient first (several row blocks: 2400 rows
    of K = 130 or 160 exceed the 320 KiB activation block; the shorter rows stay in one). The outputs are the
    tq2 weight's, on every ISA, and no tq2 copy is kept."""
    tq2 = make_weight(37, k, group_size=group_size, seed=k)
    tq1 = TernaryWeight(formats.convert(tq2.packed, k, "tq2", "tq1"), tq2.scales, k, 37, group_size, "tq1")
    prepared = cpu.prepare(tq1)
    assert prepared.codes is tq1.packed and prepared.codes_copy is None
    assert torch.equal(_widened(tq1.packed, k, cpu.current_isa()), tq2.packed)
    for m in (1, 3, 9, 2400):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        expected = reference.linear_a8(x, tq2, None)
        for isa in cpu.supported_isas():
            assert torch.equal(run_cpu(x, tq1, isa=isa), expected), (m, isa)
    assert torch.equal(reference.linear_a8(x, tq1, None), expected)


def test_every_isa_gives_identical_outputs(threads):
    weight = make_weight(50, 200, group_size=32)
    x = torch.randn(17, 200)
    outputs = [run_cpu(x, weight, isa=isa) for isa in cpu.supported_isas()]
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_layer_dispatches_to_cpu_in_both_activation_modes():
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(3, 64)
    for activations in ("a16", "a8"):
        layer = TernaryLinear.from_linear(linear, TernaryConfig(granularity="channel", activations=activations))
        assert select_backend(x, layer.ternary_weight, activations) is cpu
        with torch.no_grad():
            expected = reference.linear_a8(x, layer.ternary_weight, layer.bias)
            assert torch.equal(layer(x), expected)
            assert torch.equal(layer(x), expected)  # second call: prepared weight from the cache
            with use_backend("reference"):
                assert torch.equal(layer(x), reference.linear(x, layer.ternary_weight, layer.bias, activations))


def test_unsupported_group_size_falls_back_to_reference():
    weight = make_weight(8, 40, group_size=10)
    x = torch.randn(2, 40)
    assert not cpu.supports(x, weight, "a8")
    assert select_backend(x, weight, "a8") is reference
    assert torch.equal(ternary_linear(x, weight, None, "a8"), reference.linear_a8(x, weight, None))


def test_fp8_activations_go_to_the_reference():
    """The kernel computes int8 activations; e4m3 ones are not those, so the reference computes them."""
    weight = make_weight(8, 32)
    x = torch.randn(2, 32)
    assert select_backend(x, weight, "fp8") is reference
    assert torch.equal(ternary_linear(x, weight, None, "fp8"), reference.linear_fp8(x, weight, None))


def test_inputs_needing_gradients_go_to_the_reference():
    weight = make_weight(8, 32)
    x = torch.randn(2, 32, requires_grad=True)
    assert select_backend(x, weight, "a16") is reference
    with torch.no_grad():
        assert select_backend(x, weight, "a16") is cpu


@pytest.mark.parametrize("trained", ["bias", "scales"])
def test_a_bias_or_scales_that_need_a_gradient_get_it(trained):
    """Tuning a layer's bias or scales with its inputs frozen: the call takes the reference, so the gradient
    reaches them (the kernel would have returned an output with no graph)."""
    weight, bias = make_weight(8, 32), torch.zeros(8)
    (bias if trained == "bias" else weight.scales).requires_grad_(True)
    x = torch.randn(3, 32)
    assert select_backend(x, weight, "a8", bias) is reference
    ternary_linear(x, weight, bias, "a8").sum().backward()
    grad = bias.grad if trained == "bias" else weight.scales.grad
    assert grad is not None and grad.abs().sum() > 0


def test_a_bias_of_another_shape_is_refused():
    """The kernels read out_features bias values: a bias of any other shape is refused at the dispatch point,
    on every backend (one value was read past its end before)."""
    weight, x = make_weight(40, 64), torch.randn(5, 64)
    for backend in ("cpu", "reference"):
        for bias in (torch.tensor([1.5]), torch.zeros(41), torch.zeros(1, 40)):
            with use_backend(backend), pytest.raises(BitfluxError, match=r"bias of shape \(40,\), got"):
                ternary_linear(x, weight, bias, "a8")


def test_isa_selection():
    assert cpu.supported_isas()[0] == "generic"
    with pytest.raises(BitfluxError):
        with cpu.use_isa("sse9"):
            pass
    with cpu.use_isa("generic"):
        assert cpu.current_isa() == "generic"


@pytest.mark.parametrize("isa", ISAS)
def test_partial_row_tiles_read_inside_the_activations(isa):
    """Token counts that leave a partial last tile of rows, in a thread (whose heap's end is often an unmapped
    page): the portable tile, vectorized by GCC -O3, loaded up to 3 rows past the activations' buffer and crashed
    the process there (valgrind: an invalid read 0 bytes after it)."""
    script = f"""
import threading, torch, bitflux
from bitflux.kernels import cpu
layer = bitflux.TernaryLinear.from_linear(torch.nn.Linear(512, 33))
def work():
    with torch.no_grad(), cpu.use_isa({isa!r}):
        for m in range(1, 200):
            layer(torch.randn(m, 512))
thread = threading.Thread(target=work)
thread.start()
thread.join()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_codes_of_another_packing_are_refused_not_read_past():
    """A layer read while set_packing repacks it in another thread: tq1 bytes under packing tq2 would have the
    kernel read past each row."""
    codes = torch.randint(-1, 2, (8, 64), dtype=torch.int8)
    weight = TernaryWeight(formats.pack(codes, "tq1"), torch.ones(1, 1), 64, 8, None, "tq2")
    with pytest.raises(BitfluxError, match=r"a tq2 layer of 8 x 64 holds codes of shape \(8, 13\), not \(8, 16\)"):
        ternary_linear(torch.randn(2, 64), weight)


def test_forced_backends_and_isas_hold_in_their_own_thread_only():
    """A service's threads: one forcing the reference backend (or the generic ISA, or an unsupported one, which
    fails there) leaves another thread's calls as they were, and each thread's block ends its own choice."""
    import threading

    x, weight = torch.randn(2, 64), make_weight(8, 64)
    inside, done = threading.Event(), threading.Event()
    finished = []

    def other_thread():
        with use_backend("reference"), cpu.use_isa("generic"):
            assert select_backend(x, weight, "a16") is reference and cpu.current_isa() == "generic"
            inside.set()
            done.wait(10)
        with pytest.raises(BitfluxError), cpu.use_isa("sse9"):
            pass
        finished.append(True)

    thread = threading.Thread(target=other_thread)
    with torch.no_grad(), use_backend("cpu"):
        thread.start()
        assert inside.wait(10)
        assert select_backend(x, weight, "a16") is cpu and cpu.current_isa() == cpu.supported_isas()[-1]
        done.set()
        thread.join(10)
        assert select_backend(x, weight, "a16") is cpu  # the other thread's exit took nothing of this one's
    assert finished == [True]

    def steps():  # a generator whose steps a thread pool resumes, each in a copy of its own context
        with use_backend("reference"):
            yield select_backend(x, weight, "a16")
            yield select_backend(x, weight, "a16")

    generator = steps()
    seen = [contextvars.copy_context().run(next, generator, None) for _ in range(3)]
    assert seen == [reference, cpu, None]  # as torch.no_grad would be: the block holds in its own context only


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_isa_detection_agrees_with_the_kernel():
    """The C library's CPUID checks name the same features as Linux does (AVX-VNNI is read from CPUID leaf 7.1
    directly, which older compilers' __builtin_cpu_supports lacks), for the paths this build has."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not flags or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no x86 feature flags")
    built = {isa: bool(cpu._lib.bf_isa_built(cpu.ISAS.index(isa))) for isa in cpu.ISAS}
    expected = {"avx2": "avx2" in flags, "avxvnni": "avx2" in flags and "avx_vnni" in flags and built["avxvnni"],
                "avx512vnni": {"avx512f", "avx512bw", "avx512_vnni"} <= flags}
    assert {isa: isa in cpu.supported_isas() for isa in expected} == expected


def test_isa_from_environment(monkeypatch):
    monkeypatch.setenv("BITFLUX_CPU_ISA", "generic")
    assert cpu.current_isa() == "generic"
    monkeypatch.setenv("BITFLUX_CPU_ISA", "nope")
    with pytest.raises(BitfluxError):
        cpu.current_isa()


def test_missing_library_is_reported(monkeypatch):
    monkeypatch.setattr(_library, "_STEM", "_no_such_library")
    lib, reason = _library.load()
    assert lib is None and "not found" in reason


def test_prepared_weight_reads_the_layer_codes_in_place():
    """No second copy of a tq2 layer's codes: the kernel reads the layer's own bytes, and the prepared weight
    does not keep them alive (the cache of prepared weights is keyed by them)."""
    weight = make_weight(48, 256)
    prepared = cpu.prepare(weight)
    assert prepared.codes is weight.packed and prepared.codes_copy is None
    del weight
    with pytest.raises(RuntimeError, match="gone"):
        prepared.codes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("m", [2, 9])  # GEMV, tiles
def test_signed_zeros_and_nan_rows_as_the_reference(m, bad):
    """Bit for bit also where torch.equal looks away: a zero sum times a negative scale is -0.0 (one scale
    group adds no zero first), and a token with a NaN or an infinity gives NaN outputs (its scale is NaN, or
    inf times codes of 0), the other tokens untouched."""
    weight = make_weight(20, 48, codes=torch.zeros(20, 48, dtype=torch.int8))
    weight = TernaryWeight(weight.packed, -weight.scales, 48, 20, None)
    x = torch.randn(m, 48)
    x[1, 5] = bad
    for isa in cpu.supported_isas():
        y, expected = run_cpu(x, weight, isa=isa), reference.linear_a8(x, weight, None)
        assert torch.isnan(y[1]).all() and torch.isnan(expected[1]).all()
        keep = torch.arange(m) != 1
        assert torch.equal(y[keep].view(torch.int32), expected[keep].view(torch.int32))
        assert torch.signbit(y[keep]).all()


def test_a_library_built_from_other_source_is_refused(monkeypatch):
    """An editable install whose C library was not rebuilt after the exported signatures changed would be
    called with the wrong arguments: load() refuses it, saying why (the backend then falls back)."""
    assert _library.load()[1] is None
    monkeypatch.setattr(_library, "ABI_VERSION", _library.ABI_VERSION + 1)
    lib, reason = _library.load()
    assert lib is None and "from another bitflux version" in reason and "reinstall bitflux" in reason
