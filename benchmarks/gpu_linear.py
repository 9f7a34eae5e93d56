"""Per-layer GEMM benchmark at FLUX.1-dev shapes: cuBLAS bf16 vs bitflux Triton W1.58A16, W1.58A8 and
W1.58 fp8 on tq2 codes (and a16, fp8 on tq1 codes, 1.6 bits a weight), with torch's int8 (_int_mm) and
fp8 (_scaled_mm) GEMMs on full 8-bit weights as a ceiling.
Each bitflux mode runs the strategy the backend measured fastest for the shape (named in the table; every
strategy is also timed and checked on its own, in the JSON and the markdown). Up to GRAPH_M tokens every
column is also timed inside a CUDA graph: the GPU time without Python's launch overhead, which a busy
pipeline hides and one lone small call does not.

    PYTHONPATH=src python benchmarks/gpu_linear.py --out results/       # on a GPU
    PYTHONPATH=src python benchmarks/gpu_linear.py --quick --out results/   # 4 layers x M in {1, 16, 4096}
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
from bitflux.checkpoint import write_text_atomic
from bitflux.kernels import TernaryWeight
from bitflux.kernels import triton as triton_backend

# (out_features, in_features) of the linear layers in FLUX.1-dev's blocks (docs: /work/shared/FACTS.md).
FLUX_LAYERS = {
    "double norm1.linear": (18432, 3072),
    "attn to_q/k/v, to_out": (3072, 3072),
    "ff net.0.proj, proj_mlp": (12288, 3072),
    "ff net.2": (3072, 12288),
    "single norm.linear, fused to_qkv": (9216, 3072),
    "single proj_out": (3072, 15360),
}
TOKENS = (1, 16, 512, 4096, 4608)
QUICK_LAYERS = ("double norm1.linear", "attn to_q/k/v, to_out", "single norm.linear, fused to_qkv", "ff net.2")
QUICK_TOKENS = (1, 16, 4096)
# activations[-packing] (tq2 unless named) -> label
MODES = {"a16": "W1.58A16", "a8": "W1.58A8", "fp8": "W1.58 fp8", "a16-tq1": "W1.58A16 tq1", "fp8-tq1": "W1.58 fp8 tq1"}
DRY_LAYERS = {"tiny square": (96, 256), "tiny wide-in": (40, 384)}
DRY_TOKENS = (1, 16, 40)
GRAPH_M = 16


def bench_ms(fn, graph: bool = False) -> float:
    """Median milliseconds per call: eager (L2 flushed between calls) or replayed from a CUDA graph."""
    if torch.cuda.is_available():
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_both(row: dict, label: str, fn) -> None:
    """row["ms"][label] eager; row["ms_graph"][label] too at few tokens on a GPU (a failed capture is noted)."""
    row["ms"][label] = bench_ms(fn)
    if row["M"] <= GRAPH_M and torch.cuda.is_available():
        try:
            row.setdefault("ms_graph", {})[label] = bench_ms(fn, graph=True)
        except Exception as exc:  # noqa: BLE001 - the eager time still stands
            row.setdefault("ms_graph", {})[label] = f"n/a ({type(exc).__name__})"


def with_constants(constants: dict, fn):
    """fn() with these backend constants set, then restored."""
    saved = {name: getattr(triton_backend, name) for name in constants}
    for name, value in constants.items():
        setattr(triton_backend, name, value)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(triton_backend, name, value)


def random_codes(n: int, k: int, device, generator) -> torch.Tensor:
    """Random codes (about 1/3 zeros, as absmean gives on Gaussian weights)."""
    return torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device, generator=generator)


def prepared_layers(codes: torch.Tensor, scales: torch.Tensor | None = None
                    ) -> dict[str, tuple[TernaryWeight, triton_backend.PreparedWeight]]:
    """{packing: (the codes packed so with `scales` (default: one, 0.02, like the paper's), the Triton backend's
    prepared view of it)}; the weight is kept beside its prepared view, which refers to its bytes only weakly."""
    n, k = codes.shape
    scales = torch.full((1, 1), 0.02, device=codes.device) if scales is None else scales
    layers = {}
    for packing in formats.CODES_PER_BYTE:
        weight = TernaryWeight(formats.pack(codes, packing), scales, k, n, None, packing)
        layers[packing] = weight, triton_backend.prepare(weight)
    return layers


def mode_parts(mode: str) -> tuple[str, str]:
    """'fp8-tq1' -> ('fp8', 'tq1'); the packing is tq2 unless named."""
    activations, _, packing = mode.partition("-")
    return activations, packing or "tq2"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (torch.linalg.norm((actual - expected).float()) / torch.linalg.norm(expected.float())).item()


def strategy_ms(x, prepared, bias, mode: str, name: str, expected: torch.Tensor) -> dict | str:
    """One strategy forced (the backend's choice may come from its cache, without timings of its own): its
    time (up to GRAPH_M tokens on a GPU also as a CUDA graph: GPU time, what the chooser compares there), and
    its error against the bf16 GEMM, so a strategy that is wrong at real shapes shows."""
    def call():
        return triton_backend.linear(x, prepared, bias, mode, strategy=name)

    try:
        result = {"ms": bench_ms(call), "rel_err": relative_error(call(), expected)}
    except Exception as exc:  # noqa: BLE001 - a strategy this GPU cannot run is reported, not fatal
        return f"n/a ({type(exc).__name__})"
    if x.shape[0] <= GRAPH_M and torch.cuda.is_available():
        try:
            result["ms_graph"] = bench_ms(call, graph=True)
        except Exception as exc:  # noqa: BLE001 - the eager time still stands
            result["ms_graph"] = f"n/a ({type(exc).__name__})"
    return result


def kernel_us(fn, calls: int = 5) -> dict[str, float]:
    """GPU microseconds per call of each kernel that fn launches (torch.profiler): where a mode's time goes
    (activation quantization, expansion, GEMM, epilogue)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a profiler that cannot run here must not cost the row
        return {f"n/a ({type(exc).__name__})": 0.0}
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", 0.0)
        if total > 0:
            times[event.key[:48]] = round(total / calls, 1)
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def ceilings(row: dict, x: torch.Tensor, codes_nk: torch.Tensor, device) -> None:
    """torch's own 8-bit GEMMs on full 8-bit weights (what the packed kernels compete with); where a
    shape or GPU does not support one, it is reported as n/a."""
    try:  # cuBLASLt int8 wants M > 16 and dimensions that are multiples of 8
        q = torch.randint(-127, 128, x.shape, dtype=torch.int8, device=device)
        w_t = codes_nk.t()  # (K, N) column-major, as _int_mm wants
        bench_both(row, "int8 _int_mm", lambda: torch._int_mm(q, w_t))
    except Exception as exc:  # noqa: BLE001 - a ceiling that cannot run is reported, not fatal
        row["ms"]["int8 _int_mm"] = f"n/a ({type(exc).__name__})"
    try:
        xf = x.to(torch.float8_e4m3fn)
        wf = codes_nk.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        bench_both(row, "fp8 _scaled_mm", lambda: torch._scaled_mm(xf, wf, one, one, out_dtype=torch.bfloat16))
    except Exception as exc:  # noqa: BLE001
        row["ms"]["fp8 _scaled_mm"] = f"n/a ({type(exc).__name__})"


def run(layers: dict, tokens: tuple, device, channel: bool = False):
    """Yields one result row per (layer, M); channel: a scale per output channel (0.015-0.025) instead of one."""
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in layers.items():
        codes = random_codes(n, k, device, gen)
        scales = (0.015 + 0.01 * torch.rand(n, 1, device=device, generator=gen)) if channel else None
        # cuBLAS baseline: the same weight in bf16
        dense = (codes.to(torch.bfloat16) * (0.02 if scales is None else scales.to(torch.bfloat16))).contiguous()
        bias = torch.randn(n, device=device, generator=gen).to(torch.bfloat16)
        layers_by_packing = prepared_layers(codes, scales)
        for m in tokens:
            x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
            row = {"layer": name, "M": m, "N": n, "K": k, "ms": {}, "strategy": {}, "strategy_ms": {}}
            try:
                expected = F.linear(x, dense, bias)
                bench_both(row, "bf16 cuBLAS", lambda: F.linear(x, dense, bias))
                for mode, label in MODES.items():
                    activations, packing = mode_parts(mode)
                    prepared = layers_by_packing[packing][1]
                    out = triton_backend.linear(x, prepared, bias, activations)  # the first call picks the strategy
                    row[f"rel_err_{mode}"] = relative_error(out, expected)
                    key = triton_backend.CallKey(activations, x.dtype, prepared.scale_mode, True, m, n, k,
                                                 prepared.tq1, x.device.index)
                    names = triton_backend.strategies(m, prepared, activations)
                    row["strategy"][mode] = triton_backend.chosen.get(key, names[0])
                    row["strategy_ms"][mode] = {name: strategy_ms(x, prepared, bias, activations, name, expected)
                                                for name in names}
                    bench_both(row, label, lambda: triton_backend.linear(x, prepared, bias, activations))
                    if device.type == "cuda":
                        row.setdefault("kernel_us", {})[mode] = kernel_us(
                            lambda: triton_backend.linear(x, prepared, bias, activations))
                if device.type == "cuda":
                    ceilings(row, x, codes, device)
            except Exception as exc:  # noqa: BLE001 - keep the other shapes' results
                row["error"] = f"{type(exc).__name__}: {exc}"
            _add_rates(row)
            print(_line(row), flush=True)
            yield row
        del dense, codes, layers_by_packing


def _add_rates(row: dict) -> None:
    flops = 2 * row["M"] * row["N"] * row["K"]
    for suffix in ("", "_graph"):
        times = {key: t for key, t in row.get("ms" + suffix, {}).items() if isinstance(t, float)}
        row["tflops" + suffix] = {key: flops / (t * 1e-3) / 1e12 for key, t in times.items() if t > 0}
        if "bf16 cuBLAS" in times:
            row["speedup_vs_bf16" + suffix] = {key: times["bf16 cuBLAS"] / t for key, t in times.items() if t > 0}


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['layer']:<24} M={row['M']:<5} ERROR {row['error']}"
    speed = row.get("speedup_vs_bf16", {})
    parts = [f"{key} {t if isinstance(t, str) else f'{t:.3f} ms'}"
             + (f" ({speed[key]:.2f}x)" if key in speed else "") for key, t in row["ms"].items()]
    graph = row.get("speedup_vs_bf16_graph", {})
    return (f"{row['layer']:<24} M={row['M']:<5} " + " | ".join(parts)
            + (" | graph " + " ".join(f"{key} {s:.2f}x" for key, s in graph.items()) if graph else "")
            + " | strategies " + " ".join(f"{mode} {name}" for mode, name in row["strategy"].items())
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
             f"torch {env['torch']}, Triton {env['triton']}; `{env['command']}`; scales "
             f"{env.get('scales', 'per tensor')}. "
             "Times in ms (median, L2 flushed); speed-up vs cuBLAS bf16 in brackets; 8-bit ceilings use full "
             "8-bit weights. Rows timed `graph` replay CUDA graphs (GPU time without launch overhead). "
             "Strategy: what the backend measured fastest for " + " / ".join(MODES) + ". rel err: bitflux output "
             "vs the bf16 GEMM on the same ternary weight.", "",
             "| layer | M | N | K | timing | " + " | ".join(modes) + " | strategy | rel err "
             + " / ".join(MODES) + " |",
             "|" + "---|" * (len(modes) + 7)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['layer']} | {row['M']} | {row['N']} | {row['K']} | error: {row['error']} |")
            continue
        for suffix in ("", "_graph") if row.get("ms_graph") else ("",):
            cells = []
            for mode in modes:
                t = row["ms" + suffix].get(mode, "")
                speed = row.get("speedup_vs_bf16" + suffix, {}).get(mode)
                cells.append(t if isinstance(t, str) else f"{t:.3f}" + (f" ({speed:.2f}x)" if speed else ""))
            lines.append(f"| {row['layer']} | {row['M']} | {row['N']} | {row['K']} | {suffix[1:] or 'eager'} | "
                         + " | ".join(cells) + " | " + " / ".join(row["strategy"].values()) + " | "
                         + " / ".join(f"{row.get(f'rel_err_{mode}', float('nan')):.1e}" for mode in MODES) + " |")
    lines += ["", "Every strategy on its own (ms, rel err vs the bf16 GEMM):", ""]
    for row in rows:
        for mode, results in row.get("strategy_ms", {}).items():
            lines.append(f"- {row['layer']} M={row['M']} {MODES[mode]}: " + ", ".join(
                f"{name} {_strategy_text(result)}" for name, result in results.items()))
    profiled = [row for row in rows if row.get("kernel_us")]
    if profiled:
        lines += ["", "GPU time per call of each kernel (us, torch.profiler, 5 calls):", ""]
        for row in profiled:
            for mode, kernels in row["kernel_us"].items():
                lines.append(f"- {row['layer']} M={row['M']} {MODES[mode]} ({row['strategy'][mode]}): "
                             + ", ".join(f"{name} {us}" for name, us in kernels.items()))
    return "\n".join(lines) + "\n"


def _strategy_text(result) -> str:
    if isinstance(result, str):
        return result
    graph = result.get("ms_graph")
    graph = "" if graph is None else f", graph {graph}" if isinstance(graph, str) else f", graph {graph:.4f}"
    return f"{result['ms']:.3f}{graph} ({result['rel_err']:.1e})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--quick", action="store_true", help=f"layers {QUICK_LAYERS} at M in {QUICK_TOKENS}")
    parser.add_argument("--tokens", type=int, nargs="*", help="override the M values")
    parser.add_argument("--channel", action="store_true", help="a scale per output channel, not one per layer")
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
    env["scales"] = "per channel" if args.channel else "per tensor"
    for row in run(layers, tuple(args.tokens or tokens), device, args.channel):
        rows.append(row)
        env["wall_s"] = round(time.perf_counter() - start, 1)
        # after every row: a run cut short by a time limit still leaves its results
        write_text_atomic(args.out / "gpu_linear.json", json.dumps({"environment": env, "rows": rows}, indent=1))
        write_text_atomic(args.out / "gpu_linear.md", markdown(env, rows))
    print(f"wrote {args.out / 'gpu_linear.md'} in {env['wall_s']} s")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
