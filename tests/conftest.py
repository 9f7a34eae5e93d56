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
