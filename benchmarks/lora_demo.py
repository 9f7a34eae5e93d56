"""A trained style LoRA on the embedded demo model, full precision and ternary, in one process: style success,
ShapeEval (single- and two-object prompts) with and without the LoRA, generation time with 0, 1 and 2 LoRAs,
and a PNG grid (rows: FP, FP+LoRA, ternary, ternary+LoRA, ternary+LoRA fused; same seeds).

    python -m bitflux.interop.train_lora --out style.safetensors
    python benchmarks/lora_demo.py --lora style.safetensors [--device cpu|cuda] [--per-category 24]
                                   [--steps 20] [--repeats 5] [--grid docs/lora/lora_demo.png]

The ternary pipeline is the demo's shipped calibrated ternary model (bitflux.pipeline.demo_ternary_path(),
the LoRA trained on full precision, applied unchanged). Style success is train_lora.is_styled (ShapeEval's detector finds
objects, all in the style's ink). The prompts name no colour, so ShapeEval's checks (shapes present) and
the style do not contradict each other.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bitflux import demo_model_path, generate, load_pipeline
from bitflux.pipeline import demo_ternary_path
from bitflux.eval.shapeeval import captioned_grid, image_seed, prompt_set, score
from bitflux.interop.lora import load_lora
from bitflux.interop.train_lora import is_styled
from bitflux.pipeline import save_png

CATEGORIES = ("single_object", "two_object")


def quality(pipe, items, style: str, args) -> tuple[dict, list]:
    """Style success and ShapeEval pass rates (per category and their mean) on the items, and the images."""
    images = generate(pipe, [it.prompt for it in items], [image_seed(0, it.index) for it in items],
                      steps=args.steps, guidance=args.guidance, progress=False)
    passed = {cat: [] for cat in CATEGORIES}
    for it, image in zip(items, images):
        passed[it.category].append(score(it.prompt, image)[0])
    rates = {cat: sum(v) / len(v) for cat, v in passed.items()}
    return {"style": sum(is_styled(im, style) for im in images) / len(images), **rates,
            "shapeeval": sum(rates.values()) / len(rates)}, images


def timed_generation(pipe, lora_state, strength: float, args) -> dict[int, float]:
    """Median seconds per generate() call of args.timing_batch prompts with 0, 1 and 2 LoRAs attached (the
    same file twice), interleaved repeat by repeat so that load from other processes hits all counts alike."""
    prompts = ["a red circle", "a circle and a square"] * (args.timing_batch // 2)
    seeds = list(range(len(prompts)))
    device = pipe.transformer.device
    times: dict[int, list[float]] = {0: [], 1: [], 2: []}
    generate(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance, progress=False)  # warm-up
    for _ in range(args.repeats):
        for count in times:
            adapters = [load_lora(pipe.transformer, lora_state, strength, dtype=pipe.transformer.dtype)
                        for _ in range(count)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            generate(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[count].append(time.perf_counter() - start)
            for adapter in adapters:
                adapter.remove()
    return {count: sorted(ts)[len(ts) // 2] for count, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", required=True, help="a style LoRA from python -m bitflux.interop.train_lora")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--style", default="ink")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--per-category", type=int, default=24, help="prompts per category (single, two objects)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timing-batch", type=int, default=8, help="prompts per timed generate() call")
    parser.add_argument("--grid", default="docs/lora/lora_demo.png")
    parser.add_argument("--grid-columns", type=int, default=12)
    args = parser.parse_args()
    from safetensors.torch import load_file

    lora_state = load_file(args.lora)
    items = prompt_set(CATEGORIES, per_category=args.per_category)
    fp = load_pipeline(demo_model_path(), args.device)
    ternary = load_pipeline(demo_ternary_path(), args.device)  # the shipped calibrated ternary model
    rows, grid_rows, speed = [], [], {}
    for label, pipe in (("full precision", fp), ("ternary calibrated", ternary)):
        plain, images = quality(pipe, items, args.style, args)
        rows.append((label, "none", plain))
        grid_rows.append((label, images))
        adapter = load_lora(pipe.transformer, lora_state, args.strength, dtype=pipe.transformer.dtype)
        styled, images = quality(pipe, items, args.style, args)
        rows.append((label, f"side branch x{args.strength:g}", styled))
        grid_rows.append((f"{label} + LoRA", images))
        if pipe is ternary:
            # Fusing re-ternarizes W + delta: no branch cost, but the delta is rounded with the weights.
            adapter.fuse("lsq")
            fused, images = quality(pipe, items, args.style, args)
            rows.append((label, "fused (re-ternarized)", fused))
            grid_rows.append((f"{label} + LoRA fused", images))
        adapter.remove()
        speed[label] = timed_generation(pipe, lora_state, args.strength, args)

    n = len(items)
    print(f"\n{n} prompts ({args.per_category} per category: {', '.join(CATEGORIES)}), seed 0, {args.steps} steps, "
          f"guidance {args.guidance}, {args.device}, load average {os.getloadavg()[0]:.1f}\n")
    print("| model | LoRA | style success | ShapeEval single | ShapeEval two | ShapeEval mean |")
    print("|---|---|---|---|---|---|")
    for label, lora, r in rows:
        print(f"| {label} | {lora} | {r['style']:.2f} | {r['single_object']:.2f} | {r['two_object']:.2f} "
              f"| {r['shapeeval']:.2f} |")
    print(f"\nseconds per generate() of {args.timing_batch} images, median of {args.repeats}:\n")
    print("| model | 0 LoRAs | 1 LoRA | 2 LoRAs | overhead per LoRA |")
    print("|---|---|---|---|---|")
    for label, t in speed.items():
        per_lora = (t[2] / t[0] - 1) / 2 * 100
        print(f"| {label} | {t[0]:.3f} | {t[1]:.3f} ({(t[1] / t[0] - 1) * 100:+.1f} %) "
              f"| {t[2]:.3f} ({(t[2] / t[0] - 1) * 100:+.1f} %) | {per_lora:+.1f} % |")
    columns = min(args.grid_columns, n)
    picks = [round(i * (n - 1) / max(columns - 1, 1)) for i in range(columns)]  # spread over both categories
    images = [images[i] for _, images in grid_rows for i in picks]
    captions = [f"{label}: {items[i].prompt}" for label, _ in grid_rows for i in picks]
    os.makedirs(os.path.dirname(args.grid) or ".", exist_ok=True)
    save_png(captioned_grid(images, captions, cols=columns), args.grid)
    print(f"\nwrote {args.grid}")


if __name__ == "__main__":
    main()
