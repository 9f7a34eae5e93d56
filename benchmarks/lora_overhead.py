"""LoRA side-branch cost: one FLUX-shaped transformer forward, full precision and ternary, with 0, 1 and 2
LoRAs on every block linear, and with one LoRA fused. Baseline and bitflux run in one process; ratios are
against the same model without LoRA.

    python benchmarks/lora_overhead.py [--device cpu|cuda] [--width 512] [--double 2] [--single 4]
                                       [--rank 16] [--tokens 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from bitflux import TernaryConfig, quantize_
from bitflux.flux import build_transformer
from bitflux.interop.lora import load_lora


def random_lora(model, rank: int, seed: int) -> dict:
    """A PEFT-style state dict with a rank-`rank` pair for every block linear of `model`."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if "transformer_blocks." in name and hasattr(module, "in_features"):
            down = torch.randn(rank, module.in_features, generator=generator) * 0.01
            up = torch.randn(module.out_features, rank, generator=generator) * 0.01
            state.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
    return state


def timed(model, inputs, repeats: int, device) -> float:
    """Median milliseconds per forward (the median resists other processes sharing the machine)."""
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=512, help="multiple of 128 (heads of 128)")
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (text tokens: a quarter)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
              "num_layers": args.double, "num_single_layers": args.single, "attention_head_dim": 128,
              "num_attention_heads": args.width // 128, "joint_attention_dim": 512, "pooled_projection_dim": 256,
              "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
    torch.manual_seed(0)
    model = build_transformer(config, "cpu").to(device, dtype).eval()
    text = max(args.tokens // 4, 1)
    inputs = dict(hidden_states=torch.randn(1, args.tokens, 64, device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, text, 512, device=device, dtype=dtype),
                  pooled_projections=torch.randn(1, 256, device=device, dtype=dtype),
                  timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                  img_ids=torch.zeros(args.tokens, 3, device=device), txt_ids=torch.zeros(text, 3, device=device))
    loras = [random_lora(model, args.rank, seed) for seed in (1, 2)]
    rows = []
    for label in ("full precision", "ternary"):
        if label == "ternary":
            quantize_(model, TernaryConfig(granularity="channel"))
        base = timed(model, inputs, args.repeats, device)
        rows.append((label, base, 1.0))
        adapters = []
        for count, lora in enumerate(loras, 1):
            adapters.append(load_lora(model, lora))
            ms = timed(model, inputs, args.repeats, device)
            rows.append((f"{label} + {count} LoRA", ms, ms / base))
        adapters[1].remove()
        adapters[0].fuse()
        ms = timed(model, inputs, args.repeats, device)
        rows.append((f"{label} + 1 LoRA fused", ms, ms / base))
        adapters[0].remove()
    print(f"device {device}, width {args.width}, {args.double}+{args.single} blocks, rank {args.rank}, "
          f"{args.tokens}+{text} tokens, {dtype}")
    for label, ms, ratio in rows:
        print(f"{label:34s} {ms:9.1f} ms  x{ratio:.3f}")


if __name__ == "__main__":
    main()
