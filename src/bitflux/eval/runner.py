"""`bitflux eval`: ShapeEval and same-seed fidelity for several variants of one model, sharded over
torch.distributed ranks (torchrun / accelerate launch set RANK and WORLD_SIZE) and gathered on rank 0.

Every image's noise depends only on its prompt index and seed, so totals are identical whatever the
world size.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager

import numpy as np
import torch.distributed as dist

from ..errors import BitfluxError
from . import shapeeval
from .fidelity import mean_fidelity, psnr, ssim

GRID_PROMPTS = 12  # first prompts of each category shown in the grid, two per category


@contextmanager
def process_group():
    """(rank, world size): a gloo group when launched by torchrun or accelerate, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def evaluate_variants(build_pipeline, variants: list[str], seeds=(0,), per_category: int = shapeeval.PER_CATEGORY,
                      steps: int = 20, guidance: float = 3.5, progress: bool = True) -> dict:
    """build_pipeline(name) -> FluxPipeline. "fp" (full precision) is evaluated first: fidelity is measured
    against its images. Returns per-variant ShapeEval summaries, fidelity, and grid images (rank 0 only)."""
    variants = ["fp", *[v for v in variants if v != "fp"]]
    with process_group() as (rank, world):
        items = shapeeval.prompt_set(per_category=per_category)
        grid_indices = {it.index for cat in shapeeval.CATEGORIES
                        for it in [i for i in items if i.category == cat][:GRID_PROMPTS // 6]}
        mine = items[rank::world]
        results, fp_images = {}, {}
        for name in variants:
            pipe = build_pipeline(name)
            images: dict[tuple[int, int], np.ndarray] = {}
            generate = shapeeval.pipeline_generate_fn(pipe, num_inference_steps=steps, guidance_scale=guidance)
            by_seed = {}

            def capture(prompts, image_seeds, generate=generate):
                out = generate(prompts, image_seeds)
                for prompt_seed, image in zip(image_seeds, out):
                    by_seed[prompt_seed] = shapeeval.to_array(image).astype(np.uint8)
                return out

            local = shapeeval.evaluate(capture, items=mine, seeds=tuple(seeds), grid=False,
                                       progress=progress and rank == 0, label=f"ShapeEval {name}")
            for record in local["records"]:
                image = by_seed[shapeeval.image_seed(record["seed"], record["index"])]
                images[(record["seed"], record["index"])] = image
                if name != "fp":
                    reference = fp_images[(record["seed"], record["index"])]
                    record["psnr"], record["ssim"] = psnr(reference, image), ssim(reference, image)
            if name == "fp":
                fp_images = images
            grid = {key: img for key, img in images.items() if key[0] == seeds[0] and key[1] in grid_indices}
            gathered = _gather((local["records"], grid), world)
            if rank == 0:
                records = [r for part, _ in gathered for r in part]
                summary = shapeeval.summarize(records, seeds)
                if name != "fp":
                    difference, stderr = shapeeval.paired_difference(records, results["fp"]["records"])
                    summary["vs_fp"] = {"difference": difference, "stderr": stderr}
                    summary.update(mean_fidelity([r["psnr"] for r in records], [r["ssim"] for r in records]))
                summary["grid"] = {k: v for _, part in gathered for k, v in part.items()}
                results[name] = summary
        return results if rank == 0 else {}


def variant_table(results: dict) -> str:
    """ShapeEval overall with its standard error, the difference from full precision image by image with its own,
    the categories, and fidelity."""
    categories = list(shapeeval.CATEGORIES)
    lines = [f"{'variant':24s} {'overall':>11s} {'vs fp':>11s} " + " ".join(f"{c[:10]:>10s}" for c in categories)
             + f" {'PSNR dB':>8s} {'SSIM':>6s}"]
    for name, r in results.items():
        fid = f" {r['psnr']:8.2f} {r['ssim']:6.3f}" if "psnr" in r else f" {'-':>8s} {'-':>6s}"
        versus = (f"{100 * r['vs_fp']['difference']:+5.1f} {_error(r['vs_fp']['stderr'])}" if "vs_fp" in r
                  else "-")
        lines.append(f"{name:24s} {100 * r['overall']:5.1f} {_error(r['overall_stderr'])} {versus:>11s} "
                     + " ".join(f"{100 * r['categories'].get(c, 0):10.1f}" for c in categories) + fid)
    return "\n".join(lines)


def _error(stderr: float) -> str:
    # unknown (one image a category) is not "no error"
    return "±n/a" if math.isnan(stderr) else f"±{100 * stderr:3.1f}"


def results_json(results: dict, settings: dict | None = None) -> str:
    """Strict JSON: an undefined number (one seed's standard error, identical images' PSNR) is null, which every
    parser reads; NaN and Infinity are not JSON. `settings` (steps, seeds, ...) go into each variant's entry, so
    that a 4-step result does not pass for a 20-step one."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, (list, tuple)) else value

    extra = {"settings": settings} if settings else {}
    return json.dumps({name: finite({**{k: v for k, v in r.items() if k not in ("grid", "records")}, **extra})
                       for name, r in results.items()}, indent=2, allow_nan=False)


def variant_grid(results: dict):
    """A PNG-ready grid: one row per variant, the same prompts and seeds in each column, pass/fail frames."""
    from PIL import Image, ImageDraw

    names = list(results)
    first = results[names[0]]
    keys = sorted(first["grid"])
    passed = {name: {(r["seed"], r["index"]): r["passed"] for r in results[name]["records"]} for name in names}
    prompts = {(r["seed"], r["index"]): r["prompt"] for r in first["records"]}
    rows = []
    for name in names:
        images = [results[name]["grid"][k] for k in keys]
        rows.append(shapeeval.captioned_grid(images, [prompts[k] for k in keys], cols=len(keys),
                                             marks=[passed[name][k] for k in keys]))
    label_w = 150
    canvas = Image.new("RGB", (label_w + rows[0].width, sum(r.height for r in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, row in zip(names, rows):
        canvas.paste(row, (label_w, y))
        draw.text((6, y + row.height // 2 - 6), name, fill="black")
        y += row.height
    return canvas


def check_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise BitfluxError("--variants is empty")
    if len(set(names)) < len(names):  # its images would be made twice for one row
        raise BitfluxError(f"--variants {text}: a variant given twice")
    return names
