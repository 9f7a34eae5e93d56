"""Triton GPU backend: fused ternary GEMMs W1.58A16 and W1.58A8 (docs/GPU_KERNELS.md).

Both modes share one kernel, which reads the tq2 bytes of TernaryLinear as they are: no repacked copy,
and full-precision or 8-bit weights never exist in GPU memory. A (BLOCK_N, BLOCK_K / 4) byte tile is
loaded with vector loads and unpacked in registers (four shifts, then interleaved back into K order).
  a16: codes -> activation dtype, tl.dot with fp32 accumulation, weight scale (+ bias) in the epilogue.
  a8:  a small kernel quantizes activations per token to int8 exactly as reference.quantize_activations;
       then int8 x int8 tl.dot into int32 (exact), both scales (+ bias) in the epilogue.
Few tokens (memory-bound) get narrow, deep tiles so that many programs stream the weights at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

NAME = "triton"
ACTIVATIONS = ("a16", "a8")
GROUP_MULTIPLE = 128  # per-group scales need groups that every BLOCK_K below divides
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
    grouped = weight.scales.shape[1] > 1
    return (on_device and activations in ACTIVATIONS and x.dtype in _DTYPES
            and (not grouped or weight.group_size % GROUP_MULTIPLE == 0)
            and x.shape[-1] == weight.in_features and weight.packed.is_contiguous())


@dataclass(frozen=True)
class PreparedWeight:
    """The kernel's view of one ternary layer: the tq2 bytes themselves and fp32 scales."""

    packed: torch.Tensor  # (out_features, ceil(in_features / 4)) uint8, shared with the layer
    scales: torch.Tensor  # fp32: (1,) per tensor, (out,) per channel, (out, groups) per group
    scale_mode: int
    in_features: int
    out_features: int
    group_size: int  # 0 unless per group


def prepare(weight) -> PreparedWeight:
    scales = weight.scales.float()
    if scales.numel() == 1:
        mode, group_size = _SCALE_TENSOR, 0
    elif scales.shape[1] == 1:
        mode, group_size = _SCALE_CHANNEL, 0
    else:
        mode, group_size = _SCALE_GROUP, weight.group_size
    scales = scales.contiguous() if mode == _SCALE_GROUP else scales.reshape(-1).contiguous()
    return PreparedWeight(weight.packed, scales, mode, weight.in_features, weight.out_features, group_size)


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
        M, N, K, x2.stride(0), prepared.packed.stride(0), out.stride(0), max(prepared.group_size, 1),
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

    @triton.jit
    def _unpack_digits(packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_K / 4) tq2 bytes -> (BLOCK_N, BLOCK_K) digits u = w + 1, in K order."""
        d0, d1, d2, d3 = packed & 3, (packed >> 2) & 3, (packed >> 4) & 3, (packed >> 6) & 3
        # join appends a minor axis: [n, r, q, p] = d(2q + p), so the flattened index 4r + 2q + p is K.
        return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))

    def _config(block_m, block_n, block_k, warps, stages):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                             num_warps=warps, num_stages=stages)

    # Few configs on purpose: each costs a compile. BLOCK_M selects the regime (see _configs_for_m);
    # every BLOCK_K divides GROUP_MULTIPLE.
    _CONFIGS = [
        # few tokens, memory-bound: narrow and deep tiles, many programs, long load pipelines
        _config(16, 16, 128, 4, 6), _config(16, 32, 128, 4, 5),
        # tens of tokens
        _config(64, 64, 128, 4, 4), _config(64, 128, 64, 4, 4),
        # compute-bound
        _config(128, 128, 64, 8, 4), _config(128, 256, 64, 8, 3), _config(128, 128, 128, 8, 3),
    ]

    def _configs_for_m(configs, named_args, **kwargs):
        M = named_args["M"]
        block_m = 16 if M <= 16 else 64 if M <= 128 else 128
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] == block_m]
        # The interpreter cannot time configs and would run every one; BITFLUX_TRITON_AUTOTUNE=0 skips
        # tuning on a GPU (quick correctness runs).
        if _interpreting() or os.environ.get("BITFLUX_TRITON_AUTOTUNE") == "0":
            return chosen[:1]
        return chosen

    def _bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    @triton.autotune(_CONFIGS, key=["M", "N", "K"], prune_configs_by={"early_config_prune": _configs_for_m},
                     do_bench=_bench)
    @triton.jit
    def _ternary_matmul(
        x_ptr, w_ptr, scale_ptr, act_scale_ptr, bias_ptr, out_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, group_size,
        SCALE_MODE: tl.constexpr, ACT_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
    ):
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
        offs_byte = tl.arange(0, BLOCK_K // 4)
        mask_m, mask_n = offs_m < M, offs_n < N
        x_tile = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_tile = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_byte[None, :]
        row_bytes = tl.cdiv(K, 4)

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_int = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(x_tile + k0, mask=mask_m[:, None] & (k0 + offs_k[None, :] < K), other=0)
            packed = tl.load(w_tile + k0 // 4, mask=mask_n[:, None] & (k0 // 4 + offs_byte[None, :] < row_bytes),
                             other=0x55)  # 0x55: four codes w = 0
            digits = _unpack_digits(packed, BLOCK_N, BLOCK_K)
            if SCALE_MODE == 2:
                g_scale = tl.load(scale_ptr + offs_n * tl.cdiv(K, group_size) + k0 // group_size,
                                  mask=mask_n, other=0.0)
            if ACT_INT8:
                acc_int = tl.dot(a, tl.trans(digits.to(tl.int8) - 1), acc_int, out_dtype=tl.int32)
                if SCALE_MODE == 2:
                    # Per-group scales apply to the exact int32 sum of their group, as reference.linear_a8.
                    if ((k0 + BLOCK_K) % group_size == 0) | (k0 + BLOCK_K >= K):
                        acc += acc_int.to(tl.float32) * g_scale[None, :]
                        acc_int = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            else:
                # Built in fp32 (exact): the interpreter mishandles integer -> bf16 casts and bf16 math.
                w = digits.to(tl.float32) - 1.0
                if SCALE_MODE == 2:  # as the reference: code x (scale rounded to the activation dtype)
                    w = w * g_scale.to(a.dtype).to(tl.float32)[:, None]
                if DOT_FP32:
                    acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)

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
