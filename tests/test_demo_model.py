"""The shipped demo model folder, and the training script that makes it."""

import json
import os

import pytest
import torch

from bitflux.demo import demo_model_path
from bitflux.eval import shapeeval


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxPipeline

    os.environ["HF_HUB_OFFLINE"] = "1"
    p = FluxPipeline.from_pretrained(demo_model_path(), torch_dtype=torch.float32, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_the_folder_is_small_safetensors_only():
    files = [p for p in demo_model_path().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25_000_000
    assert all(p.stat().st_size <= 16_000_000 for p in files)
    weights = [p for p in files if p.suffix not in (".json", ".txt", ".md")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    index = json.loads((demo_model_path() / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"


def test_the_pipeline_loads_offline_and_generates_64x64(pipe):
    assert pipe.transformer.config.guidance_embeds
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    out = pipe(["a red circle", "two squares"], height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
               max_sequence_length=pipe.tokenizer_2.model_max_length, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 64, 64, 3) and out.std() > 0.01


def test_block_linears_have_in_features_multiple_of_64(pipe):
    linears = [m for n, m in pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and "blocks" in n]
    assert linears and all(m.in_features % 64 == 0 for m in linears)


def test_a_small_shapeeval_run_of_the_pipeline_completes(pipe, tmp_path):
    fn = shapeeval.pipeline_generate_fn(pipe, num_inference_steps=4)
    items = shapeeval.prompt_set(per_category=1)
    res = shapeeval.evaluate(fn, items=items, seeds=(0,), out_dir=tmp_path, progress=False)
    assert res["n_images"] == 6 and 0.0 <= res["overall"] <= 1.0
    assert (tmp_path / "shapeeval.json").exists() and (tmp_path / "shapeeval_grid.png").exists()


def test_training_script_trains_resumes_and_writes_a_loadable_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from bitflux.demo import train

    common = ["--out", str(tmp_path), "--device", "cpu", "--small", "--batch", "4", "--vae-batch", "4",
              "--sample-steps", "2"]
    train.main(common + ["--stage", "vae", "--vae-steps", "1"])
    ck_path = tmp_path / "ckpt" / "vae.pt"
    ck = torch.load(ck_path, weights_only=False)
    assert ck["state"]["done"] and ck["state"]["step"] == 1
    ck["state"]["done"] = False  # as if the run had been stopped there
    torch.save(ck, ck_path)
    train.main(common + ["--stage", "all", "--resume", "--vae-steps", "2", "--steps", "2"])
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["vae"]["step"] == 2 and log["transformer"]["step"] == 2
    assert log["transformer_losses"] and all(loss > 0 for _, _, loss, _ in log["transformer_losses"])
    for name in ("loss.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 0
    pipe = FluxPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    assert pipe.transformer.config.num_layers == 1
