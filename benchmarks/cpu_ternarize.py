"""Ternarizing one layer's weight on the CPU: bitflux's `ternarize` as it is now against the same function at
another revision of the repository (its src/bitflux/ternary.py, read with git), in one process on the same
weight. Prints each granularity's seconds for both, the speed-up, and whether the codes and scales are the
same bits.

    python benchmarks/cpu_ternarize.py --before 6c15846 [--method lsq] [--shape 12288x3072]

A fresh tensor of FLUX's size costs more in page faults than in arithmetic with 4 KB pages (a Python
process's default); `THP_MEM_ALLOC_ENABLE=1` (what the `bitflux` command sets) gives torch 2 MB pages: run
it both ways.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from bitflux import ternary

GRANULARITIES = (("tensor", None), ("channel", None), ("group", 128))


def ternary_at(revision: str) -> types.ModuleType:
    """src/bitflux/ternary.py at `revision`, as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:src/bitflux/ternary.py"], cwd=root, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"ternary_{revision}")
    exec(compile(source, f"{revision}:src/bitflux/ternary.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def seconds(ternarize, weight, method, granularity, group_size):
    ternarize(weight, method, granularity, group_size)  # warm-up (allocator, first-touch)
    start = time.perf_counter()
    out = ternarize(weight, method, granularity, group_size)
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--method", default="lsq", choices=["absmean", "twn", "lsq"])
    parser.add_argument("--shape", default="12288x3072", help="OUTxIN (default: FLUX.1-dev's ff net.0)")
    args = parser.parse_args(argv)
    out_features, in_features = (int(n) for n in args.shape.split("x"))
    before = ternary_at(args.before)
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.02
    print(f"{args.method} on {args.shape}, {torch.get_num_threads()} threads: seconds at {args.before} and now")
    print("| granularity | before s | now s | speed-up | same bits |\n|---|---|---|---|---|")
    for granularity, group_size in GRANULARITIES:
        old_s, old = seconds(before.ternarize, weight, args.method, granularity, group_size)
        new_s, new = seconds(ternary.ternarize, weight, args.method, granularity, group_size)
        same = all(torch.equal(a, b) for a, b in zip(old, new))
        print(f"| {granularity} | {old_s:.2f} | {new_s:.2f} | {old_s / new_s:.1f}x | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
