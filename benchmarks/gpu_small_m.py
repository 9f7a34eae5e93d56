"""Sweep of the small-M kernels' launch parameters on a GPU: the split-K kernel's tiles (`splitk`, tensor
cores on 16-row tiles, M <= 16; `gemv`, CUDA cores, one token; `dp4a`, the a8 GEMV in integer dot products),
the planar kernel's few-token tile, and how many programs per SM the K split aims for, at FLUX.1-dev layer
shapes. Every candidate runs as a CUDA graph (GPU time, no launch overhead) beside cuBLAS's bf16 GEMM on the
same weight, and its output is checked against that GEMM's, so a fast but wrong candidate shows. Prints the
default's time (the backend's choice) and the best candidate's per (layer, M, mode, strategy); writes
gpu_small_m.json and gpu_small_m.md. What wins becomes SPLITK_TILE, GEMV_TILE, GEMV_QUANTIZING_TILES,
DP4A_TILE, DP4A_FEW_TILE, DP4A_QUANTIZING_TILE, PLANAR_FEW_TILE and PROGRAMS_PER_SM in
bitflux/kernels/triton.py.

    PYTHONPATH=src python benchmarks/gpu_small_m.py --out results/                     # on a GPU, ~3 min
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/gpu_small_m.py --dry-run       # CPU: tiny shapes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bitflux.checkpoint import write_text_atomic
from bitflux.kernels import triton as triton_backend
from gpu_linear import (DRY_LAYERS, FLUX_LAYERS, MODES, bench_ms, environment, mode_parts, random_codes,
                        prepared_layers, relative_error, with_constants)

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the default first. gemv keeps a (BLOCK_N, BLOCK_K / 4) fp32
# tile of products per program: fewer rows and longer K steps put more bytes in flight per row.
CANDIDATES = {
    "gemv": [triton_backend.GEMV_TILE, (1, 64, 256, 4, 3), (1, 32, 512, 4, 3), (1, 16, 1024, 4, 3),
             (1, 16, 512, 4, 3), (1, 32, 256, 4, 3), (1, 8, 2048, 8, 3), (1, 64, 512, 8, 3),
             # since the weights are built from bits the GEMV is bound by instruction issue: fewer registers
             # a thread (72-127 on sm_90) let more programs share an SM
             (1, 8, 512, 4, 3), (1, 8, 512, 2, 3), (1, 16, 256, 4, 3)],
    "splitk": [triton_backend.SPLITK_TILE, (16, 32, 256, 4, 3), (16, 64, 256, 4, 3), (16, 16, 512, 4, 3),
               (16, 16, 256, 4, 3), (16, 128, 128, 4, 4), (16, 32, 256, 4, 4)],
    # the H100 sweeps' 15 tiles above (BENCHMARKS.md), whose choice is the default, and 3 more; all compile for
    # sm_90 without spills (ptxas, as benchmarks/gpu_compile.py runs it): 64-255 registers.
    # dp4a (a8): (BLOCK_N, words of 16 codes a step, warps), at one token (DP4A_TILE): the H200's best three of
    # 2026-11-28 (docs/gpu/h200/gpu_small_m_dp4a.md), the first default (16, 64, 4) and untried neighbours
    "dp4a": [triton_backend.DP4A_TILE, (8, 128, 4), (16, 32, 4), (16, 64, 4), (64, 32, 4), (32, 16, 4),
             (32, 32, 8)],
    # dp4a1 (one token, quantized in the kernel: DP4A_QUANTIZING_TILE): more rows a program spread the row's
    # quantizing over more codes, but give fewer programs, and on the narrower layers (3072 rows) a K split whose
    # epilogue is a launch of its own: 16 rows split less (none of these spills on sm_90; 128 x 32 x 4 does)
    "dp4a1": [triton_backend.DP4A_QUANTIZING_TILE, (32, 32, 4), (16, 32, 4), (64, 32, 8), (128, 32, 8),
              (64, 16, 4)],
    # planar (BLOCK_M, BLOCK_N, warps, stages) up to 16 tokens, at the default programs per SM only (the run's
    # time limit): wider tiles spend fewer instructions a code (sm_90, offline), narrower hold fewer registers
    "planar": [triton_backend.PLANAR_FEW_TILE, (16, 64, 4, 4), (16, 256, 4, 4), (16, 256, 8, 3)],
}
# dp4a at 2-16 tokens (DP4A_FEW_TILE): a tile of 16 tokens keeps 16 x BLOCK_N x words int32 sums
DP4A_FEW_CANDIDATES = [triton_backend.DP4A_FEW_TILE, (8, 32, 4), (8, 64, 4), (16, 16, 4), (32, 16, 4), (16, 32, 8)]
PROGRAMS = (triton_backend.PROGRAMS_PER_SM, 8, 16)
LAYERS = ("double norm1.linear", "attn to_q/k/v, to_out", "ff net.2")
TOKENS = (1, 16)
MAX_REL_ERR = {"a16": 5e-3, "a8": 2e-2, "fp8": 4e-2}  # vs the bf16 GEMM (gpu_linear.md: 0.2 %, 0.9 %, 2.3 %)


def sweep(layers: dict, tokens: tuple, modes: list[str], device, dry_run: bool):
    """Yields one row per (layer, M, mode, strategy): every candidate's time and error."""
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in layers.items():
        codes = random_codes(n, k, device, gen)
        dense = (codes.to(torch.bfloat16) * 0.02).contiguous()
        bias = torch.randn(n, device=device, generator=gen).to(torch.bfloat16)
        layers_by_packing = prepared_layers(codes)
        for m in tokens:
            x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
            expected = F.linear(x, dense, bias)
            bf16_ms = bench_ms(lambda: F.linear(x, dense, bias), graph=device.type == "cuda")
            for mode in modes:
                activations, packing = mode_parts(mode)
                prepared = layers_by_packing[packing][1]
                for strategy, tiles in CANDIDATES.items():
                    if strategy not in triton_backend.strategies(m, prepared, activations):
                        continue
                    row = {"layer": name, "M": m, "N": n, "K": k, "mode": mode, "strategy": strategy,
                           "bf16_ms": bf16_ms, "candidates": []}
                    # first the backend's own choice as it stands (for the GEMV with int8/e4m3 activations
                    # that depends on the layer: GEMV_QUANTIZING_TILES), then each tile at each target
                    for pdl in [True, False] if triton_backend.PDL else [False]:  # and without PDL
                        row["candidates"].append(measure(x, prepared, bias, activations, strategy, None,
                                                         triton_backend.PROGRAMS_PER_SM, expected, device, pdl))
                    tiles = DP4A_FEW_CANDIDATES if strategy == "dp4a" and m > 1 else tiles
                    candidates = tiles[1:2] if dry_run else tiles  # dry: one tile other than the default's
                    for tile in candidates:
                        for programs in PROGRAMS[:2] if dry_run else PROGRAMS[:1] if strategy == "planar" else PROGRAMS:
                            row["candidates"].append(
                                measure(x, prepared, bias, activations, strategy, tile, programs, expected, device))
                    yield row


def measure(x, prepared, bias, activations: str, strategy: str, tile: tuple, programs: int, expected, device,
            pdl: bool = triton_backend.PDL) -> dict:
    """One candidate set as the backend's constants (tile None: the backend's own choice; pdl: launched with
    programmatic dependent launch where the GPU has it): its GPU time and its error vs the bf16 GEMM."""
    constants = {"PROGRAMS_PER_SM": programs, "PDL": pdl}
    names = {"gemv": ("GEMV_TILE", "GEMV_QUANTIZING_TILES"), "splitk": ("SPLITK_TILE",),
             "dp4a": ("DP4A_TILE",) if x.shape[0] == 1 else ("DP4A_FEW_TILE",), "dp4a1": ("DP4A_QUANTIZING_TILE",),
             "planar": ("PLANAR_FEW_TILE",)}[strategy]
    if tile is None:
        tile = (triton_backend._gemv_tile(prepared.out_features, activations, x.device) if strategy == "gemv"
                else getattr(triton_backend, names[0]))
    else:  # this tile for every layer
        constants.update({name: tile if name != "GEMV_QUANTIZING_TILES" else () for name in names})
    result = {"tile": list(tile), "programs_per_sm": programs, "pdl": pdl}

    def call():
        return triton_backend.linear(x, prepared, bias, activations, strategy=strategy)

    def measured():
        result["rel_err"] = relative_error(call(), expected)
        result["ms"] = bench_ms(call, graph=device.type == "cuda")

    try:
        with_constants(constants, measured)
    except Exception as exc:  # noqa: BLE001 - a candidate this GPU cannot run (registers, shared memory)
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return result


def best(row: dict) -> dict | None:
    """The fastest candidate whose output is right."""
    good = [c for c in row["candidates"] if "ms" in c and c["rel_err"] < MAX_REL_ERR[mode_parts(row["mode"])[0]]]
    return min(good, key=lambda c: c["ms"]) if good else None


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Small-M kernel sweep on {env['device']}", "",
             f"torch {env['torch']}, Triton {env['triton']}; `{env['command']}`. GPU time per call in us "
             "(CUDA graphs); speed-up vs cuBLAS bf16 on the same weight in brackets. Tile: (BLOCK_M, BLOCK_N, "
             "BLOCK_K, warps, stages), dp4a's (BLOCK_N, words of 16 codes, warps), planar's (BLOCK_M, BLOCK_N, "
             "warps, stages); programs: the K split's target per SM. Without PDL: the default launched without "
             "programmatic dependent launch (BITFLUX_TRITON_PDL=0).", "",
             "| layer | M | mode | strategy | bf16 cuBLAS | default | without PDL | best | best tile | programs | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        default, top = row["candidates"][0], best(row)
        without_pdl = row["candidates"][1] if default["pdl"] else None  # (BITFLUX_TRITON_PDL=0: none)

        def cell(c):
            return f"{c['ms'] * 1e3:.1f} ({row['bf16_ms'] / c['ms']:.2f}x)" if c and "ms" in c else "n/a"

        failed = sum("error" in c for c in row["candidates"])
        lines.append(f"| {row['layer']} | {row['M']} | {MODES[row['mode']]} | {row['strategy']} | {row['bf16_ms'] * 1e3:.1f} | "
                     f"{cell(default)} | {cell(without_pdl)} | {cell(top)} | "
                     f"{(str(tuple(top['tile'])) + ('' if top['pdl'] else ' no PDL')) if top else '-'} | "
                     f"{top['programs_per_sm'] if top else '-'} | {failed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, one tile besides the default (CPU, interpreter)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = DRY_LAYERS if args.dry_run else {name: FLUX_LAYERS[name] for name in LAYERS}
    env = environment()
    rows = []
    for row in sweep(layers, TOKENS, args.modes, device, args.dry_run):
        rows.append(row)
        top = best(row)
        print(f"{row['layer']} M={row['M']} {row['mode']} {row['strategy']}: bf16 {row['bf16_ms'] * 1e3:.1f} us, "
              f"best {top['ms'] * 1e3:.1f} us {tuple(top['tile'])} x{top['programs_per_sm']}" if top
              else f"{row['layer']} M={row['M']} {row['mode']} {row['strategy']}: no candidate ran", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # after every row: a run cut short keeps what it has
        write_text_atomic(args.out / "gpu_small_m.json", json.dumps({"environment": env, "rows": rows}, indent=1))
        write_text_atomic(args.out / "gpu_small_m.md", markdown(env, rows))
    print(markdown(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
