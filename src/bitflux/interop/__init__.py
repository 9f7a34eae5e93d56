"""Interoperability: GGUF files with ggml's ternary blocks (gguf.py) and LoRA side branches (lora.py)."""
