"""One denoising forward of the full FLUX.1-dev transformer (19 double + 38 single blocks, width 3072,
random weights, nothing downloaded) at 1024x1024 (4096 image + 512 text tokens): bf16 vs bitflux
W1.58A16, W1.58A8 and W1.58 fp8 (tq2: 2 bits a weight), and fp8 on tq1 codes (1.6 bits), one model at a
time, each built on the meta device and materialized directly on the GPU (the ternary models never hold a
bf16 copy of their block weights), then freed. The ternary models run each attention's q/k/v as one GEMM
(bitflux.fusion, as load_pipeline does); `fp8-separate` runs them one by one, and `bf16-fused` is bf16 with
diffusers' fuse_qkv_projections (which keeps a second copy of those weights).

    PYTHONPATH=src python benchmarks/gpu_flux.py --out results/      # on a GPU (needs diffusers)
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/gpu_flux.py --dry-run   # CPU: a tiny FLUX
    PYTHONPATH=src python benchmarks/gpu_flux.py --compile --modes bf16 fp8     # torch.compile each model

Reports latency (median of timed forwards, eager and replayed as one CUDA graph),
torch.cuda.max_memory_allocated during the timed forwards and over the model's whole life (build, tuning,
first forward), weight bytes, and ratios vs bf16.
Writes gpu_flux.json and gpu_flux.md (atomically), after every model, so partial results survive.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bitflux import TernaryConfig, TernaryLinear, kernels
from bitflux.bench import weight_bytes
from bitflux.checkpoint import write_text_atomic
from bitflux.flux import FLUX_DEV_CONFIG, build_transformer
from bitflux.fusion import fuse_projections
from bitflux.graphs import cuda_graphed
from bitflux.pipeline import compile_transformer
from bitflux.surgery import quantize_
from gpu_linear import mode_parts

TINY_CONFIG = {**FLUX_DEV_CONFIG, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
               "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
               "pooled_projection_dim": 32, "axes_dims_rope": [8, 12, 12]}
WEIGHT_STD = 0.02  # keeps random activations finite through 57 blocks
# activations[-packing]; most telling first: a run cut short keeps those
MODES = ("bf16", "fp8", "fp8-tq1", "a16", "a8", "fp8-separate", "bf16-fused")
LABELS = {"bf16": "bf16 (torch)", "a16": "bitflux W1.58A16", "a8": "bitflux W1.58A8", "fp8": "bitflux W1.58 fp8",
          "fp8-tq1": "bitflux W1.58 fp8, tq1 codes", "fp8-separate": "bitflux W1.58 fp8, q/k/v not fused",
          "bf16-fused": "bf16, q/k/v fused (diffusers)"}


def model_kind(mode: str) -> tuple[str | None, str | None, bool]:
    """A mode -> (activations, None for bf16; packing; q/k/v fused). Ternary models are fused unless the mode
    ends in -separate; bf16 only as bf16-fused."""
    name, fused = (mode.removesuffix("-separate"), False) if mode.endswith("-separate") else (mode, True)
    if name.startswith("bf16"):
        return None, None, name == "bf16-fused"
    return (*mode_parts(name), fused)


def build(config: dict, mode: str, device: torch.device) -> torch.nn.Module:
    """The transformer with random weights on `device`, ternary block linears unless mode is bf16[-fused]."""
    activations, packing, fused = model_kind(mode)
    model = build_transformer(config, "meta").to(torch.bfloat16)
    if activations is not None:
        quantize_(model, TernaryConfig(activations=activations, format=packing))
    model.to_empty(device=device)
    fill_random_(model, device)
    if fused and activations is not None:
        fuse_projections(model)
    elif fused:
        model.fuse_qkv_projections()
    return model


def fill_random_(model: torch.nn.Module, device) -> torch.nn.Module:
    """Random weights in place, the same on every device: uniformly random ternary codes at the scale of the
    full-precision weights' spread, N(0, WEIGHT_STD) matrices, unit norm gains, zero biases."""
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TernaryLinear):
                module.weight_packed.copy_(random_packed(module.weight_packed.shape, module.packing, device, gen))
                # codes are nonzero with probability 2/3: this scale gives the bf16 model's weight spread
                module.weight_scale.fill_(WEIGHT_STD / math.sqrt(2 / 3))
                if module.bias is not None:
                    module.bias.zero_()
                continue
            for pname, param in module.named_parameters(recurse=False):
                if pname == "bias":
                    param.zero_()
                elif param.ndim == 1:  # norm gains
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, WEIGHT_STD, generator=gen)
    return model.eval()


def random_packed(shape, packing: str, device, gen) -> torch.Tensor:
    """Random bytes of uniformly random codes, built in uint8 (no large temporaries): tq2, four digits
    u = w + 1 in {0, 1, 2} per byte; tq1, any of the 3^5 bytes 0 .. 242."""
    if packing == "tq1":
        return torch.randint(0, 243, shape, dtype=torch.uint8, device=device, generator=gen)
    digits = torch.randint(0, 3, (*shape, 4), dtype=torch.uint8, device=device, generator=gen)
    return digits[..., 0] | (digits[..., 1] << 2) | (digits[..., 2] << 4) | (digits[..., 3] << 6)


def inputs(config: dict, image_tokens: int, text_tokens: int, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    side = int(math.isqrt(image_tokens))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(torch.bfloat16)

    return {
        "hidden_states": randn(1, image_tokens, config["in_channels"]),
        "encoder_hidden_states": randn(1, text_tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(1, config["pooled_projection_dim"]),
        "timestep": torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        "guidance": torch.tensor([3.5], device=device, dtype=torch.bfloat16),
        "img_ids": img_ids.to(device),
        "txt_ids": torch.zeros(text_tokens, 3, device=device),
        "return_dict": False,
    }


def time_forwards(model, batch: dict, warmup: int, iters: int, device, graphs: bool = True) -> dict:
    """Latencies of the timed forwards, and the peak memory before (build, tuning, first calls) and during them;
    with `graphs`, also replayed as CUDA graphs."""
    cuda = device.type == "cuda"
    result = {}
    with torch.inference_mode():
        for _ in range(warmup):  # the first call also tunes and compiles the kernels
            out = model(**batch)[0]
        if cuda:
            torch.cuda.synchronize()
            result["peak_setup_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            out = model(**batch)[0]
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        if cuda:
            result["peak_forward_bytes"] = torch.cuda.max_memory_allocated()
    result.update({"latency_ms": statistics.median(times), "latency_ms_all": [round(t, 2) for t in times],
                   "output_finite": bool(torch.isfinite(out).all()), "output_std": out.float().std().item()})
    if cuda and graphs:
        try:
            result.update(graph_timings(model, batch, iters, out))
        except Exception as exc:  # noqa: BLE001 - the eager figures stand on their own
            result["graph_error"] = f"{type(exc).__name__}: {exc}"
    return result


def graph_timings(model, batch: dict, iters: int, eager_out: torch.Tensor) -> dict:
    """The model through bitflux.graphs (what `--cuda-graph` does): median GPU time per call, the kernels'
    own speed without Python's and the launches' CPU time; eager latency is the larger of that and the CPU
    time per forward. Also how far the replayed output is from the eager one (same kernels: ~0)."""
    cuda_graphed(model)
    try:
        with torch.inference_mode():
            out = model(**batch)[0]  # captures
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(**batch)[0]
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            difference = (out.float() - eager_out.float()).abs().max().item()
    finally:
        del model.forward  # the graphs and their memory go with the wrapper
    return {"graph_latency_ms": statistics.median(times), "graph_max_abs_diff_vs_eager": difference}


def measure(config: dict, mode: str, batch_shape: tuple, warmup: int, iters: int, device,
            compile: bool = False) -> dict:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build(config, mode, device)
    result = {"mode": mode, "build_s": round(time.perf_counter() - start, 1), "weight_bytes": weight_bytes(model)}
    batch = inputs(config, *batch_shape, device)
    activations = model_kind(mode)[0]
    with kernels.use_backend("triton" if activations else "auto"):
        if activations:
            _check_triton_in_use(model, activations, device)
        if compile:  # the warm-up forwards compile; bitflux.graphs does not capture a compiled module
            model = compile_transformer(model)
        result.update(time_forwards(model, batch, warmup, iters, device, graphs=not compile))
    if activations:
        result["strategies"] = chosen_strategies(mode)
    del model, batch
    gc.collect()
    return result


def chosen_strategies(mode: str) -> dict[str, str]:
    """Which strategy the Triton backend measured fastest for each layer shape of this mode."""
    from bitflux.kernels import triton as triton_backend

    activations, packing, _ = model_kind(mode)
    return {f"M={key.M} N={key.N} K={key.K}": name for key, name in triton_backend.chosen.items()
            if key.activations == activations and key.tq1 == (packing == "tq1")}


def _check_triton_in_use(model, activations: str, device) -> None:
    """A silent fallback to the reference backend would time the wrong thing: refuse it."""
    layer = next(m for m in model.modules() if isinstance(m, TernaryLinear))
    probe = torch.zeros(1, layer.in_features, dtype=torch.bfloat16, device=device)
    chosen = kernels.select_backend(probe, layer.ternary_weight, activations)
    if chosen.NAME != "triton":
        raise RuntimeError(f"the Triton backend is not in use (got {chosen.NAME}); see the warnings above")


def add_ratios(results: dict) -> None:
    base = results.get("bf16")
    if not base or "latency_ms" not in base:
        return
    for mode, res in results.items():
        if mode == "bf16" or "latency_ms" not in res:
            continue
        res["speedup_vs_bf16"] = base["latency_ms"] / res["latency_ms"]
        if "graph_latency_ms" in res and "graph_latency_ms" in base:
            res["graph_speedup_vs_bf16"] = base["graph_latency_ms"] / res["graph_latency_ms"]
        res["weight_ratio_vs_bf16"] = base["weight_bytes"] / res["weight_bytes"]
        for key in ("peak_forward_bytes", "peak_setup_bytes"):
            if key in res and key in base:
                res[key.replace("_bytes", "_ratio_vs_bf16")] = base[key] / res[key]


def markdown(env: dict, results: dict) -> str:
    gib = 2**30
    lines = [f"# FLUX.1-dev transformer, one forward at {env['tokens']} on {env['device']}", "",
             f"torch {env['torch']}, Triton {env['triton']}; `{env['command']}`; random weights, "
             f"{env['iters']} timed forwards after {env['warmup']} warm-up"
             f"{', every model compiled by torch.compile' if env.get('compiled') else ''}.", "",
             "| model | latency ms | speed-up | CUDA graph ms | speed-up | weights GiB | ratio | peak fwd GiB | ratio |"
             " peak setup GiB | finite |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, res in results.items():
        if "error" in res:
            lines.append(f"| {LABELS[mode]} | error: {res['error']} |")
            continue

        def cell(key, scale=1.0, fmt="{:.2f}"):
            return fmt.format(res[key] / scale) if key in res else "-"

        lines.append(" | ".join([
            f"| {LABELS[mode]}", cell("latency_ms", fmt="{:.1f}"), cell("speedup_vs_bf16", fmt="{:.2f}x"),
            cell("graph_latency_ms", fmt="{:.1f}"), cell("graph_speedup_vs_bf16", fmt="{:.2f}x"),
            cell("weight_bytes", gib), cell("weight_ratio_vs_bf16", fmt="{:.2f}x"), cell("peak_forward_bytes", gib),
            cell("peak_forward_ratio_vs_bf16", fmt="{:.2f}x"), cell("peak_setup_bytes", gib),
            f"{res['output_finite']} |"]))
    lines.append("")
    for mode, res in results.items():
        if "graph_error" in res:
            lines.append(f"- {LABELS[mode]}: no CUDA graph ({res['graph_error']})")
        if "graph_max_abs_diff_vs_eager" in res:
            lines.append(f"- {LABELS[mode]}: CUDA-graph output vs eager, max |diff| "
                         f"{res['graph_max_abs_diff_vs_eager']:.3g}")
        if res.get("strategies"):
            shapes = ", ".join(f"{shape}: {name}" for shape, name in sorted(res["strategies"].items()))
            lines.append(f"- {LABELS[mode]} strategies (measured fastest per layer shape): {shapes}")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, env: dict, results: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_flux.json", json.dumps({"environment": env, "results": results}, indent=1)),
                       ("gpu_flux.md", markdown(env, results))):
        write_text_atomic(out_dir / name, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="a tiny FLUX at 16 + 8 tokens (CPU, interpreter)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model as --compile does (bitflux.pipeline.compile_transformer: a block "
                             "class at a time); no CUDA-graph rows")
    args = parser.parse_args(argv)
    import triton
    import platform

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, batch_shape = (TINY_CONFIG, (16, 8)) if args.dry_run else (FLUX_DEV_CONFIG, (4096, 512))
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "command": " ".join([sys.executable, *sys.argv]), "warmup": args.warmup, "iters": args.iters,
           "compiled": args.compile,
           "tokens": f"{batch_shape[0]} image + {batch_shape[1]} text tokens"}
    results = {}
    for mode in args.modes:
        print(f"# {LABELS[mode]} ...", flush=True)
        try:
            results[mode] = measure(config, mode, batch_shape, args.warmup, args.iters, device, args.compile)
        except Exception as exc:  # noqa: BLE001 - report, free, and go on with the next model
            results[mode] = {"error": f"{type(exc).__name__}: {exc}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        add_ratios(results)
        print(json.dumps(results[mode]), flush=True)
        write_results(args.out, env, results)
    print(markdown(env, results))
    return 1 if any("error" in res for res in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
