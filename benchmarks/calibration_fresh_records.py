"""Does the shipped calibrated demo model gain from more velocity distillation, and from which records? (The
experiment behind the onpolicy calibration stage, which records "both" below.) Starting
from it, 500 more distillation steps on each of: fresh teacher trajectories (other noise seeds than the ones
it was calibrated on: `fresh`), the student's own trajectories with the teacher's velocity at each of its
states (`student`, on-policy), and both together (`both`); then `bitflux eval` scores them beside full
precision and the shipped model (ShapeEval, and PSNR/SSIM against full precision's images of the same seeds).

    PYTHONPATH=src python benchmarks/calibration_fresh_records.py [--out /tmp/fresh-records] [--steps 500]
        [--samples 64] [--variants fresh student both]

Prints each variant's velocity error on its own records before and after (the shipped model's error on records
it was not distilled on is the overfitting measure), then the evaluation table. One thread (a small model).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitflux import demo_model_path, load_pipeline, load_transformer, save_transformer
from bitflux.calibrate import CalibrationConfig
from bitflux.calibrate.distill import distill
from bitflux.calibrate.quantize import teacher_settings
from bitflux.calibrate.teacher import collect
from bitflux.checkpoint import read_config
from bitflux.config import TernaryConfig
from bitflux.demo.scenes import calibration_prompts
from bitflux.pipeline import demo_ternary_path

FRESH_SEED = 10_000  # the shipped model's teacher trajectories used seeds 0..63


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/fresh-records", help="where the variants' pipeline folders go")
    parser.add_argument("--steps", type=int, default=500, help="further distillation steps")
    parser.add_argument("--samples", type=int, default=64, help="trajectories recorded for each kind of record")
    parser.add_argument("--variants", nargs="+", default=["fresh", "student", "both"],
                        choices=["fresh", "student", "both"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    teacher = load_pipeline(demo_model_path(), text_encoders="whole")
    shipped = demo_ternary_path()
    student = load_pipeline(shipped, text_encoders="whole")
    prompts = calibration_prompts(256)
    settings = teacher_settings(teacher)
    record = dict(samples=args.samples, seed=FRESH_SEED, batch_size=16, progress=False, **settings)
    records = {}
    if {"fresh", "both"} & set(args.variants):
        records["fresh"] = collect(teacher, prompts, **record)
    if {"student", "both"} & set(args.variants):
        records["student"] = collect(student, prompts, label=teacher.transformer, **record)
    if "both" in args.variants:  # what the onpolicy calibration stage records (teacher.onpolicy_records)
        records["both"] = records["fresh"].joined(records["student"])
    config = TernaryConfig.from_dict(read_config(shipped / "transformer")["quantization_config"])
    calib = CalibrationConfig(stages=("distill",), distill_steps=args.steps, batch_size=16)
    folders = []
    for variant in args.variants:
        start = time.perf_counter()
        model = load_transformer(shipped / "transformer")
        before, after = distill(model, records[variant], config, calib, "cpu", progress=False)
        folder = out / variant
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(shipped, folder, ignore=shutil.ignore_patterns("transformer"))
        save_transformer(model, folder / "transformer", config)
        folders.append(str(folder))
        print(f"{variant:>8}: {len(records[variant])} records, velocity error {before:.4f} -> {after:.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    subprocess.run([sys.executable, "-m", "bitflux.cli", "eval", "--variants", ",".join(["fp", "calibrated", *folders])],
                   check=True)


if __name__ == "__main__":
    main()
