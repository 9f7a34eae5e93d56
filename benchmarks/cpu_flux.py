"""The full FLUX.1-dev transformer (19 double + 38 single blocks, random weights, nothing downloaded) on a
CPU: one denoising forward of the ternary model through the C kernel, against full precision (fp32, what
torch runs fastest on a CPU) at a depth whose fp32 weights fit this machine, since the whole fp32 model
(47.6 GB) or even bf16 (23.8 GB) does not fit 24 GiB. Each variant runs in its own child process, so its
peak resident memory (VmHWM) is its own.

    PYTHONPATH=src:benchmarks python benchmarks/cpu_flux.py [--image-tokens 256] [--text-tokens 512]
        [--short 2 4] [--packing tq1] [--separate] [--compile] [--json out.json]

Prints, per variant: blocks, weight bytes, build time, first (warm-up) and timed forward, peak RSS; then the
ratios at equal depth (fp32 vs ternary, `--short` double and single blocks) and the full ternary model's figures.
`--packing tq1`: the ternary codes held in 1.6 bits (widened to tq2 as the kernel reads them) instead of 2.
The ternary models run each attention's q/k/v as one GEMM (bitflux.fusion, as load_pipeline does);
`--separate`: one by one. `--compile`: every model torch.compile'd as `bitflux generate --compile` does
(bitflux.pipeline.compile_transformer: FLUX.1-dev a block class at a time); the first forward compiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from child_rows import child_row
from gpu_flux import fill_random_, inputs

from bitflux import TernaryConfig
from bitflux.bench import weight_bytes
from bitflux.calibrate.memory import peak_resident_bytes
from bitflux.checkpoint import write_text_atomic
from bitflux.flux import FLUX_DEV_CONFIG, build_transformer
from bitflux.fusion import fuse_projections
from bitflux.kernels import use_backend
from bitflux.pipeline import compile_transformer
from bitflux.surgery import quantize_


def build(config: dict, ternary: bool, packing: str = "tq2", fused: bool = True) -> torch.nn.Module:
    """fp32 model with random weights on the CPU; `ternary`: its block linears as random codes in `packing`
    (the fp32 block weights are never allocated: the model is made on the meta device first)."""
    model = build_transformer(config, "meta")
    if ternary:
        quantize_(model, TernaryConfig(activations="a8", format=packing))
    model.to_empty(device="cpu")
    fill_random_(model, "cpu")
    if ternary and fused:
        fuse_projections(model)
    return model


def run_variant(double: int, single: int, ternary: bool, image_tokens: int, text_tokens: int,
                packing: str = "tq2", fused: bool = True, compile: bool = False) -> dict:
    """In this process: build, one warm-up forward (compiling, with `compile`), one timed forward."""
    config = {**FLUX_DEV_CONFIG, "num_layers": double, "num_single_layers": single}
    start = time.perf_counter()
    model = build(config, ternary, packing, fused)
    build_s = time.perf_counter() - start
    model = compile_transformer(model) if compile else model
    batch = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in inputs(config, image_tokens, text_tokens, "cpu").items()}
    with torch.inference_mode(), use_backend("cpu" if ternary else "auto"):
        start = time.perf_counter()
        model(**batch)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        out = model(**batch)[0]
        forward_s = time.perf_counter() - start
    return {"double": double, "single": single, "variant": "ternary" if ternary else "fp32",
            "packing": packing if ternary else None, "qkv_fused": ternary and fused, "compiled": compile,
            "weight_bytes": weight_bytes(model), "build_s": round(build_s, 1), "first_forward_s": round(first_s, 1),
            "forward_s": round(forward_s, 2),
            "output_finite": bool(torch.isfinite(out).all()),
            "peak_rss_bytes": peak_resident_bytes()}


def child(args, double: int, single: int, ternary: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(double), str(single), str(int(ternary)),
               "--image-tokens", str(args.image_tokens), "--text-tokens", str(args.text_tokens),
               "--packing", args.packing, *(["--separate"] if args.separate else []),
               *(["--compile"] if args.compile else [])]
    return child_row(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-tokens", type=int, default=256, help="a square number (256: a 256x256 image)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--short", type=int, nargs=2, default=[2, 4], metavar=("DOUBLE", "SINGLE"),
                        help="the depth at which fp32 and ternary are compared")
    parser.add_argument("--packing", default="tq2", choices=["tq2", "tq1"], help="the ternary codes' packing")
    parser.add_argument("--separate", action="store_true", help="ternary q/k/v projections not fused")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (as --compile does)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        double, single, ternary = args.child
        print(json.dumps(run_variant(double, single, bool(ternary), args.image_tokens, args.text_tokens,
                                     args.packing, not args.separate, args.compile)))
        return

    full = (FLUX_DEV_CONFIG["num_layers"], FLUX_DEV_CONFIG["num_single_layers"])
    bf16_full = weight_bytes(build_transformer(FLUX_DEV_CONFIG, "meta")) // 2  # meta fp32 -> bf16 bytes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.image_tokens} image + "
          f"{args.text_tokens} text tokens; full FLUX.1-dev weights: {bf16_full / 1e9:.1f} GB in bf16, "
          f"{2 * bf16_full / 1e9:.1f} GB in fp32")
    print(f"{'variant':>8} {'blocks':>7} {'weights GB':>10} {'build s':>8} {'first s':>8} {'forward s':>9} "
          f"{'peak RSS GB':>11}")
    rows = []
    for double, single, ternary in ((*args.short, False), (*args.short, True), (*full, True)):
        row = child(args, double, single, ternary)
        rows.append(row)
        print(f"{row['variant']:>8} {f'{double}+{single}':>7} {row['weight_bytes'] / 1e9:10.2f} "
              f"{row['build_s']:8.1f} {row['first_forward_s']:8.1f} {row['forward_s']:9.2f} "
              f"{row['peak_rss_bytes'] / 1e9:11.2f}", flush=True)
    fp, short, whole = rows
    print(f"at {args.short[0]}+{args.short[1]} blocks, fp32 / ternary: "
          f"forward {fp['forward_s'] / short['forward_s']:.2f}x, "
          f"weights {fp['weight_bytes'] / short['weight_bytes']:.2f}x, peak RSS "
          f"{fp['peak_rss_bytes'] / short['peak_rss_bytes']:.2f}x")
    print(f"full FLUX.1-dev ternary ({args.packing}): {whole['forward_s']:.1f} s a forward, peak RSS "
          f"{whole['peak_rss_bytes'] / 1e9:.2f} GB (bf16 weights alone: {bf16_full / 1e9:.1f} GB)")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
