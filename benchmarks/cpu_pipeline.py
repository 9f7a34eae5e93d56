"""A FLUX.1-dev-sized pipeline generating an image on a CPU, end to end: T5-XXL and CLIP-L text encoders, the
ternary transformer (19 double + 38 single blocks, tq2 codes) and the VAE, all at full size with random
weights (the encoders and VAE stored in bf16, as FLUX.1-dev ships them; nothing downloaded), written once as
a bitflux pipeline folder. Each variant loads it and generates one image in its own child process, so its
peak resident memory (VmHWM) is its own:

- staged: as `bitflux generate` does: the prompt encoded by the text encoders alone (encode_prompts), which
  are freed before the rest of the pipeline is loaded without them, and the transformer released before the
  VAE decodes;
- bitflux: the whole pipeline loaded at once by load_pipeline, as the Python API and `bitflux eval` do (on a
  CPU: T5 streamed at each encoding, CLIP held in bf16 and computed in fp32);
- narrow-t5: the same with T5 held whole in bf16 and computed in fp32 (load_pipeline(text_encoders="whole"),
  its default on a CPU before T5 was streamed there);
- fp32-text-encoders: the same pipeline with its text encoders loaded in fp32, as diffusers loads them for
  an fp32 pipeline (and load_pipeline did before bitflux.text_encoders).

    PYTHONPATH=src:benchmarks python benchmarks/cpu_pipeline.py [--dir /tmp/bitflux-flux-dev] [--size 256]
        [--steps 2] [--variants staged bitflux narrow-t5 fp32-text-encoders] [--json out.json]

Prints, per variant: load time, generate() time (prompt encoding, the steps, decoding; for `staged` the
encoding, with the text encoders' loading, counts as load time), their total, peak RSS; a variant killed by
the system (out of memory) is reported as such.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from child_rows import child_row, killed_row
from cpu_flux import build
from cpu_text_encoder import T5_XXL, write_checkpoint

from bitflux import TernaryConfig, demo_model_path
from bitflux.calibrate.memory import peak_resident_bytes
from bitflux.checkpoint import save_transformer, write_text_atomic
from bitflux.flux import FLUX_DEV_CONFIG

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"}
FLUX_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}
TOKEN_LIMITS = {"tokenizer": 77, "tokenizer_2": 512}  # FLUX.1-dev's CLIP and T5 prompt lengths


def write_pipeline(root: Path) -> None:
    """The pipeline folder, once: random full-size components; the demo's tokenizers (their ids fit any
    vocabulary here) and scheduler, with FLUX.1-dev's prompt lengths."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    index = root / "model_index.json"
    if index.exists() and "transformer" in json.loads(index.read_text()):
        return
    write_checkpoint(root, T5_XXL)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(torch.bfloat16).save_pretrained(root / "text_encoder")
    AutoencoderKL(**FLUX_VAE).to(torch.bfloat16).save_pretrained(root / "vae")
    config = TernaryConfig(activations="a8")
    save_transformer(build(FLUX_DEV_CONFIG, ternary=True, fused=False), root / "transformer", config, force=True)
    demo = demo_model_path()
    for name in ("scheduler", *TOKEN_LIMITS):
        shutil.copytree(demo / name, root / name, dirs_exist_ok=True)
    for name, limit in TOKEN_LIMITS.items():
        settings = json.loads((root / name / "tokenizer_config.json").read_text())
        (root / name / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": limit}))
    shutil.copy(demo / "model_index.json", index)


def run_variant(root: Path, variant: str, size: int, steps: int) -> dict:
    """In this process: load the pipeline, generate one image."""
    from bitflux.pipeline import (
        encode_prompts,
        generate,
        load_pipeline,
        pipeline_from_folder,
    )

    prompts, embeddings = ["a red cube on a blue sphere"], None
    start = time.perf_counter()
    if variant == "staged":
        embeddings = encode_prompts(root, prompts)
        pipe = load_pipeline(root, text_encoders=False)
    elif variant in ("bitflux", "narrow-t5"):
        pipe = load_pipeline(root, text_encoders=True if variant == "bitflux" else "whole")
    else:
        from bitflux.checkpoint import load_transformer
        from bitflux.fusion import fuse_projections

        transformer = load_transformer(root / "transformer", dtype=torch.float32)
        pipe = pipeline_from_folder(root, torch.float32, {"transformer": transformer})
        fuse_projections(pipe.transformer)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    image = generate(pipe, prompts, [0], steps=steps, height=size, width=size, progress=False,
                     embeddings=embeddings, release_transformer=variant == "staged")[0]
    generate_s = time.perf_counter() - start
    return {"variant": variant, "load_s": round(load_s, 1), "generate_s": round(generate_s, 1),
            "total_s": round(load_s + generate_s, 1),
            "peak_rss_bytes": peak_resident_bytes(),
            "image_size": list(image.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/bitflux-flux-dev", help="where the pipeline is (written once)")
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["staged", "bitflux", "narrow-t5", "fp32-text-encoders"],
                        choices=["staged", "bitflux", "narrow-t5", "fp32-text-encoders"])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.child:
        print(json.dumps(run_variant(root, args.child, args.size, args.steps)))
        return
    write_pipeline(root)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; FLUX.1-dev-sized pipeline, "
          f"{args.size}x{args.size}, {args.steps} steps, prompts of 512 T5 tokens")
    print(f"{'variant':>20} {'load s':>7} {'generate s':>10} {'total s':>7} {'peak RSS GB':>11}")
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--dir", args.dir, "--size", str(args.size), "--steps",
                   str(args.steps), "--child", variant]
        row = child_row(command, may_be_killed=True) or killed_row(variant, width=20)
        rows.append(row)
        if "killed" in row:
            continue
        print(f"{variant:>20} {row['load_s']:7.1f} {row['generate_s']:10.1f} {row['total_s']:7.1f} "
              f"{row['peak_rss_bytes'] / 1e9:11.2f}", flush=True)
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
