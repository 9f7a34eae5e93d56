"""Write the model card docs/DEMO_MODEL.md from a training run's outputs.

    python -m bitflux.demo.card --run DIR [--model FOLDER] [--docs docs]

DIR is a `bitflux.demo.train --out` folder (train_log.json, loss.png, samples.png and, from --eval,
shapeeval.json and shapeeval_grid.png). The pictures are copied to docs/demo/, and the 20-step
generation time is measured on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint import write_text_atomic
from . import scenes as S
from .build import MAX_TEXT_TOKENS


def generation_seconds(folder: Path, repeats: int = 3) -> float:
    """Best-of wall time of one 20-step 64x64 image, float32, on this machine's CPU."""
    from ..pipeline import pipeline_from_folder

    pipe = pipeline_from_folder(Path(folder), torch.float32, {})
    pipe.set_progress_bar_config(disable=True)
    best = float("inf")
    for i in range(repeats + 1):
        t = time.perf_counter()
        with torch.no_grad():
            pipe("a red circle", height=64, width=64, num_inference_steps=20, guidance_scale=3.5,
                 max_sequence_length=MAX_TEXT_TOKENS, generator=torch.Generator().manual_seed(i))
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t)
    return best


def render(log: dict, shapeeval: dict | None, seconds: float, pictures: dict[str, str]) -> str:
    p, cfg, tr, vae = log["params"], log["config"], log["transformer"], log["vae"]
    args = log["args"]
    width = cfg["width_heads"] * cfg["head_dim"]
    total = sum(p.values())
    lines = [
        "# The bitflux demo model",
        "",
        "A tiny text-to-image model with the FLUX.1 architecture, trained by this project on procedural",
        "scenes of flat shapes, shipped inside the package (`bitflux.demo_model_path()`), so that the CLI runs",
        "out of the box on a CPU and every quantization method can be scored on learned weights with",
        "ShapeEval (`bitflux.eval.shapeeval`, GenEval's six categories).",
        "",
        "```python",
        "import torch",
        "from diffusers import FluxPipeline",
        "from bitflux import demo_model_path",
        "",
        "pipe = FluxPipeline.from_pretrained(demo_model_path(), dtype=torch.float32)",
        'image = pipe("a yellow square to the left of a purple circle", height=64, width=64,',
        f"             num_inference_steps=20, guidance_scale=3.5, max_sequence_length={MAX_TEXT_TOKENS}).images[0]",
        "```",
        "",
        f"Pass `height=64, width=64` (FluxPipeline's default is 1024) and `max_sequence_length={MAX_TEXT_TOKENS}`:",
        "FluxPipeline pads T5 text to 512 tokens unless told, and the model was trained on",
        f"{MAX_TEXT_TOKENS} (`tokenizer_2.model_max_length` records it).",
        "",
        "## Architecture",
        "",
        "| component | class | configuration | parameters |",
        "| --- | --- | --- | --- |",
        f"| transformer | FluxTransformer2DModel | {cfg['double_blocks']} double-stream + {cfg['single_blocks']} single-stream blocks, "
        f"width {width} ({cfg['width_heads']} heads x {cfg['head_dim']}), RoPE axes {tuple(cfg['axes_dims_rope'])}, "
        f"guidance embedding, 64 input channels (16 latent x 2x2 patches) | {p['transformer'] / 1e6:.2f} M |",
        f"| vae | AutoencoderKL | 64x64x3 <-> 8x8x{cfg['latent_channels']} (8x down), channels {tuple(cfg['vae_channels'])}, "
        f"scaling {vae.get('scaling_factor', 0):.4f}, shift {vae.get('shift_factor', 0):.4f} | {p['vae'] / 1e6:.2f} M |",
        f"| text_encoder | CLIPTextModel (pooled) | {cfg['text_layers']} layers, width {cfg['text_dim']}, {MAX_TEXT_TOKENS} positions | "
        f"{p['text_encoder'] / 1e6:.2f} M |",
        f"| text_encoder_2 | T5EncoderModel (sequence) | {cfg['text_layers']} layers, width {cfg['text_dim']}, relative positions | "
        f"{p['text_encoder_2'] / 1e6:.2f} M |",
        "| tokenizer, tokenizer_2 | PreTrainedTokenizerFast | word level over the grammar's "
        f"{len(S.vocabulary())} words + pad/eos/unk, eos appended | - |",
        "| scheduler | FlowMatchEulerDiscreteScheduler | dynamic shift anchored at 16 image tokens (mu 0.5) | - |",
        "",
        f"Total {total / 1e6:.2f} M parameters, stored as bf16 safetensors: {log['bytes'] / 1e6:.1f} MB. "
        "Every linear layer inside the transformer blocks has in_features a multiple of 64.",
        "",
        "## Data",
        "",
        f"`bitflux.demo.scenes`: 64x64 images, 1 to 4 flat objects ({', '.join(S.SHAPES)}) in "
        f"{len(S.COLORS)} colours ({', '.join(S.COLOR_NAMES)}) on a plain background, sizes 16-32 px by object",
        "count, bounding boxes at least 3 px apart, relations held by GenEval's rule with a margin. Scenes are",
        "drawn and rendered as tensors on the training device (anti-aliased masks from signed distances), so",
        "data never waits on the CPU. Caption grammar (templates and training weights):",
        "",
        "| template | example | weight |",
        "| --- | --- | --- |",
    ]
    examples = {"single_object": "a triangle", "colors": "a red circle", "two_object": "a circle and a square",
                "counting": "three squares", "position": "a yellow square to the left of a purple circle",
                "color_attr": "a blue circle and a red square", "count_color": "three green triangles"}
    for t, w in zip(S.TEMPLATES, S.TRAIN_WEIGHTS):
        lines.append(f"| {t} | {examples[t]} | {w:.2f} |")
    distill_step = tr.get("distill_from_step")
    lines += [
        "",
        "## Training",
        "",
        f"`python -m bitflux.demo.train --out DIR --device {log['device'].split(':')[0]} --minutes {args['minutes']}"
        + (" --eval" if args.get("eval") == "True" else "") + f"` on {log['device_name']}, seed {args['seed']}:",
        "",
        f"1. VAE alone: {vae['step']} steps of batch {args['vae_batch']} in {vae['elapsed']:.0f} s; L1 + MSE + 1e-4 KL"
        " (per element), AdamW lr 1e-3. Then the latent mean and standard deviation set shift_factor and scaling_factor.",
        f"2. Text encoders and transformer together, VAE frozen: {tr['step']} steps of batch {args['batch']} in "
        f"{tr['elapsed']:.0f} s; AdamW lr {args['lr']} (warm-up, decay to 10 % over the last 30 % of the time), "
        f"bf16 autocast on GPU, EMA {args['ema']}. Rectified flow as FLUX: x_t = (1 - s) x0 + s noise, target noise - x0,"
        " s ~ logit-normal(0, 1); 10 % of captions dropped (empty prompt).",
        f"3. Guidance distillation (FLUX.1-dev style) from step {distill_step}: the EMA model is frozen as teacher; for"
        " g in [1, 6] the student, given g in the guidance embedding, learns the teacher's classifier-free-guided"
        " velocity v_u + g (v_c - v_u) in one pass. So `guidance_scale` works as in FLUX.1-dev and generation costs"
        " one transformer pass per step (true CFG would cost two). The final weights are the EMA over this phase.",
        "",
        "The text encoders are trained jointly (not frozen): no pretrained encoder knows this vocabulary, and a",
        "randomly initialised frozen one would leave word order (which object is left of which) to the transformer",
        "alone. Both together are 0.6 M parameters, so they cost little.",
        "",
        f"![loss curve]({pictures['loss']})",
        "",
        "## Samples",
        "",
        "20 steps, guidance 3.5, one seed per prompt, prompt under each image:",
        "",
        f"![samples]({pictures['samples']})",
        "",
        "## ShapeEval",
        "",
    ]
    if shapeeval:
        lines += [
            f"`{shapeeval['version']}`: {shapeeval['n_images']} images (48 prompts per category x seeds "
            f"{shapeeval['seeds']}), 20 steps, guidance {log.get('shapeeval', {}).get('guidance_scale', 3.5)}, "
            f"scored by the training run on {log.get('device_name', 'its device')} (`bitflux eval` on a CPU, where "
            "the README's and BENCHMARKS.md's figures come from, rounds differently and scores a little apart).",
            "",
            "| category | score |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in shapeeval["categories"].items()]
        lines += [f"| **overall** | **{shapeeval['overall']:.3f}** |", ""]
        if "grid" in pictures:
            lines += [f"Every image with a green (pass) or red (fail) frame: [shapeeval_grid.png]({pictures['grid']}).", ""]
    else:
        lines += ["Not measured for this run: `python -m bitflux.eval.shapeeval --model FOLDER --out DIR`.", ""]
    weakest = min(shapeeval["categories"], key=shapeeval["categories"].get) if shapeeval else None
    lines += [
        "## What limits it",
        "",
        f"- Training time: {(vae['elapsed'] + tr['elapsed']) / 60:.1f} minutes in all on {log['device_name']}; the"
        " transformer loss was still falling when the budget ran out (see the curve).",
        ("- Size: the demo pipeline ships in at most 25 MB (beside its 4.6 MB calibrated ternary transformer), so "
         "the transformer has 9 M parameters at width 256."),
        "- Resolution: 64x64 pixels are 8x8 latents and 16 image tokens; a 16-px object is two latent pixels"
        " wide, so crowded scenes (four objects) are the hardest to draw apart and count.",
    ]
    if weakest:
        lines.append(f"- The weakest category is {weakest} ({shapeeval['categories'][weakest]:.3f}).")
    lines += [
        "",
        "## ShapeEval's detector",
        "",
        "The detector (nearest-palette segmentation, connected components after a 1-px opening, best IoU with",
        "an ideal circle / square / triangle fitted to each box, box centres for GenEval's position rule) scores",
        "rendered ground-truth scenes at 100 % in every category (tests/test_shapeeval.py asserts >= 97 %).",
        "",
        "## Speed",
        "",
        f"One 20-step 64x64 image, float32, on this project's 2-core CPU: {seconds:.2f} s (best of 3 after a warm-up;",
        "other processes shared the cores).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitflux.demo.card", description="Write docs/DEMO_MODEL.md from a run.")
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--model", type=Path, default=None, help="pipeline folder to time (default RUN/model)")
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    a = ap.parse_args(argv)
    log = json.loads((a.run / "train_log.json").read_text())
    se_path = a.run / "shapeeval.json"
    shapeeval = json.loads(se_path.read_text()) if se_path.exists() else None
    pics_dir = a.docs / "demo"
    pics_dir.mkdir(parents=True, exist_ok=True)
    pictures = {}
    for key, name in (("loss", "loss.png"), ("samples", "samples.png"), ("grid", "shapeeval_grid.png")):
        if (a.run / name).exists():
            shutil.copyfile(a.run / name, pics_dir / name)
            pictures[key] = f"demo/{name}"
    seconds = generation_seconds(a.model or a.run / "model")
    text = render(log, shapeeval, seconds, pictures)
    write_text_atomic(a.docs / "DEMO_MODEL.md", text)
    print(f"wrote {a.docs / 'DEMO_MODEL.md'} (20-step generation {seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
