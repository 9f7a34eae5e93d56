"""The demo model's components: configs, construction, and assembly into a diffusers FluxPipeline."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .scenes import IMAGE_SIZE
from .text import EOS_ID, PAD_ID, build_tokenizer, vocab

# Text tokens per caption, end token and padding included: the longest caption of the grammar is 10
# words. FluxPipeline pads the T5 side to its `max_sequence_length` argument (512 unless given), so the
# demo model must be called with max_sequence_length=MAX_TEXT_TOKENS; tokenizer_2.model_max_length
# records it in the folder.
MAX_TEXT_TOKENS = 16


@dataclass
class DemoConfig:
    # Transformer: FLUX structure at width 256 (4 heads x 64), 2 double-stream + 4 single-stream blocks.
    width_heads: int = 4
    head_dim: int = 64
    double_blocks: int = 2
    single_blocks: int = 4
    axes_dims_rope: tuple[int, int, int] = (16, 24, 24)
    # Text encoders: word-level vocabularies, so small encoders suffice.
    text_dim: int = 128
    text_layers: int = 2
    # VAE: 64x64x3 <-> 8x8x16, like FLUX's 8x downsampling and 16 channels.
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)
    latent_channels: int = 16
    image_size: int = IMAGE_SIZE
    max_text_tokens: int = MAX_TEXT_TOKENS

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(cfg: DemoConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=32,
        sample_size=cfg.image_size,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_text_encoders(cfg: DemoConfig):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    v = len(vocab())
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=v,
            hidden_size=cfg.text_dim,
            intermediate_size=cfg.text_dim * 2,
            projection_dim=cfg.text_dim,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_dim // 64,
            max_position_embeddings=cfg.max_text_tokens,
            pad_token_id=PAD_ID,
            bos_token_id=PAD_ID,
            eos_token_id=EOS_ID,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=v,
            d_model=cfg.text_dim,
            d_kv=32,
            d_ff=cfg.text_dim * 2,
            num_layers=cfg.text_layers,
            num_heads=cfg.text_dim // 32,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=cfg.max_text_tokens,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    return clip, t5


def build_transformer(cfg: DemoConfig):
    from diffusers import FluxTransformer2DModel

    assert sum(cfg.axes_dims_rope) == cfg.head_dim
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.latent_channels * 4,
        num_layers=cfg.double_blocks,
        num_single_layers=cfg.single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.width_heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.text_dim,
        guidance_embeds=True,
        axes_dims_rope=cfg.axes_dims_rope,
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # 16 image tokens: dynamic shifting anchored at that length gives mu = 0.5 (shift ~1.65) at 64x64.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )


def build_tokenizers(cfg: DemoConfig):
    return build_tokenizer(cfg.max_text_tokens), build_tokenizer(cfg.max_text_tokens)


def assemble_pipeline(vae, clip, t5, transformer, cfg: DemoConfig):
    from diffusers import FluxPipeline

    tok, tok2 = build_tokenizers(cfg)
    return FluxPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer,
    )


def save_pipeline(pipe, folder, dtype=torch.bfloat16, shard="10MB") -> None:
    """Write the pipeline as safetensors in `dtype`, shards of at most `shard`."""
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        getattr(pipe, name).to(dtype)
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)


def param_counts(pipe) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
