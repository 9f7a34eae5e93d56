"""Calibration's teacher on a FLUX.1-dev-sized full-precision pipeline on a CPU: what memory it takes to record
the teacher's trajectories, the whole pipeline loaded (as `quantize --calibrate` did before) against prompts
encoded first with T5 streamed and the transformer streamed a block at a time (what it does now), and the
whole `quantize --calibrate` run at the cheapest level (closed-form scales) after the streamed teacher.

The pipeline is cpu_pipeline.py's (T5-XXL, CLIP-L, VAE: random, bf16) with a random bf16 FLUX.1-dev transformer
(23.8 GB) instead of the ternary one, written once, block by block (never whole in memory). Each variant runs
in a child process of its own, so its peak resident memory (VmHWM) is its own; one the system kills (out of
memory) is reported as such.

    PYTHONPATH=src:benchmarks python benchmarks/cpu_calibrate.py [--dir /tmp/bitflux-flux-dev-fp] [--size 128]
        [--text-tokens 64] [--steps 2] [--samples 1] [--variants whole streamed quantize] [--json out.json]

The image size, text length and step count only set how long the teacher computes (a forward of the fp32
FLUX.1-dev transformer at 256x256 and 512 text tokens is ~3 minutes on 2 cores); memory is the weights'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from child_rows import child_row, killed_row
from cpu_pipeline import write_pipeline
from gpu_flux import fill_random_

from bitflux.calibrate.memory import peak_resident_bytes
from bitflux.checkpoint import ShardWriter, write_text_atomic
from bitflux.flux import FLUX_DEV_CONFIG, build_transformer

VARIANTS = ("whole", "streamed", "quantize")
PROMPT = "a red cube on a blue sphere"


def write_fp_pipeline(root: Path, ternary_root: Path) -> None:
    """The full-precision pipeline folder, once: cpu_pipeline.py's components (hard links) and a random bf16
    FLUX.1-dev transformer, written a top-level module or block at a time."""
    if (root / "model_index.json").exists():
        return
    write_pipeline(ternary_root)
    for folder in ternary_root.iterdir():
        if folder.is_dir() and folder.name != "transformer":
            (root / folder.name).mkdir(parents=True, exist_ok=True)
            for file in folder.iterdir():
                if not (root / folder.name / file.name).exists():
                    os.link(file, root / folder.name / file.name)
    model = build_transformer(FLUX_DEV_CONFIG, "meta")
    out = root / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    model.save_config(out)
    writer = ShardWriter(out)
    parts = [name for name, _ in model.named_children() if not name.endswith("blocks")]
    parts += [f"{group}.{i}" for group in ("transformer_blocks", "single_transformer_blocks")
              for i in range(len(getattr(model, group)))]
    for name in parts:
        module = fill_random_(model.get_submodule(name).to_empty(device="cpu"), "cpu").to(torch.bfloat16)
        for key, tensor in module.state_dict().items():
            writer.add(f"{name}.{key}", tensor)
        module.to("meta")
    writer.finish()
    os.link(ternary_root / "model_index.json", root / "model_index.json")  # last: the folder is complete


def run_variant(root: Path, variant: str, size: int, text_tokens: int, steps: int, samples: int) -> dict:
    """In this process: the teacher's records (whole or streamed), or the whole calibrated quantization."""
    from bitflux.calibrate import CalibrationConfig, teacher_data
    from bitflux.calibrate.memory import reset_peak_resident
    from bitflux.calibrate.quantize import (
        quantize_calibrated,
        teacher_pipeline,
        teacher_settings,
    )
    from bitflux.pipeline import encode_prompts

    settings = {"height": size, "width": size, "num_inference_steps": steps, "max_sequence_length": text_tokens}
    calib = CalibrationConfig(stages=("scales",), samples=samples, batch_size=samples, pipeline_kwargs=settings)
    prompts = [PROMPT]
    start = time.perf_counter()
    phases = {}
    if variant == "quantize":
        report = quantize_calibrated(root, root.parent / f"{root.name}-calibrated", prompts, calibration=calib,
                                     force=True, device="cpu", progress=False)
        records = report.records
    else:
        if variant == "whole":
            from bitflux.pipeline import pipeline_from_folder

            pipe = pipeline_from_folder(root, torch.float32, {})
            encode = None
        else:
            pipe = teacher_pipeline(root, torch.float32, torch.device("cpu"), stream=True)

            def encode(batch, length):  # the peak of loading and encoding, apart from the sampling's
                embeddings = encode_prompts(root, batch, max_sequence_length=length)
                phases["encoding_peak_rss_bytes"] = peak_resident_bytes()
                reset_peak_resident()
                return embeddings
        calib.pipeline_kwargs = teacher_settings(pipe, **settings)
        records = len(teacher_data(pipe, prompts, calib, progress=False, encode=encode))
    peak = max(peak_resident_bytes(), phases.get("encoding_peak_rss_bytes", 0))
    if phases:
        phases["sampling_peak_rss_bytes"] = peak_resident_bytes()
    return {"variant": variant, "seconds": round(time.perf_counter() - start, 1), "records": records,
            "peak_rss_bytes": peak, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/bitflux-flux-dev-fp", help="where the pipeline is (written once)")
    parser.add_argument("--ternary-dir", default="/tmp/bitflux-flux-dev", help="cpu_pipeline.py's folder")
    parser.add_argument("--size", type=int, default=128, help="image width and height")
    parser.add_argument("--text-tokens", type=int, default=64, help="T5 tokens a prompt is padded to")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps a trajectory")
    parser.add_argument("--samples", type=int, default=1, help="teacher trajectories")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.child:
        print(json.dumps(run_variant(root, args.child, args.size, args.text_tokens, args.steps, args.samples)))
        return
    write_fp_pipeline(root, Path(args.ternary_dir))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; FLUX.1-dev-sized full-precision pipeline "
          f"(bf16 on disk, fp32 compute), {args.samples} trajectory of {args.steps} steps at {args.size}x{args.size}, "
          f"{args.text_tokens} text tokens")
    print(f"{'variant':>10} {'records':>7} {'seconds':>8} {'peak RSS GB':>11}")
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--dir", args.dir, "--size", str(args.size), "--text-tokens",
                   str(args.text_tokens), "--steps", str(args.steps), "--samples", str(args.samples), "--child", variant]
        row = child_row(command, may_be_killed=True) or killed_row(variant, width=10)
        rows.append(row)
        if "killed" in row:
            continue
        phases = (f" (encoding {row['encoding_peak_rss_bytes'] / 1e9:.2f}, sampling {row['sampling_peak_rss_bytes'] / 1e9:.2f})"
                  if "encoding_peak_rss_bytes" in row else "")
        print(f"{variant:>10} {row['records']:7d} {row['seconds']:8.1f} {row['peak_rss_bytes'] / 1e9:11.2f}{phases}",
              flush=True)
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
