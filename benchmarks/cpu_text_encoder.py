"""FLUX.1's T5-XXL text encoder (text_encoder_2) at full size on a CPU: loaded in fp32, as diffusers loads
it for an fp32 pipeline, against bitflux's load_pipeline, which holds its bf16 linear weights as stored and
widens each for its own use (`bitflux`), and against encode_prompts, which streams its blocks' weights from
the checkpoint a block at a time (`streamed`; bitflux.text_encoders). Random weights written once as a bf16
checkpoint (9.5 GB, as FLUX.1-dev ships it; nothing downloaded); each variant loads it in its own child
process, so peak resident memory (VmHWM) is its own.

    PYTHONPATH=src python benchmarks/cpu_text_encoder.py [--dir /tmp/t5xxl] [--tokens 512] [--layers 24]
        [--variants fp32 bitflux streamed] [--tiny] [--json out.json]

Prints, per variant: load time, an encode of a prompt padded to --tokens (best of two), peak RSS, parameter
bytes held between encodes; then the ratios to the first variant and whether the encodings are
bit-identical. `--layers`: fewer than T5-XXL's 24 for a quick run; `--tiny`: a T5 of width 64 (what the
tests run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from child_rows import child_row

from bitflux.calibrate.memory import peak_resident_bytes
from bitflux.checkpoint import write_text_atomic

TINY = {"d_model": 64, "d_ff": 160, "d_kv": 16, "num_heads": 4, "vocab_size": 32}
VARIANTS = ("fp32", "bitflux", "streamed")
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False}


def write_checkpoint(root: Path, config: dict) -> None:
    """A T5-XXL-shaped encoder with random bf16 weights, saved as transformers saves it, as a pipeline folder's
    text_encoder_2 (with a model_index.json naming it alone)."""
    from transformers import T5Config, T5EncoderModel

    if (root / "model_index.json").exists():
        return
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**config))
    model.to_empty(device="cpu").to(torch.bfloat16)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied, as built (to_empty unties them)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            # weights of unit-variance outputs, as a trained encoder keeps its activations
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / max(tensor.shape[-1], 1) ** 0.5
                         if tensor.dim() > 1 else torch.ones(tensor.shape))
    model.save_pretrained(root / "text_encoder_2", max_shard_size="2GB")
    (root / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "T5EncoderModel"]}))


def run_variant(root: Path, variant: str, tokens: int, vocab_size: int) -> dict:
    """In this process: load, one encode of `tokens` token ids, figures."""
    from transformers import T5EncoderModel

    from bitflux.text_encoders import narrow_text_encoders, stream_t5

    start = time.perf_counter()
    if variant == "fp32":
        model = T5EncoderModel.from_pretrained(str(root / "text_encoder_2"), torch_dtype=torch.float32,
                                               local_files_only=True)
    elif variant == "bitflux":  # what load_pipeline(text_encoders="whole") does on a CPU
        model = narrow_text_encoders(root, torch.float32)["text_encoder_2"]
    else:  # what encode_prompts, and load_pipeline on a CPU, do
        model = stream_t5(root / "text_encoder_2", torch.float32)
    load_s = time.perf_counter() - start
    ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    encode_s = []
    with torch.inference_mode():
        for _ in range(2):  # the best of two
            start = time.perf_counter()
            out = model(ids).last_hidden_state
            encode_s.append(time.perf_counter() - start)
    return {"variant": variant, "load_s": round(load_s, 2), "encode_s": round(min(encode_s), 3),
            "peak_rss_bytes": peak_resident_bytes(),
            "parameter_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
            # held between encodes (streamed: not the blocks')
            "output_sha256": hashlib.sha256(out.float().numpy().tobytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/bitflux-t5xxl", help="where the random checkpoint is (written once)")
    parser.add_argument("--tokens", type=int, default=512, help="FLUX.1-dev pads prompts to 512")
    parser.add_argument("--layers", type=int, default=T5_XXL["num_layers"])
    parser.add_argument("--tiny", action="store_true", help="width 64 instead of T5-XXL's 4096")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = {**T5_XXL, **(TINY if args.tiny else {}), "num_layers": args.layers}
    root = Path(args.dir) / f"t5-{config['d_model']}-wide-{args.layers}-layers"
    if args.child:
        print(json.dumps(run_variant(root, args.child, args.tokens, config["vocab_size"])))
        return
    write_checkpoint(root, config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; T5 of width {config['d_model']}, "
          f"{args.layers} layers, bf16 checkpoint; one prompt of {args.tokens} tokens")
    print(f"{'variant':>8} {'load s':>7} {'encode s':>9} {'peak RSS GB':>11} {'params GB':>9}")
    rows = {}
    for variant in args.variants:
        command = [sys.executable, __file__, "--dir", args.dir, "--tokens", str(args.tokens), "--layers",
                   str(args.layers), *(["--tiny"] if args.tiny else []), "--child", variant]
        row = rows[variant] = child_row(command)
        print(f"{variant:>8} {row['load_s']:7.1f} {row['encode_s']:9.1f} {row['peak_rss_bytes'] / 1e9:11.2f} "
              f"{row['parameter_bytes'] / 1e9:9.2f}", flush=True)
    first = rows[args.variants[0]]
    for name in args.variants[1:]:
        ours = rows[name]
        print(f"{args.variants[0]} / {name}: peak RSS {first['peak_rss_bytes'] / ours['peak_rss_bytes']:.2f}x, "
              f"parameters {first['parameter_bytes'] / ours['parameter_bytes']:.2f}x, encode time "
              f"{ours['encode_s'] / first['encode_s']:.2f}x as long; outputs bit-identical: "
              f"{first['output_sha256'] == ours['output_sha256']}")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(list(rows.values()), indent=1))


if __name__ == "__main__":
    main()
