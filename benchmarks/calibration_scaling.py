"""How block-wise calibration's time and memory grow with width and depth, and what that predicts for
FLUX.1-dev on one H100.

    python benchmarks/calibration_scaling.py [--widths 128 256 384 512] [--depths 1x2 2x4 4x8]
        [--steps 20] [--records 64] [--threads 1] [--json]
    # on a GPU, one full-width FLUX.1-dev block pair at 1024x1024 tokens (measures what is assumed below):
    python benchmarks/calibration_scaling.py --device cuda --widths 3072 --depths 1x1 --fixed-depth 1x1 \
        --image-tokens 4096 --text-tokens 512 --records 16 --batch-size 4 --steps 20

Each point calibrates (scales + block-wise) a random FLUX-architecture transformer on random teacher
records (64 image + 16 text tokens) in a fresh child process, so its peak resident memory (sampled) is its
own. The model: time is proportional to the floating-point work (6 x block parameters x tokens per
training step, plus the forward passes over all records), and memory is the process baseline (model +
records) plus one block's training state (fp32 latent weights, gradients and two Adam moments: 16 bytes
per parameter) plus activations. The fitted CPU throughput checks the model across the sweep; the FLUX.1-dev
prediction divides the same work by an assumed H100 throughput (stated in the output).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

HEAD_DIM = 64
FLUX_DEV_TOKENS = 4096 + 512  # 1024x1024 image + T5 text
H100_ASSUMED_FLOPS = 300e12  # ~40 % of the 790 TFLOP/s bf16 measured on 8192^3: small batches, attention, Adam


def _config(width: int, double: int, single: int) -> dict:
    head_dim = 128 if width % 128 == 0 and width >= 1024 else HEAD_DIM  # FLUX's own heads at full width
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": double,
            "num_single_layers": single, "attention_head_dim": head_dim, "num_attention_heads": width // head_dim,
            "joint_attention_dim": 128, "pooled_projection_dim": 128, "guidance_embeds": True,
            "axes_dims_rope": [16, 24, 24] if head_dim == 64 else [16, 56, 56]}


def block_params(config: dict) -> list[int]:
    """Linear weights per block, in order (the work and the training state of block-wise calibration)."""
    from bitflux.flux import block_names, build_transformer

    model = build_transformer(config, "meta")
    return [sum(m.weight.numel() for m in model.get_submodule(n).modules() if isinstance(m, torch.nn.Linear))
            for n in block_names(config)]


def predicted_flops(params: list[int], width: int, tokens: int, records: int, steps: int, batch: int) -> float:
    """Training steps (forward + backward: 3x the forward) and four forward passes over all records
    (targets, student stream, objective before and after). Forward per token: 2 P for the linears and
    4 T D for attention (scores and weighted sum)."""
    forward = [2 * p * tokens + 4 * tokens**2 * width for p in params]
    return sum(f * (3 * batch * steps + 4 * records) for f in forward)


def child(width: int, double: int, single: int, args) -> dict:
    from bitflux import TernaryConfig
    from bitflux.calibrate import (
        CalibrationConfig,
        CalibrationReport,
        ModelSource,
        TeacherData,
        calibrate_transformer,
        measured,
    )
    from bitflux.flux import build_transformer

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records, image_tokens, text_tokens = args.records, args.image_tokens, args.text_tokens
    config = _config(width, double, single)
    model = build_transformer(config, device).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    side = int(image_tokens ** 0.5)
    ids = torch.zeros(image_tokens, 3)
    ids[:, 1], ids[:, 2] = torch.arange(image_tokens) // side, torch.arange(image_tokens) % side
    inputs = {"hidden_states": torch.randn(records, image_tokens, 64, generator=g, dtype=dtype),
              "encoder_hidden_states": torch.randn(records, text_tokens, 128, generator=g, dtype=dtype),
              "pooled_projections": torch.randn(records, 128, generator=g, dtype=dtype),
              "timestep": torch.rand(records, generator=g, dtype=dtype), "guidance": torch.full((records,), 3.5, dtype=dtype),
              "img_ids": ids, "txt_ids": torch.zeros(text_tokens, 3)}
    with torch.no_grad():
        velocity = torch.cat([model(**{k: (v if k.endswith("ids") else v[i:i + 4]).to(device) for k, v in inputs.items()},
                                    return_dict=False)[0].cpu() for i in range(0, records, 4)])
    teacher = TeacherData(inputs, velocity)
    calib = CalibrationConfig(stages=("scales", "blockwise"), steps=args.steps, batch_size=args.batch_size,
                              eval_records=records)
    report = CalibrationReport(calib.stages)
    with measured(report, device):
        calibrate_transformer(ModelSource(model), teacher, TernaryConfig(), calib, device, progress=False, report=report)
    params = block_params(config)
    return {"width": width, "double": double, "single": single, "params_blocks": sum(params),
            "max_block_params": max(params), "seconds": report.seconds["total"], "device": str(device),
            "flops": predicted_flops(params, width, image_tokens + text_tokens, records, args.steps, args.batch_size),
            "rss_start_mib": report.start_host_bytes / 2**20, "rss_peak_mib": report.peak_host_bytes / 2**20,
            "device_peak_mib": report.peak_device_bytes / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384, 512])
    parser.add_argument("--depths", nargs="+", default=["1x2", "2x4", "4x8"], help="DOUBLExSINGLE blocks")
    parser.add_argument("--fixed-width", type=int, default=256)
    parser.add_argument("--fixed-depth", default="2x4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return 0
    depth = tuple(int(v) for v in args.fixed_depth.split("x"))
    points = [(w, *depth) for w in args.widths]
    points += [(args.fixed_width, *(int(v) for v in d.split("x"))) for d in args.depths
               if (args.fixed_width, *(int(v) for v in d.split("x"))) not in points]
    rows = []
    for width, double, single in points:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", str(width), str(double), str(single),
                              "--steps", str(args.steps), "--records", str(args.records),
                              "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                              "--image-tokens", str(args.image_tokens), "--text-tokens", str(args.text_tokens),
                              "--device", args.device],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"width {width:4d} blocks {double}+{single}: {row['params_blocks'] / 1e6:6.2f} M block params, "
              f"{row['seconds']:6.1f} s ({row['flops'] / row['seconds'] / 1e9:5.1f} GFLOP/s effective), "
              f"peak RSS +{row['rss_peak_mib'] - row['rss_start_mib']:.0f} MiB over {row['rss_start_mib']:.0f}"
              + (f", device peak {row['device_peak_mib']:.0f} MiB" if row["device_peak_mib"] else ""), flush=True)
    print(extrapolate(rows, args))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def extrapolate(rows: list[dict], args) -> str:
    """FLUX.1-dev on one H100 from the same work model, with the recipe's default budget."""
    from bitflux.flux import FLUX_DEV_CONFIG

    rates = [r["flops"] / r["seconds"] for r in rows]
    # Memory over the process baseline against the largest block's weights, fitted by least squares: the
    # slope is the bytes each weight of the block being calibrated costs (state, Gram matrices, copies).
    x = torch.tensor([float(r["max_block_params"]) for r in rows])
    y = torch.tensor([(r["rss_peak_mib"] - r["rss_start_mib"]) * 2**20 for r in rows])
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum().clamp_min(1))
    params = block_params(FLUX_DEV_CONFIG)
    steps, batch, records = 200, 4, 224  # 8 trajectories x 28 steps
    flops = predicted_flops(params, 3072, FLUX_DEV_TOKENS, records, steps, batch)
    state = slope * max(params)
    # Activations kept for backward: ~60 tensors of (batch, tokens, width) in bf16 per block (the MLP ones 4x).
    activations = 60 * batch * FLUX_DEV_TOKENS * 3072 * 2
    streams = 3 * records * FLUX_DEV_TOKENS * 3072 * 2  # full-precision, student, targets (host, bf16)
    return "\n".join([
        f"CPU effective throughput across the sweep: {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} GFLOP/s "
        f"(a constant rate means time grows as the work model says: linearly in depth, quadratically in width)",
        f"FLUX.1-dev ({len(params)} blocks, {sum(params) / 1e9:.2f} B block weights, {FLUX_DEV_TOKENS} tokens), "
        f"{steps} steps/block, batch {batch}, {records} records: {flops / 1e15:.0f} PFLOP -> "
        f"{flops / H100_ASSUMED_FLOPS / 60:.0f} min on one H100 at an assumed {H100_ASSUMED_FLOPS / 1e12:.0f} TFLOP/s",
        f"memory over the baseline grows with the largest block, not with depth: {slope:.0f} bytes per weight of "
        f"the largest block (fit over the sweep)",
        f"  FLUX.1-dev device memory: largest block ({max(params) / 1e6:.0f} M weights) x {slope:.0f} B = "
        f"{state / 2**30:.1f} GiB + activations ~{activations / 2**30:.1f} GiB; the teacher phase needs the bf16 "
        f"pipeline (~34 GiB) alone",
        f"  host memory: record streams {streams / 2**30:.0f} GiB (bf16; fewer records or disk-backed streams lower it)",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
