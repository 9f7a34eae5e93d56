"""Sweep of the operand kernel at FLUX.1-dev's large-M shapes: the per-token activation quantizer (int8 / e4m3)
alone and together with the codes' expansion (the one launch the a8/fp8 GEMMs on expanded codes make), under
the backend's constants that shape it: up to _ONE_PASS_ROWS rows of up to _ONE_PASS_COLUMNS read once and kept
in registers, other rows read twice in blocks of QUANTIZE_BLOCKS columns, in _QUANTIZE_WARPS warps. Every
candidate's outputs must equal the backend's own bit for bit. Then, per layer, the whole fp8 and a8 calls on
cuBLAS against cuBLAS bf16, eager (L2 flushed, launches included) and replayed as a CUDA graph (GPU time): how
much of a large-M layer's time is the host's. Writes gpu_operands.json and gpu_operands.md.

    PYTHONPATH=src python benchmarks/gpu_operands.py --out results/                   # on a GPU, ~1 min
    PYTHONPATH=src python benchmarks/gpu_operands.py --out results/m1 --tokens 1      # one token
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/gpu_operands.py --dry-run     # CPU: tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_linear import (
    FLUX_LAYERS,
    bench_ms,
    environment,
    prepared_layers,
    random_codes,
    with_constants,
)

from bitflux.checkpoint import write_text_atomic
from bitflux.kernels import triton as triton_backend

LAYERS = ("attn to_q/k/v, to_out", "double norm1.linear", "single norm.linear, fused to_qkv", "ff net.2",
          "single proj_out")
DRY_LAYERS = {"tiny": (48, 1280)}  # 24 tokens, with _ONE_PASS_ROWS lowered: two passes, two blocks of a row
# name -> the backend constants it sets; the first is the backend as it stands
CANDIDATES = {
    "as is": {},
    "one pass": {"_ONE_PASS_ROWS": 1 << 30},  # rows up to _ONE_PASS_COLUMNS long (longer: as is)
    "blocks of 2048": {"QUANTIZE_BLOCKS": (2048, 2048)},
    "blocks of 512 / 2048": {"QUANTIZE_BLOCKS": (512, 2048)},
    "blocks of 2048 / 8192": {"QUANTIZE_BLOCKS": (2048, 8192)},
    "8 warps": {"_QUANTIZE_WARPS": 8},
    "2 warps": {"_QUANTIZE_WARPS": 2},
    # one token (--tokens 1: the modulation layers' row, quantized in one program): more threads on the one row
    "16 warps": {"_QUANTIZE_WARPS": 16},
}


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(u.view(torch.uint8) if u.dtype == torch.float8_e4m3fn else u,
                           v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v) for u, v in zip(a, b))


def sweep(x: torch.Tensor, prepared) -> list[dict]:
    """Each candidate, for the quantizer alone and with expansion, in int8 and e4m3: GPU ms (L2 flushed) and
    the bytes it must move at least, as TB/s."""
    M, K, N = x.shape[0], prepared.in_features, prepared.out_features
    rows = []
    for fp8 in (False, True):
        codes_dtype = torch.float8_e4m3fn if fp8 else torch.int8
        parts = {
            "quantize": (functools.partial(triton_backend.quantize_activations, x, fp8=fp8), M * K * 3 + M * 4),
            "quantize + expand": (functools.partial(triton_backend._operands, x, fp8=fp8, prepared=prepared,
                                                    codes_dtype=codes_dtype),
                                  M * K * 3 + M * 4 + prepared.packed.numel() + N * K),
        }
        for part, (fn, min_bytes) in parts.items():
            reference = fn()
            for name, constants in CANDIDATES.items():
                row = {"part": part, "fp8": fp8, "candidate": name, "constants": repr(constants)}
                try:
                    if not same(with_constants(constants, fn), reference):
                        row["error"] = "outputs differ from the backend's"
                    else:
                        row["ms"] = with_constants(constants, functools.partial(bench_ms, fn))
                        row["tb_s"] = min_bytes / (row["ms"] * 1e-3) / 1e12
                except Exception as exc:  # noqa: BLE001 - a candidate this GPU cannot run
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                rows.append(row)
    return rows


def whole_calls(x, prepared, dense, device) -> dict:
    """ms of bf16 cuBLAS and the backend's fp8 / a8 calls on cuBLAS (the operand launch, then _scaled_mm /
    _int_mm: no Triton autotuning to wait for; up to SMALL_M tokens, where cuBLAS is no strategy, the chosen
    one), eager and as a graph."""
    strategy = "cublas" if x.shape[0] > triton_backend.SMALL_M else None
    calls = {"bf16 cuBLAS": lambda: F.linear(x, dense),
             "W1.58 fp8": lambda: triton_backend.linear(x, prepared, None, "fp8", strategy=strategy),
             "W1.58A8": lambda: triton_backend.linear(x, prepared, None, "a8", strategy=strategy)}
    result = {}
    for label, fn in calls.items():
        result[label] = {"eager": bench_ms(fn)}
        if device.type == "cuda":
            result[label]["graph"] = bench_ms(fn, graph=True)
    return result


def markdown(env: dict, results: list[dict]) -> str:
    lines = [f"# Operand kernel sweep at M = {results[0]['M'] if results else '-'} on {env['device']}", "",
             (f"torch {env['torch']}, Triton {env['triton']}; `{env['command']}`. GPU us per call (L2 flushed) and "
              "the least bytes each must move as TB/s; every candidate's outputs equal the backend's bit for bit."),
             ""]
    for result in results:
        lines += [f"## {result['layer']} (N {result['N']}, K {result['K']})", "",
                  "| candidate | " + " | ".join(f"{p} {'e4m3' if f else 'int8'}" for p in ("quantize", "quantize + expand")
                                               for f in (False, True)) + " |",
                  "|---|" + "---|" * 4]
        for name in CANDIDATES:
            cells = []
            for part in ("quantize", "quantize + expand"):
                for fp8 in (False, True):
                    row = next(r for r in result["sweep"] if r["part"] == part and r["fp8"] == fp8
                               and r["candidate"] == name)
                    cells.append(f"{row['ms'] * 1e3:.1f} ({row['tb_s']:.2f})" if "ms" in row else row["error"])
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        calls = result["calls"]
        base = calls["bf16 cuBLAS"]
        lines += ["", "| call | eager ms | vs bf16 | graph ms | vs bf16 |", "|---|---|---|---|---|"]
        for label, times in calls.items():
            graph = times.get("graph")
            lines.append(f"| {label} | {times['eager']:.3f} | {base['eager'] / times['eager']:.2f}x | "
                         + (f"{graph:.3f} | {base['graph'] / graph:.2f}x |" if graph else "- | - |"))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU, interpreter)")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = DRY_LAYERS if args.dry_run else {name: FLUX_LAYERS[name] for name in LAYERS}
    M = 24 if args.dry_run else args.tokens
    if args.dry_run:  # the interpreter is slow: few rows, taken as many
        triton_backend._ONE_PASS_ROWS = 8
    env = environment()
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (n, k) in layers.items():
        codes = random_codes(n, k, device, gen)
        weight, prepared = prepared_layers(codes)["tq2"]
        x = torch.randn(M, k, device=device, generator=gen).to(torch.bfloat16)
        dense = (codes.to(torch.bfloat16) * 0.02).contiguous()
        result = {"layer": name, "M": M, "N": n, "K": k, "sweep": sweep(x, prepared),
                  "calls": whole_calls(x, prepared, dense, device)}
        results.append(result)
        print(markdown(env, [result]), flush=True)
        # after every layer: a run stopped by the device's limit keeps what it measured
        write_text_atomic(args.out / "gpu_operands.json", json.dumps({"environment": env, "results": results},
                                                                     indent=1))
        write_text_atomic(args.out / "gpu_operands.md", markdown(env, results))
        del codes, weight, prepared, x, dense
    return 0


if __name__ == "__main__":
    sys.exit(main())
