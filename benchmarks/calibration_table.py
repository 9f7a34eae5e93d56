"""The calibration table: plain rounding variants against data-free calibration on the embedded demo model.

    python benchmarks/calibration_table.py [--model DIR] [--samples 32] [--steps 200] [--distill-steps 500]
        [--onpolicy-steps 500]
        [--per-category 48] [--threads 1] [--out docs/calibration] [--device cpu]

Every row generates ShapeEval's images with the same seeds as full precision (20 steps, guidance 3.5, the
model's own size) and reports ShapeEval overall and per category (0-100), PSNR and SSIM against the
full-precision images, and the calibration's time and peak memory. The teacher records are collected
once (prompts from the demo's caption grammar, disjoint from ShapeEval's) and shared by the calibrated
rows; each calibrated row's time includes the teacher's (the on-policy rows record their own further
records). Each calibration runs in a child process that loads the full-precision transformer (the whole
pipeline for the on-policy rows, which sample) and the saved teacher records; its memory is that process's
peak resident memory (sampled every 20 ms; Python, torch and the model included), and on CUDA the
allocator's peak.
Writes OUT/calibration.json, OUT/calibration_table.md and OUT/calibration_grid.png (same seeds, one row of
images per variant).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitflux import TernaryConfig, load_transformer, quantize_, save_transformer
from bitflux.calibrate import (CalibrationConfig, CalibrationReport, ModelSource, TeacherData, calibrate_transformer,
                               measured, onpolicy_data, teacher_data)
from bitflux.calibrate.quantize import teacher_settings
from bitflux.checkpoint import write_atomic, write_text_atomic
from bitflux.eval.fidelity import fidelity
from bitflux.pipeline import generate, pipeline_from_folder

PLAIN = [("absmean", "tensor"), ("twn", "tensor"), ("lsq", "tensor"), ("absmean", "channel"), ("lsq", "channel"),
         ("absmean", "group:64")]
CALIBRATED_GRANULARITIES = ["tensor", "channel"]
LEVELS = [("+ scales", ("scales",)), ("+ block-wise", ("scales", "blockwise")),
          ("+ distillation", ("scales", "blockwise", "distill")),
          ("+ on-policy", ("scales", "blockwise", "distill", "onpolicy"))]
GRID_IMAGES = 8


def _pipeline_with(pipe, transformer):
    ternary = type(pipe)(**dict(pipe.components, transformer=transformer))
    ternary.set_progress_bar_config(disable=True)
    return ternary


def _evaluate(pipe, items, settings, progress) -> tuple[dict, list]:
    """ShapeEval of one pipeline; ShapeEval gives each image the seed of its prompt's index."""
    from bitflux.eval import shapeeval

    images = []

    def generate_fn(prompts, seeds):
        batch = generate(pipe, prompts, seeds, progress=False, **settings)
        images.extend(batch)
        return batch

    result = shapeeval.evaluate(generate_fn, items, seeds=(0,), grid=False, progress=progress)
    return result, images


def _row(name, result, images, fp_images, seconds=None, memory=None, extra=None) -> dict:
    row = {"variant": name, "overall": 100 * result["overall"],
           "categories": {k: 100 * v for k, v in result["categories"].items()},
           "seconds": seconds, "memory_mib": memory, **(extra or {})}
    if fp_images is not None:
        row.update(fidelity(fp_images, images))
    return row


def _table(rows: list[dict]) -> str:
    categories = list(rows[0]["categories"])
    head = ["variant", "ShapeEval", *categories, "PSNR dB", "SSIM", "calib. time", "calib. memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['overall']:.1f}", *(f"{r['categories'][c]:.1f}" for c in categories),
                 f"{r['psnr']:.2f}" if "psnr" in r else "-", f"{r['ssim']:.3f}" if "ssim" in r else "-",
                 f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-",
                 r["memory_mib"] if r["memory_mib"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grid(named_images: list[tuple[str, list]], path: Path) -> None:
    from PIL import Image, ImageDraw

    label_width = 200
    size = named_images[0][1][0].size[0]
    canvas = Image.new("RGB", (label_width + size * GRID_IMAGES, size * len(named_images)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(named_images):
        draw.text((4, r * size + size // 2 - 6), name, fill="black")
        for c, image in enumerate(images[::max(1, len(images) // GRID_IMAGES)][:GRID_IMAGES]):  # every category
            canvas.paste(image, (label_width + c * size, r * size))
    write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG", optimize=True))


def child(job: dict) -> None:
    """Calibrate one variant from saved teacher records and write it as a bitflux folder; the report
    (time, peak memory of this process alone) goes to stdout as the last line."""
    from diffusers import FluxTransformer2DModel

    torch.set_num_threads(job["threads"])
    config = TernaryConfig.from_dict(job["config"])
    calib = CalibrationConfig(**job["calibration"])
    teacher = TeacherData.load(Path(job["teacher"]))
    # The whole pipeline only for the onpolicy stage (it samples), so the other rows' memory is the transformer's.
    onpolicy = None
    if "onpolicy" in calib.stages:
        pipe = pipeline_from_folder(Path(job["model"]), torch.float32, {})
        fp = pipe.to(job["device"]).transformer

        def onpolicy(student, round_index):
            return onpolicy_data(pipe, student, job["prompts"], calib, progress=False, round_index=round_index)
    else:
        fp = FluxTransformer2DModel.from_pretrained(job["model"], subfolder="transformer", torch_dtype=torch.float32)
    report = CalibrationReport(calib.stages)
    with measured(report, job["device"]):
        model, report = calibrate_transformer(ModelSource(fp.to(job["device"])), teacher, config, calib,
                                              job["device"], progress=False, report=report, onpolicy=onpolicy)
    save_transformer(model.to("cpu"), job["out"], config, force=True)
    print(json.dumps(report.to_dict()))


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        child(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="FLUX pipeline folder (default: the embedded demo model)")
    parser.add_argument("--samples", type=int, default=32, help="teacher trajectories")
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps per block")
    parser.add_argument("--distill-steps", type=int, default=500)
    parser.add_argument("--onpolicy-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-category", type=int, default=48, help="ShapeEval prompts per category")
    parser.add_argument("--granularities", nargs="+", default=CALIBRATED_GRANULARITIES)
    parser.add_argument("--a8", action="store_true", help="also W1.58A8 rows (plain, and block-wise calibrated "
                        "for a8 at the first granularity)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="docs/calibration")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bitflux.demo import demo_model_path
    from bitflux.demo.scenes import calibration_prompts
    from bitflux.eval import shapeeval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    model_path = args.model or demo_model_path()
    pipe = pipeline_from_folder(Path(model_path), torch.float32, {}).to(device)
    pipe.set_progress_bar_config(disable=True)
    settings = teacher_settings(pipe)
    generation = {"steps": settings["num_inference_steps"], "guidance": settings["guidance_scale"],
                  "height": settings["height"], "width": settings["width"]}
    items = shapeeval.prompt_set(per_category=args.per_category)
    prompts = calibration_prompts(args.samples)
    rows, grid = [], []

    def record(name, transformer, fp_images, seconds=None, memory=None, extra=None):
        start = time.perf_counter()
        result, images = _evaluate(_pipeline_with(pipe, transformer), items, generation, progress=True)
        row = _row(name, result, images, fp_images, seconds, memory, extra)
        row["eval_seconds"] = time.perf_counter() - start
        rows.append(row)
        grid.append((name, images))
        print(_table([row]).splitlines()[-1], flush=True)
        _write(out, rows, grid, args)
        return images

    fp_images = record("full precision", pipe.transformer, None)
    for method, granularity in PLAIN:
        config = TernaryConfig(method=method, **TernaryConfig.parse_granularity(granularity))
        start = time.perf_counter()
        plain = copy.deepcopy(pipe.transformer)
        quantize_(plain, config)
        record(f"{method} {granularity}", plain, fp_images, time.perf_counter() - start)

    base = CalibrationConfig(samples=args.samples, steps=args.steps, distill_steps=args.distill_steps,
                             onpolicy_steps=args.onpolicy_steps, batch_size=args.batch_size, pipeline_kwargs=settings)
    teacher_report = CalibrationReport(("teacher",))
    with measured(teacher_report, device):
        teacher = teacher_data(pipe, prompts, base, progress=True, report=teacher_report)
    print(f"teacher: {len(teacher)} records in {teacher_report.seconds['total']:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="calibration_table."))
    teacher.save(work / "teacher.safetensors")

    def calibrated(name, config, stages):
        """Calibrate in a child process, so that its peak memory is its own, then evaluate here."""
        calib = CalibrationConfig(**{**base.to_dict(), "stages": stages})
        job = {"model": str(model_path), "teacher": str(work / "teacher.safetensors"), "out": str(work / "student"),
               "config": config.to_dict(), "calibration": calib.to_dict(), "device": args.device,
               "threads": torch.get_num_threads(), "prompts": prompts}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], check=True,
                              stdout=subprocess.PIPE, text=True)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        model = load_transformer(work / "student", device=device, dtype=torch.float32)
        memory = f"{report['peak_host_bytes'] / 2**20:.0f} MiB" + (
            f", device {report['peak_device_bytes'] / 2**20:.0f} MiB" if report["peak_device_bytes"] else "")
        record(name, model, fp_images, teacher_report.seconds["total"] + report["seconds"]["total"], memory,
               {"calibration": report})

    for granularity in args.granularities:
        for label, stages in LEVELS:
            config = TernaryConfig(**TernaryConfig.parse_granularity(granularity))
            calibrated(f"absmean {granularity} {label}", config, stages)
    if args.a8:
        plain = copy.deepcopy(pipe.transformer)
        quantize_(plain, TernaryConfig(activations="a8"))
        record("W1.58A8 absmean tensor", plain, fp_images, 0.0)
        granularity = args.granularities[0]
        config = TernaryConfig(activations="a8", **TernaryConfig.parse_granularity(granularity))
        calibrated(f"W1.58A8 absmean {granularity} + block-wise", config, ("scales", "blockwise"))
    print(_table(rows))
    return 0


def _write(out: Path, rows, grid, args) -> None:
    data = {"args": vars(args), "torch_threads": torch.get_num_threads(), "rows": rows}
    write_text_atomic(out / "calibration.json", json.dumps(data, indent=1, default=str))
    write_text_atomic(out / "calibration_table.md", _table(rows) + "\n")
    _grid(grid, out / "calibration_grid.png")


if __name__ == "__main__":
    raise SystemExit(main())
