import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU the Triton kernels run in Triton's interpreter; the variable must be set before anything
# imports Triton, so here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_CONFIG = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 2,
    "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 48,
    "pooled_projection_dim": 24, "guidance_embeds": True, "axes_dims_rope": [4, 14, 14],
}


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)


def build_tiny(seed: int = 0, config=None):
    from bitflux.flux import build_transformer

    torch.manual_seed(seed)
    model = build_transformer(config or TINY_CONFIG, "cpu")
    with torch.no_grad():  # diffusers zero-initialises some outputs; random values exercise every path
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_inputs(config=None, batch=1, image_tokens=16, text_tokens=6, seed=1):
    config = config or TINY_CONFIG
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(image_tokens, 3)
    side = int(image_tokens ** 0.5)
    ids[:, 1] = torch.arange(image_tokens) // side
    ids[:, 2] = torch.arange(image_tokens) % side
    return dict(
        hidden_states=torch.randn(batch, image_tokens, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5) if config["guidance_embeds"] else None,
        img_ids=ids,
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )


def tiny_pipeline():
    """A real diffusers FluxPipeline around the tiny transformer, with word-level tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    words = ["<pad>", "<unk>", "</s>", "a", "red", "blue", "circle", "square", "left", "of"]

    def tokenizer():
        inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        inner.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                       model_max_length=8)

    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(words), hidden_size=TINY_CONFIG["pooled_projection_dim"],
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=8, pad_token_id=0, bos_token_id=0, eos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=TINY_CONFIG["joint_attention_dim"], d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2, is_encoder_decoder=False, use_cache=False,
                                 pad_token_id=0, eos_token_id=2, decoder_start_token_id=0))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        scaling_factor=1.0, shift_factor=0.0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip.eval(),
                        tokenizer=tokenizer(), text_encoder_2=t5.eval(), tokenizer_2=tokenizer(), transformer=build_tiny())


def owned_weights(model):
    """The model with its weights copied into memory of its own. from_pretrained with safetensors >= 0.8 leaves
    them views of the mapped file, placed as it lays them out (8-byte aligned), and some CPUs' BLAS (an AMD
    EPYC's) sums in another order there: 1e-6 off the same model in allocated memory, as bitflux loads it."""
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.data = tensor.data.clone()
    return model


@pytest.fixture
def tiny_folder(tmp_path):
    """A diffusers transformer folder of a tiny FLUX with random weights."""
    model = build_tiny()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def bitflux_cache(tmp_path_factory):
    """The demo's ternary cache lives in a temporary folder shared by the session's tests."""
    path = tmp_path_factory.mktemp("bitflux-cache")
    os.environ["BITFLUX_CACHE"] = str(path)
    return path


def cached_hub_snapshot(monkeypatch, hub, repo_id: str, files=("ink.safetensors",)):
    """A Hugging Face cache at `hub`, made huggingface_hub's, holding `repo_id`'s snapshot abc123 of empty `files`."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at import
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for name in files:
        (snapshot / name).write_bytes(b"")
    return snapshot
