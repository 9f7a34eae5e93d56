"""Per-layer GEMM benchmark at FLUX.1-dev shapes: cuBLAS bf16 vs bitflux Triton W1.58A16, W1.58A8 and
W1.58 fp8, with torch's int8 (_int_mm) and fp8 (_scaled_mm) GEMMs on full 8-bit weights as a ceiling.

    PYTHONPATH=src python benchmarks/gpu_linear.py --out results/       # on a GPU
    PYTHONPATH=src python benchmarks/gpu_linear.py --quick --out results/   # 3 layers x M in {1, 16, 4096}
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/gpu_linear.py --dry-run   # CPU: tiny shapes

Every bitflux output is checked against the dense bf16 result (relative Frobenius error) so a fast but
wrong config cannot go unnoticed. Writes gpu_linear.json and gpu_linear.md (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitflux import formats
from bitflux.kernels import TernaryWeight
from bitflux.kernels import triton as triton_backend

# (out_features, in_features) of the linear layers in FLUX.1-dev's blocks (docs: /work/shared/FACTS.md).
FLUX_LAYERS = {
    "double norm1.linear": (18432, 3072),
    "attn to_q/k/v, to_out": (3072, 3072),
    "ff net.0.proj, proj_mlp": (12288, 3072),
    "ff net.2": (3072, 12288),
    "single norm.linear": (9216, 3072),
    "single proj_out": (3072, 15360),
}
TOKENS = (1, 16, 512, 4096, 4608)
QUICK_LAYERS = ("double norm1.linear", "attn to_q/k/v, to_out", "ff net.2")
QUICK_TOKENS = (1, 16, 4096)
MODES = {"a16": "W1.58A16", "a8": "W1.58A8", "fp8": "W1.58 fp8"}
DRY_LAYERS = {"tiny square": (96, 256), "tiny wide-in": (40, 384)}
DRY_TOKENS = (1, 16, 40)


def bench_ms(fn) -> float:
    """Median milliseconds per call (L2 flushed between calls on a GPU)."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def random_ternary(n: int, k: int, device, generator) -> TernaryWeight:
    """Random codes (about 1/3 zeros, as absmean gives on Gaussian weights) and one scale, like the paper."""
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=generator)
    scales = torch.full((1, 1), 0.02, device=device)
    return TernaryWeight(formats.pack(codes), scales, k, n, None)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (torch.linalg.norm((actual - expected).float()) / torch.linalg.norm(expected.float())).item()


def ceilings(x: torch.Tensor, codes_nk: torch.Tensor, device) -> dict[str, float]:
    """torch's own 8-bit GEMMs on full 8-bit weights (what the packed kernels compete with); where a
    shape or GPU does not support one, it is left out."""
    times = {}
    try:  # cuBLASLt int8 wants M > 16 and dimensions that are multiples of 8
        q = torch.randint(-127, 128, x.shape, dtype=torch.int8, device=device)
        w_t = codes_nk.t()  # (K, N) column-major, as _int_mm wants
        times["int8 _int_mm"] = bench_ms(lambda: torch._int_mm(q, w_t))
    except Exception as exc:  # noqa: BLE001 - a ceiling that cannot run is reported, not fatal
        times["int8 _int_mm"] = f"n/a ({type(exc).__name__})"
    try:
        xf = x.to(torch.float8_e4m3fn)
        wf = codes_nk.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        times["fp8 _scaled_mm"] = bench_ms(lambda: torch._scaled_mm(xf, wf, one, one, out_dtype=torch.bfloat16))
    except Exception as exc:  # noqa: BLE001
        times["fp8 _scaled_mm"] = f"n/a ({type(exc).__name__})"
    return times


def run(layers: dict, tokens: tuple, device):
    """Yields one result row per (layer, M)."""
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in layers.items():
        weight = random_ternary(n, k, device, gen)
        codes = formats.unpack(weight.packed, k, "tq2")
        dense = (codes.to(torch.bfloat16) * 0.02).contiguous()  # cuBLAS baseline: the same weight in bf16
        bias = torch.randn(n, device=device, generator=gen).to(torch.bfloat16)
        prepared = triton_backend.prepare(weight)
        for m in tokens:
            x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
            row = {"layer": name, "M": m, "N": n, "K": k}
            try:
                expected = F.linear(x, dense, bias)
                row["ms"] = {"bf16 cuBLAS": bench_ms(lambda: F.linear(x, dense, bias))}
                for mode, label in MODES.items():
                    out = triton_backend.linear(x, prepared, bias, mode)
                    row[f"rel_err_{mode}"] = relative_error(out, expected)
                    row["ms"][label] = bench_ms(lambda: triton_backend.linear(x, prepared, bias, mode))
                if device.type == "cuda":
                    row["ms"].update(ceilings(x, codes, device))
            except Exception as exc:  # noqa: BLE001 - keep the other shapes' results
                row["error"] = f"{type(exc).__name__}: {exc}"
            _add_rates(row)
            print(_line(row), flush=True)
            yield row
        del dense, codes, prepared


def _add_rates(row: dict) -> None:
    flops = 2 * row["M"] * row["N"] * row["K"]
    times = {key: t for key, t in row.get("ms", {}).items() if isinstance(t, float)}
    row["tflops"] = {key: flops / (t * 1e-3) / 1e12 for key, t in times.items() if t > 0}
    if "bf16 cuBLAS" in times:
        row["speedup_vs_bf16"] = {key: times["bf16 cuBLAS"] / t for key, t in times.items() if t > 0}


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['layer']:<24} M={row['M']:<5} ERROR {row['error']}"
    speed = row.get("speedup_vs_bf16", {})
    parts = [f"{key} {t if isinstance(t, str) else f'{t:.3f} ms'}"
             + (f" ({speed[key]:.2f}x)" if key in speed else "") for key, t in row["ms"].items()]
    return (f"{row['layer']:<24} M={row['M']:<5} " + " | ".join(parts)
            + " | err " + " ".join(f"{mode} {row.get(f'rel_err_{mode}', float('nan')):.1e}" for mode in MODES))


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor()})",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "command": " ".join([sys.executable, *sys.argv]),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def markdown(env: dict, rows: list[dict]) -> str:
    modes = ["bf16 cuBLAS", *MODES.values(), "int8 _int_mm", "fp8 _scaled_mm"]
    lines = [f"# Ternary GEMM at FLUX.1-dev layer shapes on {env['device']}", "",
             f"torch {env['torch']}, Triton {env['triton']}; `{env['command']}`. "
             "Times in ms (median, L2 flushed); speed-up vs cuBLAS bf16 in brackets; 8-bit ceilings use full "
             "8-bit weights. rel err: bitflux output vs the bf16 GEMM on the same ternary weight.", "",
             "| layer | M | N | K | " + " | ".join(modes) + " | rel err " + " / ".join(MODES) + " |",
             "|" + "---|" * (len(modes) + 5)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['layer']} | {row['M']} | {row['N']} | {row['K']} | error: {row['error']} |")
            continue
        cells = []
        for mode in modes:
            t = row["ms"].get(mode, "")
            speed = row.get("speedup_vs_bf16", {}).get(mode)
            cells.append(t if isinstance(t, str) else f"{t:.3f}" + (f" ({speed:.2f}x)" if speed else ""))
        lines.append(f"| {row['layer']} | {row['M']} | {row['N']} | {row['K']} | " + " | ".join(cells)
                     + " | " + " / ".join(f"{row.get(f'rel_err_{mode}', float('nan')):.1e}" for mode in MODES) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help=f"layers {QUICK_LAYERS} at M in {QUICK_TOKENS}")
    parser.add_argument("--tokens", type=int, nargs="*", help="override the M values")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dry_run:
        layers, tokens = DRY_LAYERS, DRY_TOKENS
    elif args.quick:
        layers, tokens = {name: FLUX_LAYERS[name] for name in QUICK_LAYERS}, QUICK_TOKENS
    else:
        layers, tokens = FLUX_LAYERS, TOKENS
    env = environment()
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']}", flush=True)
    start, rows = time.perf_counter(), []
    args.out.mkdir(parents=True, exist_ok=True)
    for row in run(layers, tuple(args.tokens or tokens), device):
        rows.append(row)
        env["wall_s"] = round(time.perf_counter() - start, 1)
        # after every row: a run cut short by a time limit still leaves its results
        write_atomic(args.out / "gpu_linear.json", json.dumps({"environment": env, "rows": rows}, indent=1))
        write_atomic(args.out / "gpu_linear.md", markdown(env, rows))
    print(f"wrote {args.out / 'gpu_linear.md'} in {env['wall_s']} s")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
