"""Triton GPU backend: fused ternary GEMMs W1.58A16 and W1.58A8 (docs/GPU_KERNELS.md).

Both modes share one kernel. Weight tiles are read as 2-bit codes from GPU memory and unpacked in
registers with shifts; full-precision or 8-bit weights never exist in GPU memory.
  a16: codes -> activation dtype, tl.dot with fp32 accumulation, weight scale (+ bias) in the epilogue.
  a8:  a small kernel quantizes activations per token to int8 exactly as reference.quantize_activations;
       then int8 x int8 tl.dot into int32 (exact), both scales (+ bias) in the epilogue.
Small M (few tokens, memory-bound) uses narrow tiles so many programs stream the weights at once.

Kernel layout (`prepare`): rows stay K-contiguous, padded to whole chunks of CHUNK codes; inside a
chunk, byte r holds codes r, r + R, r + 2R, r + 3R (R = CHUNK / 4) at bits 0, 2, 4, 6. One load of an
(BLOCK_N, R) byte tile thus yields, shift by shift, four slices of contiguous K, each a plain tl.dot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

NAME = "triton"
ACTIVATIONS = ("a16", "a8")
CHUNK = 128  # codes per packed chunk; per-group scales need groups that are multiples of it
_BYTES_PER_CHUNK = CHUNK // 4
_SCALE_TENSOR, _SCALE_CHANNEL, _SCALE_GROUP = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the dispatcher reports this once and uses the reference backend
    triton = None
    _IMPORT_ERROR = f"Triton is not installed ({exc})"
else:
    _IMPORT_ERROR = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> str | None:
    if triton is None:
        return _IMPORT_ERROR
    if not (_interpreting() or torch.cuda.is_available()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return None


def supports(x: torch.Tensor, weight, activations: str) -> bool:
    on_device = x.is_cuda or (_interpreting() and x.device.type == "cpu")
    grouped_ok = weight.group_size is None or weight.scales.shape[1] == 1 or weight.group_size % CHUNK == 0
    return (on_device and activations in ACTIVATIONS and x.dtype in _DTYPES and grouped_ok
            and x.shape[-1] == weight.in_features)


@dataclass(frozen=True)
class PreparedWeight:
    """The kernel's view of one ternary layer: chunk-strided 2-bit codes and fp32 scales."""

    packed: torch.Tensor  # (out_features, chunks * CHUNK / 4) uint8
    scales: torch.Tensor  # fp32: (1,) per tensor, (out,) per channel, (out, groups) per group
    scale_mode: int
    in_features: int
    out_features: int
    chunks_per_group: int  # 0 unless per group


def chunk_strided(packed_tq2: torch.Tensor, in_features: int) -> torch.Tensor:
    """tq2 rows (code i of a byte at bits 2i) -> the kernel layout described in the module docstring.

    Works on bytes only (one uint8 digit per code as the largest temporary), padding with u = 1 (w = 0).
    """
    rows = packed_tq2.shape[0]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed_tq2.device)
    digits = ((packed_tq2.unsqueeze(-1) >> shifts) & 3).reshape(rows, -1)[:, :in_features]
    chunks = -(-in_features // CHUNK)
    digits = torch.nn.functional.pad(digits, (0, chunks * CHUNK - in_features), value=1)
    digits = digits.reshape(rows, chunks, 4, _BYTES_PER_CHUNK)
    packed = digits[:, :, 0] | (digits[:, :, 1] << 2) | (digits[:, :, 2] << 4) | (digits[:, :, 3] << 6)
    return packed.reshape(rows, chunks * _BYTES_PER_CHUNK).contiguous()


def prepare(weight) -> PreparedWeight:
    scales = weight.scales.float()
    if scales.numel() == 1:
        mode, chunks_per_group = _SCALE_TENSOR, 0
    elif scales.shape[1] == 1:
        mode, chunks_per_group = _SCALE_CHANNEL, 0
    else:
        mode, chunks_per_group = _SCALE_GROUP, weight.group_size // CHUNK
    return PreparedWeight(chunk_strided(weight.packed, weight.in_features),
                          scales.reshape(-1).contiguous() if mode != _SCALE_GROUP else scales.contiguous(),
                          mode, weight.in_features, weight.out_features, chunks_per_group)


def linear(x: torch.Tensor, prepared: PreparedWeight, bias: torch.Tensor | None, activations: str) -> torch.Tensor:
    lead, K, N = x.shape[:-1], prepared.in_features, prepared.out_features
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)
    if activations == "a8":
        x2, act_scale = quantize_activations(x2)
    else:
        act_scale = prepared.scales  # unused by the a16 kernel; any tensor will do
    bias = bias.contiguous() if bias is not None else None

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _ternary_matmul[grid](
        x2, prepared.packed, prepared.scales, act_scale, bias if bias is not None else prepared.scales, out,
        M, N, K, x2.stride(0), prepared.packed.stride(0), out.stride(0),
        prepared.scales.shape[-1] if prepared.scale_mode == _SCALE_GROUP else 1, max(prepared.chunks_per_group, 1),
        SCALE_MODE=prepared.scale_mode, ACT_INT8=activations == "a8", HAS_BIAS=bias is not None,
        # fp32 inputs get exact fp32 products (not tf32); the interpreter's tl.dot misreads bf16 operands
        # as integers, so there bf16 is widened too (same products, exactly).
        DOT_FP32=x.dtype == torch.float32 or (_interpreting() and x.dtype == torch.bfloat16),
    )
    return out.reshape(*lead, N)


def quantize_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> int8 (M, K) and fp32 (M,) scales, bit-identical to reference.quantize_activations."""
    M, K = x2.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x2.device)
    scale = torch.empty(M, dtype=torch.float32, device=x2.device)
    _quantize_rows_kernel[(M,)](x2, q, scale, K, x2.stride(0), BLOCK=min(triton.next_power_of_2(K), 2048),
                                num_warps=4)
    return q, scale


if triton is not None:
    _CHUNK = tl.constexpr(CHUNK)

    @triton.jit
    def _round_half_even(v):
        # torch.round rounds half to even; adding and removing 1.5 * 2^23 does exactly that in fp32 for
        # |v| < 2^22, in compiled code and in the interpreter alike (libdevice.rint is not interpreted).
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row, q_row = x_ptr + row * stride_xm, q_ptr + row * K
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
        # div_rn: the default fp32 division on GPUs is approximate, the reference's is correctly rounded.
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 127.0)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(v, scale)), -127.0), 127.0)
            tl.store(q_row + offs, q.to(tl.int8), mask=offs < K)
        tl.store(scale_ptr + row, scale)

    def _config(block_m, block_n, warps, stages):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)

    # Few configs on purpose: each costs a compile. BLOCK_M selects the regime (see _configs_for_m).
    _CONFIGS = [
        _config(16, 32, 4, 6), _config(16, 64, 4, 4),    # few tokens: narrow tiles, deep load pipeline
        _config(64, 64, 4, 4), _config(64, 128, 4, 4),   # tens of tokens
        _config(128, 128, 8, 3), _config(128, 256, 8, 3), _config(256, 128, 8, 3),  # compute-bound
    ]

    def _configs_for_m(configs, named_args, **kwargs):
        M = named_args["M"]
        block_m = 16 if M <= 16 else 64 if M <= 128 else 128 if M <= 1024 else 256
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] == block_m or (block_m == 256 and c.kwargs["BLOCK_M"] == 128)]
        # The interpreter cannot time configs, and would run every one: take the first.
        return chosen[:1] if _interpreting() else chosen

    def _bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    @triton.autotune(_CONFIGS, key=["M", "N", "K"], prune_configs_by={"early_config_prune": _configs_for_m},
                     do_bench=_bench)
    @triton.jit
    def _ternary_matmul(
        x_ptr, w_ptr, scale_ptr, act_scale_ptr, bias_ptr, out_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, scale_stride, chunks_per_group,
        SCALE_MODE: tl.constexpr, ACT_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr = 8,
    ):
        R: tl.constexpr = _CHUNK // 4
        # Programs sharing weight columns run close together in time, so their tiles stay in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group_first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
        group_rows = tl.minimum(tiles_m - group_first_m, GROUP_M)
        pid_m = group_first_m + (pid % (GROUP_M * tiles_n)) % group_rows
        pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R)
        mask_m, mask_n = offs_m < M, offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_r[None, :]

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_int = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        chunks = tl.cdiv(K, _CHUNK)
        for c in range(0, chunks):
            packed = tl.load(w_rows + c * R, mask=mask_n[:, None], other=0x55)  # (BLOCK_N, R) uint8
            if SCALE_MODE == 2:
                g_scale = tl.load(scale_ptr + offs_n * scale_stride + c // chunks_per_group, mask=mask_n, other=0.0)
            for j in tl.static_range(4):
                k = c * _CHUNK + j * R + offs_r
                a = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0)
                digits = (packed >> (2 * j)) & 3
                if ACT_INT8:
                    w = digits.to(tl.int8) - 1
                    acc_int = tl.dot(a, tl.trans(w), acc_int, out_dtype=tl.int32)
                else:
                    # Built in fp32 (exact): the interpreter mishandles integer -> bf16 casts and bf16 math.
                    w = digits.to(tl.float32) - 1.0
                    if SCALE_MODE == 2:  # as the reference: code x (scale rounded to the activation dtype)
                        w = w * g_scale.to(a.dtype).to(tl.float32)[:, None]
                    if DOT_FP32:
                        acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
                    else:
                        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
            if ACT_INT8 and SCALE_MODE == 2:
                # Per-group scales apply to the exact int32 sum of their group, as reference.linear_a8 does.
                if ((c + 1) % chunks_per_group == 0) | (c + 1 == chunks):
                    acc += acc_int.to(tl.float32) * g_scale[None, :]
                    acc_int = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)

        if ACT_INT8 and SCALE_MODE != 2:
            acc = acc_int.to(tl.float32)
        if SCALE_MODE == 0:
            acc = acc * tl.load(scale_ptr)
        elif SCALE_MODE == 1:
            acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if ACT_INT8:
            acc = acc * tl.load(act_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
