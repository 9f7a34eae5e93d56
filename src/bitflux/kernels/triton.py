"""Triton GPU backend: ternary GEMMs for activations a16, a8 (int8) and fp8 (e4m3) (docs/GPU_KERNELS.md).

Weights at rest are only the layer's own bytes, tq2 or tq1 (no repacked copy). A call can be computed in up to
seven ways ("strategies"), and five variants of them; tq1 bytes (5 base-3 codes a byte) are read by all but
tiled, planar and dp4a:
  splitk    few tokens, memory-bound: a split-K GEMV-style kernel streams the 2-bit weights once with many
            programs; with one K slice it applies scales and bias itself, else a small kernel sums the
            slices' fp32 partials in order and applies them. tq1: one tl.dot per code position (plane) of
            the bytes.
  gemv      the same for one token without tl.dot: fp32 products and sums on CUDA cores (no 16-row padding),
            the weights built from the codes' bits, never converted from integers; tq2: x's step loaded
            contiguously times the codes unpacked in K order; tq1: per digit plane, x at stride 5. int8 and
            e4m3 activations are quantized in the same kernel (one launch).
  tiled     the fused tile kernel: 2-bit tiles unpacked in registers (the next tile's bytes loaded ahead),
            tl.dot, scales + bias epilogue; some tile configs swap the operands (codes @ x^T).
  planar    the activations in plane-major order (bit plane p of tq2 byte j multiplies column 4j + p, so
            each plane's columns are put side by side): one tl.dot per plane, the bytes loaded and pipelined
            like any operand and unpacked elementwise as the MMA's register operand; split over K at few
            tokens.
  expanded  the layer's codes expanded into a transient dense {-1, 0, +1} matrix in the operand dtype
            (int8, e4m3 or the activation dtype; for a8/fp8 in the same launch that quantizes the
            activations), then the same tile kernel reads it as a plain GEMM.
  cublas    the same transient, multiplied by cuBLAS: torch.addmm/mm (a16, the transient holding code x
            scale), torch._int_mm (a8), torch._scaled_mm (fp8), scales in the epilogue.
  splitk8, gemv8  splitk and gemv aiming at twice the programs an SM (gemv on other tiles).
  qgemv     a8/fp8, one token: gemv on activations quantized by the quantizer's launch beforehand, instead of
            quantized by every program of the GEMV itself.
  dp4a      a8, few tokens: the tq2 bytes read as int32 words of 16 codes against the plane-major int8 rows,
            four codes multiplied and added by one integer DP4A instruction on CUDA cores; exact int32 sums.
  dp4a1     dp4a at one token in one launch: the kernel quantizes the float row itself.
  dp4ak     dp4a at one token on fewer rows and longer K steps a program (the narrower layers' best).
The transient holds codes (code x scale for a16 on cuBLAS) and lives for one call: no
full-precision or 8-bit weight is kept. On a GPU the fastest applicable strategy is measured once per call
shape (as Triton's autotune does for tile sizes) and remembered in the bitflux cache; where nothing is timed
(the interpreter) the first applicable one runs.
Activations: a16 in the input dtype; a8 per-token int8 exactly as reference.quantize_activations (int32
sums, bit-exact); fp8 per-token e4m3 (s = amax / 448, round to nearest even), sums in fp32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

NAME = "triton"
GROUP_MULTIPLE = 128  # per-group scales need groups that every BLOCK_K below divides
SMALL_M = 16  # at most this many tokens: the split-K kernel is offered; above, the expanded ones
GEMV_M = 1  # one token: also split-K without tensor cores (products on CUDA cores, no 16-row padding)
# The longest int8 rows whose sums add up exactly in fp32 (|sum| <= 127 K < 2^24): the GEMV's and split slices'
FP32_EXACT_INT8_K = (2**24 - 1) // 127
# The activation quantizer: up to _ONE_PASS_ROWS rows of up to _ONE_PASS_COLUMNS are read once and kept in
# registers; other rows are read twice, their absmax and then their values (the second read mostly from L2), in
# blocks of QUANTIZE_BLOCKS[0] columns for rows up to _LONG_ROWS long and [1] for longer ones; in _QUANTIZE_WARPS
# warps, also when the same launch expands codes. H200 at 4096 tokens (benchmarks/gpu_operands.py,
# BENCHMARKS.md): at K = 3072, 1024-column blocks quantize 1.3x faster than whole rows in registers or blocks of
# 2048, and with the codes' expansion in the launch, 4 warps take ~0.9x the time of expansion's 8; at
# K = 12288 / 15360, 4096-column blocks are 1.1x faster than 2048. Up to 512 rows (FLUX's text tokens), whose
# programs fill the GPU once at most, the one read stays, as before (not measured against two since); the
# blocks of longer rows and the warps apply at any M (measured at 4096 tokens only).
_ONE_PASS_ROWS = 512
_ONE_PASS_COLUMNS = 4096
_LONG_ROWS = 4096
QUANTIZE_BLOCKS = (1024, 4096)
_QUANTIZE_WARPS = 4
# expand()'s tiles per packing: (rows, bytes a row, warps). tq2: long rows of codes write wide contiguous runs
# (H200: 2.5-3.3 TB/s, 10-20% above 32 x 128 tiles); tq1: the best of six tiles timed on an H100 at
# FLUX.1-dev shapes, 1.0-1.2 TB/s into e4m3 (BENCHMARKS.md)
EXPAND_TILES = {"tq2": (16, 128, 8), "tq1": (32, 64, 4)}
# The split-K kernel's (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): tensor cores on 16-row tiles (splitk), and
# the one-token CUDA-core variant (gemv: 8 x 256 bytes a tile, 127-167 registers a thread on sm_90). K is split
# into slices until tiles x slices reach PROGRAMS_PER_SM programs per SM. benchmarks/gpu_small_m.py's choice
# on an H100 (BENCHMARKS.md): over FLUX.1-dev's small-M layers (a16 and fp8 on tq2, fp8 on tq1), the one
# tile per kernel nearest each shape's own best (geometric mean of time / best): gemv 3 % off, worst shape
# 17 %; splitk 10 %, worst 45 % (the sweep after the weights were built from bits; before: 4 / 16, 12 / 47).
SPLITK_TILE = (16, 64, 128, 4, 4)
GEMV_TILE = (1, 8, 1024, 4, 3)
PROGRAMS_PER_SM = 4
# The GEMV with int8/e4m3 activations quantizes x itself: every program divides the whole row once (a correctly
# rounded division is ~18 instructions on sm_90), so more rows a program share it: 8 x 1024 tiles take
# 6.8-7.5 instructions a code against a16's 4.5, 32 x 256 ones 4.9-5.2 (benchmarks/gpu_compile.py). Used when
# a layer has enough rows for PROGRAMS_PER_SM programs an SM without splitting K (partial sums cost a launch).
GEMV_QUANTIZING_TILES = ((1, 32, 256, 4, 3), (1, 16, 512, 4, 3))
# Variants the chooser also times at few tokens ("splitk8", "gemv8"): twice the programs an SM, which the H100
# sweeps found better for norm1.linear (18432 x 3072), a16: gemv on 16 x 512 tiles 13.7 against 15.0 us,
# split-K 26.5-28.0 against 32.5-33.3 us (docs/gpu/h100/gpu_small_m_bit_weights.md); one tile for every shape
# leaves such differences.
WIDE_PROGRAMS_PER_SM = 8
GEMV_WIDE_TILE = (1, 16, 512, 4, 3)
# The DP4A GEMV's (rows, words of 16 codes a step, warps), from the H200's sweep (benchmarks/gpu_small_m.py,
# docs/gpu/h200/gpu_small_m_dp4a.md). One token: 32 x 512 codes a step, 9.0 us on norm1.linear (18432 x 3072,
# the modulation layers FLUX runs at one token) against 11.4 for the first choice, 16 x 1024. 2-16 tokens: 16 x
# 512, an int32 sum a (token, row, word), 64 registers at 16 tokens: 1.25-1.6x faster than 8 x 512 at 16 tokens
# on the three shapes swept (still behind planar and split-K there).
DP4A_TILE = (32, 32, 4)
DP4A_FEW_TILE = (16, 32, 4)
# dp4ak (one token): few rows, long K steps, 8 x 2048 codes a step: the same H200 sweep's best on the 3072-row
# layers (ff net.2, 3072 x 12288: 12.5 against DP4A_TILE's 14.3 us; 3072 x 3072: 6.5 against 8.7), where
# DP4A_TILE's 32 rows give 96 programs and a K split with an epilogue launch; on norm1 DP4A_TILE stays best. A
# candidate of its own, so the chooser takes each layer's.
DP4A_LONG_TILE = (8, 128, 4)
# dp4a1 (one token, the row quantized in the kernel): twice DP4A_TILE's rows, which spreads the quantizing over
# twice the codes. Compiled for sm_90 offline (benchmarks/gpu_compile.py): 1.23 instructions a code at 161
# registers, against dp4a's 0.82 and 1.78 on dp4a's 32 rows; 128 rows spill (4 warps) or take 1.29 (8 warps).
# Not yet timed: gpu_small_m.py sweeps it.
DP4A_QUANTIZING_TILE = (64, 32, 4)
PLANE = 64  # the planar kernel's step: 64 tq2 bytes per row, one bit plane of 4 x 64 columns
# The planar kernel's (BLOCK_M, BLOCK_N, warps, stages) up to 16 tokens. Compiled for sm_90, its loop's
# instructions a code: 4.6 / 3.6 / 3.1 (a16 / fp8 / a8) on 128 rows, 76 registers or fewer; 5.8 / 4.5 / 4.3 on 64
# (the tile before), 4.0 / 3.0 / 2.5 on 256 but at up to 168 registers. Not yet timed: gpu_small_m.py sweeps it.
PLANAR_FEW_TILE = (16, 128, 4, 4)
_SCALE_TENSOR, _SCALE_CHANNEL, _SCALE_GROUP = 0, 1, 2
_ACT_FLOAT, _ACT_INT8, _ACT_FP8 = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the dispatcher reports this once and uses the reference backend
    triton = None
    _IMPORT_ERROR = f"Triton is not installed ({exc})"
else:
    _IMPORT_ERROR = None


# Read once, as Triton itself does when it decorates the kernels below: the backend asks on every call, and
# an os.environ lookup costs ~1 us (eager forwards can be bound by host time per call).
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Programmatic dependent launch (PDL; sm_90 and later, Triton's launch_pdl): a kernel so launched may start while
# the grid before it on the stream is still running, and waits for that grid's writes first thing
# (_await_inputs), before any load or store; then it lets the grid after it launch. The quantizer, the GEMVs and
# the split's epilogue of a few-token call are launched so: each launch overlaps the kernel before it instead of
# leaving the GPU idle between them, what is left of the 16-token calls beside their instructions
# (docs/GPU_KERNELS.md). The order of memory accesses is the stream's. Not yet timed on a GPU: PDL set False
# (BITFLUX_TRITON_PDL=0 in the environment, or the attribute, as benchmarks do to compare) launches without it.
PDL = os.environ.get("BITFLUX_TRITON_PDL") != "0"


def _interpreting() -> bool:
    return _INTERPRETING


def _cdiv(a: int, b: int) -> int:
    # Host-side grid arithmetic: triton.cdiv is a JIT-callable wrapper in recent Triton (~2 us a call).
    return -(-a // b)


def available() -> str | None:
    if triton is None:
        return _IMPORT_ERROR
    if not (_interpreting() or torch.cuda.is_available()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return None


def has_fp8(device: torch.device) -> bool:
    """fp8 e4m3 tensor cores: sm_89 (Ada) and later. The interpreter emulates fp8 on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return _interpreting()


def supports(x: torch.Tensor, weight, activations: str) -> bool:
    on_device = x.is_cuda or (_interpreting() and x.device.type == "cpu")
    grouped = weight.scales.shape[1] > 1
    if activations == "fp8" and (grouped or not has_fp8(x.device)):
        return False  # per-group fp8 has no kernel: the reference computes it
    return (on_device and x.dtype in _DTYPES
            and (not grouped or weight.group_size % GROUP_MULTIPLE == 0)
            and x.shape[-1] == weight.in_features and weight.packed.is_contiguous())


@dataclass(frozen=True)
class PreparedWeight:
    """The kernel's view of one ternary layer: its packed bytes themselves and fp32 scales. The bytes are held
    weakly: the layer owns them, and a cache of prepared weights keyed by them must not keep them alive."""

    packed_ref: weakref.ref  # to (out_features, ceil(in_features / codes per byte)) uint8, the layer's own
    scales: torch.Tensor  # fp32: (1,) per tensor, (out,) per channel, (out, groups) per group
    scale_mode: int
    in_features: int
    out_features: int
    group_size: int  # 0 unless per group
    scale_row: torch.Tensor | None  # per tensor or channel: (1, out) fp32, _scaled_mm's row-wise scale_b
    tq1: bool = False  # the bytes are tq1 (5 codes a byte, base 3), else tq2
    digit_table: torch.Tensor | None = None  # tq1: tq1_digit_table on the layer's device

    @property
    def packed(self) -> torch.Tensor:
        packed = self.packed_ref()
        if packed is None:
            raise RuntimeError("the layer bytes this prepared weight was made from are gone: prepare() it again")
        return packed


def prepare(weight) -> PreparedWeight:
    scales = weight.scales.float()
    if scales.numel() == 1:
        mode, group_size = _SCALE_TENSOR, 0
    elif scales.shape[1] == 1:
        mode, group_size = _SCALE_CHANNEL, 0
    else:
        mode, group_size = _SCALE_GROUP, weight.group_size
    scales = scales.contiguous() if mode == _SCALE_GROUP else scales.reshape(-1).contiguous()
    # Built once per layer (prepare is cached), not on every call.
    scale_row = None if mode == _SCALE_GROUP else scales.expand(weight.out_features).reshape(1, -1).contiguous()
    tq1 = weight.packing == "tq1"
    return PreparedWeight(weakref.ref(weight.packed), scales, mode, weight.in_features, weight.out_features, group_size,
                          scale_row, tq1, tq1_digit_table(weight.packed.device) if tq1 else None)


@functools.cache
def tq1_digit_table(device: torch.device) -> torch.Tensor:
    """(256,) int16: byte b -> its five base-3 digits floor(b / 3^p) mod 3 at bits 2p (bytes past 242, no valid
    tq1 byte, as formats.unpack reads them). The split-K tensor-core loop and expand() decode a tq1 byte with
    one load from this 512-byte table, which stays in L1 (4 lines: a warp's gather takes at most 4 passes),
    instead of four multiply-shift divisions by 3; the one-token GEMV keeps the arithmetic (measured faster
    there: docs/GPU_KERNELS.md)."""
    byte = torch.arange(256, dtype=torch.int32)
    bits = sum(((byte // 3**p) % 3) << (2 * p) for p in range(5))
    return bits.to(torch.int16).to(device)


def strategies(M: int, prepared: PreparedWeight, activations: str, dtype: torch.dtype = torch.bfloat16
               ) -> list[str]:
    """The strategies that can compute an (M, K) x layer call on activations of `dtype`, the default (used where
    nothing is timed) first."""
    grouped = prepared.scale_mode == _SCALE_GROUP
    names = []
    # int8 sums added in fp32 (the GEMV's products; the partial sums of split slices, which splitk, planar and
    # dp4a write when they split K) stay exact while 127 K < 2^24; longer int8 rows keep to int32 sums
    fp32_sums_exact = activations != "a8" or prepared.in_features <= FP32_EXACT_INT8_K
    few = not grouped and M <= SMALL_M and fp32_sums_exact
    gemv = few and M <= GEMV_M
    if few:
        names.append("splitk")
    if gemv:
        names.append("gemv")
    if not prepared.tq1:  # the tile kernels unpack 2-bit tiles
        names.append("tiled")
        if not grouped and fp32_sums_exact:  # a plane step spans 4 x PLANE columns: groups of 128 would mix
            names.append("planar")
    if M > SMALL_M or prepared.tq1:  # tq1 with per-group scales at few tokens: nothing else computes it
        names.append("expanded")
    # int8/fp8 cuBLAS wants K, N multiples of 16 and M > 16; its epilogues know no per-group scales; fp8's row-wise
    # scaled GEMM gives bf16 only, which would round fp16 and fp32 outputs (and their bias) to bf16's 8 bits
    aligned = prepared.in_features % 16 == 0 and prepared.out_features % 16 == 0
    if (M > SMALL_M and not grouped and (activations == "a16" or aligned)
            and (activations != "fp8" or dtype == torch.bfloat16)):
        names.append("cublas")
    names += ["splitk8"] * few + ["gemv8"] * gemv + ["qgemv"] * (gemv and activations != "a16")
    # DP4A: int8 activations on tq2 words (whole words a row)
    dp4a = few and activations == "a8" and not prepared.tq1 and prepared.in_features % 16 == 0
    # dp4a1: one token quantized in the kernel; dp4ak: one token on long K steps
    names += ["dp4a"] * dp4a + ["dp4a1", "dp4ak"] * (dp4a and M == 1)
    # Where nothing is timed (BITFLUX_TRITON_AUTOTUNE=0, the interpreter, a call first seen during a graph
    # capture) the first runs: the one measured fastest for most such calls on the H100/H200 (GPU_KERNELS.md).
    usual = ("gemv" if gemv else "splitk" if few
             else "expanded" if activations == "a8" or (activations == "fp8" and "cublas" not in names) else "cublas")
    return sorted(names, key=lambda name: name != usual)  # stable: the others keep their order


def linear(x: torch.Tensor, prepared: PreparedWeight, bias: torch.Tensor | None, activations: str,
           strategy: str | None = None) -> torch.Tensor:
    """x @ (codes x scales)^T + bias; `strategy` forces one of strategies() (tests, benchmarks)."""
    lead, K, N = x.shape[:-1], prepared.in_features, prepared.out_features
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    bias = bias.contiguous() if bias is not None else None
    if x.is_cuda and x.device.index != torch.cuda.current_device():  # Triton launches on the current device
        with torch.cuda.device(x.device):
            return linear(x, prepared, bias, activations, strategy)
    if strategy is None:
        # An eager forward is bound by host time: a shape already timed goes straight to its choice.
        tuned = x.is_cuda and _tuning()
        key = tuned and CallKey(activations, x.dtype, prepared.scale_mode, bias is not None, M, N, K, prepared.tq1,
                                x.device.index)
        strategy = chosen.get(key) if tuned else None
        if strategy is None:
            names = strategies(M, prepared, activations, x.dtype)
            strategy = names[0]
            if tuned and len(names) > 1:
                strategy = _choose(key, names, lambda name: _STRATEGIES[name](x2, prepared, bias, activations),
                                   x.device)
    elif strategy not in (names := strategies(M, prepared, activations, x.dtype)):
        raise ValueError(f"strategy {strategy!r} cannot compute this call; it takes one of {names}")
    return _STRATEGIES[strategy](x2, prepared, bias, activations).reshape(*lead, N)


def _tuning() -> bool:
    # The interpreter cannot time anything; BITFLUX_TRITON_AUTOTUNE=0 skips timing on a GPU (quick
    # correctness runs): the first tile config and the default strategy.
    return not _interpreting() and os.environ.get("BITFLUX_TRITON_AUTOTUNE") != "0"


class CallKey(NamedTuple):
    """What a strategy's speed depends on: calls with equal keys share one measurement."""

    activations: str
    dtype: torch.dtype
    scale_mode: int
    has_bias: bool
    M: int
    N: int
    K: int
    tq1: bool = False  # the packing: it changes the strategies that apply, and their speed
    device: int = 0  # the GPU's index: a process may hold GPUs of different models


chosen: dict[CallKey, str] = {}  # the fastest strategy on this GPU
timings: dict[CallKey, dict[str, float]] = {}  # measured ms per strategy (inf: failed here)
_stored: dict | None = None  # STRATEGY_FILE's contents, read once per process


def _choose(key: CallKey, names: list[str], run, device: torch.device) -> str:
    """The fastest strategy for calls of this key, timed once per GPU and software versions: the choice is
    kept in STRATEGY_FILE (in the bitflux cache), so a later process (another `bitflux generate`) starts
    without timing. Warm up before CUDA-graph capture, as for any Triton autotune (a call first seen while
    a graph is being captured cannot be timed: it takes the default strategy, not remembered). A strategy
    that fails on this GPU (a shape cuBLAS refuses, a missing instruction) is skipped."""
    if key in chosen:
        return chosen[key]
    namespace, entry = _namespace(device), _entry(key)
    stored = _load_stored().get(namespace, {}).get(entry)
    if stored in names:
        chosen[key] = stored
        return stored
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return names[0]
    times = {}
    for name in names:
        try:
            times[name] = _gpu_ms(lambda: run(name), graph=key.M <= SMALL_M)
        except Exception:  # noqa: BLE001 - a strategy this GPU cannot run is simply not chosen
            times[name] = float("inf")
    timings[key] = times
    chosen[key] = min(times, key=times.get)
    _save_stored(namespace, entry, chosen[key])
    return chosen[key]


def _gpu_ms(fn, graph: bool) -> float:
    """Median milliseconds a call of fn. graph (few tokens): replayed from a CUDA graph, the kernels' GPU time;
    timed eagerly, a few-us kernel measures its launch instead (on 3072 x 3072 at one token that chose `tiled`,
    13 us of GPU time, over `gemv`'s 3.6 us; BENCHMARKS.md). For the large calls, whose kernels outlast their
    launch, and once a capture has failed in this process: eagerly, with L2 flushed between calls. (Replayed,
    weights that fit in L2 stay there; every candidate reads the same bytes.)"""
    global _graph_timing
    if graph and _graph_timing:
        fn()  # a strategy this GPU cannot run fails here, eagerly, and is skipped: not a capture's failure
        try:
            return _graph_ms(fn)
        except Exception as exc:  # noqa: BLE001 - capture refused (a host sync, an uncapturable library call)
            # A failed capture can leave torch's allocator mid-capture (pytorch#159594): no more captures here.
            _graph_timing = False
            warnings.warn(f"bitflux: timing Triton strategies as CUDA graphs failed ({type(exc).__name__}: "
                          f"{exc}); they are timed eagerly from now on", stacklevel=2)
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


_graph_timing = True  # off after a failed capture
GRAPH_TIMING_MS = 10  # as many calls in the timed graph as take this long eagerly; replayed GRAPH_REPLAYS times
GRAPH_REPLAYS = 5


def _graph_ms(fn) -> float:
    """fn's GPU time: as many calls as take ~GRAPH_TIMING_MS eagerly, captured into one graph on a side stream
    (capture is refused on the default stream), after eager warm-up calls (Triton compiles and autotunes
    outside the capture), replayed GRAPH_REPLAYS times; the median per call. Errors of the capture are this
    thread's only (thread_local), so another thread's CUDA work is not invalidated."""
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(current)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        with torch.cuda.stream(stream):
            fn()
            start.record()
            for _ in range(3):
                fn()
            end.record()
            end.synchronize()
            calls = max(1, min(1000, round(GRAPH_TIMING_MS / max(start.elapsed_time(end) / 3, 1e-3))))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                for _ in range(calls):
                    fn()
            times = []
            for _ in range(GRAPH_REPLAYS):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
    finally:
        current.wait_stream(stream)
    return sorted(times)[len(times) // 2]


STRATEGY_FILE = "triton-strategies.json"


def _namespace(device: torch.device) -> str:
    from .. import __version__

    return (f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | triton {triton.__version__}"
            f" | bitflux {__version__} | kernels {kernels_fingerprint()}{' | pdl' if _pdl(device) else ''}")


@functools.cache
def kernels_fingerprint() -> str:
    """A digest of this module's source: choices timed against other kernels (an older bitflux, a checkout
    between releases) are not reused, as a kernel change can reorder the strategies (the one-token GEMV
    became 2.2-2.6x faster without a version change)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _entry(key: CallKey) -> str:
    return (f"{key.activations} {str(key.dtype).removeprefix('torch.')} scales {key.scale_mode} "
            f"bias {int(key.has_bias)} {key.M}x{key.N}x{key.K}{' tq1' if key.tq1 else ''}")


def _load_stored() -> dict:
    global _stored
    if _stored is None:
        from ..cache import cache_dir

        try:
            _stored = json.loads((cache_dir() / STRATEGY_FILE).read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measure again
            _stored = {}
    return _stored


def _save_stored(namespace: str, entry: str, name: str) -> None:
    """Add one choice, re-reading the file first (another process may have added some); written to a
    temporary name and renamed, so a reader never sees half a file. A cache that cannot be written costs
    only the timing next time."""
    global _stored
    from ..cache import cache_dir

    path = cache_dir() / STRATEGY_FILE
    _stored = None
    stored = _load_stored()
    stored.setdefault(namespace, {})[entry] = name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        warnings.warn(f"bitflux: cannot keep Triton strategy choices in {path} ({exc}); they are timed again "
                      "in every process", stacklevel=2)


def quantize_activations(x2: torch.Tensor, fp8: bool = False, plane_major: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> int8 (bit-identical to reference.quantize_activations) or float8_e4m3fn (M, K), and fp32
    (M,) scales: s = max|x| / 127 or / 448 per row. plane_major: the columns in the planar kernel's order,
    zero-padded to whole blocks (see plane_major)."""
    q, scale, _ = _operands(x2 if x2.stride(-1) == 1 else x2.contiguous(), fp8=fp8, plane_major=plane_major)
    return q, scale


def plane_major(x2: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (M, K') with K' = K rounded up to blocks of 4 x PLANE columns (zeros after K), each block
    reordered so that column PLANE p + j holds column 4j + p: the columns that bit plane p of the tq2 bytes
    j = 0 .. PLANE - 1 multiplies, side by side."""
    M, K = x2.shape
    padded = torch.nn.functional.pad(x2, (0, _padded(K) - K))
    return padded.view(M, -1, PLANE, 4).transpose(2, 3).reshape(M, -1)


def _padded(K: int) -> int:
    return _cdiv(K, 4 * PLANE) * 4 * PLANE


def expand(prepared: PreparedWeight, dtype: torch.dtype, scaled: bool = False) -> torch.Tensor:
    """The codes as a dense (N, K) matrix of `dtype` (int8, e4m3 or 16/32-bit float), a transient of one call
    for the GEMMs on expanded codes: {-1, 0, +1} is exact in each, and scales stay in the epilogue, so no
    full-precision weight is kept. scaled (16/32-bit floats, per tensor or channel): code x scale instead, the
    reference's dense weight, for a16 on cuBLAS (_cublas_linear), still a transient."""
    if scaled and (prepared.scale_row is None or dtype not in _DTYPES):
        raise ValueError("scaled codes are 16/32-bit floats of a layer with one scale a tensor or channel")
    return _operands(None, prepared=prepared, codes_dtype=dtype, scaled=scaled)[2]


def _operands(x2: torch.Tensor | None, fp8: bool = False, plane_major: bool = False,
              prepared: PreparedWeight | None = None, codes_dtype: torch.dtype | None = None, scaled: bool = False):
    """One launch of _operands_kernel: x2's rows quantized (q, per-token scales) and/or the layer's codes
    expanded (codes); what is not asked for is None. Both at once for the a8/fp8 GEMMs on expanded codes:
    an eager forward pays the host ~20-35 us per Triton launch (BENCHMARKS.md), more than some layers' GPU
    time."""
    # The part not asked for gets no programs (rows = 0 or tiles = 0), sizes that are never read, and any
    # tensor of the call for its pointers: its code is compiled out (QUANTIZE / EXPAND are constexpr).
    q = scale = packed = codes = None
    rows = stride_x = N = tiles = 0
    tq1 = False
    K = columns = tiles_k = 1  # K: the input features, shared by both parts
    if x2 is not None:
        rows, K = x2.shape
        columns = _padded(K) if plane_major else K
        q = torch.empty(rows, columns, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x2.device)
        scale = torch.empty(rows, dtype=torch.float32, device=x2.device)
        stride_x = x2.stride(0)
    block_n, block_bytes, expand_warps = EXPAND_TILES["tq2"]
    if prepared is not None:
        packed, K, N, tq1 = prepared.packed, prepared.in_features, prepared.out_features, prepared.tq1
        block_n, block_bytes, expand_warps = EXPAND_TILES["tq1" if tq1 else "tq2"]
        codes = torch.empty(N, K, dtype=codes_dtype, device=packed.device)
        tiles_k = _cdiv(packed.shape[1], block_bytes)
        tiles = _cdiv(N, block_n) * tiles_k
    block = _next_power_of_2(columns)
    one_pass = rows <= _ONE_PASS_ROWS and block <= _ONE_PASS_COLUMNS
    if not one_pass:
        block = min(block, QUANTIZE_BLOCKS[columns > _LONG_ROWS])
    table = prepared.digit_table if prepared is not None and tq1 else None
    row_scale = prepared.scale_row if scaled else None
    _operands_kernel[(rows + tiles,)](
        _or(x2, codes), _or(q, codes), _or(scale, codes), _or(packed, q), _or(table, _or(packed, q)), _or(codes, q),
        _or(row_scale, _or(scale, codes)), rows, K, columns, N,
        stride_x, packed.stride(0) if packed is not None else 0, tiles_k, QUANTIZE=q is not None,
        EXPAND=codes is not None, SCALED=scaled, TQ1=tq1, FP8=fp8, PLANE=PLANE if plane_major else 0,
        BLOCK=block, ONE_PASS=one_pass, EXPAND_N=block_n, EXPAND_BYTES=block_bytes,
        num_warps=_QUANTIZE_WARPS if q is not None else expand_warps, **_pdl((x2 if x2 is not None else packed).device))
    return q, scale, codes


def _next_power_of_2(n: int) -> int:
    # Host arithmetic, like _cdiv: triton.next_power_of_2 is a JIT-callable wrapper (~3 us a call).
    return 1 << (n - 1).bit_length()


def _operand_dtype(activations: str, dtype: torch.dtype) -> torch.dtype:
    return {"a8": torch.int8, "fp8": torch.float8_e4m3fn}.get(activations, dtype)


def _quantized(x2: torch.Tensor, activations: str):
    """The GEMM's left operand and its per-token scales (None for a16)."""
    if activations == "a16":
        return x2, None
    return quantize_activations(x2, fp8=activations == "fp8")


def _expanded_operands(x2: torch.Tensor, prepared: PreparedWeight, activations: str):
    """The left operand, its per-token scales (None for a16) and the layer's expanded codes, for the GEMMs on
    expanded codes: one launch."""
    codes_dtype = _operand_dtype(activations, x2.dtype)
    if activations == "a16":
        return x2, None, expand(prepared, codes_dtype)
    return _operands(x2, fp8=activations == "fp8", prepared=prepared, codes_dtype=codes_dtype)


def _cublas_linear(x2, prepared: PreparedWeight, bias, activations: str) -> torch.Tensor:
    """The codes expanded into a transient and multiplied by cuBLAS: torch.addmm/mm (a16), torch._int_mm (a8),
    torch._scaled_mm (fp8), scales in the epilogue but for a16, whose transient holds code x scale."""
    if activations == "a16":
        # Scales in the transient itself (code x scale, the reference's dense weight): one GEMM whatever the
        # scales (a layer of q/k/v fused by bitflux.fusion too), its bias in cuBLASLt's epilogue on a whole
        # output (column slices of it would have addmm copy the bias over them first), no pass over the
        # output to scale it, and fp16's sums in range.
        weights = expand(prepared, x2.dtype, scaled=True)
        return torch.mm(x2, weights.t()) if bias is None else torch.addmm(bias.to(x2.dtype), x2, weights.t())
    q, act_scale, codes = _expanded_operands(x2, prepared, activations)
    if activations == "a8":
        raw = torch._int_mm(q, codes.t())  # exact int32
    else:  # row-wise scaled fp8 wants bf16 output and bias; other dtypes are converted after
        raw = torch._scaled_mm(q, codes.t(), scale_a=act_scale[:, None], scale_b=prepared.scale_row,
                               bias=bias.to(torch.bfloat16) if bias is not None else None, out_dtype=torch.bfloat16)
        return raw.to(x2.dtype)
    return _epilogue(raw[None], prepared, act_scale, bias, x2.dtype)


def _splitk_linear(x2, prepared: PreparedWeight, bias, activations: str, fma: bool = False, tile: tuple | None = None,
                   per_sm: int | None = None, prequantized: bool = False) -> torch.Tensor:
    """Every (N tile, K slice) is one program, so a few tokens still fill the GPU. One slice: the kernel
    applies scales and bias itself (one launch); several: fp32 partials, summed in order by _epilogue.
    fma: products on CUDA cores (the gemv strategy, M == 1), else tl.dot on 16-row tiles; with int8/e4m3
    activations the GEMV quantizes its row itself unless `prequantized` (qgemv: the quantizer's launch first).
    tile, per_sm: other than the defaults (GEMV_TILE or SPLITK_TILE, PROGRAMS_PER_SM)."""
    M, K, N, out_dtype = x2.shape[0], prepared.in_features, prepared.out_features, x2.dtype
    quantize_here = fma and activations != "a16" and not prequantized  # the GEMV quantizes its one row itself
    if quantize_here:
        q, act_scale = x2, torch.empty(M, dtype=torch.float32, device=x2.device)
    else:
        q, act_scale = _quantized(x2, activations)
    if tile is None:
        tile = (_gemv_tile(N, activations, x2.device) if quantize_here else GEMV_TILE) if fma else SPLITK_TILE
    block_m, block_n, block_k, warps, stages = tile
    # A step reads block_k / 4 bytes a row: block_k codes in tq2, 5 / 4 of that in tq1.
    step = block_k // 4 * (5 if prepared.tq1 else 4)
    tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
    steps_per_slice, out = _split_k(_cdiv(K, step), tiles, M, N, out_dtype, x2.device, per_sm)
    _gemv_kernel[(_cdiv(N, block_n), _slices(out), _cdiv(M, block_m))](
        q, prepared.packed, _or(prepared.digit_table, prepared.packed), prepared.scales,
        _or(act_scale, prepared.scales), _or(bias, prepared.scales), out,
        M, N, K, q.stride(0), prepared.packed.stride(0), steps_per_slice * step,
        ACT=_ACT[activations], FMA=fma, QUANTIZE=quantize_here, TQ1=prepared.tq1, FUSED=_slices(out) == 1,
        SCALE_MODE=prepared.scale_mode,
        HAS_BIAS=bias is not None, DOT_FP32=_dot_fp32(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=K % step == 0, num_warps=warps, num_stages=stages, **_pdl(x2.device))
    return _finish_split(out, prepared, act_scale, bias, out_dtype)


def _gemv_tile(N: int, activations: str, device: torch.device) -> tuple:
    if activations != "a16":
        for tile in GEMV_QUANTIZING_TILES:
            if _cdiv(N, tile[1]) >= _target_programs(device):
                return tile
    return GEMV_TILE


def _split_k(steps: int, tiles: int, M: int, N: int, out_dtype, device, per_sm: int | None = None
             ) -> tuple[int, torch.Tensor]:
    """Spread `steps` K steps over slices so that tiles x slices about fill the GPU (per_sm programs an SM):
    the steps per slice, and the output the kernel writes: the (M, N) result itself when one slice does it
    all, else fp32 partial sums (slices, M, N) for _finish_split."""
    split = max(1, min(steps, _target_programs(device, per_sm) // tiles))
    per_slice = _cdiv(steps, split)
    slices = _cdiv(steps, per_slice)
    if slices == 1:
        return per_slice, torch.empty(M, N, dtype=out_dtype, device=device)
    return per_slice, torch.empty(slices, M, N, dtype=torch.float32, device=device)


def _slices(out: torch.Tensor) -> int:
    return 1 if out.dim() == 2 else out.shape[0]


def _finish_split(out: torch.Tensor, prepared: PreparedWeight, act_scale, bias, out_dtype) -> torch.Tensor:
    return out if out.dim() == 2 else _epilogue(out, prepared, act_scale, bias, out_dtype)


def _or(tensor, placeholder):
    """Kernels take every pointer; an absent tensor (no bias, no activation scale) passes any tensor."""
    return tensor if tensor is not None else placeholder


def _target_programs(device: torch.device, per_sm: int | None = None) -> int:
    per_sm = per_sm or PROGRAMS_PER_SM
    if device.type == "cuda":
        return per_sm * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 2 * per_sm  # the interpreter: still split, to exercise the reduction


@functools.cache
def _multiprocessors(device_index: int) -> int:
    # Asked on every small-M call: looked up once per device (eager forwards are bound by host time).
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pdl(device: torch.device) -> dict:
    """The launch options of a kernel launched with programmatic dependent launch on `device` (see PDL):
    its PDL constexpr (the wait) and Triton's launch_pdl; none where the GPU or Triton lacks it."""
    if not (PDL and _HAS_PDL and device.type == "cuda" and _pdl_capable(device.index)):
        return {}
    return {"PDL": True, "launch_pdl": True}


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs get exact fp32 products (not tf32); the interpreter's tl.dot misreads bf16 operands
    # as integers, so there bf16 and e4m3 are widened too (same products, exactly).
    return dtype == torch.float32 or (_interpreting() and dtype in (torch.bfloat16, torch.float8_e4m3fn))


def _epilogue(partial, prepared: PreparedWeight, act_scale, bias, out_dtype) -> torch.Tensor:
    """(S, M, N) partial sums (fp32, int32 or 16-bit) -> sum over S, x weight scale x activation scale
    + bias."""
    S, M, N = partial.shape
    out = torch.empty(M, N, dtype=out_dtype, device=partial.device)
    block_m, block_n = 16, 128
    _epilogue_kernel[(_cdiv(M, block_m), _cdiv(N, block_n))](
        partial, prepared.scales, _or(act_scale, prepared.scales), _or(bias, prepared.scales), out, S, M, N,
        SCALE_MODE=prepared.scale_mode, ACT_SCALED=act_scale is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **_pdl(partial.device))
    return out


def _tiled_linear(x2, prepared: PreparedWeight, bias, activations: str) -> torch.Tensor:
    q, act_scale = _quantized(x2, activations)
    return _matmul(q, act_scale, prepared.packed, prepared, bias, activations, x2.dtype, dense=False)


def _expanded_linear(x2, prepared: PreparedWeight, bias, activations: str) -> torch.Tensor:
    q, act_scale, codes = _expanded_operands(x2, prepared, activations)
    return _matmul(q, act_scale, codes, prepared, bias, activations, x2.dtype, dense=True)


def _matmul(q, act_scale, weight, prepared: PreparedWeight, bias, activations: str, out_dtype, dense: bool
            ) -> torch.Tensor:
    """The tile kernel on tq2 bytes (dense=False) or on expanded codes (dense=True); q: the activations
    (quantized for a8/fp8, with act_scale)."""
    M, K, N = q.shape[0], prepared.in_features, prepared.out_features
    out = torch.empty(M, N, dtype=out_dtype, device=q.device)

    def grid(meta):
        return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)

    _ternary_matmul[grid](
        q, weight, prepared.scales, _or(act_scale, prepared.scales), _or(bias, prepared.scales), out,
        M, N, K, q.stride(0), weight.stride(0), out.stride(0), max(prepared.group_size, 1),
        SCALE_MODE=prepared.scale_mode, ACT=_ACT[activations], DENSE=dense, HAS_BIAS=bias is not None,
        DOT_FP32=_dot_fp32(q.dtype),
    )
    return out


def _planar_linear(x2, prepared: PreparedWeight, bias, activations: str) -> torch.Tensor:
    """The planar kernel: activations in plane-major order (written so by the quantizer for a8/fp8, one
    permuting copy for a16), split over K like splitk when the tiles alone cannot fill the GPU."""
    M, K, N, out_dtype = x2.shape[0], prepared.in_features, prepared.out_features, x2.dtype
    if activations == "a16":
        q, act_scale = plane_major(x2), None
    else:
        q, act_scale = quantize_activations(x2, fp8=activations == "fp8", plane_major=True)
    # one tile shape per regime: 16 tokens (memory-bound) ... 128 (compute-bound)
    block_m, block_n, warps, stages = PLANAR_FEW_TILE if M <= 16 else (64, 128, 4, 4) if M <= 64 else (128, 128, 8, 3)
    tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
    # sliced by whole blocks: a block's 4 plane steps share its bytes in L2
    blocks_per_slice, out = _split_k(q.shape[1] // (4 * PLANE), tiles, M, N, out_dtype, x2.device)
    _planar_matmul[(_cdiv(N, block_n), _slices(out), _cdiv(M, block_m))](
        q, prepared.packed, prepared.scales, _or(act_scale, prepared.scales), _or(bias, prepared.scales), out,
        M, N, K, q.stride(0), prepared.packed.stride(0), 4 * blocks_per_slice, SCALE_MODE=prepared.scale_mode,
        ACT=_ACT[activations], HAS_BIAS=bias is not None, DOT_FP32=_dot_fp32(q.dtype), FUSED=_slices(out) == 1,
        EVEN_K=K % (4 * PLANE) == 0, BLOCK_M=block_m, BLOCK_N=block_n, PLANE=PLANE, num_warps=warps,
        num_stages=stages, **_pdl(x2.device))
    return _finish_split(out, prepared, act_scale, bias, out_dtype)


def _dp4a_linear(x2, prepared: PreparedWeight, bias, activations: str, quantizing: bool = False,
                 tile: tuple | None = None) -> torch.Tensor:
    """Up to 16 tokens of int8 activations (a8): integer dot products of four codes (DP4A) on CUDA cores, on
    words of the codes as they lie and of the rows quantized in plane-major order; split over K like splitk
    when the N tiles alone cannot fill the GPU. quantizing (dp4a1, one token): no quantizer launch; the kernel
    quantizes the float row itself, as the gemv strategy does. tile: (rows, words, warps) other than the
    defaults (dp4ak: DP4A_LONG_TILE)."""
    M, N, out_dtype = x2.shape[0], prepared.out_features, x2.dtype
    if quantizing:
        x_words, act_scale = x2, torch.empty(M, dtype=torch.float32, device=x2.device)
    else:
        q, act_scale = quantize_activations(x2, plane_major=True)
        x_words = q.view(torch.int32)  # no copy (K % 16 == 0)
    block_m = min(_next_power_of_2(M), SMALL_M)
    block_n, words, warps = tile or (DP4A_QUANTIZING_TILE if quantizing else DP4A_TILE if M == 1 else DP4A_FEW_TILE)
    words_per_slice, out = _split_k(_cdiv(prepared.in_features // 16, words), _cdiv(N, block_n), M, N, out_dtype,
                                    x2.device)
    packed = prepared.packed.view(torch.int32)
    _dp4a_gemv_kernel[(_cdiv(N, block_n), _slices(out), _cdiv(M, block_m))](
        x_words, packed, prepared.scales, act_scale, _or(bias, prepared.scales), out, M, N, prepared.in_features,
        x_words.stride(0), packed.stride(0), words_per_slice * words, SCALE_MODE=prepared.scale_mode,
        HAS_BIAS=bias is not None, FUSED=_slices(out) == 1, QUANTIZE=quantizing,
        EVEN_K=prepared.in_features // 16 % words == 0, BLOCK_M=block_m, BLOCK_N=block_n, WORDS=words,
        PLANE_WORDS=PLANE // 4, num_warps=warps, **_pdl(x2.device))
    return _finish_split(out, prepared, act_scale, bias, out_dtype)


_ACT = {"a16": _ACT_FLOAT, "a8": _ACT_INT8, "fp8": _ACT_FP8}
_STRATEGIES = {"splitk": _splitk_linear, "gemv": functools.partial(_splitk_linear, fma=True),
               "tiled": _tiled_linear, "planar": _planar_linear, "expanded": _expanded_linear,
               "cublas": _cublas_linear,
               "splitk8": functools.partial(_splitk_linear, per_sm=WIDE_PROGRAMS_PER_SM),
               "gemv8": functools.partial(_splitk_linear, fma=True, tile=GEMV_WIDE_TILE, per_sm=WIDE_PROGRAMS_PER_SM),
               "qgemv": functools.partial(_splitk_linear, fma=True, prequantized=True), "dp4a": _dp4a_linear,
               "dp4a1": functools.partial(_dp4a_linear, quantizing=True),
               "dp4ak": functools.partial(_dp4a_linear, tile=DP4A_LONG_TILE)}


_HAS_PDL = False
if triton is not None:
    try:  # griddepcontrol and the launch option (Triton 3.3 and later, NVIDIA)
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:
        gdc_wait = gdc_launch_dependents = None  # never reached: _await_inputs' branch is compiled out
    else:
        _HAS_PDL = not _INTERPRETING and "launch_pdl" in CUDAOptions.__dataclass_fields__

    # Compiled for NVIDIA GPUs, the tensor-core kernels decode tq2 codes with inline PTX (_plane_codes), and the
    # DP4A GEMV multiplies with it; the interpreter (and ROCm, whose torch also answers to "cuda") runs no PTX
    # and takes the same arithmetic spelled out.
    _PTX = tl.constexpr(not _INTERPRETING and torch.version.hip is None)
    # $2 (four tq2 bytes) >> $3 puts each byte's digit u = w + 1 in its bits 0-1. 16-bit floats: bytes 0, 1
    # (2, 3) of that under a high byte 0x43 (bf16) or 0x64 (fp16), masked, are 2^7 + u or 2^10 + u (u in the
    # mantissa's last bits), and one packed multiply-add takes off 2^7 + 1 (2^10 + 1): $0 (elements 0, 1) and
    # $1 (2, 3) hold w exactly.
    _PTX_16BIT = ("{{ .reg .b32 t, l, h, one, off; mov.b32 one, {one:#x}; mov.b32 off, {off:#x}; shr.b32 t, $2, $3; "
                  "prmt.b32 l, t, {high:#x}, 0x4140; prmt.b32 h, t, {high:#x}, 0x4342; and.b32 l, l, 0xFF03FF03; "
                  "and.b32 h, h, 0xFF03FF03; fma.rn.{kind} $0, l, one, off; fma.rn.{kind} $1, h, one, off; }}")
    _PTX_BF16 = tl.constexpr(_PTX_16BIT.format(kind="bf16x2", high=0x43434343, one=0x3F803F80, off=0xC301C301))
    _PTX_FP16 = tl.constexpr(_PTX_16BIT.format(kind="f16x2", high=0x64646464, one=0x3C003C00, off=0xE401E401))
    # 8-bit codes: the four digits ($1 >> $2, masked) gathered into the nibbles of a byte permute's selector,
    # which picks each code from a table of four bytes (u = 0, 1, 2 -> w = -1, 0, +1): one register, $0.
    _PTX_8BIT = ("{{ .reg .b32 a, b; shr.b32 a, $1, $2; and.b32 a, a, 0x03030303; shr.b32 b, a, 4; "
                 "or.b32 a, a, b; prmt.b32 a, a, 0, 0x4420; prmt.b32 $0, {table:#x}, 0, a; }}")
    _PTX_INT8 = tl.constexpr(_PTX_8BIT.format(table=0x000100FF))  # -1, 0, +1 in int8
    _PTX_E4M3 = tl.constexpr(_PTX_8BIT.format(table=0x003800B8))  # -1.0, 0, +1.0 in float8_e4m3fn

    @triton.jit
    def _round_half_even(v):
        # torch.round rounds half to even; adding and removing 1.5 * 2^23 does exactly that in fp32 for
        # |v| < 2^22, in compiled code and in the interpreter alike (libdevice.rint is not interpreted).
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _round_to_e4m3(v):
        """fp32 -> the nearest float8_e4m3fn value (ties to even, subnormals kept), still in fp32, for
        |v| <= 448. Done in fp32 so that compiled code and the interpreter (whose fp8 cast truncates
        subnormals and rounds ties away) agree with torch's .to(torch.float8_e4m3fn)."""
        exponent = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: 2^-6
        step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: 2^(e - 3)
        inv_step = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)  # powers of two: exact
        return _round_half_even(v * inv_step) * step

    @triton.jit
    def _await_inputs(PDL: tl.constexpr):
        """First thing in every kernel launched with programmatic dependent launch (_pdl): wait until the grid
        before it on the stream has finished and its writes are visible, before any load or store (so the
        order of memory accesses is the stream's), then let the next grid launch, to wait in turn while this
        one runs."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _operands_kernel(x_ptr, q_ptr, scale_ptr, w_ptr, table_ptr, codes_ptr, row_scale_ptr, rows, K, KQ, N,
                         stride_xm, stride_wn, tiles_k,
                         QUANTIZE: tl.constexpr, EXPAND: tl.constexpr, SCALED: tl.constexpr, TQ1: tl.constexpr,
                         FP8: tl.constexpr,
                         PLANE: tl.constexpr,
                         BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, EXPAND_N: tl.constexpr,
                         EXPAND_BYTES: tl.constexpr, PDL: tl.constexpr = False):
        """Programs 0 .. rows - 1 quantize one row of x each (QUANTIZE), the others expand the codes of one
        (EXPAND_N, EXPAND_BYTES) tile of the packed bytes each (EXPAND; SCALED: times row_scale_ptr's scale of
        their row)."""
        _await_inputs(PDL)
        pid = tl.program_id(0)
        if pid < rows:
            if QUANTIZE:
                _quantize_row(x_ptr, q_ptr, scale_ptr, pid.to(tl.int64), K, KQ, stride_xm, FP8, PLANE, BLOCK,
                              ONE_PASS)
        else:
            if EXPAND:
                tile = pid - rows
                _expand_tile(w_ptr, table_ptr, codes_ptr, row_scale_ptr, tile // tiles_k, tile % tiles_k, N, K,
                             stride_wn, SCALED, TQ1, EXPAND_N, EXPAND_BYTES)

    @triton.jit
    def _quantize_row(x_ptr, q_ptr, scale_ptr, row, K, KQ, stride_xm, FP8: tl.constexpr, PLANE: tl.constexpr,
                      BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        """One row of x -> KQ >= K quantized columns (zeros past K) and its scale; with PLANE, in plane-major
        order. ONE_PASS (KQ <= BLOCK): the row is read from memory once and kept in registers; else two passes
        over blocks of BLOCK columns, the row's absmax, then its values."""
        x_row, q_row = x_ptr + row * stride_xm, q_ptr + row * KQ
        qmax: tl.constexpr = 448.0 if FP8 else 127.0
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            scale = _absmax_scale(tl.max(tl.abs(x), axis=0) + tl.sum(x * 0.0, axis=0), qmax)
            tl.store(q_row + _plane_major_column(offs, PLANE), _quantize_values(x, scale, qmax, FP8),
                     mask=offs < KQ)
        else:
            scale = _absmax_scale(_row_absmax(x_row, K, BLOCK), qmax)
            for k0 in range(0, KQ, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                tl.store(q_row + _plane_major_column(offs, PLANE), _quantize_values(x, scale, qmax, FP8),
                         mask=offs < KQ)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _row_absmax(x_row, K, BLOCK: tl.constexpr):
        """max |x| over a row of K values, read in blocks of BLOCK; NaN if one is NaN or infinite (as below)."""
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        poison = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
            poison += x * 0.0
        return tl.max(amax, axis=0) + tl.sum(poison, axis=0)

    @triton.jit
    def _absmax_scale(amax, qmax: tl.constexpr):
        # The max instructions drop NaN: a row's NaN or infinity comes as amax = NaN (its absmax plus the sum of
        # x * 0), and (amax - amax) makes the scale NaN, so the row's outputs are NaN as the reference's are,
        # not finite numbers made from the rest of the row.
        # div_rn: the default fp32 division on GPUs is approximate, the reference's is correctly rounded.
        return tl.math.div_rn(tl.maximum(amax, 1e-12), qmax) + (amax - amax)

    @triton.jit
    def _quantize_values(x, scale, qmax: tl.constexpr, FP8: tl.constexpr):
        if FP8:
            return _quantized_fp32(x, scale, qmax, FP8).to(tl.float8e4nv)  # exact: the value is representable
        else:
            return _quantized_fp32(x, scale, qmax, FP8).to(tl.int8)

    @triton.jit
    def _quantized_fp32(x, scale, qmax: tl.constexpr, FP8: tl.constexpr):
        """x's quantized values (int8 or e4m3), still in fp32."""
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -qmax), qmax)
        if FP8:
            return _round_to_e4m3(v)
        else:
            return _round_half_even(v)

    @triton.jit
    def _plane_major_column(column, PLANE: tl.constexpr):
        """Where column 4j + p of a block of 4 x PLANE columns goes in plane-major order: PLANE p + j (the
        column that plane p of byte j multiplies). PLANE = 0: natural order."""
        if PLANE == 0:
            return column
        else:
            inner = column % (4 * PLANE)
            return column - inner + (inner % 4) * PLANE + inner // 4

    @triton.jit
    def _unpack_values(packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_K / 4) tq2 bytes -> (BLOCK_N, BLOCK_K) weights w = u - 1 in fp32, in K order."""
        return _in_k_order(_plane_value(packed, 0), _plane_value(packed, 1), _plane_value(packed, 2),
                           _plane_value(packed, 3), BLOCK_N, BLOCK_K)

    @triton.jit
    def _tq2_weights(packed, CODES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_K / 4) tq2 bytes -> (BLOCK_N, BLOCK_K) weights in K order, in the dtype CODES."""
        if CODES == tl.float32:
            return _unpack_values(packed, BLOCK_N, BLOCK_K)  # from the bits in place: no shifts
        return _in_k_order(_plane_codes(packed, 0, CODES), _plane_codes(packed, 2, CODES),
                           _plane_codes(packed, 4, CODES), _plane_codes(packed, 6, CODES), BLOCK_N, BLOCK_K)

    @triton.jit
    def _plane_codes(packed, shift, CODES: tl.constexpr):
        """w = u - 1 of the digits at bits `shift` of tq2 bytes (uint8), in CODES, the dtype of an MMA operand.
        Compiled: inline PTX decodes four bytes (one register) at a time, 1.5-1.75 instructions a code (see
        _PTX_16BIT, _PTX_8BIT) against ~4.5 for the float arithmetic and its conversion, which the tensor-core
        loops spent (sm_90: planar's loop 290 -> 184 instructions for a16, 268 -> 145 for fp8; split-K's
        393 -> 289; docs/GPU_KERNELS.md). The interpreter runs no PTX: the same values by arithmetic (exact
        in every dtype; it mishandles integer -> 16-bit casts, so floats are built in fp32)."""
        if _PTX and CODES != tl.float32:
            shifts = tl.zeros(packed.shape, tl.int32) + shift  # the same in each of the four; one register
            if CODES == tl.bfloat16:
                return tl.inline_asm_elementwise(_PTX_BF16, "=r,=r,r,r,r,r,r", [packed, shifts], dtype=tl.bfloat16,
                                                 is_pure=True, pack=4)
            elif CODES == tl.float16:
                return tl.inline_asm_elementwise(_PTX_FP16, "=r,=r,r,r,r,r,r", [packed, shifts], dtype=tl.float16,
                                                 is_pure=True, pack=4)
            elif CODES == tl.int8:
                return tl.inline_asm_elementwise(_PTX_INT8, "=r,r,r,r,r,r", [packed, shifts], dtype=tl.int8,
                                                 is_pure=True, pack=4)
            else:
                tl.static_assert(CODES == tl.float8e4nv, "tq2 codes decode into bf16, fp16, int8, e4m3 or fp32")
                return tl.inline_asm_elementwise(_PTX_E4M3, "=r,r,r,r,r,r", [packed, shifts], dtype=tl.float8e4nv,
                                                 is_pure=True, pack=4)
        elif CODES == tl.int8:
            return ((packed >> shift) & 3).to(tl.int8) - 1
        else:
            return _ternary_value((packed >> shift) & 3).to(CODES)

    @triton.jit
    def _in_k_order(plane0, plane1, plane2, plane3, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Four (BLOCK_N, BLOCK_K / 4) planes, plane p holding column 4j + p at j -> (BLOCK_N, BLOCK_K)."""
        # join appends a minor axis: [n, r, q, p] = plane(2q + p), so the flattened index 4r + 2q + p is K.
        return tl.reshape(tl.join(tl.join(plane0, plane2), tl.join(plane1, plane3)), (BLOCK_N, BLOCK_K))

    @triton.jit
    def _ternary_value(digits):
        """Digits u in {0, 1, 2} -> w = u - 1 in fp32, exactly, without an integer -> float conversion: GPUs
        convert at a quarter of the FMA rate or less, and in the one-token GEMV that conversion was one
        instruction per code of ~8 (sm_90 SASS). The bits of 2^23 with u in the low mantissa bits are the
        float 2^23 + u; one subtraction leaves u - 1."""
        return (digits.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0

    @triton.jit
    def _plane_value(packed, p: tl.constexpr):
        """w = u - 1 of the code at bits 2p of each element (a tq2 byte, or a tq1 byte's table bits), in fp32,
        exactly: the same trick without shifting the code down first. Its bits in the mantissa of 1.0 make the
        float 1 + u 2^(2p - 23), and one multiply-add by powers of two leaves u - 1."""
        one_plus = ((packed.to(tl.int32) | 0x3F800000) & (0x3F800000 | (3 << (2 * p)))).to(tl.float32, bitcast=True)
        return one_plus * (2.0 ** (23 - 2 * p)) - (2.0 ** (23 - 2 * p) + 1.0)

    @triton.jit
    def _load_packed(w_ptr, offs_n, mask_n, stride_wn, k0, K, BYTES: tl.constexpr, TQ1: tl.constexpr = False):
        """BYTES bytes a row of the weight at rows offs_n, from the one holding column k0 (k0: a multiple of
        the codes per byte); outside the layer (past N, past K, or a whole tile past K when prefetching):
        digits 1, w = 0 (formats.ZERO_BYTE: 0x55 in tq2, 121 in tq1)."""
        per_byte: tl.constexpr = 5 if TQ1 else 4
        offs_byte = k0 // per_byte + tl.arange(0, BYTES)
        return tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_byte[None, :],
                       mask=mask_n[:, None] & (offs_byte[None, :] < tl.cdiv(K, per_byte)),
                       other=121 if TQ1 else 0x55)

    @triton.jit
    def _third(t):
        # t // 3 for 0 <= t <= 255 as a multiply and shift (exact there): GPUs have no integer divider
        return (t * 171) >> 9

    @triton.jit
    def _tq1_plane(packed, p: tl.constexpr):
        """Digit p (the code of column 5j + p) of every tq1 byte j: floor(byte / 3^p) mod 3, by multiplies and
        shifts (the compiler shares the repeated thirds between the planes of one tile)."""
        t = packed.to(tl.int32)
        for _ in tl.static_range(p):
            t = _third(t)
        return t - 3 * _third(t)

    @triton.jit
    def _tq1_weights(bits, p: tl.constexpr, ACT: tl.constexpr):
        """Weights w = u - 1 of digit p of tq1 bytes, from their table bits (tq1_digit_table: digit p at bits
        2p): int8 for int8 activations (ACT == 1), else fp32."""
        if ACT == 1:
            return ((bits >> (2 * p)) & 3).to(tl.int8) - 1
        else:
            return _plane_value(bits, p)

    @triton.jit
    def _tq1_slots(bits, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BYTES: tl.constexpr):
        """(BLOCK_N, BYTES) tq1 bytes' table bits -> (BLOCK_N, 8 BYTES) weights: slot 8j + p holds digit p's
        (column 5j + p) of byte j, slots 8j + 5 .. 8j + 7 are 0 and never stored. Joins interleave by twos
        only, so a byte's five digits take eight slots; a gather of each column's byte instead was 1.5-2x
        slower (H100)."""
        w0, w1, w2 = _tq1_weights(bits, 0, ACT), _tq1_weights(bits, 1, ACT), _tq1_weights(bits, 2, ACT)
        w3, w4 = _tq1_weights(bits, 3, ACT), _tq1_weights(bits, 4, ACT)
        pad = tl.zeros_like(w0)
        # as in _in_k_order: [n, j, c, b, a] = slot 4a + 2b + c
        slots = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, pad)), tl.join(tl.join(w1, pad), tl.join(w3, pad)))
        return tl.reshape(slots, (BLOCK_N, 8 * BYTES))

    @triton.jit
    def _own_row_scale(x_ptr, act_scale_ptr, K, first_program, QMAX: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_M: tl.constexpr):
        """For a GEMV that quantizes its one float row itself: the row's scale, as _quantize_row makes it (every
        program reads the whole row), and the tile's row scales; the first program stores the scale for
        _epilogue_kernel."""
        act_scale = _absmax_scale(_row_absmax(x_ptr, K, BLOCK), QMAX)
        row_scales = tl.full([BLOCK_M], act_scale, dtype=tl.float32)
        if first_program:
            tl.store(act_scale_ptr, act_scale)
        return act_scale, row_scales

    @triton.jit
    def _row_scales(act_scale_ptr, offs_m, mask_m, ACT_SCALED: tl.constexpr):
        """The activation scales of rows offs_m (ACT_SCALED; else zeros, never used)."""
        if ACT_SCALED:
            return tl.load(act_scale_ptr + offs_m, mask=mask_m, other=0.0)
        else:
            return tl.zeros(offs_m.shape, dtype=tl.float32)

    @triton.jit
    def _rounded_product(a, b):
        """a * b in fp32, rounded by itself. Compiled, Triton fuses a multiply and the add that takes its product
        into one FMA (fp fusion, on by default), which rounds once where the reference rounds the product and
        then the sum: the int8 paths' outputs would then differ from reference.linear_a8 in their last bits.
        A multiply in inline PTX is opaque to that fusion. The interpreter never fuses."""
        if _PTX:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return a * b

    @triton.jit
    def _scale_and_bias(acc, offs_n, mask_n, scale_ptr, row_scales, bias_ptr, SCALE_MODE: tl.constexpr,
                        ACT_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The epilogue shared by every kernel, in the reference's order, each step rounded as there: x weight
        scale, x activation scale (row_scales: one a row of acc), + bias (fp32)."""
        if SCALE_MODE == 0:
            acc = _rounded_product(acc, tl.load(scale_ptr))
        elif SCALE_MODE == 1:
            acc = _rounded_product(acc, tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :])
        if ACT_SCALED:
            acc = _rounded_product(acc, row_scales[:, None])
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _accumulate(a, codes, acc, SWAP: tl.constexpr, SUMS: tl.constexpr):
        """acc + a @ codes^T, or with SWAP its transpose codes @ a^T: the unpacked codes as the MMA's left
        operand, which Hopper's wgmma takes straight from registers (the right one must be in shared memory,
        where Triton's pipeline already puts the activations). SUMS: "int32"; "ieee" (exact fp32 products);
        "fp8", whose sums are promoted to the fp32 accumulator after every tile: left to itself Triton lets
        Hopper's fp8 MMAs accumulate a whole K in their reduced-precision adder (about 14 mantissa bits),
        which cuBLAS's _scaled_mm does not; "native" otherwise."""
        if SWAP:
            left, right = codes, tl.trans(a)
        else:
            left, right = a, tl.trans(codes)
        if SUMS == "int32":
            return tl.dot(left, right, acc, out_dtype=tl.int32)
        elif SUMS == "ieee":
            return tl.dot(left, right, acc, input_precision="ieee")
        elif SUMS == "fp8":
            return tl.dot(left, right, acc, max_num_imprecise_acc=left.shape[1])
        else:
            return tl.dot(left, right, acc)

    @triton.jit
    def _store_slice(acc, split_index, offs_m, offs_n, mask_m, mask_n, M, N, scale_ptr, row_scales, bias_ptr,
                     out_ptr, FUSED: tl.constexpr, SCALE_MODE: tl.constexpr, ACT_SCALED: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
        """A split-K program's (M, N) tile: FUSED (the only slice), scaled and stored as the output; else its
        fp32 partial sums at out[split_index], for _epilogue_kernel."""
        mask = mask_m[:, None] & mask_n[None, :]
        if FUSED:
            acc = _scale_and_bias(acc, offs_n, mask_n, scale_ptr, row_scales, bias_ptr, SCALE_MODE, ACT_SCALED,
                                  HAS_BIAS)
            out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            out = out_ptr + (split_index * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
            tl.store(out, acc, mask=mask)

    @triton.jit
    def _expand_tile(w_ptr, table_ptr, out_ptr, row_scale_ptr, tile_n, tile_k, N, K, stride_wn, SCALED: tl.constexpr,
                     TQ1: tl.constexpr, BLOCK_N: tl.constexpr, BYTES: tl.constexpr):
        """The codes of one (BLOCK_N, BYTES) tile of the packed bytes, as {-1, 0, +1} in out's dtype (SCALED: times
        their row's scale, exact in fp32 and rounded once to out's dtype, as the reference's dense weight)."""
        ACT: tl.constexpr = 1 if out_ptr.dtype.element_ty == tl.int8 else 0  # tq1: integer weights, or fp32 to cast
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if TQ1:
            k0 = tile_k * BYTES * 5
            packed = _load_packed(w_ptr, offs_n, mask_n, stride_wn, k0, K, BYTES, True)
            w = _tq1_slots(tl.load(table_ptr + packed).to(tl.int32), ACT, BLOCK_N, BYTES)
            slot = tl.arange(0, 8 * BYTES)
            offs_k = k0 + (slot // 8) * 5 + slot % 8
            mask_k = (slot % 8 < 5) & (offs_k < K)
        else:
            k0 = tile_k * BYTES * 4
            w = _tq2_weights(_load_packed(w_ptr, offs_n, mask_n, stride_wn, k0, K, BYTES), out_ptr.dtype.element_ty,
                             BLOCK_N, BYTES * 4)
            offs_k = k0 + tl.arange(0, BYTES * 4)
            mask_k = offs_k < K
        if SCALED:
            w = w.to(tl.float32) * tl.load(row_scale_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        out = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, table_ptr, scale_ptr, act_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                     stride_wn, k_slice, ACT: tl.constexpr, FMA: tl.constexpr, QUANTIZE: tl.constexpr,
                     TQ1: tl.constexpr, FUSED: tl.constexpr,
                     SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        """x (M, K) @ codes^T over one K slice, for one N tile: FUSED, the finished (M, N) output; else
        fp32 partial sums (split, M, N) for _epilogue_kernel. A step reads BLOCK_K / 4 bytes a row: BLOCK_K
        columns of tq2, or 5 / 4 as many of tq1 (k_slice: a multiple of the step). table_ptr: tq1_digit_table,
        which the tensor-core tq1 loop reads (any pointer otherwise). QUANTIZE (FMA with int8 or e4m3 ACT): x
        is the float row itself, quantized here as _quantize_row does (bit for bit): every program reads the
        whole row once for its scale (from L2 and L1; 2 K bytes of bf16 against BLOCK_N K / 4 of codes), and
        program (0, 0) stores the scale for _epilogue_kernel. That saves the quantizer's launch, which at one
        token took as long as the GEMV on small layers (H100: 3.5-6.5 us), but delays every program's weight
        stream by that read (qgemv, without it, lets the chooser compare)."""
        _await_inputs(PDL)
        BYTES: tl.constexpr = BLOCK_K // 4
        PER_BYTE: tl.constexpr = 5 if TQ1 else 4
        STEP: tl.constexpr = BYTES * PER_BYTE
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        k_start = pid_k * k_slice
        k_end = tl.minimum(k_start + k_slice, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_int = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        offs_j = tl.arange(0, BYTES)  # planes: byte j of a step holds columns PER_BYTE j .. PER_BYTE j + PER_BYTE - 1
        QMAX: tl.constexpr = 448.0 if ACT == 2 else 127.0
        if QUANTIZE:
            act_scale, row_scales = _own_row_scale(x_ptr, act_scale_ptr, K, (pid_n == 0) & (pid_k == 0), QMAX,
                                                   BLOCK_K, BLOCK_M)
        else:
            row_scales = _row_scales(act_scale_ptr, offs_m, mask_m, ACT != 0)
        # FMA (one token): products summed elementwise across the loop, reduced across lanes once at the end;
        # in fp32 for every ACT, which is exact for int8 activations (|sum| <= 127 K < 2^24).
        acc_columns = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # tq2: one lane a column of the step
        acc_bytes = tl.zeros([BLOCK_N, BYTES], dtype=tl.float32)  # tq1: one lane a byte
        # The weight bytes are the stream that matters: the next tile's load is issued before this tile's
        # math, so its latency overlaps it (Triton pipelines the activations but not a load that is
        # unpacked before use). EVEN_K (whole steps only): the loads need no mask, so they are vectorized;
        # rows past N read row N - 1 (never stored) and the prefetch after the last step reads that step again.
        if EVEN_K:
            w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn + offs_j[None, :]
            packed_next = tl.load(w_rows + k_start // PER_BYTE)
        else:
            packed_next = _load_packed(w_ptr, offs_n, mask_n, stride_wn, k_start, k_end, BYTES, TQ1)
        for k0 in range(k_start, k_end, STEP):
            packed = packed_next
            if EVEN_K:
                packed_next = tl.load(w_rows + tl.minimum(k0 + STEP, k_end - STEP) // PER_BYTE)
            else:
                packed_next = _load_packed(w_ptr, offs_n, mask_n, stride_wn, k0 + STEP, k_end, BYTES, TQ1)
            if FMA and not TQ1:
                # The step's columns of x loaded once, contiguously, times the codes unpacked into K order
                # (on CUDA cores the joins only rename registers).
                x_step = tl.load(x_ptr + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
                if QUANTIZE:
                    x_step = _quantized_fp32(x_step, act_scale, QMAX, ACT == 2)
                acc_columns += x_step[None, :] * _unpack_values(packed, BLOCK_N, BLOCK_K)
            elif TQ1:
                # Plane p of the bytes holds columns k0 + 5 j + p: no tile of a power-of-two width to unpack into.
                # The tensor-core loop decodes a byte's five digits with one load from the L1-resident table;
                # the GEMV, which does little else per byte, by arithmetic: there the table's gathers cost more
                # than they save (H100, fp8 at one token: 35 against 30 us on norm1, split-K 57 against 68).
                if not FMA:
                    bits = tl.load(table_ptr + packed).to(tl.int32)
                for p in tl.static_range(PER_BYTE):
                    cols = k0 + PER_BYTE * offs_j + p
                    if FMA:
                        a = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)  # the one row (M == 1)
                        if QUANTIZE:
                            a = _quantized_fp32(a, act_scale, QMAX, ACT == 2)
                        acc_bytes += a[None, :] * _ternary_value(_tq1_plane(packed, p))
                    else:
                        a = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < K), other=0.0)
                        acc, acc_int = _dot_weights(a, _tq1_weights(bits, p, ACT), acc, acc_int, ACT, DOT_FP32)
            else:
                a = tl.load(x_rows + k0 + offs_k[None, :], mask=mask_m[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
                # in the dtype _dot_weights multiplies them in (e4m3 activations: bf16 MMAs)
                codes = _tq2_weights(packed, tl.int8 if ACT == 1 else tl.float32 if DOT_FP32 else
                                     tl.bfloat16 if ACT == 2 else x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
                acc, acc_int = _dot_weights(a, codes, acc, acc_int, ACT, DOT_FP32)
        if FMA:
            if TQ1:
                sums = tl.sum(acc_bytes, axis=1)
            else:
                sums = tl.sum(acc_columns, axis=1)
            acc = tl.where(offs_m[:, None] == 0, sums[None, :], 0.0)
        elif ACT == 1:
            acc = acc_int.to(tl.float32)  # |sum| <= 127 K < 2^24: exact
        _store_slice(acc, pid_k, offs_m, offs_n, mask_m, mask_n, M, N, scale_ptr, row_scales, bias_ptr, out_ptr,
                     FUSED, SCALE_MODE, ACT != 0, HAS_BIAS)

    @triton.jit
    def _dot_weights(a, w, acc, acc_int, ACT: tl.constexpr, DOT_FP32: tl.constexpr):
        """acc (or acc_int for int8 activations) + a @ w^T on tensor cores; w: ternary weights, int8 for int8
        activations, else fp32."""
        if ACT == 1:  # int8 x ternary into int32: exact
            acc_int = _accumulate(a, w, acc_int, False, "int32")
        else:
            if DOT_FP32:
                acc = _accumulate(a.to(tl.float32), w, acc, False, "ieee")
            elif ACT == 2:  # e4m3 values and +-1 are exact in bf16: exact products, fp32 sums
                acc = _accumulate(a.to(tl.bfloat16), w.to(tl.bfloat16), acc, False, "native")
            else:
                acc = _accumulate(a, w.to(a.dtype), acc, False, "native")
        return acc, acc_int

    @triton.jit
    def _epilogue_kernel(partial_ptr, scale_ptr, act_scale_ptr, bias_ptr, out_ptr, S, M, N,
                         SCALE_MODE: tl.constexpr, ACT_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
        _await_inputs(PDL)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(S):  # in order: deterministic
            acc += tl.load(partial_ptr + s * M * N + tile, mask=mask, other=0).to(tl.float32)
        acc = _scale_and_bias(acc, offs_n, mask_n, scale_ptr, _row_scales(act_scale_ptr, offs_m, mask_m, ACT_SCALED),
                              bias_ptr, SCALE_MODE, ACT_SCALED, HAS_BIAS)
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)

    def _config(block_m, block_n, block_k, warps, stages, swap=False):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SWAP": swap},
                             num_warps=warps, num_stages=stages)

    # Few configs on purpose: each costs a compile. BLOCK_M selects the regime (see _configs_for_m);
    # every BLOCK_K divides GROUP_MULTIPLE. SWAP configs serve the 2-bit tiles only.
    _CONFIGS = [
        # few tokens: the only tile kernel for per-group scales there, one candidate beside split-K otherwise
        _config(16, 32, 128, 4, 5),
        # tens of tokens
        _config(64, 64, 128, 4, 4), _config(64, 128, 64, 4, 4), _config(64, 128, 64, 4, 4, swap=True),
        # compute-bound; 128 x 256 x 128 fits shared memory with 8-bit or 2-bit operands only
        _config(128, 128, 64, 8, 4), _config(128, 256, 64, 8, 3), _config(128, 128, 128, 8, 3),
        _config(128, 256, 128, 8, 3), _config(128, 128, 64, 8, 4, swap=True),
    ]

    def _configs_for_m(configs, named_args, **kwargs):
        M = named_args["M"]
        block_m = 16 if M <= 16 else 64 if M <= 128 else 128
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] == block_m and not (kwargs["DENSE"] and c.kwargs["SWAP"])]
        # None fits by the estimate with fp32 operands, whose dots run on CUDA cores and stage less: the first.
        chosen = [c for c in chosen if _fits_shared_memory(c, named_args["x_ptr"], named_args["w_ptr"],
                                                           kwargs["DENSE"])] or chosen[:1]
        return chosen if _tuning() else chosen[:1]

    def _fits_shared_memory(config, x: torch.Tensor, weight: torch.Tensor, dense: bool) -> bool:
        """Whether the config's pipelined operand tiles fit the GPU's shared memory (one with less than a
        Hopper's, or 16-bit expanded codes, rules out the largest tiles; without this the untuned first
        config could fail to launch there)."""
        if x.device.type != "cuda":
            return True
        k = config.kwargs
        weight_bytes = weight.element_size() if dense else 0.25  # tq2: 4 codes a byte
        needed = config.num_stages * k["BLOCK_K"] * (k["BLOCK_M"] * x.element_size() + k["BLOCK_N"] * weight_bytes)
        properties = torch.cuda.get_device_properties(x.device)
        return needed <= getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)

    def _bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    @triton.autotune(_CONFIGS, key=["M", "N", "K", "ACT", "DENSE"],
                     prune_configs_by={"early_config_prune": _configs_for_m}, do_bench=_bench)
    @triton.jit
    def _ternary_matmul(
        x_ptr, w_ptr, scale_ptr, act_scale_ptr, bias_ptr, out_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, group_size,
        SCALE_MODE: tl.constexpr, ACT: tl.constexpr, DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
        GROUP_M: tl.constexpr = 8,
    ):
        """out = x @ codes^T, scaled (+ bias). The codes are tq2 bytes, or with DENSE an (N, K) matrix of
        {-1, 0, +1} in the operand dtype (int8, e4m3, or the activation dtype). With SWAP the tile is
        accumulated transposed (see _accumulate)."""
        # Programs sharing weight columns run close together in time, so their tiles stay in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group_first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
        group_rows = tl.minimum(tiles_m - group_first_m, GROUP_M)
        pid_m = group_first_m + (pid % (GROUP_M * tiles_n)) % group_rows
        pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        x_tile = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_tile = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # DENSE only

        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc_int = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_int = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        if not DENSE:
            # Triton pipelines loads that feed tl.dot directly (the activations, dense codes), not a tile that
            # is unpacked first: the next tile's bytes are loaded before this tile's math instead.
            packed_next = _load_packed(w_ptr, offs_n, mask_n, stride_wn, 0, K, BLOCK_K // 4)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(x_tile + k0, mask=mask_m[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
            if DENSE:
                codes = tl.load(w_tile + k0, mask=mask_n[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
            else:
                packed = packed_next
                packed_next = _load_packed(w_ptr, offs_n, mask_n, stride_wn, k0 + BLOCK_K, K, BLOCK_K // 4)
                # 16-bit codes from _plane_codes' PTX stored as the shared-memory operand (not SWAP) fail two
                # tile configs in Triton 3.9 ("Illegal shared layout", sm_90): those are built in fp32 and cast
                codes = _tq2_weights(packed, tl.int8 if ACT == 1 else tl.float32 if DOT_FP32 or not (SWAP or ACT == 2)
                                     else x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
            if SCALE_MODE == 2:
                g_scale = tl.load(scale_ptr + offs_n * tl.cdiv(K, group_size) + k0 // group_size,
                                  mask=mask_n, other=0.0)
            if ACT == 1:
                acc_int = _accumulate(a, codes, acc_int, SWAP, "int32")
                if SCALE_MODE == 2:
                    # Per-group scales apply to the exact int32 sum of their group, as reference.linear_a8.
                    if ((k0 + BLOCK_K) % group_size == 0) | (k0 + BLOCK_K >= K):
                        if SWAP:
                            acc += _rounded_product(acc_int.to(tl.float32), g_scale[:, None])
                        else:
                            acc += _rounded_product(acc_int.to(tl.float32), g_scale[None, :])
                        acc_int = tl.zeros_like(acc_int)
            else:
                if SCALE_MODE == 2:  # as the reference: code x (scale rounded to the activation dtype)
                    codes = codes.to(tl.float32) * g_scale.to(a.dtype).to(tl.float32)[:, None]
                if DOT_FP32:
                    acc = _accumulate(a.to(tl.float32), codes.to(tl.float32), acc, SWAP, "ieee")
                elif ACT == 2:  # e4m3 x e4m3 tensor cores, exact products
                    acc = _accumulate(a, codes.to(a.dtype), acc, SWAP, "fp8")
                else:  # a16: the activation dtype
                    acc = _accumulate(a, codes.to(a.dtype), acc, SWAP, "native")

        if ACT == 1 and SCALE_MODE != 2:
            acc = acc_int.to(tl.float32)
        if SWAP:
            acc = tl.trans(acc)
        acc = _scale_and_bias(acc, offs_n, mask_n, scale_ptr, _row_scales(act_scale_ptr, offs_m, mask_m, ACT != 0),
                              bias_ptr, SCALE_MODE, ACT != 0, HAS_BIAS)
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _planar_matmul(x_ptr, w_ptr, scale_ptr, act_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                       steps_per_split, SCALE_MODE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       DOT_FP32: tl.constexpr, FUSED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, PLANE: tl.constexpr, PDL: tl.constexpr = False):
        """x (plane-major, see plane_major) @ codes^T over one range of steps, for one (N, M) tile. Step s
        multiplies bit plane s % 4 of the PLANE tq2 bytes of block s // 4 (a plain (BLOCK_N, PLANE) load that
        Triton pipelines like any tl.dot operand, unpacked elementwise in the MMA's register layout) by the
        PLANE activation columns it pairs with, the codes as the MMA's left operand. FUSED: the finished
        output; else fp32 partial sums (split, M, N) for _epilogue_kernel."""
        _await_inputs(PDL)
        pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, PLANE)
        mask_m, mask_n = offs_m < M, offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_j[None, :]
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_j[None, :]
        row_bytes = tl.cdiv(K, 4)
        step_start = pid_s * steps_per_split
        step_end = tl.minimum(step_start + steps_per_split, tl.cdiv(K, 4 * PLANE) * 4)
        if ACT == 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for step in range(step_start, step_end):
            byte0 = (step // 4) * PLANE
            # Masked bytes read as 0 (code -1), not 0x55: only a zero fill (and a mask constant along a row,
            # hence EVEN_K) lets Triton copy the tile asynchronously; harmless here, as the activations past K
            # are zeros and rows past N are never stored.
            if EVEN_K:
                packed = tl.load(w_rows + byte0, mask=mask_n[:, None], other=0)
            else:
                packed = tl.load(w_rows + byte0, mask=mask_n[:, None] & (byte0 + offs_j[None, :] < row_bytes), other=0)
            a = tl.load(x_rows + step * PLANE, mask=mask_m[:, None], other=0.0)  # padded columns: zeros
            codes = _plane_codes(packed, (step % 4) * 2, tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty)
            if ACT == 1:
                acc = _accumulate(a, codes, acc, True, "int32")
            elif DOT_FP32:
                acc = _accumulate(a.to(tl.float32), codes, acc, True, "ieee")
            elif ACT == 2:
                acc = _accumulate(a, codes, acc, True, "fp8")
            else:
                acc = _accumulate(a, codes, acc, True, "native")
        acc = tl.trans(acc.to(tl.float32))  # |int32 sums| <= 127 K < 2^24: exact
        _store_slice(acc, pid_s, offs_m, offs_n, mask_m, mask_n, M, N, scale_ptr,
                     _row_scales(act_scale_ptr, offs_m, mask_m, ACT != 0), bias_ptr, out_ptr, FUSED, SCALE_MODE,
                     ACT != 0, HAS_BIAS)

    @triton.jit
    def _dp4a(a, b, c):
        """c + the dot product of a's four bytes (unsigned) and b's (signed), per int32 element: compiled, one
        DP4A instruction (four multiply-adds); in the interpreter, which runs no PTX, its arithmetic spelled
        out."""
        if _PTX:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            for i in tl.static_range(4):
                c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
            return c

    @triton.jit
    def _words_after(w_rows, w0, w_end, mask_n, offs_w, WORDS: tl.constexpr, EVEN_K: tl.constexpr):
        """The (BLOCK_N, WORDS) words of codes of the step after the one at word w0 (EVEN_K: re-reading the
        slice's last step after it, unmasked; else zeros past the slice)."""
        if EVEN_K:
            return tl.load(w_rows + tl.minimum(w0 + WORDS, w_end - WORDS))
        else:
            return tl.load(w_rows + w0 + WORDS, mask=mask_n[:, None] & (w0 + WORDS + offs_w < w_end)[None, :],
                           other=0)

    @triton.jit
    def _quantized_plane(x_ptr, w0, p: tl.constexpr, w_end, offs_w, scale, EVEN_K: tl.constexpr):
        """The (WORDS,) words that plane p of the step at word w0 multiplies, from the float row: byte b of
        word w is column 16 w + 4 b + p quantized (zeros past the slice), as the quantizer's plane-major
        output holds them."""
        offs_b = tl.arange(0, 4)
        columns = 16 * (w0 + offs_w)[:, None] + 4 * offs_b[None, :] + p
        if EVEN_K:
            x = tl.load(x_ptr + columns)
        else:
            x = tl.load(x_ptr + columns, mask=(w0 + offs_w < w_end)[:, None], other=0.0)
        q = _quantized_fp32(x.to(tl.float32), scale, 127.0, False).to(tl.int32)
        # the bytes' bits are disjoint, so the sum is their OR: no carries, whatever the top byte's sign
        return tl.sum((q & 0xFF) << (8 * offs_b)[None, :], axis=1)

    @triton.jit
    def _x_plane(x_rows, w0, p: tl.constexpr, w_end, mask_m, offs_w, PLANE_WORDS: tl.constexpr,
                 EVEN_K: tl.constexpr):
        """(BLOCK_M, WORDS) words of four plane-major int8 activations, those plane p of the step at word w0
        multiplies (zeros past the slice and past M)."""
        if EVEN_K:
            return tl.load(x_rows + 4 * w0 + p * PLANE_WORDS, mask=mask_m[:, None], other=0)
        else:
            return tl.load(x_rows + 4 * w0 + p * PLANE_WORDS, mask=mask_m[:, None] & (w0 + offs_w < w_end)[None, :],
                           other=0)

    @triton.jit
    def _dp4a_gemv_kernel(x_ptr, w_ptr, scale_ptr, act_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                          k_slice, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED: tl.constexpr,
                          QUANTIZE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, WORDS: tl.constexpr, PLANE_WORDS: tl.constexpr,
                          PDL: tl.constexpr = False):
        """A few tokens of int8 activations (x: plane-major, see plane_major, as int32 words) @ codes^T (tq2
        rows as int32 words of 16 codes; K % 16 == 0) over one slice of k_slice words, for one (M, N) tile:
        FUSED, the finished output; else fp32 partial sums (split, M, N) for _epilogue_kernel.

        Plane p of a word (bits 2p of its four bytes, shifted down and masked: digits u = w + 1 in four
        bytes) pairs with one word of four activations of the plane-major row: word j of a 256-column block
        with x word 16 p + j of the block. One DP4A multiplies and adds the four, for each token the tile
        holds, from one unpacking: ideally 0.25 + 0.5 / BLOCK_M instructions a code-token (compiled for sm_90:
        0.43 at 16 tokens, 0.81 at one), where the float GEMV spends ~4.5 for one token. sum(w x) = sum(u x) -
        sum(x): integers throughout, exact.

        QUANTIZE (one token): x is the float row itself, quantized here as _quantize_row does (bit for bit), as
        the quantizing GEMV does: every program reads the whole row for its scale, program (0, 0) stores it for
        _epilogue_kernel, and each step's 16 WORDS columns are quantized and packed into plane words in
        registers. That saves the quantizer's launch (3.4 of the 9.7 us on norm1 on an H200) for those
        instructions and the row's read."""
        tl.static_assert(not QUANTIZE or BLOCK_M == 1, "the kernel quantizes one float row only")
        _await_inputs(PDL)
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, WORDS)
        mask_m, mask_n = offs_m < M, offs_n < N
        # EVEN_K (whole steps only; FLUX.1's rows): no masks along K, so the loads are vectorized; rows past N
        # read row N - 1 (never stored) and the prefetch after a slice's last step reads that step again.
        w_rows = (w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn + offs_w[None, :] if EVEN_K
                  else w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_w[None, :])
        # x word of step word j, plane 0 (the step starts a block: word w0 of a row is x word 4 w0)
        x_rows = (x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
                  + (4 * PLANE_WORDS * (offs_w // PLANE_WORDS) + offs_w % PLANE_WORDS)[None, :])
        w_start = pid_k * k_slice
        w_end = tl.minimum(w_start + k_slice, K // 16)
        # The next step's words are loaded before this step's math (the latency overlaps it; Triton pipelines
        # no load that is not a tl.dot operand). Words past the slice read 0 against activations read 0.
        words_next = _words_after(w_rows, w_start - WORDS, w_end, mask_n, offs_w, WORDS, EVEN_K)
        if QUANTIZE:
            act_scale, row_scales = _own_row_scale(x_ptr, act_scale_ptr, K, (pid_n == 0) & (pid_k == 0), 127.0,
                                                   16 * WORDS, BLOCK_M)
        else:
            row_scales = _row_scales(act_scale_ptr, offs_m, mask_m, True)
        if BLOCK_M == 1:
            # One token: each plane masked in place (u 4^p in its bytes, no shift) into a sum of its own, all
            # 2-D (no layout shuffles): 0.81 instructions a code on sm_90 against 1.375 the general way.
            acc0 = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
            acc1 = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
            acc2 = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
            acc3 = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
            x_sums = tl.zeros([WORDS], dtype=tl.int32)
            ones = tl.full([WORDS], 0x01010101, dtype=tl.int32)
            for w0 in range(w_start, w_end, WORDS):
                words = words_next
                words_next = _words_after(w_rows, w0, w_end, mask_n, offs_w, WORDS, EVEN_K)
                if QUANTIZE:
                    x0 = _quantized_plane(x_ptr, w0, 0, w_end, offs_w, act_scale, EVEN_K)
                    x1 = _quantized_plane(x_ptr, w0, 1, w_end, offs_w, act_scale, EVEN_K)
                    x2 = _quantized_plane(x_ptr, w0, 2, w_end, offs_w, act_scale, EVEN_K)
                    x3 = _quantized_plane(x_ptr, w0, 3, w_end, offs_w, act_scale, EVEN_K)
                else:
                    x0 = tl.reshape(_x_plane(x_rows, w0, 0, w_end, mask_m, offs_w, PLANE_WORDS, EVEN_K), [WORDS])
                    x1 = tl.reshape(_x_plane(x_rows, w0, 1, w_end, mask_m, offs_w, PLANE_WORDS, EVEN_K), [WORDS])
                    x2 = tl.reshape(_x_plane(x_rows, w0, 2, w_end, mask_m, offs_w, PLANE_WORDS, EVEN_K), [WORDS])
                    x3 = tl.reshape(_x_plane(x_rows, w0, 3, w_end, mask_m, offs_w, PLANE_WORDS, EVEN_K), [WORDS])
                acc0 = _dp4a(words & 0x03030303, x0[None, :], acc0)
                acc1 = _dp4a(words & 0x0C0C0C0C, x1[None, :], acc1)
                acc2 = _dp4a(words & 0x30303030, x2[None, :], acc2)
                acc3 = _dp4a(words & -0x3F3F3F40, x3[None, :], acc3)  # 0xC0C0C0C0 as an int32
                x_sums = _dp4a(ones, x0, _dp4a(ones, x1, _dp4a(ones, x2, _dp4a(ones, x3, x_sums))))
            # plane p's sums are 4^p times its digit sums, exactly
            sums = ((tl.sum(acc0, axis=1) + (tl.sum(acc1, axis=1) >> 2) + (tl.sum(acc2, axis=1) >> 4)
                     + (tl.sum(acc3, axis=1) >> 6) - tl.sum(x_sums, axis=0))[None, :])
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N, WORDS], dtype=tl.int32)
            x_sums = tl.zeros([BLOCK_M, WORDS], dtype=tl.int32)
            ones = tl.full([BLOCK_M, WORDS], 0x01010101, dtype=tl.int32)
            for w0 in range(w_start, w_end, WORDS):
                words = words_next
                words_next = _words_after(w_rows, w0, w_end, mask_n, offs_w, WORDS, EVEN_K)
                for p in tl.static_range(4):
                    x_plane = _x_plane(x_rows, w0, p, w_end, mask_m, offs_w, PLANE_WORDS, EVEN_K)
                    digits = (words >> (2 * p)) & 0x03030303  # unpacked once for every token of the tile
                    acc = _dp4a(digits[None, :, :], x_plane[:, None, :], acc)
                    x_sums = _dp4a(ones, x_plane, x_sums)
            sums = tl.sum(acc, axis=2) - tl.sum(x_sums, axis=1)[:, None]
        _store_slice(sums.to(tl.float32), pid_k, offs_m, offs_n, mask_m, mask_n, M, N, scale_ptr, row_scales,
                     bias_ptr, out_ptr, FUSED, SCALE_MODE, True, HAS_BIAS)
