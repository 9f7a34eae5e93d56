"""Interoperability: GGUF files with ggml's ternary blocks (gguf.py) and LoRA side branches (lora.py)."""


def layer_granularity(layer) -> str:
    """'tensor' | 'channel' | 'group' of a TernaryLinear, read off its scales (TernaryLinear keeps no config)."""
    if layer.group_size:
        return "group"
    return "tensor" if layer.weight_scale.numel() == 1 else "channel"
