"""Train a tiny style LoRA on the embedded demo model: the same captions, drawn in a style the model never
saw (every object in black ink), so that the LoRA's effect is measurable on any image.

    python -m bitflux.interop.train_lora --out style.safetensors [--ternary] [--steps N] [--rank R]
                                         [--style ink] [--batch B] [--scenes N] [--lr LR] [--seed S]

Rectified flow as the demo model was trained (x_t = (1 - s) x0 + s noise, target noise - x0, s logit-normal)
on the full-precision transformer, or with --ternary on the shipped calibrated ternary one (the LoRA then
learns against the activations it will meet there; a ternary layer passes its input's gradient as a dense
one would, `kernels.reference`); text encoders, VAE and the base weights are frozen, only rank-R pairs on
the transformer's block linears (the layers ternary quantization replaces) learn. The pairs run through
bitflux's own LoraAdapter (fp32 branches, gradients on), and are saved with PEFT/diffusers names
(`transformer.<module>.lora_A.weight`, `.lora_B.weight`, `.alpha`), atomically, as safetensors.

Why a colour style and not a background one: the demo VAE decodes every background to its light grey (a
dark or tinted background does not survive its round trip), so a style must live in what it can draw.
Captions come from the templates that name no colour, so the ink never contradicts a caption (a prompt
that names a colour asks the LoRA for what it was not trained on).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import write_atomic
from ..config import FLOAT32_MAX, TernaryConfig
from ..demo import scenes as S
from ..demo.train import Denoiser, flow_noised, lr_at, pack
from ..errors import BitfluxError
from ..surgery import is_slot
from .lora import LoraAdapter, LoraBranch

# Style -> the palette colour every object is drawn in.
STYLES = {"ink": "black"}
# Training captions come from the templates that name no colour, at their demo training weights.
_TEMPLATES = ("single_object", "two_object", "counting")


def styled_scenes(n: int, style: str, generator: torch.Generator) -> S.SceneBatch:
    """n seeded scenes of the colour-free templates, every object in the style's colour."""
    weights = tuple(w if t in _TEMPLATES else 0.0 for t, w in zip(S.TEMPLATES, S.TRAIN_WEIGHTS))
    scenes = S.sample_scenes(n, generator, weights=weights)
    ink = S.COLOR_NAMES.index(STYLES[style])
    return dataclasses.replace(scenes, color=torch.full_like(scenes.color, ink))


def is_styled(image, style: str = "ink") -> bool:
    """The style's success criterion: ShapeEval's detector finds objects, all of the style's colour."""
    from ..eval.shapeeval import detect

    colors = {obj["color"] for obj in detect(image)}
    return colors == {STYLES[style]}


def new_adapter(transformer, rank: int, seed: int) -> LoraAdapter:
    """Trainable rank-`rank` fp32 pairs on the block linears: A as PEFT initialises it (Kaiming uniform),
    B zero, so the LoRA starts as the identity."""
    generator = torch.Generator().manual_seed(seed)
    branches = {}
    for name, layer in transformer.named_modules():
        if not is_slot(name, layer, TernaryConfig()):
            continue
        bound = 1 / math.sqrt(layer.in_features)
        down = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
        branches[name] = LoraBranch(down, torch.zeros(layer.out_features, rank), alpha=rank, dtype=torch.float32)
    return LoraAdapter(transformer, branches).requires_grad_(True)


def lora_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """PEFT/diffusers key naming, as `load_lora` and diffusers' `load_lora_weights` read it."""
    state = {}
    for name, branch in adapter.items():
        rank = branch.down.shape[0]
        state[f"transformer.{name}.lora_A.weight"] = branch.down.detach().contiguous()
        state[f"transformer.{name}.lora_B.weight"] = branch.up.detach().contiguous()
        state[f"transformer.{name}.alpha"] = torch.tensor(branch.scale * rank)
    return state


def save_lora(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors atomically (a temporary name in the same folder, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise BitfluxError(f"{path.parent}: no such folder")
    return write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


class FlowBatches:
    """Seeded rectified-flow batches (text ids, x_t, s, target) of styled scenes, as the demo was trained.
    The scenes are rendered and VAE-encoded once into a pool (encoding is most of a step's cost on a CPU);
    each batch draws scenes from it with fresh noise and noise levels."""

    @torch.no_grad()
    def __init__(self, pipe, style: str, scenes: int, batch: int, seed: int):
        vae, self.batch = pipe.vae, batch
        self.gen = torch.Generator().manual_seed(seed)
        latents, ids = [], []
        for start in range(0, scenes, 64):
            chunk = styled_scenes(min(64, scenes - start), style, self.gen)
            z = vae.encode(S.render(chunk) * 2 - 1).latent_dist.sample(generator=self.gen)
            latents.append(pack((z - vae.config.shift_factor) * vae.config.scaling_factor))
            ids.append(pipe.tokenizer(chunk.captions(), padding="max_length", truncation=True,
                                      max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids)
        self.latents, self.ids = torch.cat(latents), torch.cat(ids)

    def __call__(self):
        pick = torch.randint(0, len(self.latents), (self.batch,), generator=self.gen)
        x0 = self.latents[pick]
        sigma, noise, xt = flow_noised(x0, self.gen)
        return self.ids[pick], xt, sigma, noise - x0


def check_settings(steps: int, rank: int, batch: int, scenes: int, lr: float, guidance: float) -> None:
    if min(steps, rank, batch, scenes) < 1:
        raise BitfluxError("--steps, --rank, --batch and --scenes must be at least 1")
    if not 0 < lr <= FLOAT32_MAX or not abs(guidance) <= FLOAT32_MAX:
        raise BitfluxError(f"--lr must be a positive number and --guidance a finite one (float32's), got {lr} and "
                           f"{guidance}")


def train(pipe, steps: int = 300, rank: int = 4, style: str = "ink", batch: int = 32,
          scenes: int = 512, lr: float = 2e-3, guidance: float = 3.5, seed: int = 0,
          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train a style LoRA on a FluxPipeline, full precision or ternary (left as it was). Returns the
    PEFT-named state dict and a log: per-step losses, and the loss on one fixed held-out batch before and
    after."""
    from diffusers import FluxPipeline

    if style not in STYLES:
        raise BitfluxError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    check_settings(steps, rank, batch, scenes, lr, guidance)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.eval().requires_grad_(False)
    torch.manual_seed(seed)
    model = Denoiser(pipe.text_encoder, pipe.text_encoder_2, pipe.transformer)
    adapter = new_adapter(pipe.transformer, rank, seed)
    side = S.IMAGE_SIZE // 16  # latent 8x8, packed 2x2: a 4x4 token grid
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(pipe.tokenizer.model_max_length, 3)
    g = torch.full((batch,), guidance)

    def loss_on(ids, xt, sigma, target):
        return F.mse_loss(model(ids, xt, sigma, g, img_ids, txt_ids).float(), target)

    held_out = FlowBatches(pipe, style, batch, batch, seed + 1)()
    batches = FlowBatches(pipe, style, scenes, batch, seed)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    try:
        with torch.no_grad():
            before = loss_on(*held_out).item()
        losses = []
        for step in tqdm(range(steps), desc="LoRA", unit="step", disable=not progress, mininterval=1.0):
            for group in opt.param_groups:
                group["lr"] = lr_at(lr, step, step / steps, warmup=min(20, steps))
            loss = loss_on(*batches())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            after = loss_on(*held_out).item()
    finally:
        adapter.remove()
    log = {"style": style, "steps": steps, "rank": rank, "batch": batch, "scenes": scenes, "lr": lr,
           "guidance": guidance, "seed": seed, "held_out_loss_before": before, "held_out_loss_after": after,
           "losses": losses}
    return lora_state_dict(adapter), log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitflux.interop.train_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output .safetensors")
    p.add_argument("--ternary", action="store_true",
                   help="train on the shipped calibrated ternary demo transformer instead of full precision")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--style", choices=sorted(STYLES), default="ink")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--scenes", type=int, default=512, help="styled scenes rendered and encoded once")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--guidance", type=float, default=3.5,
                   help="guidance embedding value while training (as diffusers' FLUX LoRA trainer)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from ..demo import demo_model_path
    from ..pipeline import demo_ternary_path, load_pipeline

    try:
        if a.out.suffix != ".safetensors":
            raise BitfluxError(f"{a.out}: output must be a .safetensors file")
        if not a.out.parent.is_dir():  # before the training, not after it
            raise BitfluxError(f"{a.out.parent}: no such folder")
        check_settings(a.steps, a.rank, a.batch, a.scenes, a.lr, a.guidance)  # before the pipeline loads
        source = demo_ternary_path() if a.ternary else demo_model_path()
        pipe = load_pipeline(source, text_encoders="whole")  # it encodes at every step: not streamed
        state, log = train(pipe, a.steps, a.rank, a.style, a.batch, a.scenes, a.lr, a.guidance, a.seed)
        if not all(torch.isfinite(tensor).all() for tensor in state.values()):  # not written as a LoRA
            raise BitfluxError(f"the training diverged (its weights hold NaN or infinities): try a lower --lr than "
                               f"{a.lr}")
        log["ternary"] = a.ternary
        meta = {k: str(v) for k, v in log.items() if k != "losses"}
        save_lora(state, a.out, metadata={"bitflux_lora": "style", **meta})
    except BitfluxError as exc:
        print(f"bitflux: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {len(state) // 3} layers, rank {a.rank}; held-out loss "
          f"{log['held_out_loss_before']:.4f} -> {log['held_out_loss_after']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
