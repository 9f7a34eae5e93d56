"""ShapeEval: GenEval's six categories, scored by a programmatic detector on the demo model's scenes.

    from bitflux.eval import shapeeval
    result = shapeeval.evaluate(generate_fn, seeds=(0, 1, 2, 3), out_dir="eval/")
    result["overall"], result["categories"]

`generate_fn(prompts, seeds) -> images` is any text-to-image callable (PIL images or HxWx3 arrays);
image i of a call comes from seeds[i] (one per prompt and evaluation seed), so that scores do not depend on
batching (`pipeline_generate_fn` builds one from a FluxPipeline). The detector segments by nearest palette
colour, splits connected components, classifies each by the best IoU with an ideal circle, square and
triangle fitted to its box, and checks the prompt the way GenEval does: object present, count exact,
colour right, relative position of box centres (GenEval's rule), attributes bound to the right objects.

CLI: python -m bitflux.eval.shapeeval --model DIR --out DIR [--seeds 0 1 2 3] [--ground-truth]
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitflux.checkpoint import write_atomic, write_text_atomic
from bitflux.demo import scenes as S

VERSION = "shapeeval-v1"
PER_CATEGORY = 48
CATEGORIES = S.CATEGORIES

_PALETTE = np.array(list(S.COLORS.values()) + [S.BACKGROUND], dtype=np.float32)
_MAX_COLOR_DISTANCE = 80.0  # farther than this from every palette colour: not an object pixel
_MIN_AREA = 20  # pixels (at 64x64) left after opening; smaller blobs are noise
_MIN_IOU = 0.5  # below this against every template, a blob is no known shape


@dataclass(frozen=True)
class EvalItem:
    index: int
    category: str
    prompt: str


def prompt_set(categories=CATEGORIES, per_category: int = PER_CATEGORY) -> list[EvalItem]:
    """The fixed, versioned prompt list: `per_category` prompts for each of GenEval's six categories.

    Categories with fewer distinct captions than that (e.g. 3 for single_object) repeat them; each
    repetition is a separate image with its own seed. Changing this list changes VERSION.
    """
    import random

    rng = random.Random(VERSION)
    by_cat: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for cap in S.all_captions():
        spec = S.parse_caption(cap)
        if spec.category in by_cat:
            by_cat[spec.category].append(cap)
    items = []
    for cat in CATEGORIES:
        pool = by_cat[cat]
        rng.shuffle(pool)
        chosen = [pool[i % len(pool)] for i in range(PER_CATEGORY)]
        if cat in categories:
            items += [(cat, p) for p in sorted(chosen[:per_category])]
    return [EvalItem(i, c, p) for i, (c, p) in enumerate(items)]


# ---------------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------------


def to_array(image) -> np.ndarray:
    """PIL image or array (HxWx3, uint8 or float in [0, 1]) -> 64x64x3 float32 in [0, 255]."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        a = image.astype(np.float32)
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
            a = a.transpose(1, 2, 0)
        if a.max() <= 1.0 + 1e-6 and image.dtype != np.uint8:
            a = a * 255
        image = Image.fromarray(a.clip(0, 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (S.IMAGE_SIZE, S.IMAGE_SIZE):
        image = image.resize((S.IMAGE_SIZE, S.IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _shift(m: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    out = np.full_like(m, fill)
    h, w = m.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


_CROSS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def _open(mask: np.ndarray) -> np.ndarray:
    eroded = np.logical_and.reduce([_shift(mask, dy, dx, False) for dy, dx in _CROSS])
    return np.logical_or.reduce([_shift(eroded, dy, dx, False) for dy, dx in _CROSS]) & mask


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, by label propagation."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        nxt = lab.copy()
        for dy, dx in _CROSS[1:]:
            nxt = np.maximum(nxt, _shift(lab, dy, dx, 0))
        nxt = np.where(mask, nxt, 0)
        if np.array_equal(nxt, lab):
            break
        lab = nxt
    return [lab == v for v in np.unique(lab) if v != 0]


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes filling an h x w box (the scenes' geometry), as boolean masks."""
    y = (np.arange(h) + 0.5)[:, None]
    x = (np.arange(w) + 0.5)[None, :]
    u, v = (x - w / 2) / (w / 2), (y - h / 2) / (h / 2)  # [-1, 1] across the box
    return {
        "circle": u * u + v * v <= 1.0,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(u) <= (v + 1) / 2,
    }


def detect(image) -> list[dict]:
    """Objects in an image: shape (or None), colour, box centre (x, y), box size (w, h), area."""
    a = to_array(image)
    d = np.linalg.norm(a[:, :, None, :] - _PALETTE[None, None], axis=-1)
    k = d.argmin(-1)
    k = np.where(d.min(-1) > _MAX_COLOR_DISTANCE, len(_PALETTE) - 1, k)
    objects = []
    for ci, cname in enumerate(S.COLOR_NAMES):
        mask = _open(k == ci)
        if mask.sum() < _MIN_AREA:
            continue
        for comp in _components(mask):
            area = int(comp.sum())
            if area < _MIN_AREA:
                continue
            ys, xs = np.nonzero(comp)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            crop = comp[y0:y1, x0:x1]
            ious = {}
            for name, t in _templates(y1 - y0, x1 - x0).items():
                ious[name] = float((crop & t).sum() / max((crop | t).sum(), 1))
            best = max(ious, key=ious.get)
            objects.append(
                {
                    "shape": best if ious[best] >= _MIN_IOU else None,
                    "color": cname,
                    "center": [float(x0 + x1) / 2, float(y0 + y1) / 2],
                    "box": [int(x1 - x0), int(y1 - y0)],
                    "area": area,
                    "iou": round(ious[best], 3),
                }
            )
    return objects


def _relation(a: dict, b: dict, relation: str) -> bool:
    code = torch.tensor(S.RELATIONS.index(relation) + 1)
    return bool(
        S.relation_holds(torch.tensor(a["center"]), torch.tensor(float(max(a["box"]))),
                         torch.tensor(b["center"]), torch.tensor(float(max(b["box"]))), code)
    )


def score(prompt: str, image) -> tuple[bool, list[dict]]:
    """Whether `image` satisfies `prompt` (a caption of the grammar), and the detected objects."""
    spec = S.parse_caption(prompt)
    objs = detect(image)
    o = spec.objects

    def find(shape, color=None):
        return [x for x in objs if x["shape"] == shape and (color is None or x["color"] == color)]

    cat = spec.category
    if cat == "single_object":
        ok = len(find(o[0].shape)) >= 1
    elif cat == "colors":
        found = find(o[0].shape)
        ok = bool(found) and all(x["color"] == o[0].color for x in found)
    elif cat == "two_object":
        ok = bool(find(o[0].shape)) and bool(find(o[1].shape))
    elif cat in ("counting", "count_color"):
        ok = len(find(o[0].shape, o[0].color)) == spec.count
    elif cat == "position":
        a, b = find(o[0].shape, o[0].color), find(o[1].shape, o[1].color)
        ok = bool(a) and bool(b)
        if ok:
            big = lambda xs: max(xs, key=lambda x: x["area"])  # noqa: E731
            ok = _relation(big(a), big(b), spec.relation)
    elif cat == "color_attr":
        ok = bool(find(o[0].shape, o[0].color)) and bool(find(o[1].shape, o[1].color))
    else:
        raise ValueError(cat)
    return ok, objs


# ---------------------------------------------------------------------------------------------------
# Running an evaluation
# ---------------------------------------------------------------------------------------------------


def items_for(prompts: list[str]) -> list[EvalItem]:
    """EvalItems for any captions of the grammar (their category read from the caption)."""
    return [EvalItem(i, S.parse_caption(p).category, p) for i, p in enumerate(prompts)]


def evaluate(generate_fn, items: list[EvalItem] | None = None, seeds=(0,), batch_size: int = 48,
             out_dir=None, grid: bool = True, progress: bool = True, prompts: list[str] | None = None,
             label: str = "ShapeEval") -> dict:
    """Generate one image per (item, seed), score them, and return (and optionally write) the result.

    The items are ShapeEval's prompt set unless `items` (or plain `prompts`, see `items_for`) are given.

    Returns {"version", "overall", "categories": {cat: score}, "n_images", "records": [...]}; overall is
    the mean of the category scores, as GenEval reports it. With out_dir, writes shapeeval.json and
    (grid=True) shapeeval_grid.png, the first seed's images with green (pass) or red (fail) frames.
    """
    from tqdm import tqdm

    if items is None:
        items = items_for(prompts) if prompts is not None else prompt_set()
    records, grid_images = [], []
    total = len(items) * len(seeds)
    pbar = tqdm(total=total, desc=label, unit="image", disable=not progress)
    for seed in seeds:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            # Each image's noise depends on its prompt's index and the seed only, so batching and sharding
            # across processes cannot change a score.
            images = generate_fn([it.prompt for it in chunk], [image_seed(seed, it.index) for it in chunk])
            for it, img in zip(chunk, images):
                ok, objs = score(it.prompt, img)
                records.append({"index": it.index, "category": it.category, "prompt": it.prompt,
                                "seed": seed, "passed": ok, "detected": objs})
                if grid and seed == seeds[0]:
                    grid_images.append(to_array(img).astype(np.uint8))
            pbar.update(len(chunk))
    pbar.close()
    result = summarize(records, seeds)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "shapeeval.json", json.dumps(result, indent=1) + "\n")
        if grid:
            first = [r for r in records if r["seed"] == seeds[0]]
            image = captioned_grid(grid_images, [r["prompt"] for r in first], marks=[r["passed"] for r in first],
                                   cols=16)
            write_atomic(out / "shapeeval_grid.png", lambda tmp: image.save(tmp, format="PNG"))
    return result


def image_seed(seed: int, index: int) -> int:
    """The noise seed of prompt `index` under evaluation seed `seed`."""
    return seed * 1_000_003 + index


def _category_means(values: dict[str, list[float]]) -> tuple[float, float]:
    """The mean of the categories' means (as GenEval's overall), and its standard error: each category's mean
    has var(values) / n (images independent), and the overall averages the categories. One image in a category
    tells nothing of its variance: the error is then NaN (unknown), not 0."""
    means = [sum(v) / len(v) for v in values.values()]
    variances = [float(np.var(v, ddof=1)) / len(v) if len(v) > 1 else math.nan for v in values.values()]
    return sum(means) / max(len(means), 1), math.sqrt(sum(variances)) / max(len(means), 1)


def paired_difference(records: list[dict], reference: list[dict]) -> tuple[float, float]:
    """Overall score of `records` minus `reference`'s, image by image on the same prompts and seeds, and its
    standard error. Paired, the error shrinks with the share of images on which both variants pass or both
    fail (a variant that changes few images is told apart from its reference at one seed); with little
    agreement it is about the two scores' own errors."""
    passed = {(r["seed"], r["index"]): r["passed"] for r in reference}
    differences: dict[str, list[float]] = {}
    for r in records:
        key = (r["seed"], r["index"])
        if key not in passed:
            raise ValueError(f"no reference image for seed {key[0]}, prompt {key[1]}")
        differences.setdefault(r["category"], []).append(float(r["passed"]) - float(passed[key]))
    return _category_means(differences)


def summarize(records: list[dict], seeds) -> dict:
    """Scores from per-image records: per category the pass rate, overall their mean (as GenEval), with the
    overall's standard error."""
    passed = {}
    for cat in S.TEMPLATES:
        rs = [float(r["passed"]) for r in records if r["category"] == cat]
        if rs:
            passed[cat] = rs
    overall, stderr = _category_means(passed)
    return {
        "version": VERSION,
        "overall": overall,
        "overall_stderr": stderr,
        "categories": {cat: sum(rs) / len(rs) for cat, rs in passed.items()},
        "n_images": len(records),
        "seeds": list(seeds),
        "records": sorted(records, key=lambda r: (r["seed"], r["index"])),
    }


def captioned_grid(images, captions, cols: int = 8, marks=None, scale: int = 2):
    """A PNG-ready grid: each image enlarged, its caption under it, and a pass/fail frame if marked."""
    from PIL import Image, ImageDraw

    cell = S.IMAGE_SIZE * scale
    pad, text_h = 6, 40
    rows = math.ceil(len(images) / cols)
    W, H = cols * (cell + 2 * pad), rows * (cell + 2 * pad + text_h)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x, y = c * (cell + 2 * pad) + pad, r * (cell + 2 * pad + text_h) + pad
        tile = Image.fromarray(to_array(img).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (x, y))
        if marks is not None:
            color = (20, 160, 40) if marks[i] else (210, 30, 30)
            draw.rectangle([x - 4, y - 4, x + cell + 3, y + cell + 3], outline=color, width=3)
        for j, line in enumerate(textwrap.wrap(cap, width=max(8, cell // 6))[:3]):
            draw.text((x, y + cell + 4 + 11 * j), line, fill="black")
    return canvas


def pipeline_generate_fn(pipe, num_inference_steps: int = 20, guidance_scale: float = 3.5):
    """generate_fn for a FluxPipeline at the demo model's size."""
    from ..pipeline import generate

    def generate_images(prompts, seeds):
        return generate(pipe, prompts, seeds, steps=num_inference_steps, guidance=guidance_scale,
                        height=S.IMAGE_SIZE, width=S.IMAGE_SIZE, progress=False)

    return generate_images


def ground_truth_generate_fn():
    """generate_fn that renders the scene each prompt describes: measures the detector itself."""

    def generate(prompts, seeds):
        return [S.to_uint8(S.render(S.scenes_for_captions([p], seed=s)))[0]
                for p, s in zip(prompts, seeds)]

    return generate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitflux.eval.shapeeval", description="Score a text-to-image "
                                "pipeline on ShapeEval (GenEval's categories on the demo model's scenes).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers FluxPipeline folder (e.g. the demo model)")
    src.add_argument("--ground-truth", action="store_true", help="score rendered scenes (detector accuracy)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--per-category", type=int, default=PER_CATEGORY)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    items = prompt_set(per_category=a.per_category)
    if a.ground_truth:
        fn = ground_truth_generate_fn()
    else:
        from bitflux.pipeline import pipeline_from_folder, text_to_image_class

        pipe = pipeline_from_folder(Path(a.model), torch.float32, {}, text_to_image_class()).to(a.device)
        pipe.set_progress_bar_config(disable=True)
        fn = pipeline_generate_fn(pipe, num_inference_steps=a.steps, guidance_scale=a.guidance)
    res = evaluate(fn, items=items, seeds=tuple(a.seeds), batch_size=a.batch_size, out_dir=a.out)
    print(json.dumps({"version": res["version"], "overall": round(res["overall"], 4),
                      "categories": {k: round(v, 4) for k, v in res["categories"].items()},
                      "n_images": res["n_images"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
