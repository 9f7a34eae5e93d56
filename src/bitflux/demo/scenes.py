"""Procedural scenes: seeded (image, caption) pairs of flat shapes on a plain background.

Everything a batch needs is drawn as tensors on one device and rendered there with masks computed from
pixel coordinates, so a GPU trains without waiting on data. Captions come from a small grammar that
covers GenEval's six categories; `parse_caption` inverts it, which is what ShapeEval scores against.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 64
MAX_OBJECTS = 4

SHAPES = ("circle", "square", "triangle")
# Hues far apart and black, so that a colour survives a VAE round trip and nearest-colour segmentation.
COLORS = {
    "red": (220, 40, 40),
    "yellow": (240, 200, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
    "black": (30, 30, 30),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND = (238, 238, 238)
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left", "right", "above", "below")  # index + 1 is the relation code; 0 means none
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}

# Caption templates. The first six are GenEval's categories (ShapeEval scores them); count_color is
# extra grammar for training and calibration.
TEMPLATES = ("single_object", "colors", "two_object", "counting", "position", "color_attr", "count_color")
CATEGORIES = TEMPLATES[:6]
TRAIN_WEIGHTS = (0.08, 0.14, 0.14, 0.16, 0.22, 0.16, 0.10)

# Object side length in pixels by number of objects: large enough to keep its shape through an 8x VAE.
_SIZE_RANGE = {1: (22, 32), 2: (18, 26), 3: (16, 22), 4: (16, 20)}
_GAP = 3.0  # pixels between bounding boxes, so objects of one colour stay separate components
_CANDIDATES = 64  # placements tried per scene in parallel; the first valid one wins


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str | None  # None: the caption does not name it


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: its category, the objects named, how many, and a relation."""

    category: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None  # of objects[0] relative to objects[1]


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words = ["a", "and", "the", "of", "to", "left", "right", "above", "below"]
    words += list(NUMBERS.values()) + list(COLOR_NAMES) + list(SHAPES) + [s + "s" for s in SHAPES]
    return words


def caption_of(spec: CaptionSpec) -> str:
    o = spec.objects
    if spec.category in ("single_object", "colors"):
        return " ".join(["a"] + ([o[0].color] if o[0].color else []) + [o[0].shape])
    if spec.category == "two_object":
        return f"a {o[0].shape} and a {o[1].shape}"
    if spec.category in ("counting", "count_color"):
        color = f"{o[0].color} " if o[0].color else ""
        return f"{NUMBERS[spec.count]} {color}{o[0].shape}s"
    if spec.category == "position":
        return f"a {o[0].color} {o[0].shape} {RELATION_WORDS[spec.relation]} a {o[1].color} {o[1].shape}"
    if spec.category == "color_attr":
        return f"a {o[0].color} {o[0].shape} and a {o[1].color} {o[1].shape}"
    raise ValueError(f"unknown category {spec.category!r}")


def parse_caption(caption: str) -> CaptionSpec:
    """Invert `caption_of`. Raises ValueError for text outside the grammar."""
    w = caption.lower().split()

    def obj(words: list[str]) -> ObjectSpec:
        if len(words) == 2 and words[0] == "a" and words[1] in SHAPES:
            return ObjectSpec(words[1], None)
        if len(words) == 3 and words[0] == "a" and words[1] in COLORS and words[2] in SHAPES:
            return ObjectSpec(words[2], words[1])
        raise ValueError(f"not in the caption grammar: {caption!r}")

    numbers = {v: k for k, v in NUMBERS.items()}
    if w and w[0] in numbers:
        color = w[1] if len(w) == 3 and w[1] in COLORS else None
        plural = w[-1]
        if len(w) in (2, 3) and plural.endswith("s") and plural[:-1] in SHAPES and (len(w) == 2 or color):
            cat = "count_color" if color else "counting"
            return CaptionSpec(cat, (ObjectSpec(plural[:-1], color),), count=numbers[w[0]])
        raise ValueError(f"not in the caption grammar: {caption!r}")
    text = " ".join(w)
    for rel, phrase in RELATION_WORDS.items():
        marker = f" {phrase} "
        if marker in text:
            left, right = text.split(marker, 1)
            a, b = obj(left.split()), obj(right.split())
            if a.color is None or b.color is None:
                raise ValueError(f"not in the caption grammar: {caption!r}")
            return CaptionSpec("position", (a, b), count=2, relation=rel)
    if " and " in text:
        left, right = text.split(" and ", 1)
        a, b = obj(left.split()), obj(right.split())
        if a.color is None and b.color is None:
            return CaptionSpec("two_object", (a, b), count=2)
        if a.color is not None and b.color is not None:
            return CaptionSpec("color_attr", (a, b), count=2)
        raise ValueError(f"not in the caption grammar: {caption!r}")
    o = obj(w)
    return CaptionSpec("colors" if o.color else "single_object", (o,), count=1)


# ---------------------------------------------------------------------------------------------------
# Batched scene tensors
# ---------------------------------------------------------------------------------------------------


@dataclass
class SceneBatch:
    """B scenes as tensors on one device. Slots past `count` are inactive."""

    template: torch.Tensor  # (B,) index into TEMPLATES
    count: torch.Tensor  # (B,) number of objects
    shape: torch.Tensor  # (B, 4) index into SHAPES
    color: torch.Tensor  # (B, 4) index into COLOR_NAMES
    relation: torch.Tensor  # (B,) 0 none, else 1 + index into RELATIONS
    center: torch.Tensor  # (B, 4, 2) x, y in pixels (float)
    size: torch.Tensor  # (B, 4) side length in pixels (float)

    def __len__(self) -> int:
        return self.template.shape[0]

    @property
    def active(self) -> torch.Tensor:
        return torch.arange(MAX_OBJECTS, device=self.count.device)[None, :] < self.count[:, None]

    def specs(self) -> list[CaptionSpec]:
        return specs_of(self.template, self.count, self.shape, self.color, self.relation)

    def captions(self) -> list[str]:
        return [caption_of(s) for s in self.specs()]

    def objects(self, i: int) -> list[dict]:
        """Ground truth of scene i: shape, colour, centre and size of each object."""
        out = []
        for j in range(int(self.count[i])):
            out.append(
                {
                    "shape": SHAPES[int(self.shape[i, j])],
                    "color": COLOR_NAMES[int(self.color[i, j])],
                    "center": [float(v) for v in self.center[i, j]],
                    "size": float(self.size[i, j]),
                }
            )
        return out


def specs_of(template, count, shape, color, relation) -> list[CaptionSpec]:
    """CaptionSpecs of scene tensors (as `sample_specs` returns them)."""
    t, n, s, c, r = (x.tolist() for x in (template, count, shape, color, relation))
    out = []
    for i in range(len(t)):
        cat = TEMPLATES[t[i]]
        named_colour = cat in ("colors", "position", "color_attr", "count_color")
        k = 2 if cat in ("two_object", "position", "color_attr") else 1
        objs = tuple(ObjectSpec(SHAPES[s[i][j]], COLOR_NAMES[c[i][j]] if named_colour else None) for j in range(k))
        out.append(CaptionSpec(cat, objs, count=n[i], relation=RELATIONS[r[i] - 1] if r[i] else None))
    return out


def _randint(gen: torch.Generator, low: int, high: int, shape, device) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen, device=device)


def _uniform(gen: torch.Generator, shape, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device)


def sample_specs(n: int, gen: torch.Generator, device, weights=TRAIN_WEIGHTS):
    """Template, count, shapes, colours and relation for n scenes, drawn by the caption grammar."""
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    template = torch.multinomial(w, n, replacement=True, generator=gen)
    shape = _randint(gen, 0, len(SHAPES), (n, MAX_OBJECTS), device)
    color = _randint(gen, 0, len(COLORS), (n, MAX_OBJECTS), device)
    return _apply_template_rules(template, shape, color, gen, device)


def _apply_template_rules(template, shape, color, gen, device):
    n = template.shape[0]
    T = {name: i for i, name in enumerate(TEMPLATES)}
    is_two = (template == T["two_object"]) | (template == T["position"]) | (template == T["color_attr"])
    is_count = (template == T["counting"]) | (template == T["count_color"])
    count = torch.where(is_two, 2, 1)
    count = torch.where(is_count, _randint(gen, 2, 5, (n,), device), count)
    # Two named objects differ: by shape where the caption names only shapes, by colour where it names both.
    s2 = (shape[:, 0] + _randint(gen, 1, len(SHAPES), (n,), device)) % len(SHAPES)
    c2 = (color[:, 0] + _randint(gen, 1, len(COLORS), (n,), device)) % len(COLORS)
    need_shape = (template == T["two_object"]) | (template == T["color_attr"])
    need_color = (template == T["position"]) | (template == T["color_attr"])
    shape = shape.clone()
    color = color.clone()
    shape[:, 1] = torch.where(need_shape, s2, shape[:, 1])
    color[:, 1] = torch.where(need_color, c2, color[:, 1])
    # Counted objects share the shape; count_color objects share the colour too.
    shape = torch.where(is_count[:, None], shape[:, :1].expand(-1, MAX_OBJECTS), shape)
    color = torch.where((template == T["count_color"])[:, None], color[:, :1].expand(-1, MAX_OBJECTS), color)
    relation = torch.where(template == T["position"], _randint(gen, 1, 5, (n,), device), 0)
    return template, count, shape, color, relation


def relation_holds(center_a, size_a, center_b, size_b, relation, strict: float = 0.5):
    """GenEval's relative-position rule on bounding-box centres (y grows downwards), vectorized.

    relation: 1 + index into RELATIONS. `strict` 0.5 is GenEval's; the scene sampler asks for more so
    that a rendered scene is unambiguous.
    """
    offset = center_a - center_b  # (..., 2)
    dims = (size_a + size_b)[..., None].expand_as(offset)
    norm = offset.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    revised = (offset.abs() - 0.1 * dims).clamp_min(0) * offset.sign() / norm
    dx, dy = revised[..., 0], revised[..., 1]
    relation = relation.long().expand_as(dx)
    table = torch.stack([dx < -strict, dx > strict, dy < -strict, dy > strict], -1)
    return table.gather(-1, (relation - 1).clamp_min(0)[..., None]).squeeze(-1) | (relation == 0)


def layout(template, count, shape, color, relation, gen, device) -> SceneBatch:
    """Place objects without overlap (and with the asked relation) by trying candidates in parallel."""
    n = count.shape[0]
    lo = torch.tensor([0, *[_SIZE_RANGE[k][0] for k in range(1, 5)]], device=device, dtype=torch.float32)
    hi = torch.tensor([0, *[_SIZE_RANGE[k][1] for k in range(1, 5)]], device=device, dtype=torch.float32)
    K = _CANDIDATES
    u = _uniform(gen, (n, K, MAX_OBJECTS), device)
    size = (lo[count][:, None, None] + u * (hi - lo)[count][:, None, None]).round()
    margin = size / 2 + 1
    pos = margin[..., None] + _uniform(gen, (n, K, MAX_OBJECTS, 2), device) * (IMAGE_SIZE - 2 * margin)[..., None]
    # The second half of the candidates are jittered 2x2-grid placements, which crowded scenes need.
    q = IMAGE_SIZE / 4
    cells = torch.tensor([[q, q], [3 * q, q], [q, 3 * q], [3 * q, 3 * q]], device=device)
    perm = _uniform(gen, (n, K // 2, MAX_OBJECTS), device).argsort(-1)
    slack = (2 * q - size[:, K // 2 :] - _GAP).clamp_min(0)[..., None] / 2
    jitter = (_uniform(gen, (n, K // 2, MAX_OBJECTS, 2), device) * 2 - 1) * slack
    pos[:, K // 2 :] = cells[perm] + jitter
    active = torch.arange(MAX_OBJECTS, device=device)[None, :] < count[:, None]  # (n, 4)
    d = (pos[:, :, :, None, :] - pos[:, :, None, :, :]).abs().amax(-1)  # (n, K, 4, 4) Chebyshev
    need = (size[:, :, :, None] + size[:, :, None, :]) / 2 + _GAP
    pair_active = active[:, None, :, None] & active[:, None, None, :]
    eye = torch.eye(MAX_OBJECTS, dtype=torch.bool, device=device)
    clash = ((d < need) & pair_active & ~eye).any(-1).any(-1)
    rel_ok = relation_holds(pos[:, :, 0], size[:, :, 0], pos[:, :, 1], size[:, :, 1], relation[:, None], strict=0.7)
    ok = ~clash & rel_ok
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)
    idx = first.clamp_min(0)
    center = pos[torch.arange(n, device=device), idx]
    size_sel = size[torch.arange(n, device=device), idx]
    # No valid candidate (rare): a fixed grid layout that satisfies every template. Computed always, so
    # that no host-device synchronisation stalls a GPU.
    failed = first < 0
    grid = torch.tensor([[16.0, 16.0], [48.0, 16.0], [16.0, 48.0], [48.0, 48.0]], device=device)
    rel_grid = torch.tensor(
        [[[16.0, 16.0], [48.0, 16.0]], [[16.0, 32.0], [48.0, 32.0]], [[48.0, 32.0], [16.0, 32.0]],
         [[32.0, 16.0], [32.0, 48.0]], [[32.0, 48.0], [32.0, 16.0]]],
        device=device,
    )
    fallback = torch.cat([rel_grid[relation], grid[None, 2:].expand(n, -1, -1)], 1)
    center = torch.where(failed[:, None, None], fallback, center)
    size_sel = torch.where(failed[:, None], size_sel.clamp_max(22.0), size_sel)
    return SceneBatch(template, count, shape, color, relation, center, size_sel)


def sample_scenes(n: int, seed: int | torch.Generator = 0, device="cpu", weights=TRAIN_WEIGHTS) -> SceneBatch:
    """n random scenes; the same seed on the same device gives the same scenes."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=device).manual_seed(int(seed))
    spec = sample_specs(n, gen, device, weights)
    return layout(*spec, gen, device)


def scenes_for_captions(captions: list[str], seed: int = 0, device="cpu") -> SceneBatch:
    """Scenes that match given captions (unnamed colours drawn at random), e.g. ShapeEval ground truth."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    n = len(captions)
    shape = _randint(gen, 0, len(SHAPES), (n, MAX_OBJECTS), device)
    color = _randint(gen, 0, len(COLORS), (n, MAX_OBJECTS), device)
    template = torch.zeros(n, dtype=torch.long, device=device)
    count = torch.ones(n, dtype=torch.long, device=device)
    relation = torch.zeros(n, dtype=torch.long, device=device)
    for i, cap in enumerate(captions):
        spec = parse_caption(cap)
        template[i] = TEMPLATES.index(spec.category)
        count[i] = spec.count
        relation[i] = RELATIONS.index(spec.relation) + 1 if spec.relation else 0
        for j, o in enumerate(spec.objects):
            shape[i, j] = SHAPES.index(o.shape)
            if o.color:
                color[i, j] = COLOR_NAMES.index(o.color)
        if spec.category in ("counting", "count_color"):
            shape[i, :] = shape[i, 0]
            if spec.category == "count_color":
                color[i, :] = color[i, 0]
    return layout(template, count, shape, color, relation, gen, device)


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def _coverage(shape: torch.Tensor, center: torch.Tensor, size: torch.Tensor, res: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of each object, (B, 4, res, res), from signed distances."""
    scale = res / IMAGE_SIZE
    coords = (torch.arange(res, device=center.device, dtype=torch.float32) + 0.5) / scale
    x = coords[None, None, None, :]
    y = coords[None, None, :, None]
    cx, cy = center[..., 0, None, None], center[..., 1, None, None]
    h = (size / 2)[..., None, None]
    dx, dy = x - cx, y - cy
    circle = h - torch.sqrt(dx * dx + dy * dy)
    square = h - torch.maximum(dx.abs(), dy.abs())
    # Upward isosceles triangle filling the box: apex (cx, cy - h), base y = cy + h, base half-width h.
    edge = ((dy + h) / 2 - dx.abs()) * (2 / math.sqrt(5))
    triangle = torch.minimum(h - dy, edge)
    sd = torch.where(shape[..., None, None] == 0, circle, torch.where(shape[..., None, None] == 1, square, triangle))
    return (sd * scale + 0.5).clamp(0, 1)


def render(scenes: SceneBatch, res: int = IMAGE_SIZE) -> torch.Tensor:
    """Images (B, 3, res, res) in [0, 1], on the scenes' device."""
    cov = _coverage(scenes.shape, scenes.center, scenes.size, res) * scenes.active[..., None, None]
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32, device=cov.device) / 255
    rgb = palette[scenes.color]  # (B, 4, 3)
    img = torch.tensor(BACKGROUND, dtype=torch.float32, device=cov.device).div(255)[None, :, None, None]
    img = img.expand(len(scenes), 3, res, res)
    for j in range(MAX_OBJECTS):
        a = cov[:, j, None]
        img = img * (1 - a) + rgb[:, j, :, None, None] * a
    return img


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# Prompt lists
# ---------------------------------------------------------------------------------------------------


def all_captions() -> list[str]:
    """Every caption of the grammar, sorted."""
    caps = set()
    for s in SHAPES:
        caps.add(caption_of(CaptionSpec("single_object", (ObjectSpec(s, None),))))
        for k in NUMBERS:
            caps.add(caption_of(CaptionSpec("counting", (ObjectSpec(s, None),), count=k)))
        for c in COLOR_NAMES:
            caps.add(caption_of(CaptionSpec("colors", (ObjectSpec(s, c),))))
            for k in NUMBERS:
                caps.add(caption_of(CaptionSpec("count_color", (ObjectSpec(s, c),), count=k)))
        for s2 in SHAPES:
            if s2 != s:
                caps.add(caption_of(CaptionSpec("two_object", (ObjectSpec(s, None), ObjectSpec(s2, None)), 2)))
            for c in COLOR_NAMES:
                for c2 in COLOR_NAMES:
                    if c2 == c:
                        continue
                    a, b = ObjectSpec(s, c), ObjectSpec(s2, c2)
                    for r in RELATIONS:
                        caps.add(caption_of(CaptionSpec("position", (a, b), 2, r)))
                    if s2 != s:
                        caps.add(caption_of(CaptionSpec("color_attr", (a, b), 2)))
    return sorted(caps)


def calibration_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts from the caption grammar, none of them in ShapeEval's prompt set, drawn round-robin over
    the caption categories that have such prompts (seeded; a category repeats only once exhausted).

    ShapeEval takes every single-object, colour, two-object and counting caption, so calibration gets
    position, attribute-binding and coloured-counting captions, which name the same shapes and colours.
    """
    from bitflux.eval.shapeeval import prompt_set

    held_out = {item.prompt for item in prompt_set()}
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for cap in all_captions():
        if cap not in held_out:
            pools.setdefault(parse_caption(cap).category, []).append(cap)
    queues = {cat: [] for cat in sorted(pools)}
    out: list[str] = []
    while len(out) < n:
        for cat, queue in queues.items():
            if not queue:
                queue += rng.sample(pools[cat], len(pools[cat]))
            out.append(queue.pop())
    return out[:n]
