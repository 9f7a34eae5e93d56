"""What a checkpoint or config holds: parameters, coverage, bytes per format, a per-block table."""

from __future__ import annotations

import re
from pathlib import Path

from . import checkpoint, flux
from .config import TernaryConfig
from .convert import check_source, resolve_source
from .surgery import quantize_

_BLOCK = re.compile(r"^((?:single_)?transformer_blocks\.\d+)\.")


def _resolve(path: str) -> tuple[dict, TernaryConfig, str]:
    """(transformer config, ternary config, kind) for a bitflux folder, a source, a config.json or a known name."""
    if path.lower() in flux.KNOWN_CONFIGS:
        return flux.KNOWN_CONFIGS[path.lower()], TernaryConfig(), "known config"
    p = Path(path)
    if p.is_file() and checkpoint.is_gguf(p):
        from .interop.gguf import stored_configs

        config, quant = stored_configs(p)
        return config, quant, "GGUF file"
    if p.is_file() and p.suffix == ".json":
        config = checkpoint.parse_json_object(p.read_bytes(), str(p))
        flux.check_flux_config(config, str(p))
        quant = config.get("quantization_config")
        return config, TernaryConfig.from_dict(quant) if quant else TernaryConfig(), "config.json"
    folder = p / "transformer" if (p / "model_index.json").exists() else p
    if folder.is_dir() and (folder / "config.json").exists():
        config = checkpoint.read_config(folder)
        if "quantization_config" in config:
            flux.check_flux_config(config, str(folder))
            checkpoint.tensor_shapes(checkpoint.weight_files(folder))  # its shards there and whole (their headers)
            return config, TernaryConfig.from_dict(config["quantization_config"]), "bitflux model"
    found = resolve_source(path)
    # what quantize would refuse (a missing tensor, integer-quantized layers) is refused here too: headers only
    check_source(found, path, flux.build_transformer(found.transformer_config, "meta"))
    return found.transformer_config, TernaryConfig(), "full-precision source"


def inspect_path(path: str) -> dict:
    config, quant, kind = _resolve(path)
    model = flux.build_transformer({k: v for k, v in config.items() if k != "quantization_config"}, "meta")
    report = quantize_(model, quant)
    blocks: dict[str, dict] = {}
    for layer in report.layers:
        match = _BLOCK.match(layer.name)
        entry = blocks.setdefault(match.group(1) if match else "other", {"params": 0, "tq2": 0, "tq1": 0})
        entry["params"] += layer.params
        entry["tq2"] += report.layer_bytes(layer, "tq2")
        entry["tq1"] += report.layer_bytes(layer, "tq1")
    return {"path": str(path), "kind": kind, "quantization": {k: v for k, v in quant.to_dict().items()
                                                            if k not in ("include", "exclude")},
            **report.to_dict(), "blocks": blocks}


def format_report(info: dict) -> str:
    gb = 1e9
    lines = [
        f"{info['path']} ({info['kind']})",
        f"parameters: {info['params_total'] / 1e9:.3f} B total, {info['params_quantized'] / 1e9:.3f} B ternary "
        f"in {info['modules_quantized']} linear layers ({100 * info['coverage']:.2f} % coverage)",
        f"method {info['quantization']['method']}, scales per {info['quantization']['granularity']}"
        + (f", stored {info['quantization']['format']} (so held in memory unless --packing)"
           if info["kind"] == "bitflux model" else ""),
        f"bytes: bf16 {info['bytes']['bf16'] / gb:.3f} GB | tq2 {info['bytes']['tq2'] / gb:.3f} GB "
        f"({info['ratio_vs_bf16']['tq2']:.2f}x smaller) | tq1 {info['bytes']['tq1'] / gb:.3f} GB "
        f"({info['ratio_vs_bf16']['tq1']:.2f}x smaller)",
        "",
        f"{'block':34s} {'params':>12s} {'tq2 bytes':>12s} {'tq1 bytes':>12s}",
    ]
    for name, entry in info["blocks"].items():
        lines.append(f"{name:34s} {entry['params']:12,d} {entry['tq2']:12,d} {entry['tq1']:12,d}")
    return "\n".join(lines)
