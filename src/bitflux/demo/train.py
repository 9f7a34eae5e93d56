"""Train the demo model: VAE first, then text encoders + FLUX transformer, all on rendered scenes.

    python -m bitflux.demo.train --out DIR [--device cuda|cpu] [--minutes M] [--stage all|vae|transformer]
                                 [--resume] [--seed S] [--eval]

Each stage trains for a share of the wall-clock budget (or --vae-steps / --steps, which repeat exactly
for a seed on one device), checkpoints to DIR/ckpt/
every --ckpt-every seconds and at its end, and `--resume` continues a stage where its checkpoint left
off. The result is a diffusers FluxPipeline folder DIR/model/ (bf16 safetensors), DIR/loss.png,
DIR/samples.png and DIR/train_log.json (and DIR/shapeeval.json with --eval).

Recipe: the transformer is trained with rectified flow (x_t = (1 - s) x0 + s noise, target noise - x0,
s ~ logit-normal) and 10 % of captions dropped; for the last --distill-share of its time the guidance
embedding is distilled FLUX.1-dev style: a frozen copy of the EMA model run with and without the
caption gives the classifier-free-guided velocity v_u + g (v_c - v_u), which the student learns to
produce in one pass given g. Images are rendered on the training device (see scenes.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import scenes as S
from .build import DemoConfig, assemble_pipeline, build_text_encoders, build_transformer, build_vae
from .build import param_counts, save_pipeline
from ..checkpoint import write_atomic, write_text_atomic
from ..errors import BitfluxError
from .text import build_tokenizer

SAMPLE_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a triangle",
    "a circle and a square",
    "a square and a triangle",
    "two circles",
    "three squares",
    "four triangles",
    "a yellow square to the left of a purple circle",
    "a black triangle above a red square",
    "a blue circle below a green triangle",
    "a blue circle and a red square",
    "a purple triangle and a yellow circle",
    "three green triangles",
    "two black squares",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bitflux.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget (default 5 cuda, 20 cpu)")
    p.add_argument("--steps", type=int, default=None, help="transformer steps instead of a time share")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps instead of a time share")
    p.add_argument("--stage", choices=("all", "vae", "transformer"), default="all")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-share", type=float, default=0.2, help="share of the budget for the VAE (stage all)")
    p.add_argument("--distill-share", type=float, default=0.3, help="final share of transformer time for guidance distillation")
    p.add_argument("--batch", type=int, default=None, help="transformer batch (default 512 cuda, 32 cpu)")
    p.add_argument("--vae-batch", type=int, default=None, help="VAE batch (default 256 cuda, 32 cpu)")
    p.add_argument("--lr", type=float, default=None, help="transformer learning rate (default 5e-4 cuda, 3e-4 cpu)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default 0.999 cuda, 0.99 cpu)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--eval", action="store_true", help="run ShapeEval on the final model")
    p.add_argument("--eval-guidance", type=float, default=3.5)
    p.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the sample grid and ShapeEval")
    p.add_argument("--small", action="store_true", help="a smaller model for quick CPU checks")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.minutes = a.minutes if a.minutes is not None else (5.0 if cuda else 20.0)
    a.batch = a.batch or (512 if cuda else 32)
    a.vae_batch = a.vae_batch or (256 if cuda else 32)
    a.lr = a.lr or (5e-4 if cuda else 3e-4)
    a.ema = a.ema if a.ema is not None else (0.999 if cuda else 0.99)
    return a


def demo_config(small: bool) -> DemoConfig:
    if small:
        return DemoConfig(width_heads=2, double_blocks=1, single_blocks=2, vae_channels=(32, 32, 64, 64))
    return DemoConfig()


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


class Clock:
    """The budget of one stage, carried across resumes: wall-clock seconds, or a step count when given
    (for runs that must repeat exactly)."""

    def __init__(self, seconds: float, already: float = 0.0, steps: int | None = None):
        self.seconds, self.already, self.steps, self.start = seconds, already, steps, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.already + time.perf_counter() - self.start

    def fraction(self, step: int) -> float:
        if self.steps:
            return min(1.0, step / self.steps)
        return min(1.0, self.elapsed / max(self.seconds, 1e-9))

    def done(self, step: int) -> bool:
        return step >= self.steps if self.steps else self.elapsed >= self.seconds


def lr_at(base: float, step: int, frac: float, warmup: int = 100) -> float:
    """Linear warm-up, constant, then linear decay to 10 % over the last 30 % of the time budget."""
    w = min(1.0, (step + 1) / warmup)
    d = 1.0 if frac < 0.7 else 1.0 - 0.9 * (frac - 0.7) / 0.3
    return base * w * d


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for p, s in zip([p for m in modules for p in m.parameters()], self.shadow):
            p.copy_(s)


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def bar(clock: Clock, desc: str, step: int):
    if clock.steps:
        return tqdm(total=clock.steps, initial=step, desc=desc, unit="step", mininterval=2.0)
    return tqdm(total=int(clock.seconds), initial=int(clock.already), desc=desc, unit="s", mininterval=2.0)


def tick(pbar, clock: Clock, step: int, **postfix) -> None:
    pbar.update(max(0, (step if clock.steps else int(clock.elapsed)) - pbar.n))
    if postfix:
        pbar.set_postfix(postfix, refresh=False)


# ---------------------------------------------------------------------------------------------------
# Stage 1: VAE
# ---------------------------------------------------------------------------------------------------


class Checkpoints:
    """Saves a stage's state every `every` seconds of wall time, so an interrupted run resumes near there."""

    def __init__(self, state: dict, clock, save, every: float):
        self.state, self.clock, self.save, self.every = state, clock, save, every
        self.last = time.perf_counter()

    def maybe_save(self, step: int) -> None:
        if time.perf_counter() - self.last > self.every:
            self.state.update(step=step, elapsed=self.clock.elapsed)
            self.save(False)
            self.last = time.perf_counter()


def train_vae(args, cfg: DemoConfig, device: torch.device, seconds: float) -> dict:
    ckpt_path = args.out / "ckpt" / "vae.pt"
    torch.manual_seed(args.seed)
    vae = build_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    state = {"step": 0, "elapsed": 0.0, "losses": [], "done": False}
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"].cpu())
        state = ck["state"]
        if state["done"]:
            print(f"VAE: finished earlier ({state['step']} steps)")
            return {"vae": vae.cpu(), **state}

    def save(done: bool):
        state["done"] = done
        atomic_save({"vae": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "state": state,
                     "config": cfg.to_dict()}, ckpt_path)

    clock = Clock(seconds, state["elapsed"], args.vae_steps)
    checkpoints = Checkpoints(state, clock, save, args.ckpt_every)
    step = state["step"]
    pbar = bar(clock, "VAE", step)
    vae.train()
    while not clock.done(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(args.vae_lr, step, clock.fraction(step))
        x = S.render(S.sample_scenes(args.vae_batch, gen, device)) * 2 - 1
        with autocast(device):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=gen)
            rec = vae.decode(z).sample.float()
        kl = post.kl().float().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == 1:
            v = loss.item()
            state["losses"].append((step, round(clock.elapsed, 2), v))
            tick(pbar, clock, step, loss=f"{v:.4f}")
        checkpoints.maybe_save(step)
    pbar.close()
    state.update(step=step, elapsed=clock.elapsed)
    # Latent statistics, which FluxPipeline undoes before decoding: latents / scaling + shift.
    vae.eval()
    with torch.no_grad(), autocast(device):
        zs = torch.cat([vae.encode(S.render(S.sample_scenes(args.vae_batch, gen, device)) * 2 - 1)
                        .latent_dist.sample(generator=gen).float() for _ in range(4)])
    mean, std = float(zs.mean()), float(zs.std())
    vae.register_to_config(shift_factor=round(mean, 5), scaling_factor=round(1.0 / std, 5))
    state.update(shift_factor=mean, scaling_factor=1.0 / std)
    save(True)
    print(f"VAE: {step} steps in {clock.elapsed:.0f} s, loss {state['losses'][-1][2]:.4f}, "
          f"latent mean {mean:.3f} std {std:.3f}")
    return {"vae": vae.cpu(), **state}


def load_trained_vae(args, cfg, device) -> torch.nn.Module:
    path = args.out / "ckpt" / "vae.pt"
    if not path.exists():
        raise BitfluxError(f"{path}: no VAE checkpoint: run --stage vae (or all) with this --out first")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not ck["state"]["done"]:
        raise BitfluxError("the VAE stage has not finished: run --stage vae (with --resume) first")
    vae = build_vae(cfg)
    vae.load_state_dict(ck["vae"])
    vae.register_to_config(shift_factor=round(ck["state"]["shift_factor"], 5),
                           scaling_factor=round(ck["state"]["scaling_factor"], 5))
    return vae.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Stage 2: text encoders + transformer
# ---------------------------------------------------------------------------------------------------


class Denoiser(torch.nn.Module):
    """Text encoders and transformer as FluxPipeline wires them."""

    def __init__(self, clip, t5, transformer):
        super().__init__()
        self.clip, self.t5, self.transformer = clip, t5, transformer

    def forward(self, ids, x, sigma, guidance, img_ids, txt_ids):
        pooled = self.clip(ids).pooler_output
        seq = self.t5(ids)[0]
        return self.transformer(hidden_states=x, encoder_hidden_states=seq, pooled_projections=pooled,
                                timestep=sigma, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                return_dict=False)[0]


def pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def flow_noised(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow's training input for packed latents x0: (sigma ~ sigmoid(N(0, 1)) a sample, noise,
    x_t = (1 - sigma) x0 + sigma noise); the velocity to learn is noise - x0."""
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen, device=x0.device))
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    return sigma, noise, (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise


def train_transformer(args, cfg: DemoConfig, device: torch.device, seconds: float) -> dict:
    from diffusers import FluxPipeline

    ckpt_path = args.out / "ckpt" / "transformer.pt"
    vae = load_trained_vae(args, cfg, device)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    torch.manual_seed(args.seed)
    clip, t5 = build_text_encoders(cfg)
    model = Denoiser(clip, t5, build_transformer(cfg)).to(device)
    tok = build_tokenizer(cfg.max_text_tokens)
    opt_kw = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99), **opt_kw)
    ema = EMA([model], args.ema)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    spec_gen = torch.Generator().manual_seed(args.seed + 2)
    teacher = None
    state = {"step": 0, "elapsed": 0.0, "losses": [], "done": False, "distill_from_step": None, "ema_start": 0}
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        for s, v in zip(ema.shadow, ck["ema"]):
            s.copy_(v)
        gen.set_state(ck["gen"].cpu())
        spec_gen.set_state(ck["spec_gen"].cpu())
        state = ck["state"]
        if ck.get("teacher") is not None:
            teacher = copy.deepcopy(model).requires_grad_(False).eval()
            teacher.load_state_dict(ck["teacher"])
        if state["done"]:
            print(f"transformer: finished earlier ({state['step']} steps)")
            ema.copy_to([model])
            return {"model": model.cpu(), "vae": vae.cpu(), **state}

    def save(done: bool):
        state["done"] = done
        atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.shadow,
                     "gen": gen.get_state(), "spec_gen": spec_gen.get_state(), "state": state,
                     "config": cfg.to_dict(), "teacher": teacher.state_dict() if teacher is not None else None}, ckpt_path)

    B = args.batch
    hw = cfg.image_size // 8
    img_ids = FluxPipeline._prepare_latent_image_ids(B, hw // 2, hw // 2, device, torch.float32)
    txt_ids = torch.zeros(cfg.max_text_tokens, 3, device=device)
    empty = tok([""] * B, padding="max_length", max_length=cfg.max_text_tokens, truncation=True,
                return_tensors="pt").input_ids.to(device)
    clock = Clock(seconds, state["elapsed"], args.steps)
    checkpoints = Checkpoints(state, clock, save, args.ckpt_every)
    step = state["step"]
    pbar = bar(clock, "transformer", step)
    model.train()
    while not clock.done(step):
        frac = clock.fraction(step)
        distill = frac >= 1.0 - args.distill_share
        if distill and teacher is None:
            # The student starts from the EMA weights, which also become the frozen teacher; the EMA
            # restarts so that the final weights average the distillation phase only.
            ema.copy_to([model])
            teacher = copy.deepcopy(model).requires_grad_(False).eval()
            state["distill_from_step"] = state["ema_start"] = step
        for g in opt.param_groups:
            g["lr"] = lr_at(args.lr, step, frac, warmup=200)
        with torch.no_grad():
            # What to draw and say is decided on the CPU (no device sync for the captions); where to draw
            # it and the pixels on the device.
            spec = S.sample_specs(B, spec_gen, "cpu")
            drop = (torch.rand(B, generator=spec_gen) < args.caption_dropout).tolist()
            caps = ["" if d else S.caption_of(c) for c, d in zip(S.specs_of(*spec), drop)]
            x = S.render(S.layout(*(t.to(device, non_blocking=True) for t in spec), gen, device)) * 2 - 1
            ids = tok(caps, padding="max_length", max_length=cfg.max_text_tokens, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            with autocast(device):
                z = vae.encode(x).latent_dist.sample(generator=gen).float()
            x0 = pack((z - shift) * scale)
            sigma, noise, xt = flow_noised(x0, gen)
            if distill:
                # Guidance scale: 1 a fifth of the time, else uniform in [1, 6].
                g = 1 + 5 * torch.rand(B, generator=gen, device=device)
                g = torch.where(torch.rand(B, generator=gen, device=device) < 0.2, torch.ones_like(g), g)
                with autocast(device):
                    v = teacher(torch.cat([ids, empty]), torch.cat([xt, xt]), torch.cat([sigma, sigma]),
                                torch.ones(2 * B, device=device), img_ids, txt_ids).float()
                v_c, v_u = v.chunk(2)
                target = v_u + g[:, None, None] * (v_c - v_u)
            else:
                g = torch.ones(B, device=device)
                target = noise - x0
        with autocast(device):
            pred = model(ids, xt, sigma, g, img_ids, txt_ids).float()
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(step - state["ema_start"])
        step += 1
        if step % 10 == 0 or step == 1:
            v = loss.item()
            state["losses"].append((step, round(clock.elapsed, 2), v, int(distill)))
            tick(pbar, clock, step, loss=f"{v:.4f}", distill=int(distill))
        checkpoints.maybe_save(step)
    pbar.close()
    state.update(step=step, elapsed=clock.elapsed)
    save(True)
    print(f"transformer: {step} steps in {clock.elapsed:.0f} s, last loss {state['losses'][-1][2]:.4f}")
    ema.copy_to([model])
    return {"model": model.cpu(), "vae": vae.cpu(), **state}


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------


def plot_losses(vae_losses, tr_losses, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    series = [("VAE (L1 + MSE + KL)", vae_losses), ("transformer (flow matching / distillation)", tr_losses)]
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, (title, ls) in zip(axes, series):
            if ls:
                steps = [r[0] for r in ls]
                ax.plot(steps, [r[2] for r in ls], lw=0.8)
                if len(ls[0]) > 3 and any(r[3] for r in ls):
                    first = next(r[0] for r in ls if r[3])
                    ax.axvline(first, color="gray", ls="--", lw=0.8, label="guidance distillation starts")
                    ax.legend(fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        try:
            write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (820, 300), "white")
    d = ImageDraw.Draw(img)
    for k, (title, ls) in enumerate(series):
        x0 = 10 + 410 * k
        d.text((x0, 5), title + " (log)", fill="black")
        d.rectangle([x0, 20, x0 + 390, 290], outline="black")
        if len(ls) > 1:
            vals = [math.log10(max(r[2], 1e-8)) for r in ls]
            lo, hi = min(vals), max(vals)
            pts = [(x0 + 390 * i / (len(vals) - 1), 290 - 270 * (v - lo) / max(hi - lo, 1e-9)) for i, v in enumerate(vals)]
            d.line(pts, fill="blue")
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def sample_grid(pipe, prompts, path: Path, device, guidance: float, steps: int, seed: int = 0) -> None:
    from bitflux.eval.shapeeval import captioned_grid

    pipe.to(device)
    with torch.no_grad():
        images = pipe(prompts, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                      max_sequence_length=pipe.tokenizer_2.model_max_length,
                      generator=torch.Generator(device=device).manual_seed(seed)).images
    grid = captioned_grid(images, prompts, cols=8)
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))


def check_folder(folder: Path, total_mb: float = 25.0, file_mb: float = 16.0) -> int:
    files = [p for p in folder.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    big = [p for p in files if p.stat().st_size > file_mb * 1e6]
    bad = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if total > total_mb * 1e6 or big or bad:
        raise BitfluxError(f"{folder}: {total / 1e6:.1f} MB, too-large files {big}, non-safetensors weights {bad}")
    return total


def finalize(args, cfg, trained: dict, device) -> None:
    model, vae = trained["model"], trained["vae"]
    pipe = assemble_pipeline(vae, model.clip, model.t5, model.transformer, cfg)
    counts = param_counts(pipe)
    folder = args.out / "model"
    save_pipeline(pipe, folder)
    # Record the tokenizer class by its portable name (transformers 4 and 5 both have it).
    mi = json.loads((folder / "model_index.json").read_text())
    mi["tokenizer"] = mi["tokenizer_2"] = ["transformers", "PreTrainedTokenizerFast"]
    write_text_atomic(folder / "model_index.json", json.dumps(mi, indent=2) + "\n")
    size = check_folder(folder)
    print(f"saved {folder} ({size / 1e6:.1f} MB): {counts}")

    from ..pipeline import pipeline_from_folder

    pipe = pipeline_from_folder(Path(folder), torch.float32, {})
    pipe.set_progress_bar_config(disable=True)
    log = {"config": cfg.to_dict(), "params": counts, "bytes": size, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "args": {k: str(v) for k, v in vars(args).items()}}
    for name in ("vae", "transformer"):
        ck = torch.load(args.out / "ckpt" / f"{name}.pt", map_location="cpu", weights_only=False)
        st = ck["state"]
        log[name] = {k: v for k, v in st.items() if k != "losses"}
        log[name + "_losses"] = st["losses"]
    def write_log():  # now, and again with the ShapeEval scores: a failed evaluation keeps the log
        write_text_atomic(args.out / "train_log.json", json.dumps(log, indent=1) + "\n")

    write_log()
    plot_losses(log["vae_losses"], log["transformer_losses"], args.out / "loss.png")
    sample_grid(pipe, SAMPLE_PROMPTS, args.out / "samples.png", device, args.eval_guidance, args.sample_steps,
                seed=args.seed)
    if args.eval:
        from bitflux.eval import shapeeval

        fn = shapeeval.pipeline_generate_fn(pipe, num_inference_steps=args.sample_steps,
                                            guidance_scale=args.eval_guidance)
        t = time.perf_counter()
        res = shapeeval.evaluate(fn, seeds=(0,), out_dir=args.out)
        log["shapeeval"] = {"guidance_scale": args.eval_guidance, "overall": res["overall"],
                            "categories": res["categories"], "seconds": round(time.perf_counter() - t, 1)}
        print("ShapeEval:", json.dumps(log["shapeeval"]))
        write_log()


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        # cuDNN's fused attention fails in backward on this model (torch 2.11, H200: mha_graph.execute);
        # flash / memory-efficient attention train it fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(args.small)
    t0 = time.perf_counter()
    total = args.minutes * 60
    if args.stage in ("all", "vae"):
        share = args.vae_share if args.stage == "all" else 1.0
        train_vae(args, cfg, device, total * share)
    if args.stage in ("all", "transformer"):
        share = 1 - args.vae_share if args.stage == "all" else 1.0
        trained = train_transformer(args, cfg, device, total * share)
        finalize(args, cfg, trained, device)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
