"""Peak memory and throughput of `bitflux quantize` on synthetic full-width FLUX.1-dev checkpoints of
reduced depth (random bf16, width 3072), to show that peak RSS does not grow with depth.

    python benchmarks/quantize_stream.py --depths 1x1 2x2 4x4 [--layout original|diffusers] [--json]

Each quantize runs in a child process; its peak RSS comes from the kernel's rusage (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitflux.flux import FLUX_DEV_CONFIG, build_transformer, diffusers_to_original


def _shapes(double: int, single: int, layout: str) -> dict[str, tuple[int, ...]]:
    config = {**FLUX_DEV_CONFIG, "num_layers": double, "num_single_layers": single}
    state = build_transformer(config, "meta").state_dict()
    if layout == "original":
        state = diffusers_to_original(state)
    return {k: tuple(v.shape) for k, v in state.items()}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """Write random bf16 tensors one at a time (safetensors layout by hand: header, then raw bytes)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.ndim else tensor.reshape(1).view(
                torch.uint8).numpy().tobytes())
    return path.stat().st_size


def run_quantize(source: Path, out: Path) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one `bitflux quantize` child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bitflux.cli", "quantize", str(source), "-o", str(out), "-q"])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"quantize failed on {source}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", nargs="+", default=["1x1", "2x2", "4x4"], help="DOUBLExSINGLE blocks")
    parser.add_argument("--layout", choices=["original", "diffusers"], default="original")
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for depth in args.depths:
            double, single = (int(n) for n in depth.split("x"))
            if args.layout == "original":
                source = Path(tmp) / f"flux-{depth}.safetensors"
                size = write_random_safetensors(source, _shapes(double, single, "original"))
            else:
                source = Path(tmp) / f"flux-{depth}"
                source.mkdir()
                config = {**FLUX_DEV_CONFIG, "num_layers": double, "num_single_layers": single}
                (source / "config.json").write_text(json.dumps(config))
                size = write_random_safetensors(source / "diffusion_pytorch_model.safetensors",
                                                _shapes(double, single, "diffusers"))
            seconds, peak = run_quantize(source, Path(tmp) / f"out-{depth}")
            rows.append({"depth": depth, "input_gb": size / 1e9, "peak_rss_mb": peak / 2**20,
                         "seconds": seconds, "input_mb_per_s": size / 1e6 / seconds})
            for p in (Path(tmp) / f"out-{depth}").rglob("*"):
                p.unlink() if p.is_file() else None
            source.unlink() if source.is_file() else None
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"layout: {args.layout}, width 3072 (FLUX.1-dev), random bf16")
    print(f"{'depth':>6s} {'input GB':>9s} {'peak RSS MB':>12s} {'seconds':>8s} {'MB/s':>7s}")
    for r in rows:
        print(f"{r['depth']:>6s} {r['input_gb']:9.2f} {r['peak_rss_mb']:12.0f} {r['seconds']:8.1f} "
              f"{r['input_mb_per_s']:7.0f}")
    print(f"peak RSS ratio deepest/shallowest: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f} "
          f"for {rows[-1]['input_gb'] / rows[0]['input_gb']:.1f}x the input")


if __name__ == "__main__":
    main()
