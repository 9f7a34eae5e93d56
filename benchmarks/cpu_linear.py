"""torch F.linear (fp32, and bf16 for reference) vs bitflux's `cpu` backend on FLUX linear shapes.

    python benchmarks/cpu_linear.py [--m 1 16 256] [--shapes 3072x3072] [--packing tq1] [--no-bf16] [--threads 1]
                                    [--isas avx2 avxvnni] [--json out.json]

Runs both side by side in one process on the same inputs; prints milliseconds per call and the speed-up
of bitflux over torch fp32, and the bytes each holds for the layer: torch's fp32 weight against bitflux's
codes, scales and whatever its kernel keeps beside them (the prepared weight). `--packing tq1` holds the
codes in 1.6 bits, which the kernel widens to tq2 as it reads them. Times are the best of repeated calls
(other processes make the rest noisy). `--isas` times the kernel's paths for several instruction sets in
turns (the first is the `bitflux` column; each other's speed-up over it is printed beside it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitflux import TernaryConfig, TernaryLinear
from bitflux.checkpoint import write_text_atomic
from bitflux.kernels import _prepared, cpu, use_backend

FLUX_SHAPES = ["3072x3072", "3072x12288", "12288x3072", "3072x18432"]  # in_features x out_features


def best_seconds(fns: dict, min_seconds: float, max_rounds: int = 20) -> dict:
    """Best time of each function, called in turns so that other processes' load hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocation, weight repacking
    best, rounds, start = dict.fromkeys(fns, float("inf")), 0, time.perf_counter()
    while rounds < 2 or (time.perf_counter() - start < min_seconds and rounds < max_rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        rounds += 1
    return best


def held_bytes(layer: TernaryLinear) -> int:
    """The layer's own tensors (codes, scales, bias) plus the tensors its prepared weight owns."""
    own = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
    entry = _prepared.get(layer.ternary_weight.packed)
    prepared = entry[2] if entry is not None else None
    extra = sum(t.numel() * t.element_size() for t in vars(prepared).values()
                if isinstance(t, torch.Tensor)) if prepared is not None else 0
    return own + extra


def measure(m: int, k: int, n: int, bf16: bool, min_seconds: float, packing: str = "tq2",
            isas: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k)
    weight, bias = torch.randn(n, k) * 0.02, torch.randn(n) * 0.02
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    config = TernaryConfig(activations="a8", format=packing)
    layer = TernaryLinear.from_codes(codes, torch.tensor([[0.02]]), bias, config=config)

    def bitflux_call(isa: str):
        with use_backend("cpu"), cpu.use_isa(isa):
            layer(x)

    isas = isas or [cpu.current_isa()]
    fns = {"fp32": lambda: F.linear(x, weight, bias)}
    fns.update({isa: lambda isa=isa: bitflux_call(isa) for isa in isas})
    row = {"M": m, "K": k, "N": n, "packing": packing, "isa": isas[0], "threads": torch.get_num_threads()}
    with torch.no_grad():
        seconds = best_seconds(fns, min_seconds)
        row["fp32_ms"], row["bitflux_ms"] = 1e3 * seconds["fp32"], 1e3 * seconds[isas[0]]
        row["isa_ms"] = {isa: 1e3 * seconds[isa] for isa in isas}
        if bf16:  # ~7x slower than fp32 on CPU: a few calls only
            xb, wb, bb = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
            row["bf16_ms"] = 1e3 * best_seconds({"bf16": lambda: F.linear(xb, wb, bb)}, 0.0)["bf16"]
    row["speedup"] = row["fp32_ms"] / row["bitflux_ms"]
    row["fp32_bytes"] = (weight.numel() + bias.numel()) * 4
    row["bitflux_bytes"] = held_bytes(layer)
    row["bitflux_gops"] = 2 * m * k * n / row["bitflux_ms"] / 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 256, 1024, 4096], help="tokens (rows)")
    parser.add_argument("--shapes", nargs="+", default=FLUX_SHAPES, help="in_features x out_features")
    parser.add_argument("--packing", default="tq2", choices=["tq2", "tq1"], help="the ternary layer's packing")
    parser.add_argument("--no-bf16", action="store_true", help="skip the (slow) bf16 column")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time spent per measurement")
    parser.add_argument("--threads", type=int, help="torch (and kernel) threads; default: torch's")
    parser.add_argument("--isas", nargs="+", choices=cpu.ISAS,
                        help="time the kernel on each of these paths in turns (default: the best this CPU has)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if cpu.available():
        raise SystemExit(f"cpu backend unavailable: {cpu.available()}")
    isas = args.isas or [cpu.current_isa()]
    missing = [isa for isa in isas if isa not in cpu.supported_isas()]
    if missing:
        raise SystemExit(f"this CPU lacks {', '.join(missing)}; it has {', '.join(cpu.supported_isas())}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu kernel ISA {isas[0]}, "
          f"{args.packing} codes")
    others = "".join(f" {isa + ' ms':>14} {'vs ' + isas[0]:>14}" for isa in isas[1:])
    header = (f"{'M':>5} {'K':>6} {'N':>6} {'fp32 ms':>9} {'bf16 ms':>9} {'bitflux ms':>10} {'GOPS':>6} {'vs fp32':>7}"
              f" {'fp32 MB':>8} {'bitflux MB':>10}{others}")
    print(header)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        for m in args.m:
            row = measure(m, k, n, not args.no_bf16, args.min_seconds, args.packing, isas)
            rows.append(row)
            bf16 = f"{row['bf16_ms']:9.2f}" if "bf16_ms" in row else f"{'-':>9}"
            others = "".join(f" {row['isa_ms'][isa]:14.2f} {row['bitflux_ms'] / row['isa_ms'][isa]:13.2f}x"
                             for isa in isas[1:])
            print(f"{m:5d} {k:6d} {n:6d} {row['fp32_ms']:9.2f} {bf16} {row['bitflux_ms']:10.2f} "
                  f"{row['bitflux_gops']:6.0f} {row['speedup']:6.2f}x {row['fp32_bytes'] / 1e6:8.1f} "
                  f"{row['bitflux_bytes'] / 1e6:10.2f}{others}", flush=True)
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
